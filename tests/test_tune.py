"""`raytrain tune`: Ray Tune sweeps over a training stage, on real Ray clusters.

The ASHA sweep runs the way an engineer runs one against a cluster: `raytrain tune -c RECIPE` as its own process,
connected to a `ray start --head` cluster that outlives it. The test SIGKILLs that driver mid-sweep, runs the same
command again, and checks what the issue asks: finished and stopped trials are not run again, the interrupted trial
continues from its checkpoint (its per-step sample logs change process exactly after the checkpointed step), ASHA
stopped a trial early, the best trial is registered with the sweep and its settings in its lineage, and nothing of
the sweep (actors, placement groups, CPUs) is left on the cluster afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster_fixtures import ray_cluster
from conftest import REPO
from train_fixtures import build_packed_dataset

RAYTRAIN = str(Path(sys.executable).with_name("raytrain"))
MAX_STEPS = 30
# Sequential trials in grid order: the first runs to the end unopposed; 1e-5 trails it at the rung (step 20) and is
# stopped; 2e-3 sits at the median of three and goes on (it is the one the driver is killed under).
GRID = [5.0e-3, 1.0e-5, 2.0e-3]


def recipe(root: Path, **tune: object) -> dict:
    return {
        "name": "sw",
        "storage": {"root": str(root)},
        "data": {"name": "tiny"},
        "model": {"name": "tiny-lm", "preset": "tiny"},
        "train": {"num_workers": 1, "zero_stage": 2, "micro_batch_size": 8, "lr": 5.0e-3, "warmup_steps": 2,
                  "max_steps": MAX_STEPS, "log_every": 5, "eval_every": 5, "sample_log": True,
                  "tensorboard": False},
        "tune": {"space": {"train.lr": {"grid": GRID}}, "num_samples": 1, "max_concurrent": 1,
                 "scheduler": {"type": "asha", "grace_period": 20, "reduction_factor": 2}, **tune},
    }


def trial_runs(root: Path) -> dict[float, Path]:
    """Each trial's Train run directory, by its learning rate."""
    out = {}
    for f in (root / "runs").glob("sw-pretrain-sweep-*/trial.json"):
        out[json.loads(f.read_text())["settings"]["train.lr"]] = f.parent
    return out


def step_pids(run: Path) -> dict[int, int]:
    """The process that trained each step of a run (rank 0's sample log)."""
    return {int(json.loads(f.read_text())["step"]): json.loads(f.read_text())["pid"]
            for f in (run / "samples").glob("step-*-rank0.json")}


