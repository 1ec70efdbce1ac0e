"""Under Lightning's FSDPStrategy (2 CPU processes, gloo) the monitor measures whole layers: its records equal a
single-process measurement of the same weights; DeepSpeed is refused in one line."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_helpers import TEXT, TinyLM, run_script
from negmonitor.callbacks import NegativeDifferentiationMonitor
from negmonitor.errors import NegmonitorError
from negmonitor.metrics.drift import weight_drift
from negmonitor.monitoring.ablation_rows import ablation_scalar_rows
from negmonitor.monitoring.engine import MonitorSettings, MonitorState, take_measurement
from negmonitor.probeset import ProbeSet
from negmonitor.records import RecordStore
from negmonitor.train.grammar import GrammarCorpus

# One sentence per forward: a rank that ran one forward fewer than the other would hang them both.
ABLATION = {"fraction": 0.05, "max_matching_evals": 3, "batch_size": 1, "ppl_window": 64}
PPL_TEXT = TEXT[:2_000]


def minimal_pairs():
    """Three grammar pairs and one whose good sentence is empty: nothing to score there (it scores 0), and the
    sentence falls to rank 1's share, which must still run as many forwards as rank 0's."""
    import pandas as pd

    pairs = GrammarCorpus(0).minimal_pairs(3)
    return pd.concat([pairs, pairs.iloc[:1].assign(pair_id=99, sentence_good="")], ignore_index=True)

SCRIPT = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, sys.argv[2])
    import torch
    import lightning as L
    from lightning.pytorch import seed_everything
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer
    from lightning_helpers import TEXT, TinyLM, token_loader
    from test_fsdp import minimal_pairs
    from negmonitor.callbacks import NegativeDifferentiationMonitor
    from negmonitor.train.grammar import GrammarCorpus

    PROBE_TOKENS = 2_112

    class CPUFSDPStrategy(FSDPStrategy):
        """Lightning's FSDPStrategy on CPU: FSDP is told the device (Lightning passes none for CPU, and torch then
        refuses); a subclass also passes Lightning's GPU-only check."""
        def _setup_model(self, model):
            return FullyShardedDataParallel(module=model, sharding_strategy=self.sharding_strategy,
                                            device_id=torch.device("cpu"), **self.kwargs)

    seed_everything(0)
    module = TinyLM()
    # 33 probe windows in batches of 4: rank 0 runs 5 forwards, rank 1 4 and a throw-away one
    monitor = NegativeDifferentiationMonitor(probe=[TEXT], probe_tokens=PROBE_TOKENS, probe_window=64, n_pairs=200,
                                             probe_batch_size=4,
                                             every_n_steps=2, at_end=False, log_dir=sys.argv[1],
                                             ablation=json.loads(sys.argv[3]), ppl_text=TEXT[:2_000],
                                             minimal_pairs=minimal_pairs())
    strategy = CPUFSDPStrategy(auto_wrap_policy=ModuleWrapPolicy({GPTNeoXLayer}), process_group_backend="gloo")
    class Rows(L.Callback):
        """Whole MLP rows at step 2 (after the monitor measured them), saved by rank 0."""
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step != 2:
                return
            layers = pl_module.model.gpt_neox.layers
            assert layers[0].mlp.dense_h_to_4h.weight.dim() == 1  # sharded: the monitor had to gather whole rows
            with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
                rows = {i: layer.mlp.dense_h_to_4h.weight.detach().clone() for i, layer in enumerate(layers)}
            if trainer.global_rank == 0:
                torch.save(rows, f"{sys.argv[1]}/rows_at_2.pt")

    # measured at steps 0 and 2; step 3 trains after a measurement
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_steps=3, logger=False,
                        callbacks=[monitor, Rows()], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=sys.argv[1])
    if sys.argv[4:] == ["fail-drift"]:
        from negmonitor.monitoring import engine
        real_layer_drift = engine._layer_drift

        def failing_layer_drift(before, rows, dtype):
            """Rank 0, step 2: the first layer's drift fails between the weight gathers the other rank joins."""
            if trainer.global_rank == 0 and trainer.global_step == 2:
                raise RuntimeError("injected failure in rank 0's drift")
            return real_layer_drift(before, rows, dtype)

        engine._layer_drift = failing_layer_drift
    if sys.argv[4:] == ["fail-hook"]:
        from negmonitor.capture import SiteRecorder
        real_observe = SiteRecorder.observe

        def failing_observe(self, x_in, y, batch):
            """Rank 0, step 2: layer 0's hook fails in the probe forward, before the FSDP units of the layers after
            it gather their parameters (collectives the other rank is running)."""
            if trainer.global_rank == 0 and trainer.global_step == 2 and self.layer == 0:
                raise RuntimeError("injected failure in rank 0's probe hook")
            return real_observe(self, x_in, y, batch)

        SiteRecorder.observe = failing_observe
    if sys.argv[4:] == ["fail-score"]:
        from negmonitor.evaluation import lm_perplexity
        real_summed_nll = lm_perplexity._summed_nll

        def failing_summed_nll(logits, labels):
            """Rank 0, step 2: scoring the ablation's first perplexity batch fails after its forward, before the
            forwards the other rank goes on to."""
            if trainer.global_rank == 0 and trainer.global_step == 2:
                raise RuntimeError("injected failure scoring rank 0's perplexity batch")
            return real_summed_nll(logits, labels)

        lm_perplexity._summed_nll = failing_summed_nll
    if sys.argv[4:] == ["fail-join"]:
        from negmonitor.monitoring import engine
        real_join = engine.join_weight_read

        def failing_join(module):
            """Rank 1, step 2: joining rank 0's first weight read for drift fails after the gather."""
            real_join(module)
            if trainer.global_rank == 1 and trainer.global_step == 2:
                raise RuntimeError("injected failure joining a weight read on rank 1")

        engine.join_weight_read = failing_join
    if sys.argv[4:] == ["fail-inputs"]:
        from negmonitor import probing
        real_batch_inputs = probing._batch_inputs

        def failing_batch_inputs(*args):
            """Rank 0, step 2: copying the probe's inputs to the device fails (an out-of-memory, say)."""
            if trainer.global_rank == 0 and trainer.global_step == 2:
                raise RuntimeError("injected failure copying rank 0's probe inputs")
            return real_batch_inputs(*args)

        probing._batch_inputs = failing_batch_inputs
    trainer.fit(module, token_loader(module.tokenizer))
    print(f"rank {trainer.global_rank} finished", flush=True)
    # the routing patches are gone
    assert "forward" not in vars(module.model) and "forward" not in vars(module.model.gpt_neox)
