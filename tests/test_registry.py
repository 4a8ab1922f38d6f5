"""The model registry and the promotion gate, on a local root, through the `raytrain models` CLI as an operator runs it.

No Ray: versions, aliases and the gate are files on the storage root. Serving that follows an alias is tested under
load in test_serving_scale.py; the pipeline's eval -> gate -> promote -> serve in test_job_submit.py. No object-store
root here: moto's S3 server cannot be installed beside `kubernetes` (conflicting `python-dateutil` pins) and s3rver
fails listings that follow a write.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raytrain import storage
from raytrain.registry import Registry, RegistryError

RAYTRAIN = [sys.executable, "-m", "raytrain.cli"]


def _model_dir(tmp: Path, label: str) -> Path:
    d = tmp / f"export-{label}"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"label": label}))
    (d / "model.safetensors").write_bytes(label.encode() * 100)
    return d


def _publish(reg: Registry, tmp: Path, name: str, label: str, eval_doc: dict | None = None) -> int:
    def finalize(d: Path, version: int) -> None:
        (d / "lineage.json").write_text(json.dumps({"model": name, "version": version, "label": label}))

    v = reg.publish(name, _model_dir(tmp, label), finalize)
    if eval_doc is not None:
        storage.write_json(f"{reg.version_path(name, v)}/eval.json", eval_doc)  # evaluation comes after publication
    return v


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*RAYTRAIN, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


GATE = {
    "checks": [
        {"metric": "perplexity.change_vs_parent", "max": 0.05},
        {"metric": "win_rate.win_rate", "min": 0.55},
        {"metric": "lm_eval.raytrain_demo_mc.acc", "min": 0.3},
        {"metric": "safety.unsafe_rate", "max": 0.05},
        {"metric": "overfitting.flagged", "equals": False},
    ]
}
GOOD = {"perplexity": {"perplexity": 9.0, "change_vs_parent": 0.01}, "win_rate": {"win_rate": 0.7},
        "lm_eval": {"raytrain_demo_mc": {"acc": 0.4}}, "safety": {"unsafe_rate": 0.0},
        "overfitting": {"flagged": False}}


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    spec = {"name": "reg", "storage": {"root": str(root)}, "model": {"name": "lm"}, "promote": GATE}
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_versions_are_numbered_immutable_and_resolvable(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path / "root"))
    assert [_publish(reg, tmp_path, "lm", label) for label in ("a", "b", "c")] == [1, 2, 3]
    assert reg.versions("lm") == [1, 2, 3] and reg.latest("lm") == 3
    # A staging directory left by a crashed export, and a number without version.json, are not versions.
    (Path(reg.model_path("lm")) / ".staging-dead").mkdir()
    (Path(reg.model_path("lm")) / "4").mkdir()
    assert reg.versions("lm") == [1, 2, 3]
    assert _publish(reg, tmp_path, "lm", "d") == 5  # never reuses a number something else holds
    info = reg.version_info("lm", 2)
    assert info["lineage"] == {"model": "lm", "version": 2, "label": "b"} and info["published"]["version"] == 2
    assert json.loads((Path(reg.version_path("lm", 2)) / "config.json").read_text()) == {"label": "b"}
    reg.set_alias("lm", "champion", 2)
    assert reg.resolve("models:/lm@champion") == reg.version_path("lm", 2)
    assert reg.resolve("models:/lm/3") == reg.version_path("lm", 3)
    assert reg.resolve("models:/lm/latest") == reg.version_path("lm", 5)
    assert reg.resolve("/some/dir") == "/some/dir"
    for bad, needle in (("models:/lm@nope", "no alias 'nope'"), ("models:/lm/9", "no version 9"),
                        ("models:/lm/x", "expected models:/<name>/<version number>")):
        with pytest.raises(RegistryError, match=needle):
            reg.resolve(bad)
    with pytest.raises(RegistryError, match="not a valid alias"):
        reg.set_alias("lm", "latest", 1)


def test_concurrent_exports_get_distinct_whole_versions(tmp_path: Path) -> None:
    """Four processes publish at once: four numbers, each directory holding exactly its writer's files."""
    root = tmp_path / "root"
    code = (
        "import json, sys\nfrom pathlib import Path\nfrom raytrain.registry import Registry\n"
        "src = Path(sys.argv[2]); src.mkdir(parents=True)\n"
        "(src / 'config.json').write_text(json.dumps({'label': sys.argv[3]}))\n"
        "print(Registry(sys.argv[1]).publish('lm', src))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root), str(tmp_path / f"src{i}"), f"w{i}"],
                              stdout=subprocess.PIPE, text=True) for i in range(4)]
    versions = {int(p.communicate(timeout=60)[0].strip()): f"w{i}" for i, p in enumerate(procs)}
    assert sorted(versions) == [1, 2, 3, 4]
    reg = Registry(str(root))
    for v, label in versions.items():
        assert json.loads((Path(reg.version_path("lm", v)) / "config.json").read_text()) == {"label": label}
    assert reg.versions("lm") == [1, 2, 3, 4]


