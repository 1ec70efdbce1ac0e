"""Replay end to end on tiny offline series: a hub cache, step folders, Lightning checkpoints; resume and shards.

Every series is a tiny GPT-NeoX (2 layers, width 32) whose weights take a seeded random walk from checkpoint to
checkpoint, so WD, the cohort and the weight drift all move.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from tiny_models import _WORDS, tiny_causal_lm, tiny_tokenizer

from negmonitor.errors import NegmonitorError
from negmonitor.records import RecordStore
from negmonitor.replay import read_manifest, replay

STEPS = [0, 10, 20, 40]
PROBE = dict(probe_tokens=512, probe_window=64, n_pairs=32, batch_size=8)
QUIET = dict(progress=False, media_every=1000)


def _probe_text() -> str:
    rng = random.Random(0)
    return "\n".join(" ".join(rng.choice(_WORDS) for _ in range(12)) + " ." for _ in range(300))


def _walk(model: torch.nn.Module, step: int) -> None:
    """Move the weights as if trained up to ``step`` (deterministic)."""
    gen = torch.Generator().manual_seed(1000 + step)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=gen))


def _snapshots() -> dict[int, torch.nn.Module]:
    model = tiny_causal_lm("neox", seed=0)
    out = {}
    for step in STEPS:
        _walk(model, step)
        out[step] = model
        model = _clone(model)
    return out


def _clone(model: torch.nn.Module) -> torch.nn.Module:
    copy = tiny_causal_lm("neox", seed=0)
    copy.load_state_dict(model.state_dict())
    return copy


@pytest.fixture(scope="module")
def probe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("probe") / "probe.txt"
    path.write_text(_probe_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def step_series(tmp_path_factory) -> Path:
    """``series/step-<N>/`` save_pretrained folders, the tokenizer beside them."""
    root = tmp_path_factory.mktemp("series")
    for step, model in _snapshots().items():
        model.save_pretrained(root / f"step-{step}")
    tiny_tokenizer().save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """A Hugging Face hub cache holding ``tiny-org/pythia-tiny`` with one ref per revision.

    ``step4`` is byte-identical to ``step2``; ``step16`` has a ref but no weights (never uploaded); ``step32``'s
    weights file is corrupt.
    """
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--tiny-org--pythia-tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm("neox", seed=0)
    for i, step in enumerate([0, 1, 2, 4, 8, 16, 32]):
        commit = f"{i + 1:040x}"
        snapshot = repo / "snapshots" / commit
        if step != 4:
            _walk(model, step)
        model.save_pretrained(snapshot)
        tokenizer.save_pretrained(snapshot)
        for weights in snapshot.glob("*.safetensors"):
            if step == 16:
                weights.unlink()
            elif step == 32:
                weights.write_bytes(b"not a safetensors file")
        _files_to_blobs(snapshot, repo / "blobs")
        (repo / "refs" / f"step{step}").write_text(commit)  # no newline: the hub writes the bare commit hash
    return cache


def _files_to_blobs(snapshot: Path, blobs: Path) -> None:
    """Move a snapshot's files into ``blobs/<sha256>`` and leave relative symlinks, as the hub cache does."""
    for file in sorted(p for p in snapshot.iterdir() if p.is_file()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        blob = blobs / digest
        if not blob.exists():
            shutil.copyfile(file, blob)
        file.unlink()
        file.symlink_to(Path("..") / ".." / "blobs" / digest)


def _records(logdir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    store = RecordStore.for_logdir(logdir)
    return store.read_scalars(), store.read_neurons()


def _assert_same_records(a: Path, b: Path) -> None:
    scalars_a, neurons_a = _records(a)
    scalars_b, neurons_b = _records(b)
    assert len(scalars_a) > 0 and len(neurons_a) > 0
    pd.testing.assert_frame_equal(scalars_a, scalars_b)
    pd.testing.assert_frame_equal(neurons_a, neurons_b)
    keep = ["revision", "status", "weights_sha256", "identical_to_previous", "previous"]
    pd.testing.assert_frame_equal(read_manifest(a)[keep], read_manifest(b)[keep])


@pytest.fixture(scope="module")
def reference_run(step_series, probe_file, tmp_path_factory) -> Path:
    """An uninterrupted single-process replay of the step-folder series, through the command line."""
    from negmonitor.cli import main

    logdir = tmp_path_factory.mktemp("runs") / "reference"
    code = main(["replay", "--model", str(step_series), "--revisions", "all", "--logdir", str(logdir),
                 "--probe", str(probe_file), "--tokens", "512", "--window", "64", "--pairs", "32",
                 "--tokens-per-step", "1000", "--run-name", "tiny", "--no-progress", "--media-every", "2",
                 "--image-neurons", "1"])
    assert code == 0
    return logdir


def test_cli_replay_writes_records_manifest_and_prints_paths(reference_run, capsys):
    scalars, neurons = _records(reference_run)
    assert sorted(scalars.step.unique()) == STEPS
    assert (scalars.tokens_seen == scalars.step * 1000).all()
    assert set(scalars.run) == {"tiny"}
    drift = scalars[scalars.metric == "drift/cohort_vs_rest"]
    assert sorted(drift.step.unique()) == STEPS[1:]  # no predecessor at the first checkpoint
    cohort = neurons[neurons.in_cohort]
    assert cohort.groupby("step").size().nunique() == 1  # the same cohort everywhere, earlier checkpoints included
    manifest = read_manifest(reference_run)
    assert manifest.status.tolist() == ["ok"] * len(STEPS)
    assert manifest.weights_sha256.str.len().eq(64).all()
    assert set(manifest.dtype) == {"float32"}  # no --dtype on CPU: fp32, recorded per revision
    from negmonitor.replay.manifest import format_manifest

    assert format_manifest(manifest).splitlines()[1].split()[4] == "float32"  # and printed with the table
    assert (reference_run / "negmonitor" / "manifest.json").is_file()
    assert (reference_run / "negmonitor" / "cohort.json").is_file()


def test_tensorboard_tags_overlay_a_live_run(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(reference_run), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("negmonitor/wd/cohort_mean/layer_00", "negmonitor/wd/max/layer_01", "negmonitor/wd/cohort_mean",
                "negmonitor/pairs/nn_share/layer_00"):
        assert tag in tags
        assert [e.step for e in events.Scalars(tag)] == STEPS
    assert [e.step for e in events.Scalars("negmonitor/drift/cohort_vs_rest/layer_00")] == STEPS[1:]
    histograms = events.Tags()["histograms"]
    assert "negmonitor/wd/distribution/layer_00" in histograms
    assert [e.step for e in events.Histograms("negmonitor/wd/distribution/layer_00")] == [0, 20, 40]
    assert "negmonitor/images/top_neurons/layer_01" in events.Tags()["images"]


def test_interrupted_replay_resumes_to_the_same_records(reference_run, step_series, probe_file, tmp_path,
                                                        monkeypatch):
    from negmonitor.monitoring import engine

    real = engine.take_measurement
    calls = []

    def interrupting(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 4:  # cohort pass, step0, step10, then stop inside step20
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    logdir = tmp_path / "resumed"
    monkeypatch.setattr(engine, "take_measurement", interrupting)
    with pytest.raises(KeyboardInterrupt):
        replay(step_series, "all", logdir, probe=str(probe_file), tokens_per_step=1000, run_name="tiny", **PROBE,
               **QUIET)
    assert read_manifest(logdir).revision.tolist() == ["step0", "step10"]
    monkeypatch.setattr(engine, "take_measurement", real)
    result = replay(step_series, "all", logdir, probe=str(probe_file), tokens_per_step=1000, run_name="tiny",
                    tensorboard=False, **PROBE, **QUIET)
    assert result.skipped == ["step0", "step10"] and result.processed == ["step20", "step40"]
    _assert_same_records(reference_run, logdir)
    again = replay(step_series, "all", logdir, probe=str(probe_file), tokens_per_step=1000, run_name="tiny",
                   tensorboard=False, **PROBE, **QUIET)
    assert again.processed == [] and len(again.skipped) == len(STEPS)


def test_two_shards_equal_one_process(reference_run, step_series, probe_file, tmp_path):
    logdir = tmp_path / "sharded"
    for shard in ("2/2", "1/2"):  # the later block first: its predecessor is loaded from the other block
        result = replay(step_series, "all", logdir, probe=str(probe_file), tokens_per_step=1000, run_name="tiny",
                        shard=shard, tensorboard=False, **PROBE, **QUIET)
        assert result.processed and len(result.processed) < len(STEPS)
    assert result.manifest.status.tolist() == ["ok"] * len(STEPS)
    _assert_same_records(reference_run, logdir)


def test_failed_measurement_is_recorded_and_retried(step_series, probe_file, tmp_path, monkeypatch):
    from negmonitor.monitoring import engine

    real = engine.take_measurement
    calls = []

    def broken_after_the_cohort_pass(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    logdir = tmp_path / "log"
    monkeypatch.setattr(engine, "take_measurement", broken_after_the_cohort_pass)
    with pytest.warns(UserWarning, match="measurement of step10 failed"):
        result = replay(step_series, "step10", logdir, probe=str(probe_file), tensorboard=False, **PROBE, **QUIET)
    assert result.manifest.status.tolist() == ["failed"] and "boom" in result.manifest.error[0]
    assert result.read_scalars().metric.tolist() == ["health/measurement_failed"]
    monkeypatch.setattr(engine, "take_measurement", real)
    retried = replay(step_series, "step10", logdir, probe=str(probe_file), tensorboard=False, **PROBE, **QUIET)
    assert retried.processed == ["step10"] and retried.manifest.status.tolist() == ["ok"]
    assert "health/measurement_failed" not in set(retried.read_scalars().metric)


def test_a_batch_size_lowered_by_an_out_of_memory_retry_is_kept_for_later_checkpoints(step_series, probe_file,
                                                                                      tmp_path, monkeypatch):
    """Probe batches of more than 2 windows run out of memory: the cohort pass retries at 4, then 2; every later
    checkpoint starts at 2 and none runs out of memory again, or fails."""
    from transformers.models.gpt_neox import modeling_gpt_neox

    raised = []
    real = modeling_gpt_neox.GPTNeoXMLP.forward

    def out_of_memory_above_two_windows(self, hidden_states, *args, **kwargs):
        if not torch.is_grad_enabled() and hidden_states.shape[0] > 2:
            raised.append(hidden_states.shape[0])
            raise torch.OutOfMemoryError("CUDA out of memory (simulated: probe batches above 2 windows)")
        return real(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(modeling_gpt_neox.GPTNeoXMLP, "forward", out_of_memory_above_two_windows)
    with pytest.warns(UserWarning, match="retrying with batch size 2 \\(later measurements start there\\)"):
        result = replay(step_series, "all", tmp_path / "log", probe=str(probe_file), tensorboard=False, **PROBE,
                        **QUIET)
    assert raised == [8, 4]  # the first pass only
    assert result.manifest.status.tolist() == ["ok"] * len(STEPS)


def test_resume_with_other_settings_is_refused(reference_run, step_series, probe_file):
    with pytest.raises(NegmonitorError, match="other settings"):
        replay(step_series, "all", reference_run, probe=str(probe_file), tokens_per_step=1000, run_name="tiny",
               **{**PROBE, "n_pairs": 16}, **QUIET)


def test_hub_cache_replay_offline_through_from_pretrained(hub_cache, probe_file, tmp_path):
    logdir = tmp_path / "pythia-tiny"
    result = replay("tiny-org/pythia-tiny", "step0,step2,step4,step8,step16,step32", logdir, probe=str(probe_file),
                    cache_dir=hub_cache, tensorboard=False, **PROBE, **QUIET)
    manifest = result.manifest.set_index("revision")
    assert manifest.status.to_dict() == {"step0": "ok", "step2": "ok", "step4": "duplicate", "step8": "ok",
                                         "step16": "missing", "step32": "failed"}
    assert manifest.loc["step4", "identical_to"] == "step2" and manifest.loc["step4", "identical_to_previous"]
    assert manifest.loc["step8", "previous"] == "step4"
    assert "model.safetensors" in manifest.loc["step16", "error"]
    assert manifest.loc["step32", "error"].startswith("load: ")
    assert set(manifest.variant) == {"standard"}
    cohort = json.loads((logdir / "negmonitor" / "cohort.json").read_text())
    assert cohort["revision"] == "step8"  # the last revision of the list that loads
    scalars = result.read_scalars()
    assert sorted(scalars.step.unique()) == [0, 2, 8]
    assert (scalars.tokens_seen == scalars.step * 2_097_152).all()
    assert "step16" in result.summary() and str(result.records_root) in result.summary()

    # A preset over Pythia's schedule: revisions the cache lacks are recorded as missing, never fatal; the
    # revisions already replayed are skipped and the cohort is re-read.
    preset = replay("tiny-org/pythia-tiny", "log:6", logdir, probe=str(probe_file), cache_dir=hub_cache,
                    tensorboard=False, **PROBE, **QUIET)
    statuses = preset.manifest.set_index("revision").status
    assert statuses.index[0] == "step0" and statuses.index[-1] == "step143000"
    assert preset.skipped == ["step0", "step8"] and statuses.drop(["step0", "step8"]).eq("missing").all()
    merged = read_manifest(logdir).revision  # both runs' entries, merged
    assert set(merged) == set(preset.revisions) | {"step2", "step4", "step16", "step32"}
    assert json.loads((logdir / "negmonitor" / "cohort.json").read_text()) == cohort


def test_hub_unknown_revision_and_model_are_clear_errors(hub_cache, tmp_path):
    with pytest.raises(NegmonitorError, match=r"unknown revision\(s\) step3 .* available: step0, step1, step2"):
        replay("tiny-org/pythia-tiny", "step0,step3", tmp_path / "a", cache_dir=hub_cache, **QUIET)
    with pytest.raises(NegmonitorError, match="not in the local hub cache"):
        replay("tiny-org/no-such-model", "step0", tmp_path / "b", cache_dir=hub_cache, **QUIET)


def test_model_without_adapter_is_a_clear_error(tmp_path, probe_file):
    from transformers import AutoModelForCausalLM, BloomConfig

    model = AutoModelForCausalLM.from_config(BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=512))
    model.save_pretrained(tmp_path / "series" / "step-0")
    tiny_tokenizer().save_pretrained(tmp_path / "series")
    with pytest.raises(NegmonitorError, match="adapter|register_adapter|bloom"):
        replay(tmp_path / "series", "all", tmp_path / "log", probe=str(probe_file), **PROBE, **QUIET)


def test_lightning_checkpoints_of_ones_own_run(tmp_path, probe_file):
    import lightning

    from negmonitor.train.module import CausalLMModule

    module = CausalLMModule(family="neox", hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                            max_position_embeddings=256, vocab_size=512)
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for step in (3, 9):
        _walk(module.model, step)
        torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                    "global_step": step, "epoch": 0, "pytorch-lightning_version": lightning.__version__,
                    "negmonitor_tokens_seen": step * 64}, folder / f"epoch=0-step={step}.ckpt")
    shutil.copy(folder / "epoch=0-step=9.ckpt", folder / "last.ckpt")  # same step twice: one checkpoint
    tiny_tokenizer().save_pretrained(tmp_path / "run")
    result = replay(folder, "all", tmp_path / "log", probe=str(probe_file), tensorboard=False, **PROBE, **QUIET)
    assert result.manifest.status.tolist() == ["ok", "ok"]
    scalars = result.read_scalars()
    assert sorted(scalars.step.unique()) == [3, 9]
    assert (scalars.tokens_seen == scalars.step * 64).all()


def test_ablation_damage_at_every_checkpoint(step_series, probe_file, tmp_path):
    pytest.importorskip("negmonitor.monitoring.ablation_rows",
                        reason="negmonitor.monitoring.ablation_rows (the live callback's ablation rows) is not "
                               "written yet; replay --ablate uses the same function")
    from negmonitor.ablation import AblationSettings

    pairs = pd.DataFrame({"suite": ["blimp"] * 4, "uid": ["agr"] * 4, "field": ["morphology"] * 4,
                          "linguistics_term": ["s-v_agreement"] * 4, "pair_id": range(4),
                          "sentence_good": ["the cat laughs .", "the cats laugh .", "a dog swims .", "dogs swim ."],
                          "sentence_bad": ["the cat laugh .", "the cats laughs .", "a dog swim .", "dogs swims ."]})
    result = replay(step_series, "step0,step40", tmp_path / "log", probe=str(probe_file), tensorboard=False,
                    ablation=AblationSettings(fraction=0.05, max_matching_evals=3), minimal_pairs=pairs,
                    ppl_text=_probe_text()[:3000], **PROBE, **QUIET)
    scalars = result.read_scalars()
    for metric in ("ablation/ppl_ratio/wasserstein", "ablation/ppl_ratio/random", "ablation/ppl_ratio/ppl_matched",
                   "ablation/acc_drop/blimp/wasserstein"):
        assert sorted(scalars[scalars.metric == metric].step) == [0, 40]
    assert sorted(scalars[scalars.metric == "wd/cohort_mean"].step.unique()) == [0, 40]  # damage vs cohort WD

    # A resume: a setting a later version adds (missing from the folder's replay.json) or another memory budget
    # (how it runs, not its numbers) does not refuse the folder; another fraction does.
    info = tmp_path / "log" / "negmonitor" / "replay.json"
    recorded = json.loads(info.read_text())
    del recorded["ablation"]["count"]
    info.write_text(json.dumps(recorded))
    again = replay(step_series, "step0,step40", tmp_path / "log", probe=str(probe_file), tensorboard=False,
                   ablation=AblationSettings(fraction=0.05, max_matching_evals=3, memory_budget="1GiB"),
                   minimal_pairs=pairs, ppl_text=_probe_text()[:3000], **PROBE, **QUIET)
    assert again.skipped == ["step0", "step40"]
    with pytest.raises(NegmonitorError, match="other settings .*ablation"):
        replay(step_series, "step0,step40", tmp_path / "log", probe=str(probe_file), tensorboard=False,
               ablation=AblationSettings(fraction=0.1, max_matching_evals=3), minimal_pairs=pairs,
               ppl_text=_probe_text()[:3000], **PROBE, **QUIET)


def test_replay_records_the_dtype_it_ran_in(step_series, probe_file, tmp_path):
    """``dtype="bf16"``: every revision's weights ran in bf16, as its manifest entry and the run info say."""
    import json

    result = replay(step_series, "step0,step10", tmp_path / "bf16", probe=str(probe_file), tokens_per_step=1000,
                    run_name="tiny", dtype="bf16", tensorboard=False, **PROBE, **QUIET)
    assert result.manifest.status.tolist() == ["ok", "ok"]
    assert result.manifest.dtype.tolist() == ["bfloat16", "bfloat16"]
    info = json.loads((tmp_path / "bf16" / "negmonitor" / "replay.json").read_text())
    assert info["dtype"] == "torch.bfloat16"


def test_replay_drift_compares_each_checkpoint_with_its_predecessor(reference_run) -> None:
    """The drift of every measured checkpoint is that of its weights against its predecessor's, in fp32: the
    measured revision's rows are handed on as the next one's predecessor (one host copy, not a second one)."""
    from negmonitor.metrics.drift import weight_drift

    _, neurons = _records(reference_run)
    snapshots = _snapshots()
    for before, after in zip(STEPS[1:-1], STEPS[2:]):
        at = neurons[neurons.step == after].sort_values(["layer", "neuron"])
        for layer in sorted(at.layer.unique()):
            rows = [snapshots[s].gpt_neox.layers[layer].mlp.dense_h_to_4h.weight.detach() for s in (before, after)]
            expected = weight_drift(*rows)["cos_dissim"].double().numpy()
            got = at[at.layer == layer].drift_cos_dissim.to_numpy()
            assert abs(got - expected).max() < 1e-6, (after, layer)


def test_drift_snapshots_stay_in_the_weights_dtype_and_a_duplicate_shares_its_predecessors(hub_cache, probe_file,
                                                                                          tmp_path, monkeypatch):
    """bf16 weights: the snapshot each measurement hands on is bf16 on the host (half an fp32 copy: 7.5 GB, not
    15 GB, for Pythia-12B), and the drift is still exact; a duplicate revision reuses its predecessor's snapshot
    instead of copying the same weights again (no separate copy is made at all here)."""
    from negmonitor.metrics.drift import weight_drift
    from negmonitor.monitoring import engine
    from negmonitor.replay import runner

    real, handed_on, copies = engine.take_measurement, [], []

    def recording(model, probe, step, settings, state, **kwargs):
        result = real(model, probe, step, settings, state, **kwargs)
        handed_on.extend((t.dtype, t.device.type) for t in (state.prev_weights or {}).values())
        return result

    real_rows = runner._Replay._weight_rows
    monkeypatch.setattr(engine, "take_measurement", recording)
    monkeypatch.setattr(runner._Replay, "_weight_rows", lambda self, model: copies.append(1) or real_rows(self, model))
    logdir = tmp_path / "bf16"
    result = replay("tiny-org/pythia-tiny", "step0,step2,step4,step8", logdir, probe=str(probe_file),
                    cache_dir=hub_cache, dtype="bf16", tensorboard=False, **PROBE, **QUIET)
    assert result.manifest.status.tolist() == ["ok", "ok", "duplicate", "ok"]
    assert handed_on and set(handed_on) == {(torch.bfloat16, "cpu")}
    assert copies == []

    from transformers import AutoModelForCausalLM

    snapshot = {s: AutoModelForCausalLM.from_pretrained(hub_cache / "models--tiny-org--pythia-tiny" / "snapshots" /
                                                        f"{i:040x}", dtype=torch.bfloat16)
                for i, s in ((3, 2), (5, 8))}  # step2 (commit 3) and step8 (commit 5); step4 repeats step2
    neurons = RecordStore.for_logdir(logdir).read_neurons()
    at = neurons[neurons.step == 8].sort_values(["layer", "neuron"])
    for layer in (0, 1):
        rows = [snapshot[s].gpt_neox.layers[layer].mlp.dense_h_to_4h.weight.detach() for s in (2, 8)]
        expected = weight_drift(*(r.float() for r in rows))["cos_dissim"].numpy()
        assert abs(at[at.layer == layer].drift_cos_dissim.to_numpy() - expected).max() < 1e-6


def test_checkpoints_load_in_their_saved_dtype_straight_onto_the_device(hub_cache, monkeypatch):
    """``dtype=None`` is the saved dtype on every supported transformers ("auto"), and the weights are placed by
    ``from_pretrained`` itself (``device_map``): a 12B checkpoint is never built whole in host memory first."""
    from transformers import AutoModelForCausalLM

    from negmonitor.replay.sources import load_weights

    seen, real = [], AutoModelForCausalLM.from_pretrained.__func__

    def spying(cls, *args, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("dtype", "device_map")})
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spying))
    folder = hub_cache / "models--tiny-org--pythia-tiny" / "snapshots" / f"{1:040x}"
    model = load_weights(str(folder), device="cpu")
    assert seen == [{"dtype": "auto", "device_map": {"": torch.device("cpu")}}]
    assert not model.training and next(model.parameters()).dtype == torch.float32  # as saved
    load_weights(str(folder), dtype="bf16", device="cpu")
    assert seen[-1] == {"dtype": torch.bfloat16, "device_map": {"": torch.device("cpu")}}


