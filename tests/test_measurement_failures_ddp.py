"""Under DDP (2 gloo processes) a measurement failing on ONE rank is skipped by every rank: no rank hangs."""

from __future__ import annotations

import re

import textwrap
from pathlib import Path


from lightning_helpers import run_script
from negmonitor.records import RecordStore

SCRIPT = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[2])
    import lightning as L
    import torch
    from lightning.pytorch import seed_everything
    from lightning_helpers import TEXT, TinyLM, token_loader
    from negmonitor.callbacks import NegativeDifferentiationMonitor
    from negmonitor.metrics.streaming import NeuronStatsAccumulator

    seed_everything(0)
    module = TinyLM()
    monitor = NegativeDifferentiationMonitor(probe=[TEXT], probe_tokens=1_024, probe_window=64, n_pairs=100,
                                             every_n_steps=2, log_dir=sys.argv[1])
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=8, logger=False, callbacks=[monitor],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=sys.argv[1])
    calls = {}

    def inject(mod, args, output):
        """Rank 1 only, inside the probe pass (no grad). Under DDP a pass is a calibration forward, then one
        forward per batch of 8 windows (this rank has 8)."""
        if trainer.global_rank != 1 or torch.is_grad_enabled():
            return
        step = trainer.global_step
        calls[step] = calls.get(step, 0) + 1
        if step == 0 and calls[step] == 1:
            raise RuntimeError("injected failure in the calibration forward")
        if step == 2 and calls[step] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected, once)")
        if step == 4 and calls[step] == 2:
            raise RuntimeError("injected failure in the probe pass")

    module.model.gpt_neox.layers[0].mlp.register_forward_hook(inject)
    compute = NeuronStatsAccumulator.compute

    def failing_compute(self):
        """Rank 1, step 6, the first layer's statistics: after that layer's sync, before the next layer's."""
        if trainer.global_rank == 1 and trainer.global_step == 6 and self.n_neurons and not calls.get("computed"):
            calls["computed"] = True
            raise RuntimeError("injected failure in the statistics of one layer")
        return compute(self)

    NeuronStatsAccumulator.compute = failing_compute  # before the accumulators exist: torchmetrics wraps this one
    trainer.fit(module, token_loader(module.tokenizer))
    print(f"rank {trainer.global_rank} finished at step {trainer.global_step}", flush=True)
