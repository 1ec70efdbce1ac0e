"""One measurement at real layer width: time, its breakdown and peak extra memory, with and without a budget.

Two randomly initialised models with the layer shapes of the paper's models, 2 layers each: a GPT-NeoX shaped
like Pythia-1.4B (d=2,048, 8,192 MLP neurons, GELU, 16 heads) and a Llama shaped like Llama-3.1-8B (d=4,096,
14,336 neurons, SwiGLU gate, 32 heads / 8 KV heads). The vocabulary is the built-in corpus tokenizer's (2,048
ids, not 50k/128k: the embedding and LM head are not what is measured, and a real vocabulary would cost GiBs of
memory for nothing). Default monitor settings (16,384 probe tokens in 2,048-token windows, 4,096 bins, 1,000
pairs, probe batch 8, the image and cohort steps of the callback), probe text from the built-in grammar corpus.
``--tokens 2048 --window 512`` gives a quicker look, where the fixed per-layer costs (WD from the histograms,
drift, tables) weigh 8x more against the forward.

Per model it prints: the bare forward over the probe tokens (the full model, no hooks) at each probe batch size
the measurements below use (a budget may lower it; each measurement is compared with the bare forward at its own
batch size, as the forward's speed depends on it); one full measurement
(`take_measurement` + the records written as the callback does) and its breakdown: forward with hooks, statistics
in the hooks, statistics' compute, MD, tables, drift, writes; peak extra memory during it (CUDA
``max_memory_allocated`` growth on GPU; resident-set growth, sampled every ms in a thread, on CPU) with no budget
and at ``--budget`` (default: the library default); and per-layer figures extrapolated to full depth (24 layers
for Pythia-1.4B, 32 for Llama-3.1-8B; the budgeted time uses the grouping the planner would choose there). On CPU
it also times one layer's worth of pre-activations through the WD accumulator, interleaved: the fused CPU update
(numba) in whole probe batches (as a probe hands it an unpadded batch) and in ``MAX_UPDATE_ELEMENTS // n``-row
chunks (512 rows at Pythia-1.4B width), and torch's passes in those chunks (as a probe hands them), so what the
kernel pays shows in the same run.

Goals: measurement <= 1.25x the bare forward; peak extra memory within the budget; Pythia-1.4B at full depth within
2 GiB at the default budget. Timings on a shared machine are noisy: the best of ``--repeats`` runs counts.

Run: ``python benchmarks/scale.py [--device cpu|cuda] [--tokens 16384] [--window 2048] [--models pythia-1.4b,llama-3.1-8b]
[--budget 2GiB] [--repeats 1]`` (defaults shown; on 2 CPU cores about 4 minutes for Pythia-1.4B's shape and 15 for
Llama-3.1-8B's).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

FULL_DEPTH = {"pythia-1.4b": 24, "llama-3.1-8b": 32}
GIB = 1 << 30


def build_model(kind: str, vocab: int, device: torch.device, layers: int = 2) -> torch.nn.Module:
    """Randomly initialised 2-layer model with the named model's layer shape and SDPA attention, as
    ``from_pretrained`` loads the real ones (eager attention would hold 32 x 2,048^2 fp32 scores per Llama window:
    1 GiB at probe batch 1, half the default budget)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "pythia-1.4b":
        config = GPTNeoXConfig(hidden_size=2048, intermediate_size=8192, num_attention_heads=16,
                               num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=2048,
                               rotary_pct=0.25, hidden_act="gelu")
        config._attn_implementation = "sdpa"
        model = GPTNeoXForCausalLM(config)
    else:
        config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                             num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=2048,
                             hidden_act="silu")
        config._attn_implementation = "sdpa"
        model = LlamaForCausalLM(config)
    return model.to(device).eval()


