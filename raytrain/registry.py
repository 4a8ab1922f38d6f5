"""The model registry: immutable versions with lineage, aliases that move, and a history of every move.

Layout under the storage root (a local path or an object-store URI)::

    models/<name>/<N>/              one immutable version (N = 1, 2, ...): the Hugging Face export, lineage.json,
                                    version.json (written last: a version without it is incomplete and invisible),
                                    eval.json / eval.md (added by evaluation; the weights never change)
    models/<name>/aliases/<a>.json  {"version": N, "previous": [...]}: `champion`, `challenger`, any name
    models/<name>/history/*.json    one object per event (publish, alias, promote, refused, rollback): append-only
    runs/<run>/export.json          the version a training run exported (a re-run of a finished run reuses it)
    datasets/<name>/<version>/      immutable dataset versions, datasets/<name>/latest.json -> the newest

Aliases follow MLflow's model aliases: a named, mutable pointer to one version. Each alias is its own object, written
whole (a local temp file + rename; an object-store PUT), so two writers racing on one alias leave it on one of their
versions, never torn, and writers of different aliases never touch the same file. Locally a lock also serializes the
read-modify-write of an alias, so its `previous` list (what `rollback` returns to) loses no move; on object stores
(no locks, no conditional PUT through pyarrow) the last writer's list wins, and the history objects keep every event.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from raytrain import storage
from raytrain.config.schema import JobSpec
from raytrain.errors import StageInputError

log = logging.getLogger(__name__)

REF_PREFIX = "models:/"
VERSION_FILE = "version.json"
ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
RESERVED_ALIASES = ("latest",)


class RegistryError(StageInputError):
    """A registry operation that cannot be done as asked (unknown model, version or alias; a refused promotion)."""


def check_alias(alias: str) -> str:
    if not ALIAS_RE.match(alias) or alias in RESERVED_ALIASES:
        raise RegistryError(f"{alias!r} is not a valid alias: lowercase letters, digits, '-' and '_', starting with a "
                            f"letter; {', '.join(RESERVED_ALIASES)} is reserved (it always means the newest version)")
    return alias


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _actor() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except (KeyError, OSError):
        return socket.gethostname()


def _children(path: str) -> list[tuple[str, bool]]:
    """(base name, is directory) of the entries directly under `path` ([] when it does not exist)."""
    fs, p = storage.filesystem(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    return [(i.base_name, i.type == pafs.FileType.Directory)
            for i in fs.get_file_info(pafs.FileSelector(p, recursive=False))]


class Registry:
    """Models under `<root>/models`: versions, aliases, history. `root` is the storage root."""

    def __init__(self, root: str) -> None:
        self.root = storage.normalize_root(root)

    # -- paths --------------------------------------------------------------------------------------------------
    def model_path(self, name: str) -> str:
        return storage.join(self.root, "models", storage.component(name))

    def version_path(self, name: str, version: int) -> str:
        return storage.join(self.model_path(name), str(int(version)))

    # -- reading ------------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(n for n, is_dir in _children(storage.join(self.root, "models"))
                      if is_dir and not n.startswith(".") and self.versions(n))

    def versions(self, name: str) -> list[int]:
        """Complete versions, oldest first."""
        found = sorted(int(n) for n, is_dir in _children(self.model_path(name)) if is_dir and n.isdigit())
        return [v for v in found if storage.exists(storage.join(self.version_path(name, v), VERSION_FILE))]

    def latest(self, name: str) -> int | None:
        versions = self.versions(name)
        return versions[-1] if versions else None

    def version_info(self, name: str, version: int) -> dict[str, Any]:
        path = self.version_path(name, version)
        if not storage.exists(storage.join(path, VERSION_FILE)):
            raise RegistryError(f"model {name!r} has no version {version} (versions: {self.versions(name) or 'none'})")
        info: dict[str, Any] = {"name": name, "version": version, "path": path}
        info["published"] = storage.read_json(storage.join(path, VERSION_FILE))
        for doc in ("lineage", "eval"):
            p = storage.join(path, f"{doc}.json")
            info[doc] = storage.read_json(p) if storage.exists(p) else None
        info["aliases"] = sorted(a for a, rec in self.aliases(name).items() if rec["version"] == version)
        return info

    def aliases(self, name: str) -> dict[str, dict[str, Any]]:
        out = {}
        for n, is_dir in _children(storage.join(self.model_path(name), "aliases")):
            if not is_dir and n.endswith(".json") and not n.startswith("."):
                out[n[:-5]] = storage.read_json(storage.join(self.model_path(name), "aliases", n))
        return dict(sorted(out.items()))

    def alias_version(self, name: str, alias: str) -> int:
        if alias == "latest":
            latest = self.latest(name)
            if latest is None:
                raise RegistryError(f"model {name!r} has no versions under {self.model_path(name)}")
            return latest
        path = storage.join(self.model_path(name), "aliases", f"{check_alias(alias)}.json")
        if not storage.exists(path):
            known = ", ".join(self.aliases(name)) or "none"
            raise RegistryError(f"model {name!r} has no alias {alias!r} (aliases: {known})")
        return int(storage.read_json(path)["version"])

    def history(self, name: str, version: int | None = None) -> list[dict[str, Any]]:
        """Events, oldest first; with `version`, those that concern it (published, or moved an alias to/from it)."""
        base = storage.join(self.model_path(name), "history")
        events = [storage.read_json(storage.join(base, n)) for n, is_dir in sorted(_children(base))
                  if not is_dir and n.endswith(".json")]
        if version is not None:
            events = [e for e in events if version in (e.get("version"), e.get("from"))]
        return events

    def resolve(self, ref: str) -> str:
        """A model reference -> the version's directory. `models:/<name>/<N>`, `models:/<name>@<alias>`,
        `models:/<name>/latest`; anything else is returned as is (a path or URI of a model directory)."""
        name, version = self.parse(ref)
        return ref if name is None else self.version_path(name, version)

    def parse(self, ref: str) -> tuple[str | None, int]:
        if not ref.startswith(REF_PREFIX):
            return None, 0
        body = ref[len(REF_PREFIX):].strip("/")
        if "@" in body:
            name, alias = body.split("@", 1)
            return name, self.alias_version(name, alias)
        name, _, version = body.partition("/")
        if version in ("", "latest"):
            return name, self.alias_version(name, "latest")
        if not version.isdigit():
            raise RegistryError(f"{ref!r}: expected models:/<name>/<version number>, models:/<name>@<alias> or "
                                "models:/<name>/latest")
        self.version_info(name, int(version))  # raises when it does not exist
        return name, int(version)

    # -- writing ------------------------------------------------------------------------------------------------
    def publish(self, name: str, local_dir: str | Path, finalize: Callable[[Path, int], None] | None = None,
                meta: dict[str, Any] | None = None) -> int:
        """Publish a local directory as the next version of `name`; returns its number.

        `finalize(dir, version)` writes what depends on the number (lineage.json) before publication. Locally the
        version appears by one rename (which fails if a concurrent writer took the number first: then the next one
        is tried); on an object store the files are uploaded and `version.json` goes last.
        """
        base = self.model_path(name)
        storage.makedirs(base)
        export_id = uuid.uuid4().hex
        fs, p = storage.filesystem(base)
        local = isinstance(fs, pafs.LocalFileSystem)
        staging = Path(p) / f".staging-{export_id}" if local else Path(tempfile.mkdtemp(prefix="raytrain-publish-"))
        if staging.exists():
            shutil.rmtree(staging)
        shutil.copytree(local_dir, staging)
        try:
            for _ in range(100):
                taken = [int(n) for n, is_dir in _children(base) if is_dir and n.isdigit()]
                version = max(taken, default=0) + 1
                if finalize:
                    finalize(staging, version)
                doc = {"model": name, "version": version, "created": _now(), "export_id": export_id,
                       "by": _actor(), **(meta or {})}
                (staging / VERSION_FILE).write_text(json.dumps(doc, indent=2) + "\n")
                if local:
                    try:
                        os.rename(staging, Path(p) / str(version))
                    except OSError:  # another writer published this number between our listing and the rename
                        continue
                else:
                    dest = self.version_path(name, version)
                    body = [f for f in staging.iterdir() if f.name != VERSION_FILE]
                    with tempfile.TemporaryDirectory() as tmp:
                        for f in body:
                            (shutil.copytree if f.is_dir() else shutil.copy2)(f, Path(tmp) / f.name)
                        storage.upload_dir(tmp, dest)
                    storage.write_bytes(storage.join(dest, VERSION_FILE), (staging / VERSION_FILE).read_bytes())
                    if storage.read_json(storage.join(dest, VERSION_FILE)).get("export_id") != export_id:
                        raise RegistryError(f"another writer published {name} version {version} at the same time")
                self.record(name, {"action": "publish", "version": version, **(meta or {})})
                log.info("published %s version %d at %s", name, version, self.version_path(name, version))
                return version
            raise RegistryError(f"could not allocate a version of {name} after 100 attempts")
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def record(self, name: str, event: dict[str, Any]) -> dict[str, Any]:
        event = {"time": _now(), "by": _actor(), **event}
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"{time.time() % 1:.6f}"[1:]
        storage.write_json(storage.join(self.model_path(name), "history", f"{stamp}-{uuid.uuid4().hex[:8]}.json"),
                           event)
        return event

    @contextmanager
    def _alias_lock(self, name: str) -> Iterator[None]:
        fs, p = storage.filesystem(self.model_path(name))
        if not isinstance(fs, pafs.LocalFileSystem):
            yield
            return
        lock_dir = Path(p) / "aliases"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def set_alias(self, name: str, alias: str, version: int, *, action: str = "alias",
                  evidence: dict[str, Any] | None = None) -> dict[str, Any]:
        """Point `alias` at `version`; returns the event recorded. Moving an alias to where it is is a no-op event."""
        check_alias(alias)
        self.version_info(name, version)
        path = storage.join(self.model_path(name), "aliases", f"{alias}.json")
        with self._alias_lock(name):
            before = storage.read_json(path) if storage.exists(path) else None
            previous = [*before["previous"], before["version"]] if before else []
            if before and before["version"] == version:
                previous = before["previous"]
            storage.write_json(path, {"alias": alias, "version": version, "previous": previous[-50:],
                                      "updated": _now(), "by": _actor()})
        return self.record(name, {"action": action, "alias": alias, "version": version,
                                  "from": before["version"] if before else None, **(evidence or {})})

    def rollback(self, name: str, alias: str) -> dict[str, Any]:
        """Move `alias` back to the version it pointed at before its last move."""
        check_alias(alias)
        path = storage.join(self.model_path(name), "aliases", f"{alias}.json")
        with self._alias_lock(name):
            if not storage.exists(path):
                raise RegistryError(f"model {name!r} has no alias {alias!r}: nothing to roll back")
            before = storage.read_json(path)
            if not before["previous"]:
                raise RegistryError(f"alias {alias!r} of {name!r} has pointed only at version {before['version']}: "
                                    "nothing to roll back to")
            target = before["previous"][-1]
            storage.write_json(path, {"alias": alias, "version": target, "previous": before["previous"][:-1],
                                      "updated": _now(), "by": _actor()})
        return self.record(name, {"action": "rollback", "alias": alias, "version": target,
                                  "from": before["version"]})


# -- training runs -> versions --------------------------------------------------------------------------------------

def run_export_path(root: str, run_name: str) -> str:
    return storage.join(storage.Layout(root).runs(), run_name, "export.json")


def exported_version(root: str, run_name: str) -> dict[str, Any] | None:
    """What run `run_name` exported ({"model", "version", "path", "checkpoint"}), or None."""
    path = run_export_path(root, run_name)
    return storage.read_json(path) if storage.exists(path) else None


def run_model_dir(root: str, run_name: str, what: str) -> str:
    """The version directory run `run_name` exported; a clear error when it has not exported one yet."""
    done = exported_version(root, run_name)
    if done is None:
        raise StageInputError(f"run {run_name!r} has not exported a model yet (no {run_export_path(root, run_name)}): "
                              f"run the {what} stage first")
    return done["path"]


def candidate_dir(spec: JobSpec) -> str:
    """The model this spec's last training stage exports (RL, else DPO, else SFT, else pretrain): what eval measures."""
    from raytrain.posttrain.stage import model_dir_of

    return model_dir_of(spec, last_stage(spec))


