"""Where a checkpoint series comes from: hub revisions, a folder of step folders, or Lightning checkpoints.

A :class:`Series` lists its revisions (``step<N>`` names), says which exist, and loads one checkpoint at a time:

- :class:`HubSeries`: ``from_pretrained(id, revision=...)`` (Pythia and any hub repo with ``step<N>`` branches);
  works offline from a hub cache (``HF_HUB_OFFLINE=1``) through the same call.
- :class:`StepDirSeries`: a folder of ``save_pretrained`` folders named by step (``1000``, ``step1000``,
  ``step-1000``, ``checkpoint-1000``).
- :class:`LightningSeries`: a folder of ``.ckpt`` files written by Lightning (e.g. ``ModelCheckpoint``), or one
  file; the step is the checkpoint's ``global_step``; the transformers model is rebuilt from the state_dict by
  :mod:`negmonitor.checkpoints` (no code from the file runs), or with ``module_cls.load_from_checkpoint`` when a
  module class is given.

:func:`open_series` picks the right one. A revision that does not exist or cannot be fetched raises
:class:`CheckpointMissing` (recorded and skipped by the replay); a wrong model id or folder raises
:class:`~negmonitor.errors.NegmonitorError` at once.
"""

from __future__ import annotations

import importlib
import os
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from negmonitor.adapters import is_decoder_config
from negmonitor.checkpoints import has_tokenizer
from negmonitor.errors import NegmonitorError, first_line
from negmonitor.models import parse_device, parse_dtype, placement, quiet_transformers
from negmonitor.replay.revisions import (PYTHIA_TOKENS_PER_STEP, is_pythia, pythia_schedule, sort_by_step, step_of,
                                         variant_of)

_STEP_DIR = re.compile(r"^(?:step|checkpoint|global_step|iter)?[-_=]?(\d+)$")
_CKPT_STEP = re.compile(r"step=(\d+)")
_MISSING_HINTS = ("couldn't connect", "could not connect", "does not appear to have", "not a valid git identifier",
                  "revision not found", "entry not found", "offline mode", "404")
class CheckpointMissing(Exception):
    """A revision that does not exist, was never uploaded, or whose files cannot be fetched (skipped, not fatal)."""


class Series:
    """A checkpoint series: its revisions, which of them exist, and a loader for one at a time."""

    name: str = ""
    variant: str = "standard"
    kind: str = ""

    def schedule(self) -> list[str]:
        """The revisions the series publishes, in step order (what presets pick from)."""
        raise NotImplementedError

    def available(self) -> set[str] | None:
        """The revisions that exist, or ``None`` when they cannot be listed (each is then tried)."""
        return set(self.schedule())

    def tokens_seen(self, revision: str) -> int:
        """Tokens seen at ``revision`` (0 when unknown)."""
        return 0

    def load(self, revision: str, dtype: torch.dtype | None, device: torch.device) -> nn.Module:
        """Load one checkpoint in eval mode; :class:`CheckpointMissing` when it is not there."""
        raise NotImplementedError

    def load_tokenizer(self, revision: str) -> Any:
        """The series' tokenizer (taken from ``revision`` where checkpoints carry one)."""
        raise NotImplementedError

    def evict(self, revision: str) -> int:
        """Free the disk a downloaded ``revision`` takes (bytes freed); a local series' files are the user's: kept."""
        return 0

    def check_explicit(self, revisions: Sequence[str]) -> None:
        """Raise a one-line error naming the available revisions when a requested one does not exist."""
        available = self.available()
        if available is None:
            return
        unknown = [r for r in revisions if r not in available]
        if unknown:
            raise NegmonitorError(f"unknown revision(s) {', '.join(unknown)} of {self.name} — available: "
                                  f"{describe_revisions(available)}")

    def describe(self) -> dict:
        """What the run records about its source."""
        return {"model": self.name, "kind": self.kind, "variant": self.variant}


