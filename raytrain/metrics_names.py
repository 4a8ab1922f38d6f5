"""Names of every metric raytrain exports, in one place: code, alert rules and dashboards share them.

Training metrics go through `ray.util.metrics` and leave Ray's metrics export port with a `ray_`
prefix: `TRAIN_LOSS = "raytrain_train_loss"` is scraped as `ray_raytrain_train_loss{run=...}`.
"""

# Training (rank 0 of each run; tag: run)
TRAIN_LOSS = "raytrain_train_loss"
TRAIN_VAL_LOSS = "raytrain_train_val_loss"
TRAIN_LR = "raytrain_train_lr"
TRAIN_GRAD_NORM = "raytrain_train_grad_norm"
TRAIN_TOKENS_PER_S = "raytrain_train_tokens_per_s"
TRAIN_STEP = "raytrain_train_step"
TRAIN_MFU = "raytrain_train_mfu"
TRAIN_MEMORY_BYTES = "raytrain_train_memory_bytes"
TRAIN_RESUMES = "raytrain_train_resumes"

# Online RL (PPO/GRPO), one value per iteration, tag `run` (RL_PHASE_SECONDS also `phase`).
RL_REWARD_MEAN = "raytrain_rl_reward_mean"
RL_REWARD_STD = "raytrain_rl_reward_std"
RL_KL = "raytrain_rl_kl"
RL_KL_COEF = "raytrain_rl_kl_coef"
RL_CLIP_RATIO = "raytrain_rl_clip_ratio"
RL_ENTROPY = "raytrain_rl_entropy"
RL_RESPONSE_LENGTH = "raytrain_rl_response_length"
RL_VALUE_LOSS = "raytrain_rl_value_loss"
RL_GEN_TOKENS_PER_S = "raytrain_rl_generation_tokens_per_s"
RL_TRAIN_TOKENS_PER_S = "raytrain_rl_training_tokens_per_s"
RL_PHASE_SECONDS = "raytrain_rl_phase_seconds"
RL_SYNC_BYTES = "raytrain_rl_sync_bytes"
RL_EVAL_REWARD = "raytrain_rl_eval_reward"

# Serving (tags: model, route, status)
SERVE_REQUESTS = "raytrain_serve_requests_total"
SERVE_LATENCY = "raytrain_serve_latency_seconds"
SERVE_TTFT = "raytrain_serve_ttft_seconds"
SERVE_GENERATED_TOKENS = "raytrain_serve_generated_tokens_total"
SERVE_QUEUE_DEPTH = "raytrain_serve_queue_depth"

RAY_PREFIX = "ray_"


# --- Exported series --------------------------------------------------------------------------------
# What a Prometheus scrape of a Ray node's metrics port (KubeRay: container port `metrics`, 8080) shows,
# checked against Ray 2.60 (`ray.util.metrics` goes through Ray's OpenTelemetry recorder):
#   Gauge "x"              -> ray_x
#   Counter "x" or "x_total" -> ray_x_total      (the `_total` suffix is added once, never doubled)
#   Histogram "x"          -> ray_x_bucket{le=...}, ray_x_count, ray_x_sum
# Every series also carries Component, NodeAddress, SessionName, Version and WorkerId labels; a
# restarted worker process is a new WorkerId, so queries aggregate by the metric's own tags (`run`, ...).

GAUGE, COUNTER, HISTOGRAM = "gauge", "counter", "histogram"

# raytrain's own metrics: name passed to ray.util.metrics -> type.
PROJECT_METRICS: dict[str, str] = {
    TRAIN_LOSS: GAUGE,
    TRAIN_VAL_LOSS: GAUGE,
    TRAIN_LR: GAUGE,
    TRAIN_GRAD_NORM: GAUGE,
    TRAIN_TOKENS_PER_S: GAUGE,
    TRAIN_STEP: GAUGE,
    TRAIN_MFU: GAUGE,
    TRAIN_MEMORY_BYTES: GAUGE,
    TRAIN_RESUMES: COUNTER,
    RL_REWARD_MEAN: GAUGE,
    RL_REWARD_STD: GAUGE,
    RL_KL: GAUGE,
    RL_KL_COEF: GAUGE,
    RL_CLIP_RATIO: GAUGE,
    RL_ENTROPY: GAUGE,
    RL_RESPONSE_LENGTH: GAUGE,
    RL_VALUE_LOSS: GAUGE,
    RL_GEN_TOKENS_PER_S: GAUGE,
    RL_TRAIN_TOKENS_PER_S: GAUGE,
    RL_PHASE_SECONDS: GAUGE,
    RL_SYNC_BYTES: GAUGE,
    RL_EVAL_REWARD: GAUGE,
    SERVE_REQUESTS: COUNTER,
    SERVE_LATENCY: HISTOGRAM,
    SERVE_TTFT: HISTOGRAM,
    SERVE_GENERATED_TOKENS: COUNTER,
    SERVE_QUEUE_DEPTH: GAUGE,
}

