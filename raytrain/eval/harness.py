"""Tasks of the `lm-eval` harness (EleutherAI's lm-evaluation-harness) on an exported model, offline.

The harness's own Hugging Face backend (``model="hf"``) loads the exported directory; tasks come from local YAML
files (``TaskManager(include_path=...)``) whose data are local files too, so nothing is downloaded: the hub is
switched off for the harness, datasets and transformers alike.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from raytrain import storage

log = logging.getLogger(__name__)

__all__ = ["PACKAGED_TASKS", "run_lm_eval"]

PACKAGED_TASKS = str(Path(__file__).parent / "tasks")


def _metrics(task_result: dict[str, Any]) -> dict[str, float]:
    """``{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}`` -> ``{"acc": 0.5, "acc_stderr": 0.1}``.

    A metric under a filter other than 'none' keeps it as a suffix (``exact_match_strict-match``): no dots, so the
    promotion gate's dotted keys (``lm_eval.<task>.<metric>``) stay unambiguous.
    """
    out = {}
    for key, value in task_result.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue  # 'alias', 'N/A' stderr strings
        metric, filt = key.split(",", 1)
        out[metric if filt == "none" else f"{metric}_{filt}"] = float(value)
    return out


def run_lm_eval(model_dir: str, tasks: list[str], *, include_path: str | None = None, limit: int | None = None,
                batch_size: int = 8, num_fewshot: int | None = None, device: str = "cpu",
                seed: int = 0) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` for each task the harness ran (groups report their subtasks too)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"  # set before the harness imports datasets / huggingface_hub read them
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    include = include_path or PACKAGED_TASKS
    if not Path(include).is_dir():
        raise ValueError(f"eval.lm_eval.include_path: {include} is not a directory of task YAML files")
    # The harness's own catalogue (thousands of YAML files) takes seconds to index: only when a task needs it.
    manager = TaskManager(include_path=include, include_defaults=False, verbosity="ERROR")
    if any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include, verbosity="ERROR")
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"eval.lm_eval.tasks: {unknown} not found in {include} nor among lm-eval's tasks")
    with storage.local_dir(model_dir) as d:
        res = simple_evaluate(model="hf", model_args={"pretrained": str(d), "dtype": "float32"}, tasks=list(tasks),
                              task_manager=manager, limit=limit, batch_size=batch_size, num_fewshot=num_fewshot,
                              device=device, log_samples=False, bootstrap_iters=1000, random_seed=seed,
                              numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    if res is None:
        raise RuntimeError("lm-eval returned no results")
    out = {task: _metrics(r) for task, r in res["results"].items()}
    for task, n in (res.get("n-samples") or {}).items():
        if task in out and isinstance(n, dict) and "effective" in n:
            out[task]["n"] = float(n["effective"])
    return out
