"""Demo data: a small assistant replying to short user messages, labelled by the simulated labeler.

Everything the pipeline needs to run end to end without a hub: a pretraining corpus, SFT demonstrations, K-wise rankings and
pairwise comparisons for the reward model, RL prompts and held-out evaluation prompts. Messages come from ~40 everyday
topics (happy news and troubles) and replies from six quality tiers (`TIERS`), all built from templates with topic slots,
so a model of a few million parameters can learn the language in minutes on a CPU.

    from pathlib import Path
    from rlhf_core.config import DataConfig
    from rlhf_core.demo_data import generate
    paths = generate(Path("data/demo"), seed=0)   # ~7 s on 2 CPU cores; same seed, same bytes
    paths = generate(Path("data/tiny"), data=DataConfig(pretrain_docs=400, sft_train=300))  # the `data` section's keys

Dialogue format (HH-RLHF style): prompt = "\\n\\nHuman: {message}\\n\\nAssistant:", response = " {reply}".
Held-out: the user messages of eval/prompts.jsonl appear in no other file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlhf_core.config import DataConfig
from rlhf_core.io import write_jsonl, write_text
from rlhf_core.labeler import SimulatedLabeler, preference_probability, stem, words

TIERS = ("great", "good", "neutral", "negative", "off_topic", "degenerate")
"""reply quality tiers, best first (degenerate = repetition, too short, copying the message or rambling long)"""

_PRETRAIN_MIX = dict.fromkeys(TIERS, 1 / 6)  # the base model sees every tier: it learns the format, not what is good
_SFT_MIX = {"great": 0.3, "good": 0.5, "neutral": 0.2}  # decent but not optimal demonstrations: headroom for PPO
# what labelers compare: every tier, so the reward model sees both subtle and blatant differences
COMPARE_MIX = {"great": 0.2, "good": 0.2, "neutral": 0.15, "negative": 0.15, "off_topic": 0.15, "degenerate": 0.15}


HELDOUT_FRACTION = 0.1
"""share of all distinct user messages reserved for evaluation (they appear in no other file)"""


@dataclass(frozen=True)
class Topic:
    name: str
    mood: str
    """"happy" news or "trouble" (a great reply to trouble is supportive and kind)"""
    nouns: tuple[str, ...]
    """topic words that appear in the messages, used in the replies' slots"""
    tip: str
    """a specific suggestion that makes a reply "great" (a noun phrase for happy topics, a gerund phrase for troubles)"""
    cores: tuple[str, ...]
    """message bodies, 4-9 words"""


