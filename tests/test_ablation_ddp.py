"""Under Lightning DDP (2 CPU processes, gloo) every rank evaluates its share of the ablation and the logged damage
equals the single-process numbers."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np

from lightning_helpers import TEXT, TinyLM, run_script
from negmonitor.distributed import Shard
from negmonitor.monitoring.ablation_rows import ablation_scalar_rows
from negmonitor.monitoring.engine import MonitorSettings, MonitorState, take_measurement
from negmonitor.probeset import ProbeSet
from negmonitor.records import RecordStore
from negmonitor.train.grammar import GrammarCorpus

ABLATION = {"fraction": 0.05, "max_matching_evals": 4, "random_draws": 2, "batch_size": 4, "ppl_window": 64}
PPL_TEXT = TEXT[:3_000]

SCRIPT = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, sys.argv[2])
    import lightning as L
    from lightning.pytorch import seed_everything
    from lightning_helpers import TEXT, TinyLM, token_loader
    from negmonitor import result as result_module
    from negmonitor.callbacks import NegativeDifferentiationMonitor
    from negmonitor.train.grammar import GrammarCorpus

    tables = []  # per-neuron and per-layer table rows this rank built

    def counting(build):
        def wrapped(*args, **kwargs):
            tables.append(build.__name__)
            return build(*args, **kwargs)
        return wrapped

    result_module._neuron_frame = counting(result_module._neuron_frame)
    result_module._layer_row = counting(result_module._layer_row)
    from negmonitor.selection import Selection

    Selection.to_frame = counting(Selection.to_frame)  # the ablation's selections table: saved by ablate, not here

    class CountingMonitor(NegativeDifferentiationMonitor):
        """Counts the forward passes each rank runs for the ablation."""
        def _ablation_rows(self, measurement, shard=None):
            calls = []
            handle = self._hf_model.register_forward_pre_hook(lambda *_: calls.append(1))
            try:
                return super()._ablation_rows(measurement, shard)
            finally:
                handle.remove()
                self.forwards.append(len(calls))

    seed_everything(0)
    module = TinyLM()
    monitor = CountingMonitor(probe=[TEXT], probe_tokens=2_048, probe_window=64, n_pairs=200, every_n_steps=2,
                              log_dir=sys.argv[1], ablation=json.loads(sys.argv[3]), ppl_text=TEXT[:3_000],
                              minimal_pairs=GrammarCorpus(0).minimal_pairs(4), families=("ablation", "health"))
    monitor.forwards = []
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=2, logger=False, callbacks=[monitor],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=sys.argv[1])
    trainer.fit(module, token_loader(module.tokenizer))
    with open(f"{sys.argv[1]}/forwards-{trainer.global_rank}.json", "w") as f:
        json.dump(monitor.forwards, f)
    with open(f"{sys.argv[1]}/tables-{trainer.global_rank}.json", "w") as f:
        json.dump(tables, f)
''')


def test_ddp_ablation_is_split_across_ranks_and_equals_single_process(tmp_path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    code, _, err = run_script(tmp_path, "ddp_ablation.py", SCRIPT, str(logs), str(Path(__file__).parent),
                              json.dumps(ABLATION),
                              hang="the DDP run hung (a rank waited in a collective the other never reached)")
    assert code == 0, err[-3000:]
    forwards = [json.loads((logs / f"forwards-{rank}.json").read_text()) for rank in (0, 1)]
    assert forwards[0] == forwards[1] and all(n > 0 for n in forwards[1]), forwards  # both ranks work, in lockstep
    # Rank 1 selects its ablated neurons from the per-layer tensors: only rank 0 builds the tables it records.
    tables = [json.loads((logs / f"tables-{rank}.json").read_text()) for rank in (0, 1)]
    assert tables[1] == [] and {"_neuron_frame", "_layer_row"} <= set(tables[0]), tables
    assert "to_frame" not in tables[0], tables  # the monitor logs the ablation's scalars only

    scalars = RecordStore.for_logdir(logs).read_scalars()
    ddp = scalars[(scalars.step == 0) & scalars.metric.str.startswith("ablation/")].set_index("metric").value

    module = TinyLM()  # the weights the DDP run measured at step 0
    probe_set = ProbeSet.build([TEXT], module.tokenizer, n_tokens=2_048, window=64, n_pairs=200)
    result = take_measurement(module.model, probe_set, 0, MonitorSettings(), MonitorState()).result
    calls: list[int] = []
    handle = module.model.register_forward_pre_hook(lambda *_: calls.append(1))
    single = ablation_scalar_rows(module.model, module.tokenizer, result, ABLATION, GrammarCorpus(0).minimal_pairs(4),
                                  PPL_TEXT).set_index("metric").value
    handle.remove()
    assert forwards[0][0] < len(calls)  # each rank ran a share, not the whole
    assert "ablation/ppl_ratio/ppl_matched" in single and "ablation/margin_drop/grammar/random_sd" in single
    assert sorted(ddp.index) == sorted(single.index)
    # Sentences batched differently on each rank are scored with other padding: fp32 log-probabilities of tens of
    # nats differ in their last bits (~1e-6), which a margin drop (a difference of margins) shows as ~1e-7 absolute.
    np.testing.assert_allclose(ddp[single.index].to_numpy(), single.to_numpy(), rtol=1e-5, atol=1e-6)


def test_shard_pads_every_rank_to_rank_zeros_batches() -> None:
    own, extra = [], []
    for rank in range(3):
        shard = Shard(rank, 3)
        own.append(-(-len(shard.take(list(range(10)))) // 3))  # 4, 3, 3 items in batches of 3
        extra.append(shard.extra_batches(10, 3))
    assert own == [2, 1, 1] and extra == [0, 1, 1]
    assert Shard(2, 3).take(list(range(10))) == [2, 5, 8]
    assert Shard().extra_batches(7, 3) == 0 and not Shard().active


END_SCRIPT = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, sys.argv[2])
    import lightning as L
    from lightning.pytorch import seed_everything
    from lightning_helpers import TEXT, TinyLM, token_loader
    from negmonitor.callbacks import NegativeDifferentiationMonitor
    from negmonitor.train.grammar import GrammarCorpus

    seed_everything(0)
    module = TinyLM()
    # no ablation at step 2 (due every 100 steps): the end of training, unknown at step 2 (max_epochs), adds it
    monitor = NegativeDifferentiationMonitor(probe=[TEXT], probe_tokens=1_024, probe_window=64, n_pairs=100,
                                             every_n_steps=2, ablation_every_n_steps=100, log_dir=sys.argv[1],
                                             ablation=json.loads(sys.argv[3]), ppl_text=TEXT[:2_000],
                                             minimal_pairs=GrammarCorpus(0).minimal_pairs(2))
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, logger=False,
                        callbacks=[monitor], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=sys.argv[1])
    trainer.fit(module, token_loader(module.tokenizer, n_batches=4))  # 2 steps a rank
    print(f"rank {trainer.global_rank} finished at step {trainer.global_step}", flush=True)
''')


def test_ddp_end_of_training_ablation_runs_on_every_rank(tmp_path) -> None:
    """Every rank but 0 failed each measurement after its probe pass (its scalars had no columns), so it kept no
    last measurement: at the end of a max_epochs run, rank 0 ran the final ablation's collectives alone and hung."""
    logs = tmp_path / "logs"
    logs.mkdir()
    code, out, err = run_script(tmp_path, "ddp_end.py", END_SCRIPT, str(logs), str(Path(__file__).parent),
                                json.dumps({**ABLATION, "random_draws": 1, "max_matching_evals": 2}),
                                extra_env={"PYTHONWARNINGS": "always::UserWarning"},
                                hang="the DDP run hung at the end of training (rank 0's final ablation alone)")
    assert code == 0, err[-3000:]
    assert "rank 0 finished at step 2" in out and "rank 1 finished at step 2" in out, out
    assert "failed" not in err, err[-3000:]
    scalars = RecordStore.for_logdir(logs).read_scalars()
    assert sorted(scalars.step.unique()) == [0, 2]
    assert "ablation/ppl_ratio/wasserstein" in set(scalars[scalars.step == 2].metric)