def test_a_later_revisions_failure_is_recorded_and_the_replay_goes_on(step_series, probe_file, tmp_path,
                                                                      monkeypatch):
    """negmonitor's own error (e.g. out of memory even at batch size 1) on a later revision, and a failure hashing
    another, are each recorded as failed while the others are measured; the same error on the first revision ends
    the replay at once (a setting's error), with the manifest summary of what was done written."""
    from negmonitor.monitoring import engine
    from negmonitor.replay import runner

    real, calls = engine.take_measurement, []

    def failing_on(nth):
        def measuring(*args, **kwargs):
            calls.append(args[2])
            if len(calls) == nth:
                raise NegmonitorError("out of memory during the probe pass even at batch size 1 (simulated)")
            return real(*args, **kwargs)
        return measuring

    real_hash, hashed = runner.weights_sha256, []

    def hashing(model):
        hashed.append(1)
        if len(hashed) == 4:  # step40's
            raise OSError("disk read error (simulated)")
        return real_hash(model)

    monkeypatch.setattr(engine, "take_measurement", failing_on(3))  # cohort pass, step0, then step10
    monkeypatch.setattr(runner, "weights_sha256", hashing)
    with pytest.warns(UserWarning, match="measurement of step10 failed"):
        result = replay(step_series, "all", tmp_path / "later", probe=str(probe_file), tensorboard=False,
                        **PROBE, **QUIET)
    manifest = result.manifest.set_index("revision")
    assert manifest.status.to_dict() == {"step0": "ok", "step10": "failed", "step20": "ok", "step40": "failed"}
    assert "even at batch size 1" in manifest.error["step10"] and "disk read error" in manifest.error["step40"]
    assert pd.isna(manifest.error["step20"])

    calls.clear()
    monkeypatch.setattr(engine, "take_measurement", failing_on(2))  # the first revision measured
    monkeypatch.setattr(runner, "weights_sha256", real_hash)
    with pytest.raises(NegmonitorError, match="even at batch size 1"):
        replay(step_series, "all", tmp_path / "first", probe=str(probe_file), tensorboard=False, **PROBE, **QUIET)
    summary = json.loads((tmp_path / "first" / "negmonitor" / "manifest.json").read_text())
    assert [e["revision"] for e in summary] == ["step0", "step10", "step20", "step40"]
    assert {e["status"] for e in summary} == {"pending"}  # nothing was done, and the summary says so