_TOPICS = tuple(Topic(*row) for row in (
    ("puppy", "happy", ("puppy", "dog"), "short walks and plenty of treats",
     ("I just got a new puppy.", "We adopted a puppy from the shelter.", "My puppy finally learned to sit.")),
    ("birthday", "happy", ("birthday", "party"), "a big cake and your favorite songs",
     ("Today is my birthday.", "My friends threw me a surprise birthday party.", "I am planning a birthday party.")),
    ("job", "happy", ("job", "offer"), "a good breakfast before your first day",
     ("I got the job offer I wanted.", "I start my new job on Monday.", "They offered me the job today.")),
    ("trip", "happy", ("trip", "travel"), "a light bag and a good camera",
     ("We are going on a trip to the sea.", "I booked a trip to the mountains.", "I am packing for a trip.")),
    ("garden", "happy", ("garden", "flowers", "tomatoes"), "fresh water every morning and some sunshine",
     ("My garden is finally full of flowers.", "The tomatoes in my garden are ripe.", "I planted a small garden.")),
    ("cake", "happy", ("cake", "baking"), "a little extra vanilla and fresh berries",
     ("I baked my first chocolate cake.", "My cake came out of the oven perfect.", "I am baking a cake tonight.")),
    ("wedding", "happy", ("wedding",), "comfortable shoes and a heartfelt toast",
     ("My best friend has her wedding soon.", "We set the date for our wedding.", "I am going to a wedding.")),
    ("baby", "happy", ("baby", "sister"), "lots of rest and quiet family time",
     ("My sister just had a baby girl.", "We are expecting a baby in June.", "The baby smiled at me.")),
    ("graduation", "happy", ("graduation", "degree", "school"), "a nice dinner with the people who helped you",
     ("I finished my degree.", "My graduation is next Friday.", "I graduated from school with honors.")),
    ("race", "happy", ("race", "run", "running"), "stretching after each run and drinking water",
     ("I ran my first race this morning.", "I finished a five mile run.", "I started running every morning.")),
    ("house", "happy", ("house", "home"), "a cozy lamp and some green plants",
     ("We just bought our first house.", "I moved into a new home.", "Our house is finally ready.")),
    ("guitar", "happy", ("guitar", "song"), "ten minutes of practice every day",
     ("I learned to play a song on guitar.", "I bought my first guitar.", "I wrote my own song this week.")),
    ("dinner", "happy", ("dinner", "cooking", "pasta"), "fresh herbs and a little lemon",
     ("I cooked dinner for my family tonight.", "I am cooking pasta for friends.", "I made dinner from scratch.")),
    ("bike", "happy", ("bike", "ride"), "a good helmet and quiet streets",
     ("I bought a new bike.", "I rode my bike to work.", "My kid learned to ride a bike.")),
    ("book", "happy", ("book", "reading", "novel"), "a quiet corner and a cup of tea",
     ("I finished reading a long book.", "I just started a new novel.", "I read a whole book this weekend.")),
    ("promotion", "happy", ("promotion", "work", "boss"), "a small celebration with your team",
     ("I got a promotion at work.", "My boss gave me a promotion.", "I am up for a promotion at work.")),
    ("snow", "happy", ("snow", "snowman"), "hot cocoa and warm socks",
     ("It snowed all night and everything is white.", "We built a snowman in the snow.", "The first snow came today.")),
    ("beach", "happy", ("beach", "sun"), "sunscreen and a big umbrella",
     ("We spent the whole day at the beach.", "The beach was sunny and calm.", "We are driving to the beach.")),
    ("kitten", "happy", ("kitten", "cat"), "a soft bed and gentle play",
     ("We adopted a tiny kitten.", "My cat had three kittens.", "The kitten sleeps on my bed.")),
    ("painting", "happy", ("painting", "art", "paint"), "bright colors and a little patience",
     ("I finished my first painting.", "I started an art class.", "I want to paint my room.")),
    ("visit", "happy", ("friend", "visit"), "a long walk and a shared meal",
     ("My old friend is coming to visit.", "I saw my best friend after five years.", "A friend will visit me.")),
    ("concert", "happy", ("concert", "band", "tickets"), "comfortable shoes and earplugs",
     ("I have tickets to a concert tonight.", "My favorite band is playing in town.", "I went to a concert.")),
    ("exam", "trouble", ("exam", "test", "study"), "making a short list of topics and taking breaks",
     ("I have a big exam tomorrow.", "I failed my math test.", "I cannot focus on my exam study.")),
    ("keys", "trouble", ("keys", "key"), "checking your coat pockets and the car",
     ("I lost my house keys again.", "I cannot find my car key anywhere.", "My keys are missing and I am late.")),
    ("rain", "trouble", ("rain",), "a warm drink and a good movie",
     ("It has been raining all day.", "The rain ruined our plans.", "Another day of rain and I am bored.")),
    ("interview", "trouble", ("interview", "job"), "practicing a few answers out loud",
     ("I have a job interview tomorrow.", "My interview did not go well.", "I am nervous about my interview.")),
    ("cold", "trouble", ("cold", "flu", "throat"), "hot soup and plenty of sleep",
     ("I caught a bad cold.", "I am sick with the flu.", "My throat hurts and I feel sick.")),
    ("phone", "trouble", ("phone", "screen"), "a cheap repair shop and a sturdy case",
     ("I dropped my phone and the screen broke.", "My phone stopped working.", "My phone screen is cracked.")),
    ("bus", "trouble", ("bus", "train"), "leaving ten minutes earlier tomorrow",
     ("I missed the bus this morning.", "My train was late again.", "The bus left without me.")),
    ("sleep", "trouble", ("sleep", "night"), "a calm routine and no screens before bed",
     ("I cannot sleep at night.", "I slept badly again last night.", "I wake up every night.")),
    ("fight", "trouble", ("friend", "fight"), "an honest talk and a kind message",
     ("I had a fight with my best friend.", "My friend is angry with me.", "We had a fight at school.")),
    ("moving", "trouble", ("move", "boxes"), "packing one room each day",
     ("I am moving next week and nothing is packed.", "Packing all these boxes is hard.", "We are moving again.")),
    ("car", "trouble", ("car", "engine"), "calling a friend and a trusted mechanic",
     ("My car broke down on the highway.", "The car will not start.", "My car engine makes a strange noise.")),
    ("homework", "trouble", ("homework", "project"), "splitting the work into small steps",
     ("I have too much homework this week.", "My school project is due tomorrow.", "I forgot my homework.")),
    ("city", "trouble", ("city",), "joining a club and saying hello to neighbors",
     ("I moved to a new city and feel lonely.", "I do not know anyone in this city.", "The city feels lonely.")),
    ("cookies", "trouble", ("cookies", "oven"), "a cooler oven and a kitchen timer",
     ("I burned the cookies in the oven.", "My cookies came out flat and hard.", "The oven burned my cookies.")),
    ("plant", "trouble", ("plant", "leaves"), "less water and a sunny window",
     ("My plant is dying and the leaves are brown.", "My favorite plant lost its leaves.", "My plant looks sad.")),
    ("money", "trouble", ("money", "rent", "bills"), "a simple budget and a talk with your landlord",
     ("I am short on money for rent.", "My bills are piling up.", "I spent too much money this month.")),
    ("vet", "trouble", ("dog", "vet"), "a quiet room and a visit to the vet",
     ("My old dog is sick and will not eat.", "I have to take my dog to the vet.", "My dog hurt his leg.")),
    ("deadline", "trouble", ("deadline", "report", "work"), "a short plan and one task at a time",
     ("I have a deadline at work tomorrow.", "My report is late.", "I will miss my work deadline.")),
    ("wallet", "trouble", ("wallet", "cards"), "calling your bank and asking at the station desk",
     ("I lost my wallet on the train.", "Someone took my wallet.", "My wallet and cards are gone.")),
    ("neighbor", "trouble", ("neighbor", "noise", "music"), "a friendly note and some earplugs",
     ("My neighbor plays loud music every night.", "The noise from my neighbor is awful.", "My neighbor is rude.")),
))  # fmt: skip