''')


def test_fsdp_records_equal_a_single_process_measurement(tmp_path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    code, _, err = run_script(tmp_path, "fsdp_run.py", SCRIPT, str(logs), str(Path(__file__).parent),
                              json.dumps(ABLATION), hang="the FSDP run hung (the ranks ran different numbers of "
                              "forward passes or collectives)")
    assert code == 0, err[-3000:]
    store = RecordStore.for_logdir(logs)
    scalars, neurons = store.read_scalars(), store.read_neurons()
    assert not scalars.metric.str.startswith("health/measurement_failed").any(), err[-3000:]
    assert sorted(scalars.step.unique()) == [0, 2]

    module = TinyLM()  # the weights the FSDP run measured at step 0
    assert neurons[neurons.step == 0].groupby("layer").size().tolist() == [module.model.config.intermediate_size] * 2
    probe_set = ProbeSet.build([TEXT], module.tokenizer, n_tokens=2_112, window=64, n_pairs=200)  # as the script's
    assert probe_set.n_windows == 33  # uneven over 2 ranks: one runs a throw-away forward
    single = take_measurement(module.model, probe_set, 0, MonitorSettings(), MonitorState())
    fsdp = neurons[neurons.step == 0].sort_values(["layer", "neuron"])
    expected = single.neurons.sort_values(["layer", "neuron"])
    for column in ("wd", "wd_neg", "md", "mean", "std"):
        np.testing.assert_allclose(fsdp[column].to_numpy(), expected[column].to_numpy(), atol=1e-4, err_msg=column)

    ablation = scalars[(scalars.step == 0) & scalars.metric.str.startswith("ablation/")].set_index("metric").value
    rows = ablation_scalar_rows(module.model, module.tokenizer, single.result, ABLATION, minimal_pairs(),
                                PPL_TEXT).set_index("metric").value
    assert sorted(ablation.index) == sorted(rows.index)
    np.testing.assert_allclose(ablation[rows.index].to_numpy(), rows.to_numpy(), rtol=1e-5, atol=1e-7)

    final = torch.load(logs / "rows_at_2.pt")  # whole rows after 2 steps, gathered by the script
    at_2 = neurons[neurons.step == 2].sort_values(["layer", "neuron"])
    for layer, site in enumerate(module.model.gpt_neox.layers):
        # the monitor keeps its snapshots in bf16 (MonitorSettings.drift_dtype): the reference rounds both alike
        drift = weight_drift(site.mlp.dense_h_to_4h.weight.detach().bfloat16(), final[layer].bfloat16())
        got = at_2[at_2.layer == layer].drift_cos_dissim.to_numpy()
        np.testing.assert_allclose(got, drift["cos_dissim"].double().numpy(), rtol=1e-4, atol=1e-7)


class DeepSpeedStrategy:
    """A stand-in for Lightning's DeepSpeedStrategy (deepspeed is not installed here)."""


def test_deepspeed_is_refused_in_setup(tmp_path) -> None:
    monitor = NegativeDifferentiationMonitor(probe=[TEXT], log_dir=tmp_path)
    fake = SimpleNamespace(strategy=DeepSpeedStrategy(), is_global_zero=True, loggers=[], logger=None)
    with pytest.raises(NegmonitorError, match="does not support DeepSpeedStrategy.*strategy='ddp' or FSDPStrategy"):
        monitor.setup(fake, TinyLM(), "fit")


def test_model_parallel_strategy_is_refused_in_setup(tmp_path) -> None:
    """FSDP2 / tensor parallel (Lightning's ModelParallelStrategy): DTensor weights and forwards that are collectives
    the monitor does not know of, so it is refused in one line rather than hang a rank."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    monitor = NegativeDifferentiationMonitor(probe=[TEXT], log_dir=tmp_path)
    fake = SimpleNamespace(strategy=ModelParallelStrategy(), is_global_zero=True, loggers=[], logger=None)
    with pytest.raises(NegmonitorError, match="does not support ModelParallelStrategy.*strategy='ddp' or FSDPStrategy"):
        monitor.setup(fake, TinyLM(), "fit")


def test_a_failure_in_rank_0s_drift_under_fsdp_hangs_no_rank(tmp_path) -> None:
    """Under FSDP the drift's weight reads are collectives: rank 0 joins every one even after a layer failed, and
    the failure reaches the other rank before the ablation, so both skip the step."""
    logs = tmp_path / "logs"
    logs.mkdir()
    code, out, err = run_script(tmp_path, "fsdp_fail.py", SCRIPT, str(logs), str(Path(__file__).parent),
                                json.dumps(ABLATION), "fail-drift", extra_env={"PYTHONWARNINGS": "always::UserWarning"},
                                hang="a rank hung after rank 0's drift failed under FSDP")
    assert code == 0, err[-3000:]
    assert "rank 0 finished" in out and "rank 1 finished" in out, out
    scalars = RecordStore.for_logdir(logs).read_scalars()
    assert scalars[scalars.metric == "health/measurement_failed"].step.tolist() == [2]
    assert "wd/max" in set(scalars[scalars.step == 0].metric)
    assert err.count("measurement at step 2 failed on rank 0 (RuntimeError: injected failure in rank 0's drift") == 1


@pytest.mark.parametrize("where", ["inputs", "hook", "score", "join"])
def test_a_failure_between_collective_forwards_under_fsdp_hangs_no_rank(tmp_path, where) -> None:
    """Under FSDP each forward is itself a collective (each unit gathers its parameters): copying the probe's
    inputs to the device (before any forward, where every rank learns of a failure), a capture hook (in the
    probe forward) or the scoring of a perplexity batch (after the ablation's forward) that fails on rank 0 must not
    cut its run of forwards short while the other rank's goes on: rank 0 runs every forward, the hooks idle or
    the scores skipped. Drift's weight reads are collectives too: rank 1, joining them, fails after the first and
    still joins the rest. Either way both ranks skip the step together."""
    logs = tmp_path / "logs"
    logs.mkdir()
    code, out, err = run_script(tmp_path, f"fsdp_fail_{where}.py", SCRIPT, str(logs), str(Path(__file__).parent),
                                json.dumps(ABLATION), f"fail-{where}",
                                extra_env={"PYTHONWARNINGS": "always::UserWarning"},
                                hang=f"a rank hung after rank 0 failed ({where}) under FSDP")
    assert code == 0, err[-3000:]
    assert "rank 0 finished" in out and "rank 1 finished" in out, out
    scalars = RecordStore.for_logdir(logs).read_scalars()
    assert scalars[scalars.metric == "health/measurement_failed"].step.tolist() == [2]
    assert "wd/max" in set(scalars[scalars.step == 0].metric)
    rank, injected = {"inputs": (0, "injected failure copying rank 0's probe inputs"),
                      "hook": (0, "injected failure in rank 0's probe hook"),
                      "score": (0, "injected failure scoring rank 0's perplexity batch"),
                      "join": (1, "injected failure joining a weight read on rank 1")}[where]
    assert err.count(f"measurement at step 2 failed on rank {rank} (RuntimeError: {injected}") == 1
