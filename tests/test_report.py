"""``negmonitor report`` end to end: records from a real tiny Lightning run and a tiny replay, plus an ``ablate --out``
folder, every figure drawn, each PNG decoded and checked, and the index listing them all.
"""

from __future__ import annotations

import html
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch import seed_everything

from conftest import SHARED_DATA
from lightning_helpers import TEXT, TinyLM, token_loader, trainer
from negmonitor.callbacks import NegativeDifferentiationMonitor
from negmonitor.cli import main
from negmonitor.errors import NegmonitorError
from tiny_models import tiny_causal_lm, tiny_tokenizer

pytest.importorskip("matplotlib")
ANALYSIS = Path(__file__).resolve().parents[1] / "analysis"
GOOD_BAD = [("the cat sees the dogs .", "the cat see the dogs ."), ("the dog runs .", "the dog run ."),
            ("the dogs run .", "the dogs runs ."), ("a pilot hurt himself .", "a pilot hurt themselves ."),
            ("the senators hurt themselves .", "the senators hurt himself ."),
            ("the cats see the dog .", "the cats sees the dog ."), ("the authors laugh .", "the authors laughs ."),
            ("the guard likes the cat .", "the guard like the cat .")]
PAIRS = pd.DataFrame({"suite": "grammar", "construction": ["agreement"] * 3 + ["reflexive"] * 2 + ["agreement"] * 3,
                      "condition": ["sg", "sg", "pl", "sg", "pl", "pl", "pl", "sg"],
                      "sentence_good": [g for g, _ in GOOD_BAD], "sentence_bad": [b for _, b in GOOD_BAD]})
HAS_TSE = (SHARED_DATA / "tse").is_dir()


@pytest.fixture(scope="module")
def probe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("probe") / "probe.txt"
    path.write_text(TEXT.replace(" . ", " .\n"), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def live_run(tmp_path_factory) -> tuple[Path, Path]:
    """A real Lightning run of TinyLM with the monitor (every family, ablation with minimal pairs); its model saved."""
    root = tmp_path_factory.mktemp("live")
    seed_everything(0)
    module = TinyLM()
    monitor = NegativeDifferentiationMonitor(
        probe=[TEXT], probe_tokens=1_024, probe_window=64, n_pairs=100, every_n_steps=3, minimal_pairs=PAIRS,
        ppl_text=[TEXT[:2_000]], ablation={"fraction": 0.05, "max_matching_evals": 2}, media_every_n_steps=1_000)
    trainer(root, 9, [monitor]).fit(module, token_loader(module.tokenizer))
    model_dir = root / "model"
    module.model.save_pretrained(model_dir)
    module.tokenizer.save_pretrained(model_dir)
    return root / "run" / "version_0", model_dir


@pytest.fixture(scope="module")
def replay_run(tmp_path_factory, probe_file) -> Path:
    """A replay of three step folders whose weights take a seeded random walk."""
    from negmonitor.replay import replay

    series = tmp_path_factory.mktemp("series")
    model = tiny_causal_lm("neox", seed=0)
    for step in (0, 10, 20):
        gen = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=gen))
        model.save_pretrained(series / f"step-{step}")
    tiny_tokenizer().save_pretrained(series)
    logdir = tmp_path_factory.mktemp("runs") / "replayed"
    replay(series, "all", logdir, probe=str(probe_file), tokens_per_step=1_000, run_name="replayed",
           probe_tokens=512, probe_window=64, n_pairs=32, progress=False, tensorboard=False)
    return logdir


@pytest.fixture(scope="module")
def ablate_dir(tmp_path_factory, probe_file) -> Path:
    """``negmonitor ablate --out`` of a saved tiny model, with a layer-group and a fraction sweep."""
    folder = tmp_path_factory.mktemp("ablate_model")
    tiny_causal_lm("neox").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    out = tmp_path_factory.mktemp("ablate") / "tiny-ablate"
    evals = ["--eval", "ppl,tse", "--tse", str(SHARED_DATA / "tse"), "--tse-constructions",
             "simple_agrmt,simple_reflexives", "--sample", "4"] if HAS_TSE else ["--eval", "ppl"]
    code = main(["ablate", "--model", str(folder), "--fraction", "0.05", "--out", str(out), *evals,
                 "--text", str(probe_file), "--ppl-tokens", "256", "--probe-text", str(probe_file), "--tokens", "1024",
                 "--window", "64", "--layer-groups", "1", "--fractions", "0.05,0.3", "--max-matching-evals", "2"])
    assert code == 0
    return out