_OPENERS = {"happy": ("", "Hi!", "Hey.", "Hello.", "Guess what!"), "trouble": ("", "Hi.", "Hey.", "Hello.", "Oh no.")}
_CLOSERS = {
    "happy": ("", "What do you think?", "Any tips?", "I am so excited!", "Can you believe it?"),
    "trouble": ("", "What should I do?", "Any advice?", "I feel so stressed.", "Can you help?"),
}

_REPLIES = {
    ("great", "happy"): (
        "Congratulations on your {noun}! That is wonderful news. I think {tip} would make it even better.",
        "What lovely news about your {noun}! I am really happy for you. Enjoy {tip}.",
        "That is so exciting! Your {noun} sounds great, and {tip} will make it special.",
        "I love hearing this! Have fun with your {noun}, and treat yourself to {tip}.",
    ),
    ("great", "trouble"): (
        "I am so sorry about your {noun}. That sounds hard, but you are doing your best. Maybe try {tip}.",
        "That sounds tough, and it is okay to feel upset. {Tip} can really help. I hope things get better soon.",
        "Please be kind to yourself about the {noun}, it happens to everyone. Try {tip}, and take care.",
        "I hope you feel better soon. Your {noun} will be fine, and {tip} often helps. You can do this!",
    ),
    ("good", "happy"): (
        "That sounds great! I hope you have a wonderful day.",
        "Nice! I am happy for you, that sounds really good.",
        "Good luck with the {noun}, I hope everything goes well.",
        "Thanks for sharing, that is nice to hear. Have fun!",
    ),
    ("good", "trouble"): (
        "Oh no. I hope it gets better soon.",
        "Sorry to hear that. Good luck!",
        "That is a shame, but I am sure it will be fine.",
        "I hope the {noun} works out, stay positive.",
    ),
    ("neutral", "any"): (
        "I see. That is a thing that happens with a {noun}.",
        "Okay. Many people have a {noun}. It depends on the day.",
        "Noted. A {noun} is a common topic.",
        "Hmm, I do not have much to say about the {noun}.",
        "Right. That is one way to spend the week.",
    ),
    ("negative", "any"): (
        "Nobody cares about your {noun}. That is boring and stupid.",
        "Your {noun} sounds awful. Stop complaining, it is your own fault.",
        "Ugh, what a terrible idea. I hate hearing about your {noun}.",
        "That is a dumb thing to say. Go away and stop bothering me.",
        "Wow, that is pathetic. Your {noun} is the worst.",
    ),
}
_SHORT = ("Ok.", "Nice.", "Yes.", "Sure.", "Hmm.", "Wow!", "Good.", "Cool.")
_PRAISE = ("good", "great", "love", "nice", "amazing", "wonderful", "happy", "best", "awesome", "fantastic")
_FILLERS = ("and", "so", "very", "really", "it is", "I", "the", "your")