class Timers:
    """Wall time spent inside patched library functions (device-synchronised at both ends)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.totals, self._patched = device, {}, []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, owner: object, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            self._sync()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._sync()
                self.totals[label] = self.totals.get(label, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)
        self._patched.append((owner, name, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self._patched):
            setattr(owner, name, original)
        self._patched.clear()


PHASE = ["other"]  # what the measurement is doing now ("probe pass" inside negmonitor.probing.measure)


@contextlib.contextmanager
def peak_extra_memory(device: torch.device) -> Iterator[dict]:
    """``out["peak"]``: bytes above the starting point at the worst moment (CUDA allocator, or resident set);
    ``out["probe pass"]``: the same inside the probe pass only."""
    out: dict = {}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out["base"] = base
        yield out
        torch.cuda.synchronize(device)
        out["peak"] = torch.cuda.max_memory_allocated(device) - base
        return
    import ctypes
    import psutil

    with contextlib.suppress(OSError, AttributeError):  # hand freed heap pages back, so growth is real growth
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    process = psutil.Process(os.getpid())
    base = process.memory_info().rss
    peak = [base]
    phases: dict = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss = process.memory_info().rss
            peak[0] = max(peak[0], rss)
            phases[PHASE[0]] = max(phases.get(PHASE[0], base), rss)
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], process.memory_info().rss)
        out["peak"] = peak[0] - base
        out["probe pass"] = phases.get("probe pass", base) - base


def bare_forward(model: torch.nn.Module, probe_set, batch_size: int, device: torch.device) -> float:
    """Seconds for the full model's forward over the probe windows (no hooks, no grad, no KV cache: as in
    training, and as the probe pass runs it)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, probe_set.n_windows, batch_size):
            model(input_ids=probe_set.input_ids[i:i + batch_size].to(device),
                  attention_mask=probe_set.attention_mask[i:i + batch_size].to(device), use_cache=False)
    sync()
    return time.perf_counter() - start


def one_measurement(model, probe_set, tokenizer, budget, device, state, layers=None) -> tuple[float, dict, int]:
    """Time one measurement as the callback runs it (probe pass, tables, drift, records); return
    ``(seconds, breakdown, peak extra bytes)``."""
    from negmonitor import capture, result, summary
    from negmonitor.metrics.streaming import NeuronStatsAccumulator
    from negmonitor.monitoring import engine
    from negmonitor.monitoring.engine import MonitorSettings
    from negmonitor.probing import ProbeSettings
    from negmonitor.records import RecordStore

    settings = MonitorSettings(layers=layers, probe=ProbeSettings(memory_budget=budget))
    mem: dict = {}
    original_measure = engine.measure

    def phased(*args, **kwargs):
        PHASE[0] = "probe pass"
        try:
            return original_measure(*args, **kwargs)
        finally:
            PHASE[0] = "other"
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                mem["probe pass"] = torch.cuda.max_memory_allocated(device) - mem["base"]

    engine.measure = phased
    timers = Timers(device)
    timers.wrap(engine, "measure", "probe pass")
    timers.wrap(capture.SiteRecorder, "observe", "statistics in the hooks")
    timers.wrap(NeuronStatsAccumulator, "compute", "statistics' compute (WD, moments)")
    timers.wrap(summary, "mapping_difficulty", "MD and OI")
    timers.wrap(result.ProbeResult, "from_summaries", "tables")
    timers.wrap(result._TableBuilder, "top_pair_frame", "tables")
    timers.wrap(engine, "_neuron_snapshot", "tables")
    timers.wrap(engine, "_layer_scalars", "tables")
    timers.wrap(engine, "_drift", "drift")
    try:
        with tempfile.TemporaryDirectory() as tmp, peak_extra_memory(device) as out:
            mem.update(out)
            start = time.perf_counter()
            m = engine.take_measurement(model, probe_set, 1, settings, state, tokenizer=tokenizer)
            m.result.top_pairs  # built when first read (as the callback's write does): timed as tables
            t0 = time.perf_counter()
            store = RecordStore(Path(tmp) / "negmonitor")
            store.write_scalars("bench", 1, 0, m.scalars)
            store.write_neurons("bench", 1, 0, m.neurons)
            store.write_pairs("bench", 1, 0, m.result.top_pairs)
            timers.totals["writes"] = time.perf_counter() - t0
            total = time.perf_counter() - start
    finally:
        timers.restore()
        engine.measure = original_measure
    mem.update({k: v for k, v in out.items() if k not in mem or k == "peak"})
    t = timers.totals
    inner = sum(t.get(k, 0.0) for k in ("statistics in the hooks", "statistics' compute (WD, moments)", "MD and OI"))
    breakdown = {"forward with hooks": t.get("probe pass", 0.0) - inner}
    breakdown.update({k: t.get(k, 0.0) for k in ("statistics in the hooks", "statistics' compute (WD, moments)",
                                                  "MD and OI", "tables", "drift")})
    breakdown["writes"] = t.get("writes", 0.0)
    return total, breakdown, mem