def test_a_predecessor_that_fails_to_load_is_not_hunted_further_back(step_series, probe_file, tmp_path,
                                                                     monkeypatch):
    """Shard 2/2 needs step10 as its predecessor: a load failure that is no missing file (a full disk, out of
    memory) would fail for every earlier checkpoint too; it is warned once and the drift left out, without loading
    step0."""
    from negmonitor.replay import runner

    real, loads = runner._Replay._load, []

    def loading(self, revision):
        loads.append(revision)
        if revision == "step10":  # (the cohort pass loads step40)
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, revision)

    monkeypatch.setattr(runner._Replay, "_load", loading)
    with pytest.warns(UserWarning, match="the predecessor step10 did not load"):
        result = replay(step_series, "all", tmp_path / "log", probe=str(probe_file), shard="2/2", tensorboard=False,
                        **PROBE, **QUIET)
    assert result.processed == ["step20", "step40"] and "step0" not in loads
    neurons = RecordStore.for_logdir(tmp_path / "log").read_neurons()
    assert neurons[neurons.step == 20].drift_cos_dissim.isna().all()
    assert neurons[neurons.step == 40].drift_cos_dissim.notna().any()


def test_a_failed_hub_listing_tries_every_revision_rather_than_only_the_cached_ones(hub_cache, monkeypatch):
    """Online, a listing that fails (a timeout, a rate limit) used to shrink the series to what the cache held:
    every revision not downloaded yet was recorded missing untried, and an explicit one refused as unknown."""
    import huggingface_hub
    from huggingface_hub import constants

    from negmonitor.replay.sources import HubSeries

    def failing_listing(*args, **kwargs):
        raise ConnectionError("429 Too Many Requests (simulated)")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "list_repo_refs", failing_listing)
    series = HubSeries("tiny-org/pythia-tiny", cache_dir=hub_cache)
    with pytest.warns(UserWarning, match=r"could not list the revisions .*429 .*every revision asked for is tried"):
        assert series.available() is None
    series.check_explicit(["step0", "step143000"])  # not in the cache: tried, not refused


