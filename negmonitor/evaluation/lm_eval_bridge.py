"""Run EleutherAI's lm-evaluation-harness on an in-memory model (e.g. one with an ablation patched in).

The model object itself is wrapped in ``lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=...)`` and
evaluated with ``lm_eval.simple_evaluate``, so hooks and swapped activation modules stay active. Custom tasks are
YAML files in ``task_dirs`` (passed to ``TaskManager(include_path=...)``); a local task needs no network, e.g.::

    task: my_task
    dataset_path: json
    dataset_kwargs: {data_files: {test: /path/to/data.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{question}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: "{{label}}"
    metric_list: [{metric: acc}]

The batch size is fixed (never ``"auto"``: padding can change scores slightly) and recorded in every row of the
result. The caller's tokenizer is copied (lm-eval may add a pad token to it); the train/eval flag of each module and
``config.use_cache`` (off during the run: lm-eval's scoring forwards would otherwise build a KV cache nothing reads,
~12 GB for Pythia-12B at 8 x 2,048 tokens) are restored afterwards, and so are the global random streams that
``simple_evaluate`` reseeds (Python's, NumPy's, torch's), since this can run inside a training job.

Example::

    >>> table = run_lm_eval(model, tokenizer, ["my_task"], batch_size=8, task_dirs=["tasks/"])
    >>> table[["task", "metric", "value", "stderr", "batch_size"]]
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from torch import nn

from negmonitor.errors import NegmonitorError
from negmonitor.evaluation._common import check_batch_size, eval_mode, model_device

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

RESULT_COLUMNS = ("task", "metric", "filter", "value", "stderr", "n_samples", "num_fewshot", "batch_size", "limit")


def run_lm_eval(model: nn.Module, tokenizer: PreTrainedTokenizerBase, tasks: str | Sequence[str], batch_size: int = 8,
                limit: int | float | None = None, task_dirs: str | os.PathLike | Iterable | None = None,
                num_fewshot: int | None = None, bootstrap_iters: int = 1000) -> pd.DataFrame:
    """Evaluate ``model`` on lm-eval ``tasks``; one row per (task, metric, filter).

    Args:
        tasks: task, group or tag names, or paths of task YAML files.
        batch_size: fixed batch size, recorded in the ``batch_size`` column and ``attrs["lm_eval"]``.
        limit: at most this many documents per task (a float < 1: that fraction).
        task_dirs: folder(s) of custom task YAML files.
        num_fewshot: few-shot examples (default: each task's own setting, else 0).
        bootstrap_iters: bootstrap draws for standard errors without a closed form (0: no standard errors).

    Returns:
        DataFrame ``task, metric, filter, value, stderr, n_samples, num_fewshot, batch_size, limit``; its
        ``attrs["lm_eval"]`` holds the run's settings and lm-eval's version.

    Raises:
        NegmonitorError: lm-eval missing, an unknown task, a missing task folder, or data that cannot be loaded.
    """
    check_batch_size(batch_size)
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise NegmonitorError("no lm-eval tasks given — pass at least one task name")
    manager = _task_manager(TaskManager, names, _task_paths(task_dirs))
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    try:
        if use_cache is not None:
            config.use_cache = False
        with _random_streams_kept(), eval_mode(model):
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size,
                      device=str(model_device(model)))
            results = _evaluate(lm_eval, lm, names, manager, batch_size, limit, num_fewshot, bootstrap_iters)
    finally:
        if use_cache is not None:
            config.use_cache = use_cache
    return results_table(results, batch_size=batch_size, limit=limit, num_fewshot=num_fewshot)


def check_lm_eval_tasks(tasks: Sequence[str], task_dirs: str | os.PathLike | Iterable | None = None) -> None:
    """Refuse an unknown task or a missing task folder now, in one line (before a model loads and is probed).

    Raises:
        NegmonitorError: lm-eval missing, an unknown task, or a missing task folder.
    """
    _, _, TaskManager = _import_lm_eval()
    _task_manager(TaskManager, list(tasks), _task_paths(task_dirs))


@contextlib.contextmanager
def _random_streams_kept() -> Iterator[None]:
    """Give back the global random streams ``simple_evaluate`` reseeds: Python's and NumPy's here, torch's (CPU and
    initialised CUDA devices) through ``torch.random.fork_rng``."""
    import random

    import numpy as np
    import torch

    python, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)


def _import_lm_eval() -> tuple[Any, Any, Any]:
    """lm-eval's module, ``HFLM`` and ``TaskManager`` (imported lazily: the import takes seconds)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise NegmonitorError(f"lm-eval is not installed ({err}) — pip install lm-eval") from None
    return lm_eval, HFLM, TaskManager


