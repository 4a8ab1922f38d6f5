"""Post-training data (SFT demonstrations, preference pairs, RL prompts) through Ray Data, accounted like the corpus.

`prepare_posttrain_data` reads JSONL or Parquet files, renders every row into token ids (and a loss mask),
quarantines malformed rows with a reason, removes exact duplicates, splits train/val by a stable hash and writes
fixed-size token arrays as Parquet. Every row read at the source is exactly one of kept, removed or quarantined,
file by file; the stage fails (`AccountingError`) otherwise.

Row formats, decided per row by the fields present (field names come from the spec):

* SFT: ``messages`` (a list of ``{role, content}``, roles system/user/assistant, at least one assistant turn),
  or ``prompt`` + ``completion``, each a string (plain text) or a list of messages (conversational).
* Preference: ``prompt`` + ``chosen`` + ``rejected`` (strings or message lists), or ``chosen`` + ``rejected`` with
  an implicit prompt: the longest common prefix of the two (of messages for lists; of characters for strings,
  moved back before a space so a response starts with its space, as TRL's ``extract_prompt`` does).
* Prompt (online RL: PPO / GRPO): ``prompt`` (a non-empty string, or a list of messages whose last one is a user
  turn) and an optional ``ground_truth`` (any JSON value, handed to reward functions). No response: the policy
  samples it.

Rendering follows TRL: strings are plain text, ``prompt + completion + EOS``, no chat template; message lists go
through the tokenizer's chat template. An RL prompt has no loss mask: a string is encoded as is (no EOS), a message
list rendered with the generation prompt, so that sampling starts the assistant's turn. The loss mask marks the
tokens that are prediction targets, aligned with the ids (not shifted): for strings the completion and its EOS; for
messages the content and end-of-turn tokens of every trained turn (every assistant turn of a ``messages`` row; the
completion / chosen / rejected messages otherwise), never the turn's header. The mask is found by rendering
prefixes of the conversation (with and without the generation prompt) and diffing their token ids; a template whose
renders are not prefixes of one another would give a wrong mask, so such a row is quarantined instead.

Truncation policy (the spec's `max_prompt_length` / `max_length`): the prompt is every token before the first loss
token. A prompt longer than `max_prompt_length` keeps its last `max_prompt_length` tokens (the ones next to the
response); then the response is cut from its end so prompt + response fit in `max_length`. A row with no loss
token left would be quarantined (``truncated_to_nothing``); since the response begins with a loss token and keeps at
least `max_length - max_prompt_length` tokens, that is a guard rather than a case. Preference rows truncate the
shared prompt once and both responses with it. RL prompts keep their last `max_prompt_length` tokens too.

Quarantine reasons (stable; also `QUARANTINE_REASONS`): ``unparseable_json``, ``bad_utf8``, ``blank_line``,
``too_large``, ``not_an_object``, ``missing_field:<field>``, ``bad_type:<field>``, ``mixed_types``,
``bad_message``, ``bad_role``, ``non_string_content``, ``empty_content``, ``empty_prompt``, ``empty_response``,
``no_assistant_turn``, ``non_assistant_response``, ``identical_pair``, ``prompt_ends_with_assistant``,
``prompt_ends_with_system``, ``template_error``, ``template_not_prefix_consistent``, ``truncated_to_nothing``,
``prepare_error:<exception>``. Removal reason: ``duplicate`` (same normalized example: the roles, contents and
trained turns, the prompt and responses after implicit-prompt extraction, or an RL prompt and its ground truth; JSON
formatting, key order and extra fields do not count). Of a group of duplicates the row with the smallest (source
file, line) is kept.

Split: ``val`` when a hash of (salt, normalized example) falls below `val_fraction`, so duplicates and reruns land in
the same split. ``row_id`` is that example hash.

Layout under `out` (datasets/<name>/): ``train/`` and ``val/`` Parquet (columns: `SFT_COLUMNS`, `PAIR_COLUMNS` or
`PROMPT_COLUMNS`; arrays padded with the PAD id to `max_length`, an RL prompt's ``prompt_ids`` to
`max_prompt_length`; an RL prompt's ``prompt_text`` is what a reward function receives, the string prompt or the
content of the last user message, and ``ground_truth`` the value's JSON text, ``null`` when absent),
``quarantine/*.jsonl`` and ``removed/*.jsonl`` (source, line, reason, a sample of the raw row), ``report.json``
(counts and a few samples per reason) and ``manifest.json``, written last: a manifest always describes complete
data. Its ``key`` hashes everything the output depends on; a call whose key matches the manifest on disk returns it
without touching the data.

One Ray Data execution does the work: read -> render (map_batches) -> dedup (groupby on the example key) -> sink
(removed / quarantined rows to JSONL, per-block counts to a small file, kept rows on) -> Parquet write by split.
Rows read are counted at the source (JSONL newlines by the reader, Parquet footers) as in the corpus pipeline, and
compared file by file with the sink's counts; the kept count is compared with the written Parquet footers.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from ray.data.datasource.file_based_datasource import FileBasedDatasource

from raytrain import storage
from raytrain.data.documents import parse_jsonl_line, split_of
from raytrain.data.pipeline import (
    AccountingError,
    _move_partition,
    _shuffle_partitions,
    _source_name,
    check_accounting,
    expand_inputs,
)
from raytrain.data.readers import (
    RAW_SCHEMA,
    JsonlLinesDatasource,
    parquet_rows,
    read_tasks,
    report_rows,
    reported_rows,
)
from raytrain.errors import StageInputError

if TYPE_CHECKING:
    from raytrain.config.schema import PostTrainDataSpec

log = logging.getLogger(__name__)

__all__ = ["PAIR_COLUMNS", "PROMPT_COLUMNS", "QUARANTINE_REASONS", "SFT_COLUMNS", "AccountingError",
           "prepare_posttrain_data"]

# Bump when the output for the same inputs changes: the cache key includes it.
PREP_VERSION = 1
ROLES = ("system", "user", "assistant")
KEPT, REMOVED, QUARANTINED = "kept", "removed", "quarantined"
# A JSONL line longer than this is quarantined unparsed: no sane example is, and parsing it costs memory.
MAX_LINE_BYTES = 32 << 20
SHUFFLE_PARTITION_BYTES = 64 << 20

SFT_COLUMNS = ("input_ids", "loss_mask", "num_tokens", "row_id")
PAIR_COLUMNS = ("chosen_ids", "chosen_mask", "chosen_len", "rejected_ids", "rejected_mask", "rejected_len",
                "prompt_len", "row_id")
PROMPT_COLUMNS = ("prompt_ids", "prompt_len", "prompt_text", "ground_truth", "row_id")
COLUMNS = {"sft": SFT_COLUMNS, "preference": PAIR_COLUMNS, "prompt": PROMPT_COLUMNS}
KINDS = tuple(COLUMNS)
ARRAY_DTYPES = {"input_ids": np.int32, "loss_mask": np.int8, "chosen_ids": np.int32, "chosen_mask": np.int8,
                "rejected_ids": np.int32, "rejected_mask": np.int8, "prompt_ids": np.int32}
# Final columns holding text; the others are int32 scalars or the arrays above.
STRING_COLUMNS = ("row_id", "prompt_text", "ground_truth")
# Columns of the intermediate rows besides the final ones: provenance and accounting.
META_COLUMNS = ("status", "reason", "split", "source", "line", "sample", "key", "dup_source", "dup_line",
                "tokens", "loss_tokens")

QUARANTINE_REASONS = {
    "unparseable_json": "the line is not valid JSON",
    "bad_utf8": "the line is not valid UTF-8",
    "blank_line": "an empty line inside a JSONL file",
    "too_large": f"a JSONL line over {MAX_LINE_BYTES} bytes",
    "not_an_object": "the JSON value is not an object",
    "missing_field:<field>": "a field the row's format needs is absent or null",
    "bad_type:<field>": "a field is neither a string nor a list of messages (messages: not a list)",
    "mixed_types": "prompt and response(s) are not all strings or all message lists",
    "bad_message": "a message that is not an object",
    "bad_role": "a message role that is missing or not system/user/assistant",
    "non_string_content": "a message content that is missing or not a string",
    "empty_content": "a prompt-side message with empty (whitespace-only) content",
    "empty_prompt": "no prompt: an empty prompt string or message list, or no message before the first trained turn",
    "empty_response": "an empty completion / chosen / rejected, or a trained turn with empty content",
    "no_assistant_turn": "a messages row without an assistant turn",
    "non_assistant_response": "a completion / chosen / rejected message whose role is not assistant",
    "identical_pair": "chosen and rejected are the same",
    "prompt_ends_with_assistant": "an RL prompt (message list) whose last message is an assistant turn",
    "prompt_ends_with_system": "an RL prompt (message list) whose last message is a system message",
    "template_error": "the chat template raised on the conversation",
    "template_not_prefix_consistent": "renders of the conversation's prefixes are not prefixes of the whole",
    # A guard: the response starts with a loss token and keeps max_length - max_prompt_length >= 1 tokens, so this
    # cannot happen while the spec validates (max_prompt_length < max_length); it would if the policy changed.
    "truncated_to_nothing": "no loss token left after truncation",
    "prepare_error:<exception>": "rendering raised unexpectedly (a bug; the row is kept aside, the stage goes on)",
}
REMOVAL_REASONS = {"duplicate": "the same normalized example as a row kept earlier (smallest source file, line)"}

# Files of a Hugging Face tokenizer directory (a model export has weights next to them: those stay behind).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json")


class Quarantine(Exception):
    """A row is malformed; `reason` is one of `QUARANTINE_REASONS`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------------------------------------- tokenizer


