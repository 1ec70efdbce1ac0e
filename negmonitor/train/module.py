"""LightningModule that pretrains a small causal language model from scratch.

:class:`CausalLMModule` builds a ``transformers`` config (GPT-NeoX, Llama or GPT-2) from plain constructor
arguments, so ``LightningCLI`` can build it from YAML, and exposes the model as ``self.model`` for the monitors.
The vocabulary size usually comes from the tokenizer: pass it, or call :meth:`CausalLMModule.configure_vocab` /
:meth:`CausalLMModule.configure_tokenizer` before fitting; as a last resort :meth:`setup` reads it from the
trainer's datamodule.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR

from negmonitor.errors import NegmonitorError

FAMILIES = ("neox", "llama", "gpt2")


def build_config(family: str, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                 intermediate_size: int, max_position_embeddings: int, special_ids: dict | None = None):
    """A ``transformers`` config for ``family``, with dropout off and the family's usual MLP nonlinearity."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    ids = {k: v for k, v in (special_ids or {}).items() if v is not None}
    if family == "neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                             num_attention_heads=num_heads, intermediate_size=intermediate_size,
                             max_position_embeddings=max_position_embeddings, hidden_act="gelu",
                             attention_dropout=0.0, hidden_dropout=0.0, use_cache=False,
                             tie_word_embeddings=False, **ids)
    if family == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                           num_attention_heads=num_heads, num_key_value_heads=num_heads,
                           intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                           hidden_act="silu", attention_dropout=0.0, use_cache=False, tie_word_embeddings=False,
                           **ids)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
                          n_inner=intermediate_size, n_positions=max_position_embeddings,
                          activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          use_cache=False, **ids)
    raise NegmonitorError(f"unknown model family {family!r} — use one of {list(FAMILIES)}")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int | None, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1 over ``warmup_steps``, then cosine decay to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not total_steps or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CausalLMModule(L.LightningModule):
    """Pretrain a small decoder LM from scratch; the ``transformers`` model is ``self.model``.

    The defaults (GPT-NeoX, 4 layers, width 128, 512 MLP neurons per layer, AdamW at 2e-3) with
    :class:`~negmonitor.train.datamodule.TextDataModule`'s defaults (built-in grammar, 64-token blocks, batch 32)
    learn the grammar's agreement minimal pairs (chance → ~99%) in about 300 steps, at about 0.13 s a step on
    two CPU cores.

    Args:
        family: ``"neox"`` (GPT-NeoX, GELU), ``"llama"`` (SwiGLU: SiLU on ``gate_proj``) or ``"gpt2"``.
        hidden_size: model width.
        num_layers: transformer blocks.
        num_heads: attention heads (must divide ``hidden_size``).
        intermediate_size: MLP neurons per layer.
        max_position_embeddings: longest sequence (at least the datamodule's ``seq_len``).
        vocab_size: vocabulary size; ``None`` to fill it in from the tokenizer later.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay (matrices only; no decay on biases, norms).
        warmup_steps: linear warmup steps; cosine decay to ``min_lr_ratio * lr`` over the rest of training.
        betas: AdamW betas.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        seed: seed of the weight initialisation (independent of the global RNG).

    Raises:
        NegmonitorError: unknown family, bad sizes, or no vocabulary size by the time training starts.

    Example::

        >>> module = CausalLMModule(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=100)
        >>> type(module.model).__name__
        'GPTNeoXForCausalLM'
    """

    def __init__(
        self,
        family: str = "neox",
        hidden_size: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        intermediate_size: int = 512,
        max_position_embeddings: int = 256,
        vocab_size: int | None = None,
        lr: float = 2e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 50,
        betas: tuple[float, float] = (0.9, 0.95),
        min_lr_ratio: float = 0.1,
        seed: int = 0,
    ):
        super().__init__()
        _validate(family, hidden_size, num_layers, num_heads, intermediate_size, max_position_embeddings, lr)
        self.save_hyperparameters()
        self.model: Any = None
        self.tokenizer: Any = None
        self.tokens_seen = 0
        if vocab_size is not None:
            self.configure_vocab(vocab_size)

    # --- building -------------------------------------------------------------------------------------------
    def configure_vocab(self, vocab_size: int) -> None:
        """Set the vocabulary size and build the model (no-op if it is already built with that size)."""
        if vocab_size is None or int(vocab_size) < 1:
            raise NegmonitorError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        if self.model is not None and self.model.config.vocab_size == int(vocab_size):
            return
        self.hparams.vocab_size = int(vocab_size)
        self.model = self._build_model()

    def configure_tokenizer(self, tokenizer: Any) -> None:
        """Attach ``tokenizer`` and size the vocabulary (and special token ids) from it."""
        self.tokenizer = tokenizer
        if self.model is None:
            self.configure_vocab(len(tokenizer))
        elif self.model.config.vocab_size < len(tokenizer):
            raise NegmonitorError(f"model vocab_size={self.model.config.vocab_size} is smaller than the tokenizer's "
                                  f"{len(tokenizer)} tokens — leave model.vocab_size unset to size it automatically")
        for name, value in self._special_ids().items():
            setattr(self.model.config, name, value)

    def _build_model(self):
        from transformers import AutoModelForCausalLM

        h = self.hparams
        config = build_config(h.family, h.vocab_size, h.hidden_size, h.num_layers, h.num_heads,
                              h.intermediate_size, h.max_position_embeddings, self._special_ids())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(h.seed)
            return AutoModelForCausalLM.from_config(config)

    def _special_ids(self) -> dict:
        tok = self.tokenizer
        if tok is None:
            return {}
        return dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    def setup(self, stage: str) -> None:
        """Take the tokenizer / vocabulary size from the datamodule if they were not given."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            if self.tokenizer is None and getattr(datamodule, "tokenizer", None) is not None:
                self.configure_tokenizer(datamodule.tokenizer)
            self._check_seq_len(getattr(datamodule, "seq_len", None))
        if self.model is None:
            raise NegmonitorError("the model has no vocabulary size — set model.vocab_size or use a datamodule "
                                  "with a tokenizer")

    def _check_seq_len(self, seq_len: int | None) -> None:
        if seq_len is not None and seq_len > self.hparams.max_position_embeddings:
            raise NegmonitorError(f"seq_len={seq_len} exceeds max_position_embeddings="
                                  f"{self.hparams.max_position_embeddings} — raise model.max_position_embeddings")

    # --- training -------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Run the wrapped ``transformers`` model."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _loss(self, batch: dict) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"],
                          attention_mask=batch.get("attention_mask")).loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Next-token loss, logged as ``train/loss``."""
        loss = self._loss(batch)
        self.tokens_seen += int(batch["input_ids"].numel()) * max(1, self.trainer.world_size)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True,
                 batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Next-token loss, logged as ``val/loss`` (epoch mean)."""
        loss = self._loss(batch)
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self) -> dict:
        """AdamW (no decay on vectors) with linear warmup and cosine decay, stepped every batch."""
        h = self.hparams
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": h.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=h.lr, betas=tuple(h.betas))
        total = self._total_steps()
        schedule = LambdaLR(optimizer, lambda step: warmup_cosine(step, h.warmup_steps, total, h.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _total_steps(self) -> int | None:
        try:
            total = self.trainer.estimated_stepping_batches
        except Exception:  # noqa: BLE001 - no trainer or no finite length: constant LR after warmup
            return None
        return int(total) if total is not None and math.isfinite(total) else None

    # --- checkpoints ----------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store the token counter."""
        checkpoint["negmonitor_tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore the token counter, and build the model first if the vocabulary was filled in late."""
        self.tokens_seen = int(checkpoint.get("negmonitor_tokens_seen", 0))
        vocab = checkpoint.get("hyper_parameters", {}).get("vocab_size")
        if self.model is None and vocab is not None:
            self.configure_vocab(vocab)


def _validate(family: str, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int,
              max_position_embeddings: int, lr: float) -> None:
    if family not in FAMILIES:
        raise NegmonitorError(f"unknown model family {family!r} — use one of {list(FAMILIES)}")
    for name, value in dict(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                            intermediate_size=intermediate_size,
                            max_position_embeddings=max_position_embeddings).items():
        if int(value) < 1:
            raise NegmonitorError(f"{name} must be a positive integer, got {value!r}")
    if hidden_size % num_heads:
        raise NegmonitorError(f"num_heads={num_heads} must divide hidden_size={hidden_size}")
    if not lr > 0:
        raise NegmonitorError(f"lr must be positive, got {lr!r}")
