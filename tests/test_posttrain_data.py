"""Post-training data preparation on a real local Ray instance: every planted row accounted for, masks exact.

One mixed SFT file set (messages, prompt/completion strings and message lists, in JSONL and Parquet) and one mixed
preference file set (explicit and implicit prompts, strings and message lists) go through `prepare_posttrain_data`;
the tests compare what it wrote with what the generator planted, counted here, not with the stage's own sums.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytrain.config.schema import PostTrainDataSpec

pytestmark = pytest.mark.usefixtures("ray_local")

MAX_LEN, MAX_PROMPT = 160, 64
WORDS = ("the quick brown fox jumps over lazy dog hello world answer question please help me with this task "
         "review venue warm friendly cold short long story about river mountain city garden").split()
EOS, IM_END = "<|endoftext|>", "<|im_end|>"


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


class Plant:
    """Writes rows to files, remembering what each planted row must become."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lines: dict[str, list[str]] = {}
        self.bad: dict[tuple[str, int], str] = {}  # (file, 1-based line) -> expected quarantine reason
        self.dups: dict[tuple[str, int], tuple[str, int]] = {}  # (file, line) -> the row kept in its place
        self.good: dict[str, dict[str, Any]] = {}  # marker -> the example as planted
        self.parquet_rows: dict[str, list[dict[str, Any]]] = {}

    def line(self, file: str, text: str) -> tuple[str, int]:
        self.lines.setdefault(file, []).append(text)
        return file, len(self.lines[file])

    def row(self, file: str, row: dict[str, Any], marker: str | None = None) -> tuple[str, int]:
        where = self.line(file, json.dumps(row))
        if marker:
            self.good[marker] = row
        return where

    def bad_row(self, file: str, row: Any, reason: str) -> None:
        self.bad[self.line(file, row if isinstance(row, str) else json.dumps(row))] = reason

    def write(self) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        for file, lines in self.lines.items():
            (self.root / file).write_text("\n".join(lines) + "\n")
        for file, rows in self.parquet_rows.items():
            pq.write_table(pa.Table.from_pylist(rows), self.root / file)
        return sum(len(v) for v in self.lines.values()) + sum(len(v) for v in self.parquet_rows.values())


def _chat(rng: random.Random, marker: str, turns: int = 1, system: bool = False) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": "you are " + _words(rng, 1, 3)}] if system else []
    for t in range(turns):
        # The marker in the last user turn: the part of a prompt that truncation keeps.
        user = f"{marker} {_words(rng, 2, 6)}" if t == turns - 1 else _words(rng, 2, 6)
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": _words(rng, 2, 8)}]
    return msgs


