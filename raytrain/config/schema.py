"""Typed job specs.

One spec drives every stage; each stage reads the sections it needs. Every field is documented
where it is declared, and every model forbids unknown keys so a typo fails at load time with the
dotted key named (see ``raytrain.config.loader``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from serving.config import AuthConfig

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def _safe_name(value: str) -> str:
    # Names become one directory level under the storage root (datasets/<name>/, runs/<name>/ …): '.', '..',
    # hidden names and separators would reach outside the directory the stage owns.
    if not _NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not allowed: a name is one path component of letters, digits, '_', '.' and '-', "
            "starting with a letter or digit (so not '.', '..' or a path), at most 128 characters"
        )
    return value


SafeName = Annotated[str, AfterValidator(_safe_name)]
"""A name that is used as one directory level under the storage root."""


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
    serve_ingress: Literal["haproxy", "proxy"] = Field(
        "haproxy",
        description="Ray Serve's HTTP ingress on an embedded local instance: 'haproxy' (Ray Serve's HAProxy "
        "ingress, routing straight to each replica's own port) or 'proxy' (Serve's Python proxy actor). A "
        "cluster started elsewhere keeps its nodes' setting (RAY_SERVE_ENABLE_HA_PROXY before `ray start`; "
        "the Helm chart's serving.haproxy).",
    )


class DemoCorpusSpec(Section):
    num_docs: int = Field(
        1500, ge=10, le=1_000_000,
        description="Generated web-like documents in the demo corpus (from 100 up, 16 planted offensive and "
        "borderline-clean documents come on top; planted.json counts every row).")
    seed: int = Field(0, description="Seed of the demo corpus generator (same seed, same bytes).")


class SourceSpec(Section):
    kind: Literal["demo", "files"] = Field(
        "demo",
        description="'demo' generates the embedded demo corpus under the storage root; "
        "'files' reads `paths`.",
    )
    paths: list[str] = Field(
        default_factory=list,
        description="Files or directories (local or object store) read when kind is 'files'. Directories are "
        "walked recursively; files of unknown type are skipped and counted in the report.",
    )
    format: Literal["auto", "jsonl", "parquet", "text", "html", "warc"] = Field(
        "auto",
        description="Input format; 'auto' picks per file by extension: .jsonl/.json/.ndjson[.gz|.zst] JSONL, "
        ".parquet Parquet, .txt/.md/.text one document per file, .html/.htm one page per file, "
        ".warc/.warc.gz WARC response (HTML) and conversion (text) records.",
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


class GopherQualitySpec(Section):
    """Gopher quality rules (Rae et al. 2021, appendix A, Table A1); defaults are the published thresholds."""

    enabled: bool = Field(True, description="Apply the Gopher quality rules.")
    min_words: int = Field(
        50, ge=1,
        description="Fewer words than this: removed ('gopher_quality:word_count'). At least 1: the other rules are "
        "ratios per word, meaningless for a document without words (1 removes only those).",
    )
    max_words: int = Field(100_000, ge=1, description="More words than this: removed ('gopher_quality:word_count').")
    min_mean_word_length: float = Field(3.0, ge=0, description="Minimum mean word length in characters.")
    max_mean_word_length: float = Field(10.0, gt=0, description="Maximum mean word length in characters.")
    max_symbol_word_ratio: float = Field(
        0.1, ge=0, description="Maximum ratio of '#' symbols, and separately of ellipses ('...', '…'), to words."
    )
    max_bullet_lines_ratio: float = Field(
        0.9, ge=0, le=1, description="Maximum fraction of lines starting with a bullet point."
    )
    max_ellipsis_lines_ratio: float = Field(
        0.3, ge=0, le=1, description="Maximum fraction of lines ending with an ellipsis."
    )
    min_alpha_words_ratio: float = Field(
        0.8, ge=0, le=1, description="Minimum fraction of words containing at least one alphabetic character."
    )
    stop_words: list[str] = Field(
        default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"],
        description="Stop words of the stop-word rule.",
    )
    min_stop_words: int = Field(2, ge=0, description="Minimum number of distinct `stop_words` a document contains.")

    @model_validator(mode="after")
    def _ranges(self) -> GopherQualitySpec:
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) must not exceed max_words ({self.max_words})")
        if self.min_mean_word_length > self.max_mean_word_length:
            raise ValueError("min_mean_word_length must not exceed max_mean_word_length")
        distinct = len({w.lower() for w in self.stop_words})
        if self.min_stop_words > distinct:
            raise ValueError(f"min_stop_words ({self.min_stop_words}) exceeds the {distinct} distinct stop_words: "
                             "every document would be removed; lower it or list more stop words")
        return self


class GopherRepetitionSpec(Section):
    """Gopher repetition rules (Rae et al. 2021, Table A1); defaults are the published thresholds."""

    enabled: bool = Field(True, description="Apply the Gopher repetition rules.")
    max_dup_line_frac: float = Field(0.30, ge=0, le=1, description="Maximum fraction of lines that are duplicates.")
    max_dup_para_frac: float = Field(
        0.30, ge=0, le=1, description="Maximum fraction of paragraphs that are duplicates."
    )
    max_dup_line_char_frac: float = Field(
        0.20, ge=0, le=1, description="Maximum fraction of characters in duplicated lines."
    )
    max_dup_para_char_frac: float = Field(
        0.20, ge=0, le=1, description="Maximum fraction of characters in duplicated paragraphs."
    )
    top_ngram_max_char_frac: dict[int, float] = Field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16},
        description="n -> maximum fraction of word characters covered by the most frequent word n-gram.",
    )
    dup_ngram_max_char_frac: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> maximum fraction of word characters covered by word n-grams that occur more than once.",
    )

    @model_validator(mode="after")
    def _ngram_rules(self) -> GopherRepetitionSpec:
        for key in ("top_ngram_max_char_frac", "dup_ngram_max_char_frac"):
            for n, limit in getattr(self, key).items():
                if not 1 <= n <= 100 or not 0 <= limit <= 1:
                    raise ValueError(f"{key}: n-gram size {n} with limit {limit} is meaningless; sizes are 1..100 "
                                     "words and limits fractions in [0, 1]")
        return self


class C4Spec(Section):
    """C4 rules (Raffel et al. 2020, section 2.2): line rules edit the text, document rules remove it."""

    enabled: bool = Field(True, description="Apply the C4 line and document rules.")
    drop_lines_without_terminal_punct: bool = Field(
        True, description="Line rule: drop lines not ending in '.', '!', '?' or a closing quote."
    )
    min_words_per_line: int = Field(5, ge=0, description="Line rule: drop lines with fewer words.")
    drop_javascript_lines: bool = Field(True, description="Line rule: drop lines mentioning 'javascript'.")
    drop_policy_lines: bool = Field(
        True, description="Line rule: drop lines about terms of use, privacy or cookie policies."
    )
    max_word_length: int = Field(1000, ge=1, description="Line rule: drop lines holding a longer word.")
    min_sentences: int = Field(3, ge=0, description="Document rule: fewer sentences (after line rules): removed.")
    remove_lorem_ipsum: bool = Field(True, description="Document rule: remove pages containing 'lorem ipsum'.")
    remove_curly_bracket: bool = Field(True, description="Document rule: remove pages containing '{' (code).")


class FineWebSpec(Section):
    """The FineWeb filter (Penedo et al. 2024, 'FineWeb' blog post and paper, section 3.3)."""

    enabled: bool = Field(True, description="Apply the FineWeb rules.")
    min_line_punct_ratio: float = Field(
        0.12, ge=0, lt=1,
        description="Remove when at most this fraction of lines ends in terminal punctuation (below 1: at 1 every "
        "document is removed).",
    )
    max_dup_line_char_ratio: float = Field(
        0.1, gt=0, le=1,
        description="Remove when the fraction of characters in duplicated lines is at least this (the blog's "
        "0.1; datatrove's release uses 0.01 over a differently counted ratio). Above 0: at 0 every document goes.",
    )
    short_line_length: int = Field(30, ge=1, description="A line with at most this many characters is short.")
    max_short_line_ratio: float = Field(
        0.67, gt=0, le=1, description="Remove when the fraction of short lines is at least this (above 0)."
    )
    max_newline_word_ratio: float = Field(
        0.3, ge=0, description="Remove when newlines per word exceed this (lists and tables; FineWeb's release)."
    )


class LanguageSpec(Section):
    enabled: bool = Field(True, description="Keep only documents identified as one of `languages` (py3langid).")
    languages: list[str] = Field(default_factory=lambda: ["en"], description="ISO 639-1 codes to keep.")
    min_score: float = Field(
        0.65, ge=0, le=1, description="Minimum probability of the top language (FineWeb keeps fastText score >= 0.65)."
    )
    max_chars: int = Field(4000, ge=100, description="Characters of the text the identifier reads (speed).")

    @model_validator(mode="after")
    def _some_language(self) -> LanguageSpec:
        if self.enabled and not self.languages:
            raise ValueError("languages is empty: every document would be removed; list the languages to keep "
                             "or set enabled: false")
        return self


class BlocklistSpec(Section):
    enabled: bool = Field(True, description="Remove documents whose URL is on the blocklist.")
    domains: list[str] = Field(
        default_factory=list, description="Blocked domains; a domain also blocks its subdomains."
    )
    url_substrings: list[str] = Field(default_factory=list, description="Blocked substrings of the full URL.")
    path: str | None = Field(
        None, description="A file (local or object store) with one blocked domain per line, added to `domains`."
    )


class BadWordsSpec(Section):
    enabled: bool = Field(True, description="Remove documents containing listed words (C4's rule).")
    words: list[str] = Field(
        default_factory=list, description="Words or phrases matched case-insensitively on word boundaries."
    )
    path: str | None = Field(
        None, description="A file with one word or phrase per line (e.g. the LDNOOBW list C4 used), added to `words`."
    )
    max_matches: int = Field(0, ge=0, description="Remove when more than this many matches are found (C4: 0).")


class PIISpec(Section):
    enabled: bool = Field(True, description="Redact personal information in kept documents.")
    email: bool = Field(True, description="Redact email addresses (not asset names such as `logo@2x.png`).")
    phone: bool = Field(
        True, description="Redact phone numbers: printed like one, valid per libphonenumber (`phonenumbers`), or a "
        "phone-length digit run after 'call', 'tel', 'phone' …; not after 'order', 'ISBN', 'tracking' ….",
    )
    ip_address: bool = Field(
        True, description="Redact IPv4 and IPv6 addresses (validated by `ipaddress`; not after 'version', "
        "'section', 'OID' …).",
    )
    credit_card: bool = Field(
        True, description="Redact Luhn-valid card numbers with a known issuer prefix (not after 'order', 'IMEI', "
        "'tracking' …).",
    )


class FuzzyDedupSpec(Section):
    enabled: bool = Field(True, description="Remove near duplicates with MinHash LSH, keeping one per cluster.")
    ngram: int = Field(5, ge=1, description="Word n-gram size of the shingles.")
    num_bands: int = Field(14, ge=1, description="LSH bands (FineWeb: 14).")
    rows_per_band: int = Field(8, ge=1, description="MinHash values per band (FineWeb: 8; 14 x 8 = 112 hashes).")
    seed: int = Field(1, description="Seed of the MinHash permutations.")
    max_pairs: int = Field(
        50_000_000, ge=1,
        description="Bound on candidate pairs the driver joins into clusters (16 bytes each); the stage fails "
        "with a clear error beyond it instead of running out of memory.",
    )


class DecontaminationSpec(Section):
    eval_paths: list[str] = Field(
        default_factory=list,
        description="Evaluation sets to protect: text files (one example per line) or JSONL with a 'text' field.",
    )
    ngram: int = Field(13, ge=1, description="Documents sharing a word n-gram this long with an eval set are removed.")


class ToxicitySpec(Section):
    """A toxicity classifier (alt-profanity-check: TF-IDF + calibrated linear SVM, shipped in its wheel)."""

    enabled: bool = Field(True, description="Remove documents the classifier finds offensive (reason 'toxicity').")
    threshold: float = Field(
        0.7, gt=0, lt=1, description="Remove a document when the classifier's probability for one of its windows "
        "is at or above this. Measured on the 1500-row demo corpus (seeds 0 and 1) with 60-word windows: clean "
        "prose scores at most 0.51, the planted offensive documents at least 0.98 and the planted borderline ones "
        "(the assassin bug, Scunthorpe, the Somme, a whelping bitch) at most 0.36. 0.5, the library's own cut, "
        "leaves no margin for the clean prose.")
    chunk_words: int = Field(
        60, ge=0, description="Score windows of consecutive sentences of about this many words and take the "
        "highest, so one offensive paragraph in a long clean document is caught: scored whole, the demo's planted "
        "ones fall to 0.01-0.66. Windows of 20-30 words flag clean sentences (up to 0.82 for one about a black "
        "hole). 0: score the whole document.")


class FilterSpec(Section):
    max_doc_bytes: int = Field(
        1_000_000, ge=1, description="Raw documents larger than this go to quarantine (reason 'too_large')."
    )
    url_blocklist: BlocklistSpec = Field(default_factory=BlocklistSpec, description="URL/domain blocklist.")
    language: LanguageSpec = Field(default_factory=LanguageSpec, description="Language identification.")
    gopher_repetition: GopherRepetitionSpec = Field(
        default_factory=GopherRepetitionSpec, description="Gopher repetition rules."
    )
    gopher_quality: GopherQualitySpec = Field(default_factory=GopherQualitySpec, description="Gopher quality rules.")
    c4: C4Spec = Field(default_factory=C4Spec, description="C4 line and document rules.")
    fineweb: FineWebSpec = Field(default_factory=FineWebSpec, description="FineWeb rules.")
    bad_words: BadWordsSpec = Field(default_factory=BadWordsSpec, description="Bad-words list.")
    toxicity: ToxicitySpec = Field(default_factory=ToxicitySpec, description="Toxicity classifier.")


class SplitSpec(Section):
    val_fraction: float = Field(0.05, ge=0, lt=0.5, description="Fraction of documents in the validation split.")
    test_fraction: float = Field(0.05, ge=0, lt=0.5, description="Fraction of documents in the test split.")
    salt: str = Field("raytrain", description="Salt of the split hash; change it to draw a different split.")


class TokenizerSpec(Section):
    vocab_size: int = Field(4096, ge=300, le=262_144, description="Byte-level BPE vocabulary size.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")
    sample_docs: int = Field(20_000, ge=10, description="Training documents sampled to train the tokenizer.")


class DataSpec(Section):
    name: SafeName = Field("demo", description="Dataset name: its versions live in datasets/<name>/<version>/.")
    version: SafeName | None = Field(
        None, description="Dataset version later stages read (a directory under datasets/<name>/). Unset: the newest "
        "one the data stage finished (datasets/<name>/latest.json). The data stage names each version by a hash of "
        "its data spec and its input files, so another corpus under the same name is a new version and never "
        "overwrites one a model's lineage refers to.")
    source: SourceSpec = Field(default_factory=SourceSpec, description="Where the raw corpus comes from.")
    extract_html: bool = Field(True, description="Extract main text from HTML documents (trafilatura).")
    filters: FilterSpec = Field(default_factory=FilterSpec, description="Quality filters, each switchable.")
    pii: PIISpec = Field(default_factory=PIISpec, description="PII redaction.")
    exact_dedup: bool = Field(True, description="Remove exact duplicates of the normalized text, keeping one.")
    fuzzy_dedup: FuzzyDedupSpec = Field(default_factory=FuzzyDedupSpec, description="MinHash LSH near-dedup.")
    decontamination: DecontaminationSpec = Field(
        default_factory=DecontaminationSpec, description="Removal of documents overlapping evaluation sets."
    )
    split: SplitSpec = Field(default_factory=SplitSpec, description="Train/val/test split by stable document hash.")
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, description="Tokenizer training.")
    seq_len: int = Field(128, ge=8, le=131_072, description="Packed sequence length in tokens.")
    quarantine_sample_bytes: int = Field(
        4096, ge=0, description="Bytes of each malformed row kept in quarantine/ (the rest is truncated)."
    )
    report_samples: int = Field(3, ge=0, description="Example documents kept in report.json per removal reason.")


ModelPreset = Literal["tiny", "small", "125m", "350m", "1b"]


class ModelSpec(Section):
    name: SafeName = Field("demo-lm", description="Model name: models/<name>/<version>/.")
    preset: ModelPreset = Field("tiny", description="Llama-family size preset (raytrain.models.presets).")
    init_from: str | None = Field(
        None, description="Local or object-store Hugging Face directory to continue pretraining from."
    )


class PretrainTask(Section):
    """Next-token prediction on the packed corpus (the data stage's output)."""

    type: Literal["pretrain"] = Field("pretrain", description="Causal-LM pretraining on packed sequences.")


class LoRASpec(Section):
    """Low-rank adapters (`peft`): only the adapters train; exports merge them into the weights."""

    r: int = Field(8, ge=1, description="Adapter rank.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator: the update is (alpha / r) * B @ A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1, description="Names of the Linear modules that get adapters (Llama's projections).",
    )


class SFTTask(Section):
    """Supervised fine-tuning: cross-entropy on the assistant (completion) tokens, weighted by those tokens."""

    type: Literal["sft"] = Field("sft", description="Supervised fine-tuning on demonstrations.")
    assistant_only_loss: bool = Field(
        True, description="Loss on assistant/completion tokens only (false: on every token, prompt included).",
    )
    lora: LoRASpec | None = Field(None, description="Train LoRA adapters instead of every weight (unset: full).")


class RewardTask(Section):
    """A scalar reward model trained on comparisons with the Bradley-Terry loss, weighted by pairs."""

    type: Literal["reward"] = Field("reward", description="Reward model from preference pairs.")
    margin: float = Field(
        0.0, ge=0, description="Bradley-Terry margin: loss = -log sigmoid(r_chosen - r_rejected - margin).",
    )


class DPOTask(Section):
    """Direct preference optimisation (Rafailov et al. 2023) or IPO (Azar et al. 2023), weighted by pairs."""

    type: Literal["dpo"] = Field("dpo", description="Offline preference optimisation against a reference.")
    beta: float = Field(0.1, gt=0, description="KL constraint strength to the reference (DPO's beta, IPO's tau).")
    loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="'sigmoid': DPO's -log sigmoid(beta * margin); 'ipo': (margin - 1/(2 beta))^2 "
        "on length-normalised log-ratios.",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Conservative DPO: assumed fraction of flipped labels (sigmoid loss only).",
    )
    reference: Literal["precomputed", "model"] = Field(
        "precomputed",
        description="'precomputed': one Ray Data batch-inference pass scores every pair with the reference model "
        "before training (no reference in training memory); 'model': a frozen reference in every worker.",
    )
    lora: LoRASpec | None = Field(None, description="Train LoRA adapters instead of every weight (unset: full).")

    @model_validator(mode="after")
    def _smoothing(self) -> DPOTask:
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError("label_smoothing applies to loss_type 'sigmoid' only")
        return self


class AdaptiveKLSpec(Section):
    """Ziegler et al.'s adaptive KL controller (PPO): the coefficient moves so that the measured KL tracks `target`."""

    target: float = Field(6.0, gt=0, description="KL (nats per response, summed over tokens) the controller aims at.")
    horizon: int = Field(10_000, ge=1, description="Responses over which the coefficient may change by about e.")


class RLTask(Section):
    """Online RL (PPO or GRPO) of a policy against a reward, with a KL term to the frozen reference (its parent).

    One iteration: prompts -> `n_samples` responses each from the rollout engines -> rewards -> reference (and
    value) log-probs -> advantages -> `ppo_epochs` passes of clipped policy (and value) updates -> weight sync.
    """

    type: Literal["rl"] = Field("rl", description="Online reinforcement learning from a reward.")
    algorithm: Literal["ppo", "grpo"] = Field(
        "grpo", description="grpo: group-normalised advantages over `n_samples` responses per prompt, KL as a loss "
        "term, no critic. ppo: a critic, GAE, KL as a per-token penalty in the reward.")
    n_samples: int = Field(4, ge=1, description="Responses sampled per prompt (GRPO's group size; needs >= 2).")
    ppo_epochs: int = Field(1, ge=1, description="Passes over each iteration's experience (optimizer updates).")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO ratio clip: the ratio is kept in [1-eps, 1+eps].")
    kl_coef: float = Field(
        0.05, ge=0, description="KL strength: GRPO's beta (loss term); PPO's initial coefficient of the penalty.")
    kl_estimator: Literal["k1", "k3"] | None = Field(
        None, description="Per-token KL estimator: k1 = logp - ref (unbiased, can be negative), k3 = "
        "exp(ref - logp) - (ref - logp) - 1 (non-negative). Unset: k3 for GRPO, k1 for PPO.")
    adaptive_kl: AdaptiveKLSpec | None = Field(
        None, description="PPO only: adapt kl_coef towards a target KL (unset: fixed coefficient).")
    scale_rewards: bool = Field(
        True, description="GRPO: divide each group's centred rewards by the group's std (false: Dr. GRPO's "
        "centring only).")
    gamma: float = Field(1.0, ge=0, le=1, description="PPO: discount of GAE.")
    lam: float = Field(0.95, ge=0, le=1, description="PPO: lambda of GAE.")
    vf_coef: float = Field(0.5, ge=0, description="PPO: weight of the value loss in the combined loss.")
    value_clip: float = Field(0.2, gt=0, description="PPO: the new value is kept within this of the old one.")
    normalize_rewards: bool = Field(
        True, description="PPO: scale scores by a running std of the scores seen so far (kept in checkpoints).")
    reward_clip: float = Field(10.0, gt=0, description="Scores are clipped to [-reward_clip, reward_clip].")
    whiten_advantages: bool = Field(True, description="PPO: whiten advantages over each iteration's responses.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus weight (0: entropy is only reported).")

    @model_validator(mode="after")
    def _check(self) -> RLTask:
        if self.algorithm == "grpo" and self.n_samples < 2:
            raise ValueError("grpo needs n_samples >= 2: advantages are relative to the other responses of a group")
        if self.algorithm == "grpo" and self.adaptive_kl is not None:
            raise ValueError("adaptive_kl applies to ppo (KL in the reward); grpo's KL is a fixed-weight loss term")
        return self

    @property
    def estimator(self) -> str:
        return self.kl_estimator or ("k3" if self.algorithm == "grpo" else "k1")


TaskSpec = Annotated[PretrainTask | SFTTask | RewardTask | DPOTask | RLTask, Field(discriminator="type")]
"""What a training run optimises; `type` selects it: pretrain | sft | reward | dpo | rl."""


class TrainSpec(Section):
    run_name: SafeName | None = Field(
        None,
        description="Run name (runs/<run_name>/ under the root). Unset: the spec's name. "
        "Re-running with the same name resumes from its latest checkpoint.",
    )
    task: TaskSpec = Field(
        default_factory=PretrainTask,
        description="What the run optimises (`type`: pretrain | sft | reward | dpo | rl) and that task's settings.",
    )
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one DeepSpeed rank each).")
    use_gpu: bool = Field(False, description="One GPU per worker (nccl) instead of CPU (gloo).")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Training precision.")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per worker per micro-step.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload: optimizer state and step on CPU (stage >= 1).")
    offload_params: bool = Field(False, description="ZeRO-Infinity style parameter offload to CPU (stage 3 only).")
    activation_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    lr: float = Field(3e-3, gt=0, le=1.0, description="Peak learning rate (AdamW).")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="LR after warmup: cosine decay or constant.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine floor as a fraction of the peak LR.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps before cosine decay.")
    max_steps: int = Field(200, ge=1, description="Optimizer steps to train for.")
    grad_clip: float = Field(1.0, ge=0, description="Gradient norm clipping (0 disables).")
    seed: int = Field(0, description="Seed of model init and data order.")
    shuffle_buffer: int = Field(
        256, ge=0, description="Sequences in each worker's seeded per-epoch shuffle buffer (0: stream order)."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK", description="How workers are placed on nodes (STRICT_SPREAD: one worker per node)."
    )
    sample_log: bool = Field(
        False, description="Write each step's sequence fingerprints per rank under runs/<run>/samples/ (audit)."
    )
    tensorboard: bool = Field(True, description="Write TensorBoard event files under runs/<run>/tensorboard/.")
    log_every: int = Field(10, ge=1, description="Steps between metric reports.")
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints (and one at the end).")
    eval_every: int = Field(
        0, ge=0, description="Steps between evaluations of the loss on the held-out (val) split, reported as "
        "`val_loss` (and `val_<statistic>`) with the training metrics, and once at the end. 0: off. Sweeps need it.")
    eval_batches: int = Field(
        0, ge=0, description="Micro-batches of the val split each worker evaluates (read once, kept in memory); "
        "0: its whole part of the split.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on storage (latest K).")
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts Ray Train may do (-1: unlimited).")

    @model_validator(mode="after")
    def _combinations(self) -> TrainSpec:
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision 'fp16' needs use_gpu: true (CPU training supports 'fp32' and 'bf16')")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3 (got zero_stage {self.zero_stage})")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3 (got zero_stage 0)")
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        return self


