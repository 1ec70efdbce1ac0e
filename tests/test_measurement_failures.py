"""A failed measurement never ends training: warned once, recorded, and nothing of the user's process changed."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch import seed_everything

from lightning_helpers import TEXT, TinyLM, token_loader, trainer
from negmonitor.adapters import find_sites
from negmonitor.callbacks import NegativeDifferentiationMonitor
from negmonitor.records import RecordStore

SMALL = dict(probe=[TEXT], probe_tokens=1_024, probe_window=64, n_pairs=100)


def _process_state(model: torch.nn.Module) -> dict:
    """Everything a measurement could leave changed in the user's process."""
    return {
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        "activations": [id(getattr(s.act_owner, s.act_attr)) for s in find_sites(model)],
        "classes": [type(m) for m in model.modules()],
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad_mode": (torch.is_grad_enabled(), torch.is_inference_mode_enabled()),
        "threads": (torch.get_num_threads(), torch.get_num_interop_threads()),
        "autocast": (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")),
        "rng": (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].tolist()),
    }


def _assert_same(before: dict, after: dict) -> None:
    for key in before:
        if key == "rng":
            assert torch.equal(before[key][0], after[key][0]) and before[key][1:] == after[key][1:], key
        else:
            assert before[key] == after[key], key


def _watch(monitor: NegativeDifferentiationMonitor, model_of) -> dict[int, tuple[dict, dict]]:
    """Record the process state before and after each measurement."""
    seen, original = {}, monitor._measure

    def watched(trainer_, step, *rest, **kwargs):
        before = _process_state(model_of())
        original(trainer_, step, *rest, **kwargs)
        seen[step] = (before, _process_state(model_of()))

    monitor._measure = watched
    return seen


def test_out_of_memory_in_the_probe_pass_is_warned_once_and_training_goes_on(tmp_path) -> None:
    seed_everything(0)
    module = TinyLM()
    failing_steps, steps_seen = {2, 4}, []
    tr = None

    def out_of_memory(mod, args, output):  # inside the probe pass only (no grad), at the failing steps
        if not torch.is_grad_enabled() and tr.global_step in failing_steps:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")

    module.model.gpt_neox.layers[0].mlp.register_forward_hook(out_of_memory)  # before the pass stops early
    monitor = NegativeDifferentiationMonitor(every_n_steps=2, **SMALL)
    seen = _watch(monitor, lambda: module.model)
    tr = trainer(tmp_path, 6, [monitor])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(module, token_loader(module.tokenizer))
    assert tr.global_step == 6  # training went on to the end
    ours = [w for w in caught if "failed" in str(w.message) and "negmonitor: measurement" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]  # once, not at every failing step
    assert "step 2" in str(ours[0].message) and "out of memory" in str(ours[0].message)
    assert monitor.failures == 2
    scalars = RecordStore.for_logdir(tmp_path / "run" / "version_0").read_scalars()
    failed = scalars[scalars.metric == "health/measurement_failed"]
    assert sorted(failed.step) == [2, 4]
    assert {"wd/max", "md/mean"} <= set(scalars[scalars.step == 6].metric)  # measuring resumed after the failures
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "version_0")).Reload()
    curve = events.Scalars("negmonitor/health/measurement_failed")  # in the dashboard, beside the other curves
    assert [(e.step, e.value) for e in curve] == [(2, 1.0), (4, 1.0)]
    assert sorted(seen) == [0, 2, 4, 6]
    for step in (2, 4):
        _assert_same(*seen[step])


def test_a_failure_while_ablation_patches_are_in_place_restores_everything(tmp_path, monkeypatch) -> None:
    from negmonitor import ablation

    seed_everything(0)
    module = TinyLM()
    calls = []
    original = ablation._perplexity

    def fails_under_ablation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first condition after the baseline: the ablation patches are installed
            raise RuntimeError("simulated failure inside an ablated evaluation")
        return original(*args, **kwargs)

    monkeypatch.setattr(ablation, "_perplexity", fails_under_ablation)
    monitor = NegativeDifferentiationMonitor(every_n_steps=2, ppl_text=TEXT,
                                             ablation={"fraction": 0.05, "max_matching_evals": 2}, **SMALL)
    seen = _watch(monitor, lambda: module.model)
    with pytest.warns(UserWarning, match="measurement at step 0 failed .*simulated failure inside an ablated"):
        trainer(tmp_path, 2, [monitor]).fit(module, token_loader(module.tokenizer))
    _assert_same(*seen[0])
    scalars = RecordStore.for_logdir(tmp_path / "run" / "version_0").read_scalars()
    assert scalars[scalars.metric == "health/measurement_failed"].step.tolist() == [0]
    assert "ablation/ppl_ratio/wasserstein" in set(scalars[scalars.step == 2].metric)


