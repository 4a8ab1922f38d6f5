"""`raytrain bench posttrain`: SFT and DPO training throughput, raytrain vs TRL, side by side.

One run builds the inputs (a byte-level BPE with ChatML, vocabulary 2,048; a synthetic conversational SFT set
and a preference set, every example at most 128 tokens; a freshly initialised Llama of each preset saved in
transformers' format with the tokenizer), then for each preset and task alternates rounds:

* raytrain: the data goes through raytrain's post-training preparation (`prepare_posttrain_data`) and the
  training loop runs on 2 CPU workers of 1 thread each (the launcher used is in the output);
* TRL: `SFTTrainer` / `DPOTrainer` in TRL's own virtualenv (``.venv-trl``, ``make .venv-trl/.installed``),
  one process with 2 threads, run by `raytrain/bench/trl_side.py`.

Both sides get the same model, data, maximum length and global batch (8 examples, or 8 pairs for DPO), fp32,
and the same thread budget. Throughput is steady state: the steps after a warm-up. Reported per round and as
medians: examples/s and tokens/s for SFT, pairs/s and tokens/s for DPO (tokens: the non-pad tokens of the
batches; chosen + rejected for DPO), and the ratio raytrain / TRL.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
VOCAB_SIZE = 2048
MAX_LENGTH = 128
GLOBAL_BATCH = 8
THREADS = 2  # the whole thread budget of each side: raytrain 2 workers x 1 thread, TRL 1 process x 2 threads

# ------------------------------------------------------------------------------------------ inputs

_SUBJECTS = ["the river", "a small bakery", "the old library", "my neighbour", "the city council", "a red fox",
             "the mountain trail", "our garden", "the night train", "a young teacher", "the harbour", "the museum",
             "a quiet village", "the football team", "an old clock", "the winter market", "a lost cat",
             "the science fair", "the bridge", "a travelling musician"]
_VERBS = ["opens", "closes", "changes", "grows", "moves", "shines", "waits", "returns", "sings", "rests", "works",
          "travels", "starts", "ends", "falls", "rises"]
_TIMES = ["in the morning", "at night", "every spring", "after the rain", "on Sundays", "before dinner",
          "during the summer", "when the snow melts", "at noon", "once a year"]
_ADJS = ["quiet", "bright", "busy", "gentle", "cold", "warm", "famous", "tiny", "ancient", "friendly", "careful",
         "strange", "beautiful", "simple", "useful", "slow", "fast", "happy"]
_QUESTIONS = ["Tell me something about {s}.", "What happens to {s} {t}?", "Why is {s} so {a}?",
              "Can you describe {s} in a few words?", "Write one sentence about {s}.",
              "How would you explain {s} to a child?", "What do people say about {s}?"]
_SYLLABLES = ["ka", "ro", "mi", "te", "lu", "san", "vor", "del", "pi", "na", "gor", "shi", "bel", "tra", "quo", "zen",
              "fa", "dur", "wil", "ost", "mar", "ny", "bo", "cle", "hu", "ix", "par", "ven", "sol", "ju"]
_BAD = ["I do not know.", "No.", "Maybe, maybe not.", "That is not something I can answer.", "Whatever you say.",
        "Ask someone else."]


def _name(rng: random.Random) -> str:
    """A made-up place name: enough variety for the BPE to fill its 2,048 tokens."""
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def _subject(rng: random.Random) -> str:
    return rng.choice(_SUBJECTS) if rng.random() < 0.6 else f"{rng.choice(_SUBJECTS)} of {_name(rng)}"


def _sentence(rng: random.Random) -> str:
    s = _subject(rng)
    return (f"{s[0].upper()}{s[1:]} is {rng.choice(_ADJS)} and {rng.choice(_VERBS)} {rng.choice(_TIMES)}, "
            f"which makes it {rng.choice(_ADJS)}.")


def _example(rng: random.Random) -> tuple[str, str, str]:
    """(user question, good answer, bad answer): short English text."""
    q = rng.choice(_QUESTIONS).format(s=_subject(rng), t=rng.choice(_TIMES), a=rng.choice(_ADJS))
    good = " ".join(_sentence(rng) for _ in range(rng.randint(1, 4)))
    bad = rng.choice(_BAD) if rng.random() < 0.5 else _sentence(rng)
    return q, good, bad


def _chatml_len(tok: Any, messages: list[dict[str, str]]) -> int:
    return len(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def build_inputs(workdir: str | Path, preset: str, n_rows: int, seed: int) -> dict[str, Any]:
    """Tokenizer, model and datasets of one preset under `workdir`; reused when already there.

    Layout: ``tokenizer/`` (shared by the presets), ``model-<preset>/`` (config, fp32 weights and the tokenizer
    files), ``sft.jsonl`` (``{"messages": [user, assistant]}``) and ``dpo.jsonl``
    (``{"prompt": [user], "chosen": [assistant], "rejected": [assistant]}``), every conversation at most
    `MAX_LENGTH` tokens in ChatML. Returns the paths and the data statistics.
    """
    from transformers import AutoTokenizer

    from raytrain.data.tokenizer import train_tokenizer

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    sft_path, dpo_path, tok_dir = work / "sft.jsonl", work / "dpo.jsonl", work / "tokenizer"
    meta_path = work / "inputs.json"
    meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("n_rows") != n_rows or meta.get("seed") != seed:
        rng = random.Random(seed)
        rows = [_example(rng) for _ in range(n_rows)]
        texts = [t for r in rows for t in r] + [_sentence(rng) for _ in range(20000)]
        train_tokenizer(texts, vocab_size=VOCAB_SIZE, min_frequency=2, out_dir=tok_dir)
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        sft_tokens = dpo_tokens = 0
        with sft_path.open("w") as sft, dpo_path.open("w") as dpo:
            for q, good, bad in rows:
                user = {"role": "user", "content": q}
                chosen, rejected = {"role": "assistant", "content": good}, {"role": "assistant", "content": bad}
                n_chosen, n_rejected = _chatml_len(tok, [user, chosen]), _chatml_len(tok, [user, rejected])
                if max(n_chosen, n_rejected) > MAX_LENGTH - 2:  # room for an EOS the trainers may append
                    raise AssertionError(f"synthetic example of {max(n_chosen, n_rejected)} tokens")
                sft.write(json.dumps({"messages": [user, chosen]}) + "\n")
                dpo.write(json.dumps({"prompt": [user], "chosen": [chosen], "rejected": [rejected]}) + "\n")
                sft_tokens += n_chosen
                dpo_tokens += n_chosen + n_rejected
        # The model's vocabulary is 2,048 even where the BPE stops a little short of it.
        meta = {"n_rows": n_rows, "seed": seed, "vocab_size": max(VOCAB_SIZE, len(tok)), "tokenizer_size": len(tok),
                "eos_token_id": tok.eos_token_id,
                "pad_token_id": tok.pad_token_id, "sft_mean_tokens": sft_tokens / n_rows,
                "dpo_mean_tokens_per_pair": dpo_tokens / n_rows, "models": {}}
        meta_path.write_text(json.dumps(meta, indent=1))
    model_dir = preset_model(work, preset, tok_dir, meta, meta_path, MAX_LENGTH, seed)
    return {"workdir": str(work), "tokenizer_dir": str(tok_dir), "model_dir": str(model_dir),
            "sft_path": str(sft_path), "dpo_path": str(dpo_path), "parameters": meta["models"][preset],
            **{k: v for k, v in meta.items() if k != "models"}}


# ------------------------------------------------------------------------------------------ raytrain side

_RUNNER = """
import json, os, sys
from raytrain.train.local import run_local
a = json.loads(sys.argv[1])
run_local(a["config"], a["run_dir"], a["data_dir"])
"""


def _train_spec(task: str, reference: str, steps: int, warmup: int, workers: int) -> Any:
    from raytrain.config.schema import TrainSpec

    # SFT: loss on every token, as TRL's SFTTrainer does by default (the compute is the same either way).
    # DPO: the sigmoid loss with beta 0.1, TRL's defaults.
    task_cfg = {"type": "sft", "assistant_only_loss": False} if task == "sft" else \
        {"type": "dpo", "beta": 0.1, "loss_type": "sigmoid", "reference": reference}
    return TrainSpec(task=task_cfg, num_workers=workers, use_gpu=False, precision="fp32",
                     micro_batch_size=GLOBAL_BATCH // workers, max_steps=steps, warmup_steps=1, lr=1e-5,
                     weight_decay=0.0, log_every=warmup, checkpoint_every=steps, shuffle_buffer=0, tensorboard=False)


def prepare_data(inputs: dict[str, Any], task: str, root: Path) -> tuple[str, dict[str, Any]]:
    """raytrain's own preparation of the bench data (Ray Data, the model's chat template); returns train/."""
    from raytrain.config.schema import PostTrainDataSpec
    from raytrain.posttrain.data import prepare_posttrain_data

    kind = "sft" if task == "sft" else "preference"
    name = f"bench-{kind}"
    spec = PostTrainDataSpec(name=name, source="files", paths=[inputs["sft_path" if kind == "sft" else "dpo_path"]],
                             max_length=MAX_LENGTH, max_prompt_length=MAX_LENGTH // 2, val_fraction=0.0)
    manifest = prepare_posttrain_data(kind, spec, inputs["model_dir"], str(root / "datasets" / name))
    return str(root / "datasets" / name / "train"), manifest


def precompute_reference(inputs: dict[str, Any], train_dir: str, root: Path, workers: int) -> tuple[str, float]:
    """The reference log-probs of every pair, as the DPO stage computes them (`reference: precomputed`)."""
    from raytrain.data.readers import read_prepared
    from raytrain.posttrain.scoring import PairLogps, map_with

    dest = root / "reference" / f"{Path(inputs['model_dir']).name}-{time.time_ns()}"
    t0 = time.perf_counter()
    map_with(read_prepared(train_dir), PairLogps, {"model_dir": inputs["model_dir"], "prefix": "ref"},
             False, replicas=workers).write_parquet(str(dest))
    return str(dest), time.perf_counter() - t0


def _steady(intervals: list[dict[str, Any]], task: str, warmup: int, steps: int) -> dict[str, Any]:
    """Steady-state rates from the loop's per-interval metrics, without the first interval (start-up)."""
    rows = [m for m in intervals if "examples_per_s" in m and m.get("step", 0) > warmup]
    if not rows:
        raise RuntimeError(f"no metrics after step {warmup}: {intervals}")
    seconds = examples = tokens = 0.0
    n_steps = 0
    for m in rows:  # every interval is `warmup` steps (the loop reports every `warmup` steps; steps is a multiple)
        n = warmup * GLOBAL_BATCH
        dt = n / m["examples_per_s"]
        seconds, examples, tokens, n_steps = seconds + dt, examples + n, tokens + m["tokens_per_s"] * dt, \
            n_steps + warmup
    unit = "examples_per_s" if task == "sft" else "pairs_per_s"
    return {unit: examples / seconds, "tokens_per_s": tokens / seconds, "steady_steps": n_steps,
            "steady_seconds": seconds, "tokens_per_step": tokens / n_steps,
            "intervals": [{k: m[k] for k in ("step", "examples_per_s", "tokens_per_s", "loss")} for m in rows]}


