"""Weight drift at scale: bf16 snapshots in host memory, compared a layer at a time on the model's device, saved
beside the records, never in a checkpoint."""

from __future__ import annotations

import pickle
import warnings
import weakref

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_helpers import TEXT, TinyLM, token_loader, trainer
from negmonitor.callbacks import WeightDriftMonitor
from negmonitor.metrics import drift
from negmonitor.metrics.drift import weight_drift
from negmonitor.monitoring.drift_snapshot import prune_snapshots, read_snapshot, snapshot_path, write_snapshot
from negmonitor.records import RecordStore
from tiny_models import tiny_causal_lm, tiny_tokenizer

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


def test_pruning_keeps_the_snapshots_written_last_not_the_highest_steps(tmp_path) -> None:
    """A run resumed from an earlier checkpoint into the same folder finds the abandoned run's later steps there:
    the snapshot it has just written must survive the pruning."""
    import os

    weights = {0: torch.randn(8, 4).bfloat16()}
    for age, step in ((300, 10), (200, 20)):  # the abandoned run's snapshots, written earlier
        path = write_snapshot(snapshot_path(tmp_path, "k", step), weights, step)
        os.utime(path, ns=(path.stat().st_mtime_ns - age * 10**9,) * 2)
    write_snapshot(snapshot_path(tmp_path, "k", 4), weights, 4)  # the resumed run's, just now
    prune_snapshots(tmp_path, "k", keep=2)
    assert sorted(p.name for p in (tmp_path / "drift").iterdir()) == [snapshot_path(tmp_path, "k", s).name
                                                                      for s in (4, 20)]


