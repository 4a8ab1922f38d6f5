"""The laptop path end to end: `ray start --head`, real `ray job submit` of jobs.pipeline, then the
artifacts, the exported model and the still-running endpoint are checked from outside the job."""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster_fixtures import clean_env
from conftest import REPO, free_port

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real head node with token auth on, stopped (only it) at the end."""
    token = secrets.token_hex(16)
    env = clean_env(token)  # the venv's bin/ first on PATH: the job entrypoint runs `python -m ...`
    temp_dir = Path(f"/tmp/rt-{os.getpid()}")  # unix socket paths must stay short
    gcs, dash = free_port(), free_port()
    head = subprocess.Popen(
        # Own ports for the dashboard agent and metrics too: the defaults collide with any other Ray
        # instance on the machine (the test session's own), and the job agent then never registers.
        [RAY, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}", "--num-cpus=4",
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 180
    while True:
        ok = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True, text=True)
        if ok.returncode == 0:
            break
        if head.poll() is not None or time.time() > deadline:
            head.kill()
            pytest.fail(f"ray head did not come up: {ok.stderr[-2000:]}")
        time.sleep(2)
    yield {"address": address, "token": token, **{k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}}
    os.killpg(head.pid, signal.SIGTERM)  # --block: the head tears down its own processes
    try:
        head.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)  # its whole process group: nothing of it outlives the test
        head.wait(timeout=30)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def job(cluster: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("job-root")
    port = free_port()
    env = clean_env(cluster["token"])
    cmd = [RAY, "job", "submit", "--address", cluster["address"], "--working-dir", str(REPO), "--",
           "python", "-m", "jobs.pipeline", "--config", "jobs/configs/tiny.yaml",
           f"storage.root={root}", f"serve.port={port}"]
    deadline = time.time() + 600  # a loaded 2-core machine can take minutes to start the job agent
    while True:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
        # The jobs API answers before the head's job agent has registered; that is worth a retry.
        if "No available agent to submit job" not in proc.stderr + proc.stdout or time.time() > deadline:
            break
        time.sleep(3)
    return {"proc": proc, "root": root, "port": port, "env": env}


def test_submit_without_token_is_refused(cluster: dict[str, str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = "/nonexistent"  # no ~/.ray/auth_token to fall back on
    proc = subprocess.run([RAY, "job", "list", "--address", cluster["address"]], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0


def test_job_succeeds_and_prints_a_completion(job: dict[str, object], cluster: dict[str, str]) -> None:
    proc = job["proc"]
    assert isinstance(proc, subprocess.CompletedProcess)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "completion from http://127.0.0.1" in out, out[-4000:]
    job_id = re.search(r"Job '([^']+)' submitted successfully", out)
    assert job_id, out[-2000:]
    status = subprocess.run([RAY, "job", "status", "--address", cluster["address"], job_id.group(1)],
                            env=job["env"], capture_output=True, text=True, timeout=120)
    assert "succeeded" in status.stdout.lower(), status.stdout + status.stderr


def test_artifacts_exist_and_accounting_holds(job: dict[str, object]) -> None:
    root = Path(str(job["root"]))
    data = root / "datasets" / "tiny"
    manifest = json.loads((data / "manifest.json").read_text())
    report = json.loads((data / "report.json").read_text())
    assert report["kept"] + report["removed_total"] + report["quarantined_total"] == report["read"] > 0
    assert manifest["splits"]["train"]["tokens"] > 0
    model = root / "models" / "tiny-lm" / "tiny"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "lineage.json",
                 "eval.json"):
        assert (model / name).is_file(), name
    lineage = json.loads((model / "lineage.json").read_text())
    assert lineage["dataset"]["name"] == "tiny" and len(lineage["dataset"]["manifest_sha256"]) == 64
    assert list((root / "runs" / "tiny").glob("checkpoint_*")), "Ray Train checkpoints under the run dir"


def test_exported_model_loads_and_beats_untrained(job: dict[str, object]) -> None:
    """Independent of eval.json: load with transformers and score held-out data here."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root = Path(str(job["root"]))
    model_dir = root / "models" / "tiny-lm" / "tiny"
    trained = AutoModelForCausalLM.from_pretrained(model_dir)
    AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(123)
    untrained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    table = pq.read_table(root / "datasets" / "tiny" / "val")
    ids = torch.tensor(np.stack(table.column("input_ids").to_numpy(zero_copy_only=False)), dtype=torch.long)
    n = torch.tensor(table.column("num_tokens").to_numpy(), dtype=torch.long)
    mask = torch.arange(ids.shape[1])[None, :] < n[:, None]
    labels = ids.masked_fill(~mask, -100)

    def ppl(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return math.exp(float(model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss))

    p_trained, p_untrained = ppl(trained), ppl(untrained)
    assert p_trained < 0.5 * p_untrained, (p_trained, p_untrained)
    recorded = json.loads((model_dir / "eval.json").read_text())
    assert recorded["beats_untrained"] is True
    assert recorded["perplexity"] == pytest.approx(p_trained, rel=0.05)


def test_endpoint_keeps_serving_after_the_job(job: dict[str, object]) -> None:
    """On a long-lived cluster the Serve app outlives the job that deployed it."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{job['port']}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny-lm"]
    reply = client.completions.create(model="tiny-lm", prompt="The garden", max_tokens=5, temperature=0)
    assert reply.choices[0].text is not None and reply.usage.completion_tokens > 0
