"""The one-pass probe agrees with exact, in-memory computations of the definitions."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from negmonitor import budget
from negmonitor.adapters import find_sites
from negmonitor.errors import NegmonitorError
from negmonitor.metrics.mapping import mapping_difficulty
from negmonitor.metrics.wasserstein import wasserstein_to_gaussian
from negmonitor.probing import ProbeSettings, probe
from negmonitor.probeset import ProbeSet
from negmonitor.result import ProbeResult
from tiny_models import tiny_bert, tiny_bert_tokenizer, tiny_causal_lm, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def wiki_text(request) -> str:
    from conftest import SHARED_DATA

    path = SHARED_DATA / "wikitext-2" / "valid.txt"
    if not path.exists():
        pytest.skip(f"real data not found at {path}")
    return path.read_text()[:120_000]


def _full_activations(model, probe_set: ProbeSet, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All unpadded pre-activations and inputs of one layer, kept in memory (the reference)."""
    site = find_sites(model, layer)[0]
    ins, outs = [], []

    def keep(module, args, output) -> None:
        ins.append(args[0].detach())
        outs.append(output.detach())

    handle = site.projection.register_forward_hook(keep)
    try:
        with torch.no_grad():
            model(input_ids=probe_set.input_ids, attention_mask=probe_set.attention_mask)
    finally:
        handle.remove()
    mask = probe_set.attention_mask.bool().reshape(-1)
    x = torch.cat(ins).reshape(-1, ins[0].shape[-1]).float()
    y = torch.cat(outs).reshape(-1, outs[0].shape[-1]).float()
    return x, y, mask


@pytest.mark.parametrize("family", ["neox", "llama", "gpt2", "opt"])
def test_probe_matches_exact_definitions(family, tokenizer, wiki_text) -> None:
    model = tiny_causal_lm(family)
    probe_set = ProbeSet.build([wiki_text], tokenizer, n_tokens=12_000, window=128, n_pairs=500, seed=1)
    result = probe(model, probe_set, tokenizer=tokenizer, batch_size=16)
    assert set(result.neurons.layer) == {0, 1}
    for layer in (0, 1):
        x, y, mask = _full_activations(model, probe_set, layer)
        exact = wasserstein_to_gaussian(y[mask])
        got = result.values("wd")[layer]
        assert int(result.neurons[result.neurons.layer == layer]["count"].max()) == int(mask.sum())
        assert torch.allclose(got.float(), exact.float(), atol=0.005, equal_nan=True)
        flat = probe_set.pair_positions
        md, oi = mapping_difficulty(x[flat[:, 0]], x[flat[:, 1]], y[flat[:, 0]], y[flat[:, 1]])
        np.testing.assert_allclose(result.values("md")[layer].numpy(), md.double().numpy(), rtol=1e-4)
        # The top-pair table (its pairs chosen on the device): each top-MD neuron's highest-OI pairs, best first,
        # with their OI ratios and the two tokens' pre-activations.
        top = result.top_pairs[result.top_pairs.layer == layer]
        k = ProbeSettings().pairs_per_neuron_table
        assert len(top) == k * top.neuron.nunique() and (top.groupby("neuron")["rank"].max() == k - 1).all()
        pair, neuron = top.pair.to_numpy(), top.neuron.to_numpy()
        np.testing.assert_allclose(top.oi.to_numpy(), oi[pair, neuron].double().numpy(), rtol=1e-4)
        np.testing.assert_allclose(top.y_a.to_numpy(), y[flat[pair, 0], neuron].double().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(top.y_b.to_numpy(), y[flat[pair, 1], neuron].double().numpy(), rtol=1e-5, atol=1e-6)
        kth = torch.nan_to_num(oi[:, torch.from_numpy(neuron[::k])], nan=-math.inf).topk(k, dim=0).values[-1]
        assert (top.oi.to_numpy().reshape(-1, k)[:, -1] >= kth.double().numpy() * (1 - 1e-5)).all()
    for summary in result._tables.summaries:  # only each top-MD neuron's k best pairs left the device
        assert summary.best_oi.shape == summary.best_y_a.shape == (ProbeSettings().pairs_per_neuron_table,
                                                                   len(summary.top_md))
    assert {"nn_share", "pn_share", "pp_share", "wd_neg_share", "jaccard_wd_md"} <= set(result.layers.columns)
    shares = result.layers[["nn_share", "pn_share", "pp_share"]].sum(axis=1)
    np.testing.assert_allclose(shares.to_numpy(), 1.0, atol=1e-6)
    assert {"NN", "PN", "PP"} >= set(result.top_pairs.sign)
    assert result.top_pairs.context_a.str.contains(r"\[\[").all()


def test_padding_never_enters_a_statistic(tokenizer) -> None:
    """A text shorter than one window is one padded window; the statistics equal those of the real tokens only."""
    model = tiny_causal_lm("neox", max_positions=512)
    texts = ["the cat sees the dog and the dogs see the cats"] * 20
    probe_set = ProbeSet.build(texts, tokenizer, window=512, n_pairs=100)
    assert probe_set.n_windows == 1 and probe_set.attention_mask[-1].sum() < probe_set.window
    result = probe(model, probe_set, layers=[0], batch_size=4)
    _, y, mask = _full_activations(model, probe_set, 0)
    assert int(result.neurons["count"].max()) == probe_set.n_tokens == int(mask.sum())
    torch.testing.assert_close(torch.tensor(result.neurons["mean"].to_numpy()), y[mask].double().mean(0),
                               atol=1e-5, rtol=1e-4)


def test_probe_set_is_deterministic_and_clipped(tokenizer, wiki_text) -> None:
    a = ProbeSet.build([wiki_text], tokenizer, n_tokens=4_096, window=1024, seed=3, max_positions=128)
    b = ProbeSet.build([wiki_text], tokenizer, n_tokens=4_096, window=1024, seed=3, max_positions=128)
    c = ProbeSet.build([wiki_text], tokenizer, n_tokens=4_096, window=1024, seed=4, max_positions=128)
    assert a.window == 128 and a.n_tokens == 4_096
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pair_positions, b.pair_positions)
    assert torch.equal(a.input_ids, c.input_ids)  # the first windows, whatever the seed; the pairs follow it
    assert not torch.equal(a.pair_positions, c.pair_positions)
    flat = a.pair_positions.reshape(-1)
    assert flat.unique().numel() == flat.numel() and bool(a.attention_mask.view(-1)[flat].all())