# Ray's built-in metrics that raytrain's alerts and dashboards use: name as Ray registers it -> (type,
# the file under the installed `ray` package that defines it). tests/test_ops_metrics.py checks each
# name is still defined there, so a Ray upgrade that renames one fails a test instead of an alert
# silently never firing.
RAY_METRICS: dict[str, tuple[str, str]] = {
    # Serve HTTP ingress (proxy), tags: route, method, application, status_code (errors: error_code)
    "serve_num_http_requests": (COUNTER, "serve/_private/request_ingress_metrics.py"),
    "serve_num_http_error_requests": (COUNTER, "serve/_private/request_ingress_metrics.py"),
    "serve_http_request_latency_ms": (HISTOGRAM, "serve/_private/request_ingress_metrics.py"),
    # Serve controller / replicas, tags: deployment, application
    "serve_deployment_replica_healthy": (GAUGE, "serve/_private/deployment_state.py"),
    "serve_autoscaling_target_replicas": (GAUGE, "serve/_private/deployment_state.py"),
    "serve_autoscaling_desired_replicas": (GAUGE, "serve/_private/autoscaling_state.py"),
    "serve_num_ongoing_requests_at_replicas": (GAUGE, "serve/_private/router.py"),
    "serve_deployment_processing_latency_ms": (HISTOGRAM, "serve/_private/replica.py"),
    # Ray Train V2 controller, tags: ray_train_run_name, ray_train_run_id, ray_train_controller_state
    "train_controller_state": (GAUGE, "train/v2/_internal/metrics/controller.py"),
    # Nodes (reporter agent), tags: ip, RayNodeType, ... (GPU ones also GpuIndex, GpuDeviceName)
    "node_cpu_utilization": (GAUGE, "dashboard/modules/reporter/reporter_agent.py"),
    "node_mem_used": (GAUGE, "dashboard/modules/reporter/reporter_agent.py"),
    "node_mem_total": (GAUGE, "dashboard/modules/reporter/reporter_agent.py"),
    "node_gpus_utilization": (GAUGE, "dashboard/modules/reporter/reporter_agent.py"),
    "node_gram_used": (GAUGE, "dashboard/modules/reporter/reporter_agent.py"),
    "node_gram_available": (GAUGE, "dashboard/modules/reporter/reporter_agent.py"),
    # Ray Data, tags: dataset, operator
    "data_output_rows": (GAUGE, "data/_internal/stats.py"),
    "data_output_bytes": (GAUGE, "data/_internal/stats.py"),
    "data_spilled_bytes": (GAUGE, "data/_internal/stats.py"),
    "data_cpu_usage_cores": (GAUGE, "data/_internal/stats.py"),
    "data_current_bytes": (GAUGE, "data/_internal/stats.py"),
    "data_operator_queued_blocks": (GAUGE, "data/_internal/stats.py"),
}

_SUFFIXES = {GAUGE: ("",), COUNTER: ("_total",), HISTOGRAM: ("_bucket", "_count", "_sum")}


def exported_series(name: str, kind: str) -> list[str]:
    """Series names a scrape shows for a metric registered through `ray.util.metrics` as `name`."""
    base = RAY_PREFIX + (name.removesuffix("_total") if kind == COUNTER else name)
    return [base + suffix for suffix in _SUFFIXES[kind]]


def all_exported_series() -> frozenset[str]:
    """Every series name raytrain's alert rules and dashboards may query."""
    names = [s for n, kind in PROJECT_METRICS.items() for s in exported_series(n, kind)]
    names += [s for n, (kind, _) in RAY_METRICS.items() for s in exported_series(n, kind)]
    return frozenset(names)
