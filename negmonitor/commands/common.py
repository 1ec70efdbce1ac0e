"""Arguments and checks shared by the sub-commands, so every command spells them the same way."""

from __future__ import annotations

import argparse

from negmonitor.atomic import ensure_writable_dir  # noqa: F401 (re-exported for the commands)
from negmonitor.errors import NegmonitorError
from negmonitor.validation import check_fraction, check_positive  # noqa: F401 (re-exported for the commands)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--revision``, ``--dtype``, ``--device``, ``--tokenizer``."""
    parser.add_argument("--model", required=True,
                        help="hub id (e.g. EleutherAI/pythia-70m), save_pretrained folder, or Lightning .ckpt file "
                             "(e.g. runs/NAME/version_0/checkpoints/last.ckpt)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder or hub id, for a model without one beside it (default: the model's; "
                             "for a .ckpt, the one beside it or in its run folder)")
    parser.add_argument("--revision", default=None, help="hub revision, e.g. step1000 (Pythia)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                        help="weights dtype (default: fp32 on CPU, as saved on GPU; fp32 under --protocol paper); "
                             "printed and recorded")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")


def add_probe_args(parser: argparse.ArgumentParser) -> None:
    """Probe text and budget: ``--text``/``--dataset``, ``--tokens``, ``--window``, ``--pairs``, ``--layers``."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", default=None, help="local text file or folder of .txt files to probe with")
    source.add_argument("--dataset", default=None,
                        help="datasets hub id as ID[:CONFIG[:SPLIT]] (default: wikitext:wikitext-2-raw-v1:test)")
    add_probe_window_args(parser)
    parser.add_argument("--pairs", type=int, default=1_000, help="MD token pairs (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed for windows and pairs")
    parser.add_argument("--batch-size", type=int, default=8, help="probe windows per forward pass")
    add_memory_budget_arg(parser)
    parser.add_argument("--layers", default=None, help="comma-separated layer indices (default: all)")


def add_memory_budget_arg(parser: argparse.ArgumentParser) -> None:
    """``--memory-budget``: the extra device memory one probe measurement may allocate."""
    parser.add_argument("--memory-budget", default="2GiB", metavar="SIZE",
                        help="extra memory one measurement may allocate on the model's device, e.g. 2GiB or 512MiB "
                             "(layers are measured in groups that fit, perplexity and minimal-pair batches are sized "
                             "to fit; 'none': no limit; default 2GiB)")


def memory_budget(args: argparse.Namespace) -> int | None:
    """The parsed ``--memory-budget`` (bytes; None for 'none')."""
    from negmonitor.budget import parse_bytes

    return parse_bytes(getattr(args, "memory_budget", None), "--memory-budget")


def add_probe_window_args(parser: argparse.ArgumentParser) -> None:
    """``--tokens`` (budget; default the whole text) and ``--window`` (default 2048), the paper's probe windows."""
    parser.add_argument("--tokens", type=int, default=None,
                        help="probe token budget: the first ceil(N/window) windows (default: the whole text, as the "
                             "paper)")
    parser.add_argument("--window", type=int, default=2_048,
                        help="tokens per probe window (default 2048, clipped to the model's positions)")


def add_protocol_args(parser: argparse.ArgumentParser, pairs: bool = True) -> None:
    """``--protocol`` and, with ``pairs``, the minimal-pair scoring choices it sets (each may be given alone)."""
    from negmonitor.protocol import NPI_PAIRS, PREFIXES, PROTOCOLS, SCORES

    parser.add_argument("--protocol", default="negmonitor", choices=list(PROTOCOLS),
                        help="negmonitor (default) or paper: every choice that differs from the authors' code set to "
                             "theirs (see the README's table)")
    if pairs:
        parser.add_argument("--blimp-score", default=None, choices=list(SCORES),
                            help="BLiMP sentence score: sum (default) or mean log-probability")
        parser.add_argument("--tse-score", default=None, choices=list(SCORES),
                            help="TSE sentence score: sum (default) or mean (paper) log-probability")
        parser.add_argument("--pair-prefix", default=None, choices=list(PREFIXES),
                            help="bos: a BOS (else EOS) token before each sentence (default); none: the tokenizer's "
                                 "own special tokens (paper)")
        parser.add_argument("--npi-pairs", default=None, choices=list(NPI_PAIRS),
                            help="both pairs of each TSE NPI triple (default) or the last only (paper)")


def protocol_kwargs(args: argparse.Namespace) -> dict:
    """The ``AblationSettings`` keywords of ``add_protocol_args`` and ``--ppl-window`` / ``--ppl-stride``."""
    return {"protocol": args.protocol, "blimp_score": args.blimp_score, "tse_score": args.tse_score,
            "pair_prefix": args.pair_prefix, "npi_pairs": args.npi_pairs, "ppl_window": args.ppl_window,
            "ppl_stride": args.ppl_stride}


def add_ppl_window_args(parser: argparse.ArgumentParser) -> None:
    """``--ppl-window`` and ``--ppl-stride``."""
    parser.add_argument("--ppl-window", type=int, default=None,
                        help="perplexity chunk length (default: 2048, clipped to the model's positions)")
    parser.add_argument("--ppl-stride", type=int, default=None,
                        help="step between perplexity windows (default: the window, disjoint chunks with the tail "
                             "dropped; less: sliding windows)")


def weights_dtype(args: argparse.Namespace) -> str | None:
    """``--dtype``, else the protocol's (``paper``: fp32, as the authors' code loads), else None (fp32 on CPU, as
    saved on a GPU)."""
    from negmonitor.protocol import get_protocol

    return args.dtype or get_protocol(getattr(args, "protocol", None)).dtype


def dtype_name(model) -> str:
    """The dtype the model's parameters hold, as ``float32`` / ``float16`` / ``bfloat16``."""
    param = next(model.parameters(), None)
    return str(param.dtype).removeprefix("torch.") if param is not None else "unknown"


def parse_layers(text: str | None) -> list[int] | None:
    """``"0,2,-1"`` → ``[0, 2, -1]``."""
    if text in (None, "", "all"):
        return None
    try:
        return [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError as exc:
        raise NegmonitorError(f"--layers must be comma-separated integers, got {text!r} — e.g. --layers 0,1,5") from exc


def probe_source(args: argparse.Namespace) -> str | None:
    """The probe source the user chose (a text path, a dataset id, or None for the default)."""
    return args.text or args.dataset