def _check_png(path: Path) -> None:
    """The PNG decodes, is a real picture (not tiny, not blank)."""
    from matplotlib import image

    pixels = image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] >= 150 and pixels.shape[1] >= 150, path.name
    rgb = pixels[..., :3].reshape(-1, 3)
    assert rgb.std() > 0.05, f"{path.name} is nearly blank"
    assert len(np.unique((rgb * 255).astype(np.uint8), axis=0)) > 20, f"{path.name} has almost no colours"
    assert (rgb.min(axis=1) < 0.9).mean() > 0.01, f"{path.name} draws almost nothing"


def test_report_draws_every_figure(live_run, replay_run, ablate_dir, probe_file, tmp_path, capsys):
    from negmonitor.report import figure_keys

    log_dir, model_dir = live_run
    out = tmp_path / "report"
    code = main(["report", str(log_dir), str(replay_run), str(ablate_dir), "--out", str(out),
                 "--model", str(model_dir), "--probe-text", str(probe_file), "--pos-texts", "16", "--top-neurons", "2",
                 "--hist-tokens", "1024"])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"report written to {out / 'index.html'} ({len(figure_keys())} figure(s), 0 skipped)" in printed
    assert "skipped " not in printed and "FAILED" not in printed
    assert len([line for line in printed.splitlines() if line.startswith("  drew")]) == len(figure_keys())

    page = (out / "index.html").read_text(encoding="utf-8")
    pngs = sorted(out.glob("*.png"))
    assert {p.stem for p in pngs} == set(figure_keys()) - {"tab_top_pairs"}
    for png in pngs:
        _check_png(png)
        assert f"data-file='{png.name}'" in page
    assert page.count("data:image/png;base64,") == len(pngs)
    for key in figure_keys():
        assert f"id='{key}'" in page and (out / f"{key}.csv").is_file(), key
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page, re.S)
    assert len(captions) == len(figure_keys())
    for caption in captions:
        assert "step" in caption and len(caption) > 120
    assert "None: every figure had its data" in page and not list(out.glob("*.tmp"))

    emergence = html.unescape(captions[figure_keys().index("fig2b_emergence")])
    assert "run/version_0 (steps 0–9 (4 measurements)" in emergence
    assert "replayed (steps 0–20 (3 measurements)" in emergence
    histograms = html.unescape(captions[figure_keys().index("fig1c_preactivations")])
    assert histograms.count("recomputed: pre-activations of the model at") == 3
    assert f"run/version_0 (step 9; recomputed: pre-activations of the model at {model_dir} " in histograms  # --model
    assert "replayed (step 20; recomputed: pre-activations of the model at " in histograms
    assert "step-20 (gpt_neox)" in histograms  # the replay's own checkpoint of the shown step, found in its series
    assert "stored values" not in histograms
    table = pd.read_csv(out / "tabA2_ablation.csv")
    assert set(table.source) == {"ablate", "records"}
    assert list(table[table.source == "ablate"].condition) == ["baseline", "wasserstein", "random", "ppl_matched"]
    assert {"grammar_acc", "ppl_ratio"} <= set(table.columns) and ("tse_acc" in table.columns) == HAS_TSE
    correlation = pd.read_csv(out / "fig2d_wd_vs_accuracy.csv")
    assert len(correlation) == 4 and correlation.cohort_wd.notna().all()
    pos = pd.read_csv(out / "fig3d_pos_surprisal.csv")
    assert set(pos.condition) == {"wasserstein", "ppl_matched", "random"} and {"NOUN", "DET"} <= set(pos.pos)
    pairs = pd.read_csv(out / "tab_top_pairs.csv")
    assert (pairs.groupby(["run", "layer", "neuron"]).size() > 1).all()  # every rank kept, not one row per neuron
    assert {"run/version_0", "replayed"} <= set(pairs.run)


