"""Job specs: recipes load, and every kind of bad spec fails before Ray with the key or file named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raytrain.config import ConfigError, load_spec
from raytrain.config.loader import RECIPES_DIR

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_every_recipe_validates(recipe: str) -> None:
    spec = load_spec(recipe)
    assert spec.name
    assert spec.run_name == (spec.train.run_name or spec.name)


def test_overrides_are_typed_and_nested() -> None:
    spec = load_spec("demo", ["train.max_steps=7", "train.warmup_steps=2", "train.lr=1e-4",
                              "data.source.demo.num_docs=99", "storage.root=s3://bucket/x", "train.use_gpu=true",
                              "train.precision=fp16"])
    assert spec.train.max_steps == 7 and spec.train.lr == pytest.approx(1e-4)
    assert spec.data.source.demo.num_docs == 99
    assert spec.storage.root == "s3://bucket/x"


def _write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize(
    ("tree", "must_name"),
    [
        ({"train": {"max_stepz": 10}}, ["train.max_stepz", "unknown key", "max_steps"]),
        ({"train": {"max_steps": "many"}}, ["train.max_steps", "'many'", "integer"]),
        ({"train": {"micro_batch_size": -4}}, ["train.micro_batch_size", "-4", "greater than or equal to 1"]),
        ({"train": {"zero_stage": 5}}, ["train.zero_stage", "0, 1, 2 or 3", "5"]),
        ({"model": {"preset": "70b"}}, ["model.preset", "'tiny'", "'70b'"]),
        ({"trian": {}}, ["trian", "unknown key", "train"]),
        ({"data": {"source": {"kind": "files"}}}, ["data.source", "paths"]),
        ({"train": {"precision": "fp16"}}, ["train", "fp16", "use_gpu"]),
    ],
)
def test_bad_specs_name_key_value_and_allowed(tmp_path: Path, tree: dict, must_name: list[str]) -> None:
    path = _write(tmp_path, tree)
    with pytest.raises(ConfigError) as err:
        load_spec(path)
    message = str(err.value)
    assert str(path) in message
    for needle in must_name:
        assert needle in message, f"{needle!r} not in: {message}"


def test_bad_override_names_key() -> None:
    with pytest.raises(ConfigError, match=r"train\.batch_size: unknown key"):
        load_spec("demo", ["train.batch_size=3"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_spec("demo", ["train.max_steps"])


def test_missing_file_is_named() -> None:
    with pytest.raises(ConfigError, match=r"config file not found: no/such/spec\.yaml"):
        load_spec("no/such/spec.yaml")


def test_non_mapping_yaml(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_spec(path)


@pytest.mark.parametrize("entry", [["-m", "jobs.pretrain"], ["-m", "raytrain.cli", "pretrain"]])
def test_cli_reports_bad_spec_without_traceback_or_ray(tmp_path: Path, entry: list[str]) -> None:
    path = _write(tmp_path, {"train": {"micro_batch_size": -1}})
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "RAY_ADDRESS": "http://127.0.0.1:1"}
    proc = subprocess.run([sys.executable, *entry, "--config", str(path)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "train.micro_batch_size" in proc.stderr and str(path) in proc.stderr
    assert "Traceback" not in proc.stderr
    # The unreachable RAY_ADDRESS proves validation ran before any attempt to connect to Ray.
    assert "ray" not in proc.stdout.lower()