def test_evict_cache_removes_each_recorded_revision_from_the_hub_cache(hub_cache, probe_file, tmp_path):
    """``--evict-cache``: every revision recorded is deleted from the hub cache (a long series of a big model does
    not fill the disk), blobs another cached revision still uses are kept (step4 repeats step2's weights), and the
    revisions not replayed stay."""
    from huggingface_hub import scan_cache_dir

    from negmonitor.cli import main

    cache = tmp_path / "hub"
    shutil.copytree(hub_cache, cache, symlinks=True)
    before = scan_cache_dir(cache).size_on_disk
    logdir = tmp_path / "log"
    code = main(["replay", "--model", "tiny-org/pythia-tiny", "--revisions", "step0,step2,step4",
                 "--logdir", str(logdir), "--cache-dir", str(cache), "--probe", str(probe_file), "--tokens", "512",
                 "--window", "64", "--pairs", "32", "--no-progress", "--no-tensorboard", "--evict-cache"])
    assert code == 0
    assert read_manifest(logdir).status.tolist() == ["ok", "ok", "duplicate"]
    left = {ref for repo in scan_cache_dir(cache).repos for rev in repo.revisions for ref in rev.refs}
    assert left == {"step1", "step8", "step16", "step32"}
    assert scan_cache_dir(cache).size_on_disk < before
    again = replay("tiny-org/pythia-tiny", "step8", tmp_path / "other", probe=str(probe_file), cache_dir=cache,
                   tensorboard=False, **PROBE, **QUIET)  # what was not replayed still loads
    assert again.manifest.status.tolist() == ["ok"]