def test_pos_surprisal_is_per_model_token_by_default(ablate_dir, probe_file, tmp_path):
    """Fig. 3d equals the paper's computation written here from its definition (the whole probe file as one stream
    in windows of 32 tokens, each model token labelled by the spaCy token it overlaps most), and per word with
    ``pos_unit="word"``."""
    from negmonitor.evaluation.pos_surprisal import load_spacy, pos_excess_surprisal, window_surprisals
    from negmonitor.interventions import ablate
    from negmonitor.models import load_model
    from negmonitor.report import ReportOptions, build_report, load_runs
    from negmonitor.selection import Selection

    options = ReportOptions(pos_window=32, pos_tokens=100_000)
    result = build_report([ablate_dir], tmp_path / "token", options, only=["3d"], echo=lambda line: None)
    assert [f.key for f in result.figures] == ["fig3d_pos_surprisal"], result.skipped
    caption = result.figures[0].caption
    assert "over model tokens, the paper's unit" in caption and "window(s) of 32 tokens" in caption
    drawn = pd.read_csv(tmp_path / "token" / "fig3d_pos_surprisal.csv")

    model, tokenizer = load_model(str(load_runs([ablate_dir])[0].meta["model"]))
    nlp = load_spacy()
    text = probe_file.read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows, base = window_surprisals(model, tokenizer, text, window=32)
    assert len(windows) == max(1, len(ids) // 32)
    assert f"per model token on the first {len(ids):,} tokens" in caption and f"{len(windows)} window(s)" in caption
    rows = pd.read_parquet(ablate_dir / "ablation_selections.parquet")
    wasserstein = rows[rows.condition == "wasserstein"].drop(columns=["condition"])
    with ablate(model, Selection.from_frame(wasserstein), "zero_negative"):
        _, ablated = window_surprisals(model, tokenizer, text, window=32)
    expected = pos_excess_surprisal(windows, base, ablated, nlp=nlp, unit="token")
    got = drawn[drawn.condition == "wasserstein"].set_index("pos").loc[expected.pos]
    assert got.n.tolist() == expected.n.tolist()
    np.testing.assert_allclose(got.excess, expected.excess, rtol=1e-6, atol=1e-9)
    assert expected.excess.abs().max() > 0  # the ablation changes something

    options = ReportOptions(pos_unit="word", pos_texts=8)
    result = build_report([ablate_dir], tmp_path / "word", options, only=["3d"], echo=lambda line: None)
    caption = result.figures[0].caption
    assert "over spaCy words (--pos-unit word)" in caption and "per word on 8 pieces" in caption
    words = pd.read_csv(tmp_path / "word" / "fig3d_pos_surprisal.csv")
    assert words[words.condition == "wasserstein"].n.sum() < got.n.sum()  # fewer words than model tokens

    options = ReportOptions(probe_text="grammar", pos_window=32, pos_tokens=300)  # as ablate --probe-text grammar
    result = build_report([ablate_dir], tmp_path / "grammar", options, only=["3d"], echo=lambda line: None)
    caption = result.figures[0].caption
    assert "first 300 tokens of the built-in grammar corpus's held-out text (seed 0)" in caption
    assert "9 window(s) of 32 tokens" in caption


def test_negative_share_per_layer_and_over_training(live_run, ablate_dir, probe_file, tmp_path):
    """Fig. 1b overlays a GELU (neox) and a ReLU (opt) probe folder and a live run: per layer its shares equal the
    probe's own per-layer ``wd_neg_share`` / ``wd_neg_share_top``; over training its rows are the run's whole-model
    ``wd/neg_share`` and ``wd/neg_share_top``; every share lies in [0, 1]."""
    from negmonitor.report import build_report, load_runs

    folder = tmp_path / "relu-model"
    tiny_causal_lm("opt").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    relu = tmp_path / "relu-probe"
    assert main(["probe", "--model", str(folder), "--text", str(probe_file), "--tokens", "1024", "--window", "64",
                 "--pairs", "256", "--out", str(relu)]) == 0
    log_dir, _ = live_run
    gelu = ablate_dir / "probe"
    result = build_report([gelu, relu, log_dir], tmp_path / "out", only=["1b"], echo=lambda line: None)
    assert [f.key for f in result.figures] == ["fig1b_negative_share"], result.skipped
    _check_png(tmp_path / "out" / "fig1b_negative_share.png")
    caption = result.figures[0].caption
    assert "sign of the pre-activation" in caption and "0.5 (dotted line)" in caption and "(opt)" in caption
    data = pd.read_csv(tmp_path / "out" / "fig1b_negative_share.csv")
    labels = [run.label for run in load_runs([gelu, relu, log_dir])]
    for label, folder in zip(labels[:2], (gelu, relu)):
        layers = pd.read_parquet(folder / "layers.parquet").set_index("layer")
        drawn = data[data.run == label].set_index("layer").loc[layers.index]
        np.testing.assert_allclose(drawn.share_all, layers.wd_neg_share, rtol=1e-6)  # the CSV keeps 7 significant digits
        np.testing.assert_allclose(drawn.share_top, layers.wd_neg_share_top, rtol=1e-6)
    assert data[["share_all", "share_top"]].stack().between(0, 1).all()
    over = data[(data.run == labels[2]) & (data.layer == -1)].set_index("step")
    scalars = load_runs([log_dir])[0].scalars
    logged = scalars[(scalars.metric == "wd/neg_share") & (scalars.layer == -1)].set_index("step").value
    assert len(over) == len(logged) >= 2
    np.testing.assert_allclose(over.share_all.loc[logged.index], logged, rtol=1e-6)
    assert over.share_top.notna().all()


def test_missing_data_is_skipped_with_a_reason(ablate_dir, tmp_path):
    from negmonitor.report import build_report

    lines: list[str] = []
    result = build_report([ablate_dir / "probe"], tmp_path / "out", echo=lines.append)
    drawn = {f.key for f in result.figures}
    skipped = {key: reason for key, _, reason in result.skipped}
    assert {"fig2a_wd_distribution", "figA1_jaccard", "fig1c_preactivations", "fig1b_negative_share"} <= drawn
    for key in ("fig2b_emergence", "fig2c_weight_drift", "fig2d_wd_vs_accuracy", "fig3a_ppl_vs_fraction",
                "tabA2_ablation", "fig5_layer_groups", "fig7b_pair_signs_over_training", "fig7c_damage_accuracy",
                "fig7e_damage_over_training", "tab_top_pairs"):
        assert key in skipped and len(skipped[key]) > 30, key
        assert not (tmp_path / "out" / f"{key}.png").exists()
    assert "ablate --fractions" in skipped["fig3a_ppl_vs_fraction"]
    assert drawn.isdisjoint(skipped) and len(drawn) + len(skipped) == 19
    assert len(lines) == 1 + 19 and sum(line.lstrip().startswith("skipped") for line in lines) == len(skipped)
    page = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    section = page[page.index("id='skipped'"):]
    for key, reason in skipped.items():
        assert f"<code>{key}</code>: {html.escape(reason, quote=True)}" in section


def test_sources_are_detected(live_run, replay_run, ablate_dir, tmp_path):
    from negmonitor.report import detect, load_runs

    log_dir, _ = live_run
    assert [(s.path, s.kind) for s in detect(log_dir)] == [(log_dir / "negmonitor", "records")]
    assert [s.kind for s in detect(log_dir / "negmonitor")] == ["records"]
    assert [(s.path, s.kind) for s in detect(log_dir.parents[1])] == [(log_dir / "negmonitor", "records")]
    assert [(s.path.name, s.kind) for s in detect(ablate_dir)] == [("tiny-ablate", "ablate"), ("probe", "probe")]
    runs = load_runs([log_dir, log_dir, replay_run, ablate_dir])
    assert len({r.label for r in runs}) == 4 and runs[2].label == "replayed"
    assert runs[3].kinds == ("ablate", "probe") and runs[3].table("layer_groups") is not None
    assert runs[2].meta["cohort"]["step"] == 20 and runs[2].meta["probe_source"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(NegmonitorError, match="holds no negmonitor records"):
        detect(tmp_path / "empty")
    with pytest.raises(NegmonitorError, match="is not a folder"):
        detect(tmp_path / "missing")


def test_analysis_scripts_cover_every_figure(live_run, replay_run, tmp_path, monkeypatch, capsys):
    from negmonitor.report import figure_keys

    scripts = {p.stem for p in ANALYSIS.glob("*.py")} - {"report"}
    assert scripts == set(figure_keys())
    out = tmp_path / "one"
    script = ["fig1c_preactivations.py", str(live_run[0]), "--out", str(out), "--hist-tokens", "512"]
    monkeypatch.setattr(sys, "argv", script)  # no model: the histograms the measurement kept in the records
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ANALYSIS / "fig1c_preactivations.py"), run_name="__main__")
    assert done.value.code == 0
    capsys.readouterr()
    page = html.unescape((out / "index.html").read_text(encoding="utf-8"))
    assert "run/version_0 (step 9; from the records: 64-bin histograms of each top-WD neuron's pre-activations" in page
    assert "post-activation = GELU (gpt_neox)" in page  # the family from the run's run-*.json
    drawn = pd.read_csv(out / "fig1c_preactivations.csv")
    assert drawn.groupby("neuron")["count"].sum().eq(200).all()  # 2 x 100 MD pair positions, not 20 pair values
    monkeypatch.setattr(sys, "argv", [*script, "--model", str(live_run[1])])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ANALYSIS / "fig1c_preactivations.py"), run_name="__main__")
    assert done.value.code == 0
    assert "report written to" in capsys.readouterr().out
    _check_png(out / "fig1c_preactivations.png")
    assert [p.name for p in out.glob("*.png")] == ["fig1c_preactivations.png"]
    page = html.unescape((out / "index.html").read_text(encoding="utf-8"))
    assert "run/version_0 (step 9; recomputed: pre-activations of the model at" in page
    assert main(["report", str(replay_run), "--out", str(out), "--only", "9z"]) == 2
    assert "unknown figure '9z'" in capsys.readouterr().err