def run_raytrain(inputs: dict[str, Any], task: str, reference: str, steps: int, warmup: int, root: Path,
                 launcher: str, workers: int = 2) -> dict[str, Any]:
    """One raytrain run on `workers` CPU workers of 1 thread each; steady-state figures."""
    from transformers import AutoConfig

    t_start = time.perf_counter()
    train_dir, manifest = prepare_data(inputs, task, root)
    prep_s = time.perf_counter() - t_start
    ref_s = 0.0
    if task == "dpo" and reference == "precomputed":
        train_dir, ref_s = precompute_reference(inputs, train_dir, root, workers)
    t = _train_spec(task, reference, steps, warmup, workers)
    loop_config = {"model_config": AutoConfig.from_pretrained(inputs["model_dir"]).to_dict(),
                   "init_from": inputs["model_dir"], "seq_len": MAX_LENGTH}
    run_name = f"bench-{task}-{reference}-{time.time_ns()}"
    t_train = time.perf_counter()
    if launcher == "ray":
        from raytrain.data.readers import read_prepared
        from raytrain.posttrain.tasks import build_posttrain_task
        from raytrain.train.trainer import fit

        columns = list(build_posttrain_task({"train": t.model_dump(mode="json"),
                                             "init_from": inputs["model_dir"]}).columns)
        ds = read_prepared(train_dir, columns=columns)
        result = fit(t, run_name, str(root), ds, loop_config)
        # Ray Train keeps every report in `metrics_dataframe` where it has one; otherwise only the last interval
        # (the last `warmup` steps) is measured: run with --steps 2 x --warmup to make that every steady step.
        frame = getattr(result, "metrics_dataframe", None)
        intervals = frame.to_dict("records") if frame is not None and len(frame) else [result.metrics]
    else:
        run_dir = root / "runs" / run_name
        args = json.dumps({"config": {"train": t.model_dump(mode="json"), **loop_config}, "run_dir": str(run_dir),
                           "data_dir": train_dir})
        env = {**os.environ, "WORLD_SIZE": str(workers), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port()),
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, "-c", _RUNNER, args], env={**env, "RANK": str(r),
                                                                              "LOCAL_RANK": str(r)})
                 for r in range(workers)]
        codes = [p.wait(timeout=3600) for p in procs]
        if any(codes):
            raise RuntimeError(f"raytrain local workers exited with {codes}")
        intervals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out = {"side": "raytrain", "task": task, **_steady(intervals, task, warmup, steps),
           "train_seconds": time.perf_counter() - t_train, "prepare_seconds": prep_s,
           "rows": manifest["splits"]["train"]["rows"], "launcher": launcher, "workers": workers,
           "threads_per_worker": 1}
    if task == "dpo":
        out["reference"] = reference
        out["precompute_seconds"] = ref_s
    return out


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------ TRL side