def test_an_encoder_checkpoint_is_loaded_once_as_the_bare_encoder(tmp_path, monkeypatch):
    """BERT has a causal-LM class too: it used to be built (on the device, now that weights are placed while
    loading) and thrown away before the bare encoder was loaded."""
    from transformers import AutoModelForCausalLM, BertModel

    from negmonitor.models import load_model
    from tiny_models import tiny_bert, tiny_bert_tokenizer

    folder = tmp_path / "bert"
    tiny_bert(head="base").save_pretrained(folder)
    tiny_bert_tokenizer().save_pretrained(folder)
    causal = []
    real = AutoModelForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *a, **k: causal.append(a) or real(cls, *a, **k)))
    model, _ = load_model(folder)
    assert isinstance(model, BertModel) and causal == []


def _settings_error_from(nth: int, calls: list):
    """``engine.take_measurement`` raising negmonitor's own error from its ``nth`` call on (1: the cohort pass)."""
    from negmonitor.monitoring import engine

    real = engine.take_measurement

    def measuring(*args, **kwargs):
        calls.append(args[2])
        if len(calls) >= nth:
            raise NegmonitorError("out of memory during the probe pass even at batch size 1 (simulated)")
        return real(*args, **kwargs)
    return measuring


def test_a_resumed_replay_gets_past_a_revision_that_keeps_failing(step_series, probe_file, tmp_path, monkeypatch):
    """step0 was recorded ok by an earlier run: the settings are proven, so step10 failing every time is recorded
    and the resumed replay goes on to step20 and step40 (it used to stop at step10 on every resume)."""
    from negmonitor.monitoring import engine

    logdir = tmp_path / "log"
    replay(step_series, "all", logdir, probe=str(probe_file), tensorboard=False, shard="1/4", **PROBE, **QUIET)
    real, calls = engine.take_measurement, []

    def step10_fails(*args, **kwargs):
        calls.append(args[2])
        if args[2] == 10:
            raise NegmonitorError("out of memory during the probe pass even at batch size 1 (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "take_measurement", step10_fails)
    with pytest.warns(UserWarning, match="measurement of step10 failed"):
        result = replay(step_series, "all", logdir, probe=str(probe_file), tensorboard=False, **PROBE, **QUIET)
    assert result.skipped == ["step0"] and result.processed == ["step10", "step20", "step40"]
    assert result.manifest.status.tolist() == ["ok", "failed", "ok", "ok"]


def test_a_missing_first_revision_does_not_hide_a_settings_error(hub_cache, probe_file, tmp_path, monkeypatch):
    """step0's weights are gone (missing); step1 is the first revision measured, and negmonitor's own error there
    ends the replay at once, rather than being recorded for every later revision after a full load each."""
    from negmonitor.monitoring import engine

    cache = tmp_path / "hub"
    shutil.copytree(hub_cache, cache, symlinks=True)
    (cache / "models--tiny-org--pythia-tiny" / "snapshots" / f"{1:040x}" / "model.safetensors").unlink()
    calls: list = []
    monkeypatch.setattr(engine, "take_measurement", _settings_error_from(2, calls))  # after the cohort pass
    with pytest.raises(NegmonitorError, match="even at batch size 1"):
        replay("tiny-org/pythia-tiny", "step0,step1,step2,step8", tmp_path / "log", probe=str(probe_file),
               cache_dir=cache, tensorboard=False, **PROBE, **QUIET)
    assert calls == [8, 1]  # the cohort pass (step8), then step1: nothing after it
    assert read_manifest(tmp_path / "log").set_index("revision").status.to_dict() == {"step0": "missing"}


def test_evict_cache_keeps_another_shards_revision_loaded_as_a_predecessor(hub_cache, probe_file, tmp_path):
    """Shard 2/2 loads step1 (shard 1's) as its first revision's predecessor: it stays in the cache until the shard
    that owns it has recorded it."""
    from huggingface_hub import scan_cache_dir

    cache = tmp_path / "hub"
    shutil.copytree(hub_cache, cache, symlinks=True)
    result = replay("tiny-org/pythia-tiny", "step0,step1,step2,step8", tmp_path / "log", probe=str(probe_file),
                    cache_dir=cache, shard="2/2", evict_cache=True, tensorboard=False, **PROBE, **QUIET)
    assert result.processed == ["step2", "step8"]
    left = {ref for repo in scan_cache_dir(cache).repos for rev in repo.revisions for ref in rev.refs}
    assert {"step0", "step1"} <= left and not {"step2", "step8"} & left


def test_a_load_failure_no_revision_escapes_stops_the_cohort_pass_after_one_load(step_series, probe_file, tmp_path,
                                                                                 monkeypatch):
    """Out of memory loading the reference (12B on a small card) used to walk back through every revision (a full
    download each, for Pythia-12B ~3.7 TB) before a message blaming the network; a series whose tokenizer does not
    load did the same. Now one load, and one line saying what to fix."""
    from negmonitor.replay import runner

    real, loads = runner._Replay._load, []

    def out_of_memory(self, revision):
        loads.append(revision)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 24.00 GiB (simulated)")

    monkeypatch.setattr(runner._Replay, "_load", out_of_memory)
    with pytest.raises(NegmonitorError, match=r"cohort reference step40 could not be loaded \(OutOfMemoryError"):
        replay(step_series, "all", tmp_path / "oom", probe=str(probe_file), tensorboard=False, **PROBE, **QUIET)
    assert loads == ["step40"]

    monkeypatch.setattr(runner._Replay, "_load", lambda self, revision: loads.append(revision) or real(self, revision))
    loads.clear()
    bare = tmp_path / "no-tokenizer"
    for step in (0, 10, 20):
        shutil.copytree(step_series / f"step-{step}", bare / f"step-{step}")
    with pytest.raises(NegmonitorError, match="cohort reference step20 could not be loaded .*no tokenizer found"):
        replay(bare, "all", tmp_path / "log", probe=str(probe_file), tensorboard=False, **PROBE, **QUIET)
    assert loads == ["step20"]
    with pytest.raises(NegmonitorError, match="could not load tokenizer"):  # a given one: before any checkpoint
        replay(bare, "all", tmp_path / "log2", probe=str(probe_file), tokenizer=str(tmp_path / "nowhere"),
               tensorboard=False, **PROBE, **QUIET)
    assert loads == ["step20"]


def test_broken_checkpoints_in_a_row_stop_the_replay_instead_of_loading_every_later_one(step_series, probe_file,
                                                                                       tmp_path, monkeypatch):
    """Each broken checkpoint is recorded and the replay goes on; three in a row (a full disk, a hub outage that is
    no 'missing' answer) stop it with one line, before the rest of a 154-revision series is loaded to fail alike;
    the same command resumes. Out of memory at load stops it at once."""
    from negmonitor.replay import runner

    real, loads = runner._Replay._load, []
    series = tmp_path / "series"
    shutil.copytree(step_series, series)
    for step in (50, 60, 70):
        shutil.copytree(step_series / "step-40", series / f"step-{step}")

    def broken_after_step0(self, revision):
        loads.append(revision)
        if revision not in ("step0", "step70"):  # step70: the cohort reference
            raise OSError(f"read error in {revision} (simulated)")
        return real(self, revision)

    monkeypatch.setattr(runner._Replay, "_load", broken_after_step0)
    with pytest.raises(NegmonitorError, match=r"step40 could not be loaded .*3 in a row, so the replay stops"):
        replay(series, "all", tmp_path / "log", probe=str(probe_file), tensorboard=False, **PROBE, **QUIET)
    assert loads == ["step70", "step0", "step10", "step20", "step40"]
    manifest = read_manifest(tmp_path / "log").set_index("revision").status.to_dict()
    assert manifest == {"step0": "ok", "step10": "failed", "step20": "failed", "step40": "failed"}

    def out_of_memory_at(self, revision):
        if revision == "step10":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, revision)

    monkeypatch.setattr(runner._Replay, "_load", out_of_memory_at)
    with pytest.raises(NegmonitorError, match="step10 could not be loaded .*OutOfMemoryError.*so the replay stops"):
        replay(series, "all", tmp_path / "log", probe=str(probe_file), tensorboard=False, **PROBE, **QUIET)
    monkeypatch.setattr(runner._Replay, "_load", real)
    result = replay(series, "all", tmp_path / "log", probe=str(probe_file), tensorboard=False, **PROBE, **QUIET)
    assert result.skipped == ["step0"] and set(result.manifest.status) == {"ok", "duplicate"}  # step50+ = step40


