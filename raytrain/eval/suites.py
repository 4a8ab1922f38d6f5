"""Evaluation suites and the `eval` stage: every suite that applies runs on the candidate model, one report.

A suite is a name (its key in eval.json and its section under `eval.` in the spec), `skip_reason(ctx)` (why it
does not apply to this model, or None) and `run(ctx) -> dict`. The stage runs the enabled suites in order on the
spec's candidate (``raytrain.registry.candidate_dir``: the last training stage's export) or `eval.model_path`,
merges their results into the model's eval.json (keeping what post-training wrote there, e.g. `heldout`) and
renders eval.md with charts in `eval/`. The promotion gate reads these keys: `perplexity.perplexity`,
`perplexity.change_vs_parent`, `lm_eval.<task>.<metric>`, `win_rate.win_rate`, `alignment.<...>`,
`safety.unsafe_rate`, `overfitting.flagged`.

Where the work runs: perplexity and overfitting are Ray Data batch inference (actors, one GPU each on GPU);
lm-eval, win rate, the ground-truth reward and safety sample from whole models and run as one Ray task each
(one GPU on GPU), so the driver, a laptop included, only coordinates.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from raytrain import storage
from raytrain.config.schema import JobSpec
from raytrain.errors import StageInputError

log = logging.getLogger(__name__)

__all__ = ["SUITES", "EvalContext", "Suite", "dataset_dir", "run_eval"]


def dataset_dir(spec: JobSpec, name: str | None = None) -> str:
    """The prepared dataset version (train/ val/ test/ Parquet) held-out figures read: the corpus, or `name`."""
    from raytrain.registry import dataset_dir as registry_dataset_dir

    return registry_dataset_dir(spec, name)


def on_cluster(fn: Callable[..., Any], use_gpu: bool, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` as one Ray task (one GPU when `use_gpu`), waited for."""
    import ray

    return ray.get(ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(fn).remote(*args, **kwargs))


def _config(path: str) -> dict[str, Any]:
    p = storage.join(path, "config.json")
    return storage.read_json(p) if storage.exists(p) else {}


def is_causal_lm(path: str | None) -> bool:
    return bool(path) and any(a.endswith("ForCausalLM") for a in _config(path).get("architectures") or [])


@dataclass
class EvalContext:
    """What every suite sees: the spec, the model under evaluation, its lineage and parent, where to run."""

    spec: JobSpec
    model_dir: str
    lineage: dict[str, Any]
    parent_dir: str | None
    use_gpu: bool
    results: dict[str, Any] = field(default_factory=dict)  # earlier suites' results, by name

    @property
    def device(self) -> str:
        return "cuda" if self.use_gpu else "cpu"

    @property
    def task_type(self) -> str | None:
        task = self.lineage.get("task")
        return task.get("type") if isinstance(task, dict) else task


class Suite:
    """One evaluation suite; subclasses set `name` and implement `run` (and `skip_reason` when it may not apply)."""

    name: ClassVar[str]

    def settings(self, spec: JobSpec) -> Any:
        return getattr(spec.eval, self.name)

    def skip_reason(self, ctx: EvalContext) -> str | None:
        return None

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        raise NotImplementedError

    def summary(self, result: dict[str, Any]) -> str:
        """One line for the stage's printout."""
        keys = [k for k, v in result.items() if isinstance(v, (int, float)) and k != "seconds"][:4]
        return ", ".join(f"{k} {result[k]:.4g}" for k in keys)


