"""The README's laptop path, run as written: its shell block, line by line, on a real `ray start --head`
cluster with token auth and the real `ray job submit` CLI; then the artifacts, the exported model and the
still-running endpoint are checked from outside the job.

The block runs in a fresh network and process namespace (`unshare`, root only): its `ray start --head` gets
Ray's default ports (6379, 8265, 8000) as on a laptop, without colliding with the test session's own Ray
instance, and every process it starts dies with the namespace. `HOME` is a fresh directory holding a
`~/.ray/auth_token`, as `make demo` leaves one behind. The tree is a copy of this checkout (tracked and
untracked, not ignored, files; `.venv` linked), so `$PWD/artifacts` is the copy's. The only liberty taken:
a `ray job submit` that fails with Ray's "No available agent" (the head's job agent registers seconds after
the jobs API answers, minutes on a loaded 2-core machine) is repeated, as a person would.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, dataset_path, exported_model

pytestmark = pytest.mark.slow

CHECK_ENDPOINT = """
import json, sys
from openai import OpenAI
client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
reply = client.completions.create(model="demo-lm", prompt="The garden", max_tokens=5, temperature=0)
print(json.dumps({"models": [m.model_dump() for m in client.models.list().data], "text": reply.choices[0].text,
                  "completion_tokens": reply.usage.completion_tokens}))
"""


def readme_laptop_block() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## The laptop path"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "the README's laptop section has no sh block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / ".venv").symlink_to(REPO / ".venv")


def _can_unshare() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return False
    return subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "true"],
                          capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def laptop(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not _can_unshare():
        pytest.skip("needs root with unshare and ip (CI runs as root) to give the block its own ports")
    work = tmp_path_factory.mktemp("laptop")
    tree, home, out = work / "tree", work / "home", work / "out"
    for d in (tree, home / ".ray", out):
        d.mkdir(parents=True)
    _copy_tree(tree)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(16) + "\n")  # what `make demo` leaves
    # And what `make install` leaves: DeepSpeed's CPU op, compiled once (raytrain.train.dsops), which the block's
    # training stages load instead of compiling it again under this fresh HOME.
    built = Path.home() / ".cache" / "torch_extensions"
    if built.is_dir():
        shutil.copytree(built, home / ".cache" / "torch_extensions", symlinks=True)
    lines = [f"agent_retry {line}" if line.startswith("ray job submit") else line for line in readme_laptop_block()]
    script = f"""
set -eo pipefail
ip link set lo up
mkdir -p /tmp/ray && mount -t tmpfs tmpfs /tmp/ray   # this cluster's session files, apart from the host's
export HOME={home}
cd {tree}
agent_retry() {{
  for _ in $(seq 1 200); do
    if "$@" > {out}/submit.txt 2>&1; then cat {out}/submit.txt; return 0; fi
    cat {out}/submit.txt
    grep -q "No available agent" {out}/submit.txt || return 1
    sleep 3
  done
  return 1
}}
# ---- the README's block, as written ----
{chr(10).join(lines)}
# ---- checks from outside the job, while the cluster still runs ----
set +e
env -u RAY_AUTH_MODE -u RAY_AUTH_TOKEN HOME=/nonexistent ray job list > {out}/noauth.txt 2>&1
echo $? > {out}/noauth.rc
ray job submit --working-dir . -- python -m jobs.data --config jobs/configs/demo.yaml > {out}/relative.txt 2>&1
echo $? > {out}/relative.rc
ray job list > {out}/jobs.txt 2>&1
python -c '{CHECK_ENDPOINT}' > {out}/endpoint.json 2> {out}/endpoint.err
ss -ltnp 'sport = :8000' > {out}/listener.txt 2>&1
ray stop > /dev/null 2>&1
exit 0
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "VIRTUAL_ENV"}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"  # as a new shell: the block activates the venv itself
    proc = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "bash", "-c", script], env=env,
                          capture_output=True, text=True, timeout=2400)
    return {"proc": proc, "tree": tree, "out": out, "root": tree / "artifacts"}


