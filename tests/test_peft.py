"""LoRA fine-tuning (peft): the probe sees the adapted pre-activations and the drift the weights the forward applies."""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft", reason="peft is in the dev extras (pip install -e '.[dev]')")
from peft import LoraConfig, get_peft_model  # noqa: E402

from negmonitor.adapters import find_sites
from negmonitor.errors import NegmonitorError
from negmonitor.peft_layers import check_peft_readable
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


def _forward_rows(model) -> list[torch.Tensor]:
    """Each site's weight rows as its forward applies them (an oracle independent of peft's merge): the layer's
    outputs for the unit inputs, less its output for zero (the bias)."""
    rows = []
    with torch.no_grad():
        for site in find_sites(model):
            eye = torch.eye(site.d_in)
            rows.append((site.projection(eye) - site.projection(torch.zeros(1, site.d_in))).t())
    return rows


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox"])
def test_lora_weight_rows_are_the_weights_the_forward_applies(family) -> None:
    model = _lora(family)
    base = [site.projection.get_base_layer().weight.detach().clone() for site in find_sites(model)]
    rows = _rows(model)
    for site, frozen in zip(find_sites(model), base):  # a read leaves the model's own weights as they were
        assert torch.equal(site.projection.get_base_layer().weight, frozen)
    assert all(torch.equal(a, b) for a, b in zip(rows, _rows(model)))
    merged = _rows(_lora(family).merge_and_unload())  # the same adapters, folded into plain layers by peft
    for got, want, forward, frozen in zip(rows, merged, _forward_rows(model), base):
        assert got.shape == (64, 32)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, forward, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, frozen.t() if family == "gpt2" else frozen)  # the base alone is not it

    for site in find_sites(model):
        site.projection.merge()  # merged in place: the base now holds the delta, nothing is added twice
    for got, want in zip(_rows(model), merged):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with model.disable_adapter():  # the forward unmerges and applies the base alone
        for got, frozen in zip(_rows(model), base):
            torch.testing.assert_close(got, frozen.t() if family == "gpt2" else frozen, rtol=1e-5, atol=1e-6)


