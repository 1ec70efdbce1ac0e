"""Targeted Syntactic Evaluation (Marvin & Linzen 2018): agreement, reflexives and NPI minimal pairs.

Sources: a folder (or one file) of the original release's pickles, one per construction (``simple_agrmt.pickle``,
``npi_across_anim.pickle``, ...), each a dict from condition (e.g. ``sing_MS_MV``) to a list of tuples
``(grammatical, ungrammatical[, ungrammatical2])``; or JSONL files with ``sentence_good``, ``sentence_bad`` and
optionally ``condition``. In both formats the construction is the file's name without its suffix.

Pickles are read with an unpickler that refuses every global, so a tampered file cannot run code; a file that
asks for one is rejected with an error naming it.

The NPI constructions hold triples: the grammatical sentence ("no authors ... have ever been popular") against
two ungrammatical ones (the licensor in the wrong place, and no licensor: "most authors ..."). Each triple gives
two pairs, ``variant`` 1 and 2 (``npi_pairs="both"``, default), or only the grammatical sentence against the last one
(``npi_pairs="last"``, the authors' code: ``variant`` 2); all other tuples give one pair (``variant`` 1). ``item``
is the tuple's index in its condition, and ``pair_id`` numbers the pairs of a construction from 0.

The released sentences are lower-case with no final punctuation ("the author laughs"). They are scored as
released by default; ``sentence_case=True`` capitalises the first letter and adds a final period.

Example::

    >>> pairs = load_tse("../shared/data/tse", constructions=["simple_agrmt"], sample_per_construction=50)
    >>> tse_accuracy(evaluate_pairs(model, tokenizer, pairs))
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from negmonitor.errors import NegmonitorError
from negmonitor.evaluation._common import read_jsonl, sample_per_group, select_names
from negmonitor.evaluation.minimal_pairs import accuracy_levels
from negmonitor.protocol import NPI_PAIRS, check_choice

COLUMNS = ("suite", "construction", "condition", "pair_id", "sentence_good", "sentence_bad", "item", "variant")
LEVELS = {"construction": ["construction"], "condition": ["construction", "condition"], "overall": []}
SUFFIXES = (".pickle", ".pkl", ".jsonl")
_FIX = "pass the folder of the TSE pickles or JSONL files with --tse DIR"


class _NoGlobalsUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global: only plain containers, strings and numbers load."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def safe_load_pickle(path: str | os.PathLike) -> Any:
    """Load a pickle that may hold only built-in containers and scalars; anything else raises NegmonitorError.

    Python 2 ``str`` objects load as ``bytes`` (decoded as UTF-8 later), never through a codec global.
    """
    data = Path(path).read_bytes()
    try:
        return _NoGlobalsUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise NegmonitorError(f"{path}: unsafe or corrupt pickle ({err}) — a TSE pickle may hold only dicts, "
                              "lists, tuples and strings; re-download the file") from None
    except Exception as err:  # noqa: BLE001 - truncated or garbled bytes raise many types
        raise NegmonitorError(f"{path}: not a readable pickle ({type(err).__name__}: {err}) — re-download "
                              "the file") from None


def load_tse(source: str | os.PathLike, constructions: str | Iterable[str] | None = None,
             sample_per_construction: int | None = None, seed: int = 0,
             sentence_case: bool = False, npi_pairs: str = "both") -> pd.DataFrame:
    """TSE pairs from a folder or file of pickles/JSONL.

    Args:
        source: a folder of ``<construction>.pickle`` / ``.jsonl`` files, or one such file.
        constructions: the constructions to load (default all).
        sample_per_construction: keep a seeded random sample of this many pairs per construction (default all).
        seed: seed of that sample.
        sentence_case: capitalise the first letter and add a final period to every sentence.
        npi_pairs: ``both`` pairs of each NPI triple, or only the ``last`` (good vs the last sentence).

    Returns:
        ``suite='tse', construction, condition, pair_id, sentence_good, sentence_bad, item, variant``.
    """
    if source is None:
        raise NegmonitorError(f"TSE has no hub copy — {_FIX}")
    path = Path(source).expanduser()
    if path.is_dir():
        files = {p.stem: p for p in sorted(path.iterdir()) if p.suffix in SUFFIXES}
        if not files:
            raise NegmonitorError(f"no .pickle or .jsonl files in {path} — {_FIX}")
    elif path.is_file():
        files = {path.stem: path}
    else:
        raise NegmonitorError(f"no such file or folder: {source} — {_FIX}")
    names = select_names(constructions, sorted(files), "TSE construction", "--tse-constructions")
    frames = [_pairs_from_file(files[name], name) for name in names]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(COLUMNS))
    df = keep_npi_pairs(df, npi_pairs)
    if sentence_case:
        df["sentence_good"] = df["sentence_good"].map(to_sentence_case)
        df["sentence_bad"] = df["sentence_bad"].map(to_sentence_case)
    return sample_per_group(df, "construction", sample_per_construction, seed)


def _pairs_from_file(path: Path, construction: str) -> pd.DataFrame:
    """The pairs of one construction file, as a table with the :data:`COLUMNS`."""
    if path.suffix == ".jsonl":
        records = read_jsonl(path, required=("sentence_good", "sentence_bad"))
        conditions: dict[str, list[tuple[str, ...]]] = {}
        for r in records:
            conditions.setdefault(str(r.get("condition", "all")), []).append(
                (str(r["sentence_good"]), str(r["sentence_bad"])))
    else:
        conditions = _validate(safe_load_pickle(path), path)
    columns: dict[str, list] = {name: [] for name in ("condition", "sentence_good", "sentence_bad", "item",
                                                      "variant")}
    for condition, tuples in conditions.items():
        for item, tup in enumerate(tuples):
            for variant, bad in enumerate(tup[1:], start=1):
                columns["condition"].append(condition)
                columns["sentence_good"].append(tup[0])
                columns["sentence_bad"].append(bad)
                columns["item"].append(item)
                columns["variant"].append(variant)
    n = len(columns["condition"])
    return pd.DataFrame({"suite": ["tse"] * n, "construction": [construction] * n, "condition": columns["condition"],
                         "pair_id": np.arange(n, dtype=np.int64), "sentence_good": columns["sentence_good"],
                         "sentence_bad": columns["sentence_bad"],
                         "item": np.asarray(columns["item"], dtype=np.int64),
                         "variant": np.asarray(columns["variant"], dtype=np.int64)}, columns=list(COLUMNS))


def _validate(obj: Any, path: Path) -> dict[str, list[tuple[str, ...]]]:
    """Check the pickle's layout (condition -> list of 2- or 3-tuples of strings); decode bytes."""
    if not isinstance(obj, dict):
        raise NegmonitorError(f"{path}: expected a dict of condition -> list of sentence tuples, got "
                              f"{type(obj).__name__} — {_FIX}")
    out = {}
    for condition, tuples in obj.items():
        if not isinstance(tuples, (list, tuple)):
            raise NegmonitorError(f"{path}: condition {condition!r} holds {type(tuples).__name__}, not a list — "
                                  f"{_FIX}")
        out[_text(condition)] = [_sentence_tuple(t, path, condition) for t in tuples]
    return out