def _synthetic_run() -> "RunData":
    from negmonitor.report.sources import RunData

    steps, wd, acc = [0, 10, 20, 30, 40], [0.1, 0.2, 0.25, 0.4, 0.5], [0.5, 0.55, 0.7, 0.65, 0.8]
    rows = [("syn", s, s * 100, -1, -1, "wd/cohort_mean", w) for s, w in zip(steps, wd)]
    rows += [("syn", s, s * 100, -1, -1, "ablation/acc/blimp/baseline", a) for s, a in zip(steps, acc)]
    rows += [("syn", s, s * 100, -1, -1, f"ablation/acc_drop/blimp/{c}", a * k)
             for s, a in zip(steps[1:], acc[1:]) for c, k in (("wasserstein", 0.2), ("random", 0.05))]
    rows += [("syn", s, s * 100, -1, -1, f"ablation/acc_drop/blimp/random_{c}", a * k)  # three random draws
             for s, a in zip(steps[1:], acc[1:]) for c, k in (("mean", 0.04), ("sd", 0.01))]
    rows += [("syn", s, s * 100, layer, -1, "drift/cohort", 1.0 + layer + s / 100)
             for s in steps[1:] for layer in (0, 1)]
    scalars = pd.DataFrame(rows, columns=["run", "step", "tokens_seen", "layer", "neuron", "metric", "value"])
    empty = pd.DataFrame(columns=["run", "step", "layer", "neuron"])
    return RunData("syn", Path("."), ("records",), scalars, empty, empty.copy())


