"""DeepSpeed's just-in-time compiled ops: built once per install, not once per training run.

On CPU, DeepSpeed's communication backend loads its shared-memory all-reduce op (`deepspeed_shm_comm`) in every
worker process, compiling it with torch's C++ extension builder under `~/.cache/torch_extensions`. The compile
(about 40 s of both cores on a 2-core machine) is skipped only when `ninja` finds the last build's commands
unchanged, and `ninja` keeps its build log in a version-specific format: a worker that finds the system's `ninja`
first on its `PATH` rebuilds what the environment's own `ninja` (a dependency of DeepSpeed, installed beside the
interpreter) built, and the other way round. Which one a worker found depended on how its Ray node was started,
so a training run paid the compile whenever the previous run had come through another `PATH`.

`use_environment_ninja()` puts the interpreter's own `ninja` first for the process and the processes it starts,
and `prebuild()` (run by `make install`: `python -m raytrain.train.dsops`) compiles the op once at install time,
so that training runs load it instead of building it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


def use_environment_ninja() -> None:
    """Put the directory of this interpreter's `ninja` (the environment's, if it has one) first on `PATH`."""
    bindir = str(Path(sys.executable).parent)
    if not (Path(bindir) / "ninja").is_file():
        return
    parts = os.environ.get("PATH", "").split(os.pathsep)
    if parts and parts[0] == bindir:
        return
    os.environ["PATH"] = os.pathsep.join([bindir, *(p for p in parts if p != bindir)])


def prebuild(accelerator: str = "cpu") -> str | None:
    """Build (or find up to date) the JIT ops DeepSpeed loads on `accelerator`; the op's name, or None if none."""
    os.environ.setdefault("DS_ACCELERATOR", accelerator)
    use_environment_ninja()
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    builder.load(verbose=False)
    return str(builder.absolute_name())


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.monotonic()
    try:
        name = prebuild()
    except Exception as exc:  # the install goes on: training compiles the op itself and fails there if it must
        log.warning("could not build DeepSpeed's CPU op now (%s: %s); the first training run will try again",
                    type(exc).__name__, exc)
        return 0
    if name is None:
        log.info("DeepSpeed needs no JIT-compiled op on this accelerator")
    else:
        log.info("DeepSpeed op %s ready in %.0f s", name, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
