"""The RL stage (driver side): `raytrain rl` / `python -m jobs.rl`.

1. resolve the policy's parent (`rl.parent`, else this spec's SFT export) and the reward sources (a reward-model
   export — `rl.reward.model`, else this spec's reward stage when no function is named — and/or functions);
2. prepare the prompts with Ray Data like every post-training dataset (accounting identity, quarantine);
3. split placement: start the rollout engine, reference and reward actor groups (Ray restarts a dead one);
4. train on Ray Train with the shared loop and `RLTrainTask` (`raytrain.rl.task`): iterations become optimizer
   steps, checkpoints fall on iteration boundaries, so Ray Train's restart after a lost worker resumes exactly;
5. export the policy with lineage (parent, reward sources, prompts, algorithm settings) and score it on the held-out
   prompts against the parent's baseline from iteration 0 (eval.json `heldout`).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from raytrain import storage
from raytrain.config.schema import JobSpec, RLStageSpec
from raytrain.errors import StageInputError

log = logging.getLogger(__name__)

DEMO_GROUND_TRUTH = "raytrain.posttrain.demo:reward"


def resolve_model_ref(spec: JobSpec, ref: str) -> str:
    """A registry reference, URI, absolute path, or a path relative to the storage root -> a model directory."""
    ref = ref.removeprefix("file://")
    if ref.startswith("models:/"):
        from raytrain.registry import Registry

        return Registry(spec.storage.root).resolve(ref)
    if storage.is_uri(ref) or os.path.isabs(os.path.expanduser(ref)):
        return os.path.expanduser(ref) if not storage.is_uri(ref) else ref
    return storage.join(storage.Layout(spec.storage.root).root, ref)


def reward_model_dir(spec: JobSpec) -> str | None:
    """The reward model the spec names, else this spec's reward stage export when no function is given."""
    r = spec.rl.reward
    if r.model:
        path = resolve_model_ref(spec, r.model)
    elif not r.functions and spec.reward is not None:
        from raytrain.posttrain.stage import model_dir_of

        path = model_dir_of(spec, "reward")
    elif not r.functions:
        raise StageInputError("rl: no reward source: set rl.reward.model (a reward-model export) or "
                              "rl.reward.functions (module:function), or add a reward stage to the spec")
    else:
        return None
    if not storage.exists(storage.join(path, "config.json")):
        raise StageInputError(f"rl: the reward model {path} has no config.json; train the reward stage first")
    return path


def check_functions(section: RLStageSpec) -> None:
    """Import every reward function now, so a typo fails before any worker starts."""
    from raytrain.rl.roles import load_function

    for f in section.reward.functions:
        try:
            load_function(f.name)
        except ValueError as exc:
            raise StageInputError(f"rl.reward.functions: {exc}") from None


