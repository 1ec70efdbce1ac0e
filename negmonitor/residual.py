"""Start a probe pass part-way through the model, from the residual stream cached at a block's input.

When the memory budget splits the monitored layers into groups (:mod:`negmonitor.budget`), each group is one pass
over the probe set. Run from the embeddings, the pass for layers 20-23 of a 24-layer model would recompute blocks
0-19 for every batch: at Pythia-1.4B's 24 one-layer groups that is ~12x the work of one forward. Instead, each pass
keeps the hidden states entering the next group's first block (one ``[batch, window, d_model]`` tensor per
batch), and the next pass feeds them straight into that block.

What the blocks need besides the hidden states (attention mask, position ids, rotary embeddings) is taken from the
model itself: each batch runs the model's forward up to its first block only (:func:`block_inputs`), which builds
them as the model's own loop would pass them to every block. That holds for transformers' decoder and encoder
loops, which hand every block the same arguments; models whose blocks get different arguments (sliding-window
layers mixed with full ones, ``config.layer_types``) run every pass from the embeddings instead
(:func:`can_start_midway`). The blocks compute exactly what they compute inside the full forward, so the
statistics are identical either way (tested).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from negmonitor.capture import StopPass

__all__ = ["can_start_midway", "block_inputs", "run_blocks", "stop_before"]


def can_start_midway(model: nn.Module) -> bool:
    """Whether every block of ``model`` is called with the same arguments besides the hidden states."""
    layer_types = getattr(getattr(model, "config", None), "layer_types", None)
    return not layer_types or len(set(layer_types)) <= 1


class _Captured(StopPass):
    """Ends the forward once the first block's arguments are taken."""


def block_inputs(runner: nn.Module, first_block: nn.Module, **model_inputs: torch.Tensor) -> tuple[tuple, dict]:
    """The positional (after the hidden states) and keyword arguments the model passes to its blocks for this
    batch, from a forward stopped at the first block."""
    taken: list = []

    def take(module: nn.Module, args: tuple, kwargs: dict) -> None:
        taken.append((args[1:], dict(kwargs)) if args else ((), {k: v for k, v in kwargs.items()
                                                                   if k != "hidden_states"}))
        raise _Captured

    handle = first_block.register_forward_pre_hook(take, with_kwargs=True)
    try:
        runner(**model_inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not taken:
        raise RuntimeError("the model's forward never reached its first block")
    return taken[0]


def run_blocks(blocks: nn.ModuleList, start: int, stop: int, hidden: torch.Tensor, args: tuple,
               kwargs: dict) -> torch.Tensor:
    """Run ``blocks[start:stop]`` on ``hidden`` with the model's block arguments; return the hidden states after
    the last one (blocks of older transformers return a tuple: its first element)."""
    for index in range(start, stop):
        out = blocks[index](hidden, *args, **kwargs)
        hidden = out[0] if isinstance(out, (tuple, list)) else out
    return hidden


@contextlib.contextmanager
def stop_before(block: nn.Module, store: list[torch.Tensor] | None = None) -> Iterator[None]:
    """End every forward at ``block``'s input, appending that input (the hidden states) to ``store`` when given;
    the hook is removed on exit."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if store is not None:
            store.append(args[0] if args else kwargs["hidden_states"])
        raise StopPass

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
