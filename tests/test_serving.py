"""Serving: config validation, the torch engine, and the OpenAI API over real HTTP to Ray Serve.

The model is a real (randomly initialised) 2-layer Llama with a trained byte-level BPE tokenizer, saved the
way training exports checkpoints. The HTTP tests start one local Ray + Serve per module and talk to it
with the official `openai` client, as applications do, and with raw httpx for malformed input.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from serving_fixtures import build_tiny_model_dir, serve_session

from serving.api import CompletionRequest, from_validation_errors
from serving.config import ServeAppConfig, ServeConfigError
from serving.engine import ContextWindowError, Engine, TorchEngine, find_stop
from serving.service import OpenAIService

MODEL = "tiny"
CONTEXT = 256
MAX_TOKENS_LIMIT = 200
APP_NAME = "serving-test"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"), max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> TorchEngine:
    return TorchEngine(str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def base_url(model_dir: Path) -> Iterator[str]:
    from ray import serve

    from serving.app import build_app

    with serve_session(num_cpus=4) as port:
        app = build_app({"models": [{"name": MODEL, "path": str(model_dir)}], "max_tokens_limit": MAX_TOKENS_LIMIT})
        serve.run(app, name=APP_NAME, route_prefix="/")
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.delete(APP_NAME)


@pytest.fixture(scope="module")
def client(base_url: str) -> Any:
    from openai import OpenAI

    # No retries: a failure should show as the first error, not as three slow attempts.
    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


# ------------------------------------------------------------------------------------------------- config


def test_config_defaults_and_serve_run_string_args() -> None:
    # `serve run serving.app:build_app models='[...]' max_replicas=3` passes every value as a string.
    cfg = ServeAppConfig.load(
        {"models": json.dumps([{"name": "a", "path": "s3://b/m"}]), "max_replicas": "3", "min_replicas": "0"}
    )
    assert [m.name for m in cfg.models] == ["a"]
    assert (cfg.min_replicas, cfg.max_replicas, cfg.max_tokens_limit, cfg.device) == (0, 3, 512, "auto")
    assert cfg.target_ongoing_requests == 2.0 and cfg.max_ongoing_requests == 16


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({"models": []}, "models"),
        ({"models": [{"name": "a"}]}, "models.0.path"),
        ({"models": [{"name": "a", "path": "/m"}], "min_replicas": 3, "max_replicas": 2}, "min_replicas (3)"),
        ({"models": [{"name": "a", "path": "/m"}], "max_tokens_limit": 0}, "max_tokens_limit"),
        ({"models": [{"name": "a", "path": "/m"}], "replicas": 2}, "replicas"),
        ({"models": [{"name": "a", "path": "/m"}], "device": "tpu"}, "device"),
        ({"models": [{"name": "a", "path": "/m"}], "device": "cuda"}, "num_gpus_per_replica"),
        ({"models": [{"name": "a", "path": "/m"}, {"name": "a", "path": "/n"}]}, "duplicate"),
        ({"models": "[not json"}, "models"),
    ],
)
def test_config_errors_name_the_key(args: dict[str, Any], expected: str) -> None:
    with pytest.raises(ServeConfigError) as info:
        ServeAppConfig.load(args)
    assert expected in str(info.value)


def test_builder_works_the_way_serve_run_and_serve_configs_call_it(tmp_path: Path) -> None:
    # The same entry point `serve run` and `import_path:` + `args:` use; it rejects builders with more than
    # one parameter and must get an Application back.
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from serving.app import build_app, deployment_options

    args = {"models": json.dumps([{"name": "a", "path": str(tmp_path)}]), "max_replicas": "4"}
    app = call_user_app_builder_with_args_if_necessary(build_app, args)
    assert isinstance(app, Application)
    opts = deployment_options(ServeAppConfig.load(args))
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2.0}
    assert opts["max_ongoing_requests"] == 16
    with pytest.raises(ServeConfigError, match="max_replicas"):
        build_app({"models": [{"name": "a", "path": "/m"}], "max_replicas": 0})


# ------------------------------------------------------------------------------------------------- engine


def test_engine_implements_protocol(engine: TorchEngine) -> None:
    assert isinstance(engine, Engine)
    assert engine.context_length == CONTEXT
    assert engine.count_tokens("The cat reads a book") > 0


def test_greedy_decode_matches_transformers_generate(engine: TorchEngine, model_dir: Path) -> None:
    # Our KV-cache loop must produce exactly what transformers' own greedy search produces.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = "The cat reads"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    result = engine.generate(prompt, max_tokens=12, temperature=0)
    assert result.text == expected
    assert result.prompt_tokens == ids.shape[1]
    assert result.completion_tokens == out.shape[1] - ids.shape[1]


def test_seeded_sampling_is_reproducible_and_seed_dependent(engine: TorchEngine) -> None:
    a = engine.generate("A dog", max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    b = engine.generate("A dog", max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    c = engine.generate("A dog", max_tokens=16, temperature=1.0, top_p=0.9, seed=8)
    assert a == b
    assert a.text != c.text


def test_stop_sequence_truncates_and_reports_stop(engine: TorchEngine) -> None:
    prompt = "The cat reads"
    full = engine.generate(prompt, max_tokens=24, temperature=0)
    words = [m for m in re.finditer(r"[A-Za-z]{3,}", full.text) if m.start() > 0]
    assert words, f"fixture model produced no ASCII word to stop on: {full.text!r}"
    stop = words[0].group()
    cut = engine.generate(prompt, max_tokens=24, temperature=0, stop=["never-appears", stop])
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop"
    assert cut.completion_tokens < full.completion_tokens


def test_find_stop_picks_earliest() -> None:
    assert find_stop("abc STOP def END", ["END", "STOP"]) == 4
    assert find_stop("abc", ["x", ""]) is None


def test_context_window_is_enforced(engine: TorchEngine) -> None:
    prompt = "The cat reads a book"
    n = engine.count_tokens(prompt)
    with pytest.raises(ContextWindowError) as info:
        engine.generate(prompt, max_tokens=CONTEXT - n + 1, temperature=0)
    assert info.value.context_length == CONTEXT
    # Exactly filling the window is allowed.
    assert engine.generate(prompt, max_tokens=CONTEXT - n, temperature=0, seed=0).prompt_tokens == n


def test_engine_loads_from_uri(model_dir: Path, engine: TorchEngine) -> None:
    # A URI goes through pyarrow.fs (file:// here; s3:// and gs:// take the same path) into a temp dir.
    remote = TorchEngine(model_dir.resolve().as_uri(), device="cpu")
    assert remote.generate("Hi", max_tokens=5, temperature=0) == engine.generate("Hi", max_tokens=5, temperature=0)
    with pytest.raises(FileNotFoundError):
        TorchEngine((model_dir / "missing").resolve().as_uri(), device="cpu")


# ----------------------------------------------------------------------------------- service (in-process)


def test_validation_errors_name_the_param() -> None:
    cases = {
        "temperature": {"model": MODEL, "prompt": "x", "temperature": 2.5},
        "top_p": {"model": MODEL, "prompt": "x", "top_p": 0},
        "prompt": {"model": MODEL, "prompt": [[1, 2]]},
        "stop": {"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]},
        "stream": {"model": MODEL, "prompt": "x", "stream": True},
        "best_of": {"model": MODEL, "prompt": "x", "best_of": 3},
        "model": {"prompt": "x"},
        "frobnicate": {"model": MODEL, "prompt": "x", "frobnicate": 1},
    }
    for param, body in cases.items():
        with pytest.raises(ValidationError) as info:
            CompletionRequest.model_validate(body)
        error = from_validation_errors(info.value.errors())
        assert (error.status_code, error.param) == (400, param), (param, error.message)
    # Clients that send explicit nulls and neutral values must be accepted.
    ok = CompletionRequest.model_validate(
        {
            "model": MODEL,
            "prompt": "x",
            "max_tokens": None,
            "temperature": None,
            "logprobs": None,
            "presence_penalty": 0,
            "echo": False,
            "best_of": 1,
            "stop": None,
        }
    )
    assert (ok.max_tokens, ok.temperature, ok.stop_sequences) == (16, 1.0, [])


def test_service_batches_prompts_and_choices(engine: TorchEngine) -> None:
    service = OpenAIService({MODEL: engine}, max_tokens_limit=32)
    req = CompletionRequest(
        model=MODEL, prompt=["The cat", "A dog reads"], n=2, max_tokens=4, temperature=0.8, seed=11, echo=True
    )
    resp = asyncio.run(service.complete(req))
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert resp.choices[0].text.startswith("The cat") and resp.choices[2].text.startswith("A dog reads")
    prompt_tokens = engine.count_tokens("The cat") + engine.count_tokens("A dog reads")
    assert resp.usage.prompt_tokens == prompt_tokens
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    # Choice i uses seed + i, so the second choice of a prompt is the engine's answer for seed 12.
    second = engine.generate("The cat", max_tokens=4, temperature=0.8, seed=12)
    assert resp.choices[1].text == "The cat" + second.text


class _BrokenEngine:
    """The real engine with generation failing: the only way to see how a server fault reaches the client."""

    def __init__(self, inner: TorchEngine) -> None:
        self.context_length = inner.context_length
        self.count_tokens = inner.count_tokens

    def generate(self, prompt: str, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA error: device-side assert triggered (internal detail)")


def test_engine_failure_becomes_opaque_500(engine: TorchEngine, caplog: pytest.LogCaptureFixture) -> None:
    from serving.api import APIError

    service = OpenAIService({MODEL: _BrokenEngine(engine)}, max_tokens_limit=8)  # type: ignore[dict-item]
    with pytest.raises(APIError) as info:
        asyncio.run(service.complete(CompletionRequest(model=MODEL, prompt="hi", max_tokens=2)))
    body = info.value.to_response().model_dump()
    assert info.value.status_code == 500 and body["error"]["type"] == "server_error"
    assert "CUDA" not in body["error"]["message"]  # internals stay in the replica log
    assert "device-side assert" in caplog.text


# ------------------------------------------------------------------------------------------ HTTP via Serve


def test_health(http: httpx.Client) -> None:
    r = http.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "models": [MODEL]}


def test_models_list_with_openai_client(client: Any) -> None:
    from openai.types import Model

    models = list(client.models.list())
    assert [m.id for m in models] == [MODEL]
    assert isinstance(models[0], Model)
    assert models[0].owned_by == "raytrain" and models[0].object == "model"


def test_completion_with_openai_client(client: Any, engine: TorchEngine) -> None:
    from openai.types import Completion

    resp = client.completions.create(model=MODEL, prompt="The cat reads", max_tokens=8, temperature=0)
    assert isinstance(resp, Completion)
    assert resp.id.startswith("cmpl-") and resp.object == "text_completion" and resp.model == MODEL
    (choice,) = resp.choices
    # The replica runs the same weights as the in-process engine: greedy output must be identical.
    local = engine.generate("The cat reads", max_tokens=8, temperature=0)
    assert choice.text == local.text
    assert choice.finish_reason == local.finish_reason
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == engine.count_tokens("The cat reads")
    assert resp.usage.completion_tokens == local.completion_tokens <= 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_seeded_sampling_over_http(client: Any) -> None:
    def sample(seed: int) -> str:
        r = client.completions.create(model=MODEL, prompt="A dog", max_tokens=12, temperature=0.9, seed=seed)
        return r.choices[0].text

    assert sample(123) == sample(123)
    assert sample(123) != sample(124)


def test_batch_prompts_and_stop_over_http(client: Any) -> None:
    resp = client.completions.create(
        model=MODEL, prompt=["The cat", "A dog"], n=2, max_tokens=6, temperature=0, stop=["\n"]
    )
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert all("\n" not in c.text for c in resp.choices)
    # Greedy: both choices of a prompt agree.
    assert resp.choices[0].text == resp.choices[1].text


def _long_prompt(engine: TorchEngine) -> str:
    prompt = "The cat reads a book today. " * 40
    assert engine.count_tokens(prompt) > CONTEXT
    return prompt


@pytest.mark.parametrize(
    ("name", "status", "param"),
    [
        ("malformed_json", 400, None),
        ("not_an_object", 400, None),
        ("unknown_model", 404, "model"),
        ("max_tokens_over_limit", 400, "max_tokens"),
        ("max_tokens_zero", 400, "max_tokens"),
        ("negative_temperature", 400, "temperature"),
        ("empty_prompt", 400, "prompt"),
        ("token_id_prompt", 400, "prompt"),
        ("prompt_too_long", 400, "prompt"),
        ("prompt_plus_max_tokens_too_long", 400, "max_tokens"),
        ("unknown_parameter", 400, "best_of_luck"),
        ("missing_model", 400, "model"),
    ],
)
def test_bad_requests_get_openai_errors(
    http: httpx.Client, engine: TorchEngine, name: str, status: int, param: str | None
) -> None:
    fits_alone = "The cat reads a book today. " * 16  # fits the window, but not with max_tokens more
    bodies: dict[str, Any] = {
        "malformed_json": b'{"model": "tiny", "prompt": ',
        "not_an_object": b'["tiny"]',
        "unknown_model": {"model": "no-such-model", "prompt": "hi"},
        "max_tokens_over_limit": {"model": MODEL, "prompt": "hi", "max_tokens": MAX_TOKENS_LIMIT + 1},
        "max_tokens_zero": {"model": MODEL, "prompt": "hi", "max_tokens": 0},
        "negative_temperature": {"model": MODEL, "prompt": "hi", "temperature": -0.5},
        "empty_prompt": {"model": MODEL, "prompt": ""},
        "token_id_prompt": {"model": MODEL, "prompt": [1, 2, 3]},
        "prompt_too_long": {"model": MODEL, "prompt": _long_prompt(engine)},
        "prompt_plus_max_tokens_too_long": {"model": MODEL, "prompt": fits_alone, "max_tokens": MAX_TOKENS_LIMIT},
        "unknown_parameter": {"model": MODEL, "prompt": "hi", "best_of_luck": True},
        "missing_model": {"prompt": "hi"},
    }
    if name == "prompt_plus_max_tokens_too_long":
        n = engine.count_tokens(fits_alone)
        assert n < CONTEXT < n + MAX_TOKENS_LIMIT, n  # the prompt fits; only the completion pushes it over
    body = bodies[name]
    if isinstance(body, bytes):
        r = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = http.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    if name == "unknown_model":
        assert error["code"] == "model_not_found"
    if name.endswith("too_long"):
        assert error["code"] == "context_length_exceeded" and str(CONTEXT) in error["message"]

    # The replica survived the bad request.
    ok = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200, ok.text


def test_openai_client_raises_typed_errors(client: Any) -> None:
    import openai

    with pytest.raises(openai.NotFoundError) as nf:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as br:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=10_000)
    assert br.value.param == "max_tokens"


def test_unknown_route_is_openai_shaped(http: httpx.Client) -> None:
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "unknown_url"


def test_event_loop_stays_responsive_during_generation(http: httpx.Client, base_url: str) -> None:
    # Generation runs in a worker thread: /health must answer while a long completion is still running.
    done: dict[str, float] = {}

    def long_completion() -> None:
        with httpx.Client(base_url=base_url, timeout=120) as c:
            r = c.post(
                "/v1/completions",
                json={
                    "model": MODEL,
                    "prompt": "Hi",
                    "max_tokens": MAX_TOKENS_LIMIT,
                    "temperature": 0.7,
                    "seed": 1,
                    "stop": ["never-appears"],
                },
            )
            assert r.status_code == 200
        done["completion"] = time.monotonic()

    worker = threading.Thread(target=long_completion)
    worker.start()
    time.sleep(0.05)  # let the completion reach the replica first
    # Several health checks while it runs; each must come back before the completion does.
    for _ in range(3):
        assert http.get("/health").status_code == 200
    done["health"] = time.monotonic()
    worker.join(timeout=120)
    assert "completion" in done
    assert done["health"] < done["completion"]
