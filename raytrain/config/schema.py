"""Typed job specs.

One spec drives every stage; each stage reads the sections it needs. Every field is documented
where it is declared, and every model forbids unknown keys so a typo fails at load time with the
dotted key named (see ``raytrain.config.loader``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    """Base of every spec section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageSpec(Section):
    root: str = Field(
        "./artifacts",
        description="Storage root for every artifact: a local path or an object-store URI "
        "(s3://bucket/prefix, gs://bucket/prefix) understood by pyarrow.fs.",
    )


class ClusterSpec(Section):
    address: str | None = Field(
        None,
        description="Ray address to connect to. Unset: use RAY_ADDRESS, else start a local Ray "
        "instance (the embedded default).",
    )
    num_cpus: int | None = Field(
        None,
        ge=1,
        description="Logical CPUs of an embedded local instance. Unset: max(4, os.cpu_count()), "
        "so 2 train workers and Ray Data's read tasks can run side by side on a 2-core laptop.",
    )


class DemoCorpusSpec(Section):
    num_docs: int = Field(1500, ge=10, le=1_000_000, description="Documents in the generated demo corpus.")
    seed: int = Field(0, description="Seed of the demo corpus generator (same seed, same bytes).")


class SourceSpec(Section):
    kind: Literal["demo", "files"] = Field(
        "demo",
        description="'demo' generates the embedded demo corpus under the storage root; "
        "'files' reads `paths`.",
    )
    paths: list[str] = Field(
        default_factory=list,
        description="Files or directories (local or object store) read when kind is 'files'.",
    )
    format: Literal["auto", "jsonl", "parquet"] = Field(
        "auto", description="Input format; 'auto' picks by file extension (.jsonl/.json[.gz], .parquet)."
    )
    text_field: str = Field("text", description="Name of the field holding the document text.")
    id_field: str = Field("id", description="Name of the field holding a document id (optional per row).")
    url_field: str = Field("url", description="Name of the field holding the document URL (optional).")
    demo: DemoCorpusSpec = Field(default_factory=DemoCorpusSpec, description="Demo corpus settings.")

    @model_validator(mode="after")
    def _paths_for_files(self) -> SourceSpec:
        if self.kind == "files" and not self.paths:
            raise ValueError("source.kind is 'files' but source.paths is empty; give at least one path")
        return self


class FilterSpec(Section):
    max_doc_bytes: int = Field(
        1_000_000, ge=1, description="Raw documents larger than this go to quarantine (reason 'too_large')."
    )
    min_words: int = Field(30, ge=0, description="Documents with fewer words are removed ('too_short').")
    max_words: int = Field(100_000, ge=1, description="Documents with more words are removed ('too_long').")
    min_mean_word_length: float = Field(3.0, ge=0, description="Gopher rule: minimum mean word length.")
    max_mean_word_length: float = Field(10.0, gt=0, description="Gopher rule: maximum mean word length.")
    min_alpha_words_fraction: float = Field(
        0.8, ge=0, le=1, description="Gopher rule: fraction of words that must contain a letter."
    )
    max_symbol_word_ratio: float = Field(
        0.1, ge=0, description="Gopher rule: maximum ratio of '#' and '...' to words."
    )
    max_duplicate_line_fraction: float = Field(
        0.3, ge=0, le=1, description="Gopher repetition rule: maximum fraction of duplicated lines."
    )

    @model_validator(mode="after")
    def _ranges(self) -> FilterSpec:
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) must not exceed max_words ({self.max_words})")
        if self.min_mean_word_length > self.max_mean_word_length:
            raise ValueError("min_mean_word_length must not exceed max_mean_word_length")
        return self


class SplitSpec(Section):
    val_fraction: float = Field(0.05, ge=0, lt=0.5, description="Fraction of documents in the validation split.")
    test_fraction: float = Field(0.05, ge=0, lt=0.5, description="Fraction of documents in the test split.")
    salt: str = Field("raytrain", description="Salt of the split hash; change it to draw a different split.")


class TokenizerSpec(Section):
    vocab_size: int = Field(4096, ge=300, le=262_144, description="Byte-level BPE vocabulary size.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")
    sample_docs: int = Field(20_000, ge=10, description="Training documents sampled to train the tokenizer.")


