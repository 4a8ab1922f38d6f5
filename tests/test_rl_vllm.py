"""The vLLM rollout path (`raytrain.rl.vllm_engine`, `jobs/configs/rl-vllm.yaml`): rendering and validation only.

vLLM is not installed here (it pins a CUDA build of torch and this machine has no GPU), so nothing below runs vLLM
and nothing here claims the vLLM path ran. What is tested: the recipe loads and validates; the `vllm.LLM` keyword
arguments render from the spec, each one an `EngineArgs` field name read in vLLM's source; invalid combinations
fail naming their key; and the request building and output mapping of `VLLMRolloutEngine`, exercised against a
minimal stand-in `LLM` object injected in place of `vllm.LLM` (it records calls and echoes requests back; it is not
vLLM and says nothing about how vLLM behaves), together with the weight-sync extension's file round trip run on a
stand-in worker.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from raytrain.config import ConfigError, load_spec
from raytrain.rl import vllm_engine
from raytrain.rl.vllm_engine import (
    SYNC_METHOD,
    WORKER_EXTENSION,
    VLLMRolloutEngine,
    WeightSyncExtension,
    default_max_model_len,
    engine_kwargs,
    sampling_params_kwargs,
    validate,
)

RECIPE = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "rl-vllm.yaml"

# Field names of vLLM's `EngineArgs` dataclass, read in vllm-project/vllm `vllm/engine/arg_utils.py` at commit
# 99d7eb5d6a512cfcc5a2b104f24ebf2d6cda772b (a v0.11-era tree; raytrain's gpu extra resolves vllm==0.29.0 through
# ray[llm]==2.60.0, whose source could not be read here). A subset: the ones raytrain may render, all checked there.
ENGINE_ARGS_FIELDS = frozenset({
    "model", "tokenizer", "skip_tokenizer_init", "tokenizer_mode", "trust_remote_code", "download_dir",
    "load_format", "dtype", "kv_cache_dtype", "seed", "max_model_len", "distributed_executor_backend",
    "pipeline_parallel_size", "tensor_parallel_size", "data_parallel_size", "block_size", "enable_prefix_caching",
    "swap_space", "cpu_offload_gb", "gpu_memory_utilization", "max_num_batched_tokens", "max_num_seqs",
    "max_logprobs", "disable_log_stats", "revision", "quantization", "enforce_eager", "disable_custom_all_reduce",
    "enable_lora", "enable_chunked_prefill", "worker_cls", "worker_extension_cls", "generation_config",
    "enable_sleep_mode", "model_impl",
})

# Field names of `vllm.SamplingParams`, read in `vllm/sampling_params.py` at commit
# db573835d3ef40643442e0817059e087355cf458 and in the v0.8.3 API reference (docs.vllm.ai/en/v0.8.3/api/
# inference_params.html); these are unchanged in the newer trees read for the engine (see raytrain.rl.vllm_engine).
SAMPLING_PARAMS_FIELDS = frozenset({
    "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "top_k", "min_p",
    "seed", "stop", "stop_token_ids", "ignore_eos", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs",
    "detokenize", "skip_special_tokens", "include_stop_str_in_output", "logit_bias", "allowed_token_ids",
})

# Methods and attributes vLLM's GPU worker already has (vllm/v1/worker/gpu_worker.py, worker_base.py and
# entrypoints/llm.py read above): an extension attribute of the same name makes init_worker fail an assertion.
WORKER_NAMES = frozenset({
    "update_weights", "init_weight_transfer_engine", "load_model", "init_device", "execute_model", "sleep",
    "wake_up", "get_model", "apply_model", "check_health", "shutdown", "model_runner", "device", "load_weights",
})


def spec(*overrides: str):
    return load_spec(str(RECIPE), list(overrides))


def test_vllm_is_not_installed_here() -> None:
    # The premise of this file: if this fails, vLLM became installable and the engine should be run, not stubbed.
    assert importlib.util.find_spec("vllm") is None


# ---------------------------------------------------------------------------------------------------------- recipe


def test_recipe_loads_validates_and_says_it_has_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(RECIPE.parents[2])
    rl = load_spec("jobs/configs/rl-vllm.yaml", []).rl
    assert rl is not None
    assert rl.parent == "models:/demo-lm-sft/latest"
    assert rl.train.use_gpu is True and rl.train.task.type == "rl" and rl.train.task.algorithm == "grpo"
    assert (rl.rollout.backend, rl.rollout.placement) == ("vllm", "split")
    assert [f.name for f in rl.reward.functions] == ["raytrain.posttrain.demo:reward"]
    validate(rl, gpus_per_node=8)
    header = RECIPE.read_text().split("\nname:")[0]
    assert "NOT RUN" in header and "never been run in raytrain's CI" in header
    assert "no GPU" in header and "cannot install vLLM" in header


def test_load_spec_refuses_vllm_without_gpus_naming_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        spec("rl.train.use_gpu=false")
    msg = str(err.value)
    assert "rl:" in msg and "rollout.backend 'vllm'" in msg and "train.use_gpu" in msg


# ------------------------------------------------------------------------------------------------------- rendering


def test_engine_kwargs_render_from_the_spec() -> None:
    rl = spec().rl
    r = rl.rollout
    kwargs = engine_kwargs(r, "/models/policy", default_max_model_len(rl), seed=7)
    assert set(kwargs) <= ENGINE_ARGS_FIELDS, set(kwargs) - ENGINE_ARGS_FIELDS
    assert kwargs == {
        "model": "/models/policy",
        "tensor_parallel_size": r.vllm.tensor_parallel_size,
        "gpu_memory_utilization": r.vllm.gpu_memory_utilization,
        "dtype": r.vllm.dtype,
        "enforce_eager": r.vllm.enforce_eager,
        "max_model_len": rl.data.max_prompt_length + r.max_new_tokens,
        "enable_prefix_caching": r.vllm.enable_prefix_caching,
        "enable_sleep_mode": r.vllm.enable_sleep_mode,
        "seed": 7,
        "worker_extension_cls": "raytrain.rl.vllm_engine.WeightSyncExtension",
    }
    assert (kwargs["tensor_parallel_size"], kwargs["gpu_memory_utilization"], kwargs["dtype"]) == (1, 0.85, "bfloat16")
    assert kwargs["max_model_len"] == 112


def test_engine_kwargs_follow_overrides() -> None:
    rl = spec("rl.rollout.vllm.max_model_len=256", "rl.rollout.vllm.tensor_parallel_size=2",
              "rl.rollout.vllm.enforce_eager=true", "rl.rollout.vllm.dtype=float16",
              "rl.rollout.vllm.enable_prefix_caching=false").rl
    kwargs = engine_kwargs(rl.rollout, "/m", 112, seed=0)
    assert kwargs["max_model_len"] == 256 == default_max_model_len(rl)  # the spec's value wins over the stage's
    assert (kwargs["tensor_parallel_size"], kwargs["enforce_eager"], kwargs["dtype"]) == (2, True, "float16")
    assert kwargs["enable_prefix_caching"] is False


def test_worker_extension_is_importable_by_name_and_cannot_clash_with_the_worker() -> None:
    module, _, name = WORKER_EXTENSION.rpartition(".")
    cls = getattr(importlib.import_module(module), name)  # what vLLM's resolve_obj_by_qualname does
    assert cls is WeightSyncExtension
    own = [a for a in vars(cls) if not a.startswith("__")]
    assert own == [SYNC_METHOD] and callable(getattr(cls, SYNC_METHOD))
    assert all(a.startswith("raytrain_") for a in dir(cls) if not a.startswith("__"))
    assert not set(dir(cls)) & WORKER_NAMES


def test_sampling_params_kwargs() -> None:
    kwargs = sampling_params_kwargs(4, 48, 0.9, 0.95, seed=1000, stop_token_ids=[3, 0, 3])
    assert set(kwargs) <= SAMPLING_PARAMS_FIELDS, set(kwargs) - SAMPLING_PARAMS_FIELDS
    assert kwargs == {"n": 4, "max_tokens": 48, "temperature": 0.9, "top_p": 0.95, "seed": 1000,
                      "stop_token_ids": [0, 3]}


# ------------------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(("overrides", "gpus_per_node", "key"), [
    (["rl.rollout.vllm.max_model_len=100"], None, "rl.rollout.vllm.max_model_len"),
    (["rl.rollout.placement=colocated", "rl.rollout.vllm.tensor_parallel_size=2",
      "rl.rollout.vllm.gpu_memory_utilization=0.5"], None, "rl.rollout.vllm.tensor_parallel_size"),
    (["rl.rollout.placement=colocated"], None, "rl.rollout.vllm.gpu_memory_utilization"),  # 0.85 > 0.6
    (["rl.rollout.placement=colocated", "rl.rollout.vllm.gpu_memory_utilization=0.7"], None,
     "rl.rollout.vllm.gpu_memory_utilization"),
    (["rl.rollout.placement=colocated", "rl.rollout.vllm.enable_sleep_mode=true"], None,
     "rl.rollout.vllm.gpu_memory_utilization"),  # 0.85 > 0.8 even with sleep mode
    (["rl.rollout.vllm.enable_sleep_mode=true"], None, "rl.rollout.vllm.enable_sleep_mode"),  # split
    (["rl.rollout.vllm.tensor_parallel_size=2", "rl.rollout.num_gpus=1"], None, "rl.rollout.num_gpus"),
    (["rl.rollout.vllm.tensor_parallel_size=2", "rl.rollout.num_gpus=0.5"], None, "rl.rollout.num_gpus"),
    (["rl.rollout.num_gpus=1.5"], None, "rl.rollout.num_gpus"),
    (["rl.rollout.num_gpus=0.5"], None, "rl.rollout.vllm.gpu_memory_utilization"),  # 0.85 of a GPU on half of one
    (["rl.rollout.vllm.tensor_parallel_size=4"], 2, "rl.rollout.vllm.tensor_parallel_size"),
])
def test_invalid_combinations_fail_naming_the_key(overrides: list[str], gpus_per_node: int | None, key: str) -> None:
    """The spec's own validation runs these rules, so a bad recipe fails at load, before Ray starts; the node-size
    rule needs the cluster's shape, which only `validate` is given."""
    from raytrain.config import ConfigError

    if gpus_per_node is None:
        with pytest.raises(ConfigError) as err:
            spec(*overrides)
        assert f"rl: {key}" in str(err.value), str(err.value)
        return
    rl = spec(*overrides).rl
    with pytest.raises(ValueError) as err:
        validate(rl, gpus_per_node=gpus_per_node)
    assert str(err.value).startswith(key), str(err.value)


