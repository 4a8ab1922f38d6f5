"""Which Ray cluster a stage runs on.

Precedence: the spec's `cluster.address`, then `RAY_ADDRESS` (set by `ray job submit` and by
KubeRay), then an embedded local instance. A local instance started by `ray.init()` keeps Ray
2.60's default token authentication on.

Serve's ingress is a cluster setting, read by Ray's processes when they start: `cluster.serve_ingress`
chooses it for a local instance started here. `haproxy` (the default) puts Ray Serve's HAProxy ingress on
the HTTP port, routing straight to each replica's own port; `proxy` keeps Serve's Python proxy actor. On a
cluster started elsewhere (`ray start`, KubeRay) the nodes' environment decides (`RAY_SERVE_ENABLE_HA_PROXY=1`
before `ray start`; the Helm chart sets it on the serving pods).
"""

from __future__ import annotations

import logging
import os
import socket

from raytrain.config.schema import ClusterSpec

log = logging.getLogger(__name__)

# Environment every Ray worker of a raytrain job needs (applied through the job's runtime env
# when we start the cluster, and set again inside the worker functions that depend on it).
WORKER_ENV = {
    # Ray Data already runs tokenization in parallel tasks; nested Rust threads only contend.
    "TOKENIZERS_PARALLELISM": "false",
}


# Marks the RAY_SERVE_* settings in os.environ as set by use_serve_ingress (not the caller's own exports), so that
# a later local instance of the same process may choose again.
_INGRESS_SET_HERE = "RAYTRAIN_SERVE_INGRESS"


# Serve settings of every Ray instance raytrain starts (and of the chart's serving pods): the app's code runs on
# the replica's main event loop, where Serve's HTTP server delivers the requests, instead of a second loop in
# another thread that every request and every streamed chunk would cross. The app is async throughout and the
# engine computes in a thread of its own, so nothing blocks that loop. At 16 concurrent streams on 2 CPUs it took one
# 3-round run from 0.77 to 0.85 of the in-process engine's throughput; later runs gave medians of the paired rounds
# of 0.77-0.85, the spread of this machine (README, performance).
SERVE_APP_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


def serve_ingress_env(ingress: str) -> dict[str, str]:
    """Environment for a Ray instance this process starts, giving Serve the ingress `ingress`.

    `haproxy`: Ray Serve's HAProxy ingress (`RAY_SERVE_ENABLE_HA_PROXY=1`), with free ports for HAProxy's stats
    and metrics listeners: two local instances on one machine (a test session, a laptop running two pipelines)
    would otherwise both bind its fixed defaults, 8404 and 9101 (its config and socket files are already per
    node). A replica that stops keeps taking requests for 2 s instead of Ray's 30 s: that window is for an
    external load balancer to deregister the replica's port, and a local instance has none, only Serve's own
    HAProxy, which Serve reconfigures itself and which retries a refused connection on another replica.
    `proxy`: Serve's Python proxy actor.

    Both run the app's code on the replica's own event loop (`SERVE_APP_ENV`).
    """
    if ingress == "proxy":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0", **SERVE_APP_ENV}
    if ingress != "haproxy":
        raise ValueError(f"serve ingress must be 'haproxy' or 'proxy', not {ingress!r}")
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
        **SERVE_APP_ENV,
    }


def use_serve_ingress(ingress: str) -> None:
    """Set `serve_ingress_env(ingress)` in this process before it starts a local Ray instance (whose processes
    inherit it). `RAY_SERVE_ENABLE_HA_PROXY` exported by the caller wins over `ingress`."""
    mine = _INGRESS_SET_HERE in os.environ
    if "RAY_SERVE_ENABLE_HA_PROXY" in os.environ and not mine:
        log.info("RAY_SERVE_ENABLE_HA_PROXY=%s is exported: it decides Serve's ingress, not cluster.serve_ingress",
                 os.environ["RAY_SERVE_ENABLE_HA_PROXY"])
        return
    for key, value in serve_ingress_env(ingress).items():
        if mine or key not in os.environ:  # a setting the caller exported stays theirs
            os.environ[key] = value
    os.environ[_INGRESS_SET_HERE] = ingress


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connect(spec: ClusterSpec) -> bool:
    """Connect to (or start) Ray. Returns True when this call started a local instance."""
    import ray

    if ray.is_initialized():
        return False
    address = spec.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, logging_level=logging.WARNING)
        return False
    # Logical CPUs, not cores: two train workers each hold a CPU for the whole run, and Ray Data
    # needs CPUs of its own for read/tokenize tasks that feed them; with only physical cores
    # those tasks would starve and training would wait forever on a 2-core laptop.
    num_cpus = spec.num_cpus or max(4, os.cpu_count() or 1)
    log.info("starting a local Ray instance with %d logical CPUs (Serve ingress: %s)", num_cpus, spec.serve_ingress)
    use_serve_ingress(spec.serve_ingress)
    ray.init(
        num_cpus=num_cpus,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": dict(WORKER_ENV)},
    )
    return True
