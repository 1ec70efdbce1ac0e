"""The Hugging Face Trainer callback on real ``transformers.Trainer`` runs of a tiny GPT-NeoX: schedule, records,
event files, the same numbers as the engine, and under DDP (2 gloo processes) only rank zero writes."""

from __future__ import annotations

import json
import warnings
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_helpers import TEXT, run_script
from negmonitor.monitoring import tensorboard as tb
from negmonitor.monitoring.engine import MonitorSettings, MonitorState, take_measurement
from negmonitor.probeset import ProbeSet
from negmonitor.records import RecordStore
from tiny_models import tiny_causal_lm, tiny_tokenizer

PROBE = dict(probe_tokens=1_024, probe_window=64, n_pairs=100)


class _Blocks(torch.utils.data.Dataset):
    """Causal-LM examples (``input_ids`` = ``labels``) cut from TEXT."""

    def __init__(self, tokenizer, seq_len: int = 32) -> None:
        ids = tokenizer(TEXT)["input_ids"]
        self.blocks = [torch.tensor(ids[i:i + seq_len]) for i in range(0, len(ids) - seq_len, seq_len)]

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def _args(output_dir, max_steps: int, **kwargs):
    from transformers import TrainingArguments

    settings = dict(per_device_train_batch_size=8, learning_rate=3e-3, report_to=[], use_cpu=True, save_strategy="no",
                    logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    return TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, **{**settings, **kwargs})


