"""The post-training stages (driver side): parent model + data -> Ray Data prep -> the shared loop -> export.

`raytrain sft|reward|dpo` (and `python -m jobs.<stage>`) run one stage from its section of the spec:

1. resolve the parent model (the section's `parent`, else the previous stage of this spec);
2. prepare the data with Ray Data in the parent's tokenizer and chat template (`raytrain.posttrain.data`): the
   accounting identity holds and malformed rows are quarantined with reasons;
3. DPO with `reference: precomputed`: one Ray Data batch-inference pass adds the reference log-probabilities to
   every pair (train and validation), so no reference model sits in training memory;
4. train on Ray Train with the shared loop (`raytrain.train.loop`) and the stage's task;
5. score the held-out split with the trained model (reward accuracy, DPO implicit-reward accuracy, SFT response
   NLL) and export a Hugging Face directory with `lineage.json` naming the parent and the data, and `eval.json`.

Every step's output is a file artifact keyed by its inputs, so a re-run (a resume after a crash, or the next
stage of a pipeline) reuses what is already there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any

from raytrain import storage
from raytrain.config.schema import JobSpec, PostTrainStageSpec
from raytrain.errors import StageInputError

log = logging.getLogger(__name__)

POST_TRAINING = ("sft", "reward", "dpo")
KIND = {"sft": "sft", "reward": "preference", "dpo": "preference", "rl": "prompt"}


def stage_spec(spec: JobSpec, stage: str) -> PostTrainStageSpec:
    section = getattr(spec, stage)
    if section is None:
        raise StageInputError(f"the spec {spec.name!r} has no `{stage}` section; add one (see jobs/configs/"
                              f"{stage}.yaml) or run a recipe that has it")
    return section


def model_dir_of(spec: JobSpec, stage: str) -> str:
    """The registry version a stage of this spec exported (runs/<run>/export.json names it)."""
    from raytrain.registry import run_model_dir

    run = spec.run_name if stage == "pretrain" else spec.stage_run_name(stage)
    return run_model_dir(spec.storage.root, run, stage)


def resolve_parent(spec: JobSpec, stage: str) -> str:
    """The section's `parent`, else: sft <- the pretrained model; reward and dpo <- the SFT model (or pretrained)."""
    section = stage_spec(spec, stage)
    if section.parent:
        parent = section.parent.removeprefix("file://") if section.parent.startswith("file://") else section.parent
        if parent.startswith("models:/"):
            from raytrain.registry import Registry

            return Registry(spec.storage.root).resolve(parent)
        if storage.is_uri(parent) or os.path.isabs(os.path.expanduser(parent)):
            return os.path.expanduser(parent) if not storage.is_uri(parent) else parent
        return storage.join(storage.Layout(spec.storage.root).root, parent)  # relative: under the storage root
    if stage == "sft" or spec.sft is None:
        return model_dir_of(spec, "pretrain")
    return model_dir_of(spec, "sft")


def model_identity(path: str) -> str:
    """What identifies the weights at `path`: the checkpoint its lineage names, else its files' sizes and times.

    Exporting another checkpoint to the same path (a parent stage re-trained) changes it, so what was computed
    from the old weights is recomputed; re-exporting the same checkpoint (a re-run that had nothing left to train)
    does not.
    """
    lineage_path = storage.join(path, "lineage.json")
    if storage.exists(lineage_path) and storage.read_json(lineage_path).get("checkpoint"):
        return f"{path}|{storage.read_json(lineage_path)['checkpoint']}"
    import pyarrow.fs as pafs

    fs, p = storage.filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    return f"{path}|" + ",".join(sorted(f"{i.base_name}:{i.size}:{i.mtime_ns}" for i in infos))