class DataSpec(Section):
    name: str = Field(
        "demo", pattern=r"^[A-Za-z0-9_.-]+$", description="Dataset name: datasets/<name>/ under the root."
    )
    source: SourceSpec = Field(default_factory=SourceSpec, description="Where the raw corpus comes from.")
    extract_html: bool = Field(True, description="Extract main text from HTML documents (trafilatura).")
    filters: FilterSpec = Field(default_factory=FilterSpec, description="Quality filter thresholds.")
    exact_dedup: bool = Field(True, description="Remove exact duplicates of the normalized text, keeping one.")
    split: SplitSpec = Field(default_factory=SplitSpec, description="Train/val/test split by stable document hash.")
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, description="Tokenizer training.")
    seq_len: int = Field(128, ge=8, le=131_072, description="Packed sequence length in tokens.")
    quarantine_sample_bytes: int = Field(
        4096, ge=0, description="Bytes of each malformed row kept in quarantine/ (the rest is truncated)."
    )


ModelPreset = Literal["tiny", "small", "125m", "350m", "1b"]


class ModelSpec(Section):
    name: str = Field("demo-lm", pattern=r"^[A-Za-z0-9_.-]+$", description="Model name: models/<name>/<version>/.")
    preset: ModelPreset = Field("tiny", description="Llama-family size preset (raytrain.models.presets).")
    init_from: str | None = Field(
        None, description="Local or object-store Hugging Face directory to continue pretraining from."
    )


class TrainSpec(Section):
    run_name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Run name (runs/<run_name>/ under the root). Unset: the spec's name. "
        "Re-running with the same name resumes from its latest checkpoint.",
    )
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one DeepSpeed rank each).")
    use_gpu: bool = Field(False, description="One GPU per worker (nccl) instead of CPU (gloo).")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Training precision.")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per worker per micro-step.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    lr: float = Field(3e-3, gt=0, le=1.0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps before cosine decay.")
    max_steps: int = Field(200, ge=1, description="Optimizer steps to train for.")
    grad_clip: float = Field(1.0, ge=0, description="Gradient norm clipping (0 disables).")
    seed: int = Field(0, description="Seed of model init and data order.")
    log_every: int = Field(10, ge=1, description="Steps between metric reports.")
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints (and one at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on storage (latest K).")
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts Ray Train may do (-1: unlimited).")

    @model_validator(mode="after")
    def _precision_device(self) -> TrainSpec:
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision 'fp16' needs use_gpu: true (CPU training supports 'fp32' and 'bf16')")
        return self


class EvalSpec(Section):
    split: Literal["val", "test"] = Field("val", description="Held-out split to measure perplexity on.")
    batch_size: int = Field(16, ge=1, description="Sequences per evaluation batch.")
    max_sequences: int | None = Field(None, ge=1, description="Cap on evaluated sequences (unset: all).")
    compare_untrained: bool = Field(
        True, description="Also measure an untrained model of the same preset, as a sanity baseline."
    )


class ServeSpec(Section):
    model_path: str | None = Field(
        None,
        description="Exported model directory to serve (local or object store). "
        "Unset: the model this spec trains, models/<model.name>/<run_name>.",
    )
    served_model_name: str | None = Field(None, description="Name clients pass as `model`. Unset: model.name.")
    host: str = Field("127.0.0.1", description="HTTP host of Ray Serve's proxy.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of Ray Serve's proxy.")
    app_name: str = Field("raytrain", description="Ray Serve application name.")
    route_prefix: str = Field("/", pattern=r"^/", description="Route prefix of the application.")
    min_replicas: int = Field(1, ge=0, description="Autoscaling lower bound.")
    max_replicas: int = Field(1, ge=1, description="Autoscaling upper bound.")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Autoscaling target of ongoing requests per replica.")
    max_tokens_limit: int = Field(512, ge=1, description="Largest max_tokens a request may ask for.")
    demo_prompt: str = Field("The history of", description="Prompt the pipeline sends to the endpoint at the end.")
    demo_max_tokens: int = Field(32, ge=1, description="max_tokens of the pipeline's demo request.")

    @model_validator(mode="after")
    def _bounds(self) -> ServeSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        return self


class JobSpec(Section):
    """A complete job spec: what `jobs/configs/<name>.yaml` holds."""

    name: str = Field("demo", pattern=r"^[A-Za-z0-9_.-]+$", description="Spec name; default run name.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Where artifacts live.")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec, description="Which Ray cluster to use.")
    data: DataSpec = Field(default_factory=DataSpec, description="Data curation stage.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Model architecture and name.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Pretraining stage.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Evaluation stage.")
    serve: ServeSpec = Field(default_factory=ServeSpec, description="Serving stage.")

    @property
    def run_name(self) -> str:
        return self.train.run_name or self.name

    @property
    def served_model_name(self) -> str:
        return self.serve.served_model_name or self.model.name
