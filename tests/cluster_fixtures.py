"""Real multi-node Ray clusters on one machine: `ray start --head` plus `ray start --address` nodes.

Each node is a `ray start --block` process in its own session, so a test stops exactly the nodes it
started (never `ray stop`, which would also kill other Ray instances of the test session).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import free_port

RAY = str(Path(sys.executable).with_name("ray"))


def clean_env(token: str) -> dict[str, str]:
    """The caller's environment without RAY_* settings, with token auth on and this interpreter's bin/ first
    on PATH, as on a laptop with the virtualenv activated: job entrypoints and worker subprocesses that run
    `python` must find the one that has Ray installed, not the system one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.time() + 15  # a clean stop takes a few seconds; then the whole process group goes
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


@contextmanager
def ray_cluster(nodes: int = 2, cpus_per_node: int = 3, dashboard: bool = False) -> Iterator[dict[str, str]]:
    """A head and `nodes - 1` workers with token auth; yields address, GCS address, token and env.

    `dashboard`: run the dashboard (the state API), as production clusters do; Ray Train's PlacementGroupCleaner
    asks it whether a controller still lives, and without it never exits after an ungraceful stop."""
    token = secrets.token_hex(16)
    env = clean_env(token)
    temp_dir = Path(f"/tmp/rtc-{os.getpid()}-{free_port()}")
    gcs = free_port()
    head_env = dict(env)
    if dashboard:
        # Its processes inherit the head's environment: with RAY_ADDRESS set, a state-API call from inside the
        # cluster (the PlacementGroupCleaner's) finds this cluster even when the test session's own Ray instance
        # runs on the same machine; without it, "Found multiple active Ray instances" kills the cleaner's thread.
        head_env["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"
    procs = [subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", f"--num-cpus={cpus_per_node}",
         f"--include-dashboard={'true' if dashboard else 'false'}", f"--dashboard-port={free_port()}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats",
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}"],
        env=head_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        for _ in range(nodes - 1):
            procs.append(subprocess.Popen(
                # Own agent and metrics ports on every node: the defaults collide with any other Ray
                # instance on the machine, and a node whose agent cannot bind is marked dead.
                [RAY, "start", "--block", f"--address=127.0.0.1:{gcs}", f"--num-cpus={cpus_per_node}",
                 "--disable-usage-stats", f"--dashboard-agent-listen-port={free_port()}",
                 f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                 "print(sum(1 for n in ray.nodes() if n['Alive']))")
        deadline = time.time() + 180
        while True:
            out = subprocess.run([sys.executable, "-c", probe, f"127.0.0.1:{gcs}"], env=env, capture_output=True,
                                 text=True, timeout=120)
            if out.returncode == 0 and out.stdout.strip() == str(nodes):
                break
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"cluster of {nodes} nodes did not come up: {out.stdout} {out.stderr[-2000:]}")
            time.sleep(2)
        yield {"gcs": f"127.0.0.1:{gcs}", "token": token, **env}
    finally:
        _stop(procs)
        shutil.rmtree(temp_dir, ignore_errors=True)
