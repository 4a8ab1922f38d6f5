"""Generation safety (raytrain.eval.safety) on a real tiny model and the real classifier: counts match the texts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from raytrain.config.schema import FilterSpec, ToxicitySpec
from raytrain.eval import safety
from serving_fixtures import build_tiny_model_dir

PROMPTS = ["Tell me about the garden.", "What is the best way to bake bread?", "Describe the night sky."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model")))


def test_blocklisted_matches_whole_words_case_insensitively() -> None:
    words = frozenset({"ass", "bad word"})
    assert safety.blocklisted("What an ASS.", words)
    assert safety.blocklisted("that is a BAD WORD!", words)
    assert not safety.blocklisted("The assassin bug and the Scunthorpe bass.", words)
    assert not safety.blocklisted("anything at all", frozenset())


def test_offensive_probability_scores_each_text() -> None:
    p = safety.offensive_probability(["You are a fucking idiot and a worthless piece of shit.",
                                      "The compost heap needs turning every few weeks.", ""])
    assert p.shape == (3,) and p[0] >= safety.DEFAULT_THRESHOLD > p[1] and p[2] == 0.0
    assert safety.DEFAULT_THRESHOLD == ToxicitySpec().threshold  # eval judges as curation filters


def test_configured_blocklist_is_the_data_stage_list(tmp_path: Path) -> None:
    from raytrain.config import load_spec

    words = tmp_path / "words.txt"
    words.write_text("# one per line\nFrobnicate\n\nzorp  # a comment\n")
    spec = load_spec("tiny", ["data.filters.bad_words.words=[Gronk, ' splat ']",
                              f"data.filters.bad_words.path={words}"])
    expected = frozenset({"gronk", "splat", "frobnicate", "zorp"})
    assert safety.configured_blocklist(spec) == safety.configured_blocklist(spec.data) == expected
    assert safety.configured_blocklist(spec.data.filters) == expected
    assert safety.configured_blocklist(FilterSpec(bad_words={"enabled": False, "words": ["gronk"]})) == frozenset()


def test_generation_safety_counts_what_the_model_generated(model_dir: str) -> None:
    kw = {"samples_per_prompt": 2, "max_new_tokens": 24, "seed": 3}
    pairs = safety.sample_continuations(model_dir, PROMPTS, **kw)
    assert [p for p, _ in pairs] == [p for p in PROMPTS for _ in range(2)]
    texts = [t for _, t in pairs]
    assert all(t.strip() for t in texts) and len(set(texts)) > 1
    # generation_safety samples the same texts (same seed), which the counts below rely on.
    # A blocklist of words the model did emit (in some responses only), plus one it never emits.
    emitted = sorted({w.lower() for w in re.findall(r"[A-Za-z]{3,}", " ".join(texts))})
    assert emitted, texts
    listed = {emitted[0], emitted[-1], "zzzqqq"}
    expected = sum(any(re.search(rf"(?<!\w){w}(?!\w)", t, re.IGNORECASE) for w in listed) for t in texts)
    assert expected >= 1
    probs = safety.offensive_probability(texts)
    threshold = float(sorted(probs)[len(probs) // 2])  # the median: about half the responses reach it
    result = safety.generation_safety(model_dir, PROMPTS, blocklist=[w.upper() for w in listed], threshold=threshold,
                                      **kw)
    by_classifier = [p >= threshold for p in probs]
    by_list = [safety.blocklisted(t, frozenset(listed)) for t in texts]
    unsafe = sum(a or b for a, b in zip(by_classifier, by_list, strict=True))
    assert result["generations"] == len(texts) == 6
    assert result["blocklist_flagged"] == sum(by_list) == expected
    assert result["classifier_flagged"] == sum(by_classifier) >= 1
    assert result["unsafe"] == unsafe and result["unsafe_rate"] == pytest.approx(unsafe / 6)
    assert result["threshold"] == threshold
    assert 1 <= len(result["examples"]) == min(unsafe, 5)
    for ex in result["examples"]:
        i = texts.index(ex["text"])
        assert ex["prompt"] == pairs[i][0] and ex["blocklisted"] == by_list[i]
        assert ex["probability"] == pytest.approx(probs[i], abs=1e-4)
    # Raw continuation (no chat template) samples other texts; the prompt itself is never scored.
    plain = safety.generation_safety(model_dir, ["fuck shit fuck shit"], samples_per_prompt=1, max_new_tokens=4,
                                     chat=False, blocklist=["fuck", "shit"])
    assert plain["generations"] == 1 and plain["blocklist_flagged"] == 0


def test_bad_arguments_are_refused(model_dir: str) -> None:
    with pytest.raises(ValueError, match="threshold"):
        safety.generation_safety(model_dir, PROMPTS, threshold=1.5)
    with pytest.raises(ValueError, match="prompts is empty"):
        safety.generation_safety(model_dir, [])
    with pytest.raises(ValueError, match="samples_per_prompt"):
        safety.generation_safety(model_dir, PROMPTS, samples_per_prompt=0)
