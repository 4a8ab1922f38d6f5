"""Typed job specs: pydantic models (`schema`) and the YAML + override loader (`loader`)."""

from raytrain.config.loader import ConfigError, dump_spec, load_spec
from raytrain.config.schema import JobSpec

__all__ = ["ConfigError", "JobSpec", "dump_spec", "load_spec"]
