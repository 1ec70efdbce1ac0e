"""The Section 3 protocol, the perplexity-matching bisection, sweeps and saved outputs, on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import SHARED_DATA
import negmonitor.ablation as ablation_module
from negmonitor.ablation import (
    AblationSettings,
    EvalSuite,
    Scores,
    evaluate_under,
    fraction_sweep,
    layer_group_sweep,
    markdown_table,
    match_perplexity,
    run_protocol,
)
from negmonitor.adapters import find_sites
from negmonitor.errors import NegmonitorError
from negmonitor.evaluation import load_blimp, load_perplexity_text, load_tse
from negmonitor.probeset import ProbeSet
from negmonitor.selection import Selection, select_neurons
from tiny_models import tiny_causal_lm, tiny_tokenizer

DATA = SHARED_DATA
needs_data = pytest.mark.skipif(not (DATA / "blimp").is_dir() or not (DATA / "tse").is_dir()
                                or not (DATA / "wikitext-2" / "valid.txt").is_file(),
                                reason=f"shared reference data not found at {DATA}")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("neox")


@pytest.fixture(scope="module")
def text() -> str:
    if not (DATA / "wikitext-2" / "valid.txt").is_file():
        pytest.skip(f"WikiText-2 not found at {DATA}")
    return load_perplexity_text(DATA / "wikitext-2" / "valid.txt")[:20_000]


@pytest.fixture(scope="module")
def suite(tokenizer, text) -> EvalSuite:
    if not (DATA / "blimp").is_dir() or not (DATA / "tse").is_dir():
        pytest.skip(f"BLiMP/TSE not found at {DATA}")
    blimp = load_blimp(DATA / "blimp", uids=["anaphor_gender_agreement", "regular_plural_subject_verb_agreement_1"],
                       sample_per_uid=6)
    tse = load_tse(DATA / "tse", constructions=["simple_agrmt", "npi_across_anim"], sample_per_construction=6)
    return EvalSuite.build(tokenizer, ppl_text=text, blimp=blimp, tse=tse, max_ppl_tokens=1024)


@pytest.fixture(scope="module")
def values() -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {layer: torch.rand(64, generator=gen, dtype=torch.float64) for layer in (0, 1)}


def _settings(**kw) -> AblationSettings:
    return AblationSettings(**{"fraction": 0.05, "batch_size": 16, "ppl_window": 128, "ppl_stride": 128, **kw})


@needs_data
def test_protocol_table_breakdown_selections_and_files(model, tokenizer, suite, values, tmp_path):
    sites = find_sites(model)
    originals = [s.activation for s in sites]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # 20%: enough damage on this tiny model for a perplexity-matched control to be searched (at 5% the Wasserstein
    # ablation lowers its perplexity slightly and there is nothing to match)
    report = run_protocol(model, tokenizer, values, suite, _settings(fraction=0.2, max_matching_evals=4,
                                                                     ppl_tolerance=0.5))
    table = report.table.set_index("condition")
    assert list(table.index) == ["baseline", "wasserstein", "random", "ppl_matched"]
    assert list(report.table.columns[:3]) == ["condition", "fraction", "n_neurons"]
    for column in ("ppl", "nll", "blimp_acc", "tse_acc"):
        assert table[column].notna().all(), column
    assert table.loc["baseline", "n_neurons"] == 0
    assert table.loc["wasserstein", "n_neurons"] == table.loc["random", "n_neurons"] > 0
    assert table.loc["ppl_matched", "ppl"] == pytest.approx(math.exp(table.loc["ppl_matched", "nll"]))
    assert 1 <= report.meta["matching"]["n_evals"] <= 4
    assert set(report.breakdown["suite"]) == {"blimp", "tse"}
    assert set(report.breakdown["condition"]) == set(table.index)
    wasserstein = Selection.from_frame(report.selections, name="wasserstein")
    assert wasserstein == select_neurons(values, "top", frac=0.2)
    assert [s.activation for s in sites] == originals
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    paths = report.save(tmp_path)
    assert {p.name for p in paths.values()} == {"ablation.csv", "ablation.md", "ablation_breakdown.csv",
                                               "ablation_selections.parquet", "ablation_matching.csv",
                                               "ablation_meta.json"}
    pd.testing.assert_frame_equal(pd.read_csv(paths["table"]), report.table, check_dtype=False)
    assert len(pd.read_parquet(paths["selections"])) == len(report.selections)
    assert json.loads(paths["meta"].read_text())["settings"]["mode"] == "zero_negative"
    assert paths["markdown"].read_text().startswith("| condition | fraction | n_neurons | ppl |")
    assert not list(tmp_path.glob(".*.tmp"))


@needs_data
def test_several_random_draws_are_separate_seeded_rows(model, tokenizer, suite, values):
    """random_draws=3: rows random, random_draw1, random_draw2, each what a one-draw run with that seed gives."""
    from negmonitor.monitoring.ablation_rows import damage_rows

    small = EvalSuite(ppl_ids=suite.ppl_ids[:512], tse=suite.tse)
    report = run_protocol(model, tokenizer, values, small, _settings(random_draws=3, max_matching_evals=1,
                                                                      ppl_tolerance=10.0, fraction=0.1))
    table = report.table.set_index("condition")
    assert list(table.index) == ["baseline", "wasserstein", "random", "random_draw1", "random_draw2", "ppl_matched"]
    draws = [Selection.from_frame(report.selections, name=n) for n in ("random", "random_draw1", "random_draw2")]
    assert draws[0] != draws[1] and draws[1] != draws[2]
    for seed, selection in enumerate(draws):
        assert selection == select_neurons(values, "random", frac=0.1, seed=seed)
    single = run_protocol(model, tokenizer, values, EvalSuite(ppl_ids=small.ppl_ids, tse=small.tse),
                          _settings(seed=1, max_matching_evals=1, ppl_tolerance=10.0, fraction=0.1))
    once = single.table.set_index("condition").loc["random"]
    assert table.loc["random_draw1", "ppl"] == pytest.approx(once["ppl"])
    assert table.loc["random_draw1", "tse_margin"] == pytest.approx(once["tse_margin"])
    # The monitor's scalars: random stays the first draw; mean and sd are over the three draws.
    scalars = {metric: value for _, _, metric, value in damage_rows(report.table, "tse", {})}
    ratios = table.loc[["random", "random_draw1", "random_draw2"], "ppl"] / table.loc["baseline", "ppl"]
    assert scalars["ablation/ppl_ratio/random"] == pytest.approx(ratios.iloc[0])
    assert scalars["ablation/ppl_ratio/random_mean"] == pytest.approx(ratios.mean())
    assert scalars["ablation/ppl_ratio/random_sd"] == pytest.approx(ratios.std(ddof=1))
    margins = table.loc[["random", "random_draw1", "random_draw2"], "tse_margin"]
    base = table.loc["baseline", "tse_margin"]
    assert scalars["ablation/margin_drop/tse/random_sd"] == pytest.approx(margins.std(ddof=1) / abs(base))
    assert "ablation/ppl_ratio/random_draw1" not in scalars


@needs_data
def test_monitor_rows_score_blimp_and_tse_in_one_protocol_run(model, tokenizer, text, values):
    from negmonitor.monitoring.ablation_rows import ablation_scalar_rows

    blimp = load_blimp(DATA / "blimp", uids=["anaphor_gender_agreement"], sample_per_uid=4)
    tse = load_tse(DATA / "tse", constructions=["simple_agrmt"], sample_per_construction=4)
    settings = {"fraction": 0.05, "batch_size": 16, "ppl_window": 128, "ppl_stride": 128, "max_matching_evals": 1,
                "ppl_tolerance": 10.0}
    rows = ablation_scalar_rows(model, tokenizer, values, settings, [blimp, tse], text[:4000])
    metrics = list(rows.metric)
    names = (str(blimp["suite"].iloc[0]), str(tse["suite"].iloc[0]))
    assert names[0] != names[1]
    for name in names:
        for kind in ("acc", "acc_drop", "margin_drop"):
            assert f"ablation/{kind}/{name}/wasserstein" in metrics and f"ablation/{kind}/{name}/random" in metrics
        assert f"ablation/acc/{name}/baseline" in metrics
    assert metrics.count("ablation/ppl_ratio/wasserstein") == 1


@needs_data
def test_monitor_resolves_a_list_of_minimal_pair_sources():
    from negmonitor.callbacks.monitor import resolve_minimal_pairs

    frames = resolve_minimal_pairs([str(DATA / "blimp"), str(DATA / "tse")], sample=1)
    assert [("uid" in f.columns) for f in frames] == [True, False] and all(len(f) for f in frames)
    with pytest.raises(NegmonitorError, match="two BLIMP-shaped"):
        resolve_minimal_pairs([str(DATA / "blimp"), str(DATA / "blimp")], sample=1)


@needs_data
def test_baseline_matches_the_plain_evaluations(model, tokenizer, suite, values):
    from negmonitor.evaluation import blimp_accuracy, evaluate_pairs, perplexity

    report = run_protocol(model, tokenizer, values, EvalSuite(ppl_ids=suite.ppl_ids, blimp=suite.blimp),
                          _settings(max_matching_evals=1, ppl_tolerance=10.0))
    base = report.table.set_index("condition").loc["baseline"]
    assert base["ppl"] == pytest.approx(perplexity(model, tokenizer, suite.ppl_ids, window=128, stride=128).ppl)
    overall = blimp_accuracy(evaluate_pairs(model, tokenizer, suite.blimp)).query("level == 'overall'")
    assert base["blimp_acc"] == pytest.approx(float(overall["accuracy"].iloc[0]))


def test_opt_relu_zero_negative_leaves_perplexity_unchanged(tokenizer):
    """Contrast case: OPT's ReLU already outputs 0 for x < 0, so zero_negative cannot change anything."""
    opt = tiny_causal_lm("opt")
    ids = torch.randint(2, 500, (300,), generator=torch.Generator().manual_seed(0))
    values = {0: torch.rand(64), 1: torch.rand(64)}
    report = run_protocol(opt, tokenizer, values, EvalSuite(ppl_ids=ids),
                          _settings(fraction=0.5, max_matching_evals=1))
    ppl = report.table.set_index("condition")["ppl"]
    assert ppl["wasserstein"] == ppl["baseline"] == ppl["random"]
    zero_pos = run_protocol(opt, tokenizer, values, EvalSuite(ppl_ids=ids),
                            _settings(fraction=0.5, mode="zero_positive", max_matching_evals=1))
    assert zero_pos.table.set_index("condition")["ppl"]["wasserstein"] != ppl["baseline"]


