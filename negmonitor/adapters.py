"""Model adapters: where the MLP pre-activations of each family live.

A *site* is the linear map right before a block's MLP nonlinearity (its output is the pre-activation, one column
per neuron) together with the nonlinearity itself. Families are described by module paths relative to the model
(the list of blocks) and to each block (projection, activation), so a new family can be registered from user code
with :func:`register_adapter` and no subclassing.

Example::

    >>> from negmonitor.adapters import register_adapter
    >>> register_adapter("my_family", model_types=["my_model"], layers_path="blocks",
    ...                  projection_path="ffn.w_in", activation_path="ffn.act")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from negmonitor.errors import NegmonitorError, UnreadableWeight
from negmonitor.peft_layers import base_layer, check_peft_readable, is_peft_layer


@dataclass(frozen=True)
class AdapterSpec:
    """Where a family keeps its blocks, pre-activation projection and nonlinearity (module paths)."""

    family: str
    model_types: tuple[str, ...]
    layers_path: str
    projection_path: str
    activation_path: str


@dataclass
class MLPSite:
    """One monitored layer: the projection whose output is the pre-activation, and the nonlinearity after it."""

    layer: int
    path: str
    projection: nn.Module
    act_owner: nn.Module
    act_attr: str
    family: str

    @property
    def n_neurons(self) -> int:
        """Number of neurons (output units of the projection), from the module's feature counts: under FSDP or
        ZeRO-3 ``weight`` holds only this process's shard."""
        return _features(self.projection)[0]

    @property
    def d_in(self) -> int:
        """Width of the projection's input (the residual stream), from the module's feature counts."""
        return _features(self.projection)[1]

    @property
    def activation(self) -> nn.Module:
        """The nonlinearity module applied to this site's output."""
        return getattr(self.act_owner, self.act_attr)

    def weight_rows(self) -> torch.Tensor:
        """Neuron weight rows ``[n_neurons, d_in]`` (transformers' ``Conv1D`` stores the transpose), whole even under
        FSDP (gathered from the shards, see :func:`negmonitor.distributed.full_weight`), and as the forward applies
        them under LoRA (see :mod:`negmonitor.peft_layers`)."""
        from negmonitor.distributed import full_weight

        weight = full_weight(self.projection)
        if not weight.is_floating_point():
            raise UnreadableWeight(_unreadable(self.path, f"is {weight.dtype}"))
        rows = weight.t() if _is_conv1d(base_layer(self.projection)) else weight
        if tuple(rows.shape) != (self.n_neurons, self.d_in):  # a shard or a partition seen outside its wrapper
            raise NegmonitorError(f"the weight of {self.path} has shape "
                                  f"{tuple(weight.shape)}, not [neurons, inputs]: a sharded model (FSDP, DeepSpeed "
                                  "ZeRO-3) seen without its wrapper — measure through a supported strategy")
        return rows

    def check_weight_readable(self) -> None:
        """Raise :class:`UnreadableWeight` for a site whose weight drift cannot read at any measurement (a quantized
        weight outside peft, a peft layer it cannot follow), before training: the callbacks then leave drift out
        with one warning instead of failing every measurement. Checked from the layer's structure and dtype (its
        weight may be an FSDP shard until gathered)."""
        if is_peft_layer(self.projection):
            check_peft_readable(self.projection)
            return
        weight = getattr(self.projection, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise UnreadableWeight(_unreadable(self.path, f"is missing ({type(self.projection).__name__}, as GPTQ or "
                                                         "AWQ layers)"))
        if not weight.is_floating_point():
            raise UnreadableWeight(_unreadable(self.path, f"is {weight.dtype}"))


def _unreadable(path: str, what: str) -> str:
    return f"the weight of {path} {what}: a quantized layer, which weight drift cannot read"


_REGISTRY: dict[str, AdapterSpec] = {}


def register_adapter(
    family: str,
    model_types: Iterable[str],
    layers_path: str,
    projection_path: str,
    activation_path: str,
) -> AdapterSpec:
    """Register (or replace) a model family by module paths.

    Args:
        family: a name for the family, shown in messages and records.
        model_types: the ``config.model_type`` values that use it.
        layers_path: path of the ``nn.ModuleList`` of blocks, relative to the base model or any wrapper
            (matched as a suffix of the module name, e.g. ``"layers"`` or ``"encoder.layer"``).
        projection_path: path of the pre-activation projection inside a block (e.g. ``"mlp.gate_proj"``).
        activation_path: path of the nonlinearity module inside a block (e.g. ``"mlp.act_fn"``).
    """
    spec = AdapterSpec(family, tuple(model_types), layers_path, projection_path, activation_path)
    _REGISTRY[family] = spec
    return spec


def registered_families() -> list[str]:
    """Names of the registered families, for messages."""
    return sorted(_REGISTRY)


register_adapter("gpt_neox", ["gpt_neox"], "layers", "mlp.dense_h_to_4h", "mlp.act")
register_adapter(
    "llama",
    ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2"],  # not Mixtral (MoE) nor Phi-3
    # (its gate and up projections are one fused Linear): no per-neuron gate module there
    "layers",
    "mlp.gate_proj",
    "mlp.act_fn",
)
register_adapter("gpt2", ["gpt2"], "h", "mlp.c_fc", "mlp.act")
register_adapter("opt", ["opt"], "decoder.layers", "fc1", "activation_fn")
register_adapter(
    "bert",
    ["bert", "roberta", "xlm-roberta", "camembert", "electra"],
    "encoder.layer",
    "intermediate.dense",
    "intermediate.intermediate_act_fn",
)


def find_sites(model: nn.Module, layers: Sequence[int] | int | None = None) -> list[MLPSite]:
    """Return the MLP sites of ``model``, one per block, optionally only the blocks in ``layers``.

    Raises:
        NegmonitorError: the model's family has no adapter, a layer index is out of range, or a chosen block lacks
            the projection (a mixture-of-experts block).
    """
    spec, blocks_name, blocks = _match(model)
    chosen = normalise_layers(layers, len(blocks))
    _check_every_block_has_the_site(spec, blocks, chosen)
    return [_site(spec, blocks_name, blocks, layer) for layer in chosen]


def _check_every_block_has_the_site(spec: AdapterSpec, blocks: nn.ModuleList, chosen: Sequence[int]) -> None:
    """Refuse, in one line naming the blocks that have it, layers without the projection: a model whose first
    blocks are dense and the rest mixture-of-experts (DeepSeek-V3, Qwen-MoE's ``mlp_only_layers``) matches its
    family on block 0 only."""
    missing = [layer for layer in chosen if not _has_path(blocks[layer], spec.projection_path)]
    if not missing:
        return
    dense = [layer for layer in range(len(blocks)) if _has_path(blocks[layer], spec.projection_path)]
    kind = type(_submodule_or_block(blocks[missing[0]], spec.projection_path)).__name__
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise NegmonitorError(
        f"block {missing[0]}{more} has no {spec.projection_path} ({kind}: a mixture-of-experts block?) — monitor "
        f"the blocks that have it: layers={','.join(map(str, dense))} (--layers on the command line)")


def _submodule_or_block(block: nn.Module, path: str) -> nn.Module:
    """The deepest module on ``path`` that exists (what stands where the projection's parent should be)."""
    module = block
    for part in path.split(".")[:-1]:
        if not hasattr(module, part):
            break
        module = getattr(module, part)
    return module


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of blocks (one MLP site each), in forward order."""
    return _match(model)[2]


def normalise_layers(layers: Sequence[int] | int | None, n_layers: int) -> list[int]:
    """Turn ``None`` / an int / a list (negative indices allowed) into sorted, checked layer indices."""
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for layer in layers:
        index = int(layer)
        if not -n_layers <= index < n_layers:
            raise NegmonitorError(
                f"layer {index} is out of range: this model has {n_layers} layers — use 0..{n_layers - 1}"
            )
        out.append(index % n_layers)
    return sorted(set(out))


def model_family(model: nn.Module) -> str:
    """The adapter family name of ``model``."""
    return _match(model)[0].family


def _match(model: nn.Module) -> tuple[AdapterSpec, str, nn.ModuleList]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    candidates = [s for s in _REGISTRY.values() if model_type in s.model_types]
    candidates += [s for s in _REGISTRY.values() if s not in candidates]
    for spec in candidates:
        found = _find_blocks(model, spec.layers_path)
        if found is not None and _has_path(found[1][0], spec.projection_path):
            return spec, found[0], found[1]
    raise NegmonitorError(
        f"no adapter for model type {model_type!r} ({type(model).__name__}); supported families: "
        f"{', '.join(registered_families())} — register one with negmonitor.register_adapter(family, "
        "model_types=[...], layers_path='layers', projection_path='mlp.up', activation_path='mlp.act')"
    )


def _find_blocks(model: nn.Module, layers_path: str) -> tuple[str, nn.ModuleList] | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if name == layers_path or name.endswith("." + layers_path):
                return name, module
    return None


def _has_path(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _site(spec: AdapterSpec, blocks_name: str, blocks: nn.ModuleList, layer: int) -> MLPSite:
    block = blocks[layer]
    projection = block.get_submodule(spec.projection_path)
    owner_path, _, attr = spec.activation_path.rpartition(".")
    owner = block.get_submodule(owner_path) if owner_path else block
    if not hasattr(owner, attr):
        raise NegmonitorError(
            f"adapter {spec.family!r}: block {layer} has no activation at {spec.activation_path!r} — "
            "fix activation_path in register_adapter"
        )
    path = f"{blocks_name}.{layer}.{spec.projection_path}"
    return MLPSite(layer, path, projection, owner, attr, spec.family)


def _features(module: nn.Module) -> tuple[int, int]:
    """``(out, in)`` features of a projection: ``nn.Linear``'s ``out_features``/``in_features``, transformers'
    ``Conv1D``'s ``nf``/``nx``, else the (unsharded) weight's shape; a PEFT layer's are its base layer's."""
    module = base_layer(module)
    if _is_conv1d(module):
        return int(module.nf), int(module.nx)
    if hasattr(module, "out_features") and hasattr(module, "in_features"):
        return int(module.out_features), int(module.in_features)
    out, d_in = module.weight.shape
    return int(out), int(d_in)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


ENCODER_MODEL_TYPES = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "deberta"}


def is_decoder_config(config: object) -> bool:
    """Whether a transformers config is a causal LM's (built with ``AutoModelForCausalLM``), not a BERT-style
    encoder's (``AutoModel``)."""
    return getattr(config, "model_type", "") not in ENCODER_MODEL_TYPES
