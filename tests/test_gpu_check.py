"""`benchmarks/gpu_check.py` runs where there is no GPU (``--dry-run``): a session lent a GPU has minutes of device
time, too few to find that the check itself is broken."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_every_stage_in_its_dry_run() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    out = done.stdout
    assert done.returncode == 0, out[-4000:] + done.stderr[-4000:]
    assert "FAILED" not in out
    # every stage printed its figures: the scale benchmark, the update's block sizes, the sync count, the Trainer runs
    assert "== pythia-1.4b-shaped, 2 layers (d=2048, 8192 neurons/layer), 2048 probe tokens, cpu ==" in out
    assert "full depth (24 layers), extrapolated:" in out
    assert out.count("G values/s)") == 6  # three block sizes, in one call and in row chunks
    assert "== host syncs per probe batch on cpu ==" in out
    assert "ran 2- and 6-batch probe passes and bare forwards" in out
    trainer_run, bf16_true = out.split("== bf16-true run")
    measured = [line for line in trainer_run.splitlines() if line.startswith("measurement at step ")]
    assert [line.split(":")[0] for line in measured] == [f"measurement at step {s}" for s in (0, 6, 12)]
    assert "overhead ratio" in trainer_run and "wall time: plain" in trainer_run
    measured = [line for line in bf16_true.splitlines() if line.startswith("measurement at step ")]
    assert [line.split(":")[0] for line in measured] == [f"measurement at step {s}" for s in (0, 1, 2)]
    assert "bf16-true: 3 measurements taken" in bf16_true
    assert "heavy optional imports: none" in out


def test_a_failed_stage_is_printed_and_the_next_stages_still_run(monkeypatch, capsys) -> None:
    """Device time is scarce: one stage's failure must not cost the figures of the others."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    def broken(*args):
        raise RuntimeError("the histogram stage broke")

    monkeypatch.setattr(gpu_check, "update_block_sizes", broken)
    monkeypatch.setattr(gpu_check, "syncs_per_probe_batch", lambda *args: print("sync stage ran"))
    monkeypatch.setattr(gpu_check, "trainer_runs", lambda args: print("trainer stage ran"))
    monkeypatch.setattr(gpu_check, "bf16_true_run", lambda args: print("bf16-true stage ran"))
    assert gpu_check.main(["--dry-run", "--skip-scale"]) == 1
    out = capsys.readouterr().out
    assert "histogram update timing FAILED" in out and "the histogram stage broke" in out
    assert out.index("FAILED") < out.index("sync stage ran") < out.index("trainer stage ran") \
        < out.index("bf16-true stage ran")
    assert out.rstrip().endswith("failed stages: histogram update timing")
