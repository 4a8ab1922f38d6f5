"""Model FLOPs and utilization (MFU) against the device's peak."""

from __future__ import annotations

from typing import Any

# Dense peak TFLOP/s (no sparsity) by device name substring, for bf16/fp16 tensor-core math.
# Sources: NVIDIA/AMD product datasheets.
PEAK_TFLOPS_BF16: dict[str, float] = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A10G": 125.0,
    "A10": 125.0,
    "L40S": 362.0,
    "L4": 121.0,
    "V100": 125.0,  # fp16
    "MI300X": 1307.0,
    "MI250X": 383.0,
}


def peak_tflops(device_name: str) -> float | None:
    """Peak bf16 TFLOP/s of a device from its name (longest matching key wins), None if unknown."""
    for key in sorted(PEAK_TFLOPS_BF16, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return PEAK_TFLOPS_BF16[key]
    return None


def flops_per_token(cfg: dict[str, Any], seq_len: int) -> float:
    """Training FLOPs per token: 6 x non-embedding-lookup parameters + attention score/value matmuls.

    The 6N term counts forward (2N) and backward (4N) matmuls; attention adds 12 * layers * hidden * seq
    (the PaLM paper's accounting, appendix B). The input embedding is a lookup and is excluded.
    """
    h, i, n, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    kv = h * kv_heads // heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i
    matmul_params = n * per_layer + h * v  # layers + LM head
    return 6.0 * matmul_params + 12.0 * n * h * seq_len


def mfu(tokens_per_s: float, cfg: dict[str, Any], seq_len: int, n_devices: int, device_name: str) -> float | None:
    peak = peak_tflops(device_name)
    if not peak:
        return None
    return tokens_per_s * flops_per_token(cfg, seq_len) / (peak * 1e12 * n_devices)