def test_block_starts_a_cluster_on_a_machine_without_a_token(tmp_path: Path) -> None:
    """The block's lines before `ray job submit`, in a HOME with no ~/.ray/auth_token (no `make demo` before):
    `ray start` with token auth refuses to start without a token, so the block must make one."""
    if not _can_unshare():
        pytest.skip("needs root with unshare and ip (CI runs as root) to give the block its own ports")
    home = tmp_path / "home"
    home.mkdir()
    lines = [line for line in readme_laptop_block() if not line.startswith("ray job submit")]
    script = f"""
set -eo pipefail
ip link set lo up
mkdir -p /tmp/ray && mount -t tmpfs tmpfs /tmp/ray
export HOME={home}
cd {REPO}
{chr(10).join(lines)}
ray job list > /dev/null 2>&1 || {{ ray job list; exit 3; }}
ray stop > /dev/null 2>&1
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "VIRTUAL_ENV"}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    proc = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "bash", "-c", script], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert (home / ".ray" / "auth_token").read_text().strip()


def _read(laptop: dict, name: str) -> str:
    path = laptop["out"] / name
    return path.read_text() if path.exists() else ""


def test_readme_block_succeeds_and_prints_a_completion(laptop: dict) -> None:
    proc = laptop["proc"]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "completion from http://127.0.0.1:8000/v1/completions" in out, out[-6000:]
    assert "succeeded" in out.lower(), out[-3000:]


def test_the_endpoint_port_is_haproxy_as_the_block_asks(laptop: dict) -> None:
    """The block exports RAY_SERVE_ENABLE_HA_PROXY=1 before `ray start`: port 8000 is HAProxy's, not Serve's
    Python proxy's (the completion above came through it)."""
    text = _read(laptop, "listener.txt")
    assert '"haproxy"' in text and "ProxyActor" not in text, text


def test_submit_without_token_is_refused_for_authentication(laptop: dict) -> None:
    text = _read(laptop, "noauth.txt")
    assert _read(laptop, "noauth.rc").strip() not in ("", "0"), text
    # Ray's own refusal for a missing token (the job client reaches the GCS first), not any other failure.
    assert "AuthenticationError" in text and "Authentication token is missing or incorrect" in text, text[-3000:]


def test_relative_storage_root_in_a_job_stops_with_what_to_set(laptop: dict) -> None:
    text = _read(laptop, "relative.txt")
    assert _read(laptop, "relative.rc").strip() not in ("", "0"), text[-3000:]
    assert "storage.root is the relative path './artifacts'" in text, text[-3000:]
    assert "storage.root=$PWD/artifacts" in text


def test_artifacts_land_where_the_readme_says(laptop: dict) -> None:
    root = laptop["root"]
    data = dataset_path(root, "demo")
    planted = json.loads((root / "raw" / "demo-1500-0" / "planted.json").read_text())
    report = json.loads((data / "report.json").read_text())
    # every generated row, valid or malformed, was read (the offensive and borderline rows come on top of 1500)
    assert report["read"] == planted["rows"] == 1500 + planted["offensive"] + planted["borderline"]
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["splits"]["train"]["tokens"] > 0
    model = exported_model(root, "demo")
    assert model == root / "models" / "demo-lm" / "1"  # the first registry version of the pretrained model
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "lineage.json"):
        assert (model / name).is_file(), name
    # The eval stage reports on the candidate, the last stage's export (DPO here): eval.json, eval.md and its charts.
    candidate = exported_model(root, "demo-dpo")
    report = (candidate / "eval.md").read_text()
    for suite in ("perplexity", "lm_eval", "win_rate", "alignment", "overfitting", "safety"):
        assert f"## {suite}" in report and (candidate / "eval" / f"{suite}.png").is_file(), suite
    lineage = json.loads((model / "lineage.json").read_text())
    assert lineage["dataset"]["name"] == "demo" and len(lineage["dataset"]["manifest_sha256"]) == 64
    # The lineage names the dataset version it trained on, which still resolves, byte for byte.
    assert Path(lineage["dataset"]["path"]) == data and lineage["dataset"]["version"] == data.name
    assert hashlib.sha256((data / "manifest.json").read_bytes()).hexdigest() == lineage["dataset"]["manifest_sha256"]
    assert lineage["tokenizer_sha256"] == manifest["tokenizer"]["sha256"] and lineage["task"]["type"] == "pretrain"
    assert lineage["spec"]["name"] == "demo" and lineage["run"] == "demo" and lineage["version"] == 1
    assert list((root / "runs" / "demo").glob("checkpoint_*")), "Ray Train checkpoints under the run dir"


