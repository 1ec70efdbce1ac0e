"""Sign-specific interventions on selected MLP neurons.

:func:`ablate` is a context manager that changes only the chosen neurons of the chosen layers, by swapping each
layer's nonlinearity (``site.act_owner.<act_attr>``) for a :class:`MaskedActivation` that holds the original
module and a boolean neuron mask. Unselected neurons go through the original nonlinearity untouched; weights are
never modified, and the original module is put back in ``finally``, so the model is exactly as before on exit,
exceptions included. Ablations nest (on different layers or the same one) and unwind in reverse order.

Modes (``x`` is the pre-activation, ``act`` the layer's own nonlinearity):

- ``zero_negative``: ``x < 0 → 0`` before the nonlinearity, so the neuron outputs ``act(max(x, 0))`` (the paper's
  main ablation; for GELU/SiLU this removes the small negative outputs and the information they carry).
- ``zero_positive``: ``x > 0 → 0`` before the nonlinearity, ``act(min(x, 0))``.
- ``relu_positive``: identity for ``x > 0``, ``act(x)`` for ``x ≤ 0``.
- ``flip_negative_post``: negative post-activations are negated (``|act(x)|``).
- ``zero_neuron``: the post-activation is 0.

For a ReLU model (OPT) ``zero_negative`` leaves every output unchanged, a useful contrast case.

Example::

    >>> with ablate(model, {3: [17, 42], 5: torch.tensor([7])}, mode="zero_negative"):
    ...     loss = model(**batch).loss
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from negmonitor.adapters import MLPSite, find_sites, normalise_layers
from negmonitor.errors import AblationBypassed, NegmonitorError

def _zero_negative(x: torch.Tensor, mask: torch.Tensor, base: nn.Module) -> torch.Tensor:
    return base(x.masked_fill(mask & (x < 0), 0))


def _zero_positive(x: torch.Tensor, mask: torch.Tensor, base: nn.Module) -> torch.Tensor:
    return base(x.masked_fill(mask & (x > 0), 0))


def _relu_positive(x: torch.Tensor, mask: torch.Tensor, base: nn.Module) -> torch.Tensor:
    return torch.where(mask & (x > 0), x, base(x))


def _flip_negative_post(x: torch.Tensor, mask: torch.Tensor, base: nn.Module) -> torch.Tensor:
    y = base(x)
    return torch.where(mask & (y < 0), -y, y)


def _zero_neuron(x: torch.Tensor, mask: torch.Tensor, base: nn.Module) -> torch.Tensor:
    y = base(x)
    return y.masked_fill(mask, 0)


# Each rule equals ``torch.where(mask, modified(x), base(x))`` but calls the base nonlinearity only once (and fills
# with a scalar: no full-size zeros beside the [batch, tokens, neurons] activations).
MODES: dict[str, Callable[[torch.Tensor, torch.Tensor, nn.Module], torch.Tensor]] = {
    "zero_negative": _zero_negative,
    "zero_positive": _zero_positive,
    "relu_positive": _relu_positive,
    "flip_negative_post": _flip_negative_post,
    "zero_neuron": _zero_neuron,
}


class MaskedActivation(nn.Module):
    """A layer's nonlinearity with one mode applied to the neurons in ``mask`` (last dimension) only.

    Args:
        base: the original nonlinearity module, called for every neuron.
        mask: bool ``[n_neurons]``, True for the neurons to change.
        mode: one of :data:`MODES`.
    """

    def __init__(self, base: nn.Module, mask: torch.Tensor, mode: str) -> None:
        super().__init__()
        self.base = base
        self.mode = check_mode(mode)
        self.register_buffer("mask", mask.to(torch.bool), persistent=False)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the mode to the masked neurons and the base nonlinearity to the rest."""
        if not torch.compiler.is_compiling():  # counted in eager runs only: a compiled graph would guard on it
            self.calls += 1
        if x.shape[-1] != self.mask.shape[0]:
            raise NegmonitorError(f"the ablation mask has {self.mask.shape[0]} neurons but the activation got "
                                  f"{x.shape[-1]} — the selection was built for a different model")
        return MODES[self.mode](x, self.mask.to(x.device), self.base)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, neurons={int(self.mask.sum())}/{self.mask.numel()}"


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is a known intervention, else raise a one-line error listing the modes."""
    if mode not in MODES:
        raise NegmonitorError(f"unknown ablation mode {mode!r} — use one of {', '.join(MODES)}")
    return mode


@contextlib.contextmanager
def ablate(
    model: nn.Module,
    selection: Mapping[int, torch.Tensor | Sequence[int]],
    mode: str = "zero_negative",
) -> Iterator[nn.Module]:
    """Apply ``mode`` to the selected neurons while the block runs; restore the model exactly on exit.

    Args:
        model: a model with a registered adapter (see :mod:`negmonitor.adapters`), or its ``torch.compile`` wrapper.
        selection: layer → neuron indices (a LongTensor or list); a :class:`~negmonitor.selection.Selection` works
            too. Layers with no neurons are left alone.
        mode: one of ``zero_negative``, ``zero_positive``, ``relu_positive``, ``flip_negative_post``,
            ``zero_neuron``.

    Raises:
        NegmonitorError: unknown mode, a layer out of range, or a neuron index out of range.
        AblationBypassed: on leaving, a layer whose projection ran inside the block while its activation module
            never did (a fused MLP kernel, such as Liger's, computes the nonlinearity itself: the ablation changed
            nothing there).
    """
    check_mode(mode)
    masks = neuron_masks(model, selection)
    installed: list[tuple[MLPSite, nn.Module, MaskedActivation]] = []
    projection_calls: dict[int, int] = {}
    hooks = []
    try:
        for site, mask in masks:
            original = site.activation
            masked = MaskedActivation(original, mask, mode)
            setattr(site.act_owner, site.act_attr, masked)
            installed.append((site, original, masked))
            hooks.append(site.projection.register_forward_hook(_counter(projection_calls, site.layer)))
        yield model
    finally:
        for hook in hooks:
            hook.remove()
        for site, original, _ in reversed(installed):
            setattr(site.act_owner, site.act_attr, original)
    bypassed = [site.path for site, _, masked in installed if projection_calls.get(site.layer) and not masked.calls]
    if bypassed:
        raise AblationBypassed(f"the ablation changed nothing: {bypassed[0]} ran but its layer never called its "
                               "activation module (a fused MLP kernel computes the nonlinearity itself, e.g. Liger's: "
                               "use_liger_kernel=True) — run ablations without the fused kernel")


def _counter(calls: dict[int, int], layer: int) -> Callable[..., None]:
    def count(module: nn.Module, args: object, output: object) -> None:
        if not torch.compiler.is_compiling():  # as MaskedActivation counts: a compiled run leaves both at 0
            calls[layer] = calls.get(layer, 0) + 1

    return count


def neuron_masks(
    model: nn.Module, selection: Mapping[int, torch.Tensor | Sequence[int]]
) -> list[tuple[MLPSite, torch.Tensor]]:
    """Check a selection against the model and turn it into one bool mask per site (layers merged, empty skipped)."""
    if not selection:
        return []
    sites = find_sites(getattr(model, "_orig_mod", model))  # the eager module behind torch.compile
    masks: dict[int, torch.Tensor] = {}
    for layer, neurons in selection.items():
        index = normalise_layers([int(layer)], len(sites))[0]
        site = sites[index]
        if index not in masks:
            masks[index] = torch.zeros(site.n_neurons, dtype=torch.bool, device=site.projection.weight.device)
        masks[index][_indices(neurons, site).to(masks[index].device)] = True
    return [(sites[i], m) for i, m in sorted(masks.items()) if bool(m.any())]


def _indices(neurons: torch.Tensor | Sequence[int], site: MLPSite) -> torch.Tensor:
    """Neuron indices as a LongTensor, checked against the layer's width."""
    index = torch.as_tensor(neurons if not isinstance(neurons, torch.Tensor) else neurons.detach().cpu(),
                            dtype=torch.long).reshape(-1)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= site.n_neurons):
        bad = int(index.min()) if int(index.min()) < 0 else int(index.max())
        raise NegmonitorError(f"neuron index {bad} is out of range for layer {site.layer}, which has "
                              f"{site.n_neurons} neurons — use 0..{site.n_neurons - 1}")
    return index
