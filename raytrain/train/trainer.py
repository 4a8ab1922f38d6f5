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
    path = storage.join(storage.Layout(spec.storage.root).dataset(spec.data.name), "manifest.json")
    if not storage.exists(path):
        raise StageInputError(f"no dataset manifest at {path}: run the data stage first (raytrain data --config …)")
    return storage.read_json(path)


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


def fit(t: TrainSpec, run_name: str, root: str, train_ds: Any, loop_config: dict[str, Any]) -> Any:
    """Run the shared loop on Ray Train for one training section; every training stage comes through here."""
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
        ),
        datasets={"train": train_ds},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training produced no checkpoint (error: {result.error})")
    return result


def export_model(result: Any, model_dir: str, file_dirs: list[str], lineage: dict[str, Any],
                 spec: JobSpec, extra_json: dict[str, dict[str, Any]] | None = None) -> None:
    """Publish the checkpoint's Hugging Face export at `model_dir` with the files of `file_dirs` (tokenizer),
    `lineage.json`, `spec.yaml` and any `extra_json` documents, in one upload of a complete directory."""
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
            "checkpoint": result.checkpoint.path,
            "metrics": result.metrics,
        }
        (out / "lineage.json").write_text(json.dumps({**lineage, **base, "spec": spec.model_dump(mode="json")},
                                                     indent=2, default=str))
        (out / "spec.yaml").write_text(dump_spec(spec))
        for name, doc in (extra_json or {}).items():
            (out / name).write_text(json.dumps(doc, indent=2, default=str))
        storage.upload_dir(out, model_dir)


def is_tokenizer_file(name: str) -> bool:
    """Files of a Hugging Face tokenizer (what an export copies from the data stage or from its parent model)."""
    return name.startswith("tokenizer") or name in ("special_tokens_map.json", "chat_template.jinja",
                                                     "added_tokens.json", "vocab.json", "merges.txt")


def run_pretrain(spec: JobSpec, fault_injection: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train, then export models/<model.name>/<run_name>/. Returns the final metrics and paths.

    `fault_injection` is for tests only (e.g. {"crash_in_save_at_step": 20}).
    """

    t0 = time.time()
    layout = storage.Layout(spec.storage.root)
    manifest = load_manifest(spec)
    model_config = model_config_for(spec, manifest)
    train_path = storage.join(layout.dataset(spec.data.name), "train")
    n_train = manifest["splits"]["train"]["sequences"]
    need = spec.train.num_workers * spec.train.micro_batch_size * spec.train.grad_accum_steps
    if n_train < need:
        raise StageInputError(f"train split has {n_train} sequences; one optimizer step needs num_workers x "
                              f"micro_batch_size x grad_accum_steps = {need}")

    t = spec.train
    from raytrain.data.readers import read_prepared

    train_ds = read_prepared(train_path, columns=["input_ids", "num_tokens"]).randomize_block_order(seed=t.seed)
    log.info("pretraining %s (%s preset) on %d workers, ZeRO-%d, %d steps", spec.model.name, spec.model.preset,
             t.num_workers, t.zero_stage, t.max_steps)
    result = fit(t, spec.run_name, spec.storage.root, train_ds, {
        "model_config": model_config, "init_from": spec.model.init_from, **(fault_injection or {})})

    model_dir = layout.model(spec.model.name, spec.run_name)
    lineage = {
        "model": spec.model.name,
        "version": spec.run_name,
        "task": spec.train.task.model_dump(mode="json"),
        "parent": {"path": spec.model.init_from} if spec.model.init_from else None,
        "dataset": {"name": spec.data.name, "manifest_sha256": _manifest_sha(spec)},
        "tokenizer_sha256": manifest["tokenizer"]["sha256"],
    }
    export_model(result, model_dir, [manifest["tokenizer"]["path"]], lineage, spec)
    log.info("exported %s in %.0fs (final loss %.4f)", model_dir, time.time() - t0, result.metrics.get("loss", -1))
    return {"model_dir": model_dir, "metrics": result.metrics, "checkpoint": result.checkpoint.path}


def _manifest_sha(spec: JobSpec) -> str:
    path = storage.join(storage.Layout(spec.storage.root).dataset(spec.data.name), "manifest.json")
    return hashlib.sha256(storage.read_bytes(path)).hexdigest()