def checkpoint_steps(run: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered for a run (its checkpoint manager's snapshot): what a
    restarted run resumes from. A checkpoint directory the controller has not recorded yet does not count."""
    try:
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or being written
        return []
    return sorted(int(c["metrics"]["step"]) for c in snapshot.get("checkpoint_results", []))


@pytest.mark.slow
def test_asha_sweep_survives_a_killed_driver_and_registers_the_best(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    build_packed_dataset(root, seq_len=128, val_sequences=32)
    config = root / "sweep.yaml"
    # The storage root as the README's recipes give it, relative to where the command runs (Tune moves each trial
    # into a working directory of its own: the trials must still find the dataset and write their runs there).
    config.write_text(yaml.safe_dump({**recipe(root), "storage": {"root": "root"}}))
    with ray_cluster(nodes=1, cpus_per_node=4, dashboard=True) as cluster:
        env = {k: v for k, v in cluster.items() if k not in ("gcs", "token")}
        env["PYTHONPATH"] = str(REPO)
        argv = [RAYTRAIN, "tune", "-c", str(config), f"cluster.address={cluster['gcs']}"]
        log1 = (tmp_path / "driver-1.log").open("w")
        first = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log1, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        # Kill the driver as soon as the third trial (lr 2e-3) has registered its first checkpoint: the first two
        # trials are over by then (one finished, one stopped at the rung) and the third is mid-run.
        deadline = time.time() + 600
        killed_at: list[int] = []
        while time.time() < deadline and first.poll() is None:
            run = trial_runs(root).get(GRID[2])
            if run is not None and checkpoint_steps(run):
                os.kill(first.pid, signal.SIGKILL)
                killed_at = checkpoint_steps(run)
                break
            time.sleep(0.2)
        first.wait(timeout=60)
        text = (tmp_path / "driver-1.log").read_text()
        assert killed_at, f"the third trial never checkpointed before the driver ended:\n{text[-3000:]}"
        assert "running 1 trial(s) at once" in text and "a trial takes 0.5 (driver) + 1 x 1 (workers)" in text
        before = {lr: step_pids(run) for lr, run in trial_runs(root).items()}
        assert max(before[GRID[2]]) < MAX_STEPS, "the killed trial had not finished"

        second = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
        assert "resuming the experiment" in second.stdout
        summary, _ = json.JSONDecoder().raw_decode(second.stdout, second.stdout.index('{\n  "stage": "tune"'))

        # Nothing of the sweep is left on the cluster: every CPU is free, no placement group lives, and no actor but
        # Ray Data's two cluster-wide singletons (detached by design, created by any Ray Data use).
        probe = ("import json, sys, time, ray; ray.init(address=sys.argv[1], logging_level='ERROR')\n"
                 "from ray._private import state\n"
                 "keep = {'_StatsActor', '_AutoscalingCoordinatorActor'}\n"
                 "for _ in range(60):\n"
                 "    pgs = [p for p in ray.util.placement_group_table().values() if p['state'] != 'REMOVED']\n"
                 "    actors = [a['ActorClassName'] for a in state.actors().values()\n"
                 "              if a['State'] != 'DEAD' and a['ActorClassName'] not in keep]\n"
                 "    free = ray.available_resources().get('CPU', 0)\n"
                 "    if not pgs and not actors and free == ray.cluster_resources()['CPU']: break\n"
                 "    time.sleep(1)\n"
                 "print(json.dumps({'pgs': len(pgs), 'actors': actors, 'free': free}))")
        left = subprocess.run([sys.executable, "-c", probe, cluster["gcs"]], env=env, capture_output=True,
                              text=True, timeout=180)
        assert left.returncode == 0, left.stderr[-2000:]
        assert json.loads(left.stdout.strip().splitlines()[-1]) == {"pgs": 0, "actors": [], "free": 4.0}

    trials = {t["settings"]["train.lr"]: t for t in summary["trials"]}
    assert sorted(trials) == sorted(GRID)
    after = {lr: step_pids(run) for lr, run in trial_runs(root).items()}
    # Trials that had ended before the kill were not run again: every step kept the process that trained it.
    for lr in (GRID[0], GRID[1]):
        assert after[lr] == before[lr], f"trial lr={lr} was trained again after the restore"
    assert trials[GRID[0]]["status"] == "finished" and trials[GRID[0]]["step"] == MAX_STEPS
    stopped = [lr for lr, t in trials.items() if t["status"] == "stopped early"]
    assert GRID[1] in stopped and all(trials[lr]["step"] < MAX_STEPS for lr in stopped)
    # The interrupted trial resumed from a checkpoint (not from scratch): the steps up to it are the first
    # process's, every later one was trained by one new process, through to the end of the trial.
    resumed, old_pid = after[GRID[2]], before[GRID[2]][1]
    first_new = min(s for s, p in resumed.items() if p != old_pid)
    assert first_new - 1 >= killed_at[0] and (first_new - 1) % 5 == 0, (killed_at, resumed)
    assert all(resumed[s] == old_pid for s in range(1, first_new)), resumed
    assert len({p for s, p in resumed.items() if s >= first_new}) == 1
    assert sorted(resumed) == list(range(1, max(resumed) + 1)) and max(resumed) >= trials[GRID[2]]["step"]
    starts = json.loads((trial_runs(root)[GRID[2]] / "trial.json").read_text())["starts"]
    assert len(starts) == 2

    # The best trial (lowest last val_loss) is the registry's new version, its lineage naming sweep and settings.
    best = summary["best"]
    finals = {lr: t["last"] for lr, t in trials.items()}
    assert best["last"] == min(finals.values()) and best["settings"]["train.lr"] == min(finals, key=finals.get)
    lineage = json.loads((Path(best["model_dir"]) / "lineage.json").read_text())
    assert lineage["model"] == "tiny-lm" and lineage["version"] == 1
    assert lineage["sweep"]["experiment"] == "sw-pretrain-sweep" and lineage["sweep"]["trials"] == len(GRID)
    assert lineage["sweep"]["settings"] == best["settings"] and lineage["spec"]["train"]["lr"] == best["settings"][
        "train.lr"]
    assert (Path(best["model_dir"]) / "model.safetensors").exists()
    exp = root / "tune" / "sw-pretrain-sweep"
    rows = (exp / "results.csv").read_text().splitlines()
    assert len(rows) == len(GRID) + 1 and sum("stopped early" in r for r in rows) == len(stopped)
    assert (exp / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_optuna_sweep_of_the_reward_stage_maximises_held_out_accuracy(aligned: dict) -> None:
    """A post-training sweep: the session's reward stage (on the SFT model of the `aligned` fixture), Optuna's TPE
    over its learning rate and margin, two trials side by side, held-out pair accuracy maximised; the best trial is
    registered under its own name (the other tests' `demo-lm-reward` stays as it is) with its held-out figures."""
    import ray

    from conftest import align_spec
    from raytrain.tune.sweep import run_tune

    spec = align_spec(aligned["root"], "reward", "reward.parent=models:/demo-lm-sft/latest",
                      "reward.model_name=tuned-reward", "reward.train.num_workers=1", "reward.train.max_steps=12",
                      "reward.train.warmup_steps=2", "reward.train.eval_every=6", "reward.train.log_every=6",
                      "tune.stage=reward", "tune.num_samples=2", "tune.max_concurrent=2", "tune.metric=val_accuracy",
                      "tune.mode=max", "tune.scheduler.type=fifo", "tune.search.algorithm=optuna",
                      "tune.space={reward.train.lr: {loguniform: [1.0e-4, 3.0e-3]}, "
                      "reward.train.task.margin: {uniform: [0.0, 0.5]}}")
    out = run_tune(spec)
    assert "2 trials in all" in out["concurrency"]["why"] and out["concurrency"]["trials"] == 2
    assert len(out["trials"]) == 2 and all(t["status"] == "finished" and t["step"] == 12 for t in out["trials"])
    lrs = [t["settings"]["reward.train.lr"] for t in out["trials"]]
    assert all(1e-4 <= lr <= 3e-3 for lr in lrs) and len(set(lrs)) == 2
    assert all(0.0 <= t["settings"]["reward.train.task.margin"] <= 0.5 for t in out["trials"])
    accuracies = {t["trial_id"]: t["last"] for t in out["trials"]}
    assert all(0.0 <= a <= 1.0 for a in accuracies.values())
    assert out["best"]["last"] == max(accuracies.values())
    model_dir = Path(out["best"]["model_dir"])
    lineage = json.loads((model_dir / "lineage.json").read_text())
    assert lineage["model"] == "tuned-reward" and lineage["sweep"]["metric"] == "val_accuracy"
    assert lineage["task"]["margin"] == out["best"]["settings"]["reward.train.task.margin"]
    heldout = json.loads((model_dir / "eval.json").read_text())["heldout"]
    assert heldout["pairs"] > 0 and 0.0 <= heldout["accuracy"] <= 1.0
    deadline = time.time() + 60
    while [p for p in ray.util.placement_group_table().values() if p["state"] != "REMOVED"]:
        assert time.time() < deadline, "a placement group of the sweep outlived it"
        time.sleep(1)


def test_a_recipe_without_a_tune_section_is_refused_before_ray() -> None:
    proc = subprocess.run([RAYTRAIN, "tune", "-c", "demo", "cluster.address=127.0.0.1:9"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "has no `tune` section" in proc.stderr, proc.stderr


@pytest.mark.parametrize(("override", "names"), [
    ("tune.space={train.lrr: {loguniform: [1.0e-4, 1.0e-2]}}", "unknown key 'train.lrr'"),
    ("tune.space={train.lr: {loguniform: [1.0e-4, 5.0]}}", "tune.space.train.lr: the loguniform's high bound 5.0"),
    ("tune.space={train.micro_batch_size: {int: [0, 8]}}", "tune.space.train.micro_batch_size: the int's low bound 0"),
    ("tune.space={train.schedule: {choice: [cosine, linear]}}", "tune.space.train.schedule: the choice value 'linear'"),
    ("tune.space={sft.train.lr: {choice: [1.0e-3]}}", "a pretrain sweep varies keys under train.* or model.*"),
])
def test_bad_space_fails_before_ray_naming_the_key(tmp_path: Path, override: str, names: str) -> None:
    """The command exits 2 with the key's name; cluster.address points at a port nothing listens on, so reaching
    Ray at all would fail differently (and slowly)."""
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe(tmp_path)))
    t0 = time.time()
    proc = subprocess.run([RAYTRAIN, "tune", "-c", str(tmp_path / "r.yaml"), override, "cluster.address=127.0.0.1:9"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert names in proc.stderr, proc.stderr
    assert time.time() - t0 < 60
