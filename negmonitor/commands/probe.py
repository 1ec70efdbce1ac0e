"""``negmonitor probe``: measure WD, MD and pair signs of one model and print a per-layer summary."""

from __future__ import annotations

import argparse

from negmonitor.commands.common import (add_model_args, add_probe_args, add_protocol_args, dtype_name,
                                        ensure_writable_dir, memory_budget, parse_layers, probe_source,
                                        weights_dtype)
from negmonitor.errors import NegmonitorError


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``probe`` sub-command."""
    parser = sub.add_parser("probe", help="measure WD, MD and pair signs of a model's MLP neurons",
                            description="Run probe text through a model once and write per-neuron, per-layer and "
                                        "per-pair tables (parquet).")
    add_model_args(parser)
    add_probe_args(parser)
    add_protocol_args(parser, pairs=False)
    parser.add_argument("--out", required=True, help="folder for the tables")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load, probe, print the summary and write the tables."""
    from negmonitor.models import check_revision_applies, empty_model, load_model, load_tokenizer
    from negmonitor.probing import ProbeSettings, check_memory_budget, probe
    from negmonitor.probeset import ProbeSet

    out = ensure_writable_dir(args.out)
    _say_what_is_replaced(out)
    layers = parse_layers(args.layers)
    settings = ProbeSettings(batch_size=args.batch_size, memory_budget=memory_budget(args), progress=True)
    check_revision_applies(args.model, args.revision)
    # The probe text, the layers and the budget are checked on the model's config, before its weights load (16 GB
    # for Llama-3.1-8B): a typo in --text must not cost a download. Without a readable config (a .ckpt file, a wrong
    # id) the model loads first and load_model says what is wrong.
    shell = empty_model(args.model, revision=args.revision, dtype=weights_dtype(args), device=args.device)
    model = None
    if shell is None:
        model, tokenizer = load_model(args.model, revision=args.revision, dtype=weights_dtype(args),
                                      device=args.device, tokenizer=args.tokenizer)
    else:
        tokenizer = load_tokenizer(args.model, revision=args.revision, tokenizer=args.tokenizer)
    max_positions = getattr((shell if model is None else model).config, "max_position_embeddings", None)
    probe_set = ProbeSet.build(probe_source(args), tokenizer, n_tokens=args.tokens, window=args.window,
                               n_pairs=args.pairs, seed=args.seed, max_positions=max_positions)
    check_tokens_available(probe_set, args.tokens)
    if model is None:
        check_memory_budget(shell, probe_set, layers, settings)
        del shell
        model, tokenizer = load_model(args.model, revision=args.revision, dtype=weights_dtype(args),
                                      device=args.device, tokenizer=args.tokenizer)
    dtype = dtype_name(model)
    print(f"probing {args.model}{'@' + args.revision if args.revision else ''} in {dtype} on {probe_set.n_tokens} "
          f"tokens ({probe_set.n_windows} windows of {probe_set.window}) from {probe_set.source}")
    result = probe(model, probe_set, layers=layers, tokenizer=tokenizer, settings=settings)
    result.meta.update(model=args.model, revision=args.revision, dtype=dtype, protocol=args.protocol)
    result.save(out)
    print(format_summary(result.layers))
    print(f"tables written to {out}/ (neurons.parquet, layers.parquet, pairs.parquet, top_pairs.parquet, meta.json)")
    return 0


def _say_what_is_replaced(out) -> None:
    """One line when ``out`` already holds a probe result: this run's tables replace it (meta.json goes first)."""
    import json
    import sys
    from pathlib import Path

    meta = Path(out) / "meta.json"
    if not meta.is_file():
        return
    try:
        earlier = json.loads(meta.read_text())
    except (OSError, ValueError):
        earlier = {}
    what = f" of {earlier['model']}{'@' + earlier['revision'] if earlier.get('revision') else ''}" \
        if earlier.get("model") else ""
    print(f"negmonitor probe: {out} holds an earlier probe result{what}; this run replaces it", file=sys.stderr)


def check_tokens_available(probe_set, requested: int | None) -> None:
    """More ``--tokens`` than the probe text holds is an error, not a quietly smaller probe (None: the whole text)."""
    if requested is None:
        return
    available = int(probe_set.meta.get("n_tokens_available", probe_set.n_tokens))
    if available < requested:
        raise NegmonitorError(f"the probe text {probe_set.source} holds {available:,} tokens, fewer than --tokens "
                              f"{requested:,} — pass --tokens {available} (or less) or a longer text")


def format_summary(layers) -> str:
    """Per-layer summary: max/mean WD, negative-side share, NN share, Jaccard of top-5% WD vs MD."""
    columns = ["layer", "wd_max", "wd_mean", "wd_p99", "wd_neg_share", "md_mean", "nn_share", "jaccard_wd_md",
               "nonfinite_tokens"]
    shown = layers[[c for c in columns if c in layers.columns]]
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4f}")