def test_several_adapters_some_merged_read_as_the_forward_applies_them() -> None:
    model = _lora("llama")
    torch.manual_seed(2)
    model.add_adapter("second", LoraConfig(r=2, target_modules=["gate_proj"], init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])  # both active: the forward adds both deltas
    for got, want in zip(_rows(model), _forward_rows(model)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for site in find_sites(model):
        site.projection.merge(adapter_names=["default"])  # merged ones in the base: the forward runs it alone
    for got, want in zip(_rows(model), _forward_rows(model)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        for got, want in zip(_rows(model), _forward_rows(model)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_bf16_base_with_fp32_adapters_reads_unrounded() -> None:
    model = _lora("llama")
    for site in find_sites(model):
        site.projection.get_base_layer().to(torch.bfloat16)  # as peft trains a bf16 model: fp32 adapters
    for site, got in zip(find_sites(model), _rows(model)):
        layer = site.projection
        delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling["default"]
        assert got.dtype == torch.float32  # a step's update is mostly below bf16's spacing: rounding would lose it
        torch.testing.assert_close(got, layer.get_base_layer().weight.float() + delta.detach(), rtol=0, atol=1e-6)
        assert not torch.equal(got, got.to(torch.bfloat16).float())


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

    site = find_sites(_lora("llama"))[0]  # a base holding packed integers (GPTQ, AWQ), no weight tensor
    del site.projection.get_base_layer().weight
    with pytest.raises(NegmonitorError, match=r"\(its base Linear has no weight tensor to read, as GPTQ or AWQ "):
        check_peft_readable(site.projection)


def test_a_quantized_site_outside_peft_is_refused_in_one_line() -> None:
    site = find_sites(tiny_causal_lm("llama"))[0]  # as bitsandbytes packs a 4-bit weight: uint8 [n * d / 2, 1]
    site.projection.weight = torch.nn.Parameter(torch.zeros(64 * 32 // 2, 1, dtype=torch.uint8), requires_grad=False)
    for read in (site.check_weight_readable, site.weight_rows):
        with pytest.raises(NegmonitorError, match=r"the weight of model\.layers\.0\.mlp\.gate_proj is torch\.uint8: a "
                                                  r"quantized layer, which weight drift cannot read — leave 'drift' out"):
            read()
    del site.projection.weight  # GPTQ / AWQ layers hold packed integers under other names
    with pytest.raises(NegmonitorError, match=r"gate_proj is missing \(Linear, as GPTQ or AWQ layers\)"):
        site.check_weight_readable()


def test_lightning_lora_run_records_the_adapters_drift_and_leaves_it_out_under_dora(tmp_path) -> None:
    from lightning_helpers import TinyLM, token_loader, trainer

    from negmonitor.callbacks import NegativeDifferentiationMonitor

    def fit(folder: str, steps: int = 2, **lora) -> TinyLM:
        module = TinyLM("llama", lr=3e-2)
        module.model = get_peft_model(module.model, LoraConfig(r=4, **{"target_modules": ["gate_proj"], **lora}))
        monitor = NegativeDifferentiationMonitor(probe=[TEXT], every_n_steps=2, log_spaced_until=0, at_end=False,
                                                 drift_dtype="fp32", **PROBE)
        trainer(tmp_path / folder, steps, [monitor]).fit(module, token_loader(module.tokenizer))
        return module

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit("lora")
    neurons = RecordStore(tmp_path / "lora" / "run" / "version_0" / "negmonitor").read_neurons()
    assert sorted(neurons.step.unique()) == [0, 2]
    assert (neurons[neurons.step == 2].drift_cos_dissim > 0).all()  # the frozen base alone would be 0
    assert not [w for w in caught if "weight drift" in str(w.message) or "MLP weight changed" in str(w.message)]

    with pytest.warns(UserWarning, match=r"no monitored MLP weight changed over the last two measurements \(step "
                                         r"4\): they are frozen \(LoRA on other modules"):
        fit("attention_only", 4, target_modules=["q_proj"])  # the MLP sites stay frozen: their drift is truly 0
    with pytest.warns(UserWarning, match=r"weight drift is left out of this run: weight drift cannot read a Linear "
                                         r"PEFT layer \(adapter default is a LoRA variant such as DoRA\) \(the other "
                                         r"curves run\)"):
        fit("dora", use_dora=True)
    scalars = RecordStore(tmp_path / "dora" / "run" / "version_0" / "negmonitor").read_scalars()
    assert "wd/max" in set(scalars.metric) and not scalars.metric.str.startswith("drift/").any()


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


def test_a_dora_run_leaves_drift_out_with_one_warning_and_measures_the_rest(tmp_path) -> None:
    from transformers import Trainer

    from negmonitor.integrations.hf import NegativeDifferentiationCallback

    tokenizer = tiny_tokenizer()
    model = get_peft_model(tiny_causal_lm("llama").train(), LoraConfig(r=4, target_modules=["gate_proj"],
                                                                       use_dora=True))
    callback = NegativeDifferentiationCallback(probe=[TEXT], every_n_steps=2, log_spaced_until=0, **PROBE)
    with pytest.warns(UserWarning, match="weight drift is left out of this run: .*LoRA variant such as DoRA"):
        Trainer(model=model, args=_args(tmp_path / "out", 2), train_dataset=_Blocks(tokenizer),
                processing_class=tokenizer, callbacks=[callback]).train()
    assert callback.measured_steps == [0, 2]
    metrics = set(RecordStore(tmp_path / "out" / "negmonitor").read_scalars().metric)
    assert "wd/max" in metrics and "health/measurement_failed" not in metrics
    assert not any(m.startswith("drift/") for m in metrics)


FSDP_SCRIPT = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[2])
    import torch
    import lightning as L
    from lightning.pytorch import seed_everything
    from lightning.pytorch.strategies import FSDPStrategy
    from peft import LoraConfig, get_peft_model
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel
    from lightning_helpers import TEXT, TinyLM, token_loader
    from negmonitor.callbacks import NegativeDifferentiationMonitor
    from negmonitor.peft_layers import applied_weight

    class CPUFSDPStrategy(FSDPStrategy):
        """Lightning's FSDPStrategy on CPU (FSDP is told the device; Lightning passes none for CPU)."""
        def _setup_model(self, model):
            return FullyShardedDataParallel(module=model, sharding_strategy=self.sharding_strategy,
                                            device_id=torch.device("cpu"), **self.kwargs)

    class Rows(L.Callback):
        """The LoRA sites' applied weights at step 2 (after the monitor read them), gathered whole, rank 0 saves."""
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step != 2:
                return
            layers = pl_module.model.base_model.model.model.layers
            assert isinstance(layers[0].mlp.gate_proj.lora_A["default"], FullyShardedDataParallel)  # units of their own
            with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
                rows = {i: applied_weight(layer.mlp.gate_proj).clone() for i, layer in enumerate(layers)}
            if trainer.global_rank == 0:
                torch.save(rows, f"{sys.argv[1]}/rows_at_2.pt")

    seed_everything(0)
    module = TinyLM("llama", lr=3e-2)
    module.model = get_peft_model(module.model, LoraConfig(r=4, target_modules=["gate_proj"]))
    monitor = NegativeDifferentiationMonitor(probe=[TEXT], probe_tokens=1_024, probe_window=64, n_pairs=100,
                                             every_n_steps=2, log_spaced_until=0, at_end=False, drift_dtype="fp32",
                                             log_dir=sys.argv[1])
    strategy = CPUFSDPStrategy(auto_wrap_policy=fsdp_auto_wrap_policy(module.model), use_orig_params=True,
                               process_group_backend="gloo")
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_steps=2, logger=False,
                        callbacks=[monitor, Rows()], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=sys.argv[1])
    trainer.fit(module, token_loader(module.tokenizer))
    if trainer.global_rank == 0:  # the drift's fp32 snapshot of the step-2 weights
        torch.save(monitor.state.prev_weights, f"{sys.argv[1]}/snapshot_at_2.pt")
''')


def test_fsdp_lora_with_adapters_in_units_of_their_own_reads_whole_weights(tmp_path) -> None:
    from lightning_helpers import run_script

    logs = tmp_path / "logs"
    logs.mkdir()
    code, _, err = run_script(tmp_path, "fsdp_lora.py", FSDP_SCRIPT, str(logs), str(Path(__file__).parent),
                              hang="the FSDP LoRA run hung")
    assert code == 0, err[-3000:]
    store = RecordStore.for_logdir(logs)
    assert not store.read_scalars().metric.str.startswith("health/measurement_failed").any(), err[-3000:]
    neurons = store.read_neurons()
    assert (neurons[neurons.step == 2].drift_cos_dissim > 0).all()
    saved, gathered = torch.load(logs / "snapshot_at_2.pt"), torch.load(logs / "rows_at_2.pt")
    assert sorted(saved) == sorted(gathered) == [0, 1]
    for layer, rows in gathered.items():
        torch.testing.assert_close(saved[layer], rows, rtol=0, atol=0)


def test_a_lora_lightning_checkpoint_is_refused_in_one_line(tmp_path) -> None:
    from lightning_helpers import TinyLM

    from negmonitor.checkpoints import load_lightning_model

    module = TinyLM("llama")
    module.model = get_peft_model(module.model, LoraConfig(r=4, target_modules=["gate_proj"]))
    path = tmp_path / "lora.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {}}, path)  # the keys Lightning saves
    with pytest.raises(NegmonitorError, match=r"lora\.ckpt holds a LoRA \(peft\) model, whose adapters negmonitor "
                                              r"does not fold in from a checkpoint — merge them"):
        load_lightning_model(path)
