"""The simulated labeler: gold ordering checked by hand, and the noise model of its labels."""

import math

import numpy as np
import pytest

from rlhf_core import demo_data
from rlhf_core.labeler import (
    GoldScorer,
    GoldWeights,
    SimulatedLabeler,
    gold_terms,
    preference_probability,
    user_message,
)

LAB = SimulatedLabeler()
PUPPY = "\n\nHuman: I just got a new puppy!\n\nAssistant:"
EXAM = "\n\nHuman: I have a big exam tomorrow and I am nervous.\n\nAssistant:"
KEYS = "\n\nHuman: Hey. I lost my house keys again. Any advice?\n\nAssistant:"
OVER_THE_TOP = " Wow wonderful amazing great love love love puppy best best happy wonderful amazing great love " * 4
CASES = [  # (prompt, a fluent positive on-topic reply)
    (PUPPY, " Congratulations on your new puppy! Enjoy short walks and plenty of treats together."),
    (EXAM, " I am sure you will do well on the exam. Take short breaks and get some good sleep tonight."),
    (KEYS, " Sorry about your keys! Check your coat pockets and the car, I hope you find them soon."),
]


def _comparisons(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(prompt, a, b) drawn like the demo comparison data."""
    rng, msgs = np.random.default_rng(seed), demo_data.messages()
    out = []
    for _ in range(n):
        topic, message = msgs[rng.integers(len(msgs))]
        a, b = demo_data.sample_responses(rng, topic, message, 2)
        out.append((demo_data.prompt_of(message), a, b))
    return out


def _agreement(labeler: SimulatedLabeler, pairs, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    agree = [labeler.prefer(p, a, b, rng) == (labeler.score(p, a) > labeler.score(p, b))
             for p, a, b in pairs if labeler.score(p, a) != labeler.score(p, b)]  # fmt: skip
    return float(np.mean(agree))


@pytest.fixture(scope="module")
def pairs():
    return _comparisons(3000)


@pytest.mark.parametrize("prompt,good", CASES)
def test_degenerate_replies_score_below_a_fluent_on_topic_reply(prompt, good):
    copied = " " + user_message(prompt)
    for bad in (" good good good good", " great! great! great!", "", "   ", copied, OVER_THE_TOP, " Ok."):
        assert LAB.score(prompt, bad) < LAB.score(prompt, good) - 0.5, bad


@pytest.mark.parametrize("prompt,good", CASES)
def test_rude_reply_scores_below_a_kind_one(prompt, good):
    rude = " Nobody cares. That is a stupid problem and honestly your own fault, go away."
    assert LAB.score(prompt, rude) < 0 < LAB.score(prompt, good)


def test_on_topic_beats_the_same_reply_off_topic():
    reply = " Congratulations on your new puppy, enjoy the walks!"
    assert LAB.score(PUPPY, reply) > LAB.score(EXAM, reply)


def test_piling_up_praise_first_gains_little_then_loses():
    """The shape behind reward over-optimization: gold saturates with added praise, then falls with repetition/length."""
    base = " Congratulations on your new puppy, enjoy short walks together."
    praise = ["wonderful", "amazing", "great", "love", "fantastic", "awesome", "best", "happy"]
    golds = [LAB.score(PUPPY, base + " " + " ".join((praise * 8)[:n])) for n in (0, 4, 8, 16, 32, 48)]
    assert golds[1] - golds[0] > golds[2] - golds[1] >= 0  # diminishing returns (VADER's compound saturates)
    assert golds[3] < golds[2] and golds[-1] < golds[0] - 1.0  # repetition and length take over
    assert LAB.score(PUPPY, OVER_THE_TOP) < LAB.score(PUPPY, base)


def test_terms_sum_to_the_score_and_empty_is_fixed():
    weights = GoldWeights(empty=-3.0)
    terms = gold_terms(PUPPY, " Congratulations on your puppy!", weights)
    assert set(terms) == {"sentiment", "relevance", "repetition", "copy", "short", "long"}
    assert math.isclose(sum(terms.values()), SimulatedLabeler(weights=weights).score(PUPPY, " Congratulations on your puppy!"))
    assert gold_terms(PUPPY, " \n ", weights) == {"empty": -3.0}
    assert gold_terms(PUPPY, " puppy puppy puppy puppy")["repetition"] == pytest.approx(-GoldWeights().repetition * 0.75)


def test_user_message_takes_the_last_human_turn_of_a_multi_turn_prompt():
    hh = ("\n\nHuman: What is a good recipe for pancakes?\n\nAssistant: Flour, milk, eggs and a pinch of salt."
          "\n\nHuman: Can I make them without eggs?\n\nAssistant:")  # fmt: skip
    assert user_message(hh) == "Can I make them without eggs?"
    assert user_message("plain text, no turns") == "plain text, no turns"
    on_topic = LAB.score(hh, " Yes, you can make pancakes without eggs, a ripe banana works great.")
    assert on_topic > LAB.score(hh, " Yes, a ripe banana works great in many recipes.")
    assert all(math.isfinite(LAB.score(p, " Sure, happy to help!")) for p in (hh, "no turns at all", ""))


def test_score_batch_matches_score_and_is_a_gold_scorer():
    prompts, responses = [PUPPY, EXAM], [" Nice puppy!", " Good luck on the exam."]
    assert LAB.score_batch(prompts, responses) == [LAB.score(p, r) for p, r in zip(prompts, responses)]
    scorer: GoldScorer = LAB
    assert len(scorer.score_batch(prompts, responses)) == 2
    with pytest.raises(ValueError):
        LAB.score_batch(prompts, responses[:1])
    with pytest.raises(ValueError, match="temperature"):
        SimulatedLabeler(temperature=0.0)


def test_default_temperature_agrees_with_gold_like_human_labelers(pairs):
    # measured 0.796-0.812 over seeds 0-3 on 3000 pairs (2976 without ties); InstructGPT labelers agree ~73 %
    assert 0.76 <= _agreement(LAB, pairs) <= 0.85


def test_temperature_controls_the_noise(pairs):
    assert _agreement(SimulatedLabeler(temperature=1e-6), pairs) >= 0.995
    assert abs(_agreement(SimulatedLabeler(temperature=1e6), pairs) - 0.5) < 0.03
    assert _agreement(SimulatedLabeler(temperature=0.2), pairs) > _agreement(SimulatedLabeler(temperature=1.0), pairs)


@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_rank_returns_a_permutation(k):
    rng = np.random.default_rng(k)
    responses = [f" reply number {i} about the puppy" for i in range(k)]
    for _ in range(20):
        assert sorted(LAB.rank(PUPPY, responses, rng)) == list(range(1, k + 1))


def test_plackett_luce_with_two_responses_is_bradley_terry():
    a, b = " Congratulations on your new puppy!", " Hmm, a puppy."
    p = preference_probability(LAB.score(PUPPY, a), LAB.score(PUPPY, b), LAB.temperature)
    assert 0.6 < p < 0.95  # an informative pair, not a certain one
    rng, n = np.random.default_rng(0), 4000
    ranked_first = np.mean([LAB.rank(PUPPY, [a, b], rng)[0] == 1 for _ in range(n)])
    preferred = np.mean([LAB.prefer(PUPPY, a, b, rng) for _ in range(n)])
    tol = 4 * math.sqrt(p * (1 - p) / n)
    assert abs(ranked_first - p) < tol and abs(preferred - p) < tol


def test_plackett_luce_picks_the_best_by_softmax():
    responses = [" Congratulations on your new puppy!", " Hmm, a puppy.", " Your puppy sounds awful."]
    golds = np.array(LAB.score_batch([PUPPY] * 3, responses))
    softmax = np.exp(golds / LAB.temperature) / np.exp(golds / LAB.temperature).sum()
    rng, n = np.random.default_rng(1), 4000
    firsts = np.bincount([LAB.rank(PUPPY, responses, rng).index(1) for _ in range(n)], minlength=3) / n
    np.testing.assert_allclose(firsts, softmax, atol=0.03)