def tokenizer_files(tokenizer_dir: str) -> dict[str, bytes]:
    """The tokenizer files of a Hugging Face directory (local path or URI), by name; tokenizer.json is required."""
    with storage.local_dir(tokenizer_dir) as d:
        files = {name: (d / name).read_bytes() for name in _TOKENIZER_FILES if (d / name).is_file()}
    if "tokenizer.json" not in files:
        raise StageInputError(f"no tokenizer.json in {tokenizer_dir}: give a Hugging Face tokenizer directory")
    return files


def files_sha(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(sha: str, files_ref: Any) -> Any:
    """The tokenizer, loaded once per worker process from the files shipped with the tasks (no shared FS).

    Cached by the files' hash, not by the object reference: a cached reference would pin the files in the object
    store for the worker's life, and each call of the stage puts them anew.
    """
    if sha not in _TOKENIZERS:
        import ray
        from transformers import PreTrainedTokenizerFast  # not AutoTokenizer: that imports torch (seconds per worker)

        files = ray.get(files_ref) if isinstance(files_ref, ray.ObjectRef) else files_ref
        with tempfile.TemporaryDirectory(prefix="raytrain-tok-") as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            tok = PreTrainedTokenizerFast.from_pretrained(tmp)
        _TOKENIZERS.clear()  # one tokenizer per worker at a time: a stage uses one
        _TOKENIZERS[sha] = tok
    return _TOKENIZERS[sha]


@functools.lru_cache(maxsize=4)
def _spec_of(spec_json: str) -> PostTrainDataSpec:
    from raytrain.config.schema import PostTrainDataSpec

    return PostTrainDataSpec.model_validate_json(spec_json)


# ----------------------------------------------------------------------------------------------- parsing


def _messages(value: Any, field: str) -> list[dict[str, str]]:
    """Validated `{role, content}` messages (other keys dropped: they are not rendered)."""
    if not isinstance(value, list):
        raise Quarantine(f"bad_type:{field}")
    out = []
    for m in value:
        if not isinstance(m, dict):
            raise Quarantine("bad_message")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise Quarantine("bad_role")
        if not isinstance(content, str):
            raise Quarantine("non_string_content")
        out.append({"role": role, "content": content})
    return out


def _field(record: dict[str, Any], name: str) -> Any:
    value = record.get(name)
    if value is None:  # absent, or null (a Parquet column this row has no value in)
        raise Quarantine(f"missing_field:{name}")
    return value


def _kind_of(values: list[tuple[str, Any]]) -> str:
    """'text' when every value is a string, 'chat' when every one is a list; quarantines anything else."""
    for name, v in values:
        if not isinstance(v, (str, list)):
            raise Quarantine(f"bad_type:{name}")
    kinds = {isinstance(v, str) for _, v in values}
    if len(kinds) > 1:
        raise Quarantine("mixed_types")
    return "text" if kinds.pop() else "chat"


def _check_chat(messages: list[dict[str, str]], trained: list[bool]) -> None:
    if not any(trained):
        raise Quarantine("empty_response")
    if not any(not t for t in trained[: trained.index(True)]):
        raise Quarantine("empty_prompt")
    for m, t in zip(messages, trained, strict=True):
        if not m["content"].strip():
            raise Quarantine("empty_response" if t else "empty_content")


def _responses(msgs: list[dict[str, str]]) -> None:
    if not msgs:
        raise Quarantine("empty_response")
    for m in msgs:
        if m["role"] != "assistant":
            raise Quarantine("non_assistant_response")


def parse_sft(record: dict[str, Any], spec: PostTrainDataSpec) -> tuple[str, Any]:
    """('text', (prompt, completion)) or ('chat', (messages, trained flags)) of one SFT row."""
    if record.get(spec.messages_field) is not None:
        msgs = _messages(record[spec.messages_field], spec.messages_field)
        trained = [m["role"] == "assistant" for m in msgs]
        if not any(trained):
            raise Quarantine("no_assistant_turn")
        _check_chat(msgs, trained)
        return "chat", (msgs, trained)
    if record.get(spec.prompt_field) is None and record.get(spec.completion_field) is None:
        raise Quarantine(f"missing_field:{spec.messages_field}")
    prompt, completion = _field(record, spec.prompt_field), _field(record, spec.completion_field)
    if _kind_of([(spec.prompt_field, prompt), (spec.completion_field, completion)]) == "text":
        if not prompt.strip():
            raise Quarantine("empty_prompt")
        if not completion.strip():
            raise Quarantine("empty_response")
        return "text", (prompt, completion)
    p, c = _messages(prompt, spec.prompt_field), _messages(completion, spec.completion_field)
    _responses(c)
    trained = [False] * len(p) + [True] * len(c)
    _check_chat(p + c, trained)
    return "chat", (p + c, trained)


def _common_prefix(a: list[Any] | str, b: list[Any] | str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def parse_pair(record: dict[str, Any], spec: PostTrainDataSpec) -> tuple[str, Any]:
    """('text', (prompt, chosen, rejected)) or ('chat', (prompt msgs, chosen msgs, rejected msgs)) of one pair."""
    chosen, rejected = _field(record, spec.chosen_field), _field(record, spec.rejected_field)
    explicit = record.get(spec.prompt_field) is not None
    values = [(spec.chosen_field, chosen), (spec.rejected_field, rejected)]
    if explicit:
        values.insert(0, (spec.prompt_field, record[spec.prompt_field]))
    kind = _kind_of(values)
    if kind == "text":
        prompt = record[spec.prompt_field] if explicit else ""
        if not explicit:  # implicit prompt: the common prefix, cut before a space (TRL's extract_prompt)
            n = _common_prefix(chosen, rejected)
            if 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
                n -= 1
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if chosen == rejected:
            raise Quarantine("identical_pair")
        if not prompt.strip():
            raise Quarantine("empty_prompt")
        if not chosen.strip() or not rejected.strip():
            raise Quarantine("empty_response")
        return "text", (prompt, chosen, rejected)
    c, r = _messages(chosen, spec.chosen_field), _messages(rejected, spec.rejected_field)
    if explicit:
        p = _messages(record[spec.prompt_field], spec.prompt_field)
    else:
        n = _common_prefix(c, r)
        p, c, r = c[:n], c[n:], r[n:]
    if c == r:
        raise Quarantine("identical_pair")
    for resp in (c, r):
        _responses(resp)
        _check_chat(p + resp, [False] * len(p) + [True] * len(resp))
    return "chat", (p, c, r)


def parse_prompt(record: dict[str, Any], spec: PostTrainDataSpec) -> tuple[str, Any]:
    """('text', (prompt, ground truth)) or ('chat', (messages, ground truth)) of one RL prompt row.

    The ground truth is any JSON value, None when the field is absent or null.
    """
    prompt = _field(record, spec.prompt_field)
    ground_truth = record.get(spec.ground_truth_field)
    if _kind_of([(spec.prompt_field, prompt)]) == "text":
        if not prompt.strip():
            raise Quarantine("empty_prompt")
        return "text", (prompt, ground_truth)
    msgs = _messages(prompt, spec.prompt_field)
    if not msgs:
        raise Quarantine("empty_prompt")
    if msgs[-1]["role"] != "user":  # the policy answers the last user turn
        raise Quarantine(f"prompt_ends_with_{msgs[-1]['role']}")
    for m in msgs:
        if not m["content"].strip():
            raise Quarantine("empty_content")
    return "chat", (msgs, ground_truth)


def example_key(kind: str, parsed: Any) -> str:
    """Hash of the normalized example: what dedup compares, the split hashes and `row_id` is."""
    body = json.dumps([kind, parsed], ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.blake2b(body.encode(), digest_size=16).hexdigest()


# ----------------------------------------------------------------------------------------------- rendering


class Renderer:
    """Token ids, loss mask and prompt length of parsed examples, for one tokenizer and one length policy."""

    def __init__(self, tok: Any, max_length: int, max_prompt_length: int) -> None:
        self.tok = tok
        self.backend = tok.backend_tokenizer  # the Rust tokenizer: batch encode without per-call Python overhead
        self.eos = tok.eos_token_id
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def text(self, prompt: str, response: str) -> tuple[list[int], list[int], int]:
        p, r = self.encode([prompt, response])
        r = [*r, self.eos]
        return p + r, [0] * len(p) + [1] * len(r), len(p)

    def _render(self, messages: list[dict[str, str]], generation: bool) -> str:
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        except Exception as exc:  # jinja errors, templates that insist on alternating roles …
            log.debug("chat template raised %r", exc)
            raise Quarantine("template_error") from exc

    def chat(self, messages: list[dict[str, str]], trained: list[bool]) -> tuple[list[int], list[int], int]:
        """Ids of the whole conversation; mask = every trained turn's tokens after its generation prompt.

        Renders, in order, for each message i: the conversation up to i with the generation prompt (trained turns
        only) and the conversation through i. Each render must extend the previous one, as text and as token ids;
        then turn i's loss tokens are those between the two.
        """
        texts: list[str] = []
        spans: list[tuple[int, int]] = []  # (index of the generation render, index of the full render) per turn
        for i, t in enumerate(trained):
            if t:
                texts.append(self._render(messages[:i], True))
                spans.append((len(texts) - 1, len(texts)))
            texts.append(self._render(messages[: i + 1], False))
        for prev, cur in itertools.pairwise(texts):
            if not cur.startswith(prev):
                raise Quarantine("template_not_prefix_consistent")
        ids = self.encode(texts)
        for prev, cur in itertools.pairwise(ids):
            if cur[: len(prev)] != prev:  # a token merges across a turn boundary
                raise Quarantine("template_not_prefix_consistent")
        full = ids[-1]
        mask = [0] * len(full)
        for g, f in spans:
            for pos in range(len(ids[g]), len(ids[f])):
                mask[pos] = 1
        if not any(mask):
            raise Quarantine("empty_response")
        return full, mask, mask.index(1)

    def truncate(self, ids: list[int], mask: list[int], prompt_len: int,
                 keep: int | None = None) -> tuple[list[int], list[int], int]:
        """The truncation policy: the prompt's last `max_prompt_length` tokens, then the response to fit."""
        p = keep if keep is not None else min(prompt_len, self.max_prompt_length)
        room = self.max_length - p
        ids = ids[prompt_len - p: prompt_len + room]
        mask = mask[prompt_len - p: prompt_len + room]
        if not any(mask):
            raise Quarantine("truncated_to_nothing")
        return ids, mask, p

    def sft(self, kind: str, parsed: Any) -> tuple[list[int], list[int]]:
        ids, mask, pl = self.text(*parsed) if kind == "text" else self.chat(*parsed)
        ids, mask, _ = self.truncate(ids, mask, pl)
        return ids, mask

    def pair(self, kind: str, parsed: Any) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]], int]:
        if kind == "text":
            prompt, chosen, rejected = parsed
            c, r = self.text(prompt, chosen), self.text(prompt, rejected)
        else:
            p, chosen, rejected = parsed
            c = self.chat(p + chosen, [False] * len(p) + [True] * len(chosen))
            r = self.chat(p + rejected, [False] * len(p) + [True] * len(rejected))
        if c[2] != r[2] or c[0][: c[2]] != r[0][: r[2]]:  # the two renders disagree on the shared prompt
            raise Quarantine("template_not_prefix_consistent")
        keep = min(c[2], self.max_prompt_length)
        ci, cm, _ = self.truncate(*c, keep=keep)
        ri, rm, _ = self.truncate(*r, keep=keep)
        return (ci, cm), (ri, rm), keep

    def prompt(self, kind: str, parsed: Any) -> tuple[list[int], str]:
        """An RL prompt's ids (its last `max_prompt_length`) and the text a reward function receives."""
        value, _ = parsed
        if kind == "text":
            ids, text = self.encode([value])[0], value
        else:
            ids, text = self.encode([self._render(value, True)])[0], value[-1]["content"]
        if not ids:  # a guard: a non-blank string or a rendered template encodes to at least one token
            raise Quarantine("empty_prompt")
        return ids[-self.max_prompt_length:], text