class HubSeries(Series):
    """Revisions of a hub repository, loaded with ``from_pretrained(model_id, revision=...)``.

    Args:
        model_id: hub id, e.g. ``EleutherAI/pythia-160m``.
        cache_dir: hub cache folder (default: ``HF_HUB_CACHE``).
        tokens_per_step: tokens per optimizer step (default: 2,097,152 for Pythia, else unknown → 0).
    """

    kind = "hub"

    def __init__(self, model_id: str, cache_dir: str | os.PathLike | None = None,
                 tokens_per_step: int | None = None) -> None:
        self.name = str(model_id)
        self.cache_dir = str(cache_dir) if cache_dir else None
        self.variant = variant_of(self.name)
        self.tokens_per_step = tokens_per_step if tokens_per_step is not None else (
            PYTHIA_TOKENS_PER_STEP if is_pythia(self.name) else 0)
        self._available: set[str] | None = None
        self._listed = False

    def available(self) -> set[str] | None:
        """Branch and tag names: from the hub, or from ``refs/`` of the local cache when offline.

        Raises:
            NegmonitorError: the id is not on the hub (online) or not in the local cache (offline).
        """
        if not self._listed:
            self._available = self._list_refs()
            self._listed = True
        return self._available

    def schedule(self) -> list[str]:
        """Pythia's published schedule for Pythia models; the ``step<N>`` refs otherwise."""
        if is_pythia(self.name):
            return pythia_schedule()
        available = self.available()
        if available is None:
            raise NegmonitorError(f"cannot list the revisions of {self.name} — give an explicit list, e.g. "
                                  "--revisions step1000,step2000")
        return sort_by_step([r for r in available if re.fullmatch(r"step\d+", r)])

    def tokens_seen(self, revision: str) -> int:
        return step_of(revision) * int(self.tokens_per_step)

    def load(self, revision: str, dtype: torch.dtype | None, device: torch.device) -> nn.Module:
        try:
            return load_weights(self.name, revision=revision, dtype=dtype, device=device, cache_dir=self.cache_dir)
        except Exception as exc:
            if is_missing_error(exc):
                raise CheckpointMissing(first_line(exc)) from exc
            raise

    def load_tokenizer(self, revision: str) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.name, revision=revision, cache_dir=self.cache_dir)
        except Exception as exc:
            raise NegmonitorError(f"could not load the tokenizer of {self.name} at {revision} ({first_line(exc)}) "
                                  "— pass tokenizer= (--tokenizer PATH)") from exc

    def describe(self) -> dict:
        return {**super().describe(), "tokens_per_step": self.tokens_per_step, "cache_dir": self.cache_dir}

    def evict(self, revision: str) -> int:
        """Delete ``revision``'s snapshot from the hub cache, with the files no other cached revision shares (what
        ``huggingface-cli delete-cache`` does), and so every other ref to the same commit (``main`` for Pythia's
        last step); bytes freed. A replay of Pythia-12B's 154 checkpoints downloads
        ~3.7 TB, so ``evict_cache`` removes each once it is recorded."""
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir(self.cache_dir)
        repo = next((r for r in info.repos if r.repo_id == self.name and r.repo_type == "model"), None)
        commits = [rev.commit_hash for rev in repo.revisions if revision in rev.refs or revision == rev.commit_hash] \
            if repo is not None else []
        if not commits:
            return 0
        strategy = info.delete_revisions(*commits)
        strategy.execute()
        return int(strategy.expected_freed_size)

    def _list_refs(self) -> set[str] | None:
        from huggingface_hub import constants

        if constants.is_offline_mode():
            return self._cached_refs()
        try:
            from huggingface_hub import list_repo_refs

            refs = list_repo_refs(self.name)
        except Exception as exc:  # noqa: BLE001 - hub errors come in many types
            if type(exc).__name__ == "RepositoryNotFoundError":
                raise NegmonitorError(f"model {self.name!r} does not exist on the hub (or is private) — check the "
                                      "id, e.g. EleutherAI/pythia-160m") from exc
            # Not the cached revisions only: each one not cached yet would be recorded missing untried.
            warnings.warn(f"negmonitor replay: could not list the revisions of {self.name} on the hub "
                          f"({first_line(exc)}); every revision asked for is tried", stacklevel=2)
            return None
        return {ref.name for ref in list(refs.branches) + list(refs.tags)}

    def _cached_refs(self) -> set[str]:
        from huggingface_hub import constants

        cache = Path(self.cache_dir or constants.HF_HUB_CACHE)
        repo = cache / ("models--" + self.name.replace("/", "--"))
        if not repo.is_dir():
            raise NegmonitorError(f"model {self.name!r} is not in the local hub cache {cache} and HF_HUB_OFFLINE=1 "
                                  "— check the id, download it first, or unset HF_HUB_OFFLINE")
        refs = repo / "refs"
        return {p.relative_to(refs).as_posix() for p in refs.rglob("*") if p.is_file()} if refs.is_dir() else set()


