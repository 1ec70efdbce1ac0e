"""The paper's Section 3 ablation protocol, its perplexity-matched control, and sweeps.

:func:`run_protocol` evaluates a model under four conditions with the same intervention mode
(``zero_negative`` by default):

- ``baseline``: no intervention;
- ``wasserstein``: the top ``fraction`` of neurons by WD in every layer;
- ``random``: the same number of neurons per layer, drawn at random (seeded); with ``random_draws`` > 1 also
  ``random_draw1``, ``random_draw2``, ... (seeds ``seed + 1``, ...), so the spread of the control is known;
- ``ppl_matched``: the bottom ``p`` of neurons by WD, with ``p`` found by bisection so that the perplexity damage
  matches the ``wasserstein`` ablation's within a share of that damage (a fixed budget of perplexity evaluations;
  the closest ``p`` is reported, with a warning, when the budget runs out).

Each condition runs the same :class:`EvalSuite` (perplexity on a text, BLiMP and TSE minimal pairs, optional
lm-eval tasks). The result is an :class:`AblationReport`: a table like the paper's A.2 (one row per condition:
``ppl, blimp_acc, tse_acc, lm_eval:<task>, n_neurons, fraction``), per-suite breakdowns, the bisection trace and
every selection, so each number can be traced to its neurons. :func:`layer_group_sweep` and
:func:`fraction_sweep` reuse the same pieces. Everything is written atomically by :meth:`AblationReport.save`.

Small samples keep it cheap enough to run inside training (the Lightning ``AblationMonitor``) and per checkpoint
(replay).

Example::

    >>> suite = EvalSuite.build(tokenizer, ppl_text=text, blimp=load_blimp(dir, sample_per_uid=20))
    >>> report = run_protocol(model, tokenizer, probe_result, suite, AblationSettings(fraction=0.01))
    >>> print(report.to_markdown())
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from negmonitor.atomic import write_json_atomic, write_parquet_atomic, write_text_atomic
from negmonitor.budget import (DEFAULT_MEMORY_BUDGET, BatchLimit, evaluation_batch_size, parse_bytes,
                               retry_on_out_of_memory, rows_within_budget)
from negmonitor.distributed import Shard
from negmonitor.errors import NegmonitorError
from negmonitor.interventions import ablate, check_mode
from negmonitor.result import ProbeResult
from negmonitor.selection import Selection, restrict_layers, select_neurons
from negmonitor.validation import check_fraction

CONDITIONS = ("baseline", "wasserstein", "random", "ppl_matched")
EVALUATIONS = ("ppl", "blimp", "tse", "lm_eval")
BREAKDOWN_COLUMNS = ["suite", "level", "group", "accuracy", "n", "se"]


@dataclass
class AblationSettings:
    """How the protocol runs.

    Args:
        fraction: fraction in (0, 1] of each layer's neurons in the ``wasserstein`` and ``random`` conditions.
        mode: the intervention (see :mod:`negmonitor.interventions`).
        metric: the per-neuron metric that ranks neurons (``wd``).
        seed: seed of the random selection.
        random_draws: random selections to evaluate (seeds ``seed, seed + 1, ...``): rows ``random``,
            ``random_draw1``, ... One draw can be lucky or unlucky; several give the spread that the Wasserstein
            damage has to stand out from (the training monitor logs their mean and standard deviation).
        ppl_tolerance: how close the perplexity-matched control's perplexity must come to the Wasserstein
            ablation's, as a share of that ablation's damage (perplexity − baseline; 0.05 = 5%).
        max_matching_evals: at most this many perplexity evaluations in the bisection.
        batch_size: windows per forward of the perplexity (and lm-eval's batch size); minimal pairs take as many
            sentences as ``memory_budget`` holds, up to ``batch_size`` 2,048-token windows' tokens.
        per: rank within each ``layer`` or within groups of layers (``group``).
        layers: restrict the selections to these layers (default all probed layers).
        ppl_window: perplexity window (default: ``min(2048, the model's positions)``, the paper's chunks).
        ppl_stride: perplexity stride (default: the window: disjoint chunks, tail dropped).
        protocol: ``negmonitor`` or ``paper`` (:mod:`negmonitor.protocol`): fills every minimal-pair choice below
            that is left at None.
        blimp_score, tse_score: ``sum`` or ``mean`` log-probability per sentence (the TSE slot also holds the
            built-in grammar's pairs).
        pair_prefix: ``bos`` (a BOS, else EOS, token before each sentence) or ``none`` (the tokenizer's own).
        npi_pairs: ``both`` pairs of each TSE NPI triple, or the ``last`` only (the authors').
        count: how many neurons a fraction selects per layer: ``floor`` (``floor(f·n)``) or ``percentile`` (the
            authors' rule: one more at most widths, e.g. 410 of 8,192 at 5%); the protocol's when None.
        lm_eval_limit: documents per lm-eval task (None: all).
        lm_eval_task_dirs: folders of custom lm-eval task YAML files.
        memory_budget: extra memory one perplexity forward may allocate on the model's device (bytes or a size such
            as ``"2GiB"``; None: no bound): the perplexity batch size halves until its logits, activations and
            loss fit. The commands set it to their own ``memory_budget``; the training monitor too, unless it is
            set here to anything but the default.
        progress: show progress bars.
    """

    fraction: float = 0.01
    mode: str = "zero_negative"
    metric: str = "wd"
    seed: int = 0
    random_draws: int = 1
    ppl_tolerance: float = 0.05
    max_matching_evals: int = 12
    batch_size: int = 8
    per: str = "layer"
    layers: tuple[int, ...] | None = None
    ppl_window: int | None = None
    ppl_stride: int | None = None
    protocol: str = "negmonitor"
    blimp_score: str | None = None
    tse_score: str | None = None
    pair_prefix: str | None = None
    npi_pairs: str | None = None
    count: str | None = None
    lm_eval_limit: int | float | None = None
    lm_eval_task_dirs: tuple[str, ...] = ()
    memory_budget: int | str | None = DEFAULT_MEMORY_BUDGET
    progress: bool = False

    def __post_init__(self) -> None:
        check_fraction(self.fraction, "fraction")
        check_mode(self.mode)
        if not (isinstance(self.ppl_tolerance, (int, float)) and self.ppl_tolerance > 0):
            raise NegmonitorError(f"ppl_tolerance must be > 0, got {self.ppl_tolerance!r} — e.g. 0.05 for 5% of "
                                  "the damage")
        if not isinstance(self.random_draws, int) or self.random_draws < 1:
            raise NegmonitorError(f"random_draws must be a positive integer, got {self.random_draws!r} — e.g. 3")
        if not isinstance(self.max_matching_evals, int) or self.max_matching_evals < 1:
            raise NegmonitorError(f"max_matching_evals must be a positive integer, got {self.max_matching_evals!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise NegmonitorError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        self.memory_budget = parse_bytes(self.memory_budget)
        for name in ("ppl_window", "ppl_stride"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise NegmonitorError(f"{name} must be a positive integer, got {value!r} — e.g. 2048")
        self._fill_from_protocol()

    def _fill_from_protocol(self) -> None:
        """Take every minimal-pair and selection-count choice left at None from the named protocol, then check them
        all."""
        from negmonitor.metrics.ranking import COUNTS
        from negmonitor.protocol import NPI_PAIRS, PREFIXES, SCORES, check_choice, get_protocol

        proto = get_protocol(self.protocol)
        self.count = check_choice(self.count or proto.count, COUNTS, "count")
        self.blimp_score = check_choice(self.blimp_score or proto.blimp_score, SCORES, "blimp_score")
        self.tse_score = check_choice(self.tse_score or proto.tse_score, SCORES, "tse_score")
        self.pair_prefix = check_choice(self.pair_prefix or proto.prefix, PREFIXES, "pair_prefix")
        self.npi_pairs = check_choice(self.npi_pairs or proto.npi_pairs, NPI_PAIRS, "npi_pairs")


@dataclass
class EvalSuite:
    """The evaluations run under every condition; leave out any that are not wanted.

    Args:
        ppl_ids: the perplexity text as one 1-D LongTensor of token ids (see :meth:`build`).
        blimp: BLiMP pairs (:func:`negmonitor.evaluation.load_blimp`).
        tse: TSE pairs (:func:`negmonitor.evaluation.load_tse`).
        lm_eval_tasks: lm-eval task names.
        shard: under DDP/FSDP, this process's place: perplexity windows and minimal-pair sentences are split across
            the processes and their sums reduced, so every process gets the single-process numbers (every process
            must then run the same evaluations; lm-eval tasks are not split). None: one process.
        batch_limits: per evaluation (``ppl``, ``blimp``, ``tse``), the batch size an out-of-memory retry came
            down to, kept for the later evaluations (a run that builds a suite per measurement passes its own dict,
            kept across them; entries are added as needed).
    """

    ppl_ids: torch.Tensor | None = None
    blimp: pd.DataFrame | None = None
    tse: pd.DataFrame | None = None
    lm_eval_tasks: tuple[str, ...] = ()
    shard: Shard | None = None
    batch_limits: dict[str, BatchLimit] = field(default_factory=dict)

    @classmethod
    def build(cls, tokenizer, ppl_text: str | Sequence[str] | torch.Tensor | None = None,
              blimp: pd.DataFrame | None = None, tse: pd.DataFrame | None = None,
              lm_eval_tasks: Sequence[str] = (), max_ppl_tokens: int | None = None,
              shard: Shard | None = None, batch_limits: dict[str, BatchLimit] | None = None) -> "EvalSuite":
        """Tokenize the perplexity text once (keeping its first ``max_ppl_tokens`` tokens) and bundle the rest."""
        ids = None if ppl_text is None else leading_tokens(tokenizer, ppl_text, max_ppl_tokens)
        return cls(ids, blimp, tse, tuple(lm_eval_tasks), shard, {} if batch_limits is None else batch_limits)

    def batch_limit(self, evaluation: str) -> BatchLimit:
        """The run's :class:`~negmonitor.budget.BatchLimit` for one evaluation (``ppl``, ``blimp``, ...)."""
        return self.batch_limits.setdefault(evaluation, BatchLimit())

    @property
    def names(self) -> list[str]:
        """The evaluations this suite runs, in table order."""
        present = {"ppl": self.ppl_ids is not None, "blimp": self.blimp is not None, "tse": self.tse is not None,
                   "lm_eval": bool(self.lm_eval_tasks)}
        return [name for name in EVALUATIONS if present[name]]


def leading_tokens(tokenizer, text: str | Sequence[str] | torch.Tensor, n_tokens: int | None) -> torch.Tensor:
    """The first ``n_tokens`` token ids of ``text`` (all if None), tokenizing only as much text as needed.

    A long text is cut at a line break (else a space), where no token spans the cut, so the ids equal a prefix of
    the whole text's; the cut doubles until it yields more than ``n_tokens`` tokens.
    """
    from negmonitor.evaluation.lm_perplexity import token_stream

    if n_tokens is None or not isinstance(text, str):
        ids = token_stream(tokenizer, text)
        return ids if n_tokens is None else ids[: int(n_tokens)]
    chars = 8 * int(n_tokens)
    while True:
        cut = _cut_point(text, chars)
        ids = token_stream(tokenizer, text[:cut])
        if ids.numel() > n_tokens or cut >= len(text):
            return ids[: int(n_tokens)]
        chars *= 2


def _cut_point(text: str, chars: int) -> int:
    """An index at most ``chars`` into ``text`` just before a line break or space (the end if the text is short)."""
    if chars >= len(text):
        return len(text)
    for sep in ("\n", " "):
        cut = text.rfind(sep, 0, chars)
        if cut > 0:
            return cut
    return chars


@dataclass
class Scores:
    """One condition's numbers (``ppl``, ``blimp_acc``, ...) and its per-suite accuracy breakdown."""

    metrics: dict[str, float]
    breakdown: pd.DataFrame


def evaluate(model: nn.Module, tokenizer, suite: EvalSuite, settings: AblationSettings,
             include: Sequence[str] | None = None) -> Scores:
    """Run the suite's evaluations (or only those in ``include``) on the model as it is now."""
    wanted = [name for name in suite.names if include is None or name in include]
    metrics: dict[str, float] = {}
    frames = []
    if "ppl" in wanted:
        metrics.update(_perplexity(model, tokenizer, suite.ppl_ids, settings, suite.shard, suite.batch_limit("ppl")))
    for name in ("blimp", "tse"):
        if name in wanted:
            value, margin, table = _minimal_pairs(model, tokenizer, name, getattr(suite, name), settings, suite.shard,
                                                  suite.batch_limit(name))
            metrics[f"{name}_acc"] = value
            metrics[f"{name}_margin"] = margin
            frames.append(table)
    if "lm_eval" in wanted:
        lm_metrics, table = _lm_eval(model, tokenizer, suite.lm_eval_tasks, settings, suite.batch_limit("lm_eval"))
        metrics.update(lm_metrics)
        frames.append(table)
    breakdown = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=BREAKDOWN_COLUMNS)
    return Scores(metrics, breakdown)


def check_perplexity_budget(model: nn.Module, tokenizer, settings: AblationSettings) -> None:
    """Refuse now, in one line, a ``memory_budget`` too small for one perplexity window (not at the evaluation);
    a window the model cannot take is refused first, as the evaluation would."""
    from negmonitor.evaluation.lm_perplexity import resolve_window

    window, _ = resolve_window(model, tokenizer, settings.ppl_window, settings.ppl_stride)
    evaluation_batch_size(model, window, 1, settings.memory_budget)


def _perplexity(model: nn.Module, tokenizer, ids: torch.Tensor, settings: AblationSettings,
                shard: Shard | None = None, batch_limit: BatchLimit | None = None) -> dict[str, float]:
    from negmonitor.evaluation.lm_perplexity import perplexity

    result = perplexity(model, tokenizer, ids, window=settings.ppl_window, stride=settings.ppl_stride,
                        batch_size=settings.batch_size, shard=shard, memory_budget=settings.memory_budget,
                        batch_limit=batch_limit, progress=settings.progress)
    return {"ppl": result.ppl, "nll": result.nll}


def _minimal_pairs(model: nn.Module, tokenizer, suite: str, pairs: pd.DataFrame, settings: AblationSettings,
                   shard: Shard | None = None, batch_limit: BatchLimit | None = None
                   ) -> tuple[float, float, pd.DataFrame]:
    """Overall accuracy, mean log-probability margin (good − bad, nats) and the suite's accuracy levels.

    The margin still moves when accuracy is saturated (a small model that gets every pair right), so damage to the
    model's preference for the grammatical sentence is visible before any pair flips.
    """
    from negmonitor.evaluation import blimp_accuracy, tse_accuracy
    from negmonitor.evaluation._common import model_device
    from negmonitor.evaluation.sharded import sharded_evaluate_pairs
    from negmonitor.evaluation.tse import keep_npi_pairs

    if suite == "tse":
        pairs = keep_npi_pairs(pairs, settings.npi_pairs)
    score = settings.blimp_score if suite == "blimp" else settings.tse_score
    scored = retry_on_out_of_memory(
        lambda size: sharded_evaluate_pairs(model, tokenizer, pairs, shard or Shard(), batch_size=size, score=score,
                                            prefix=settings.pair_prefix, progress=settings.progress),
        _pair_batch_size(model, tokenizer, pairs, settings), batch_limit, model_device(model, None),
        f"{suite} minimal-pair scoring", "free memory on the model's device", later="evaluations")
    table = (blimp_accuracy if suite == "blimp" else tse_accuracy)(scored)
    table.insert(0, "suite", suite)
    overall = table.loc[table["level"] == "overall", "accuracy"]
    margin = float((scored["logp_good"] - scored["logp_bad"]).mean()) if len(scored) else math.nan
    return float(overall.iloc[0]) if len(overall) else math.nan, margin, table[BREAKDOWN_COLUMNS]


PAIR_LENGTH_SAMPLE = 64  # the longest sentences by characters, tokenized to find the longest in tokens


def _pair_batch_size(model: nn.Module, tokenizer, pairs: pd.DataFrame, settings: AblationSettings) -> int:
    """Sentences per minimal-pair batch: as many as ``memory_budget`` holds at the longest sentence's length, up to
    the tokens of one perplexity batch (``batch_size`` windows of the protocol's 2,048); ``batch_size`` without a
    budget. A minimal pair is 10–30 tokens: 8 sentences a batch left a GPU idle through TSE's 169k pairs. The
    same on every process (FSDP needs as many forwards): it depends on all the pairs, not on a process's share."""
    from negmonitor.evaluation._common import is_masked_lm
    from negmonitor.protocol import WINDOW

    if settings.memory_budget is None or pairs.empty or is_masked_lm(model):
        return settings.batch_size
    sentences = pd.concat([pairs["sentence_good"], pairs["sentence_bad"]]).astype(str)
    longest_by_chars = sentences.loc[sentences.str.len().nlargest(PAIR_LENGTH_SAMPLE).index].tolist()
    longest = 1 + max(len(ids) for ids in tokenizer(longest_by_chars, add_special_tokens=True,
                                                    verbose=False)["input_ids"])
    cap = max(settings.batch_size, settings.batch_size * WINDOW // longest)
    return rows_within_budget(model, longest, cap, settings.memory_budget)


def _lm_eval(model: nn.Module, tokenizer, tasks: Sequence[str], settings: AblationSettings,
             batch_limit: BatchLimit | None = None) -> tuple[dict[str, float], pd.DataFrame]:
    """One headline number per task (``acc`` with no filter when there is one) and every metric as breakdown.

    lm-eval's prompts have no length known beforehand, so its batches are not sized to ``memory_budget``: after an
    out-of-memory error the batch size halves and the tasks run again (kept in ``batch_limit`` for later
    conditions)."""
    from negmonitor.evaluation import run_lm_eval
    from negmonitor.evaluation._common import model_device

    table = retry_on_out_of_memory(
        lambda size: run_lm_eval(model, tokenizer, list(tasks), batch_size=size, limit=settings.lm_eval_limit,
                                 task_dirs=list(settings.lm_eval_task_dirs) or None),
        settings.batch_size, batch_limit, model_device(model, None), "lm-eval", "pass a smaller --batch-size",
        later="evaluations")
    metrics = {f"lm_eval:{task}": _headline(rows) for task, rows in table.groupby("task", sort=False)}
    breakdown = pd.DataFrame({"suite": "lm_eval", "level": table["metric"] + "," + table["filter"],
                              "group": table["task"], "accuracy": table["value"], "n": table["n_samples"],
                              "se": table["stderr"]})
    return metrics, breakdown


def _headline(rows: pd.DataFrame) -> float:
    """``acc`` (filter ``none``) if present, else the first metric."""
    acc = rows[(rows["metric"] == "acc") & (rows["filter"] == "none")]
    return float((acc if len(acc) else rows)["value"].iloc[0])


def evaluate_under(model: nn.Module, tokenizer, suite: EvalSuite, settings: AblationSettings,
                   selection: Mapping | None, include: Sequence[str] | None = None) -> Scores:
    """:func:`evaluate` with ``settings.mode`` applied to ``selection`` (None or empty: the clean model)."""
    if not selection:
        return evaluate(model, tokenizer, suite, settings, include)
    with ablate(model, selection, settings.mode):
        return evaluate(model, tokenizer, suite, settings, include)


# --------------------------------------------------------------------------------------------------------------
# Perplexity-matched control


@dataclass
class MatchResult:
    """Outcome of the perplexity-matching search over the bottom-``p`` WD fraction.

    ``matched`` is False when no evaluated ``p`` came within the tolerance; ``selection``, ``fraction`` and
    ``ppl`` then describe the closest one. ``trace`` has one row per evaluation.
    """

    selection: Selection
    fraction: float
    ppl: float
    target: float
    matched: bool
    n_evals: int
    trace: pd.DataFrame
    baseline: float = math.nan

    @property
    def relative_error(self) -> float:
        """How far the control's perplexity is from the target, relative to the damage it is to match:
        ``|ppl − target| / (target − baseline)`` (``|ppl − target| / target`` when the baseline is unknown)."""
        return _match_error(self.ppl, self.target, self.baseline)


def _match_error(ppl: float, target: float, baseline: float) -> float:
    if not (math.isfinite(ppl) and math.isfinite(target)):
        return math.inf
    scale = target - baseline if math.isfinite(baseline) else target
    return abs(ppl - target) / scale if scale > 0 else math.inf


def match_perplexity(model: nn.Module, tokenizer, values: Mapping[int, torch.Tensor], suite: EvalSuite,
                     target_ppl: float, settings: AblationSettings, baseline_ppl: float | None = None) -> MatchResult:
    """Search the bottom-``p`` fraction (by ``values``) whose ablation raises perplexity as much as the target does.

    Matched means ``|ppl − target| ≤ ppl_tolerance · (target − baseline)``: the tolerance is a share of the damage
    to match, not of perplexity (a Wasserstein ablation that moves perplexity by 1% would otherwise be "matched" by
    any control between no damage and twice its damage). ``baseline_ppl`` is the clean model's (evaluated here when
    not given). The first evaluation is ``p = 1`` (every ranked neuron): if even that stays below the target, no
    fraction can match and the search stops. Otherwise ``p`` is bisected on a log scale between one neuron per
    layer and 1 (a match often lies near the Wasserstein fraction, 1% or less), assuming perplexity grows with
    ``p``; a non-finite perplexity counts as above the target. A fraction that selects the same neurons as one
    already evaluated ends the search.
    """
    if suite.ppl_ids is None:
        raise NegmonitorError("perplexity matching needs a perplexity text — add 'ppl' to the evaluations")
    if baseline_ppl is None:
        baseline_ppl = evaluate_under(model, tokenizer, suite, settings, None, include=["ppl"]).metrics["ppl"]
    if not (math.isfinite(target_ppl) and target_ppl > baseline_ppl):
        return _nothing_to_match(values, target_ppl, baseline_ppl, settings)
    widest = max(int(v.numel()) for v in values.values())
    lo, hi, fraction = 1.0 / widest, 1.0, 1.0
    seen: set[tuple] = set()
    tried: list[tuple[float, Selection, float]] = []
    for _ in range(settings.max_matching_evals):
        selection = _bottom(values, fraction, settings)
        key = tuple(sorted(selection.counts.items()))
        if key in seen:
            break
        seen.add(key)
        ppl = evaluate_under(model, tokenizer, suite, settings, selection, include=["ppl"]).metrics["ppl"]
        tried.append((fraction, selection, ppl))
        error = _match_error(ppl, target_ppl, baseline_ppl)
        if settings.progress:
            print(f"negmonitor: perplexity matching {len(tried)}/{settings.max_matching_evals}: bottom {fraction:.3%} "
                  f"({selection.n_neurons} neurons) ppl {ppl:.4g} vs target {target_ppl:.4g} ({error:.1%} of the "
                  "damage off)", file=sys.stderr)
        if error <= settings.ppl_tolerance or (fraction == 1.0 and ppl < target_ppl):
            break
        below = math.isfinite(ppl) and ppl < target_ppl
        lo, hi = (fraction, hi) if below else (lo, fraction)
        fraction = math.sqrt(lo * hi)
    trace = pd.DataFrame([{"eval": i + 1, "fraction": f, "n_neurons": sel.n_neurons, "ppl": p, "target": target_ppl,
                           "baseline": baseline_ppl, "rel_error": _match_error(p, target_ppl, baseline_ppl)}
                          for i, (f, sel, p) in enumerate(tried)])
    fraction, selection, ppl = min(tried, key=lambda t: _match_error(t[2], target_ppl, baseline_ppl))
    result = MatchResult(selection, fraction, ppl, target_ppl, False, len(tried), trace, baseline_ppl)
    result.matched = result.relative_error <= settings.ppl_tolerance
    if not result.matched:
        warnings.warn(f"perplexity-matched control not matched within {settings.ppl_tolerance:.1%} of the damage: "
                      f"closest was bottom {result.fraction:.2%} of neurons, perplexity {result.ppl:.4g} vs target "
                      f"{target_ppl:.4g} (baseline {baseline_ppl:.4g}; {result.relative_error:.1%} of the damage off) "
                      f"after {result.n_evals} evaluations — raise max_matching_evals or ppl_tolerance", stacklevel=2)
    return result


def _nothing_to_match(values: Mapping[int, torch.Tensor], target_ppl: float, baseline_ppl: float,
                      settings: AblationSettings) -> MatchResult:
    """The Wasserstein ablation did not raise perplexity (or it is not finite): there is no damage for a control to
    match. Said once; the control row is then the bottom neurons of the Wasserstein set's size, marked unmatched."""
    selection = _bottom(values, settings.fraction, settings)
    why = (f"the Wasserstein ablation's perplexity {target_ppl:.4g} does not exceed the clean model's "
           f"{baseline_ppl:.4g}, so there is no damage to match" if math.isfinite(target_ppl) and
           math.isfinite(baseline_ppl) else
           f"a perplexity is not finite (Wasserstein ablation {target_ppl:.4g}, clean model {baseline_ppl:.4g}: an "
           "overflow in fp16?), so there is nothing to match")
    warnings.warn(f"perplexity-matched control not searched: {why}; the ppl_matched row ablates the bottom "
                  f"{settings.fraction:.2%} instead (marked unmatched)", stacklevel=3)
    return MatchResult(selection, settings.fraction, math.nan, target_ppl, False, 0, pd.DataFrame(), baseline_ppl)


def _bottom(values: Mapping[int, torch.Tensor], fraction: float, settings: AblationSettings) -> Selection:
    return select_neurons(values, how="bottom", frac=fraction, metric=settings.metric, per=settings.per,
                          layers=settings.layers, label="ppl_matched", count=settings.count)


# --------------------------------------------------------------------------------------------------------------
# The protocol


@dataclass
class AblationReport:
    """Tables from :func:`run_protocol` or a sweep.

    Attributes:
        table: one row per condition (identifying columns first, then ``ppl, nll, blimp_acc, tse_acc,
            lm_eval:<task>``).
        breakdown: per-suite accuracies per condition (``condition, suite, level, group, accuracy, n, se``).
        selections: every condition's neurons (:meth:`Selection.to_frame` rows plus ``condition``), built when
            first read (saved): the training monitor reads only the table, on every rank.
        matching: the perplexity-matching trace (empty when not run).
        meta: settings and the matching outcome.
        name: file stem used by :meth:`save`.
    """

    table: pd.DataFrame
    breakdown: pd.DataFrame
    _selections: pd.DataFrame | Callable[[], pd.DataFrame]
    matching: pd.DataFrame = field(default_factory=pd.DataFrame)
    meta: dict = field(default_factory=dict)
    name: str = "ablation"

    @property
    def selections(self) -> pd.DataFrame:
        """Every condition's neurons, one row each (see the class docstring)."""
        if callable(self._selections):
            self._selections = self._selections()
        return self._selections

    def to_markdown(self) -> str:
        """The main table as a GitHub-flavoured markdown table."""
        return markdown_table(self.table)

    def save(self, directory: str | os.PathLike) -> dict[str, Path]:
        """Write ``<name>.csv``, ``<name>.md``, ``<name>_breakdown.csv``, ``<name>_selections.parquet``,
        ``<name>_matching.csv`` (if any) and ``<name>_meta.json`` atomically; return them by kind."""
        out = Path(directory)
        stem = out / self.name
        paths = {
            "table": write_text_atomic(self.table.to_csv(index=False), f"{stem}.csv"),
            "markdown": write_text_atomic(self.to_markdown() + "\n", f"{stem}.md"),
            "breakdown": write_text_atomic(self.breakdown.to_csv(index=False), f"{stem}_breakdown.csv"),
            "selections": write_parquet_atomic(self.selections, f"{stem}_selections.parquet"),
        }
        if not self.matching.empty:
            paths["matching"] = write_text_atomic(self.matching.to_csv(index=False), f"{stem}_matching.csv")
        else:  # an earlier run's trace is not this run's
            Path(f"{stem}_matching.csv").unlink(missing_ok=True)
        paths["meta"] = write_json_atomic(self.meta, f"{stem}_meta.json")
        return paths


@dataclass
class _Condition:
    """One row to evaluate: its identifying columns, and its neurons (None for the clean model)."""

    columns: dict
    selection: Selection | None
    known: dict = field(default_factory=dict)  # metrics already measured (e.g. the matched perplexity)


def run_protocol(model: nn.Module, tokenizer, result, suite: EvalSuite,
                 settings: AblationSettings | None = None) -> AblationReport:
    """Baseline, Wasserstein, random and perplexity-matched conditions on ``suite`` (see the module docstring).

    Args:
        result: a :class:`~negmonitor.result.ProbeResult`, a mapping layer → per-neuron metric values, or a
            :class:`~negmonitor.probeset.ProbeSet` to probe the model with first.
        suite: the evaluations; without a perplexity text there is no ``ppl_matched`` row.
    """
    settings = settings or AblationSettings()
    values = neuron_values(model, tokenizer, result, settings)
    top = _select(values, "top", settings.fraction, settings, label="wasserstein")
    rows = _evaluate_conditions(model, tokenizer, suite, settings, [
        _Condition({"condition": "baseline"}, None),
        _Condition({"condition": "wasserstein"}, top),
        *_random_conditions(values, settings),
    ])
    match = None
    if "ppl" in suite.names:
        target = next(s.metrics["ppl"] for s, c in rows if c.columns["condition"] == "wasserstein")
        baseline = next(s.metrics["ppl"] for s, c in rows if c.columns["condition"] == "baseline")
        match = match_perplexity(model, tokenizer, values, suite, target, settings, baseline)
        known = {"ppl": match.ppl, "nll": math.log(match.ppl)} if math.isfinite(match.ppl) else {}
        matched = _Condition({"condition": "ppl_matched"}, match.selection, known)
        rows += _evaluate_conditions(model, tokenizer, suite, settings, [matched])
    report = _report(rows, settings, "ablation")
    report.matching = match.trace if match is not None else pd.DataFrame()
    report.meta["matching"] = _match_meta(match)
    return report


def random_condition_name(draw: int) -> str:
    """Row name of random draw ``draw``: ``random`` for the first, ``random_draw<k>`` for the others."""
    return "random" if draw == 0 else f"random_draw{draw}"


def is_random_condition(name: str) -> bool:
    """Whether a condition row is one of the random draws (``random``, ``random_draw<k>``)."""
    return name == "random" or name.startswith("random_draw")


def _random_conditions(values: Mapping[int, torch.Tensor], settings: AblationSettings) -> list[_Condition]:
    """One condition per random draw, seeded ``settings.seed + draw``."""
    conditions = []
    for draw in range(settings.random_draws):
        name = random_condition_name(draw)
        chosen = _select(values, "random", settings.fraction, replace(settings, seed=settings.seed + draw), label=name)
        conditions.append(_Condition({"condition": name}, chosen))
    return conditions


def neuron_values(model: nn.Module, tokenizer, result, settings: AblationSettings) -> dict[int, torch.Tensor]:
    """Per-layer metric values from a ProbeResult, a mapping, or a ProbeSet (probed here)."""
    from negmonitor.probeset import ProbeSet

    if isinstance(result, ProbeSet):
        from negmonitor.probing import probe

        result = probe(model, result, layers=list(settings.layers) if settings.layers else None,
                       tokenizer=tokenizer, batch_size=settings.batch_size, progress=settings.progress)
    if isinstance(result, Mapping):
        return {int(k): torch.as_tensor(v, dtype=torch.float64) for k, v in result.items()}
    if isinstance(result, ProbeResult):
        return result.values(settings.metric)  # from its tensors when its tables were never built
    raise NegmonitorError(f"expected a ProbeResult, a ProbeSet or a mapping layer -> values, got "
                          f"{type(result).__name__} — run negmonitor.probe first")


def _select(values: Mapping[int, torch.Tensor], how: str, fraction: float, settings: AblationSettings,
            label: str, layers: Sequence[int] | None = None) -> Selection:
    return select_neurons(values, how=how, frac=fraction, metric=settings.metric, per=settings.per,
                          seed=settings.seed, label=label, layers=layers if layers is not None else settings.layers,
                          count=settings.count)


def _evaluate_conditions(model: nn.Module, tokenizer, suite: EvalSuite, settings: AblationSettings,
                         conditions: Sequence[_Condition]) -> list[tuple[Scores, _Condition]]:
    """Evaluate each condition (skipping metrics it already knows); progress bar over conditions."""
    from negmonitor.evaluation._common import progress_bar

    out = []
    for condition in progress_bar(conditions, settings.progress, total=len(conditions), desc="conditions"):
        include = [n for n in suite.names if not (n == "ppl" and "ppl" in condition.known)]
        scores = evaluate_under(model, tokenizer, suite, settings, condition.selection, include)
        scores.metrics = {**condition.known, **scores.metrics}
        out.append((scores, condition))
    return out


def _report(rows: list[tuple[Scores, _Condition]], settings: AblationSettings, name: str) -> AblationReport:
    """Assemble the main table, the breakdown and the selections from evaluated conditions."""
    table_rows, breakdowns = [], []
    for scores, condition in rows:
        sel = condition.selection
        row = {**condition.columns, "fraction": sel.fraction if sel is not None else 0.0,
               "n_neurons": sel.n_neurons if sel is not None else 0, **scores.metrics}
        table_rows.append(row)
        breakdowns.append(_with_columns(scores.breakdown, condition.columns))
    table = pd.DataFrame(table_rows)
    breakdown = pd.concat(breakdowns, ignore_index=True) if breakdowns else pd.DataFrame()
    chosen = [(c.selection, c.columns) for _, c in rows if c.selection is not None]

    def selections() -> pd.DataFrame:  # built when read: one row per chosen neuron of every condition
        frames = [_with_columns(sel.to_frame(), columns) for sel, columns in chosen]
        return pd.concat(frames, ignore_index=True) if frames else Selection({}).to_frame()

    meta = {"settings": asdict(settings), "conditions": [r[1].columns for r in rows]}
    return AblationReport(table, breakdown, selections, meta=meta, name=name)


def _with_columns(df: pd.DataFrame, columns: dict) -> pd.DataFrame:
    """``df`` with identifying columns put first."""
    front = pd.DataFrame({k: [v] * len(df) for k, v in columns.items()}, index=df.index)
    return pd.concat([front, df.drop(columns=[c for c in columns if c in df.columns])], axis=1)


def _match_meta(match: MatchResult | None) -> dict:
    if match is None:
        return {"run": False}
    def finite(value: float) -> float | None:  # JSON has no NaN or infinity
        return float(value) if math.isfinite(value) else None

    return {"run": True, "matched": match.matched, "fraction": match.fraction, "ppl": finite(match.ppl),
            "target": finite(match.target), "baseline": finite(match.baseline),
            "relative_error": finite(match.relative_error), "n_evals": match.n_evals,
            "n_neurons": match.selection.n_neurons}


# --------------------------------------------------------------------------------------------------------------
# Sweeps


def layer_group_sweep(model: nn.Module, tokenizer, result, suite: EvalSuite, group_size: int,
                      settings: AblationSettings | None = None, how: Sequence[str] = ("top",)) -> AblationReport:
    """Ablate groups of ``group_size`` consecutive layers: each group alone, and all groups up to it.

    Rows: ``baseline``, then per group and selection kind (``how``: top/random/bottom by the metric) a row
    with ``scope`` ``alone`` and, from the second group on, ``cumulative``. ``settings.fraction`` applies per
    layer.
    """
    settings = settings or AblationSettings()
    if not isinstance(group_size, int) or group_size < 1:
        raise NegmonitorError(f"group_size must be a positive integer, got {group_size!r} — e.g. 2")
    values = neuron_values(model, tokenizer, result, settings)
    layers = sorted(restrict_layers(values, settings.layers))
    groups = [layers[i:i + group_size] for i in range(0, len(layers), group_size)]
    conditions = [_Condition({"condition": "baseline", "scope": "none", "layer_group": "", "how": ""}, None)]
    for kind in how:
        for index, group in enumerate(groups):
            cumulative = [layer for g in groups[: index + 1] for layer in g]
            scopes = [("alone", group)] + ([("cumulative", cumulative)] if index > 0 else [])
            for scope, chosen in scopes:
                label = f"{kind}:{scope}:{_span(chosen)}"
                columns = {"condition": label, "scope": scope, "layer_group": _span(group), "how": kind}
                selection = _select(values, kind, settings.fraction, settings, label=label, layers=chosen)
                conditions.append(_Condition(columns, selection))
    report = _report(_evaluate_conditions(model, tokenizer, suite, settings, conditions), settings, "layer_groups")
    report.meta["group_size"] = group_size
    return report


def fraction_sweep(model: nn.Module, tokenizer, result, suite: EvalSuite, fractions: Sequence[float],
                   settings: AblationSettings | None = None,
                   how: Sequence[str] = ("top", "random", "bottom")) -> AblationReport:
    """Evaluate the suite (usually perplexity only) with each ``how`` selection at each fraction, plus baseline."""
    settings = settings or AblationSettings()
    fractions = [check_fraction(f, "fraction") for f in fractions]
    values = neuron_values(model, tokenizer, result, settings)
    conditions = [_Condition({"condition": "baseline", "how": ""}, None)]
    for kind in how:
        for frac in fractions:
            label = f"{kind}:{frac:g}"
            conditions.append(_Condition({"condition": label, "how": kind},
                                         _select(values, kind, frac, settings, label=label)))
    return _report(_evaluate_conditions(model, tokenizer, suite, settings, conditions), settings, "fraction_sweep")


def _span(layers: Sequence[int]) -> str:
    """``[2, 3]`` → ``"2-3"``, ``[4]`` → ``"4"``."""
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


# --------------------------------------------------------------------------------------------------------------
# Formatting


def markdown_table(df: pd.DataFrame, digits: int = 4) -> str:
    """A DataFrame as a GitHub-flavoured markdown table (floats to ``digits`` significant decimals)."""
    header = [str(c) for c in df.columns]
    body = [[_cell(v, digits) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def format_table(df: pd.DataFrame, digits: int = 4) -> str:
    """A DataFrame as aligned plain text for the terminal."""
    return df.to_string(index=False, float_format=lambda v: _cell(v, digits), na_rep="-")


def _cell(value, digits: int) -> str:
    if isinstance(value, (float, np.floating)):
        return "-" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


__all__ = ["AblationReport", "AblationSettings", "EvalSuite", "MatchResult", "Scores", "evaluate", "evaluate_under",
           "fraction_sweep", "layer_group_sweep", "markdown_table", "match_perplexity", "neuron_values",
           "run_protocol"]