def plant_sft(root: Path) -> tuple[Plant, int]:
    rng = random.Random(1)
    p = Plant(root)
    a = "a.jsonl"
    for i in range(12):
        p.row(a, {"messages": _chat(rng, f"id{i}x", turns=1 + i % 3, system=i % 4 == 0), "meta": i}, f"id{i}x")
    for i in range(12, 20):
        p.row(a, {"prompt": f"id{i}x {_words(rng, 2, 6)}", "completion": " " + _words(rng, 2, 6)}, f"id{i}x")
    for i in range(20, 26):
        chat = _chat(rng, f"id{i}x", turns=2)
        p.row(a, {"prompt": chat[:-1], "completion": chat[-1:]}, f"id{i}x")
    # The same conversation as id0x, formatted differently (key order, extra fields, spacing): a duplicate.
    first = p.good["id0x"]
    p.dups[p.line(a, json.dumps({"meta": "other", "messages": [{"content": m["content"], "role": m["role"],
                                                                  "name": "x"} for m in first["messages"]]},
                                 indent=None, separators=(", ", " : ")))] = (a, 1)
    # Over-long both ways; the marker ends the prompt, whose end is what truncation keeps.
    long_chat = [{"role": "user", "content": _words(rng, 100, 100) + " idLONGx"},
                 {"role": "assistant", "content": _words(rng, 100, 100)}]
    p.row(a, {"messages": long_chat}, "idLONGx")
    ok = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]
    p.bad_row(a, '{"messages": [{"role": "user", "content": "cut', "unparseable_json")
    p.bad_row(a, [1, 2], "not_an_object")
    p.bad_row(a, {"foo": 1}, "missing_field:messages")
    p.bad_row(a, {"prompt": "only a prompt"}, "missing_field:completion")
    p.bad_row(a, {"messages": [ok[0], {"role": "narrator", "content": "x"}]}, "bad_role")
    p.bad_row(a, {"messages": [{"content": "no role"}, ok[1]]}, "bad_role")
    p.bad_row(a, {"messages": [ok[0], {"role": "assistant", "content": 42}]}, "non_string_content")
    p.bad_row(a, {"messages": [ok[0], {"role": "assistant", "content": ""}]}, "empty_response")
    p.bad_row(a, {"messages": [{"role": "user", "content": "  "}, ok[1]]}, "empty_content")
    p.bad_row(a, {"messages": [ok[0]]}, "no_assistant_turn")
    p.bad_row(a, {"messages": [ok[1]]}, "empty_prompt")
    p.bad_row(a, {"messages": "hello"}, "bad_type:messages")
    p.bad_row(a, {"messages": [1]}, "bad_message")
    p.bad_row(a, {"prompt": "a string", "completion": [ok[1]]}, "mixed_types")
    p.bad_row(a, {"prompt": [ok[0]], "completion": [ok[0]]}, "non_assistant_response")
    p.bad_row(a, {"prompt": "", "completion": "text"}, "empty_prompt")
    p.bad_row(a, {"prompt": "question", "completion": "   "}, "empty_response")
    p.bad_row(a, "", "blank_line")
    p.row(a, {"prompt": "id26x last line", "completion": " of the file"}, "id26x")
    # Parquet: messages and prompt/completion rows in one table (nulls where a row has no such field).
    rows = [{"messages": _chat(rng, f"id{i}x"), "prompt": None, "completion": None} for i in range(30, 34)]
    rows += [{"messages": None, "prompt": f"id{i}x {_words(rng, 2, 5)}", "completion": " " + _words(rng, 2, 5)}
             for i in range(34, 37)]
    for r in rows:
        p.good[(r["messages"] or [{"content": r["prompt"]}])[0]["content"].split()[0]] = {
            k: v for k, v in r.items() if v is not None}
    rows.append({"messages": None, "prompt": "id37x no completion", "completion": None})
    p.parquet_rows["b.parquet"] = rows
    p.bad[("b.parquet", len(rows))] = "missing_field:completion"  # Parquet rows are numbered from 1 like lines
    return p, p.write()


