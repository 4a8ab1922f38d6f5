"""Load a job spec from a YAML recipe plus `section.key=value` overrides.

Every failure becomes a :class:`ConfigError` whose message names the file, the dotted key, the bad
value and what is allowed, so the CLI can print it and exit without a traceback, before Ray starts.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from raytrain.config.schema import JobSpec

# Recipes may be named instead of given as a path: `--config demo` means jobs/configs/demo.yaml.
RECIPES_DIR = Path(__file__).resolve().parents[2] / "jobs" / "configs"


class ConfigError(ValueError):
    """A job spec that cannot be used; the message is meant for a person, not a traceback."""


def resolve_recipe(config: str | Path) -> Path:
    """A path as given, or a recipe name looked up in jobs/configs/."""
    path = Path(config)
    if path.exists():
        return path
    if path.suffix == "" and (RECIPES_DIR / f"{config}.yaml").exists():
        return RECIPES_DIR / f"{config}.yaml"
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))) if RECIPES_DIR.is_dir() else "none"
    raise ConfigError(f"config file not found: {config} (recipes in jobs/configs/: {known})")


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.max_steps=10` -> (["train", "max_steps"], 10); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form section.key=value")
    key, _, raw = item.partition("=")
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"override '{item}' has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{item}': value is not valid YAML ({exc})") from None
    return parts, value


def _set_dotted(tree: dict[str, Any], parts: list[str], value: Any, item: str) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _members(ann: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (a model, an optional one, or a union of them)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    return [m for arg in typing.get_args(ann) for m in _members(arg)]


def _tag(model: type[BaseModel]) -> str | None:
    """The `type` tag of a discriminated-union member (train.task's members)."""
    field = model.model_fields.get("type")
    args = typing.get_args(field.annotation) if field else ()
    return str(args[0]) if len(args) == 1 else None


def _walk(loc: tuple[Any, ...]) -> tuple[type[BaseModel] | None, tuple[Any, ...]]:
    """(the model owning the field at `loc`, `loc` without the union tags pydantic inserts)."""
    model: type[BaseModel] | None = JobSpec
    clean: list[Any] = []
    parts = list(loc)
    i = 0
    while i < len(parts):
        part = parts[i]
        clean.append(part)
        field = model.model_fields.get(str(part)) if model else None
        if field is None or i == len(parts) - 1:
            model = None if field is None and i < len(parts) - 1 else model
            i += 1
            continue
        members = _members(field.annotation)
        nxt = members[0] if len(members) == 1 else None
        if len(members) > 1 and i + 1 < len(parts):
            # A discriminated union: pydantic's loc names the member by its tag next (task.dpo.beta).
            nxt = next((m for m in members if _tag(m) == str(parts[i + 1])), None)
            if nxt is not None:
                i += 1
        model = nxt
        i += 1
    return model, tuple(clean)


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at `loc` (for listing allowed keys)."""
    return _walk(loc)[0]


def _describe(err: dict[str, Any]) -> str:
    owner, loc = _walk(tuple(err["loc"]))
    key = ".".join(str(p) for p in loc) or "<top level>"
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        allowed = ", ".join(sorted(owner.model_fields)) if owner else "?"
        return f"{key}: unknown key (value {value!r}); allowed keys here: {allowed}"
    msg = err["msg"]
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        return f"{key}: {msg}" if loc else msg  # a spec-wide rule names its keys itself
    return f"{key}: {msg}; got {value!r}"


def load_spec(config: str | Path | None = None, overrides: list[str] | None = None) -> JobSpec:
    """Load and validate a job spec. Raises ConfigError with a message naming file, key and value."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if config is not None:
        path = resolve_recipe(config)
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    for item in overrides or []:
        parts, value = parse_override(item)
        _set_dotted(tree, parts, value, item)
    try:
        return JobSpec.model_validate(tree)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        where = source + (" (with command-line overrides)" if overrides else "")
        raise ConfigError(f"invalid job spec in {where}:\n  " + "\n  ".join(lines)) from None


def dump_spec(spec: JobSpec) -> str:
    """The spec as YAML (what a run records next to its artifacts)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
