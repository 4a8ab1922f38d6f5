"""Distributed pretraining: Ray Train + DeepSpeed."""
