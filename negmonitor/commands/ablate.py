"""``negmonitor ablate``: the paper's Section 3 protocol on one model, printed as an A.2-like table.

Probes the model (or reads a saved probe), then evaluates baseline, Wasserstein (top ``--fraction`` by WD per
layer), random (same count per layer) and perplexity-matched (bottom-p% by WD) conditions on perplexity, BLiMP,
TSE and optional lm-eval tasks. Every table is written to ``--out`` as CSV and markdown, with the selections as
parquet.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field

from negmonitor.commands.common import (add_memory_budget_arg, add_model_args, add_ppl_window_args,
                                        add_probe_window_args, add_protocol_args, check_fraction, check_positive,
                                        dtype_name, ensure_writable_dir, memory_budget, parse_layers, protocol_kwargs,
                                        weights_dtype)
from negmonitor.errors import NegmonitorError

EVAL_NAMES = ("ppl", "blimp", "tse", "grammar", "lm-eval:TASK1+TASK2")
GRAMMAR = "grammar"  # the built-in grammar corpus: --eval grammar (its minimal pairs), --text grammar (held-out text)
GRAMMAR_PAIRS = 40  # pairs per construction, as a monitored run's minimal_pairs_sample default


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``ablate`` sub-command."""
    parser = sub.add_parser("ablate", help="sign-specific ablation of Wasserstein neurons vs controls",
                            description="Ablate the top WD neurons of every layer and compare with random and "
                                        "perplexity-matched controls on perplexity, BLiMP, TSE and lm-eval tasks.")
    add_model_args(parser)
    _add_ablation_args(parser)
    _add_data_args(parser)
    _add_probe_args(parser)
    add_protocol_args(parser)
    parser.add_argument("--out", required=True, help="folder for the tables")
    parser.set_defaults(func=run)


def _add_ablation_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fraction", type=float, default=0.01, help="fraction of each layer's neurons (default 0.01)")
    parser.add_argument("--mode", default="zero_negative",
                        help="zero_negative (default), zero_positive, relu_positive, flip_negative_post, zero_neuron")
    parser.add_argument("--metric", default="wd", help="per-neuron metric that ranks neurons (default wd)")
    parser.add_argument("--eval", default=None,
                        help="comma-separated evaluations: ppl, blimp, tse, grammar (the built-in grammar's held-out "
                             "minimal pairs, as `negmonitor train` ablates with), lm-eval:TASK1+TASK2 (default "
                             "ppl,blimp, plus tse when --tse is given)")
    parser.add_argument("--random-draws", type=int, default=1, metavar="N",
                        help="random controls to evaluate, seeds SEED, SEED+1, ... (rows random, random_draw1, ...; "
                             "default 1)")
    parser.add_argument("--ppl-tolerance", type=float, default=0.05,
                        help="how close the matched control's perplexity must come to the Wasserstein ablation's, as "
                             "a share of that ablation's damage (default 0.05)")
    parser.add_argument("--max-matching-evals", type=int, default=12,
                        help="perplexity evaluations of the matched control's search (default 12)")
    parser.add_argument("--layer-groups", type=int, default=None, metavar="G",
                        help="also sweep groups of G consecutive layers (alone and cumulative)")
    parser.add_argument("--fractions", default=None, metavar="F1,F2,..",
                        help="also sweep perplexity (only) vs fraction for top, random and bottom neurons, "
                             "e.g. 0.001,0.01,0.05")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", default=None,
                        help="perplexity text file or folder, or 'grammar' for the built-in corpus's held-out text "
                             "(default: WikiText-2 raw validation, hub, as the paper); never the probe text (that is "
                             "--probe-text)")
    parser.add_argument("--grammar-seed", type=int, default=0,
                        help="seed of the built-in grammar corpus for --eval grammar / --text grammar / --probe-text "
                             "grammar (the training config's data.seed; default 0)")
    parser.add_argument("--ppl-tokens", type=int, default=None, help="score only the first N tokens of the text")
    add_ppl_window_args(parser)
    parser.add_argument("--blimp", default=None, help="folder of BLiMP <UID>.jsonl files (default: nyu-mll/blimp, hub)")
    parser.add_argument("--tse", default=None, help="folder of the TSE pickles (needed for --eval tse)")
    parser.add_argument("--sample", type=int, default=None, help="pairs per BLiMP UID / TSE construction (default all)")
    parser.add_argument("--blimp-uids", default=None, help="comma-separated BLiMP UIDs (default all 67)")
    parser.add_argument("--tse-constructions", default=None, help="comma-separated TSE constructions (default all)")
    parser.add_argument("--lm-eval-limit", type=float, default=None, help="documents per lm-eval task")
    parser.add_argument("--lm-eval-tasks-dir", default=None, help="folder of custom lm-eval task YAMLs")