class AlignmentDemoSpec(Section):
    """The embedded alignment demo (generated, no download): see `raytrain.posttrain.demo`."""

    num_sft: int = Field(1200, ge=10, description="Demonstrations (conversations) generated for SFT.")
    num_pairs: int = Field(1600, ge=10, description="Comparison pairs labelled by the hidden preference rule.")
    num_eval_prompts: int = Field(64, ge=1, description="Held-out prompts the alignment evaluation samples from.")
    num_prompts: int = Field(
        800, ge=10, description="Prompts for online RL (prompts.jsonl): from the training pool, none held out.")
    seed: int = Field(0, description="Generator seed (same seed, same bytes).")


class PostTrainDataSpec(Section):
    """Demonstrations (SFT) or comparisons (reward, DPO), prepared with Ray Data into token arrays."""

    name: SafeName = Field("demo-sft", description="Dataset name: datasets/<name>/ under the storage root.")
    source: Literal["demo", "files"] = Field(
        "demo", description="'demo' generates the embedded alignment demo; 'files' reads `paths`.",
    )
    paths: list[str] = Field(
        default_factory=list, description="JSONL or Parquet files or directories (local or object store).",
    )
    format: Literal["auto", "jsonl", "parquet"] = Field(
        "auto", description="File format; 'auto' by extension (.jsonl/.json/.ndjson[.gz|.zst], .parquet).",
    )
    messages_field: str = Field("messages", description="Conversational SFT rows: the list of {role, content}.")
    prompt_field: str = Field("prompt", description="Prompt (a string or a list of messages).")
    completion_field: str = Field("completion", description="SFT completion (a string or a list of messages).")
    chosen_field: str = Field("chosen", description="Preferred response (a string or a list of messages).")
    rejected_field: str = Field("rejected", description="Dispreferred response (a string or a list of messages).")
    ground_truth_field: str = Field(
        "ground_truth", description="RL prompts: an optional reference answer (any JSON value) handed to reward "
        "functions as `ground_truth`.")
    max_length: int = Field(256, ge=8, description="Longest prompt + response in tokens.")
    max_prompt_length: int = Field(
        128, ge=1,
        description="Truncation policy: a prompt longer than this keeps its last max_prompt_length tokens (the ones "
        "next to the response); then the response is cut from its end to fit max_length. A row with no response "
        "token left is quarantined ('truncated_to_nothing').",
    )
    val_fraction: float = Field(0.1, ge=0, lt=0.5, description="Rows held out, by a stable hash of the row.")
    salt: str = Field("raytrain", description="Salt of the split hash; change it to draw a different split.")
    demo: AlignmentDemoSpec = Field(default_factory=AlignmentDemoSpec, description="Embedded demo settings.")

    @model_validator(mode="after")
    def _check(self) -> PostTrainDataSpec:
        if self.source == "files" and not self.paths:
            raise ValueError("source is 'files' but paths is empty; give at least one path")
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be below max_length "
                             f"({self.max_length}): the response needs room")
        return self


