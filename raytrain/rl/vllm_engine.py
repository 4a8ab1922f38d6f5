"""vLLM rollout engines for GPU clusters: the `RolloutEngine` protocol on vLLM's offline `LLM` API.

NOT RUN. raytrain's CI has no GPU and cannot install vLLM (it pins a CUDA build of torch), so nothing in this module
has ever generated a token here. What is tested (tests/test_rl_vllm.py) is what can be checked without vLLM: the
engine arguments rendered from the spec, the validation rules below, and the request building and output mapping
of :class:`VLLMRolloutEngine` against a stand-in `LLM`. The code is written against vLLM's documented API; treat
its first run on a GPU cluster as the test it has not had.

vLLM API this was written against (vllm-project/vllm sources, read at these commits; raytrain's `gpu` extra installs
`ray[llm]==2.60.0`, which pins `vllm==0.29.0`, a release whose source could not be read here, so check the names
below against the installed version before a first run):

- ``vllm/entrypoints/llm.py`` @10fdb8f0: ``LLM(model, *, tensor_parallel_size, dtype, seed, gpu_memory_utilization,
  enforce_eager, **kwargs -> EngineArgs)``; ``LLM.generate(prompts, sampling_params=[...], *, use_tqdm)`` returns one
  ``RequestOutput`` per prompt in input order; ``LLM.collective_rpc(method, timeout=None, args=(), kwargs=None)``
  (its docstring: pass control messages only, move data by another channel); ``LLM.sleep(level=1)``,
  ``LLM.wake_up(tags=None | ["weights"] | ["kv_cache"])``; ``LLM.reset_prefix_cache()``.
- ``vllm/engine/arg_utils.py`` @99d7eb5d: the ``EngineArgs`` fields :func:`engine_kwargs` renders (``model``,
  ``tensor_parallel_size``, ``gpu_memory_utilization``, ``dtype``, ``enforce_eager``, ``max_model_len``,
  ``enable_prefix_caching``, ``enable_sleep_mode``, ``seed``, ``worker_extension_cls``).
- ``vllm/v1/worker/worker_base.py`` @0243225: ``WorkerWrapperBase.init_worker`` resolves ``worker_extension_cls``
  by its qualified name, asserts that none of its non-dunder attributes already exists on the worker class, and
  appends it to the worker's bases, so ``collective_rpc("<method>")`` reaches its methods with the worker as
  ``self`` (``self.model_runner.model`` is the ``nn.Module``; see ``examples/offline_inference/rlhf_utils.py``
  @081b8e32, whose extensions call ``self.model_runner.model.load_weights(weights=[(name, tensor), ...])``).
  Newer workers have an ``update_weights`` method of their own, hence the ``raytrain_`` prefix on ours.
- ``vllm/sampling_params.py`` @db573835 (and the v0.8.3 API reference): ``SamplingParams(n, temperature, top_p,
  seed, stop_token_ids, max_tokens)``. ``vllm/v1/core/sched/utils.py`` @018d5dc7 (``check_stop``): a request stops
  when its last output token is the EOS or one of ``stop_token_ids``, and that token stays in its output ids.
- ``vllm/v1/engine/parallel_sampling.py``: with ``n > 1`` and a seed, child request j samples with ``seed + j``,
  which is raytrain's convention (response j of prompt i uses ``seeds[i] + j``); ``CompletionOutput.index`` is j.
- ``vllm/v1/serial_utils.py`` @02754b7f: arguments of ``collective_rpc`` cross from the ``LLM`` process to the
  engine-core process as msgpack, decoded there without type information, so (in that version) a tensor arrives as
  a ``(dtype, shape, buffer)`` list, not a tensor. So weights are not sent through ``collective_rpc``:
  :meth:`VLLMRolloutEngine.load_weights` writes them to one safetensors file and sends its path; every
  tensor-parallel worker (all on the engine's node) reads that file.

Determinism: the same weights, prompts and seeds give the same responses from one vLLM build on one GPU type only as
far as vLLM's kernels are batch-invariant (by default they are not: a different batch make-up can change float
rounding). Responses are not the ones :class:`~raytrain.rl.rollout.TorchRolloutEngine` samples with the same seeds
(a different sampler and random stream).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raytrain.config.schema import RLStageSpec, RolloutSpec

WORKER_EXTENSION = "raytrain.rl.vllm_engine.WeightSyncExtension"
"""`worker_extension_cls`: the qualified name vLLM's workers import (a string, as vLLM asks)."""

