"""The Lightning callbacks on real Trainer runs: TensorBoard tags, records, training untouched, resume."""

from __future__ import annotations

import re
import warnings

import math

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_helpers import TEXT, TinyLM, token_loader, trainer
from negmonitor.callbacks import (NegativeDifferentiationMonitor, PairSignMonitor, WassersteinMonitor,
                                  WeightDriftMonitor)
from negmonitor.records import RecordStore

PROBE = [TEXT]
SMALL = dict(probe=PROBE, probe_tokens=2_048, probe_window=64, n_pairs=200)


def _events(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_monitor_logs_curves_and_records(tmp_path) -> None:
    seed_everything(0)
    module = TinyLM()
    monitor = NegativeDifferentiationMonitor(every_n_steps=4, log_spaced_until=2, media_every_n_steps=8, **SMALL)
    trainer(tmp_path, 10, [monitor]).fit(module, token_loader(module.tokenizer))
    log_dir = tmp_path / "run" / "version_0"
    acc = _events(log_dir)
    tags = acc.Tags()
    for metric in ("wd/max", "wd/cohort_mean", "wd/rest_mean", "wd/neg_share", "pairs/nn_share", "md/mean",
                   "drift/cohort_vs_rest"):
        assert f"negmonitor/{metric}/layer_01" in tags["scalars"], metric
    for metric in ("wd/max", "wd/cohort_mean", "wd/neg_share", "wd/cohort_neg_share", "wd/neg_share_top",
                   "pairs/nn_share"):  # the whole-model curves the README lists (means over layers)
        assert f"negmonitor/{metric}" in tags["scalars"], metric
    steps = [e.step for e in acc.Scalars("negmonitor/wd/max/layer_00")]
    assert steps == [0, 1, 2, 4, 8, 10]
    assert [e.step for e in acc.Scalars("negmonitor/drift/cohort/layer_00")] == [1, 2, 4, 8, 10]
    assert "negmonitor/wd/distribution/layer_00" in tags["histograms"]
    assert "negmonitor/images/top_neurons/layer_01" in tags["images"]
    assert any(t.startswith("negmonitor/pairs/top/layer_00") for t in tags["tensors"])
    assert len([t for t in tags["scalars"] if t.startswith("negmonitor/")]) < 30 * 2 + 10  # bounded, per layer

    store = RecordStore.for_logdir(log_dir)
    scalars = store.read_scalars()
    assert list(scalars.columns) == ["run", "step", "tokens_seen", "layer", "neuron", "metric", "value"]
    assert sorted(scalars.step.unique()) == [0, 1, 2, 4, 8, 10]
    assert scalars.groupby(["step", "layer", "metric"]).size().max() == 1  # no duplicates
    tokens = scalars.groupby("step").tokens_seen.first()
    assert tokens[4] == 4 * 8 * 32 and tokens[0] == 0
    tb = {e.step: e.value for e in acc.Scalars("negmonitor/wd/max/layer_01")}
    rec = scalars[(scalars.metric == "wd/max") & (scalars.layer == 1)].set_index("step").value
    for step, value in tb.items():
        assert math.isclose(value, rec[step], rel_tol=1e-6)
    neurons = store.read_neurons()
    assert {"wd", "wd_neg", "md", "in_cohort", "drift_cos_dissim_norm"} <= set(neurons.columns)
    assert neurons[neurons.step == 10].groupby("layer").in_cohort.sum().tolist() == [3, 3]  # 5% of 64 -> 3 (floor, at least 1)
    assert not list((log_dir / "negmonitor").rglob("*.tmp"))
    import json

    (info_path,) = (log_dir / "negmonitor").glob("run-*.json")
    info = json.loads(info_path.read_text())
    assert info["family"] == "gpt_neox" and info["probe_tokens"] == 2_048 and info["cohort_frac"] == 0.05


def test_weights_identical_with_and_without_monitor(tmp_path) -> None:
    def train(callbacks):
        seed_everything(0)
        module = TinyLM()
        module.model.config.hidden_dropout = 0.0
        trainer(tmp_path / str(len(callbacks)), 6, callbacks).fit(module, token_loader(module.tokenizer))
        return {k: v.clone() for k, v in module.state_dict().items()}

    plain = train([])
    monitored = train([NegativeDifferentiationMonitor(every_n_steps=2, **SMALL)])
    assert plain.keys() == monitored.keys()
    for key in plain:
        assert torch.equal(plain[key], monitored[key]), key


def test_no_logger_still_writes_records(tmp_path) -> None:
    seed_everything(0)
    module = TinyLM()
    monitor = WassersteinMonitor(every_n_steps=3, log_dir=tmp_path / "records", **SMALL)
    with pytest.warns(UserWarning, match="no logger on this Trainer"):
        trainer(tmp_path, 3, [monitor], logger=False).fit(module, token_loader(module.tokenizer))
    scalars = RecordStore.for_logdir(tmp_path / "records").read_scalars()
    assert sorted(scalars.step.unique()) == [0, 3]
    assert set(scalars.metric.str.split("/").str[0]) <= {"wd", "md", "moments", "jaccard", "health", "cohort"}


class _Crash(Callback):
    """Kill the run (as a crash would) once it reaches ``at_step``."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer_, *args) -> None:
        if trainer_.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def _run(tmp_path, max_steps, ckpt_path=None, crash_at=None):
    seed_everything(0)
    module = TinyLM()
    monitors = [WassersteinMonitor(every_n_steps=2, run_name="a", **SMALL),
                WeightDriftMonitor(every_n_steps=3, run_name="b", **SMALL)]
    extra = [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)]
    extra += [_Crash(crash_at)] if crash_at else []
    from lightning.pytorch.loggers import TensorBoardLogger

    tr = trainer(tmp_path, max_steps, monitors + extra, logger=TensorBoardLogger(str(tmp_path), name="run", version=0))
    tr.fit(module, token_loader(module.tokenizer, n_batches=6), ckpt_path=ckpt_path)
    return monitors


def test_resume_gives_the_same_records_and_two_monitors_coexist(tmp_path) -> None:
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    first = _run(full_dir, 12)
    assert first[0].state_key != first[1].state_key
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(resumed_dir, 12, crash_at=8)
    (checkpoint_path,) = (resumed_dir / "ckpt").glob("*step=6*.ckpt")
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    assert {m.state_key for m in first} <= set(checkpoint["callbacks"])
    _run(resumed_dir, 12, ckpt_path=str(checkpoint_path))
    full = RecordStore.for_logdir(full_dir / "run" / "version_0").read_scalars()
    resumed = RecordStore.for_logdir(resumed_dir / "run" / "version_0").read_scalars()
    assert set(full.run) == {"a", "b"}
    assert sorted(full[full.run == "a"].step.unique()) == [0, 2, 4, 6, 8, 10, 12]
    assert sorted(full[full.run == "b"].step.unique()) == [0, 3, 6, 9, 12]
    pd.testing.assert_frame_equal(full.reset_index(drop=True), resumed.reset_index(drop=True), check_exact=False,
                                  rtol=1e-6, atol=1e-9)


def test_pair_sign_monitor_and_failure_is_warned_not_fatal(tmp_path) -> None:
    seed_everything(0)
    module = TinyLM()
    monitor = PairSignMonitor(every_n_steps=2, **SMALL)
    original = monitor._measure_unguarded
    calls = []

    def flaky(trainer_, step, *rest):
        calls.append(step)
        if step == 2:
            raise RuntimeError("simulated failure")
        return original(trainer_, step, *rest)

    monitor._measure_unguarded = flaky
    with pytest.warns(UserWarning, match="measurement at step 2 failed"):
        trainer(tmp_path, 4, [monitor]).fit(module, token_loader(module.tokenizer))
    scalars = RecordStore.for_logdir(tmp_path / "run" / "version_0").read_scalars()
    assert sorted(scalars.step.unique()) == [0, 2, 4]
    failed = scalars[scalars.metric == "health/measurement_failed"]
    assert failed.step.tolist() == [2]
    assert set(scalars[scalars.step == 4].metric) >= {"pairs/nn_share", "pairs/pp_share"}


def test_strict_mode_raises(tmp_path) -> None:
    module = TinyLM()
    monitor = NegativeDifferentiationMonitor(every_n_steps=2, strict=True, **SMALL)
    monitor._measure_unguarded = lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, 2, [monitor]).fit(module, token_loader(module.tokenizer))


def test_bad_settings_fail_at_construction() -> None:
    from negmonitor.errors import NegmonitorError

    with pytest.raises(NegmonitorError, match=r"cohort_frac must be in \(0, 1\]"):
        NegativeDifferentiationMonitor(probe=PROBE, cohort_frac=1.5)
    with pytest.raises(NegmonitorError, match="unknown families"):
        NegativeDifferentiationMonitor(probe=PROBE, families=["nope"])
    with pytest.raises(NegmonitorError, match="every_n_steps"):
        NegativeDifferentiationMonitor(probe=PROBE, every_n_steps=-1)


def test_ablation_damage_is_logged(tmp_path, shared_data) -> None:
    from negmonitor.evaluation import load_tse
    from negmonitor.callbacks import AblationMonitor

    seed_everything(0)
    module = TinyLM()
    pairs = load_tse(shared_data / "tse", constructions=["simple_agrmt"], sample_per_construction=20)
    monitor = AblationMonitor(every_n_steps=4, minimal_pairs=pairs, ppl_text=TEXT,
                              ablation={"fraction": 0.05, "max_matching_evals": 3}, **SMALL)
    trainer(tmp_path, 4, [monitor]).fit(module, token_loader(module.tokenizer))
    log_dir = tmp_path / "run" / "version_0"
    scalars = RecordStore.for_logdir(log_dir).read_scalars()
    metrics = set(scalars.metric)
    for name in ("ablation/ppl_ratio/wasserstein", "ablation/ppl_ratio/random", "ablation/ppl_ratio/ppl_matched",
                 "ablation/acc_drop/tse/wasserstein", "ablation/acc_drop/tse/random"):
        assert name in metrics, name
    assert sorted(scalars[scalars.metric == "ablation/ppl_ratio/wasserstein"].step) == [0, 4]
    assert (scalars[scalars.metric.str.startswith("ablation/ppl_ratio")].value > 0).all()
    at = scalars[scalars.step == 4].set_index("metric").value
    target, control = at["ablation/ppl_ratio/wasserstein"], at["ablation/ppl_ratio/ppl_matched"]  # / baseline ppl
    if target > 1:  # the control's distance from the target, as a share of the damage to match
        assert at["ablation/ppl_matched_rel_error"] == pytest.approx(abs(control - target) / (target - 1), rel=1e-6)
        assert at["ablation/ppl_matched_ok"] == float(at["ablation/ppl_matched_rel_error"] <= 0.05)  # default
    else:  # no damage to match
        assert at["ablation/ppl_matched_ok"] == 0.0
    tags = _events(log_dir).Tags()["scalars"]
    assert "negmonitor/ablation/ppl_ratio/wasserstein" in tags
    assert "negmonitor/ablation/acc_drop/tse/random" in tags


def test_ablation_without_text_or_pairs_says_what_it_leaves_out(tmp_path) -> None:
    """No ppl_text, no minimal pairs and a plain DataLoader (no datamodule to take them from): a user who switched
    ablation on is told at set-up, once each, which curves will be missing and what to pass; training runs."""
    from negmonitor.callbacks import AblationMonitor

    seed_everything(0)
    module = TinyLM()
    monitor = AblationMonitor(every_n_steps=4, ablation={"fraction": 0.05, "max_matching_evals": 2}, **SMALL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, 2, [monitor]).fit(module, token_loader(module.tokenizer))
    said = [str(w.message) for w in caught if str(w.message).startswith("negmonitor: ablation has no")]
    assert len(said) == 2, said
    assert "perplexity-matched control are left out — pass ppl_text='wikitext:wikitext-2-raw-v1:validation'" in said[0]
    assert "acc_drop curves are left out — pass minimal_pairs='blimp'" in said[1]


def test_a_measurement_leaves_rng_and_grads_untouched() -> None:
    """Probe pass and ablation protocol use their own generators: the global RNG streams and .grad stay as they were."""
    import random

    from negmonitor.monitoring.ablation_rows import ablation_scalar_rows
    from negmonitor.monitoring.engine import MonitorSettings, MonitorState, take_measurement
    from negmonitor.probeset import ProbeSet

    module = TinyLM()
    module.model.train()
    loss = module.model(input_ids=torch.tensor([[5, 6, 7, 8]]), labels=torch.tensor([[5, 6, 7, 8]])).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.model.named_parameters()}
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    probe_set = ProbeSet.build([TEXT], module.tokenizer, n_tokens=2_048, window=64, n_pairs=200)
    measurement = take_measurement(module.model, probe_set, 0, MonitorSettings(), MonitorState(), module.tokenizer)
    ablation_scalar_rows(module.model, module.tokenizer, measurement.result, {"max_matching_evals": 2}, None, TEXT)
    assert torch.equal(torch_state, torch.get_rng_state())
    assert py_state == random.getstate()
    assert np.array_equal(np_state[1], np.random.get_state()[1])
    assert module.model.training  # train mode restored
    assert all(torch.equal(grads[n], p.grad) for n, p in module.model.named_parameters())


def test_sample_histograms_are_numpys_histograms_of_each_sampled_neuron() -> None:
    """One ``bins``-bin row set per sampled neuron with a finite value (NaN left out, an all-NaN neuron skipped),
    in layer then sample order, equal to ``np.histogram``."""
    import numpy as np

    from negmonitor.monitoring.engine import sample_histograms

    rng = np.random.default_rng(0)
    first, second = rng.standard_normal((50, 2)), rng.standard_normal((40, 3)) * 3
    first[::7, 1] = np.nan
    second[:, 2] = np.nan
    frame = sample_histograms({3: ([5, 9], first), 4: ([0, 2, 7], second)}, bins=6)
    expected = [(3, 5, first[:, 0]), (3, 9, first[:, 1]), (4, 0, second[:, 0]), (4, 2, second[:, 1])]
    assert list(frame.columns) == ["layer", "neuron", "bin", "left", "right", "count"] and len(frame) == 4 * 6
    for i, (layer, neuron, values) in enumerate(expected):
        rows = frame.iloc[i * 6 : (i + 1) * 6]
        counts, edges = np.histogram(values[np.isfinite(values)], bins=6)
        assert (rows.layer == layer).all() and (rows.neuron == neuron).all() and list(rows.bin) == list(range(6))
        np.testing.assert_array_equal(rows["count"], counts)
        np.testing.assert_array_equal(rows.left, edges[:-1])
        np.testing.assert_array_equal(rows.right, edges[1:])
    assert sample_histograms({}).empty


def test_a_run_whose_end_was_not_known_at_its_last_step_still_gets_a_final_measurement(tmp_path) -> None:
    """max_epochs (max_steps=-1) and early stopping end a run after its last scheduled measurement was taken as an
    ordinary one: the final one's media and ablation are added at the end from that same measurement."""
    ablation = {"fraction": 0.05, "max_matching_evals": 2, "ppl_window": 64}

    class StopAt4(Callback):  # as EarlyStopping ends a run, after the step's batch
        def on_train_batch_end(self, trainer_, *args):
            trainer_.should_stop = trainer_.global_step == 4

    for name, extra, kwargs in (("epochs", [], dict(max_epochs=1)), ("stopped", [StopAt4()], dict(max_epochs=3))):
        seed_everything(0)
        module = TinyLM()
        monitor = NegativeDifferentiationMonitor(every_n_steps=4, media_every_n_steps=1_000, ablation=ablation,
                                                 ablation_every_n_steps=1_000, ppl_text=TEXT[:2_000], **SMALL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer(tmp_path / name, -1, [monitor, *extra], **kwargs).fit(
                module, token_loader(module.tokenizer, n_batches=8))
        last = 8 if name == "epochs" else 4
        assert monitor.measured_steps == [0, 4, 8][: 2 + (name == "epochs")]
        log_dir = tmp_path / name / "run" / "version_0"
        scalars = RecordStore.for_logdir(log_dir).read_scalars()
        assert sorted(scalars[scalars.metric == "ablation/ppl_ratio/wasserstein"].step) == [0, last], name
        assert "health/measurement_failed" not in set(scalars.metric)
        images = _events(log_dir).Images("negmonitor/images/top_neurons/layer_00")
        assert sorted(e.step for e in images) == [0, last], name
        ablation_curve = _events(log_dir).Scalars("negmonitor/ablation/ppl_ratio/wasserstein")
        assert [e.step for e in ablation_curve] == [0, last], name


def test_tokens_are_counted_in_transformers_batch_encodings(tmp_path) -> None:
    """transformers' collators (DataCollatorForLanguageModeling) return a BatchEncoding, a UserDict: its input_ids
    count as a dict's do."""
    from torch.utils.data import DataLoader
    from transformers import BatchEncoding

    class DictLM(TinyLM):
        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    seed_everything(0)
    module = DictLM()
    blocks = [ids for (ids,) in token_loader(module.tokenizer, batch_size=1, n_batches=16).dataset]
    loader = DataLoader(blocks, batch_size=8, collate_fn=lambda rows: BatchEncoding({"input_ids": torch.stack(rows)}))
    monitor = NegativeDifferentiationMonitor(every_n_steps=2, families=("wd", "health"), **SMALL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, 2, [monitor]).fit(module, loader)
    assert monitor.tokens_seen == 2 * 8 * 32
    scalars = RecordStore.for_logdir(tmp_path / "run" / "version_0").read_scalars()
    assert scalars.groupby("step").tokens_seen.first().to_dict() == {0: 0, 2: 512}
    assert not [w for w in caught if "cannot count the tokens" in str(w.message)]

    class OpaqueLM(TinyLM):
        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch.ids, labels=batch.ids).loss

    class Batch:  # a batch with no input_ids: said once, not silently 0
        def __init__(self, ids):
            self.ids = ids

    module = OpaqueLM()
    loader = DataLoader(blocks, batch_size=8, collate_fn=lambda rows: Batch(torch.stack(rows)))
    monitor = NegativeDifferentiationMonitor(every_n_steps=2, families=("wd", "health"), **SMALL)
    with pytest.warns(UserWarning, match=r"cannot count the tokens of a Batch batch \(no input_ids tensor in it\); "
                                         r"tokens_seen stays 0 — pass tokens_per_step="):
        trainer(tmp_path / "opaque", 2, [monitor]).fit(module, loader)


def test_a_resumed_run_whose_logger_opens_a_new_version_says_where_the_run_began(tmp_path) -> None:
    """TensorBoardLogger(version=None), the default (and a requeued job's): the resumed Trainer logs to version_1
    and the monitor's records go there too (continuing in version_0 silently could write over another run's: a run
    branched from a checkpoint looks the same); one warning says where the run began and how to keep one folder."""
    from lightning.pytorch.loggers import TensorBoardLogger

    def fit(max_steps: int, ckpt_path=None, crash_at=None, **monitor_kwargs) -> NegativeDifferentiationMonitor:
        seed_everything(0)
        module = TinyLM()
        monitor = NegativeDifferentiationMonitor(every_n_steps=2, families=("wd", "drift", "health"), **SMALL,
                                                 **monitor_kwargs)
        extra = [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)]
        extra += [_Crash(crash_at)] if crash_at else []
        tr = trainer(tmp_path, max_steps, [monitor, *extra], logger=TensorBoardLogger(str(tmp_path), name="run"))
        tr.fit(module, token_loader(module.tokenizer, n_batches=6), ckpt_path=ckpt_path)
        return monitor

    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(6, crash_at=3)
    (checkpoint,) = (tmp_path / "ckpt").glob("*step=2*.ckpt")
    began, new = (tmp_path / "run" / version / "negmonitor" for version in ("version_0", "version_1"))
    with pytest.warns(UserWarning, match=rf"this resumed run's records go to {re.escape(str(new))}; it began in "
                                         rf"{re.escape(str(began.resolve()))} .* resume with log_dir="):
        fit(6, ckpt_path=str(checkpoint))
    assert sorted(RecordStore(new).read_scalars().step.unique()) == [4, 6]

    # log_dir= the first folder's parent: the resumed run's records go on beside the first ones
    fit(6, ckpt_path=str(checkpoint), log_dir=str(tmp_path / "run" / "version_0"))
    scalars = RecordStore(began).read_scalars()
    assert sorted(scalars.step.unique()) == [0, 2, 4, 6] and set(scalars.run) == {"version_0"}
    assert "drift/cohort_vs_rest" in set(scalars[scalars.step == 4].metric)  # the step-2 snapshot was found


