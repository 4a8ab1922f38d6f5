"""Serving: config validation, the torch engine, and the OpenAI API over real HTTP to Ray Serve.

The model is a real (randomly initialised) 2-layer Llama with a trained byte-level BPE tokenizer and ChatML
template, saved the way training exports checkpoints. The HTTP tests start one local Ray + Serve per module and
talk to it with the official `openai` client, as applications do, and with raw httpx for malformed input. The
module's app requires an API key (read by the replica from a keys file, as from a mounted Secret). A second app,
deployed from a job spec by `raytrain.deploy` with `serve.auth` on and a tiny `max_tokens_limit`, is the fuzzing
target. A third, open app has the engine's test-only fault injection on: it fails the requests whose prompt
carries a marker, so that one request can fail among many over real HTTP. A real Prometheus server scrapes Ray's
metrics export port in the metrics test.
"""

from __future__ import annotations

import asyncio
import json
import queue
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, ValidationError

from raytrain.config import ConfigError, JobSpec, load_spec
from raytrain.data.tokenizer import IM_END, IM_START
from raytrain.errors import StageInputError
from serving.api import APIError, ChatCompletionRequest, CompletionRequest, from_validation_errors
from serving.config import FaultInjection, ServeAppConfig, ServeConfigError
from serving.detokenizer import IncrementalDetokenizer
from serving.engine import ContextWindowError, Engine, GenerationResult, InjectedFault, TorchEngine, find_stop
from serving.service import OpenAIService
from serving_fixtures import build_tiny_model_dir, free_port, metrics_export_port, serve_session

MODEL = "tiny"
CONTEXT = 256
MAX_TOKENS_LIMIT = 200
APP_NAME = "serving-test"
FUZZ_APP = "serving-fuzz"
FAULT_APP = "serving-faults"
FAULTY_MODEL = "tiny-faulty"  # its own name, so the metrics of the fault app are its own series
MARKER = "FAULT-MARKER"  # prompts containing it fail (FaultInjection)
FAULT_AT = 3  # ... in the decode step after their third token, after text was streamed
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
        ({"models": [{"name": "a", "path": "/m"}], "fault_injection": {"prompt_marker": ""}}, "fault_injection"),
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


# ----------------------------------------------------------------------------------- job spec: serve.auth


@pytest.mark.parametrize("host", ["0.0.0.0", "'::'", "10.1.2.3", "gpu-node-1.internal"])
def test_spec_refuses_an_open_endpoint_on_a_reachable_host(host: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_spec("demo", [f"serve.host={host}"])
    assert "serve.auth" in str(info.value), str(info.value)
    # Keys, or a waiver in so many words, make the same spec valid.
    assert load_spec("demo", [f"serve.host={host}", "serve.auth.enabled=true"]).serve.auth.enabled
    assert load_spec("demo", [f"serve.host={host}", "serve.auth.allow_unauthenticated=true"])


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "'::1'"])
def test_loopback_hosts_need_no_keys(host: str) -> None:
    assert not load_spec("demo", [f"serve.host={host}"]).serve.auth.enabled


