"""Loaders for the demo lm-eval tasks: their rows ship as JSONL beside this file.

lm-eval's YAML names these with `custom_dataset: !function demo_data.<name>`, so the tasks read their own files
wherever the package is installed, without a hub download and without depending on the working directory (a
`dataset_path: json` with relative `data_files` would be resolved against the current directory).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _rows(name: str) -> list[dict[str, Any]]:
    with (HERE / f"{name}.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _test_split(name: str) -> Any:
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_rows(name))})


def mc(**_: Any) -> Any:
    """`raytrain_demo_mc`: a sentence start and four endings, one natural (`label` is its index)."""
    return _test_split("raytrain_demo_mc")


def gen(**_: Any) -> Any:
    """`raytrain_demo_gen`: a sentence start and the one- or two-word fact that ends it."""
    return _test_split("raytrain_demo_gen")
