"""Tests for negmonitor.evaluation.lm_eval_bridge, offline, with custom local tasks on a tiny model."""

from __future__ import annotations

import json

import pytest

from negmonitor.errors import NegmonitorError
from negmonitor.evaluation.lm_eval_bridge import RESULT_COLUMNS, _task_manager, results_table, run_lm_eval
from tiny_models import tiny_causal_lm, tiny_tokenizer, zero_negative_mlp

pytest.importorskip("lm_eval")

MC_TASK = """\
task: tiny_agreement_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prefix}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

LL_TASK = """\
task: tiny_agreement_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{prefix}}}}"
doc_to_target: "{{{{choices[label]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""




@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    """Two custom tasks over one local JSONL file; the hub is switched off."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    data = tmp_path / "agreement.jsonl"
    subjects = ["The author", "The authors", "The guard", "The guards", "The cat", "The cats"]
    rows = [{"prefix": s, "choices": [" laughs", " laugh"], "label": i % 2} for i, s in enumerate(subjects * 2)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(MC_TASK.format(data=data), encoding="utf-8")
    (tasks / "ll.yaml").write_text(LL_TASK.format(data=data), encoding="utf-8")
    return tasks


def test_custom_tasks_offline_and_patched_model(task_dir):
    model = tiny_causal_lm("neox", init_range=0.3).train()
    model.gpt_neox.layers[1].eval()  # a part frozen in eval mode keeps its own flag
    tok = tiny_tokenizer(pad=False)
    plain = run_lm_eval(model, tok, ["tiny_agreement_mc", "tiny_agreement_ll"], batch_size=4, task_dirs=task_dir)
    assert list(plain.columns) == list(RESULT_COLUMNS)
    assert set(plain["task"]) == {"tiny_agreement_mc", "tiny_agreement_ll"}
    acc = plain.query("task == 'tiny_agreement_mc' and metric == 'acc'").iloc[0]
    assert 0.0 <= acc["value"] <= 1.0 and acc["stderr"] > 0 and acc["n_samples"] == 12
    assert (plain["batch_size"] == 4).all() and plain.attrs["lm_eval"]["batch_size"] == 4
    assert plain.query("metric == 'perplexity'")["value"].item() > 1.0
    assert model.training and tok.pad_token is None  # training flag restored, tokenizer untouched
    assert model.gpt_neox.layers[0].training and not model.gpt_neox.layers[1].training

    act = model.gpt_neox.layers[0].mlp.act
    with zero_negative_mlp(model):
        patched = run_lm_eval(model, tok, ["tiny_agreement_mc", "tiny_agreement_ll"], batch_size=4,
                              task_dirs=[task_dir])
        assert model.gpt_neox.layers[0].mlp.act is not act  # still patched after the run
    assert model.gpt_neox.layers[0].mlp.act is act
    structure = ["task", "metric", "filter", "n_samples", "num_fewshot", "batch_size"]
    assert patched[structure].equals(plain[structure])
    assert patched["value"].between(0, float("inf")).all()
    assert not patched["value"].equals(plain["value"])  # the patch is really in the evaluated model


def test_limit_is_applied_and_recorded(task_dir):
    table = run_lm_eval(tiny_causal_lm("gpt2"), tiny_tokenizer(), "tiny_agreement_mc", batch_size=2, limit=5,
                        task_dirs=task_dir)
    row = table.iloc[0]
    assert (row["n_samples"], row["limit"], row["batch_size"]) == (5, 5, 2)


def test_bad_arguments():
    model, tok = tiny_causal_lm("neox"), tiny_tokenizer()
    with pytest.raises(NegmonitorError, match="batch_size"):
        run_lm_eval(model, tok, ["x"], batch_size="auto")
    with pytest.raises(NegmonitorError, match="task folder not found"):
        run_lm_eval(model, tok, ["x"], task_dirs="/nonexistent/tasks")
    with pytest.raises(NegmonitorError, match="no lm-eval tasks"):
        run_lm_eval(model, tok, [])


def test_unknown_task_message():
    class FakeManager:
        def __init__(self, include_path=None, include_defaults=True):
            self.all_tasks = ["known"] + (["builtin"] if include_defaults else [])

    assert _task_manager(FakeManager, ["known"], ["dir"]).all_tasks == ["known"]  # custom folder alone suffices
    assert "builtin" in _task_manager(FakeManager, ["known", "builtin"], ["dir"]).all_tasks
    with pytest.raises(NegmonitorError, match="unknown lm-eval task 'nope'"):
        _task_manager(FakeManager, ["nope"], [])


def test_results_table_skips_non_numeric():
    results = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "f1,none": 0.25,
                                 "f1_stderr,none": 0.1}},
               "n-samples": {"t": {"original": 10, "effective": 8}}, "n-shot": {"t": 0}}
    table = results_table(results, batch_size=16)
    assert table["metric"].tolist() == ["acc", "f1"]
    assert table["stderr"].isna().tolist() == [True, False]
    assert table["n_samples"].tolist() == [8, 8] and table["batch_size"].tolist() == [16, 16]


def test_the_run_scores_without_a_kv_cache_and_leaves_the_callers_state(task_dir):
    """lm-eval's scoring forwards build no KV cache (config.use_cache off during the run, restored after), and the
    global random streams simple_evaluate reseeds are given back as they were (it may run inside training)."""
    import random

    import numpy as np
    import torch

    model = tiny_causal_lm("neox", init_range=0.3)
    seen: list = []
    handle = model.register_forward_pre_hook(lambda module, args: seen.append(module.config.use_cache))
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    try:
        run_lm_eval(model, tiny_tokenizer(pad=False), ["tiny_agreement_mc"], batch_size=4, task_dirs=task_dir)
    finally:
        handle.remove()
    assert seen and not any(seen) and model.config.use_cache is True
    assert random.getstate() == before[0] and (np.random.get_state()[1] == before[1]).all()
    assert torch.equal(torch.get_rng_state(), before[2])


def test_out_of_memory_halves_the_lm_eval_batch_and_later_conditions_start_there(monkeypatch):
    import pandas as pd
    import torch

    import negmonitor.evaluation as evaluation
    from negmonitor.ablation import AblationSettings, _lm_eval
    from negmonitor.budget import BatchLimit

    sizes: list[int] = []

    def out_of_memory_above_two(model, tokenizer, tasks, batch_size, **kwargs):
        sizes.append(batch_size)
        if batch_size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return pd.DataFrame([{"task": "t", "metric": "acc", "filter": "none", "value": 0.5, "stderr": 0.1,
                              "n_samples": 10, "num_fewshot": 0, "batch_size": batch_size, "limit": None}])

    monkeypatch.setattr(evaluation, "run_lm_eval", out_of_memory_above_two)
    kept = BatchLimit()
    with pytest.warns(UserWarning, match="out of memory during lm-eval; retrying with batch size 2"):
        metrics, _ = _lm_eval(tiny_causal_lm("neox"), None, ["t"], AblationSettings(batch_size=8), kept)
    assert sizes == [8, 4, 2] and kept.batch_size == 2 and metrics == {"lm_eval:t": 0.5}
    sizes.clear()
    _lm_eval(tiny_causal_lm("neox"), None, ["t"], AblationSettings(batch_size=8), kept)
    assert sizes == [2]
