"""The machine description every benchmark writes next to its figures."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
from typing import Any


def machine(packages: tuple[str, ...] = ()) -> dict[str, Any]:
    """Platform, Python, CPUs, processor and the installed version of each of `packages` (None if absent)."""
    versions: dict[str, str | None] = {}
    for pkg in packages:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor(), "versions": versions}