@pytest.mark.parametrize("overrides", [
    ["rl.rollout.vllm.max_model_len=112"],
    ["rl.rollout.placement=colocated", "rl.rollout.vllm.gpu_memory_utilization=0.6"],
    ["rl.rollout.placement=colocated", "rl.rollout.vllm.gpu_memory_utilization=0.8",
     "rl.rollout.vllm.enable_sleep_mode=true"],
    ["rl.rollout.vllm.tensor_parallel_size=2", "rl.rollout.num_gpus=2"],
    ["rl.rollout.vllm.tensor_parallel_size=4"],  # num_gpus 0: the actor reserves 4; no node size given
    ["rl.rollout.num_gpus=0.5", "rl.rollout.vllm.gpu_memory_utilization=0.45"],
    # backend torch: the vllm section is unused, so nothing in it is checked
    ["rl.rollout.backend=torch", "rl.rollout.placement=colocated", "rl.rollout.vllm.tensor_parallel_size=8"],
])
def test_valid_combinations_pass(overrides: list[str]) -> None:
    validate(spec(*overrides).rl, gpus_per_node=None)


# ---------------------------------------------------- VLLMRolloutEngine against a stand-in LLM (not vLLM, see above)


class StandInLLM:
    """Records calls in order. `generate` answers each request with `n` completions whose ids encode (seed, j),
    listed in reverse index order, so the engine must order them by `index`; `collective_rpc` runs the named
    method on one stand-in worker, as vLLM's executor would on each rank."""

    def __init__(self, worker: Any = None, swap_outputs: bool = False) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.worker, self.swap_outputs = worker, swap_outputs

    def generate(self, prompts: list[dict[str, Any]], sampling_params: Any = None, *, use_tqdm: bool = True) -> list:
        self.calls.append(("generate", prompts, sampling_params, use_tqdm))
        outs = []
        for p, sp in zip(prompts, sampling_params, strict=True):
            completions = [SimpleNamespace(index=j, token_ids=(sp["seed"] + j, 99)) for j in range(sp["n"])]
            outs.append(SimpleNamespace(prompt_token_ids=list(p["prompt_token_ids"]), outputs=completions[::-1]))
        return outs[::-1] if self.swap_outputs else outs

    def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = (),
                       kwargs: dict | None = None) -> list:
        self.calls.append(("collective_rpc", method))
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def sleep(self, level: int = 1) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.calls.append(("wake_up", tags))

    def reset_prefix_cache(self) -> None:
        self.calls.append(("reset_prefix_cache",))


