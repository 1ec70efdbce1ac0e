"""BLiMP (Warstadt et al. 2020): 67 sub-datasets (UIDs) of 1,000 English minimal pairs each.

Loaded from a folder of the release's ``<UID>.jsonl`` files (e.g. ``../shared/data/blimp``), a single such
file, or the Hugging Face hub dataset ``nyu-mll/blimp`` (one config per UID, split ``train``). The table has one
row per pair: ``suite='blimp', uid, field, linguistics_term, pair_id, sentence_good, sentence_bad``.

The release labels one UID's field ``syntax/semantics`` and the others ``syntax_semantics``; the loader writes
``syntax_semantics`` for both. Sentences are used as released (capitalised, with final punctuation).

Any subset of UIDs, and a seeded sample of ``sample_per_uid`` pairs per UID (the same pairs whichever other UIDs
are loaded), make a quick check cheap enough to run inside training.

Example::

    >>> pairs = load_blimp("../shared/data/blimp", uids=["anaphor_gender_agreement"], sample_per_uid=100)
    >>> blimp_accuracy(evaluate_pairs(model, tokenizer, pairs))
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from negmonitor.errors import NegmonitorError
from negmonitor.evaluation._common import load_hub_dataset, read_jsonl, sample_per_group, select_names
from negmonitor.evaluation.minimal_pairs import accuracy_levels

HUB_ID = "nyu-mll/blimp"
COLUMNS = ("suite", "uid", "field", "linguistics_term", "pair_id", "sentence_good", "sentence_bad")
LEVELS = {"uid": ["uid"], "linguistics_term": ["linguistics_term"], "field": ["field"], "overall": []}
_FIX = "pass the folder of BLiMP's <UID>.jsonl files with --blimp DIR"

BLIMP_UIDS = (
    "adjunct_island", "anaphor_gender_agreement", "anaphor_number_agreement", "animate_subject_passive",
    "animate_subject_trans", "causative", "complex_NP_island", "coordinate_structure_constraint_complex_left_branch",
    "coordinate_structure_constraint_object_extraction", "determiner_noun_agreement_1",
    "determiner_noun_agreement_2", "determiner_noun_agreement_irregular_1", "determiner_noun_agreement_irregular_2",
    "determiner_noun_agreement_with_adj_2", "determiner_noun_agreement_with_adj_irregular_1",
    "determiner_noun_agreement_with_adj_irregular_2", "determiner_noun_agreement_with_adjective_1",
    "distractor_agreement_relational_noun", "distractor_agreement_relative_clause", "drop_argument",
    "ellipsis_n_bar_1", "ellipsis_n_bar_2", "existential_there_object_raising", "existential_there_quantifiers_1",
    "existential_there_quantifiers_2", "existential_there_subject_raising", "expletive_it_object_raising",
    "inchoative", "intransitive", "irregular_past_participle_adjectives", "irregular_past_participle_verbs",
    "irregular_plural_subject_verb_agreement_1", "irregular_plural_subject_verb_agreement_2",
    "left_branch_island_echo_question", "left_branch_island_simple_question", "matrix_question_npi_licensor_present",
    "npi_present_1", "npi_present_2", "only_npi_licensor_present", "only_npi_scope", "passive_1", "passive_2",
    "principle_A_c_command", "principle_A_case_1", "principle_A_case_2", "principle_A_domain_1",
    "principle_A_domain_2", "principle_A_domain_3", "principle_A_reconstruction",
    "regular_plural_subject_verb_agreement_1", "regular_plural_subject_verb_agreement_2",
    "sentential_negation_npi_licensor_present", "sentential_negation_npi_scope", "sentential_subject_island",
    "superlative_quantifiers_1", "superlative_quantifiers_2", "tough_vs_raising_1", "tough_vs_raising_2",
    "transitive", "wh_island", "wh_questions_object_gap", "wh_questions_subject_gap",
    "wh_questions_subject_gap_long_distance", "wh_vs_that_no_gap", "wh_vs_that_no_gap_long_distance",
    "wh_vs_that_with_gap", "wh_vs_that_with_gap_long_distance",
)


def load_blimp(source: str | os.PathLike | None = None, uids: str | Iterable[str] | None = None,
               sample_per_uid: int | None = None, seed: int = 0) -> pd.DataFrame:
    """BLiMP pairs from a folder of JSONL files, one JSONL file, or the hub (``source=None`` or a hub id).

    Args:
        source: folder/file path, or ``None`` for ``nyu-mll/blimp`` on the hub.
        uids: the sub-datasets to load (default all).
        sample_per_uid: keep a seeded random sample of this many pairs per UID (default all).
        seed: seed of that sample.

    Raises:
        NegmonitorError: no ``.jsonl`` files in the folder, an invalid line (named by file and line number),
            an unknown UID, or a hub dataset that cannot be loaded (e.g. offline).
    """
    source = HUB_ID if source is None else source
    path = Path(source).expanduser()
    if path.is_dir():
        rows = _rows_from_dir(path, uids)
    elif path.is_file():
        rows = _rows_from_files([path], uids)
    elif str(source).startswith(("/", ".", "~")) or str(source).endswith(".jsonl"):
        raise NegmonitorError(f"no such file or folder: {source} — {_FIX}")
    else:
        rows = _rows_from_hub(str(source), uids)
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df["pair_id"] = df["pair_id"].astype("int64")
    return sample_per_group(df, "uid", sample_per_uid, seed)


def _rows_from_dir(path: Path, uids: str | Iterable[str] | None) -> list[dict]:
    """Rows of the selected ``<UID>.jsonl`` files of a folder."""
    files = {p.stem: p for p in sorted(path.glob("*.jsonl"))}
    if not files:
        raise NegmonitorError(f"no .jsonl files in {path} — {_FIX}")
    names = select_names(uids, sorted(files), "BLiMP UID", "--blimp-uids")
    return _rows_from_files([files[name] for name in names], None)


def _rows_from_files(files: list[Path], uids: str | Iterable[str] | None) -> list[dict]:
    """Rows of JSONL files, optionally keeping only some UIDs."""
    rows = []
    for file in files:
        for index, record in enumerate(read_jsonl(file, required=("sentence_good", "sentence_bad"))):
            rows.append(_row(record, default_uid=file.stem, default_pair=index))
    if uids is not None:
        keep = set(select_names(uids, sorted({r["uid"] for r in rows}), "BLiMP UID", "--blimp-uids"))
        rows = [r for r in rows if r["uid"] in keep]
    return rows


def _rows_from_hub(dataset: str, uids: str | Iterable[str] | None) -> list[dict]:
    """Rows of the selected UIDs from the hub (one dataset config per UID)."""
    rows = []
    for uid in select_names(uids, BLIMP_UIDS, "BLiMP UID", "--blimp-uids"):
        data = load_hub_dataset(dataset, uid, "train", fix=_FIX)
        rows += [_row(record, default_uid=uid, default_pair=i) for i, record in enumerate(data)]
    return rows


def _row(record: dict, default_uid: str, default_pair: int) -> dict:
    """One table row from a BLiMP record."""
    pair = record.get("pairID", default_pair)
    try:
        pair = int(pair)
    except (TypeError, ValueError):
        pair = default_pair
    field = str(record.get("field", "")).replace("syntax/semantics", "syntax_semantics")
    return {"suite": "blimp", "uid": str(record.get("UID", default_uid)), "field": field,
            "linguistics_term": str(record.get("linguistics_term", "")), "pair_id": pair,
            "sentence_good": str(record["sentence_good"]), "sentence_bad": str(record["sentence_bad"])}


def blimp_accuracy(scored: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per UID, per linguistics term, per field and overall (pooled over pairs), with standard errors.

    Returns a long table ``level, group, accuracy, n, se``; ``level`` is ``uid``, ``linguistics_term``,
    ``field`` or ``overall``. With equal pairs per UID the overall figure equals the mean over UIDs.
    """
    return accuracy_levels(scored, LEVELS)
