"""The live probe forward runs in the trainer's precision context (bf16-mixed: autocast), fp32 on request."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch import seed_everything

from lightning_helpers import TEXT, TinyLM, token_loader, trainer
from negmonitor.callbacks import NegativeDifferentiationMonitor
from negmonitor.errors import NegmonitorError
from negmonitor.records import RecordStore

SMALL = dict(probe=[TEXT], probe_tokens=1_024, probe_window=64, n_pairs=100)


def _run(tmp_path, **kwargs):
    seed_everything(0)
    module = TinyLM()
    dtypes, autocast_after = [], []

    def probe_dtype(mod, args, output):  # the projection's output dtype inside the probe pass (no grad)
        if not torch.is_grad_enabled():
            dtypes.append(output.dtype)

    module.model.gpt_neox.layers[0].mlp.dense_h_to_4h.register_forward_hook(probe_dtype)
    monitor = NegativeDifferentiationMonitor(every_n_steps=2, families=("wd", "md", "health"), **SMALL, **kwargs)
    original = monitor._measure

    def watched(trainer_, step, *rest, **kwargs):
        original(trainer_, step, *rest, **kwargs)
        autocast_after.append(torch.is_autocast_enabled("cpu"))

    monitor._measure = watched
    trainer(tmp_path, 2, [monitor], precision="bf16-mixed").fit(module, token_loader(module.tokenizer))
    store = RecordStore.for_logdir(tmp_path / "run" / "version_0")
    info = json.loads((store.root / f"run-{monitor.record_key}.json").read_text())
    return set(dtypes), autocast_after, info, store.read_neurons(), store.read_scalars()


def test_bf16_mixed_trainer_probes_under_autocast_and_fp32_on_request(tmp_path) -> None:
    dtypes, autocast_after, info, neurons, scalars = _run(tmp_path / "mixed")
    assert dtypes == {torch.bfloat16}  # the probe forward ran under the trainer's autocast
    assert autocast_after == [False, False]  # ... and left no autocast behind
    assert info["probe_precision"] == "bf16-mixed"
    assert "health/measurement_failed" not in set(scalars.metric)
    assert neurons.wd.notna().all() and neurons.md.notna().all()

    assert info["float32_matmul_precision"] == torch.get_float32_matmul_precision()  # this process's setting
    dtypes32, autocast_after32, info32, neurons32, _ = _run(tmp_path / "fp32", probe_precision="fp32")
    assert dtypes32 == {torch.float32} and autocast_after32 == [False, False]
    assert info32["probe_precision"] == "32-true"
    saved = torch.get_float32_matmul_precision()
    other = "medium" if saved == "high" else "high"
    torch.set_float32_matmul_precision(other)  # "high": as TrainingArguments(tf32=True) sets it, fp32 in TF32
    try:
        assert _run(tmp_path / "tf32", probe_precision="fp32")[2]["float32_matmul_precision"] == other
    finally:
        torch.set_float32_matmul_precision(saved)
    # the same weights at step 0, measured both ways: bf16 rounding moves WD a little, never a lot
    a, b = (f[f.step == 0].sort_values(["layer", "neuron"]).wd.to_numpy() for f in (neurons, neurons32))
    assert not np.array_equal(a, b)
    np.testing.assert_allclose(a, b, atol=0.05)


def test_unknown_probe_precision_is_refused() -> None:
    with pytest.raises(NegmonitorError, match="probe_precision must be one of trainer, fp32"):
        NegativeDifferentiationMonitor(probe=[TEXT], probe_precision="fp8")
    with pytest.raises(NegmonitorError, match="drift_dtype must be one of"):
        NegativeDifferentiationMonitor(probe=[TEXT], drift_dtype="int8")


def test_budget_plans_at_set_up_and_at_each_measurement_count_the_same_capture_dtype(tmp_path, monkeypatch) -> None:
    """Under bf16-mixed the probe captures bf16 pre-activations: the fit-start budget check and every measurement's
    plan count 2 bytes a value alike (fp32 plans at measurement time once let a budget pass the check and then fail
    at every measurement); with probe_precision="fp32" both count 4."""
    from negmonitor import probing

    seen: list[int] = []
    real = probing._capture_bytes
    monkeypatch.setattr(probing, "_capture_bytes", lambda model: seen.append(real(model)) or seen[-1])
    _run(tmp_path / "mixed")
    assert len(seen) >= 3 and set(seen) == {2}, seen  # the check, then the measurements at steps 0 and 2
    seen.clear()
    _run(tmp_path / "fp32", probe_precision="fp32")
    assert len(seen) >= 3 and set(seen) == {4}, seen


def _bf16_true_run(tmp_path, hook=None, **kwargs):
    """A ``precision="bf16-true"`` run (bf16 weights); the probe forward's output dtypes, run.json, the warnings.
    ``hook`` also watches the first layer's MLP projection in the probe forward."""
    seed_everything(0)
    module = TinyLM()
    dtypes = []
    projection = module.model.gpt_neox.layers[0].mlp.dense_h_to_4h
    projection.register_forward_hook(
        lambda mod, args, out: None if torch.is_grad_enabled() else dtypes.append(out.dtype))
    if hook is not None:
        projection.register_forward_hook(lambda *args: None if torch.is_grad_enabled() else hook(*args))
    kwargs.setdefault("families", ("wd", "health"))
    monitor = NegativeDifferentiationMonitor(every_n_steps=2, **SMALL, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, 2, [monitor], precision="bf16-true").fit(module, token_loader(module.tokenizer))
    store = RecordStore.for_logdir(tmp_path / "run" / "version_0")
    info = json.loads((store.root / f"run-{monitor.record_key}.json").read_text())
    said = [str(w.message) for w in caught if "cannot be honoured" in str(w.message)]
    return set(dtypes), info, said, store.read_scalars()