def plant_pairs(root: Path) -> tuple[Plant, int]:
    rng = random.Random(2)
    p = Plant(root)
    f = "pairs.jsonl"
    for i in range(10):
        p.row(f, {"prompt": f"id{i}x {_words(rng, 2, 6)}", "chosen": " " + _words(rng, 2, 6),
                  "rejected": " " + _words(rng, 2, 6) + " no"}, f"id{i}x")
    for i in range(10, 20):
        user = [{"role": "user", "content": f"id{i}x {_words(rng, 2, 6)}"}]
        p.row(f, {"prompt": user, "chosen": [{"role": "assistant", "content": _words(rng, 2, 6)}],
                  "rejected": [{"role": "assistant", "content": _words(rng, 2, 6) + " no"}]}, f"id{i}x")
    for i in range(20, 28):  # implicit prompt, message lists: the shared first turns are the prompt
        shared = _chat(rng, f"id{i}x", turns=1 + i % 2)[:-1]
        p.row(f, {"chosen": [*shared, {"role": "assistant", "content": "yes " + _words(rng, 2, 6)}],
                  "rejected": [*shared, {"role": "assistant", "content": "no " + _words(rng, 2, 6)}]}, f"id{i}x")
    for i in range(28, 34):  # implicit prompt, strings
        prompt = f"id{i}x {_words(rng, 2, 6)}"
        p.row(f, {"chosen": prompt + " yes " + _words(rng, 1, 4), "rejected": prompt + " no " + _words(rng, 1, 4)},
              f"id{i}x")
    # id20x again with an explicit prompt: the same normalized pair, so a duplicate.
    c, r = p.good["id20x"]["chosen"], p.good["id20x"]["rejected"]
    p.dups[p.line(f, json.dumps({"prompt": c[:-1], "chosen": c[-1:], "rejected": r[-1:]}))] = (f, 21)
    p.row(f, {"prompt": _words(rng, 100, 100) + " idLONGx", "chosen": " " + _words(rng, 100, 100),
              "rejected": " short answer"}, "idLONGx")
    user = [{"role": "user", "content": "question"}]
    good_a = [{"role": "assistant", "content": "fine"}]
    p.bad_row(f, '{"prompt": "q", "chosen": "a", "rej', "unparseable_json")
    p.bad_row(f, {"prompt": "q", "chosen": " a"}, "missing_field:rejected")
    p.bad_row(f, {"prompt": "q", "chosen": " same", "rejected": " same"}, "identical_pair")
    p.bad_row(f, {"prompt": user, "chosen": good_a, "rejected": good_a}, "identical_pair")
    p.bad_row(f, {"prompt": user, "chosen": good_a, "rejected": [{"role": "assistant", "content": ""}]},
              "empty_response")
    p.bad_row(f, {"prompt": user, "chosen": good_a, "rejected": [{"role": "robot", "content": "x"}]}, "bad_role")
    p.bad_row(f, {"prompt": user, "chosen": good_a, "rejected": [{"role": "assistant", "content": None}]},
              "non_string_content")
    p.bad_row(f, {"prompt": "q", "chosen": good_a, "rejected": " text"}, "mixed_types")
    p.bad_row(f, {"chosen": "yes it is", "rejected": "no it is not"}, "empty_prompt")
    p.bad_row(f, {"prompt": user, "chosen": good_a, "rejected": user}, "non_assistant_response")
    return p, p.write()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from raytrain.data.tokenizer import train_tokenizer

    rng = random.Random(0)
    texts = [_words(rng, 5, 30) + f" id{i}x idLONGx" for i in range(400)]
    return train_tokenizer(texts, 400, 2, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))


def _spec(name: str, root: Path) -> PostTrainDataSpec:
    return PostTrainDataSpec(name=name, source="files", paths=[str(root)], max_length=MAX_LEN,
                             max_prompt_length=MAX_PROMPT, val_fraction=0.25)


@pytest.fixture(scope="module")
def sft(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Any]:
    from raytrain.posttrain.data import prepare_posttrain_data

    base = tmp_path_factory.mktemp("sft")
    plant, n_rows = plant_sft(base / "in")
    out = base / "out" / "datasets" / "sft"
    manifest = prepare_posttrain_data("sft", _spec("sft", base / "in"), str(tokenizer_dir), str(out))
    return {"plant": plant, "rows": n_rows, "out": out, "manifest": manifest, "in": base / "in"}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Any]:
    from raytrain.posttrain.data import prepare_posttrain_data

    base = tmp_path_factory.mktemp("pairs")
    plant, n_rows = plant_pairs(base / "in")
    out = base / "out" / "datasets" / "pairs"
    manifest = prepare_posttrain_data("preference", _spec("pairs", base / "in"), str(tokenizer_dir), str(out))
    return {"plant": plant, "rows": n_rows, "out": out, "manifest": manifest, "in": base / "in"}


def _jsonl(d: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for f in sorted(d.glob("*.jsonl")) for line in f.read_text().splitlines()]


def _rows(out: Path) -> dict[str, dict[str, Any]]:
    """row_id -> {column: value, 'split': …} over train/ and val/."""
    rows = {}
    for split in ("train", "val"):
        for f in sorted((out / split).glob("*.parquet")):
            for r in pq.read_table(f).to_pylist():
                rows[r["row_id"]] = r | {"split": split}
    return rows


def _by_marker(rows: dict[str, dict[str, Any]], tok: Any, ids_col: str, len_col: str) -> dict[str, dict[str, Any]]:
    found = {}
    for r in rows.values():
        text = tok.decode(r[ids_col][: r[len_col]], skip_special_tokens=False)
        marker = re.search(r"id(\d+|LONG)x", text).group(0)
        assert marker not in found, f"two kept rows carry {marker}"
        found[marker] = r
    return found


