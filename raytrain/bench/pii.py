"""`python -m raytrain.bench.pii`: precision and recall of PII detection per kind, and its throughput.

The labelled set (``raytrain/data/pii_eval.jsonl``) holds sentences with emails, phone numbers, IP
addresses and card numbers marked span by span, and decoys that look like them: version strings
(``version 1.2.3.4``), section and OID numbers, times, MAC addresses, separator-less order numbers and
timestamps, Luhn-valid numbers that are orders, IMEIs or transaction ids, retina image names. Its
``set`` field splits it: ``dev`` was written alongside the detectors (its figures show they do what they
were built to do), ``heldout`` was written before the detectors were run on it and scored once (its
figures are the honest estimate; they are small, a handful of spans per kind). Throughput: documents/s
of ``redact`` over the demo corpus, one process.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from raytrain.bench.machine import machine


def scores(path: str | None = None) -> dict[str, Any]:
    """Per-kind precision/recall on each part of the labelled set and on all of it."""
    from raytrain.data import pii

    examples = pii.load_labelled(path or pii.LABELLED_SET)
    parts = sorted({e.get("set", "all") for e in examples})
    out = {part: pii.evaluate([e for e in examples if e.get("set", "all") == part]) for part in parts}
    out["all"] = pii.evaluate(examples)
    return out


def throughput(num_docs: int, seed: int = 4) -> dict[str, Any]:
    import gzip

    from raytrain.data import pii
    from raytrain.data.demo import generate_demo_corpus

    texts = []
    with tempfile.TemporaryDirectory() as tmp:
        planted = generate_demo_corpus(tmp, num_docs=num_docs, seed=seed)
        for name in planted["files"]:
            opener = gzip.open if name.endswith(".gz") else open
            with opener(Path(tmp) / name, "rb") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(row, dict) and isinstance(row.get("text"), str) and len(row["text"]) < 100_000:
                        texts.append(row["text"])
    t0 = time.perf_counter()
    found = sum(sum(pii.redact(t)[1].values()) for t in texts)
    seconds = time.perf_counter() - t0
    return {"documents": len(texts), "seconds": round(seconds, 3), "docs_per_s": round(len(texts) / seconds),
            "redactions": found}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raytrain.bench.pii", description=__doc__.split("\n\n")[0])
    p.add_argument("--labelled", default=None, help="a labelled JSONL set (default: the shipped one)")
    p.add_argument("--num-docs", type=int, default=3000, help="demo documents for the throughput figure (0: skip)")
    p.add_argument("--out", default="artifacts/bench/pii.json", help="JSON result file")
    args = p.parse_args(argv)
    result: dict[str, Any] = {"scores": scores(args.labelled)}
    if args.num_docs:
        result["throughput"] = throughput(args.num_docs)
    result["machine"] = machine(("phonenumbers",))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("set       kind         labelled  precision  recall")
    for part, per_kind in result["scores"].items():
        for kind, s in per_kind.items():
            print(f"{part:<9} {kind:<12} {s['labelled']:>8}  {s['precision']:>9.3f}  {s['recall']:>6.3f}")
    if "throughput" in result:
        print(f"redact: {result['throughput']['docs_per_s']} documents/s on {result['throughput']['documents']} "
              "demo documents (one process)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