def test_a_callback_reused_with_a_new_trainer_measures_the_new_run_from_its_start(tmp_path) -> None:
    monitor = NegativeDifferentiationMonitor(every_n_steps=2, families=("wd", "drift", "health"), **SMALL)
    for name in ("first", "second"):  # a notebook cell run twice, a sweep, a second stage
        seed_everything(0)
        module = TinyLM()
        trainer(tmp_path / name, 4, [monitor]).fit(module, token_loader(module.tokenizer))
        assert monitor.measured_steps == [0, 2, 4], name
        assert monitor.tokens_seen == 4 * 8 * 32 and monitor.run_name == "version_0"
    first, second = (RecordStore.for_logdir(tmp_path / name / "run" / "version_0").read_scalars()
                     for name in ("first", "second"))
    pd.testing.assert_frame_equal(first, second)  # the same run twice: the same records, drift from its own start


def test_fast_dev_run_measures_and_writes_nothing(tmp_path) -> None:
    seed_everything(0)
    module = TinyLM()
    monitor = NegativeDifferentiationMonitor(every_n_steps=1, ablation={"fraction": 0.05}, **SMALL)
    with pytest.warns(UserWarning, match="fast_dev_run — the monitor measures nothing and writes nothing"):
        trainer(tmp_path, 1, [monitor], logger=False, fast_dev_run=True).fit(module, token_loader(module.tokenizer))
    assert monitor.measured_steps == [] and not list(tmp_path.rglob("negmonitor"))


