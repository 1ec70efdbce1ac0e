"""negmonitor: watch the negative pre-activations of a language model's MLP neurons while it trains.

Main entry points::

    negmonitor.probe(model, probe_set)                  # one model, one pass: WD, MD, pair signs per neuron
    negmonitor.ProbeSet.build(source, tokenizer)         # fixed probe windows from a dataset id, file or strings
    negmonitor.callbacks.NegativeDifferentiationMonitor  # the Lightning callback
    negmonitor.register_adapter(...)                     # teach negmonitor a new model family
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "MLPSite": "negmonitor.adapters", "find_sites": "negmonitor.adapters", "register_adapter": "negmonitor.adapters",
    "NegmonitorError": "negmonitor.errors", "ProbeSettings": "negmonitor.probing", "probe": "negmonitor.probing",
    "ProbeSet": "negmonitor.probeset", "ProbeResult": "negmonitor.result", "load_model": "negmonitor.models",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    """Import public names on first use, so ``negmonitor --help`` starts fast."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'negmonitor' has no attribute {name!r}")