def run_model(kind: str, args, tokenizer, texts, device: torch.device) -> dict:
    from negmonitor.adapters import find_sites
    from negmonitor.budget import LayerShape, format_bytes, plan_measurement
    from negmonitor.monitoring.engine import MonitorState
    from negmonitor.probeset import ProbeSet
    from negmonitor.probing import ProbeSettings, _residual_bytes

    model = build_model(kind, len(tokenizer), device)
    probe_set = ProbeSet.build(texts, tokenizer, n_tokens=args.tokens, window=args.window, n_pairs=1_000, seed=0)
    site = find_sites(model)[0]
    depth = FULL_DEPTH[kind]
    shapes = [LayerShape(i, site.n_neurons, site.d_in) for i in range(depth)]
    residual = _residual_bytes(model, probe_set, [site], ProbeSettings(memory_budget=None), 1)
    cap_bytes, attention = next(model.parameters()).element_size(), site_heads(model) * probe_set.window * 8

    def plan_for(layers: list, budget: int | None = args.budget) -> object:  # the plan the library makes for them
        return plan_measurement(layers, budget=budget, batch_size=8, window=probe_set.window, n_bins=4096,
                                n_slots=2 * probe_set.n_pairs, cap_bytes=cap_bytes, attention_bytes_per_row=attention,
                                residual_bytes=residual)

    # The bare forward at each batch size a measurement below runs its probe pass in (a budget may lower it, and
    # the forward's own speed depends on it): each measurement is compared with the bare forward at its own.
    batch_sizes = sorted({8, plan_for(shapes[:2]).batch_size, plan_for(shapes).batch_size}, reverse=True)
    bare_forward(model, probe_set, 8, device)  # warm-up (allocator, kernels)
    bares = {b: min(bare_forward(model, probe_set, b, device) for _ in range(args.repeats)) for b in batch_sizes}
    bare = bares[8]
    state = MonitorState()
    one_measurement(model, probe_set, tokenizer, None, device, state)  # warm-up; sets the drift snapshot
    runs = {}
    budget_label = f"budget {format_bytes(args.budget)}"
    for label, budget in (("no budget", None), (budget_label, args.budget)):
        best = None
        for _ in range(args.repeats):
            out = one_measurement(model, probe_set, tokenizer, budget, device, state)
            best = out if best is None or out[0] < best[0] else best
        runs[label] = best
    one_layer_peak = one_measurement(model, probe_set, tokenizer, None, device, state, layers=[0])[2]["probe pass"]

    print(f"\n== {kind}-shaped, 2 layers (d={site.d_in}, {site.n_neurons} neurons/layer), {probe_set.n_tokens} "
          f"probe tokens, {device} ==")
    print("bare forward over the probe tokens: "
          + ", ".join(f"{seconds:.2f} s at batch size {b}" for b, seconds in bares.items()))
    two_layer_peak = runs["no budget"][2]["probe pass"]
    per_layer_mem = max(0, two_layer_peak - one_layer_peak)
    for label, (total, breakdown, mem) in runs.items():
        batch = 8 if label == "no budget" else plan_for(shapes[:2]).batch_size
        ratio = total / bares[batch]
        pass_peak = mem["probe pass"]
        print(f"measurement ({label}, probe batch size {batch}): {total:.2f} s = {ratio:.2f}x the bare forward at "
              f"that batch size ({total / bare:.2f}x the batch-8 one) "
              f"[{'ok' if ratio <= 1.25 else 'over'} vs goal 1.25x]; peak extra memory: probe pass "
              f"{format_bytes(pass_peak)}"
              + ("" if label == "no budget" else f" [{'within' if pass_peak <= args.budget else 'OVER'} the budget]")
              + f", whole measurement (with drift, tables, writes) {format_bytes(mem['peak'])}")
        print("   " + ", ".join(f"{k} {v:.2f} s" for k, v in breakdown.items()))
    # Extrapolation: forward per layer from the bare forward; statistics per layer from the unbudgeted breakdown.
    _, free_breakdown, _ = runs["no budget"]
    stats_per_layer = sum(v for k, v in free_breakdown.items() if k != "forward with hooks") / 2
    forward_per_layer = bare / 2
    plan = plan_for(shapes)
    planned_forward_per_layer = bares[plan.batch_size] / 2  # the forward at the full-depth plan's batch size
    # Each pass runs the blocks from its start (the cached hidden states, or the embeddings) to its group's end.
    passes_forward = (depth if plan.resume else sum(g[-1] + 1 for g in plan.groups)) * planned_forward_per_layer
    full_free = depth * (forward_per_layer + stats_per_layer)
    full_budget = passes_forward + depth * stats_per_layer
    largest = max(len(g) for g in plan.groups)
    free_mem = one_layer_peak + (depth - 1) * per_layer_mem
    # Budgeted probe pass at full depth: the planner's figure for it, corrected by measured/planned at 2 layers.
    two = plan_for(shapes[:2])
    accuracy = runs[budget_label][2]["probe pass"] / max(two.need)
    budget_mem = int(max(plan.need) * max(1.0, accuracy))
    rest = max(0, runs[budget_label][2]["peak"] - runs[budget_label][2]["probe pass"]) / 2  # drift etc., per layer
    print(f"per layer: forward {forward_per_layer:.2f} s, statistics {stats_per_layer:.2f} s, probe-pass memory "
          f"{format_bytes(per_layer_mem)} (1 layer alone: {format_bytes(one_layer_peak)}); measured/planned peak at "
          f"2 layers {accuracy:.2f}; rest of the measurement (drift snapshot etc.) {format_bytes(int(rest))} per layer")
    print(f"full depth ({depth} layers), extrapolated: bare forward {depth * forward_per_layer:.1f} s; no budget "
          f"{full_free:.1f} s ({full_free / (depth * forward_per_layer):.2f}x), peak {format_bytes(free_mem)}; "
          f"budget {format_bytes(args.budget)}: {len(plan.groups)} passes of <= {largest} layers"
          f"{' (each from the hidden states the last one cached)' if plan.resume else ' (each from the embeddings)'}, "
          f"at probe batch size {plan.batch_size}, {full_budget:.1f} s "
          f"({full_budget / (depth * planned_forward_per_layer):.2f}x the bare forward at that batch size), probe-pass "
          f"peak {format_bytes(budget_mem)}"
          + (f" [{'ok' if budget_mem <= 2 * GIB else 'over'} vs goal 2 GiB]" if kind == "pythia-1.4b" else "")
          + f"; + rest of the measurement {format_bytes(int(rest * depth))}")
    if device.type == "cpu":
        # whole batches of 8 windows, or the whole probe when it is smaller (every run updates the same tokens)
        batch_rows = min(8 * probe_set.window, probe_set.n_tokens)
        payoff = fused_update_payoff(site.n_neurons, probe_set.n_tokens, batch_rows, args.repeats)
        if payoff:
            passes = next(v for k, v in payoff.items() if k.startswith("torch"))
            print(f"update of one layer's {probe_set.n_tokens:,} x {site.n_neurons:,} pre-activations: "
                  + ", ".join(f"{k} {v:.2f} s ({passes / v:.2f}x)" for k, v in payoff.items()))
        else:
            print("fused CPU update: not available (numba is not installed)")
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return runs


