"""Which Ray cluster a stage runs on.

Precedence: the spec's `cluster.address`, then `RAY_ADDRESS` (set by `ray job submit` and by
KubeRay), then an embedded local instance. A local instance started by `ray.init()` keeps Ray
2.60's default token authentication on.
"""

from __future__ import annotations

import logging
import os

from raytrain.config.schema import ClusterSpec

log = logging.getLogger(__name__)

# Environment every Ray worker of a raytrain job needs (applied through the job's runtime env
# when we start the cluster, and set again inside the worker functions that depend on it).
WORKER_ENV = {
    # Ray Data already runs tokenization in parallel tasks; nested Rust threads only contend.
    "TOKENIZERS_PARALLELISM": "false",
}


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
    log.info("starting a local Ray instance with %d logical CPUs", num_cpus)
    ray.init(
        num_cpus=num_cpus,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": dict(WORKER_ENV)},
    )
    return True