def _add_probe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--probe-text", default=None,
                        help="probe text file, folder or dataset id ID[:CONFIG[:SPLIT]] that ranks the neurons "
                             "(default: WikiText-2 raw test, hub, as the paper)")
    parser.add_argument("--probe-result", default=None, help="reuse a `negmonitor probe --out` folder instead")
    add_probe_window_args(parser)
    parser.add_argument("--layers", default=None, help="comma-separated layers to ablate (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probe windows, samples and random control")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="probe windows and perplexity chunks per forward (minimal pairs: as many sentences as "
                             "--memory-budget holds, up to this many 2,048-token windows' tokens)")
    add_memory_budget_arg(parser)


@dataclass
class EvalRequest:
    """Which evaluations the user asked for."""

    names: list[str] = field(default_factory=list)
    lm_eval_tasks: list[str] = field(default_factory=list)


def parse_evals(text: str) -> EvalRequest:
    """``"ppl,blimp,lm-eval:arc_easy+piqa"`` → names and lm-eval tasks; unknown names raise."""
    request = EvalRequest()
    for part in (p.strip() for p in str(text).split(",") if p.strip()):
        name, _, tasks = part.partition(":")
        if name in ("lm-eval", "lm_eval"):
            request.lm_eval_tasks += [t for t in tasks.split("+") if t]
            if not request.lm_eval_tasks:
                raise NegmonitorError(f"--eval {part!r} names no task — write lm-eval:TASK1+TASK2")
            name = "lm_eval"
        elif name not in ("ppl", "blimp", "tse", GRAMMAR) or tasks:
            raise NegmonitorError(f"unknown evaluation {part!r} in --eval — use any of {', '.join(EVAL_NAMES)}")
        if name not in request.names:
            request.names.append(name)
    if not request.names:
        raise NegmonitorError("--eval names no evaluation — e.g. --eval ppl,blimp,tse")
    return request


def _check_args(args: argparse.Namespace) -> tuple:
    """Every check that needs no model, so a typo fails in the first second."""
    from negmonitor.ablation import AblationSettings

    check_fraction(args.fraction)
    for flag in ("sample", "ppl_tokens", "layer_groups", "random_draws", "tokens", "ppl_window", "ppl_stride"):
        check_positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    settings = AblationSettings(
        fraction=args.fraction, mode=args.mode, metric=args.metric, seed=args.seed, random_draws=args.random_draws,
        ppl_tolerance=args.ppl_tolerance,
        max_matching_evals=args.max_matching_evals, batch_size=args.batch_size,
        layers=tuple(parse_layers(args.layers)) if args.layers else None,
        lm_eval_limit=_limit(args.lm_eval_limit),
        lm_eval_task_dirs=(args.lm_eval_tasks_dir,) if args.lm_eval_tasks_dir else (), progress=True,
        memory_budget=memory_budget(args),
        **protocol_kwargs(args))
    _check_metric(args.metric)
    request = parse_evals(args.eval or ("ppl,blimp,tse" if args.tse else "ppl,blimp"))
    if GRAMMAR in request.names and "tse" in request.names:
        raise NegmonitorError("--eval grammar and tse share the TSE-shaped slot of one protocol run — run them in "
                              "two ablate commands")
    if "tse" in request.names and args.tse is None:
        raise NegmonitorError("--eval tse needs the TSE data — pass the folder of its pickles with --tse DIR")
    if request.lm_eval_tasks:  # a typo fails now, not after the model has loaded and been probed
        from negmonitor.evaluation.lm_eval_bridge import check_lm_eval_tasks

        check_lm_eval_tasks(request.lm_eval_tasks, settings.lm_eval_task_dirs or None)
    fractions = [check_fraction(float(f), "--fractions") for f in _split_floats(args.fractions)]
    return request, settings, fractions


def _check_metric(metric: str) -> None:
    from negmonitor.result import NEURON_COLUMNS

    known = [c for c in NEURON_COLUMNS[2:] if c not in ("count", "nonfinite", "flagged")]
    if metric not in known:
        raise NegmonitorError(f"unknown --metric {metric!r} — use one of {', '.join(known)}")