def fused_update_payoff(n_neurons: int, tokens: int, batch_rows: int, repeats: int) -> dict[str, float]:
    """Seconds to stream one layer's pre-activations (synthetic: per-neuron scale and offset) through the WD
    accumulator, best of ``repeats`` each, as a probe hands them: the fused CPU update (numba) in whole batches of
    ``batch_rows`` rows (a batch with no padding is a view), and, for comparison, the fused update and torch's passes
    in the ``MAX_UPDATE_ELEMENTS // n`` rows a probe hands torch's passes (a padded batch's copies). Empty without
    numba. What the fused kernel saves in the hooks, measured in this run."""
    from negmonitor.budget import MAX_UPDATE_ELEMENTS
    from negmonitor.metrics import NeuronStatsAccumulator, _fused_cpu, streaming

    if not _fused_cpu.available(torch.device("cpu")):
        return {}
    short = max(1, MAX_UPDATE_ELEMENTS // n_neurons)
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(batch_rows, n_neurons, generator=g) * torch.rand(n_neurons, generator=g) * 3
    batch += torch.randn(n_neurons, generator=g)

    def stream(rows: int) -> float:
        acc = NeuronStatsAccumulator(n_neurons)
        start = time.perf_counter()
        for _ in range(max(1, tokens // rows)):
            acc.update(batch[:rows])
        return time.perf_counter() - start

    seconds, before = {}, streaming._FUSED_ON_CPU
    runs = {f"fused, {batch_rows:,}-row batches": (True, batch_rows), f"fused, {short:,}-row chunks": (True, short),
            f"torch's passes, {short:,}-row chunks": (False, short)}
    try:
        for _ in range(max(1, repeats)):  # interleaved: this machine's speed drifts
            for label, (fused, rows) in runs.items():
                streaming._FUSED_ON_CPU = fused
                seconds[label] = min(seconds.get(label, math.inf), stream(rows))
    finally:
        streaming._FUSED_ON_CPU = before
    return seconds


def site_heads(model) -> int:
    config = model.config
    return int(getattr(config, "num_attention_heads", 0)) if config._attn_implementation == "eager" else 0


def corpus(n_sentences: int) -> tuple[object, list[str]]:
    """The built-in grammar corpus's tokenizer (2,048 ids, trained and cached once) and probe texts."""
    from negmonitor.train.datamodule import TextDataModule

    data = TextDataModule(source="builtin", n_sentences=n_sentences, seq_len=64, tokenizer_vocab_size=2048, seed=0)
    data.prepare_data()
    data.setup("fit")
    return data.tokenizer, data.probe_texts(max(256, n_sentences // 4))


def main(argv: list[str] | None = None) -> None:
    from negmonitor.budget import DEFAULT_MEMORY_BUDGET, parse_bytes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--tokens", type=int, default=16_384, help="probe tokens (default: the monitor's 16,384)")
    parser.add_argument("--window", type=int, default=2_048, help="probe window (default: the monitor's 2,048)")
    parser.add_argument("--models", default="pythia-1.4b,llama-3.1-8b")
    parser.add_argument("--budget", default=DEFAULT_MEMORY_BUDGET, type=parse_bytes, help="e.g. 1GiB (default: the library's, 2GiB)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each side; the best counts")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("scale.py: --device cuda but no CUDA device is available")
    tokenizer, texts = corpus(max(2_000, args.tokens // 4))
    print(f"negmonitor scale benchmark on {device} ({torch.get_num_threads()} CPU threads); shared machines are "
          "noisy: compare ratios, not seconds")
    for kind in args.models.split(","):
        run_model(kind.strip(), args, tokenizer, texts, device)


if __name__ == "__main__":
    main()
