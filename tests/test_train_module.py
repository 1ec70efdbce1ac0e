"""Tests for CausalLMModule: model families, LR schedule, and real Lightning fits on the builtin corpus."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from transformers import PreTrainedModel

from negmonitor.errors import NegmonitorError
from negmonitor.train.datamodule import TextDataModule
from negmonitor.train.module import CausalLMModule, warmup_cosine

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position_embeddings=64)


class LossRecorder(L.Callback):
    """Keep every training loss."""

    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train faster on one thread, and do not stall when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory) -> TextDataModule:
    return TextDataModule(n_sentences=4_000, seq_len=32, batch_size=16, seed=0,
                          cache_dir=str(tmp_path_factory.mktemp("tok")))


def _fit(module, datamodule, steps=20, **kwargs):
    recorder = LossRecorder()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
                        limit_val_batches=2, val_check_interval=steps, num_sanity_val_steps=0, **kwargs)
    trainer.fit(module, datamodule=datamodule)
    return trainer, recorder.losses


@pytest.mark.parametrize("family", ["neox", "llama"])
def test_fit_reduces_loss(family, datamodule):
    module = CausalLMModule(family=family, lr=5e-3, warmup_steps=3, **TINY)
    assert module.model is None
    trainer, losses = _fit(module, datamodule)
    assert isinstance(module.model, PreTrainedModel)
    assert module.tokenizer is datamodule.tokenizer
    assert module.hparams.vocab_size == datamodule.vocab_size
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    assert {"train/loss", "val/loss"} <= set(trainer.callback_metrics)
    assert module.tokens_seen == 20 * 16 * 32


def test_families_and_activations():
    neox = CausalLMModule(vocab_size=50, **TINY).model
    llama = CausalLMModule(family="llama", vocab_size=50, **TINY).model
    gpt2 = CausalLMModule(family="gpt2", vocab_size=50, **TINY).model
    assert neox.config.model_type == "gpt_neox" and neox.config.hidden_act == "gelu"
    assert llama.config.model_type == "llama" and llama.config.hidden_act == "silu"
    assert hasattr(llama.model.layers[0].mlp, "gate_proj")
    assert gpt2.config.model_type == "gpt2" and gpt2.config.n_inner == 64
    assert neox.config.intermediate_size == 64 and neox.config.num_hidden_layers == 2


def test_seeded_init_and_configure_vocab():
    a, b = CausalLMModule(vocab_size=50, seed=1, **TINY), CausalLMModule(vocab_size=50, seed=1, **TINY)
    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    late = CausalLMModule(**TINY)
    late.configure_vocab(77)
    assert late.model.config.vocab_size == 77 and late.hparams.vocab_size == 77


def test_bad_settings_are_clear_errors():
    with pytest.raises(NegmonitorError, match="unknown model family"):
        CausalLMModule(family="mamba")
    with pytest.raises(NegmonitorError, match="must divide"):
        CausalLMModule(hidden_size=30, num_heads=4)
    with pytest.raises(NegmonitorError, match="seq_len"):
        CausalLMModule(**{**TINY, "max_position_embeddings": 16})._check_seq_len(32)


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, None, 0.1) == 1.0


def test_checkpoint_round_trip(datamodule, tmp_path):
    module = CausalLMModule(lr=5e-3, warmup_steps=2, **TINY)
    trainer, _ = _fit(module, datamodule, steps=3)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    loaded = CausalLMModule.load_from_checkpoint(path)
    assert loaded.model.config.vocab_size == datamodule.vocab_size
    assert loaded.tokens_seen == module.tokens_seen
    state, state2 = module.model.state_dict(), loaded.model.state_dict()
    assert all(torch.equal(state[k], state2[k]) for k in state)
