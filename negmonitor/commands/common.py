"""Arguments and checks shared by the sub-commands, so every command spells them the same way."""

from __future__ import annotations

import argparse

from negmonitor.atomic import ensure_writable_dir  # noqa: F401 (re-exported for the commands)
from negmonitor.errors import NegmonitorError


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--revision``, ``--dtype``, ``--device``, ``--tokenizer``."""
    parser.add_argument("--model", required=True,
                        help="hub id (e.g. EleutherAI/pythia-70m), save_pretrained folder, or Lightning .ckpt file "
                             "(e.g. runs/NAME/version_0/checkpoints/last.ckpt)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder or hub id, for a model without one beside it (default: the model's; "
                             "for a .ckpt, the one beside it or in its run folder)")
    parser.add_argument("--revision", default=None, help="hub revision, e.g. step1000 (Pythia)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="weights dtype (default: as saved)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")


def add_probe_args(parser: argparse.ArgumentParser) -> None:
    """Probe text and budget: ``--text``/``--dataset``, ``--tokens``, ``--window``, ``--pairs``, ``--layers``."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", default=None, help="local text file or folder of .txt files to probe with")
    source.add_argument("--dataset", default=None,
                        help="datasets hub id as ID[:CONFIG[:SPLIT]] (default: wikitext:wikitext-2-raw-v1:test)")
    parser.add_argument("--tokens", type=int, default=32_768, help="probe token budget (default 32768)")
    parser.add_argument("--window", type=int, default=512, help="tokens per probe window (clipped to the model)")
    parser.add_argument("--pairs", type=int, default=1_000, help="MD token pairs (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed for windows and pairs")
    parser.add_argument("--batch-size", type=int, default=8, help="probe windows per forward pass")
    parser.add_argument("--layers", default=None, help="comma-separated layer indices (default: all)")


def parse_layers(text: str | None) -> list[int] | None:
    """``"0,2,-1"`` → ``[0, 2, -1]``."""
    if text in (None, "", "all"):
        return None
    try:
        return [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError as exc:
        raise NegmonitorError(f"--layers must be comma-separated integers, got {text!r} — e.g. --layers 0,1,5") from exc


def check_fraction(value: float, name: str = "--fraction") -> float:
    """A fraction of neurons must lie in (0, 1]."""
    if not 0.0 < float(value) <= 1.0:
        raise NegmonitorError(f"{name} must be in (0, 1], got {value} — e.g. 0.01 for 1%")
    return float(value)


def check_positive(value: int | None, flag: str) -> None:
    """A count given on the command line (None: not given) must be at least 1."""
    if value is not None and value < 1:
        raise NegmonitorError(f"{flag} must be a positive integer, got {value}")


def probe_source(args: argparse.Namespace) -> str | None:
    """The probe source the user chose (a text path, a dataset id, or None for the default)."""
    return args.text or args.dataset