def run_trl(python: str, inputs: dict[str, Any], task: str, reference: str, steps: int, warmup: int,
            threads: int = THREADS) -> dict[str, Any]:
    """One TRL run in its own interpreter (`trl_side.py`), 1 process x `threads` threads."""
    job = {"task": task, "model_dir": inputs["model_dir"], "data_path": inputs["sft_path" if task == "sft" else
                                                                              "dpo_path"],
           "global_batch": GLOBAL_BATCH, "steps": steps, "warmup_steps": warmup, "max_length": MAX_LENGTH,
           "threads": threads, "lr": 1e-5, "seed": 0, "precompute_ref_log_probs": reference == "precomputed"}
    script = Path(__file__).with_name("trl_side.py")
    proc = subprocess.run([python, str(script), json.dumps(job)], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL side failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ driver


def _side(fn: Any, *args: Any) -> dict[str, Any]:
    """One side's run with the load average before it (these machines are shared, and a busy one penalises a
    multi-threaded process's OpenMP barriers far more than single-threaded workers); a failure is recorded, and the
    round is left out of the medians, instead of ending the benchmark."""
    load = os.getloadavg()[0]
    try:
        result = fn(*args)
    except Exception as e:  # a failed run is a figure of the benchmark too
        result = {"error": f"{type(e).__name__}: {str(e)[-2000:]}"}
    result["loadavg_1m_before"] = load
    return result


def _trl_versions(python: str) -> dict[str, str | None]:
    code = ("import json, importlib.metadata as m\nout = {}\nfor p in ('trl', 'transformers', 'torch', 'accelerate', "
            "'datasets'):\n    try: out[p] = m.version(p)\n    except m.PackageNotFoundError: out[p] = None\n"
            "print(json.dumps(out))")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    return json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr[-500:]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    presets = [p for p in args.presets.split(",") if p]
    tasks = [t for t in args.tasks.split(",") if t]
    refs = [r for r in args.dpo_reference.split(",") if r]
    out: dict[str, Any] = {
        "benchmark": "posttrain", "command": "raytrain bench posttrain " + " ".join(args.argv),
        "machine": machine(_PACKAGES), "trl_versions": _trl_versions(args.trl_python),
        "setup": {"global_batch": GLOBAL_BATCH, "max_length": MAX_LENGTH, "vocab_size": VOCAB_SIZE, "precision": "fp32",
                  "steps": args.steps, "warmup_steps": args.warmup, "launcher": args.launcher,
                  "threads": f"raytrain: 2 workers x 1 thread (micro-batch {GLOBAL_BATCH // 2} each, ZeRO-2); "
                             f"TRL: 1 process x {args.trl_threads} threads (batch {GLOBAL_BATCH})",
                  "activation_checkpointing": False,
                  "sft_loss": "every token (TRL's default for conversational data; raytrain assistant_only_loss=false)",
                  "dpo": "sigmoid loss, beta 0.1; reference 'model' = a frozen reference forward each step "
                         "(TRL's default), 'precomputed' = reference log-probs computed before training (TRL "
                         "precompute_ref_log_probs=True; raytrain reference: precomputed, a Ray Data pass); the "
                         "precompute time is reported apart and not in the steady-state rate",
                  "steady_state": "steps after the warm-up steps; raytrain: the loop's per-interval metrics "
                                  "(log_every = warm-up steps) without the first interval; TRL: on_step_end times"},
        "results": [],
    }
    import ray

    if not ray.is_initialized():  # Ray Data prepares the data for both launchers
        # A fresh local instance: other Ray instances on a shared machine are not this benchmark's.
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), logging_level="WARNING",
                 include_dashboard=False)
    with tempfile.TemporaryDirectory(prefix="bench-posttrain-") as tmp:
        root = Path(args.workdir) if args.workdir else Path(tmp)
        for preset in presets:
            inputs = build_inputs(root / "inputs", preset, args.rows, args.seed)
            out.setdefault("inputs", {k: v for k, v in inputs.items() if not k.endswith(("_dir", "_path", "workdir"))})
            out.setdefault("parameters", {})[preset] = inputs["parameters"]
            for task in tasks:
                for ref in (refs if task == "dpo" else ["-"]):
                    name = task if task == "sft" else f"dpo/reference={ref}"
                    unit = "examples_per_s" if task == "sft" else "pairs_per_s"
                    rounds = []
                    for r in range(args.rounds):
                        ours = _side(run_raytrain, inputs, task, ref, args.steps, args.warmup, root / "raytrain",
                                     args.launcher)
                        theirs = _side(run_trl, args.trl_python, inputs, task, ref, args.steps, args.warmup,
                                       args.trl_threads)
                        rounds.append({"raytrain": ours, "trl": theirs})
                        print(f"{preset} {name} round {r + 1}: raytrain {ours.get(unit, float('nan')):.1f} vs TRL "
                              f"{theirs.get(unit, float('nan')):.1f} {unit}", file=sys.stderr, flush=True)
                    ok = [x for x in rounds if unit in x["raytrain"] and unit in x["trl"]]
                    med = {side: {k: statistics.median(x[side][k] for x in ok) if ok else None
                                  for k in (unit, "tokens_per_s")} for side in ("raytrain", "trl")}
                    out["results"].append({
                        "preset": preset, "task": name, "unit": unit, "rounds": rounds, "median": med,
                        "ratio": med["raytrain"][unit] / med["trl"][unit] if ok else None,
                        "ratio_tokens": med["raytrain"]["tokens_per_s"] / med["trl"]["tokens_per_s"] if ok else None,
                    })
    cpus = os.cpu_count() or 1
    busy = [x["preset"] + " " + x["task"] for x in out["results"] for r in x["rounds"]
            if max(r["raytrain"]["loadavg_1m_before"], r["trl"]["loadavg_1m_before"]) > cpus]
    failed = sum("error" in r[side] for x in out["results"] for r in x["rounds"] for side in ("raytrain", "trl"))
    if failed:
        out["failed_runs"] = failed
    if busy:
        # Oversubscribed cores make OpenMP's spinning barriers of a multi-threaded process (TRL's side) collapse,
        # while raytrain's single-threaded workers barely notice: those ratios are not the frameworks'.
        out["warning"] = (f"load average above the {cpus} CPUs during {len(busy)} round(s) ({', '.join(busy[:6])}): "
                          "the machine was shared; rerun on a quiet one before quoting these ratios")
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raytrain bench posttrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,small", help="model presets, comma-separated")
    p.add_argument("--tasks", default="sft,dpo", help="sft, dpo, comma-separated")
    p.add_argument("--dpo-reference", default="model,precomputed",
                   help="DPO reference handling to compare: model (in-memory frozen reference), precomputed")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (raytrain, TRL, raytrain, TRL...)")
    p.add_argument("--steps", type=int, default=32, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=16,
                   help="steps left out of the steady state; also raytrain's report interval (steps: a multiple)")
    p.add_argument("--rows", type=int, default=2000, help="synthetic rows generated (each run uses 8 x steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--launcher", choices=["ray", "local"], default="ray",
                   help="raytrain side: Ray Train (the product path) or 2 local torch.distributed processes")
    p.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON, help="python of TRL's venv (make .venv-trl/.installed)")
    p.add_argument("--trl-threads", type=int, default=THREADS,
                   help="TRL's intra-op threads (default: the 2 cores raytrain's 2 workers use)")
    p.add_argument("--workdir", default=None, help="keep inputs and runs here (default: a temporary directory)")
    p.add_argument("--out", default=None, help="write the JSON result here too")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.steps % args.warmup or args.steps <= args.warmup:
        raise SystemExit("--steps must be a multiple of --warmup and larger (the loop reports every --warmup steps)")
    args.argv = argv
    result = run(args)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def preset_model(work: Path, preset: str, tok_dir: Path, meta: dict[str, Any], meta_path: Path, max_positions: int,
                 seed: int) -> Path:
    """`work`/model-<preset>: a freshly initialised model of the preset with the tokenizer, built once per workdir
    (its parameter count recorded in `meta["models"]`, saved to `meta_path`)."""
    from transformers import AutoTokenizer

    from raytrain.models.presets import build_config, build_model

    model_dir = work / f"model-{preset}"
    if preset not in meta["models"]:
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        cfg = build_config(preset, vocab_size=meta["vocab_size"], max_position_embeddings=max_positions,
                           bos_token_id=meta["eos_token_id"], eos_token_id=meta["eos_token_id"],
                           pad_token_id=meta["pad_token_id"])
        model = build_model(cfg, seed=seed)
        model.save_pretrained(str(model_dir))
        tok.save_pretrained(str(model_dir))
        meta["models"][preset] = sum(p.numel() for p in model.parameters())
        meta_path.write_text(json.dumps(meta, indent=1))
    return model_dir
