"""Reading raw corpora into Ray Data without losing a row, and counting what was read.

Ray's own JSON reader fails a whole task on one undecodable or truncated line. The JSONL
datasource here streams raw *bytes* per line instead; decoding happens in the annotate step,
where a bad line is quarantined with its reason rather than failing the job.

Rows read are counted at the source, apart from the rows the read emits: the JSONL reader counts
newlines in the bytes, the WARC reader counts records, and each writes its file's count next to the
stage's outputs (``report_rows``) when it has read the whole file. The stage compares these counts with
kept + removed + quarantined per file (``raytrain.data.pipeline.check_accounting``); a row lost anywhere
between the read and the outputs fails the stage.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

import pyarrow as pa
from ray.data.datasource.file_based_datasource import FileBasedDatasource

from raytrain import storage

if TYPE_CHECKING:
    import ray.data

RAW_SCHEMA = pa.schema([("raw", pa.binary()), ("source", pa.string()), ("line", pa.int64())])
# WARC rows also say why the reader already knows a record is no document ('' for a document).
WARC_SCHEMA = pa.schema([*RAW_SCHEMA, ("reason", pa.string())])


def report_rows(count_dir: str | None, path: str, rows: int) -> None:
    """Record that `path` holds `rows` rows. Idempotent: a retried read task writes the same file again."""
    if count_dir:
        name = hashlib.blake2b(path.encode(), digest_size=16).hexdigest() + ".json"
        storage.write_json(storage.join(count_dir, name), {"path": path, "rows": rows})


def reported_rows(count_dir: str) -> dict[str, int]:
    """{path: rows} of every file a read task reported on (see `report_rows`)."""
    import pyarrow.fs as pafs

    if not storage.exists(count_dir):
        return {}
    fs, p = storage.filesystem(count_dir)
    out: dict[str, int] = {}
    for info in fs.get_file_info(pafs.FileSelector(p)):
        if info.type == pafs.FileType.File and info.base_name.endswith(".json"):
            with fs.open_input_stream(info.path) as f:
                entry = json.loads(f.read())
            out[entry["path"]] = int(entry["rows"])
    return out

JSONL_EXTENSIONS = ["jsonl", "json", "jsonl.gz", "json.gz", "jsonl.zst", "json.zst", "ndjson"]


class JsonlLinesDatasource(FileBasedDatasource):
    """One row per line: raw bytes, the file it came from, its 1-based line number."""

    _FILE_EXTENSIONS = JSONL_EXTENSIONS

    def __init__(self, paths: str | list[str], *, rows_per_block: int = 4096, chunk_bytes: int = 8 << 20,
                 count_dir: str | None = None, **kwargs):
        super().__init__(paths, **kwargs)
        self.rows_per_block = rows_per_block
        self.chunk_bytes = chunk_bytes
        self.count_dir = count_dir

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        raws: list[bytes] = []
        lines: list[int] = []
        n = 0
        tail = b""
        # The count of lines, kept apart from the splitting below: newline bytes, plus a last line
        # without a newline unless it is blank (the splitter's rule, counted from the bytes).
        newlines, open_line = 0, False

        def flush() -> pa.Table:
            table = pa.table({"raw": raws, "source": [path] * len(raws), "line": lines}, schema=RAW_SCHEMA)
            raws.clear()
            lines.clear()
            return table

        while True:
            chunk = f.read(self.chunk_bytes)
            if not chunk:
                break
            newlines += chunk.count(b"\n")
            last = chunk.rfind(b"\n")
            open_line = bool(chunk[last + 1:].strip()) if last >= 0 else open_line or bool(chunk.strip())
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
        report_rows(self.count_dir, path, newlines + open_line)


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
    """One row per WARC record, in file order; `line` is the record's position in the file.

    Documents: 'response' records with an HTML/text payload, 'resource' records with a text payload and
    'conversion' (WET) records; their id is the WARC-Record-ID, their url WARC-Target-URI. Every other
    record (warcinfo, request, metadata, revisit, a response carrying an image …) is a row too, with
    `reason` 'warc_record:<type>' (or 'warc_record:<type>_non_text'), so the stage counts it as removed
    rather than dropping it unseen.
    """

    _FILE_EXTENSIONS = WARC_EXTENSIONS

    def __init__(self, paths: str | list[str], *, rows_per_block: int = 1024, count_dir: str | None = None,
                 **kwargs):
        super().__init__(paths, **kwargs)
        self.rows_per_block = rows_per_block
        self.count_dir = count_dir

    def _open_input_source(self, filesystem, path: str, **open_args) -> pa.NativeFile:
        # warcio reads gzip member by member itself; Arrow must not decompress '.warc.gz' for it.
        open_args["compression"] = None
        return filesystem.open_input_stream(path, **open_args)

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        from warcio.archiveiterator import ArchiveIterator

        rows: dict[str, list] = {"raw": [], "source": [], "line": [], "reason": []}

        def flush() -> pa.Table:
            table = pa.table(rows, schema=WARC_SCHEMA)
            for v in rows.values():
                v.clear()
            return table

        n = 0
        for n, record in enumerate(ArchiveIterator(f), 1):
            reason, charset = warc_reason(record)
            doc_id = (record.rec_headers.get_header("WARC-Record-ID") or f"{path}:{n}").strip("<>")
            url = record.rec_headers.get_header("WARC-Target-URI") or ""
            if reason:
                raw = json.dumps({"id": doc_id, "url": url, "text": ""}).encode()
            else:
                raw = _as_raw(doc_id, url, record.content_stream().read(), charset)
            for k, v in (("raw", raw), ("source", path), ("line", n), ("reason", reason)):
                rows[k].append(v)
            if len(rows["raw"]) >= self.rows_per_block:
                yield flush()
        if rows["raw"]:
            yield flush()
        report_rows(self.count_dir, path, n)


def warc_reason(record) -> tuple[str, str | None]:
    """('', payload charset) for a record that is a document; ('warc_record:…', None) for one that is not."""
    kind = record.rec_type or "unknown"
    if kind not in ("response", "conversion", "resource"):
        return f"warc_record:{kind}", None
    if kind == "conversion":
        return "", None
    if kind == "response":
        ctype = (record.http_headers.get_header("Content-Type") or "") if record.http_headers else ""
    else:
        ctype = record.rec_headers.get_header("Content-Type") or "text/plain"
    if "html" not in ctype and "text" not in ctype:
        return f"warc_record:{kind}_non_text", None
    charset = None
    if "charset=" in ctype:
        charset = ctype.split("charset=", 1)[1].split(";")[0].strip().strip('"') or None
    return "", charset


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


def read_raw_rows(kind: str, paths: list[str], count_dir: str | None = None) -> ray.data.Dataset:
    """Raw rows (raw bytes, source, line) of files of one line- or document-oriented kind.

    With `count_dir`, the JSONL and WARC readers report each file's row count there (`reported_rows`);
    a text or HTML file is one row by definition.
    """
    import ray.data

    blocks = read_tasks(len(paths))
    if kind == "jsonl":
        return ray.data.read_datasource(JsonlLinesDatasource(paths, count_dir=count_dir), override_num_blocks=blocks)
    if kind in ("text", "html"):
        return ray.data.read_datasource(WholeFileDatasource(paths, file_extensions=None), override_num_blocks=blocks)
    if kind == "warc":
        return ray.data.read_datasource(WarcDatasource(paths, file_extensions=None, count_dir=count_dir),
                                        override_num_blocks=blocks)
    raise ValueError(f"not a raw-row format: {kind}")


def parquet_rows(paths: list[str]) -> dict[str, int]:
    """{path as Ray reports it: rows} from each Parquet file's footer, read before any row is."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    def rows(path: str) -> tuple[str, int]:
        fs, p = storage.filesystem(path)
        with fs.open_input_file(p) as f:
            return p, pq.ParquetFile(f).metadata.num_rows

    with ThreadPoolExecutor(max_workers=min(16, max(1, len(paths)))) as pool:
        return dict(pool.map(rows, paths))