class Engine(VLLMRolloutEngine):
    _sampling_params = staticmethod(dict)  # SamplingParams(**kwargs) without vLLM: the kwargs themselves


def make_engine(llm: StandInLLM, *overrides: str) -> Engine:
    rl = spec(*overrides).rl
    return Engine(rl.rollout, "/unused", default_max_model_len(rl), llm=llm, eos_ids=[5, 2])


def test_generate_batch_builds_per_prompt_requests_and_maps_outputs_back() -> None:
    llm = StandInLLM()
    engine = make_engine(llm)
    prompts = [[1, 2, 3], [4, 5], [6]]
    out = engine.generate_batch(prompts, n=3, max_tokens=16, temperature=0.8, top_p=0.9, seeds=[10, 20, 30])
    (call,) = [c for c in llm.calls if c[0] == "generate"]
    _, requests, params, use_tqdm = call
    assert requests == [{"prompt_token_ids": p} for p in prompts] and use_tqdm is False
    assert params == [sampling_params_kwargs(3, 16, 0.8, 0.9, seed, [2, 5]) for seed in (10, 20, 30)]
    # Prompt i, response j: the completion vLLM samples with seed seeds[i] + j, whatever order it lists them in.
    assert out == [[[s + j, 99] for j in range(3)] for s in (10, 20, 30)]
    assert engine.eos_ids() == [2, 5]
    assert not [c for c in llm.calls if c[0] in ("sleep", "wake_up")]  # no sleep mode in this recipe