_POST_TRAIN_DEFAULTS: dict[str, dict] = {
    "sft": {"task": {"type": "sft"}, "lr": 1e-3, "warmup_steps": 5, "max_steps": 100, "schedule": "cosine",
            "weight_decay": 0.0, "checkpoint_every": 50},
    "reward": {"task": {"type": "reward"}, "lr": 1e-3, "warmup_steps": 5, "max_steps": 100, "weight_decay": 0.0,
               "checkpoint_every": 50},
    "dpo": {"task": {"type": "dpo"}, "lr": 5e-4, "warmup_steps": 5, "max_steps": 100, "weight_decay": 0.0,
            "checkpoint_every": 50},
    # RL counts in iterations (rl.iterations, rl.checkpoint_every): the stage derives max_steps and the step
    # cadences from them, so these are placeholders a recipe does not need to set.
    "rl": {"task": {"type": "rl"}, "lr": 2e-4, "warmup_steps": 0, "max_steps": 1, "schedule": "constant",
           "weight_decay": 0.0, "checkpoint_every": 1, "log_every": 1, "shuffle_buffer": 0, "grad_clip": 1.0},
}


class PostTrainStageSpec(Section):
    """One post-training stage: a parent model, its data, and a training run with that stage's task."""

    model_name: SafeName | None = Field(
        None, description="Registry name of the export (models/<model_name>/<N>/). Unset: <model.name>-<stage>.",
    )
    parent: str | None = Field(
        None,
        description="Model to start from: a registry reference (models:/<name>/<N>, models:/<name>@<alias>, "
        "models:/<name>/latest), an object-store URI, an absolute path, or a path relative to storage.root. Unset: "
        "the version the previous stage of this spec exported (sft: pretrained; reward and dpo: SFT).",
    )
    data: PostTrainDataSpec = Field(default_factory=PostTrainDataSpec, description="Training data.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="The run; `train.task.type` names the stage.")


def _stage_spec(stage: str, data_name: str) -> type[PostTrainStageSpec]:
    defaults = _POST_TRAIN_DEFAULTS[stage]

    class StageSpec(PostTrainStageSpec):
        data: PostTrainDataSpec = Field(
            default_factory=lambda: PostTrainDataSpec(name=data_name),
            description="Demonstrations (SFT) or comparison pairs (reward, DPO).",
        )
        train: TrainSpec = Field(
            default_factory=lambda: TrainSpec(**defaults),
            description=f"The run; its task is `{stage}` (train.task.type: {stage}).",
        )

        @model_validator(mode="before")
        @classmethod
        def _task_default(cls, values: object) -> object:
            # A recipe that tunes `train` without naming the task gets this stage's task and defaults.
            if isinstance(values, dict) and isinstance(values.get("train"), dict):
                values = {**values, "train": {**defaults, **values["train"],
                                              "task": {**defaults["task"], **(values["train"].get("task") or {})}}}
            return values

        @model_validator(mode="after")
        def _task_matches(self) -> StageSpec:
            if self.train.task.type != stage:
                raise ValueError(f"the {stage} stage trains task '{stage}', but train.task.type is "
                                 f"'{self.train.task.type}'")
            return self

    StageSpec.__name__ = StageSpec.__qualname__ = {"sft": "SFT", "reward": "Reward", "dpo": "DPO",
                                                   "rl": "RLBase"}[stage] + "StageSpec"
    return StageSpec


SFTStageSpec = _stage_spec("sft", "demo-sft")
RewardStageSpec = _stage_spec("reward", "demo-prefs")
DPOStageSpec = _stage_spec("dpo", "demo-prefs")


class VLLMRolloutSpec(Section):
    """vLLM engine arguments for rollout engines on GPU clusters (`vllm.LLM(**kwargs)`; not installable on CPU)."""

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per rollout engine (tensor parallel).")
    gpu_memory_utilization: float = Field(
        0.5, gt=0, le=0.95, description="Share of each engine GPU's memory vLLM may take (weights + KV cache).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("bfloat16", description="Weights' dtype.")
    enforce_eager: bool = Field(False, description="Skip CUDA graph capture (faster start, slower decode).")
    max_model_len: int | None = Field(
        None, ge=16, description="Context of the engine. Unset: prompt + response lengths of this stage.")
    enable_prefix_caching: bool = Field(True, description="Reuse the KV cache of a prompt shared by a group.")
    enable_sleep_mode: bool = Field(
        False, description="Colocated placement: free the engine's KV cache while the policy trains (vLLM sleep).")


class RolloutSpec(Section):
    """Where and how responses are sampled: engines behind the serving engine protocol."""

    backend: Literal["torch", "vllm"] = Field(
        "torch", description="torch: serving.engine.TorchEngine (CPU or one GPU). vllm: vLLM engines (GPU clusters).")
    placement: Literal["colocated", "split"] = Field(
        "colocated", description="colocated: each training worker holds its rollout engine, reference and reward "
        "model (one set of devices). split: rollout engines, reference and reward models are their own Ray actor "
        "groups, and each worker sends them its share.")
    num_engines: int | None = Field(
        None, ge=1, description="split: rollout engine actors (unset: one per training worker). Worker r uses "
        "engine r mod num_engines.")
    num_cpus: float = Field(1.0, ge=0, description="split: CPUs each actor (engine, reference, reward) reserves.")
    num_gpus: float = Field(
        0.0, ge=0, description="split: GPUs each actor reserves (vllm: tensor_parallel_size when unset as 0).")
    prompts_per_iteration: int = Field(
        16, ge=1, description="Prompts per iteration over all workers (each worker takes an equal share).")
    max_new_tokens: int = Field(48, ge=1, description="Longest response in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of rollouts.")
    engine_batch_size: int = Field(64, ge=1, description="torch: rows an engine decodes together.")
    max_engine_restarts: int = Field(
        3, ge=0, description="split: times Ray restarts a dead engine actor; the worker then re-syncs weights and "
        "re-generates the same (seeded) responses.")
    vllm: VLLMRolloutSpec = Field(default_factory=VLLMRolloutSpec, description="vLLM engine settings (backend vllm).")


class RewardFunctionSpec(Section):
    name: str = Field(
        ..., pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="`module:function` taking (prompts, completions, ground_truth=None, **kwargs) -> list of floats "
        "(TRL's reward-function convention), e.g. raytrain.posttrain.demo:reward.")
    weight: float = Field(1.0, description="Weight of this function in the summed reward.")


class RewardSourceSpec(Section):
    """What scores a response: a reward model, Python functions, or both (weighted sum)."""

    model: str | None = Field(
        None, description="Reward model (one-label sequence classifier): a registry reference (models:/<name>/…), "
        "a path or URI. Unset: this spec's reward stage export when `functions` is empty.")
    model_weight: float = Field(1.0, description="Weight of the reward model's score in the sum.")
    functions: list[RewardFunctionSpec] = Field(default_factory=list, description="Rule-based reward functions.")


class RLStageSpec(_stage_spec("rl", "demo-prompts")):  # type: ignore[misc]
    """Online RL (`raytrain rl`): a policy from an SFT export, trained against a reward with PPO or GRPO."""

    data: PostTrainDataSpec = Field(
        default_factory=lambda: PostTrainDataSpec(name="demo-prompts", max_length=112, max_prompt_length=64),
        description="Prompts ({prompt: str | messages, ground_truth?}); max_prompt_length bounds the prompt, "
        "max_length prompt + response.")
    iterations: int = Field(20, ge=1, description="RL iterations (rollout, score, update, sync).")
    rollout: RolloutSpec = Field(default_factory=RolloutSpec, description="Rollout engines.")
    reward: RewardSourceSpec = Field(default_factory=RewardSourceSpec, description="Reward sources.")
    checkpoint_every: int = Field(5, ge=1, description="Iterations between checkpoints (and one at the end).")
    eval_every: int = Field(5, ge=0, description="Iterations between held-out evaluations (0: only at the end).")
    eval_prompts: int = Field(32, ge=1, description="Held-out prompts (the val split) each evaluation samples.")

    @model_validator(mode="after")
    def _shapes(self) -> RLStageSpec:
        t, task, r = self.train, self.train.task, self.rollout
        if t.eval_every:
            raise ValueError(f"train.eval_every ({t.eval_every}) is for supervised losses; online RL evaluates the "
                             "held-out reward every rl.eval_every iterations instead: set rl.train.eval_every to 0")
        if r.prompts_per_iteration % t.num_workers:
            raise ValueError(f"rollout.prompts_per_iteration ({r.prompts_per_iteration}) must be a multiple of "
                             f"train.num_workers ({t.num_workers}): each worker takes an equal share")
        rows = r.prompts_per_iteration // t.num_workers * task.n_samples
        per_step = t.micro_batch_size * t.grad_accum_steps
        if rows % per_step:
            raise ValueError(f"each worker's responses per iteration (rollout.prompts_per_iteration / num_workers x "
                             f"train.task.n_samples = {rows}) must be a multiple of train.micro_batch_size x "
                             f"train.grad_accum_steps ({per_step})")
        if r.max_new_tokens + self.data.max_prompt_length > self.data.max_length:
            raise ValueError(f"rollout.max_new_tokens ({r.max_new_tokens}) + data.max_prompt_length "
                             f"({self.data.max_prompt_length}) exceeds data.max_length ({self.data.max_length})")
        if r.backend == "vllm" and not t.use_gpu:
            raise ValueError("rollout.backend 'vllm' needs train.use_gpu: true (vLLM runs on GPUs only); "
                             "use backend 'torch' on CPU")
        if task.algorithm == "ppo" and task.adaptive_kl is not None and task.kl_coef == 0:
            raise ValueError("train.task.adaptive_kl needs kl_coef > 0 to adapt (a zero coefficient stays zero)")
        if r.backend == "vllm":
            from raytrain.rl.vllm_engine import validate  # no vLLM import: the rules need only the spec

            validate(self)
        return self

    @property
    def steps_per_iteration(self) -> int:
        t = self.train
        rows = self.rollout.prompts_per_iteration // t.num_workers * t.task.n_samples
        return t.task.ppo_epochs * rows // (t.micro_batch_size * t.grad_accum_steps)


class PerplexityEvalSpec(Section):
    """Perplexity of the candidate (and its parent, and an untrained model) on the corpus's held-out splits."""

    enabled: bool = Field(True, description="Run this suite.")
    splits: list[Literal["val", "test"]] = Field(
        default_factory=lambda: ["val"], min_length=1, description="Held-out splits to measure perplexity on.")
    batch_size: int = Field(16, ge=1, description="Sequences per evaluation batch.")
    max_sequences: int | None = Field(None, ge=1, description="Cap on evaluated sequences per split (unset: all).")
    compare_parent: bool = Field(
        True, description="Also measure the candidate's parent (lineage.json) when it is a causal LM: "
        "`change_vs_parent` = candidate / parent - 1, what the promotion gate bounds.")
    compare_untrained: bool = Field(
        True, description="Also measure an untrained model of the same preset, as a sanity baseline."
    )


class LMEvalSpec(Section):
    """Tasks of the `lm-eval` harness on the exported model (offline: local task YAML and data files)."""

    enabled: bool = Field(False, description="Run this suite.")
    tasks: list[str] = Field(default_factory=list, description="Task (or group) names the harness resolves.")
    include_path: str | None = Field(
        None, description="Directory of task YAML files. Unset: the tasks packaged in raytrain/eval/tasks/.")
    limit: int | None = Field(None, ge=1, description="Documents per task (unset: all).")
    batch_size: int = Field(8, ge=1, description="Requests per forward pass.")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples (unset: each task's own setting).")

    @model_validator(mode="after")
    def _check(self) -> LMEvalSpec:
        if self.enabled and not self.tasks:
            raise ValueError("enabled is true but tasks is empty; name at least one task (e.g. raytrain_demo_mc)")
        return self


class SamplingEvalSpec(Section):
    """How responses are sampled on held-out prompts (shared by the suites that generate)."""

    max_prompts: int = Field(32, ge=1, description="Held-out prompts sampled (the first ones, in file order).")
    samples_per_prompt: int = Field(2, ge=1, description="Responses sampled per prompt.")
    max_new_tokens: int = Field(48, ge=1, description="Longest response in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (top_k 0, top_p 1).")
    seed: int = Field(0, description="Sampling seed: same seed, same responses.")
    prompts_path: str | None = Field(
        None, description="Held-out prompts: a JSONL of {\"prompt\": [messages]} (local or object store). Unset: "
        "the embedded alignment demo's held-out prompts when the spec post-trains on it.")


class WinRateSpec(SamplingEvalSpec):
    """Reward-model win rate of the candidate over a baseline on held-out prompts (post-trained models)."""

    enabled: bool = Field(True, description="Run this suite when a reward model and held-out prompts exist.")
    baseline: str | None = Field(None, description="Baseline model directory. Unset: the candidate's parent.")
    reward_model: str | None = Field(
        None, description="Reward model directory (one-label sequence classifier). Unset: this spec's reward stage.")


class AlignmentEvalSpec(SamplingEvalSpec):
    """Ground-truth reward and KL to the SFT model, for the embedded alignment demo (hidden preference rule)."""

    enabled: bool = Field(True, description="Run this suite when the spec's DPO data is the embedded demo.")
    max_prompts: int = Field(64, ge=1, description="Held-out demo prompts sampled.")


class OverfittingSpec(Section):
    """Training vs held-out loss over a run's checkpoints (the Hugging Face export in each checkpoint's `hf/`).

    Flag rule: with gap = held-out loss - training loss at each checkpoint (by step), a run is flagged when the gap
    at its last checkpoint exceeds the smallest gap of any checkpoint by more than `max_gap_growth`.
    """

    enabled: bool = Field(True, description="Run this suite.")
    stages: list[Literal["pretrain", "sft", "dpo"]] = Field(
        default_factory=lambda: ["pretrain", "sft", "dpo"],
        description="Runs to score, those this spec has (pretrain: LM loss; sft: response NLL; dpo: DPO loss with "
        "the precomputed reference).")
    max_sequences: int = Field(128, ge=1, description="Rows scored per split (train and held-out), per run.")
    max_gap_growth: float = Field(
        0.1, ge=0, description="Largest allowed rise (nats) of the held-out minus training loss gap, from its "
        "smallest value over the checkpoints to the last checkpoint.")
    batch_size: int = Field(32, ge=1, description="Rows per scoring batch.")


class SafetyEvalSpec(SamplingEvalSpec):
    """Share of sampled responses a toxicity classifier or the blocklist flags (raytrain.eval.safety)."""

    enabled: bool = Field(True, description="Run this suite.")
    max_prompts: int = Field(16, ge=1, description="Held-out prompts sampled.")
    threshold: float | None = Field(
        None, gt=0, lt=1, description="Classifier probability at or above which a response is unsafe "
        "(unset: the classifier's default).")


class EvalSpec(Section):
    """The `eval` stage: suites run on the candidate model; results go to its eval.json and eval.md."""

    model_path: str | None = Field(
        None, description="Model directory to evaluate (local or object store). Unset: the candidate, the model "
        "this spec's last training stage exports (dpo, else sft, else pretrain).")
    use_gpu: bool | None = Field(
        None, description="Score on GPUs (one per replica or task). Unset: the same as train.use_gpu."
    )
    num_replicas: int = Field(
        1, ge=1, description="Model replicas scoring batches in parallel (Ray Data actors; one GPU each on GPU)."
    )
    perplexity: PerplexityEvalSpec = Field(default_factory=PerplexityEvalSpec, description="Perplexity suite.")
    lm_eval: LMEvalSpec = Field(default_factory=LMEvalSpec, description="lm-eval harness suite.")
    win_rate: WinRateSpec = Field(default_factory=WinRateSpec, description="Reward-model win rate suite.")
    alignment: AlignmentEvalSpec = Field(default_factory=AlignmentEvalSpec,
                                         description="Ground-truth reward suite (embedded alignment demo).")
    overfitting: OverfittingSpec = Field(default_factory=OverfittingSpec, description="Overfitting suite.")
    safety: SafetyEvalSpec = Field(default_factory=SafetyEvalSpec, description="Generation safety suite.")


class ServeAuthSpec(AuthConfig):
    """API keys for the served endpoint (OpenAI-style `Authorization: Bearer <key>`): the serving app's own
    `serving.config.AuthConfig` (where each replica finds its keys), plus the waiver below.

    The keys themselves never live in a spec: each replica reads them from its own environment or filesystem (on
    Kubernetes a mounted Secret), and the `pipeline` stage's driver reads them the same way for its demo request.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    allow_unauthenticated: bool = Field(
        False,
        description="Serve without keys on a host other machines can reach (serve.host not loopback). Off: such a "
        "spec is refused, so an open endpoint is always a decision written down, never an omission.",
    )


class GateCheck(Section):
    """One check of the promotion gate: a figure of the candidate's eval.json against a bound."""

    metric: str = Field(
        ..., pattern=r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-/]+)*$",
        description="Dotted path into eval.json, e.g. perplexity.change_vs_parent, win_rate.win_rate, "
        "lm_eval.raytrain_demo_mc.acc, safety.unsafe_rate, overfitting.flagged.")
    min: float | None = Field(None, description="Smallest value that passes.")
    max: float | None = Field(None, description="Largest value that passes.")
    equals: bool | float | str | None = Field(None, description="The only value that passes (e.g. false).")

    @model_validator(mode="after")
    def _one_bound(self) -> GateCheck:
        if self.min is None and self.max is None and self.equals is None:
            raise ValueError(f"check {self.metric!r} states no bound: set min, max or equals")
        if self.equals is not None and (self.min is not None or self.max is not None):
            raise ValueError(f"check {self.metric!r}: equals excludes min and max")
        return self


class PromoteSpec(Section):
    """The promotion gate: checks a candidate must pass to take `alias` (`raytrain models promote`, the pipeline)."""

    enabled: bool = Field(True, description="The pipeline runs the gate after eval and promotes a candidate that "
                          "passes (then serves the alias when serve.alias is set).")
    alias: str = Field("champion", pattern=r"^[a-z][a-z0-9_-]{0,62}$", description="Alias a passing candidate takes.")
    checks: list[GateCheck] = Field(default_factory=list, description="Every check must pass; none: always passes.")
    on_missing: Literal["fail", "skip"] = Field(
        "fail", description="A check whose metric eval.json lacks: fail (refuse the promotion) or skip it.")


class ServeSpec(Section):
    model_path: str | None = Field(
        None,
        description="Exported model directory to serve (local or object store). "
        "Unset: `alias` if set, else the model this spec's last training stage exported.",
    )
    alias: str | None = Field(
        None, pattern=r"^[a-z][a-z0-9_-]{0,62}$",
        description="Serve the registry version this alias names (e.g. champion) instead of the newest export: "
        "`raytrain models promote|rollback` move it, a redeploy (`raytrain serve`, `raytrain ops rollout --alias`) "
        "follows. The model is `registry_model`.")
    registry_model: SafeName | None = Field(
        None, description="Registry model `alias` refers to. Unset: the model this spec's last training stage "
        "exports (<model.name>-dpo, -sft, or model.name).")
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
    auth: ServeAuthSpec = Field(
        default_factory=ServeAuthSpec,
        description="API keys. Required (or explicitly waived) when `host` is reachable from other machines.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> ServeSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        if not self.auth.enabled and not self.auth.allow_unauthenticated and not self.is_loopback_host:
            # The loader reports a section-level error under `serve`; the message names the keys to set.
            raise ValueError(
                f"host {self.host!r} accepts connections from other machines, but serve.auth is off: set "
                f"serve.auth.enabled: true (keys from ${self.auth.keys_env} or serve.auth.keys_file), or "
                "serve.auth.allow_unauthenticated: true to serve openly on purpose"
            )
        return self

    @property
    def is_loopback_host(self) -> bool:
        """Whether only this machine can reach `host` (127.0.0.0/8, ::1, localhost)."""
        import ipaddress

        if self.host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False  # a host name other than localhost may resolve to any interface


SPACE_KINDS = ("loguniform", "uniform", "int", "choice", "grid")
TUNE_STAGES = ("pretrain", "sft", "reward", "dpo")
# Keys a sweep may not vary: a trial's resources, its name and its evaluation cadence are the sweep's own.
_FIXED_KEYS = ("num_workers", "use_gpu", "run_name", "eval_every", "checkpoint_every", "max_steps")


class TuneSchedulerSpec(Section):
    type: Literal["asha", "fifo"] = Field(
        "asha", description="'asha' stops trials whose metric trails the others' at each rung; 'fifo' runs all.")
    grace_period: int = Field(10, ge=1, description="ASHA: steps every trial runs before it can be stopped.")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: 1/reduction_factor of the trials go on at a rung.")
    max_t: int | None = Field(
        None, ge=1, description="ASHA: the budget in steps (rungs lie below it). Unset: the stage's train.max_steps.")


class TuneSearchSpec(Section):
    algorithm: Literal["random", "optuna"] = Field(
        "random", description="'random': independent draws (and every `grid` value); 'optuna': Optuna's TPE.")
    seed: int = Field(0, description="Seed of the search algorithm.")


class TuneSpec(Section):
    """A Ray Tune sweep over one training stage (`raytrain tune`)."""

    stage: Literal["pretrain", "sft", "reward", "dpo"] = Field("pretrain", description="The stage whose run is swept.")
    name: SafeName | None = Field(
        None, description="Experiment name: tune/<name>/ under the storage root; re-running it resumes the sweep. "
        "Unset: <spec name>-<stage>-sweep.")
    space: dict[str, dict[str, list[Any]]] = Field(
        ..., description="Dotted spec key -> {loguniform: [lo, hi]} | {uniform: [lo, hi]} | {int: [lo, hi]} "
        "(inclusive) | {choice: [values]} | {grid: [values]} (every value, num_samples times each). Keys lie in the "
        "swept stage's sections (pretrain: train.*, model.*; sft/reward/dpo: <stage>.train.*).")
    num_samples: int = Field(4, ge=1, description="Trials (with grid keys: repetitions of the grid).")
    metric: str = Field("val_loss", description="Reported metric the sweep optimises (val_loss needs eval_every).")
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher `metric` is better.")
    scheduler: TuneSchedulerSpec = Field(default_factory=TuneSchedulerSpec, description="Early stopping.")
    search: TuneSearchSpec = Field(default_factory=TuneSearchSpec, description="How trials' settings are drawn.")
    max_concurrent: int | None = Field(
        None, ge=1, description="At most this many trials at once (the cluster's resources may allow fewer).")
    driver_cpus: float = Field(
        0.5, ge=0, description="CPUs each trial's driver holds besides its workers (it waits on Ray Train).")
    data_cpus: float = Field(
        1.0, ge=0, description="CPUs kept free of trials for the Ray Data tasks that feed them.")
    register_best: bool = Field(
        True, description="Export the best trial's model as the stage's next registry version (a candidate).")

    @model_validator(mode="after")
    def _space_shape(self) -> TuneSpec:
        if not self.space:
            raise ValueError("tune.space is empty: name at least one key, e.g. train.lr: {loguniform: [1e-4, 1e-2]}")
        for key, dim in self.space.items():
            where = f"tune.space.{key}"
            if len(dim) != 1 or next(iter(dim)) not in SPACE_KINDS:
                raise ValueError(f"{where}: give exactly one of {', '.join(SPACE_KINDS)} (got {sorted(dim)})")
            kind, values = next(iter(dim.items()))
            if kind in ("loguniform", "uniform", "int"):
                # YAML 1.1 reads 1e-4 (no dot) as a string: take numeric strings as the numbers they spell.
                values = dim[kind] = [_number(v) for v in values]
                if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                    raise ValueError(f"{where}: {kind} takes [low, high] numbers (got {values})")
                if not values[0] < values[1]:
                    raise ValueError(f"{where}: {kind} needs low < high (got {values})")
                if kind == "loguniform" and values[0] <= 0:
                    raise ValueError(f"{where}: loguniform needs low > 0 (got {values[0]})")
                if kind == "int" and not all(isinstance(v, int) for v in values):
                    raise ValueError(f"{where}: int takes integer bounds (got {values})")
            elif not values:
                raise ValueError(f"{where}: {kind} needs at least one value")
            if kind == "grid" and self.search.algorithm != "random":
                raise ValueError(f"{where}: grid values need tune.search.algorithm 'random' (Optuna draws, it does "
                                 "not enumerate)")
        return self

    def extremes(self, key: str) -> list[tuple[str, Any]]:
        """(what, value) pairs that bound a dimension: every value a trial could take lies between or among them."""
        kind, values = next(iter(self.space[key].items()))
        if kind in ("loguniform", "uniform", "int"):
            return [(f"{kind}'s low bound", values[0]), (f"{kind}'s high bound", values[1])]
        return [(f"{kind} value", v) for v in values]


def _number(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _set_path(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        tree = tree[part]
    tree[parts[-1]] = value


def check_tune_space(spec: JobSpec) -> None:
    """Refuse a space a trial could not run: an unknown key, one outside the swept stage, a value the stage's own
    validation refuses (each bound and choice is applied to the spec and validated). Raises ValueError naming the key.
    """
    from pydantic import ValidationError

    tune = spec.tune
    assert tune is not None
    stage = tune.stage
    if stage != "pretrain" and getattr(spec, stage) is None:
        raise ValueError(f"tune.stage is {stage!r} but the spec has no `{stage}` section to sweep")
    section = "train" if stage == "pretrain" else f"{stage}.train"
    t = spec.train if stage == "pretrain" else getattr(spec, stage).train
    prefixes = ("train.", "model.") if stage == "pretrain" else (f"{stage}.train.",)
    budget = tune.scheduler.max_t or t.max_steps
    if tune.scheduler.max_t and tune.scheduler.max_t > t.max_steps:
        raise ValueError(f"tune.scheduler.max_t ({tune.scheduler.max_t}) exceeds {section}.max_steps "
                         f"({t.max_steps}): a trial never trains past max_steps")
    if tune.scheduler.type == "asha" and tune.scheduler.grace_period >= budget:
        raise ValueError(f"tune.scheduler.grace_period ({tune.scheduler.grace_period}) must be below the budget "
                         f"({budget} steps): ASHA could never stop a trial")
    if tune.metric.startswith("val_") and not t.eval_every:
        raise ValueError(f"tune.metric is {tune.metric!r}, which {section}.eval_every reports: set it above 0 "
                         "(the steps between evaluations on the held-out split)")
    base = spec.model_dump(mode="json", exclude={"tune"})
    for key in tune.space:
        where = f"tune.space.{key}"
        if not key.startswith(prefixes):
            raise ValueError(f"{where}: a {stage} sweep varies keys under {' or '.join(p + '*' for p in prefixes)}")
        parts = key.split(".")
        if parts[-1] in _FIXED_KEYS or key == "model.name":
            raise ValueError(f"{where}: {parts[-1]} is fixed for every trial of a sweep (set it outside tune.space)")
        node: Any = base
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                known = ", ".join(sorted(node)) if isinstance(node, dict) else "(a value, not a section)"
                raise ValueError(f"{where}: unknown key {'.'.join(parts[: i + 1])!r}; keys there: {known}")
            node = node[part]
        if isinstance(node, dict):
            raise ValueError(f"{where}: {key} is a section, not a value")
        for what, value in tune.extremes(key):
            tree = spec.model_dump(mode="json", exclude={"tune"})
            _set_path(tree, parts, value)
            try:
                JobSpec.model_validate(tree)
            except ValidationError as exc:
                errs = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or key}: "
                                 f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
                raise ValueError(f"{where}: the {what} {value!r} is refused by the {stage} stage ({errs})") from None


class JobSpec(Section):
    """A complete job spec: what `jobs/configs/<name>.yaml` holds."""

    name: SafeName = Field("demo", description="Spec name; default run name.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Where artifacts live.")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec, description="Which Ray cluster to use.")
    data: DataSpec = Field(default_factory=DataSpec, description="Data curation stage.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Model architecture and name.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Pretraining stage.")
    sft: SFTStageSpec | None = Field(None, description="Supervised fine-tuning stage (unset: the pipeline skips it).")
    reward: RewardStageSpec | None = Field(None, description="Reward-model stage (unset: the pipeline skips it).")
    dpo: DPOStageSpec | None = Field(None, description="DPO stage (unset: the pipeline skips it).")
    rl: RLStageSpec | None = Field(
        None, description="Online RL stage, PPO or GRPO (unset: the pipeline skips it; set: the pipeline runs it "
        "instead of dpo).")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Evaluation stage.")
    promote: PromoteSpec = Field(default_factory=PromoteSpec, description="Promotion gate (registry aliases).")
    serve: ServeSpec = Field(default_factory=ServeSpec, description="Serving stage.")
    tune: TuneSpec | None = Field(None, description="A hyperparameter sweep over one training stage (`raytrain tune`).")

    @model_validator(mode="after")
    def _pretrain_task(self) -> JobSpec:
        if self.train.task.type != "pretrain":
            raise ValueError(f"train is the pretraining run: train.task.type must be 'pretrain' (got "
                             f"'{self.train.task.type}'); post-training runs go in the sft, reward and dpo sections")
        if self.tune is not None:
            check_tune_space(self)
        return self

    def tune_train(self) -> TrainSpec:
        """The training section the sweep varies."""
        assert self.tune is not None
        return self.train if self.tune.stage == "pretrain" else getattr(self, self.tune.stage).train

    @property
    def tune_name(self) -> str:
        assert self.tune is not None
        return self.tune.name or f"{self.name}-{self.tune.stage}-sweep"

    @property
    def run_name(self) -> str:
        return self.train.run_name or self.name

    def stage_run_name(self, stage: str) -> str:
        """Run name (and exported version) of a post-training stage: its train.run_name, else <name>-<stage>."""
        return getattr(self, stage).train.run_name or f"{self.name}-{stage}"

    def stage_model_name(self, stage: str) -> str:
        return getattr(self, stage).model_name or f"{self.model.name}-{stage}"

    @property
    def served_model_name(self) -> str:
        return self.serve.served_model_name or self.model.name
