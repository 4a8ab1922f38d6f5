"""`raytrain bench rl`: both sides get the same shapes and hyper-parameters, and the figures are computed as
documented. Nothing here runs TRL or a training run (too slow for CI): the job, the spec and the arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raytrain.bench import rl, trl_side


def _args(*extra: str):
    return rl.parser().parse_args(list(extra))


def test_trl_step_is_prompts_times_generations() -> None:
    job = rl.trl_job({"model_dir": "m", "prompts_path": "p"}, _args("--prompts-per-step", "8", "--generations", "4"))
    kw = trl_side.grpo_config_kwargs(job, "out")
    # TRL's batch sizes count completions: one optimizer step, one generation, P x G samples, each used once.
    assert kw["per_device_train_batch_size"] * kw["gradient_accumulation_steps"] == 32
    assert kw["per_device_train_batch_size"] * kw["steps_per_generation"] == 32  # generation_batch_size
    assert kw["num_generations"] == 4 and kw["num_iterations"] == 1
    assert (kw["beta"], kw["learning_rate"], kw["lr_scheduler_type"]) == (rl.BETA, rl.LR, "constant")
    assert (kw["temperature"], kw["top_p"], kw["top_k"], kw["max_completion_length"]) == (1.0, 1.0, 0, 32)
    assert not kw["use_vllm"] and not kw["bf16"] and kw["report_to"] == "none"

    split = trl_side.grpo_config_kwargs({**job, "micro_batch_size": 8}, "out")
    assert (split["per_device_train_batch_size"], split["gradient_accumulation_steps"],
            split["steps_per_generation"]) == (8, 4, 4)
    with pytest.raises(ValueError, match="micro_batch_size"):
        trl_side.grpo_config_kwargs({**job, "micro_batch_size": 5}, "out")


def test_raytrain_spec_matches_the_trl_job() -> None:
    args = _args("--prompts-per-step", "8", "--generations", "4", "--completion-length", "32", "--steps", "6")
    spec = rl.rl_spec("/models/tiny", "/data/prompts.jsonl", "/tmp/root", preset="tiny", prompts_per_step=8,
                      generations=4, completion_length=32, steps=6)
    job = rl.trl_job({"model_dir": "/models/tiny", "prompts_path": "/data/prompts.jsonl"}, args)
    s, task = spec.rl, spec.rl.train.task
    assert (s.parent, s.data.paths, job["model_dir"], job["data_path"]) == (
        "/models/tiny", ["/data/prompts.jsonl"], "/models/tiny", "/data/prompts.jsonl")
    assert (s.rollout.prompts_per_iteration, task.n_samples, s.rollout.max_new_tokens, s.iterations) == (
        job["prompts_per_step"], job["num_generations"], job["max_completion_length"], job["steps"])
    assert (task.algorithm, task.kl_coef, task.estimator, s.train.lr, s.rollout.temperature) == (
        "grpo", job["beta"], "k3", job["lr"], job["temperature"])
    assert [f.name for f in s.reward.functions] == job["reward_funcs"] == [rl.REWARD]
    assert s.steps_per_iteration == 1  # one update per iteration, as TRL's one optimizer step per generation
    assert s.train.precision == "fp32" and not s.train.use_gpu and s.train.num_workers == 2


def test_prompt_filter_skips_the_planted_lines(tmp_path: Path) -> None:
    good = {"prompt": [{"role": "user", "content": "Write a short review of the bakery."}]}
    lines = [json.dumps(good), json.dumps(good)[:20], json.dumps({"other": 1}),
             json.dumps({"prompt": [{"role": "narrator", "content": "x"}]}),
             json.dumps({"prompt": [{"role": "user", "content": 42}]}), json.dumps({"prompt": ""}), ""]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rows, skipped = trl_side.read_prompts(str(path))
    assert rows == [good] and skipped == 5
    assert sum(rl._valid_messages(r.get("prompt")) for r in rl._jsonl_rows(path)) == 1


def test_steady_state_and_ratio() -> None:
    its = [{"iteration": i, "samples": 32, "time/iteration": t, "time/generate": t / 2, "time/score": 0.0,
            "time/train": t / 4, "time/sync": t / 8, "time/eval": 0.0}
           for i, t in enumerate([9.0, 5.0, 2.0, 2.0, 4.0])]
    its[0]["time/eval"] = 7.0  # the parent's baseline evaluation, in a warm-up iteration
    steady = rl.steady_raytrain(list(reversed(its)), warmup=2)  # order-independent: by `iteration`
    assert steady["steady_iterations"] == 3 and steady["steady_samples"] == 96
    assert steady["samples_per_s"] == pytest.approx(96 / 8.0)
    assert steady["time_split"]["generate"] == pytest.approx(0.5)
    assert steady["time_split"]["other"] == pytest.approx(0.125)
    with pytest.raises(RuntimeError):
        rl.steady_raytrain(its, warmup=5)
    its[-1] = {**its[-1], "time/iteration": 5.0, "time/eval": 1.0}  # an evaluation in the steady state: not timed
    assert rl.steady_raytrain(its, warmup=2)["samples_per_s"] == pytest.approx(96 / 8.0)

    rounds = [{"raytrain": {"samples_per_s": 30.0}, "trl": {"samples_per_s": 20.0}},
              {"raytrain": {"samples_per_s": 10.0}, "trl": {"samples_per_s": 20.0}},
              {"raytrain": {"samples_per_s": 24.0}, "trl": {"samples_per_s": 20.0}},
              {"raytrain": {"error": "boom"}, "trl": {"samples_per_s": 20.0}}]
    r = rl.paired_ratio(rounds)
    assert r["ratio"] == pytest.approx(1.2) and r["spread"] == pytest.approx([0.5, 1.5])
    assert r["median"] == {"raytrain": 24.0, "trl": 20.0}
    assert rl.paired_ratio(rounds[3:])["ratio"] is None
    split = {p: 0.25 for p in rl.PHASES}
    text = rl.table([{"preset": "tiny", "rounds": [{"raytrain": {"samples_per_s": 30.0, "time_split": split},
                                                    "trl": {"samples_per_s": 20.0}}], **rl.paired_ratio(rounds[:1])}])
    assert "1.50" in text and "25%/25%/25%/25%" in text
