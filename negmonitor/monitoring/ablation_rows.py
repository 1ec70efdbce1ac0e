"""Ablation damage as record rows: the Section 3 protocol at one training step, summarised as scalars.

Metrics (whole model, ``layer = -1``): ``ablation/ppl/baseline``, ``ablation/ppl_ratio/<condition>`` (perplexity
under ablation over the baseline's), ``ablation/acc/<suite>/<condition>`` and ``ablation/acc_drop/<suite>/<condition>``
(baseline accuracy minus the condition's), ``ablation/margin_drop/<suite>/<condition>`` (relative drop of the mean
log-probability margin good − bad, sensitive when accuracy is saturated), ``ablation/ppl_matched_fraction`` (the bottom-WD share that matched), for
conditions ``wasserstein``, ``random`` and ``ppl_matched``. ``<suite>`` is the minimal-pair set's ``suite`` column
(``blimp``, ``tse`` or ``grammar``).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

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


def ablation_scalar_rows(model, tokenizer, result, settings: Any, minimal_pairs: pd.DataFrame | None,
                         ppl_text: Any, max_ppl_tokens: int = 4_096) -> pd.DataFrame:
    """Run baseline / Wasserstein / random / perplexity-matched once and return ``layer, neuron, metric, value``."""
    from negmonitor.ablation import EvalSuite, run_protocol

    settings = as_settings(settings)
    suite_name, blimp, tse = _pairs_slot(minimal_pairs)
    suite = EvalSuite.build(tokenizer, ppl_text=ppl_text, blimp=blimp, tse=tse, max_ppl_tokens=max_ppl_tokens)
    report = run_protocol(model, tokenizer, result, suite, settings)
    return scalar_rows(damage_rows(report.table, suite_name, report.meta.get("matching") or {}))


def _pairs_slot(pairs: pd.DataFrame | None) -> tuple[str | None, pd.DataFrame | None, pd.DataFrame | None]:
    """BLiMP-shaped pairs go to the BLiMP slot; TSE-shaped ones (construction/condition) to the TSE slot."""
    if pairs is None or len(pairs) == 0:
        return None, None, None
    name = str(pairs["suite"].iloc[0]) if "suite" in pairs.columns else "pairs"
    if "uid" in pairs.columns:
        return name, pairs, None
    return name, None, pairs


def damage_rows(table: pd.DataFrame, suite_name: str | None, matching: dict) -> list[tuple[int, int, str, float]]:
    """Scalar tuples from the protocol's condition table."""
    by = table.set_index("condition")
    rows: list[tuple[int, int, str, float]] = []
    acc_column = next((c for c in ("blimp_acc", "tse_acc") if c in by.columns and by[c].notna().any()), None)
    margin_column = acc_column.replace("_acc", "_margin") if acc_column else None
    base_margin = float(by.loc["baseline", margin_column]) if margin_column in by.columns else math.nan
    base_ppl = float(by.loc["baseline", "ppl"]) if "ppl" in by.columns else math.nan
    if math.isfinite(base_ppl):
        rows.append((-1, -1, "ablation/ppl/baseline", base_ppl))
    if acc_column:
        rows.append((-1, -1, f"ablation/acc/{suite_name}/baseline", float(by.loc["baseline", acc_column])))
    for condition in CONDITIONS:
        if condition not in by.index:
            continue
        if math.isfinite(base_ppl):
            rows.append((-1, -1, f"ablation/ppl_ratio/{condition}", float(by.loc[condition, "ppl"]) / base_ppl))
        if acc_column:
            acc = float(by.loc[condition, acc_column])
            rows.append((-1, -1, f"ablation/acc/{suite_name}/{condition}", acc))
            rows.append((-1, -1, f"ablation/acc_drop/{suite_name}/{condition}",
                         float(by.loc["baseline", acc_column]) - acc))
            if math.isfinite(base_margin) and base_margin != 0:
                drop = (base_margin - float(by.loc[condition, margin_column])) / abs(base_margin)
                rows.append((-1, -1, f"ablation/margin_drop/{suite_name}/{condition}", drop))
    if matching.get("fraction") is not None:
        rows.append((-1, -1, "ablation/ppl_matched_fraction", float(matching["fraction"])))
    return rows
