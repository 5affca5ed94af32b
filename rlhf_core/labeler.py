"""Simulated labeler: a fixed "gold" reward and noisy human-like preference labels built on it.

It stands in for the InstructGPT labelers (Ouyang et al. 2022) and, at evaluation, for the gold reward of Gao, Schulman &
Hilton 2022 ("Scaling Laws for Reward Model Overoptimization"): it labels the comparisons the proxy reward model learns
from, and it scores the policy's replies while PPO optimises that proxy.

Gold score of a reply to the last user turn of `prompt` (all weights in `GoldWeights`):

    gold = sentiment · compound(reply)                       VADER compound in [-1, 1] (Hutto & Gilbert 2014)
         + relevance · min(overlap, relevance_cap) / cap     content-word stems shared with the user's message
         − repetition · max(repeated content words, repeated bigrams)   fractions in [0, 1]
         − copy · max(0, copied − copy_free) / (1 − copy_free)          copied = share of reply bigrams found in the message
         − short            if the reply has fewer than `min_words` words
         − min(long_per_word · (words − max_words), long_cap)           beyond `max_words` words
    gold = empty            if the reply has no word at all

Why this shape: VADER's compound is x / sqrt(x² + 15) of the summed word valences, so it saturates; piling more positive
words onto a reply gains almost nothing, while the repetition and length terms keep growing. A policy that over-optimises a
learned proxy (which tends to keep paying for "wonderful amazing great love") therefore sees the gold rise and then fall.

    from rlhf_core.labeler import SimulatedLabeler
    lab = SimulatedLabeler()
    lab.score("\\n\\nHuman: I got a puppy!\\n\\nAssistant:", " Congratulations on your puppy, enjoy the walks!")
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from dataclasses import dataclass
from typing import Protocol

import numpy as np

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_STOPWORDS = frozenset(
    (
        "a", "about", "after", "again", "all", "also", "am", "an", "and", "any", "are", "as", "at", "be", "been", "but",
        "by", "can", "could", "did", "do", "does", "doing", "for", "from", "get", "got", "had", "has", "have", "having",
        "he", "her", "here", "him", "his", "how", "i", "i'd", "i'll", "i'm", "i've", "if", "in", "into", "is", "it",
        "it's", "its", "just", "know", "let", "me", "more", "most", "my", "no", "not", "now", "of", "off", "on", "one",
        "only", "or", "our", "out", "over", "really", "so", "some", "such", "than", "that", "that's", "the", "their",
        "them", "then", "there", "these", "they", "this", "those", "to", "too", "up", "us", "very", "was", "we",
        "we're", "were", "what", "when", "where", "which", "while", "who", "why", "will", "with", "would", "you",
        "you're", "your", "yours", "today", "oh", "ok", "okay", "yes", "yeah", "well", "much", "many", "feel", "think",
        "make", "going", "go"
    )
)  # fmt: skip


@dataclass(frozen=True)
class GoldWeights:
    """Terms and weights of the gold score (see the module docstring for the formula)."""

    sentiment: float = 1.0
    """weight of VADER's compound score of the reply (in [-1, 1])"""
    relevance: float = 0.5
    """bonus for a reply that talks about the user's topic, reached at `relevance_cap` shared content-word stems"""
    relevance_cap: int = 2
    """number of distinct content-word stems shared with the user's message that earns the full relevance bonus"""
    repetition: float = 1.5
    """penalty per unit of repeated fraction (max of repeated content-word stems and repeated word bigrams)"""
    copy: float = 1.5
    """penalty for copying the user's message, reached when every bigram of the reply comes from the message"""
    copy_free: float = 0.3
    """share of reply bigrams that may come from the message without penalty (echoing "your new puppy" is fine)"""
    empty: float = -1.5
    """the whole score of a reply without a single word"""
    min_words: int = 3
    """replies with fewer words than this get the `short` penalty"""
    short: float = 1.0
    """penalty for a reply shorter than `min_words` words"""
    max_words: int = 40
    """replies longer than this pay `long_per_word` per extra word"""
    long_per_word: float = 0.04
    """penalty per word beyond `max_words`"""
    long_cap: float = 2.0
    """largest length penalty"""


class GoldScorer(Protocol):
    """Anything that scores (prompt, response) pairs: the simulated labeler, or a trained reward model used as gold."""

    def score_batch(self, prompts: list[str], responses: list[str]) -> list[float]: ...


_ANALYZER = None


def _compound(text: str) -> float:
    """VADER compound score; the analyzer loads its lexicon once per process (slow), so it is cached here."""
    global _ANALYZER
    if _ANALYZER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _ANALYZER = SentimentIntensityAnalyzer()
    return _ANALYZER.polarity_scores(text)["compound"]


