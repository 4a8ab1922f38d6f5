"""The pretrain stage (driver side): packed shards -> TorchTrainer -> exported Hugging Face model."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from raytrain import __version__, storage
from raytrain.config.loader import dump_spec
from raytrain.config.schema import JobSpec, TrainSpec
from raytrain.errors import StageInputError
from raytrain.train.loop import HF_DIR

log = logging.getLogger(__name__)


def load_manifest(spec: JobSpec) -> dict[str, Any]:
    """The manifest of the dataset version this spec trains on (data.version, else the newest)."""
    from raytrain.registry import dataset_dir

    manifest = storage.read_json(storage.join(dataset_dir(spec), "manifest.json"))
    return {**manifest, "path": dataset_dir(spec)}


def model_config_for(spec: JobSpec, manifest: dict[str, Any]) -> dict[str, Any]:
    """The transformers config the run trains: a preset sized to the tokenizer, or `init_from`'s."""
    from tokenizers import Tokenizer

    from raytrain.data.tokenizer import EOS, PAD
    from raytrain.models.presets import build_config

    if spec.model.init_from:
        from transformers import AutoConfig

        with storage.local_dir(spec.model.init_from) as d:
            return AutoConfig.from_pretrained(str(d)).to_dict()
    tok = Tokenizer.from_str(storage.read_bytes(storage.join(manifest["tokenizer"]["path"], "tokenizer.json")).decode())
    cfg = build_config(
        spec.model.preset,
        vocab_size=tok.get_vocab_size(),
        max_position_embeddings=manifest["seq_len"],
        bos_token_id=tok.token_to_id(EOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD),
    )
    return cfg.to_dict()


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def fit(t: TrainSpec, run_name: str, root: str, train_ds: Any, loop_config: dict[str, Any],
        val_ds: Any = None, callbacks: list[Any] | None = None) -> Any:
    """Run the shared loop on Ray Train for one training section; every training stage comes through here.

    `val_ds`: the held-out split the loop evaluates every `train.eval_every` steps (split across workers like the
    train split). `callbacks`: Ray Train callbacks of the run (a sweep's trial passes Tune's report callback).
    """
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raytrain.train.worker import train_loop_per_worker

    layout = storage.Layout(root)
    resources = {"GPU": 1, "CPU": 1} if t.use_gpu else {"CPU": 1}
    run_dir = storage.join(layout.runs(), run_name)
    tb_dir = storage.join(run_dir, "tensorboard") if t.tensorboard and not storage.is_uri(run_dir) else None
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": t.model_dump(mode="json"),
            "tensorboard_dir": tb_dir,
            "sample_log_dir": storage.join(run_dir, "samples") if t.sample_log else None,
            **loop_config,
        },
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources,
                                     placement_strategy=t.placement_strategy),
        # A fixed block order (seeded, by the caller) and preserve_order make each worker's shard the same stream
        # on every run, which is what makes resume exact (see loop.py).
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        run_config=RunConfig(
            name=run_name,
            storage_path=layout.runs(),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=FailureConfig(max_failures=t.max_failures),
            callbacks=callbacks or None,
        ),
        datasets={"train": train_ds, **({"val": val_ds} if val_ds is not None and t.eval_every else {})},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training produced no checkpoint (error: {result.error})")
    return result


def export_model(result: Any, model_name: str, file_dirs: list[str], lineage: dict[str, Any],
                 spec: JobSpec, run_name: str, extra_json: dict[str, dict[str, Any]] | None = None) -> str:
    """Publish the checkpoint's Hugging Face export as the next version of `model_name` in the registry, with the
    files of `file_dirs` (tokenizer), `lineage.json`, `spec.yaml` and any `extra_json` documents; returns its directory.

    A version is immutable: a re-run of a finished run (same checkpoint) returns the version it exported before.
    """
    from raytrain.registry import Registry, exported_version, run_export_path, version_of_dir

    registry = Registry(spec.storage.root)
    checkpoint = result.checkpoint.path
    done = exported_version(spec.storage.root, run_name)
    if done and done["checkpoint"] == checkpoint and done["model"] == model_name and version_of_dir(done["path"]):
        log.info("run %s already exported this checkpoint as %s version %s", run_name, model_name, done["version"])
        return done["path"]
    with result.checkpoint.as_directory() as ckpt, tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        shutil.copytree(Path(ckpt) / HF_DIR, out)
        for src in file_dirs:
            with storage.local_dir(src) as d:
                for f in Path(d).iterdir():
                    if f.is_file() and is_tokenizer_file(f.name):
                        shutil.copy2(f, out / f.name)
        base = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "raytrain_version": __version__,
            "git_revision": _git_revision(),
            "run": run_name,
            "checkpoint": checkpoint,
            "metrics": result.metrics,
        }

        def finalize(d: Path, version: int) -> None:
            doc = {**lineage, "model": model_name, "version": version, **base, "spec": spec.model_dump(mode="json")}
            (d / "lineage.json").write_text(json.dumps(doc, indent=2, default=str))

        (out / "spec.yaml").write_text(dump_spec(spec))
        for name, doc in (extra_json or {}).items():
            (out / name).write_text(json.dumps(doc, indent=2, default=str))
        version = registry.publish(model_name, out, finalize, meta={"run": run_name, "checkpoint": checkpoint})
    path = registry.version_path(model_name, version)
    storage.write_json(run_export_path(spec.storage.root, run_name),
                       {"model": model_name, "version": version, "path": path, "checkpoint": checkpoint})
    return path