def test_serve_and_validate_commands_refuse_an_open_reachable_host() -> None:
    # The console script, as a user runs it: validation fails before Ray starts, with the key to set.
    raytrain = str(Path(sys.executable).parent / "raytrain")
    for command in ("validate", "serve"):
        proc = subprocess.run(
            [raytrain, command, "-c", "demo", "serve.host=0.0.0.0"], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert "serve.auth" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_recipes_that_bind_all_interfaces_require_keys_and_deploy_with_them() -> None:
    from raytrain.deploy import app_args

    for recipe in ("125m", "1b"):
        spec = load_spec(recipe, ["serve.model_path=s3://bucket/models/m/3"])  # no registry lookup on s3
        assert spec.serve.host == "0.0.0.0"
        auth = ServeAppConfig.load(app_args(spec)).auth  # what the replicas receive
        assert (auth.enabled, auth.keys_env) == (True, "RAYTRAIN_API_KEYS"), recipe


def test_pipeline_client_key_comes_from_where_the_replicas_read_keys(tmp_path: Path) -> None:
    from raytrain.deploy import client_api_key

    assert client_api_key(load_spec("demo"), {"RAYTRAIN_API_KEYS": "k1"}) is None  # auth off: no header
    spec = load_spec("demo", ["serve.auth.enabled=true"])
    assert client_api_key(spec, {"RAYTRAIN_API_KEYS": " k1 ,k2"}) == "k1"
    (tmp_path / "keys").write_text("# rotated monthly\nk3\n")
    assert client_api_key(spec, {"RAYTRAIN_API_KEYS_FILE": str(tmp_path / "keys")}) == "k3"
    named = load_spec("demo", ["serve.auth.enabled=true", f"serve.auth.keys_file={tmp_path / 'keys'}"])
    assert client_api_key(named, {}) == "k3"
    # Checked before the pipeline trains for hours: no key to send is an error naming what to set.
    with pytest.raises(StageInputError, match=r"serve\.auth.*RAYTRAIN_API_KEYS"):
        client_api_key(spec, {})


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


def test_generate_many_is_one_reproducible_batch_with_the_ids_it_counts(engine: TorchEngine) -> None:
    """RL's rollout path: a whole batch queued at once gives the same completions on every call, each result's
    token_ids are what completion_tokens counts and decode to its text, and a seeded row matches `generate`."""
    prompts = ["A dog", "The cat reads", "A dog", "Once"]
    seeds = [7, 3, 8, 11]
    a = engine.generate_many(prompts, max_tokens=12, temperature=1.0, seeds=seeds)
    b = engine.generate_many(prompts, max_tokens=12, temperature=1.0, seeds=seeds)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert a[0].token_ids != a[2].token_ids  # same prompt, other seed
    for r in a:
        assert len(r.token_ids) == r.completion_tokens and r.finish_reason in ("stop", "length")
        ids = [t for t in r.token_ids if t not in engine.eos_token_ids()]
        assert engine.detokenize(ids).strip() == r.text.strip() or r.text in engine.detokenize(ids)
    alone = engine.generate("A dog", max_tokens=12, temperature=1.0, seed=7)
    assert alone.text == a[0].text


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


def test_a_prompt_counted_then_generated_is_tokenized_once(
    engine: TorchEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server counts a prompt's tokens to check its limits, then generates from the same text: one tokenizer run."""
    calls: list[str] = []
    encode = engine._ids

    def counting(text: str, add_special_tokens: bool) -> list[int]:
        calls.append(text)
        return encode(text, add_special_tokens)

    monkeypatch.setattr(engine, "_ids", counting)
    prompt = f"A prompt seen once {time.time()}"
    n = engine.count_tokens(prompt)
    result = engine.generate(prompt, max_tokens=3, temperature=0)
    assert calls == [prompt] and result.prompt_tokens == n


TEXTS = ["The cat reads a book", "  leading spaces\tand a tab\n\nnew lines", "ünïcödé — ‘quotes’ 中文 🙂",
         f"{IM_START}user\nhello{IM_END}\n{IM_START}assistant\n", "", "a" * 500]


def test_prompts_get_the_tokenizers_own_ids(engine: TorchEngine) -> None:
    """The engine encodes with the Rust tokenizer directly (the replica's hot path): the ids are the ones the
    transformers tokenizer gives, with and without special tokens, including after a call that left the Rust tokenizer
    truncating (then the engine goes through the transformers tokenizer, which resets it)."""
    tokenizer = engine._tokenizer
    assert engine._backend is not None, "the exported tokenizer is a fast one: the direct path must be the one tested"
    for add in (True, False):
        for text in TEXTS:
            assert engine.tokenize(text, add_special_tokens=add) == tokenizer(text, add_special_tokens=add)["input_ids"]
    tokenizer("one two three four five six", truncation=True, max_length=2)  # leaves the backend truncating
    assert engine.tokenize(TEXTS[-1]) == tokenizer(TEXTS[-1])["input_ids"] and len(engine.tokenize(TEXTS[-1])) > 2


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


# -------------------------------------------------------------------------------- incremental detokenization


def _full_decoder(model_dir: Path) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return tok, lambda ids: tok.decode(list(ids), skip_special_tokens=True)


def test_incremental_detokenizer_equals_full_decode_on_split_characters(model_dir: Path) -> None:
    tok, full = _full_decoder(model_dir)
    ids = tok.encode("naïve café — 日本語のテキスト 🙂🚀 x² ∑ Ünïcödé. The cat reads!").ids
    # The byte-level BPE learnt its merges on ASCII: every other character is split across tokens.
    assert sum("\ufffd" in full([i]) for i in ids) > 10
    # A cut inside a character: full decode ends with U+FFFD, and so must the flushed incremental text.
    cut = next(k for k in range(1, len(ids)) if full(ids[:k]).endswith("\ufffd"))
    rng = random.Random(0)
    specials = [tok.token_to_id("<|im_start|>"), tok.token_to_id("<|pad|>")]
    cases = [ids, ids[1:], ids[:cut], ids[:5] + specials + ids[5:]]
    cases += [[rng.randrange(tok.get_vocab_size()) for _ in range(rng.randrange(1, 80))] for _ in range(100)]
    held_back = 0
    for case in cases:
        detok = IncrementalDetokenizer(full)
        pieces = [detok.push(i) for i in case]
        assert "".join(pieces) + detok.flush() == full(case), case
        # Nothing is streamed while a character is unfinished: no piece ends inside one.
        assert not any(p.endswith("\ufffd") for p in pieces if p) or "\ufffd" in full(case)
        held_back += pieces.count("")
    assert held_back > 0


def test_incremental_detokenizer_work_per_token_does_not_grow(model_dir: Path) -> None:
    tok, full = _full_decoder(model_dir)
    ids = tok.encode("Le garçon lit un livre 📚 chaque matin — 毎朝本を読む. " * 40).ids
    assert len(ids) > 600
    windows: list[int] = []

    def counting(window: Any) -> str:
        windows.append(len(window))
        return full(window)

    detok = IncrementalDetokenizer(counting)
    text = "".join(detok.push(i) for i in ids) + detok.flush()
    assert text == full(ids)
    # At most two decodes per token, each of a few recent tokens: linear in the length, where re-decoding the
    # whole completion at every token would decode len(ids)**2 / 2 (here > 180,000) tokens.
    assert len(windows) <= 2 * len(ids) + 1
    assert max(windows) <= 8, max(windows)
    assert sum(windows) <= 6 * len(ids)


def test_engine_decodes_each_token_in_constant_work(engine: TorchEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    windows: list[int] = []
    decode = engine._detok_decode

    def counting(ids: Any) -> str:
        windows.append(len(ids))
        return decode(ids)

    monkeypatch.setattr(engine, "_detok_decode", counting)
    result = engine.generate("Hi", max_tokens=200, temperature=0, stop=["never-appears"])
    assert result.completion_tokens == 200, result  # greedy "Hi" runs to the limit with this model
    assert max(windows) <= 8 and sum(windows) <= 6 * 200, (max(windows), sum(windows))


# ------------------------------------------------------------------------------ failures stay with their request


@pytest.fixture(scope="module")
def faulty_engine(model_dir: Path) -> TorchEngine:
    return TorchEngine(
        str(model_dir), device="cpu", fault_injection=FaultInjection(prompt_marker=MARKER, at_token=FAULT_AT)
    )


_DEFAULTS = {"max_tokens": 16, "temperature": 0.0}


def _submit_together(
    engine: TorchEngine, requests: list[dict[str, Any]], prepare: Callable[[list[Any]], None] | None = None
) -> list[Any]:
    """Queue every request at once, so that the scheduler's first step batches them all; returns what each got.

    Holding the scheduler's condition (an RLock, which `_submit` takes again) keeps it from starting on the first
    request before the last is queued; `prepare(seqs)` runs before it may start. Each result is a GenerationResult
    or the exception the request got.
    """
    outs: list[queue.SimpleQueue[Any]] = []
    with engine._cv:
        seqs = []
        for request in requests:
            out: queue.SimpleQueue[Any] = queue.SimpleQueue()
            args = {"top_p": 1.0, "seed": None, "stop": (), **_DEFAULTS, **request}
            seqs.append(engine._submit(args.pop("prompt"), out.put, **args))
            outs.append(out)
        if prepare is not None:
            prepare(seqs)
    results = []
    for out in outs:
        while not isinstance(item := out.get(timeout=120), (GenerationResult, BaseException)):
            pass
        results.append(item)
    return results


@pytest.mark.parametrize("at_token", [0, FAULT_AT], ids=["prefill", "decode"])
def test_a_failed_forward_pass_fails_only_its_own_request(
    faulty_engine: TorchEngine, engine: TorchEngine, at_token: int, caplog: pytest.LogCaptureFixture
) -> None:
    faulty_engine._fault = FaultInjection(prompt_marker=MARKER, at_token=at_token)
    try:
        requests: list[dict[str, Any]] = [
            {"prompt": "The cat"},
            {"prompt": "A dog reads a long letter", "max_tokens": 24},
            {"prompt": f"{MARKER} A dog reads"},
            {"prompt": "Hi", "temperature": 0.9, "seed": 5},
            {"prompt": "my friend builds", "stop": ["never-appears"]},
        ]
        assert engine.generate(f"{MARKER} A dog reads", max_tokens=16, temperature=0).completion_tokens > FAULT_AT
        expected = [engine.generate(**{**_DEFAULTS, **r}) if MARKER not in r["prompt"] else None for r in requests]
        with caplog.at_level("WARNING", logger="serving.engine"):
            results = _submit_together(faulty_engine, requests)
    finally:
        faulty_engine._fault = FaultInjection(prompt_marker=MARKER, at_token=FAULT_AT)
    # The batched forward pass failed (all five rows in it), then each row ran alone: only the marked one failed.
    assert f"of {len(requests)} " in caplog.text and "retrying each" in caplog.text
    for request, want, got in zip(requests, expected, results, strict=True):
        if want is None:
            assert isinstance(got, InjectedFault), got
        else:
            assert got == want, request  # same text, token counts and finish reason as alone
    # The engine keeps serving: nothing is left in its batch, and a new request runs.
    assert faulty_engine.generate("The cat", max_tokens=4, temperature=0) == engine.generate(
        "The cat", max_tokens=4, temperature=0
    )


def test_a_sampling_error_fails_only_its_row(faulty_engine: TorchEngine, engine: TorchEngine) -> None:
    def broken_sampler(input_ids: Any, scores: Any) -> Any:
        raise RuntimeError("probability tensor contains inf or nan")

    requests: list[dict[str, Any]] = [
        {"prompt": "The cat"},
        {"prompt": "Hi", "temperature": 0.7, "seed": 1},
        {"prompt": "A dog reads", "temperature": 0.7, "seed": 2},
    ]
    results = _submit_together(
        faulty_engine, requests, prepare=lambda seqs: setattr(seqs[1], "warpers", broken_sampler)
    )
    assert isinstance(results[1], RuntimeError) and "inf or nan" in str(results[1])
    assert results[0] == engine.generate(**{**_DEFAULTS, **requests[0]})
    assert results[2] == engine.generate(**{**_DEFAULTS, **requests[2]})


def test_siblings_of_a_failed_choice_are_cancelled(faulty_engine: TorchEngine, engine: TorchEngine) -> None:
    class Recording:
        """The real engine; each stream records how it ended: its result, an error, or closed by the caller."""

        def __init__(self, inner: TorchEngine) -> None:
            self.inner, self.ended = inner, []
            self.context_length, self.count_tokens = inner.context_length, inner.count_tokens

        def queue_depth(self) -> int:
            return self.inner.queue_depth()

        async def stream(self, prompt: str, **kwargs: Any) -> Any:
            how = "closed"
            try:
                async for item in self.inner.stream(prompt, **kwargs):
                    if isinstance(item, GenerationResult):
                        how = "result"
                    yield item
            except Exception:
                how = "error"
                raise
            finally:
                self.ended.append((prompt, how))

    sibling = "A dog reads a long letter"
    assert engine.generate(sibling, max_tokens=120, temperature=0).completion_tokens > 20  # outlives the fault
    recording = Recording(faulty_engine)
    service = OpenAIService({MODEL: recording}, max_tokens_limit=120)  # type: ignore[dict-item]
    prompts = [f"{MARKER} A dog reads", sibling]
    request = CompletionRequest(model=MODEL, prompt=prompts, n=2, max_tokens=120, temperature=0)
    with pytest.raises(APIError) as info:
        asyncio.run(service.complete(request))
    assert info.value.status_code == 500
    # The first failure stopped every other choice: the other prompt's two, and the marked prompt's second unless
    # it failed in the same step. None ran on to its result.
    ended = sorted(recording.ended)
    assert [how for prompt, how in ended if prompt == sibling] == ["closed", "closed"], ended
    marked = [how for prompt, how in ended if prompt == prompts[0]]
    assert "error" in marked and set(marked) <= {"error", "closed"} and len(marked) == 2, ended


def test_a_stream_that_fails_midway_ends_with_an_error_event_and_is_reported(
    faulty_engine: TorchEngine, caplog: pytest.LogCaptureFixture
) -> None:
    service = OpenAIService({MODEL: faulty_engine}, max_tokens_limit=32)
    messages = [{"role": "user", "content": f"{MARKER} A dog reads"}]
    request = ChatCompletionRequest(model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True)
    errors: list[APIError] = []

    async def collect() -> list[str]:
        return [chunk async for chunk in service.chat_stream(request, on_error=errors.append)]

    with caplog.at_level("ERROR", logger="serving.service"):
        text = "".join(asyncio.run(collect()))
    events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert "[DONE]" not in events
    assert json.loads(events[-1])["error"]["type"] == "server_error"
    assert [e.status_code for e in errors] == [500]  # what the HTTP layer counts the request as
    assert "failed after it started" in caplog.text


# ----------------------------------------------------------------------------------- service (in-process)


def test_validation_errors_name_the_param() -> None:
    cases = {
        "temperature": {"model": MODEL, "prompt": "x", "temperature": 2.5},
        "top_p": {"model": MODEL, "prompt": "x", "top_p": 0},
        "prompt": {"model": MODEL, "prompt": [[1, "2"]]},
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


def _assert_validation_errors_declared_as_400(doc: dict[str, Any]) -> None:
    """No operation declares FastAPI's 422; the ones that validate input declare the 400 they answer with."""
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (path, method)
    for path in ("/v1/completions", "/v1/chat/completions"):
        bad = doc["paths"][path]["post"]["responses"]["400"]
        assert bad["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    schemas = doc["components"]["schemas"]
    assert not {"HTTPValidationError", "ValidationError"} & set(schemas)
    assert set(schemas["ErrorResponse"]["properties"]) == {"error"}
    assert {"message", "type", "param", "code"} == set(schemas["ErrorDetail"]["properties"])


class Body(BaseModel):
    """A request body for a bare FastAPI route (module level: this file's annotations are strings)."""

    n: int


def test_openapi_declares_400_for_invalid_requests_not_fastapis_422() -> None:
    from fastapi import FastAPI

    from serving.app import _declare_validation_errors_as_400, api

    try:
        doc = api.openapi()
        _assert_validation_errors_declared_as_400(doc)
    finally:
        api.openapi_schema = None  # the document depends on the replica's auth: leave it uncached

    # A route that declares no error responses of its own gets the 400 and its schema too.
    bare = FastAPI()

    @bare.post("/n")
    def n(body: Body) -> int:
        return body.n

    doc = bare.openapi()
    assert "422" in doc["paths"]["/n"]["post"]["responses"]  # FastAPI's default, which this server never answers
    _declare_validation_errors_as_400(doc)
    responses = doc["paths"]["/n"]["post"]["responses"]
    assert set(responses) == {"200", "400"}
    assert responses["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert set(doc["components"]["schemas"]) == {"Body", "ErrorResponse", "ErrorDetail"}
    assert doc["components"]["schemas"]["ErrorResponse"]["properties"]["error"] == {
        "$ref": "#/components/schemas/ErrorDetail"
    }


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


def test_the_http_port_is_served_by_haproxy_straight_to_the_replica(http: httpx.Client, serve_port: int) -> None:
    """raytrain's default Serve ingress (`cluster.serve_ingress: haproxy`): the process listening on the HTTP port
    is HAProxy, not Serve's Python proxy, and the replica itself listens on a direct-ingress port of its own."""
    import psutil

    listeners = {c.laddr.port: c.pid for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
    assert serve_port in listeners, f"nothing listens on {serve_port}"
    assert psutil.Process(listeners[serve_port]).name() == "haproxy"
    replica_ports = [p for p, pid in listeners.items() if 30000 <= p < 31000 and pid and f"ServeReplica:{APP_NAME}:" in
                     " ".join(psutil.Process(pid).cmdline())]
    assert replica_ports, "no replica listens on a direct-ingress port"
    direct = httpx.get(f"http://127.0.0.1:{replica_ports[0]}/health", headers=http.headers, timeout=30)
    assert direct.status_code == 200 and direct.json()["models"] == [MODEL]
    assert http.get("/health").status_code == 200


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
        "token_id_prompt": {"model": MODEL, "prompt": [1, 2, 10**9]},  # token-id prompts work; unknown ids do not
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
    _assert_validation_errors_declared_as_400(doc)  # what the replica serves, not only the module's `api`
    invalid = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "temperature": 9})
    assert str(invalid.status_code) in doc["paths"]["/v1/completions"]["post"]["responses"]
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

        # Other apps of this Ray session (e.g. the job-spec auth test's demo-lm) export the same metric: select ours.
        ours = f'model="{MODEL}",route="/v1/completions",status="200"'
        # A new counter's first export goes through Ray's metrics agent on its own schedule: on a loaded 2-core CI
        # machine it once took over 60 s to reach the scrape (the same test alone: 45 s in all).
        ok = _prom_query(prom, "ray_raytrain_serve_requests_total{" + ours + "}", timeout_s=150)
        assert ok and float(ok[0]["value"][1]) >= 1, (tmp_path / "prometheus.log").read_text()[-2000:]
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
def fuzz_spec(model_dir: Path, keys_file: Path, serve_port: int) -> JobSpec:
    # What `raytrain serve` deploys for a spec with keys: tiny limits, so that the largest valid request the fuzzer
    # can build (32 prompts x 8 choices) still finishes in a fraction of a second.
    serve = {
        "model_path": str(model_dir),
        "port": serve_port,
        "app_name": FUZZ_APP,
        "route_prefix": "/fuzz",
        "max_tokens_limit": 2,
        "auth": {"enabled": True, "keys_file": str(keys_file)},
    }
    return JobSpec.model_validate({"model": {"name": MODEL}, "serve": serve})


@pytest.fixture(scope="module")
def fuzz_url(fuzz_spec: JobSpec, base_url: str) -> Iterator[str]:
    from ray import serve

    from raytrain.deploy import deploy

    url = deploy(fuzz_spec, timeout_s=180)
    try:
        yield url
    finally:
        serve.delete(FUZZ_APP)


def test_serve_auth_from_the_job_spec_is_enforced_and_used_by_the_pipeline_request(
    fuzz_spec: JobSpec, fuzz_url: str
) -> None:
    from raytrain.deploy import client_api_key, complete

    key = client_api_key(fuzz_spec)  # what the pipeline's demo request sends: read from the same keys file
    assert key == API_KEY
    reply = complete(fuzz_url, MODEL, "The cat", 2, api_key=key)
    assert reply["object"] == "text_completion" and reply["usage"]["completion_tokens"] <= 2
    for wrong in (None, "sk-wrong"):
        with pytest.raises(RuntimeError, match="HTTP 401"):
            complete(fuzz_url, MODEL, "The cat", 2, api_key=wrong)
    assert httpx.get(f"{fuzz_url}/ready", timeout=30).status_code == 200  # probes need no key


def test_fuzzing_the_openapi_document_with_auth_on_finds_no_server_errors(fuzz_url: str) -> None:
    # schemathesis reads the security scheme from the served document and puts the key on every operation that
    # declares it; a document without the scheme would leave valid requests without a key, and they would get 401.
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.config import SchemathesisConfig
    from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

    doc = httpx.get(f"{fuzz_url}/openapi.json", timeout=30).json()
    config = SchemathesisConfig.from_dict({"auth": {"openapi": {"HTTPBearer": {"bearer": API_KEY}}}})
    schema = schemathesis.openapi.from_dict(doc, config=config)
    failures: list[str] = []
    rejected: list[str] = []
    calls = {GenerationMode.POSITIVE: 0, GenerationMode.NEGATIVE: 0}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=True
            )
            def check(case: Any) -> None:
                # `mode` is this iteration's: check() runs below, before the loop moves on.
                calls[mode] += 1  # noqa: B023
                response = case.call(base_url=fuzz_url, timeout=30)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.path} {case.body!r} -> {response.status_code}")
                elif mode == GenerationMode.POSITIVE and response.status_code == 401:  # noqa: B023
                    rejected.append(f"{case.method} {case.path} {case.headers!r} -> 401")
                elif response.status_code >= 400:
                    # Every 4xx is OpenAI-shaped (negative cases include missing and malformed keys: 401).
                    assert "error" in response.json(), response.text
                # The document tells the truth: every status answered is declared (400 for invalid input, not
                # FastAPI's 422), with the body it declares.
                case.validate_response(response, checks=[status_code_conformance, response_schema_conformance])

            try:
                check()
            except Unsatisfiable:  # e.g. no invalid request exists for a route without parameters
                continue
    assert calls[GenerationMode.POSITIVE] > 25 and calls[GenerationMode.NEGATIVE] > 25, calls
    assert not failures, failures[:5]
    assert not rejected, rejected[:5]
    # The replica survived all of it.
    assert httpx.get(f"{fuzz_url}/health", timeout=30).status_code == 200


# ------------------------------------------------------------------------ one failing request among many (HTTP)


@pytest.fixture(scope="module")
def fault_url(model_dir: Path, serve_port: int, base_url: str) -> Iterator[str]:
    # An open app (auth off, the laptop default) whose engine fails the requests carrying MARKER (test-only).
    from ray import serve

    from serving.app import build_app

    app = build_app(
        {
            "models": [{"name": FAULTY_MODEL, "path": str(model_dir)}],
            "max_tokens_limit": 64,
            "num_cpus_per_replica": 0.5,
            "fault_injection": {"prompt_marker": MARKER, "at_token": FAULT_AT},
        }
    )
    serve.run(app, name=FAULT_APP, route_prefix="/faults")
    try:
        yield f"http://127.0.0.1:{serve_port}/faults"
    finally:
        serve.delete(FAULT_APP)


def test_openapi_declares_bearer_auth_exactly_when_keys_are_required(http: httpx.Client, fault_url: str) -> None:
    keyed = http.get("/openapi.json").json()
    assert keyed["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key: `Authorization: Bearer <key>`.",
    }
    for path, method in (("/v1/completions", "post"), ("/v1/chat/completions", "post"), ("/v1/models", "get")):
        assert keyed["paths"][path][method]["security"] == [{"HTTPBearer": []}], path
        assert "401" in keyed["paths"][path][method]["responses"]
    for path in ("/health", "/ready"):  # probes answer without a key, and the document says so
        assert "security" not in keyed["paths"][path]["get"]
    open_doc = httpx.get(f"{fault_url}/openapi.json", timeout=30).json()
    assert "securitySchemes" not in open_doc.get("components", {})
    operations = [op for ops in open_doc["paths"].values() for op in ops.values()]
    assert operations and all("security" not in op and "401" not in op["responses"] for op in operations)


def _sse_events(response: httpx.Response) -> list[Any]:
    return [
        "[DONE]" if line == "data: [DONE]" else json.loads(line[6:])
        for line in response.iter_lines()
        if line.startswith("data: ")
    ]


def _requests_counted(route: str, status: int) -> float:
    """`raytrain_serve_requests_total` of the fault app's model, as this node's Ray metrics endpoint exports it."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{metrics_export_port()}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "ray_raytrain_serve_requests_total"
        and sample.labels.get("model") == FAULTY_MODEL
        and sample.labels.get("route") == route
        and sample.labels.get("status") == str(status)
    )


def test_one_failing_request_fails_alone_under_concurrent_load(fault_url: str, engine: TorchEngine) -> None:
    faulty = f"{MARKER} A dog reads"
    chat_route, completions_route = "/v1/chat/completions", "/v1/completions"
    assert engine.generate(faulty, max_tokens=24, temperature=0).completion_tokens > FAULT_AT  # reaches the fault
    # (route, prompt, stream): the faulty ones among normal completions and chats, streamed and not.
    jobs = [(completions_route, p, s) for p in ("The cat", "A dog reads a long letter", "Hi") for s in (False, True)]
    jobs += [(chat_route, "The river finds", False), (chat_route, "The teacher writes", True)]
    jobs += [(completions_route, faulty, False), (chat_route, faulty, True)]

    def run(job: tuple[str, str, bool]) -> tuple[int, Any]:
        route, prompt, stream = job
        body: dict[str, Any] = {"model": FAULTY_MODEL, "max_tokens": 24, "temperature": 0, "stream": stream}
        if route == chat_route:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        with httpx.Client(timeout=120) as c:
            if not stream:
                r = c.post(f"{fault_url}{route}", json=body)
                return r.status_code, r.json()
            with c.stream("POST", f"{fault_url}{route}", json=body) as r:
                return r.status_code, _sse_events(r)

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(run, jobs))

    for (route, prompt, stream), (status, body) in zip(jobs, answers, strict=True):
        if prompt == faulty:
            continue
        assert status == 200, (route, prompt, body)
        messages = [{"role": "user", "content": prompt}]
        want = engine.generate(
            engine.apply_chat_template(messages) if route == chat_route else prompt, max_tokens=24, temperature=0
        ).text
        if not stream:
            choice = body["choices"][0]
            got = choice["message"]["content"] if route == chat_route else choice["text"]
        else:
            assert body[-1] == "[DONE]", body[-3:]
            key = (lambda c: c["delta"].get("content") or "") if route == chat_route else (lambda c: c["text"])
            got = "".join(key(c) for event in body[:-1] for c in event["choices"])
        assert got == want, (route, prompt, stream)

    status, body = answers[-2]  # not streamed: an OpenAI-style 500 that hides the internals
    assert status == 500 and body["error"]["type"] == "server_error", body
    assert "injected" not in body["error"]["message"]
    status, events = answers[-1]  # streamed: 200 was sent, text followed, then the error as the last event
    assert status == 200 and "[DONE]" not in events
    assert events[-1]["error"]["type"] == "server_error"
    assert any(c["delta"].get("content") for e in events[:-1] for c in e["choices"]), "failed before any text"

    # The metrics count the failed stream as a 500, not as the 200 its status line said.
    expected = {(completions_route, 200): 6, (completions_route, 500): 1, (chat_route, 200): 2, (chat_route, 500): 1}
    deadline = time.monotonic() + 60
    while (counted := {k: _requests_counted(*k) for k in expected}) != expected and time.monotonic() < deadline:
        time.sleep(1)
    assert counted == expected
