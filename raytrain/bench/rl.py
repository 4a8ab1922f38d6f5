"""`raytrain bench rl`: GRPO samples/s, raytrain vs TRL's `GRPOTrainer`, side by side in one run.

One run builds the inputs without any download: the embedded alignment demo (`raytrain.posttrain.demo`: its
``prompts.jsonl``, malformed lines included; before that file existed, the user turns of ``sft.jsonl``), a
byte-level BPE with ChatML trained on the demo's text (vocabulary 2,048), and a freshly initialised Llama of each
preset saved in transformers' format with the tokenizer. Then, for each preset, it alternates rounds:

* raytrain: the GRPO stage (`raytrain.rl.stage.run_rl`) on 2 CPU Ray Train workers of 1 thread each, rollout
  engines colocated with them (``--placement``), in a fresh storage root and a fresh local Ray instance per round
  (shut down before TRL's turn);
* TRL: `GRPOTrainer` in TRL's own virtualenv (``.venv-trl``, ``make .venv-trl/.installed``), one process with 2
  threads, run by `raytrain/bench/trl_side.py` (task ``grpo``), with the repo root on ``PYTHONPATH`` for the reward.

Both sides: the same model, prompts, P prompts per optimizer step x G generations each (the group), completions of
at most L tokens sampled at temperature 1.0 (top-p 1, no top-k), the same reward function
(`raytrain.posttrain.demo:reward`), KL to the frozen parent with beta 0.05 (k3 estimator, a reference model in
memory), one policy update per batch (on-policy), AdamW at a constant 2e-4, gradient clipping 1.0, fp32, and the
same thread budget. Before each side the benchmark waits (``--settle``) for the CPUs to go quiet and records how
busy they were; a round that started on a busy machine is flagged in ``warning``.

samples/s = prompts x generations per second, end to end (generation, rewards, reference log-probs, the update,
the weight sync), in steady state: raytrain over the iterations after the first W (sum of samples / sum of
``time/iteration``), TRL from the end of step W to the end of the last step. The ratio is the median of the
per-round paired ratios raytrain / TRL, with their spread; raytrain's time split (generate / score / train / sync)
is its share of the steady-state iteration time, TRL's the same phases timed inside its trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from raytrain.bench.machine import machine

_PACKAGES = ("torch", "transformers", "deepspeed", "ray", "tokenizers", "pyarrow")
DEFAULT_TRL_PYTHON = ".venv-trl/bin/python"
REPO_ROOT = Path(__file__).resolve().parents[2]
REWARD = "raytrain.posttrain.demo:reward"
VOCAB_SIZE = 2048
MAX_PROMPT_LENGTH = 64  # the demo's prompts are about 20 tokens in ChatML
MAX_POSITIONS = 256  # the models' context: prompt + completion
THREADS = 2  # the whole thread budget of each side: raytrain 2 workers x 1 thread, TRL 1 process x 2 threads
LR = 2e-4  # raytrain's RL default (rl.train.lr)
BETA = 0.05  # raytrain's GRPO kl_coef default
PHASES = ("generate", "score", "train", "sync")

# ------------------------------------------------------------------------------------------ inputs


def _valid_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
        and m["content"] for m in value)


def _jsonl_rows(path: str | Path) -> list[dict[str, Any]]:
    """The lines of a JSONL file that parse to objects (the demo plants malformed ones)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _demo_texts(paths: dict[str, Any]) -> list[str]:
    """Every message text of the demo's files: what the tokenizer learns from."""
    texts: list[str] = []
    for key in ("sft", "prefs", "prompts", "eval_prompts"):
        if not paths.get(key) or not Path(paths[key]).exists():
            continue
        for row in _jsonl_rows(paths[key]):
            for field in ("messages", "prompt", "chosen", "rejected"):
                if _valid_messages(row.get(field)):
                    texts.extend(m["content"] for m in row[field])
    return texts


def _prompts_from_sft(sft_path: str, out: Path) -> int:
    """Stand-in for the demo's ``prompts.jsonl`` where it has none: the user turns of ``sft.jsonl``'s valid rows."""
    n = 0
    with out.open("w") as f:
        for row in _jsonl_rows(sft_path):
            msgs = row.get("messages")
            if _valid_messages(msgs) and msgs[0]["role"] == "user":
                f.write(json.dumps({"prompt": [msgs[0]]}) + "\n")
                n += 1
    return n


