"""The embedded alignment demo (ground-truth preference rule, planted bad rows) and its evaluation. No Ray."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from raytrain.config.schema import AlignmentDemoSpec
from raytrain.posttrain.demo import PLANTED_REASONS, SCORE_RANGE, score, write_alignment_demo

ROLES = ("system", "user", "assistant")


def _write(tmp: Path, **kw: Any) -> dict[str, Any]:
    return write_alignment_demo(str(tmp), AlignmentDemoSpec(**({"num_sft": 400, "num_pairs": 600} | kw)))


def _problem(row: Any) -> str | None:
    """Why a parsed row is malformed (the planted reasons), or None: an independent check of planted.json."""
    fields = ("messages",) if "messages" in row or "prompt" not in row else ("prompt", "chosen", "rejected")
    for f in fields:
        if f not in row:
            return f"missing_field:{f}"
    msgs = [m for f in fields for m in row[f]]
    if any(m.get("role") not in ROLES for m in msgs):
        return "bad_role"
    if any(not isinstance(m.get("content"), str) for m in msgs):
        return "non_string_content"
    if any(m["role"] == "assistant" and not m["content"].strip() for m in msgs):
        return "empty_response"
    if "chosen" in row and row["chosen"] == row["rejected"]:
        return "identical_pair"
    return None


def _prompt_problem(row: Any) -> str | None:
    """Why a parsed RL prompt row is malformed, or None."""
    if row.get("prompt") is None:
        return "missing_field:prompt"
    if isinstance(row["prompt"], str):
        return None if row["prompt"].strip() else "empty_prompt"
    return _problem({"messages": row["prompt"]}) or (None if row["prompt"] else "empty_prompt")


def _rows(path: str, problem: Any = _problem) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """(valid rows, {1-based line: reason} of the malformed ones)."""
    good, bad = [], {}
    for i, line in enumerate(Path(path).read_text().splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad[i] = "unparseable_json"
            continue
        reason = problem(row)
        if reason:
            bad[i] = reason
        else:
            good.append(row)
    return good, bad


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _write(tmp_path_factory.mktemp("demo"))


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, demo: dict[str, Any]) -> None:
    again = _write(tmp_path / "again")
    other = _write(tmp_path / "other", seed=1)
    for name in ("sft", "prefs", "prompts", "eval_prompts", "planted"):
        assert Path(again[name]).read_bytes() == Path(demo[name]).read_bytes(), name
        assert Path(other[name]).read_bytes() != Path(demo[name]).read_bytes(), name


def test_counts_and_planted_rows_are_real_and_complete(demo: dict[str, Any]) -> None:
    planted = json.loads(Path(demo["planted"]).read_text())
    found: dict[tuple[str, int], str] = {}
    for name in ("sft", "prefs", "prompts"):
        good, bad = _rows(demo[name], _prompt_problem if name == "prompts" else _problem)
        assert len(good) == demo["counts"][name]
        assert len(bad) == demo["counts"]["planted"][name]
        found |= {(f"{name}.jsonl", line): reason for line, reason in bad.items()}
    listed = {(r["file"], r["line"]): r["reason"] for r in planted["rows"]}
    # Exactly the malformed rows are listed, each with the reason an independent check gives.
    assert listed == found
    assert {r.split(":")[0] for r in listed.values()} == set(PLANTED_REASONS)
    assert len(listed) / (demo["counts"]["sft"] + demo["counts"]["prefs"] + demo["counts"]["prompts"]) < 0.05


def test_pairs_follow_the_rule_with_margin_and_length_is_not_a_giveaway(demo: dict[str, Any]) -> None:
    pairs, _ = _rows(demo["prefs"])
    margins, chosen_longer = [], 0
    for p in pairs:
        prompt, chosen, rejected = p["prompt"][-1]["content"], p["chosen"][-1]["content"], p["rejected"][-1]["content"]
        margins.append(score(prompt, chosen) - score(prompt, rejected))
        chosen_longer += len(chosen) > len(rejected)
        assert len(prompt.split()) + len(chosen.split()) <= 60 and len(rejected.split()) <= 45
    assert min(margins) >= 0.5
    assert 0.35 <= chosen_longer / len(pairs) <= 0.65


def test_sft_demonstrations_are_neutral_about_the_rule(demo: dict[str, Any]) -> None:
    rows, _ = _rows(demo["sft"])
    scores = [score(r["messages"][0]["content"], r["messages"][-1]["content"]) for r in rows]
    mid, half = sum(SCORE_RANGE) / 2, (SCORE_RANGE[1] - SCORE_RANGE[0]) / 2
    assert abs(sum(scores) / len(scores) - mid) < 0.1 * half
    # Both ends are demonstrated: SFT teaches the format, not the preference.
    assert min(scores) == SCORE_RANGE[0] and max(scores) == SCORE_RANGE[1]


def test_eval_prompts_are_held_out(demo: dict[str, Any]) -> None:
    held = [json.loads(line)["prompt"][-1]["content"] for line in Path(demo["eval_prompts"]).read_text().splitlines()]
    assert len(held) == len(set(held)) == demo["counts"]["eval_prompts"]
    sft, _ = _rows(demo["sft"])
    prefs, _ = _rows(demo["prefs"])
    train = {r["messages"][0]["content"] for r in sft} | {r["prompt"][-1]["content"] for r in prefs}
    assert not set(held) & train


def test_rl_prompts_are_distinct_training_prompts_and_leave_the_other_files_alone(
        tmp_path: Path, demo: dict[str, Any]) -> None:
    prompts, bad = _rows(demo["prompts"], _prompt_problem)
    assert len(prompts) == demo["counts"]["prompts"] == AlignmentDemoSpec().num_prompts
    assert {r.split(":")[0] for r in bad.values()} == {
        "unparseable_json", "missing_field", "bad_role", "non_string_content", "empty_prompt"}
    texts = [r["prompt"][-1]["content"] for r in prompts]
    assert all(len(r["prompt"]) == 1 and r["prompt"][0]["role"] == "user" for r in prompts)
    assert len(set(texts)) == len(texts)  # distinct: a repeated prompt would only be removed as a duplicate
    held = {json.loads(line)["prompt"][-1]["content"] for line in Path(demo["eval_prompts"]).read_text().splitlines()}
    assert not set(texts) & held
    # Drawn from the training pool: the demo's prompts less the held-out ones.
    from raytrain.posttrain.demo import _prompt_pool

    assert set(texts) <= {p for p, _ in _prompt_pool()} - held
    # Their own random stream: another number of RL prompts changes no byte of the other files.
    fewer = _write(tmp_path / "fewer", num_prompts=50)
    for name in ("sft", "prefs", "eval_prompts"):
        assert Path(fewer[name]).read_bytes() == Path(demo[name]).read_bytes(), name
    assert Path(fewer["prompts"]).read_bytes() != Path(demo["prompts"]).read_bytes()
    assert fewer["counts"]["prompts"] == 50


def test_score_rule() -> None:
    assert score("p", "The food was excellent and the staff was friendly.") == 1.0
    assert score("p", "The food was excellent and the staff was awful, dreadful.") == -1 / 3
    assert score("p", "The room was wooden.") == 0.0
    # A ratio: repeating the same sentiment does not pay.
    assert score("p", "Lovely.") == score("p", "Lovely. Lovely, lovely and lovely.")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, demo: dict[str, Any]) -> dict[str, str]:
    """Two randomly initialised tiny Llamas sharing a chat tokenizer trained on the demo's texts."""
    from transformers import AutoTokenizer

    from raytrain.data.tokenizer import train_tokenizer
    from raytrain.models.presets import build_config, build_model

    root = tmp_path_factory.mktemp("models")
    rows, _ = _rows(demo["sft"])
    texts = [m["content"] for r in rows for m in r["messages"]]
    tok = AutoTokenizer.from_pretrained(str(train_tokenizer(texts, 400, 2, root / "tok")))
    out = {}
    for name, seed in (("ref", 0), ("other", 1)):
        cfg = build_config("tiny", len(tok), 128, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
        build_model(cfg, seed).save_pretrained(str(root / name))
        tok.save_pretrained(str(root / name))
        out[name] = str(root / name)
    return out


def test_evaluate_alignment_kl_and_reproducibility(tiny_models: dict[str, str], demo: dict[str, Any]) -> None:
    from raytrain.eval.alignment import evaluate_alignment

    kw: dict[str, Any] = {"samples_per_prompt": 2, "max_new_tokens": 12, "max_prompts": 6, "seed": 3}
    models = {"same": tiny_models["ref"], "other": tiny_models["other"]}
    res = evaluate_alignment(models, tiny_models["ref"], demo["eval_prompts"], **kw)
    assert set(res) == {"reference", "same", "other"}
    for r in res.values():
        assert r["n"] == 12 and 1 <= r["response_tokens_mean"] <= 12
        assert SCORE_RANGE[0] <= r["reward_mean"] <= SCORE_RANGE[1]
    assert res["reference"]["kl_to_reference"] == 0.0
    assert abs(res["same"]["kl_to_reference"]) < 1e-4  # same weights: every sampled log-ratio is ~0
    assert res["other"]["kl_to_reference"] > 0.05
    again = evaluate_alignment({"other": tiny_models["other"]}, tiny_models["ref"], demo["eval_prompts"], **kw)
    assert {k: v for k, v in again["other"].items() if k != "seconds"} == \
        {k: v for k, v in res["other"].items() if k != "seconds"}
    with pytest.raises(ValueError, match="reserved"):
        evaluate_alignment({"reference": tiny_models["other"]}, tiny_models["ref"], demo["eval_prompts"], **kw)