class _FakeEvaluation:
    """Perplexity as a known increasing function of the number of ablated neurons (no model needed)."""

    def __init__(self, slope: float = 0.1) -> None:
        self.slope = slope
        self.calls = 0

    def __call__(self, model, tokenizer, suite, settings, selection, include=None) -> Scores:
        self.calls += 1
        n = 0 if not selection else sum(len(v) for v in selection.values())
        return Scores({"ppl": 10.0 + self.slope * n}, pd.DataFrame())


@pytest.fixture()
def fake(monkeypatch) -> _FakeEvaluation:
    evaluation = _FakeEvaluation()
    monkeypatch.setattr(ablation_module, "evaluate_under", evaluation)
    return evaluation


def _ranked(n: int = 1000) -> dict[int, torch.Tensor]:
    return {0: torch.arange(n, dtype=torch.float64)}


def test_bisection_matches_within_tolerance(fake):
    suite = EvalSuite(ppl_ids=torch.arange(10))
    target = 10.0 + 0.1 * 300  # 300 bottom neurons; the clean model's perplexity is 10
    match = match_perplexity(None, None, _ranked(), suite, target, _settings(ppl_tolerance=0.01))
    assert match.matched and match.relative_error <= 0.01
    assert abs(match.selection.n_neurons - 300) <= 3  # 1% of the damage (30) is 3 neurons' worth
    assert match.n_evals + 1 == fake.calls == len(match.trace) + 1 <= 13  # + the baseline, evaluated here
    assert match.trace["fraction"].iloc[0] == 1.0 and match.baseline == 10.0
    assert match.selection.how == "bottom" and match.selection.name == "ppl_matched"
    assert set(match.selection[0].tolist()) == set(range(match.selection.n_neurons))  # the lowest values


