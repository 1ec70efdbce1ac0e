"""``--protocol paper``: every choice equals a computation written here from the paper's definition (the authors'
``utils/`` code), on a tiny model: perplexity chunks, BLiMP (summed log-probability, no prefix), TSE (mean
log-probability per token, one pair per NPI triple), and the dtype the command ran in."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from negmonitor.ablation import AblationSettings
from negmonitor.cli import main
from negmonitor.errors import NegmonitorError
from negmonitor.evaluation import load_blimp, load_tse
from negmonitor.evaluation.tse import safe_load_pickle
from negmonitor.protocol import PAPER, get_protocol
from tiny_models import tiny_causal_lm, tiny_tokenizer

BLIMP_UIDS = ["only_npi_scope", "anaphor_gender_agreement"]  # the first word differs in only_npi_scope's pairs
TSE_CONSTRUCTIONS = ["simple_agrmt", "simple_npi_anim"]
PER_SUITE = 140  # >= every pair of the two TSE constructions: the TSE sample is all of them


def test_paper_settings_and_explicit_choices():
    paper = AblationSettings(protocol="paper")
    assert (paper.blimp_score, paper.tse_score, paper.pair_prefix, paper.npi_pairs) == ("sum", "mean", "none", "last")
    ours = AblationSettings()
    assert (ours.blimp_score, ours.tse_score, ours.pair_prefix, ours.npi_pairs) == ("sum", "sum", "bos", "both")
    assert AblationSettings(protocol="paper", tse_score="sum").tse_score == "sum"  # an explicit choice wins
    assert get_protocol("paper") is PAPER
    with pytest.raises(NegmonitorError, match="unknown protocol"):
        AblationSettings(protocol="papr")
    with pytest.raises(NegmonitorError, match="npi_pairs must be one of"):
        AblationSettings(npi_pairs="first")


def _paper_tse_pairs(folder, constructions=None) -> list[tuple[str, str, str]]:
    """The authors' TSE pairs: every tuple gives (good, last sentence), NPI triples included."""
    pairs = []
    for path in sorted(folder.glob("*.pickle")):
        if constructions is None or path.stem in constructions:
            for tuples in safe_load_pickle(path).values():
                pairs += [(path.stem, t[0], t[-1]) for t in tuples]
    return pairs


def test_one_pair_per_npi_triple(shared_data):
    expected = _paper_tse_pairs(shared_data / "tse")
    last = load_tse(shared_data / "tse", npi_pairs="last")
    assert len(last) == len(expected) == 158_084
    assert list(zip(last.construction, last.sentence_good, last.sentence_bad)) == expected
    assert len(load_tse(shared_data / "tse")) == 168_908


def _paper_scores(model, tokenizer, sentence: str) -> tuple[float, float]:
    """Summed and mean log-probability of the tokens after the first (the tokenizer's own special tokens only)."""
    ids = tokenizer(sentence, return_tensors="pt").input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    picked = logp.gather(-1, ids[0, 1:, None])[:, 0].double()
    return picked.sum().item(), picked.mean().item()


def _paper_accuracy(model, tokenizer, pairs, which: int) -> tuple[float, float, int]:
    """Accuracy (good > bad), mean margin and number of near-ties, scoring by sum (0) or mean (1)."""
    diffs = [_paper_scores(model, tokenizer, good)[which] - _paper_scores(model, tokenizer, bad)[which]
             for good, bad in pairs]
    return (sum(d > 0 for d in diffs) / len(diffs), sum(diffs) / len(diffs), sum(abs(d) < 1e-4 for d in diffs))


def _paper_perplexity(model, tokenizer, text: str, length: int = 2_048) -> float:
    ids = tokenizer(text, return_tensors="pt").input_ids
    total, count = 0.0, 0
    for start in range(0, ids.shape[1] - length + 1, length):
        chunk = ids[:, start:start + length]
        with torch.no_grad():
            total += model(chunk, labels=chunk).loss.item() * chunk.numel()
        count += chunk.numel()
    assert count >= 2 * length
    return math.exp(total / count)


