"""Weight drift at scale: bf16 snapshots on the model's device, saved beside the records, never in a checkpoint."""

from __future__ import annotations

import pickle
import warnings

import pandas as pd
import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_helpers import TEXT, TinyLM, token_loader, trainer
from negmonitor.callbacks import WeightDriftMonitor
from negmonitor.metrics import drift
from negmonitor.metrics.drift import weight_drift
from negmonitor.monitoring.drift_snapshot import prune_snapshots, read_snapshot, snapshot_path, write_snapshot
from negmonitor.records import RecordStore

SMALL = dict(probe=[TEXT], probe_tokens=1_024, probe_window=64, n_pairs=100)


def test_bf16_snapshots_give_the_fp32_drift_within_their_rounding() -> None:
    """bf16 rounds each weight to a relative 2^-8, independently per weight, so the cosine dissimilarity D of a row
    gains ~3e-6 (half the squared norm of the two rounding errors) plus noise of order sqrt(D * 1e-5 / d_in): for
    rows moving 5-15% (D ~ 1e-3..1e-2, successive measurements far apart) and d_in = 256 that is < 1% per neuron at
    1 sigma; 3% bounds the largest of 1,024 neurons (the measured worst is ~1.2%). An unchanged row gives exactly 0,
    as in fp32."""
    g = torch.Generator().manual_seed(0)
    prev = torch.randn(1024, 256, generator=g) * 0.02
    move = 0.05 + 0.1 * torch.rand(1024, 1, generator=g)
    cur = prev + torch.randn(1024, 256, generator=g) * 0.02 * move
    cur[:8] = prev[:8]
    exact = weight_drift(prev, cur)
    compact = weight_drift(prev.bfloat16(), cur.bfloat16())
    assert torch.equal(compact["cos_dissim"][:8], torch.zeros(8, dtype=torch.float64))
    assert torch.equal(compact["l2"][:8], torch.zeros(8, dtype=torch.float64))
    for key, rtol in (("cos_dissim", 0.03), ("cos_dissim_norm", 0.03), ("l2", 0.015), ("l2_norm", 0.015)):
        torch.testing.assert_close(compact[key][8:], exact[key][8:], rtol=rtol, atol=0, msg=key)
    # the curves' cohort-vs-rest ratio (means of the normalised drift) averages the noise away
    ratio = lambda d: float(d["cos_dissim_norm"][8:100].mean() / d["cos_dissim_norm"][100:].mean())  # noqa: E731
    assert abs(ratio(compact) / ratio(exact) - 1) < 0.003


def test_drift_in_row_blocks_equals_one_block(monkeypatch) -> None:
    """The fp64 maths runs a block of rows at a time (bounded memory at any width); blocks change nothing."""
    g = torch.Generator().manual_seed(1)
    prev, cur = torch.randn(300, 64, generator=g), torch.randn(300, 64, generator=g)
    whole = drift.weight_drift(prev, cur)
    monkeypatch.setattr(drift, "_BLOCK_ELEMENTS", 64 * 7)  # 7 rows a block, the last one short
    blocked = drift.weight_drift(prev, cur)
    for key in whole:
        assert torch.equal(whole[key], blocked[key]), key


def test_snapshot_files_round_trip_bit_exact_and_prune(tmp_path) -> None:
    weights = {0: torch.randn(64, 32).bfloat16(), 3: torch.randn(16, 8).bfloat16()}
    for step in (2, 4, 6):
        write_snapshot(snapshot_path(tmp_path, "k", step), weights, step)
    back = read_snapshot(snapshot_path(tmp_path, "k", 6))
    assert back.keys() == weights.keys()
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], weights[k]) for k in weights)
    prune_snapshots(tmp_path, "k", keep=2)
    assert sorted(p.name for p in (tmp_path / "drift").iterdir()) == [snapshot_path(tmp_path, "k", s).name
                                                                      for s in (4, 6)]


def _ckpt_run(root, intermediate: int | None = None, max_steps: int = 4, ckpt_path=None):
    seed_everything(0)
    module = TinyLM()
    if intermediate is not None:  # the same model with a wider MLP
        from transformers import GPTNeoXForCausalLM

        config = module.model.config
        config.intermediate_size = intermediate
        torch.manual_seed(0)
        module.model = GPTNeoXForCausalLM(config)
    monitor = WeightDriftMonitor(every_n_steps=2, **SMALL)
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1)
    # two batches an epoch: every checkpoint ends an epoch, so a resumed run sees the same batches
    trainer(root, max_steps, [monitor, checkpoints]).fit(module, token_loader(module.tokenizer, n_batches=2),
                                                        ckpt_path=ckpt_path)
    return monitor