def test_lightning_cli_yaml_can_switch_ablation_on_with_true_or_a_mapping() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(NegativeDifferentiationMonitor, "monitor")
    for value, fraction in (("true", 0.01), ("{fraction: 0.02}", 0.02)):
        config = parser.parse_args(["--monitor.probe", "probe.txt", "--monitor.ablation", value])
        assert parser.instantiate_classes(config).monitor.ablation.fraction == fraction


def test_a_fused_mlp_kernel_leaves_ablation_out_of_the_run_and_keeps_the_other_curves(tmp_path) -> None:
    """As Liger's kernel replaces each Llama MLP's forward (SiLU(gate) * up in one call, act_fn never called): an
    ablation there changes nothing, so it is left out of the run with one warning; the measurements go on."""
    from negmonitor.callbacks import NegativeDifferentiationMonitor as Monitor

    seed_everything(0)
    module = TinyLM("llama")
    for layer in module.model.model.layers:
        mlp = layer.mlp
        mlp.forward = (lambda m: lambda x: m.down_proj(torch.nn.functional.silu(m.gate_proj(x)) * m.up_proj(x)))(mlp)
    monitor = Monitor(every_n_steps=2, ablation={"fraction": 0.05, "max_matching_evals": 2, "ppl_window": 64},
                      ppl_text=TEXT[:2_000], families=("wd", "health", "ablation"), **SMALL)
    with pytest.warns(UserWarning, match=r"ablation is left out of this run: the ablation changed nothing: "
                                         r"model\.layers\.0\.mlp\.gate_proj ran but .*Liger's"):
        trainer(tmp_path, 4, [monitor]).fit(module, token_loader(module.tokenizer))
    assert monitor.measured_steps == [0, 2, 4] and monitor.ablation is None
    scalars = RecordStore.for_logdir(tmp_path / "run" / "version_0").read_scalars()
    assert sorted(scalars[scalars.metric == "wd/max"].step.unique()) == [0, 2, 4]
    assert not scalars.metric.str.startswith(("ablation/", "health/measurement_failed")).any()