class PerplexitySuite(Suite):
    """Token-weighted perplexity on the corpus's held-out splits: candidate, parent (a causal LM sharing the
    vocabulary) and an untrained model of the same config; `change_vs_parent` = candidate / parent - 1."""

    name = "perplexity"

    def skip_reason(self, ctx: EvalContext) -> str | None:
        if not is_causal_lm(ctx.model_dir):
            return "the model is not a causal LM"
        try:
            base = dataset_dir(ctx.spec)
        except StageInputError as exc:
            return str(exc)
        missing = [s for s in self.settings(ctx.spec).splits if not storage.exists(storage.join(base, s))]
        return f"no prepared split(s) {missing} under {base}: run the data stage" if missing else None

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        from raytrain.data.readers import read_prepared
        from raytrain.eval.perplexity import perplexities

        ps, spec = self.settings(ctx.spec), ctx.spec
        parts = []
        for split in ps.splits:
            ds = read_prepared(storage.join(dataset_dir(spec), split), columns=["input_ids", "num_tokens"])
            parts.append(ds.limit(ps.max_sequences) if ps.max_sequences else ds)
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        result: dict[str, Any] = {"model_dir": ctx.model_dir, "dataset": spec.data.name, "split": "+".join(ps.splits),
                                  "splits": list(ps.splits), "device": ctx.device, "replicas": spec.eval.num_replicas}
        models = {"candidate": (ctx.model_dir, False)}
        parent = ctx.parent_dir
        if ps.compare_parent and parent:
            if not is_causal_lm(parent):
                result["parent_skipped"] = f"{parent} is not a causal LM"
            elif _config(parent).get("vocab_size") != _config(ctx.model_dir).get("vocab_size"):
                result["parent_skipped"] = f"{parent} has another vocabulary: its perplexity is not comparable"
            else:
                models["parent"] = (parent, False)
        if ps.compare_untrained:
            models["untrained"] = (ctx.model_dir, True)
        scores = dict(zip(models, perplexities(ds, list(models.values()), ps.batch_size, seed=spec.train.seed,
                                               use_gpu=ctx.use_gpu, replicas=spec.eval.num_replicas,
                                               dtype=spec.train.precision), strict=True))
        result.update(scores["candidate"])
        if "parent" in scores:
            result["parent"] = parent
            result["parent_perplexity"] = scores["parent"]["perplexity"]
            result["change_vs_parent"] = result["perplexity"] / result["parent_perplexity"] - 1
        if "untrained" in scores:
            result["untrained_perplexity"] = scores["untrained"]["perplexity"]
            result["beats_untrained"] = result["perplexity"] < result["untrained_perplexity"]
        return result

    def summary(self, result: dict[str, Any]) -> str:
        line = f"{result['perplexity']:.2f} on {result['split']} ({result['tokens']} tokens)"
        if "parent_perplexity" in result:
            line += f", parent {result['parent_perplexity']:.2f} ({result['change_vs_parent']:+.1%})"
        if "untrained_perplexity" in result:
            line += f", untrained {result['untrained_perplexity']:.0f}"
        return line


class LMEvalSuite(Suite):
    """Tasks of the lm-eval harness (local task files) on the exported model, as one Ray task."""

    name = "lm_eval"

    def skip_reason(self, ctx: EvalContext) -> str | None:
        return None if is_causal_lm(ctx.model_dir) else "the model is not a causal LM"

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        from raytrain.eval.harness import run_lm_eval

        s = self.settings(ctx.spec)
        return on_cluster(run_lm_eval, ctx.use_gpu, ctx.model_dir, list(s.tasks), include_path=s.include_path,
                          limit=s.limit, batch_size=s.batch_size, num_fewshot=s.num_fewshot, device=ctx.device)

    def summary(self, result: dict[str, Any]) -> str:
        return "; ".join(f"{t} " + ", ".join(f"{m} {v:.3f}" for m, v in ms.items() if "stderr" not in m and m != "n")
                         for t, ms in result.items() if isinstance(ms, dict))


def demo_eval_prompts(spec: JobSpec) -> str | None:
    """The embedded alignment demo's held-out prompts file, when a post-training stage of the spec uses it."""
    from raytrain.posttrain.stage import input_paths

    for stage in ("rl", "dpo", "reward", "sft"):
        section = getattr(spec, stage)
        if section is not None and section.data.source == "demo":
            _, demo = input_paths(spec, stage)
            return demo["eval_prompts"] if demo else None
    return None


def _prompts(spec: JobSpec, settings: Any) -> tuple[str | None, str]:
    path = settings.prompts_path or demo_eval_prompts(spec)
    return path, ("set eval.<suite>.prompts_path to a JSONL of {\"prompt\": [messages]} (held-out prompts)"
                  if path is None else "")