def check_run_inputs(spec: JobSpec, stage: str, parent: str, manifest: dict[str, Any]) -> None:
    """Refuse to resume a run from other inputs: a run name's checkpoints belong to one parent, data and task."""
    section = stage_spec(spec, stage)
    run_dir = storage.join(storage.Layout(spec.storage.root).runs(), spec.stage_run_name(stage))
    path = storage.join(run_dir, "inputs.json")
    inputs = {"parent": model_identity(parent), "dataset_key": manifest["key"],
              "task": section.train.task.model_dump(mode="json")}
    if storage.exists(path):
        before = storage.read_json(path)
        if before != inputs:
            changed = ", ".join(k for k in inputs if before.get(k) != inputs[k])
            raise StageInputError(
                f"{stage}: run {spec.stage_run_name(stage)!r} was started from other inputs ({changed} differ): its "
                f"checkpoints would resume the old run. Set {stage}.train.run_name to a new name (or delete "
                f"{run_dir} to start over)")
        return
    storage.write_json(path, inputs)


def _check_parent(path: str, stage: str) -> None:
    if not storage.exists(storage.join(path, "config.json")):
        raise StageInputError(f"{stage}: the parent model {path} has no config.json; train it first (or set "
                              f"{stage}.parent to a Hugging Face model directory)")


def input_paths(spec: JobSpec, stage: str) -> tuple[list[str], dict[str, Any] | None]:
    """The files the stage reads, generating the embedded alignment demo when the source is 'demo'."""
    data = stage_spec(spec, stage).data
    if data.source == "files":
        return list(data.paths), None
    from raytrain.posttrain.demo import write_alignment_demo

    demo_dir = storage.Layout(spec.storage.root).raw(f"alignment-demo-{data.demo.seed}")
    marker = storage.join(demo_dir, "demo.json")
    key = hashlib.sha256(json.dumps(data.demo.model_dump(), sort_keys=True).encode()).hexdigest()
    demo = storage.read_json(marker) if storage.exists(marker) else None
    if not demo or demo.get("key") != key:
        demo = {**write_alignment_demo(demo_dir, data.demo), "key": key}
        storage.write_json(marker, demo)  # written last: a crash mid-generation regenerates
    return [{"sft": demo["sft"], "rl": demo["prompts"]}.get(stage, demo["prefs"])], demo


def prepare(spec: JobSpec, stage: str, parent: str) -> dict[str, Any]:
    from raytrain.posttrain.data import prepare_posttrain_data

    section = stage_spec(spec, stage)
    paths, _ = input_paths(spec, stage)
    out = storage.Layout(spec.storage.root).dataset(section.data.name)
    with storage.local_dir(parent) as pdir:
        return prepare_posttrain_data(KIND[stage], section.data, str(pdir), out, input_paths=paths,
                                      quarantine_sample_bytes=spec.data.quarantine_sample_bytes, versioned=True)


def _split_path(manifest: dict[str, Any], split: str) -> str:
    return storage.join(manifest["path"], split)


def reference_logps(spec: JobSpec, stage: str, parent: str, manifest: dict[str, Any],
                    splits: tuple[str, ...] = ("train", "val"), run: str | None = None) -> dict[str, str]:
    """Pairs of `splits` with the reference's log-probabilities added (cached per run and inputs; `run`: whose
    directory holds the cache, default this stage's run)."""
    from raytrain.data.readers import read_prepared
    from raytrain.posttrain.scoring import PairLogps, map_with

    section = stage_spec(spec, stage)
    t = section.train
    run_dir = storage.join(storage.Layout(spec.storage.root).runs(), run or spec.stage_run_name(stage))
    ref_dir = storage.join(run_dir, "reference")
    key = hashlib.sha256(f"{manifest['key']}|{model_identity(parent)}|{t.precision}|{','.join(splits)}".encode()
                         ).hexdigest()
    marker = storage.join(ref_dir, "reference.json")
    out = {split: storage.join(ref_dir, f"split={split}") for split in splits}
    if storage.exists(marker) and storage.read_json(marker).get("key") == key:
        return out
    if storage.exists(marker):
        storage.remove_file(marker)  # inputs changed: the old pass no longer counts, even if this one crashes
    t0 = time.time()
    for dest in out.values():
        if storage.exists(dest):
            storage.remove_tree(dest)
    # Every split in one execution (one pool of model-loading actors), written back partitioned by split.
    parts = [read_prepared(_split_path(manifest, split)).map_batches(_with_split, fn_args=(split,),
                                                                        batch_format="pyarrow")
             for split in splits if manifest["splits"].get(split, {}).get("rows")]
    if parts:
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        map_with(ds, PairLogps, {"model_dir": parent, "prefix": "ref", "precision": t.precision}, t.use_gpu,
                 replicas=max(1, t.num_workers)).write_parquet(ref_dir, partition_cols=["split"])
    storage.write_json(marker, {"key": key, "parent": parent, "seconds": round(time.time() - t0, 1)})
    log.info("reference log-probs of %s computed in %.1fs", parent, time.time() - t0)
    return out


