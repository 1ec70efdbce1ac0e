"""The settings users train with: gradient accumulation, bf16 mixed precision, a torch.compile'd model, resume.

Each run measures at the scheduled optimizer steps (``global_step``), every measurement leaves the gradients, the
train/eval modes and the torch RNG as they were, and the records equal those of the same run without the setting
where they should.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_helpers import TEXT, TinyLM, token_loader, trainer
from negmonitor.callbacks import NegativeDifferentiationMonitor
from negmonitor.records import RecordStore
from negmonitor.train.grammar import GrammarCorpus

SMALL = dict(probe=[TEXT], probe_tokens=1_024, probe_window=64, n_pairs=100, every_n_steps=2, log_dir=None)
NUMBERS = ["wd", "wd_neg", "md", "mean", "std"]


class GuardedMonitor(NegativeDifferentiationMonitor):
    """The bundle, checking around every measurement that gradients, modes and the torch RNG are unchanged."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.checks: list[dict] = []

    def _measure(self, trainer_, step: int, final: bool = False) -> None:
        module = trainer_.lightning_module
        grads = {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}
        modes = {n: m.training for n, m in module.named_modules()}
        rng = torch.get_rng_state()
        super()._measure(trainer_, step, final)
        self.checks.append({
            "step": step, "with_grads": any(g is not None for g in grads.values()),
            "grads": all(_same(grads[n], p.grad) for n, p in module.named_parameters()),
            "modes": modes == {n: m.training for n, m in module.named_modules()},
            "rng": torch.equal(rng, torch.get_rng_state())})


def _same(before: torch.Tensor | None, after: torch.Tensor | None) -> bool:
    return (before is None and after is None) or (before is not None and after is not None
                                                   and torch.equal(before, after))


def _fit(tmp_path, module, max_steps: int, batch_size: int = 8, ckpt_path=None, callbacks=(), **kwargs):
    monitor = GuardedMonitor(**{**SMALL, "log_dir": tmp_path / "records"}, **kwargs.pop("monitor", {}))
    loader = token_loader(module.tokenizer, batch_size=batch_size, n_batches=kwargs.pop("n_batches", 64))
    trainer(tmp_path, max_steps, [monitor, *callbacks], logger=False, **kwargs).fit(module, loader,
                                                                                   ckpt_path=ckpt_path)
    assert monitor.checks and all(c["grads"] and c["modes"] and c["rng"] for c in monitor.checks), monitor.checks
    store = RecordStore(tmp_path / "records" / "negmonitor")
    scalars = store.read_scalars()
    assert "health/measurement_failed" not in set(scalars.metric)
    return monitor, scalars, store.read_neurons().sort_values(["step", "layer", "neuron"]).reset_index(drop=True)


def test_gradient_accumulation_measures_at_optimizer_steps(tmp_path) -> None:
    seed_everything(0)
    _, plain_scalars, plain = _fit(tmp_path / "plain", TinyLM(), 4, batch_size=8)
    seed_everything(0)
    monitor, scalars, accumulated = _fit(tmp_path / "accumulated", TinyLM(), 4, batch_size=2,
                                         accumulate_grad_batches=4)
    assert sorted(scalars.step.unique()) == sorted(plain_scalars.step.unique()) == [0, 2, 4]
    assert [c["step"] for c in monitor.checks] == [0, 2, 4]
    assert all(c["with_grads"] for c in monitor.checks[1:])  # measured right after an optimizer step, grads still set
    # 4 micro-batches of 2 are one batch of 8: tokens per optimizer step and (to fp rounding) the weights agree
    tokens = scalars.groupby("step").tokens_seen.first()
    pd.testing.assert_series_equal(tokens, plain_scalars.groupby("step").tokens_seen.first())
    np.testing.assert_allclose(accumulated[NUMBERS].to_numpy(), plain[NUMBERS].to_numpy(), atol=1e-4, rtol=1e-4)


