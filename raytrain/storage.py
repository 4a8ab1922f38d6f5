"""The storage root: artifact layout and file access through pyarrow.fs.

Every stage reads and writes under one root that is a local path or an object-store URI
(s3://, gs://, abfs:// …), so a stage can run alone, later, on another cluster. Layout::

    datasets/<name>/   manifest.json report.json train/ val/ test/ removed/ quarantine/
    tokenizers/<name>/ tokenizer.json (+ transformers tokenizer files)
    runs/<run>/        Ray Train storage (checkpoints, results)
    models/<name>/<version>/  Hugging Face directory, lineage.json, eval.json
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def normalize_root(root: str) -> str:
    """Absolute local path (workers may run in another cwd) or the URI as given."""
    if is_uri(root):
        return root.rstrip("/")
    if root.startswith("file://"):
        root = root[len("file://") :]
    return str(Path(root).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or URI."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), normalize_root(path)


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def makedirs(path: str) -> None:
    fs, p = filesystem(path)
    fs.create_dir(p, recursive=True)


def write_bytes(path: str, data: bytes) -> None:
    """Write a file atomically where the filesystem allows it (local: temp file + rename)."""
    fs, p = filesystem(path)
    parent = p.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
        return
    # Object stores publish an object only when its upload completes: already atomic.
    with fs.open_output_stream(p) as f:
        f.write(data)


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_json(path: str, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def _segments(path: str) -> list[str]:
    body = path.split("://", 1)[1] if "://" in path else path
    return [seg for seg in body.split("/") if seg]


def check_owned(path: str, min_depth: int = 2) -> None:
    """Refuse a destructive operation on a path that climbs ('.', '..') or is too close to a filesystem root.

    Every artifact directory a stage replaces is at least <root>/<kind>/<name>; a path with '..' in it, or
    '/' or '/home', is a bug or a hostile name and must never be deleted or overwritten.
    """
    segs = _segments(path)
    if any(seg in (".", "..") for seg in segs):
        raise ValueError(f"refusing to delete or overwrite {path!r}: it contains '.' or '..'")
    if len(segs) < min_depth:
        raise ValueError(f"refusing to delete or overwrite {path!r}: too close to the filesystem root")


def remove_tree(path: str) -> None:
    check_owned(path)
    fs, p = filesystem(path)
    if fs.get_file_info(p).type == pafs.FileType.Directory:
        fs.delete_dir(p)


def remove_file(path: str) -> None:
    check_owned(path)
    fs, p = filesystem(path)
    if fs.get_file_info(p).type == pafs.FileType.File:
        fs.delete_file(p)


def upload_dir(local_dir: str | Path, dest: str) -> None:
    """Copy a local directory to a path or URI (replacing what was there)."""
    check_owned(dest)
    fs, p = filesystem(dest)
    if isinstance(fs, pafs.LocalFileSystem):
        if Path(p).exists():
            shutil.rmtree(p)
        shutil.copytree(local_dir, p)
        return
    fs.create_dir(p, recursive=True)
    pafs.copy_files(str(local_dir), p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


@contextmanager
def local_dir(path: str) -> Iterator[Path]:
    """A local directory with the contents of `path` (the path itself when it is local)."""
    fs, p = filesystem(path)
    if isinstance(fs, pafs.LocalFileSystem):
        if not Path(p).is_dir():
            raise FileNotFoundError(f"directory not found: {path}")
        yield Path(p)
        return
    with tempfile.TemporaryDirectory(prefix="raytrain-") as tmp:
        pafs.copy_files(p, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield Path(tmp)


def component(name: str) -> str:
    """`name` if it is one safe path component (specs validate this too; this guards every other caller)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"{name!r} is not a valid artifact name: it must be one path component, not '.' or '..'")
    return name


class Layout:
    """Where each artifact lives under the storage root; every name must be one path component."""

    def __init__(self, root: str) -> None:
        self.root = normalize_root(root)

    def dataset(self, name: str) -> str:
        return join(self.root, "datasets", component(name))

    def raw(self, name: str) -> str:
        return join(self.root, "raw", component(name))

    def tokenizer(self, name: str) -> str:
        return join(self.root, "tokenizers", component(name))

    def runs(self) -> str:
        return join(self.root, "runs")

    def model(self, name: str, version: str) -> str:
        return join(self.root, "models", component(name), component(version))
