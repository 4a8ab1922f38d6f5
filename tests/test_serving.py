"""Serving: config validation, the torch engine, and the OpenAI API over real HTTP to Ray Serve.

The model is a real (randomly initialised) 2-layer Llama with a trained byte-level BPE tokenizer and ChatML
template, saved the way training exports checkpoints. The HTTP tests start one local Ray + Serve per module and
talk to it with the official `openai` client, as applications do, and with raw httpx for malformed input. The
module's app requires an API key (read by the replica from a keys file, as from a mounted Secret); a second,
open app with a tiny `max_tokens_limit` is the fuzzing target. A real Prometheus server scrapes Ray's metrics
export port in the metrics test.
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

from serving.api import CompletionRequest, from_validation_errors
from serving.config import ServeAppConfig, ServeConfigError
from serving.engine import ContextWindowError, Engine, TorchEngine, find_stop
from serving.service import OpenAIService
from serving_fixtures import build_tiny_model_dir, free_port, metrics_export_port, serve_session

MODEL = "tiny"
CONTEXT = 256
MAX_TOKENS_LIMIT = 200
APP_NAME = "serving-test"
FUZZ_APP = "serving-fuzz"
API_KEY = "sk-test-" + "0123456789abcdef" * 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"), max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> TorchEngine:
    return TorchEngine(str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "api-keys"
    path.write_text(f"# one key per line, as in a mounted Secret\n{API_KEY}\nsk-other-key\n")
    return path


@pytest.fixture(scope="module")
def serve_port() -> Iterator[int]:
    with serve_session(num_cpus=4) as port:
        yield port


@pytest.fixture(scope="module")
def base_url(model_dir: Path, keys_file: Path, serve_port: int) -> Iterator[str]:
    from ray import serve

    from serving.app import build_app

    app = build_app(
        {
            "models": [{"name": MODEL, "path": str(model_dir)}],
            "max_tokens_limit": MAX_TOKENS_LIMIT,
            "auth": {"enabled": True, "keys_file": str(keys_file)},
            "num_cpus_per_replica": 0.5,
        }
    )
    serve.run(app, name=APP_NAME, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{serve_port}"
    finally:
        serve.delete(APP_NAME)


@pytest.fixture(scope="module")
def client(base_url: str) -> Any:
    from openai import OpenAI

    # No retries: a failure should show as the first error, not as three slow attempts.
    return OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
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
    assert cfg.auth.enabled is False  # the laptop demo needs no key
    # `serve run ... auth='{"enabled": true}'` works too.
    assert ServeAppConfig.load({"models": [{"name": "a", "path": "/m"}], "auth": '{"enabled": true}'}).auth.enabled


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
        ({"models": [{"name": "a", "path": "/m"}], "max_ongoing_requests": 2}, "max_ongoing_requests (2)"),
        ({"models": [{"name": "a", "path": "/m"}], "auth": {"enabled": True, "keys": "x"}}, "auth.keys"),
        ({"models": [{"name": "a", "path": "/m"}], "upscale_delay_s": -1}, "upscale_delay_s"),
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
    auto = opts["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["target_ongoing_requests"]) == (1, 4, 2.0)
    # Delays that let a deployment actually scale within a minute, unlike Serve's 30 s / 600 s defaults.
    assert auto["upscale_delay_s"] < 30 and auto["downscale_delay_s"] < 600
    assert opts["max_ongoing_requests"] == 16
    # Serve accepts every option we render.
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(**auto)
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
        "stream_options": {"model": MODEL, "prompt": "x", "stream": True, "stream_options": {"usage": True}},
        "seed": {"model": MODEL, "prompt": "x", "seed": 2**64},
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

    def queue_depth(self) -> int:
        return 0

    async def stream(self, prompt: str, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA error: device-side assert triggered (internal detail)")
        yield  # an async generator, as the protocol says


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
        with httpx.Client(base_url=base_url, timeout=120, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
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


# ------------------------------------------------------------------------------ batching and chat (in-process)


def test_concurrent_requests_batch_and_match_sequential(engine: TorchEngine) -> None:
    # Requests arriving together decode in one batch (left-padded, joined mid-flight); each must get exactly
    # what it gets alone, greedy and seeded alike.
    from concurrent.futures import ThreadPoolExecutor

    jobs = [("The cat", 0.0, None), ("A dog reads a long letter every morning.", 0.0, None), ("Hi", 0.9, 3)] * 3
    jobs += [("The river finds", 1.0, 5), ("my friend", 0.0, None)]

    def run(job: tuple[str, float, int | None]) -> Any:
        prompt, temperature, seed = job
        return engine.generate(prompt, max_tokens=10 + len(prompt) % 7, temperature=temperature, seed=seed)

    alone = [run(job) for job in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(run, jobs))
    assert together == alone


def test_stream_deltas_add_up_to_the_result(engine: TorchEngine) -> None:
    from serving.engine import GenerationResult, TextDelta

    async def collect() -> tuple[list[Any], Any]:
        items = [item async for item in engine.stream("The cat reads", max_tokens=20, temperature=0, stop=["zzz"])]
        return items[:-1], items[-1]

    deltas, final = asyncio.run(collect())
    assert isinstance(final, GenerationResult) and all(isinstance(d, TextDelta) for d in deltas)
    assert (
        "".join(d.text for d in deltas)
        == final.text
        == engine.generate("The cat reads", max_tokens=20, temperature=0).text
    )


def test_chat_template_and_im_end_stop(engine: TorchEngine, model_dir: Path) -> None:
    prompt = engine.apply_chat_template([{"role": "user", "content": "Hello"}])
    assert prompt == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    im_end = engine._tokenizer.convert_tokens_to_ids("<|im_end|>")  # one token, and it ends a turn
    assert im_end in engine._eos_ids
    assert engine.count_tokens(prompt) < len(prompt) // 2
    no_template = TorchEngine(str(build_tiny_model_dir(model_dir.parent / "plain", chat_template=False)), "cpu")
    service = OpenAIService({MODEL: no_template}, max_tokens_limit=8)
    from serving.api import APIError, ChatCompletionRequest

    with pytest.raises(APIError) as info:
        asyncio.run(service.chat(ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": "hi"}])))
    assert info.value.status_code == 400 and info.value.code == "chat_template_missing"


# ------------------------------------------------------------------------------------------- auth (in-process)


def test_api_keys_from_env_and_rotating_file(tmp_path: Path) -> None:
    from serving.api import APIError
    from serving.auth import APIKeyAuth
    from serving.config import AuthConfig

    env = {"RAYTRAIN_API_KEYS": " k1 , k2,", "RAYTRAIN_API_KEYS_FILE": str(tmp_path / "keys")}
    (tmp_path / "keys").write_text("k3\n\n# comment\n")
    auth = APIKeyAuth.from_config(AuthConfig(enabled=True), environ=env)
    for key in ("k1", "k2", "k3"):
        auth.check(f"Bearer {key}")
    for header in (None, "", "Bearer", "Basic k1", "Bearer k4", "Bearer k", "bearer  k1x"):
        with pytest.raises(APIError) as info:
            auth.check(header)
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    # A rotated Secret is picked up without a restart.
    time.sleep(0.01)
    (tmp_path / "keys").write_text("k5\n")
    import os

    os.utime(tmp_path / "keys", (time.time() + 5, time.time() + 5))
    auth.check("Bearer k5")
    with pytest.raises(APIError):
        auth.check("Bearer k3")
    # Enabled without any key is a startup error, not an open server; disabled needs nothing.
    with pytest.raises(ValueError, match="no key"):
        APIKeyAuth.from_config(AuthConfig(enabled=True), environ={})
    APIKeyAuth.from_config(AuthConfig(), environ={}).check(None)


# ---------------------------------------------------------------------------------------- chat / streaming HTTP


def test_chat_completion_with_openai_client(client: Any, engine: TorchEngine) -> None:
    from openai.types.chat import ChatCompletion

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The cat reads"}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert isinstance(resp, ChatCompletion)
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"
    (choice,) = resp.choices
    assert choice.message.role == "assistant"
    local = engine.generate(engine.apply_chat_template(messages), max_tokens=8, temperature=0)
    assert choice.message.content == local.text and choice.finish_reason == local.finish_reason
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == engine.count_tokens(engine.apply_chat_template(messages))
    assert resp.usage.completion_tokens == local.completion_tokens


def test_streaming_completion_with_openai_client(client: Any) -> None:
    from openai.types import Completion

    args = {"model": MODEL, "prompt": ["The cat", "A dog"], "max_tokens": 12, "temperature": 0, "n": 2}
    full = client.completions.create(**args)
    stream = client.completions.create(**args, stream=True, stream_options={"include_usage": True})
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    chunks = list(stream)
    for chunk in chunks:
        assert isinstance(chunk, Completion) and chunk.id == chunks[0].id
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert texts == {c.index: c.text for c in full.choices}
    assert finish == {c.index: c.finish_reason for c in full.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage  # usage rides in the last chunk


def test_streaming_chat_with_openai_client(client: Any) -> None:
    messages = [{"role": "user", "content": "A dog reads"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True)
    )
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # no usage unless stream_options.include_usage


def test_sse_wire_format(http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"
    # A bad streamed request still gets its status code, not a 200 stream with an error inside.
    r = http.post(
        "/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}], "stream": True}
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": ""}]}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": MAX_TOKENS_LIMIT + 1}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, "top_p"),
        ({"messages": [{"role": "user", "content": "x" * 300_000}]}, "messages"),
    ],
)
def test_bad_chat_requests(http: httpx.Client, body: dict[str, Any], param: str) -> None:
    r = http.post("/v1/chat/completions", json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# ------------------------------------------------------------------------------------------------ auth (HTTP)


def test_auth_over_http(base_url: str, client: Any) -> None:
    import openai
    from openai import OpenAI

    with httpx.Client(base_url=base_url, timeout=30) as anon:
        assert anon.get("/health").status_code == 200  # probes need no key
        assert anon.get("/openapi.json").status_code == 200
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": API_KEY}):
            r = anon.post("/v1/completions", headers=headers, content=b"{not json")  # 401 before the body is read
            assert r.status_code == 401, r.text
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
        assert anon.get("/v1/models", headers={"Authorization": "Bearer sk-other-key"}).status_code == 200
    wrong = OpenAI(base_url=f"{base_url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_openapi_document_served(http: httpx.Client) -> None:
    doc = http.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready"} <= set(doc["paths"])
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert http.get("/ready").json() == {"status": "ok", "models": [MODEL]}


# ------------------------------------------------------------------------------------------- metrics (Prometheus)


def _start_prometheus(tmp: Path, target_port: int) -> tuple[Any, str]:
    import shutil
    import subprocess

    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the `prometheus` binary is not installed (Debian package `prometheus`)")
    config = tmp / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: ray\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
    )
    web = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address={web}"],
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "prometheus.log").open("w"),
    )
    return proc, f"http://{web}"


def _prom_query(prom: str, query: str, timeout_s: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            r = httpx.get(f"{prom}/api/v1/query", params={"query": query}, timeout=5)
            if r.status_code == 200 and r.json()["data"]["result"]:
                return r.json()["data"]["result"]
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            return []
        time.sleep(1)


def test_real_prometheus_scrapes_serving_metrics(http: httpx.Client, client: Any, tmp_path: Path) -> None:
    proc, prom = _start_prometheus(tmp_path, metrics_export_port())
    try:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, temperature=0)
        list(
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4, stream=True
            )
        )
        http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 0})  # a 400
        httpx.get(http.base_url.join("/v1/models"))  # a 401

        ok = _prom_query(prom, 'ray_raytrain_serve_requests_total{route="/v1/completions",status="200"}')
        assert ok and ok[0]["metric"]["model"] == MODEL, (tmp_path / "prometheus.log").read_text()[-2000:]
        assert _prom_query(prom, 'ray_raytrain_serve_requests_total{route="/v1/completions",status="400"}')
        assert _prom_query(prom, 'ray_raytrain_serve_requests_total{route="/v1/models",status="401"}')
        chat_latency = 'sum(ray_raytrain_serve_latency_seconds_count{route="/v1/chat/completions"})'
        latency = _prom_query(prom, chat_latency)
        assert latency and float(latency[0]["value"][1]) >= 1
        assert _prom_query(prom, "ray_raytrain_serve_latency_seconds_bucket")
        assert _prom_query(prom, "ray_raytrain_serve_ttft_seconds_count")
        assert _prom_query(prom, "ray_raytrain_serve_generated_tokens_total")
        assert _prom_query(prom, "ray_raytrain_serve_queue_depth")
        # Serve's own series come from the same endpoint.
        assert _prom_query(prom, "ray_serve_num_http_requests_total")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ------------------------------------------------------------------------------------------------------ fuzzing


@pytest.fixture(scope="module")
def fuzz_url(model_dir: Path, serve_port: int, base_url: str) -> Iterator[str]:
    # An open app (auth off, the laptop default) with tiny limits, so that the largest valid request the fuzzer can
    # build (32 prompts x 8 choices) still finishes in a fraction of a second.
    from ray import serve

    from serving.app import build_app

    app = build_app(
        {
            "models": [{"name": MODEL, "path": str(model_dir)}],
            "max_tokens_limit": 2,
            "num_cpus_per_replica": 0.5,
            "max_batch_size": 64,
        }
    )
    serve.run(app, name=FUZZ_APP, route_prefix="/fuzz")
    try:
        yield f"http://127.0.0.1:{serve_port}/fuzz"
    finally:
        serve.delete(FUZZ_APP)


def test_fuzzing_the_openapi_document_finds_no_server_errors(fuzz_url: str) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    doc = httpx.get(f"{fuzz_url}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(doc)
    failures: list[str] = []
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=True
            )
            def check(case: Any) -> None:
                nonlocal calls
                calls += 1
                response = case.call(base_url=fuzz_url, timeout=30)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.path} {case.body!r} -> {response.status_code}")
                elif response.status_code >= 400:
                    # Every 4xx is OpenAI-shaped.
                    assert "error" in response.json(), response.text

            try:
                check()
            except Unsatisfiable:  # e.g. no invalid request exists for a route without parameters
                continue
    assert calls > 50
    assert not failures, failures[:5]
    # The replica survived all of it.
    assert httpx.get(f"{fuzz_url}/health", timeout=30).status_code == 200
