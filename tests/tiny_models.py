"""Tiny, offline models and tokenizers for the tests.

Nothing here touches the network: the tokenizer is a byte-level BPE trained in memory on a built-in paragraph,
and the models are randomly initialised from small ``transformers`` configs (2 layers, width 32) under a fixed
seed, so every test gets the same weights.

Example::

    >>> tok = tiny_tokenizer()
    >>> model = tiny_causal_lm("neox")
    >>> out = model(**tok(["the cat sat"], return_tensors="pt"))
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from collections.abc import Iterator

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

TINY_VOCAB_SIZE = 512
TINY_MAX_POSITIONS = 256
EOS = "<|endoftext|>"
PAD = "<pad>"

_WORDS = (
    "the a an this that these those some no every most many few all any each one two three "
    "cat cats dog dogs author authors guard guards movie movies pilot pilots senator senators teacher "
    "teachers student students book books house houses car cars boy boys girl girls man men woman women "
    "is are was were has have had be been being do does did will would can could should may might must "
    "laughs laugh swims swim likes like sees see saw seen runs run ran eat eats ate knows know said says "
    "hurt himself herself themselves itself ever never not very quite good bad big small red blue happy "
    "and or but because while after before if then than who what which where when why how "
    "in on at to from with by of for about over under near next between through into "
    "he she it they we you i me him her them us my his their our your its "
    "lobster lobsters sea ocean water food year years time people world city country river "
    "known called found used made became began including during although however "
    "= @-@ @,@ @.@ <unk> , . ; : ' \" ( ) ? ! - 0 1 2 3 4 5 6 7 8 9 10 100 2010 1990"
).split()


def _corpus() -> list[str]:
    """Deterministic training text: the word list in a few orders, plus some sentences."""
    words = list(_WORDS)
    lines = [" ".join(words)]
    for step in (3, 7, 11, 13):
        lines.append(" ".join(words[(i * step) % len(words)] for i in range(len(words))))
    lines += [
        "The author that the guard likes laughs.",
        "Who should Derek hug after shocking Richard?",
        "Homarus gammarus, known as the European lobster or common lobster, is a species of lobster.",
        "It may grow to a length of 60 cm (24 in) and a mass of 6 kilograms (13 lb).",
        "No authors have ever been popular. Most movies have never been seen.",
    ]
    return lines * 3


def _train_bpe(vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style) on the built-in corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def tiny_tokenizer(tmp_path: str | Path | None = None, *, pad: bool = True,
                   vocab_size: int = TINY_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE ``PreTrainedTokenizerFast`` (BOS = EOS = ``<|endoftext|>``, like GPT-2).

    Args:
        tmp_path: if given, the tokenizer is saved there with ``save_pretrained`` and loaded back from it.
        pad: give it a pad token (``<pad>``); ``False`` leaves ``pad_token`` unset, as GPT-2's is.
        vocab_size: BPE vocabulary size (at most the models' ``vocab_size``).
    """
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(vocab_size),
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=PAD if pad else None,
        model_max_length=TINY_MAX_POSITIONS,
    )
    if tmp_path is None:
        return fast
    out = Path(tmp_path) / "tiny_tokenizer"
    fast.save_pretrained(out)
    return PreTrainedTokenizerFast.from_pretrained(out)


def _causal_config(family: str, vocab_size: int, max_positions: int, tokenizer_ids: dict[str, int]):
    """A 2-layer, width-32 config of the given family."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig

    if family == "neox":
        return GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             vocab_size=vocab_size, max_position_embeddings=max_positions, **tokenizer_ids)
    if family == "llama":
        return LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                           intermediate_size=64, vocab_size=vocab_size, max_position_embeddings=max_positions,
                           **tokenizer_ids)
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=64, vocab_size=vocab_size,
                          n_positions=max_positions, **tokenizer_ids)
    if family == "opt":
        return OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                         word_embed_proj_dim=32, vocab_size=vocab_size, max_position_embeddings=max_positions,
                         **tokenizer_ids)
    raise ValueError(f"unknown family {family!r}; use neox, llama, gpt2 or opt")


def _token_ids() -> dict[str, int]:
    """Special-token ids matching :func:`tiny_tokenizer` (EOS = 0, PAD = 1)."""
    return {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}


def tiny_causal_lm(family: str = "neox", vocab_size: int = TINY_VOCAB_SIZE, *,
                   max_positions: int = TINY_MAX_POSITIONS, seed: int = 0,
                   init_range: float | None = None) -> PreTrainedModel:
    """A randomly initialised 2-layer causal LM (``neox``, ``llama``, ``gpt2`` or ``opt``), in eval mode.

    ``init_range`` overrides the config's ``initializer_range`` (0.02): a larger value (e.g. 0.3) gives peaked,
    context-dependent predictions, which makes numerical comparisons more telling.

    Example::

        >>> model = tiny_causal_lm("llama")
        >>> model.config.num_hidden_layers
        2
    """
    from transformers import AutoModelForCausalLM

    config = _causal_config(family, vocab_size, max_positions, _token_ids())
    if init_range is not None:
        config.initializer_range = init_range
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


class _ZeroNegative(torch.nn.Module):
    """Wraps an activation module and zeroes its output where the input is negative."""

    def __init__(self, base: torch.nn.Module):
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x < 0, torch.zeros_like(x), self.base(x))


@contextlib.contextmanager
def zero_negative_mlp(model: PreTrainedModel) -> Iterator[PreTrainedModel]:
    """Test-only stand-in for an ablation: swap every MLP activation module (``mlp.act``, ``mlp.act_fn``,
    ``activation_fn``) for one that zeroes negative pre-activations; restore them on exit."""
    swapped = []
    for module in model.modules():
        for attr in ("act", "act_fn", "activation_fn"):
            act = getattr(module, attr, None)
            if isinstance(act, torch.nn.Module) and not isinstance(act, _ZeroNegative):
                swapped.append((module, attr, act))
                setattr(module, attr, _ZeroNegative(act))
    try:
        yield model
    finally:
        for module, attr, act in swapped:
            setattr(module, attr, act)


def tiny_bert(vocab_size: int = TINY_VOCAB_SIZE, *, head: str = "mlm", max_positions: int = TINY_MAX_POSITIONS,
              seed: int = 0) -> PreTrainedModel:
    """A randomly initialised 2-layer BERT: ``head="mlm"`` gives ``BertForMaskedLM``, ``"base"`` a ``BertModel``."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=vocab_size, max_position_embeddings=max_positions, pad_token_id=0)
    torch.manual_seed(seed)
    cls = {"mlm": BertForMaskedLM, "base": BertModel}[head]
    return cls(config).eval()


def tiny_bert_tokenizer(tmp_path: str | Path | None = None) -> PreTrainedTokenizerFast:
    """A word-level BERT-style tokenizer (``[CLS] ... [SEP]``, with ``[MASK]``) for :func:`tiny_bert`."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                                        vocab_size=TINY_VOCAB_SIZE, show_progress=False)
    tok.train_from_iterator([line.lower() for line in _corpus()], trainer=trainer)
    tok.normalizer = normalizers.Lowercase()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=TINY_MAX_POSITIONS)
    if tmp_path is None:
        return fast
    out = Path(tmp_path) / "tiny_bert_tokenizer"
    fast.save_pretrained(out)
    return PreTrainedTokenizerFast.from_pretrained(out)