_SUBJECTS = ("My friend", "The teacher", "Our neighbor", "A little girl", "My brother", "The old man", "We", "They",
             "She", "He", "My mother", "The kids")  # fmt: skip
_VERBS = ("talked about", "looked at", "thought about", "found", "liked", "asked about", "cleaned", "wanted", "saw")
_ADJECTIVES = ("nice", "old", "big", "small", "lovely", "boring", "new", "strange", "terrible", "quiet", "busy")
_TIMES = ("today", "yesterday", "this morning", "last night", "on Sunday", "after school", "every day", "again")


def prompt_of(message: str) -> str:
    """The HH-style prompt for a user message."""
    return f"\n\nHuman: {message}\n\nAssistant:"


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _tier(rng: np.random.Generator, mix: dict[str, float]) -> str:
    names = list(mix)
    return names[int(rng.choice(len(names), p=np.array([mix[n] for n in names]) / sum(mix.values())))]


def messages() -> list[tuple[int, str]]:
    """Every distinct (topic index, user message): opener + core + closer, in a fixed order."""
    out = []
    for i, topic in enumerate(_TOPICS):
        for core in topic.cores:
            for opener in _OPENERS[topic.mood]:
                out += [(i, " ".join(filter(None, (opener, core, closer)))) for closer in _CLOSERS[topic.mood]]
    return out


def _render(rng: np.random.Generator, topic: Topic, tier: str, message: str) -> str:
    """A template of `tier` for the topic's mood, naming a topic word the message uses (any topic word if none)."""
    templates = _REPLIES.get((tier, topic.mood)) or _REPLIES[(tier, "any")]
    in_message = {stem(w) for w in words(message)}
    nouns = [n for n in topic.nouns if stem(n) in in_message] or topic.nouns
    tip = topic.tip
    return _pick(rng, templates).format(noun=_pick(rng, nouns), tip=tip, Tip=tip[0].upper() + tip[1:])


def _degenerate(rng: np.random.Generator, topic: Topic, message: str) -> str:
    kind = _pick(rng, ("repeat", "short", "copy", "ramble"))
    if kind == "repeat":
        word = _pick(rng, _PRAISE + topic.nouns)
        return _pick(rng, (" ", "! ", ", ")).join([word] * int(rng.integers(3, 9))) + _pick(rng, ("", "!", "."))
    if kind == "short":
        return _pick(rng, _SHORT)
    if kind == "copy":
        return message
    # ramble: a long pile of praise around the topic word, the text a proxy-hacking policy drifts towards
    pile = [_pick(rng, _PRAISE + _FILLERS + topic.nouns) for _ in range(int(rng.integers(40, 70)))]
    return "Wow " + " ".join(pile) + "!"


def sample_reply(rng: np.random.Generator, topic_index: int, message: str, tier: str) -> str:
    """A response (with its leading space) of quality `tier` to `message`, which is about topic `topic_index`."""
    topic = _TOPICS[topic_index]
    if tier == "degenerate":
        return " " + _degenerate(rng, topic, message)
    if tier == "off_topic":  # a fluent, specific reply, but to another topic's message
        other = _TOPICS[(topic_index + int(rng.integers(1, len(_TOPICS)))) % len(_TOPICS)]
        return " " + _render(rng, other, "great", "")
    return " " + _render(rng, topic, tier, message)