def test_probe_set_from_file_and_folder(tmp_path, tokenizer) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("the cat sees the dog . " * 200)
    (tmp_path / "docs" / "b.txt").write_text("the dogs see the cats . " * 200)
    from_dir = ProbeSet.build(tmp_path / "docs", tokenizer, n_tokens=1_000, window=64, n_pairs=50)
    from_file = ProbeSet.build(str(tmp_path / "docs" / "a.txt"), tokenizer, n_tokens=1_000, window=64, n_pairs=50)
    assert from_dir.n_tokens == from_file.n_tokens == 1_000 + (64 - 1_000 % 64) % 64
    both = tokenizer("the cat sees the dog . " * 200 + "\n\n" + "the dogs see the cats . " * 200,
                     add_special_tokens=False)["input_ids"]
    whole = ProbeSet.build(tmp_path / "docs", tokenizer, window=64, n_pairs=50)
    assert torch.equal(whole.input_ids.reshape(-1), torch.tensor(both[: len(both) // 64 * 64]))


def test_probe_windows_follow_the_paper(tokenizer, wiki_text) -> None:
    """The authors' probe windows, written from their definition: the text tokenized as one stream, consecutive
    2,048-token windows, the tail dropped, the first ones kept under a budget."""
    rows = wiki_text.splitlines(keepends=True)[:400]
    stream = tokenizer("\n\n".join(rows))["input_ids"]
    expected = [stream[i:i + 2_048] for i in range(0, len(stream) - 2_048 + 1, 2_048)]
    assert len(expected) >= 2
    whole = ProbeSet.build(rows, tokenizer, n_pairs=10, max_positions=4_096)
    assert whole.input_ids.tolist() == expected and bool(whole.attention_mask.all())
    budget = ProbeSet.build(rows, tokenizer, n_tokens=2_000, n_pairs=10, max_positions=4_096)
    assert budget.input_ids.tolist() == expected[:1]


def test_probe_set_errors(tmp_path, tokenizer) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(NegmonitorError, match="empty"):
        ProbeSet.build(str(empty), tokenizer)
    with pytest.raises(NegmonitorError, match="fewer than the 2000 needed for 1000 MD pairs"):
        ProbeSet.build(["just a few words"], tokenizer, n_pairs=1_000)
    with pytest.raises(NegmonitorError, match="does not exist"):
        ProbeSet.build(str(tmp_path / "missing.txt"), tokenizer)
    with pytest.raises(NegmonitorError, match="could not load dataset"):
        ProbeSet.build("no-such-dataset-xyz:cfg:test", tokenizer)


def test_bf16_copy_gives_the_same_wd_ranking(tokenizer, wiki_text) -> None:
    model = tiny_causal_lm("neox")
    probe_set = ProbeSet.build([wiki_text], tokenizer, n_tokens=16_000, window=128, n_pairs=200)
    fp32 = probe(model, probe_set, batch_size=16)
    bf16 = probe(tiny_causal_lm("neox").to(torch.bfloat16), probe_set, batch_size=16)
    from scipy.stats import spearmanr

    for layer in (0, 1):
        a, b = fp32.values("wd")[layer].numpy(), bf16.values("wd")[layer].numpy()
        assert spearmanr(a, b).statistic > 0.9
        top_a, top_b = set(np.argsort(-a)[:6]), set(np.argsort(-b)[:6])
        assert len(top_a & top_b) >= 4


def test_hooks_removed_and_user_hooks_kept(tokenizer) -> None:
    model = tiny_causal_lm("gpt2")
    site = find_sites(model, 0)[0]
    calls = []
    user = site.projection.register_forward_hook(lambda *a: calls.append(1) and None)
    before = {name: len(m._forward_hooks) for name, m in model.named_modules()}
    probe_set = ProbeSet.build(["the cat sees the dog ."] * 200, tokenizer, n_tokens=2_000, window=64, n_pairs=100)
    probe(model, probe_set)
    assert {name: len(m._forward_hooks) for name, m in model.named_modules()} == before
    assert calls, "the user's hook must still fire"
    user.remove()


def test_hooks_removed_after_an_exception(tokenizer) -> None:
    model = tiny_causal_lm("neox")
    probe_set = ProbeSet.build(["the cat sees the dog ."] * 200, tokenizer, n_tokens=2_000, window=64, n_pairs=100)
    probe_set.input_ids[0, 0] = 10**6  # out of vocabulary: the forward pass raises inside torch
    with pytest.raises(Exception):
        probe(model, probe_set)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert model.training is False


def test_compiled_model_is_handled(tokenizer) -> None:
    model = tiny_causal_lm("neox")
    probe_set = ProbeSet.build(["the cat sees the dog ."] * 200, tokenizer, n_tokens=2_000, window=64, n_pairs=100)
    eager = probe(model, probe_set)
    compiled = probe(torch.compile(model), probe_set)
    np.testing.assert_allclose(eager.neurons.wd.to_numpy(), compiled.neurons.wd.to_numpy())


def test_encoder_model(tmp_path) -> None:
    tok = tiny_bert_tokenizer()
    model = tiny_bert(head="base")
    probe_set = ProbeSet.build(["the cat sees the dog ."] * 300, tok, n_tokens=2_000, window=64, n_pairs=100)
    result = probe(model, probe_set, tokenizer=tok)
    assert len(result.layers) == 2 and result.neurons.wd.notna().all()


def test_result_round_trip(tmp_path, tokenizer) -> None:
    model = tiny_causal_lm("llama")
    probe_set = ProbeSet.build(["the cat sees the dog ."] * 300, tokenizer, n_tokens=3_000, window=64, n_pairs=100)
    result = probe(model, probe_set, tokenizer=tokenizer)
    result.save(tmp_path / "r")
    back = ProbeResult.load(tmp_path / "r")
    for name in ("neurons", "layers", "pairs", "top_pairs"):
        assert getattr(back, name).equals(getattr(result, name)), name
    assert not list((tmp_path / "r").glob("*.tmp"))


def test_a_save_cut_short_is_refused_not_read_as_a_mix(tmp_path, tokenizer, monkeypatch) -> None:
    """Saving a new result into a folder that holds an old one fails after the first table (a full disk): the
    folder is refused in one line on loading, instead of the new neurons being read with the old pairs."""
    import negmonitor.result as result_module

    model = tiny_causal_lm("llama")
    probe_set = ProbeSet.build(["the cat sees the dog ."] * 300, tokenizer, n_tokens=3_000, window=64, n_pairs=100)
    probe(model, probe_set, tokenizer=tokenizer).save(tmp_path / "r")
    real, written = result_module.write_parquet_atomic, []

    def disk_full_after_one(table, path):
        if written:
            raise OSError(28, "No space left on device (simulated)")
        written.append(path)
        return real(table, path)

    monkeypatch.setattr(result_module, "write_parquet_atomic", disk_full_after_one)
    with pytest.raises(OSError):
        probe(model, probe_set, tokenizer=tokenizer, layers=[0]).save(tmp_path / "r")
    with pytest.raises(NegmonitorError, match=r"incomplete probe result \(no meta.json") as err:
        ProbeResult.load(tmp_path / "r")
    assert "\n" not in str(err.value)


def test_memory_is_bounded_in_the_token_budget(tmp_path) -> None:
    """Peak RSS of a probe over 8x more tokens grows by far less than one [tokens x neurons] matrix."""
    script = textwrap.dedent('''
        import resource, sys, torch
        torch.set_num_threads(1)
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
        from negmonitor.probing import probe
        from negmonitor.probeset import ProbeSet
        from tiny_models import tiny_tokenizer
        tok = tiny_tokenizer()
        torch.manual_seed(0)
        model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   intermediate_size=1024, vocab_size=512, max_position_embeddings=256)).eval()
        n = int(sys.argv[1])
        ps = ProbeSet.build(["the cat sees the dogs and the dog sees a cat ."] * (n // 8), tok, n_tokens=n,
                            window=256, n_pairs=200)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        probe(model, ps, batch_size=4)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
    ''')
    growth = {}
    for n in (8_192, 65_536):
        out = subprocess.run([sys.executable, "-c", script, str(n)], capture_output=True,
                             text=True, check=False, cwd=str(Path(__file__).parent))
        assert out.returncode == 0, out.stderr[-2000:]
        growth[n] = int(out.stdout.strip().splitlines()[-1]) * 1024  # KiB -> bytes
    full_matrix = 65_536 * 1024 * 4  # 256 MiB if the activations were kept
    assert growth[65_536] - growth[8_192] < full_matrix / 8, growth


def test_package_level_probe_is_the_function() -> None:
    """``negmonitor.probe`` is the function (the module is ``negmonitor.probing``), also after importing it."""
    import importlib

    import negmonitor

    importlib.import_module("negmonitor.probing")
    assert callable(negmonitor.probe) and negmonitor.probe is importlib.import_module("negmonitor.probing").probe
    tokenizer = tiny_tokenizer()
    probe_set = ProbeSet.build(["the cat sees the dog ."] * 200, tokenizer, n_tokens=2_000, window=64, n_pairs=100)
    result = negmonitor.probe(tiny_causal_lm("neox"), probe_set)
    assert isinstance(result, ProbeResult) and len(result.layers) == 2
    assert "probe" in negmonitor.__all__


def test_probe_without_md_pairs_warns_nothing() -> None:
    """No MD pairs (as `ablate` probes): the pair buffers compute zeros without torchmetrics' warning."""
    import warnings

    tokenizer = tiny_tokenizer()
    probe_set = ProbeSet.build(["the cat sees the dogs . " * 50] * 10, tokenizer, n_tokens=1024, window=64,
                               n_pairs=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = probe(tiny_causal_lm(), probe_set)
    assert [str(w.message) for w in caught] == []
    assert result.neurons.wd.notna().all()


def test_values_without_the_tables_equal_the_tables_columns(tokenizer) -> None:
    """A rank that only selects neurons (the ablation under DDP) reads :meth:`ProbeResult.values` from the layer
    tensors, without building a table: every metric equals the built table's column, neuron for neuron."""
    probe_set = ProbeSet.build(["the cat sees the dogs . " * 50] * 10, tokenizer, n_tokens=1024, window=64,
                               n_pairs=100)
    result = probe(tiny_causal_lm("neox"), probe_set)
    untabled = {metric: result.values(metric) for metric in ("wd", "wd_neg", "md", "skew", "count", "flagged")}
    with pytest.raises(NegmonitorError, match="unknown metric 'ppl'"):
        result.values("ppl")
    for metric, by_layer in untabled.items():
        table = result.neurons
        assert sorted(by_layer) == sorted(table.layer.unique())
        for layer, values in by_layer.items():
            column = table[table.layer == layer].sort_values("neuron")[metric].to_numpy(dtype=np.float64)
            np.testing.assert_array_equal(values.numpy(), column, err_msg=metric)
            assert values.dtype == torch.float64
    assert list(result.layers.layer) == sorted(by_layer)


def test_a_probe_through_the_fused_cpu_update_equals_one_through_torchs_passes(tokenizer, monkeypatch) -> None:
    """A whole probe pass whose chunks take the fused CPU update (numba; normally only at real widths) gives the
    per-neuron table of one whose chunks take torch's passes: counts and negative fractions exactly, WD and moments
    to fp32 rounding."""
    pytest.importorskip("numba", reason="the fused CPU update needs numba")
    from negmonitor.metrics import _fused_cpu, streaming

    calls, rows = [], {True: [], False: []}
    fused_update, update = _fused_cpu.fused_update, streaming.NeuronStatsAccumulator.update
    monkeypatch.setattr(_fused_cpu, "fused_update", lambda *a, **k: calls.append(1) or fused_update(*a, **k))
    monkeypatch.setattr(streaming.NeuronStatsAccumulator, "update",
                        lambda self, x: rows[streaming._FUSED_ON_CPU].append(x.shape[0]) or update(self, x))
    monkeypatch.setattr(streaming, "_FUSED_MIN_VALUES", 0)
    model = tiny_causal_lm("neox")
    n_neurons = find_sites(model)[0].n_neurons
    monkeypatch.setattr(budget, "MAX_UPDATE_ELEMENTS", 100 * n_neurons)  # 100 rows an update, as at real width
    texts = [f"the {a} sees the {b} and the {b}s see {n} {a}s" for a in ("cat", "dog", "bird") for b in
             ("fox", "cow", "hen") for n in range(40)]
    probe_set = ProbeSet.build(texts, tokenizer, n_tokens=4_000, window=128, n_pairs=200, seed=0)
    tables = []
    for fused in (True, False):
        monkeypatch.setattr(streaming, "_FUSED_ON_CPU", fused)
        tables.append(probe(model, probe_set, tokenizer=tokenizer, batch_size=8).neurons)
    assert calls  # the fused update ran
    # it took whole unpadded batches of 8 x 128 tokens (views); torch's passes took 100 rows at a time
    assert max(rows[True]) == 8 * 128 and max(rows[False]) == 100
    fused, passes = tables
    for column in ("count", "nonfinite", "neg_frac"):
        np.testing.assert_array_equal(fused[column].to_numpy(), passes[column].to_numpy(), err_msg=column)
    for column in ("wd", "wd_neg", "mean", "std", "md"):
        np.testing.assert_allclose(fused[column].to_numpy(), passes[column].to_numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=column)


def test_a_model_spread_over_devices_is_refused_in_one_line(tokenizer) -> None:
    """device_map="auto" over two GPUs (or offloading) puts layers on different devices; the probe's accumulators
    live on one. Shown with the model's parameters reporting two CUDA devices (no GPU here), before any forward."""
    from types import SimpleNamespace

    model = tiny_causal_lm("llama")
    probe_set = ProbeSet.build(["the cat sat on the mat . " * 40], tokenizer, n_tokens=256, window=32, n_pairs=20)
    real = list(model.parameters())
    spread = real[:1] + [SimpleNamespace(device=torch.device("cuda", 1))] + real[1:]
    model.parameters = lambda recurse=True: iter(spread)
    with pytest.raises(NegmonitorError, match=r"the model's parameters are spread over cpu, cuda:1 \(a device_map "
                                              r"across devices, or offloading to the CPU or disk\): negmonitor "
                                              r"measures a model held whole on one device — load it onto one device"):
        probe(model, probe_set, tokenizer=tokenizer)

    model = tiny_causal_lm("llama")  # accelerate's offload: layer 1 on the meta device until it runs
    from accelerate import cpu_offload

    cpu_offload(model.model.layers[1], execution_device=torch.device("cpu"))
    assert {str(p.device) for p in model.parameters()} == {"cpu", "meta"}
    with pytest.raises(NegmonitorError, match=r"spread over cpu, meta \(a device_map across devices, or offloading"):
        probe(model, probe_set, tokenizer=tokenizer)


def test_a_probe_batch_size_below_one_is_refused_however_it_is_given() -> None:
    from negmonitor.probing import ProbeSettings, _settings

    with pytest.raises(NegmonitorError, match="positive integer, got 0"):
        ProbeSettings(batch_size=0)
    with pytest.raises(NegmonitorError, match="positive integer, got -2"):
        _settings(None, {"batch_size": -2})  # probe(model, probe_set, batch_size=-2)
    assert _settings(None, {"batch_size": 3}).batch_size == 3
