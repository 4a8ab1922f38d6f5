"""`raytrain bench serve`: the serving app over HTTP vs the same engine called in-process.

For each concurrency level (default 1, 4, 16) the same prompts run twice, alternating: through the Ray Serve app
(HTTP proxy → replica → engine, streamed, as an OpenAI client sees it) and straight through the engine in this
process. Both report requests/s, completion tokens/s, p50/p99 latency and time to first token; the ratio
HTTP/in-process at each level is the cost of the serving stack: each round pairs one run of each side, back to back,
and the headline is the median of the rounds' ratios (`--rounds 3` or more). Both sides use the same number of torch
threads (the replica gets `--threads` CPUs, which Ray turns into its OMP_NUM_THREADS).

Without `--model` a randomly initialised model of a named preset is built in a temp dir with a tokenizer trained
on generated text (same shapes as training exports; output text is meaningless, work per token is real).

    raytrain bench serve --preset small --requests 64 --max-tokens 64 --out bench-serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_WORDS = "the a cluster model river teacher robot reads trains serves writes data tokens garden letter song".split()


def _prompts(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(words)).capitalize() + "." for _ in range(n)]


def build_random_model(out_dir: Path, preset: str, context: int = 1024, seed: int = 0) -> Path:
    """A random-weight Llama of `preset` with a byte-level BPE tokenizer, written like a training export."""
    from raytrain.data.tokenizer import EOS, PAD, train_tokenizer
    from raytrain.models.presets import build_config, build_model

    tok_dir = train_tokenizer(_prompts(2000, 12, seed), vocab_size=2048, min_frequency=2, out_dir=out_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    config = build_config(
        preset,
        vocab_size=len(tok),
        max_position_embeddings=context,
        eos_token_id=tok.convert_tokens_to_ids(EOS),
        pad_token_id=tok.convert_tokens_to_ids(PAD),
    )
    build_model(config, seed).save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def _summary(latencies: list[float], ttfts: list[float], tokens: int, wall: float) -> dict[str, float]:
    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {
        "requests": len(latencies),
        "wall_s": round(wall, 4),
        "requests_per_s": round(len(latencies) / wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "completion_tokens": tokens,
        "latency_p50_s": round(statistics.median(latencies), 4),
        "latency_p99_s": round(pct(latencies, 0.99), 4),
        "ttft_p50_s": round(statistics.median(ttfts), 4),
        "ttft_p99_s": round(pct(ttfts, 0.99), 4),
    }


async def _run_inprocess(engine: Any, prompts: list[str], concurrency: int, max_tokens: int) -> dict[str, float]:
    from serving.engine import GenerationResult

    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    ttfts: list[float] = []
    tokens = 0

    async def one(prompt: str) -> None:
        nonlocal tokens
        async with sem:
            start = time.perf_counter()
            first = None
            async for item in engine.stream(prompt, max_tokens=max_tokens, temperature=0):
                if first is None:
                    first = time.perf_counter() - start
                if isinstance(item, GenerationResult):
                    tokens += item.completion_tokens
            latencies.append(time.perf_counter() - start)
            ttfts.append(first or 0.0)

    start = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    return _summary(latencies, ttfts, tokens, time.perf_counter() - start)


class _HTTPFailure(Exception):
    """A benchmark request answered with a status other than 200."""


@contextlib.asynccontextmanager
async def _sse_post(client: str, url: str, concurrency: int) -> AsyncIterator[Callable[[dict], AsyncIterator[str]]]:
    """A function that POSTs a JSON body to `url` and yields the response's lines, over one pooled client session.
    `client`: aiohttp or httpx."""
    if client == "httpx":
        import httpx

        limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
        async with httpx.AsyncClient(timeout=600, limits=limits) as session:

            async def httpx_lines(body: dict) -> AsyncIterator[str]:
                async with session.stream("POST", url, json=body) as r:
                    if r.status_code != 200:
                        raise _HTTPFailure
                    async for line in r.aiter_lines():
                        yield line

            yield httpx_lines
        return
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def aiohttp_lines(body: dict) -> AsyncIterator[str]:
            async with session.post(url, json=body) as r:
                if r.status != 200:
                    raise _HTTPFailure
                async for raw in r.content:  # one line at a time
                    yield raw.decode().rstrip("\r\n")

        yield aiohttp_lines


async def _run_http(
    url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int, client: str = "aiohttp"
) -> dict[str, float]:
    """Stream completions over HTTP with `concurrency` in flight, parsing every server-sent event as an OpenAI
    client does. `client`: aiohttp (the default; what vLLM's serving benchmark uses, light on the CPU the server
    shares here) or httpx (what the `openai` package is built on)."""
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    ttfts: list[float] = []
    tokens = 0
    errors = 0

    async def one(post: Callable[[dict], AsyncIterator[str]], prompt: str) -> None:
        nonlocal tokens, errors
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with sem:
            start = time.perf_counter()
            first = None
            try:
                async for line in post(body):
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    if first is None:
                        first = time.perf_counter() - start
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens += chunk["usage"]["completion_tokens"]
            except _HTTPFailure:
                errors += 1
                return
            latencies.append(time.perf_counter() - start)
            ttfts.append(first or 0.0)

    async with _sse_post(client, f"{url}/v1/completions", concurrency) as post:
        start = time.perf_counter()
        await asyncio.gather(*(one(post, p) for p in prompts))
        wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{errors} HTTP requests failed during the benchmark")
    return _summary(latencies, ttfts, tokens, wall)


def _ingress_in_env() -> str:
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        return "haproxy"
    return "proxy-grpc" if os.environ.get("RAY_SERVE_PROXY_USE_GRPC") == "1" else "proxy"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("raytrain", "ray", "torch", "transformers", "fastapi", "httpx"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def run(
    model: str | None = None,
    *,
    preset: str = "small",
    concurrency: tuple[int, ...] = (1, 4, 16),
    requests: int = 32,
    max_tokens: int = 32,
    prompt_words: int = 24,
    threads: int = 1,
    max_batch_size: int = 16,
    device: str = "cpu",
    rounds: int = 1,
    ingress: str = "haproxy",
    client: str = "aiohttp",
    stream_interval_s: float | None = None,
) -> dict[str, Any]:
    """Run the sweep and return every figure (the JSON the CLI writes)."""
    import ray
    import torch
    from ray import serve

    from serving.app import build_app
    from serving.engine import TorchEngine

    torch.set_num_threads(threads)
    tmp = tempfile.TemporaryDirectory(prefix="raytrain-bench-serve-")
    try:
        path = model or str(build_random_model(Path(tmp.name) / "model", preset))
        prompts = _prompts(requests, prompt_words, seed=1)
        engine = TorchEngine(path, device=device, max_batch_size=max_batch_size)

        started_ray = not ray.is_initialized()
        if started_ray:
            # Cluster settings, read by Serve's processes when they start (in the cluster started below, which
            # inherits this process's environment); a cluster started elsewhere keeps its nodes' settings.
            from raytrain.cluster import use_serve_ingress

            use_serve_ingress("proxy" if ingress == "proxy-grpc" else ingress)
            if ingress == "proxy-grpc":
                os.environ["RAY_SERVE_PROXY_USE_GRPC"] = "1"
            ray.init(address="local", num_cpus=max(4, threads + 2), include_dashboard=False, logging_level="WARNING")
        from ray._common.network_utils import find_free_port

        port = find_free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(
            {
                "models": [{"name": "bench", "path": path}],
                "max_tokens_limit": max_tokens,
                "num_cpus_per_replica": threads,
                "num_gpus_per_replica": 1 if device == "cuda" else 0,
                "device": device,
                "max_batch_size": max_batch_size,
                "max_ongoing_requests": max(concurrency) * 2,
                "target_ongoing_requests": max(concurrency),
                **({} if stream_interval_s is None else {"stream_interval_s": stream_interval_s}),
            }
        )
        serve.run(app, name="bench-serve", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        # Warm both sides (first forward passes allocate; the first HTTP request opens connections).
        asyncio.run(_run_inprocess(engine, prompts[:2], 2, 4))
        asyncio.run(_run_http(url, "bench", prompts[:2], 2, 4, client))

        results = []
        for c in concurrency:
            http_runs, local_runs = [], []
            loads: list[float | None] = []
            for r in range(rounds):
                loads.append(round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None)
                # Alternate which side goes first: drift on a shared machine then hits both alike.
                order = ("http", "local") if r % 2 == 0 else ("local", "http")
                for side in order:
                    if side == "http":
                        http_runs.append(asyncio.run(_run_http(url, "bench", prompts, c, max_tokens, client)))
                    else:
                        local_runs.append(asyncio.run(_run_inprocess(engine, prompts, c, max_tokens)))
            http = max(http_runs, key=lambda x: x["requests_per_s"])
            local = max(local_runs, key=lambda x: x["requests_per_s"])
            # Each round's own pair (HTTP and in-process ran back to back, so drift hits both alike). The headline is
            # the median of these paired ratios: a best-of-each-side ratio compares rounds run at different moments,
            # and one fast round on either side (the in-process side moves more: 29-36 requests/s in one run against
            # 24.4-24.9 over HTTP) swings it; it is kept beside it.
            per_round = [
                {
                    "round": r,
                    "http_requests_per_s": h["requests_per_s"],
                    "in_process_requests_per_s": loc["requests_per_s"],
                    "ratio_requests_per_s": round(h["requests_per_s"] / loc["requests_per_s"], 3),
                    "http_ttft_p50_s": h["ttft_p50_s"],
                    "in_process_ttft_p50_s": loc["ttft_p50_s"],
                    "load_average_1m_at_start": load,
                }
                for r, (h, loc, load) in enumerate(zip(http_runs, local_runs, loads, strict=True))
            ]
            ratios = [x["ratio_requests_per_s"] for x in per_round]
            row = {
                "concurrency": c,
                "http": http,
                "in_process": local,
                "ratio_requests_per_s": round(statistics.median(ratios), 3),
                "ratio_best_of_each_side": round(http["requests_per_s"] / local["requests_per_s"], 3),
                "ratio_tokens_per_s_best_of_each_side": round(
                    http["tokens_per_s"] / max(local["tokens_per_s"], 1e-9), 3
                ),
                "rounds": per_round,
                "round_ratio_min": min(ratios),
                "round_ratio_median": round(statistics.median(ratios), 3),
                "round_ratio_max": max(ratios),
            }
            logger.info(
                "concurrency %d: HTTP/in-process = %.2f (median of the rounds' paired ratios; best of each side "
                "%.2f); per round %s (spread %.2f-%.2f); TTFT p50 %.0f ms HTTP vs %.0f ms in-process; "
                "load average %.2f",
                c,
                row["ratio_requests_per_s"],
                row["ratio_best_of_each_side"],
                " / ".join(f"{x:.2f}" for x in ratios),
                min(ratios),
                max(ratios),
                http["ttft_p50_s"] * 1000,
                local["ttft_p50_s"] * 1000,
                os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
            )
            results.append(row)
        serve.delete("bench-serve")
        if started_ray:
            serve.shutdown()
            ray.shutdown()
        return {
            "benchmark": "serve",
            "machine": _machine(),
            "versions": _versions(),
            "params": {
                "model": model or f"random {preset} preset",
                "requests_per_level": requests,
                "max_tokens": max_tokens,
                "prompt_words": prompt_words,
                "threads": threads,
                "max_batch_size": max_batch_size,
                "device": device,
                "rounds": rounds,
                "temperature": 0,
                "http_client": client,
                "stream_interval_s": stream_interval_s if stream_interval_s is not None else "the app's default",
                # What the started instance's processes read (an exported RAY_SERVE_ENABLE_HA_PROXY wins).
                "serve_ingress": _ingress_in_env() if started_ray else "the connected cluster's setting",
            },
            "results": results,
        }
    finally:
        tmp.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raytrain bench serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Exported model directory (default: a random model of --preset).")
    parser.add_argument("--preset", default="small", help="Model preset when --model is not given (tiny, small …).")
    parser.add_argument("--concurrency", default="1,4,16", help="Comma-separated concurrency levels.")
    parser.add_argument("--requests", type=int, default=32, help="Requests per level and side.")
    parser.add_argument("--max-tokens", type=int, default=32, help="Completion tokens per request.")
    parser.add_argument("--prompt-words", type=int, default=24, help="Words per prompt.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side (CPUs for the replica).")
    parser.add_argument("--max-batch-size", type=int, default=16, help="Engine batch size, both sides.")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=1, help="Alternating rounds per level; the best is kept.")
    parser.add_argument(
        "--ingress",
        default="haproxy",
        choices=["haproxy", "proxy", "proxy-grpc"],
        help="Serve's HTTP ingress on the Ray instance the benchmark starts: haproxy (raytrain's default, "
        "cluster.serve_ingress), proxy (Serve's Python proxy actor) or proxy-grpc (that proxy streaming from the "
        "replica over gRPC, RAY_SERVE_PROXY_USE_GRPC=1).",
    )
    parser.add_argument(
        "--client",
        default="aiohttp",
        choices=["aiohttp", "httpx"],
        help="The load generator's HTTP client (it shares the machine's CPUs with the server): aiohttp, as vLLM's "
        "serving benchmark uses, or httpx, which the openai package is built on.",
    )
    parser.add_argument(
        "--stream-interval",
        type=float,
        help="The app's stream_interval_s (seconds between a stream's writes after its first). Unset: its default.",
    )
    parser.add_argument("--out", help="Write the JSON here (it is always printed).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    report = run(
        args.model,
        preset=args.preset,
        concurrency=tuple(int(c) for c in args.concurrency.split(",")),
        requests=args.requests,
        max_tokens=args.max_tokens,
        prompt_words=args.prompt_words,
        threads=args.threads,
        max_batch_size=args.max_batch_size,
        device=args.device,
        rounds=args.rounds,
        ingress=args.ingress,
        client=args.client,
        stream_interval_s=args.stream_interval,
    )
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