def _with_split(batch: Any, split: str) -> Any:
    import pyarrow as pa

    return batch.append_column("split", pa.array([split] * batch.num_rows, pa.string()))


def heldout(spec: JobSpec, stage: str, model_dir: str, val_path: str | None) -> dict[str, Any]:
    """Held-out figures of the trained model on the validation split."""
    import numpy as np

    from raytrain.data.readers import read_prepared
    from raytrain.posttrain.scoring import PairLogps, PairRewards, ResponseNLL, map_with

    if not val_path or not storage.exists(val_path):
        return {}
    t = stage_spec(spec, stage).train
    replicas = max(1, t.num_workers)
    ds = read_prepared(val_path)
    if stage == "reward":
        rows = map_with(ds, PairRewards, {"model_dir": model_dir}, t.use_gpu, replicas).to_pandas()
        margin = rows["reward_chosen"].to_numpy() - rows["reward_rejected"].to_numpy()
        return {"pairs": len(rows), "accuracy": float(np.mean(margin > 0)), "margin_mean": float(np.mean(margin))}
    if stage == "dpo":
        rows = map_with(ds, PairLogps, {"model_dir": model_dir, "prefix": "policy"}, t.use_gpu, replicas).to_pandas()
        beta = stage_spec(spec, stage).train.task.beta
        chosen = beta * (rows["policy_chosen_logp"] - rows["ref_chosen_logp"]).to_numpy()
        rejected = beta * (rows["policy_rejected_logp"] - rows["ref_rejected_logp"]).to_numpy()
        return {"pairs": len(rows), "rewards/accuracies": float(np.mean(chosen > rejected)),
                "rewards/margins": float(np.mean(chosen - rejected)), "rewards/chosen": float(np.mean(chosen)),
                "rewards/rejected": float(np.mean(rejected))}
    rows = map_with(ds, ResponseNLL, {"model_dir": model_dir}, t.use_gpu, replicas).to_pandas()
    nll = float(rows["nll"].sum() / max(rows["targets"].sum(), 1.0))
    return {"examples": len(rows), "response_nll": nll, "response_perplexity": float(np.exp(nll))}


