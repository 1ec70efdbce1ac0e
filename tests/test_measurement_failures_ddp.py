"""Under DDP (2 gloo processes) a measurement failing on ONE rank is skipped by every rank: no rank hangs."""

from __future__ import annotations

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
