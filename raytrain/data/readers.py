"""Reading raw corpora into Ray Data without losing a row.

Ray's own JSON reader fails a whole task on one undecodable or truncated line. The JSONL
datasource here streams raw *bytes* per line instead; decoding happens in the annotate step,
where a bad line is quarantined with its reason rather than failing the job.
"""

from __future__ import annotations

import json
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
    return read_raw_rows("jsonl", paths)


def is_jsonl(path: str) -> bool:
    return any(path.endswith("." + ext) for ext in JSONL_EXTENSIONS)


# ---------------------------------------------------------------------------------- whole-file sources
#
# Text, HTML and WARC inputs become the same raw rows as JSONL: one JSON object per document (id,
# url, text) as bytes, so one annotate step handles every format. Bytes that are not valid UTF-8 are
# passed through unwrapped, so the annotate step quarantines them ('bad_utf8') like a bad JSONL line.

TEXT_EXTENSIONS = ["txt", "text", "md"]
HTML_EXTENSIONS = ["html", "htm", "xhtml"]
WARC_EXTENSIONS = ["warc", "warc.gz"]


def _as_raw(doc_id: str, url: str, body: bytes, charset: str | None = None) -> bytes:
    for enc in (charset, "utf-8"):
        if not enc:
            continue
        try:
            text = body.decode(enc)
        except (UnicodeDecodeError, LookupError):
            continue
        return json.dumps({"id": doc_id, "url": url, "text": text}, ensure_ascii=False).encode("utf-8")
    return body


class WholeFileDatasource(FileBasedDatasource):
    """One row per file (text or HTML): the file's bytes wrapped as a JSON document, id = its path."""

    _FILE_EXTENSIONS = TEXT_EXTENSIONS + HTML_EXTENSIONS

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        body = f.readall()
        yield pa.table({"raw": [_as_raw(path, "", body)], "source": [path], "line": [1]}, schema=RAW_SCHEMA)


class WarcDatasource(FileBasedDatasource):
    """One row per WARC 'response' record with an HTML/text payload, or per 'conversion' (WET) record.

    `line` is the record's position in the file; the id is the WARC-Record-ID, the url WARC-Target-URI.
    """

    _FILE_EXTENSIONS = WARC_EXTENSIONS

    def __init__(self, paths: str | list[str], *, rows_per_block: int = 1024, **kwargs):
        super().__init__(paths, **kwargs)
        self.rows_per_block = rows_per_block

    def _open_input_source(self, filesystem, path: str, **open_args) -> pa.NativeFile:
        # warcio reads gzip member by member itself; Arrow must not decompress '.warc.gz' for it.
        open_args["compression"] = None
        return filesystem.open_input_stream(path, **open_args)

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        from warcio.archiveiterator import ArchiveIterator

        raws: list[bytes] = []
        lines: list[int] = []
        for n, record in enumerate(ArchiveIterator(f), 1):
            if record.rec_type not in ("response", "conversion", "resource"):
                continue
            charset = None
            if record.rec_type == "response":
                ctype = (record.http_headers.get_header("Content-Type") or "") if record.http_headers else ""
                if "html" not in ctype and "text" not in ctype:
                    continue
                if "charset=" in ctype:
                    charset = ctype.split("charset=", 1)[1].split(";")[0].strip().strip('"') or None
            doc_id = record.rec_headers.get_header("WARC-Record-ID") or f"{path}:{n}"
            url = record.rec_headers.get_header("WARC-Target-URI") or ""
            raws.append(_as_raw(doc_id.strip("<>"), url, record.content_stream().read(), charset))
            lines.append(n)
            if len(raws) >= self.rows_per_block:
                yield pa.table({"raw": raws, "source": [path] * len(raws), "line": lines}, schema=RAW_SCHEMA)
                raws, lines = [], []
        if raws:
            yield pa.table({"raw": raws, "source": [path] * len(raws), "line": lines}, schema=RAW_SCHEMA)


def format_of(path: str) -> str | None:
    """'jsonl', 'parquet', 'text', 'html' or 'warc' by extension; None for a file of unknown type."""
    p = path.lower()
    for kind, exts in (("jsonl", JSONL_EXTENSIONS), ("parquet", ["parquet"]), ("text", TEXT_EXTENSIONS),
                       ("html", HTML_EXTENSIONS), ("warc", WARC_EXTENSIONS)):
        if any(p.endswith("." + e) for e in exts):
            return kind
    return None


def read_tasks(num_files: int) -> int:
    """Read tasks for `num_files` input files: one per file up to max(200, 2 x cluster CPUs).

    Ray's default would size read tasks by bytes and run a corpus of a few small files as a single task
    on one node; one task per file lets every node of the cluster read from the first pass on.
    """
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    return max(1, min(num_files, max(200, 2 * cpus)))


def read_raw_rows(kind: str, paths: list[str]) -> ray.data.Dataset:
    """Raw rows (raw bytes, source, line) of files of one line- or document-oriented kind."""
    import ray.data

    blocks = read_tasks(len(paths))
    if kind == "jsonl":
        return ray.data.read_datasource(JsonlLinesDatasource(paths), override_num_blocks=blocks)
    if kind in ("text", "html"):
        return ray.data.read_datasource(WholeFileDatasource(paths, file_extensions=None), override_num_blocks=blocks)
    if kind == "warc":
        return ray.data.read_datasource(WarcDatasource(paths, file_extensions=None), override_num_blocks=blocks)
    raise ValueError(f"not a raw-row format: {kind}")