SYNC_METHOD = "raytrain_load_weights_from_file"
"""The extension method `collective_rpc` calls to load new weights."""

COLOCATED_MAX_MEMORY = 0.6
"""Colocated placement without sleep mode: the most of the GPU vLLM may hold. The engine keeps its share for the
whole run, so the policy (weights, gradients, optimizer state, activations) and the reference and reward models
that share the GPU get the rest: at least 40%."""

COLOCATED_SLEEP_MAX_MEMORY = 0.8
"""Colocated placement with sleep mode: vLLM frees its memory while the policy trains, but during rollouts the
policy's weights and optimizer state stay resident, so a fifth of the GPU is still left to them."""

_SLEEP_TAGS = ("weights", "kv_cache")


# --------------------------------------------------------------------------------------------------- configuration


def default_max_model_len(rl: RLStageSpec) -> int:
    """The engine's context: `rl.rollout.vllm.max_model_len`, or the longest request (prompt + response)."""
    return rl.rollout.vllm.max_model_len or rl.data.max_prompt_length + rl.rollout.max_new_tokens


def engine_kwargs(rollout: RolloutSpec, model_dir: str, max_model_len: int, seed: int) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM(...)`` (every key an ``EngineArgs`` field), rendered without vLLM.

    `max_model_len` is the stage's prompt + response length; `rollout.vllm.max_model_len` overrides it when set.
    """
    v = rollout.vllm
    return {
        "model": str(model_dir),
        "tensor_parallel_size": v.tensor_parallel_size,
        "gpu_memory_utilization": v.gpu_memory_utilization,
        "dtype": v.dtype,
        "enforce_eager": v.enforce_eager,
        "max_model_len": v.max_model_len or max_model_len,
        "enable_prefix_caching": v.enable_prefix_caching,
        "enable_sleep_mode": v.enable_sleep_mode,
        "seed": seed,
        "worker_extension_cls": WORKER_EXTENSION,
    }


def sampling_params_kwargs(n: int, max_tokens: int, temperature: float, top_p: float, seed: int,
                           stop_token_ids: Iterable[int] = ()) -> dict[str, Any]:
    """Keyword arguments of one prompt's ``vllm.SamplingParams``: `n` responses, response j seeded ``seed + j``.

    `stop_token_ids` are raytrain's end-of-response ids (:func:`find_eos_ids`): vLLM stops at the tokenizer's EOS
    and the generation config's on its own, but not at ChatML's ``<|im_end|>``, which the torch engine stops at.
    A stop token is kept at the end of ``token_ids``, as the torch engine keeps it.
    """
    return {
        "n": int(n),
        "max_tokens": int(max_tokens),
        "temperature": float(temperature),
        "top_p": float(top_p),
        "seed": int(seed),
        "stop_token_ids": sorted({int(t) for t in stop_token_ids}),
    }


def validate(rl: RLStageSpec, *, gpus_per_node: int | None = None) -> None:
    """Reject vLLM settings that cannot work, naming the dotted key; a no-op unless `rl.rollout.backend` is vllm.

    Rules (what can be checked without vLLM and without the model):

    1. ``rl.train.use_gpu`` must be true: vLLM runs on GPUs only (the schema refuses this too).
    2. ``rl.rollout.vllm.max_model_len``, when set, must hold the longest request: data.max_prompt_length +
       rollout.max_new_tokens. vLLM rejects a longer prompt and cuts responses at the context.
    3. Colocated placement: each training worker has one GPU, so ``rl.rollout.vllm.tensor_parallel_size`` must be 1.
    4. Colocated placement: ``rl.rollout.vllm.gpu_memory_utilization`` (a share of the whole GPU) at most
       ``COLOCATED_MAX_MEMORY`` (0.6), or ``COLOCATED_SLEEP_MAX_MEMORY`` (0.8) with enable_sleep_mode.
    5. Split placement: ``rl.rollout.vllm.enable_sleep_mode`` must be off: an engine actor has GPUs of its own, so
       sleeping frees memory no one else uses and only adds a wake-up to every iteration.
    6. Split placement: ``rl.rollout.num_gpus`` (when not 0, which means tensor_parallel_size) must cover
       tensor_parallel_size; a fraction of one GPU works only with tensor_parallel_size 1 and
       gpu_memory_utilization no larger than that fraction.
    7. Split placement with `gpus_per_node` given: tensor_parallel_size at most `gpus_per_node` (an engine's
       workers are processes on its node).
    """
    r, v = rl.rollout, rl.rollout.vllm
    if r.backend != "vllm":
        return
    if not rl.train.use_gpu:
        raise ValueError("rl.train.use_gpu: rollout.backend 'vllm' needs GPUs (use_gpu: true); use backend 'torch' "
                         "on CPU")
    longest = rl.data.max_prompt_length + r.max_new_tokens
    if v.max_model_len is not None and v.max_model_len < longest:
        raise ValueError(f"rl.rollout.vllm.max_model_len ({v.max_model_len}) is below the longest request, "
                         f"data.max_prompt_length + rollout.max_new_tokens = {longest}; raise it or leave it unset")
    if r.placement == "colocated":
        if v.tensor_parallel_size != 1:
            raise ValueError(f"rl.rollout.vllm.tensor_parallel_size ({v.tensor_parallel_size}) must be 1 with "
                             "placement 'colocated': the engine shares its training worker's one GPU; use placement "
                             "'split' for tensor-parallel engines")
        cap = COLOCATED_SLEEP_MAX_MEMORY if v.enable_sleep_mode else COLOCATED_MAX_MEMORY
        if v.gpu_memory_utilization > cap:
            how = "with" if v.enable_sleep_mode else "without"
            raise ValueError(f"rl.rollout.vllm.gpu_memory_utilization ({v.gpu_memory_utilization}) is above {cap}, "
                             f"the most a colocated engine may take {how} enable_sleep_mode: the policy, its optimizer "
                             "state and the reference and reward models share that GPU")
        return
    if v.enable_sleep_mode:
        raise ValueError("rl.rollout.vllm.enable_sleep_mode applies to placement 'colocated' (it frees the GPU for "
                         "training); a 'split' engine actor has GPUs of its own: turn it off")
    tp, gpus = v.tensor_parallel_size, r.num_gpus
    if 0 < gpus < 1:
        if tp != 1:
            raise ValueError(f"rl.rollout.num_gpus ({gpus}) is a fraction of a GPU, but "
                             f"rl.rollout.vllm.tensor_parallel_size is {tp}: a tensor-parallel engine needs whole GPUs")
        if v.gpu_memory_utilization > gpus:
            raise ValueError(f"rl.rollout.vllm.gpu_memory_utilization ({v.gpu_memory_utilization}) exceeds the share "
                             f"of a GPU each engine actor reserves (rl.rollout.num_gpus = {gpus})")
    elif gpus and gpus < tp:
        raise ValueError(f"rl.rollout.num_gpus ({gpus}) is below rl.rollout.vllm.tensor_parallel_size ({tp}): "
                         "each engine actor must reserve the GPUs its workers use (0 reserves tensor_parallel_size)")
    elif gpus and gpus != int(gpus):
        raise ValueError(f"rl.rollout.num_gpus ({gpus}) must be a whole number of GPUs above 1")
    if gpus_per_node is not None and tp > gpus_per_node:
        raise ValueError(f"rl.rollout.vllm.tensor_parallel_size ({tp}) exceeds the GPUs of a node ({gpus_per_node}): "
                         "an engine's tensor-parallel workers run on one node")


def find_eos_ids(model_dir: str) -> list[int]:
    """End-of-response ids of a local Hugging Face directory, as `serving.engine.TorchEngine` finds them: the
    tokenizer's EOS, the generation config's EOS ids and ChatML's ``<|im_end|>`` when the vocabulary has it."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from serving.engine import IM_END

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    try:
        generation = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: transformers derives one from config.json
        generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir))
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(generation, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    im_end = tokenizer.get_vocab().get(IM_END)
    if im_end is not None:
        ids.add(int(im_end))
    return sorted(ids)


# ------------------------------------------------------------------------------------------------- worker extension


class WeightSyncExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``); ``collective_rpc(SYNC_METHOD, args=(path,))`` runs
    it on each tensor-parallel rank, which loads the full tensors and keeps its own shard (vLLM's weight loaders
    shard and fuse q/k/v and gate/up from Hugging Face names).

    vLLM refuses an extension that shares a non-dunder attribute name with its worker class: keep every name here
    prefixed ``raytrain_`` and put helpers at module level.
    """

    def raytrain_load_weights_from_file(self, path: str) -> int:
        """Load every tensor of the safetensors file at `path` into the model; returns the tensors read."""
        from safetensors.torch import load_file

        weights = load_file(path)  # on CPU: the weight loaders copy each tensor into its (sharded) parameter
        model = self.model_runner.model  # type: ignore[attr-defined]
        loaded = model.load_weights(weights=weights.items())
        _check_all_loaded(model, loaded)
        return len(weights)


def _check_all_loaded(model: Any, loaded: Any) -> None:
    # vLLM's default loader makes the same check: a parameter no weight reached keeps its old value silently.
    if not isinstance(loaded, set):  # models whose load_weights returns nothing cannot be checked
        return
    missing = sorted({name for name, _ in model.named_parameters()} - loaded)
    if missing:
        raise KeyError(f"the new weights left {len(missing)} parameters of the rollout model unloaded, "
                       f"e.g. {missing[:3]}")


# --------------------------------------------------------------------------------------------------------- engine


class VLLMRolloutEngine:
    """`RolloutEngine` over ``vllm.LLM`` (one engine: tensor_parallel_size GPUs on one node). Not run: see the
    module docstring.

    `model_dir` is a local Hugging Face directory (vLLM and :func:`find_eos_ids` both read it). With
    ``enable_sleep_mode`` the engine sleeps (level 1: weights to CPU, KV cache freed) after each batch, wakes its
    weights alone to take new ones, and wakes fully before the next batch. After new weights the prefix cache is
    reset before generating, since cached prompt blocks hold keys and values of the old weights.

    `llm` and `eos_ids` are for callers (and tests) that build these themselves; `sync_dir` is where weight files
    are written for the workers to read (default: the temp directory; /dev/shm keeps them in memory).
    """

    def __init__(self, rollout: RolloutSpec | dict[str, Any], model_dir: str, max_model_len: int, seed: int = 0, *,
                 llm: Any | None = None, eos_ids: Sequence[int] | None = None, sync_dir: str | None = None) -> None:
        if isinstance(rollout, dict):  # as a role's kwargs carry it to an actor
            from raytrain.config.schema import RolloutSpec

            rollout = RolloutSpec.model_validate(rollout)
        self.rollout = rollout
        self.sleep_mode = rollout.vllm.enable_sleep_mode
        self.sync_dir = sync_dir
        if llm is None:
            try:
                import vllm
            except ImportError as exc:
                raise ImportError("rollout.backend 'vllm' needs vLLM on the GPU nodes (pip install "
                                  "'raytrain[gpu]'); it is not installable on CPU machines") from exc
            llm = vllm.LLM(**engine_kwargs(rollout, model_dir, max_model_len, seed))
        self.llm = llm
        self._eos = sorted({int(t) for t in eos_ids}) if eos_ids is not None else find_eos_ids(model_dir)
        self._asleep: set[str] = set()
        self._stale_prefix_cache = False

    # -- protocol

    def generate_batch(self, prompts: Sequence[Sequence[int]], *, n: int, max_tokens: int, temperature: float,
                       top_p: float, seeds: Sequence[int]) -> list[list[list[int]]]:
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: one seed per prompt")
        if not prompts:
            return []
        requests = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]
        params = [self._sampling_params(sampling_params_kwargs(n, max_tokens, temperature, top_p, seed, self._eos))
                  for seed in seeds]
        self.wake_up()
        if self._stale_prefix_cache:
            self.llm.reset_prefix_cache()
            self._stale_prefix_cache = False
        # The whole batch in one call: vLLM schedules it as it sees fit and returns outputs in prompt order.
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        responses = responses_from_outputs(outputs, requests, n)
        if self.sleep_mode:
            self.sleep()
        return responses

    def load_weights(self, weights: dict[str, Any]) -> int:
        tensors, nbytes = _weights_for_file(weights, self.rollout.vllm.dtype)
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory(prefix="raytrain-weights-", dir=self.sync_dir) as tmp:
            path = os.path.join(tmp, "weights.safetensors")
            save_file(tensors, path)
            del tensors
            if "weights" in self._asleep:  # weights only: the KV cache stays freed until the next batch
                self.llm.wake_up(tags=["weights"])
                self._asleep.discard("weights")
            self.llm.collective_rpc(SYNC_METHOD, args=(path,))
        self._stale_prefix_cache = True
        return nbytes

    def eos_ids(self) -> list[int]:
        return list(self._eos)

    # -- memory (sleep mode)

    def sleep(self) -> None:
        """Free the engine's GPU memory (sleep level 1) while the policy trains; a no-op without sleep mode."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = set(_SLEEP_TAGS)

    def wake_up(self) -> None:
        """Reallocate whatever sleeps (weights, KV cache) before generating."""
        if self._asleep:
            self.llm.wake_up(tags=[t for t in _SLEEP_TAGS if t in self._asleep])
            self._asleep.clear()

    @staticmethod
    def _sampling_params(kwargs: dict[str, Any]) -> Any:
        from vllm import SamplingParams

        return SamplingParams(**kwargs)