def test_hf_trainer_run_gets_the_lightning_monitors_records_and_tags(tmp_path) -> None:
    from transformers import Trainer

    from negmonitor.integrations.hf import NegativeDifferentiationCallback

    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm("neox").train()
    callback = NegativeDifferentiationCallback(probe=[TEXT], every_n_steps=4, log_spaced_until=2, media_every_n_steps=4,
                                               **PROBE)
    trainer = Trainer(model=model, args=_args(tmp_path / "out", 5, include_num_input_tokens_seen=True),
                      train_dataset=_Blocks(tokenizer), processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    assert callback.measured_steps == [0, 1, 2, 4, 5]  # log-spaced, every 4, and the end of training
    records = tmp_path / "out" / "negmonitor"
    assert callback.records_dir == records
    store = RecordStore(records)
    scalars = store.read_scalars()
    assert sorted(scalars.step.unique()) == [0, 1, 2, 4, 5]
    assert set(scalars.run) == {"out"}
    assert scalars.groupby("step").tokens_seen.first().tolist() == [0, 256, 512, 1024, 1280]  # 8 x 32 per step
    assert {"wd/max", "wd/cohort_mean", "pairs/nn_share", "md/mean", "drift/cohort_vs_rest"} <= set(scalars.metric)
    (info,) = records.glob("run-*.json")
    assert json.loads(info.read_text())["family"] == "gpt_neox"

    # step 0 is the engine's measurement of the initial weights, as the Lightning callback would record it
    fresh = tiny_causal_lm("neox")
    probe_set = ProbeSet.build([TEXT], tokenizer, n_tokens=1_024, window=64, n_pairs=100,
                               max_positions=fresh.config.max_position_embeddings)
    direct = take_measurement(fresh, probe_set, 0, callback.monitor.settings, MonitorState(), tokenizer)
    recorded = store.read_neurons()
    recorded = recorded[recorded.step == 0].sort_values(["layer", "neuron"])
    for column in ("wd", "wd_neg", "md", "mean"):
        np.testing.assert_allclose(recorded[column].to_numpy(), direct.neurons.sort_values(["layer", "neuron"])[column]
                                   .to_numpy(), rtol=1e-6, atol=1e-9, err_msg=column)

    acc = EventAccumulator(str(records), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    at_step = tb.scalar_metrics(scalars[scalars.step == 4])
    assert set(at_step) <= set(tags["scalars"])  # the README's tags, the same as a Lightning run's
    assert "negmonitor/wd/max/layer_01" in at_step and "negmonitor/wd/cohort_mean" in at_step
    assert [e.step for e in acc.Scalars("negmonitor/wd/max/layer_01")] == [0, 1, 2, 4, 5]
    value = {e.step: e.value for e in acc.Scalars("negmonitor/wd/max/layer_01")}[4]
    assert value == pytest.approx(at_step["negmonitor/wd/max/layer_01"], rel=1e-6)
    assert "negmonitor/wd/distribution/layer_00" in tags["histograms"]
    assert "negmonitor/images/top_neurons/layer_01" in tags["images"]
    assert any(t.startswith("negmonitor/pairs/top/layer_00") for t in tags["tensors"])
    assert model.training  # the measurement left train mode as it found it


def test_hf_resume_from_a_checkpoint_gives_the_same_records(tmp_path) -> None:
    from transformers import Trainer

    from negmonitor.integrations.hf import NegativeDifferentiationCallback

    def run(output_dir, max_steps, resume=None):
        tokenizer = tiny_tokenizer()
        callback = NegativeDifferentiationCallback(probe=[TEXT], every_n_steps=2, **PROBE)
        args = _args(output_dir, max_steps, save_strategy="steps", save_steps=2, lr_scheduler_type="constant")
        # Llama: transformers 5.24 does not load a GPT-NeoX checkpoint's LM head back ('embed_out.weight'
        # unexpected), so a resumed GPT-NeoX run trains differently whatever the monitor does
        model = tiny_causal_lm("llama").train()
        Trainer(model=model, args=args, train_dataset=_Blocks(tokenizer), processing_class=tokenizer,
                callbacks=[callback]).train(resume_from_checkpoint=resume)
        return callback

    run(tmp_path / "full", 6)
    run(tmp_path / "cut", 2)  # a run that stopped after its checkpoint at step 2 (constant lr: the same updates)
    resumed = run(tmp_path / "cut", 6, resume=str(tmp_path / "cut" / "checkpoint-2"))
    assert resumed.measured_steps == [0, 2, 4, 6]  # the measured steps came back with the state
    assert resumed.monitor.state.cohort_step == 0  # the cohort fixed before the cut, not again after it
    full = RecordStore(tmp_path / "full" / "negmonitor").read_scalars()
    cut = RecordStore(tmp_path / "cut" / "negmonitor").read_scalars()
    assert sorted(cut.step.unique()) == [0, 2, 4, 6]
    assert "drift/cohort_vs_rest" in set(cut[cut.step == 4].metric)  # drift since the step-2 snapshot
    pd.testing.assert_frame_equal(full.drop(columns="run"), cut.drop(columns="run"), check_exact=False, rtol=1e-5,
                                  atol=1e-7)


def test_hf_callback_needs_a_probe_and_refuses_fsdp(tmp_path) -> None:
    from transformers import Trainer

    from negmonitor.errors import NegmonitorError
    from negmonitor.integrations.hf import NegativeDifferentiationCallback

    with pytest.raises(NegmonitorError, match="needs probe text"):
        NegativeDifferentiationCallback(probe=None)
    with pytest.raises(NegmonitorError, match="cohort_frac"):
        NegativeDifferentiationCallback(probe=[TEXT], cohort_frac=2.0)
    tokenizer = tiny_tokenizer()
    callback = NegativeDifferentiationCallback(probe=[TEXT], **PROBE)
    trainer = Trainer(model=tiny_causal_lm("neox"), args=_args(tmp_path / "out", 1), train_dataset=_Blocks(tokenizer),
                      callbacks=[callback])
    with pytest.raises(NegmonitorError, match="no tokenizer"):
        trainer.train()


@pytest.mark.parametrize("bad, message", [({"layers": [7]}, "layer 7 is out of range"),
                                          ({"memory_budget": "1KiB"}, "budget")])
def test_hf_set_up_refused_leaves_no_event_file_nor_run_json(tmp_path, bad, message) -> None:
    """A run refused at set-up left an empty TensorBoard run (and, for the budget, a run.json the report read as a
    run that never measured)."""
    from transformers import Trainer

    from negmonitor.errors import NegmonitorError
    from negmonitor.integrations.hf import NegativeDifferentiationCallback

    tokenizer = tiny_tokenizer()
    callback = NegativeDifferentiationCallback(probe=[TEXT], **{**PROBE, **bad})
    trainer = Trainer(model=tiny_causal_lm("neox"), args=_args(tmp_path / "out", 1), train_dataset=_Blocks(tokenizer),
                      processing_class=tokenizer, callbacks=[callback])
    with pytest.raises(NegmonitorError, match=message):
        trainer.train()
    left = [p.name for p in tmp_path.rglob("*") if p.is_file() and ("tfevents" in p.name or p.name.startswith("run-"))]
    assert left == [] and callback._writer is None


DDP_SCRIPT = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[2])
    import torch
    from transformers import Trainer
    from test_hf_trainer import PROBE, TEXT, _Blocks, _args
    from tiny_models import tiny_causal_lm, tiny_tokenizer
    from negmonitor.integrations.hf import NegativeDifferentiationCallback

    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    callback = NegativeDifferentiationCallback(probe=[TEXT], every_n_steps=2, **PROBE)
    trainer = Trainer(model=tiny_causal_lm("neox").train(), args=_args(sys.argv[1], 2), train_dataset=_Blocks(tokenizer),
                      processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    with open(f"{sys.argv[1]}/measured-{trainer.args.process_index}.txt", "w") as f:  # not stdout: ranks interleave
        f.write(str(callback.measured_steps))
''')


def test_hf_trainer_ddp_measures_on_every_rank_and_rank_zero_writes(tmp_path) -> None:
    code, stdout, stderr = run_script(
        tmp_path, "hf_ddp.py", DDP_SCRIPT, str(tmp_path / "out"), str(Path(__file__).parent),
        launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        extra_env={"OMP_NUM_THREADS": "1"}, timeout=300, hang="2-process HF Trainer run hung")
    assert code == 0, stderr[-3000:]
    measured = [(tmp_path / "out" / f"measured-{rank}.txt").read_text() for rank in (0, 1)]
    assert measured == ["[0, 2]", "[0, 2]"], (measured, stdout[-2000:])
    store = RecordStore(tmp_path / "out" / "negmonitor")
    scalars = store.read_scalars()
    assert sorted(scalars.step.unique()) == [0, 2]
    assert scalars.groupby(["run", "step", "layer", "metric"]).size().max() == 1

    tokenizer = tiny_tokenizer()  # step 0 of the 2-process run equals one process measuring the same weights
    fresh = tiny_causal_lm("neox")
    probe_set = ProbeSet.build([TEXT], tokenizer, n_tokens=1_024, window=64, n_pairs=100,
                               max_positions=fresh.config.max_position_embeddings)
    single = take_measurement(fresh, probe_set, 0, MonitorSettings(), MonitorState()).neurons
    ddp = store.read_neurons()
    ddp = ddp[ddp.step == 0].sort_values(["layer", "neuron"])
    np.testing.assert_allclose(ddp.wd.to_numpy(), single.sort_values(["layer", "neuron"]).wd.to_numpy(), atol=1e-4)


DDP_RESUME_SCRIPT = textwrap.dedent('''
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    import torch
    from transformers import Trainer
    from test_hf_trainer import PROBE, TEXT, _Blocks, _args
    from tiny_models import tiny_causal_lm, tiny_tokenizer
    from negmonitor.integrations.hf import NegativeDifferentiationCallback

    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    callback = NegativeDifferentiationCallback(probe=[TEXT], every_n_steps=2, **PROBE)
    resume = sys.argv[3] == "resume"
    args = _args(sys.argv[1], 4 if resume else 2, save_strategy="steps", save_steps=2, lr_scheduler_type="constant")
    trainer = Trainer(model=tiny_causal_lm("llama").train(), args=args, train_dataset=_Blocks(tokenizer),
                      processing_class=tokenizer, callbacks=[callback])
    if resume and trainer.args.process_index == 1:  # another node's disk: the checkpoint without the monitor's state
        callback._state_path = lambda args, step: Path(sys.argv[1]) / "not-on-this-node.pt"
    trainer.train(resume_from_checkpoint=f"{sys.argv[1]}/checkpoint-2" if resume else None)
    with open(f"{sys.argv[1]}/measured-{sys.argv[3]}-{trainer.args.process_index}.txt", "w") as f:
        f.write(str(callback.measured_steps))
''')


def test_hf_ddp_resume_gives_every_rank_rank_zeros_state(tmp_path) -> None:
    """Only rank 0 saves the monitor's state beside a checkpoint; a rank whose disk lacks it (another node, with
    ``save_on_each_node``) resumes with rank 0's, so both agree that step 2 was measured (a rank that measured it
    again alone would wait in collectives the other never joins)."""
    out = tmp_path / "out"
    for mode in ("first", "resume"):
        code, stdout, stderr = run_script(
            tmp_path, f"hf_ddp_{mode}.py", DDP_RESUME_SCRIPT, str(out), str(Path(__file__).parent), mode,
            launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
            extra_env={"OMP_NUM_THREADS": "1"}, timeout=300, hang=f"2-process HF Trainer run hung ({mode})")
        assert code == 0, stderr[-3000:]
    measured = [(out / f"measured-resume-{rank}.txt").read_text() for rank in (0, 1)]
    assert measured == ["[0, 2, 4]", "[0, 2, 4]"], measured
    assert sorted(RecordStore(out / "negmonitor").read_scalars().step.unique()) == [0, 2, 4]


def _probe_dtypes(model) -> list:
    """Watch the first MLP projection: the dtype of each output computed without grad (the probe's forwards)."""
    seen: list = []
    model.gpt_neox.layers[0].mlp.dense_h_to_4h.register_forward_hook(
        lambda mod, args, out: None if torch.is_grad_enabled() else seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("probe_precision, dtype, recorded", [("trainer", torch.bfloat16, "bf16-mixed"),
                                                              ("fp32", torch.float32, "32-true")])
def test_hf_bf16_training_is_probed_under_its_autocast_and_recorded(tmp_path, probe_precision, dtype,
                                                                    recorded) -> None:
    """``TrainingArguments(bf16=True)`` trains under accelerate's bf16 autocast: the probe forward runs under the
    same autocast by default (fp32 on request), and run.json says which."""
    from transformers import Trainer

    from negmonitor.integrations.hf import NegativeDifferentiationCallback

    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm("neox").train()
    seen = _probe_dtypes(model)
    weight_cache = []  # autocast's cache of half-precision weight copies, in the probe's forwards under autocast
    model.gpt_neox.layers[0].mlp.dense_h_to_4h.register_forward_hook(
        lambda *args: None if torch.is_grad_enabled() or not torch.is_autocast_enabled("cpu")
        else weight_cache.append(torch.is_autocast_cache_enabled()))
    callback = NegativeDifferentiationCallback(probe=[TEXT], every_n_steps=2, families=("wd", "health"),
                                               probe_precision=probe_precision, **PROBE)
    Trainer(model=model, args=_args(tmp_path / "out", 2, bf16=True), train_dataset=_Blocks(tokenizer),
            processing_class=tokenizer, callbacks=[callback]).train()
    assert callback.measured_steps == [0, 2] and seen and set(seen) == {dtype}
    # bf16 copies of the fp32 weights were cached through the measurement (half the model's size, outside the budget)
    assert set(weight_cache) == ({False} if probe_precision == "trainer" else set())
    assert not torch.is_autocast_enabled("cpu")  # the probe left no autocast behind
    (info,) = callback.records_dir.glob("run-*.json")
    assert json.loads(info.read_text())["probe_precision"] == recorded
    scalars = RecordStore(callback.records_dir).read_scalars()
    assert "health/measurement_failed" not in set(scalars.metric) and scalars.value.notna().any()


def test_hf_fp32_training_is_recorded_as_such(tmp_path) -> None:
    from transformers import Trainer

    from negmonitor.integrations.hf import NegativeDifferentiationCallback

    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm("neox").train()
    seen = _probe_dtypes(model)
    callback = NegativeDifferentiationCallback(probe=[TEXT], every_n_steps=2, families=("wd", "health"), **PROBE)
    Trainer(model=model, args=_args(tmp_path / "out", 1), train_dataset=_Blocks(tokenizer),
            processing_class=tokenizer, callbacks=[callback]).train()
    assert seen and set(seen) == {torch.float32}
    (info,) = callback.records_dir.glob("run-*.json")
    assert json.loads(info.read_text())["probe_precision"] == "32-true"


def test_hf_state_that_cannot_be_saved_never_ends_training(tmp_path, monkeypatch) -> None:
    """A full disk while the monitor's state is saved beside an HF checkpoint (``torch.save`` has written part of
    it): one warning, training and its checkpoints go on, no partial state file is left; ``strict`` re-raises."""
    import errno

    from transformers import Trainer

    from negmonitor.integrations.hf import NegativeDifferentiationCallback

    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):  # only the monitor's state file: the Trainer's own saves go through
        if Path(str(f)).name.startswith(".negmonitor-"):
            Path(f).write_bytes(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)

    def run(output_dir, **settings):
        tokenizer = tiny_tokenizer()
        callback = NegativeDifferentiationCallback(probe=[TEXT], every_n_steps=2, families=("wd", "health"),
                                                   **PROBE, **settings)
        trainer = Trainer(model=tiny_causal_lm("neox").train(), args=_args(output_dir, 4, save_strategy="steps",
                                                                           save_steps=2),
                          train_dataset=_Blocks(tokenizer), processing_class=tokenizer, callbacks=[callback])
        trainer.train()
        return trainer, callback

    with pytest.warns(UserWarning, match="could not save the monitor's state") as caught:
        trainer, callback = run(tmp_path / "out")
    assert sum("could not save the monitor's state" in str(w.message) for w in caught) == 1
    assert trainer.state.global_step == 4 and callback.measured_steps == [0, 2, 4]
    for step in (2, 4):
        folder = tmp_path / "out" / f"checkpoint-{step}"
        assert (folder / "trainer_state.json").is_file()  # the Trainer's checkpoint is whole
        assert not list(folder.glob("*negmonitor*")), sorted(p.name for p in folder.iterdir())
    with pytest.raises(OSError, match="No space left"):
        run(tmp_path / "strict", strict=True)


def test_hf_callback_refuses_sharded_training_however_it_is_asked_for(tmp_path, monkeypatch) -> None:
    """FSDP or DeepSpeed from TrainingArguments, from an `accelerate launch --config_file` run (args.fsdp unset:
    only accelerate's state says so) or seen in the parameters (ZeRO-3 partitions) is refused at the start in one
    line; the callback sees the bare model, whose probe forward and weight reads would only meet shards (under an
    accelerate config this used to train for days recording nothing but failures, and could hang under ZeRO-3)."""
    import accelerate.state
    from accelerate.utils import DistributedType
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from negmonitor.errors import NegmonitorError
    from negmonitor.integrations.hf import NegativeDifferentiationCallback

    tokenizer = tiny_tokenizer()

    def begin(args, model):
        callback = NegativeDifferentiationCallback(probe=[TEXT], **PROBE)
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model, processing_class=tokenizer)

    with pytest.raises(NegmonitorError, match=r"does not support FSDP \(TrainingArguments.fsdp\)") as err:
        begin(TrainingArguments(output_dir=str(tmp_path / "a"), fsdp=True, use_cpu=True), tiny_causal_lm())
    assert "\n" not in str(err.value)

    class _State:  # what an accelerate config with `distributed_type: FSDP` leaves for the Trainer
        distributed_type = DistributedType.FSDP

    args, model = _args(tmp_path / "b", 1), tiny_causal_lm()
    monkeypatch.setattr(accelerate.state, "is_initialized", lambda: True)
    monkeypatch.setattr(accelerate.state, "AcceleratorState", _State)
    with pytest.raises(NegmonitorError, match=r"does not support FSDP \(the accelerate config\)"):
        begin(args, model)
    monkeypatch.undo()

    model = tiny_causal_lm()
    next(model.parameters()).ds_id = 0  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    with pytest.raises(NegmonitorError, match=r"does not support DeepSpeed ZeRO-3"):
        begin(_args(tmp_path / "c", 1), model)


def test_a_weight_read_that_meets_a_shard_is_one_clear_line() -> None:
    """The second guard: a projection weight that is not [neurons, inputs] (a flat shard, an empty ZeRO-3
    partition) read outside its wrapper is refused, not passed on to an IndexError deep in the drift."""
    from negmonitor.adapters import find_sites
    from negmonitor.errors import NegmonitorError

    site = find_sites(tiny_causal_lm())[0]
    site.projection.weight = torch.nn.Parameter(torch.empty(0))
    with pytest.raises(NegmonitorError, match=r"has shape \(0,\), not \[neurons, inputs\]: a sharded model"):
        site.weight_rows()


def _hf_run(output_dir, max_steps: int, callbacks=(), resume=None, **arguments):
    """A tiny Llama trained by a real Trainer with the monitor every 2 steps (images only at the final one)."""
    from transformers import Trainer

    from negmonitor.integrations.hf import NegativeDifferentiationCallback

    tokenizer = tiny_tokenizer()
    callback = NegativeDifferentiationCallback(probe=[TEXT], every_n_steps=2, log_spaced_until=0,
                                               media_every_n_steps=1_000, **PROBE)
    blocks = _Blocks(tokenizer)
    Trainer(model=tiny_causal_lm("llama").train(), args=_args(output_dir, max_steps, **arguments),
            train_dataset=blocks, eval_dataset=blocks, processing_class=tokenizer,
            callbacks=[callback, *callbacks]).train(resume_from_checkpoint=resume)
    return callback


def _image_steps(records) -> list[int]:
    acc = EventAccumulator(str(records), size_guidance={"images": 0})
    acc.Reload()
    return sorted({e.step for e in acc.Images("negmonitor/images/top_neurons/layer_00")})


def test_hf_last_step_is_measured_as_final_before_the_best_checkpoint_is_reloaded(tmp_path) -> None:
    from transformers import TrainerCallback

    best = dict(eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2, load_best_model_at_end=True,
                metric_for_best_model="loss", learning_rate=3e-2)
    callback = _hf_run(tmp_path / "best", 5, **best)  # the Trainer puts step 2's or 4's weights back at the end
    assert callback.measured_steps == [0, 2, 4, 5]
    neurons = RecordStore(tmp_path / "best" / "negmonitor").read_neurons()
    wd = {step: frame.sort_values(["layer", "neuron"]).wd.to_numpy() for step, frame in neurons.groupby("step")}
    assert not np.allclose(wd[5], wd[4]) and not np.allclose(wd[5], wd[2])  # step 5's own weights, not the best's
    assert _image_steps(tmp_path / "best" / "negmonitor") == [0, 5]  # media: every 1,000 steps and the final one

    callback = _hf_run(tmp_path / "scheduled", 4)  # the last step is also a scheduled one: still the final one
    assert callback.measured_steps == [0, 2, 4]
    assert _image_steps(tmp_path / "scheduled" / "negmonitor") == [0, 4]

    class StopAt3(TrainerCallback):  # as EarlyStoppingCallback ends a run
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 3

    callback = _hf_run(tmp_path / "early", 8, [StopAt3()])
    assert callback.measured_steps == [0, 2, 3]  # the final measurement of a run stopped early
    with pytest.warns(UserWarning, match=r"no final measurement at step 3: the model now holds the best checkpoint "
                                         r"\(.*checkpoint-2, load_best_model_at_end\)"):
        callback = _hf_run(tmp_path / "early_best", 8, [StopAt3()], **best)
    assert callback.measured_steps == [0, 2]


def test_hf_resume_finds_the_state_where_it_was_resumed_from_or_says_it_starts_afresh(tmp_path) -> None:
    import shutil

    _hf_run(tmp_path / "run", 2, save_strategy="steps", save_steps=2)
    (state_file,) = (tmp_path / "run" / "checkpoint-2").glob("negmonitor-*.pt")
    moved = tmp_path / "elsewhere" / "checkpoint-2"
    shutil.move(str(tmp_path / "run" / "checkpoint-2"), str(moved))  # resumed from a folder outside output_dir
    callback = _hf_run(tmp_path / "run", 4, resume=str(moved), resume_from_checkpoint=str(moved))
    assert callback.measured_steps == [0, 2, 4]  # the state came back from the folder the run resumed from

    (moved / state_file.name).unlink()
    with pytest.warns(UserWarning, match=r"resumed at step 2 without the monitor's state \(looked for .*\): it starts "
                                         r"afresh — a new cohort at its next measurement"):
        callback = _hf_run(tmp_path / "again", 4, resume=str(moved), resume_from_checkpoint=str(moved))
    assert callback.measured_steps == [2, 4]  # step 2 again, as the first measurement of a fresh monitor


def test_hf_resumed_run_keeps_its_records_folder_when_the_logging_dir_changes(tmp_path, monkeypatch) -> None:
    """transformers 4's default logging_dir, <output_dir>/runs/<time>_<host>, is new at every launch (here: the
    TensorBoard folder transformers 5 reads from the environment, changed between launches): a fresh run opens its
    own records folder, a resumed one goes on in the folder it began in."""
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb" / "launch1"))
    _hf_run(tmp_path / "out", 2, save_strategy="steps", save_steps=2)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb" / "launch2"))
    callback = _hf_run(tmp_path / "out", 4, resume=str(tmp_path / "out" / "checkpoint-2"), save_strategy="steps",
                       save_steps=2)
    assert callback.measured_steps == [0, 2, 4]
    scalars = RecordStore(tmp_path / "tb" / "launch1" / "negmonitor").read_scalars()
    assert sorted(scalars.step.unique()) == [0, 2, 4]
    assert not (tmp_path / "tb" / "launch2" / "negmonitor" / "scalars").exists()
    _hf_run(tmp_path / "fresh", 2)  # a fresh run: its own folder, as the environment says
    assert (tmp_path / "tb" / "launch2" / "negmonitor" / "scalars").is_dir()


def test_hf_auto_find_batch_size_retry_is_the_same_run(tmp_path) -> None:
    """auto_find_batch_size: an out-of-memory error restarts training at step 0 with a smaller batch; the monitor
    starts afresh on the same folder without calling its own first attempt's records another run's."""
    from transformers import TrainerCallback

    class OutOfMemoryOnce(TrainerCallback):
        raised = False

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1 and not OutOfMemoryOnce.raised:
                OutOfMemoryOnce.raised = True
                raise torch.OutOfMemoryError("CUDA out of memory. (simulated)")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback = _hf_run(tmp_path / "out", 2, [OutOfMemoryOnce()], auto_find_batch_size=True)
    assert OutOfMemoryOnce.raised and callback.measured_steps == [0, 2]
    assert not [w for w in caught if "already holds" in str(w.message)]
    assert sorted(RecordStore(tmp_path / "out" / "negmonitor").read_scalars().step.unique()) == [0, 2]
