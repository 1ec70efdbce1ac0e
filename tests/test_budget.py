"""The memory budget: sizes parse, layers are measured in groups that fit, and a budgeted measurement equals an
unbudgeted one; the pair buffers are held once in the capture dtype; tables are vectorised and lazy."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from negmonitor import budget, probing
from negmonitor.adapters import find_sites
from negmonitor.errors import NegmonitorError
from negmonitor.probeset import ProbeSet
from negmonitor.probing import ProbeSettings, _measure_once, _plan, probe
from tiny_models import tiny_tokenizer

TEXT = ("The author that the guard likes laughs. No authors have ever been popular. Most movies have never been "
        "seen. Homarus gammarus, known as the European lobster, is a species of lobster. ") * 40


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=192,
                           vocab_size=512, max_position_embeddings=256)
    return GPTNeoXForCausalLM(config).eval()


@pytest.fixture(scope="module")
def probe_set(tokenizer):
    return ProbeSet.build([TEXT], tokenizer, n_tokens=2_048, window=64, n_pairs=200)


@pytest.mark.parametrize("text, expected", [("2GiB", 2 << 30), ("512MiB", 512 << 20), ("1.5GB", 1_500_000_000),
                                            (4096, 4096), ("100000", 100_000), (" 3 kib ", 3072), (None, None)])
def test_sizes_parse(text, expected) -> None:
    assert budget.parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["2XB", "", "-1GiB", "GiB", 0, True, "1e999GiB"])
def test_bad_sizes_are_one_line_errors(text) -> None:
    with pytest.raises(NegmonitorError) as info:
        budget.parse_bytes(text)
    assert "\n" not in str(info.value) and "memory_budget" in str(info.value)


def test_bad_budget_is_refused_by_the_callback_at_construction() -> None:
    from negmonitor.callbacks import NegativeDifferentiationMonitor

    with pytest.raises(NegmonitorError, match="memory_budget"):
        NegativeDifferentiationMonitor(probe=["x"], memory_budget="lots")


def test_too_small_budget_is_refused_when_training_starts_not_at_every_measurement(tmp_path) -> None:
    """In a real Trainer a budget too small for one layer ends fit() at set-up with the one-line error naming the
    smallest budget that works, before any training step (not a warning and a failed measurement at every step
    while nothing is ever measured); that budget then trains and measures."""
    from lightning_helpers import TinyLM, token_loader, trainer

    from negmonitor.callbacks import NegativeDifferentiationMonitor

    module = TinyLM()
    monitor = NegativeDifferentiationMonitor(probe=[TEXT], every_n_steps=2, memory_budget="64KiB",
                                             probe_tokens=512, probe_window=64, n_pairs=64)
    with pytest.raises(NegmonitorError) as info:
        trainer(tmp_path / "small", max_steps=4, callbacks=[monitor]).fit(module, token_loader(module.tokenizer))
    message = str(info.value)
    assert "\n" not in message and "smallest budget that works" in message
    assert module.global_step == 0
    assert not list((tmp_path / "small").rglob("run-*.json"))  # no run.json of a run that never measured
    smallest = re.search(r"memory_budget='(\d+MiB)'", message).group(1)
    monitor = NegativeDifferentiationMonitor(probe=[TEXT], every_n_steps=2, memory_budget=smallest,
                                             probe_tokens=512, probe_window=64, n_pairs=64)
    trained = trainer(tmp_path / "fits", max_steps=2, callbacks=[monitor])
    trained.fit(module, token_loader(module.tokenizer))
    assert trained.global_step == 2 and monitor.measured_steps


def _one_layer_budget(model, probe_set, settings: ProbeSettings) -> int:
    """A budget that holds any one layer (and the cached hidden states, where passes may start from them) at the
    requested batch size but never two."""
    sites = find_sites(model)
    unlimited = ProbeSettings(batch_size=settings.batch_size, memory_budget=None)
    needs = [_plan(model, probe_set, [site], unlimited, 1).need[0] for site in sites]
    return max(needs) + probing._residual_bytes(model, probe_set, sites, unlimited, 1) + 1


def test_a_budget_that_lowers_the_batch_size_gives_the_same_statistics(model, probe_set, tokenizer) -> None:
    """The budget (or an out-of-memory retry) lowers the probe batch size for every paper model; the histogram grids
    come from the probe's first window whatever the batch size, so the statistics stay those of the batch-8 pass.
    (They used to come from the first batch: 3.9e-4 of WD apart at batch size 2.)"""
    sites = find_sites(model)
    free = probe(model, probe_set, tokenizer=tokenizer, batch_size=8, memory_budget=None)
    limit = _plan(model, probe_set, sites, ProbeSettings(batch_size=2, memory_budget=None), 1).need[0]
    plan = _plan(model, probe_set, sites, ProbeSettings(batch_size=8, memory_budget=limit), 1)
    assert plan.batch_size < 8, plan
    budgeted = probe(model, probe_set, tokenizer=tokenizer, batch_size=8, memory_budget=limit)
    single = probe(model, probe_set, tokenizer=tokenizer, batch_size=1, memory_budget=None)
    for other in (budgeted, single):
        for column in ["wd", "wd_neg", "wd_pos", "md", "mean", "std", "skew", "kurtosis", "neg_frac", "count"]:
            np.testing.assert_allclose(other.neurons[column].to_numpy(float), free.neurons[column].to_numpy(float),
                                       rtol=1e-5, atol=1e-6, err_msg=column)


def test_the_grid_comes_from_the_first_window_with_real_tokens(model, probe_set, tokenizer) -> None:
    """A probe set whose first window is all padding (built by hand): the grids come from the next window at every
    batch size (under DDP, the calibration window), never from whatever rows a rank sees first."""
    import dataclasses

    mask = probe_set.attention_mask.clone()
    mask[0] = 0
    pairs = probe_set.pair_positions[(probe_set.pair_positions >= probe_set.window).all(dim=1)]  # [P, 2]
    padded = dataclasses.replace(probe_set, attention_mask=mask, pair_positions=pairs)
    assert probing._grid_window(padded) == 1 and probing._grid_window(probe_set) == 0
    batched = probe(model, padded, tokenizer=tokenizer, batch_size=8, memory_budget=None)
    single = probe(model, padded, tokenizer=tokenizer, batch_size=1, memory_budget=None)
    assert (batched.neurons["count"] == int(mask.sum())).all()
    for column in ["wd", "wd_neg", "mean", "std", "neg_frac"]:
        np.testing.assert_allclose(single.neurons[column].to_numpy(float), batched.neurons[column].to_numpy(float),
                                   rtol=1e-5, atol=1e-6, err_msg=column)


@pytest.mark.parametrize("resume", [True, False], ids=["from-cached-hidden-states", "from-the-embeddings"])
def test_budgeted_measurement_equals_unbudgeted(model, probe_set, tokenizer, resume, monkeypatch) -> None:
    """One layer per pass (three passes) gives the unbudgeted tables, whether each pass starts from the hidden
    states the previous one cached or from the embeddings (models whose blocks take different arguments)."""
    if not resume:
        monkeypatch.setattr(probing, "_may_resume", lambda *a: False)
    free = probe(model, probe_set, tokenizer=tokenizer, batch_size=8, memory_budget=None)
    limit = _one_layer_budget(model, probe_set, ProbeSettings(batch_size=8))
    plan = _plan(model, probe_set, find_sites(model), ProbeSettings(batch_size=8, memory_budget=limit), 1)
    assert plan.groups == [[0], [1], [2]] and plan.batch_size == 8 and plan.resume == resume

    calls: dict[str, int] = {}
    layers = model.gpt_neox.layers
    watched = {"embed": model.gpt_neox.embed_in, "attn0": layers[0].attention, "attn1": layers[1].attention,
               "attn2": layers[2].attention, "norm": model.gpt_neox.final_layer_norm}
    handles = [m.register_forward_hook(lambda *a, k=k: calls.__setitem__(k, calls.get(k, 0) + 1))
               for k, m in watched.items()]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            grouped = probe(model, probe_set, tokenizer=tokenizer, batch_size=8, memory_budget=limit)
    finally:
        for handle in handles:
            handle.remove()
    n = -(-probe_set.n_windows // 8)
    # The final norm never runs: each pass stops at its group's last projection (or the next group's first block).
    # From cached hidden states every block runs once per batch (only the embedding step is repeated per pass);
    # from the embeddings, layer 0 runs in every pass.
    expected = ({"embed": 3 * n, "attn0": n, "attn1": n, "attn2": n} if resume else
                {"embed": 3 * n, "attn0": 3 * n, "attn1": 2 * n, "attn2": n})
    assert calls == expected
    assert sum("3 pass(es)" in str(w.message) for w in caught) == 1
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())

    columns = ["wd", "wd_neg", "wd_pos", "md", "mean", "std", "skew", "kurtosis", "neg_frac", "count", "nonfinite"]
    for column in columns:
        np.testing.assert_allclose(grouped.neurons[column].to_numpy(float), free.neurons[column].to_numpy(float),
                                   rtol=1e-5, atol=1e-6, err_msg=column)
    pd.testing.assert_frame_equal(grouped.layers, free.layers, rtol=1e-5, atol=1e-6)
    pd.testing.assert_frame_equal(grouped.top_pairs, free.top_pairs, rtol=1e-5, atol=1e-6)
    pd.testing.assert_frame_equal(grouped.pairs, free.pairs, rtol=1e-5, atol=1e-6)

    with warnings.catch_warnings(record=True) as again:  # the grouping is logged once per process and plan
        warnings.simplefilter("always")
        probe(model, probe_set, batch_size=8, memory_budget=limit)
    assert not any("pass(es)" in str(w.message) for w in again)


def test_too_small_budget_is_refused_naming_one_that_works(model, probe_set) -> None:
    with pytest.raises(NegmonitorError) as info:
        probe(model, probe_set, memory_budget="64KiB")
    message = str(info.value)
    assert "\n" not in message and "smallest budget that works" in message
    smallest = re.search(r"memory_budget='(\d+MiB)'", message).group(1)
    result = probe(model, probe_set, memory_budget=smallest)
    assert len(result.layers) == 3 and result.neurons.wd.notna().all()


@pytest.mark.parametrize("n, d, slots, window", [(2048, 512, 64, 2048), (512, 128, 16, 4096), (192, 64, 400, 64)])
def test_the_smallest_budget_named_is_one_the_planner_accepts(n, d, slots, window) -> None:
    """Wider layers than the window's rows fit in one update: the named budget must cover the batch-size-1 plan."""
    from negmonitor.budget import LayerShape, plan_measurement

    shapes = [LayerShape(0, n, d), LayerShape(1, n, d)]
    kwargs = dict(batch_size=8, window=window, n_bins=4096, n_slots=slots, cap_bytes=4)
    with pytest.raises(NegmonitorError) as info:
        plan_measurement(shapes, budget=1 << 16, **kwargs)
    smallest = int(re.search(r"memory_budget='(\d+)MiB'", str(info.value)).group(1)) << 20
    assert plan_measurement(shapes, budget=smallest, **kwargs).groups  # accepted: no error


