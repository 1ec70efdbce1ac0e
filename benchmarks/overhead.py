"""Overhead of the monitor on a training run, and how one measurement's time splits.

A tiny GPT-NeoX is trained for 300 steps on the built-in grammar corpus in one process — without the callback
and with ``NegativeDifferentiationMonitor`` at its default schedule, alternately, ``--repeats`` times each (default
2; single runs swing by ±20% on a shared 2-core machine) — and the best wall times and their ratio are printed
(goal: <= 1.10), with every run's time and, from 3 repeats on, the ratio of the median runs (how much of the best
against best is luck). Then one full measurement is timed and split into forward passes (the probe windows
run with no hooks), metrics (the rest of the probe pass: hooks, accumulators, summaries), ablation evaluations and
logging (records and TensorBoard).

Run: ``python benchmarks/overhead.py [--steps 300] [--repeats 2] [--ablation]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from negmonitor.callbacks import NegativeDifferentiationMonitor
from negmonitor.monitoring.engine import MonitorSettings, MonitorState, take_measurement
from negmonitor.probeset import ProbeSet
from negmonitor.train.datamodule import TextDataModule
from negmonitor.train.module import CausalLMModule


def build(seed: int = 0) -> tuple[CausalLMModule, TextDataModule]:
    """The tiny model and the built-in corpus, tokenizer trained (and cached) once."""
    data = TextDataModule(source="builtin", n_sentences=20_000, seq_len=64, batch_size=16, tokenizer_vocab_size=2048, seed=seed)
    data.prepare_data()
    data.setup("fit")
    module = CausalLMModule(family="neox", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
                            max_position_embeddings=128, lr=2e-3, warmup_steps=20, seed=seed)
    module.configure_tokenizer(data.tokenizer)
    return module, data


def train(steps: int, root: Path, monitor: NegativeDifferentiationMonitor | None) -> float:
    """Wall time of ``trainer.fit`` for ``steps`` steps."""
    L.seed_everything(0, verbose=False)
    module, data = build()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=TensorBoardLogger(str(root)),
                        callbacks=[monitor] if monitor else [], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return time.perf_counter() - start


def measurement_split(ablation: bool) -> tuple[dict[str, float], int]:
    """Time one measurement: plain forward passes, the full probe pass, ablation and logging."""
    module, data = build()
    model, tokenizer = module.model, data.tokenizer
    probe_set = ProbeSet.build(data.probe_texts(), tokenizer, n_tokens=16_384, window=128, n_pairs=1_000)
    runner = model.base_model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, probe_set.n_windows, 8):
            runner(input_ids=probe_set.input_ids[i:i + 8], attention_mask=probe_set.attention_mask[i:i + 8])
    forward = time.perf_counter() - start
    start = time.perf_counter()
    measurement = take_measurement(model, probe_set, 0, MonitorSettings(), MonitorState(), tokenizer=tokenizer)
    probe_total = time.perf_counter() - start
    split = {"forward passes": forward, "metrics (hooks, accumulators, summaries)": probe_total - forward}
    if ablation:
        from negmonitor.monitoring.ablation_rows import ablation_scalar_rows

        start = time.perf_counter()
        ablation_scalar_rows(model, tokenizer, measurement.result, {"fraction": 0.05}, data.minimal_pairs(20),
                             data.probe_texts(64))
        split["ablation evaluations"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        from torch.utils.tensorboard import SummaryWriter

        from negmonitor.monitoring import tensorboard as tb
        from negmonitor.records import RecordStore

        start = time.perf_counter()
        store = RecordStore(Path(tmp) / "negmonitor")
        store.write_scalars("bench", 0, 0, measurement.scalars)
        store.write_neurons("bench", 0, 0, measurement.neurons)
        writer = SummaryWriter(tmp)
        tb.log_scalars(writer, measurement.scalars, 0)
        writer.close()
        split["logging (records + scalars)"] = time.perf_counter() - start
        writer = SummaryWriter(tmp)
        start = time.perf_counter()
        tb.log_histograms(writer, measurement.neurons, 0)
        tb.log_images(writer, measurement.samples, 0)
        tb.log_text(writer, measurement.result.top_pairs, 0)
        writer.close()
        split["media (histograms, images, text; sparser cadence)"] = time.perf_counter() - start
    return split, probe_set.n_tokens


def _listed(times: list[float]) -> str:
    return ", ".join(f"{t:.2f}" for t in times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating; the best counts")
    parser.add_argument("--ablation", action="store_true", help="include the ablation evaluations in the split")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        build()  # train and cache the tokenizer before timing
        plain_runs, monitored_runs = [], []
        for k in range(args.repeats):
            plain_runs.append(train(args.steps, Path(tmp) / f"plain{k}", None))
            monitor = NegativeDifferentiationMonitor(probe=None, tokenizer=None)  # default schedule, probe from data
            monitored_runs.append(train(args.steps, Path(tmp) / f"monitored{k}", monitor))
        measured = sorted(monitor.measured_steps)
    plain, monitored = min(plain_runs), min(monitored_runs)
    print(f"training {args.steps} steps, tiny GPT-NeoX (2 layers, 256 neurons/layer), 2 CPU cores, "
          f"best of {args.repeats}")
    print(f"  without monitor : {plain:8.2f} s   (runs: {_listed(plain_runs)})")
    print(f"  with monitor    : {monitored:8.2f} s   (runs: {_listed(monitored_runs)}; measured at steps {measured})")
    print(f"  ratio           : {monitored / plain:8.3f}   (goal <= 1.10; best against best)")
    if args.repeats > 2:  # the middle runs' ratio says how much of the best-against-best one is luck
        print(f"  median ratio    : {statistics.median(monitored_runs) / statistics.median(plain_runs):8.3f}")
    split, n_tokens = measurement_split(args.ablation)
    total = sum(v for k, v in split.items() if not k.startswith("media"))
    print(f"one measurement ({n_tokens:,} probe tokens, 1,000 pairs): {total:.2f} s")
    for name, seconds in split.items():
        print(f"  {name:<52} {seconds:7.3f} s")


if __name__ == "__main__":
    main()
