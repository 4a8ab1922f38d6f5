"""`raytrain` command line: one sub-command per stage, plus spec validation and the demo corpus."""

from __future__ import annotations

import sys

import typer

from raytrain.stages import STAGE_TABLE, run_stage, setup_logging

app = typer.Typer(add_completion=False, no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]},
                  help="raytrain: raw text to a served language model on Ray.")

CONFIG = typer.Option(..., "--config", "-c", help="Recipe file, or a recipe name in jobs/configs/ (e.g. demo).")
OVERRIDES = typer.Argument(None, help="Overrides as section.key=value, e.g. train.max_steps=50.")
VERBOSE = typer.Option(False, "--verbose", "-v", help="Debug logging.")


def _stage(name: str, doc: str):
    def command(config: str = CONFIG, overrides: list[str] | None = OVERRIDES, verbose: bool = VERBOSE) -> None:
        setup_logging(verbose)
        raise typer.Exit(run_stage(name, config, overrides or []))

    command.__doc__ = doc
    app.command(name)(command)


for _entry in STAGE_TABLE.values():
    _stage(_entry.name, _entry.doc)


@app.command()
def validate(config: str = CONFIG, overrides: list[str] | None = OVERRIDES) -> None:
    """Validate a spec (no Ray) and print it with every default filled in."""
    from raytrain.config import ConfigError, dump_spec, load_spec

    try:
        spec = load_spec(config, overrides or [])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    print(dump_spec(spec), end="")


@app.command("demo-corpus")
def demo_corpus(out: str = typer.Option(..., "--out", "-o", help="Directory to write the JSONL shards to."),
                num_docs: int = typer.Option(1500, help="Documents to generate."),
                seed: int = typer.Option(0, help="Generator seed.")) -> None:
    """Write the embedded demo corpus (web-like text with planted duplicates, junk and malformed rows)."""
    import json

    from raytrain.data.demo import generate_demo_corpus

    print(json.dumps(generate_demo_corpus(out, num_docs=num_docs, seed=seed), indent=2))


def _register_ops() -> None:
    from raytrain.ops.cli import ops_app

    app.add_typer(ops_app, name="ops", help="Run stages as RayJobs and roll the RayService (Kubernetes API).")


_register_ops()


def _register_models() -> None:
    from raytrain.registry_cli import app as models_app

    app.add_typer(models_app, name="models", help="The model registry: list, show, alias, promote, rollback.")


_register_models()

bench_app = typer.Typer(help="Benchmarks that compare side by side in one run and report ratios (JSON).")
app.add_typer(bench_app, name="bench")
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _bench(name: str, doc: str) -> None:
    def command(ctx: typer.Context) -> None:
        import importlib

        module = importlib.import_module(f"raytrain.bench.{name}")
        raise typer.Exit(module.main(list(ctx.args)))

    command.__doc__ = doc + " (--help for its options)"
    bench_app.command(name, context_settings=PASS_THROUGH)(command)


_bench("train", "Ray Train + DeepSpeed vs a bare PyTorch loop: tokens/s ratio; MFU on GPU.")
_bench("serve", "Serving over HTTP vs the engine in-process at concurrency 1, 4, 16.")
_bench("data", "Curation docs/s and dedup precision/recall vs datatrove; tokenization vs tokenizers.")
_bench("posttrain", "SFT and DPO training throughput: raytrain on 2 workers vs TRL, alternating rounds.")
_bench("rl", "GRPO samples/s: raytrain vs TRL's GRPOTrainer, alternating rounds; raytrain's time split.")
_bench("pii", "PII detection precision/recall per kind on the labelled set with decoys; redaction throughput.")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
