"""The completions endpoint as evaluation harnesses use it: log-probabilities, echo, token-id prompts, the tokenizer
routes, and EleutherAI's lm-evaluation-harness scoring the served model exactly as it scores the checkpoint in-process.

One Serve app for the module, with API keys on (every route here must work behind them), serving the tiny Llama of
`serving_fixtures`. Reference numbers come from transformers on the same model directory, computed here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving_fixtures import build_tiny_model_dir, serve_session

MODEL = "tiny-lmeval"
APP_NAME = "serving-lmeval"
ROUTE = "/lmeval"
CONTEXT = 256
API_KEY = "sk-lmeval-" + "fedcba9876543210" * 2
VERSION, ALIAS = "v7", "champion"
TEXT = "The cat reads a book today. A dog watches the stars at night."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("lmeval-model"), max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> tuple[Any, Any]:
    """transformers' own tokenizer and model on the same directory, in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return AutoTokenizer.from_pretrained(model_dir), model


def _log_softmax(model: Any, ids: list[int]) -> Any:
    """(len(ids), vocab) float32 log-probabilities: row i is the distribution of the token after ids[i]."""
    import torch

    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


@pytest.fixture(scope="module")
def base_url(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve

    from serving.app import build_app

    keys = tmp_path_factory.mktemp("lmeval-secret") / "keys"
    keys.write_text(f"{API_KEY}\n")
    with serve_session(num_cpus=4) as port:
        app = build_app(
            {
                "models": [{"name": MODEL, "path": str(model_dir), "version": VERSION, "alias": ALIAS}],
                "max_tokens_limit": 64,
                "auth": {"enabled": True, "keys_file": str(keys)},
                "num_cpus_per_replica": 0.5,
            }
        )
        serve.run(app, name=APP_NAME, route_prefix=ROUTE)
        try:
            yield f"http://127.0.0.1:{port}{ROUTE}"
        finally:
            serve.delete(APP_NAME)


@pytest.fixture(scope="module")
def client(base_url: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


def _assert_prompt_scored(logprobs: Any, ids: list[int], model: Any, k: int) -> None:
    """The first len(ids) entries score the prompt: first null, the rest transformers' log-softmax (1e-4)."""
    want = _log_softmax(model, ids)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for i in range(1, len(ids)):
        got = logprobs.token_logprobs[i]
        assert got == pytest.approx(float(want[i - 1, ids[i]]), abs=1e-4), i
        top = logprobs.top_logprobs[i]
        # The k most likely (by transformers) and the chosen token itself.
        assert 1 <= len(top) <= k + 1 and top[logprobs.tokens[i]] == pytest.approx(got, abs=1e-6)
        assert max(top.values()) == pytest.approx(float(want[i - 1].max()), abs=1e-4)


# --------------------------------------------------------------------------------------------- completions


def test_echo_with_max_tokens_0_scores_the_prompt(client: Any, reference: tuple[Any, Any]) -> None:
    tok, model = reference
    resp = client.completions.create(model=MODEL, prompt=TEXT, echo=True, logprobs=1, max_tokens=0)
    (choice,) = resp.choices
    ids = tok(TEXT)["input_ids"]
    assert choice.text == TEXT and choice.finish_reason == "length"
    assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == TEXT
    assert lp.tokens == [tok.decode([i]) for i in ids]
    _assert_prompt_scored(lp, ids, model, k=1)
    # Offsets: where each token starts in the text.
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(ids))]


