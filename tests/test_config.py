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
        ({"cluster": {"serve_ingress": "nginx"}}, ["cluster.serve_ingress", "'haproxy'", "'proxy'", "'nginx'"]),
        ({"trian": {}}, ["trian", "unknown key", "train"]),
        ({"data": {"source": {"kind": "files"}}}, ["data.source", "paths"]),
        ({"train": {"precision": "fp16"}}, ["train", "fp16", "use_gpu"]),
        ({"data": {"filters": {"toxicity": {"threshold": 1.5}}}}, ["data.filters.toxicity.threshold", "1.5",
                                                                    "less than 1"]),
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


@pytest.mark.parametrize("key", ["name", "data.name", "model.name", "train.run_name"])
@pytest.mark.parametrize("value", ["..", ".", "a/b", "../up", ".hidden"])
def test_names_stay_inside_the_storage_root(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}: '{value.replace('.', '[.]')}' is not allowed"):
        load_spec("demo", [f"{key}={value}"])


def test_validate_cli_names_the_bad_name_key() -> None:
    proc = subprocess.run([sys.executable, "-m", "raytrain.cli", "validate", "-c", "demo", "model.name=.."],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "model.name: '..' is not allowed" in proc.stderr, proc.stderr


def test_storage_helpers_refuse_paths_outside_what_a_stage_owns(tmp_path: Path) -> None:
    from raytrain import storage

    victim = tmp_path / "keep"
    victim.mkdir()
    (victim / "precious.txt").write_text("x")
    src = tmp_path / "src"
    src.mkdir()
    layout = storage.Layout(str(tmp_path / "root"))
    for bad in ("..", ".", "a/b", ""):
        with pytest.raises(ValueError):
            layout.model(bad, "v1")
        with pytest.raises(ValueError):
            layout.model("m", bad)
    with pytest.raises(ValueError, match=r"contains '\.' or '\.\.'"):
        storage.upload_dir(src, f"{tmp_path}/root/models/../../keep")
    with pytest.raises(ValueError, match=r"contains '\.' or '\.\.'"):
        storage.remove_tree(f"{tmp_path}/root/..")
    with pytest.raises(ValueError, match="too close to the filesystem root"):
        storage.remove_tree("/tmp")
    assert (victim / "precious.txt").read_text() == "x"


@pytest.mark.parametrize(("root", "cwd", "env", "refused"), [
    ("./artifacts", "/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_ab", {}, True),
    ("artifacts", "/home/me/project", {"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}, True),
    ("file://artifacts", "/home/me/project", {"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}, True),
    ("/data/artifacts", "/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_ab", {}, False),
    ("s3://bucket/prefix", "/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_ab", {}, False),
    ("./artifacts", "/home/me/project", {}, False),  # a laptop run of `raytrain data -c demo`: cwd is the repo
])
def test_relative_storage_root_inside_a_ray_job_is_refused(root: str, cwd: str, env: dict, refused: bool) -> None:
    from raytrain.stages import relative_root_problem

    problem = relative_root_problem(root, cwd=cwd, env=env)
    assert (problem is not None) == refused
    if refused:
        assert "storage.root" in problem and "absolute path" in problem and "s3://" in problem


@pytest.mark.parametrize(
    ("tree", "must_name"),
    [
        ({"dpo": {"train": {"task": {"beta": -1}}}}, ["dpo.train.task.beta", "greater than 0", "-1"]),
        ({"dpo": {"train": {"task": {"type": "ppo"}}}}, ["dpo.train.task", "'pretrain', 'sft', 'reward', 'dpo'"]),
        ({"dpo": {"train": {"task": {"type": "sft"}}}}, ["dpo", "train.task.type is 'sft'"]),
        ({"sft": {"train": {"task": {"lora": {"rank": 3}}}}}, ["sft.train.task.lora.rank", "alpha, dropout, r"]),
        ({"dpo": {"train": {"task": {"loss_type": "ipo", "label_smoothing": 0.1}}}}, ["dpo.train.task", "sigmoid"]),
        ({"dpo": {"train": {"task": {"reference": "cached"}}}}, ["dpo.train.task.reference", "'precomputed'"]),
        ({"train": {"task": {"type": "dpo"}}}, ["train.task.type must be 'pretrain'", "dpo sections"]),
        ({"sft": {"data": {"max_prompt_length": 300}}}, ["sft.data", "max_prompt_length (300)", "max_length (256)"]),
        ({"reward": {"data": {"source": "files"}}}, ["reward.data", "paths"]),
    ],
)
def test_bad_post_training_specs_name_the_key(tmp_path: Path, tree: dict, must_name: list[str]) -> None:
    path = _write(tmp_path, tree)
    with pytest.raises(ConfigError) as err:
        load_spec(path)
    for needle in must_name:
        assert needle in str(err.value), f"{needle!r} not in: {err.value}"


def test_post_training_sections_get_their_task_and_chain_parents(tmp_path: Path) -> None:
    from raytrain import storage
    from raytrain.errors import StageInputError
    from raytrain.posttrain.stage import resolve_parent

    spec = load_spec("demo", [f"storage.root={tmp_path}", "dpo.train.task.beta=0.3", "reward.train.max_steps=7"])
    assert spec.sft.train.task.type == "sft" and spec.reward.train.task.type == "reward"
    assert spec.dpo.train.task.beta == 0.3 and spec.dpo.train.task.type == "dpo"
    assert spec.reward.train.max_steps == 7 and spec.reward.train.lr == load_spec("demo").reward.train.lr
    with pytest.raises(StageInputError, match=r"run 'demo' has not exported a model yet.*run the pretrain stage"):
        resolve_parent(spec, "sft")
    # The default parent is the registry version the previous stage's run exported.
    for run, model in (("demo", "demo-lm"), ("demo-sft", "demo-lm-sft")):
        storage.write_json(f"{tmp_path}/runs/{run}/export.json",
                           {"model": model, "version": 3, "path": f"{tmp_path}/models/{model}/3", "checkpoint": "c"})
    assert resolve_parent(spec, "sft") == f"{tmp_path}/models/demo-lm/3"
    assert resolve_parent(spec, "dpo") == resolve_parent(spec, "reward") == f"{tmp_path}/models/demo-lm-sft/3"
    # A stage recipe names its parent in the registry, relative to the storage root, absolutely, or as a URI.
    alone = load_spec("dpo", ["storage.root=s3://b/p"])
    assert alone.sft is None and alone.dpo.parent == "models:/demo-lm-sft/latest"
    assert resolve_parent(load_spec("dpo", ["storage.root=s3://b/p", "dpo.parent=models/x/2"]), "dpo") == \
        "s3://b/p/models/x/2"
    assert resolve_parent(load_spec("dpo", ["dpo.parent=/m/x"]), "dpo") == "/m/x"


def test_one_stage_table_drives_cli_jobs_ops_and_chart() -> None:
    import json

    from raytrain.ops import manifests
    from raytrain.stages import BATCH_STAGES, STAGE_TABLE

    assert {"sft", "reward", "dpo"} <= set(STAGE_TABLE)
    for name in STAGE_TABLE:
        assert (REPO / "jobs" / f"{name}.py").exists(), name
    help_text = subprocess.run([sys.executable, "-m", "raytrain.cli", "--help"], capture_output=True, text=True,
                               cwd=REPO, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"}).stdout
    for name in STAGE_TABLE:
        assert f" {name} " in help_text, name
    assert manifests.STAGES == BATCH_STAGES
    schema = json.loads((REPO / "helm" / "raytrain" / "values.schema.json").read_text())
    enums = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "stage" in node.get("properties", {}):
                enums.append(node["properties"]["stage"]["enum"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    assert enums and all(sorted(e) == sorted(BATCH_STAGES) for e in enums)
    job = manifests.rayjob("dpo", "dpo", cluster="c", run_name="r1")
    assert "dpo.train.run_name=r1" in job["spec"]["entrypoint"]


def test_pipeline_runs_rl_in_place_of_dpo_when_the_recipe_has_it() -> None:
    from raytrain.config import load_spec
    from raytrain.registry import candidate_model_name
    from raytrain.stages import pipeline_steps

    names = [n for n, _ in pipeline_steps(load_spec("demo", []))]
    assert names == ["data", "pretrain", "sft", "reward", "dpo", "eval", "promote"]
    rl = load_spec("demo-rl", [])
    assert [n for n, _ in pipeline_steps(rl)] == ["data", "pretrain", "sft", "reward", "rl", "eval", "promote"]
    assert candidate_model_name(rl) == "demo-lm-rl"  # what eval measures, the gate promotes and serving follows
    both = load_spec("demo", ["rl.iterations=5"])
    assert "dpo" not in [n for n, _ in pipeline_steps(both)] and candidate_model_name(both) == "demo-lm-rl"