def test_resuming_with_other_settings_says_the_monitor_starts_afresh(tmp_path) -> None:
    """Lightning keys a callback's state by its settings: resumed with every_n_steps changed, the saved state is
    not this monitor's, and one warning says what that costs instead of Lightning's generic note alone."""
    def fit(every: int, max_steps: int, ckpt_path=None) -> None:
        seed_everything(0)
        module = TinyLM()
        monitor = NegativeDifferentiationMonitor(every_n_steps=every, families=("wd", "health"), **SMALL)
        checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
        trainer(tmp_path, max_steps, [monitor, checkpoints]).fit(module, token_loader(module.tokenizer),
                                                                ckpt_path=ckpt_path)

    fit(2, 2)
    (checkpoint,) = (tmp_path / "ckpt").glob("*step=2*.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(2, 4, ckpt_path=str(checkpoint))  # the same settings: no such warning
    assert not [w for w in caught if "saved with other settings" in str(w.message)]
    assert not [w for w in caught if "already holds" in str(w.message)]  # a resume is the same run
    with pytest.warns(UserWarning, match=r"the checkpoint holds a NegativeDifferentiationMonitor state saved with "
                                         r"other settings \(.*'every_n_steps': 2.*\); with these \(.*'every_n_steps': "
                                         r"3.*\) the monitor starts afresh"):
        fit(3, 4, ckpt_path=str(checkpoint))


def test_a_fresh_run_into_a_folder_with_another_runs_records_says_it_writes_over_them(tmp_path) -> None:
    """A fixed logger version (or log_dir=, or an HF output_dir) sends a second fresh run into the first one's
    records folder: said once before its first measurement; a resume of the same run is not such a run."""
    def fit() -> None:
        seed_everything(0)
        module = TinyLM()
        monitor = NegativeDifferentiationMonitor(every_n_steps=2, families=("wd", "health"), **SMALL)
        trainer(tmp_path, 2, [monitor], logger=TensorBoardLogger(str(tmp_path), name="run", version=0)).fit(
            module, token_loader(module.tokenizer))

    from lightning.pytorch.loggers import TensorBoardLogger

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit()
    assert not [w for w in caught if "already holds" in str(w.message)]
    with pytest.warns(UserWarning, match=r"negmonitor: .*version_0/negmonitor already holds this monitor's records "
                                         r"of 2 step\(s\) from another run; this run writes over them"):
        fit()  # a fixed logger version: the second fresh run lands in the first one's folder
    (tmp_path / "run" / "version_0" / "negmonitor" / "scalars" / "step-final.parquet").touch()  # a stray file
    with pytest.warns(UserWarning, match="already holds this monitor's records of 2 step"):
        fit()  # the advice never costs the measurement