def test_the_tolerance_is_a_share_of_the_damage_to_match_not_of_perplexity(fake):
    """The Wasserstein ablation raises perplexity 10 -> 10.5 (5 neurons' worth): 5% of perplexity would accept
    anything from no damage to twice it (0-10 neurons); 5% of the damage accepts exactly 5 neurons."""
    suite = EvalSuite(ppl_ids=torch.arange(10))
    match = match_perplexity(None, None, _ranked(), suite, 10.5, _settings(ppl_tolerance=0.05), baseline_ppl=10.0)
    assert match.matched and match.selection.n_neurons == 5 and match.relative_error == 0.0
    assert fake.calls == match.n_evals  # the baseline given is not evaluated again


def test_a_non_finite_perplexity_counts_as_above_the_target_and_is_never_chosen(fake, monkeypatch):
    """Every neuron ablated overflows (fp16 Pythia-12B): that NaN was kept as the 'closest' and the matched row
    ablated the whole model."""
    suite = EvalSuite(ppl_ids=torch.arange(10))

    def overflowing(model, tokenizer, suite, settings, selection, include=None):
        n = sum(len(v) for v in selection.values())
        return Scores({"ppl": math.nan if n > 500 else 10.0 + 0.1 * n}, pd.DataFrame())

    monkeypatch.setattr(ablation_module, "evaluate_under", overflowing)
    with pytest.warns(UserWarning, match="not matched"):
        match = match_perplexity(None, None, _ranked(), suite, 10.0 + 0.1 * 300, _settings(ppl_tolerance=1e-9,
                                                                                          max_matching_evals=6),
                                 baseline_ppl=10.0)
    assert math.isnan(match.trace.ppl.iloc[0]) and len(match.trace) == 6
    assert math.isfinite(match.ppl) and match.fraction < 1.0 and match.selection.n_neurons <= 500


