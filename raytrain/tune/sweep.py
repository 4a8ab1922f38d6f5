"""A Ray Tune sweep over one training stage, on the stage's own runner (`raytrain tune -c RECIPE`).

Ray 2.60 runs Train V2, where `Tuner(TorchTrainer)` is gone: each trial is a Tune function (`_trial`) that builds the
trial's spec (the recipe with the trial's settings applied), and runs the stage exactly as `raytrain <stage>` would,
without the export, with Tune's `TuneReportCallback` in the Ray Train run: rank 0's reports (loss, `val_loss` every
`eval_every` steps, the checkpoint path) become the trial's results, and ASHA stops a trial by stopping its function,
whose Train controller, workers and placement group go with it.

Names are what make the sweep resumable. The experiment lives in `tune/<name>/` under the storage root and each
trial's Train run is `runs/<name>-<trial id>/`: re-running the same command after the driver died restores the
experiment (`Tuner.restore`), finished and stopped trials are not run again, and an unfinished trial's function runs
again, where Ray Train finds the run's latest checkpoint under the same name and continues from it.

At the end the sweep writes `results.csv`/`results.md` (every trial: status, settings, steps, last and best metric),
`curves.png` (each trial's metric against steps, stopped ones drawn as stopped) and `best.json`, and exports the best
trial's last checkpoint as the stage's next registry version, whose `lineage.json` names the sweep and the settings.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from raytrain import storage
from raytrain.config.schema import JobSpec
from raytrain.errors import StageInputError

log = logging.getLogger(__name__)

# How often Tune records the experiment's state (seconds): what a killed driver's successor restores from.
EXPERIMENT_CHECKPOINT_S = "10"


def experiment_dir(spec: JobSpec) -> str:
    return storage.join(storage.Layout(spec.storage.root).root, "tune", storage.component(spec.tune_name))


def trial_run_name(experiment: str, trial_id: str) -> str:
    return f"{experiment}-{trial_id}"


def trial_spec(doc: dict[str, Any], stage: str, settings: dict[str, Any], run_name: str) -> JobSpec:
    """The spec one trial runs: the recipe (`doc`, without its tune section) with the trial's settings, its own run
    name, and a checkpoint at every evaluation, so that what the sweep scores is what it can resume and export."""
    tree = copy.deepcopy(doc)
    tree.pop("tune", None)
    for key, value in settings.items():
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    section = tree["train"] if stage == "pretrain" else tree[stage]["train"]
    section["run_name"] = run_name
    section["checkpoint_every"] = section["eval_every"]
    return JobSpec.model_validate(tree)


def search_space(spec: JobSpec) -> dict[str, Any]:
    """The recipe's space as Ray Tune's sampling objects (flat dotted keys)."""
    from ray import tune

    assert spec.tune is not None
    out: dict[str, Any] = {}
    for key, dim in spec.tune.space.items():
        kind, v = next(iter(dim.items()))
        if kind == "loguniform":
            out[key] = tune.loguniform(v[0], v[1])
        elif kind == "uniform":
            out[key] = tune.uniform(v[0], v[1])
        elif kind == "int":
            out[key] = tune.randint(v[0], v[1] + 1)  # randint's upper bound is exclusive; the recipe's is not
        elif kind == "choice":
            out[key] = tune.choice(v)
        else:
            out[key] = tune.grid_search(v)
    return out


@dataclass(frozen=True)
class Concurrency:
    trials: int
    reason: str


def concurrency(spec: JobSpec, resources: dict[str, float]) -> Concurrency:
    """How many trials can run at once on a cluster with `resources` (Ray's cluster_resources()), and why.

    A trial holds its driver (`tune.driver_cpus`) and its Ray Train workers (one CPU each, and one GPU each with
    use_gpu); `tune.data_cpus` stay free for the Ray Data tasks that read every trial's shards, or a full cluster
    would leave the workers waiting for data that no task can be scheduled to read.
    """
    assert spec.tune is not None
    tu, t = spec.tune, spec.tune_train()
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    trial_cpus = tu.driver_cpus + t.num_workers
    usable = cpus - tu.data_cpus
    by_cpu = math.floor(usable / trial_cpus + 1e-9) if trial_cpus else tu.num_samples
    parts = [f"{cpus:g} CPUs - {tu.data_cpus:g} kept for Ray Data = {usable:g}; a trial takes "
             f"{tu.driver_cpus:g} (driver) + {t.num_workers} x 1 (workers) = {trial_cpus:g} -> {max(by_cpu, 0)}"]
    limits = [by_cpu]
    if t.use_gpu:
        by_gpu = math.floor(gpus / t.num_workers)
        parts.append(f"{gpus:g} GPUs / {t.num_workers} per trial -> {by_gpu}")
        limits.append(by_gpu)
    if by_cpu < 1 or (t.use_gpu and min(limits) < 1):
        raise StageInputError("the cluster cannot run one trial of this sweep: " + "; ".join(parts)
                              + " (lower the stage's num_workers, tune.driver_cpus or tune.data_cpus, or add nodes)")
    limits.append(spec_trials(spec))
    parts.append(f"{spec_trials(spec)} trials in all")
    if tu.max_concurrent:
        limits.append(tu.max_concurrent)
        parts.append(f"tune.max_concurrent {tu.max_concurrent}")
    n = min(limits)
    return Concurrency(n, "; ".join(parts))


def spec_trials(spec: JobSpec) -> int:
    """Trials the sweep runs: num_samples, times the grid's size when it has grid keys."""
    assert spec.tune is not None
    grid = 1
    for dim in spec.tune.space.values():
        if "grid" in dim:
            grid *= len(dim["grid"])
    return spec.tune.num_samples * grid


def _trial(config: dict[str, Any], doc: dict[str, Any], stage: str, experiment: str) -> None:
    """One trial (a Tune function): the stage's run with the trial's settings, reporting to Tune through Train."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    run = trial_run_name(experiment, trial_id)
    spec = trial_spec(doc, stage, config, run)
    record = storage.join(storage.Layout(spec.storage.root).runs(), run, "trial.json")
    info = storage.read_json(record) if storage.exists(record) else {
        "experiment": experiment, "trial_id": trial_id, "stage": stage, "settings": config, "starts": []}
    start = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "pid": os.getpid()}
    if info.get("finished"):
        # Finished before a driver died, in the last seconds Tune's saved state did not record: hand Tune the final
        # result again instead of training (or even starting the workers).
        info["starts"].append({**start, "replayed": True})
        storage.write_json(record, info)
        tune.report(info["final"])
        return
    info["starts"].append(start)
    storage.write_json(record, info)  # every start of the function: a resumed trial shows two
    callbacks = [TuneReportCallback()]
    if stage == "pretrain":
        from raytrain.train.trainer import run_pretrain

        out = run_pretrain(spec, callbacks=callbacks, export=False)
    else:
        from raytrain.posttrain.stage import run_posttrain

        out = run_posttrain(spec, stage, callbacks=callbacks, export=False, reference_run=experiment)
    final = {k: v for k, v in out["metrics"].items() if isinstance(v, (int, float, str, bool))}
    storage.write_json(record, {**info, "finished": True, "checkpoint": out["checkpoint"],
                                "final": {**final, "checkpoint_path": out["checkpoint"]}})


def _inputs_key(spec: JobSpec) -> str:
    """What a sweep's results depend on: the whole recipe except where it connects."""
    doc = spec.model_dump(mode="json", exclude={"cluster"})
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _prepare_inputs(spec: JobSpec) -> dict[str, Any]:
    """Everything trials share, made once before any starts (the dataset, the prepared post-training data, DPO's
    reference log-probabilities), so that concurrent trials never race to build the same artifact."""
    stage = spec.tune.stage  # type: ignore[union-attr]
    if stage == "pretrain":
        from raytrain.train.trainer import load_manifest

        try:
            manifest = load_manifest(spec)
        except FileNotFoundError as exc:
            raise StageInputError(f"the pretrain sweep trains on the dataset {spec.data.name!r}, which is not there "
                                  f"({exc}): run `raytrain data` with this recipe first") from None
        if not manifest["splits"].get("val", {}).get("sequences"):
            raise StageInputError(f"the dataset {manifest['path']} has no val sequences for val_loss")
        return {"manifest": manifest}
    from raytrain.posttrain.stage import _check_parent, prepare, reference_logps, reference_logps_val, resolve_parent

    parent = resolve_parent(spec, stage)
    _check_parent(parent, stage)
    manifest = prepare(spec, stage, parent)
    if stage == "dpo":
        t = spec.dpo.train  # type: ignore[union-attr]
        if t.task.reference == "precomputed":
            reference_logps(spec, stage, parent, manifest, run=spec.tune_name)
        else:
            reference_logps_val(spec, stage, parent, manifest, run=spec.tune_name)
    return {"manifest": manifest, "parent": parent}


def run_tune(spec: JobSpec) -> dict[str, Any]:
    """Run (or resume) the recipe's sweep; export the best trial; return the summary."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    tu = spec.tune
    if tu is None:
        raise StageInputError(f"the spec {spec.name!r} has no `tune` section; add one (see jobs/configs/tune.yaml)")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", EXPERIMENT_CHECKPOINT_S)
    stage, experiment, t = tu.stage, spec.tune_name, spec.tune_train()
    exp_dir = experiment_dir(spec)
    marker = storage.join(exp_dir, "sweep.json")
    key = _inputs_key(spec)
    if storage.exists(marker) and storage.read_json(marker).get("key") != key:
        raise StageInputError(f"the sweep {experiment!r} in {exp_dir} was started from another recipe: resuming it "
                              "would mix trials of two sweeps. Set tune.name to a new name (or delete the directory)")
    inputs = _prepare_inputs(spec)
    plan = concurrency(spec, ray.cluster_resources())
    log.info("sweep %s: %d trials of the %s stage, %d at once (%s)", experiment, spec_trials(spec), stage,
             plan.trials, plan.reason)
    print(f"sweep {experiment}: running {plan.trials} trial(s) at once: {plan.reason}", flush=True)
    doc = spec.model_dump(mode="json")
    # Tune runs each trial in a working directory of its own: a relative root (./artifacts) must not follow it.
    doc["storage"]["root"] = storage.Layout(spec.storage.root).root
    trainable = tune.with_resources(
        tune.with_parameters(_trial, doc=doc, stage=stage, experiment=experiment), {"cpu": tu.driver_cpus})
    exp_path = exp_dir if storage.is_uri(exp_dir) else os.path.abspath(exp_dir)
    resumed = tune.Tuner.can_restore(exp_path)
    if resumed:
        print(f"sweep {experiment}: resuming the experiment in {exp_path}", flush=True)
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        storage.write_json(marker, {"key": key, "experiment": experiment, "stage": stage,
                                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        budget = tu.scheduler.max_t or t.max_steps
        if tu.scheduler.type == "asha":
            # A trial that reaches max_steps ends by itself: ASHA's own stop at the budget would race its last save.
            scheduler: Any = ASHAScheduler(time_attr="step", max_t=budget + 1 if budget >= t.max_steps else budget,
                                           grace_period=tu.scheduler.grace_period,
                                           reduction_factor=tu.scheduler.reduction_factor)
        else:
            scheduler = FIFOScheduler()
        if tu.search.algorithm == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search: Any = OptunaSearch(seed=tu.search.seed)
        else:
            from ray.tune.search.basic_variant import BasicVariantGenerator

            # (Tune limits a BasicVariantGenerator's concurrency through its own argument, not max_concurrent_trials.)
            search = BasicVariantGenerator(random_state=tu.search.seed, max_concurrent=plan.trials)
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(spec),
            tune_config=tune.TuneConfig(metric=tu.metric, mode=tu.mode, num_samples=tu.num_samples,
                                        scheduler=scheduler, search_alg=search,
                                        max_concurrent_trials=None if tu.search.algorithm == "random" else plan.trials,
                                        trial_dirname_creator=lambda trial: trial.trial_id),
            run_config=tune.RunConfig(name=os.path.basename(exp_path), storage_path=os.path.dirname(exp_path),
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    grid = tuner.fit()
    trials = collect(grid, spec)
    best = pick_best(trials, tu.metric, tu.mode)
    write_results(exp_dir, trials, spec, best)
    out: dict[str, Any] = {"experiment": experiment, "path": exp_dir, "resumed": resumed,
                           "concurrency": {"trials": plan.trials, "why": plan.reason},
                           "trials": [{k: r[k] for k in ("trial_id", "status", "settings", "step", "last", "best")}
                                      for r in trials]}
    if best is None:
        raise StageInputError(f"sweep {experiment}: no trial reported {tu.metric!r}; see {exp_dir}/results.md")
    out["best"] = {k: best[k] for k in ("trial_id", "settings", "step", "last", "run")}
    if tu.register_best:
        out["best"]["model_dir"] = export_best(spec, best, inputs, len(trials), exp_dir)
    storage.write_json(storage.join(exp_dir, "best.json"), out["best"])
    print(results_markdown(trials, spec, best), flush=True)
    return out


def collect(grid: Any, spec: JobSpec) -> list[dict[str, Any]]:
    """One row per trial from Tune's results: status, settings, metric curve, last checkpoint."""
    assert spec.tune is not None
    metric, max_steps = spec.tune.metric, spec.tune_train().max_steps
    rows = []
    for result in grid:
        df = result.metrics_dataframe
        last = result.metrics or {}
        trial_id = last.get("trial_id") or os.path.basename(result.path)
        curve: list[tuple[int, float]] = []
        checkpoint = None
        if df is not None and len(df):
            if metric in df and "step" in df:
                sub = df[["step", metric]].dropna()
                curve = [(int(s), float(v)) for s, v in zip(sub["step"], sub[metric], strict=True)]
            if "checkpoint_path" in df:
                paths = df["checkpoint_path"].dropna()
                checkpoint = str(paths.iloc[-1]) if len(paths) else None
        step = int(last.get("step") or (curve[-1][0] if curve else 0))
        if result.error is not None:
            status = "error"
        elif step >= max_steps:
            status = "finished"
        else:
            status = "stopped early"
        values = [v for _, v in curve]
        pick = min if spec.tune.mode == "min" else max
        rows.append({"trial_id": trial_id, "status": status, "settings": dict(result.config or {}), "step": step,
                     "last": values[-1] if values else None, "best": pick(values) if values else None,
                     "curve": curve, "checkpoint": checkpoint,
                     "run": trial_run_name(spec.tune_name, trial_id),
                     "error": str(result.error)[:300] if result.error is not None else None})
    return sorted(rows, key=lambda r: r["trial_id"])


def pick_best(trials: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The trial with the best last-reported metric (a stopped trial's counts where it stopped)."""
    scored = [r for r in trials if r["last"] is not None and math.isfinite(r["last"]) and r["checkpoint"]]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda r: r["last"])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def results_markdown(trials: list[dict[str, Any]], spec: JobSpec, best: dict[str, Any] | None) -> str:
    assert spec.tune is not None
    keys = list(spec.tune.space)
    metric = spec.tune.metric
    head = ["trial", "status", *keys, "steps", f"last {metric}", f"best {metric}"]
    lines = [f"# Sweep {spec.tune_name} ({spec.tune.stage}, {metric} {spec.tune.mode})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in trials:
        mark = " (best)" if best is not None and r["trial_id"] == best["trial_id"] else ""
        cells = [r["trial_id"] + mark, r["status"], *[_fmt(r["settings"].get(k)) for k in keys], str(r["step"]),
                 _fmt(r["last"]), _fmt(r["best"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(exp_dir: str, trials: list[dict[str, Any]], spec: JobSpec, best: dict[str, Any] | None) -> None:
    """results.csv, results.md and curves.png in the experiment directory."""
    assert spec.tune is not None
    keys = list(spec.tune.space)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["trial_id", "status", *keys, "steps", f"last_{spec.tune.metric}", f"best_{spec.tune.metric}",
                     "best_trial", "run", "error"])
    for r in trials:
        writer.writerow([r["trial_id"], r["status"], *[r["settings"].get(k) for k in keys], r["step"], r["last"],
                         r["best"], best is not None and r["trial_id"] == best["trial_id"], r["run"], r["error"] or ""])
    storage.write_bytes(storage.join(exp_dir, "results.csv"), buf.getvalue().encode())
    storage.write_bytes(storage.join(exp_dir, "results.md"), results_markdown(trials, spec, best).encode())
    storage.write_bytes(storage.join(exp_dir, "curves.png"), curves_png(trials, spec, best))


def curves_png(trials: list[dict[str, Any]], spec: JobSpec, best: dict[str, Any] | None) -> bytes:
    """Every trial's metric against steps; a stopped trial's line ends in an x at the step ASHA stopped it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert spec.tune is not None
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for r in trials:
        if not r["curve"]:
            continue
        steps, values = zip(*r["curve"], strict=True)
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in r["settings"].items())
        is_best = best is not None and r["trial_id"] == best["trial_id"]
        stopped = r["status"] != "finished"
        line = ax.plot(steps, values, linestyle="--" if stopped else "-", linewidth=2.4 if is_best else 1.4,
                       label=f"{label} ({'best' if is_best else r['status']})")[0]
        if stopped:
            ax.plot(steps[-1], values[-1], marker="x", markersize=9, color=line.get_color())
    ax.set_xlabel("step")
    ax.set_ylabel(spec.tune.metric)
    ax.set_title(f"sweep {spec.tune_name}: {spec.tune.metric} per trial (dashed + x: stopped early)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


@dataclass
class _TrialResult:
    """What `export_model` reads of a Ray Train result: the checkpoint and the last metrics."""

    checkpoint: Any
    metrics: dict[str, Any]


def export_best(spec: JobSpec, best: dict[str, Any], inputs: dict[str, Any], n_trials: int, exp_dir: str) -> str:
    """Publish the best trial's last checkpoint as the stage's next version; lineage names the sweep and settings."""
    from ray.train import Checkpoint

    from raytrain.train.trainer import export_model

    assert spec.tune is not None
    stage = spec.tune.stage
    run_dir = storage.join(storage.Layout(spec.storage.root).runs(), best["run"])
    checkpoint = storage.join(run_dir, os.path.basename(best["checkpoint"].rstrip("/")))
    tspec = trial_spec(spec.model_dump(mode="json"), stage, best["settings"], best["run"])
    sweep = {"experiment": spec.tune_name, "path": exp_dir, "stage": stage, "trial_id": best["trial_id"],
             "settings": best["settings"], "metric": spec.tune.metric, "mode": spec.tune.mode,
             "value": best["last"], "step": best["step"], "trials": n_trials,
             "results": storage.join(exp_dir, "results.csv")}
    result = _TrialResult(Checkpoint(checkpoint), {"step": best["step"], spec.tune.metric: best["last"]})
    if stage == "pretrain":
        from raytrain.train.trainer import pretrain_lineage

        lineage = {**pretrain_lineage(tspec, inputs["manifest"]), "sweep": sweep}
        return export_model(result, tspec.model.name, [inputs["manifest"]["tokenizer"]["path"]], lineage, tspec,
                            best["run"])
    from raytrain.posttrain.stage import heldout, posttrain_lineage

    lineage = {**posttrain_lineage(tspec, stage, inputs["parent"], inputs["manifest"]), "sweep": sweep}
    model_dir = export_model(result, tspec.stage_model_name(stage), [inputs["parent"]], lineage, tspec, best["run"])
    val_path = storage.join(inputs["manifest"]["path"], "val")
    if stage == "dpo":
        val_path = storage.join(storage.Layout(spec.storage.root).runs(), spec.tune_name, "reference", "split=val")
    figures = heldout(tspec, stage, model_dir, val_path)
    eval_path = storage.join(model_dir, "eval.json")
    earlier = storage.read_json(eval_path) if storage.exists(eval_path) else {}
    storage.write_json(eval_path, {**earlier, "stage": stage, "heldout": figures})
    return model_dir
