"""Projections wrapped by PEFT (LoRA fine-tuning): the weight their forward applies, and the layer they wrap.

Under ``peft``'s LoRA the site's projection (``mlp.gate_proj``, ``mlp.dense_h_to_4h``, ...) is a LoRA layer around
the frozen base layer. Its output, the pre-activation the probe captures, is ``base(x) + scale * B(A(x))``; its
``weight`` attribute is the frozen base weight alone, so a drift read from it would stay zero however far the
adapters moved. :func:`applied_weight` gives ``W + sum of the active adapters' B @ A * scale`` (PEFT's own
``get_delta_weight``, the term its ``merge`` adds), from a quantized base too (PEFT's ``dequantize_module_weight``).
LoRA variants whose merged weight is not base + delta (DoRA), other PEFT tuners, nested tuner layers and bases
without a weight tensor (GPTQ, AWQ) raise :class:`~negmonitor.errors.UnreadableWeight` (the callbacks then leave
drift out, with one warning).

``peft`` is imported only when it is already loaded: a model without PEFT layers never needs it.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from negmonitor.errors import UnreadableWeight


def is_peft_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a PEFT tuner layer (a LoRA ``Linear`` around a base layer, ...)."""
    if "peft" not in sys.modules:
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def base_layer(module: nn.Module) -> nn.Module:
    """The layer a PEFT layer wraps (``nn.Linear``, transformers' ``Conv1D``, ...), else ``module`` itself."""
    return module.get_base_layer() if is_peft_layer(module) else module


def applied_weight(module: nn.Module) -> torch.Tensor:
    """The weight ``module``'s forward applies, detached, in the base layer's layout: ``module.weight``, or for a
    PEFT LoRA layer its base weight plus each active adapter's delta, in fp32 (or the base's wider dtype) — a bf16
    base plus fp32 adapters is not a bf16 weight, and rounding it would lose most of a step's adapter update; the
    drift's snapshot rounds it to ``drift_dtype`` afterwards. With merged adapters the forward applies the base
    alone (it holds them); with adapters disabled, the base less the merged ones (the forward unmerges them)."""
    if not is_peft_layer(module):
        return module.weight.detach()
    from peft.utils.integrations import dequantize_module_weight

    adding, sign = _deltas_to_add(module)
    base = dequantize_module_weight(module.get_base_layer()).detach()
    if not adding:
        return base
    weight = base.to(torch.promote_types(base.dtype, torch.float32), copy=True)  # never the live base weight
    with torch.no_grad():  # the adapters train: no graph through their weights
        for name in adding:
            delta = module.get_delta_weight(name)
            if delta.shape != weight.shape:  # e.g. adapters sharded in FSDP units of their own, read outside them
                _refuse(module, f"adapter {name}'s delta has shape {tuple(delta.shape)}, its base weight "
                                f"{tuple(weight.shape)}")
            weight.add_(delta.to(weight.device, weight.dtype), alpha=sign)
            del delta
    return weight


def check_peft_readable(module: nn.Module) -> None:
    """Raise, before training starts, the one-line :class:`UnreadableWeight` a read of ``module``'s weight would
    raise at every measurement (checked from the layer's structure: its weights may be shards until gathered)."""
    if not is_peft_layer(module):
        return
    _deltas_to_add(module)
    base = module.get_base_layer()
    if not isinstance(getattr(base, "weight", None), torch.Tensor) and not hasattr(base, "W_q"):
        _refuse(module, f"its base {type(base).__name__} has no weight tensor to read, as GPTQ or AWQ layers")


def _deltas_to_add(module: nn.Module) -> tuple[list[str], float]:
    """The LoRA adapters whose deltas the forward adds to the base weight as it stands, and the sign: the active
    ones when none is merged (+1); none when some are (the forward then runs the base alone); the merged ones
    when adapters are disabled (-1: the forward unmerges them)."""
    if not hasattr(module, "lora_A") or not hasattr(module, "get_delta_weight"):
        _refuse(module, "not LoRA")
    if is_peft_layer(getattr(module, "base_layer", None)):
        _refuse(module, "a tuner layer inside another")
    merged = list(module.merged_adapters)
    if module.disable_adapters:
        adding, sign = merged, -1.0
    elif merged:
        adding, sign = [], 1.0
    else:
        adding, sign = list(module.active_adapters), 1.0
    adding = sorted(name for name in adding if name in module.lora_A)
    variants = [name for name in adding if name in (getattr(module, "lora_variant", None) or {})
                or (getattr(module, "use_dora", None) or {}).get(name)]
    if variants:
        _refuse(module, f"adapter {', '.join(variants)} is a LoRA variant such as DoRA")
    return adding, sign


def _refuse(module: nn.Module, why: str) -> None:
    raise UnreadableWeight(f"weight drift cannot read a {type(module).__name__} PEFT layer ({why})")