def _split_floats(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError as exc:
        raise NegmonitorError(f"--fractions must be comma-separated numbers, got {text!r} — e.g. 0.01,0.05") from exc


def _limit(value: float | None) -> int | float | None:
    if value is None or math.isnan(value):
        return None
    return int(value) if value >= 1 else value


def run(args: argparse.Namespace) -> int:
    """Check arguments, load, probe, run the protocol (and sweeps), print and write the tables."""
    from negmonitor.ablation import (EvalSuite, check_perplexity_budget, fraction_sweep, format_table,
                                     layer_group_sweep, run_protocol)
    from negmonitor.models import empty_model, load_model

    request, settings, fractions = _check_args(args)
    memory_budget(args)  # a bad --memory-budget fails before the model loads
    out = ensure_writable_dir(args.out)
    _warn_stale_outputs(out, args, fractions)
    data = _load_data(args, request, settings.npi_pairs)  # a wrong folder fails before a 16 GB model loads
    if "ppl" in request.names:  # a budget too small for one window, from the config: before the weights load
        shell = empty_model(args.model, revision=args.revision, dtype=weights_dtype(args), device=args.device)
        if shell is not None:
            check_perplexity_budget(shell, None, settings)
    saved_probe = _saved_probe(args)  # a wrong --probe-result fails before the model loads too
    model, tokenizer = load_model(args.model, revision=args.revision, dtype=weights_dtype(args),
                                  device=args.device, tokenizer=args.tokenizer)
    if "ppl" in request.names:
        check_perplexity_budget(model, tokenizer, settings)  # before the probe, not at the first evaluation
    suite = EvalSuite.build(tokenizer, **data, lm_eval_tasks=request.lm_eval_tasks, max_ppl_tokens=args.ppl_tokens)
    values = (saved_probe.values(settings.metric) if saved_probe is not None
              else _probe_values(args, model, tokenizer, settings, out))
    dtype = dtype_name(model)
    evaluations = ", ".join(GRAMMAR if n == "tse" and GRAMMAR in request.names else n for n in suite.names)
    print(f"ablating {args.model}{'@' + args.revision if args.revision else ''} in {dtype}: mode {settings.mode}, "
          f"top {settings.fraction:g} of neurons by {settings.metric} per layer; evaluations {evaluations}; "
          f"protocol {settings.protocol}")

    def finish(report) -> None:  # each table is saved as soon as it is done: a later sweep's failure keeps it
        report.meta.update(model=args.model, revision=args.revision, dtype=dtype,
                           probe_result=str(args.probe_result) if args.probe_result else None)
        if GRAMMAR in request.names:
            _name_grammar_suite(report, args.grammar_seed)
        print(f"\n{report.name}:\n{format_table(report.table)}")
        if report.name == "ablation":
            _print_matching(report.meta.get("matching", {}))
        for path in report.save(out).values():
            print(f"wrote {path}")

    _remove_earlier_tables(out, ["ablation"] + ["layer_groups"] * bool(args.layer_groups)
                           + ["fraction_sweep"] * bool(fractions))
    finish(run_protocol(model, tokenizer, values, suite, settings))
    if args.layer_groups:
        finish(layer_group_sweep(model, tokenizer, values, suite, args.layer_groups, settings))
    if fractions:
        ppl_only = (EvalSuite(ppl_ids=suite.ppl_ids, batch_limits=suite.batch_limits) if suite.ppl_ids is not None
                    else suite)
        finish(fraction_sweep(model, tokenizer, values, ppl_only, fractions, settings))
    return 0


TABLE_SUFFIXES = (".csv", ".md", "_breakdown.csv", "_selections.parquet", "_matching.csv", "_meta.json")


def _remove_earlier_tables(out, names: list[str]) -> None:
    """Remove an earlier run's files of the tables this run writes anew, once it is about to: if this run stops
    part-way, the folder holds no table of another run beside its own (the report would read them as one)."""
    from pathlib import Path

    removed = []
    for name in names:
        for suffix in TABLE_SUFFIXES:
            path = Path(out) / f"{name}{suffix}"
            if path.is_file():
                path.unlink()
                removed.append(path.name)
    if removed:
        print(f"removed an earlier run's {', '.join(removed)} from {out} (this run writes them anew)")


def _warn_stale_outputs(out, args: argparse.Namespace, fractions: list[float]) -> None:
    """Say which tables of an earlier ablate run in ``out`` this run leaves as they are (``negmonitor report``
    reads every table in the folder as one run's)."""
    from pathlib import Path

    stale = [f"{name}.csv" for name, wanted in (("layer_groups", args.layer_groups), ("fraction_sweep", fractions))
             if not wanted and (Path(out) / f"{name}.csv").is_file()]
    probe = Path(out) / "probe"
    if args.probe_result and probe.is_dir() and probe.resolve() != Path(args.probe_result).resolve():
        stale.append("probe/")
    if stale:
        print(f"negmonitor ablate: {out} holds {', '.join(stale)} from an earlier run, which this run does not "
              "rewrite; negmonitor report reads them as this run's — remove them, or use a new --out",
              file=sys.stderr)


def _load_data(args: argparse.Namespace, request: EvalRequest, npi_pairs: str = "both") -> dict:
    """The evaluation data the user asked for (local folders, else the hub), before any model loads."""
    from negmonitor.evaluation import load_blimp, load_perplexity_text, load_tse

    text = None
    if "ppl" in request.names:
        text = _grammar_text(args) if _is_grammar(args.text) else load_perplexity_text(args.text)
    blimp = tse = None
    if "blimp" in request.names:
        blimp = load_blimp(args.blimp, uids=_names(args.blimp_uids), sample_per_uid=args.sample, seed=args.seed)
    if "tse" in request.names:
        tse = load_tse(args.tse, constructions=_names(args.tse_constructions), sample_per_construction=args.sample,
                       seed=args.seed, npi_pairs=npi_pairs)  # sampled from the pairs the protocol scores
    if GRAMMAR in request.names:  # TSE-shaped (construction/condition): scored in the TSE slot, named after
        from negmonitor.train.grammar import GrammarCorpus

        tse = GrammarCorpus(args.grammar_seed).minimal_pairs(args.sample or GRAMMAR_PAIRS)
    return {"ppl_text": text, "blimp": blimp, "tse": tse}


def _is_grammar(source: str | None) -> bool:
    from pathlib import Path

    return source == GRAMMAR and not Path(source).exists()


def _grammar_text(args: argparse.Namespace) -> list[str]:
    from negmonitor.train.grammar import GrammarCorpus

    return GrammarCorpus(args.grammar_seed).heldout_texts()


def _name_grammar_suite(report, seed: int) -> None:
    """The grammar pairs were scored in the TSE slot: call their columns and breakdown rows ``grammar``."""
    report.table = report.table.rename(columns=lambda c: GRAMMAR + c[3:] if c.startswith("tse_") else c)
    if "suite" in report.breakdown.columns:
        report.breakdown["suite"] = report.breakdown["suite"].replace("tse", GRAMMAR)
    report.meta["grammar_seed"] = seed


def _names(text: str | None) -> list[str] | None:
    """``"a,b"`` → ``["a", "b"]``; None stays None (all)."""
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def _saved_probe(args: argparse.Namespace):
    """The probe tables of ``--probe-result`` (None without it)."""
    from negmonitor.result import ProbeResult

    return ProbeResult.load(args.probe_result) if args.probe_result else None


def _probe_values(args: argparse.Namespace, model, tokenizer, settings, out) -> dict:
    """Per-layer metric values from a fresh probe pass (saved to ``out/probe``)."""
    from negmonitor.probing import probe
    from negmonitor.probeset import ProbeSet

    max_positions = getattr(model.config, "max_position_embeddings", None)
    source = _grammar_text(args) if _is_grammar(args.probe_text) else args.probe_text
    probe_set = ProbeSet.build(source, tokenizer, n_tokens=args.tokens, window=args.window,
                               n_pairs=1_000 if settings.metric == "md" else 0, seed=args.seed,
                               max_positions=max_positions)
    from negmonitor.commands.probe import check_tokens_available

    check_tokens_available(probe_set, args.tokens)
    print(f"probing on {probe_set.n_tokens} tokens ({probe_set.n_windows} windows of {probe_set.window}) from "
          f"{probe_set.source}")
    result = probe(model, probe_set, layers=list(settings.layers) if settings.layers else None, tokenizer=tokenizer,
                   batch_size=settings.batch_size, progress=True, memory_budget=memory_budget(args))
    result.meta.update(model=args.model, revision=args.revision, dtype=dtype_name(model), protocol=settings.protocol)
    print(f"probe tables written to {result.save(out / 'probe')}/ (reuse them with --probe-result)")
    return result.values(settings.metric)


def _print_matching(meta: dict) -> None:
    if not meta.get("run"):
        return
    status = "matched" if meta["matched"] else "NOT matched (closest shown)"
    number = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731 - None: not finite
    print(f"\nperplexity-matched control: bottom {meta['fraction']:.2%} of neurons ({meta['n_neurons']}), "
          f"ppl {number(meta['ppl'], '.3f')} vs target {number(meta['target'], '.3f')} (baseline "
          f"{number(meta.get('baseline'), '.3f')}; {number(meta['relative_error'], '.1%')} of the damage off), "
          f"{status}, {meta['n_evals']} evaluations")