def test_token_id_batch_prompt_scores_prompts_and_generated_tokens(client: Any, reference: tuple[Any, Any]) -> None:
    tok, model = reference
    prompts = [tok("The cat reads")["input_ids"], tok("A small robot builds a song")["input_ids"]]
    resp = client.completions.create(
        model=MODEL, prompt=prompts, echo=True, logprobs=3, max_tokens=2, temperature=0, n=2
    )
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]  # prompt k's choices are 2k, 2k+1
    assert resp.usage.prompt_tokens == sum(len(p) for p in prompts)  # counted once per prompt, as OpenAI
    for choice in resp.choices:
        ids = prompts[choice.index // 2]
        lp = choice.logprobs
        assert choice.text.startswith(tok.decode(ids))
        assert len(lp.tokens) == len(ids) + 2  # the prompt, then every generated token
        _assert_prompt_scored(lp, ids, model, k=3)
        # Greedy: each generated token is transformers' argmax after what precedes it, with its log-probability.
        seq = list(ids)
        for j in range(2):
            dist = _log_softmax(model, seq)[-1]
            best = int(dist.argmax())
            assert lp.tokens[len(ids) + j] == tok.decode([best])
            assert lp.token_logprobs[len(ids) + j] == pytest.approx(float(dist[best]), abs=1e-4)
            assert 1 <= len(lp.top_logprobs[len(ids) + j]) <= 4  # texts of two ids can coincide (split UTF-8)
            seq.append(best)


def test_single_token_id_prompt_without_echo(client: Any, reference: tuple[Any, Any]) -> None:
    tok, _ = reference
    ids = tok("The cat reads")["input_ids"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0, logprobs=0)
    by_text = client.completions.create(model=MODEL, prompt="The cat reads", max_tokens=6, temperature=0)
    (a,), (b,) = by_ids.choices, by_text.choices
    assert a.text == b.text and a.index == 0
    assert len(a.logprobs.tokens) == by_ids.usage.completion_tokens  # generated tokens only, no prompt
    assert all(len(top) == 1 for top in a.logprobs.top_logprobs)  # logprobs=0: the chosen token alone
    assert b.logprobs is None  # not asked for


def test_streamed_logprobs_add_up_to_the_unstreamed(client: Any) -> None:
    args = {"model": MODEL, "prompt": "A dog reads", "echo": True, "logprobs": 2, "max_tokens": 8, "temperature": 0}
    whole = client.completions.create(**args).choices[0]
    text, tokens, lps, tops, offsets = "", [], [], [], []
    for chunk in client.completions.create(**args, stream=True):
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                lps += choice.logprobs.token_logprobs
                tops += choice.logprobs.top_logprobs
                offsets += choice.logprobs.text_offset
    assert text == whole.text
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    assert lps == whole.logprobs.token_logprobs and tops == whole.logprobs.top_logprobs


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens", "echo"),
        ({"prompt": "hi", "logprobs": 21, "echo": True}, "logprobs", "20"),
        ({"prompt": "hi", "logprobs": -1}, "logprobs", ""),
        ({"prompt": [[5, 6], [7, 99_999]], "echo": True, "max_tokens": 0}, "prompt", "prompt[1][1]"),
        ({"prompt": [5, 6, 99_999]}, "prompt", "prompt[2]"),
        ({"prompt": [5, -6]}, "prompt", "prompt[1]"),
        ({"prompt": [5, "six"]}, "prompt", "mix"),
        ({"prompt": [[]]}, "prompt", "empty"),
        ({"prompt": [True, False]}, "prompt", "prompt[0]"),
    ],
)
def test_bad_scoring_requests_get_openai_400s(
    http: httpx.Client, body: dict[str, Any], param: str, needle: str
) -> None:
    r = http.post("/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert needle in error["message"], error["message"]


def test_openai_client_gets_a_typed_error_for_an_unknown_token(client: Any) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=[1, 2, 10**9], max_tokens=1)
    assert info.value.param == "prompt" and info.value.code == "invalid_token_id"


# ------------------------------------------------------------------------------------------ models, tokenizer


def test_model_card_reports_version_alias_and_context(client: Any, http: httpx.Client) -> None:
    (card,) = list(client.models.list())
    assert card.id == MODEL
    raw = http.get("/v1/models").json()["data"][0]
    assert (raw["version"], raw["alias"], raw["max_model_len"]) == (VERSION, ALIAS, CONTEXT)