def test_exported_model_loads_and_beats_untrained(laptop: dict) -> None:
    """Independent of eval.json: load with transformers and score held-out data here; then eval.json's
    perplexity suite (on the candidate, the DPO model, against its parent, the SFT model) agrees."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root = laptop["root"]
    model_dir = exported_model(root, "demo")
    trained = AutoModelForCausalLM.from_pretrained(model_dir)
    AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(123)
    untrained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    table = pq.read_table(dataset_path(root, "demo") / "val")
    ids = torch.tensor(np.stack(table.column("input_ids").to_numpy(zero_copy_only=False)), dtype=torch.long)
    n = torch.tensor(table.column("num_tokens").to_numpy(), dtype=torch.long)
    mask = torch.arange(ids.shape[1])[None, :] < n[:, None]
    labels = ids.masked_fill(~mask, -100)

    def ppl(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return math.exp(float(model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss))

    p_trained, p_untrained = ppl(trained), ppl(untrained)
    assert p_trained < 0.5 * p_untrained, (p_trained, p_untrained)
    p_dpo, p_sft = (ppl(AutoModelForCausalLM.from_pretrained(exported_model(root, run)))
                    for run in ("demo-dpo", "demo-sft"))
    recorded = json.loads((exported_model(root, "demo-dpo") / "eval.json").read_text())["perplexity"]
    # The chat-tuned candidate pays an alignment tax on web text (worse than untrained there): recorded, not gated.
    assert recorded["beats_untrained"] is (recorded["perplexity"] < recorded["untrained_perplexity"])
    assert recorded["split"] == "val"
    assert recorded["perplexity"] == pytest.approx(p_dpo, rel=0.05)
    assert recorded["parent_perplexity"] == pytest.approx(p_sft, rel=0.05)
    assert recorded["change_vs_parent"] == pytest.approx(recorded["perplexity"] / recorded["parent_perplexity"] - 1)


def test_eval_suites_report_on_the_candidate(laptop: dict) -> None:
    """The figures the promotion gate reads, under the keys it reads, from every suite the demo runs."""
    doc = json.loads((exported_model(laptop["root"], "demo-dpo") / "eval.json").read_text())
    assert not any("skipped" in info for info in doc["suites"].values()), doc["suites"]
    w = doc["win_rate"]
    assert w["n"] == 64 and 0.0 <= w["win_rate"] <= 1.0
    assert w["baseline"] == str(exported_model(laptop["root"], "demo-sft"))
    # DPO learned what the reward model learned: its responses win more often than not.
    assert w["win_rate"] > 0.5 and w["candidate_reward_mean"] > w["baseline_reward_mean"], w
    assert 0.0 <= doc["lm_eval"]["raytrain_demo_mc"]["acc"] <= 1.0 and "raytrain_demo_gen" in doc["lm_eval"]
    assert 0.0 <= doc["safety"]["unsafe_rate"] <= 1.0 and doc["safety"]["generations"] > 0
    runs = doc["overfitting"]["runs"]
    assert set(runs) == {"pretrain", "sft", "dpo"} and isinstance(doc["overfitting"]["flagged"], bool)
    for stage, run in runs.items():
        assert len(run["points"]) >= 3, (stage, run)
        steps = [p["step"] for p in run["points"]]
        assert steps == sorted(steps) and all(math.isfinite(p["gap"]) for p in run["points"]), (stage, run)


def test_alignment_lifecycle_meets_its_ground_truth(laptop: dict) -> None:
    """The demo's post-training, judged against the hidden rule (raytrain.posttrain.demo.score):
    the reward model ranks held-out pairs like the rule does (accuracy >= 0.9), and DPO raises the ground-truth
    reward of responses sampled on held-out prompts over the SFT model by at least 0.3 (the rule's range is
    [-1, 1]; measured: SFT about 0.0, DPO about 0.8), at a finite, reported KL to the SFT model."""
    root = laptop["root"]
    models = root / "models"
    reward = json.loads((exported_model(root, "demo-reward") / "eval.json").read_text())["heldout"]
    assert reward["pairs"] >= 100 and reward["accuracy"] >= 0.9, reward
    dpo_eval = json.loads((exported_model(root, "demo-dpo") / "eval.json").read_text())
    a = dpo_eval["alignment"]
    assert a["dpo"]["reward_mean"] - a["sft"]["reward_mean"] >= 0.3, a
    assert a["sft"]["kl_to_reference"] == 0 and 0 < a["dpo"]["kl_to_reference"] < 50, a
    assert a["dpo"]["n"] == a["sft"]["n"] >= 64
    assert dpo_eval["heldout"]["rewards/accuracies"] >= 0.8
    # Lineage chains the versions: dpo <- sft <- pretrain, each naming its data.
    lin = {m: json.loads(next((models / m).glob("*/lineage.json")).read_text())
           for m in ("demo-lm", "demo-lm-sft", "demo-lm-reward", "demo-lm-dpo")}
    assert lin["demo-lm-dpo"]["parent"] == lin["demo-lm-reward"]["parent"] == {
        "path": str(models / "demo-lm-sft" / "1"), "model": "demo-lm-sft", "version": 1, "task": "sft"}
    assert lin["demo-lm-sft"]["parent"] == {"path": str(models / "demo-lm" / "1"), "model": "demo-lm", "version": 1,
                                            "task": "pretrain"}
    assert lin["demo-lm-sft"]["dataset"]["name"] == "demo-sft" and lin["demo-lm-dpo"]["dataset"]["name"] == "demo-prefs"
    planted = json.loads(next((root / "raw").glob("alignment-demo-*/planted.json")).read_text())
    assert lin["demo-lm-dpo"]["dataset"]["counts"]["quarantined"] == planted["counts"]["planted"]["prefs"]


def test_the_gate_promotes_the_candidate_and_the_endpoint_serves_the_champion(laptop: dict) -> None:
    """The pipeline ends eval -> gate -> promote -> serve: the DPO export passed the demo's gate, took `champion`
    with its evidence recorded, and the endpoint (checked with the openai client inside the namespace after the job
    ended: on a long-lived cluster the Serve app outlives the job) serves that version."""
    out = laptop["proc"].stdout + laptop["proc"].stderr
    assert "promotion gate for demo-lm-dpo version 1 -> champion: PROMOTED" in out, out[-6000:]
    root = laptop["root"]
    alias = json.loads((root / "models" / "demo-lm-dpo" / "aliases" / "champion.json").read_text())
    assert alias["version"] == 1
    events = [json.loads(p.read_text()) for p in sorted((root / "models" / "demo-lm-dpo" / "history").glob("*.json"))]
    (promoted,) = [e for e in events if e["action"] == "promote"]
    assert promoted["passed"] and promoted["alias"] == "champion" and len(promoted["checks"]) >= 5
    assert all(c["passed"] and c["value"] is not None for c in promoted["checks"]), promoted["checks"]
    reply = _read(laptop, "endpoint.json")
    assert reply, _read(laptop, "endpoint.err")[-3000:]
    got = json.loads(reply)
    assert [(m["id"], m["version"], m["alias"]) for m in got["models"]] == [("demo-lm", "1", "champion")]
    assert got["completion_tokens"] > 0


if __name__ == "__main__":  # pragma: no cover - print the block this test runs
    print("\n".join(readme_laptop_block()), file=sys.stderr)