class StepDirSeries(Series):
    """A folder of ``save_pretrained`` folders named by step (``1000``, ``step1000``, ``checkpoint-1000`` …).

    Args:
        folder: the series folder.
        tokens_per_step: tokens per step (default unknown → ``tokens_seen`` 0).
    """

    kind = "step_dirs"

    def __init__(self, folder: str | os.PathLike, tokens_per_step: int | None = None) -> None:
        self.folder = Path(folder).expanduser()
        self.name = str(self.folder.resolve())
        self.variant = "local"
        self.tokens_per_step = int(tokens_per_step or 0)
        self.paths = step_folders(self.folder)
        if not self.paths:
            raise NegmonitorError(f"folder {self.folder} holds no step-named save_pretrained folders (e.g. step-1000/"
                                  "config.json) nor .ckpt files — check the path")

    def schedule(self) -> list[str]:
        return sort_by_step(self.paths)

    def tokens_seen(self, revision: str) -> int:
        return step_of(revision) * self.tokens_per_step

    def load(self, revision: str, dtype: torch.dtype | None, device: torch.device) -> nn.Module:
        if revision not in self.paths:
            raise CheckpointMissing(f"no folder for {revision} in {self.folder}")
        return load_weights(str(self.paths[revision]), dtype=dtype, device=device)

    def load_tokenizer(self, revision: str) -> Any:
        candidates = [self.paths.get(revision), self.folder, *self.paths.values()]
        folder = next((c for c in candidates if c is not None and has_tokenizer(c)), None)
        if folder is None:
            raise NegmonitorError(f"no tokenizer found in {self.folder} or its step folders — pass tokenizer= "
                                  "(--tokenizer PATH) or save one with tokenizer.save_pretrained(folder)")
        return _auto_tokenizer(folder)


class LightningSeries(Series):
    """Lightning ``.ckpt`` files of one's own run: the transformers model rebuilt from each state_dict.

    Args:
        folder: a folder searched recursively for ``*.ckpt`` (e.g. ``runs/NAME/version_0/checkpoints``), or a file.
        module_cls: a LightningModule class, or ``"package.module:Class"``, to load with its own
            ``load_from_checkpoint`` (default: none; :func:`negmonitor.checkpoints.load_lightning_model`).
        model_attr: attribute holding the transformers model (default: found automatically).
        tokens_per_step: tokens per step when the checkpoint does not record ``negmonitor_tokens_seen``.
    """

    kind = "lightning"

    def __init__(self, folder: str | os.PathLike, module_cls: Any = None, model_attr: str | None = None,
                 tokens_per_step: int | None = None) -> None:
        self.folder = Path(folder).expanduser()
        self.name = str(self.folder.resolve())
        self.variant = "local"
        self.module_cls = resolve_module_class(module_cls) if module_cls is not None else None
        self.model_attr = model_attr
        self.tokens_per_step = int(tokens_per_step or 0)
        self.paths, self._tokens = lightning_checkpoints(self.folder)
        if not self.paths:
            raise NegmonitorError(f"folder {self.folder} holds no readable .ckpt files — check the path")

    def schedule(self) -> list[str]:
        return sort_by_step(self.paths)

    def tokens_seen(self, revision: str) -> int:
        recorded = self._tokens.get(revision)
        return int(recorded) if recorded is not None else step_of(revision) * self.tokens_per_step

    def load(self, revision: str, dtype: torch.dtype | None, device: torch.device) -> nn.Module:
        from negmonitor.callbacks.monitor import find_hf_model

        if revision not in self.paths:
            raise CheckpointMissing(f"no checkpoint for {revision} in {self.folder}")
        if self.module_cls is None:  # rebuilt from the state_dict: no code from the file, no import of the module
            from negmonitor.checkpoints import load_lightning_model

            return load_lightning_model(self.paths[revision], dtype=dtype, device=device)
        module = self.module_cls.load_from_checkpoint(str(self.paths[revision]), map_location="cpu",
                                                      weights_only=False)
        model = find_hf_model(module, self.model_attr)
        if dtype is not None:
            model.to(dtype)
        return model.to(device).eval()

    def load_tokenizer(self, revision: str) -> Any:
        from negmonitor.checkpoints import find_tokenizer_folder

        found = find_tokenizer_folder(self.folder)
        if found is not None:
            return _auto_tokenizer(found)
        raise NegmonitorError(f"no tokenizer found beside the checkpoints in {self.folder} — pass tokenizer= "
                              "(--tokenizer PATH, e.g. the tokenizer folder your training used)")

    def describe(self) -> dict:
        module = (f"{self.module_cls.__module__}:{self.module_cls.__qualname__}" if self.module_cls is not None
                  else "state_dict")
        return {**super().describe(), "module": module}