class WinRateSuite(Suite):
    """Candidate vs baseline (the parent unless `eval.win_rate.baseline`), judged by the reward model."""

    name = "win_rate"

    def _reward_model(self, spec: JobSpec) -> str | None:
        from raytrain.posttrain.stage import model_dir_of

        s = self.settings(spec)
        return s.reward_model or (model_dir_of(spec, "reward") if spec.reward is not None else None)

    def skip_reason(self, ctx: EvalContext) -> str | None:
        s = self.settings(ctx.spec)
        baseline = s.baseline or ctx.parent_dir
        reward = self._reward_model(ctx.spec)
        if ctx.task_type in (None, "pretrain") and not s.baseline:
            return "the model is not post-trained (win rate compares chat models); set eval.win_rate.baseline"
        if not baseline or not is_causal_lm(baseline):
            return f"no baseline causal LM (the parent {ctx.parent_dir!r}); set eval.win_rate.baseline"
        if not reward or not storage.exists(storage.join(reward, "config.json")):
            return (f"no reward model at {reward!r}: run the reward stage or set eval.win_rate.reward_model"
                    if reward else "no reward model: the spec has no reward stage; set eval.win_rate.reward_model")
        return _prompts(ctx.spec, s)[1] or None

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        from raytrain.eval.alignment import load_prompts
        from raytrain.eval.winrate import win_rate

        s = self.settings(ctx.spec)
        baseline, reward = s.baseline or ctx.parent_dir, self._reward_model(ctx.spec)
        path, _ = _prompts(ctx.spec, s)
        prompts = load_prompts(path, s.max_prompts)
        result = on_cluster(win_rate, ctx.use_gpu, ctx.model_dir, baseline, reward, prompts,
                            samples_per_prompt=s.samples_per_prompt, max_new_tokens=s.max_new_tokens,
                            temperature=s.temperature, seed=s.seed, device=ctx.device)
        return {**result, "baseline": baseline, "reward_model": reward, "prompts": path}

    def summary(self, result: dict[str, Any]) -> str:
        base = Path(result["baseline"])
        return (f"{result['win_rate']:.2f} over {base.parent.name}/{base.name} ({result['wins']} wins, "
                f"{result['ties']} ties of {result['n']}; reward {result['candidate_reward_mean']:+.3f} vs "
                f"{result['baseline_reward_mean']:+.3f})")


class AlignmentSuite(Suite):
    """Ground-truth reward (the embedded demo's hidden rule) and KL to the SFT model, candidate vs SFT."""

    name = "alignment"

    def skip_reason(self, ctx: EvalContext) -> str | None:
        spec = ctx.spec
        aligned = aligned_stage(spec)
        if spec.sft is None or aligned is None or getattr(spec, aligned).data.source != "demo":
            return "not the embedded alignment demo (needs sft and dpo or rl sections with data.source 'demo')"
        from raytrain.posttrain.stage import model_dir_of

        if not storage.exists(storage.join(model_dir_of(spec, "sft"), "config.json")):
            return "no SFT model to compare with: run the sft stage"
        return None

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        return alignment_figures(ctx.spec, ctx.model_dir, ctx.use_gpu)

    def summary(self, result: dict[str, Any]) -> str:
        return format_alignment(result).strip()


def aligned_stage(spec: JobSpec) -> str | None:
    """The stage that aligns the SFT model in this spec: rl (which the pipeline runs instead of dpo), else dpo."""
    return next((s for s in ("rl", "dpo") if getattr(spec, s) is not None), None)


def alignment_figures(spec: JobSpec, model_dir: str, use_gpu: bool = False) -> dict[str, Any]:
    """Ground-truth reward and KL to the SFT model of the SFT model and `model_dir` (named after the aligning stage,
    'dpo' or 'rl') on held-out demo prompts: ``{sft: {...}, <stage>: {...}, stage, reference: 'sft', reward_gain}``."""
    from raytrain.eval.alignment import evaluate_alignment
    from raytrain.posttrain.stage import input_paths, model_dir_of

    s = spec.eval.alignment
    stage = aligned_stage(spec) or "dpo"
    _, demo = input_paths(spec, stage)
    sft_dir = model_dir_of(spec, "sft")
    figures = on_cluster(evaluate_alignment, use_gpu, {stage: model_dir}, sft_dir, demo["eval_prompts"],
                         samples_per_prompt=s.samples_per_prompt, max_new_tokens=s.max_new_tokens,
                         temperature=s.temperature, seed=s.seed, max_prompts=s.max_prompts,
                         device="cuda" if use_gpu else "cpu")
    return {"sft": figures["reference"], stage: figures[stage], "stage": stage, "reference": "sft",
            "reward_gain": figures[stage]["reward_mean"] - figures["reference"]["reward_mean"]}