def test_figures_join_the_right_numbers(tmp_path):
    from scipy import stats

    from negmonitor.report.base import ReportContext, whole_model
    from negmonitor.report.figures_training import damage_accuracy, wd_vs_accuracy

    run = _synthetic_run()
    ctx = ReportContext([run], tmp_path)
    correlation = wd_vs_accuracy(ctx).table.iloc[0]
    wd, acc = [0.1, 0.2, 0.25, 0.4, 0.5], [0.5, 0.55, 0.7, 0.65, 0.8]
    assert correlation.n_steps == 5 and correlation.suite == "blimp"
    assert correlation.pearson_r == pytest.approx(stats.pearsonr(wd, acc)[0])
    assert correlation.spearman_rho == pytest.approx(stats.spearmanr(wd, acc)[0])
    damage = damage_accuracy(ctx).data
    assert sorted(damage.condition.unique()) == ["random", "random_mean", "wasserstein"]  # the sd is an error bar
    spread = damage[damage.condition == "random_mean"].sort_values("step")
    assert spread.value.tolist() == pytest.approx([a * 0.04 for a in acc[1:]])
    assert spread.sd.tolist() == pytest.approx([a * 0.01 for a in acc[1:]])
    assert damage[damage.condition == "random"].sd.isna().all()
    wasserstein = damage[damage.condition == "wasserstein"].sort_values("step")
    assert wasserstein.step.tolist() == [10, 20, 30, 40] and wasserstein.cohort_wd.tolist() == wd[1:]
    assert wasserstein.value.tolist() == pytest.approx([a * 0.2 for a in acc[1:]])
    drift = whole_model(run, "drift/cohort")  # no whole-model row: the mean over the per-layer rows
    assert drift.value.tolist() == pytest.approx([1.5 + s / 100 for s in (10, 20, 30, 40)])
    _check_png(tmp_path / "fig2d_wd_vs_accuracy.png")