def open_series(model: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                tokens_per_step: int | None = None, module_cls: Any = None,
                model_attr: str | None = None) -> Series:
    """The series behind ``model``: a local folder of ``.ckpt`` files or step folders, else a hub id.

    Raises:
        NegmonitorError: a local path that is not a series folder, or a string that is neither a path nor a hub id.
    """
    text = str(model)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".ckpt":
        return LightningSeries(path, module_cls, model_attr, tokens_per_step)
    if path.is_dir():
        if any(path.rglob("*.ckpt")):
            return LightningSeries(path, module_cls, model_attr, tokens_per_step)
        return StepDirSeries(path, tokens_per_step)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise NegmonitorError(f"model {text!r} is neither a series folder here nor a hub id — pass a folder of "
                              "step folders or .ckpt files, or an id like EleutherAI/pythia-160m")
    return HubSeries(text, cache_dir, tokens_per_step)


def step_folders(folder: Path) -> dict[str, Path]:
    """``step<N>`` → sub-folder, for sub-folders named by step that hold a ``config.json``."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for child in sorted(folder.iterdir()):
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / "config.json").is_file():
            found.setdefault(f"step{int(match.group(1))}", child)
    return found


def lightning_checkpoints(folder: Path) -> tuple[dict[str, Path], dict[str, int | None]]:
    """``step<N>`` → ``.ckpt`` file (step = the checkpoint's ``global_step``) and the tokens each one recorded.

    When several files hold the same step (``last.ckpt`` beside ``epoch=0-step=100.ckpt``), the non-``last`` one wins.
    """
    paths: dict[str, Path] = {}
    tokens: dict[str, int | None] = {}
    found = [folder] if folder.is_file() else folder.rglob("*.ckpt")
    files = sorted(found, key=lambda p: (p.name.startswith("last"), str(p)))
    for file in files:
        try:
            checkpoint = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            step = int(checkpoint["global_step"])
            seen = checkpoint.get("negmonitor_tokens_seen")
        except Exception:  # noqa: BLE001 - unreadable file: fall back to the name, else skip it
            match = _CKPT_STEP.search(file.name)
            if not match:
                continue
            step, seen = int(match.group(1)), None
        name = f"step{step}"
        if name not in paths:
            paths[name], tokens[name] = file, seen
    return paths, tokens


def resolve_module_class(module_cls: Any) -> Any:
    """A LightningModule class from a class, ``"package.module:Class"``, or ``None`` (``CausalLMModule``)."""
    if module_cls is None:
        from negmonitor.train.module import CausalLMModule

        return CausalLMModule
    if isinstance(module_cls, str):
        module_name, _, attr = module_cls.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr or "")
        except (ImportError, AttributeError, ValueError) as exc:
            raise NegmonitorError(f"cannot import LightningModule {module_cls!r} — write it as "
                                  "package.module:ClassName") from exc
    return module_cls


def load_weights(name: str, revision: str | None = None, dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None, cache_dir: str | None = None) -> nn.Module:
    """Load only the model (no tokenizer), in eval mode: a causal LM, or the bare encoder for BERT-style models.

    Raw ``transformers`` / hub exceptions propagate, so the caller can tell a missing revision from a failure.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    kwargs = {"revision": revision, "cache_dir": cache_dir}
    with quiet_transformers():
        config = AutoConfig.from_pretrained(name, **kwargs)
        cls = AutoModelForCausalLM if is_decoder_config(config) else AutoModel
        model = cls.from_pretrained(name, **placement(parse_dtype(dtype), parse_device(device)), **kwargs)
    return model.eval()


def is_missing_error(exc: BaseException) -> bool:
    """Whether a loading error means "this revision or its files are not there" rather than a broken file."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {"RevisionNotFoundError", "EntryNotFoundError", "LocalEntryNotFoundError", "OfflineModeIsEnabled"}:
        return True
    text = str(exc).lower()
    return any(hint in text for hint in _MISSING_HINTS)


def describe_revisions(revisions: set[str] | Sequence[str], limit: int = 12) -> str:
    """A short, step-ordered list of revision names (``step0, step1, … (154 in all)``)."""
    stepped = sort_by_step([r for r in revisions if re.fullmatch(r"step\d+", r)])
    others = sorted(r for r in revisions if not re.fullmatch(r"step\d+", r))
    names = stepped + others
    if not names:
        return "none"
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:limit // 2])}, …, {', '.join(names[-limit // 2:])} ({len(names)} in all)"


def _auto_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise NegmonitorError(f"could not load the tokenizer in {folder} ({first_line(exc)}) — pass tokenizer= "
                              "(--tokenizer PATH)") from exc