def _task_paths(task_dirs: str | os.PathLike | Iterable | None) -> list[str]:
    """The task folders as strings; a missing one raises."""
    if task_dirs is None:
        return []
    dirs = [task_dirs] if isinstance(task_dirs, (str, os.PathLike)) else list(task_dirs)
    missing = [str(d) for d in dirs if not Path(d).exists()]
    if missing:
        raise NegmonitorError(f"lm-eval task folder not found: {missing[0]} — pass an existing folder of task YAMLs")
    return [str(d) for d in dirs]


def _task_manager(TaskManager: Any, names: list[str], paths: list[str]) -> Any:
    """A TaskManager that knows every task: custom folders alone if enough (fast), else with lm-eval's own."""
    if paths:
        manager = TaskManager(include_path=paths, include_defaults=False)
        if not _unknown(manager, names):
            return manager
    manager = TaskManager(include_path=paths or None)
    unknown = _unknown(manager, names)
    if unknown:
        raise NegmonitorError(f"unknown lm-eval task {unknown[0]!r} — check the name (lm-eval ls tasks) or pass "
                              "the folder of its YAML with task_dirs")
    return manager


def _unknown(manager: Any, names: list[str]) -> list[str]:
    """Names that are neither registered in ``manager`` nor paths of YAML files."""
    known = set(manager.all_tasks)
    return [n for n in names if n not in known and not (n.endswith((".yaml", ".yml")) and Path(n).is_file())]


def _evaluate(lm_eval: Any, lm: Any, names: list[str], manager: Any, batch_size: int,
              limit: int | float | None, num_fewshot: int | None, bootstrap_iters: int) -> dict:
    """``lm_eval.simple_evaluate`` with data-loading failures turned into one-line errors."""
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, batch_size=batch_size,
                                       limit=limit, num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters,
                                       log_samples=False)
    except (ConnectionError, FileNotFoundError) as err:
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise NegmonitorError(f"lm-eval could not load the data of {', '.join(names)}: {reason} — run once online "
                              "to cache it, or define a local task (dataset_path: json) in task_dirs") from err


def results_table(results: dict, batch_size: int, limit: int | float | None = None,
                  num_fewshot: int | None = None) -> pd.DataFrame:
    """Flatten lm-eval's ``results`` dict into rows ``task, metric, filter, value, stderr, ...``."""
    rows = []
    n_samples, n_shot = results.get("n-samples", {}), results.get("n-shot", {})
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not _is_number(value):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric, "filter": filt, "value": float(value),
                         "stderr": float(stderr) if _is_number(stderr) else math.nan,
                         "n_samples": n_samples.get(task, {}).get("effective", -1),
                         "num_fewshot": n_shot.get(task, num_fewshot if num_fewshot is not None else -1),
                         "batch_size": batch_size, "limit": limit})
    table = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    table.attrs["lm_eval"] = {"batch_size": batch_size, "limit": limit, "num_fewshot": num_fewshot,
                              "lm_eval_version": results.get("lm_eval_version"),
                              "versions": {k: str(v) for k, v in results.get("versions", {}).items()}}
    return table


def _is_number(value: Any) -> bool:
    """True for real numbers (not bools, not lm-eval's ``"N/A"``)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