# ----------------------------------------------------------------------------------------------- reading


class ParquetRecordsDatasource(FileBasedDatasource):
    """One raw row per Parquet record: the record as JSON bytes, its file, its 1-based row number in the file.

    The JSONL rows' shape (`raytrain.data.readers.RAW_SCHEMA`), so both formats take one path through the stage,
    files of different schemas mix freely, and a quarantined Parquet row says where it is. Rows are counted at the
    source from the file's footer and reported (`report_rows`) once the whole file was read. A record holding a
    value JSON cannot carry (bytes, a timestamp …) is passed on unwrapped, so it is quarantined as unparseable.
    """

    _FILE_EXTENSIONS: ClassVar[list[str]] = ["parquet"]

    def __init__(self, paths: str | list[str], *, rows_per_block: int = 4096, count_dir: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(paths, **kwargs)
        self.rows_per_block = rows_per_block
        self.count_dir = count_dir

    def _open_input_source(self, filesystem: Any, path: str, **open_args: Any) -> pa.NativeFile:
        return filesystem.open_input_file(path)  # Parquet needs random access (the footer first)

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(f)
        n = 0
        for batch in pf.iter_batches(batch_size=self.rows_per_block):
            raws = []
            for record in batch.to_pylist():
                try:
                    raws.append(json.dumps(record, ensure_ascii=False).encode())
                except (TypeError, ValueError):
                    raws.append(repr(record).encode("utf-8", errors="replace"))
            yield pa.table({"raw": raws, "source": [path] * len(raws), "line": list(range(n + 1, n + 1 + len(raws)))},
                           schema=RAW_SCHEMA)
            n += len(raws)
        report_rows(self.count_dir, path, pf.metadata.num_rows)


# ----------------------------------------------------------------------------------------------- the row UDF


def _sample(raw: bytes, limit: int) -> str:
    return raw[:limit].decode("utf-8", errors="replace")


def prepare_batch(batch: pa.Table, kind: str, spec_json: str, tok_sha: str, tok_ref: Any,
                  sample_bytes: int) -> dict[str, np.ndarray]:
    """Ray Data UDF: raw rows (raw bytes, source file, 1-based line or Parquet row number) -> one row each.

    Every input row becomes exactly one output row, kept or quarantined; a row whose rendering raises is
    quarantined (``prepare_error:<exception>``), never allowed to fail the task and the stage with it.
    """
    spec = _spec_of(spec_json)
    renderer = Renderer(_tokenizer(tok_sha, tok_ref), spec.max_length, spec.max_prompt_length)
    pad = renderer.tok.pad_token_id if renderer.tok.pad_token_id is not None else renderer.eos
    items = zip(batch.column("raw").to_pylist(), batch.column("source").to_pylist(),
                batch.column("line").to_pylist(), strict=True)
    rows = ((raw, source, line, *parse_jsonl_line(raw, MAX_LINE_BYTES)) for raw, source, line in items)
    # RL prompts have no response: their one array is the prompt, padded to max_prompt_length.
    n_max = spec.max_prompt_length if kind == "prompt" else spec.max_length
    names = {"sft": ("input_ids", "loss_mask"), "preference": ("chosen_ids", "chosen_mask", "rejected_ids",
                                                               "rejected_mask"), "prompt": ("prompt_ids",)}[kind]
    parse = {"sft": parse_sft, "preference": parse_pair, "prompt": parse_prompt}[kind]
    arrays = {n: [] for n in names}
    lens: dict[str, list[int]] = defaultdict(list)
    texts: dict[str, list[str]] = defaultdict(list)
    meta: dict[str, list[Any]] = {c: [] for c in META_COLUMNS} | {"row_id": []}
    for raw, source, line, record, error in rows:
        reason, key, outs, plen, extra = error, "", [], 0, {}
        if error == "invalid_json":
            reason = "unparseable_json"
        if not reason:
            try:
                fmt, parsed = parse(record, spec)
                key = example_key(f"{kind}-{fmt}", parsed)
                if kind == "sft":
                    outs = [renderer.sft(fmt, parsed)]
                elif kind == "preference":
                    c, r, plen = renderer.pair(fmt, parsed)
                    outs = [c, r]
                else:
                    ids, text = renderer.prompt(fmt, parsed)
                    outs = [(ids, [0] * len(ids))]
                    extra = {"prompt_text": text,
                             "ground_truth": json.dumps(parsed[1], ensure_ascii=False, separators=(",", ":"))}
            except Quarantine as q:
                reason = q.reason
            except Exception as exc:  # a bug on one row quarantines that row; the stage goes on
                log.warning("quarantined %s:%s: preparing it raised %r", source, line, exc)
                reason = f"prepare_error:{type(exc).__name__}"
        if reason:
            outs = [([], [])] * (2 if kind == "preference" else 1)
            extra = {"prompt_text": "", "ground_truth": ""}
            key = f"q:{source}:{line}"  # unique: quarantined rows are never duplicates of anything
        for j, (ids, mask) in enumerate(outs):
            arrays[names[2 * j]].append(ids)
            if kind != "prompt":
                arrays[names[2 * j + 1]].append(mask)
        tokens = sum(len(ids) for ids, _ in outs)
        if kind == "sft":
            lens["num_tokens"].append(len(outs[0][0]))
        elif kind == "preference":
            lens["chosen_len"].append(len(outs[0][0]))
            lens["rejected_len"].append(len(outs[1][0]))
            lens["prompt_len"].append(plen)
        else:
            lens["prompt_len"].append(len(outs[0][0]))
            for col in ("prompt_text", "ground_truth"):
                texts[col].append(extra[col])
        status = QUARANTINED if reason else KEPT
        split = split_of(key, spec.val_fraction, 0.0, spec.salt) if not reason else ""
        for col, value in (("status", status), ("reason", reason),
                           ("split", split), ("source", source), ("line", line),
                           ("sample", _sample(raw, sample_bytes) if reason else ""), ("key", key),
                           ("dup_source", ""), ("dup_line", 0), ("tokens", tokens),
                           ("loss_tokens", sum(sum(m) for _, m in outs)), ("row_id", "" if reason else key)):
            meta[col].append(value)
    out: dict[str, np.ndarray] = {}
    for name, seqs in arrays.items():
        pad_value = pad if name.endswith("_ids") else 0
        arr = np.full((len(seqs), n_max), pad_value, dtype=ARRAY_DTYPES[name])  # (rows, max_length)
        for i, s in enumerate(seqs):
            arr[i, : len(s)] = s
        out[name] = arr
    for name, values in lens.items():
        out[name] = np.asarray(values, dtype=np.int32)
    for name, values in texts.items():
        out[name] = np.asarray(values, dtype=object)
    for col, values in meta.items():
        if col in ("line", "dup_line", "tokens", "loss_tokens"):
            out[col] = np.asarray(values, dtype=np.int64)
        else:
            out[col] = np.asarray(values, dtype=object)
    return out


def mark_duplicates(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """map_groups UDF over one example key: keep the kept row with the smallest (source, line), remove the rest."""
    kept = [i for i, s in enumerate(group["status"]) if s == KEPT]
    if len(kept) < 2:
        return group
    kept.sort(key=lambda i: (str(group["source"][i]), int(group["line"][i])))
    first = kept[0]
    status, reason = (np.array(group[c], dtype=object, copy=True) for c in ("status", "reason"))
    dup_source = np.array(group["dup_source"], dtype=object, copy=True)
    dup_line = np.array(group["dup_line"], dtype=np.int64, copy=True)
    row_id = np.array(group["row_id"], dtype=object, copy=True)
    for i in kept[1:]:
        status[i], reason[i], row_id[i] = REMOVED, "duplicate", ""
        dup_source[i], dup_line[i] = group["source"][first], group["line"][first]
    return group | {"status": status, "reason": reason, "dup_source": dup_source, "dup_line": dup_line,
                    "row_id": row_id}


def sink_outcomes(batch: dict[str, np.ndarray], out: str, counts_dir: str, kind: str,
                  per_reason: int) -> dict[str, np.ndarray]:
    """map_batches UDF after dedup: removed / quarantined rows to JSONL, the block's counts to `counts_dir`, and the
    kept rows, with the final columns and their split, on to the Parquet write.

    One pass over the data instead of a write followed by two reads. Both files are named by a hash of the rows
    they describe (source, line, key, outcome), so a retried task rewrites the same files rather than adding to them.
    """
    status = [str(s) for s in batch["status"]]
    n = len(status)
    acc: dict[tuple[str, str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    samples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    lines: dict[str, list[str]] = {REMOVED: [], QUARANTINED: []}
    ident = hashlib.blake2b(digest_size=16)
    for i in range(n):
        reason, split, source, line = str(batch["reason"][i]), str(batch["split"][i]), str(batch["source"][i]), \
            int(batch["line"][i])
        ident.update(f"{source}\0{line}\0{batch['key'][i]}\0{status[i]}\n".encode())
        a = acc[(status[i], reason, split, source)]
        a[0] += 1
        a[1] += int(batch["tokens"][i])
        a[2] += int(batch["loss_tokens"][i])
        if status[i] == KEPT:
            continue
        entry: dict[str, Any] = {"source": source, "line": line, "reason": reason}
        if status[i] == REMOVED:
            entry["duplicate_of"] = {"source": str(batch["dup_source"][i]), "line": int(batch["dup_line"][i])}
        else:
            entry["sample"] = str(batch["sample"][i])
        lines[status[i]].append(json.dumps(entry, ensure_ascii=False))
        if len(samples[f"{status[i]}:{reason}"]) < per_reason:
            samples[f"{status[i]}:{reason}"].append(entry)
    name = ident.hexdigest()
    for st, sub in ((REMOVED, "removed"), (QUARANTINED, "quarantine")):
        if lines[st]:
            storage.write_bytes(storage.join(out, sub, name + ".jsonl"), ("\n".join(lines[st]) + "\n").encode())
    if n:
        storage.write_json(storage.join(counts_dir, name + ".json"), {
            "rows": [[*k, *v] for k, v in sorted(acc.items())], "samples": samples})
    keep = np.asarray([s == KEPT for s in status], dtype=bool)
    return {c: np.asarray(batch[c])[keep] for c in (*COLUMNS[kind], "split")}


# ----------------------------------------------------------------------------------------------- the stage


def _input_files(files: list[str]) -> list[list[Any]]:
    """[path, bytes, modification time (ns)] of each input file."""
    inputs = []
    for f in files:
        fs, p = storage.filesystem(f)
        info = fs.get_file_info(p)
        inputs.append([f, info.size, info.mtime_ns])
    return inputs


def _cache_key(kind: str, spec: PostTrainDataSpec, tok_sha: str, inputs: list[list[Any]], sample_bytes: int) -> str:
    """Everything the output depends on: the spec's rendering fields, the tokenizer, the input files as they are
    now (size and modification time, so an edited file is read again), the sample size and this code's version."""
    # name, source, paths and demo only say where the inputs come from: the file list above covers them.
    fields = spec.model_dump(mode="json", exclude={"name", "source", "paths", "demo"})
    body = json.dumps({"version": PREP_VERSION, "kind": kind, "spec": fields, "tokenizer": tok_sha,
                       "inputs": inputs, "sample_bytes": sample_bytes}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def _columns(kind: str, max_length: int, max_prompt_length: int) -> list[dict[str, Any]]:
    width = max_prompt_length if kind == "prompt" else max_length

    def col(name: str) -> dict[str, Any]:
        if name in ARRAY_DTYPES:
            return {"name": name, "dtype": np.dtype(ARRAY_DTYPES[name]).name, "shape": [width]}
        return {"name": name, "dtype": "string" if name in STRING_COLUMNS else "int32", "shape": []}

    return [col(c) for c in COLUMNS[kind]]


def _cached(manifest_path: str, key: str, out: str) -> dict[str, Any] | None:
    if not storage.exists(manifest_path):
        return None
    try:
        manifest = storage.read_json(manifest_path)
    except (OSError, ValueError):
        return None
    splits = manifest.get("splits", {})
    complete = all(storage.exists(storage.join(out, s)) for s in ("train", "val") if splits.get(s, {}).get("rows"))
    return manifest if manifest.get("key") == key and complete else None


def prepare_posttrain_data(kind: Literal["sft", "preference", "prompt"], spec: PostTrainDataSpec, tokenizer_dir: str,
                           out: str, *, input_paths: list[str] | None = None,
                           quarantine_sample_bytes: int = 4096, versioned: bool = False) -> dict[str, Any]:
    """Prepare SFT (`kind="sft"`), preference (`kind="preference"`) or RL prompt (`kind="prompt"`) data; returns the
    manifest.

    `tokenizer_dir`: a Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json with a chat template);
    its files travel with the Ray tasks, so workers need no shared filesystem. `out`: datasets/<name>/ (local path or
    object-store URI). `input_paths`: files or directories to read (default `spec.paths`; the caller resolves the
    demo source). When `out/manifest.json` has this call's cache key, it is returned without recomputing.
    `versioned`: `out` is the dataset's base directory and the data goes to `out/<first 12 digits of the key>/` (an
    immutable version; `out/latest.json` names the newest), as the stages use it. The manifest's `path` says where.
    Raises `StageInputError` on no readable input or no kept row, `AccountingError` when a row is lost.
    """
    import ray
    import ray.data

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, not {kind!r}")
    t0 = time.time()
    out = storage.normalize_root(out)
    paths = [storage.normalize_root(p) for p in (input_paths if input_paths is not None else spec.paths)]
    if not paths:
        raise StageInputError("no input paths: set data.paths (source 'files') or pass input_paths")
    by_kind, skipped = expand_inputs(paths, spec.format)
    for other in [k for k in by_kind if k not in ("jsonl", "parquet")]:
        skipped += by_kind.pop(other)  # text, HTML, WARC: corpus formats, not examples
    if skipped:
        log.warning("skipping %d files that are neither JSONL nor Parquet, e.g. %s", len(skipped), skipped[:3])
    files = sorted(f for fs in by_kind.values() for f in fs)
    if not files:
        raise StageInputError(f"no JSONL or Parquet files under {paths}")
    tok_files = tokenizer_files(tokenizer_dir)
    tok_json_sha = hashlib.sha256(tok_files["tokenizer.json"]).hexdigest()
    tok_sha = files_sha(tok_files)
    inputs = _input_files(files)
    input_bytes = sum(size or 0 for _, size, _ in inputs)
    key = _cache_key(kind, spec, tok_sha, inputs, quarantine_sample_bytes)
    base = out
    if versioned:
        out = storage.join(out, key[:12])
    manifest_path = storage.join(out, "manifest.json")
    cached = _cached(manifest_path, key, out)
    if cached is not None:
        log.info("post-training data %s is up to date (key %s): not recomputed", out, key[:12])
        if versioned:
            set_dataset_latest_dir(base, key[:12])
        return {**cached, "path": out}

    # The manifest goes first: from here until it is written again, no manifest points at partial data.
    _remove_file(manifest_path)
    _remove_file(storage.join(out, "report.json"))
    stage = storage.join(out, "_stage")
    for sub in ("train", "val", "quarantine", "removed", "_stage"):
        storage.remove_tree(storage.join(out, sub))

    # One Ray Data execution: read (rows counted at the source), render, dedup shuffle on the example key, sink the
    # outcomes, write the kept rows by split.
    count_dir, outcome_dir = storage.join(stage, "read"), storage.join(stage, "outcomes")
    tok_ref = ray.put(tok_files)
    spec_json = spec.model_dump_json()
    raw = _read_raw(by_kind, count_dir)
    prepared = raw.map_batches(prepare_batch, fn_args=(kind, spec_json, tok_sha, tok_ref, quarantine_sample_bytes),
                               batch_format="pyarrow", batch_size=256)
    # Shuffle partitions by input size: each is an aggregator actor to start, seconds apiece on a small cluster, and a
    # few thousand examples fit one; a large input gets one per CPU like the corpus's shuffles.
    partitions = min(_shuffle_partitions(), 1 + input_bytes // SHUFFLE_PARTITION_BYTES)
    (prepared.groupby("key", num_partitions=partitions)
     .map_groups(mark_duplicates, batch_format="numpy")
     .map_batches(sink_outcomes, fn_args=(out, outcome_dir, kind, 3), batch_format="numpy", batch_size=None)
     .write_parquet(storage.join(stage, "final"), partition_cols=["split"]))
    for s in ("train", "val"):
        _move_partition(storage.join(stage, "final"), f"split={s}", storage.join(out, s))

    # Accounting: every row read is exactly one of kept / removed / quarantined, file by file, and every kept row
    # is in the Parquet written (footer counts).
    # Both readers report each file's rows (JSONL: lines; Parquet: the footer's count) once they read it all.
    reported = reported_rows(count_dir)
    missing = [f for f in files if _source_name(f) not in reported]
    if missing:
        raise AccountingError(f"the read step reported no row count for {missing[:3]}: not read to the end, so their "
                              "rows cannot be accounted for")
    read_by_source = {_source_name(f): reported[_source_name(f)] for f in files}
    counts: dict[str, dict[str, int]] = {REMOVED: defaultdict(int), QUARANTINED: defaultdict(int)}
    splits = {s: {"rows": 0, "loss_tokens": 0, "tokens": 0} for s in ("train", "val")}
    accounted: dict[str, int] = defaultdict(int)
    samples: dict[str, list[Any]] = defaultdict(list)
    for part in _outcomes(outcome_dir):
        for status, reason, split, source, rows, tokens, loss_tokens in part["rows"]:
            accounted[source] += rows
            if status == KEPT:
                sp = splits[split]
                sp["rows"] += rows
                sp["tokens"] += tokens
                sp["loss_tokens"] += loss_tokens
            else:
                counts[status][reason] += rows
        for k, entries in part["samples"].items():
            samples[k] = sorted(samples[k] + entries, key=lambda e: (e["source"], e["line"]))[:3]
    n_kept = sum(s["rows"] for s in splits.values())
    n_removed, n_quarantined = sum(counts[REMOVED].values()), sum(counts[QUARANTINED].values())
    check_accounting(read_by_source, dict(accounted), n_kept, n_removed, n_quarantined, where=out)
    written = sum(sum(parquet_rows(_parquet_files(storage.join(out, s))).values()) for s in ("train", "val"))
    if written != n_kept:
        raise AccountingError(f"{n_kept} rows kept but {written} written to {out}/train and {out}/val")
    storage.remove_tree(stage)
    n_read = sum(read_by_source.values())
    if not n_kept:
        raise StageInputError(f"post-training data kept no rows of {n_read} read from {paths}; see {out}/quarantine")

    by_reason = dict(sorted({**counts[REMOVED], **counts[QUARANTINED]}.items()))
    report = {"kind": kind, "read": n_read, "kept": n_kept, "removed": dict(sorted(counts[REMOVED].items())),
              "quarantined": dict(sorted(counts[QUARANTINED].items())), "splits": splits, "skipped_files": skipped,
              "samples": dict(sorted(samples.items())), "seconds": round(time.time() - t0, 1)}
    storage.write_json(storage.join(out, "report.json"), report)
    manifest = {
        "manifest_version": 1,
        "kind": kind,
        "dataset": spec.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "counts": {"read": n_read, "kept": n_kept, "removed": n_removed, "quarantined": n_quarantined,
                   "by_reason": by_reason},
        "splits": splits,
        "max_length": spec.max_length,
        "max_prompt_length": spec.max_prompt_length,
        "tokenizer_sha256": tok_json_sha,
        "key": key,
        "version": key[:12] if versioned else None,
        "path": out,
        "sources": [{"path": f, "rows": read_by_source.get(_source_name(f), 0)} for f in files],
        "skipped_files": skipped,
        "columns": _columns(kind, spec.max_length, spec.max_prompt_length),
        "data_spec": spec.model_dump(mode="json"),
    }
    storage.write_json(manifest_path, manifest)  # last: the commit point
    if versioned:
        set_dataset_latest_dir(base, key[:12])
    log.info("post-training %s data %s in %.1fs: read %d, kept %d (train %d, val %d), removed %d, quarantined %d",
             kind, spec.name, time.time() - t0, n_read, n_kept, splits["train"]["rows"], splits["val"]["rows"],
             n_removed, n_quarantined)
    return manifest



def set_dataset_latest_dir(base: str, version: str) -> None:
    storage.write_json(storage.join(base, "latest.json"),
                       {"version": version, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def _outcomes(outcome_dir: str) -> list[dict[str, Any]]:
    """The per-block counts `sink_outcomes` wrote (a few small files: one per output block)."""
    import pyarrow.fs as pafs

    if not storage.exists(outcome_dir):
        return []
    fs, p = storage.filesystem(outcome_dir)
    infos = fs.get_file_info(pafs.FileSelector(p))
    return [storage.read_json(storage.join(outcome_dir, i.base_name)) for i in sorted(infos, key=lambda i: i.path)
            if i.type == pafs.FileType.File and i.base_name.endswith(".json")]


def _parquet_files(path: str) -> list[str]:
    import pyarrow.fs as pafs

    if not storage.exists(path):
        return []
    fs, p = storage.filesystem(path)
    found = fs.get_file_info(pafs.FileSelector(p, recursive=True))
    return sorted(storage.join(path, i.path[len(p):]) for i in found
                  if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))


def _remove_file(path: str) -> None:
    fs, p = storage.filesystem(path)
    if storage.exists(path):
        fs.delete_file(p)


def _read_raw(by_kind: dict[str, list[str]], count_dir: str) -> Any:
    """Raw rows (raw, source, line) of every input file, each file's row count reported under `count_dir`.

    Not `readers.read_raw_rows`: its JSONL reader keeps only files with a JSONL extension, while `expand_inputs` has
    already chosen the files (with format 'jsonl' or 'parquet', whatever their names).
    """
    import ray.data

    parts = []
    for fmt, source in (("jsonl", JsonlLinesDatasource), ("parquet", ParquetRecordsDatasource)):
        if by_kind.get(fmt):
            parts.append(ray.data.read_datasource(source(by_kind[fmt], count_dir=count_dir, file_extensions=None),
                                                  override_num_blocks=read_tasks(len(by_kind[fmt]))))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
