"""Sign-specific interventions: each mode's rule, only the selected neurons change, exact restore, nesting."""

from __future__ import annotations

import contextlib

import pytest
import torch

from negmonitor.adapters import find_sites
from negmonitor.errors import NegmonitorError
from negmonitor.interventions import MODES, MaskedActivation, ablate
from tiny_models import tiny_bert, tiny_causal_lm, tiny_tokenizer

FAMILIES = ("neox", "llama", "gpt2", "opt", "bert")
GELU_FAMILIES = ("neox", "llama", "gpt2", "bert")

# The rule each mode must apply to a selected neuron, written independently of the implementation.
EXPECTED = {
    "zero_negative": lambda x, act: act(x.clamp(min=0)),
    "zero_positive": lambda x, act: act(x.clamp(max=0)),
    "relu_positive": lambda x, act: torch.where(x > 0, x, act(x)),
    "flip_negative_post": lambda x, act: act(x).abs(),
    "zero_neuron": lambda x, act: torch.zeros_like(x),
}


def _model(family: str) -> torch.nn.Module:
    return tiny_bert() if family == "bert" else tiny_causal_lm(family)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def models():
    return {family: _model(family) for family in FAMILIES}


def _batch(tokenizer) -> dict:
    return dict(tokenizer(["the author that the guard likes laughs .", "no authors have ever been popular"],
                          return_tensors="pt", padding=True))


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@contextlib.contextmanager
def _recording_activation(model, layer: int):
    """Record (input, output) of the layer's current activation module (wrapper or original)."""
    site = find_sites(model, [layer])[0]
    seen = {}
    handle = site.activation.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach(), y=o.detach()))
    try:
        yield seen
    finally:
        handle.remove()


@pytest.mark.parametrize("family", GELU_FAMILIES)
@pytest.mark.parametrize("mode", list(MODES))
def test_mode_changes_only_selected_neurons(models, tokenizer, family, mode):
    model = models[family]
    site = find_sites(model, [1])[0]
    base = site.activation
    chosen = torch.arange(0, site.n_neurons, 3)
    with ablate(model, {1: chosen}, mode=mode), _recording_activation(model, 1) as seen:
        _logits(model, _batch(tokenizer))
    x, y = seen["x"], seen["y"]
    selected = torch.zeros(site.n_neurons, dtype=torch.bool)
    selected[chosen] = True
    torch.testing.assert_close(y[..., selected], EXPECTED[mode](x, base)[..., selected])
    torch.testing.assert_close(y[..., ~selected], base(x)[..., ~selected])


@pytest.mark.parametrize("family", GELU_FAMILIES)
def test_zero_negative_on_all_neurons_gives_act_of_positive_part(models, tokenizer, family):
    model = models[family]
    sites = find_sites(model)
    base = [s.activation for s in sites]
    selection = {s.layer: list(range(s.n_neurons)) for s in sites}
    with ablate(model, selection, "zero_negative"):
        with _recording_activation(model, 0) as first, _recording_activation(model, 1) as second:
            ablated = _logits(model, _batch(tokenizer))
    for act, seen in zip(base, (first, second)):
        assert (seen["x"] < 0).any()
        torch.testing.assert_close(seen["y"], act(torch.clamp(seen["x"], min=0)))
    assert not torch.allclose(ablated, _logits(model, _batch(tokenizer)))


def test_opt_relu_zero_negative_is_a_no_op(models, tokenizer):
    """OPT uses ReLU: zeroing negative pre-activations changes nothing (the contrast case)."""
    model = models["opt"]
    assert isinstance(find_sites(model)[0].activation, torch.nn.ReLU)
    selection = {layer: list(range(64)) for layer in (0, 1)}
    clean = _logits(model, _batch(tokenizer))
    with ablate(model, selection, "zero_negative"):
        torch.testing.assert_close(_logits(model, _batch(tokenizer)), clean, rtol=0, atol=0)
    with ablate(model, selection, "zero_positive"):
        assert not torch.allclose(_logits(model, _batch(tokenizer)), clean)


@pytest.mark.parametrize("family", FAMILIES)
def test_model_is_exactly_restored_even_after_an_error(models, tokenizer, family):
    model = models[family]
    sites = find_sites(model)
    originals = [s.activation for s in sites]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    clean = _logits(model, _batch(tokenizer))
    selection = {0: [1, 2, 3], 1: torch.tensor([0, 63])}
    with pytest.raises(RuntimeError, match="boom"):
        with ablate(model, selection, "zero_neuron"):
            assert all(isinstance(s.activation, MaskedActivation) for s in sites)
            assert model.state_dict().keys() == state.keys()  # the mask is not part of the state
            raise RuntimeError("boom")
    assert [s.activation for s in sites] == originals
    assert all(a is b for a, b in zip((s.activation for s in sites), originals))
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    torch.testing.assert_close(_logits(model, _batch(tokenizer)), clean, rtol=0, atol=0)


def test_nesting_on_different_and_same_layers_restores_in_order(models, tokenizer):
    model = models["neox"]
    sites = find_sites(model)
    originals = [s.activation for s in sites]
    with ablate(model, {0: [1, 2]}, "zero_negative"):
        outer = sites[0].activation
        with ablate(model, {1: [3]}, "zero_positive"), ablate(model, {0: [2, 5]}, "flip_negative_post"):
            assert sites[0].activation.base is outer
            assert sites[1].activation.base is originals[1]
        assert sites[0].activation is outer and sites[1].activation is originals[1]
    assert all(s.activation is o for s, o in zip(sites, originals))