def test_a_folder_reused_for_a_longer_list_re_measures_what_a_new_revision_splits(step_series, probe_file, tmp_path):
    """A pilot replay (``step0,step20``) and then the whole list into the same folder give what one replay of the
    whole list gives: step20's drift was recorded from step0 and is now taken from step10 (it used to be kept, its
    interval silently twice as long). A coarser list keeps the finer drift. A cohort fixed at the pilot's last
    revision stays (the records keep one cohort) with a warning that the list goes further."""
    settings = dict(probe=str(probe_file), tensorboard=False, run_name="tiny", **PROBE, **QUIET)
    pilot = tmp_path / "pilot"
    replay(step_series, "step0,step20", pilot, cohort_revision="step40", **settings)
    result = replay(step_series, "all", pilot, cohort_revision="step40", **settings)
    assert result.skipped == ["step0"] and result.processed == ["step10", "step20", "step40"]
    assert read_manifest(pilot).set_index("revision").previous["step20"] == "step10"
    since = result.read_scalars().query("metric == 'drift/since_step'").set_index("step").value.to_dict()
    assert since == {10: 0.0, 20: 10.0, 40: 20.0}  # each drift says the step it is measured from
    single = replay(step_series, "all", tmp_path / "single", cohort_revision="step40", **settings)
    _assert_same_records(pilot, single.logdir)
    coarse = replay(step_series, "step0,step40", pilot, cohort_revision="step40", **settings)
    assert coarse.skipped == ["step0", "step40"]

    replay(step_series, "step0,step20", tmp_path / "other", **settings)
    with pytest.warns(UserWarning, match="cohort was fixed at step20 by an earlier replay, but this list goes on to "
                                         "step40"):
        replay(step_series, "all", tmp_path / "other", **settings)
    replay(step_series, "step0,step20", tmp_path / "chosen", cohort_revision="step20", **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a reference the user chose is no surprise on a resume without the flag
        replay(step_series, "all", tmp_path / "chosen", **settings)


def test_a_lightning_checkpoint_loads_as_saved_without_a_random_fp32_model_first(tmp_path):
    """A bf16 checkpoint of an 8B model used to be built as a random fp32 model on the host (32 GB, minutes of
    initialisation), loaded into it and left in fp32 unless a dtype was given. Now the saved tensors are the
    model's weights, in their saved dtype (or the one asked for), tied embeddings still tied, and the model
    computes what the saved one does."""
    import lightning

    from negmonitor.checkpoints import load_lightning_model
    from negmonitor.train.module import CausalLMModule

    module = CausalLMModule(family="gpt2", hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                            max_position_embeddings=64, vocab_size=128).to(torch.bfloat16)
    path = tmp_path / "bf16.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 5,
                "pytorch-lightning_version": lightning.__version__}, path)
    model = load_lightning_model(path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids).logits, module.model.eval()(ids).logits)
    as_fp32 = load_lightning_model(path, dtype=torch.float32)
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}
    assert not any(p.is_meta for p in as_fp32.parameters()) and not any(b.is_meta for b in as_fp32.buffers())