def run_posttrain(spec: JobSpec, stage: str, fault_injection: dict[str, Any] | None = None,
                  callbacks: list[Any] | None = None, export: bool = True,
                  reference_run: str | None = None) -> dict[str, Any]:
    """Run one post-training stage end to end; returns the export path, data accounting, metrics, held-out figures.

    `callbacks`: Ray Train callbacks (a sweep trial's). `export=False` (a sweep trial) trains without publishing and
    returns the final checkpoint and metrics. `reference_run`: the run whose directory
    caches DPO's reference log-probabilities (a sweep's trials share one pass); unset, this run's.
    `fault_injection` is for tests only (e.g. {"crash_in_save_at_step": 20}).
    """
    from transformers import AutoConfig

    from raytrain.train.trainer import export_model, fit

    t0 = time.time()
    section = stage_spec(spec, stage)
    t = section.train
    parent = resolve_parent(spec, stage)
    _check_parent(parent, stage)
    manifest = prepare(spec, stage, parent)
    n_train = manifest["splits"]["train"]["rows"]
    need = t.num_workers * t.micro_batch_size * t.grad_accum_steps
    if n_train < need:
        raise StageInputError(f"{stage}: the train split has {n_train} rows; one optimizer step needs num_workers "
                              f"x micro_batch_size x grad_accum_steps = {need}")
    check_run_inputs(spec, stage, parent, manifest)
    train_path, val_path = _split_path(manifest, "train"), _split_path(manifest, "val")
    if stage == "dpo" and t.task.reference == "precomputed":
        ref = reference_logps(spec, stage, parent, manifest, run=reference_run)
        train_path, val_path = ref["train"], ref["val"]
    elif stage == "dpo":
        # The held-out implicit rewards still need the reference's log-probs on the validation pairs.
        val_path = reference_logps_val(spec, stage, parent, manifest, run=reference_run)

    from raytrain.posttrain.tasks import build_posttrain_task

    with storage.local_dir(parent) as pdir:
        model_config = AutoConfig.from_pretrained(str(pdir)).to_dict()
    columns = list(build_posttrain_task({"train": t.model_dump(mode="json"), "init_from": parent}).columns)
    from raytrain.data.readers import read_prepared

    train_ds = read_prepared(train_path, columns=columns).randomize_block_order(seed=t.seed)
    val_ds = None
    if t.eval_every:
        if not manifest["splits"].get("val", {}).get("rows") or not val_path:
            raise StageInputError(f"{stage}.train.eval_every is {t.eval_every} but the prepared data has no val rows "
                                  f"(set {stage}.data.val_fraction above 0, or eval_every: 0)")
        val_ds = read_prepared(val_path, columns=columns)
    run_name = spec.stage_run_name(stage)
    log.info("%s: %s on %d workers, ZeRO-%d, %d steps, from %s", stage, run_name, t.num_workers, t.zero_stage,
             t.max_steps, parent)
    result = fit(t, run_name, spec.storage.root, train_ds, {
        "model_config": model_config, "init_from": parent, "seq_len": section.data.max_length,
        **(fault_injection or {})}, val_ds=val_ds, callbacks=callbacks)

    if not export:  # a sweep trial: the sweep exports the best one itself
        return {"checkpoint": result.checkpoint.path, "metrics": result.metrics}
    lineage = posttrain_lineage(spec, stage, parent, manifest)
    model_dir = export_model(result, spec.stage_model_name(stage), [parent], lineage, spec, run_name)
    figures = heldout(spec, stage, model_dir, val_path)
    eval_path = storage.join(model_dir, "eval.json")
    earlier = storage.read_json(eval_path) if storage.exists(eval_path) else {}  # a re-run keeps later suites' results
    storage.write_json(eval_path, {**earlier, "stage": stage, "heldout": figures})
    log.info("%s: exported %s in %.0fs (final loss %.4f; held-out %s)", stage, model_dir, time.time() - t0,
             result.metrics.get("loss", -1), figures)
    return {"model_dir": model_dir, "parent": parent, "data": manifest["counts"],
            "metrics": {k: v for k, v in result.metrics.items() if not isinstance(v, dict)},
            "heldout": figures}


def posttrain_lineage(spec: JobSpec, stage: str, parent: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """What lineage.json says of a post-training export besides the run: task, parent, data, tokenizer."""
    from raytrain.train.trainer import parent_ref

    section = stage_spec(spec, stage)
    return {
        "task": section.train.task.model_dump(mode="json"),
        "parent": parent_ref(parent),
        "dataset": {"name": section.data.name, "version": manifest.get("version"), "path": manifest["path"],
                    "key": manifest["key"], "counts": manifest["counts"], "splits": manifest["splits"],
                    "sources": manifest.get("sources")},
        "tokenizer_sha256": manifest.get("tokenizer_sha256"),
    }


def reference_logps_val(spec: JobSpec, stage: str, parent: str, manifest: dict[str, Any],
                        run: str | None = None) -> str | None:
    """Validation pairs with reference log-probs, for the held-out figures of a run whose reference is in-worker."""
    if not manifest["splits"].get("val", {}).get("rows"):
        return None
    return reference_logps(spec, stage, parent, manifest, splits=("val",), run=run)["val"]
