"""Ablation damage as record rows: the Section 3 protocol at one training step, summarised as scalars.

Metrics (whole model, ``layer = -1``): ``ablation/ppl/baseline``, ``ablation/ppl_ratio/<condition>`` (perplexity
under ablation over the baseline's), ``ablation/acc/<suite>/<condition>`` and ``ablation/acc_drop/<suite>/<condition>``
(baseline accuracy minus the condition's), ``ablation/margin_drop/<suite>/<condition>`` (relative drop of the mean
log-probability margin good − bad, sensitive when accuracy is saturated), ``ablation/ppl_matched_fraction`` (the
bottom-WD share that matched; ``ablation/ppl_matched_rel_error`` and ``ablation/ppl_matched_ok``: its perplexity's
distance from the target as a share of the damage to match and 1 when within the tolerance), for conditions ``wasserstein``, ``random`` and ``ppl_matched``, plus ``random_mean`` and ``random_sd`` over the random
draws when there are several (``AblationSettings.random_draws``). ``<suite>`` is the minimal-pair set's ``suite``
column (``blimp``, ``tse`` or ``grammar``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from negmonitor.budget import BatchLimit
from negmonitor.distributed import Shard
from negmonitor.errors import NegmonitorError
from negmonitor.records import scalar_rows

CONDITIONS = ("wasserstein", "random", "ppl_matched")


def as_settings(settings: Any):
    """An :class:`~negmonitor.ablation.AblationSettings` from itself, a dict (YAML) or ``True``."""
    from negmonitor.ablation import AblationSettings

    if isinstance(settings, AblationSettings):
        return settings
    if settings is True:
        return AblationSettings()
    if isinstance(settings, dict):
        return AblationSettings(**settings)
    raise TypeError(f"ablation settings must be AblationSettings, a dict or True, got {type(settings).__name__}")


def ablation_scalar_rows(model, tokenizer, result, settings: Any, minimal_pairs: Any, ppl_text: Any,
                         max_ppl_tokens: int = 4_096, shard: Shard | None = None,
                         batch_limits: dict[str, BatchLimit] | None = None) -> pd.DataFrame:
    """Run baseline / Wasserstein / random / perplexity-matched once and return ``layer, neuron, metric, value``.

    ``minimal_pairs``: None, one DataFrame (BLiMP- or TSE-shaped), or a list of them, at most one of each shape
    (e.g. BLiMP and TSE together: one protocol run, scalars for both suites). ``shard``: under DDP/FSDP every
    process calls this with its :class:`~negmonitor.distributed.Shard`; each evaluates its share of every
    evaluation and all get the same rows (the single-process ones). ``batch_limits``: the run's evaluation batch
    sizes after out-of-memory retries (``{evaluation: BatchLimit}``), kept across its measurements.
    """
    from negmonitor.ablation import EvalSuite, run_protocol

    settings = as_settings(settings)
    slots = pair_slots(minimal_pairs)
    blimp, tse = (slots.get(kind, (None, None))[1] for kind in ("blimp", "tse"))
    suite = EvalSuite.build(tokenizer, ppl_text=ppl_text, blimp=blimp, tse=tse, max_ppl_tokens=max_ppl_tokens,
                           shard=shard, batch_limits=batch_limits)
    report = run_protocol(model, tokenizer, result, suite, settings)
    suites = {name: kind for kind, (name, _) in slots.items()}
    return scalar_rows(damage_rows(report.table, suites, report.meta.get("matching") or {}))


def pair_slots(pairs: Any) -> dict[str, tuple[str, pd.DataFrame]]:
    """``{"blimp" | "tse": (suite name, pairs)}``: BLiMP-shaped pairs (with ``uid``) go to the BLiMP slot, TSE-shaped
    ones (construction/condition) to the TSE slot; the name is the pairs' ``suite`` column.

    Raises:
        NegmonitorError: for two sets of the same shape.
    """
    frames = [] if pairs is None else [pairs] if isinstance(pairs, pd.DataFrame) else list(pairs)
    slots: dict[str, tuple[str, pd.DataFrame]] = {}
    for frame in frames:
        if frame is None or len(frame) == 0:
            continue
        kind = "blimp" if "uid" in frame.columns else "tse"
        if kind in slots:
            raise NegmonitorError(f"two {kind.upper()}-shaped minimal-pair sets — give at most one BLiMP-shaped and "
                                  "one TSE-shaped set")
        slots[kind] = (str(frame["suite"].iloc[0]) if "suite" in frame.columns else kind, frame)
    return slots


def damage_rows(table: pd.DataFrame, suites: str | Mapping[str, str] | None,
                matching: dict) -> list[tuple[int, int, str, float]]:
    """Scalar tuples from the protocol's condition table.

    ``suites``: ``{suite name: "blimp" | "tse"}`` (which accuracy columns each name reads), or one name for the
    table's single minimal-pair suite. With several random draws (rows ``random``, ``random_draw1``, ...) every
    random metric also gets ``.../random_mean`` and ``.../random_sd`` over the draws (``random`` itself stays the
    first draw).
    """
    from negmonitor.ablation import is_random_condition

    by = table.set_index("condition")
    rows: list[tuple[int, int, str, float]] = []
    columns = _suite_columns(by, suites)
    base_ppl = float(by.loc["baseline", "ppl"]) if "ppl" in by.columns else math.nan
    if math.isfinite(base_ppl):
        rows.append((-1, -1, "ablation/ppl/baseline", base_ppl))
    for name, acc_column in columns.items():
        rows.append((-1, -1, f"ablation/acc/{name}/baseline", float(by.loc["baseline", acc_column])))
    draws = [c for c in by.index if is_random_condition(str(c))]
    for condition in CONDITIONS:
        if condition in by.index:
            metrics = _condition_metrics(by, condition, base_ppl, columns)
            rows += [(-1, -1, f"{name}/{condition}", value) for name, value in metrics.items()]
    if len(draws) > 1:
        per_draw = [_condition_metrics(by, d, base_ppl, columns) for d in draws]
        for name in per_draw[0]:
            values = np.array([m[name] for m in per_draw], dtype=float)
            rows.append((-1, -1, f"{name}/random_mean", float(values.mean())))
            rows.append((-1, -1, f"{name}/random_sd", float(values.std(ddof=1))))
    if matching.get("fraction") is not None:
        if matching.get("n_evals", 1):  # a searched fraction (with nothing to match, none was chosen)
            rows.append((-1, -1, "ablation/ppl_matched_fraction", float(matching["fraction"])))
        # how far the control's perplexity stayed from the target, and whether within the tolerance: a step whose
        # control did not match is marked, not only warned about
        if matching["relative_error"] is not None:  # None: nothing to match (the Wasserstein ablation did no damage)
            rows.append((-1, -1, "ablation/ppl_matched_rel_error", float(matching["relative_error"])))
        rows.append((-1, -1, "ablation/ppl_matched_ok", float(bool(matching["matched"]))))
    return rows


def _suite_columns(by: pd.DataFrame, suites: str | Mapping[str, str] | None) -> dict[str, str]:
    """``{suite name: accuracy column}`` for the suites whose accuracy the table holds."""
    if suites is None:
        return {}
    if isinstance(suites, str):
        column = next((c for c in ("blimp_acc", "tse_acc") if c in by.columns and by[c].notna().any()), None)
        return {suites: column} if column else {}
    return {name: f"{kind}_acc" for name, kind in suites.items()
            if f"{kind}_acc" in by.columns and by[f"{kind}_acc"].notna().any()}


def _condition_metrics(by: pd.DataFrame, condition: str, base_ppl: float,
                       columns: Mapping[str, str]) -> dict[str, float]:
    """One condition's damage: ``ablation/<metric>[/<suite>]`` (without the condition) → value."""
    out: dict[str, float] = {}
    if math.isfinite(base_ppl):
        out["ablation/ppl_ratio"] = float(by.loc[condition, "ppl"]) / base_ppl
    for name, acc_column in columns.items():
        acc = float(by.loc[condition, acc_column])
        out[f"ablation/acc/{name}"] = acc
        out[f"ablation/acc_drop/{name}"] = float(by.loc["baseline", acc_column]) - acc
        margin_column = acc_column.replace("_acc", "_margin")
        base_margin = float(by.loc["baseline", margin_column]) if margin_column in by.columns else math.nan
        if math.isfinite(base_margin) and base_margin != 0:
            margin = float(by.loc[condition, margin_column])
            out[f"ablation/margin_drop/{name}"] = (base_margin - margin) / abs(base_margin)
    return out
