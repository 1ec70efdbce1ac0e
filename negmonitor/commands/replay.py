"""``negmonitor replay``: run a checkpoint series (Pythia, or one's own) through the monitors into a log folder.

Example::

    negmonitor replay --model EleutherAI/pythia-160m --revisions log:16 --logdir runs/pythia-160m
    negmonitor replay --model EleutherAI/pythia-160m --revisions all --logdir runs/p160 --shard 2/4 --device cuda
    negmonitor replay --model runs/my-run/version_0/checkpoints --revisions all --logdir runs/my-run-replay \\
        --tokenizer runs/my-run/tokenizer
"""

from __future__ import annotations

import argparse

from negmonitor.commands.common import (add_ppl_window_args, add_probe_args, add_protocol_args, check_fraction,
                                        check_positive, ensure_writable_dir, memory_budget, parse_layers,
                                        protocol_kwargs, weights_dtype)
from negmonitor.errors import NegmonitorError


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``replay`` sub-command."""
    parser = sub.add_parser(
        "replay", help="replay a checkpoint series (e.g. Pythia) through the monitors",
        description="Load each checkpoint of a series in turn, measure it like a live run (same records and "
                    "TensorBoard tags, global_step = checkpoint step), keep a manifest of every revision, and "
                    "resume where an interrupted replay stopped.")
    parser.add_argument("--model", required=True,
                        help="hub id (EleutherAI/pythia-160m), a folder of step-named save_pretrained folders, or a "
                             "folder of Lightning .ckpt files (or one file)")
    parser.add_argument("--revisions", required=True,
                        help="preset 'all' or 'log:N' (N log-spaced), or a list: step0,step1000,143000")
    parser.add_argument("--logdir", required=True, help="log folder (records in LOGDIR/negmonitor, events in LOGDIR)")
    parser.add_argument("--probe", default=None, help="probe text: a file, a folder of .txt, or a dataset id "
                                                      "(same as --text / --dataset)")
    add_probe_args(parser)
    parser.add_argument("--cohort-frac", type=float, default=0.05, help="cohort: top share of WD neurons per layer")
    parser.add_argument("--cohort-revision", default=None,
                        help="reference checkpoint of the cohort (default: the last of the list)")
    parser.add_argument("--ablate", nargs="?", type=float, const=0.01, default=None, metavar="FRACTION",
                        help="also measure ablation damage at every checkpoint (top FRACTION of WD neurons, "
                             "default 0.01)")
    parser.add_argument("--random-draws", type=int, default=1, metavar="N",
                        help="random controls per checkpoint (with --ablate; mean and sd are logged; default 1)")
    parser.add_argument("--blimp", default=None, help="folder of BLiMP .jsonl files for the ablation accuracy")
    parser.add_argument("--tse", default=None, help="folder of TSE pickles for the ablation accuracy (with or "
                                                    "without --blimp)")
    parser.add_argument("--pairs-per-suite", type=int, default=20,
                        help="minimal pairs sampled per BLiMP UID / TSE construction (default 20)")
    parser.add_argument("--ppl-text", default=None,
                        help="text file for the ablation perplexity (default: a local probe file, else WikiText-2 "
                             "validation from the hub)")
    add_ppl_window_args(parser)
    add_protocol_args(parser)
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                        help="weights dtype (default: fp32 on CPU, as saved on GPU; fp32 under --protocol paper); "
                             "printed and recorded")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--shard", default=None, metavar="K/N",
                        help="replay the K-th of N blocks of the list (1-based); shards share one --logdir")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: the series' own)")
    parser.add_argument("--tokens-per-step", type=int, default=None,
                        help="tokens per step (default: 2097152 for Pythia, else read from the checkpoints or 0)")
    parser.add_argument("--module", default=None,
                        help="LightningModule of .ckpt series as package.module:Class, loaded with its "
                             "load_from_checkpoint (default: the transformers model rebuilt from the state_dict)")
    parser.add_argument("--cache-dir", default=None, help="hub cache folder (default: HF_HUB_CACHE)")
    parser.add_argument("--run-name", default=None, help="the records' run name (default: the log folder's name)")
    parser.add_argument("--media-every", type=int, default=None,
                        help="histograms/images at every N-th checkpoint (default: about 32 in all)")
    parser.add_argument("--image-neurons", type=int, default=4,
                        help="top-WD neurons per layer in the pre-activation images (0: no images)")
    parser.add_argument("--no-tensorboard", action="store_true", help="write records only, no event files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--evict-cache", action="store_true",
                        help="delete each hub revision from the hub cache once it is recorded (a long series of a big "
                             "model: Pythia-12B's 154 checkpoints are ~3.7 TB); local folders are never touched")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the arguments, replay, print the manifest and the output paths."""
    from negmonitor.replay.revisions import parse_shard
    from negmonitor.replay.runner import replay

    shard = parse_shard(args.shard)
    ensure_writable_dir(args.logdir, "log folder")
    if args.probe and (args.text or args.dataset):
        raise NegmonitorError("give the probe text once: --probe, --text or --dataset")
    probe = args.probe or args.text or args.dataset
    ablation, minimal_pairs, ppl_text = _ablation(args)
    dtype = weights_dtype(args) or ("as saved" if args.device and args.device.startswith("cuda") else "fp32")
    print(f"replaying {args.model} ({args.revisions}) into {args.logdir} in {dtype}"
          + (f", shard {shard[0]}/{shard[1]}" if shard != (1, 1) else ""))
    result = replay(
        args.model, args.revisions, args.logdir, probe=probe, probe_tokens=args.tokens, probe_window=args.window,
        n_pairs=args.pairs, seed=args.seed, batch_size=args.batch_size, memory_budget=memory_budget(args),
        layers=parse_layers(args.layers),
        cohort_frac=check_fraction(args.cohort_frac, "--cohort-frac"), cohort_revision=args.cohort_revision,
        ablation=ablation, minimal_pairs=minimal_pairs, ppl_text=ppl_text, dtype=weights_dtype(args),
        device=args.device,
        shard=shard, tokenizer=args.tokenizer, tokens_per_step=args.tokens_per_step, module=args.module,
        cache_dir=args.cache_dir, run_name=args.run_name, media_every=args.media_every, image_neurons=args.image_neurons,
        tensorboard=not args.no_tensorboard, progress=not args.no_progress, evict_cache=args.evict_cache)
    print(result.summary())
    return 0