def format_alignment(a: dict[str, Any]) -> str:
    """The SFT vs DPO (or RL) table of the ground-truth figures, as printed at the end of the eval stage."""
    stage = a.get("stage", "dpo")
    if "sft" not in a or stage not in a:
        return ""
    rows = [("ground-truth reward (held-out prompts)", "reward_mean", "{:+.3f}"),
            ("  standard error", "reward_sem", "{:.3f}"),
            ("KL to the SFT model (nats/response)", "kl_to_reference", "{:.3f}"),
            ("response tokens", "response_tokens_mean", "{:.1f}")]
    lines = [f"{'':40s}{'SFT':>10s}{stage.upper():>10s}"]
    for label, key, fmt in rows:
        lines.append(f"{label:40s}{fmt.format(a['sft'].get(key, float('nan'))):>10s}"
                     f"{fmt.format(a[stage].get(key, float('nan'))):>10s}")
    return "\n  " + "\n  ".join(lines) + "\n"


class OverfittingSuite(Suite):
    """Train vs held-out loss over each run's checkpoints; see `raytrain.eval.overfitting` for the flag rule."""

    name = "overfitting"

    def _runs(self, spec: JobSpec) -> dict[str, dict[str, Any]]:
        """Per stage: the run dir, the train/val data, its columns and objective; or the reason it is left out."""
        from raytrain.posttrain.tasks import PAIR_COLUMNS, REF_COLUMNS, SFT_COLUMNS

        runs_root = storage.Layout(spec.storage.root).runs()
        out: dict[str, dict[str, Any]] = {}
        for stage in self.settings(spec).stages:
            section = None if stage == "pretrain" else getattr(spec, stage)
            if stage != "pretrain" and section is None:
                continue
            try:
                data = dataset_dir(spec, None if section is None else section.data.name)
            except StageInputError as exc:
                out[stage] = {"skipped": str(exc)}
                continue
            if stage == "pretrain":
                out[stage] = {"run_dir": storage.join(runs_root, spec.run_name), "columns": ["input_ids", "num_tokens"],
                              "splits": {s: storage.join(data, s) for s in ("train", "val")}}
                continue
            run_dir = storage.join(runs_root, spec.stage_run_name(stage))
            task = section.train.task.model_dump(mode="json")
            if stage == "sft":
                out[stage] = {"run_dir": run_dir, "columns": list(SFT_COLUMNS), "task": task,
                              "splits": {s: storage.join(data, s) for s in ("train", "val")}}
            elif task.get("reference") == "precomputed":
                # The reference log-probs the run trained against: the DPO loss needs them.
                out[stage] = {"run_dir": run_dir, "columns": list(PAIR_COLUMNS + REF_COLUMNS), "task": task,
                              "splits": {s: storage.join(run_dir, "reference", f"split={s}") for s in ("train", "val")}}
            else:
                out[stage] = {"skipped": "the DPO loss needs precomputed reference log-probs (reference: "
                              "precomputed); this run keeps its reference in the workers"}
        return out

    def skip_reason(self, ctx: EvalContext) -> str | None:
        return None if self._runs(ctx.spec) else "no training run of the listed stages in this spec"

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        from concurrent.futures import ThreadPoolExecutor

        from raytrain.eval.overfitting import score_run

        s = self.settings(ctx.spec)
        runs: dict[str, Any] = {}
        todo = {}
        for stage, r in self._runs(ctx.spec).items():
            missing = [p for p in r.get("splits", {}).values() if not storage.exists(p)]
            if "skipped" in r or missing:
                runs[stage] = {"points": [], "flagged": False,
                               "reason": r.get("skipped") or f"no data at {missing}: run the {stage} stage"}
            else:
                todo[stage] = r

        def score(stage: str) -> dict[str, Any]:
            r, t0 = todo[stage], time.time()
            out = score_run(stage, r["run_dir"], r["splits"], r["columns"], max_rows=s.max_sequences,
                            batch_size=s.batch_size, task=r.get("task"), use_gpu=ctx.use_gpu,
                            max_gap_growth=s.max_gap_growth)
            return {**out, "seconds": round(time.time() - t0, 1)}

        # The runs' Ray Data passes are independent: overlapping them hides each one's start-up (actor, imports).
        with ThreadPoolExecutor(max_workers=max(1, len(todo))) as pool:
            done = dict(zip(todo, pool.map(score, todo), strict=True))
        runs.update({stage: done[stage] for stage in todo})
        runs = {stage: runs[stage] for stage in self._runs(ctx.spec)}  # in the spec's stage order
        return {"runs": runs, "flagged": any(r["flagged"] for r in runs.values()),
                "max_gap_growth": s.max_gap_growth}

    def summary(self, result: dict[str, Any]) -> str:
        return ("flagged" if result["flagged"] else "not flagged") + " (" + ", ".join(
            f"{k}: {len(r['points'])} checkpoints, gap growth {r.get('gap_growth', 0):.3f}"
            for k, r in result["runs"].items()) + ")"