def test_nothing_to_match_when_the_wasserstein_ablation_does_no_damage(fake):
    """A tiny model whose Wasserstein ablation lowers perplexity: the search used to 'match' it with every neuron
    ablated (p = 1 first, within 1% of perplexity). No evaluation now; the row is the bottom neurons of the
    Wasserstein set's size, unmatched, with one warning."""
    suite = EvalSuite(ppl_ids=torch.arange(10))
    with pytest.warns(UserWarning, match="does not exceed the clean model's 10, so there is no damage to match"):
        match = match_perplexity(None, None, _ranked(), suite, 9.99, _settings(fraction=0.02), baseline_ppl=10.0)
    assert fake.calls == 0 and match.n_evals == 0 and not match.matched
    assert match.selection.n_neurons == 20 and set(match.selection[0].tolist()) == set(range(20))
    assert ablation_module._match_meta(match)["relative_error"] is None  # JSON: no infinity


def test_bisection_warns_and_reports_closest_when_unreachable(fake):
    suite = EvalSuite(ppl_ids=torch.arange(10))
    with pytest.warns(UserWarning, match="not matched within 5.0% of the damage.*bottom 100.00%"):
        match = match_perplexity(None, None, _ranked(), suite, 1e6, _settings(), baseline_ppl=10.0)
    assert not match.matched and match.n_evals == 1 and match.fraction == 1.0


