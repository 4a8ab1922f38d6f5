"""TRL's side of `raytrain bench posttrain` and `raytrain bench rl`: one SFTTrainer, DPOTrainer or GRPOTrainer run,
steady-state throughput as JSON.

Runs in TRL's own virtualenv (``.venv-trl``: trl 1.16.0, transformers, torch CPU) and imports nothing from
raytrain, except for GRPO the reward function named in the job (``module:function``; the caller puts the repo root
on ``PYTHONPATH``). The job is a JSON object, the first argument or stdin::

    {"task": "sft" | "dpo", "model_dir": ..., "data_path": ... (JSONL: "messages" rows for SFT,
     "prompt"/"chosen"/"rejected" rows for DPO), "global_batch": 8, "steps": 30, "warmup_steps": 5,
     "max_length": 128, "threads": 2, "lr": 1e-5, "seed": 0, "precompute_ref_log_probs": false}

Training is on CPU in fp32, one process with ``threads`` intra-op threads, no evaluation, no saving, no
trackers, data loader workers 0. Step times come from a ``TrainerCallback`` (``on_step_end`` timestamps);
examples and tokens are counted on the batches ``training_step`` receives (tokens: the non-pad tokens, from the
attention mask; for DPO the chosen and the rejected sequences, prompt included). Steady state is the steps
after ``warmup_steps``: from the end of step ``warmup_steps`` to the end of the last one. Prints one JSON line.

GRPO (``"task": "grpo"``, see :func:`run_grpo`)::

    {"task": "grpo", "model_dir": ..., "data_path": ... (JSONL of {"prompt": [messages]} rows; malformed lines are
     skipped), "prompts_per_step": 8, "num_generations": 4, "max_completion_length": 32, "steps": 6,
     "warmup_steps": 2, "threads": 2, "lr": 2e-4, "beta": 0.05, "temperature": 1.0, "seed": 0,
     "reward_funcs": ["raytrain.posttrain.demo:reward"], "micro_batch_size": null}

One optimizer step consumes exactly ``prompts_per_step`` prompts x ``num_generations`` completions (see
:func:`grpo_config_kwargs`); samples/s is prompts x generations per second over the steady-state steps, end to end
(generation, rewards, reference log-probs, loss, backward, optimizer).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any


def _job() -> dict[str, Any]:
    text = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "-" else sys.stdin.read()
    return json.loads(text)


def _environment(threads: int) -> str:
    """Before torch and datasets load: the thread budget, and a fresh datasets cache per run (TRL caches the
    tokenized dataset and the precomputed reference log-probs there; a shared cache would skip that work)."""
    work = tempfile.mkdtemp(prefix="trl-bench-")
    os.environ.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                       "HF_DATASETS_CACHE": os.path.join(work, "datasets"), "HF_HUB_OFFLINE": "1",
                       "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "WANDB_DISABLED": "true"})
    return work


def run(job: dict[str, Any]) -> dict[str, Any]:
    if job.get("task") == "grpo":
        return run_grpo(job)
    threads = int(job.get("threads", 2))
    work = _environment(threads)
    t_start = time.perf_counter()
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    torch.set_num_threads(threads)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    task, batch, steps = job["task"], int(job.get("global_batch", 8)), int(job.get("steps", 30))
    warmup = int(job.get("warmup_steps", max(1, steps // 5)))
    if not 0 < warmup < steps:
        raise ValueError(f"need 0 < warmup_steps ({warmup}) < steps ({steps})")
    precompute = bool(job.get("precompute_ref_log_probs", False))

    ds = datasets.load_dataset("json", data_files=job["data_path"], split="train")
    ds = ds.select(range(min(len(ds), batch * steps)))  # one epoch of exactly the steps run
    if len(ds) < batch * steps:
        raise ValueError(f"{len(ds)} rows for {steps} steps of {batch}")
    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)

    common: dict[str, Any] = dict(
        output_dir=os.path.join(work, "out"), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=float(job.get("lr", 1e-5)), max_length=int(job.get("max_length", 128)),
        use_cpu=True, bf16=False, fp16=False, seed=int(job.get("seed", 0)), report_to="none",
        save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, dataset_num_proc=None,
        # TRL's configs turn activation checkpointing on by default; raytrain's default is off, and the
        # comparison is like for like (override with "gradient_checkpointing": true).
        gradient_checkpointing=bool(job.get("gradient_checkpointing", False)),
    )

    stamps: list[float] = []
    counts: list[tuple[int, int]] = []  # (examples or pairs, non-pad tokens) of each step's batch

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

    def count(inputs: dict[str, Any]) -> None:
        mask = inputs.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        rows = int(inputs["input_ids"].shape[0])
        counts.append((rows // 2 if task == "dpo" else rows, tokens))  # DPO: chosen rows then rejected rows

    if task == "sft":
        base, config = trl.SFTTrainer, trl.SFTConfig(**common)
    elif task == "dpo":
        base, config = trl.DPOTrainer, trl.DPOConfig(**common, precompute_ref_log_probs=precompute)
    else:
        raise ValueError(f"unknown task {task!r}")

    class Counting(base):  # type: ignore[misc, valid-type]
        def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            count(inputs)
            return super().training_step(model, inputs, *args, **kwargs)

    t_init = time.perf_counter()
    trainer = Counting(model=model, args=config, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    init_s = time.perf_counter() - t_init  # tokenization (+ the reference log-probs when precomputed)
    t_train = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - t_train
    if len(stamps) != steps or len(counts) != steps:
        raise RuntimeError(f"{len(stamps)} step ends and {len(counts)} batches for {steps} steps")
    elapsed = stamps[-1] - stamps[warmup - 1]
    rows = sum(c[0] for c in counts[warmup:])
    tokens = sum(c[1] for c in counts[warmup:])
    unit = "pairs_per_s" if task == "dpo" else "examples_per_s"
    result: dict[str, Any] = {
        "side": "trl", "task": task, unit: rows / elapsed, "tokens_per_s": tokens / elapsed,
        "steady_steps": steps - warmup, "steady_seconds": elapsed, "step_seconds_median": sorted(
            b - a for a, b in zip(stamps[warmup - 1:-1], stamps[warmup:], strict=True))[(steps - warmup) // 2],
        "tokens_per_step": tokens / (steps - warmup), "init_seconds": init_s, "train_seconds": train_s,
        "total_seconds": time.perf_counter() - t_start, "final_loss": float(out.training_loss),
        "threads": torch.get_num_threads(), "global_batch": batch, "steps": steps, "warmup_steps": warmup,
        "max_length": common["max_length"], "gradient_checkpointing": common["gradient_checkpointing"],
        "versions": {m.__name__: m.__version__ for m in (trl, transformers, torch, datasets)},
    }
    if task == "dpo":
        result["reference"] = "precomputed log-probs" if precompute else "frozen reference model, forward each step"
        result["precompute_ref_log_probs"] = precompute
    return result



# ------------------------------------------------------------------------------------------ GRPO


def grpo_config_kwargs(job: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """`GRPOConfig` keyword arguments for a job (pure; no TRL import, so the arithmetic is testable anywhere).

    In TRL, ``per_device_train_batch_size`` and ``generation_batch_size`` count completions, not prompts. One
    optimizer step here = ``prompts_per_step`` (P) prompts x ``num_generations`` (G) completions:
    ``per_device_train_batch_size`` = the micro-batch (P x G unless ``micro_batch_size`` is given),
    ``gradient_accumulation_steps`` = P x G / micro-batch, ``steps_per_generation`` = ``gradient_accumulation_steps``
    (so ``generation_batch_size`` = P x G: one generation of all P x G completions per optimizer step, every one
    used once) and ``num_iterations`` = 1 (on-policy: no old-policy log-prob pass).
    """
    prompts, gens = int(job["prompts_per_step"]), int(job["num_generations"])
    samples = prompts * gens
    micro = int(job.get("micro_batch_size") or samples)
    if samples % micro:
        raise ValueError(f"micro_batch_size {micro} must divide prompts_per_step x num_generations = {samples}")
    accum = samples // micro
    steps, warmup = int(job["steps"]), int(job["warmup_steps"])
    if not 0 < warmup < steps:
        raise ValueError(f"need 0 < warmup_steps ({warmup}) < steps ({steps})")
    return dict(
        output_dir=output_dir, per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
        steps_per_generation=accum, num_generations=gens, num_iterations=1,
        max_completion_length=int(job["max_completion_length"]), temperature=float(job.get("temperature", 1.0)),
        top_p=1.0, top_k=0, beta=float(job.get("beta", 0.05)), learning_rate=float(job.get("lr", 2e-4)),
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, max_steps=steps,
        use_vllm=False, use_cpu=True, bf16=False, fp16=False, model_init_kwargs={"dtype": "float32"},
        seed=int(job.get("seed", 0)), report_to="none", save_strategy="no", eval_strategy="no",
        logging_strategy="no", disable_tqdm=True, log_completions=False, dataloader_num_workers=0,
        dataloader_pin_memory=False, gradient_checkpointing=bool(job.get("gradient_checkpointing", False)),
    )


_ROLES = ("system", "user", "assistant")


def read_prompts(path: str) -> tuple[list[dict[str, Any]], int]:
    """Rows ``{"prompt": [messages]}`` of a JSONL file; a line that does not parse, or whose prompt is not a
    non-empty list of ``{role: system|user|assistant, content: non-empty str}`` dicts, is skipped (the demo plants
    such lines; raytrain's preparation quarantines the same ones). Returns (rows, skipped)."""
    rows: list[dict[str, Any]] = []
    skipped = 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if (isinstance(prompt, list) and prompt and all(
                    isinstance(m, dict) and m.get("role") in _ROLES and isinstance(m.get("content"), str)
                    and m["content"] for m in prompt)):
                rows.append({"prompt": [{"role": m["role"], "content": m["content"]} for m in prompt]})
            else:
                skipped += 1
    return rows, skipped


def _function(name: str) -> Any:
    import importlib

    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def run_grpo(job: dict[str, Any]) -> dict[str, Any]:
    """One GRPOTrainer run on CPU, fp32, 1 process x ``threads`` threads: steady-state samples/s and time split.

    Timing: ``on_step_end`` timestamps (steady state from the end of step ``warmup_steps`` to the end of the last
    step); inside each step, the trainer's own phases are timed by wrapping ``_generate`` (tokenize the prompts,
    sample, decode), ``_calculate_rewards`` (the reward functions) and ``_generate_and_score_completions`` (those
    two plus the reference model's log-probs and the advantages); train = the rest of the step (policy forward,
    backward, optimizer step).
    """
    threads = int(job.get("threads", 2))
    work = _environment(threads)
    t_start = time.perf_counter()
    import datasets
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback

    torch.set_num_threads(threads)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    steps, warmup = int(job["steps"]), int(job["warmup_steps"])
    config_kwargs = grpo_config_kwargs(job, os.path.join(work, "out"))
    rows, skipped = read_prompts(job["data_path"])
    prompts_per_step = int(job["prompts_per_step"])
    if len(rows) < prompts_per_step:
        raise ValueError(f"{len(rows)} usable prompts in {job['data_path']} for {prompts_per_step} per step")
    ds = datasets.Dataset.from_list(rows)
    reward_funcs = [_function(n) for n in job.get("reward_funcs", ["raytrain.posttrain.demo:reward"])]

    stamps: list[float] = []
    phases: list[dict[str, float]] = []  # per generation: generate, score, rollout seconds; samples; tokens

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

    class Timed(trl.GRPOTrainer):  # type: ignore[misc]
        def _generate(self, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = super()._generate(*args, **kwargs)
            phases[-1]["generate"] += time.perf_counter() - t0
            return out

        def _calculate_rewards(self, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = super()._calculate_rewards(*args, **kwargs)
            phases[-1]["score"] += time.perf_counter() - t0
            return out

        def _generate_and_score_completions(self, *args: Any, **kwargs: Any) -> Any:
            phases.append({"generate": 0.0, "score": 0.0, "rollout": 0.0})
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(*args, **kwargs)
            phases[-1]["rollout"] = time.perf_counter() - t0
            phases[-1]["samples"] = int(out["completion_ids"].shape[0])
            phases[-1]["completion_tokens"] = int(out["completion_mask"].sum())
            return out

    config = trl.GRPOConfig(**config_kwargs)
    t_init = time.perf_counter()
    trainer = Timed(model=job["model_dir"], reward_funcs=reward_funcs, args=config, train_dataset=ds,
                    callbacks=[Clock()])
    init_s = time.perf_counter() - t_init  # loading the policy and the reference model
    t_train = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - t_train
    if len(stamps) != steps or len(phases) != steps:
        raise RuntimeError(f"{len(stamps)} step ends and {len(phases)} generations for {steps} steps")
    elapsed = stamps[-1] - stamps[warmup - 1]
    steady = phases[warmup:]
    samples = sum(p["samples"] for p in steady)
    expected = prompts_per_step * int(job["num_generations"])
    if any(p["samples"] != expected for p in phases):
        raise RuntimeError(f"samples per step {[p['samples'] for p in phases]}, expected {expected}")
    step_s = [b - a for a, b in zip(stamps[warmup - 1:-1], stamps[warmup:], strict=True)]
    gen_s, score_s = sum(p["generate"] for p in steady), sum(p["score"] for p in steady)
    rollout_s = sum(p["rollout"] for p in steady)
    split = {"generate": gen_s / elapsed, "score": score_s / elapsed,
             "reference_and_advantages": (rollout_s - gen_s - score_s) / elapsed,
             "train": (elapsed - rollout_s) / elapsed, "sync": 0.0}
    return {
        "side": "trl", "task": "grpo", "samples_per_s": samples / elapsed, "steady_steps": steps - warmup,
        "steady_seconds": elapsed, "steady_samples": samples, "step_seconds_median": sorted(step_s)[len(step_s) // 2],
        "time_split": split,
        "seconds_per_step": {"generate": gen_s / len(steady), "score": score_s / len(steady),
                             "rollout": rollout_s / len(steady), "step": elapsed / len(steady)},
        "completion_tokens_per_sample": sum(p["completion_tokens"] for p in steady) / samples,
        "completion_tokens_per_s": sum(p["completion_tokens"] for p in steady) / elapsed,
        "init_seconds": init_s, "train_seconds": train_s, "total_seconds": time.perf_counter() - t_start,
        "final_loss": float(out.training_loss), "threads": torch.get_num_threads(), "prompts": len(rows),
        "prompts_skipped": skipped, "steps": steps, "warmup_steps": warmup,
        "config": {k: config_kwargs[k] for k in (
            "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation", "num_generations",
            "num_iterations", "max_completion_length", "temperature", "top_p", "top_k", "beta", "learning_rate",
            "lr_scheduler_type", "max_grad_norm", "gradient_checkpointing")}
        | {"generation_batch_size": config.generation_batch_size, "loss_type": config.loss_type,
           "scale_rewards": config.scale_rewards, "epsilon": config.epsilon},
        "versions": {m.__name__: m.__version__ for m in (trl, transformers, torch, datasets)},
    }


def main() -> int:
    print(json.dumps(run(_job())), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
