"""Built-in training corpus: English-like text from a small probabilistic grammar.

:class:`GrammarCorpus` generates sentences offline, reproducibly for a seed, with the syntax that targeted
syntactic evaluation (TSE, Marvin & Linzen 2018) probes: subject-verb agreement across prepositional phrases and
subject/object relative clauses, reflexives that agree with their subject, negative polarity items ("ever",
"any") licensed only by "no", "few" or "not", and coordination. Words within each class are drawn with Zipf-like
frequencies. From the same grammar, :meth:`GrammarCorpus.minimal_pairs` builds a held-out minimal-pair set: every
sentence is assigned to the training or the held-out side by a hash of its text, so no good sentence of a pair
ever appears verbatim in the training text, whatever the seeds.

Example::

    >>> corpus = GrammarCorpus(seed=0)
    >>> len(corpus.sentences(3))
    3
"""

from __future__ import annotations

import hashlib
import itertools
import random
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import pandas as pd

HELDOUT_BUCKETS = 10
"""One sentence in ``HELDOUT_BUCKETS`` (by hash) is held out of the training text."""

CONSTRUCTIONS = (
    "simple_agreement",
    "agreement_across_pp",
    "agreement_across_subject_relative",
    "agreement_across_object_relative",
    "agreement_within_object_relative",
    "vp_coordination",
    "np_coordination",
    "reflexive",
    "reflexive_across_relative",
    "npi",
)
"""Minimal-pair constructions, in the order :meth:`GrammarCorpus.minimal_pairs` returns them."""

# --------------------------------------------------------------------------------------------------------------
# Lexicon. Lists are in frequency-rank order (most frequent first); "a/b" gives an irregular form.
# --------------------------------------------------------------------------------------------------------------

_MALE = """man/men boy king father son brother uncle husband prince gentleman/gentlemen monk grandfather nephew
waiter duke wizard emperor groom lord fisherman/fishermen"""
_FEMALE = """woman/women girl queen mother daughter sister aunt wife/wives princess lady nun grandmother niece
waitress actress duchess witch empress bride heroine"""
_NEUTRAL = """author pilot doctor teacher student farmer lawyer senator surgeon guard officer dancer singer painter
poet baker driver nurse judge minister banker chef soldier sailor child/children person/people customer manager
engineer scientist artist musician player writer reporter editor clerk tourist neighbor friend stranger
thief/thieves hunter architect dentist pianist athlete professor mayor president leader worker visitor cousin
parent mechanic detective captain climber swimmer runner"""
_ANIMAL = """dog cat horse mouse/mice bird wolf/wolves fox goose/geese rabbit lion tiger bear monkey duck cow puppy
kitten parrot frog"""
_INANIMATE = """book table car house letter chair window door painting song garden box lamp clock bottle cup map key
phone computer picture story poem bridge tower ship boat train bus road river lake mountain tree flower stone coin
ring shirt hat shoe bag desk bed wall gate bell knife/knives leaf/leaves glass dish brush candle mirror pen pencil
newspaper magazine film photograph report message ticket cake apple sandwich basket blanket ladder wheel engine
statue fountain church school library museum hospital station market shop office farm village city castle"""
_MALE_NAMES = """John David Michael James Robert Thomas Daniel Peter Paul Mark George Henry Jack Samuel William Edward
Frank Oliver Lucas Adam"""
_FEMALE_NAMES = """Mary Sarah Emma Anna Laura Alice Julia Emily Susan Helen Rachel Grace Lucy Clara Sophie Kate Diana
Nora Ruth Olivia"""
# Verbs: base form, ":past" for an irregular past tense.
_INTRANSITIVE = """laugh swim:swam smile sleep:slept run:ran sing:sang dance cry jump walk talk wait work travel
arrive leave:left shout whisper win:won lose:lost fall:fell sit:sat stand:stood cook pray hide:hid rest return
escape complain agree disappear sneeze yawn snore listen argue breathe fight:fought hesitate play relax retire
scream shiver struggle succeed think:thought tremble wander whistle wonder"""
_TRANSITIVE_ANIMATE = """like admire hate love know:knew see:saw help meet:met praise blame hurt:hurt trust fear
visit call follow thank remember ignore avoid attack criticize protect defend teach:taught watch greet hire invite
pay:paid push amuse annoy impress disappoint encourage distract recognize forgive:forgave support"""
_REFLEXIVE_VERBS = """hurt blame praise admire hate love see know protect defend criticize teach trust watch amuse
distract encourage forgive push annoy impress disappoint support"""
_TRANSITIVE_INANIMATE = """read:read own buy:bought sell:sold write:wrote find:found build:built break:broke carry
clean open close paint fix lose:lost want need bring:brought steal:stole hold:held drop:dropped move examine
describe borrow order design destroy repair choose:chose"""
_ANIMATE_ADJECTIVES = """happy old young tall kind famous clever brave tired quiet angry rich poor busy proud shy
strong sad polite honest lazy curious nervous gentle friendly lonely wise silly serious careful funny bored hungry
sleepy clumsy cheerful anxious generous humble jealous loyal modest stubborn calm rude weak"""
_INANIMATE_ADJECTIVES = """old new small large red blue green black white heavy expensive cheap broken empty
beautiful ugly dirty strange dark bright round wooden famous tiny"""
_NP_PREPOSITIONS = ["next to", "near", "behind", "in front of", "beside", "across from", "with", "without"]
_ADJUNCT_PREPOSITIONS = ["in", "near", "behind", "at", "beside", "outside", "inside", "under"]
_ADVERBS = ["again", "often", "today", "quietly", "slowly", "sometimes", "here", "there"]
_SING_DETS = ["the", "a", "this", "that", "every", "my", "his", "her", "our", "their", "each"]
_PLUR_DETS = ["the", "these", "those", "some", "many", "most", "my", "his", "her", "our", "their", "two",
              "several", "three"]
