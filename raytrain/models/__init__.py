"""Model presets (transformers Llama family)."""