def test_cohort_figures_follow_the_papers_cohort_and_damage_is_drawn_over_steps(live_run, tmp_path):
    """2d/7c/7d: the top-5% WD neurons of the last step, followed back through the snapshots (not the live cohort);
    the damage-over-steps figure has the Wasserstein, random and perplexity-matched rows."""
    from negmonitor.monitoring.cohort import final_cohort_curve
    from negmonitor.report import build_report, load_runs

    log_dir, _ = live_run
    result = build_report([log_dir], tmp_path / "out", only=["2d", "7c", "fig7e"], echo=lambda line: None)
    assert {f.key for f in result.figures} == {"fig2d_wd_vs_accuracy", "fig7c_damage_accuracy",
                                              "fig7e_damage_over_training"}
    from negmonitor.records import RecordStore

    # the report reads one snapshot file at a time; the same curve from every snapshot in memory
    paper = final_cohort_curve(RecordStore.for_logdir(log_dir).read_neurons()).set_index("step").cohort
    assert len(paper) == 4
    drawn = pd.read_csv(tmp_path / "out" / "fig2d_wd_vs_accuracy.csv")
    assert np.allclose(drawn.cohort_wd, drawn.step.map(paper))
    live = load_runs([log_dir])[0].scalars.query("metric == 'wd/cohort_mean' and layer == -1")
    assert not np.allclose(drawn.cohort_wd, drawn.step.map(live.set_index("step").value))
    for item in result.figures[:2]:
        assert "paper's cohort: top 5% WD per layer at step 9, followed back" in item.caption
    damage = pd.read_csv(tmp_path / "out" / "fig7e_damage_over_training.csv")
    assert {"wasserstein", "random", "ppl_matched"} <= set(damage.condition)
    assert damage.step.min() == 0 and damage.step.max() == 9


def test_report_exits_non_zero_with_a_line_per_failed_figure(live_run, tmp_path, capsys, monkeypatch):
    from negmonitor.report import base

    spec = next(s for s in base.REGISTRY if s.key == "fig2c_weight_drift")

    def broken(ctx):
        raise RuntimeError("drawing went wrong\nsecond line")

    monkeypatch.setattr(spec, "draw", broken)
    code = main(["report", str(live_run[0]), "--out", str(tmp_path / "out"), "--only", "2b,2c"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err == ["negmonitor: error: fig2c_weight_drift (Fig. 2c) failed: RuntimeError: drawing went wrong"]
    assert (tmp_path / "out" / "fig2b_emergence.png").is_file()


def test_reloaded_models_one_at_a_time_in_the_dtype_asked_for(tmp_path, monkeypatch) -> None:
    """The report keeps one reloaded model at a time (several Pythia-12B checkpoints would each hold 24 GB), knows
    ``m`` and ``m/`` as one model, and loads it in ``--dtype``."""
    import gc
    import weakref

    from negmonitor.report.activations import load_cached
    from negmonitor.report.base import ReportContext, ReportOptions

    for name, seed in (("a", 0), ("b", 1)):
        tiny_causal_lm("neox", seed=seed).save_pretrained(tmp_path / name)
        tiny_tokenizer().save_pretrained(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    ctx = ReportContext(runs=[], out=tmp_path / "out", options=ReportOptions(dtype="bf16"))
    first, _ = load_cached(ctx, "a")
    assert load_cached(ctx, "a/")[0] is first and load_cached(ctx, str(tmp_path / "a"))[0] is first
    assert next(first.parameters()).dtype == torch.bfloat16
    gone = weakref.ref(first)
    del first
    second, _ = load_cached(ctx, "b")
    gc.collect()
    assert gone() is None and len(ctx.cache["models"]) == 1  # the first model was let go before the second loaded
    assert next(second.parameters()).dtype == torch.bfloat16