class SafetySuite(Suite):
    """Share of sampled responses flagged unsafe (classifier or blocklist), `raytrain.eval.safety`."""

    name = "safety"

    def skip_reason(self, ctx: EvalContext) -> str | None:
        return None if is_causal_lm(ctx.model_dir) else "the model is not a causal LM"

    def _prompts(self, ctx: EvalContext) -> tuple[list[Any], bool]:
        """Held-out prompts and whether they are chat messages: the demo's (or `prompts_path`) for a post-trained
        model; the first words of held-out documents for a pretrained one."""
        from raytrain.eval.alignment import load_prompts

        s = self.settings(ctx.spec)
        chat = ctx.task_type in ("sft", "dpo", "rl")
        path = s.prompts_path or (demo_eval_prompts(ctx.spec) if chat else None)
        if path:
            return [p[-1]["content"] for p in load_prompts(path, s.max_prompts)], True
        import pyarrow.parquet as pq
        from transformers import AutoTokenizer

        from raytrain.data.readers import parquet_files

        files = parquet_files(storage.join(dataset_dir(ctx.spec), ctx.spec.eval.perplexity.splits[0]))
        fs, first = storage.filesystem(files[0])
        ids = pq.read_table(first, filesystem=fs, columns=["input_ids"]).column("input_ids").to_pylist()
        ids = ids[: s.max_prompts]
        with storage.local_dir(ctx.model_dir) as d:
            tok = AutoTokenizer.from_pretrained(str(d))
        return [tok.decode(row[:8], skip_special_tokens=True) for row in ids], False

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        from raytrain.eval.safety import configured_blocklist, generation_safety

        s = self.settings(ctx.spec)
        prompts, chat = self._prompts(ctx)
        kw: dict[str, Any] = {"samples_per_prompt": s.samples_per_prompt, "max_new_tokens": s.max_new_tokens,
                              "temperature": s.temperature, "seed": s.seed,
                              "blocklist": tuple(configured_blocklist(ctx.spec)), "chat": chat}
        if s.threshold is not None:
            kw["threshold"] = s.threshold
        return {**on_cluster(generation_safety, ctx.use_gpu, ctx.model_dir, prompts, **kw), "prompts": len(prompts)}

    def summary(self, result: dict[str, Any]) -> str:
        return f"unsafe rate {result['unsafe_rate']:.3f} ({result['unsafe']} of {result['generations']})"


SUITES: tuple[Suite, ...] = (PerplexitySuite(), LMEvalSuite(), WinRateSuite(), AlignmentSuite(), OverfittingSuite(),
                             SafetySuite())
"""In run order: the cheap, always-applicable figures first."""


def _resolve(spec: JobSpec, model_dir: str | None) -> str:
    from raytrain.registry import candidate_dir

    path = model_dir or spec.eval.model_path or candidate_dir(spec)
    if not storage.exists(storage.join(path, "config.json")):
        raise StageInputError(f"no exported model at {path}: run the training stages first (or set "
                              "eval.model_path to a Hugging Face model directory)")
    return path