def _ablation(args: argparse.Namespace) -> tuple:
    """``(AblationSettings | None, minimal pairs | None, perplexity text | None)`` from the flags, checked early."""
    if args.ablate is None:
        if args.blimp or args.tse or args.ppl_text or args.random_draws != 1 or args.ppl_window or args.ppl_stride:
            raise NegmonitorError("--blimp, --tse, --ppl-text, --ppl-window, --ppl-stride and --random-draws only "
                                  "matter with --ablate — add --ablate")
        return None, None, None
    from negmonitor.ablation import AblationSettings

    check_positive(args.random_draws, "--random-draws")
    ablation = AblationSettings(fraction=check_fraction(args.ablate, "--ablate"), seed=args.seed,
                                random_draws=args.random_draws, batch_size=args.batch_size,
                                memory_budget=memory_budget(args), **protocol_kwargs(args))
    minimal_pairs = []  # BLiMP and TSE together are scored in the same protocol run
    if args.blimp:
        from negmonitor.evaluation.blimp import load_blimp

        minimal_pairs.append(load_blimp(args.blimp, sample_per_uid=args.pairs_per_suite, seed=args.seed))
    if args.tse:
        from negmonitor.evaluation.tse import load_tse

        minimal_pairs.append(load_tse(args.tse, sample_per_construction=args.pairs_per_suite, seed=args.seed,
                                      npi_pairs=ablation.npi_pairs))
    from pathlib import Path

    from negmonitor.evaluation.lm_perplexity import load_perplexity_text

    local_probe = next((p for p in (args.probe, args.text) if p and Path(p).expanduser().exists()), None)
    ppl_text = load_perplexity_text(args.ppl_text or local_probe)  # None: WikiText-2 validation from the hub
    return ablation, minimal_pairs or None, ppl_text