''')


def test_a_failure_on_one_rank_is_skipped_by_every_rank(tmp_path) -> None:
    code, out, err = run_script(tmp_path, "ddp_fail.py", SCRIPT, str(tmp_path / "logs"), str(Path(__file__).parent),
                                extra_env={"PYTHONWARNINGS": "always::UserWarning"},
                                hang="a rank hung after a failure on the other rank")
    assert code == 0, err[-3000:]
    assert "rank 0 finished at step 8" in out and "rank 1 finished at step 8" in out, out + err[-2000:]

    scalars = RecordStore.for_logdir(tmp_path / "logs").read_scalars()
    failed = scalars[scalars.metric == "health/measurement_failed"]
    assert sorted(failed.step) == [0, 4, 6]  # written once (by rank 0) for each step that failed on rank 1
    for step in (2, 8):  # step 2: rank 1's out-of-memory error was retried at batch size 4 by both ranks together
        assert {"wd/max", "md/mean"} <= set(scalars[scalars.step == step].metric), step
    assert "retrying with batch size 4" in err
    # each rank warns once: rank 1 about its own failure, rank 0 about rank 1's; no warning for step 4
    assert err.count("measurement at step 0 failed on rank 1 (RuntimeError: injected failure in the calibration") == 1
    assert err.count("measurement at step 0 failed (PeerFailure: the measurement failed on rank(s) [1]") == 1
    assert "measurement at step 4 failed" not in err and "measurement at step 6 failed" not in err


PHASES_SCRIPT = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, sys.argv[2])
    import lightning as L
    import torch
    from lightning.pytorch import seed_everything
    from lightning_helpers import TEXT, TinyLM, token_loader
    import negmonitor
    from negmonitor.callbacks import NegativeDifferentiationMonitor
    from negmonitor.monitoring import engine
    from negmonitor.metrics.streaming import NeuronStatsAccumulator
    from negmonitor.probeset import ProbeSet
    from negmonitor.train.grammar import GrammarCorpus

    seed_everything(0)
    module = TinyLM()
    ablation = {"fraction": 0.05, "max_matching_evals": 2, "random_draws": 1, "batch_size": 4, "ppl_window": 64}
    monitor = NegativeDifferentiationMonitor(probe=[TEXT], probe_tokens=1_024, probe_window=64, n_pairs=100,
                                             every_n_steps=2, log_dir=sys.argv[1], ablation=ablation,
                                             ppl_text=TEXT[:2_000], minimal_pairs=GrammarCorpus(0).minimal_pairs(4))
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=6, logger=False, callbacks=[monitor],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=sys.argv[1])
    made = {}
    real_init = NeuronStatsAccumulator.__init__

    def failing_init(self, *args, **kwargs):
        """Rank 1, step 0: the state's allocation (the measurement's largest) runs out of memory, once."""
        if trainer.global_rank == 1 and trainer.global_step == 0 and not made:
            made["failed"] = True
            raise torch.OutOfMemoryError("CUDA out of memory (injected while allocating the state)")
        real_init(self, *args, **kwargs)

    real_drift = engine._drift

    def failing_drift(sites, state, step, *args, **kwargs):
        """Rank 0 alone, step 2: its own part of the measurement (drift) fails while the other rank goes on to
        the ablation's collectives."""
        if step == 2:
            raise RuntimeError("injected failure in rank 0's drift")
        return real_drift(sites, state, step, *args, **kwargs)

    import negmonitor.evaluation.lm_perplexity as perplexity_module
    real_score = perplexity_module._score_batch

    def failing_score(model, ids, batch, *args):
        """Rank 1 alone, step 4: the ablation's first perplexity forward runs out of memory, once."""
        if trainer.global_rank == 1 and trainer.global_step == 4 and not made.get("perplexity"):
            made["perplexity"] = True
            raise torch.OutOfMemoryError("CUDA out of memory (injected in a perplexity forward)")
        return real_score(model, ids, batch, *args)

    import negmonitor.evaluation.minimal_pairs as pairs_module
    real_logprobs = pairs_module._next_token_logprobs

    def failing_logprobs(model, input_ids, *args):
        """Rank 1 alone, step 6: the ablation's first minimal-pair batch runs out of memory, once."""
        if trainer.global_rank == 1 and trainer.global_step == 6 and not made.get("pairs"):
            made["pairs"] = True
            raise torch.OutOfMemoryError("CUDA out of memory (injected in a minimal-pair batch)")
        return real_logprobs(model, input_ids, *args)

    NeuronStatsAccumulator.__init__ = failing_init
    engine._drift = failing_drift
    perplexity_module._score_batch = failing_score
    pairs_module._next_token_logprobs = failing_logprobs
    trainer.fit(module, token_loader(module.tokenizer))
    # A probe on one rank alone inside the DDP job: nothing it runs may wait for the other rank.
    if trainer.global_rank == 0:
        probe_set = ProbeSet.build([TEXT], module.tokenizer, n_tokens=512, window=64, n_pairs=50)
        result = negmonitor.probe(module.model, probe_set, tokenizer=module.tokenizer)
        print(f"single-rank probe gave {len(result.neurons)} neurons", flush=True)
    trainer.strategy.barrier()
    print(f"rank {trainer.global_rank} finished at step {trainer.global_step}", flush=True)
''')


def test_failures_in_the_allocation_and_in_rank_0s_own_part_never_hang_a_rank(tmp_path) -> None:
    """An out-of-memory error allocating the state on one rank is retried by both ranks together; a failure in the
    part only rank 0 runs (cohort, drift, tables) reaches the other rank before the ablation's collectives, so both
    skip that step; an out-of-memory error in one rank's perplexity forward is retried at half the batch by both
    ranks together (the ablation is not lost), and so is one in a minimal-pair batch; a probe on one rank of a DDP
    job runs alone."""
    code, out, err = run_script(tmp_path, "ddp_phases.py", PHASES_SCRIPT, str(tmp_path / "logs"),
                                str(Path(__file__).parent), extra_env={"PYTHONWARNINGS": "always::UserWarning"},
                                hang="a rank hung after a failure on the other rank")
    assert code == 0, err[-3000:]
    assert "rank 0 finished at step 6" in out and "rank 1 finished at step 6" in out, out + err[-2000:]
    assert "single-rank probe gave" in out, out

    scalars = RecordStore.for_logdir(tmp_path / "logs").read_scalars()
    failed = scalars[scalars.metric == "health/measurement_failed"]
    assert sorted(failed.step) == [2]
    assert "during the probe pass; retrying with batch size" in err
    for step in (0, 4, 6):  # step 0 after the joint retry; the ablation ran on both ranks where nothing failed
        metrics = set(scalars[scalars.step == step].metric)
        assert "wd/max" in metrics and any(m.startswith("ablation/") for m in metrics), (step, sorted(metrics)[:20])
    assert err.count("measurement at step 2 failed on rank 0 (RuntimeError: injected failure in rank 0's drift") == 1
    retry = ("out of memory during a perplexity evaluation; retrying with batch size 2 (later evaluations start "
             "there)")
    assert err.count(retry) == 2, err[-3000:]  # rank 1 after its own error, rank 0 after rank 1's
    # step 6, both ranks in step, at half the budget-sized batch (the same on both ranks)
    halved = re.findall(r"minimal-pair scoring; retrying with batch size (\d+) \(later evaluations start there\)",
                        err)
    assert len(halved) == 2 and len(set(halved)) == 1, err[-3000:]