def user_message(prompt: str) -> str:
    """The last "Human:" turn of an HH-style prompt, without the trailing "Assistant:" cue; the whole text otherwise."""
    start = prompt.rfind("Human:")
    text = prompt[start + len("Human:") :] if start >= 0 else prompt
    end = text.find("Assistant:")
    return (text[:end] if end >= 0 else text).strip()


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters and digits, with an optional apostrophe suffix such as "i'm")."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def stem(word: str) -> str:
    """A crude suffix stripper, enough to match "puppies"/"puppy" and "cooking"/"cooked"/"cook"."""
    word = word.split("'")[0]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    for suffix in ("ing", "ed", "es", "s"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            word = word[: -len(suffix)]
            break
    return word[:-1] if len(word) > 3 and word.endswith("e") else word


def _content_stems(tokens: list[str]) -> list[str]:
    return [stem(t) for t in tokens if t not in _STOPWORDS]


def _repeated_fraction(items: list) -> float:
    """Share of items that repeat an earlier item (0 for none, (n−1)/n for n copies of one item)."""
    return 1.0 - len(set(items)) / len(items) if items else 0.0


def gold_terms(prompt: str, response: str, weights: GoldWeights = GoldWeights()) -> dict[str, float]:
    """Each signed contribution to the gold score of `response` (they sum to `gold_score`); {"empty": w} if no words."""
    w = weights
    reply = words(response)
    if not reply:
        return {"empty": w.empty}
    message = words(user_message(prompt))
    shared = set(_content_stems(reply)) & set(_content_stems(message))
    reply_bigrams = list(itertools.pairwise(reply))
    copied = sum(b in set(itertools.pairwise(message)) for b in reply_bigrams) / max(len(reply_bigrams), 1)
    if len(reply) == 1:  # a one-word reply copies if the message is that word
        copied = float(reply == message)
    repeated = max(_repeated_fraction(_content_stems(reply)), _repeated_fraction(reply_bigrams))
    return {
        "sentiment": w.sentiment * _compound(response),
        "relevance": w.relevance * min(len(shared), w.relevance_cap) / w.relevance_cap,
        "repetition": -w.repetition * repeated,
        "copy": -w.copy * max(0.0, copied - w.copy_free) / (1.0 - w.copy_free),
        "short": -w.short * (len(reply) < w.min_words),
        "long": -min(w.long_per_word * max(len(reply) - w.max_words, 0), w.long_cap),
    }


@functools.lru_cache(maxsize=1 << 16)  # labelling scores the same (prompt, response) many times; cached per process
def gold_score(prompt: str, response: str, weights: GoldWeights = GoldWeights()) -> float:
    """The gold reward of `response` to the last user turn of `prompt` (module docstring has the formula)."""
    return float(sum(gold_terms(prompt, response, weights).values()))


def preference_probability(gold_a: float, gold_b: float, temperature: float) -> float:
    """Bradley–Terry: P(a preferred over b) = σ((g_a − g_b) / T), written with tanh so it never overflows."""
    return 0.5 * (1.0 + math.tanh((gold_a - gold_b) / (2.0 * temperature)))


def plackett_luce_ranks(golds: list[float], temperature: float, rng: np.random.Generator) -> list[int]:
    """Sample a ranking (1 = best) from Plackett–Luce with utilities g/T.

    Sorting g/T + Gumbel noise in decreasing order has the same law as drawing the best by softmax(g/T), removing it and
    repeating (Yellott 1977); for K = 2 it is Bradley–Terry with the same temperature.
    """
    noisy = np.asarray(golds, dtype=np.float64) / temperature + rng.gumbel(size=len(golds))  # (K,)
    order = np.argsort(-noisy, kind="stable")  # (K,) indices, best first
    ranks = np.empty(len(golds), dtype=np.int64)
    ranks[order] = np.arange(1, len(golds) + 1)
    return ranks.tolist()


@dataclass(frozen=True)
class SimulatedLabeler:
    """A noisy labeler whose preferences follow Bradley–Terry / Plackett–Luce on the gold score."""

    temperature: float = 0.4
    """noise of the labels: P(a ≻ b) = σ((g_a − g_b)/T); 0.4 gives ~80 % agreement with the gold order on the demo
    comparisons (InstructGPT reports ~73 % agreement between human labelers)"""
    weights: GoldWeights = GoldWeights()
    """the terms and weights of the gold score"""

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"labeler temperature must be > 0, got {self.temperature}")

    def score(self, prompt: str, response: str) -> float:
        return gold_score(prompt, response, self.weights)

    def score_batch(self, prompts: list[str], responses: list[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return [self.score(p, r) for p, r in zip(prompts, responses)]

    def prefer(self, prompt: str, a: str, b: str, rng: np.random.Generator) -> bool:
        """True if the labeler prefers `a` over `b` (one Bradley–Terry draw)."""
        p = preference_probability(self.score(prompt, a), self.score(prompt, b), self.temperature)
        return bool(rng.random() < p)

    def rank(self, prompt: str, responses: list[str], rng: np.random.Generator) -> list[int]:
        """Ranks (1 = best) of `responses`, one Plackett–Luce draw."""
        return plackett_luce_ranks(self.score_batch([prompt] * len(responses), responses), self.temperature, rng)