_NPI_BAD_DETS = ["the", "some", "many", "most"]
_VOWEL_SOUND_EXCEPTIONS = {"honest": True}


def _plural(noun: str) -> str:
    """Regular English plural of ``noun``."""
    if noun.endswith(("s", "sh", "ch", "x", "z")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _third_singular(verb: str) -> str:
    """Third person singular present of ``verb``."""
    return _plural(verb) if not verb.endswith("o") else verb + "es"


def _regular_past(verb: str) -> str:
    """Regular past tense of ``verb``."""
    if verb.endswith("e"):
        return verb + "d"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ied"
    return verb + "ed"


@dataclass(frozen=True)
class Noun:
    """A noun with its two number forms and gender: ``m``, ``f``, ``n`` (either) or ``a`` (animal, "itself")."""

    sing: str
    plur: str
    gender: str

    def form(self, number: str) -> str:
        """The singular (``"sing"``) or plural (``"plur"``) form."""
        return self.sing if number == "sing" else self.plur


@dataclass(frozen=True)
class Verb:
    """A verb: third-singular and plural present forms, and its past tense."""

    sing: str
    plur: str
    past: str

    def form(self, number: str, tense: str = "present") -> str:
        """The form agreeing with ``number`` in ``tense`` (``"present"``, ``"past"`` or ``"future"``)."""
        if tense == "past":
            return self.past
        if tense == "future":
            return "will " + self.plur
        return self.sing if number == "sing" else self.plur


def _nouns(table: str, gender: str) -> list[Noun]:
    out = []
    for entry in table.split():
        sing, _, plur = entry.partition("/")
        out.append(Noun(sing, plur or _plural(sing), gender))
    return out


def _verbs(table: str) -> list[Verb]:
    out = []
    for entry in table.split():
        base, _, past = entry.partition(":")
        out.append(Verb(_third_singular(base), base, past or _regular_past(base)))
    return out


def _interleave(*lists: Sequence) -> list:
    """Merge lists rank by rank, so frequency ranks are shared fairly between the groups."""
    out = []
    for i in range(max(len(x) for x in lists)):
        out.extend(x[i] for x in lists if i < len(x))
    return out


@dataclass(frozen=True)
class Lexicon:
    """All word lists of the grammar, in frequency-rank order."""

    animate: list[Noun]
    inanimate: list[Noun]
    names: list[Noun]
    intransitive: list[Verb]
    transitive_animate: list[Verb]
    reflexive_verbs: list[Verb]
    transitive_inanimate: list[Verb]
    animate_adjectives: list[str]
    inanimate_adjectives: list[str]

    def words(self) -> set[str]:
        """Every word form the grammar can produce (multi-word items split)."""
        forms: set[str] = set()
        for noun in self.animate + self.inanimate + self.names:
            forms |= {noun.sing, noun.plur}
        for verb in self.intransitive + self.transitive_animate + self.transitive_inanimate:
            forms |= {verb.sing, verb.plur, verb.past}
        forms |= set(self.animate_adjectives) | set(self.inanimate_adjectives)
        for item in _NP_PREPOSITIONS + _ADJUNCT_PREPOSITIONS + _ADVERBS + _SING_DETS + _PLUR_DETS:
            forms |= set(item.split())
        forms |= set(_FUNCTION_WORDS)
        return forms


_FUNCTION_WORDS = ["an", "and", "but", "that", "who", "is", "are", "was", "were", "has", "have", "been", "will",
                   "does", "do", "did", "not", "no", "few", "ever", "any", "himself", "herself", "itself",
                   "themselves", "be"]


def build_lexicon() -> Lexicon:
    """The grammar's lexicon (the same for every seed)."""
    animate = _interleave(_nouns(_NEUTRAL, "n"), _nouns(_MALE, "m"), _nouns(_FEMALE, "f"), _nouns(_ANIMAL, "a"))
    names = _interleave(
        [Noun(x, x, "m") for x in _MALE_NAMES.split()], [Noun(x, x, "f") for x in _FEMALE_NAMES.split()]
    )
    transitive_animate = _verbs(_TRANSITIVE_ANIMATE)
    by_base = {v.plur: v for v in transitive_animate}
    return Lexicon(
        animate=animate,
        inanimate=_nouns(_INANIMATE, "a"),
        names=names,
        intransitive=_verbs(_INTRANSITIVE),
        transitive_animate=transitive_animate,
        reflexive_verbs=[by_base[b] for b in _REFLEXIVE_VERBS.split()],
        transitive_inanimate=_verbs(_TRANSITIVE_INANIMATE),
        animate_adjectives=_ANIMATE_ADJECTIVES.split(),
        inanimate_adjectives=_INANIMATE_ADJECTIVES.split(),
    )


# --------------------------------------------------------------------------------------------------------------
# Sampling helpers
# --------------------------------------------------------------------------------------------------------------


def zipf_weights(n: int, exponent: float = 1.0, offset: float = 2.0) -> list[float]:
    """Zipf-Mandelbrot weights ``1 / (rank + offset) ** exponent`` for ranks ``0 .. n-1``."""
    return [1.0 / (rank + offset) ** exponent for rank in range(n)]


def _cumulative(weights: Sequence[float]) -> list[float]:
    """Running sums of ``weights`` (for ``random.choices(cum_weights=...)``)."""
    total, out = 0.0, []
    for w in weights:
        total += w
        out.append(total)
    return out


class _Picker:
    """Draw items from a list with Zipf weights (or uniformly)."""

    def __init__(self, items: Sequence, uniform: bool = False):
        self.items = list(items)
        self.cum = None if uniform else _cumulative(zipf_weights(len(self.items)))

    def __call__(self, rng: random.Random):
        if self.cum is None:
            return self.items[rng.randrange(len(self.items))]
        return rng.choices(self.items, cum_weights=self.cum)[0]


def reflexive_pronoun(noun: Noun, number: str, rng: random.Random) -> str:
    """The reflexive that agrees with ``noun`` in ``number`` (and gender)."""
    if number == "plur":
        return "themselves"
    return _singular_reflexive(noun.gender, rng)


def _singular_reflexive(gender: str, rng: random.Random) -> str:
    if gender == "a":
        return "itself"
    if gender == "n":
        return rng.choice(("himself", "herself"))
    return "himself" if gender == "m" else "herself"


def _wrong_reflexive(noun: Noun, number: str, rng: random.Random) -> str:
    """A reflexive that disagrees with ``noun`` in number only."""
    return _singular_reflexive(noun.gender, rng) if number == "plur" else "themselves"


def heldout_bucket(sentence: str) -> int:
    """Stable hash bucket of a sentence in ``[0, HELDOUT_BUCKETS)``; bucket 0 is held out of training."""
    digest = hashlib.blake2b(sentence.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % HELDOUT_BUCKETS


def is_heldout(sentence: str) -> bool:
    """Whether ``sentence`` belongs to the held-out side of the hash partition."""
    return heldout_bucket(sentence) == 0


def finish(words: Sequence[str]) -> str:
    """Join words into a sentence: capitalised first letter, "a" → "an" before a vowel, final period."""
    out = list(words)
    for i in range(len(out) - 1):
        if out[i] == "a" and (out[i + 1][0] in "aeiou" or out[i + 1] in _VOWEL_SOUND_EXCEPTIONS):
            out[i] = "an"
    text = " ".join(out)
    return text[0].upper() + text[1:] + "."


# --------------------------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------------------------

_SENTENCE_TYPES = {
    "intransitive": 0.20,
    "transitive_animate": 0.15,
    "transitive_inanimate": 0.13,
    "copula": 0.12,
    "perfect": 0.04,
    "reflexive": 0.09,
    "npi": 0.09,
    "vp_coordination": 0.07,
    "np_coordination": 0.05,
    "clause_coordination": 0.06,
}


@dataclass
class _NP:
    words: list[str]
    number: str
    head: Noun


class _Generator:
    """Recursive sentence generator; one instance per random stream."""

    def __init__(self, lexicon: Lexicon, rng: random.Random, uniform: bool = False):
        self.lex, self.rng = lexicon, rng
        p = lambda items: _Picker(items, uniform)  # noqa: E731
        self.animate, self.inanimate, self.names = p(lexicon.animate), p(lexicon.inanimate), p(lexicon.names)
        self.intransitive = p(lexicon.intransitive)
        self.transitive_animate = p(lexicon.transitive_animate)
        self.reflexive_verbs = p(lexicon.reflexive_verbs)
        self.transitive_inanimate = p(lexicon.transitive_inanimate)
        self.animate_adj, self.inanimate_adj = p(lexicon.animate_adjectives), p(lexicon.inanimate_adjectives)
        self.np_preps, self.adjunct_preps = p(_NP_PREPOSITIONS), p(_ADJUNCT_PREPOSITIONS)
        self.adverbs = p(_ADVERBS)
        self.sing_dets, self.plur_dets = p(_SING_DETS), p(_PLUR_DETS)
        self.types = list(_SENTENCE_TYPES)
        self.type_cum = _cumulative(list(_SENTENCE_TYPES.values()))

    # --- small pieces -----------------------------------------------------------------------------------------
    def number(self) -> str:
        return "sing" if self.rng.random() < 0.5 else "plur"

    def tense(self, future: bool = True) -> str:
        r = self.rng.random()
        if r < 0.68:
            return "present"
        return "future" if future and r > 0.92 else "past"

    def det(self, number: str) -> str:
        return (self.sing_dets if number == "sing" else self.plur_dets)(self.rng)

    def adjectives(self, animate: bool) -> list[str]:
        r, pick = self.rng.random(), self.animate_adj if animate else self.inanimate_adj
        if r < 0.05:
            first, second = pick(self.rng), pick(self.rng)
            return [first] if first == second else [first, second]
        return [pick(self.rng)] if r < 0.25 else []

    def simple_np(self, animate: bool, number: str | None = None, det: str | None = None) -> _NP:
        """Determiner, optional adjectives, noun; a name 10% of the time for animate singulars."""
        number = number or self.number()
        if animate and number == "sing" and det is None and self.rng.random() < 0.1:
            name = self.names(self.rng)
            return _NP([name.sing], "sing", name)
        noun = (self.animate if animate else self.inanimate)(self.rng)
        return _NP([det or self.det(number), *self.adjectives(animate), noun.form(number)], number, noun)

    def modified_np(self, animate: bool = True, number: str | None = None, det: str | None = None) -> _NP:
        """A noun phrase that may carry a PP or a subject/object relative clause (attractors)."""
        np = self.simple_np(animate, number, det)
        r = self.rng.random()
        if r < 0.16:
            np.words += [*self.np_preps(self.rng).split(), *self.simple_np(self.rng.random() < 0.6).words]
        elif r < 0.26 and animate:
            np.words += self.subject_relative(np.number)
        elif r < 0.36 and animate:
            np.words += self.object_relative()
        return np

    def complementizer(self) -> str:
        return "that" if self.rng.random() < 0.6 else "who"

    def subject_relative(self, head_number: str) -> list[str]:
        verb = self.transitive_animate(self.rng).form(head_number, self.tense())
        return [self.complementizer(), verb, *self.simple_np(True).words]

    def object_relative(self) -> list[str]:
        inner = self.simple_np(True)
        verb = self.transitive_animate(self.rng).form(inner.number, self.tense())
        return [self.complementizer(), *inner.words, verb]

    def adjunct(self) -> list[str]:
        r = self.rng.random()
        if r < 0.15:
            return [*self.adjunct_preps(self.rng).split(), *self.simple_np(False).words]
        return [self.adverbs(self.rng)] if r < 0.25 else []

    # --- sentence types ---------------------------------------------------------------------------------------
    def sentence(self) -> list[str]:
        kind = self.rng.choices(self.types, cum_weights=self.type_cum)[0]
        return getattr(self, "s_" + kind)()

    def subject(self) -> _NP:
        r = self.rng.random()
        if r < 0.03:
            return self.modified_np(True, det="no")
        if r < 0.05:
            return self.modified_np(True, "plur", det="few")
        return self.modified_np(True)

    def s_intransitive(self) -> list[str]:
        subj = self.subject()
        return [*subj.words, self.intransitive(self.rng).form(subj.number, self.tense()), *self.adjunct()]

    def s_transitive_animate(self) -> list[str]:
        subj = self.subject()
        verb = self.transitive_animate(self.rng).form(subj.number, self.tense())
        return [*subj.words, verb, *self.modified_np(True).words]

    def s_transitive_inanimate(self) -> list[str]:
        subj = self.subject()
        verb = self.transitive_inanimate(self.rng).form(subj.number, self.tense())
        return [*subj.words, verb, *self.simple_np(False).words, *self.adjunct()]

    def s_copula(self) -> list[str]:
        animate = self.rng.random() < 0.6
        subj = self.subject() if animate else self.modified_np(False)
        be = copula(subj.number, self.tense())
        if self.rng.random() < 0.7:
            return [*subj.words, be, (self.animate_adj if animate else self.inanimate_adj)(self.rng)]
        return [*subj.words, be, *self.adjunct_preps(self.rng).split(), *self.simple_np(False).words]

    def s_perfect(self) -> list[str]:
        subj = self.subject()
        have = "has" if subj.number == "sing" else "have"
        return [*subj.words, have, "been", self.animate_adj(self.rng)]

    def s_reflexive(self) -> list[str]:
        subj = self.subject()
        verb = self.reflexive_verbs(self.rng).form(subj.number, self.tense())
        return [*subj.words, verb, reflexive_pronoun(subj.head, subj.number, self.rng)]

    def s_vp_coordination(self) -> list[str]:
        subj, tense = self.subject(), self.tense()
        first = self.intransitive(self.rng)
        second = self.intransitive(self.rng)
        while second == first:
            second = self.intransitive(self.rng)
        return [*subj.words, first.form(subj.number, tense), "and", second.form(subj.number, tense)]

    def s_np_coordination(self) -> list[str]:
        left, right = self.simple_np(True), self.simple_np(True)
        if self.rng.random() < 0.5:
            return [*left.words, "and", *right.words, self.intransitive(self.rng).form("plur", self.tense())]
        return [*left.words, "and", *right.words, copula("plur", self.tense()), self.animate_adj(self.rng)]

    def s_clause_coordination(self) -> list[str]:
        left = self.s_intransitive() if self.rng.random() < 0.5 else self.s_copula()
        right = self.s_intransitive() if self.rng.random() < 0.5 else self.s_transitive_inanimate()
        return [*left, "and" if self.rng.random() < 0.6 else "but", *right]

    def s_npi(self) -> list[str]:
        """Negative polarity items, always licensed: "no"/"few" subjects or "do/does/did not"."""
        r = self.rng.random()
        if r < 0.55:
            licensor = "no" if self.rng.random() < 0.6 else "few"
            subj = self.modified_np(True, "plur" if licensor == "few" else None, det=licensor)
            return [*subj.words, *self.npi_predicate(subj.number)]
        subj = self.modified_np(True)
        aux = {"present": "does" if subj.number == "sing" else "do", "past": "did", "future": "will"}[self.tense()]
        if self.rng.random() < 0.6:
            obj = self.simple_np(False, "plur", det="any")
            return [*subj.words, aux, "not", self.transitive_inanimate(self.rng).plur, *obj.words]
        return [*subj.words, aux, "not", "ever", self.intransitive(self.rng).plur]

    def npi_predicate(self, number: str) -> list[str]:
        r = self.rng.random()
        if r < 0.3:
            return ["has" if number == "sing" else "have", "ever", "been", self.animate_adj(self.rng)]
        if r < 0.5:
            return ["will", "ever", self.intransitive(self.rng).plur]
        if r < 0.7:
            return ["ever", self.intransitive(self.rng).form(number, self.tense(future=False))]
        verb = self.transitive_inanimate(self.rng).form(number, self.tense())
        return [verb, *self.simple_np(False, "plur", det="any").words]


def copula(number: str, tense: str) -> str:
    """Form of "be" agreeing with ``number`` in ``tense``."""
    if tense == "past":
        return "was" if number == "sing" else "were"
    if tense == "future":
        return "will be"
    return "is" if number == "sing" else "are"


# --------------------------------------------------------------------------------------------------------------
# Minimal pairs
# --------------------------------------------------------------------------------------------------------------

_Pair = tuple[str, list[str], list[str]]  # condition, good words, bad words
_NUMBERS = ("sing", "plur")


def _flip(number: str) -> str:
    return "plur" if number == "sing" else "sing"


class _PairMaker:
    """Templates for each construction (TSE-style, "the" determiners, present tense, uniform word choice)."""

    def __init__(self, lexicon: Lexicon, rng: random.Random):
        self.lex, self.rng = lexicon, rng
        self.g = _Generator(lexicon, rng, uniform=True)

    def noun(self, other: Noun | None = None) -> Noun:
        """A uniformly drawn animate noun, different from ``other``."""
        noun = self.g.animate(self.rng)
        while noun == other:
            noun = self.g.animate(self.rng)
        return noun

    def two_verbs(self, picker: _Picker) -> tuple[Verb, Verb]:
        first, second = picker(self.rng), picker(self.rng)
        while second == first:
            second = picker(self.rng)
        return first, second

    def simple_agreement(self, ms: str, es: str) -> _Pair:
        n, v = self.noun(), self.g.intransitive(self.rng)
        head = ["the", n.form(ms)]
        return f"{ms}_MS_MV", [*head, v.form(ms)], [*head, v.form(_flip(ms))]

    def agreement_across_pp(self, ms: str, es: str) -> _Pair:
        n = self.noun()
        e, v = self.noun(n), self.g.intransitive(self.rng)
        head = ["the", n.form(ms), *self.g.np_preps(self.rng).split(), "the", e.form(es)]
        return f"{ms}_MS_MV_{es}_ES", [*head, v.form(ms)], [*head, v.form(_flip(ms))]

    def agreement_across_subject_relative(self, ms: str, es: str) -> _Pair:
        n = self.noun()
        e, v = self.noun(n), self.g.intransitive(self.rng)
        ev = self.g.transitive_animate(self.rng).form(ms)
        head = ["the", n.form(ms), "that", ev, "the", e.form(es)]
        return f"{ms}_MS_EV_MV_{es}_ES", [*head, v.form(ms)], [*head, v.form(_flip(ms))]

    def agreement_across_object_relative(self, ms: str, es: str) -> _Pair:
        n = self.noun()
        e, v = self.noun(n), self.g.intransitive(self.rng)
        ev = self.g.transitive_animate(self.rng).form(es)
        head = ["the", n.form(ms), "that", "the", e.form(es), ev]
        return f"{ms}_MS_MV_{es}_ES_EV", [*head, v.form(ms)], [*head, v.form(_flip(ms))]

    def agreement_within_object_relative(self, ms: str, es: str) -> _Pair:
        n = self.noun()
        e, v = self.noun(n), self.g.intransitive(self.rng)
        ev = self.g.transitive_animate(self.rng)
        head, tail = ["the", n.form(ms), "that", "the", e.form(es)], [v.form(ms)]
        return f"{ms}_MS_{es}_ES_EV", [*head, ev.form(es), *tail], [*head, ev.form(_flip(es)), *tail]

    def vp_coordination(self, ms: str, es: str) -> _Pair:
        n = self.noun()
        first, second = self.two_verbs(self.g.intransitive)
        head = ["the", n.form(ms), first.form(ms), "and"]
        return f"{ms}_MS_MV_MV", [*head, second.form(ms)], [*head, second.form(_flip(ms))]

    def np_coordination(self, ms: str, es: str) -> _Pair:
        n = self.noun()
        e, v = self.noun(n), self.g.intransitive(self.rng)
        head = ["the", n.form(ms), "and", "the", e.form(es)]
        return f"{ms}_{es}_coordinated_MV", [*head, v.plur], [*head, v.sing]

    def reflexive(self, ms: str, es: str) -> _Pair:
        n, v = self.noun(), self.g.reflexive_verbs(self.rng)
        head = ["the", n.form(ms), v.past]
        good, bad = reflexive_pronoun(n, ms, self.rng), _wrong_reflexive(n, ms, self.rng)
        return f"{ms}_MS_ANPHR", [*head, good], [*head, bad]

    def reflexive_across_relative(self, ms: str, es: str) -> _Pair:
        n = self.noun()
        e, v = self.noun(n), self.g.reflexive_verbs(self.rng)
        ev = self.g.transitive_animate(self.rng).form(es)
        head = ["the", n.form(ms), "that", "the", e.form(es), ev, v.past]
        good, bad = reflexive_pronoun(n, ms, self.rng), _wrong_reflexive(n, ms, self.rng)
        return f"{ms}_MS_{es}_ES_ANPHR", [*head, good], [*head, bad]

    def npi(self, ms: str, es: str) -> _Pair:
        """``ms`` picks the licensor ("no" or "few"), ``es`` the item ("ever" or "any")."""
        licensor = "no" if ms == "sing" else "few"
        n = self.noun()
        if es == "sing":
            rest = ["have", "ever", "been", self.g.animate_adj(self.rng)] if self.rng.random() < 0.5 else [
                "will", "ever", self.g.intransitive(self.rng).plur]
            item = "ever"
        else:
            rest = [self.g.transitive_inanimate(self.rng).plur, "any", self.g.inanimate(self.rng).plur]
            item = "any"
        bad_det = _NPI_BAD_DETS[self.rng.randrange(len(_NPI_BAD_DETS))]
        return f"{licensor}_{item}", [licensor, n.plur, *rest], [bad_det, n.plur, *rest]


def _conditions(construction: str) -> list[tuple[str, str]]:
    if construction in ("simple_agreement", "vp_coordination", "reflexive"):
        return [(ms, "sing") for ms in _NUMBERS]
    return [(ms, es) for ms in _NUMBERS for es in _NUMBERS]


# --------------------------------------------------------------------------------------------------------------
# Public class
# --------------------------------------------------------------------------------------------------------------


class GrammarCorpus:
    """Seeded generator of English-like training text and held-out minimal pairs.

    Args:
        seed: seed of the training text; the same seed always gives the same sentences.

    Example::

        >>> corpus = GrammarCorpus(seed=0)
        >>> corpus.sentences(2) == GrammarCorpus(seed=0).sentences(2)
        True
        >>> pairs = corpus.minimal_pairs(4, seed=1)
        >>> sorted(pairs.columns)[:3]
        ['condition', 'construction', 'pair_id']
    """

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.lexicon = build_lexicon()

    def _stream(self, salt: str, keep: Callable[[str], bool], n: int) -> list[str]:
        return list(itertools.islice(self._kept_sentences(salt, keep), n))

    def _kept_sentences(self, salt: str, keep: Callable[[str], bool]) -> Iterator[str]:
        """The endless seeded sentence stream of ``salt``, those ``keep`` accepts."""
        gen = _Generator(self.lexicon, random.Random(f"{salt}:{self.seed}"))
        while True:
            sentence = finish(gen.sentence())
            if keep(sentence):
                yield sentence

    def sentences(self, n: int) -> list[str]:
        """``n`` training sentences (never from the held-out hash bucket); a prefix of any longer call."""
        return self._stream("train", lambda s: not is_heldout(s), int(n))

    def heldout_sentences(self, n: int) -> list[str]:
        """``n`` sentences from the held-out hash bucket: the grammar's distribution, never in training text."""
        return self._stream("heldout", is_heldout, int(n))

    def paragraphs(self, n_sentences: int, heldout: bool = False) -> list[str]:
        """The sentences grouped into paragraphs of 1 to 6 sentences, joined by spaces."""
        sents = self.heldout_sentences(n_sentences) if heldout else self.sentences(n_sentences)
        rng, out, i = random.Random(f"paragraphs:{self.seed}"), [], 0
        while i < len(sents):
            size = rng.randint(1, 6)
            out.append(" ".join(sents[i:i + size]))
            i += size
        return out

    def heldout_texts(self, n: int = 256) -> list[str]:
        """``n`` held-out paragraphs: the probe and perplexity text of a run on the built-in corpus.

        The first ``n`` of :meth:`paragraphs` over the held-out sentences, drawing only the sentences they take
        (~3.5 per paragraph; the held-out bucket keeps one generated sentence in ten, so this is most of the cost).
        """
        sentences = self._kept_sentences("heldout", is_heldout)
        rng = random.Random(f"paragraphs:{self.seed}")
        return [" ".join(itertools.islice(sentences, rng.randint(1, 6))) for _ in range(max(0, int(n)))]

    def text(self, n_sentences: int) -> str:
        """Training text of ``n_sentences`` sentences, one paragraph per line."""
        return "\n".join(self.paragraphs(n_sentences)) + "\n"

    def vocabulary(self) -> set[str]:
        """Every word form the grammar can produce (lower case, plus capitalised sentence starts)."""
        return self.lexicon.words()

    def minimal_pairs(self, n_per_construction: int = 100, seed: int = 12345,
                      constructions: Sequence[str] | None = None) -> pd.DataFrame:
        """Held-out minimal pairs, ``n_per_construction`` per construction split evenly over its conditions.

        Columns: ``suite`` (``"grammar"``), ``construction``, ``condition``, ``pair_id`` (unique in the frame),
        ``sentence_good``, ``sentence_bad``. Good and bad differ in exactly one word; every good sentence is in
        the held-out hash bucket, so it never appears in :meth:`sentences` output for any seed.
        """
        chosen = list(constructions or CONSTRUCTIONS)
        unknown = sorted(set(chosen) - set(CONSTRUCTIONS))
        if unknown:
            from negmonitor.errors import NegmonitorError

            raise NegmonitorError(f"unknown construction(s) {unknown} — choose from {list(CONSTRUCTIONS)}")
        rows: list[dict] = []
        for construction in chosen:
            rows += self._pairs_for(construction, int(n_per_construction), seed)
        frame = pd.DataFrame(rows, columns=["suite", "construction", "condition", "sentence_good", "sentence_bad"])
        frame.insert(3, "pair_id", range(len(frame)))
        return frame

    def _pairs_for(self, construction: str, n: int, seed: int) -> list[dict]:
        conditions = _conditions(construction)
        rng = random.Random(f"pairs:{construction}:{seed}")
        maker = _PairMaker(self.lexicon, rng)
        template = getattr(maker, construction)
        rows, seen = [], set()
        for i, (ms, es) in enumerate(conditions):
            quota = n // len(conditions) + (1 if i < n % len(conditions) else 0)
            got, attempts = 0, 0
            while got < quota and attempts < 200 * quota + 1000:
                attempts += 1
                condition, good_words, bad_words = template(ms, es)
                good, bad = finish(good_words), finish(bad_words)
                if good in seen or not is_heldout(good):
                    continue
                seen.add(good)
                rows.append(dict(suite="grammar", construction=construction, condition=condition,
                                 sentence_good=good, sentence_bad=bad))
                got += 1
            if got < quota:
                warnings.warn(f"grammar minimal pairs: only {got} of {quota} distinct held-out pairs for "
                              f"{construction}/{condition}", stacklevel=3)
        return rows
