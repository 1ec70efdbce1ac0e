"""Replay pieces without models: revision presets, shards, manifest files, hashing, and early CLI errors."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from conftest import SHARED_DATA
from negmonitor.errors import NegmonitorError
from negmonitor.replay.manifest import Manifest, ManifestEntry, format_manifest, weights_sha256
from negmonitor.replay.revisions import (PYTHIA_TOKENS_PER_STEP, log_spaced, parse_shard, pythia_schedule,
                                         resolve_revisions, shard_indices, step_of, variant_of)
from negmonitor.replay.sources import describe_revisions, is_missing_error, open_series


def test_pythia_schedule_is_the_published_one():
    schedule = pythia_schedule()
    assert schedule[:11] == ["step0", "step1", "step2", "step4", "step8", "step16", "step32", "step64", "step128",
                             "step256", "step512"]
    assert schedule[11] == "step1000" and schedule[-1] == "step143000"
    assert len(schedule) == 11 + 143
    assert PYTHIA_TOKENS_PER_STEP == 2_097_152


def test_presets_and_explicit_lists():
    schedule = pythia_schedule()
    assert resolve_revisions("all", schedule) == schedule
    picked = resolve_revisions("log:16", schedule)
    assert len(picked) == 16 and picked[0] == "step0" and picked[-1] == "step143000"
    assert [step_of(r) for r in picked] == sorted(step_of(r) for r in picked)
    assert resolve_revisions("143000, step0,1000", schedule) == ["step0", "step1000", "step143000"]
    assert resolve_revisions([8, "step1", "step1"], schedule) == ["step1", "step8"]
    assert log_spaced(["step0", "step1"], 5) == ["step0", "step1"]


@pytest.mark.parametrize("spec", ["every:3", "log:0", "log:x", "main", "", "step1,latest"])
def test_bad_revision_specs_are_one_line_errors(spec):
    with pytest.raises(NegmonitorError) as info:
        resolve_revisions(spec, pythia_schedule())
    assert "\n" not in str(info.value)


def test_shards_split_the_list_into_disjoint_contiguous_blocks():
    for n_revisions in (1, 5, 7, 154):
        for n in (1, 2, 3, 4):
            blocks = [shard_indices(n_revisions, (k, n)) for k in range(1, n + 1)]
            assert sum(blocks, []) == list(range(n_revisions))
    assert parse_shard("2/3") == (2, 3) and parse_shard(None) == (1, 1) and parse_shard((1, 2)) == (1, 2)
    for bad in ("3/2", "0/2", "1-2", "a/b", "1/0"):
        with pytest.raises(NegmonitorError, match="shard"):
            parse_shard(bad)


def test_variant_and_step_names():
    assert variant_of("EleutherAI/pythia-160m-deduped") == "deduped"
    assert variant_of("EleutherAI/pythia-160m") == "standard"
    with pytest.raises(NegmonitorError, match="step<N>"):
        step_of("main")


def test_manifest_entries_merge_and_flag_identical_weights(tmp_path):
    manifest = Manifest(tmp_path)
    manifest.write(ManifestEntry("step0", 0, 0, "standard", "ok", weights_sha256="a"))
    manifest.write(ManifestEntry("step1", 1, 10, "standard", "duplicate", weights_sha256="a",
                                 identical_to_previous=True, previous="step0"))
    manifest.write(ManifestEntry("step2", 2, 20, "standard", "missing", error="not uploaded"))
    manifest.write(ManifestEntry("step4", 4, 40, "standard", "ok", weights_sha256="a", previous="step1"))
    frame = manifest.read(["step0", "step1", "step2", "step4", "step8"])
    assert frame.status.tolist() == ["ok", "duplicate", "missing", "ok", "pending"]
    assert frame.identical_to.tolist()[:4] == [None, "step0", None, "step0"]
    assert manifest.is_done("step1") and not manifest.is_done("step2") and not manifest.is_done("step8")
    assert "step4" in format_manifest(frame)
    path = manifest.save_summary(frame)
    assert len(pd.read_json(path)) == 5
    with pytest.raises(ValueError):
        ManifestEntry("step0", 0, 0, "standard", "weird")


def test_weights_hash_sees_every_byte_and_dtype():
    model = torch.nn.Linear(3, 2)
    first = weights_sha256(model)
    assert weights_sha256(model) == first
    with torch.no_grad():
        model.weight[0, 0] += 1e-7
    assert weights_sha256(model) != first
    assert weights_sha256(model.to(torch.bfloat16)) != weights_sha256(model.float())


def test_missing_errors_and_revision_lists():
    assert is_missing_error(OSError("org/x does not appear to have a file named model.safetensors"))
    assert not is_missing_error(RuntimeError("size mismatch for weight"))
    text = describe_revisions({f"step{i}" for i in range(0, 100, 5)} | {"main"}, limit=4)
    assert text.startswith("step0, step5, …") and "(21 in all)" in text


def test_open_series_rejects_paths_that_are_not_series(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NegmonitorError, match="step-named"):
        open_series(tmp_path / "empty")
    with pytest.raises(NegmonitorError, match="neither"):
        open_series(str(tmp_path / "nope"))


@pytest.mark.parametrize("extra, message", [
    (["--revisions", "every:3"], "unknown revisions"),
    (["--revisions", "all", "--shard", "3/2"], "shard"),
    (["--revisions", "all", "--shard", "one"], "K/N"),
    (["--revisions", "all", "--blimp", "x"], "only matter with --ablate"),
    (["--revisions", "all", "--random-draws", "3"], "only matter with --ablate"),
    (["--revisions", "all", "--ablate", "--blimp", "x", "--random-draws", "0"], "--random-draws must be a positive"),
    (["--revisions", "all", "--ablate", "2"], "--ablate must be in (0, 1]"),
])
def test_cli_bad_arguments_fail_in_one_line(tmp_path, capsys, extra, message):
    from negmonitor.cli import main

    (tmp_path / "series" / "step-0").mkdir(parents=True)
    (tmp_path / "series" / "step-0" / "config.json").write_text("{}")
    code = main(["replay", "--model", str(tmp_path / "series"), "--logdir", str(tmp_path / "log"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_replay_ablation_takes_blimp_and_tse_together():
    """--blimp and --tse together give one BLiMP-shaped and one TSE-shaped set, scored in one protocol run."""
    from pathlib import Path

    from negmonitor.cli import build_parser
    from negmonitor.commands.replay import _ablation
    from negmonitor.monitoring.ablation_rows import pair_slots

    data = SHARED_DATA
    if not (data / "blimp").is_dir() or not (data / "tse").is_dir():
        pytest.skip(f"BLiMP/TSE not found at {data}")
    args = build_parser().parse_args(["replay", "--model", "m", "--logdir", "l", "--revisions", "all", "--ablate",
                                      "--blimp", str(data / "blimp"), "--tse", str(data / "tse"),
                                      "--pairs-per-suite", "2", "--ppl-text", str(data / "wikitext-2" / "valid.txt")])
    settings, pairs, ppl_text = _ablation(args)
    slots = pair_slots(pairs)
    assert set(slots) == {"blimp", "tse"} and settings.fraction == 0.01 and ppl_text
    assert slots["blimp"][0] == "blimp" and len(slots["blimp"][1]) == 2 * 67
    with pytest.raises(NegmonitorError, match="two BLIMP-shaped"):
        pair_slots([slots["blimp"][1], slots["blimp"][1]])


def test_cli_checks_the_log_folder_before_loading_anything(tmp_path, capsys):
    from negmonitor.cli import main

    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code = main(["replay", "--model", "EleutherAI/pythia-14m", "--revisions", "all",
                 "--logdir", str(blocker / "log")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot be written" in err and len(err.splitlines()) == 1