def test_outputs_out_of_prompt_order_are_refused() -> None:
    engine = make_engine(StandInLLM(swap_outputs=True))
    with pytest.raises(RuntimeError, match="prompt order"):
        engine.generate_batch([[1], [2]], n=2, max_tokens=4, temperature=1.0, top_p=1.0, seeds=[0, 1])
    with pytest.raises(ValueError, match="one seed per prompt"):
        engine.generate_batch([[1], [2]], n=2, max_tokens=4, temperature=1.0, top_p=1.0, seeds=[0])


class StandInModel:
    """vLLM's model interface as the extension uses it: load_weights(weights=iterable of (name, tensor)) -> names."""

    def __init__(self) -> None:
        import torch

        self.params = {"embed.weight": torch.zeros(4, 3), "lm_head.weight": torch.zeros(4, 3),
                       "norm.weight": torch.zeros(3)}
        self.received: dict[str, Any] = {}

    def named_parameters(self):
        return iter(self.params.items())

    def load_weights(self, weights):
        loaded = set()
        for name, tensor in weights:
            self.received[name] = tensor
            self.params[name].copy_(tensor)
            loaded.add(name)
        return loaded


class StandInWorker(WeightSyncExtension):
    def __init__(self, model: StandInModel) -> None:
        self.model_runner = SimpleNamespace(model=model)