def test_gate_promotes_a_passing_candidate_and_refuses_a_failing_one(tmp_path: Path, spec_file: Path) -> None:
    reg = Registry(str(tmp_path / "root"))
    good = _publish(reg, tmp_path, "lm", "good", GOOD)
    worse = {**GOOD, "safety": {"unsafe_rate": 0.2}, "win_rate": {"win_rate": 0.4}}
    bad = _publish(reg, tmp_path, "lm", "bad", worse)
    unmeasured = _publish(reg, tmp_path, "lm", "unmeasured", {"perplexity": {"change_vs_parent": 0.0}})

    ok = _cli("models", "promote", "lm", str(good), "-c", str(spec_file))
    assert ok.returncode == 0, ok.stderr
    assert "promoted lm version 1 to champion" in ok.stdout and ok.stdout.count("PASS") == 5

    refused = _cli("models", "promote", "lm", str(bad), "-c", str(spec_file))
    assert refused.returncode == 1
    assert "refused" in refused.stderr and "safety.unsafe_rate = 0.2, required <= 0.05" in refused.stderr
    assert "win_rate.win_rate = 0.4, required >= 0.55" in refused.stderr
    assert reg.alias_version("lm", "champion") == good  # the alias did not move

    missing = _cli("models", "promote", "lm", str(unmeasured), "-c", str(spec_file))
    assert missing.returncode == 1 and "not measured: eval.json has no win_rate.win_rate" in missing.stderr

    # Both decisions and their evidence are in the versions' history.
    (promoted,) = [e for e in reg.history("lm", good) if e["action"] == "promote"]
    assert promoted["passed"] and promoted["alias"] == "champion" and len(promoted["checks"]) == 5
    (refusal,) = [e for e in reg.history("lm", bad) if e["action"] == "refused"]
    failed = {c["metric"]: c["value"] for c in refusal["checks"] if not c["passed"]}
    assert failed == {"safety.unsafe_rate": 0.2, "win_rate.win_rate": 0.4}

    forced = _cli("models", "promote", "lm", str(bad), "-c", str(spec_file), "--alias", "challenger", "--force")
    assert forced.returncode == 0, forced.stderr
    assert reg.alias_version("lm", "challenger") == bad
    assert next(e for e in reg.history("lm", bad) if e["action"] == "promote")["forced"] is True


def test_rollback_moves_the_alias_back_through_its_moves(tmp_path: Path, spec_file: Path) -> None:
    reg = Registry(str(tmp_path / "root"))
    v1, v2, v3 = (_publish(reg, tmp_path, "lm", label, GOOD) for label in ("a", "b", "c"))
    for v in (v1, v2, v3):
        assert _cli("models", "promote", "lm", str(v), "-c", str(spec_file)).returncode == 0
    back = _cli("models", "rollback", "lm", "--root", str(tmp_path / "root"))
    assert back.returncode == 0 and "version 3 -> 2" in back.stdout
    assert reg.alias_version("lm", "champion") == v2
    assert _cli("models", "rollback", "lm", "--root", str(tmp_path / "root")).returncode == 0
    assert reg.alias_version("lm", "champion") == v1
    nothing = _cli("models", "rollback", "lm", "--root", str(tmp_path / "root"))
    assert nothing.returncode == 1 and "nothing to roll back to" in nothing.stderr
    listed = json.loads(_cli("models", "list", "--root", str(tmp_path / "root"), "--json").stdout)
    assert listed == [{"model": "lm", "versions": [1, 2, 3], "aliases": {"champion": 1}}]
    shown = _cli("models", "show", "lm", "champion", "--root", str(tmp_path / "root"), "--json")
    assert json.loads(shown.stdout)["version"] == 1
    actions = [(e["action"], e.get("from"), e["version"]) for e in reg.history("lm") if e["action"] != "publish"]
    assert actions == [("promote", None, 1), ("promote", 1, 2), ("promote", 2, 3), ("rollback", 3, 2),
                       ("rollback", 2, 1)]


def test_two_concurrent_promotes_leave_the_alias_whole_on_one_of_them(tmp_path: Path, spec_file: Path) -> None:
    reg = Registry(str(tmp_path / "root"))
    v1, v2 = (_publish(reg, tmp_path, "lm", label, GOOD) for label in ("a", "b"))
    for _ in range(3):
        procs = [subprocess.Popen([*RAYTRAIN, "models", "promote", "lm", str(v), "-c", str(spec_file)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in (v1, v2)]
        assert all(p.wait(timeout=120) == 0 for p in procs)
        alias_file = Path(reg.model_path("lm")) / "aliases" / "champion.json"
        doc = json.loads(alias_file.read_text())  # parses: not torn
        assert doc["version"] in (v1, v2) and reg.alias_version("lm", "champion") == doc["version"]
    promotes = [e for e in reg.history("lm") if e["action"] == "promote"]
    assert len(promotes) == 6  # every promotion recorded, none lost to the race
    assert not list((Path(reg.model_path("lm")) / "aliases").glob(".tmp-*"))


def test_bad_gate_config_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"storage": {"root": str(tmp_path)}, "promote": {"checks": [{"metric": "x"}]}}))
    out = _cli("validate", "-c", str(path))
    assert out.returncode == 2 and "promote.checks.0" in out.stderr and "set min, max or equals" in out.stderr