def build_inputs(workdir: str | Path, preset: str, seed: int) -> dict[str, Any]:
    """Demo prompts, tokenizer and the model of one preset under `workdir`; reused when already there.

    Layout: ``demo/`` (the alignment demo), ``tokenizer/`` (shared by the presets), ``model-<preset>/`` (config,
    fp32 weights, the tokenizer files). Returns the paths, the prompt file's provenance and the model's size.
    """
    from transformers import AutoTokenizer

    from raytrain.bench.posttrain import preset_model
    from raytrain.config.schema import AlignmentDemoSpec
    from raytrain.data.tokenizer import train_tokenizer
    from raytrain.posttrain.demo import write_alignment_demo

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    tok_dir, meta_path = work / "tokenizer", work / "inputs.json"
    meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    demo = write_alignment_demo(str(work / "demo"), AlignmentDemoSpec(seed=seed))  # same seed, same bytes
    if demo.get("prompts") and Path(demo["prompts"]).exists():
        prompts_path, source = demo["prompts"], "demo prompts.jsonl (malformed lines: raytrain quarantines them, " \
                                                 "the TRL side skips them)"
    else:
        prompts_path, source = str(work / "prompts-from-sft.jsonl"), "the user turns of the demo's sft.jsonl"
        _prompts_from_sft(demo["sft"], Path(prompts_path))
    if meta.get("seed") != seed or meta.get("prompts_path") != prompts_path or not tok_dir.exists():
        train_tokenizer(_demo_texts(demo), vocab_size=VOCAB_SIZE, min_frequency=2, out_dir=tok_dir)
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        # The model's vocabulary is 2,048 even where the BPE stops short of it.
        meta = {"seed": seed, "prompts_path": prompts_path, "vocab_size": max(VOCAB_SIZE, len(tok)),
                "tokenizer_size": len(tok), "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
                "models": {}}
        meta_path.write_text(json.dumps(meta, indent=1))
    model_dir = preset_model(work, preset, tok_dir, meta, meta_path, MAX_POSITIONS, seed)
    prompts = _jsonl_rows(prompts_path)
    usable = sum(_valid_messages(r.get("prompt")) for r in prompts)
    return {"workdir": str(work), "model_dir": str(model_dir), "prompts_path": prompts_path, "prompts_source": source,
            "prompts_usable": usable, "parameters": meta["models"][preset],
            **{k: v for k, v in meta.items() if k not in ("models", "prompts_path")}}


# ------------------------------------------------------------------------------------------ raytrain side


def rl_spec(model_dir: str, prompts_path: str, root: str, *, preset: str, prompts_per_step: int, generations: int,
            completion_length: int, steps: int, workers: int = 2, placement: str = "colocated",
            seed: int = 0) -> Any:
    """The job spec of raytrain's side: one GRPO stage whose iteration = one optimizer step over P x G samples.

    Each of `workers` takes P / workers prompts and trains on its P / workers x G samples in one micro-batch
    (``micro_batch_size`` = P x G / workers, ``grad_accum_steps`` 1, ``ppo_epochs`` 1): one update per iteration,
    as TRL's side does one optimizer step per generation.
    """
    from raytrain.config.schema import JobSpec

    if prompts_per_step % workers:
        raise ValueError(f"--prompts-per-step ({prompts_per_step}) must be a multiple of the {workers} workers")
    if MAX_PROMPT_LENGTH + completion_length > MAX_POSITIONS:
        raise ValueError(f"--completion-length at most {MAX_POSITIONS - MAX_PROMPT_LENGTH} (the models' context)")
    rl = {
        "model_name": f"bench-rl-{preset}", "parent": model_dir, "iterations": steps, "checkpoint_every": steps,
        "eval_every": 0, "eval_prompts": 8,
        "data": {"name": "bench-rl-prompts", "source": "files", "paths": [prompts_path],
                 "max_prompt_length": MAX_PROMPT_LENGTH, "max_length": MAX_PROMPT_LENGTH + completion_length,
                 "val_fraction": 0.05},
        "rollout": {"backend": "torch", "placement": placement, "prompts_per_iteration": prompts_per_step,
                    "max_new_tokens": completion_length, "temperature": 1.0, "top_p": 1.0},
        "reward": {"functions": [{"name": REWARD}]},
        "train": {"task": {"type": "rl", "algorithm": "grpo", "n_samples": generations, "kl_coef": BETA,
                           "ppo_epochs": 1, "clip_eps": 0.2, "scale_rewards": True},
                  "num_workers": workers, "use_gpu": False, "precision": "fp32",
                  "micro_batch_size": prompts_per_step // workers * generations, "grad_accum_steps": 1,
                  "lr": LR, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 1.0,
                  "tensorboard": False, "seed": seed},
    }
    return JobSpec.model_validate({"name": f"bench-rl-{preset}", "storage": {"root": root}, "rl": rl})