def _check_outcomes(data: dict[str, Any]) -> None:
    plant, out, m = data["plant"], data["out"], data["manifest"]
    counts = m["counts"]
    assert counts["read"] == data["rows"]  # counted here, from what was planted
    assert counts["kept"] + counts["removed"] + counts["quarantined"] == counts["read"]
    quarantined = _jsonl(out / "quarantine")
    assert {(Path(q["source"]).name, q["line"]): q["reason"] for q in quarantined} == plant.bad
    assert counts["quarantined"] == len(quarantined)
    for q in quarantined:
        assert len(q["sample"].encode()) <= 4096 + 3  # the raw row, truncated (a cut character may widen)
    removed = _jsonl(out / "removed")
    assert {(Path(r["source"]).name, r["line"]): (Path(r["duplicate_of"]["source"]).name, r["duplicate_of"]["line"])
            for r in removed} == plant.dups
    assert all(r["reason"] == "duplicate" for r in removed) and counts["removed"] == len(plant.dups)
    expected_reasons: dict[str, int] = {}
    for reason in [*plant.bad.values(), *["duplicate"] * len(plant.dups)]:
        expected_reasons[reason] = expected_reasons.get(reason, 0) + 1
    assert m["counts"]["by_reason"] == expected_reasons
    rows = _rows(out)
    assert len(rows) == counts["kept"] == m["splits"]["train"]["rows"] + m["splits"]["val"]["rows"]
    assert m["splits"]["val"]["rows"] > 0 and m["splits"]["train"]["rows"] > m["splits"]["val"]["rows"]
    assert m["max_length"] == MAX_LEN and m["max_prompt_length"] == MAX_PROMPT


def test_sft_accounting_and_quarantine(sft: dict[str, Any], tokenizer_dir: Path) -> None:
    _check_outcomes(sft)
    m = sft["manifest"]
    assert m["kind"] == "sft"
    assert m["tokenizer_sha256"] == hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest()
    assert [c["name"] for c in m["columns"]] == ["input_ids", "loss_mask", "num_tokens", "row_id"]
    assert {Path(s["path"]).name: s["rows"] for s in m["sources"]} == {
        name: len(lines) for name, lines in sft["plant"].lines.items()} | {"b.parquet": 8}


def test_sft_masks_cover_exactly_the_responses(sft: dict[str, Any], tok: Any) -> None:
    rows = _rows(sft["out"])
    table = pq.read_table(next((sft["out"] / "train").glob("*.parquet")))
    assert table.schema.field("row_id").type == pa.string()
    found = _by_marker(rows, tok, "input_ids", "num_tokens")
    expected_markers = set(sft["plant"].good)
    assert set(found) == expected_markers
    pad = tok.pad_token_id
    total_loss = 0
    for marker, row in found.items():
        planted = sft["plant"].good[marker]
        ids, mask, n = np.asarray(row["input_ids"]), np.asarray(row["loss_mask"]), row["num_tokens"]
        assert ids.shape == mask.shape == (MAX_LEN,)
        assert (ids[n:] == pad).all() and not mask[n:].any()
        total_loss += int(mask.sum())
        if marker == "idLONGx":
            continue
        if "messages" in planted:
            msgs = planted["messages"]
            want_loss = "".join(m["content"] + IM_END + "\n" for m in msgs if m["role"] == "assistant")
            want_all = tok.apply_chat_template(msgs, tokenize=False)
        elif isinstance(planted["prompt"], list):
            msgs = planted["prompt"] + planted["completion"]
            want_loss = "".join(m["content"] + IM_END + "\n" for m in planted["completion"])
            want_all = tok.apply_chat_template(msgs, tokenize=False)
        else:
            want_loss = planted["completion"] + EOS
            want_all = planted["prompt"] + want_loss
        assert tok.decode(ids[:n], skip_special_tokens=False) == want_all, marker
        assert tok.decode(ids[mask == 1], skip_special_tokens=False) == want_loss, marker
    splits = sft["manifest"]["splits"]
    assert splits["train"]["loss_tokens"] + splits["val"]["loss_tokens"] == total_loss