def responses_from_outputs(outputs: Sequence[Any], requests: Sequence[dict[str, Any]], n: int) -> list[list[list[int]]]:
    """Per prompt, its `n` responses' token ids ordered by ``CompletionOutput.index`` (response j: seed + j).

    Checks that there is one ``RequestOutput`` per prompt, in prompt order, each with `n` completions.
    """
    if len(outputs) != len(requests):
        raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} prompts")
    responses: list[list[list[int]]] = []
    for i, (out, req) in enumerate(zip(outputs, requests, strict=True)):
        got = getattr(out, "prompt_token_ids", None)
        if got is not None and list(got) != req["prompt_token_ids"]:
            raise RuntimeError(f"vLLM output {i} belongs to another prompt: outputs are not in prompt order")
        completions = sorted(out.outputs, key=lambda c: c.index)
        if [c.index for c in completions] != list(range(n)):
            raise RuntimeError(f"vLLM returned completions {[c.index for c in completions]} for prompt {i}, "
                               f"expected 0..{n - 1}")
        responses.append([[int(t) for t in c.token_ids] for c in completions])
    return responses


def _weights_for_file(weights: dict[str, Any], dtype: str) -> tuple[dict[str, Any], int]:
    """CPU, contiguous tensors for one safetensors file: floating tensors in the engine's dtype (unless 'auto'), and
    tensors that share storage (tied embeddings) copied apart, since safetensors refuses shared storage."""
    import torch

    target = None if dtype == "auto" else getattr(torch, dtype)
    out: dict[str, Any] = {}
    seen: set[int] = set()
    nbytes = 0
    for name, tensor in weights.items():
        t = tensor.detach()
        t = t.to("cpu", target) if target is not None and t.is_floating_point() else t.to("cpu")
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
        nbytes += t.numel() * t.element_size()
    return out, nbytes