def test_strict_re_raises_the_out_of_memory_error(tmp_path) -> None:
    module = TinyLM()

    def out_of_memory(mod, args, output):
        if not torch.is_grad_enabled():
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    module.model.gpt_neox.layers[0].mlp.register_forward_hook(out_of_memory)
    monitor = NegativeDifferentiationMonitor(every_n_steps=2, strict=True, **SMALL)
    with pytest.raises(Exception, match="out of memory"):
        trainer(tmp_path, 2, [monitor]).fit(module, token_loader(module.tokenizer))


def test_a_full_records_disk_never_ends_training(tmp_path, monkeypatch) -> None:
    """From step 2 on every record write raises ENOSPC: the measurement fails, recording that failure fails too;
    each is warned about once and training runs to its end (``strict=True`` re-raises)."""
    import errno

    from negmonitor.records import RecordStore as Store

    real, tr = Store.write, None

    def full_disk(self, *args, **kwargs):
        if tr.global_step >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Store, "write", full_disk)
    seed_everything(0)
    module = TinyLM()
    monitor = NegativeDifferentiationMonitor(every_n_steps=2, families=("wd", "health"), **SMALL)
    tr = trainer(tmp_path / "run1", 6, [monitor])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(module, token_loader(module.tokenizer))
    assert tr.global_step == 6 and monitor.measured_steps == [0, 2, 4, 6]
    assert monitor.failures == 3
    said = [str(w.message) for w in caught if str(w.message).startswith("negmonitor:")]
    assert sum("measurement at step 2 failed" in m for m in said) == 1
    recording = [m for m in said if "could not record the failed measurement" in m]
    assert len(recording) == 1 and "step 2" in recording[0] and "No space left" in recording[0]
    scalars = RecordStore.for_logdir(tmp_path / "run1" / "run" / "version_0").read_scalars()
    assert sorted(scalars.step.unique()) == [0]  # what the disk took before it filled

    seed_everything(0)
    module = TinyLM()
    strict = NegativeDifferentiationMonitor(every_n_steps=2, families=("wd", "health"), strict=True, **SMALL)
    tr = trainer(tmp_path / "run2", 6, [strict])
    with pytest.raises(OSError, match="No space left"):
        tr.fit(module, token_loader(module.tokenizer))


def test_a_batch_size_lowered_by_an_out_of_memory_retry_is_kept_for_later_measurements(tmp_path) -> None:
    """A probe batch of more than 2 windows runs out of memory: the first measurement retries at 4, then 2, and says
    later measurements start there; they do, so no later measurement runs out of memory (or empties the allocator's
    cache) again, and none fails."""
    seed_everything(0)
    module = TinyLM()
    raised: dict[int, int] = {}
    tr = None

    def out_of_memory_above_two_windows(mod, args, output):
        if not torch.is_grad_enabled() and args[0].shape[0] > 2:
            raised[tr.global_step] = raised.get(tr.global_step, 0) + 1
            raise torch.OutOfMemoryError("CUDA out of memory (simulated: probe batches above 2 windows)")

    module.model.gpt_neox.layers[0].mlp.register_forward_hook(out_of_memory_above_two_windows)
    monitor = NegativeDifferentiationMonitor(every_n_steps=2, **SMALL)
    tr = trainer(tmp_path, 6, [monitor])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(module, token_loader(module.tokenizer))
    retries = [str(w.message) for w in caught if "retrying with batch size" in str(w.message)]
    assert retries == [f"negmonitor: out of memory during the probe pass; retrying with batch size {b} (later "
                       "measurements start there)" for b in (4, 2)]
    assert raised == {0: 2}  # only the first measurement ran out of memory
    assert monitor.failures == 0
    scalars = RecordStore.for_logdir(tmp_path / "run" / "version_0").read_scalars()
    assert "health/measurement_failed" not in set(scalars.metric)
    assert sorted(scalars[scalars.metric == "wd/max"].step.unique()) == [0, 2, 4, 6]
