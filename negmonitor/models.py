"""Load a model and its tokenizer from a hub id or a local folder, with clear errors.

Decoder LMs load as ``AutoModelForCausalLM``; encoder-only checkpoints (BERT-style, no LM head) fall back to
``AutoModel``. ``revision=`` goes straight to ``from_pretrained``, so Pythia's ``step1000``-style revisions, a
local hub cache (``HF_HUB_OFFLINE=1``) and ``save_pretrained`` folders all take the same path.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from negmonitor.errors import NegmonitorError

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


def load_model(
    model_id: str | os.PathLike,
    revision: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | None = None,
) -> tuple[nn.Module, object]:
    """Load ``(model, tokenizer)`` in eval mode; encoder-only checkpoints load without an LM head.

    ``dtype=None`` loads fp32 on CPU (fp16 matmuls there are slow and lossy) and the checkpoint's saved dtype on a
    GPU (transformers >= 5 loads the saved dtype, fp16 for Pythia).

    Raises:
        NegmonitorError: the id or folder does not exist, the revision does not exist, or nothing loads.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    dev = parse_device(device)
    if torch_dtype is None and dev.type == "cpu":
        torch_dtype = torch.float32
    name = str(model_id)
    kwargs = {"revision": revision, "cache_dir": cache_dir}
    try:
        config = AutoConfig.from_pretrained(name, **kwargs)
    except Exception as exc:  # transformers raises OSError/ValueError/HF errors with long texts
        raise _load_error(name, revision, exc) from exc
    model = None
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, **kwargs)
    except ValueError:
        model = None  # not a causal LM (e.g. BERT): fall back to the bare encoder
    except Exception as exc:
        raise _load_error(name, revision, exc) from exc
    if model is None or not _is_decoder(config):
        try:
            model = AutoModel.from_pretrained(name, dtype=torch_dtype, **kwargs)
        except Exception as exc:
            raise _load_error(name, revision, exc) from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(_tokenizer_folder(name), **kwargs)
    except Exception as exc:
        raise NegmonitorError(f"model {name!r} has no loadable tokenizer ({_short(exc)}) — save one beside it "
                              "with tokenizer.save_pretrained(folder)") from exc
    model.to(dev).eval()
    return model, tokenizer


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _tokenizer_folder(name: str) -> str:
    """``name``, or its parent folder when ``name`` is a local folder without tokenizer files and the parent has
    them (a series of step folders shares one tokenizer beside them); without this transformers builds an empty
    tokenizer from the config alone, which turns every text into no tokens."""
    path = Path(name)
    has = lambda folder: any((folder / f).is_file() for f in _TOKENIZER_FILES)  # noqa: E731
    return str(path.parent) if path.is_dir() and not has(path) and has(path.parent) else name


def _is_decoder(config: object) -> bool:
    model_type = getattr(config, "model_type", "")
    return model_type not in {"bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "deberta"}


def _load_error(name: str, revision: str | None, exc: Exception) -> NegmonitorError:
    text = str(exc)
    local = Path(name).exists()
    if revision and ("revision" in text.lower() or "not a valid git identifier" in text.lower()
                     or type(exc).__name__ in {"RevisionNotFoundError"}):
        return NegmonitorError(f"revision {revision!r} of {name!r} does not exist — check the name "
                               "(Pythia: step0, step1, …, step143000)")
    if not local and ("/" not in name or name.startswith((".", "/", "~"))):
        return NegmonitorError(f"model {name!r} is not a folder here nor a hub id — pass a save_pretrained "
                               "folder or an id like EleutherAI/pythia-70m")
    if local:
        return NegmonitorError(f"could not load a model from folder {name!r} ({_short(exc)}) — it needs "
                               "config.json and weights written by save_pretrained")
    where = f" at revision {revision!r}" if revision else ""
    return NegmonitorError(f"could not load {name!r}{where} ({_short(exc)}) — check the id, the revision, "
                           "and your network or HF_HUB_OFFLINE cache")


def _short(exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return first[:200]
