"""Rebuild the transformers model inside a Lightning ``.ckpt`` file, and find the tokenizer that goes with it.

A Lightning checkpoint holds a LightningModule's ``state_dict`` and hyper-parameters, not a transformers model. The
model is rebuilt without running any code from the file (``torch.load(weights_only=True)``) and without importing
the user's LightningModule:

1. hyper-parameters of ``negmonitor train``'s :class:`~negmonitor.train.module.CausalLMModule` rebuild it directly;
2. otherwise a transformers config is looked for: a config dict (with ``model_type``) or a model id/folder
   (``model_name_or_path``, ``pretrained_model_name_or_path``, ``model_name``, ``model_id``, ``model``) in the
   hyper-parameters, else a ``config.json`` beside the checkpoint or in its run folder (``final_model/``);
3. the model's weights are the ``state_dict`` entries under one prefix (``model.``, ``net.``, ...): the prefix
   whose remainder names the model's own parameters.

The tokenizer is looked for beside the checkpoint, in the folders above it (up to the run folder) and in their
``final_model/`` and ``tokenizer/`` sub-folders.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from negmonitor.adapters import is_decoder_config
from negmonitor.errors import NegmonitorError, first_line

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
MODEL_ID_KEYS = ("model_name_or_path", "pretrained_model_name_or_path", "model_name", "model_id", "model")
FINAL_MODEL_DIR = "final_model"
_SEARCH_DEPTH = 3  # the .ckpt's folder and up to three above it: runs/NAME/version_0/checkpoints/x.ckpt


def is_lightning_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Lightning checkpoint file (``*.ckpt``)."""
    path = Path(path).expanduser()
    return path.suffix == ".ckpt" and path.is_file()


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint's contents, loaded without running code from the file (tensors memory-mapped).

    Raises:
        NegmonitorError: the file cannot be read or holds more than tensors and plain containers.
    """
    path = Path(path).expanduser()
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise NegmonitorError(f"could not read checkpoint {path} ({first_line(exc)}) — it must be a Lightning .ckpt "
                              "holding tensors and plain values (weights_only loading)") from exc


def load_lightning_model(path: str | os.PathLike, dtype: torch.dtype | None = None,
                         device: torch.device | str | None = None) -> nn.Module:
    """The transformers model held by the LightningModule saved in ``path``, in eval mode.

    Raises:
        NegmonitorError: unreadable file, no way to tell the model's architecture, or weights that do not fit it.
    """
    path = Path(path).expanduser()
    checkpoint = read_checkpoint(path)
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict) or not state:
        raise NegmonitorError(f"checkpoint {path} has no state_dict — it is not a Lightning checkpoint")
    if any(".lora_A." in key or ".base_layer." in key for key in state):
        raise NegmonitorError(f"checkpoint {path} holds a LoRA (peft) model, whose adapters negmonitor does not fold "
                              "in from a checkpoint — merge them (model.merge_and_unload()), save_pretrained the "
                              "merged model and point negmonitor at that folder")
    hparams = {k: v for k, v in dict(checkpoint.get("hyper_parameters") or {}).items() if not str(k).startswith("_")}
    from accelerate import init_empty_weights

    # Parameters on the meta device (no random fp32 model on the host: 32 GB for an 8B model); the saved tensors are
    # then put in their place one at a time, in the saved dtype unless ``dtype`` is given, straight onto ``device``.
    with init_empty_weights(include_buffers=False):
        model = _build_empty_model(path, hparams)
    _load_weights(model, state, path, dtype, torch.device(device or "cpu"))
    return model.to(device or "cpu").eval()


def _build_empty_model(path: Path, hparams: dict) -> nn.Module:
    if _is_causal_lm_module(hparams):
        from negmonitor.train.module import CausalLMModule

        return CausalLMModule(**hparams).model
    config = _config_from_hparams(hparams) or _config_beside(path)
    if config is None:
        raise NegmonitorError(f"cannot tell which transformers model checkpoint {path} holds — put its config.json "
                              f"(model.config.save_pretrained) beside the checkpoint or in {FINAL_MODEL_DIR}/ of "
                              "the run folder, or save the model id as the hyper-parameter 'model_name_or_path'")
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if is_decoder_config(config) else AutoModel
    return cls.from_config(config)


def _is_causal_lm_module(hparams: dict) -> bool:
    from negmonitor.train.module import FAMILIES

    needed = {"family", "hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size"}
    return needed <= set(hparams) and hparams["family"] in FAMILIES and hparams["vocab_size"] is not None


def _config_from_hparams(hparams: dict) -> Any:
    from transformers import AutoConfig

    for value in hparams.values():
        if isinstance(value, dict) and "model_type" in value:
            config = dict(value)
            return AutoConfig.for_model(config.pop("model_type"), **config)
    for key in MODEL_ID_KEYS:
        value = hparams.get(key)
        if isinstance(value, str) and value:
            try:
                return AutoConfig.from_pretrained(value)
            except Exception:  # noqa: BLE001 - not loadable here (offline, a name of something else): look further
                continue
    return None


def _config_beside(path: Path) -> Any:
    from transformers import AutoConfig

    for folder in _search_folders(path):
        if (folder / "config.json").is_file():
            try:
                return AutoConfig.from_pretrained(str(folder))
            except Exception:  # noqa: BLE001 - some other config.json: look further up
                continue
    return None


def _load_weights(model: nn.Module, state: dict, path: Path, dtype: torch.dtype | None = None,
                  device: torch.device | None = None) -> None:
    """Put the entries of ``state`` under the one prefix whose remainders are the model's own keys in place of the
    model's (empty) parameters: floating-point parameters in ``dtype`` (default: as saved), all on ``device``."""
    own = set(model.state_dict())
    counts: dict[str, int] = {}
    for key in state:
        parts = key.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in own:
                prefix = ".".join(parts[:i])
                counts[prefix] = counts.get(prefix, 0) + 1
                break
    if not counts:
        raise NegmonitorError(f"the weights in {path} do not fit the model built for it — the config beside it "
                              "is not the trained model's")
    prefix = max(counts, key=counts.get)
    cut = len(prefix) + 1 if prefix else 0
    parameters = dict(model.named_parameters(remove_duplicate=False))
    weights = {}
    for key, value in state.items():
        name = key[cut:]
        if (key.startswith(prefix + ".") or not prefix) and name in own:
            cast = dtype if dtype is not None and name in parameters and value.is_floating_point() else None
            weights[name] = value.to(device=device, dtype=cast)
    try:
        missing, _ = model.load_state_dict(weights, strict=False, assign=True)
    except RuntimeError as exc:
        raise NegmonitorError(f"the weights in {path} do not fit the model built for it ({first_line(exc)}) — "
                              "check the config beside it") from exc
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # tied embeddings (loaded as two copies) are one tensor again, as trained
    loaded = dict(model.named_parameters(remove_duplicate=False))
    missing = [k for k in missing if k in loaded and loaded[k].is_meta]
    if missing:
        raise NegmonitorError(f"checkpoint {path} lacks {len(missing)} of the model's weights (e.g. {missing[0]}) — "
                              "the config beside it is not the trained model's")


def has_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds a saved tokenizer (any of :data:`TOKENIZER_FILES`)."""
    folder = Path(folder)
    return folder.is_dir() and any((folder / name).is_file() for name in TOKENIZER_FILES)


def find_tokenizer_folder(path: str | os.PathLike) -> Path | None:
    """A folder with tokenizer files beside ``path`` or in its run folder (``final_model/``, ``tokenizer/``)."""
    for folder in _search_folders(Path(path).expanduser()):
        if has_tokenizer(folder):
            return folder
    return None


def _search_folders(path: Path) -> list[Path]:
    start = path if path.is_dir() else path.parent
    folders = []
    for folder in [start, *list(start.parents)[:_SEARCH_DEPTH]]:
        folders += [folder, folder / FINAL_MODEL_DIR, folder / "tokenizer"]
    return folders
