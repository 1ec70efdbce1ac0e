"""Benchmark: reading a paper-scale run's records for the report, whole (before) against as the report reads them.

Writes synthetic per-neuron records with the engine's columns for a Pythia-12B-shaped model (36 layers x 20,480
neurons: 737,280 rows a step) over ``--steps`` measurements, then measures, each in a fresh process, the peak
resident memory above the process's start and the time of:

- ``RecordStore.read_neurons()``: every step's every column in one frame (what ``negmonitor report`` and the
  training summary read before);
- ``load_records`` (the report's reader now): each run's last step, and the paper's cohort curve computed one file
  at a time (``recorded_cohorts``).

It checks the two give the same cohort curve and prints per-step figures extrapolated to a 154-checkpoint replay.
Run from the repository root::

    PYTHONPATH=. python benchmarks/report_scale.py                  # 6 steps, ~0.5 GB of records in a temp folder
    PYTHONPATH=. python benchmarks/report_scale.py --steps 10 --layers 36 --neurons 20480
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPLAY_STEPS = 154  # Pythia's published checkpoints


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="measurements written (default 6)")
    parser.add_argument("--layers", type=int, default=36, help="layers (default 36, Pythia-12B)")
    parser.add_argument("--neurons", type=int, default=20_480, help="neurons per layer (default 20,480, Pythia-12B)")
    parser.add_argument("--measure", choices=["whole", "report"], help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def write_records(root: Path, steps: int, layers: int, neurons: int) -> int:
    """Synthetic per-neuron snapshots with every column the engine writes; returns the bytes on disk."""
    from negmonitor.records import RecordStore
    from negmonitor.result import NEURON_COLUMNS

    store = RecordStore(root)
    rng = np.random.default_rng(0)
    n = layers * neurons
    for step in range(steps):
        frame = pd.DataFrame({"layer": np.repeat(np.arange(layers), neurons), "neuron": np.tile(np.arange(neurons),
                                                                                                layers)})
        for column in NEURON_COLUMNS[2:]:
            frame[column] = rng.random(n) if column not in ("count", "nonfinite", "flagged") else 4096
        for key in ("cos_dissim", "cos_dissim_norm", "l2"):
            frame[f"drift_{key}"] = rng.random(n)
        frame["in_cohort"] = rng.random(n) < 0.05
        store.write_neurons("replay", step * 1000, step * 1000 * 2_097_152, frame)
        store.write_scalars("replay", step * 1000, 0, pd.DataFrame({"layer": [-1], "neuron": [-1],
                                                                     "metric": ["wd/max"], "value": [1.0]}))
    return sum(f.stat().st_size for f in (root / "neurons").glob("*.parquet"))


def measure(kind: str, root: Path) -> dict:
    """In this (fresh) process: read the records one way; peak resident memory above the start, seconds, curve."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import scale  # benchmarks/scale.py: peak_extra_memory (resident set sampled in a thread)

    from negmonitor.monitoring.cohort import final_cohort_curve
    from negmonitor.records import RecordStore
    from negmonitor.report.sources import load_records

    with scale.peak_extra_memory(torch.device("cpu")) as memory:
        start = time.perf_counter()
        if kind == "whole":
            curve = final_cohort_curve(RecordStore(root).read_neurons())
        else:
            curve = load_records(root)[0].cohort_curve
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak": memory["peak"],
            "curve": curve[["cohort", "rest"]].to_numpy(float).round(12).tolist()}


def main() -> None:
    args = parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.root)))
        return
    rows = args.layers * args.neurons
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "negmonitor"
        start = time.perf_counter()
        size = write_records(root, args.steps, args.layers, args.neurons)
        print(f"{args.steps} steps x {args.layers} layers x {args.neurons:,} neurons ({rows:,} rows a step): "
              f"{size / 1e6:.0f} MB of neuron records ({size / args.steps / rows:.1f} B a row on disk), written in "
              f"{time.perf_counter() - start:.1f} s")
        results = {}
        for kind in ("whole", "report"):
            done = subprocess.run([sys.executable, __file__, "--measure", kind, "--root", str(root)],
                                  capture_output=True, text=True, check=True)
            results[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["whole"]["curve"] == results["report"]["curve"], "the two readers give other cohort curves"
    for kind, what in (("whole", "every step, every column (before)"), ("report", "the report's reader (now)")):
        r = results[kind]
        per_step = r["peak"] / args.steps
        grows = kind == "whole"
        print(f"  {what:<36} peak +{r['peak'] / 2**30:6.2f} GiB, {r['seconds']:6.1f} s; at {REPLAY_STEPS} steps: "
              + (f"~{per_step * REPLAY_STEPS / 2**30:.0f} GiB, ~{r['seconds'] / args.steps * REPLAY_STEPS / 60:.0f} min"
                 if grows else f"~{r['peak'] / 2**30:.2f} GiB (one step's), "
                 f"~{r['seconds'] / args.steps * REPLAY_STEPS / 60:.1f} min"))
    print(f"  peak ratio (before / now) at {args.steps} steps: {results['whole']['peak'] / results['report']['peak']:.1f}x;"
          " the same cohort curve")


if __name__ == "__main__":
    main()
