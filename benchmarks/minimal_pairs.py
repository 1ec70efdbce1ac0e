"""Benchmark: minimal-pair scoring throughput on all 67,000 BLiMP pairs, batched against one sentence at a time.

Scores every BLiMP pair with a tiny randomly initialised GPT-NeoX (2 layers, width 32, the test suite's model)
through ``evaluate_pairs``: once batched (sorted by length, right-padded), and once with ``batch_size=1`` on a
seeded sample of pairs, extrapolated to all pairs (the output says so). Both timings include tokenization. It
also checks that the two give the same scores on the sample. The figures measure the scoring machinery (Python,
padding, tokenization, small forward passes), not a real model's compute.

Run from the repository root::

    python benchmarks/minimal_pairs.py                      # ../shared/data/blimp, batch 64, 1 torch thread
    python benchmarks/minimal_pairs.py --batch-size 128 --unbatched-pairs 1000 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from tiny_models import tiny_causal_lm, tiny_tokenizer  # noqa: E402

from negmonitor.evaluation import accuracy_table, evaluate_pairs, load_blimp  # noqa: E402

DEFAULT_BLIMP = REPO.parent / "shared" / "data" / "blimp"


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blimp", type=Path, default=DEFAULT_BLIMP, help="folder of BLiMP's <UID>.jsonl files")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of the batched run")
    parser.add_argument("--unbatched-pairs", type=int, default=500, help="pairs sampled for the batch-size-1 run")
    parser.add_argument("--limit", type=int, default=None, help="score only this many pairs per UID (default all)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: a width-32 model gains nothing from more)")
    parser.add_argument("--family", default="neox", choices=["neox", "llama", "gpt2", "opt"])
    return parser.parse_args()


def timed(fn, *args, **kwargs):
    """Call ``fn`` and return its result and the wall time in seconds."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    """Load BLiMP, time batched and unbatched scoring, print the figures."""
    args = parse_args()
    if not args.blimp.is_dir():
        sys.exit(f"BLiMP folder not found: {args.blimp} — pass --blimp DIR")
    torch.set_num_threads(args.threads)
    tokenizer, model = tiny_tokenizer(), tiny_causal_lm(args.family)
    pairs, load_s = timed(load_blimp, args.blimp, sample_per_uid=args.limit)
    n_sentences = len(set(pairs["sentence_good"]) | set(pairs["sentence_bad"]))
    print("negmonitor minimal-pair benchmark")
    print(f"model: tiny {args.family} (2 layers, width 32, vocab {model.config.vocab_size}, random init), "
          f"device cpu, torch threads {torch.get_num_threads()}")
    print(f"BLiMP: {len(pairs):,} pairs in {pairs['uid'].nunique()} UIDs, {n_sentences:,} distinct sentences, "
          f"loaded in {load_s:.2f} s")

    evaluate_pairs(model, tokenizer, pairs.iloc[:256], batch_size=args.batch_size)  # warm-up
    scored, batched_s = timed(evaluate_pairs, model, tokenizer, pairs, batch_size=args.batch_size)
    batched_rate = len(pairs) / batched_s
    print(f"batched   (batch_size={args.batch_size}): all {len(pairs):,} pairs in {batched_s:.1f} s -> "
          f"{batched_rate:,.0f} pairs/s ({n_sentences / batched_s:,.0f} sentences/s)")

    sample = pairs.sample(n=min(args.unbatched_pairs, len(pairs)), random_state=0)
    single, single_s = timed(evaluate_pairs, model, tokenizer, sample, batch_size=1)
    single_rate = len(sample) / single_s
    print(f"unbatched (batch_size=1): timed on a random sample of {len(sample):,} pairs (seed 0) in {single_s:.1f} s "
          f"-> {single_rate:,.0f} pairs/s; extrapolated to all {len(pairs):,} pairs: "
          f"{len(pairs) / single_rate:,.0f} s (not measured)")
    print(f"speed-up batched / unbatched: {batched_rate / single_rate:.1f}x")

    same = scored.loc[sample.index]
    diff = max((same["logp_good"] - single["logp_good"]).abs().max(),
               (same["logp_bad"] - single["logp_bad"]).abs().max())
    agree = (same["correct"] == single["correct"]).mean()
    print(f"batched vs unbatched on the sample: max |logp difference| {diff:.2e}, same verdict on {agree:.1%} of pairs")
    overall = accuracy_table(scored).iloc[0]
    print(f"accuracy of the random tiny model (a sanity check, near chance): {overall['accuracy']:.3f} "
          f"± {overall['se']:.3f} (n={int(overall['n']):,})")


if __name__ == "__main__":
    main()
