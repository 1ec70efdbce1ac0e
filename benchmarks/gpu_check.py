"""GPU check: the scale benchmark on CUDA, then a real bf16-mixed Trainer run with the monitor bundle attached.

1. ``benchmarks/scale.py`` on the GPU (Pythia-1.4B- and Llama-3.1-8B-shaped layers, with and without the budget).
2. One probe batch's histogram update at Pythia-1.4B's width (16,384 tokens x 8,192 neurons, fp32) at three block
   sizes: the default on CUDA (2^21 values, 64 blocks of ~25 kernels each) and 4x and 16x larger (fewer launches,
   more scratch), in one call and in the 512-row calls a probe batch's hook makes off the fused CPU path. On CPU
   meta tensors the default issues ~4,500 aten calls per update, so on a GPU the update may be bound by kernel
   launches rather than memory; this prints which block size pays.
3. Host syncs per probe batch (CUDA's sync debug mode over a 2- and a 6-batch probe pass, against the bare forward
   over the same batches; goal: no more than the bare forward).
4. A Pythia-160m-shaped GPT-NeoX (12 layers, d=768, 3,072 neurons/layer) trained from scratch on the built-in
   grammar corpus with ``precision="bf16-mixed"`` for ``--steps`` steps, once without and once with
   ``NegativeDifferentiationMonitor`` (ablation on, default memory budget), printing each measurement's time, the
   growth of ``torch.cuda.max_memory_allocated`` during it (above what was allocated when it started) and the
   overhead ratio of the monitored run's wall time against the plain run's. Both runs sync the device at every
   step's end (the monitored run to time its hooks), so the ratio counts the monitor's work, not the syncs.
5. A short run in ``precision="bf16-true"`` (bf16 weights; the way 7B–8B models are fine-tuned on one GPU), strict:
   every measurement must be taken (before the fix that this stage checks, each one failed).

It runs from the working tree with no network and no pip (``PYTHONPATH=. python -u benchmarks/gpu_check.py 2>&1 | tee
"$OUT/gpu_check.log"`` on the device machine: the log comes back whole, the tool's output tail may not; stdout is
line-buffered, so a run killed at its time limit still leaves every figure printed before) and checks
at the end that neither ``datasets``, ``lm_eval`` nor ``spacy`` was imported. A stage that fails prints its
traceback and the next stage runs; the exit status is 1 if any failed. About 5 minutes on an H200.
``--dry-run`` runs a CPU-sized version of everything (tiny model, few steps, small scale run) to show that the
script executes where there is no GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale  # noqa: E402 - benchmarks/scale.py (standard library and torch at import)


def sync_each_step(cuda: bool):
    """A callback for the plain run that does what the timed monitor does at every step's end besides measuring:
    a device sync and a peak-memory reset (without it the overhead ratio would count these syncs)."""
    import lightning as L

    class SyncEachStep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.memory_allocated()

    return SyncEachStep()


def timed_monitor_class():
    """The bundle, with each Lightning hook that may measure timed (and its CUDA peak growth recorded)."""
    from negmonitor.callbacks import NegativeDifferentiationMonitor

    class TimedMonitor(NegativeDifferentiationMonitor):
        records: list

        def _timed(self, hook, trainer, *args):
            cuda = torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda"
            before = len(self.measured_steps)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            hook(trainer, *args)
            if len(self.measured_steps) > before:
                if cuda:
                    torch.cuda.synchronize()
                growth = torch.cuda.max_memory_allocated() - base if cuda else float("nan")
                self.records.append((self.measured_steps[-1], time.perf_counter() - start, growth))

        def on_train_start(self, trainer, pl_module):
            self._timed(super().on_train_start, trainer, pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._timed(super().on_train_batch_end, trainer, pl_module, outputs, batch, batch_idx)

        def on_train_end(self, trainer, pl_module):
            self._timed(super().on_train_end, trainer, pl_module)

    return TimedMonitor


def update_block_sizes(device: torch.device, rows: int, neurons: int) -> None:
    """Time the histogram update of a ``[rows, neurons]`` batch at the default block size and two larger ones, in
    one call and in the row chunks a probe batch's hook hands it off the fused CPU path (``MAX_UPDATE_ELEMENTS``
    values per call: 512 rows at 8,192 neurons)."""
    from negmonitor.budget import MAX_UPDATE_ELEMENTS
    from negmonitor.metrics.streaming import _DEVICE_BLOCK_ELEMENTS, NeuronStatsAccumulator

    x = torch.randn(rows, neurons, device=device, generator=torch.Generator(device).manual_seed(0))
    chunk = max(1, min(rows, MAX_UPDATE_ELEMENTS // neurons))
    print(f"\n== histogram update of one {rows:,} x {neurons:,} batch on {device} ==")
    for block in (_DEVICE_BLOCK_ELEMENTS, 4 * _DEVICE_BLOCK_ELEMENTS, 16 * _DEVICE_BLOCK_ELEMENTS):
        acc = NeuronStatsAccumulator(neurons, block_elements=block).to(device)
        acc.update(x)  # the grid and the first allocations
        for label, step in (("one call", rows), (f"{chunk}-row calls", chunk)):
            best = min(_timed_on(device, lambda: [acc.update(x[r0:r0 + step]) for r0 in range(0, rows, step)])
                       for _ in range(3))
            print(f"block {block:>10,} values, {label:>14}: best {best * 1e3:8.1f} ms "
                  f"({rows * neurons / best / 1e9:.2f} G values/s)")


def _timed_on(device: torch.device, run) -> float:
    """Seconds ``run`` takes, its device work included."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def syncs_per_probe_batch(device: torch.device, window: int = 512, batch_size: int = 4) -> None:
    """Host syncs per probe batch: one probe pass over 2 and over 6 batches under CUDA's sync debug mode, the
    difference over 4 (the once-per-measurement reads cancel out), beside the same count for the bare forward (the
    model's own forward may sync, e.g. transformers checking the mask). The goal is no more than the bare forward:
    a sync per batch stalls the training stream every batch. Counted on CUDA only (the debug mode does not exist
    elsewhere); off CUDA the same passes run uncounted, so the dry run shows the stage works."""
    import dataclasses
    import warnings
    from functools import partial

    from negmonitor.probeset import ProbeSet
    from negmonitor.probing import probe

    print(f"\n== host syncs per probe batch on {device} ==")
    tokenizer, texts = scale.corpus(16_384)
    model = scale.build_model("pythia-1.4b", len(tokenizer), device)

    def count(run) -> int | None:
        if device.type != "cuda":
            run()
            return None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(w.message) for w in caught)

    counts, bare = {}, {}
    for batches in (2, 6):
        probe_set = ProbeSet.build(texts, tokenizer, n_tokens=batches * batch_size * window, window=window,
                                   n_pairs=min(200, batches * batch_size * window // 4), seed=0)
        run_probe = partial(probe, model, probe_set, batch_size=batch_size, memory_budget=None)
        if batches == 2:  # uncounted: first-use caches (e.g. compute()'s tables) would sync in one count only
            run_probe()
        counts[batches] = count(run_probe)
        # the model's own forward may sync too (transformers checking the mask): the same batches without negmonitor,
        # from inputs already on the device, as the probe pass copies them once per pass, not per batch
        on_device = dataclasses.replace(probe_set, input_ids=probe_set.input_ids.to(device),
                                        attention_mask=probe_set.attention_mask.to(device))
        bare[batches] = count(partial(scale.bare_forward, model, on_device, batch_size, device))
    if device.type != "cuda":
        print(f"ran 2- and 6-batch probe passes and bare forwards ({window}-token windows, batch {batch_size}); "
              "syncs are counted on CUDA only")
        return
    print(f"syncs in one measurement: {counts[2]} with 2 batches, {counts[6]} with 6 batches -> "
          f"{(counts[6] - counts[2]) / 4:.1f} per batch; the bare forward alone: "
          f"{(bare[6] - bare[2]) / 4:.1f} per batch (goal: no more than the bare forward)")
    del model
    torch.cuda.empty_cache()


def train(args, root: Path, monitored: bool, precision: str = "bf16-mixed") -> tuple[float, list, int]:
    """One Trainer run; returns its wall time, each measurement's (step, seconds, CUDA peak growth) and the
    probe's token count (0 unmonitored)."""
    import lightning as L

    from negmonitor.train.datamodule import TextDataModule
    from negmonitor.train.module import CausalLMModule

    L.seed_everything(0, verbose=False)
    data = TextDataModule(source="builtin", n_sentences=args.sentences, seq_len=args.seq_len,
                          batch_size=args.batch_size, tokenizer_vocab_size=4096, seed=0)
    data.prepare_data()
    data.setup("fit")
    shape = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256) if args.dry_run else dict(
        hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072)
    module = CausalLMModule(family="neox", max_position_embeddings=max(256, args.seq_len), lr=6e-4, warmup_steps=20,
                            seed=0, **shape)
    module.configure_tokenizer(data.tokenizer)
    callbacks, monitor = [], None
    if monitored:
        # enough held-out paragraphs (~30 tokens each) for probe_tokens; strict: a failed measurement ends the run
        # (the default warns and goes on, which would time a skipped measurement as a cheap one)
        monitor = timed_monitor_class()(
            probe=data.probe_texts(max(256, args.probe_tokens // 16)), strict=True, every_n_steps=args.every,
            probe_tokens=args.probe_tokens, probe_window=args.seq_len,
            ablation={"fraction": 0.05, "max_matching_evals": 4, "ppl_window": args.seq_len},
            ablation_every_n_steps=args.every * 2, minimal_pairs="datamodule", log_dir=str(root / "records"),
            minimal_pairs_sample=10 if args.dry_run else 40, ppl_text=data.probe_texts(16 if args.dry_run else 64))
        monitor.records = []
        callbacks.append(monitor)
    else:
        callbacks.append(sync_each_step(not args.dry_run))
    if args.dry_run and precision == "bf16-mixed":
        precision = "32-true"
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu" if args.dry_run else "gpu", devices=1,
                        precision=precision, logger=False, callbacks=callbacks,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=str(root))
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    if not args.dry_run:
        torch.cuda.synchronize()
    probed = monitor._probe_set.n_tokens if monitor else 0
    return time.perf_counter() - start, (monitor.records if monitor else []), probed


def trainer_runs(args) -> None:
    """A warm-up, then the same run without and with the monitor; prints each figure as soon as it is known (a
    failed monitored run keeps the plain run's), then each measurement and the overhead."""
    device_name = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name()
    tiny = " (tiny in the dry run)" if args.dry_run else ""
    print(f"\n== Trainer run on {device_name}: Pythia-160m-shaped GPT-NeoX{tiny}"
          f", {args.steps} steps, batch {args.batch_size} x {args.seq_len} tokens, "
          f"{'fp32' if args.dry_run else 'bf16-mixed'}; ablation on ==")
    with tempfile.TemporaryDirectory() as tmp:
        train(argparse.Namespace(**{**vars(args), "steps": min(args.steps, 20)}), Path(tmp) / "warmup", False)
        plain, _, _ = train(args, Path(tmp) / "plain", False)
        print(f"wall time: plain {plain:.1f} s")
        monitored, records, probed = train(args, Path(tmp) / "monitored", True)
    _print_measurements(records, probed)
    print(f"wall time: plain {plain:.1f} s, monitored {monitored:.1f} s, overhead ratio {monitored / plain:.2f}")


def bf16_true_run(args) -> None:
    """A short strict run in ``precision="bf16-true"``: every measurement is taken (a failure ends the run)."""
    short = argparse.Namespace(**{**vars(args), "steps": max(2, args.every // 5), "every": max(1, args.every // 10)})
    print(f"\n== bf16-true run: {short.steps} steps, measured every {short.every} (strict) ==")
    with tempfile.TemporaryDirectory() as tmp:
        wall, records, probed = train(short, Path(tmp) / "bf16-true", True, precision="bf16-true")
    _print_measurements(records, probed)
    print(f"bf16-true: {len(records)} measurements taken in {wall:.1f} s")


def _print_measurements(records: list, probed: int) -> None:
    print(f"probe {probed:,} tokens")
    for step, seconds, growth in records:
        print(f"measurement at step {step}: {seconds:.2f} s, max_memory_allocated growth "
              f"{growth / 2**20:.0f} MiB" if growth == growth else f"measurement at step {step}: {seconds:.2f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU-sized run of every step (no GPU needed)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100, help="measure every N steps (and at steps 0 and the end)")
    parser.add_argument("--scale-tokens", type=int, default=8192, help="probe tokens of the scale benchmark")
    parser.add_argument("--skip-scale", action="store_true")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # figures reach the log as printed, even if the run is killed
    if args.dry_run:
        args.steps, args.every, args.scale_tokens = 12, 6, 2048
        args.probe_tokens, args.seq_len, args.batch_size, args.sentences = 2048, 64, 16, 5_000
    else:
        if not torch.cuda.is_available():
            print("gpu_check.py: no CUDA device here — run it on a GPU machine, or add --dry-run for a CPU-sized run")
            return 2
        args.probe_tokens, args.seq_len, args.batch_size, args.sentences = 32_768, 512, 16, 100_000
    device = torch.device("cpu" if args.dry_run else "cuda")
    failed = []  # each stage reports its own failure and the next one runs: device time is too scarce to lose them all
    if not args.skip_scale:
        scale_args = ["--tokens", str(args.scale_tokens), "--repeats", "1" if args.dry_run else "2"]
        scale_args += ["--models", "pythia-1.4b"] if args.dry_run else ["--device", "cuda"]
        _stage("scale benchmark", failed, lambda: scale.main(scale_args))
    rows, neurons = (2048, 512) if args.dry_run else (16_384, 8_192)
    _stage("histogram update timing", failed, lambda: update_block_sizes(device, rows, neurons))
    sync_shape = (64, 1) if args.dry_run else (512, 4)  # window, batch size
    _stage("host-sync count", failed, lambda: syncs_per_probe_batch(device, *sync_shape))
    _stage("trainer runs", failed, lambda: trainer_runs(args))
    _stage("bf16-true run", failed, lambda: bf16_true_run(args))
    imported = [name for name in ("datasets", "lm_eval", "spacy") if name in sys.modules]
    print("heavy optional imports: " + (", ".join(imported) + " IMPORTED (should not be)" if imported else "none"))
    if failed:
        print("failed stages: " + ", ".join(failed))
    return 1 if imported or failed else 0


def _stage(name: str, failed: list[str], run) -> None:
    """Run one diagnostic stage; a failure is printed (with its traceback) and noted, and the check goes on."""
    try:
        run()
    except Exception:  # noqa: BLE001 - a diagnostic: report it and go on to the next stage
        print(f"\n{name} FAILED:\n{traceback.format_exc()}", flush=True)
        failed.append(name)


if __name__ == "__main__":
    sys.exit(main())
