"""Faults: non-finite activations, out-of-memory retries, unwritable log folders — clear outcomes, nothing lost."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_helpers import TEXT, TinyLM, token_loader, trainer
from negmonitor.adapters import find_sites
from negmonitor.errors import NegmonitorError
from negmonitor.probing import probe
from negmonitor.probeset import ProbeSet
from tiny_models import tiny_causal_lm, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _probe_set(tokenizer) -> ProbeSet:
    return ProbeSet.build([TEXT], tokenizer, n_tokens=2_048, window=64, n_pairs=100)


def test_non_finite_activations_are_counted_and_skipped(tokenizer) -> None:
    """One neuron overflows on every token, and one token id overflows every neuron of layer 0."""
    model = tiny_causal_lm("neox")
    probe_set = _probe_set(tokenizer)
    clean = probe(model, probe_set, layers=[0])
    site = find_sites(model, 0)[0]
    with torch.no_grad():
        site.projection.weight[5] = 3e38  # neuron 5: inf on every token
    hot_token = int(probe_set.input_ids[0, 3])
    hook = site.projection.register_forward_pre_hook(
        lambda m, args: (torch.where((probe_ids == hot_token).unsqueeze(-1), torch.full_like(args[0], math.inf),
                                     args[0]),))
    probe_ids = torch.empty(0)

    def remember_ids(module, args, kwargs):
        nonlocal probe_ids
        probe_ids = kwargs["input_ids"]

    outer = model.gpt_neox.register_forward_pre_hook(remember_ids, with_kwargs=True)
    try:
        result = probe(model, probe_set, layers=[0])
    finally:
        hook.remove()
        outer.remove()
    hot_count = int(((probe_set.input_ids == hot_token) & probe_set.attention_mask.bool()).sum())
    layer = result.layers.iloc[0]
    assert int(layer.nonfinite_tokens) == probe_set.n_tokens  # neuron 5 is inf everywhere
    neurons = result.neurons.set_index("neuron")
    assert bool(neurons.loc[5, "flagged"]) and math.isnan(neurons.loc[5, "wd"])
    assert int(neurons.loc[5, "nonfinite"]) == probe_set.n_tokens
    others = neurons.drop(index=5)
    assert (others.nonfinite == hot_count).all() and (others["count"] == probe_set.n_tokens - hot_count).all()
    assert others.wd.notna().all() and int(layer.nan_neurons) == 1
    assert not clean.neurons.flagged.any()


def test_out_of_memory_halves_the_batch_and_retries(tokenizer, monkeypatch) -> None:
    model = tiny_causal_lm("neox")
    probe_set = _probe_set(tokenizer)
    expected = probe(model, probe_set, batch_size=2)
    base = model.gpt_neox
    original = base.forward

    def picky(*args, **kwargs):
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(*args, **kwargs)

    monkeypatch.setattr(base, "forward", picky)
    with pytest.warns(UserWarning, match="retrying with batch size 4") as record:
        result = probe(model, probe_set, batch_size=8)
    assert any("batch size 2" in str(w.message) for w in record)
    torch.testing.assert_close(torch.tensor(result.neurons.wd.to_numpy()), torch.tensor(expected.neurons.wd.to_numpy()))

    def always(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(base, "forward", always)
    with pytest.warns(UserWarning), pytest.raises(NegmonitorError, match="memory_budget"):
        probe(model, probe_set, batch_size=2)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_a_hook_failure_where_forwards_are_collective_is_raised_after_the_last_forward(tokenizer, monkeypatch) -> None:
    """Where each forward is a collective (FSDP), a capture hook that fails does not cut the pass short: every
    forward runs to its end (the layers after it too), the hooks idle from then on, and the error is raised once the
    pass is over, with every hook removed. Elsewhere it is raised at once."""
    import negmonitor.probing as probing_module
    from negmonitor.capture import SiteRecorder

    model = tiny_causal_lm("neox")
    probe_set = _probe_set(tokenizer)
    batches = -(-probe_set.n_windows // 8)
    real_observe = SiteRecorder.observe
    observed: list[int] = []

    def failing_observe(self, x_in, y, batch):
        observed.append(self.layer)
        if self.layer == 0 and observed.count(0) == 2:  # the second batch's first hook
            raise RuntimeError("injected failure in a hook")
        return real_observe(self, x_in, y, batch)

    last_layer = model.gpt_neox.layers[-1].mlp.dense_h_to_4h
    forwards: list[int] = []
    last_layer.register_forward_pre_hook(lambda module, args: forwards.append(1))
    monkeypatch.setattr(SiteRecorder, "observe", failing_observe)
    monkeypatch.setattr(probing_module, "forward_is_collective", lambda model: True)
    with pytest.raises(RuntimeError, match="injected failure in a hook"):
        probing_module.measure(model, probe_set, find_sites(model, None),
                               probing_module.ProbeSettings(batch_size=8, memory_budget=None))
    assert len(forwards) == batches  # the failing batch and every later one ran whole
    assert observed.count(0) == 2 and observed.count(1) == 1  # idle after the failure
    assert all(len(m._forward_hooks) == 0 for m in model.modules() if m is not last_layer)

    monkeypatch.setattr(probing_module, "forward_is_collective", lambda model: False)
    forwards.clear()
    observed.clear()
    with pytest.raises(RuntimeError, match="injected failure in a hook"):
        probing_module.measure(model, probe_set, find_sites(model, None),
                               probing_module.ProbeSettings(batch_size=8, memory_budget=None))
    assert observed == [0, 1, 0] and len(forwards) == 1  # raised in the second batch's first hook


def test_unwritable_record_folder_fails_before_training(tmp_path) -> None:
    from negmonitor.callbacks import NegativeDifferentiationMonitor

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    module = TinyLM()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    monitor = NegativeDifferentiationMonitor(probe=[TEXT], probe_tokens=2_048, probe_window=64, n_pairs=100,
                                             log_dir=blocker / "logs")
    with pytest.raises(NegmonitorError, match="cannot be written"):
        trainer(tmp_path, 5, [monitor]).fit(module, token_loader(module.tokenizer))
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # not one step was taken


def test_fp16_overflow_in_training_is_flagged_and_training_goes_on(tmp_path) -> None:
    """A measurement that meets inf pre-activations records them as health rows; training continues."""
    from negmonitor.callbacks import WassersteinMonitor
    from negmonitor.records import RecordStore

    module = TinyLM()
    site = find_sites(module.model, 1)[0]
    with torch.no_grad():
        site.projection.bias[0] = math.inf  # neuron 0 of layer 1 is inf on every token
    monitor = WassersteinMonitor(probe=[TEXT], probe_tokens=2_048, probe_window=64, n_pairs=100, every_n_steps=2,
                                 log_dir=tmp_path / "rec")
    trainer(tmp_path, 2, [monitor], logger=False).fit(module, token_loader(module.tokenizer))
    scalars = RecordStore.for_logdir(tmp_path / "rec").read_scalars()
    assert "health/measurement_failed" not in set(scalars.metric)  # even all-NaN weights at step 2 are measured
    assert sorted(scalars.step.unique()) == [0, 2]
    health = scalars[(scalars.metric == "health/nan_neurons") & (scalars.layer == 1) & (scalars.step == 0)]
    assert health.value.tolist() == [1.0]
    bad_tokens = scalars[(scalars.metric == "health/nonfinite_tokens") & (scalars.layer == 1)]
    assert (bad_tokens.value > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nonfinite_rows_are_counted_as_an_elementwise_check_would(dtype) -> None:
    """NaN or ±inf anywhere in a row (first, last or only value; inf and -inf together), never a huge finite row."""
    from negmonitor.capture import count_nonfinite_rows

    rows = torch.randn(64, 37, generator=torch.Generator().manual_seed(0)).to(dtype)
    rows[1, 0], rows[2, 36], rows[3, 5] = math.nan, math.inf, -math.inf
    rows[4, 0], rows[4, 1] = math.inf, -math.inf
    rows[5] = math.nan
    rows[6] = torch.finfo(dtype).max  # finite, however large
    rows[7, 3], rows[7, 4] = math.nan, math.inf
    expected = int((~torch.isfinite(rows)).any(dim=1).sum())
    assert expected == 6
    assert int(count_nonfinite_rows(rows)) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pair_buffer_stores_rows_in_slots_however_many(dtype) -> None:
    """The pair rows reach their slots a few hundred at a time: more rows than one copy takes (and an unsorted
    slot order) land exactly where one gather would put them; slots not given stay zero."""
    from negmonitor.capture import _PAIR_ROWS_PER_COPY, PairBuffer

    g = torch.Generator().manual_seed(0)
    n_rows = 2 * _PAIR_ROWS_PER_COPY + 37
    x, y = torch.randn(3000, 5, generator=g).to(dtype), torch.randn(3000, 7, generator=g).to(dtype)
    rows = torch.randperm(3000, generator=g)[:n_rows]
    slots = torch.randperm(n_rows + 10, generator=g)[:n_rows]
    buffer = PairBuffer(n_rows + 10, 5, 7)
    buffer.update(slots, x, y, rows)
    got = buffer.compute()
    want_x, want_y = torch.zeros(n_rows + 10, 5, dtype=dtype), torch.zeros(n_rows + 10, 7, dtype=dtype)
    want_x[slots], want_y[slots] = x[rows], y[rows]
    assert torch.equal(got["x"], want_x) and torch.equal(got["y"], want_y)
    assert got["x"].dtype == dtype and int(got["seen"].sum()) == n_rows