def _ckpt_run(root, intermediate: int | None = None, max_steps: int = 4, ckpt_path=None, version: int | None = 0,
              **monitor_kwargs):
    """Train the tiny LM with a drift monitor every 2 steps and a checkpoint every 2 steps (all kept), logging to
    TensorBoard under ``root/run/version_<version>`` (``None``: the logger's next free version, its default)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    seed_everything(0)
    module = TinyLM()
    if intermediate is not None:  # the same model with a wider MLP
        from transformers import GPTNeoXForCausalLM

        config = module.model.config
        config.intermediate_size = intermediate
        torch.manual_seed(0)
        module.model = GPTNeoXForCausalLM(config)
    monitor = WeightDriftMonitor(every_n_steps=2, **SMALL, **monitor_kwargs)
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1)
    # two batches an epoch: every checkpoint ends an epoch, so a resumed run sees the same batches
    logger = TensorBoardLogger(str(root), name="run", version=version)
    trainer(root, max_steps, [monitor, checkpoints], logger=logger).fit(
        module, token_loader(module.tokenizer, n_batches=2), ckpt_path=ckpt_path)
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


def _assert_same_records(want: RecordStore, got: RecordStore, steps: list[int] | None = None,
                         ignore: tuple[str, ...] = ()) -> None:
    """Every scalar and neuron row of ``want`` (at ``steps``, default all) is in ``got``, bit for bit."""
    for kind in ("scalars", "neurons"):
        a, b = (store.read(kind).drop(columns=list(ignore)) for store in (want, got))
        if steps is not None:
            a, b = (f[f.step.isin(steps)].reset_index(drop=True) for f in (a, b))
        assert len(a), kind
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=kind)


def test_resume_reads_the_snapshot_back_and_warns_when_it_is_gone(tmp_path) -> None:
    """A run resumed from its older checkpoint records exactly what the uninterrupted run records: every scalar and
    neuron row bit for bit, drift included (the same batches, the same weights, the snapshot read back exactly)."""
    full = _ckpt_run(tmp_path / "full", max_steps=6)
    assert full.state.prev_weights[0].dtype == torch.bfloat16
    assert {rows.device.type for rows in full.state.prev_weights.values()} == {"cpu"}
    part = tmp_path / "part"
    _ckpt_run(part, max_steps=4)
    (ckpt,) = (part / "ckpt").glob("*step=2.ckpt")  # resume from the older checkpoint: its snapshot is step 2's
    records = RecordStore.for_logdir(part / "run" / "version_0")  # the resumed run rewrites steps 4 and 6
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*weight snapshot.*")
        resumed = _ckpt_run(part, max_steps=6, ckpt_path=str(ckpt))
    assert {rows.device.type for rows in resumed.state.prev_weights.values()} == {"cpu"}
    want = RecordStore.for_logdir(tmp_path / "full" / "run" / "version_0")
    scalars = want.read_scalars()
    assert sorted(scalars[scalars.metric.str.startswith("drift/")].step.unique()) == [2, 4, 6]
    _assert_same_records(want, records)

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
    """A full disk while the weight snapshot is saved beside a checkpoint (safetensors has written part of the file):
    one warning, the run and its checkpoints go on, and neither the snapshot nor its partial bytes are left
    behind; ``strict=True`` re-raises."""
    from negmonitor.monitoring import drift_snapshot

    written = []

    def full_disk(tensors, filename, metadata=None):  # safetensors' save_file, as drift_snapshot calls it
        with open(filename, "wb") as f:
            f.write(b"\x00" * 64)  # the header's length and a little more, then the disk is full
        written.append(filename)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(drift_snapshot, "save_file", full_disk)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _ckpt_run(tmp_path / "full", max_steps=4)
    said = [str(w.message) for w in caught if "could not write the weight snapshot" in str(w.message)]
    assert len(said) == 1 and "No space left on device" in said[0]
    assert sorted(p.name for p in (tmp_path / "full" / "ckpt").glob("*.ckpt")) == [
        "epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt"]
    root = RecordStore.for_logdir(tmp_path / "full" / "run" / "version_0").root
    assert len(written) == 2  # both checkpoints tried, and both partial files went
    for step in (2, 4):
        assert not snapshot_path(root, monitor_key(tmp_path / "full"), step).exists()
    assert not any((root / "drift").iterdir())  # no partial temporary either

    seed_everything(0)
    module = TinyLM()
    monitor = WeightDriftMonitor(every_n_steps=2, strict=True, **SMALL)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "strict" / "ckpt", every_n_train_steps=2, save_top_k=-1)
    with pytest.raises(OSError, match="No space left"):
        trainer(tmp_path / "strict", 4, [monitor, checkpoints]).fit(module, token_loader(module.tokenizer,
                                                                                         n_batches=2))


# ------------------------------------------------------------------------------------- snapshot memory (host side)
def _perturb(model: torch.nn.Module, seed: int) -> None:
    """A training step's worth of change: every weight moves by ~50% of its init scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=g))


@pytest.mark.parametrize("family", ["neox", "gpt2"])  # gpt2: Conv1D, whose weight rows are a transposed view
def test_a_measurement_s_drift_is_that_of_two_rounded_snapshots_kept_on_the_host(family) -> None:
    """The drift of a measurement is ``weight_drift`` of the two bf16-rounded snapshots (the numbers the
    device-resident snapshot gave, bit for bit), i.e. 1 - cos of the rounded rows; the snapshot is on the host."""
    from negmonitor.adapters import find_sites
    from negmonitor.monitoring.engine import MonitorSettings, MonitorState, take_measurement
    from negmonitor.probeset import ProbeSet

    model, tokenizer = tiny_causal_lm(family), tiny_tokenizer()
    probe_set = ProbeSet.build([TEXT], tokenizer, n_tokens=1_024, window=64, n_pairs=100,
                               max_positions=model.config.max_position_embeddings)
    settings, state = MonitorSettings(), MonitorState()
    first = take_measurement(model, probe_set, 0, settings, state, tokenizer)
    assert first.neurons.drift_cos_dissim.isna().all()
    before = {site.layer: site.weight_rows().detach().clone() for site in find_sites(model)}
    assert all(rows.device.type == "cpu" and rows.dtype == torch.bfloat16 and torch.equal(rows, before[layer].bfloat16())
               for layer, rows in state.prev_weights.items())
    _perturb(model, seed=1)
    second = take_measurement(model, probe_set, 5, settings, state, tokenizer)
    assert state.prev_step == 5 and {t.device.type for t in state.prev_weights.values()} == {"cpu"}
    for site in find_sites(model):
        now = site.weight_rows().detach()
        expected = weight_drift(before[site.layer].bfloat16(), now.bfloat16())  # two whole rounded copies
        got = second.neurons[second.neurons.layer == site.layer].sort_values("neuron")
        for key in ("cos_dissim", "cos_dissim_norm", "l2", "l2_norm"):
            assert np.array_equal(got[f"drift_{key}"].to_numpy(), expected[key].numpy()), (site.layer, key)
        direct = 1 - torch.nn.functional.cosine_similarity(before[site.layer].bfloat16().double(),
                                                           now.bfloat16().double(), dim=1)
        np.testing.assert_allclose(got.drift_cos_dissim.to_numpy(), direct.numpy(), rtol=1e-3)
        assert torch.equal(state.prev_weights[site.layer], now.bfloat16())