def test_ablate_protocol_paper_equals_the_papers_definitions(shared_data, tmp_path, capsys):
    model_dir = tmp_path / "model"
    model = tiny_causal_lm("neox", max_positions=4_096, init_range=0.3)
    tokenizer = tiny_tokenizer()
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    text = tmp_path / "valid.txt"
    text.write_text((shared_data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")[:20_000])
    probe = tmp_path / "test.txt"
    probe.write_text((shared_data / "wikitext-2" / "test.txt").read_text(encoding="utf-8")[:20_000])
    out = tmp_path / "out"
    code = main(["ablate", "--model", str(model_dir), "--out", str(out), "--protocol", "paper", "--fraction", "0.05",
                 "--eval", "ppl,blimp,tse", "--text", str(text), "--probe-text", str(probe), "--tokens", "4096",
                 "--blimp", str(shared_data / "blimp"), "--blimp-uids", ",".join(BLIMP_UIDS),
                 "--tse", str(shared_data / "tse"), "--tse-constructions", ",".join(TSE_CONSTRUCTIONS),
                 "--sample", str(PER_SUITE), "--max-matching-evals", "2", "--batch-size", "16"])
    assert code == 0
    assert "in float32" in capsys.readouterr().out
    baseline = pd.read_csv(out / "ablation.csv").iloc[0]
    meta = json.loads((out / "ablation_meta.json").read_text())
    assert meta["dtype"] == "float32" and meta["settings"]["protocol"] == "paper"
    assert json.loads((out / "probe" / "meta.json").read_text())["dtype"] == "float32"

    assert baseline["ppl"] == pytest.approx(_paper_perplexity(model, tokenizer, text.read_text()), rel=1e-5)

    blimp = load_blimp(shared_data / "blimp", uids=BLIMP_UIDS, sample_per_uid=PER_SUITE)
    acc, margin, ties = _paper_accuracy(model, tokenizer, zip(blimp.sentence_good, blimp.sentence_bad), which=0)
    assert abs(baseline["blimp_acc"] - acc) <= ties / len(blimp)
    assert baseline["blimp_margin"] == pytest.approx(margin, rel=1e-4, abs=1e-6)

    tse = _paper_tse_pairs(shared_data / "tse", TSE_CONSTRUCTIONS)
    acc, margin, ties = _paper_accuracy(model, tokenizer, [(g, b) for _, g, b in tse], which=1)
    assert abs(baseline["tse_acc"] - acc) <= ties / len(tse)
    assert baseline["tse_margin"] == pytest.approx(margin, rel=1e-4, abs=1e-6)
    breakdown = pd.read_csv(out / "ablation_breakdown.csv").query("condition == 'baseline' and level == 'overall'")
    assert int(breakdown.query("suite == 'tse'")["n"].iloc[0]) == len(tse) == 260


def test_replay_and_callback_take_the_protocol(tmp_path):
    """``replay --protocol paper --ppl-window`` and the callback's ``ablation={"protocol": "paper"}`` (YAML) reach
    the ablation settings; window flags without --ablate are refused."""
    import argparse

    from negmonitor.commands import replay
    from negmonitor.monitoring.ablation_rows import as_settings

    parser = argparse.ArgumentParser()
    replay.register(parser.add_subparsers())
    base = ["replay", "--model", "m", "--revisions", "all", "--logdir", str(tmp_path)]
    args = parser.parse_args(base + ["--ablate", "--protocol", "paper", "--ppl-window", "512",
                                     "--ppl-text", str(tmp_path / "t.txt")])
    (tmp_path / "t.txt").write_text("the cat sees the dog . " * 50)
    settings, _, _ = replay._ablation(args)
    assert (settings.protocol, settings.tse_score, settings.pair_prefix, settings.npi_pairs) == (
        "paper", "mean", "none", "last")
    assert (settings.ppl_window, settings.ppl_stride) == (512, None)
    with pytest.raises(NegmonitorError, match="only matter with --ablate"):
        replay._ablation(parser.parse_args(base + ["--ppl-window", "512"]))
    assert as_settings({"protocol": "paper", "ppl_window": 1024}).npi_pairs == "last"


def test_the_paper_protocol_selects_as_many_neurons_as_the_authors_percentile_rule():
    """The authors keep the neurons strictly above ``np.percentile(wd, 100 - k)``: one more than floor(k·n) at most
    widths (410 of Pythia-1.4B's 8,192 at 5%, 9 rather than 8 at 0.1%); the random control takes the same count."""
    import numpy as np

    from negmonitor.ablation import _select
    from negmonitor.metrics.ranking import percentile_count

    gen = torch.Generator().manual_seed(0)
    values = {layer: torch.rand(8_192, generator=gen, dtype=torch.float64) for layer in (0, 1)}
    for fraction, authors in ((0.05, 410), (0.01, 82), (0.001, 9)):
        v = values[0].numpy()
        assert (v > np.percentile(v, 100 * (1 - fraction))).sum() == authors == percentile_count(values[0], fraction)
        paper = AblationSettings(fraction=fraction, protocol="paper")
        assert paper.count == "percentile" and AblationSettings(fraction=fraction).count == "floor"
        for how in ("top", "random"):
            chosen = _select(values, how, fraction, paper, label=how)
            assert chosen.counts == {0: authors, 1: authors}, (fraction, how)
        top = _select(values, "top", fraction, paper, label="top")
        threshold = np.percentile(v, 100 * (1 - fraction))
        assert set(top[0].tolist()) == set(np.flatnonzero(v > threshold).tolist())  # the same neurons
        assert _select(values, "top", fraction, AblationSettings(fraction=fraction), label="t").counts[0] == \
            int(fraction * 8_192 + 1e-9)
    assert percentile_count(torch.ones(64), 0.05) == 1  # tied values: the rule selects none; at least one
    assert percentile_count(values[0], 1.0) == 8_192  # every neuron at p = 1 (the matched search's first try)
    bottom = _select(values, "bottom", 0.05, AblationSettings(fraction=0.05, protocol="paper"), label="b")
    assert bottom.counts[0] == (values[0].numpy() < np.percentile(values[0].numpy(), 5)).sum()


def test_the_paper_protocol_loads_weights_in_fp32_unless_a_dtype_is_given():
    """The authors load with transformers 4.48.2's from_pretrained default: fp32 (not the fp16/bf16 the
    checkpoint was saved in, which negmonitor's default keeps on a GPU)."""
    import argparse

    from negmonitor.commands.common import weights_dtype

    assert weights_dtype(argparse.Namespace(protocol="paper", dtype=None)) == "fp32"
    assert weights_dtype(argparse.Namespace(protocol="paper", dtype="bf16")) == "bf16"
    assert weights_dtype(argparse.Namespace(protocol="negmonitor", dtype=None)) is None
    assert PAPER.dtype == "fp32" and get_protocol(None).dtype is None
