"""Benchmark: extra memory of per-token log-probabilities (minimal pairs, POS surprisal) at Llama-3.1-8B's vocabulary.

Given bf16 logits of one batch of windows (default 2 windows of 2,048 tokens over 128,256 entries: 1.05 GB), it
measures the extra peak memory and the time of two ways to get ``log p(next token)`` per position, in one run:

- whole batch: ``log_softmax(logits.float()).gather(...)`` (how negmonitor did it before): an fp32 copy and an fp32
  log-softmax of the whole batch beside the logits;
- sliced (``negmonitor.evaluation.minimal_pairs.picked_logprobs``): the target logit minus an fp32 log-sum-exp,
  ``LOSS_ROWS`` positions at a time.

It checks the two agree, and prints both peaks (resident memory on CPU, ``max_memory_allocated`` on CUDA) and
their ratio. Run from the repository root::

    PYTHONPATH=. python benchmarks/token_logprobs.py                 # CPU; --device cuda on a GPU
    PYTHONPATH=. python benchmarks/token_logprobs.py --windows 16    # the report's POS batch before the budget
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale  # noqa: E402 - benchmarks/scale.py: peak_extra_memory

from negmonitor.evaluation.minimal_pairs import picked_logprobs  # noqa: E402


def whole_batch(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The former way: one fp32 log-softmax over the whole batch."""
    return torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]


def measure(way, logits: torch.Tensor, ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, float, int]:
    with scale.peak_extra_memory(device) as memory:
        start = time.perf_counter()
        out = way(logits, ids)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return out, seconds, memory["peak"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=2, help="windows in the batch")
    parser.add_argument("--window", type=int, default=2_048, help="tokens per window")
    parser.add_argument("--vocab", type=int, default=128_256, help="vocabulary (Llama-3.1-8B: 128,256)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    logits = (torch.randn(args.windows, args.window, args.vocab, device=device) * 3).to(torch.bfloat16)
    ids = torch.randint(0, args.vocab, (args.windows, args.window), device=device)
    gib = 1 << 30
    print(f"logits: {args.windows} x {args.window} x {args.vocab:,} bf16 = {logits.numel() * 2 / gib:.2f} GiB "
          f"on {device}")
    sliced, t_sliced, m_sliced = measure(lambda x, i: picked_logprobs(x, i)[:, :-1], logits, ids, device)
    whole, t_whole, m_whole = measure(whole_batch, logits, ids, device)
    error = (sliced - whole).abs().max().item()
    print(f"whole batch (before): peak extra {m_whole / gib:.2f} GiB, {t_whole:.2f} s")
    print(f"sliced (now):         peak extra {m_sliced / gib:.2f} GiB, {t_sliced:.2f} s")
    print(f"memory ratio before/now: {m_whole / max(m_sliced, 1):.1f}x; time ratio now/before: "
          f"{t_sliced / t_whole:.2f}x; max |difference| {error:.1e} nats")


if __name__ == "__main__":
    main()