def test_pair_buffers_are_held_once_in_the_capture_dtype(model, probe_set) -> None:
    sites = find_sites(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recorders = _measure_once(model, probe_set, sites, ProbeSettings(), 8, 0, 1)
    for recorder in recorders:
        assert recorder.pairs.y.dtype == torch.bfloat16 and recorder.pairs.y.shape == (400, 192)
        assert all(default.numel() == 1 for name, default in recorder.pairs._defaults.items() if name != "seen")
        assert int(recorder.pairs.seen.sum()) == 400


def test_rank_above_zero_builds_no_tables(model, probe_set, tokenizer, monkeypatch) -> None:
    from negmonitor.monitoring import engine
    from negmonitor.monitoring.engine import MonitorSettings, MonitorState, take_measurement

    real_measure = engine.measure  # rank 1's probe pass as one process (no process group here)
    monkeypatch.setattr(engine, "measure", lambda *a, rank, world_size, **k: real_measure(*a, **k))
    state = MonitorState()
    other = take_measurement(model, probe_set, 0, MonitorSettings(), state, tokenizer, rank=1, world_size=2)
    assert other.neurons.empty and other.scalars.empty and state.cohort is None and state.prev_weights is None
    assert set(other.result.values("wd")) == {0, 1, 2}  # the per-neuron table: the ablation selects on every rank
    assert not other.result.built("top_pairs")  # pair tables are never built there
    first = take_measurement(model, probe_set, 0, MonitorSettings(), state, tokenizer)
    assert state.cohort and first.neurons.in_cohort.sum() == sum(len(v) for v in state.cohort.values())
    members = first.neurons[first.neurons.in_cohort]
    assert all(n in state.cohort[layer] for layer, n in zip(members.layer, members.neuron))


def test_top_pair_tables_decode_like_the_tokenizer(model, probe_set, tokenizer) -> None:
    result = probe(model, probe_set, tokenizer=tokenizer)
    assert not result.built("top_pairs")  # not built until read
    top = result.top_pairs
    assert len(top) == 3 * 9 * 10  # 3 layers x 5% of 192 neurons x 10 pairs
    sample = top.sample(20, random_state=0)
    for row in sample.itertuples():
        assert row.token_a == tokenizer.decode([row.token_a_id]) and row.token_b == tokenizer.decode([row.token_b_id])
        assert row.context_a == probe_set.context(row.pos_a, tokenizer)
        assert row.context_b == probe_set.context(row.pos_b, tokenizer)
        assert row.sign == ("NN", "PN", "PP")[int(row.y_a >= 0) + int(row.y_b >= 0)]


def test_each_token_id_is_decoded_once_for_all_tables(model, probe_set, tokenizer) -> None:
    """Every layer's top-pair table and the pair table share one decoding of each distinct token id; the text is
    still the tokenizer's."""
    calls: list[list[list[int]]] = []

    class Counting:
        def batch_decode(self, sequences):
            calls.append([list(seq) for seq in sequences])
            return tokenizer.batch_decode(sequences)

    result = probe(model, probe_set, tokenizer=Counting())
    top, pairs = result.top_pairs, result.pairs
    assert top.layer.nunique() == 3 and len(pairs) == probe_set.n_pairs
    token_calls = [call for call in calls if all(len(seq) == 1 for seq in call)]  # the pair contexts are longer
    ids = [seq[0] for call in token_calls for seq in call]
    assert len(ids) == len(set(ids))  # no id decoded twice
    assert set(top.token_a_id) | set(top.token_b_id) | set(pairs.token_a_id) | set(pairs.token_b_id) <= set(ids)
    assert list(pairs.token_a) == [tokenizer.decode([i]) for i in pairs.token_a_id]


@pytest.mark.parametrize("command", ["probe", "ablate", "replay"])
def test_memory_budget_flag_is_checked_before_any_model_loads(command, tmp_path, capsys) -> None:
    from negmonitor.cli import main

    extra = {"probe": ["--out", str(tmp_path / "o")], "ablate": ["--out", str(tmp_path / "o")],
             "replay": ["--revisions", "step0", "--logdir", str(tmp_path / "l")]}[command]
    code = main([command, "--model", str(tmp_path / "no-such-model"), *extra, "--memory-budget", "2XB"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--memory-budget" in err and "2XB" in err and len(err.splitlines()) == 1


def test_each_group_state_is_freed_without_the_garbage_collector(model, probe_set, monkeypatch) -> None:
    """A group's histograms and pair buffers are gone before the next group starts (metrics are reference cycles:
    they must be released explicitly, not left to the garbage collector)."""
    import gc
    import weakref

    states: list = []
    original = probing._measure_once

    def watched(*args, **kwargs):
        alive = [ref for ref in states if ref() is not None]
        assert not alive, f"{len(alive)} state tensors of an earlier group are still allocated"
        recorders = original(*args, **kwargs)
        states.extend(weakref.ref(t) for r in recorders for t in (r.stats.hist, r.pairs.x, r.pairs.y))
        return recorders

    monkeypatch.setattr(probing, "_measure_once", watched)
    limit = _one_layer_budget(model, probe_set, ProbeSettings(batch_size=8))
    gc.disable()
    try:
        probe(model, probe_set, batch_size=8, memory_budget=limit)
        assert len(states) == 9 and all(ref() is None for ref in states)
    finally:
        gc.enable()


def _three_layer_model(family: str):
    from transformers import AutoModelForCausalLM, Qwen3Config

    from tiny_models import _causal_config, _token_ids, tiny_bert

    torch.manual_seed(0)
    if family == "bert":
        model = tiny_bert(head="base")
        model.encoder.layer.append(type(model.encoder.layer[0])(model.config))
        model.config.num_hidden_layers = 3
        return model.eval()
    if family == "qwen3-mixed":
        config = Qwen3Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=8, intermediate_size=64, vocab_size=512, max_position_embeddings=256,
                             use_sliding_window=True, sliding_window=16, max_window_layers=1, **_token_ids())
    else:
        config = _causal_config(family, 512, 256, _token_ids())
        config.num_hidden_layers = config.n_layer = 3
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bert", "qwen3-mixed"])
def test_passes_from_cached_hidden_states_equal_one_pass_in_every_family(family, probe_set) -> None:
    """Every family's blocks run from the cached hidden states give the statistics of one whole pass, in fp32 and
    under bf16 autocast; a model whose blocks take different arguments (sliding-window layers beside full ones)
    starts every pass from the embeddings."""
    model = _three_layer_model(family)
    sites = find_sites(model)
    assert len(sites) == 3
    limit = _one_layer_budget(model, probe_set, ProbeSettings(batch_size=8))
    plan = _plan(model, probe_set, sites, ProbeSettings(batch_size=8, memory_budget=limit), 1)
    assert len(plan.groups) == 3 and plan.resume == (family != "qwen3-mixed")
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            free = probe(model, probe_set, batch_size=8, memory_budget=None)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                grouped = probe(model, probe_set, batch_size=8, memory_budget=limit)
        for column in ["wd", "wd_neg", "md", "mean", "std", "kurtosis", "neg_frac"]:
            np.testing.assert_allclose(grouped.neurons[column].to_numpy(float), free.neurons[column].to_numpy(float),
                                       rtol=1e-6, atol=1e-7, err_msg=f"{family} {column} autocast={autocast}")
        pd.testing.assert_frame_equal(grouped.top_pairs, free.top_pairs)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_a_probe_pass_moves_its_inputs_to_the_device_once_not_per_batch(probe_set, monkeypatch) -> None:
    """The batches' ids, masks and row tables reach the device in a fixed number of copies per pass (a copy from
    ordinary host memory waits for the device), and each batch's tables are the ones worked out for it alone."""
    windows = probe_set.window_indices(0, 1)
    pair_flat = probe_set.pair_positions.reshape(-1)
    copies = []
    real_to = torch.Tensor.to

    def counted(self, *args, **kwargs):
        copies.append(1)
        return real_to(self, *args, **kwargs)

    counts = {}
    for size in (2, 8):
        batches = [windows[i : i + size] for i in range(0, len(windows), size)]
        copies.clear()
        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "to", counted)
            inputs = probing._batch_inputs(probe_set, batches, pair_flat, torch.device("cpu"))
        counts[len(batches)] = len(copies)
        for chunk, got in zip(batches, inputs):
            valid, slots, rows, grid = probing._batch_rows(chunk, probe_set.attention_mask[chunk], pair_flat,
                                                           probe_set.window)
            assert torch.equal(got.ids, probe_set.input_ids[chunk]) and torch.equal(got.mask,
                                                                                   probe_set.attention_mask[chunk])
            assert torch.equal(got.valid_rows, valid) and torch.equal(got.pair_slots, slots)
            assert torch.equal(got.pair_rows, rows) and got.all_valid == (len(valid) == got.mask.numel())
            assert torch.equal(got.grid_rows, grid) and (grid.numel() > 0) == (0 in chunk)
        assert sum(len(i.pair_slots) for i in inputs) == probe_set.n_pairs * 2
    assert len(counts) == 2 and len(set(counts.values())) == 1, counts  # 16 and 4 batches: the same copies


def test_the_monitors_budget_bounds_the_ablations_perplexity_and_a_too_small_one_is_refused_at_set_up(tmp_path):
    """With ablation on, the monitor's memory_budget is the ablation's too (unless the ablation sets its own); one
    too small for a perplexity window ends fit() at set-up with one line naming the smallest budget that works,
    before any training step."""
    from lightning_helpers import TinyLM, token_loader, trainer

    from negmonitor.callbacks import NegativeDifferentiationMonitor

    module = TinyLM()
    kwargs = dict(probe=[TEXT], every_n_steps=2, probe_tokens=512, probe_window=64, n_pairs=64, ppl_text=[TEXT],
                  ablation={"fraction": 0.05, "max_matching_evals": 2, "ppl_window": 64})
    assert NegativeDifferentiationMonitor(memory_budget="3GiB", **kwargs).ablation.memory_budget == 3 << 30
    assert NegativeDifferentiationMonitor(memory_budget=None, **kwargs).ablation.memory_budget is None
    own = dict(kwargs, ablation={**kwargs["ablation"], "memory_budget": "1GiB"})  # the ablation's own budget is kept
    assert NegativeDifferentiationMonitor(memory_budget="3GiB", **own).ablation.memory_budget == 1 << 30
    own = dict(kwargs, ablation={**kwargs["ablation"], "memory_budget": "2GiB"})  # the default, named: kept too
    assert NegativeDifferentiationMonitor(memory_budget="3GiB", **own).ablation.memory_budget == 2 << 30
    monitor = NegativeDifferentiationMonitor(memory_budget="64KiB", **kwargs)
    with pytest.raises(NegmonitorError) as info:
        trainer(tmp_path / "small", max_steps=4, callbacks=[monitor]).fit(module, token_loader(module.tokenizer))
    message = str(info.value)
    assert "\n" not in message and "64-token perplexity window" in message and "smallest budget" in message
    assert module.global_step == 0


def test_the_default_budget_holds_a_perplexity_window_of_a_bf16_qwen3_8b() -> None:
    """Qwen3-8B (152k vocabulary) in bf16 produces bf16 logits; counted as fp32 they made the default 2 GiB budget
    refuse `ablate` (after the 16 GB load) and the callback with ablation. Under bf16 autocast over fp32 weights
    (Lightning's bf16-mixed) the logits are bf16 too; fp32 weights without autocast still count 4 bytes."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from negmonitor.budget import DEFAULT_MEMORY_BUDGET, evaluation_batch_size, lm_window_bytes, parse_bytes

    config = Qwen3Config(vocab_size=151_936, hidden_size=4_096, intermediate_size=12_288, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        bf16 = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        fp32 = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    budget = parse_bytes(DEFAULT_MEMORY_BUDGET)
    assert evaluation_batch_size(bf16, 2_048, 1, budget) == 1  # not refused
    logits = 2_048 * 151_936
    assert lm_window_bytes(fp32, 2_048) - lm_window_bytes(bf16, 2_048) == logits * 2
    # four windows in one batch: the loss's fp32 slice (512 positions) is there once, not four times
    assert lm_window_bytes(bf16, 2_048, rows=4) == 4 * lm_window_bytes(bf16, 2_048) - 3 * 512 * 151_936 * 8
    with pytest.raises(NegmonitorError, match="cannot hold one 2048-token perplexity window"):
        evaluation_batch_size(fp32, 2_048, 1, budget)
    tiny = AutoModelForCausalLM.from_config(Qwen3Config(vocab_size=1_000, hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=1, num_attention_heads=4,
                                                        num_key_value_heads=2, head_dim=8))
    outside = lm_window_bytes(tiny, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 weights, bf16 autocast: the logits are bf16
        assert outside - lm_window_bytes(tiny, 64) == 64 * 1_000 * 2
