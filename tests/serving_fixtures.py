"""Helpers for serving tests: a tiny real Hugging Face model directory and a Ray Serve session.

Plain functions, not pytest fixtures, so any test module can build on them without a shared conftest.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as raytrain's exported tokenizers carry it (raytrain.data.tokenizer.CHAT_TEMPLATE).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SUBJECTS = ["the cat", "a dog", "the model", "our cluster", "the teacher", "a small robot", "the river", "my friend"]
_VERBS = ["reads", "trains", "watches", "serves", "writes", "finds", "likes", "builds"]
_OBJECTS = ["a book", "the data", "many tokens", "the garden", "a long letter", "fresh bread", "the stars", "a song"]
_ENDINGS = ["today.", "every morning.", "in the rain.", "with care.", "before noon.", "at night.", "again.", "quickly."]


def tiny_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Generated sentences: enough variety for a byte-level BPE to learn a few hundred merges."""
    rng = random.Random(seed)
    return [
        f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}"
        for _ in range(n)
    ]


def build_tiny_model_dir(
    out_dir: str | Path, max_position_embeddings: int = 256, seed: int = 0, chat_template: bool = True
) -> Path:
    """Write a randomly initialised 2-layer Llama + trained byte-level BPE tokenizer, as training exports them."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tiny_corpus(seed=seed), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>")
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=len(tok),
        max_position_embeddings=max_position_embeddings,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    return out


def free_port() -> int:
    """A TCP port nobody listens on right now (bound and released; good enough for a test's HTTP proxy)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve_session(num_cpus: int = 4) -> Iterator[int]:
    """Ray + Serve for a test module; yields the HTTP proxy's port and stops only what it started.

    Other test modules may already have started Ray (and even Serve) in this pytest session: reuse them
    rather than fight over one driver, and leave them running for their owners.
    """
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    started_ray = not ray.is_initialized()
    # ray.init() turns token auth on by exporting RAY_AUTH_MODE=token into this process, where it outlives
    # ray.shutdown() and would leak into `ray start` / `ray job submit` subprocesses of later tests.
    env_before = {k: v for k, v in os.environ.items() if k.startswith("RAY_")}
    if started_ray:
        # address="local" starts a fresh instance even when RAY_ADDRESS points elsewhere; no dashboard
        # because nothing here needs its REST API, and it is the slowest part of a 2-core start.
        # Custom metrics reach the node's export port every report interval (10 s by default); 1 s keeps the
        # Prometheus test short. Ray reads RAY_<config> variables when the local instance starts.
        os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
        # Serve's ingress as raytrain's embedded instance has it by default (HAProxy), so these tests run the
        # path a pipeline's serve stage takes.
        from raytrain.cluster import use_serve_ingress

        use_serve_ingress("haproxy")
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    client = _get_global_client(raise_if_no_controller_running=False)
    started_serve = client is None
    if started_serve:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    else:
        port = int(client.http_config.port)
    try:
        yield port
    finally:
        if started_serve:
            serve.shutdown()
        if started_ray:
            ray.shutdown()
            for key in [k for k in os.environ if k.startswith("RAY_") and k not in env_before]:
                del os.environ[key]
            os.environ.update(env_before)


def metrics_export_port() -> int:
    """The port where this node's Ray metrics agent serves Prometheus text (custom and Serve metrics)."""
    import ray

    return int(ray._private.worker.global_worker.node.metrics_export_port)