def test_load_weights_round_trips_through_a_file_and_resets_the_prefix_cache() -> None:
    import torch

    model = StandInModel()
    llm = StandInLLM(worker=StandInWorker(model))
    engine = make_engine(llm)  # dtype bfloat16
    tied = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    weights = {"embed.weight": tied, "lm_head.weight": tied, "norm.weight": torch.ones(3)}  # shared storage
    nbytes = engine.load_weights(weights)
    assert nbytes == (12 + 12 + 3) * 2  # cast to the engine's bfloat16
    assert ("collective_rpc", SYNC_METHOD) in llm.calls
    assert {k: v.dtype for k, v in model.received.items()} == dict.fromkeys(weights, torch.bfloat16)
    assert torch.equal(model.params["lm_head.weight"], tied) and torch.equal(model.params["norm.weight"], torch.ones(3))
    engine.generate_batch([[1]], n=2, max_tokens=4, temperature=1.0, top_p=1.0, seeds=[0])
    names = [c[0] for c in llm.calls]
    assert names == ["collective_rpc", "reset_prefix_cache", "generate"]  # cached blocks hold the old weights' KV
    engine.generate_batch([[1]], n=2, max_tokens=4, temperature=1.0, top_p=1.0, seeds=[0])
    assert [c[0] for c in llm.calls][3:] == ["generate"]  # reset once per new weights


def test_a_weight_the_sync_does_not_reach_is_an_error() -> None:
    import torch

    engine = make_engine(StandInLLM(worker=StandInWorker(StandInModel())))
    with pytest.raises(KeyError, match=r"norm\.weight"):
        engine.load_weights({"embed.weight": torch.ones(4, 3), "lm_head.weight": torch.ones(4, 3)})


def test_sleep_mode_sleeps_after_a_batch_and_wakes_weights_alone_for_a_sync() -> None:
    import torch

    llm = StandInLLM(worker=StandInWorker(StandInModel()))
    engine = make_engine(llm, "rl.rollout.placement=colocated", "rl.rollout.vllm.enable_sleep_mode=true",
                         "rl.rollout.vllm.gpu_memory_utilization=0.5")
    batch = {"n": 2, "max_tokens": 4, "temperature": 1.0, "top_p": 1.0, "seeds": [0]}
    engine.generate_batch([[1]], **batch)
    engine.load_weights({"embed.weight": torch.ones(4, 3), "lm_head.weight": torch.ones(4, 3),
                         "norm.weight": torch.ones(3)})
    engine.generate_batch([[1]], **batch)
    assert [c[:2] if c[0] != "generate" else ("generate",) for c in llm.calls] == [
        ("generate",), ("sleep", 1),
        ("wake_up", ["weights"]), ("collective_rpc", SYNC_METHOD),  # the KV cache stays freed
        ("wake_up", ["kv_cache"]), ("reset_prefix_cache",), ("generate",), ("sleep", 1),
    ]


# ----------------------------------------------------------------------------------------- eos ids, factory


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from serving_fixtures import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-lm"))


def test_eos_ids_match_the_torch_engine(tiny_model_dir: Path) -> None:
    from raytrain.rl.rollout import TorchRolloutEngine, make_rollout_engine

    torch_engine = make_rollout_engine(spec("rl.rollout.backend=torch").rl.rollout, str(tiny_model_dir), "cpu")
    assert isinstance(torch_engine, TorchRolloutEngine) and torch_engine.engine.max_batch_size == 64
    eos = vllm_engine.find_eos_ids(str(tiny_model_dir))
    assert eos == torch_engine.eos_ids() and len(eos) == 2  # <|endoftext|> and ChatML's <|im_end|>


def test_factory_refuses_vllm_on_cpu_and_without_vllm(tiny_model_dir: Path) -> None:
    from raytrain.rl.rollout import make_rollout_engine

    rollout = spec().rl.rollout
    with pytest.raises(ValueError, match="GPUs only"):
        make_rollout_engine(rollout, str(tiny_model_dir), "cpu", 112)
    with pytest.raises(ValueError, match="max_model_len"):
        make_rollout_engine(rollout, str(tiny_model_dir), "cuda")
    with pytest.raises(ImportError, match="needs vLLM on the GPU nodes"):
        make_rollout_engine(rollout, str(tiny_model_dir), "cuda", 112)