def test_nested_same_neurons_compose(models, tokenizer):
    """An inner mode applies to the outer mode's output: zero_neuron inside anything gives zeros."""
    model = models["llama"]
    with ablate(model, {0: [4, 9]}, "relu_positive"), ablate(model, {0: [4, 9]}, "zero_neuron"):
        with _recording_activation(model, 0) as seen:
            _logits(model, _batch(tokenizer))
    assert torch.count_nonzero(seen["y"][..., [4, 9]]) == 0


def test_weights_untouched_and_backward_works(models, tokenizer):
    model = models["gpt2"]
    before = [p.detach().clone() for p in model.parameters()]
    batch = _batch(tokenizer)
    with ablate(model, {0: list(range(32))}, "zero_negative"):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", list(MODES))
def test_low_precision_on_cpu(tokenizer, dtype, mode):
    model = tiny_causal_lm("neox").to(dtype)
    site = find_sites(model, [0])[0]
    with ablate(model, {0: list(range(site.n_neurons))}, mode), _recording_activation(model, 0) as seen:
        logits = _logits(model, _batch(tokenizer))
    assert seen["y"].dtype == dtype and logits.dtype == dtype
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(seen["y"], EXPECTED[mode](seen["x"], site.activation))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_mask_follows_the_input(tokenizer):
    model = tiny_causal_lm("llama").cuda()
    batch = {k: v.cuda() for k, v in _batch(tokenizer).items()}
    clean = _logits(model, batch)
    with ablate(model, {0: list(range(64)), 1: list(range(64))}, "zero_negative"):
        assert not torch.allclose(_logits(model, batch), clean)
    torch.testing.assert_close(_logits(model, batch), clean, rtol=0, atol=0)


def test_empty_selection_is_a_no_op(models):
    model = models["neox"]
    originals = [s.activation for s in find_sites(model)]
    with ablate(model, {}, "zero_negative"), ablate(model, {1: []}, "zero_neuron"):
        assert [s.activation for s in find_sites(model)] == originals


def test_negative_layer_index_means_from_the_end(models):
    model = models["neox"]
    with ablate(model, {-1: [0]}, "zero_neuron"):
        assert isinstance(find_sites(model, [1])[0].activation, MaskedActivation)
        assert not isinstance(find_sites(model, [0])[0].activation, MaskedActivation)


def test_bad_inputs_raise_one_line_errors(models):
    model = models["neox"]
    originals = [s.activation for s in find_sites(model)]
    with pytest.raises(NegmonitorError, match="unknown ablation mode 'zero_negatve' — use one of zero_negative"):
        with ablate(model, {0: [1]}, "zero_negatve"):
            pass
    with pytest.raises(NegmonitorError, match="neuron index 64 is out of range for layer 1"):
        with ablate(model, {0: [1], 1: [64]}):
            pass
    with pytest.raises(NegmonitorError, match="neuron index -1 is out of range"):
        with ablate(model, {0: [-1]}):
            pass
    with pytest.raises(NegmonitorError, match="layer 5 is out of range"):
        with ablate(model, {5: [0]}):
            pass
    assert [s.activation for s in find_sites(model)] == originals


def test_a_fused_mlp_that_never_calls_its_activation_is_refused(tokenizer) -> None:
    """As Liger's kernel (use_liger_kernel=True) replaces a Llama MLP's forward: SiLU(gate) * up computed in one
    fused call, act_fn never called. The ablation would change nothing; it says so instead of scoring no damage."""
    model = tiny_causal_lm("llama")
    ids = tokenizer(["the cat sat on the mat"], return_tensors="pt")["input_ids"]
    with ablate(model, {0: [0, 1]}):  # the model's own forward calls act_fn: no complaint
        model(ids)
    mlp = model.model.layers[0].mlp
    mlp.forward = lambda x: mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    with ablate(model, {1: [3]}):
        layer_1_only = model(ids).logits
    with pytest.raises(NegmonitorError, match=r"the ablation changed nothing: model\.layers\.0\.mlp\.gate_proj ran "
                                              r"but its layer never called its activation module \(a fused MLP "
                                              r"kernel .*Liger's"):
        with ablate(model, {0: [0, 1], 1: [3]}):
            assert torch.equal(model(ids).logits, layer_1_only)  # layer 0's mask was never applied
    assert not isinstance(mlp.act_fn, MaskedActivation)  # restored
    assert not mlp.gate_proj._forward_hooks  # the counting hooks are gone
    with ablate(model, {0: [0, 1]}):  # a block that runs no forward is no evidence either way
        pass


def test_ablating_a_compiled_model_does_not_recompile_it_at_every_forward(tokenizer) -> None:
    """The check above counts calls in eager runs only: an attribute changed at every call would be a guard that
    fails at every forward of a compiled model (a full recompile each, until dynamo gives up)."""
    import torch._dynamo

    model = tiny_causal_lm("llama")
    ids = tokenizer(["the cat sat on the mat"], return_tensors="pt")["input_ids"]
    compiled = torch.compile(model, backend="eager")
    torch._dynamo.reset()
    with ablate(compiled, {0: [0, 1]}):
        expected = model(ids).logits  # eager: the ablation applies
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(3):
                torch.testing.assert_close(compiled(ids).logits, expected)
    torch._dynamo.reset()