def test_bf16_true_weights_are_recorded_as_what_ran_and_fp32_is_said_to_be_impossible(tmp_path) -> None:
    """``precision="bf16-true"`` holds the weights in bf16: the forward runs in bf16 whatever the probe asks, so
    run.json records "bf16-true", and asking for fp32 warns once instead of recording "32-true"."""
    dtypes, info, said, scalars = _bf16_true_run(tmp_path / "fp32", probe_precision="fp32")
    assert dtypes == {torch.bfloat16}
    assert info["probe_precision"] == "bf16-true"
    assert len(said) == 1 and "torch.bfloat16" in said[0]
    assert "health/measurement_failed" not in set(scalars.metric) and sorted(scalars.step.unique()) == [0, 2]

    dtypes, info, said, scalars = _bf16_true_run(tmp_path / "trainer")
    assert dtypes == {torch.bfloat16} and info["probe_precision"] == "bf16-true" and not said
    assert "health/measurement_failed" not in set(scalars.metric) and sorted(scalars.step.unique()) == [0, 2]


def test_every_family_is_measured_under_bf16_true(tmp_path) -> None:
    """Lightning's "bf16-true" forward sets torch's default dtype to bf16: the statistics' fp32 tensors met bf16
    buffers made inside the hooks and every measurement of such a run failed (only health/measurement_failed was
    recorded); the default dtype the forward runs under is the trainer's, and it is given back after the run."""
    seen = []
    module_default = lambda mod, args, out: seen.append(torch.get_default_dtype())  # noqa: E731
    _, _, _, scalars = _bf16_true_run(
        tmp_path, families=("wd", "md", "pairs", "drift", "cohort", "ablation", "health"), ppl_text=TEXT,
        ablation={"fraction": 0.05, "max_matching_evals": 2}, hook=module_default)
    assert set(seen) == {torch.bfloat16} and torch.get_default_dtype() == torch.float32
    metrics = set(scalars.metric)
    assert "health/measurement_failed" not in metrics
    assert {"wd/mean", "wd/neg_share", "md/mean", "pairs/nn_share", "drift/cohort",
            "ablation/ppl_ratio/wasserstein"} <= metrics
    assert np.isfinite(scalars.loc[scalars.metric == "wd/mean", "value"]).all()


def test_the_ablation_evaluations_run_in_the_trainers_precision_too(tmp_path, monkeypatch) -> None:
    """bf16-mixed: the ablation's forwards (~20 per measurement: baseline, Wasserstein, random, the matching search)
    ran in fp32 outside the autocast that ranked the neurons: slower, twice the activations, other numbers."""
    from negmonitor import interventions
    from negmonitor.callbacks import AblationMonitor

    seen, real = [], interventions.MaskedActivation.forward

    def recording(self, x):
        seen.append((x.dtype, torch.is_autocast_enabled("cpu")))
        return real(self, x)

    monkeypatch.setattr(interventions.MaskedActivation, "forward", recording)
    seed_everything(0)
    module = TinyLM()
    monitor = AblationMonitor(every_n_steps=2, ppl_text=TEXT, ablation={"fraction": 0.05, "max_matching_evals": 2},
                              **SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. nothing to match on a model this small
        trainer(tmp_path, 2, [monitor], precision="bf16-mixed").fit(module, token_loader(module.tokenizer))
    assert seen and set(seen) == {(torch.bfloat16, True)}
    scalars = RecordStore.for_logdir(tmp_path / "run" / "version_0").read_scalars()
    assert "ablation/ppl_ratio/wasserstein" in set(scalars.metric)