def test_sft_truncation_policy(sft: dict[str, Any], tok: Any) -> None:
    row = _by_marker(_rows(sft["out"]), tok, "input_ids", "num_tokens")["idLONGx"]
    msgs = sft["plant"].good["idLONGx"]["messages"]
    prompt = tok(tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    full = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    assert len(prompt) > MAX_PROMPT and len(full) - len(prompt) > MAX_LEN - MAX_PROMPT  # really over-long
    want = prompt[-MAX_PROMPT:] + full[len(prompt):][: MAX_LEN - MAX_PROMPT]  # the prompt's end, the response's start
    assert row["num_tokens"] == MAX_LEN
    assert list(row["input_ids"]) == want
    assert list(row["loss_mask"]) == [0] * MAX_PROMPT + [1] * (MAX_LEN - MAX_PROMPT)


def test_sft_rows_load_for_training(sft: dict[str, Any]) -> None:
    from raytrain.train.local import LocalShard

    shard = LocalShard(sft["out"] / "train", 0, 1, columns=("input_ids", "loss_mask", "num_tokens"))
    assert shard.columns["input_ids"].shape == (shard.num_rows, MAX_LEN)
    assert shard.columns["loss_mask"].dtype == np.int8
    batch = next(shard.iter_torch_batches(batch_size=4))
    assert tuple(batch["input_ids"].shape) == (4, MAX_LEN)


def test_preference_accounting_masks_and_truncation(pairs: dict[str, Any], tok: Any) -> None:
    _check_outcomes(pairs)
    assert [c["name"] for c in pairs["manifest"]["columns"]] == [
        "chosen_ids", "chosen_mask", "chosen_len", "rejected_ids", "rejected_mask", "rejected_len", "prompt_len",
        "row_id"]
    found = _by_marker(_rows(pairs["out"]), tok, "chosen_ids", "chosen_len")
    assert set(found) == set(pairs["plant"].good)
    for marker, row in found.items():
        planted = pairs["plant"].good[marker]
        pl = row["prompt_len"]
        cid, rid = np.asarray(row["chosen_ids"]), np.asarray(row["rejected_ids"])
        cm, rm = np.asarray(row["chosen_mask"]), np.asarray(row["rejected_mask"])
        assert (cid[:pl] == rid[:pl]).all() and not cm[:pl].any() and not rm[:pl].any()
        assert cm[pl] == 1 and rm[pl] == 1  # the response starts right after the shared prompt
        if marker == "idLONGx":
            prompt = tok(planted["prompt"], add_special_tokens=False)["input_ids"]
            chosen = tok(planted["chosen"], add_special_tokens=False)["input_ids"]
            assert pl == MAX_PROMPT and row["chosen_len"] == MAX_LEN
            assert list(cid) == prompt[-MAX_PROMPT:] + chosen[: MAX_LEN - MAX_PROMPT]
            assert tok.decode(rid[pl:row["rejected_len"]], skip_special_tokens=False) == " short answer" + EOS
            continue
        if isinstance(planted["chosen"], str):
            if "prompt" in planted:
                prompt, chosen, rejected = planted["prompt"], planted["chosen"], planted["rejected"]
            else:  # implicit: the common prefix, cut before the space
                prompt = planted["chosen"].split(" yes ")[0]
                chosen, rejected = planted["chosen"][len(prompt):], planted["rejected"][len(prompt):]
            assert tok.decode(cid[:pl], skip_special_tokens=False) == prompt
            assert tok.decode(cid[cm == 1], skip_special_tokens=False) == chosen + EOS
            assert tok.decode(rid[rm == 1], skip_special_tokens=False) == rejected + EOS
        else:
            if "prompt" in planted:
                prompt, chosen, rejected = planted["prompt"], planted["chosen"], planted["rejected"]
            else:
                prompt, chosen, rejected = planted["chosen"][:-1], planted["chosen"][-1:], planted["rejected"][-1:]
            want_prompt = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            assert tok.decode(cid[:pl], skip_special_tokens=False) == want_prompt
            assert tok.decode(cid[cm == 1], skip_special_tokens=False) == chosen[0]["content"] + IM_END + "\n"
            assert tok.decode(rid[rm == 1], skip_special_tokens=False) == rejected[0]["content"] + IM_END + "\n"
            assert tok.decode(rid[: row["rejected_len"]], skip_special_tokens=False) == tok.apply_chat_template(
                prompt + rejected, tokenize=False)


def test_split_is_deterministic_and_the_manifest_is_cached(pairs: dict[str, Any], tokenizer_dir: Path,
                                                          tmp_path: Path) -> None:
    from raytrain.posttrain.data import prepare_posttrain_data

    spec = _spec("pairs", pairs["in"])
    out = pairs["out"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = prepare_posttrain_data("preference", spec, str(tokenizer_dir), str(out))
    assert again == pairs["manifest"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing recomputed

    # A second, independent run elsewhere: the same rows, the same ids, the same splits, the same arrays.
    other = prepare_posttrain_data("preference", spec, str(tokenizer_dir), str(tmp_path / "datasets" / "pairs"))
    assert other["key"] == pairs["manifest"]["key"] and other["splits"] == pairs["manifest"]["splits"]
    first, second = _rows(out), _rows(tmp_path / "datasets" / "pairs")
    assert first.keys() == second.keys()
    for row_id, row in first.items():
        other_row = second[row_id]
        assert row["split"] == other_row["split"]
        assert all(np.array_equal(row[c], other_row[c]) for c in ("chosen_ids", "chosen_mask", "rejected_ids"))

    # A changed spec field that changes the output is a different key: recomputed, not served from the cache.
    changed = prepare_posttrain_data("preference", spec.model_copy(update={"salt": "other"}), str(tokenizer_dir),
                                     str(tmp_path / "datasets" / "pairs"))
    assert changed["key"] != other["key"]
    moved = {rid: r["split"] for rid, r in _rows(tmp_path / "datasets" / "pairs").items()}
    assert moved.keys() == first.keys() and moved != {rid: r["split"] for rid, r in first.items()}


# ----------------------------------------------------------------------------------------------- RL prompts

GEN_PROMPT = "<|im_start|>assistant\n"


def plant_prompts(root: Path, demo: dict[str, Any]) -> tuple[Plant, int]:
    """The demo's prompts.jsonl (its planted rows from planted.json) next to a hand-written file of edge cases."""
    rng = random.Random(3)
    p = Plant(root)
    p.lines["prompts.jsonl"] = Path(demo["prompts"]).read_text().splitlines()
    planted = json.loads(Path(demo["planted"]).read_text())["rows"]
    p.bad |= {(r["file"], r["line"]): r["reason"] for r in planted if r["file"] == "prompts.jsonl"}
    h = "hand.jsonl"
    truths = [42, "answer", {"b": [1, 2], "a": None}, [1, "x", {"y": 2.5}], 3.5, True, "ünïcode"]
    for i, gt in enumerate(truths):
        p.row(h, {"prompt": f"id{i}x {_words(rng, 2, 6)}", "ground_truth": gt}, f"id{i}x")
    p.row(h, {"prompt": f"id7x {_words(rng, 2, 6)}"}, "id7x")  # no ground truth: "null"
    for i in range(8, 12):  # conversations ending with the user turn (the marker in it), some with a system turn
        p.row(h, {"prompt": _chat(rng, f"id{i}x", turns=1 + i % 3, system=i % 2 == 0)[:-1], "ground_truth": {"n": i},
                  "extra": "ignored"}, f"id{i}x")
    # The same prompt with another ground truth is another example, not a duplicate.
    p.row(h, {"prompt": p.good["id1x"]["prompt"], "ground_truth": "another answer"}, "id1x/other")
    # Over-long: a conversation and a string, each keeping its last MAX_PROMPT tokens.
    p.row(h, {"prompt": [{"role": "user", "content": _words(rng, 120, 120) + " idLONGx"}]}, "idLONGx")
    p.row(h, {"prompt": _words(rng, 120, 120) + " idLTx", "ground_truth": 7}, "idLTx")
    # Duplicates: formatting, key order, extra fields, absent vs null ground truth do not count.
    first = p.good["id0x"]
    p.dups[p.line(h, json.dumps({"meta": 1, "ground_truth": 42, "prompt": first["prompt"]},
                                separators=(", ", " : ")))] = (h, 1)
    p.dups[p.line(h, json.dumps({"prompt": p.good["id7x"]["prompt"], "ground_truth": None}))] = (h, 8)
    chat = p.good["id8x"]
    p.dups[p.line(h, json.dumps({"ground_truth": {"n": 8}, "prompt": [
        {"content": m["content"], "role": m["role"], "name": "x"} for m in chat["prompt"]]}))] = (h, 9)
    ok = {"role": "user", "content": "hi there"}
    p.bad_row(h, '{"prompt": "cut', "unparseable_json")
    p.bad_row(h, [1, 2], "not_an_object")
    p.bad_row(h, {"ground_truth": 1}, "missing_field:prompt")
    p.bad_row(h, {"prompt": None, "ground_truth": 1}, "missing_field:prompt")
    p.bad_row(h, {"prompt": 42}, "bad_type:prompt")
    p.bad_row(h, {"prompt": "   "}, "empty_prompt")
    p.bad_row(h, {"prompt": []}, "empty_prompt")
    p.bad_row(h, {"prompt": [ok, {"role": "assistant", "content": "hello"}]}, "prompt_ends_with_assistant")
    p.bad_row(h, {"prompt": [{"role": "system", "content": "be brief"}]}, "prompt_ends_with_system")
    p.bad_row(h, {"prompt": [{"role": "narrator", "content": "x"}]}, "bad_role")
    p.bad_row(h, {"prompt": [{"content": "no role"}]}, "bad_role")
    p.bad_row(h, {"prompt": [{"role": "user", "content": 42}]}, "non_string_content")
    p.bad_row(h, {"prompt": [1]}, "bad_message")
    p.bad_row(h, {"prompt": [{"role": "system", "content": " "}, ok]}, "empty_content")
    p.bad_row(h, "", "blank_line")
    p.row(h, {"prompt": "id12x last line", "ground_truth": [0]}, "id12x")
    return p, p.write()


@pytest.fixture(scope="module")
def rl_prompts(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Any]:
    from raytrain.config.schema import AlignmentDemoSpec
    from raytrain.posttrain.data import prepare_posttrain_data
    from raytrain.posttrain.demo import write_alignment_demo

    base = tmp_path_factory.mktemp("rl")
    demo = write_alignment_demo(str(base / "demo"), AlignmentDemoSpec(num_sft=10, num_pairs=10, num_eval_prompts=4,
                                                                      num_prompts=60))
    plant, n_rows = plant_prompts(base / "in", demo)
    assert (base / "in" / "prompts.jsonl").read_bytes() == Path(demo["prompts"]).read_bytes()  # the demo's file
    dataset = base / "out" / "datasets" / "rl"
    # As the "rl" stage calls it: a versioned dataset.
    manifest = prepare_posttrain_data("prompt", _spec("rl", base / "in"), str(tokenizer_dir), str(dataset),
                                      versioned=True)
    return {"plant": plant, "rows": n_rows, "out": Path(manifest["path"]), "manifest": manifest, "demo": demo,
            "dataset": dataset}


def _expected_prompts(plant: Plant) -> dict[tuple[str, str], dict[str, Any]]:
    """(prompt_text, canonical ground truth JSON) -> planted row, for every row that must be kept."""
    bad = {line for (f, line) in plant.bad if f == "prompts.jsonl"}
    demo_rows = [json.loads(line) for i, line in enumerate(plant.lines["prompts.jsonl"], start=1) if i not in bad]
    out = {}
    for row in [*plant.good.values(), *demo_rows]:
        prompt = row["prompt"]
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        out[(text, json.dumps(row.get("ground_truth"), sort_keys=True))] = row
    return out


def test_prompt_accounting_quarantine_and_manifest(rl_prompts: dict[str, Any]) -> None:
    _check_outcomes(rl_prompts)
    m, plant, out = rl_prompts["manifest"], rl_prompts["plant"], rl_prompts["out"]
    assert m["kind"] == "prompt"
    assert m["version"] == m["key"][:12] and out == rl_prompts["dataset"] / m["version"]
    assert json.loads((rl_prompts["dataset"] / "latest.json").read_text())["version"] == m["version"]
    assert m["columns"] == [
        {"name": "prompt_ids", "dtype": "int32", "shape": [MAX_PROMPT]},
        {"name": "prompt_len", "dtype": "int32", "shape": []},
        {"name": "prompt_text", "dtype": "string", "shape": []},
        {"name": "ground_truth", "dtype": "string", "shape": []},
        {"name": "row_id", "dtype": "string", "shape": []}]
    assert {Path(s["path"]).name: s["rows"] for s in m["sources"]} == {
        name: len(lines) for name, lines in plant.lines.items()}
    # The demo's file on its own: each of its lines kept, removed or quarantined, as the generator says.
    demo_lines = len(plant.lines["prompts.jsonl"])
    demo_planted = [k for k in plant.bad if k[0] == "prompts.jsonl"]
    assert len(demo_planted) == rl_prompts["demo"]["counts"]["planted"]["prompts"] >= 5
    quarantined = [q for q in _jsonl(out / "quarantine") if Path(q["source"]).name == "prompts.jsonl"]
    removed = [r for r in _jsonl(out / "removed") if Path(r["source"]).name == "prompts.jsonl"]
    demo_texts = {json.loads(line)["prompt"][-1]["content"] for i, line in enumerate(
        plant.lines["prompts.jsonl"], start=1) if ("prompts.jsonl", i) not in plant.bad}
    kept = [r for r in _rows(out).values() if r["prompt_text"] in demo_texts]
    assert len(kept) == rl_prompts["demo"]["counts"]["prompts"]
    assert len(kept) + len(removed) + len(quarantined) == demo_lines
    assert {q["line"]: q["reason"] for q in quarantined} == {
        line: plant.bad[("prompts.jsonl", line)] for _, line in demo_planted}


def test_prompt_rows_render_truncate_and_carry_ground_truth(rl_prompts: dict[str, Any], tok: Any) -> None:
    expected = _expected_prompts(rl_prompts["plant"])
    rows = _rows(rl_prompts["out"])
    found = {(r["prompt_text"], json.dumps(json.loads(r["ground_truth"]), sort_keys=True)): r for r in rows.values()}
    # Exactly the valid rows, each with the text a reward function receives: the string prompt, or the last user
    # message of a conversation (not its rendering).
    assert len(found) == len(rows) and set(found) == set(expected)
    pad, truncated = tok.pad_token_id, set()
    for key, row in found.items():
        planted = expected[key]
        ids, n = np.asarray(row["prompt_ids"]), row["prompt_len"]
        assert ids.shape == (MAX_PROMPT,) and 0 < n <= MAX_PROMPT and (ids[n:] == pad).all()
        assert json.loads(row["ground_truth"]) == planted.get("ground_truth")  # any JSON value, null when absent
        if "ground_truth" not in planted or planted["ground_truth"] is None:
            assert row["ground_truth"] == "null"
        prompt = planted["prompt"]
        text = prompt if isinstance(prompt, str) else tok.apply_chat_template(prompt, tokenize=False,
                                                                               add_generation_prompt=True)
        full = tok(text, add_special_tokens=False)["input_ids"]
        assert list(ids[:n]) == full[-MAX_PROMPT:], key  # the prompt's last tokens
        decoded = tok.decode(ids[:n], skip_special_tokens=False)
        if isinstance(prompt, list):
            assert decoded.endswith(prompt[-1]["content"][-8:] + IM_END + "\n" + GEN_PROMPT), key
        else:
            assert EOS not in decoded and decoded.endswith(prompt[-8:]), key
        if len(full) > MAX_PROMPT:
            truncated.add(key[0].split()[-1])
            assert n == MAX_PROMPT
        else:
            assert decoded == text
    assert {"idLONGx", "idLTx"} <= truncated


def test_prompt_parquet_schema_and_loading(rl_prompts: dict[str, Any]) -> None:
    from raytrain.train.local import LocalShard

    table = pq.read_table(next((rl_prompts["out"] / "train").glob("*.parquet")))
    assert table.schema.names == ["prompt_ids", "prompt_len", "prompt_text", "ground_truth", "row_id"]
    for name in ("prompt_text", "ground_truth", "row_id"):
        assert table.schema.field(name).type == pa.string(), name
    assert table.schema.field("prompt_len").type == pa.int32()
    shard = LocalShard(rl_prompts["out"] / "train", 0, 1, columns=("prompt_ids", "prompt_len"))
    assert shard.columns["prompt_ids"].shape == (shard.num_rows, MAX_PROMPT)
    assert shard.columns["prompt_ids"].dtype == np.int32 and shard.columns["prompt_len"].dtype == np.int32
