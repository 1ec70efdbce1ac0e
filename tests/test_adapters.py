"""Adapters find the pre-activation projection and nonlinearity of every supported family."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from negmonitor.adapters import find_sites, register_adapter
from negmonitor.errors import NegmonitorError
from negmonitor.interventions import ablate
from tiny_models import tiny_bert, tiny_causal_lm

EXPECTED = {
    "neox": ("gpt_neox", "gpt_neox.layers.1.mlp.dense_h_to_4h", "act"),
    "llama": ("llama", "model.layers.1.mlp.gate_proj", "act_fn"),
    "gpt2": ("gpt2", "transformer.h.1.mlp.c_fc", "act"),
    "opt": ("opt", "model.decoder.layers.1.fc1", "activation_fn"),
}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_decoder_families(family: str) -> None:
    model = tiny_causal_lm(family)
    sites = find_sites(model)
    name, path, act_attr = EXPECTED[family]
    assert [s.layer for s in sites] == [0, 1]
    assert sites[1].family == name and sites[1].path == path and sites[1].act_attr == act_attr
    assert sites[1].projection is model.get_submodule(path)
    assert sites[0].n_neurons == 64 and sites[0].d_in == 32


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_weight_rows_reproduce_the_pre_activation(family: str) -> None:
    """Row i of weight_rows() dotted with the input gives neuron i's output (GPT-2's Conv1D is transposed)."""
    site = find_sites(tiny_causal_lm(family), 0)[0]
    x = torch.randn(5, site.d_in)
    bias = getattr(site.projection, "bias", None)
    expected = x @ site.weight_rows().t() + (bias if bias is not None else 0)
    torch.testing.assert_close(site.projection(x), expected)


def test_gate_not_up_for_llama() -> None:
    site = find_sites(tiny_causal_lm("llama"), 0)[0]
    assert site.projection is site.act_owner.gate_proj
    assert isinstance(site.activation, nn.SiLU) or "silu" in type(site.activation).__name__.lower()


@pytest.mark.parametrize("head", ["mlm", "base"])
def test_bert_encoder(head: str) -> None:
    model = tiny_bert(head=head)
    sites = find_sites(model)
    assert len(sites) == 2 and sites[0].act_attr == "intermediate_act_fn"
    assert sites[0].path.endswith("encoder.layer.0.intermediate.dense")


def test_layer_selection_and_errors() -> None:
    model = tiny_causal_lm("neox")
    assert [s.layer for s in find_sites(model, [-1])] == [1]
    with pytest.raises(NegmonitorError, match="layer 5 is out of range.*0..1"):
        find_sites(model, [5])


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"w_in": nn.Linear(4, 8), "act": nn.GELU()}) for _ in range(3))


def test_unsupported_model_names_families_and_registration() -> None:
    with pytest.raises(NegmonitorError) as err:
        find_sites(_Toy())
    message = str(err.value)
    assert "gpt_neox" in message and "llama" in message and "register_adapter" in message
    assert "\n" not in message


def test_register_adapter_from_user_code() -> None:
    register_adapter("toy", ["toy"], "blocks", "w_in", "act")
    try:
        sites = find_sites(_Toy())
        assert len(sites) == 3 and sites[2].n_neurons == 8 and sites[0].path == "blocks.0.w_in"
    finally:
        from negmonitor import adapters

        adapters._REGISTRY.pop("toy")


def test_every_registered_model_type_finds_its_sites() -> None:
    """Each model type an adapter names is built (tiny, from transformers' own config class) and its sites found
    at the named projection, with the nonlinearity after it: no family claims a model whose MLP is laid out
    otherwise (Mixtral's experts, Phi-3's fused gate_up_proj were listed and failed)."""
    import warnings

    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from negmonitor.adapters import _REGISTRY

    tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                intermediate_size=64, vocab_size=128, head_dim=8, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                ffn_dim=64, word_embed_proj_dim=32)
    for spec in _REGISTRY.values():
        for model_type in spec.model_types:
            config = AutoConfig.for_model(model_type)
            for key, value in tiny.items():
                if hasattr(config, key):
                    setattr(config, key, value)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = (AutoModel if spec.family == "bert" else AutoModelForCausalLM).from_config(config)
            sites = find_sites(model)
            assert len(sites) == 2 and sites[0].path.endswith(spec.projection_path), model_type
            assert sites[0].family == spec.family and (sites[0].n_neurons, sites[0].d_in) == (64, 32), model_type
            with ablate(model, {0: [0], 1: [0]}):  # AblationBypassed if the MLP never called the nonlinearity
                model(input_ids=torch.tensor([[3, 5, 7, 9]]))


def test_blocks_without_the_projection_are_refused_naming_those_that_have_it() -> None:
    """Dense first blocks, mixture-of-experts after (Qwen-MoE's mlp_only_layers, DeepSeek-V3): block 0 matches the
    Llama adapter, and the MoE blocks raised an AttributeError from inside torch."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                            num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                            num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0])
    model = AutoModelForCausalLM.from_config(config)
    assert [site.path for site in find_sites(model, [0])] == ["model.layers.0.mlp.gate_proj"]
    with pytest.raises(NegmonitorError, match=r"block 1 \(and 1 more\) has no mlp.gate_proj "
                                              r"\(Qwen3MoeSparseMoeBlock: a mixture-of-experts block\?\) .* layers=0"):
        find_sites(model)
    with pytest.raises(NegmonitorError, match="block 2 has no mlp.gate_proj"):
        find_sites(model, [0, 2])