def last_stage(spec: JobSpec) -> str:
    return next((s for s in ("rl", "dpo", "sft") if getattr(spec, s) is not None), "pretrain")


def candidate_model_name(spec: JobSpec) -> str:
    stage = last_stage(spec)
    return spec.model.name if stage == "pretrain" else spec.stage_model_name(stage)


def served_entry(root: str, model: str, alias: str, served_name: str) -> dict[str, Any]:
    """The serving config entry for the version `alias` names now: {name, path, version, alias}. Serving resolves
    the alias once per deployment, so every replica serves one version; moving the alias takes a redeploy."""
    reg = Registry(root)
    version = reg.alias_version(model, alias)
    return {"name": served_name, "path": reg.version_path(model, version), "version": str(version), "alias": alias}


def version_of_dir(path: str) -> tuple[str, int] | None:
    """(model name, version) of a registry version directory, from its version.json; None for other directories."""
    vpath = storage.join(path, VERSION_FILE)
    if not storage.exists(vpath):
        return None
    doc = storage.read_json(vpath)
    return doc["model"], int(doc["version"])


# -- datasets -------------------------------------------------------------------------------------------------------

def dataset_key(parts: dict[str, Any]) -> str:
    """A dataset version: the first 12 hex digits of a hash of what produced it (spec, inputs)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def dataset_latest(root: str, name: str) -> str | None:
    path = storage.join(storage.Layout(root).dataset(name), "latest.json")
    return storage.read_json(path)["version"] if storage.exists(path) else None


def set_dataset_latest(root: str, name: str, version: str) -> None:
    from raytrain.posttrain.data import set_dataset_latest_dir

    set_dataset_latest_dir(storage.Layout(root).dataset(name), version)


def dataset_dir(spec: JobSpec, name: str | None = None, version: str | None = None) -> str:
    """The curated dataset a stage reads: `data.version` if set, else the newest the data stage finished."""
    name = name or spec.data.name
    version = version or (spec.data.version if name == spec.data.name else None) or dataset_latest(
        spec.storage.root, name)
    base = storage.Layout(spec.storage.root).dataset(name)
    if version is None:
        raise StageInputError(f"no dataset {name!r} under {base}: run the data stage first (raytrain data --config …)")
    path = storage.join(base, storage.component(version))
    if not storage.exists(storage.join(path, "manifest.json")):
        raise StageInputError(f"dataset {name!r} has no finished version {version!r} at {path}")
    return path