def steady_raytrain(iterations: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Steady-state figures from `run_rl`'s per-iteration records: the iterations after the first `warmup`.

    samples/s = sum of ``samples`` / sum of ``time/iteration``, less any held-out evaluation an iteration ran
    (``time/eval``: the stage evaluates the parent at iteration 0 and every ``eval_every``; TRL's side evaluates
    nothing); the time split is each phase's share of that time (``other``: what the four phases leave), and the
    mean seconds per iteration of each phase. raytrain's ``score`` includes the reference log-probs and the
    advantages.
    """
    rows = sorted(iterations, key=lambda r: r["iteration"])[warmup:]
    if not rows:
        raise RuntimeError(f"no iteration after the {warmup} warm-up iteration(s) ({len(iterations)} in all)")
    eval_s = sum(float(r.get("time/eval", 0.0)) for r in rows)
    seconds = sum(float(r["time/iteration"]) for r in rows) - eval_s
    samples = sum(int(r["samples"]) for r in rows)
    phase_s = {p: sum(float(r.get(f"time/{p}", 0.0)) for r in rows) for p in PHASES}
    split = {p: phase_s[p] / seconds for p in PHASES}
    split["other"] = max(0.0, 1.0 - sum(split.values()))
    out: dict[str, Any] = {
        "samples_per_s": samples / seconds, "steady_iterations": len(rows), "steady_seconds": seconds,
        "steady_samples": samples, "time_split": split, "eval_seconds_excluded": eval_s,
        "seconds_per_iteration": {**{p: phase_s[p] / len(rows) for p in PHASES}, "iteration": seconds / len(rows)},
        "iteration_seconds": [float(r["time/iteration"]) for r in rows],
    }
    lengths = [float(r["response_length"]) for r in rows if "response_length" in r]
    if lengths:
        out["completion_tokens_per_sample"] = statistics.fmean(lengths)
    return out


def run_raytrain(inputs: dict[str, Any], args: argparse.Namespace, preset: str, root: Path) -> dict[str, Any]:
    """One raytrain GRPO run (`raytrain.rl.stage.run_rl`) in a fresh storage root and a fresh local Ray instance
    (shut down after it, so that TRL's turn does not share the CPUs with Ray's processes); steady-state figures."""
    import ray

    from raytrain.rl.stage import run_rl

    run_root = root / f"raytrain-{preset}-{time.time_ns()}"
    spec = rl_spec(inputs["model_dir"], inputs["prompts_path"], str(run_root), preset=preset,
                   prompts_per_step=args.prompts_per_step, generations=args.generations,
                   completion_length=args.completion_length, steps=args.steps, workers=args.workers,
                   placement=args.placement, seed=args.seed)
    _start_ray(args.ray_cpus)
    t0 = time.perf_counter()
    try:
        result = run_rl(spec)
    finally:
        wall = time.perf_counter() - t0
        ray.shutdown()
    iterations = result["iterations"]
    expected = args.prompts_per_step * args.generations
    if len(iterations) != args.steps or any(int(r["samples"]) != expected for r in iterations):
        raise RuntimeError(f"run_rl gave {len(iterations)} iterations of samples "
                           f"{[r.get('samples') for r in iterations]}; expected {args.steps} of {expected}")
    return {"side": "raytrain", **steady_raytrain(iterations, args.warmup), "total_seconds": wall,
            "workers": args.workers, "threads_per_worker": 1, "placement": args.placement,
            "data": result.get("data")}


# ------------------------------------------------------------------------------------------ TRL side


def trl_job(inputs: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The job `trl_side.py` runs (task ``grpo``): the same shapes and hyper-parameters as `rl_spec`."""
    return {"task": "grpo", "model_dir": inputs["model_dir"], "data_path": inputs["prompts_path"],
            "prompts_per_step": args.prompts_per_step, "num_generations": args.generations,
            "max_completion_length": args.completion_length, "steps": args.steps, "warmup_steps": args.warmup,
            "threads": args.trl_threads, "lr": LR, "beta": BETA, "temperature": 1.0, "seed": args.seed,
            "reward_funcs": [REWARD], "micro_batch_size": args.trl_micro_batch}


def run_trl(python: str, job: dict[str, Any]) -> dict[str, Any]:
    """One TRL run in its own interpreter, with the repo root on PYTHONPATH (the reward function)."""
    script = Path(__file__).with_name("trl_side.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH"))
                                                       if p)}
    t0 = time.perf_counter()
    proc = subprocess.run([python, str(script), json.dumps(job)], capture_output=True, text=True, timeout=3600,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL side failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------ driver


def _cpu_busy(seconds: float = 1.0) -> float | None:
    """Share of all CPUs busy over `seconds` (from /proc/stat; None where there is none)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
        return sum(v) - idle, sum(v)

    try:
        b0, t0 = sample()
        time.sleep(seconds)
        b1, t1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (b1 - b0) / (t1 - t0) if t1 > t0 else None


def _settle(max_wait: float, quiet: float = 0.25) -> float | None:
    """Wait (up to `max_wait` seconds) until under `quiet` of the CPUs are busy, so that neither side runs on the
    tail of the other (Ray's processes exiting) or of something else; returns the last busy share measured."""
    deadline = time.monotonic() + max_wait
    busy = _cpu_busy()
    while busy is not None and busy > quiet and time.monotonic() < deadline:
        busy = _cpu_busy(2.0)
    return busy


def _side(fn: Any, settle: float, *args: Any) -> dict[str, Any]:
    """One side's run with the machine's load before it (the busy share of the CPUs after settling, and the load
    average); a failure is recorded (and the round left out of the ratio) instead of ending the benchmark."""
    busy = _settle(settle)
    load = os.getloadavg()[0]
    try:
        result = fn(*args)
    except Exception as e:  # a failed run is a figure of the benchmark too
        result = {"error": f"{type(e).__name__}: {str(e)[-2000:]}"}
    result["loadavg_1m_before"] = load
    result["cpu_busy_before"] = busy
    return result


def paired_ratio(rounds: list[dict[str, Any]], unit: str = "samples_per_s") -> dict[str, Any]:
    """Median of the per-round ratios raytrain / TRL (rounds where both sides ran), their spread, and each side's
    median."""
    ok = [r for r in rounds if unit in r["raytrain"] and unit in r["trl"]]
    ratios = [r["raytrain"][unit] / r["trl"][unit] for r in ok]
    if not ratios:
        return {"ratio": None, "ratios": [], "spread": None, "median": {"raytrain": None, "trl": None}}
    return {"ratio": statistics.median(ratios), "ratios": ratios, "spread": [min(ratios), max(ratios)],
            "median": {side: statistics.median(r[side][unit] for r in ok) for side in ("raytrain", "trl")}}


def _fmt(x: Any, spec: str = ".1f") -> str:
    return format(x, spec) if isinstance(x, int | float) else "-"


def table(results: list[dict[str, Any]]) -> str:
    """The per-round samples/s of both sides, the ratio, and raytrain's time split, as text."""
    lines = [f"{'preset':<7} {'round':>5} {'raytrain':>10} {'TRL':>10} {'ratio':>7}   raytrain split "
             "generate/score/train/sync"]
    for res in results:
        for i, r in enumerate(res["rounds"], 1):
            ours, theirs = r["raytrain"], r["trl"]
            ratio = ours["samples_per_s"] / theirs["samples_per_s"] if "samples_per_s" in ours and \
                "samples_per_s" in theirs else None
            split = "/".join(f"{100 * ours['time_split'][p]:.0f}%" for p in PHASES) if "time_split" in ours else \
                (ours.get("error", "") or "")[:60]
            if "error" in theirs:
                split += f"  TRL error: {theirs['error'][:60]}"
            lines.append(f"{res['preset']:<7} {i:>5} {_fmt(ours.get('samples_per_s')):>10} "
                         f"{_fmt(theirs.get('samples_per_s')):>10} {_fmt(ratio, '.2f'):>7}   {split}")
        spread = res["spread"]
        lines.append(f"{res['preset']:<7} {'median':>5} {_fmt(res['median']['raytrain']):>10} "
                     f"{_fmt(res['median']['trl']):>10} {_fmt(res['ratio'], '.2f'):>7}   paired ratios "
                     f"{_fmt(spread[0], '.2f') if spread else '-'}..{_fmt(spread[1], '.2f') if spread else '-'}"
                     f" (goal >= 1.0)")
    return "\n".join(lines)


def _trl_versions(python: str) -> dict[str, str | None]:
    code = ("import json, importlib.metadata as m\nout = {}\nfor p in ('trl', 'transformers', 'torch', 'accelerate', "
            "'datasets'):\n    try: out[p] = m.version(p)\n    except m.PackageNotFoundError: out[p] = None\n"
            "print(json.dumps(out))")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    return json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr[-500:]}


def _start_ray(num_cpus: int) -> None:
    import ray

    from raytrain.cluster import WORKER_ENV

    if not ray.is_initialized():
        # A fresh local instance: other Ray instances on a shared machine are not this benchmark's. Logical CPUs:
        # the train workers hold one each for the run, Ray Data's preparation and (split placement) the rollout,
        # reference and reward actors reserve theirs.
        ray.init(address="local", num_cpus=num_cpus, logging_level="WARNING", include_dashboard=False,
                 runtime_env={"env_vars": dict(WORKER_ENV)})


def run(args: argparse.Namespace) -> dict[str, Any]:
    presets = [p for p in args.presets.split(",") if p]
    samples = args.prompts_per_step * args.generations
    out: dict[str, Any] = {
        "benchmark": "rl", "command": "raytrain bench rl " + " ".join(args.argv),
        "machine": machine(_PACKAGES), "trl_versions": _trl_versions(args.trl_python),
        "setup": {
            "algorithm": "GRPO", "prompts_per_step": args.prompts_per_step, "generations": args.generations,
            "samples_per_step": samples, "completion_length": args.completion_length, "steps": args.steps,
            "warmup_steps": args.warmup, "reward": REWARD, "beta": BETA, "kl_estimator": "k3", "lr": LR,
            "lr_schedule": "constant", "grad_clip": 1.0, "temperature": 1.0, "top_p": 1.0, "precision": "fp32",
            "vocab_size": VOCAB_SIZE, "max_prompt_length": MAX_PROMPT_LENGTH,
            "threads": f"raytrain: {args.workers} Ray Train workers x 1 thread, rollout engines {args.placement} "
                       f"(micro-batch {samples // args.workers} samples each, one update per iteration); TRL: 1 "
                       f"process x {args.trl_threads} threads (micro-batch {args.trl_micro_batch or samples}, one "
                       "optimizer step per generation of all samples)",
            "trl_batching": "per_device_train_batch_size x gradient_accumulation_steps = prompts x generations, "
                            "steps_per_generation = gradient_accumulation_steps (generation_batch_size = prompts x "
                            "generations), num_iterations 1",
            "samples_per_s": "prompts x generations per second, end to end, steady state: raytrain = sum of samples "
                             "/ sum of time/iteration over the iterations after the warm-up; TRL = samples of the "
                             "steps after the warm-up / time from the end of the warm-up step to the end of the last",
            "ratio": "median over rounds of raytrain / TRL samples/s of the same round; spread = min..max",
        },
        "results": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-rl-") as tmp:
        root = Path(args.workdir) if args.workdir else Path(tmp)
        for preset in presets:
            inputs = build_inputs(root / "inputs", preset, args.seed)
            out.setdefault("inputs", {k: v for k, v in inputs.items()
                                      if not k.endswith(("_dir", "_path", "workdir")) and k != "parameters"})
            out.setdefault("parameters", {})[preset] = inputs["parameters"]
            job = trl_job(inputs, args)
            rounds = []
            for r in range(args.rounds):
                ours = _side(run_raytrain, args.settle, inputs, args, preset, root / "raytrain")
                theirs = _side(run_trl, args.settle, args.trl_python, job)
                rounds.append({"raytrain": ours, "trl": theirs})
                print(f"{preset} round {r + 1}: raytrain {ours.get('samples_per_s', float('nan')):.2f} vs TRL "
                      f"{theirs.get('samples_per_s', float('nan')):.2f} samples/s", file=sys.stderr, flush=True)
            ratio = paired_ratio(rounds)
            steady = [x["raytrain"]["time_split"] for x in rounds if "time_split" in x["raytrain"]]
            out["results"].append({
                "preset": preset, "unit": "samples_per_s", "rounds": rounds, **ratio,
                "raytrain_time_split": {k: statistics.fmean(s[k] for s in steady) for k in steady[0]}
                if steady else None,
            })
    cpus = os.cpu_count() or 1
    busy = [x["preset"] for x in out["results"] for r in x["rounds"]
            if max(r["raytrain"]["loadavg_1m_before"], r["trl"]["loadavg_1m_before"]) > cpus
            or max(r["raytrain"]["cpu_busy_before"] or 0.0, r["trl"]["cpu_busy_before"] or 0.0) > 0.5]
    failed = sum("error" in r[side] for x in out["results"] for r in x["rounds"] for side in ("raytrain", "trl"))
    if failed:
        out["failed_runs"] = failed
    if busy:
        out["warning"] = (f"load average above the {cpus} CPUs, or over half of them busy, before {len(busy)} "
                          f"round(s) ({', '.join(busy[:6])}): the machine was shared; rerun on a quiet one before "
                          "quoting these ratios")
    out["table"] = table(out["results"])
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raytrain bench rl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,small", help="model presets, comma-separated")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (raytrain, TRL, raytrain, TRL...)")
    p.add_argument("--prompts-per-step", type=int, default=8,
                   help="P: prompts per optimizer step (raytrain: rl.rollout.prompts_per_iteration)")
    p.add_argument("--generations", type=int, default=4, help="G: completions per prompt (the GRPO group)")
    p.add_argument("--completion-length", type=int, default=32, help="L: most tokens of a completion")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps (raytrain: iterations) per run")
    p.add_argument("--warmup", type=int, default=2, help="W: steps left out of the steady state")
    p.add_argument("--workers", type=int, default=2, help="raytrain's Ray Train workers (1 thread each)")
    p.add_argument("--placement", choices=["colocated", "split"], default="colocated",
                   help="raytrain's rollout placement (rl.rollout.placement)")
    p.add_argument("--ray-cpus", type=int, default=max(8, os.cpu_count() or 1),
                   help="logical CPUs of the local Ray instance (reservations, not threads)")
    p.add_argument("--settle", type=float, default=30.0,
                   help="before each side, wait up to this many seconds for the CPUs to go quiet (under 25%% busy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON, help="python of TRL's venv (make .venv-trl/.installed)")
    p.add_argument("--trl-threads", type=int, default=THREADS,
                   help="TRL's intra-op threads (default: the 2 cores raytrain's 2 workers use)")
    p.add_argument("--trl-micro-batch", type=int, default=None,
                   help="TRL's per_device_train_batch_size in samples (default: all P x G in one micro-batch)")
    p.add_argument("--workdir", default=None, help="keep inputs and runs here (default: a temporary directory)")
    p.add_argument("--out", default=None, help="write the JSON result here too")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if not 0 < args.warmup < args.steps:
        raise SystemExit("need 0 < --warmup < --steps (the steady state is the steps after the warm-up)")
    if args.prompts_per_step % args.workers:
        raise SystemExit(f"--prompts-per-step must be a multiple of --workers ({args.workers})")
    if args.generations < 2:
        raise SystemExit("GRPO needs --generations >= 2")
    args.argv = argv
    result = run(args)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    print(result["table"], file=sys.stderr)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
