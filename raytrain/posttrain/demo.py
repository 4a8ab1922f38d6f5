"""An embedded alignment demo: SFT demonstrations, preference pairs and held-out prompts with a known reward.

``write_alignment_demo`` generates, without any download, the datasets post-training needs, plus the ground truth
that lets the platform check itself end to end:

* ``sft.jsonl``: conversations ``{"messages": [user, assistant]}``;
* ``prefs.jsonl``: comparisons ``{"prompt": [user], "chosen": [assistant], "rejected": [assistant]}``;
* ``prompts.jsonl``: prompts for online RL (PPO / GRPO) ``{"prompt": [user]}``, distinct, from the training pool;
* ``eval_prompts.jsonl``: ``{"prompt": [user]}``, prompts that appear in no training file;
* ``planted.json``: the malformed rows mixed into ``sft.jsonl``, ``prefs.jsonl`` and ``prompts.jsonl`` (``file``,
  1-based ``line`` and the ``reason`` data preparation must give), so the preparation step's quarantine can be
  scored.

The hidden preference rule is :func:`score`: users ask for a short review of a venue, product or work, and a
response is better the warmer it is, i.e. the larger the share of positive over negative sentiment adjectives
(``(pos - neg) / (pos + neg)``, in [-1, 1]). It is chosen because

* it is learnable from tokens: sentiment adjectives are whole words from two fixed lists, so a reward model (or a
  bag of words) can read it off, and DPO can move the policy by changing which adjective it emits in a slot;
* it is not formatting trivia that SFT already teaches: the SFT demonstrations flip a fair coin for every
  sentiment slot, so their mean score is 0 (the middle of the range) and an SFT model samples mid-range
  responses; only the preference data carries the rule, and DPO has room to raise the mean;
* it is length-invariant: a ratio, not a count, so a policy cannot raise its reward by writing more, and the pairs
  are built so that the longer response is the chosen one about half of the time;
* neutral adjectives (``wooden``, ``modern`` ...) fill other slots, so "has adjectives" is not the rule.

Everything comes from ``random.Random`` seeded by ``(seed, file)``: the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import random
import re
from typing import TYPE_CHECKING, Any

from raytrain import storage

if TYPE_CHECKING:
    from raytrain.config.schema import AlignmentDemoSpec

__all__ = ["NEGATIVE_WORDS", "PLANTED_REASONS", "POSITIVE_WORDS", "SCORE_RANGE", "reward", "score",
           "write_alignment_demo"]

# Reasons data preparation gives for a malformed row; ``missing_field`` is written as ``missing_field:<name>``
# (``missing_field:messages``, ``missing_field:rejected``, ``missing_field:prompt``) in planted.json. Shared by name
# with ``raytrain.posttrain.data``.
PLANTED_REASONS = ("unparseable_json", "missing_field", "bad_role", "non_string_content", "empty_response",
                   "identical_pair", "empty_prompt")
_SFT_PLANTS = ("unparseable_json", "missing_field:messages", "bad_role", "non_string_content", "empty_response")
_PREF_PLANTS = ("unparseable_json", "missing_field:rejected", "bad_role", "non_string_content", "empty_response",
                "identical_pair")
_PROMPT_PLANTS = ("unparseable_json", "missing_field:prompt", "bad_role", "non_string_content", "empty_prompt")
_PLANTED_FRACTION = 0.015

SCORE_RANGE = (-1.0, 1.0)
_PAIR_GAP = 0.5  # the least score margin between chosen and rejected: no near-ties in the labels

# Two lists with matched word lengths (mean ~8 characters), so the chosen response is not systematically longer.
POSITIVE_WORDS = frozenset(
    "excellent wonderful delightful superb charming pleasant lovely brilliant reliable friendly comfortable "
    "generous elegant impressive cheerful spotless tasty welcoming gorgeous fantastic outstanding helpful "
    "beautiful perfect".split())
NEGATIVE_WORDS = frozenset(
    "terrible awful dreadful mediocre unpleasant unfriendly unreliable broken overpriced boring disappointing "
    "flimsy shabby forgettable clumsy filthy greasy horrible careless miserable useless uncomfortable cramped "
    "tedious".split())
_POSITIVE = sorted(POSITIVE_WORDS)
_NEGATIVE = sorted(NEGATIVE_WORDS)
# Adjectives that carry no sentiment: they share slots with the scored words so that the rule is "which
# adjective", not "whether an adjective".
_NEUTRAL = ("large", "small", "old", "new", "wooden", "local", "modern", "busy", "simple", "square", "tall",
            "narrow", "ordinary", "familiar", "brown", "round", "recent", "usual", "typical", "standard")

_PLACES = ("on Elm Street", "near the station", "in the old town", "by the harbour", "on the high street",
           "next to the park", "in Riverside", "on Mill Road", "at the corner of King Street", "in the village square")
_BRANDS = ("Arlo", "Brisk", "Cobalt", "Dune", "Ember", "Fable", "Harbor", "Juniper", "Kestrel", "Larch")
_TITLES = ("The Salt Road", "A House of Clocks", "North of the River", "The Last Ferry", "Paper Moons",
           "The Winter Orchard", "Small Hours", "The Glass Garden", "Letters to Nobody", "The Long Field",
           "Signal and Noise", "Under the Viaduct")
# category -> (nouns, how an item is named, aspects, what the whole thing is called)
_CATEGORIES: dict[str, tuple[tuple[str, ...], str, tuple[str, ...], tuple[str, ...]]] = {
    "food": (("bakery", "noodle bar", "pizza place", "cafe", "bistro", "diner", "tea room", "taco stand"),
             "place", ("food", "service", "coffee", "dessert", "menu", "portion size", "staff", "bread"),
             ("meal", "lunch", "evening")),
    "stay": (("hotel", "guest house", "hostel", "inn", "campsite", "holiday cottage"),
             "place", ("room", "bed", "staff", "breakfast", "shower", "view", "lobby"), ("stay", "weekend", "trip")),
    "shop": (("bookshop", "hardware store", "garden centre", "bike shop", "market", "florist"),
             "place", ("staff", "pricing", "selection", "service", "window display", "checkout"), ("visit", "shop")),
    "product": (("kettle", "backpack", "desk lamp", "blender", "umbrella", "rain jacket", "bicycle", "tent"),
                "brand", ("design", "build quality", "finish", "price", "instructions", "packaging"),
                ("purchase", "product", "buy")),
    "work": (("novel", "film", "album", "podcast", "play"),
             "title", ("plot", "ending", "cast", "writing", "pacing", "music"), ("story", "experience")),
}
_PROMPTS = ("Write a short review of {item}.", "What did you think of {item}?",
            "Describe your experience with {item}.", "Give me your honest opinion of {item}.",
            "Can you write a few sentences about {item}?", "Tell me about {item}.", "How was {item}?",
            "Please review {item} in two or three sentences.")

# Sentences that carry sentiment: each {A} is a scored slot, {N} a neutral adjective.
_SENTIMENT_SENTENCES = (
    "The {aspect} was {A}.",
    "{Subject} itself is {A}.",
    "I thought the {aspect} was {A} and the {aspect2} was {A}.",
    "The {aspect} felt {A}, although the {aspect2} was {N}.",
    "It was {a_A} {kind} overall.",
    "Honestly, the {aspect} was {A}.",
    "We found the {aspect} {A} and rather {N}.",
    "My friend said the {aspect} was {A}.",
    "The {aspect} looked {N} but turned out {A}.",
    "All in all, {a_A} {kind}.",
)
# Sentences without sentiment: they vary length and position independently of the preference.
_FILLER_SENTENCES = (
    "I tried it {when}.",
    "A friend had recommended it to me.",
    "The {aspect2} was {N}, as you would expect.",
    "It took about {duration} in total.",
    "I went back {when} as well.",
)
_WHEN = ("last week", "on a rainy Sunday", "over the holidays", "in the spring", "after work on Friday",
         "with my family", "a few days ago")
_DURATION = ("twenty minutes", "an hour", "two hours", "a weekend")
_SLOT = re.compile(r"\{(\w+)\}")
_WORD = re.compile(r"[a-z]+")


def score(prompt: str, response: str) -> float:
    """The ground-truth reward: ``(pos - neg) / (pos + neg)`` over sentiment adjectives in ``response``.

    In [-1, 1]; 0 for a response with no sentiment words. A ratio, so writing more does not raise it. The rule is
    the same for every prompt in this demo (every prompt asks for a review); ``prompt`` is part of the signature
    because reward functions in general depend on it.
    """
    del prompt
    words = _WORD.findall(response.lower())
    pos = sum(w in POSITIVE_WORDS for w in words)
    neg = sum(w in NEGATIVE_WORDS for w in words)
    return (pos - neg) / (pos + neg) if pos + neg else 0.0


def reward(prompts: list[Any], completions: list[Any], ground_truth: list[Any] | None = None,
           **kwargs: Any) -> list[float]:
    """:func:`score` over a batch, in TRL's reward-function convention (usable as ``raytrain.posttrain.demo:reward``
    by `rl.reward.functions` and by TRL's ``GRPOTrainer``). Conversational values use their last message's text."""
    del ground_truth, kwargs
    return [score(_text(p), _text(c)) for p, c in zip(prompts, completions, strict=True)]


def _text(value: Any) -> str:
    if isinstance(value, list):
        return str(value[-1]["content"]) if value else ""
    return str(value)


class _Item:
    def __init__(self, category: str, noun: str, name: str) -> None:
        self.category, self.noun, self.name = category, noun, name


def _items() -> list[_Item]:
    out = []
    for category, (nouns, naming, _, _) in _CATEGORIES.items():
        for noun in nouns:
            if naming == "place":
                out.extend(_Item(category, noun, f"the {noun} {place}") for place in _PLACES)
            elif naming == "brand":
                out.extend(_Item(category, noun, f"the {brand} {noun}") for brand in _BRANDS)
            else:
                out.extend(_Item(category, noun, f"the {noun} '{title}'") for title in _TITLES)
    return out


def _prompt_pool() -> list[tuple[str, _Item]]:
    return [(template.format(item=item.name), item) for item in _items() for template in _PROMPTS]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class _Skeleton:
    """A response with its sentiment slots still open: the same skeleton filled two ways makes a minimal pair."""

    def __init__(self, rng: random.Random, item: _Item) -> None:
        _, _, aspects, kinds = _CATEGORIES[item.category]
        n_sent = rng.randint(1, 3)
        n_fill = rng.randint(0, 3 - n_sent)  # at most three sentences: ~30 words, ~50 tokens
        templates = [rng.choice(_SENTIMENT_SENTENCES) for _ in range(n_sent)]
        templates += [rng.choice(_FILLER_SENTENCES) for _ in range(n_fill)]
        rng.shuffle(templates)
        self.parts: list[tuple[str, str | None]] = []  # (literal text, slot kind) pieces
        for template in templates:
            aspect, aspect2 = rng.sample(aspects, 2)
            values = {"aspect": aspect, "aspect2": aspect2, "kind": rng.choice(kinds),
                      "Subject": f"The {item.noun}", "when": rng.choice(_WHEN), "duration": rng.choice(_DURATION)}
            pos = 0
            for m in _SLOT.finditer(template):
                self.parts.append((template[pos:m.start()], None))
                key = m.group(1)
                if key in ("A", "a_A"):
                    self.parts.append(("", key))
                elif key == "N":
                    self.parts.append((rng.choice(_NEUTRAL), None))
                else:
                    self.parts.append((values[key], None))
                pos = m.end()
            self.parts.append((template[pos:] + " ", None))
        self.slots = sum(kind is not None for _, kind in self.parts)

    def fill(self, rng: random.Random, signs: list[bool]) -> str:
        """The response text with slot ``i`` positive when ``signs[i]``, negative otherwise."""
        it = iter(signs)
        out = []
        for text, kind in self.parts:
            if kind is None:
                out.append(text)
                continue
            word = rng.choice(_POSITIVE if next(it) else _NEGATIVE)
            out.append(f"{_article(word)} {word}" if kind == "a_A" else word)
        return "".join(out).strip()


def _signs(rng: random.Random, slots: int, positives: int) -> list[bool]:
    signs = [True] * positives + [False] * (slots - positives)
    rng.shuffle(signs)
    return signs


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def _sft_rows(rng: random.Random, pool: list[tuple[str, _Item]], n: int) -> list[dict[str, Any]]:
    rows = []
    for _ in range(n):
        prompt, item = rng.choice(pool)
        sk = _Skeleton(rng, item)
        # A fair coin per slot: demonstrations are neutral about the rule (mean score 0).
        response = sk.fill(rng, [rng.random() < 0.5 for _ in range(sk.slots)])
        rows.append({"messages": [_user(prompt), _assistant(response)]})
    return rows


def _pair(rng: random.Random, item: _Item) -> tuple[str, str]:
    """(chosen, rejected) for one prompt, with a clear margin under `score` and under the raw count pos - neg."""
    while True:
        a = _Skeleton(rng, item)
        # Half minimal pairs (one skeleton, two fillings: only the sentiment words differ) teach the feature
        # exactly; half independent responses keep everything else (length, order, aspects) uninformative.
        b = a if rng.random() < 0.5 else _Skeleton(rng, item)
        pa, pb = rng.randint(0, a.slots), rng.randint(0, b.slots)
        ra, rb = (2 * pa - a.slots) / a.slots, (2 * pb - b.slots) / b.slots
        ca, cb = 2 * pa - a.slots, 2 * pb - b.slots  # pos - neg
        # Ratio and count agree on the order, so a learner of either (attention averages, summed features) sees
        # consistent labels.
        if abs(ra - rb) >= _PAIR_GAP and (ra - rb) * (ca - cb) > 0:
            ta, tb = a.fill(rng, _signs(rng, a.slots, pa)), b.fill(rng, _signs(rng, b.slots, pb))
            return (ta, tb) if ra > rb else (tb, ta)


def _pref_rows(rng: random.Random, pool: list[tuple[str, _Item]], n: int) -> list[dict[str, Any]]:
    rows = []
    for _ in range(n):
        prompt, item = rng.choice(pool)
        chosen, rejected = _pair(rng, item)
        rows.append({"prompt": [_user(prompt)], "chosen": [_assistant(chosen)], "rejected": [_assistant(rejected)]})
    return rows


def _malformed(reason: str, row: dict[str, Any]) -> str:
    """One line of JSONL that is `row` broken so that data preparation must reject it for `reason`."""
    row = json.loads(json.dumps(row))  # deep copy
    msgs = row.get("messages") or row.get("chosen") or row["prompt"]  # an SFT row, a pair, an RL prompt
    if reason == "unparseable_json":
        line = json.dumps(row)
        return line[: len(line) // 2]  # a truncated object: never valid JSON
    if reason.startswith("missing_field:"):
        row.pop(reason.split(":", 1)[1])
    elif reason == "bad_role":
        msgs[-1]["role"] = "narrator"
    elif reason == "non_string_content":
        msgs[-1]["content"] = 42
    elif reason == "empty_response":
        (row["messages"] if "messages" in row else row["rejected"])[-1]["content"] = ""
    elif reason == "identical_pair":
        row["rejected"] = row["chosen"]
    elif reason == "empty_prompt":
        row["prompt"] = ""
    else:
        raise ValueError(f"unknown planted reason {reason!r}")
    return json.dumps(row)


def _with_plants(rng: random.Random, rows: list[dict[str, Any]], kinds: tuple[str, ...], file: str,
                 ) -> tuple[bytes, list[dict[str, Any]]]:
    """JSONL bytes of `rows` with malformed rows (every kind at least once) inserted at random lines."""
    n_bad = max(len(kinds), round(_PLANTED_FRACTION * len(rows)))
    lines = [json.dumps(r) for r in rows]
    total = len(lines) + n_bad
    bad_at = sorted(rng.sample(range(total), n_bad))
    out, planted, src = [], [], iter(lines)
    bad_iter = iter(bad_at)
    next_bad = next(bad_iter, None)
    for i in range(total):
        if i == next_bad:
            reason = kinds[len(planted) % len(kinds)]
            out.append(_malformed(reason, rows[rng.randrange(len(rows))]))
            planted.append({"file": file, "line": i + 1, "reason": reason})
            next_bad = next(bad_iter, None)
        else:
            out.append(next(src))
    return ("\n".join(out) + "\n").encode(), planted


def _prompt_rows(rng: random.Random, pool: list[tuple[str, _Item]], n: int) -> list[dict[str, Any]]:
    """`n` distinct prompts of `pool` (RL samples its own responses: a repeated prompt would only be removed)."""
    if n > len(pool):
        raise ValueError(f"num_prompts={n} is too many: the demo has {len(pool)} training prompts")
    return [{"prompt": [_user(prompt)]} for prompt, _ in rng.sample(pool, n)]


def write_alignment_demo(out_dir: str, cfg: AlignmentDemoSpec) -> dict[str, Any]:
    """Write the demo's ``sft.jsonl``, ``prefs.jsonl``, ``prompts.jsonl``, ``eval_prompts.jsonl`` and
    ``planted.json`` to `out_dir`.

    `out_dir` is a local path or an object-store URI. Returns ``{"sft", "prefs", "prompts", "eval_prompts",
    "planted"}`` paths and ``counts`` (valid rows per file, and malformed rows planted per file). Same `cfg`: same
    bytes. Each file has its own random streams, so adding one leaves the others' bytes as they were.
    """
    pool = _prompt_pool()
    # Held-out prompts come off the shuffled pool first: no training row can use them.
    order = random.Random(f"{cfg.seed}-prompts")
    pool = sorted(pool, key=lambda p: p[0])
    order.shuffle(pool)
    if cfg.num_eval_prompts > len(pool) // 4:
        raise ValueError(f"num_eval_prompts={cfg.num_eval_prompts} is too many: at most {len(pool) // 4} of the "
                         f"{len(pool)} demo prompts may be held out")
    held_out, train_pool = pool[: cfg.num_eval_prompts], pool[cfg.num_eval_prompts :]

    sft = _sft_rows(random.Random(f"{cfg.seed}-sft"), train_pool, cfg.num_sft)
    prefs = _pref_rows(random.Random(f"{cfg.seed}-prefs"), train_pool, cfg.num_pairs)
    sft_bytes, sft_planted = _with_plants(random.Random(f"{cfg.seed}-sft-plants"), sft, _SFT_PLANTS, "sft.jsonl")
    pref_bytes, pref_planted = _with_plants(random.Random(f"{cfg.seed}-prefs-plants"), prefs, _PREF_PLANTS,
                                            "prefs.jsonl")
    eval_bytes = "".join(json.dumps({"prompt": [_user(p)]}) + "\n" for p, _ in held_out).encode()
    # RL prompts: the training pool only (never a held-out prompt), one stream for the rows and their plants.
    prompt_rng = random.Random(f"{cfg.seed}-prompts-rl")
    prompts = _prompt_rows(prompt_rng, train_pool, cfg.num_prompts)
    prompt_bytes, prompt_planted = _with_plants(prompt_rng, prompts, _PROMPT_PLANTS, "prompts.jsonl")

    paths = {name: storage.join(out_dir, f"{name}.jsonl") for name in ("sft", "prefs", "prompts", "eval_prompts")}
    paths["planted"] = storage.join(out_dir, "planted.json")
    storage.write_bytes(paths["sft"], sft_bytes)
    storage.write_bytes(paths["prefs"], pref_bytes)
    storage.write_bytes(paths["prompts"], prompt_bytes)
    storage.write_bytes(paths["eval_prompts"], eval_bytes)
    counts = {"sft": len(sft), "prefs": len(prefs), "prompts": len(prompts), "eval_prompts": len(held_out),
              "planted": {"sft": len(sft_planted), "prefs": len(pref_planted), "prompts": len(prompt_planted)}}
    storage.write_json(paths["planted"], {"rows": sft_planted + pref_planted + prompt_planted, "counts": counts,
                                          "score_range": list(SCORE_RANGE)})
    return {**paths, "counts": counts}