def test_hub_downloads_keep_their_progress_bars_while_transformers_is_quiet():
    """A 24 GB revision downloads for minutes: its bar stays while transformers' own per-load bars are off."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging

    from negmonitor.models import quiet_transformers

    with quiet_transformers():
        assert not logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    assert logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    disable_progress_bars()  # a user who turned them off keeps them off
    try:
        with quiet_transformers():
            assert are_progress_bars_disabled()
        assert are_progress_bars_disabled()
    finally:
        enable_progress_bars()


def test_a_shard_after_a_broken_revision_is_not_measured_again_on_every_resume(step_series, probe_file, tmp_path,
                                                                              monkeypatch):
    """step10 never loads (recorded failed by shard 1/2). Shard 2/2's first revision, step20, takes its drift from
    step0, the revision its resume expects, instead of leaving it out: a resume skips it (it was measured again on
    every resume: one load and probe of a 12B checkpoint each time, its drift never recorded)."""
    from negmonitor.replay import runner

    real = runner._Replay._load

    def step10_broken(self, revision):
        if revision == "step10":
            raise OSError("read error (simulated)")
        return real(self, revision)

    monkeypatch.setattr(runner._Replay, "_load", step10_broken)
    logdir = tmp_path / "log"
    replay(step_series, "all", logdir, probe=str(probe_file), shard="1/2", tensorboard=False, **PROBE, **QUIET)
    first = replay(step_series, "all", logdir, probe=str(probe_file), shard="2/2", tensorboard=False, **PROBE,
                   **QUIET)
    assert first.processed == ["step20", "step40"]
    assert read_manifest(logdir).set_index("revision").previous["step20"] == "step0"
    again = replay(step_series, "all", logdir, probe=str(probe_file), shard="2/2", tensorboard=False, **PROBE,
                   **QUIET)
    assert again.processed == [] and again.skipped == ["step20", "step40"]