def _sentence_tuple(value: Any, path: Path, condition: Any) -> tuple[str, ...]:
    """A (good, bad[, bad2]) tuple of strings, or a clear error."""
    if isinstance(value, (list, tuple)) and 2 <= len(value) <= 3:
        if all(type(s) is str for s in value):  # the common case, checked first for speed
            return tuple(value)
        if all(isinstance(s, (str, bytes)) for s in value):
            return tuple(_text(s) for s in value)
    raise NegmonitorError(f"{path}: condition {_text(condition)!r} has an entry that is not a (good, bad[, bad2]) "
                          f"tuple of strings: {str(value)[:80]} — {_FIX}")


def _text(value: Any) -> str:
    """A str (bytes from Python 2 pickles are decoded as UTF-8)."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def keep_npi_pairs(df: pd.DataFrame, npi_pairs: str) -> pd.DataFrame:
    """``df`` with both pairs of each NPI triple (``both``) or only the one against its last sentence (``last``).

    Tables without ``variant``/``item`` columns (BLiMP, the built-in grammar) come back unchanged.
    """
    check_choice(npi_pairs, NPI_PAIRS, "npi_pairs")
    if npi_pairs == "both" or len(df) == 0 or not {"variant", "item"} <= set(df.columns):
        return df
    keys = [c for c in ("construction", "condition", "item") if c in df.columns]
    last = df.groupby(keys, sort=False)["variant"].transform("max")
    return df[df["variant"] == last].reset_index(drop=True)


def to_sentence_case(sentence: str) -> str:
    """Capitalise the first letter and end with a period (unless it already ends in . ! or ?)."""
    sentence = sentence.strip()
    if not sentence:
        return sentence
    sentence = sentence[0].upper() + sentence[1:]
    return sentence if sentence[-1] in ".!?" else sentence + "."


def tse_accuracy(scored: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per construction, per (construction, condition) and overall (pooled over pairs), with SEs.

    Returns a long table ``level, group, accuracy, n, se``; a condition's ``group`` is ``construction/condition``.
    """
    return accuracy_levels(scored, LEVELS)