def _eval_set(manifest: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    """The first `limit` held-out prompts (val split), as the workers' evaluation reads them."""
    import json

    import pyarrow.parquet as pq

    from raytrain.data.readers import parquet_files

    if not manifest["splits"].get("val", {}).get("rows"):
        return []
    rows: list[dict[str, Any]] = []
    for f in parquet_files(storage.join(manifest["path"], "val")):
        fs, p = storage.filesystem(f)
        table = pq.read_table(p, filesystem=fs, columns=["prompt_ids", "prompt_len", "prompt_text", "ground_truth"])
        for r in table.to_pylist():
            n = int(r["prompt_len"])
            rows.append({"ids": list(r["prompt_ids"])[:n], "text": r["prompt_text"],
                         "ground_truth": json.loads(r["ground_truth"]) if r["ground_truth"] else None,
                         "index": len(rows)})
            if len(rows) >= limit:
                return rows
    return rows


def role_kwargs(spec: JobSpec, parent: str, reward_dir: str | None) -> dict[str, dict[str, Any]]:
    section = spec.rl
    t, r = section.train, section.rollout
    if r.backend == "vllm":  # VLLMRolloutEngine's constructor (it renders vllm.LLM's arguments itself)
        engine = {"backend": "vllm", "rollout": r.model_dump(mode="json"), "model_dir": parent,
                  "max_model_len": section.data.max_length, "seed": t.seed}
    else:
        engine = {"backend": "torch", "model_dir": parent, "device": "cuda" if t.use_gpu else "cpu",
                  "max_batch_size": r.engine_batch_size}
    return {
        "engine": engine,
        "reference": {"model_dir": parent, "use_gpu": t.use_gpu},
        "reward": {"model_dir": reward_dir, "model_weight": section.reward.model_weight,
                   "functions": [(f.name, f.weight) for f in section.reward.functions], "use_gpu": t.use_gpu},
    }


def run_rl(spec: JobSpec, fault_injection: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the RL stage end to end; returns the export path, data accounting, final metrics, held-out figures and
    every iteration's figures (``iterations``)."""
    from transformers import AutoConfig

    from raytrain.data.readers import read_prepared
    from raytrain.posttrain.stage import _check_parent, check_run_inputs, prepare, resolve_parent, stage_spec
    from raytrain.rl.task import PROMPT_COLUMNS
    from raytrain.train.trainer import export_model, fit, parent_ref

    t0 = time.time()
    section: RLStageSpec = stage_spec(spec, "rl")  # type: ignore[assignment]
    t = section.train
    parent = resolve_parent(spec, "rl")
    _check_parent(parent, "rl")
    check_functions(section)
    reward_dir = reward_model_dir(spec)
    manifest = prepare(spec, "rl", parent)
    world, per_rank = t.num_workers, section.rollout.prompts_per_iteration // t.num_workers
    n_train = manifest["splits"]["train"]["rows"]
    per_epoch = (n_train // world) // per_rank
    if per_epoch < 1:
        raise StageInputError(f"rl: the train split has {n_train} prompts; one iteration needs "
                              f"rollout.prompts_per_iteration = {section.rollout.prompts_per_iteration}")
    check_run_inputs(spec, "rl", parent, manifest)
    spi = section.steps_per_iteration
    max_steps = section.iterations * spi
    # Iterations become optimizer steps: one report per iteration, checkpoints on iteration boundaries.
    t = t.model_copy(update={"max_steps": max_steps, "log_every": spi, "shuffle_buffer": 0,
                             "checkpoint_every": section.checkpoint_every * spi,
                             "warmup_steps": min(t.warmup_steps, max_steps - 1)})
    run_name = spec.stage_run_name("rl")
    run_dir = storage.join(storage.Layout(spec.storage.root).runs(), run_name)
    kwargs = role_kwargs(spec, parent, reward_dir)
    rl_config: dict[str, Any] = {
        "rollout": section.rollout.model_dump(mode="json"),
        "prompts_per_rank": per_rank, "steps_per_iteration": spi, "iterations_per_epoch": per_epoch,
        "eval_every": section.eval_every, "eval_set": _eval_set(manifest, section.eval_prompts),
        "eval_sampling": {"seed": t.seed, "max_new_tokens": section.rollout.max_new_tokens,
                          "temperature": section.rollout.temperature},
        "ground_truth_fn": DEMO_GROUND_TRUTH if section.data.source == "demo" else None,
        "log_dir": storage.join(run_dir, "rl"), "critic_init": reward_dir or parent,
        "engine_kwargs": kwargs["engine"], "reference_kwargs": kwargs["reference"], "reward_kwargs": kwargs["reward"],
    }
    # The prompts are read once, before any actor reserves CPUs: Ray Data then needs no CPU of its own to feed the
    # workers (a read task that cannot be scheduled would stall the run with no error). Prompt sets are small.
    train_ds = read_prepared(storage.join(manifest["path"], "train"), columns=list(PROMPT_COLUMNS)
                             ).randomize_block_order(seed=t.seed).materialize()
    actors: list[Any] = []
    if section.rollout.placement == "split":
        _check_resources(section)
        rl_config["actors"] = _start_actors(section, run_name, kwargs)
        actors = [h for group in rl_config["actors"].values() for h in group]
    with storage.local_dir(parent) as pdir:
        model_config = AutoConfig.from_pretrained(str(pdir)).to_dict()
    log.info("rl: %s (%s) on %d workers, %s placement, %d iterations of %d prompts x %d samples (%d steps each), "
             "from %s", run_name, t.task.algorithm, world, section.rollout.placement, section.iterations,
             section.rollout.prompts_per_iteration, t.task.n_samples, spi, parent)
    try:
        result = fit(t, run_name, spec.storage.root, train_ds, {
            "model_config": model_config, "init_from": parent, "seq_len": section.data.max_length,
            "rl": rl_config, **(fault_injection or {})})
    finally:
        _stop(actors)

    lineage = {
        "task": t.task.model_dump(mode="json"),
        "parent": parent_ref(parent),
        "reward": {"model": parent_ref(reward_dir) if reward_dir else None,
                   "model_weight": section.reward.model_weight,
                   "functions": [f.model_dump() for f in section.reward.functions]},
        "rollout": section.rollout.model_dump(mode="json"),
        "iterations": section.iterations,
        "dataset": {"name": section.data.name, "version": manifest.get("version"), "path": manifest["path"],
                    "key": manifest["key"], "counts": manifest["counts"], "splits": manifest["splits"],
                    "sources": manifest.get("sources")},
        "tokenizer_sha256": manifest.get("tokenizer_sha256"),
    }
    model_dir = export_model(result, spec.stage_model_name("rl"), [parent], lineage, spec, run_name)
    iterations = iteration_log(rl_config["log_dir"])
    figures = heldout(spec, model_dir, rl_config, kwargs["reward"], iterations)
    eval_path = storage.join(model_dir, "eval.json")
    earlier = storage.read_json(eval_path) if storage.exists(eval_path) else {}
    storage.write_json(eval_path, {**earlier, "stage": "rl", "heldout": figures})
    log.info("rl: exported %s in %.0fs (held-out %s)", model_dir, time.time() - t0, figures)
    return {"model_dir": model_dir, "parent": parent, "reward_model": reward_dir, "data": manifest["counts"],
            "metrics": {k: v for k, v in result.metrics.items() if not isinstance(v, dict)},
            "heldout": figures, "iterations": iterations}


def _check_resources(section: RLStageSpec) -> None:
    """Refuse a split placement the cluster cannot hold (Ray would wait for it forever, saying nothing)."""
    import ray

    r, t = section.rollout, section.train
    actors = 3 * (r.num_engines or t.num_workers)
    need_cpu = t.num_workers + actors * r.num_cpus
    have = ray.cluster_resources()
    if need_cpu > have.get("CPU", 0):
        raise StageInputError(
            f"rl: split placement needs {need_cpu:g} CPUs (train.num_workers={t.num_workers} workers + {actors} "
            f"actors x rollout.num_cpus={r.num_cpus:g}), the cluster has {have.get('CPU', 0):g}: lower "
            "rollout.num_cpus or rollout.num_engines, or use placement colocated")
    gpus = r.num_gpus or (float(r.vllm.tensor_parallel_size) if r.backend == "vllm" else 0.0)
    need_gpu = (t.num_workers if t.use_gpu else 0) + (r.num_engines or t.num_workers) * gpus + 2 * (
        r.num_engines or t.num_workers) * r.num_gpus
    if need_gpu > have.get("GPU", 0):
        raise StageInputError(f"rl: split placement needs {need_gpu:g} GPUs (training workers and actors), the "
                              f"cluster has {have.get('GPU', 0):g}: lower rollout.num_gpus or rollout.num_engines")


def _start_actors(section: RLStageSpec, run_name: str, kwargs: dict[str, dict[str, Any]]) -> dict[str, list[Any]]:
    from raytrain.rl.roles import start_actors

    r = section.rollout
    count = r.num_engines or section.train.num_workers
    gpus = r.num_gpus or (float(r.vllm.tensor_parallel_size) if r.backend == "vllm" else 0.0)
    return {
        "engine": start_actors(run_name, "engine", count, kwargs["engine"], r.num_cpus, gpus, r.max_engine_restarts),
        "reference": start_actors(run_name, "reference", count, kwargs["reference"], r.num_cpus,
                                  r.num_gpus, r.max_engine_restarts),
        "reward": start_actors(run_name, "reward", count, kwargs["reward"], r.num_cpus, r.num_gpus,
                               r.max_engine_restarts),
    }


def _stop(actors: list[Any]) -> None:
    import ray

    for h in actors:
        try:
            ray.kill(h)
        except Exception:  # already gone
            pass


def iteration_log(log_dir: str) -> list[dict[str, Any]]:
    """Every iteration's figures, in order (what rank 0 wrote at each report)."""
    import pyarrow.fs as pafs

    folder = storage.join(log_dir, "iterations")
    if not storage.exists(folder):
        return []
    fs, p = storage.filesystem(folder)
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(p)) if i.base_name.endswith(".json"))
    return [storage.read_json(storage.join(folder, os.path.basename(f))) for f in files]


def heldout(spec: JobSpec, model_dir: str, rl_config: dict[str, Any], reward_kwargs: dict[str, Any],
            iterations: list[dict[str, Any]]) -> dict[str, Any]:
    """The exported policy on the held-out prompts (as the in-training evaluation samples them), next to the
    parent's figures from iteration 0; a Ray task, so it runs on the cluster."""
    import ray

    eval_set = rl_config["eval_set"]
    if not eval_set:
        return {}
    use_gpu = spec.rl.train.use_gpu
    task = ray.remote(_heldout_task).options(num_cpus=1, num_gpus=1 if use_gpu else 0)
    final = ray.get(task.remote(model_dir, eval_set, rl_config["eval_sampling"], reward_kwargs,
                                rl_config["ground_truth_fn"], use_gpu))
    out: dict[str, Any] = {"prompts": len(eval_set), **final}
    base = next((it for it in iterations if it.get("iteration") == 0 and "eval/reward" in it), None)
    if base:
        out["parent_reward"] = base["eval/reward"]
        out["reward_gain"] = final["reward"] - base["eval/reward"]
        if "eval/ground_truth_reward" in base and "ground_truth_reward" in final:
            out["parent_ground_truth_reward"] = base["eval/ground_truth_reward"]
            out["ground_truth_gain"] = final["ground_truth_reward"] - base["eval/ground_truth_reward"]
    kls = [it["kl"] for it in iterations if "kl" in it]
    if kls:
        out["kl_last"] = kls[-1]
    return out


def _heldout_task(model_dir: str, eval_set: list[dict[str, Any]], sampling: dict[str, Any],
                  reward_kwargs: dict[str, Any], ground_truth_fn: str | None, use_gpu: bool) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from raytrain.rl.roles import LocalRole, RewardScorer, load_function
    from raytrain.rl.rollout import TorchRolloutEngine
    from raytrain.rl.task import evaluate_prompts

    engine = LocalRole(TorchRolloutEngine(model_dir, device="cuda" if use_gpu else "cpu"))
    scorer = LocalRole(RewardScorer(**reward_kwargs))
    with storage.local_dir(model_dir) as d:
        tok = AutoTokenizer.from_pretrained(str(d))
    fn = load_function(ground_truth_fn) if ground_truth_fn else None
    res = evaluate_prompts(engine, scorer, eval_set, sampling, tok, fn)
    out = {"reward": sum(res["reward"]) / len(res["reward"]), "examples": [
        {"prompt": p["text"], "response": r} for p, r in zip(eval_set[:3], res["responses"][:3], strict=False)]}
    if "ground_truth" in res:
        out["ground_truth_reward"] = sum(res["ground_truth"]) / len(res["ground_truth"])
    return out