def test_bisection_respects_the_evaluation_budget(fake):
    suite = EvalSuite(ppl_ids=torch.arange(10))
    with pytest.warns(UserWarning, match="after 3 evaluations"):
        match = match_perplexity(None, None, _ranked(), suite, 10.0 + 0.1 * 123, _settings(max_matching_evals=3,
                                                                                             ppl_tolerance=1e-4),
                                 baseline_ppl=10.0)
    assert match.n_evals == 3 and not match.matched
    assert match.relative_error == match.trace["rel_error"].min()


def test_bisection_stops_when_the_fraction_cannot_be_refined(fake):
    suite = EvalSuite(ppl_ids=torch.arange(10))
    with pytest.warns(UserWarning):
        match = match_perplexity(None, None, _ranked(4), suite, 10.15, _settings(max_matching_evals=50,
                                                                                ppl_tolerance=1e-6),
                                 baseline_ppl=10.0)
    assert match.n_evals < 50 and match.trace["n_neurons"].is_unique


def test_matching_needs_a_perplexity_text():
    with pytest.raises(NegmonitorError, match="needs a perplexity text"):
        match_perplexity(None, None, _ranked(), EvalSuite(), 10.0, _settings())


def test_layer_group_and_fraction_sweeps(model, tokenizer, values):
    ids = torch.randint(2, 500, (300,), generator=torch.Generator().manual_seed(0))
    suite = EvalSuite(ppl_ids=ids)
    groups = layer_group_sweep(model, tokenizer, values, suite, group_size=1, settings=_settings(),
                               how=("top", "random"))
    assert list(groups.table["condition"]) == ["baseline", "top:alone:0", "top:alone:1", "top:cumulative:0-1",
                                               "random:alone:0", "random:alone:1", "random:cumulative:0-1"]
    cumulative = Selection.from_frame(groups.selections, name="top:cumulative:0-1")
    assert list(cumulative) == [0, 1]
    assert list(Selection.from_frame(groups.selections, name="top:alone:1")) == [1]
    assert groups.table["ppl"].notna().all()

    sweep = fraction_sweep(model, tokenizer, values, suite, [0.05, 0.5], settings=_settings())
    assert len(sweep.table) == 1 + 3 * 2
    top = sweep.table[sweep.table["how"] == "top"]
    assert list(top["n_neurons"]) == sorted(top["n_neurons"]) and top["n_neurons"].iloc[0] > 0
    assert set(sweep.table["how"]) == {"", "top", "random", "bottom"}
    with pytest.raises(NegmonitorError, match=r"fraction must be in \(0, 1\]"):
        fraction_sweep(model, tokenizer, values, suite, [0.0], settings=_settings())
    with pytest.raises(NegmonitorError, match="group_size must be a positive integer"):
        layer_group_sweep(model, tokenizer, values, suite, group_size=0)


def test_protocol_probes_a_probe_set(model, tokenizer):
    probe_set = ProbeSet.build(["the author that the guard likes laughs . no authors have ever been popular ."] * 20,
                               tokenizer, n_tokens=512, window=64, n_pairs=0)
    ids = torch.randint(2, 500, (200,), generator=torch.Generator().manual_seed(0))
    report = run_protocol(model, tokenizer, probe_set, EvalSuite(ppl_ids=ids), _settings(max_matching_evals=2,
                                                                                          ppl_tolerance=1.0))
    assert report.table.set_index("condition").loc["wasserstein", "n_neurons"] == 2 * len(
        select_neurons({0: torch.rand(64)}, frac=0.05)[0])


def test_evaluate_under_restores_the_model(model, tokenizer):
    ids = torch.randint(2, 500, (100,), generator=torch.Generator().manual_seed(0))
    originals = [s.activation for s in find_sites(model)]
    scores = evaluate_under(model, tokenizer, EvalSuite(ppl_ids=ids), _settings(), {0: [1, 2]})
    assert scores.metrics["ppl"] > 0 and [s.activation for s in find_sites(model)] == originals


