"""A measurement calls no op that ``torch.use_deterministic_algorithms(True)`` refuses on CUDA tensors.

``Trainer(deterministic=True)`` turns that mode on, and a refused op raises a ``RuntimeError`` in every
measurement on a GPU. The CPU has its own fast paths (numpy sorts, host reads, filled bins only); the tests
switch them off, so the code that runs on GPUs runs here, and record every aten op it calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from negmonitor.metrics import _median, mapping, streaming, wasserstein
from negmonitor.metrics.wasserstein import w1_rows_to_gaussian
from negmonitor.monitoring.engine import MonitorSettings, MonitorState, take_measurement
from negmonitor.probeset import ProbeSet
from tiny_models import tiny_causal_lm, tiny_tokenizer

# The CPU-only fast paths, by module: False runs the code that runs on GPUs.
CPU_ONLY_FLAGS = (
    (streaming, "_COMPACT_ON_CPU"),
    (streaming, "_PLAIN_BLOCKS_ON_CPU"),
    (wasserstein, "_PICK_ON_CPU"),
    (wasserstein, "_RUNNING_SUMS_ON_CPU"),
    (_median, "_NUMPY_ON_CPU"),
    (mapping, "_HOST_READS_ON_CPU"),
)


def _dtypes(args: tuple, out: Any) -> list[torch.dtype]:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    tensors += [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
    return [t.dtype for t in tensors]


def _inexact(args: tuple, kwargs: dict, out: Any) -> bool:
    return any(d.is_floating_point or d.is_complex for d in _dtypes(args, out))


def _weighted(args: tuple, kwargs: dict, out: Any) -> bool:
    weights = kwargs.get("weights", args[1] if len(args) > 1 else None)
    return weights is not None


def _prod(args: tuple, kwargs: dict, out: Any) -> bool:
    return kwargs.get("reduce", args[4] if len(args) > 4 else None) == "prod"  # (self, dim, index, src, reduce)


def _reduced(args: tuple, kwargs: dict, out: Any) -> bool:
    return kwargs.get("reduction", args[3] if len(args) > 3 else 1) != 0  # (self, target, weight, reduction, ...)


def _with_indices(args: tuple, kwargs: dict, out: Any) -> bool:
    return isinstance(out, tuple)  # (values, indices): a reduction along a dim


def _always(args: tuple, kwargs: dict, out: Any) -> bool:
    return True


# Forward ops that raise under the mode on a CUDA tensor (the docstring of torch.use_deterministic_algorithms,
# torch 2.13), by op, with the condition under which they raise, narrowed or widened where ATen's CUDA kernels
# say otherwise: kthvalue is not in the docstring but raises ("kthvalue CUDA" in Sorting.cpp); NLLLoss raises in
# its 2-D forward with a reduction only. A measurement runs under no_grad, so the ops that raise only when
# differentiated do not apply.
REFUSED_ON_CUDA: dict[str, Callable[[tuple, dict, Any], bool]] = {
    "aten::bincount": _weighted,  # torch.bincount with weights
    "aten::cumsum": _inexact,  # torch.cumsum of a floating-point or complex tensor
    "aten::cumsum_": _inexact,
    "aten::histc": _always,
    "aten::median": _with_indices,  # torch.median with the indices output
    "aten::nanmedian": _with_indices,
    "aten::kthvalue": _always,
    "aten::put_": _always,  # accumulate=False anywhere, accumulate=True on CUDA
    "aten::put": _always,
    "aten::scatter_reduce": _prod,
    "aten::scatter_reduce_": _prod,
    "aten::nll_loss2d_forward": _reduced,  # torch.nn.NLLLoss of [N, C, H, W] (ATen: the 1-D forward is allowed)
    "aten::max_unpool2d": _always,  # torch.nn.MaxUnpool1d/2d
    "aten::max_unpool3d": _always,
}


class RefusedOps(TorchDispatchMode):
    """Records every call (``name.overload[dtypes]``) of an op in :data:`REFUSED_ON_CUDA` whose condition
    holds."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket._qualified_op_name
        refused = REFUSED_ON_CUDA.get(name)
        if refused is not None and refused(args, kwargs, out):
            self.calls.append(f"{name}.{func._overloadname}{_dtypes(args, out)}")
        return out


