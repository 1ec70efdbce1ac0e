"""Load a model and its tokenizer from a hub id, a local folder or a Lightning ``.ckpt``, with clear errors.

Decoder LMs load as ``AutoModelForCausalLM``; encoder-only checkpoints (BERT-style, no LM head) fall back to
``AutoModel``. ``revision=`` goes straight to ``from_pretrained``, so Pythia's ``step1000``-style revisions, a
local hub cache (``HF_HUB_OFFLINE=1``) and ``save_pretrained`` folders all take the same path. A ``.ckpt`` file is
rebuilt by :mod:`negmonitor.checkpoints` (no code from the file runs), with the tokenizer found beside it or in its
run folder, else the one given.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from negmonitor.adapters import is_decoder_config
from negmonitor.errors import NegmonitorError, first_line

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Map ``"bf16"``/``"fp16"``/``"fp32"`` (or a torch dtype, or None) to a torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise NegmonitorError(f"unknown dtype {dtype!r} — use one of fp32, fp16, bf16")
    return DTYPES[dtype]


def parse_device(device: str | torch.device | None) -> torch.device:
    """Check a device string early, so a wrong ``--device`` fails in the first second."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise NegmonitorError(f"unknown device {device!r} — use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NegmonitorError(f"device {device!r} asked for but CUDA is not available here — use --device cpu")
    return dev


def placement(dtype: torch.dtype | None, device: torch.device) -> dict:
    """``from_pretrained`` keywords that load the weights in ``dtype`` (``None``: the dtype they were saved in, on
    every supported transformers) straight onto ``device``: a 12B checkpoint bound for the GPU is never first built
    whole in host memory (24 GB in fp16) and then copied."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # device_map names one GPU
    return {"dtype": dtype if dtype is not None else "auto", "device_map": {"": device}}


def empty_model(model_id: str | os.PathLike, revision: str | None = None, dtype: str | torch.dtype | None = None,
                device: str | torch.device | None = None, cache_dir: str | None = None) -> nn.Module | None:
    """The model :func:`load_model` would load, on the meta device (no weights, no memory), in the dtype it would
    load in: to check a memory budget in the first second rather than after a 32 GB load. ``None`` when the config
    cannot be read on its own (a Lightning ``.ckpt``, a missing id: :func:`load_model` says why)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from negmonitor.checkpoints import is_lightning_checkpoint

    if is_lightning_checkpoint(str(model_id)):
        return None
    try:
        config = AutoConfig.from_pretrained(str(model_id), revision=revision, cache_dir=cache_dir)
    except Exception:  # noqa: BLE001 - load_model reports it in one line
        return None
    chosen = parse_dtype(dtype)
    if chosen is None:
        saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        saved = getattr(torch, saved, None) if isinstance(saved, str) else saved
        on_cpu = parse_device(device).type == "cpu"
        chosen = torch.float32 if on_cpu or not isinstance(saved, torch.dtype) else saved
    cls = AutoModelForCausalLM if is_decoder_config(config) else AutoModel
    try:
        with torch.device("meta"), quiet_transformers():
            return cls.from_config(config, dtype=chosen)
    except Exception:  # noqa: BLE001 - an architecture that cannot be built empty: checked after loading instead
        return None