def parent_ref(path: str) -> dict[str, Any]:
    """What lineage.json says of a parent model directory: its path, and its registry name/version/task if it has
    them."""
    lineage_path = storage.join(path, "lineage.json")
    lineage = storage.read_json(lineage_path) if storage.exists(lineage_path) else {}
    task = lineage.get("task")
    return {"path": path, "model": lineage.get("model"), "version": lineage.get("version"),
            "task": task.get("type") if isinstance(task, dict) else task}


def is_tokenizer_file(name: str) -> bool:
    """Files of a Hugging Face tokenizer (what an export copies from the data stage or from its parent model)."""
    return name.startswith("tokenizer") or name in ("special_tokens_map.json", "chat_template.jinja",
                                                     "added_tokens.json", "vocab.json", "merges.txt")


def run_pretrain(spec: JobSpec, fault_injection: dict[str, Any] | None = None, callbacks: list[Any] | None = None,
                 export: bool = True) -> dict[str, Any]:
    """Train, then publish the next version models/<model.name>/<N>/. Returns the final metrics and paths.

    `callbacks`: Ray Train callbacks (a sweep trial's). `export=False` (a sweep trial) trains without publishing and
    returns the run's final checkpoint and metrics.
    `fault_injection` is for tests only (e.g. {"crash_in_save_at_step": 20}).
    """

    t0 = time.time()
    manifest = load_manifest(spec)
    model_config = model_config_for(spec, manifest)
    train_path = storage.join(manifest["path"], "train")
    n_train = manifest["splits"]["train"]["sequences"]
    need = spec.train.num_workers * spec.train.micro_batch_size * spec.train.grad_accum_steps
    if n_train < need:
        raise StageInputError(f"train split has {n_train} sequences; one optimizer step needs num_workers x "
                              f"micro_batch_size x grad_accum_steps = {need}")

    t = spec.train
    from raytrain.data.readers import read_prepared

    train_ds = read_prepared(train_path, columns=["input_ids", "num_tokens"]).randomize_block_order(seed=t.seed)
    val_ds = None
    if t.eval_every:
        if not manifest["splits"].get("val", {}).get("sequences"):
            raise StageInputError(f"train.eval_every is {t.eval_every} but the dataset {manifest['path']} has no val "
                                  "sequences (set data.split.val_fraction above 0 and re-run the data stage, or "
                                  "eval_every: 0)")
        val_ds = read_prepared(storage.join(manifest["path"], "val"), columns=["input_ids", "num_tokens"])
    log.info("pretraining %s (%s preset) on %d workers, ZeRO-%d, %d steps", spec.model.name, spec.model.preset,
             t.num_workers, t.zero_stage, t.max_steps)
    result = fit(t, spec.run_name, spec.storage.root, train_ds, {
        "model_config": model_config, "init_from": spec.model.init_from, **(fault_injection or {})},
        val_ds=val_ds, callbacks=callbacks)

    if not export:  # a sweep trial: the sweep exports the best one itself
        return {"checkpoint": result.checkpoint.path, "metrics": result.metrics}
    lineage = pretrain_lineage(spec, manifest)
    model_dir = export_model(result, spec.model.name, [manifest["tokenizer"]["path"]], lineage, spec, spec.run_name)
    log.info("exported %s in %.0fs (final loss %.4f)", model_dir, time.time() - t0, result.metrics.get("loss", -1))
    return {"model_dir": model_dir, "metrics": result.metrics, "checkpoint": result.checkpoint.path}


def pretrain_lineage(spec: JobSpec, manifest: dict[str, Any]) -> dict[str, Any]:
    """What lineage.json says of a pretraining export besides the run: task, parent, dataset, tokenizer."""
    return {
        "task": spec.train.task.model_dump(mode="json"),
        "parent": parent_ref(spec.model.init_from) if spec.model.init_from else None,
        "dataset": {"name": spec.data.name, "version": manifest.get("version"), "path": manifest["path"],
                    "manifest_sha256": _manifest_sha(manifest["path"])},
        "tokenizer_sha256": manifest["tokenizer"]["sha256"],
    }


def _manifest_sha(manifest_dir: str) -> str:
    return hashlib.sha256(storage.read_bytes(storage.join(manifest_dir, "manifest.json"))).hexdigest()
