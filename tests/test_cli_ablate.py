"""End to end: ``negmonitor ablate`` on a saved tiny model with the shared WikiText-2, BLiMP and TSE data."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import SHARED_DATA
from negmonitor.cli import main
from negmonitor.commands.ablate import parse_evals
from negmonitor.errors import NegmonitorError
from tiny_models import tiny_causal_lm, tiny_tokenizer

DATA = SHARED_DATA
needs_data = pytest.mark.skipif(not (DATA / "blimp").is_dir() or not (DATA / "tse").is_dir()
                                or not (DATA / "wikitext-2" / "valid.txt").is_file(),
                                reason=f"shared reference data not found at {DATA}")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_neox")
    tiny_causal_lm("neox").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["ablate", "--model", str(model), "--fraction", "0.05", "--out", str(out), *extra]


@needs_data
def test_ablate_end_to_end(saved_model, tmp_path, capsys):
    out = tmp_path / "out"
    probe_text = tmp_path / "probe.txt"
    probe_text.write_text((DATA / "wikitext-2" / "test.txt").read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    code = main(_args(saved_model, out, "--eval", "ppl,blimp,tse", "--text", str(DATA / "wikitext-2" / "valid.txt"),
                      "--ppl-tokens", "2048", "--blimp", str(DATA / "blimp"), "--tse", str(DATA / "tse"),
                      "--blimp-uids", "anaphor_gender_agreement,passive_1,npi_present_1",
                      "--tse-constructions", "simple_agrmt,simple_reflexives,npi_across_anim", "--sample", "4",
                      "--probe-text", str(probe_text), "--tokens", "2048", "--window", "128", "--batch-size", "16",
                      "--max-matching-evals", "3", "--ppl-tolerance", "0.05", "--fractions", "0.1"))
    printed = capsys.readouterr().out
    assert code == 0
    for condition in ("baseline", "wasserstein", "random", "ppl_matched"):
        assert condition in printed
    assert "perplexity-matched control: bottom" in printed
    expected = ["ablation.csv", "ablation.md", "ablation_breakdown.csv", "ablation_selections.parquet",
                "ablation_meta.json", "fraction_sweep.csv", "fraction_sweep.md"]
    for name in expected:
        assert (out / name).is_file(), name
        assert f"wrote {out / name}" in printed
    assert (out / "probe" / "neurons.parquet").is_file() and "reuse them with --probe-result" in printed
    table = pd.read_csv(out / "ablation.csv")
    assert list(table["condition"]) == ["baseline", "wasserstein", "random", "ppl_matched"]
    assert {"ppl", "blimp_acc", "tse_acc", "n_neurons", "fraction"} <= set(table.columns)
    assert table[["ppl", "blimp_acc", "tse_acc"]].notna().all().all()
    selections = pd.read_parquet(out / "ablation_selections.parquet")
    assert set(selections["condition"]) == {"wasserstein", "random", "ppl_matched"}
    breakdown = pd.read_csv(out / "ablation_breakdown.csv")
    assert set(breakdown.query("level == 'uid'")["group"]) == {"anaphor_gender_agreement", "passive_1", "npi_present_1"}
    assert (breakdown.query("suite == 'tse' and level == 'construction'")["n"] == 4).all()
    sweep = pd.read_csv(out / "fraction_sweep.csv")
    assert list(sweep["how"].fillna("")) == ["", "top", "random", "bottom"] and "blimp_acc" not in sweep.columns

    again = tmp_path / "again"
    code = main(_args(saved_model, again, "--eval", "ppl", "--text", str(DATA / "wikitext-2" / "valid.txt"),
                      "--ppl-tokens", "512", "--probe-result", str(out / "probe"), "--layer-groups", "1",
                      "--max-matching-evals", "2", "--ppl-tolerance", "0.5", "--random-draws", "2"))
    printed = capsys.readouterr().out
    assert code == 0 and "probing on" not in printed
    assert list(pd.read_csv(again / "ablation.csv")["condition"]) == ["baseline", "wasserstein", "random",
                                                                      "random_draw1", "ppl_matched"]
    groups = pd.read_csv(again / "layer_groups.csv")
    assert list(groups["condition"]) == ["baseline", "top:alone:0", "top:alone:1", "top:cumulative:0-1"]
    assert list(pd.read_csv(again / "layer_groups.csv", dtype=str)["layer_group"].fillna("")) == ["", "0", "1", "1"]  # cumulative up to group 1
    again_selection = pd.read_parquet(again / "ablation_selections.parquet").query("condition == 'wasserstein'")
    assert again_selection[["layer", "neuron"]].values.tolist() == selections.query(
        "condition == 'wasserstein'")[["layer", "neuron"]].values.tolist()


@pytest.mark.parametrize("extra, message", [
    (["--mode", "zero_negatve"], "unknown ablation mode 'zero_negatve' — use one of zero_negative"),
    (["--fraction", "1.5"], r"--fraction must be in (0, 1], got 1.5"),
    (["--fraction", "0"], r"--fraction must be in (0, 1], got 0.0"),
    (["--eval", "ppl,glue"], "unknown evaluation 'glue' in --eval"),
    (["--eval", "tse"], "--eval tse needs the TSE data"),
    (["--sample", "0"], "--sample must be a positive integer, got 0"),
    (["--metric", "wdd"], "unknown --metric 'wdd'"),
    (["--random-draws", "0"], "--random-draws must be a positive integer, got 0"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    code = main(_args(tmp_path / "no-model-needed", out, *extra))
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_parse_evals():
    request = parse_evals("ppl, blimp,lm-eval:arc_easy+piqa,ppl")
    assert request.names == ["ppl", "blimp", "lm_eval"] and request.lm_eval_tasks == ["arc_easy", "piqa"]
    with pytest.raises(NegmonitorError, match="names no task"):
        parse_evals("lm-eval:")
    with pytest.raises(NegmonitorError, match="unknown evaluation 'ppl:x'"):
        parse_evals("ppl:x")


def test_a_budget_too_small_for_one_perplexity_window_is_refused_before_the_probe(saved_model, tmp_path, capsys):
    """One line naming the smallest budget, before any neuron is measured, and nothing written."""
    out = tmp_path / "out"
    text = tmp_path / "text.txt"
    text.write_text("The author that the guard likes laughs. " * 200, encoding="utf-8")
    code = main(_args(saved_model, out, "--eval", "ppl", "--text", str(text), "--probe-text", str(text),
                      "--window", "64", "--ppl-window", "64", "--memory-budget", "64KiB"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "64-token perplexity window" in err and "smallest budget that works" in err
    assert not (out / "probe").exists() and not list(out.glob("ablation*"))
    # A window the model cannot take is named first (the budget would be the wrong thing to change).
    code = main(_args(saved_model, out, "--eval", "ppl", "--text", str(text), "--probe-text", str(text),
                      "--window", "64", "--ppl-window", "100000", "--memory-budget", "64KiB"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "exceeds the model's" in err


def test_an_unknown_lm_eval_task_fails_before_the_model_loads(tmp_path, capsys):
    """A typo in --eval lm-eval:TASK used to surface after loading, probing and the baseline evaluations (an hour
    on an 8B model); now it is the first thing said, even with a model path that does not exist."""
    pytest.importorskip("lm_eval")
    from negmonitor.cli import main

    code = main(["ablate", "--model", str(tmp_path / "no-such-model"), "--eval", "ppl,lm-eval:arc_easyy",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and "unknown lm-eval task 'arc_easyy'" in err and "no-such-model" not in err


@needs_data
def test_each_table_is_saved_when_done_and_an_earlier_runs_tables_are_named(saved_model, tmp_path, capsys,
                                                                             monkeypatch):
    """A sweep that fails (out of memory in the 15th layer group of an 8B model) used to lose the main table computed
    hours earlier: nothing was written until every sweep finished. A later run into the same folder says which of
    the earlier run's tables it leaves (the report reads them as this run's), and drops the matching trace of a
    run without perplexity. Wrong evaluation data fails before the model loads."""
    import negmonitor.ablation as ablation_module

    def failing_sweep(*args, **kwargs):
        raise NegmonitorError("out of memory in the fraction sweep even at batch size 1 (simulated)")

    monkeypatch.setattr(ablation_module, "fraction_sweep", failing_sweep)
    out = tmp_path / "out"
    text = str(DATA / "wikitext-2" / "valid.txt")
    code = main(_args(saved_model, out, "--eval", "ppl", "--text", text, "--ppl-tokens", "512", "--probe-text", text,
                      "--tokens", "512", "--window", "64", "--max-matching-evals", "2", "--layer-groups", "1",
                      "--fractions", "0.1"))
    captured = capsys.readouterr()
    assert code == 2 and "out of memory in the fraction sweep" in captured.err
    for name in ("ablation.csv", "ablation_meta.json", "layer_groups.csv"):
        assert (out / name).is_file() and f"wrote {out / name}" in captured.out
    assert not (out / "fraction_sweep.csv").exists()
    (out / "ablation_matching.csv").write_text("eval,fraction\n1,1.0\n")  # a trace of an earlier search

    code = main(_args(saved_model, out, "--eval", "blimp", "--blimp", str(DATA / "blimp"), "--blimp-uids",
                      "passive_1", "--sample", "2", "--probe-result", str(out / "probe")))
    captured = capsys.readouterr()
    assert code == 0
    assert f"{out} holds layer_groups.csv from an earlier run" in captured.err
    assert "scoring" in captured.err  # a bar inside each condition's BLiMP scoring (169k TSE pairs take hours)
    assert not (out / "ablation_matching.csv").exists()
    assert json.loads((out / "ablation_meta.json").read_text())["probe_result"] == str(out / "probe")

    code = main(_args(tmp_path / "no-such-model", tmp_path / "third", "--eval", "blimp", "--blimp",
                      str(tmp_path / "no-blimp-here")))
    err = capsys.readouterr().err
    assert code == 2 and "blimp" in err.lower() and "no-such-model" not in err


def test_a_budget_too_small_for_one_window_is_refused_from_the_config_before_the_weights_load(saved_model, tmp_path,
                                                                                           capsys, monkeypatch):
    """The model's architecture is built empty from its config (meta device) for the check: a 32 GB fp32 load
    (--protocol paper on an 8B model) is not made only to be refused."""
    import negmonitor.models as models

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded before the budget check")

    monkeypatch.setattr(models, "load_model", no_loading)
    text = tmp_path / "text.txt"
    text.write_text("The author that the guard likes laughs. " * 200, encoding="utf-8")
    code = main(_args(saved_model, tmp_path / "out", "--eval", "ppl", "--text", str(text), "--ppl-window", "64",
                      "--memory-budget", "64KiB", "--protocol", "paper"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "64-token perplexity window" in err and "smallest budget that works" in err