class _LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage alive, and their peak: the storages given at the start plus every new storage an
    op makes (a view or an in-place result shares its input's storage and is not new), each until it is freed."""

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.live, self.peak, self._seen = 0, 0, set()
        for tensor in existing:
            self._track(tensor)
        self.start = self.live

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._seen:
            return
        self._seen.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, storage.nbytes())

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage()._cdata not in inputs:
                self._track(tensor)
        return out


def _wide_model(layers: int = 6) -> torch.nn.Module:
    """The tiny GPT-NeoX, wider (d_in 256, 1,024 neurons) and deeper, so a layer's rows dwarf the drift vectors."""
    from transformers import GPTNeoXForCausalLM

    config = tiny_causal_lm("neox").config
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 256, 1024, layers
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(config).eval()


def test_replacing_the_snapshot_holds_about_one_layer_beyond_it(monkeypatch) -> None:
    """While the drift is computed, each layer's previous rows are freed as its new rows are copied: beyond the
    snapshot, at most about one layer (here, small row blocks and the drift vectors) is alive at any time, where
    building the whole new snapshot before freeing the old one held two snapshots (6 layers here)."""
    from negmonitor.adapters import find_sites
    from negmonitor.monitoring import engine

    model = _wide_model()
    sites = find_sites(model)
    state = engine.MonitorState()
    engine._drift(sites, state, 0)
    _perturb(model, seed=2)
    layer_bytes = 1024 * 256 * 2  # one layer's rows in bf16
    assert sum(t.nbytes for t in state.prev_weights.values()) == 6 * layer_bytes
    monkeypatch.setattr(drift, "_BLOCK_ELEMENTS", 64 * 256)  # small blocks: the temporaries stay small
    monkeypatch.setattr(engine, "_COPY_BLOCK_ELEMENTS", 64 * 256)
    tracker = _LiveBytes(list(state.prev_weights.values()))
    with tracker:
        values = engine._drift(sites, state, 1)
    assert sorted(values) == list(range(6))
    assert tracker.start == 6 * layer_bytes
    assert tracker.peak - tracker.start <= layer_bytes, (tracker.peak - tracker.start) / layer_bytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_snapshot_is_on_the_host_and_the_device_holds_about_one_layer() -> None:
    from negmonitor.adapters import find_sites
    from negmonitor.monitoring import engine

    model = _wide_model().cuda()
    sites = find_sites(model)
    state = engine.MonitorState()
    engine._drift(sites, state, 0)
    assert {t.device.type for t in state.prev_weights.values()} == {"cpu"}
    reference = {layer: weight_drift(rows, sites[i].weight_rows().detach().cpu().bfloat16())
                 for i, (layer, rows) in enumerate(state.prev_weights.items())}  # nothing moved yet: zero drift
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    values = engine._drift(sites, state, 1)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 1.5 * 1024 * 256 * 2 + (1 << 20), extra  # one bf16 layer, a block and the allocator's rounding
    assert {t.device.type for t in state.prev_weights.values()} == {"cpu"}
    for layer, expected in reference.items():
        assert torch.equal(values[layer]["l2"], expected["l2"])