def test_tokenize_and_detokenize_round_trip(http: httpx.Client, reference: tuple[Any, Any]) -> None:
    tok, _ = reference
    text = "naïve café, the cat reads 🙂 <|im_end|>"
    r = http.post("/tokenize", json={"prompt": text, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    want = tok(text)["input_ids"]
    assert body["tokens"] == want and body["count"] == len(want) and body["max_model_len"] == CONTEXT
    assert body["token_strs"] == tok.convert_ids_to_tokens(want)
    back = http.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": tok.decode(want)} and tok.decode(want) == text
    # Chat messages are rendered with the model's template first (no special tokens added on top, as vLLM).
    messages = [{"role": "user", "content": "Hello"}]
    chat = http.post("/tokenize", json={"model": MODEL, "messages": messages}).json()
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tok(rendered, add_special_tokens=False)["input_ids"]
    assert chat["token_strs"] is None
    bare = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert tok.decode(bare["tokens"]) == tok.apply_chat_template(messages, tokenize=False)


def test_tokenizer_info_describes_the_served_tokenizer(http: httpx.Client, reference: tuple[Any, Any]) -> None:
    tok, _ = reference
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["pad_token"] == tok.pad_token
    assert info["chat_template"] == tok.chat_template and info["model_max_length"] == CONTEXT
    assert info["tokenizer_class"] == type(tok).__name__
    assert not any("path" in key or key.endswith("_file") for key in info)  # nothing about the replica's disk
    assert http.get("/tokenizer_info", params={"model": MODEL}).json() == info


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param"),
    [
        ("POST", "/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400, "messages"),
        ("POST", "/tokenize", {"model": MODEL}, 400, "messages"),
        ("POST", "/tokenize", {"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
        ("POST", "/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
        ("POST", "/detokenize", {"tokens": [1, 10**6]}, 400, "tokens"),
        ("POST", "/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("POST", "/detokenize", {}, 400, "tokens"),
        ("GET", "/tokenizer_info?model=nope", None, 404, "model"),
    ],
)
def test_tokenizer_routes_reject_bad_input_like_the_rest(
    http: httpx.Client, method: str, path: str, body: Any, status: int, param: str
) -> None:
    r = http.request(method, path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_tokenizer_routes_need_the_api_key(base_url: str) -> None:
    for method, path, body in (
        ("GET", "/tokenizer_info", None),
        ("POST", "/tokenize", {"prompt": "x"}),
        ("POST", "/detokenize", {"tokens": [5]}),
    ):
        r = httpx.request(method, f"{base_url}{path}", json=body, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)


def test_openapi_documents_the_new_fields_and_routes(http: httpx.Client) -> None:
    doc = http.get("/openapi.json").json()
    assert {"/tokenize", "/detokenize", "/tokenizer_info"} <= set(doc["paths"])
    for path, method in (("/tokenize", "post"), ("/detokenize", "post"), ("/tokenizer_info", "get")):
        operation = doc["paths"][path][method]
        assert operation["security"] == [{"HTTPBearer": []}] and "400" in operation["responses"]
    fields = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert "top" in fields["logprobs"]["description"] and fields["logprobs"]["anyOf"][0]["maximum"] == 20
    assert fields["max_tokens"]["minimum"] == 0 and "echo" in fields["max_tokens"]["description"]


# ------------------------------------------------------------------------------------------- lm-eval itself


def _evaluate(model: str, model_args: str) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from raytrain.eval.tasks import DEMO_TASKS, TASKS_DIR

    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=list(DEMO_TASKS),
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
        batch_size=4,
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )


def _per_sample(results: dict[str, Any], task: str) -> list[tuple[int, Any]]:
    return sorted((s["doc_id"], s["filtered_resps"]) for s in results["samples"][task])


def test_lm_eval_scores_the_endpoint_as_it_scores_the_checkpoint(
    base_url: str, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # what local-completions sends as its Bearer key
    # The harness tokenizes through the server's /tokenize and /tokenizer_info (tokenizer_backend=remote), sends
    # token-id prompts (batched, 4 per request) and reads echo + logprobs back.
    served = _evaluate(
        "local-completions",
        f"model={MODEL},base_url={base_url}/v1/completions,tokenizer_backend=remote,tokenized_requests=True,"
        f"auth_token={API_KEY},num_concurrent=1,max_retries=1,max_length={CONTEXT}",
    )
    local = _evaluate("hf", f"pretrained={model_dir},dtype=float32,device=cpu,max_length={CONTEXT}")

    for task, metrics in (
        ("raytrain_demo_mc", ("acc,none", "acc_norm,none")),
        ("raytrain_demo_gen", ("exact_match,none",)),
    ):
        for metric in metrics:
            assert served["results"][task][metric] == pytest.approx(local["results"][task][metric], abs=1e-3)
    # Per sample: every choice's log-likelihood, and every greedy generation.
    mc_served, mc_local = _per_sample(served, "raytrain_demo_mc"), _per_sample(local, "raytrain_demo_mc")
    assert len(mc_served) == len(mc_local) == 20
    for (doc_a, resps_a), (doc_b, resps_b) in zip(mc_served, mc_local, strict=True):
        assert doc_a == doc_b and len(resps_a) == len(resps_b) == 4
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip(resps_a, resps_b, strict=True):
            assert math.isfinite(ll_a) and ll_a == pytest.approx(ll_b, abs=1e-3), (doc_a, ll_a, ll_b)
            assert greedy_a == greedy_b
    gen_served, gen_local = _per_sample(served, "raytrain_demo_gen"), _per_sample(local, "raytrain_demo_gen")
    assert len(gen_served) == 20 and gen_served == gen_local, json.dumps([gen_served[:3], gen_local[:3]])