@pytest.fixture
def device_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switch every CPU-only fast path off (a flag that is gone fails here rather than passing unseen)."""
    for module, flag in CPU_ONLY_FLAGS:
        monkeypatch.setattr(module, flag, False)


def test_the_recorder_sees_refused_ops() -> None:
    """The check itself: each condition tells the refused call from the allowed one next to it."""
    x, i = torch.rand(8, dtype=torch.float64), torch.tensor([0, 2, 2, 1])
    with RefusedOps() as rec:
        torch.bincount(i)
        torch.arange(4).cumsum(0)
        torch.median(x)
        torch.zeros(3).scatter_reduce_(0, i[:3], x[:3].float(), "sum")
    assert rec.calls == []
    with RefusedOps() as rec:
        torch.bincount(i, weights=x[:4])
        x.cumsum(0)
        torch.median(x.view(2, 4), dim=1)
        torch.kthvalue(x, 2)
        torch.zeros(3).scatter_reduce_(0, i[:3], x[:3].float(), "prod")
    assert [c.split(".")[0].split("[")[0] for c in rec.calls] == [
        "aten::bincount", "aten::cumsum", "aten::median", "aten::kthvalue", "aten::scatter_reduce_"]


def _two_measurements(model: torch.nn.Module, probe_set: ProbeSet, tokenizer: object) -> list:
    """A live monitor's first two measurements: probe pass, cohort, then weight drift against the first."""
    settings, state = MonitorSettings(drift_dtype=torch.float32), MonitorState()
    first = take_measurement(model, probe_set, 0, settings, state, tokenizer)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.01).add_(0.001)
    second = take_measurement(model, probe_set, 10, settings, state, tokenizer)
    return [first, second]


def test_measurement_calls_no_op_refused_in_deterministic_mode(device_paths) -> None:
    """Every statistic (WD and its split, moments, MD, OI, pair signs, cohort, drift) on the GPU code path."""
    tokenizer = tiny_tokenizer()
    probe_set = ProbeSet.build(["the cat sees the dogs and a dog sees the cats ."] * 200, tokenizer,
                               n_tokens=2_048, window=64, n_pairs=200)
    with RefusedOps() as rec:
        measurements = _two_measurements(tiny_causal_lm("neox"), probe_set, tokenizer)
    assert rec.calls == []
    neurons = measurements[1].neurons
    assert neurons.wd.notna().all() and neurons.md.notna().any() and neurons.drift_l2.notna().all()
    shares = measurements[1].result.layers[["nn_share", "pn_share", "pp_share"]].sum(axis=1)
    assert ((shares - 1.0).abs() < 1e-9).all()


def test_device_path_measurement_equals_the_cpu_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The replacements give the CPU paths' numbers: every per-neuron column, to fp64 rounding."""
    tokenizer = tiny_tokenizer()
    probe_set = ProbeSet.build(["the cat sees the dogs and a dog sees the cats ."] * 200, tokenizer,
                               n_tokens=2_048, window=64, n_pairs=200)
    want = _two_measurements(tiny_causal_lm("llama"), probe_set, tokenizer)[1]
    for module, flag in CPU_ONLY_FLAGS:
        monkeypatch.setattr(module, flag, False)
    got = _two_measurements(tiny_causal_lm("llama"), probe_set, tokenizer)[1]
    numeric = [c for c in want.neurons.columns if want.neurons[c].dtype.kind in "fiu"]
    assert {"wd", "wd_neg", "md", "drift_l2"} <= set(numeric)
    for column in numeric:
        torch.testing.assert_close(torch.tensor(got.neurons[column].to_numpy()),
                                   torch.tensor(want.neurons[column].to_numpy()),
                                   rtol=1e-9, atol=1e-12, equal_nan=True, msg=column)
    for share in ("nn_share", "pn_share", "pp_share"):
        assert got.result.layers[share].tolist() == want.result.layers[share].tolist()


@pytest.mark.parametrize("lengths", [[5, 5, 5, 5], [1, 7, 3, 9]])
def test_row_sums_off_cpu_equal_the_running_sums(lengths: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """W1 of rows of equal and of different lengths: the sums without a floating-point cumsum equal the
    running sums' differences (the CPU path) to fp64 rounding."""
    gen = torch.Generator().manual_seed(0)
    lens = torch.tensor(lengths)
    z = torch.cat([torch.randn(n, generator=gen, dtype=torch.float64).sort().values for n in lengths])
    after = torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n for n in lengths])
    level = torch.rand(len(lengths), generator=gen, dtype=torch.float64)
    want = w1_rows_to_gaussian(z, after, lens, level)
    width = lengths[0] if len(set(lengths)) == 1 else None
    monkeypatch.setattr(wasserstein, "_RUNNING_SUMS_ON_CPU", False)
    monkeypatch.setattr(wasserstein, "_PICK_ON_CPU", False)
    with RefusedOps() as rec:
        got = w1_rows_to_gaussian(z, after, lens, level, width=width)
    assert rec.calls == []
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
    assert all(math.isfinite(v) and v > 0 for v in got[0].tolist())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measurement_on_cuda_in_deterministic_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real thing: a measurement on a GPU under the mode Trainer(deterministic=True) turns on."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # as Lightning sets it: deterministic cuBLAS
    tokenizer = tiny_tokenizer()
    probe_set = ProbeSet.build(["the cat sees the dogs and a dog sees the cats ."] * 200, tokenizer,
                               n_tokens=2_048, window=64, n_pairs=200)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    try:
        measurements = _two_measurements(tiny_causal_lm("neox").cuda(), probe_set, tokenizer)
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    assert measurements[1].neurons.wd.notna().all()
