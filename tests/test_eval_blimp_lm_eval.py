"""Outside check: negmonitor's BLiMP accuracy (summed log-probability behind the BOS/EOS prefix) equals lm-eval's own
``blimp`` task template, pointed at the local JSONL files and run offline on the same tiny model.

lm-eval's template scores each sentence as the continuation of an empty context, i.e. behind the BOS/EOS token,
but with its ``target_delimiter`` (a space) in front: ``BOS + " The cat ..."``. So the unchanged template equals
negmonitor on the sentences with a leading space, and the template with ``target_delimiter: ""`` equals
negmonitor on the sentences as released (negmonitor's default).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from negmonitor.evaluation import blimp_accuracy, evaluate_pairs, load_blimp, run_lm_eval
from tiny_models import tiny_causal_lm, tiny_tokenizer

lm_eval = pytest.importorskip("lm_eval")

UIDS = ("only_npi_scope", "regular_plural_subject_verb_agreement_1")
N_PAIRS = 150
TEMPLATE = Path(lm_eval.__file__).parent / "tasks" / "blimp" / "_template_yaml"


@pytest.fixture
def blimp_tasks(tmp_path, monkeypatch, shared_data):
    """The first pairs of two UIDs as local JSONL, and lm-eval task YAMLs that include the BLiMP template."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    if not TEMPLATE.is_file():
        pytest.skip(f"lm-eval's BLiMP template not found at {TEMPLATE}")
    data, tasks = tmp_path / "blimp", tmp_path / "tasks"
    data.mkdir()
    tasks.mkdir()
    for uid in UIDS:
        lines = (shared_data / "blimp" / f"{uid}.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
        (data / f"{uid}.jsonl").write_text("".join(lines[:N_PAIRS]), encoding="utf-8")
        for suffix, extra in (("", ""), ("_nodelim", 'target_delimiter: ""\n')):
            (tasks / f"{uid}{suffix}.yaml").write_text(
                f"include: {TEMPLATE}\ntask: nm_blimp_{uid}{suffix}\ndataset_path: json\n"
                f"dataset_kwargs:\n  data_files:\n    train: {data / f'{uid}.jsonl'}\n{extra}", encoding="utf-8")
    return data, tasks


def test_blimp_accuracy_equals_lm_evals_template(blimp_tasks):
    data, tasks = blimp_tasks
    model, tokenizer = tiny_causal_lm("neox", init_range=0.3), tiny_tokenizer()
    names = [f"nm_blimp_{uid}{suffix}" for uid in UIDS for suffix in ("", "_nodelim")]
    table = run_lm_eval(model, tokenizer, names, batch_size=16, task_dirs=tasks, bootstrap_iters=0)
    lm_acc = table.query("metric == 'acc'").set_index("task")["value"]

    pairs = load_blimp(data)
    assert len(pairs) == len(UIDS) * N_PAIRS
    spaced = pairs.assign(sentence_good=" " + pairs.sentence_good, sentence_bad=" " + pairs.sentence_bad)
    for suffix, frame in (("", spaced), ("_nodelim", pairs)):
        ours = blimp_accuracy(evaluate_pairs(model, tokenizer, frame, batch_size=16, score="sum", prefix="bos"))
        ours = ours.query("level == 'uid'").set_index("group")["accuracy"]
        for uid in UIDS:
            assert ours[uid] == pytest.approx(lm_acc[f"nm_blimp_{uid}{suffix}"], abs=1e-12), (uid, suffix)
