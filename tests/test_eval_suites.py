"""The eval stage's suites on hand-built models: overfitting over real checkpoint exports, reward-model win rate
with a reward model that prefers one model's words, and the report (eval.json, eval.md, charts) of a whole run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from serving_fixtures import build_tiny_model_dir

SEQ = 32


def _packed(out: Path, rows: list[list[int]]) -> Path:
    """Packed pretraining rows (input_ids padded to SEQ, num_tokens) as the data stage writes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    ids = [r + [0] * (SEQ - len(r)) for r in rows]
    pq.write_table(pa.table({"input_ids": ids, "num_tokens": [len(r) for r in rows]}), out / "part-000.parquet")
    return out


def _memorising_run(run_dir: Path, base: Path, train_rows: list[list[int]], steps: tuple[int, ...]) -> None:
    """A run directory as Ray Train leaves it: checkpoint_*/hf/ exports of a model memorising `train_rows`,
    and the checkpoint manager's snapshot naming each checkpoint's step."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = torch.tensor(train_rows)
    results, done = [], 0
    for i, step in enumerate(steps):
        for _ in range(step - done):
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        done = step
        name = f"checkpoint_2026-01-01_00-00-{i:02d}.000000"
        model.save_pretrained(run_dir / name / "hf")
        results.append({"checkpoint_dir_name": name, "metrics": {"step": step}})
    (run_dir / "checkpoint_manager_snapshot.json").write_text(json.dumps({"checkpoint_results": results}))


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("base") / "model", max_position_embeddings=64)


def test_overfitting_flags_a_rising_held_out_curve_and_not_a_flat_one(ray_local: None, base_model: Path,
                                                                      tmp_path: Path) -> None:
    from raytrain.eval.overfitting import checkpoints, score_run

    vocab = json.loads((base_model / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(0)
    train = rng.integers(10, vocab, size=(8, SEQ)).tolist()
    unseen = rng.integers(10, vocab, size=(8, SEQ)).tolist()
    run = tmp_path / "runs" / "r"
    _memorising_run(run, base_model, train, steps=(0, 15, 30))
    assert [s for s, _ in checkpoints(str(run))] == [0, 15, 30]
    train_dir = _packed(tmp_path / "train", train)
    kw = {"max_rows": 8, "batch_size": 8, "max_gap_growth": 0.5}

    # Held-out rows the run never saw: training loss falls, held-out loss does not follow.
    rising = score_run("pretrain", str(run), {"train": str(train_dir), "val": str(_packed(tmp_path / "unseen",
                                                                                        unseen))},
                       ["input_ids", "num_tokens"], **kw)
    pts = rising["points"]
    assert [p["step"] for p in pts] == [0, 15, 30] and rising["rows"] == {"train": 8, "val": 8}
    assert pts[-1]["train_loss"] < pts[0]["train_loss"] - 1.0, pts
    assert pts[-1]["gap"] > pts[0]["gap"] + 1.0, pts
    assert rising["flagged"] is True and "exceeds max_gap_growth 0.5" in rising["reason"]

    # Held-out rows drawn like the training rows (here: the same rows): the gap stays flat.
    flat = score_run("pretrain", str(run), {"train": str(train_dir), "val": str(_packed(tmp_path / "same", train))},
                     ["input_ids", "num_tokens"], **kw)
    assert all(abs(p["gap"]) < 1e-4 for p in flat["points"]), flat["points"]
    assert flat["flagged"] is False and "is within" in flat["reason"]


def test_flag_rule_compares_the_last_gap_with_the_smallest() -> None:
    from raytrain.eval.overfitting import flag

    def pts(gaps: list[float]) -> list[dict]:
        return [{"gap": g} for g in gaps]

    assert flag(pts([0.30, 0.05, 0.20]), 0.1)["flagged"] is True  # shrank, then grew back by 0.15
    assert flag(pts([0.30, 0.05, 0.10]), 0.1)["flagged"] is False
    assert flag(pts([0.05]), 0.0)["flagged"] is False  # one point says nothing about a trend


def _always_says(src: Path, dest: Path, word: str) -> Path:
    """A chat model that answers every prompt with `word` repeated: every position's hidden state is the same
    vector (one embedding for all tokens, attention and MLP outputs zeroed), and only `word`'s logit is high."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.copytree(src, dest)
    tok = AutoTokenizer.from_pretrained(dest)
    (target,) = tok.encode(f" {word}", add_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(dest)
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[target, 0] = 50.0
    model.save_pretrained(dest)
    return dest


def _reward_model_preferring(src: Path, dest: Path, good: str, bad: str) -> Path:
    """A one-label sequence classifier scoring a conversation by its last token: + for `good`, - for `bad`.

    Its chat template renders the bare contents (no trailing end-of-turn tokens), so the last token is the
    response's last word; layers add nothing to the residual stream, so the pooled state is that token's embedding.
    """
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    shutil.copytree(src, dest)
    tok = AutoTokenizer.from_pretrained(dest)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(dest)
    cfg = AutoConfig.from_pretrained(dest, num_labels=1)
    model = AutoModelForSequenceClassification.from_config(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 0.0
        emb[tok.encode(f" {good}", add_special_tokens=False)[0], 0] = 3.0
        emb[tok.encode(f" {bad}", add_special_tokens=False)[0], 0] = -3.0
        model.score.weight.zero_()
        model.score.weight[0, 0] = 1.0
    model.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def judged(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("judged")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"Tell me about {x}."}]}) + "\n"
                               for x in ("the river", "a song", "the garden", "bread")))
    return {"cat": _always_says(base_model, root / "cat", "cat"), "dog": _always_says(base_model, root / "dog", "dog"),
            "reward": _reward_model_preferring(base_model, root / "reward", good="cat", bad="dog"),
            "prompts": prompts}


