"""DeepSpeed's JIT-compiled CPU op is built once (by `make install`), and training processes load that build
whatever `ninja` their `PATH` finds first (raytrain.train.dsops)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import REPO

# What build_engine does before DeepSpeed's communication backend loads the op, in a fresh process.
LOAD_AS_TRAINING_DOES = textwrap.dedent("""
    import os
    os.environ["DS_ACCELERATOR"] = "cpu"
    from raytrain.train.engine import use_environment_ninja
    use_environment_ninja()
    from deepspeed.comm.torch import build_shm_op
    assert build_shm_op() is not None
""")


def _built_op() -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "deepspeed_shm_comm.so"


def test_a_training_process_loads_the_installed_op_without_compiling_it(tmp_path: Path) -> None:
    """A `ninja` first on PATH that is not the environment's (a Ray node started from another shell, the system's
    older ninja whose build log the environment's cannot read) would rebuild the op, 40 s of both cores here. A stand-in
    that records being run and fails sits first on the PATH: the load must neither run it nor touch the build."""
    subprocess.run([sys.executable, "-m", "raytrain.train.dsops"], cwd=REPO, check=True, timeout=600,
                   capture_output=True)  # what `make install` ran; up to date already after an install
    built = _built_op()
    before = built.stat().st_mtime_ns
    other = tmp_path / "bin"
    other.mkdir()
    ran = tmp_path / "other-ninja-ran"
    (other / "ninja").write_text(f"#!/bin/sh\ntouch {ran}\nexit 1\n")
    (other / "ninja").chmod(0o755)
    env = {**os.environ, "PATH": f"{other}{os.pathsep}/usr/bin{os.pathsep}/bin", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", LOAD_AS_TRAINING_DOES], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not ran.exists(), "the load ran the ninja first on the caller's PATH"
    assert built.stat().st_mtime_ns == before, "the op was compiled again"