def load_model(
    model_id: str | os.PathLike,
    revision: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> tuple[nn.Module, object]:
    """Load ``(model, tokenizer)`` in eval mode; encoder-only checkpoints load without an LM head.

    ``dtype=None`` loads fp32 on CPU (fp16 matmuls there are slow and lossy) and the checkpoint's saved dtype on a
    GPU (fp16 for Pythia), loaded straight onto ``device``.

    Args:
        model_id: hub id, ``save_pretrained`` folder, or Lightning ``.ckpt`` file.
        tokenizer: tokenizer folder or hub id, used when the model has none of its own (default: the model's).

    Raises:
        NegmonitorError: the id or folder does not exist, the revision does not exist, or nothing loads.
    """
    from transformers import AutoConfig

    from negmonitor.checkpoints import find_tokenizer_folder, is_lightning_checkpoint, load_lightning_model

    torch_dtype = parse_dtype(dtype)
    dev = parse_device(device)
    if torch_dtype is None and dev.type == "cpu":
        torch_dtype = torch.float32
    name = str(model_id)
    check_revision_applies(name, revision)
    if is_lightning_checkpoint(name):
        model = load_lightning_model(name, dtype=torch_dtype, device=dev)
        found = tokenizer or find_tokenizer_folder(name)
        if found is None:
            raise NegmonitorError(f"no tokenizer found beside checkpoint {name} or in its run folder — pass "
                                  "--tokenizer PATH (a tokenizer folder or hub id)")
        return model, _tokenizer(str(found), {}, name)
    kwargs = {"revision": revision, "cache_dir": cache_dir}
    try:
        config = AutoConfig.from_pretrained(name, **kwargs)
    except Exception as exc:  # transformers raises OSError/ValueError/HF errors with long texts
        raise _load_error(name, revision, exc) from exc
    with quiet_transformers():
        model = _weights(name, config, placement(torch_dtype, dev), revision, kwargs)
    loaded = load_tokenizer(name, revision, tokenizer, cache_dir)
    model.eval()
    return model, loaded


def load_tokenizer(model_id: str | os.PathLike, revision: str | None = None, tokenizer: str | None = None,
                   cache_dir: str | None = None) -> object:
    """The tokenizer :func:`load_model` returns for a hub id or ``save_pretrained`` folder (``tokenizer``: a folder
    or hub id to use instead), on its own: a command builds its probe text before a 16–24 GB model loads.

    Raises:
        NegmonitorError: no loadable tokenizer, or one that turns text into no tokens.
    """
    name = str(model_id)
    check_revision_applies(name, revision)
    if tokenizer:
        return _tokenizer(str(tokenizer), {}, name)
    return _tokenizer(name, {"revision": revision, "cache_dir": cache_dir}, name)


def check_revision_applies(name: str, revision: str | None) -> None:
    """Refuse a revision beside a local folder or checkpoint file: transformers ignores it there, and the results
    would be labelled with a revision whose weights never loaded (a Pythia folder is usually step143000)."""
    from negmonitor.checkpoints import is_lightning_checkpoint

    if not revision:
        return
    if is_lightning_checkpoint(name):
        raise NegmonitorError(f"--revision {revision!r} does not apply to a checkpoint file — leave it out")
    if Path(name).expanduser().is_dir():
        raise NegmonitorError(f"--revision {revision!r} applies to hub ids, and {name} is a local folder (its own "
                              "weights would load under that label) — leave --revision out, or pass the hub id")


def _weights(name: str, config: object, placed: dict, revision: str | None, kwargs: dict) -> nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM

    if is_decoder_config(config):  # an encoder (BERT) goes straight to the bare model: one copy on the device
        try:
            return AutoModelForCausalLM.from_pretrained(name, **placed, **kwargs)
        except ValueError:
            pass  # no causal LM class for this config: the bare model
        except Exception as exc:
            raise _load_error(name, revision, exc) from exc
    try:
        return AutoModel.from_pretrained(name, **placed, **kwargs)
    except Exception as exc:
        raise _load_error(name, revision, exc) from exc


def _tokenizer(source: str, kwargs: dict, model_name: str) -> object:
    from transformers import AutoTokenizer

    try:
        loaded = AutoTokenizer.from_pretrained(_tokenizer_folder(source), **kwargs)
    except Exception as exc:
        if source != model_name:
            raise NegmonitorError(f"could not load tokenizer {source!r} ({first_line(exc)}) — pass a tokenizer folder "
                                  "(tokenizer.save_pretrained) or a hub id") from exc
        raise NegmonitorError(f"model {model_name!r} has no loadable tokenizer ({first_line(exc)}) — pass --tokenizer "
                              "PATH, or save one beside it with tokenizer.save_pretrained(folder)") from exc
    if not loaded("a b c", add_special_tokens=False)["input_ids"]:
        # a folder holding a model without its tokenizer files: transformers builds an empty one from the config
        # (GPT-NeoX's), which turns every text into no tokens
        what = f"tokenizer {source!r}" if source != model_name else f"the tokenizer of {model_name!r}"
        raise NegmonitorError(f"{what} turns text into no tokens (no tokenizer files: transformers built an empty one "
                              "from the config) — pass --tokenizer PATH, or save one beside the model with "
                              "tokenizer.save_pretrained(folder)")
    return loaded


def _tokenizer_folder(name: str) -> str:
    """``name``, or its parent folder when ``name`` is a local folder without tokenizer files and the parent has
    them (a series of step folders shares one tokenizer beside them); without this transformers builds an empty
    tokenizer from the config alone, which turns every text into no tokens."""
    from negmonitor.checkpoints import has_tokenizer

    path = Path(name)
    return str(path.parent) if path.is_dir() and not has_tokenizer(path) and has_tokenizer(path.parent) else name


def _load_error(name: str, revision: str | None, exc: Exception) -> NegmonitorError:
    text = str(exc)
    local = Path(name).exists()
    if revision and ("revision" in text.lower() or "not a valid git identifier" in text.lower()
                     or type(exc).__name__ in {"RevisionNotFoundError"}):
        return NegmonitorError(f"revision {revision!r} of {name!r} does not exist — check the name "
                               "(Pythia: step0, step1, …, step143000)")
    if "gated repo" in text.lower() or type(exc).__name__ == "GatedRepoError":
        return NegmonitorError(f"{name!r} is gated on the hub — accept its licence on its hub page, then log in "
                               "(hf auth login, or set HF_TOKEN)")
    if not local and ("/" not in name or name.startswith((".", "/", "~"))):
        return NegmonitorError(f"model {name!r} is not a folder here nor a hub id — pass a save_pretrained "
                               "folder or an id like EleutherAI/pythia-70m")
    if local:
        return NegmonitorError(f"could not load a model from folder {name!r} ({first_line(exc)}) — it needs "
                               "config.json and weights written by save_pretrained")
    where = f" at revision {revision!r}" if revision else ""
    return NegmonitorError(f"could not load {name!r}{where} ({first_line(exc)}) — check the id, the revision, "
                           "and your network or HF_HUB_OFFLINE cache")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence ``transformers``' per-load progress bars (noise next to negmonitor's own bars) but keep the hub's
    download bars (a 24 GB checkpoint downloads for minutes: without them a replay looks hung); restore after."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    hub_enabled = not are_progress_bars_disabled()
    logging.disable_progress_bar()  # also turns the hub's bars off
    if hub_enabled:
        enable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()
        if not hub_enabled:
            disable_progress_bars()
