"""TRL's side of `raytrain bench posttrain`: one SFTTrainer or DPOTrainer run, steady-state throughput as JSON.

Runs in TRL's own virtualenv (``.venv-trl``: trl 1.16.0, transformers, torch CPU) and imports nothing from
raytrain. The job is a JSON object, the first argument or stdin::

    {"task": "sft" | "dpo", "model_dir": ..., "data_path": ... (JSONL: "messages" rows for SFT,
     "prompt"/"chosen"/"rejected" rows for DPO), "global_batch": 8, "steps": 30, "warmup_steps": 5,
     "max_length": 128, "threads": 2, "lr": 1e-5, "seed": 0, "precompute_ref_log_probs": false}

Training is on CPU in fp32, one process with ``threads`` intra-op threads, no evaluation, no saving, no
trackers, data loader workers 0. Step times come from a ``TrainerCallback`` (``on_step_end`` timestamps);
examples and tokens are counted on the batches ``training_step`` receives (tokens: the non-pad tokens, from the
attention mask; for DPO the chosen and the rejected sequences, prompt included). Steady state is the steps
after ``warmup_steps``: from the end of step ``warmup_steps`` to the end of the last one. Prints one JSON line.
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


def run(job: dict[str, Any]) -> dict[str, Any]:
    threads = int(job.get("threads", 2))
    work = tempfile.mkdtemp(prefix="trl-bench-")
    # Before torch and datasets load: the thread budget, and a fresh datasets cache per run (TRL caches the
    # tokenized dataset and the precomputed reference log-probs there; a shared cache would skip that work).
    os.environ.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                       "HF_DATASETS_CACHE": os.path.join(work, "datasets"), "HF_HUB_OFFLINE": "1",
                       "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "WANDB_DISABLED": "true"})
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


def main() -> int:
    print(json.dumps(run(_job())), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
