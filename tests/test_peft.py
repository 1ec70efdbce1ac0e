"""LoRA fine-tuning (peft): the probe sees the adapted pre-activations and the drift the weights the forward applies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from negmonitor.adapters import find_sites
from negmonitor.errors import NegmonitorError
from negmonitor.monitoring.engine import MonitorState, take_measurement
from negmonitor.probeset import ProbeSet
from negmonitor.records import RecordStore
from test_hf_trainer import PROBE, TEXT, _args, _Blocks
from tiny_models import tiny_causal_lm, tiny_tokenizer

SITES = {"llama": "gate_proj", "gpt2": "c_fc", "neox": "dense_h_to_4h"}


def _lora(family: str, **config):
    """A tiny model with LoRA on its MLP sites, B initialised at random (PEFT's default zero B has no delta)."""
    torch.manual_seed(1)
    settings = dict(r=4, lora_alpha=8, target_modules=[SITES[family]], init_lora_weights=False,
                    fan_in_fan_out=family == "gpt2")
    return get_peft_model(tiny_causal_lm(family), LoraConfig(**{**settings, **config}))


def _rows(model) -> list[torch.Tensor]:
    return [site.weight_rows().clone() for site in find_sites(model)]


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox"])
def test_lora_weight_rows_are_the_weights_the_forward_applies(family) -> None:
    model = _lora(family)
    base = [site.projection.get_base_layer().weight.detach().clone() for site in find_sites(model)]
    rows = _rows(model)
    assert all(torch.equal(a, b) for a, b in zip(rows, _rows(model)))  # reads are copies, the same each time,
    for site, frozen in zip(find_sites(model), base):  # the model's own weights are left as they were
        assert torch.equal(site.projection.get_base_layer().weight, frozen)
    merged = _rows(_lora(family).merge_and_unload())  # the same adapters, folded into plain layers by peft
    for got, want, frozen in zip(rows, merged, base):
        assert got.shape == (64, 32)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got, frozen.t() if family == "gpt2" else frozen)  # the base alone is not it

    for site in find_sites(model):
        site.projection.merge()  # merged in place: the base now holds the delta, nothing is added twice
    for got, want in zip(_rows(model), merged):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with model.disable_adapter():  # the forward unmerges and applies the base alone
        for got, frozen in zip(_rows(model), base):
            torch.testing.assert_close(got, frozen.t() if family == "gpt2" else frozen, rtol=1e-5, atol=1e-6)


def test_a_lora_variant_or_a_sharded_adapter_is_refused_in_one_line(monkeypatch) -> None:
    model = _lora("llama", use_dora=True)
    with pytest.raises(NegmonitorError, match=r"weight drift cannot read a Linear PEFT layer \(adapter default is a "
                                              r"LoRA variant such as DoRA\) — leave 'drift' out of the monitor's"):
        find_sites(model)[0].weight_rows()

    site = find_sites(_lora("llama"))[0]  # an adapter's shard (a flat FSDP view) where its whole weight belongs
    monkeypatch.setattr(site.projection, "get_delta_weight", lambda name: torch.ones(80))
    with pytest.raises(NegmonitorError, match=r"\(adapter default's delta has shape \(80,\), its base weight "
                                              r"\(64, 32\)\) — leave 'drift' out"):
        site.weight_rows()


def test_the_lightning_callback_finds_the_model_inside_a_peft_wrapper() -> None:
    import lightning as L

    from negmonitor.callbacks.monitor import find_hf_model

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _lora("llama")

    module = Module()
    found = find_hf_model(module)
    assert found is module.net.base_model.model  # the transformers model, its MLP sites the LoRA layers
    assert [type(site.projection).__name__ for site in find_sites(found)] == ["Linear", "Linear"]
    assert all(hasattr(site.projection, "lora_A") for site in find_sites(found))


def test_hf_trainer_lora_run_records_the_adapters_drift_and_adapted_preactivations(tmp_path) -> None:
    from transformers import Trainer

    from negmonitor.integrations.hf import NegativeDifferentiationCallback

    tokenizer = tiny_tokenizer()
    model = get_peft_model(tiny_causal_lm("llama").train(),
                           LoraConfig(r=4, target_modules=["gate_proj", "q_proj"], lora_dropout=0.1))
    callback = NegativeDifferentiationCallback(probe=[TEXT], every_n_steps=4, log_spaced_until=2, drift_dtype="fp32",
                                               **PROBE)
    trainer = Trainer(model=model, args=_args(tmp_path / "out", 5, learning_rate=3e-2),
                      train_dataset=_Blocks(tokenizer), processing_class=tokenizer, callbacks=[callback])
    trainer.train()

    store = RecordStore(tmp_path / "out" / "negmonitor")
    neurons = store.read_neurons()
    last = neurons[neurons.step == 5].sort_values(["layer", "neuron"])
    assert (last.drift_cos_dissim > 0).all()  # only the adapters train: the frozen base weight never moves
    assert {"drift/cohort", "drift/rest"} <= set(store.read_scalars().metric)

    merged = model.merge_and_unload().eval()  # the trained adapters, folded into plain layers
    snapshot = callback.monitor.state.prev_weights
    for layer, rows in enumerate(_rows(merged)):
        torch.testing.assert_close(snapshot[layer], rows, rtol=1e-5, atol=1e-6)
    probe_set = ProbeSet.build([TEXT], tokenizer, n_tokens=PROBE["probe_tokens"], window=PROBE["probe_window"],
                               n_pairs=PROBE["n_pairs"], max_positions=merged.config.max_position_embeddings)
    direct = take_measurement(merged, probe_set, 5, callback.monitor.settings, MonitorState(), tokenizer)
    want = direct.neurons.sort_values(["layer", "neuron"])
    for column in ("wd", "mean"):  # what the LoRA layers fed the nonlinearity, dropout off as in any probe
        np.testing.assert_allclose(last[column].to_numpy(), want[column].to_numpy(), rtol=1e-4, atol=1e-6)


def test_a_dora_run_is_refused_before_training_and_runs_without_the_drift(tmp_path) -> None:
    from transformers import Trainer

    from negmonitor.callbacks.monitor import FAMILIES
    from negmonitor.integrations.hf import NegativeDifferentiationCallback

    tokenizer = tiny_tokenizer()

    def train(**settings) -> NegativeDifferentiationCallback:
        model = get_peft_model(tiny_causal_lm("llama").train(), LoraConfig(r=4, target_modules=["gate_proj"],
                                                                           use_dora=True))
        callback = NegativeDifferentiationCallback(probe=[TEXT], every_n_steps=2, log_spaced_until=0, **PROBE,
                                                   **settings)
        Trainer(model=model, args=_args(tmp_path / "out", 2), train_dataset=_Blocks(tokenizer),
                processing_class=tokenizer, callbacks=[callback]).train()
        return callback

    with pytest.raises(NegmonitorError, match="adapter default is a LoRA variant such as DoRA.*leave 'drift' out"):
        train()
    callback = train(families=[family for family in FAMILIES if family != "drift"])
    assert callback.measured_steps == [0, 2]
    metrics = set(RecordStore(tmp_path / "out" / "negmonitor").read_scalars().metric)
    assert "wd/max" in metrics and not any(m.startswith("drift/") for m in metrics)