def run_eval(spec: JobSpec, model_dir: str | None = None, suites: tuple[Suite, ...] = SUITES) -> dict[str, Any]:
    """Run every enabled suite that applies on the candidate; write eval.json, eval.md and eval/*.png next to it.

    Returns the evaluation document (what eval.json gains): one key per suite that ran, `suites` with each
    suite's seconds or the reason it was skipped, `model_dir`, `parent`, `evaluated`, `seconds`.
    """
    t_start = time.time()
    model_dir = _resolve(spec, model_dir)
    lineage_path = storage.join(model_dir, "lineage.json")
    lineage = storage.read_json(lineage_path) if storage.exists(lineage_path) else {}
    parent = (lineage.get("parent") or {}).get("path")
    use_gpu = spec.train.use_gpu if spec.eval.use_gpu is None else spec.eval.use_gpu
    ctx = EvalContext(spec, model_dir, lineage, parent, use_gpu)
    index: dict[str, dict[str, Any]] = {}
    for suite in suites:
        if not suite.settings(spec).enabled:
            index[suite.name] = {"skipped": f"eval.{suite.name}.enabled is false"}
            continue
        reason = suite.skip_reason(ctx)
        if reason:
            index[suite.name] = {"skipped": reason}
            log.info("eval: %s skipped: %s", suite.name, reason)
            continue
        t0 = time.time()
        try:
            ctx.results[suite.name] = suite.run(ctx)
        except (ValueError, FileNotFoundError) as exc:
            # Settings or inputs a person must fix (an unknown lm-eval task, a prompts file that is not there).
            raise StageInputError(f"eval.{suite.name}: {exc}") from exc
        index[suite.name] = {"seconds": round(time.time() - t0, 1)}
        log.info("eval: %s in %.1fs: %s", suite.name, time.time() - t0, suite.summary(ctx.results[suite.name]))
    doc = {"model_dir": model_dir, "parent": parent, "evaluated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           **ctx.results, "suites": index, "seconds": round(time.time() - t_start, 1)}
    write_report(model_dir, doc, [s.name for s in suites])
    return doc


def write_report(model_dir: str, doc: dict[str, Any], suite_names: list[str]) -> None:
    """Merge `doc` into eval.json (a suite that did not run this time loses its old figures: stale numbers must
    not reach the promotion gate) and write eval.md with its charts."""
    from raytrain.eval.report import CHART_DIR, chart, write_markdown

    eval_path = storage.join(model_dir, "eval.json")
    earlier = storage.read_json(eval_path) if storage.exists(eval_path) else {}
    kept = {k: v for k, v in earlier.items() if k not in suite_names}
    with tempfile.TemporaryDirectory(prefix="raytrain-eval-") as tmp:
        charts_dir = Path(tmp) / CHART_DIR
        charts_dir.mkdir()
        charts = {}
        for name in suite_names:
            if isinstance(doc.get(name), dict):
                try:
                    made = chart(name, doc[name], charts_dir)
                except (KeyError, TypeError, ValueError) as exc:  # a chart is a convenience, never the stage's end
                    log.warning("eval: no %s chart: %r", name, exc)
                    made = None
                if made:
                    charts[name] = made
        write_markdown(Path(tmp) / "eval.md", {**kept, **doc}, charts)
        storage.upload_dir(charts_dir, storage.join(model_dir, CHART_DIR))
        storage.write_bytes(storage.join(model_dir, "eval.md"), (Path(tmp) / "eval.md").read_bytes())
    storage.write_json(eval_path, {**kept, **doc})


def print_summary(doc: dict[str, Any], suites: tuple[Suite, ...] = SUITES) -> None:
    """The stage's short printout: one line per suite, the SFT vs DPO table on the alignment demo."""
    lines = [f"evaluation of {doc['model_dir']} ({doc['seconds']}s):"]
    for suite in suites:
        info = doc["suites"].get(suite.name, {})
        line = f"skipped ({info['skipped']})" if "skipped" in info else suite.summary(doc[suite.name])
        lines.append(f"  {suite.name:12s} {line}")
    print("\n".join(lines), flush=True)
    log.debug("eval document: %s", json.dumps(doc, default=str)[:2000])