def _tensors(obj) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def test_checkpoint_holds_no_weight_snapshot_whatever_the_mlp_size(tmp_path) -> None:
    sizes = {}
    for width in (64, 1024):
        monitor = _ckpt_run(tmp_path / str(width), intermediate=width)
        ckpt = torch.load(next((tmp_path / str(width) / "ckpt").glob("*step=4.ckpt")), weights_only=False)
        state = ckpt["callbacks"][monitor.state_key]
        assert not _tensors(state), "the callback state must hold no tensors"
        sizes[width] = len(pickle.dumps(state))
        sidecar = snapshot_path(RecordStore.for_logdir(tmp_path / str(width) / "run" / "version_0").root,
                                monitor.record_key, 4)
        saved = read_snapshot(sidecar)
        assert {k: (tuple(v.shape), v.dtype) for k, v in saved.items()} == {
            layer: ((width, 32), torch.bfloat16) for layer in (0, 1)}
    # 16x the neurons: the old fp32 snapshot would add ~240 KB; only the cohort's indices (5% of the neurons) grow
    assert sizes[1024] - sizes[64] < 2_000, sizes


def test_resume_reads_the_snapshot_back_and_warns_when_it_is_gone(tmp_path) -> None:
    full = _ckpt_run(tmp_path / "full", max_steps=6)
    assert full.state.prev_weights[0].dtype == torch.bfloat16
    part = tmp_path / "part"
    _ckpt_run(part, max_steps=4)
    (ckpt,) = (part / "ckpt").glob("*step=2.ckpt")  # resume from the older checkpoint: its snapshot is step 2's
    records = RecordStore.for_logdir(part / "run" / "version_0")  # the resumed run rewrites steps 4 and 6
    _ckpt_run(part, max_steps=6, ckpt_path=str(ckpt))
    want = RecordStore.for_logdir(tmp_path / "full" / "run" / "version_0").read_scalars()
    got = records.read_scalars()
    drift_rows = lambda f: f[f.metric.str.startswith("drift/")].sort_values(["step", "layer", "metric"])  # noqa: E731
    assert sorted(drift_rows(want).step.unique()) == [2, 4, 6]
    pd.testing.assert_frame_equal(drift_rows(want).reset_index(drop=True), drift_rows(got).reset_index(drop=True),
                                  check_exact=False, rtol=1e-6, atol=1e-9)

    gone = tmp_path / "gone"
    _ckpt_run(gone, max_steps=2)
    for path in (RecordStore.for_logdir(gone / "run" / "version_0").root / "drift").iterdir():
        path.unlink()
    with pytest.warns(UserWarning, match="weight snapshot of step 2 at .* is missing"):
        _ckpt_run(gone, max_steps=4, ckpt_path=str(next((gone / "ckpt").glob("*step=2.ckpt"))))
    scalars = RecordStore.for_logdir(gone / "run" / "version_0").read_scalars()
    assert not scalars[(scalars.step == 4) & scalars.metric.str.startswith("drift/")].size
    assert "health/measurement_failed" not in set(scalars.metric)


def test_drift_too_small_for_bf16_is_warned_once(tmp_path) -> None:
    """A learning rate so small that successive snapshots barely move: bf16 cannot resolve it, and says so."""
    seed_everything(0)
    module = TinyLM(lr=1e-6)
    monitor = WeightDriftMonitor(every_n_steps=1, **SMALL)
    with pytest.warns(UserWarning, match="below what a torch.bfloat16 snapshot resolves well") as record:
        trainer(tmp_path / "bf16", 3, [monitor]).fit(module, token_loader(module.tokenizer))
    assert sum("resolves well" in str(w.message) for w in record) == 1
    seed_everything(0)
    module = TinyLM(lr=1e-6)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*resolves well.*")
        trainer(tmp_path / "fp32", 3, [WeightDriftMonitor(every_n_steps=1, drift_dtype="fp32", **SMALL)]).fit(
            module, token_loader(module.tokenizer))


def test_a_snapshot_that_cannot_be_written_never_ends_training(tmp_path, monkeypatch) -> None:
    """A full disk while the weight snapshot is saved beside a checkpoint: one warning, the run and its
    checkpoints go on (no snapshot file, no half-written one); ``strict=True`` re-raises."""
    from negmonitor.monitoring import drift_snapshot

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(drift_snapshot, "write_snapshot", full_disk)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _ckpt_run(tmp_path / "full", max_steps=4)
    said = [str(w.message) for w in caught if "could not write the weight snapshot" in str(w.message)]
    assert len(said) == 1 and "No space left on device" in said[0]
    assert sorted(p.name for p in (tmp_path / "full" / "ckpt").glob("*.ckpt")) == [
        "epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt"]
    drift_dir = RecordStore.for_logdir(tmp_path / "full" / "run" / "version_0").root / "drift"
    assert not drift_dir.exists() or not any(drift_dir.iterdir())

    seed_everything(0)
    module = TinyLM()
    monitor = WeightDriftMonitor(every_n_steps=2, strict=True, **SMALL)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "strict" / "ckpt", every_n_train_steps=2, save_top_k=-1)
    with pytest.raises(OSError, match="No space left"):
        trainer(tmp_path / "strict", 4, [monitor, checkpoints]).fit(module, token_loader(module.tokenizer,
                                                                                         n_batches=2))