def test_settings_validation():
    with pytest.raises(NegmonitorError, match="unknown ablation mode"):
        AblationSettings(mode="zero")
    with pytest.raises(NegmonitorError, match=r"fraction must be in \(0, 1\]"):
        AblationSettings(fraction=2.0)
    with pytest.raises(NegmonitorError, match="ppl_tolerance must be > 0"):
        AblationSettings(ppl_tolerance=0)
    with pytest.raises(NegmonitorError, match="max_matching_evals"):
        AblationSettings(max_matching_evals=0)
    with pytest.raises(NegmonitorError, match="random_draws must be a positive integer"):
        AblationSettings(random_draws=0)


def test_markdown_table():
    df = pd.DataFrame({"condition": ["baseline", "random"], "ppl": [12.3456789, math.nan], "n_neurons": [0, 5]})
    assert markdown_table(df, digits=2).splitlines() == [
        "| condition | ppl | n_neurons |", "|---|---|---|", "| baseline | 12.35 | 0 |", "| random | - | 5 |"]


def test_layer_group_breakdown_keeps_the_suite_groups(model, tokenizer, suite, values):
    """The sweep's own identifying column (layer_group) must not overwrite the breakdown's UID/construction names."""
    pairs = EvalSuite(blimp=suite.blimp)
    groups = layer_group_sweep(model, tokenizer, values, pairs, group_size=1, settings=_settings())
    uids = set(groups.breakdown.query("level == 'uid'")["group"])
    assert uids and uids <= set(suite.blimp["uid"])
    assert set(groups.breakdown["layer_group"]) == {"", "0", "1"}


@needs_data
def test_minimal_pair_batches_fill_the_memory_budget_and_score_the_same(model, tokenizer, suite, monkeypatch):
    """8 sentences of 10-30 tokens a batch left a GPU idle through TSE's 169k pairs (tens of thousands of forwards
    per condition): the batches now hold as many sentences as the budget allows, up to one perplexity batch's
    tokens, and a budget too small for that lowers them; the scores do not depend on it."""
    import negmonitor.evaluation.sharded as sharded

    sizes, real = [], sharded.sharded_evaluate_pairs

    def spying(*args, batch_size, **kwargs):
        sizes.append(batch_size)
        return real(*args, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(sharded, "sharded_evaluate_pairs", spying)
    results = {}
    for budget in ("2GiB", "16MiB", None):
        sizes.clear()
        settings = _settings(batch_size=8, memory_budget=budget)
        results[budget] = ablation_module.evaluate(model, tokenizer, suite, settings, include=["blimp", "tse"])
        results[budget] = (results[budget].metrics, list(sizes))
    big, small, none = (results[b][1] for b in ("2GiB", "16MiB", None))
    assert none == [8, 8] and all(s > 8 for s in big) and all(8 < s < b for s, b in zip(small, big))
    assert results["2GiB"][0] == pytest.approx(results[None][0], rel=1e-9)
    assert results["16MiB"][0] == pytest.approx(results[None][0], rel=1e-9)


def test_with_nothing_to_match_no_matched_fraction_is_logged_but_the_step_is_marked():
    """The row with no damage to match ablates the Wasserstein set's size unsearched: logging that as the 'matched
    fraction' put a point on the report's curve of chosen fractions that no search chose."""
    from negmonitor.monitoring.ablation_rows import damage_rows

    table = pd.DataFrame({"condition": ["baseline", "wasserstein", "random", "ppl_matched"],
                          "ppl": [10.0, 9.9, 10.1, 10.0]})
    nothing = {"run": True, "matched": False, "fraction": 0.05, "relative_error": None, "n_evals": 0}
    logged = {metric: value for _, _, metric, value in damage_rows(table, None, nothing)}
    assert "ablation/ppl_matched_fraction" not in logged and "ablation/ppl_matched_rel_error" not in logged
    assert logged["ablation/ppl_matched_ok"] == 0.0
    searched = {**nothing, "matched": True, "relative_error": 0.01, "n_evals": 5, "fraction": 0.2}
    logged = {metric: value for _, _, metric, value in damage_rows(table, None, searched)}
    assert logged["ablation/ppl_matched_fraction"] == 0.2 and logged["ablation/ppl_matched_ok"] == 1.0
