"""Reading raw corpora into Ray Data without losing a row.

Ray's own JSON reader fails a whole task on one undecodable or truncated line. The JSONL
datasource here streams raw *bytes* per line instead; decoding happens in the annotate step,
where a bad line is quarantined with its reason rather than failing the job.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pyarrow as pa
from ray.data.datasource.file_based_datasource import FileBasedDatasource

if TYPE_CHECKING:
    import ray.data

RAW_SCHEMA = pa.schema([("raw", pa.binary()), ("source", pa.string()), ("line", pa.int64())])

JSONL_EXTENSIONS = ["jsonl", "json", "jsonl.gz", "json.gz", "jsonl.zst", "json.zst", "ndjson"]


class JsonlLinesDatasource(FileBasedDatasource):
    """One row per line: raw bytes, the file it came from, its 1-based line number."""

    _FILE_EXTENSIONS = JSONL_EXTENSIONS

    def __init__(self, paths: str | list[str], *, rows_per_block: int = 4096, chunk_bytes: int = 8 << 20, **kwargs):
        super().__init__(paths, **kwargs)
        self.rows_per_block = rows_per_block
        self.chunk_bytes = chunk_bytes

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        raws: list[bytes] = []
        lines: list[int] = []
        n = 0
        tail = b""

        def flush() -> pa.Table:
            table = pa.table({"raw": raws, "source": [path] * len(raws), "line": lines}, schema=RAW_SCHEMA)
            raws.clear()
            lines.clear()
            return table

        while True:
            chunk = f.read(self.chunk_bytes)
            if not chunk:
                break
            parts = (tail + chunk).split(b"\n")
            tail = parts.pop()
            for part in parts:
                n += 1
                raws.append(part.rstrip(b"\r"))
                lines.append(n)
                if len(raws) >= self.rows_per_block:
                    yield flush()
        if tail.strip():
            n += 1
            raws.append(tail.rstrip(b"\r"))
            lines.append(n)
        if raws:
            yield flush()


def read_jsonl_lines(paths: list[str]) -> ray.data.Dataset:
    import ray.data

    return ray.data.read_datasource(JsonlLinesDatasource(paths))


def is_jsonl(path: str) -> bool:
    return any(path.endswith("." + ext) for ext in JSONL_EXTENSIONS)