def monitor_key(root) -> str:
    """The record key of the drift monitor whose run.json is under ``root/run/version_0``."""
    import json

    (info,) = RecordStore.for_logdir(root / "run" / "version_0").root.glob("run-*.json")
    return json.loads(info.read_text())["record_key"]


# --------------------------------------------------------------------------------------------- resume and pruning
def _snapshot_steps(folder) -> list[int]:
    """Steps of the snapshot files in ``folder`` (``<key>-step-<N>.safetensors``)."""
    return sorted(int(p.name.split("-step-")[1].removesuffix(".safetensors")) for p in folder.iterdir())


def test_a_resume_logging_to_the_next_logger_version_reads_the_snapshot_where_it_was_saved(tmp_path) -> None:
    """``TensorBoardLogger(version=None)``: the resumed run logs to version_1, the snapshot was saved under
    version_0; the checkpoint's state names that file, so the first drift after the resume is the uninterrupted
    run's, bit for bit (and the next snapshot goes to version_1)."""
    _ckpt_run(tmp_path / "full", max_steps=6)
    part = tmp_path / "part"
    _ckpt_run(part, max_steps=4, version=None)
    (ckpt,) = (part / "ckpt").glob("*step=4.ckpt")
    state = next(v for k, v in torch.load(ckpt, weights_only=False)["callbacks"].items() if "WeightDrift" in k)
    saved = RecordStore.for_logdir(part / "run" / "version_0").root / "drift"
    assert state["snapshot_file"] == str(next(saved.glob("*-step-0000000004.safetensors")).resolve())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*weight snapshot.*")
        _ckpt_run(part, max_steps=6, ckpt_path=str(ckpt), version=None)
    resumed = RecordStore.for_logdir(part / "run" / "version_1")
    scalars = resumed.read_scalars()
    assert sorted(scalars[scalars.metric.str.startswith("drift/")].step.unique()) == [6]
    want = RecordStore.for_logdir(tmp_path / "full" / "run" / "version_0")
    _assert_same_records(want, resumed, steps=[6], ignore=("run",))  # run: the folder's name, version_1
    assert list((resumed.root / "drift").glob("*-step-0000000006.safetensors"))


def test_keeping_every_snapshot_resumes_an_early_checkpoint_with_its_drift(tmp_path) -> None:
    """``drift_snapshots_kept=None`` keeps the snapshot of every checkpoint (``save_top_k=-1``), so a resume from
    the first one measures the same drift as the uninterrupted run; the default keeps the newest two."""
    _ckpt_run(tmp_path / "full", max_steps=8)
    default = RecordStore.for_logdir(tmp_path / "full" / "run" / "version_0").root / "drift"
    assert _snapshot_steps(default) == [6, 8]
    part = tmp_path / "part"
    _ckpt_run(part, max_steps=8, drift_snapshots_kept=None)
    records = RecordStore.for_logdir(part / "run" / "version_0")
    assert _snapshot_steps(records.root / "drift") == [2, 4, 6, 8]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*weight snapshot.*")
        _ckpt_run(part, max_steps=8, ckpt_path=str(next((part / "ckpt").glob("*step=2.ckpt"))),
                  drift_snapshots_kept=None)
    drift_rows = lambda f: f[f.metric.str.startswith("drift/")].reset_index(drop=True)  # noqa: E731
    want = RecordStore.for_logdir(tmp_path / "full" / "run" / "version_0")
    assert sorted(drift_rows(records.read_scalars()).step.unique()) == [2, 4, 6, 8]
    pd.testing.assert_frame_equal(drift_rows(want.read_scalars()), drift_rows(records.read_scalars()),
                                  check_exact=True)
    _assert_same_records(want, records)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "all"])
def test_drift_snapshots_kept_must_be_positive_or_none(bad) -> None:
    from negmonitor.errors import NegmonitorError

    with pytest.raises(NegmonitorError, match="drift_snapshots_kept must be a positive integer or None"):
        WeightDriftMonitor(drift_snapshots_kept=bad, **SMALL)
