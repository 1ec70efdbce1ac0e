"""The two named evaluation protocols: negmonitor's defaults and the paper's (the authors' code, ``utils/``).

Both share the paper's probe windows (the split as one stream, consecutive 2,048-token windows) and perplexity
(disjoint 2,048-token chunks, tail dropped); they differ in how minimal pairs are scored and in the POS surprisal
unit where negmonitor's default is arguably better:

============  ==================================  ==========================================================
choice        ``negmonitor`` (default)            ``paper``
============  ==================================  ==========================================================
prefix        one BOS (else EOS) token in front   none added: the tokenizer's own special tokens (none for
              of every sentence, so the first     Pythia, GPT-2 and Qwen, whose first token then goes
              word is scored                      unscored; BOS for Llama)
BLiMP score   summed log-probability              summed log-probability
TSE score     summed log-probability              mean log-probability per scored token
NPI pairs     both ungrammatical sentences        one pair per triple: good vs the last sentence
count         ``floor(f·n)`` neurons per layer    those strictly above numpy's ``(1 − f)`` percentile
              (top, bottom, random)               (``ceil((n − 1)·f)``: one more, e.g. 410 of 8,192 at 5%)
dtype         the commands' default: fp32 on      fp32 everywhere (the authors load with transformers
              CPU, as saved (fp16/bf16) on GPU    4.48.2's ``from_pretrained`` default); ``--dtype`` overrides
============  ==================================  ==========================================================

``get_protocol("paper")`` returns :data:`PAPER`; the commands' ``--protocol paper`` and
``AblationSettings(protocol="paper")`` use it.
"""

from __future__ import annotations

from dataclasses import dataclass

from negmonitor.errors import NegmonitorError

WINDOW = 2_048  # the paper's probe windows and perplexity chunks, in tokens
SEPARATOR = "\n\n"  # between the rows of a split joined into one stream, as the authors join WikiText rows
SCORES = ("sum", "mean")
PREFIXES = ("bos", "none")
NPI_PAIRS = ("both", "last")


@dataclass(frozen=True)
class Protocol:
    """Every choice that makes negmonitor's figures differ from the paper's, with its value.

    Args:
        name: ``negmonitor`` or ``paper``.
        window: probe-window and perplexity-chunk length (clipped to the model's positions).
        blimp_score, tse_score: ``sum`` or ``mean`` log-probability of a sentence (the TSE slot also scores the
            built-in grammar's pairs).
        prefix: ``bos`` (one BOS, else EOS, token before each sentence) or ``none`` (the tokenizer's own).
        npi_pairs: ``both`` pairs of an NPI triple, or the ``last`` (good vs the last sentence) only.
        count: how many neurons a fraction selects in the ablations: ``floor`` (``floor(f·n)``) or ``percentile``
            (the authors': values strictly above ``np.percentile(v, 100·(1 − f))``; below ``np.percentile(v,
            100·f)`` for the bottom).
        dtype: the commands' weights dtype when ``--dtype`` is not given (None: fp32 on CPU, as saved on GPU).
    """

    name: str
    window: int = WINDOW
    blimp_score: str = "sum"
    tse_score: str = "sum"
    prefix: str = "bos"
    npi_pairs: str = "both"
    count: str = "floor"
    dtype: str | None = None


NEGMONITOR = Protocol("negmonitor")
PAPER = Protocol("paper", tse_score="mean", prefix="none", npi_pairs="last", count="percentile", dtype="fp32")
PROTOCOLS = {p.name: p for p in (NEGMONITOR, PAPER)}


def default_window(max_positions: int | None) -> int:
    """The paper's window, clipped to the model's maximum positions (``None``: no limit known)."""
    return WINDOW if max_positions is None else min(WINDOW, max_positions)


def get_protocol(name: str | Protocol | None) -> Protocol:
    """The protocol called ``name`` (None: negmonitor's)."""
    if isinstance(name, Protocol):
        return name
    if name is None:
        return NEGMONITOR
    if name not in PROTOCOLS:
        raise NegmonitorError(f"unknown protocol {name!r} — use one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def check_choice(value: str, allowed: tuple[str, ...], name: str) -> str:
    """``value`` if it is one of ``allowed``, else a one-line error."""
    if value not in allowed:
        raise NegmonitorError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value