def test_win_rate_follows_the_reward_model(judged: dict[str, Path]) -> None:
    from raytrain.eval.alignment import load_prompts
    from raytrain.eval.winrate import sample_responses, win_rate

    prompts = load_prompts(str(judged["prompts"]))
    said = sample_responses(str(judged["cat"]), prompts, samples_per_prompt=1, max_new_tokens=4)
    assert said[0][0].split() == ["cat"] * 4, said
    kw = {"samples_per_prompt": 2, "max_new_tokens": 6}
    down = win_rate(str(judged["dog"]), str(judged["cat"]), str(judged["reward"]), prompts, **kw)
    assert down["win_rate"] == 0.0 and down["n"] == 8 and down["ties"] == 0
    assert down["candidate_reward_mean"] < 0 < down["baseline_reward_mean"]


def test_eval_stage_writes_eval_json_and_a_report_with_charts(ray_local: None, judged: dict[str, Path],
                                                              tmp_path: Path) -> None:
    """A post-trained candidate (lineage names its parent) through `run_eval`: win rate over the parent, lm-eval
    task, safety; suites whose inputs this spec lacks are skipped with their reason; old figures are kept."""
    from raytrain.config import load_spec
    from raytrain.eval.suites import run_eval

    candidate = tmp_path / "candidate"
    shutil.copytree(judged["cat"], candidate)
    (candidate / "lineage.json").write_text(json.dumps({"task": {"type": "dpo"},
                                                        "parent": {"path": str(judged["dog"])}}))
    (candidate / "eval.json").write_text(json.dumps({"stage": "dpo", "heldout": {"pairs": 3},
                                                     "win_rate": {"win_rate": 0.123}}))
    tasks = Path(__file__).resolve().parents[1] / "raytrain" / "eval" / "tasks"
    spec = load_spec("demo", [f"storage.root={tmp_path / 'root'}", f"eval.model_path={candidate}",
                              f"eval.win_rate.reward_model={judged['reward']}",
                              f"eval.win_rate.prompts_path={judged['prompts']}", "eval.win_rate.max_new_tokens=6",
                              f"eval.safety.prompts_path={judged['prompts']}", "eval.safety.max_new_tokens=6",
                              "eval.safety.samples_per_prompt=1", "eval.lm_eval.tasks=[raytrain_demo_mc]",
                              "eval.lm_eval.limit=4", "eval.lm_eval.batch_size=4", "eval.alignment.enabled=false"])
    if not (tasks / "raytrain_demo_mc.yaml").is_file():
        pytest.skip("the packaged lm-eval tasks are not in raytrain/eval/tasks")
    doc = run_eval(spec)

    saved = json.loads((candidate / "eval.json").read_text())
    assert saved["heldout"] == {"pairs": 3} and saved["stage"] == "dpo"  # post-training's figures kept
    assert saved["win_rate"]["win_rate"] == 1.0 and saved["win_rate"]["baseline"] == str(judged["dog"])
    assert doc["win_rate"] == saved["win_rate"]
    assert 0.0 <= saved["lm_eval"]["raytrain_demo_mc"]["acc"] <= 1.0 and saved["lm_eval"]["raytrain_demo_mc"]["n"] == 4
    assert saved["safety"]["generations"] == 4 and 0.0 <= saved["safety"]["unsafe_rate"] <= 1.0
    assert "no dataset" in saved["suites"]["perplexity"]["skipped"] and "perplexity" not in saved
    assert saved["suites"]["alignment"]["skipped"] == "eval.alignment.enabled is false"
    report = (candidate / "eval.md").read_text()
    for name in ("perplexity", "lm_eval", "win_rate", "alignment", "overfitting", "safety"):
        assert f"## {name}" in report, name
    for name in ("win_rate", "lm_eval", "safety"):
        png = candidate / "eval" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"](eval/{name}.png)" in report, name
    assert "`win_rate.win_rate` | 1 |" in report