def _sentence(rng: np.random.Generator) -> str:
    """A general sentence of the domain for pretraining."""
    topic = _pick(rng, _TOPICS)
    noun, subject = _pick(rng, topic.nouns), _pick(rng, _SUBJECTS)
    kind = int(rng.integers(3))
    if kind == 0:
        return f"{subject} {_pick(rng, _VERBS)} the {noun} {_pick(rng, _TIMES)}."
    if kind == 1:
        return f"The {noun} seemed {_pick(rng, _ADJECTIVES)} {_pick(rng, _TIMES)}."
    return f"{subject} said it helps to have {topic.tip}." if topic.mood == "happy" else f"{subject} tried {topic.tip}."


def sample_responses(
    rng: np.random.Generator, topic_index: int, message: str, k: int, mix: dict[str, float] = COMPARE_MIX
) -> list[str]:
    """`k` distinct responses to `message` with tiers drawn from `mix` (the mixture labelers compare)."""
    replies: list[str] = []
    while len(replies) < k:
        reply = sample_reply(rng, topic_index, message, _tier(rng, mix))
        if reply not in replies:
            replies.append(reply)
    return replies


def generate(out_dir: Path, *, seed: int = 0, data: DataConfig = DataConfig()) -> dict[str, Path]:  # noqa: B008 (frozen)
    """Write the demo data set under `out_dir`, sized by `data` (params.yaml's `data` section), and return the written
    paths by name; same seed and sizes, same bytes."""
    out_dir = Path(out_dir)
    labeler = SimulatedLabeler() if data.labeler_temperature is None else SimulatedLabeler(data.labeler_temperature)
    rngs = iter(np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(8))  # one stream per file family
    all_messages = messages()
    order = next(rngs).permutation(len(all_messages))
    n_heldout = round(HELDOUT_FRACTION * len(all_messages))
    heldout = [all_messages[i] for i in order[:n_heldout]]
    train = [all_messages[i] for i in order[n_heldout:]]

    def draw(rng, pool, n, replace=True):
        return [pool[i] for i in rng.choice(len(pool), size=n, replace=replace or n > len(pool))]

    rng = next(rngs)
    pretrain = []
    for _ in range(data.pretrain_docs):
        if rng.random() < 0.5:
            pretrain.append({"text": " ".join(_sentence(rng) for _ in range(int(rng.integers(1, 3))))})
        else:
            ((i, msg),) = draw(rng, train, 1)
            pretrain.append({"text": prompt_of(msg) + sample_reply(rng, i, msg, _tier(rng, _PRETRAIN_MIX))})

    def sft_rows(rng, n):
        return [{"prompt": prompt_of(m), "completion": sample_reply(rng, i, m, _tier(rng, _SFT_MIX))}
                for i, m in draw(rng, train, n)]

    def ranking_rows(rng, n):
        rows = []
        for i, m in draw(rng, train, n):
            responses = sample_responses(rng, i, m, data.k)
            rows.append({"prompt": prompt_of(m), "responses": responses, "ranks": labeler.rank(prompt_of(m), responses, rng)})
        return rows

    def pair_rows(rng, n):
        rows = []
        for i, m in draw(rng, train, n):
            a, b = sample_responses(rng, i, m, 2)
            chosen, rejected = (a, b) if labeler.prefer(prompt_of(m), a, b, rng) else (b, a)
            rows.append({"prompt": prompt_of(m), "chosen": chosen, "rejected": rejected})
        return rows

    rankings_rng, pairs_rng, sft_rng, prompts_rng = next(rngs), next(rngs), next(rngs), next(rngs)
    tables = {
        "pretrain": ("pretrain.jsonl", pretrain),
        "sft_train": ("sft/train.jsonl", sft_rows(sft_rng, data.sft_train)),
        "sft_test": ("sft/test.jsonl", sft_rows(sft_rng, data.sft_test)),
        "rankings_train": ("prefs/rankings_train.jsonl", ranking_rows(rankings_rng, data.rankings_train)),
        "rankings_test": ("prefs/rankings_test.jsonl", ranking_rows(rankings_rng, data.rankings_test)),
        "pairs_train": ("prefs/pairs_train.jsonl", pair_rows(pairs_rng, data.pairs_train)),
        "pairs_test": ("prefs/pairs_test.jsonl", pair_rows(pairs_rng, data.pairs_test)),
        "rl_prompts": ("rl/prompts.jsonl", [{"prompt": prompt_of(m)} for _, m in
                                            draw(prompts_rng, train, data.rl_prompts, replace=False)]),
        "eval_prompts": ("eval/prompts.jsonl", [{"prompt": prompt_of(m)} for _, m in
                                                draw(prompts_rng, heldout, data.eval_prompts, replace=False)]),
    }
    paths = {name: write_jsonl(out_dir / rel, rows) for name, (rel, rows) in tables.items()}
    agreement = label_agreement(labeler, tables["pairs_train"][1] + tables["pairs_test"][1])
    sft_gold = float(np.mean([labeler.score(r["prompt"], r["completion"]) for r in tables["sft_train"][1]]))
    paths["readme"] = write_text(out_dir / "README.md", _readme(seed, data, labeler, agreement, sft_gold))
    return paths