def test_bf16_mixed_precision(tmp_path) -> None:
    seed_everything(0)
    _, fp32_scalars, fp32 = _fit(tmp_path / "fp32", TinyLM(), 2)
    seed_everything(0)
    _, scalars, bf16 = _fit(tmp_path / "bf16", TinyLM(), 2, precision="bf16-mixed")
    assert sorted(scalars.step.unique()) == sorted(fp32_scalars.step.unique()) == [0, 2]
    assert np.isfinite(bf16[NUMBERS].to_numpy()).all()
    at_0 = bf16.step == 0  # the same weights before training; the probe pass may run in bf16 (rounding only)
    np.testing.assert_allclose(bf16.loc[at_0, "wd"], fp32.loc[fp32.step == 0, "wd"], atol=0.03)


class CompiledTinyLM(TinyLM):
    """A user's module whose model is compiled; ``aot_eager`` traces forward and backward as inductor does, in
    seconds (inductor itself takes ~75 s to compile this model on CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torch.compile(self.model, backend="aot_eager")


def test_compiled_model_gives_the_eager_records(tmp_path) -> None:
    seed_everything(0)
    _, eager_scalars, eager = _fit(tmp_path / "eager", TinyLM(), 4)
    from torch._dynamo.utils import counters

    seed_everything(0)
    counters.clear()
    _, scalars, compiled = _fit(tmp_path / "compiled", CompiledTinyLM(), 4)
    assert counters["stats"]["unique_graphs"] == 1  # the measurements (hooks, ablation patches) forced no recompile
    assert sorted(scalars.step.unique()) == sorted(eager_scalars.step.unique()) == [0, 2, 4]
    columns = NUMBERS + ["drift_cos_dissim"]
    np.testing.assert_allclose(compiled[columns].to_numpy(), eager[columns].to_numpy(), atol=1e-4, rtol=1e-4)


def test_resume_with_accumulation_and_ablation_gives_the_uninterrupted_records(tmp_path) -> None:
    settings = dict(monitor={"ablation": {"max_matching_evals": 2, "ppl_window": 64, "random_draws": 2},
                             "ppl_text": TEXT[:1_000], "minimal_pairs": GrammarCorpus(0).minimal_pairs(2)},
                    batch_size=4, n_batches=8, accumulate_grad_batches=2)  # an epoch is 4 optimizer steps
    seed_everything(0)
    _, full, full_neurons = _fit(tmp_path / "full", TinyLM(), 8, **settings)
    seed_everything(0)
    # saved in on_train_batch_end at step 4 (Lightning replays a batch as an extra optimizer step when resuming
    # from an end-of-epoch checkpoint with accumulation, which no monitor can undo)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    _fit(tmp_path / "resumed", TinyLM(), 4, callbacks=[checkpoint], **settings)
    (path,) = (tmp_path / "ckpt").glob("*step=4*.ckpt")
    seed_everything(0)
    _, resumed, resumed_neurons = _fit(tmp_path / "resumed", TinyLM(), 8, ckpt_path=str(path), **settings)
    assert sorted(full.step.unique()) == [0, 2, 4, 6, 8]
    assert "ablation/ppl_ratio/random_mean" in set(full.metric)
    key = ["step", "layer", "neuron", "metric"]
    full, resumed = (f.sort_values(key).reset_index(drop=True) for f in (full, resumed))
    pd.testing.assert_frame_equal(full, resumed, check_exact=False, rtol=1e-6, atol=1e-9)
    pd.testing.assert_frame_equal(full_neurons, resumed_neurons, check_exact=False, rtol=1e-6, atol=1e-9)


def test_ablation_under_bf16_mixed_precision_is_finite(tmp_path) -> None:
    seed_everything(0)
    _, scalars, _ = _fit(tmp_path, TinyLM(), 2, precision="bf16-mixed",
                         monitor={"ablation": {"max_matching_evals": 2, "ppl_window": 64}, "ppl_text": TEXT[:1_000],
                                  "minimal_pairs": GrammarCorpus(0).minimal_pairs(2)})
    ablation = scalars[scalars.metric.str.startswith("ablation/")]
    assert len(ablation) and np.isfinite(ablation.value).all()