class ParquetTablesDatasource(FileBasedDatasource):
    """Prepared Parquet shards (token arrays) as written by a stage, one block per file, tensor columns intact.

    What `ray.data.read_parquet` does for these files, without its file-listing and metadata tasks, which cost
    10-25 s per read on a small cluster: the stages read already-listed shard directories several times each.
    """

    _FILE_EXTENSIONS: ClassVar[list[str]] = ["parquet"]

    def __init__(self, paths: list[str], columns: list[str] | None = None, **kwargs: object) -> None:
        super().__init__(paths, **kwargs)
        self.columns = columns

    def _open_input_source(self, filesystem: pa.fs.FileSystem, path: str, **open_args: object) -> pa.NativeFile:
        return filesystem.open_input_file(path)  # Parquet needs random access (the footer first)

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        import pyarrow.parquet as pq

        yield pq.read_table(f, columns=self.columns)


def parquet_files(path: str) -> list[str]:
    """The Parquet files under a directory (or the file itself), sorted: the same order on every read."""
    import pyarrow.fs as pafs

    fs, p = storage.filesystem(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.File:
        return [path]
    scheme = path[: path.index("://") + 3] if storage.is_uri(path) else ""
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(p, recursive=True))
             if i.type == pafs.FileType.File and i.path.endswith(".parquet")]
    return [scheme + f if scheme and not f.startswith(scheme) else f for f in sorted(files)]


def read_prepared(path: str, columns: list[str] | None = None) -> ray.data.Dataset:
    """A stage's Parquet output (a directory of shards, local or object store) as a Dataset, in file order."""
    import ray.data

    files = parquet_files(path)
    if not files:
        raise FileNotFoundError(f"no Parquet files under {path}")
    return ray.data.read_datasource(ParquetTablesDatasource(files, columns=columns), override_num_blocks=len(files))