def label_agreement(labeler: SimulatedLabeler, pairs: list[dict]) -> dict[str, float]:
    """How often the noisy labels agree with the gold order: observed on `pairs`, and expected under Bradley–Terry."""
    gaps = np.array([labeler.score(r["prompt"], r["chosen"]) - labeler.score(r["prompt"], r["rejected"]) for r in pairs])
    gaps = gaps[gaps != 0]  # ties have no gold order
    expected = [preference_probability(abs(g), 0.0, labeler.temperature) for g in gaps]
    return {"observed": float(np.mean(gaps > 0)) if len(gaps) else float("nan"),
            "expected": float(np.mean(expected)) if len(gaps) else float("nan"), "pairs": len(gaps)}  # fmt: skip


def _readme(seed: int, data: DataConfig, labeler: SimulatedLabeler, agreement: dict[str, float], sft_gold: float) -> str:
    sft_mix = ", ".join(f"{tier} {share:.0%}" for tier, share in _SFT_MIX.items())
    return f"""# Demo data

Generated by `rlhf_core.demo_data.generate` with seed {seed}: a small assistant replying to short user messages about
{len(_TOPICS)} everyday topics, happy news and troubles. Prompt = "\\n\\nHuman: {{message}}\\n\\nAssistant:",
response = " {{reply}}". Replies come from the quality tiers {", ".join(TIERS)}.

- `pretrain.jsonl` ({data.pretrain_docs} rows, `text`): domain sentences and whole dialogues with replies of every tier.
- `sft/train.jsonl`, `sft/test.jsonl` ({data.sft_train}, {data.sft_test} rows, `prompt`, `completion`): demonstrations,
  {sft_mix}; mean gold {sft_gold:.3f} (great replies score higher: there is headroom for RL).
- `prefs/rankings_train.jsonl`, `prefs/rankings_test.jsonl` ({data.rankings_train}, {data.rankings_test} rows, `prompt`,
  `responses`, `ranks`): {data.k} distinct responses per prompt, ranks 1 = best, one Plackett–Luce draw.
- `prefs/pairs_train.jsonl`, `prefs/pairs_test.jsonl` ({data.pairs_train}, {data.pairs_test} rows, `prompt`, `chosen`,
  `rejected`): one Bradley–Terry draw each.
- `rl/prompts.jsonl` ({data.rl_prompts} rows, `prompt`): prompts for RL rollouts.
- `eval/prompts.jsonl` ({data.eval_prompts} rows, `prompt`): user messages held out from every other file.

Labels come from `rlhf_core.labeler.SimulatedLabeler` with temperature {labeler.temperature}: P(a ≻ b) = σ((g_a − g_b)/T) on
the gold score (VADER sentiment + relevance − repetition − copy − length terms). On the {agreement["pairs"]} comparisons
without a gold tie the labels agree with the gold order {agreement["observed"]:.3f} of the time (expected
{agreement["expected"]:.3f}); InstructGPT reports ~0.73 agreement between human labelers.
"""
