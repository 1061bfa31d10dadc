"""The closed, typed config: every key a run accepts, with its default and meaning.

Hydra merges conf/ and recipes/ into `RunConfig`, so a misspelt key fails at startup.
Rules that span fields live in `validate`, which gathers every problem and raises once.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field, fields, is_dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from bamba_ft.errors import Problems, not_an_option, suggest

INT32_MAX = 2**31 - 1
DEFAULT_LORA_TARGETS = ["in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"]


class Mixer(StrEnum):
    """The Mamba-2 mixer paths: the values of `model.mixer`, and the names under which the path that runs is
    logged (`mixer backend: ...`), written in bench rows and documented."""

    AUTO = "auto"
    """kernels on a CUDA device where mamba-ssm imports, torch elsewhere (chosen per device)."""
    KERNELS = "kernels"
    """mamba-ssm's Triton SSD scan with causal-conv1d's conv (CUDA); without causal-conv1d the conv runs in torch."""
    TORCH = "torch"
    """bamba_ft's exact vectorised torch implementation, on any device."""
    HF = "hf"
    """transformers' own mixer; it carries state across packed sequences, so packing is refused."""


class ScanStates(StrEnum):
    """The values of `model.scan_states`: what the `kernels` mixer's SSD scan does with its chunk states."""

    AUTO = "auto"
    """keep in checkpointed layers (held only while their layer's backward runs), recompute elsewhere."""
    KEEP = "keep"
    """keep from forward for backward in every layer: faster, more activation memory."""
    RECOMPUTE = "recompute"
    """recompute in backward, as mamba-ssm's own backward does: the least memory."""


@dataclass
class ModelConfig:
    name_or_path: str = "builtin:tiny"
    """A local checkpoint directory, a Hub id, or `builtin:tiny` (the small base shipped with bamba_ft)."""
    init: str = "pretrained"
    """`pretrained` loads weights; `random` builds the architecture of `shape` (or of the checkpoint) with fresh weights."""
    shape: str | None = None
    """Named architecture for `init=random`: tiny | bamba-9b | granite-4.0-h-tiny | tiny-random-<model_type>
    (see bamba_ft/model/shapes.py)."""
    tokenizer: str | None = None
    """Tokenizer directory or Hub id; defaults to `name_or_path`."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of `name_or_path`."""
    dtype: str = "auto"
    """Weight dtype: auto (bfloat16 on GPUs that support it, else float32) | float32 | bfloat16 | float16."""
    attn_implementation: str = "auto"
    """Attention kernel: auto | sdpa | eager | flash_attention_2 | varlen (torch's varlen flash attention, CUDA)."""
    mixer: str = Mixer.AUTO.value
    """Mamba-2 mixer path: auto | kernels (mamba-ssm + causal-conv1d) | torch (exact reference) | hf (stock
    transformers; refuses packing). Each is described in `Mixer`."""
    gradient_checkpointing: str = "none"
    """Decoder layers (each whole: norm, mixer or attention, MLP) recomputed in backward, so that only their input
    is kept: none | all | mamba (the Mamba-2 layers) | attention (the attention layers) | every-K (layers 0, K, 2K, ...).
    `all` costs about a third more compute; true/false (older configs) mean all/none."""
    activation_offload: bool = False
    """Hold the tensors autograd saves for backward (the checkpointed layers' inputs included) in pinned host memory
    instead of on the GPU: device memory stops growing with them, each step copies them out and back."""
    scan_states: str = ScanStates.AUTO.value
    """`kernels` mixer: whether the SSD scan keeps its float32 chunk states from forward for backward (keep) or
    recomputes them there as mamba-ssm's backward does (recompute). Keeping saves about 6% of the conv+scan's
    kernel time and holds about 19 KB per token and Mamba-2 layer at the Bamba-9B shape until backward. auto keeps
    them in checkpointed layers only (model.gradient_checkpointing), where they live just while their layer's
    backward runs. The conv+scan's CUDA graphs (model.cuda_graphs) always recompute them."""
    cuda_graphs: str = "auto"
    """Replay the Mamba-2 mixer's conv+scan kernels as CUDA graphs (`kernels` mixer with causal-conv1d), so that a
    layer's conv+scan costs the CPU one graph launch each way instead of about 20 Triton launches: auto | true |
    false. Every 256-token length bucket up to data.max_tokens_per_batch is captured before the first step. auto
    turns them on for training a float8 base (quant=fp8), whose step otherwise waits on the CPU (on an H200 its
    median went from 12,847 to 15,822 tokens/s at rows of 3,100-6,700 tokens), on packed rows of at most 16,384
    tokens (data.max_tokens_per_batch; a limit chosen, not measured) in one process on a CUDA device, without
    gradient checkpointing or activation offload; elsewhere off. The bf16 step waits on its kernels, and there the graphs' copies
    cost about 3% (BENCHMARKS.md)."""

    def __post_init__(self) -> None:
        self.gradient_checkpointing = canonical_checkpointing(self.gradient_checkpointing)
        self.cuda_graphs = canonical_switch(self.cuda_graphs)


@dataclass
class PeftConfig:
    method: str = "lora"
    """lora | none (full fine-tuning of every weight)."""
    r: int = 16
    """LoRA rank."""
    lora_alpha: float = 32.0
    """LoRA scale numerator: the update is (lora_alpha / r) * B @ A (or / sqrt(r) with use_rslora)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    """Module names to adapt: in_proj, out_proj (mixer), q/k/v/o_proj (attention), gate/up/down_proj (MLP)."""
    use_rslora: bool = False
    """Rank-stabilised scaling lora_alpha / sqrt(r)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full next to the adapters, e.g. [lm_head]."""
    init_from: str | None = None
    """Start from a trained adapter instead of fresh ones (a second fine-tuning stage, e.g. on new data): a run
    directory, its adapter/, or an adapter-only export. Its r, lora_alpha, targets, use_rslora and use_dora must be
    these; the optimizer and schedule start anew (to continue a stopped run, use trainer.resume)."""


@dataclass
class QuantConfig:
    method: str = "none"
    """Frozen base weights: none | nf4 | int8 | int4 (torchao weight-only, QLoRA) | fp8 (float8 e4m3 weights with row
    scales; the base matmuls run in float8 on GPUs of compute capability 8.9+, for speed, with inputs rounded to
    3 mantissa bits: bamba_ft/model/fp8.py)."""
    block_size: int = 64
    """nf4: weights per quantization block."""
    scaler_block_size: int = 256
    """nf4: blocks per double-quantized scale block."""
    group_size: int = 32
    """int4: weights per quantization group."""
    target_modules: list[str] = field(default_factory=lambda: ["decoder_linear"])
    """Linear layers to quantize: `decoder_linear` (every Linear inside the decoder layers) or module names."""
    skip_modules: list[str] = field(default_factory=list)
    """Module names kept in high precision even when matched by target_modules."""


@dataclass
class SourceConfig:
    source: str = ""
    """A .jsonl/.json/.parquet/.csv file, a directory saved by datasets, a dataset repository directory, or a Hub id
    (as data.source)."""
    split: str = "train"
    """Split to read (Hub datasets and dataset directories)."""
    config: str | None = None
    """Configuration of the source (datasets.load_dataset's `name`), as data.config."""
    format: str = "auto"
    """Row format of this source: auto (data.format's) | messages | prompt_completion | alpaca | text."""
    weight: float | None = None
    """Share of this source in the training mix; set on every source or on none (then sources are concatenated)."""
    max_examples: int | None = None
    """Read at most this many rows of the source (the first ones)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Renames applied before the format is read, {their_column: our_column}, e.g. {question: prompt}."""
    field: str | None = None
    """A .json file holding one JSON object: the key of the list that holds its rows, as data.field."""


# data.* keys only a data file reads: the built-in task generates its splits (data.builtin_val_examples), so
# training and eval refuse them with it.
NOT_BUILTIN = ("val_source", "val_split", "val_fraction", "split", "config", "field", "val_field")


@dataclass
class DataConfig:
    source: str = "builtin"
    """`builtin` (the generated task), a .jsonl/.json/.parquet/.csv file, a directory saved by datasets, a dataset
    repository directory (data files, configurations in its README.md), or a Hub id. The one-source shorthand of
    `sources`."""
    config: str | None = None
    """Configuration of `source` (datasets.load_dataset's `name`), for Hub ids and dataset repository directories."""
    field: str | None = None
    """When `source` is a .json file holding one JSON object rather than rows ({"version": 1, "data": [...]}): the
    key of the list that holds its rows (data), as datasets' json loader reads it (its `field`)."""
    # dataclasses.field in this class: `field` is one of its keys
    sources: list[SourceConfig] = dataclasses.field(default_factory=list)
    """Several sources mixed by weight (datasets.interleave_datasets, seeded by trainer.seed; `stopping_strategy`
    says when the mix ends) or concatenated; each holds out data.val_fraction for validation. Replaces `source`."""
    stopping_strategy: str = "first_exhausted"
    """When a mix of weighted data.sources ends (datasets.interleave_datasets' stopping_strategy):
    first_exhausted (when any source runs out: no example repeats, larger sources are partly unused) |
    all_exhausted (when every source has run out once: smaller sources repeat, keeping the weights) |
    all_exhausted_without_replacement (every example once; a source that runs out leaves the draw)."""
    format: str = "auto"
    """Row format: auto | messages | prompt_completion | alpaca | text."""
    split: str = "train"
    """Split to train on (Hub datasets and dataset directories)."""
    val_source: str | None = None
    """Validation data (same forms as `source`); when unset, `val_fraction` of `source` is held out."""
    val_split: str | None = None
    """Split of `val_source` (or of `source`) used for validation."""
    val_field: str | None = None
    """`field` of `val_source`: the key of the list that holds its rows, when it is a .json file holding one object."""
    val_fraction: float = 0.05
    """Fraction of `source` held out for validation when no validation source or split is given, at most
    max_val_examples rows (the others train)."""
    max_val_examples: int = 1000
    """Upper bound on validation examples (keeps validation fast). With data.streaming and no val_source or
    val_split, the first this many rows of the stream (of each of data.sources, split evenly) are held out."""
    max_seq_len: int = 2048
    """Longest tokenized example, in tokens (at most 2^31-1: packed rows index tokens in int32)."""
    overlong: str = "truncate"
    """What to do with longer examples: truncate | drop | split (into windows of max_seq_len tokens; all counted)."""
    overlong_stride: int = 0
    """overlong=split: tokens each window repeats from the one before, as context without loss, so every token is
    trained once. At least 1 is used (0 reads as 1): a window's first token has nothing before it to predict it."""
    train_on: str = "completion"
    """Which tokens carry loss: completion (assistant/completion tokens) | all."""
    roles: dict[str, str] = dataclasses.field(default_factory=dict)
    """Chat role renames applied before the template, e.g. {human: user, bot: assistant}; ShareGPT's are built in."""
    packing: bool = True
    """Padding-free packed batches (exact on bamba_ft's mixer); false gives padded batches."""
    max_tokens_per_batch: int = 4096
    """Packed mode: token budget of one batch (per device)."""
    batch_size: int = 8
    """Padded mode: examples per batch (per device)."""
    chat_template: str | None = None
    """Replaces the tokenizer's chat template: inline Jinja, a file holding one, or a preset: bamba_ft (what a
    tokenizer without a template gets: <|role|>text then EOS after each turn) | chatml."""
    num_proc: int = 1
    """Processes for tokenization (datasets.map)."""
    num_workers: int = 0
    """DataLoader worker processes (streaming: 0, or 1 to tokenize and pack in a background process)."""
    streaming: bool = False
    """Read the training rows lazily (datasets' streaming mode), tokenize them as they come and pack them window
    by window; needs trainer.max_steps. Validation data is still loaded in memory."""
    stream_buffer: int = 4096
    """Streaming: examples held at once; each window of this many is packed (best fit) into batches."""
    shuffle_buffer: int = 10_000
    """Streaming: rows shuffled in a buffer of this many before tokenizing (datasets' IterableDataset.shuffle,
    seeded by trainer.seed and, through set_epoch, by the pass over the stream); 0 reads rows in stream order.
    The buffer holds raw rows: about this many times a row's size in memory."""
    builtin_train_examples: int = 4000
    """Size of the generated training set for `source=builtin`."""
    builtin_val_examples: int = 200
    """Size of the generated validation set for `source=builtin`."""
    builtin_kind: str = "sft"
    """sft (chat-formatted instructions) | pretrain (plain text) for `source=builtin`."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    """adamw."""
    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    scheduler: str = "cosine"
    """Learning-rate schedule after warmup: cosine | linear | constant."""
    warmup_steps: int = 10
    """Linear warmup, in optimizer steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of `lr` (cosine and linear)."""


@dataclass
class TrainerConfig:
    max_steps: int = 300
    """Optimizer steps to train for (-1: run `max_epochs` epochs)."""
    max_epochs: int | None = None
    """Epochs to train for when max_steps=-1 (the first limit reached stops training)."""
    accelerator: str = "auto"
    """cpu | gpu | auto."""
    devices: Any = 1
    """Number of devices (or a list of indices, or auto: every visible one)."""
    num_nodes: int = 1
    """Machines for multi-node training."""
    strategy: str = "auto"
    """auto | ddp | fsdp (Lightning strategies; fsdp is FSDP2, sharded per decoder layer, on GPUs or CPUs)."""
    precision: str = "auto"
    """auto (bf16-mixed on GPUs with bf16, else 32-true) | 32-true | bf16-mixed | bf16-true | 16-mixed."""
    accumulate_grad_batches: int = 1
    """Micro-batches per optimizer step."""
    gradient_clip_val: float | None = 1.0
    """Clip the gradient norm to this value (null: no clipping)."""
    val_check_interval: int = 100
    """Validate every this many training batches."""
    limit_val_batches: float = 1.0
    """Fraction (<=1.0) or number (>1) of validation batches per validation."""
    log_every_n_steps: int = 10
    """Logging interval, in optimizer steps."""
    checkpoint_every_n_steps: int = 100
    """Save a resumable checkpoint every this many optimizer steps (0: only at the end)."""
    save_top_k: int = 1
    """Best checkpoints (by val/loss) to keep besides last.ckpt."""
    early_stopping_patience: int = 0
    """Stop training after this many validations in a row whose val/loss is not below the best so far by more than
    early_stopping_min_delta (0: off). The adapter holds the last step's weights; the lowest val/loss's are the
    best-* checkpoint, which the summary names. A resume continues the count, except that a stop (Ctrl-C) at a
    validation's own step resumes without that validation."""
    early_stopping_min_delta: float = 0.0
    """How much val/loss must fall below its best so far to count as an improvement (early_stopping_patience)."""
    seed: int = 42
    """Seed for weights, data order and dropout."""
    resume: str | None = None
    """Continue a run: a checkpoint file, a run directory, or `latest` (the newest stopped run under outputs/, the
    default hydra.run.dir, or the last run that continued it; a finished run is not resumed otherwise). A resumed
    run's run_config.yaml holds the checkpoint it started from here."""
    fast_dev_run: bool = False
    """Run one training and one validation batch, writing nothing (smoke test)."""
    enable_progress_bar: bool = True
    """Lightning's progress bar."""
    num_sanity_val_steps: int = 0
    """Validation batches run before training starts."""
    deterministic: bool = False
    """Ask torch for deterministic algorithms."""


@dataclass
class LoggerConfig:
    csv: bool = True
    """CSV metrics under <run>/logs/csv."""
    tensorboard: bool = True
    """TensorBoard events under <run>/logs/tensorboard."""
    wandb: bool = False
    """Weights & Biases (needs `pip install bamba_ft[wandb]`)."""
    wandb_project: str = "bamba_ft"
    """W&B project name."""


@dataclass
class Sampling:
    """How answers are generated: eval's exact match (`eval.*`) and recipe=generate (`generate.*`)."""

    max_new_tokens: int = 32
    """Longest generated answer, in tokens."""
    do_sample: bool = False
    """Sample instead of greedy decoding."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = 0
    """Top-k sampling (0: off)."""
    batch_size: int = 16
    """Prompts per generation batch (left-padded)."""


@dataclass
class EvalConfig(Sampling):
    checkpoint: str | None = None
    """What to evaluate: a run directory, a peft adapter directory, a .ckpt file, or a merged model directory.
    Unset: the model described by `model` (plus no adapter)."""
    generate: bool = True
    """Generation-based metrics (exact match) on held-out prompts."""
    num_generate: int = 64
    """Validation examples to generate answers for."""
    before_training: bool = True
    """Train task: evaluate the starting model too, so the summary shows before -> after."""
    lm_eval_tasks: list[str] = field(default_factory=list)
    """EleutherAI lm-evaluation-harness tasks to run (needs the `lm-eval` package and local task data)."""
    output_dir: str | None = None
    """Where eval writes metrics.json, predictions.jsonl and plots (default: the eval command's own run directory,
    outputs/<date>/<time>, not the evaluated run's)."""


@dataclass
class GenerateConfig(Sampling):
    checkpoint: str | None = None
    """What to generate with (the forms of eval.checkpoint): a run directory, a peft adapter directory, a .ckpt file,
    or a merged model directory. Unset: the model described by `model`."""
    prompt: str | None = None
    """One prompt: a user turn under the chat template (`chat`). Unset, and no `prompts_file`: prompts are read from
    standard input, an interactive chat on a terminal, one prompt per line otherwise."""
    prompts_file: str | None = None
    """Prompts from a file: .jsonl rows with `prompt` (text or messages) or `messages` (a conversation whose next assistant turn
    is generated), or a .txt file, one prompt per line."""
    system: str | None = None
    """A system message before every prompt (not before `messages` rows, which bring their own)."""
    chat: bool = True
    """Apply the chat template (the run's: data.chat_template); false: continue each prompt's text as it is."""
    max_new_tokens: int = 256
    """Longest generated answer, in tokens."""
    output_file: str | None = None
    """Where the prompts and answers are written as JSON lines (default: generations.jsonl in the command's own run
    directory, outputs/<date>/<time>). An existing file there is replaced only if it is an earlier generations file."""


@dataclass
class PreviewConfig:
    examples: int = 3
    """Sequences of the first batch to show."""
    split: str = "train"
    """train (the first batch of the first epoch, in training's order) | validation."""
    color: str = "auto"
    """Mark the tokens with loss in green (auto: on a terminal) | true | false (between [[ and ]])."""

    def __post_init__(self) -> None:
        self.color = canonical_switch(self.color)


@dataclass
class ExportConfig:
    checkpoint: str | None = None
    """Training run directory, adapter directory or .ckpt to export."""
    output_dir: str | None = None
    """Target directory (default: <run>/export)."""
    dtype: str = "bfloat16"
    """Dtype of the merged weights: bfloat16 | float32 | float16."""
    adapter_only: bool = False
    """Write the peft adapter only (no merge)."""
    overwrite: bool = False
    """Replace an existing `output_dir`."""
    verify: bool = True
    """Reload the export in a fresh process and compare logits with the adapter model."""
    max_rel_diff: float | None = None
    """Verification bound on max |logit difference| / max |logit| (default: 1e-5 float32, 0.1 bfloat16, 0.05 float16)."""
    push_to_hub: bool = False
    """Upload the export to the Hugging Face Hub."""
    repo_id: str | None = None
    """Hub repository, `org/name`, for push_to_hub."""
    private: bool = True
    """Create the Hub repository as private."""
    commit_message: str = "Upload model fine-tuned with bamba_ft"
    """Hub commit message."""


@dataclass
class BenchConfig:
    workload: str = "lognormal"
    """Sequence lengths: lognormal (median `median_len`) | fixed (`median_len` each)."""
    median_len: int = 500
    """Median sequence length, in tokens."""
    max_len: int = 4096
    """Longest sequence, in tokens."""
    seqs_per_step: int = 8
    """Sequences per optimizer step (token budget = their real tokens)."""
    warmup_steps: int = 10
    """Steps run before timing (their batches differ from the timed ones, as later batches of a run do). The
    first four are shaped so that Triton compiles its specialisations of the packed length and of lengths
    derived from it (multiples of 16 or not: the scan's chunk count, the norm backward's rows per program) before
    timing: one multiple of 16 and one not, then the shortest lengths at which those derived lengths are
    multiples of 16, for the model's chunk size and the device's SMs (4,093 and 4,096 tokens for chunks of 256
    on 132 SMs); with fewer warm-up steps a timed step may still compile (the row's compiled_each says so)."""
    rehearse: Any = False
    """Also run each timed batch once before timing it: every timed step then repeats a shape already seen, as
    in training on fixed-length rows. Off: every timed step brings a packed length of its own, as in training
    on variable-length packed batches (per-shape costs such as kernel plans or graph captures are included).
    A list, e.g. [false,true], measures both regimes in one run (the first is the headline's)."""
    repeats: int = 1
    """Measure every variant this many times, interleaved, each time after its own warm-up on batches of new
    lengths; models are built once. The order rotates by one place per repeat (A B C, B C A, C A B, ...): on an
    H200 one model timed twice in a row ran 1-2% faster the second time, so a fixed order would favour a place.
    Medians and ranges are reported; 3 or more print a Headline."""
    keep_models: bool = True
    """Keep each built model on the device from its first measurement to its last, so repeats and memory modes
    build it once. Each then counts only its own memory in its peak, but a device must hold the models of every
    variant at once (a Bamba-9B-shape model takes 18.2 GiB in bf16) beside one measurement's activations. false:
    build the model for every measurement and free it afterwards (slower), so that each runs alone on the device,
    as training would: on GPUs too small to hold them all."""
    steps: int = 10
    """Timed steps (median reported)."""
    variants: list[str] = field(default_factory=lambda: ["hf_padded", "hf_padfree", "bamba_ft", "bamba_ft_nf4"])
    """Which paths to run, in order."""
    memory_modes: list[str] = field(default_factory=lambda: ["none"])
    """Memory settings to run each variant, the scaling sweep and the budget sweep under: a
    `model.gradient_checkpointing` form, optionally `+offload` (model.activation_offload=true),
    e.g. [none, mamba, all, all+offload]."""
    token_budgets: list[int] = field(default_factory=list)
    """Token budgets per step (as data.max_tokens_per_batch packs them) for the budget sweep of bamba_ft and
    hf_padfree, e.g. [4096, 8192, 16384, 32768, 65536]; runs under every bench.memory_modes entry; OOM is
    recorded."""
    seq_scaling: list[int] = field(default_factory=list)
    """Sequence lengths for the scaling sweep (one sequence per step), e.g. [2048, 4096, 8192]."""
    seq_scaling_variants: list[str] = field(default_factory=lambda: ["bamba_ft"])
    """Variants (packed ones, see bench.variants) the scaling sweep runs, each under every memory mode."""
    seq_scaling_steps: int = 2
    """Timed steps per length in the scaling sweep, after one warm-up step."""
    data_pipeline_examples: int = 0
    """Read, tokenize, pack and collate this many generated chat rows (a JSON Lines file) with the default data
    settings; report examples/s, tokens/s and peak host memory (RSS) per configuration (0: skip)."""
    data_pipeline_num_proc: list[int] = field(default_factory=lambda: [1, 2])
    """data.num_proc values the in-memory path is measured at (a stream is tokenized by its reader: once, at 1)."""
    data_pipeline_paths: list[str] = field(default_factory=lambda: ["memory", "stream"])
    """Data paths to measure: memory (tokenize all, then pack the epoch) | stream (data.streaming=true, one pass)."""
    profile: bool = False
    """Profile two extra steps of each variant (torch.profiler) into profile_<variant>.txt: the device time per
    kernel family (matmul, Mamba-2 scan, conv, norms, copies, ...; also `profile_kernel_ms` in the row) above the
    per-kernel table."""
    matmul_ceiling: bool = False
    """Also time the base model's Linear layers alone (forward and input gradient of each, in its dtype, on this
    device) at the mean tokens of a timed step: the step time and tokens/s no stack can beat with these matmuls."""
    mixer_only: bool = False
    """Also time one Mamba-2 mixer alone (forward + backward) on a padded batch: transformers' forward vs bamba_ft's."""
    layer_parts: bool = False
    """Also time each part of a decoder layer of the bamba_ft variant's model alone (forward + backward on the
    inputs it gets from a timed step's batch): host ms to issue it, device ms to run it, wall ms; where the fused
    CUDA conv+scan runs, also its kernels' device times with the scan's states recomputed and kept
    (bamba_ft.jobs.bench_parts)."""
    output: str = "bench.json"
    """JSON results file (a markdown table is printed and written beside it)."""


@dataclass
class SweepConfig:
    objective: str = "val/loss"
    """What each job of a sweep (`-m`) returns to the sweeper: a key of its metrics.json, looked up in `after`,
    then `train`, then as a dotted path ('val/loss' is after.val_loss; 'exact_match'; 'train.tokens_per_sec').
    A training or eval sweep refuses, as it starts, a key no job of it can log (a misspelt name)."""
    direction: str = "minimize"
    """minimize | maximize. A job that fails or diverges returns inf (minimize) or -inf (maximize)."""
    resume: bool = False
    """Re-running a sweep into the same hydra.sweep.dir skips jobs that finished there (matched by their
    overrides) and reuses their results; a job stopped by a signal continues from its checkpoint."""
    gpus_per_job: int = 1
    """With hydra/launcher=joblib: GPUs each parallel job is pinned to through CUDA_VISIBLE_DEVICES (0: none)."""


@dataclass
class RunConfig:
    """The root config of every run: training, evaluation, generation, data preview, export, benchmark and doctor
    alike (`task` says which)."""

    task: str = "train"
    """train | eval | generate | preview | export | bench | doctor."""
    debug: bool = False
    """Show full Python tracebacks for user errors."""
    output_dir: str = "."
    """Run directory (set by Hydra to outputs/<date>/<time>)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


# Each task and the module whose `run(cfg)` does it (imported only when its task runs).
TASK_JOBS: dict[str, str] = {
    "train": "bamba_ft.jobs.train",
    "eval": "bamba_ft.jobs.evaluate",
    "generate": "bamba_ft.jobs.generate",
    "preview": "bamba_ft.jobs.preview",
    "export": "bamba_ft.jobs.export",
    "bench": "bamba_ft.jobs.bench",
    "doctor": "bamba_ft.jobs.doctor",
}

SWITCH = ("auto", "true", "false")  # the values of an auto | true | false setting

CHOICES: dict[str, tuple[str, ...]] = {
    "task": tuple(TASK_JOBS),
    "model.init": ("pretrained", "random"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2", "varlen"),
    "model.mixer": tuple(m.value for m in Mixer),
    "model.scan_states": tuple(s.value for s in ScanStates),
    "model.cuda_graphs": SWITCH,
    "preview.split": ("train", "validation"),
    "preview.color": SWITCH,
    "peft.method": ("lora", "none"),
    "quant.method": ("none", "nf4", "int8", "int4", "fp8"),
    "data.format": ("auto", "messages", "prompt_completion", "alpaca", "text"),
    "data.overlong": ("truncate", "drop", "split"),
    "data.stopping_strategy": ("first_exhausted", "all_exhausted", "all_exhausted_without_replacement"),
    "data.train_on": ("completion", "all"),
    "data.builtin_kind": ("sft", "pretrain"),
    "optim.name": ("adamw",),
    "optim.scheduler": ("cosine", "linear", "constant"),
    "trainer.strategy": ("auto", "ddp", "ddp_spawn", "fsdp", "single_device"),
    "trainer.precision": ("auto", "32-true", "bf16-mixed", "bf16-true", "16-mixed"),
    "export.dtype": ("bfloat16", "float32", "float16"),
    "bench.workload": ("lognormal", "fixed"),
    "sweep.direction": ("minimize", "maximize"),
}


# The chat-template presets `data.chat_template` may name; their Jinja lives with the data code (data/templates.py).
CHAT_TEMPLATE_PRESETS = ("bamba_ft", "chatml")


def is_inline_template(value: str) -> bool:
    return "{{" in value or "{%" in value


def chat_template_problem(value: str, key: str = "data.chat_template") -> str | None:
    """None if `value` is inline Jinja, a preset name or an existing file; else what is wrong and the fix."""
    path = Path(value).expanduser()
    if is_inline_template(value) or value in CHAT_TEMPLATE_PRESETS or path.is_file():
        return None
    presets = ", ".join(CHAT_TEMPLATE_PRESETS)
    if path.suffix or "/" in value or "\\" in value:
        return (f"{key}={value}: no such file. Fix: give the path of a Jinja template file, inline Jinja, or a "
                f"preset ({presets}).")
    return (f"{key}={value!r} is neither a preset nor a file nor a Jinja template."
            f"{suggest(value, CHAT_TEMPLATE_PRESETS)} Presets: {presets}.")


# Suffixes of data files: those datasets reads in a data directory (a file is read only as .jsonl/.json/.parquet/
# .csv). A value ending in one names a file, whatever else it looks like.
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow")


def looks_local(value: str) -> bool:
    """Whether `value` (a data source, checkpoint or tokenizer) can only mean a path on this machine, not a Hub id.

    It does when it starts with . / or ~, ends in a data file's suffix (train.txt), or its first component exists
    here (out/model with ./out present). Such a value that does not exist is a typo or a file not there: sent on to
    the Hub as an id it failed only after the model had loaded (data), or after about 30 s of retried requests,
    with advice to `hf download` it (a checkpoint). `org/name` without a local ./org stays a Hub id, and
    `builtin`/`builtin:NAME` name what bamba_ft ships.
    """
    if value == "builtin" or value.startswith("builtin:"):
        return False
    if value.startswith((".", "/", "~")) or Path(value).suffix.lower() in DATA_SUFFIXES:
        return True
    parts = Path(value).parts
    return len(parts) > 1 and Path(parts[0]).exists()


def same_source(trained: str, given: str) -> bool:
    """Whether `given` names the data source a run trained on: the same text, or the same local file or directory
    spelt otherwise (relative or absolute, with ./ or ../, through a link), both read from the current directory."""
    if trained == given:
        return True
    a, b = Path(trained).expanduser(), Path(given).expanduser()
    return a.exists() and b.exists() and a.samefile(b)


# What a local path of each kind of key must be, as the fix names it.
_LOCAL_FORMS = {
    "data": ("file or directory", "a .jsonl/.json/.parquet/.csv file or a dataset directory"),
    "model": ("directory", "a checkpoint directory (config.json and weights, as save_pretrained writes)"),
    "tokenizer": ("directory", "a tokenizer directory (tokenizer.json or tokenizer_config.json)"),
}


def missing_path_problem(key: str, value: str, kind: str = "data") -> str | None:
    """None unless `value` looks local (`looks_local`) and does not exist; else the problem naming `key`, the path
    as read (a relative one from the current directory) and the fix. `kind`: data | model | tokenizer."""
    path = Path(value).expanduser()
    if not looks_local(value) or path.exists():
        return None
    noun, form = _LOCAL_FORMS[kind]
    shown = f" ({path.absolute()})" if str(path.absolute()) != value else ""
    why = ""
    if not value.startswith((".", "/", "~")) and path.suffix.lower() not in DATA_SUFFIXES:
        first = path.parts[0]
        why = (f"\n./{first} exists here, so this is read as a local path, not as a Hub id; for the Hub repository "
               f"{value}, run from a directory without ./{first}.")
    return f"{key}={value}: no such {noun}{shown}.\nFix: point {key} at {form}, or at a Hub id (org/name).{why}"


def _check_paths(cfg: RunConfig, problems: Problems) -> None:
    """Local paths that do not exist, refused before anything loads: a missing data file failed only after the
    model and its adapters were built (minutes for a 9B model), and a missing checkpoint directory first went to
    the Hub as an id. Keys whose value is not read (data.val_source beside the built-in task) are left to the
    checks that refuse them."""
    d, m = cfg.data, cfg.model
    keys: list[tuple[str, str | None, str]] = [("model.name_or_path", m.name_or_path, "model"),
                                               ("model.tokenizer", m.tokenizer, "tokenizer")]
    if d.source != "builtin" or d.sources:
        keys += [("data.source", d.source if not d.sources else None, "data"),
                 ("data.val_source", d.val_source, "data")]
    keys += [(f"data.sources[{i}].source", s.source, "data") for i, s in enumerate(d.sources)]
    for key, value, kind in keys:
        if value and (problem := missing_path_problem(key, value, kind)):
            problems.add(problem)


CHECKPOINT_FORMS = "none, all, mamba, attention, every-K (K >= 1; every-2: layers 0, 2, 4, ...)"
_BOOLS = {"true": "all", "false": "none"}


def canonical_switch(value: Any) -> Any:
    """An auto | true | false setting: a bool, or the string OmegaConf makes of one, -> "true"/"false"; anything else
    unchanged (validate names what is wrong)."""
    return str(value).lower() if isinstance(value, bool) or str(value).lower() in ("true", "false") else value


def canonical_checkpointing(value: Any) -> Any:
    """true/false (bool, or the string OmegaConf makes of one) -> all/none; anything else unchanged."""
    return _BOOLS.get(str(value).lower(), value) if isinstance(value, (bool, str)) else value


def checkpointing_problem(value: Any, key: str = "model.gradient_checkpointing") -> str | None:
    """None if `value` is a valid checkpointing form, else a message naming `key` and the valid forms."""
    value = canonical_checkpointing(value)
    if value in ("none", "all", "mamba", "attention"):
        return None
    k = str(value).removeprefix("every-")
    if str(value).startswith("every-") and k.isdigit() and int(k) >= 1:
        return None
    return f"{key}={value!r} is not a checkpointing form. Valid: {CHECKPOINT_FORMS}."


def memory_mode_problem(mode: str) -> str | None:
    """None if `mode` is `<checkpointing form>[+offload]` (a bench.memory_modes entry), else what is wrong."""
    form, _, rest = str(mode).partition("+")
    if rest not in ("", "offload"):
        return f"bench.memory_modes: {mode!r} is not <checkpointing>[+offload] (e.g. all+offload)."
    problem = checkpointing_problem(form, "bench.memory_modes")
    return problem and f"{problem} Optionally followed by +offload."


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Check choices and cross-field rules; raise one ConfigError listing every problem."""
    problems = Problems()
    for key, options in CHOICES.items():
        value = _get(cfg, key)
        if value not in options:
            problems.add(not_an_option(key, value, options))
    positive = {
        "bench.seq_scaling_steps": cfg.bench.seq_scaling_steps,
        "peft.r": cfg.peft.r,
        "peft.lora_alpha": cfg.peft.lora_alpha,
        "data.max_seq_len": cfg.data.max_seq_len,
        "data.max_tokens_per_batch": cfg.data.max_tokens_per_batch,
        "data.batch_size": cfg.data.batch_size,
        "trainer.accumulate_grad_batches": cfg.trainer.accumulate_grad_batches,
        "trainer.num_nodes": cfg.trainer.num_nodes,
        "trainer.val_check_interval": cfg.trainer.val_check_interval,
        "optim.lr": cfg.optim.lr,
        "quant.block_size": cfg.quant.block_size,
        "quant.group_size": cfg.quant.group_size,
        "preview.examples": cfg.preview.examples,
    }
    for key, value in (("trainer.early_stopping_patience", cfg.trainer.early_stopping_patience),
                       ("trainer.early_stopping_min_delta", cfg.trainer.early_stopping_min_delta)):
        if value < 0:
            problems.add(f"{key}={value} must be 0 or more.")
    for key, value in positive.items():
        if value <= 0:
            problems.add(f"{key}={value} must be positive.")
    for key, zero in (("trainer.log_every_n_steps", "no step logging"),
                      ("trainer.checkpoint_every_n_steps", "a checkpoint only at the end")):
        if _get(cfg, key) < 0:
            problems.add(f"{key}={_get(cfg, key)} must be 0 or more (0: {zero}).")
    for key in ("data.max_seq_len", "data.max_tokens_per_batch"):
        if _get(cfg, key) > INT32_MAX:
            problems.add(f"{key}={_get(cfg, key)} is more than 2^31-1={INT32_MAX} tokens: packed rows number their "
                         f"tokens in int32 (position_ids, seq_idx, cu_seq_lens), as the attention and scan kernels do.\n"
                         f"Fix: set {key} to at most {INT32_MAX}.")
    stride = cfg.data.overlong_stride
    if cfg.data.overlong == "split" and not (stride >= 0 and max(stride, 1) < cfg.data.max_seq_len):
        problems.add(f"data.overlong_stride={stride}: each window must bring new tokens, so the overlap must be "
                     f"at least 0 and below data.max_seq_len={cfg.data.max_seq_len}.\n"
                     f"Fix: set data.overlong_stride to a smaller value (e.g. {cfg.data.max_seq_len // 8}), "
                     "or raise data.max_seq_len.")
    if cfg.data.overlong != "split" and stride != 0:  # else ignored: the long examples are cut or dropped instead
        done = "cut to data.max_seq_len" if cfg.data.overlong == "truncate" else "dropped"
        problems.add(f"data.overlong_stride={stride} applies to data.overlong=split only; with "
                     f"data.overlong={cfg.data.overlong} it is ignored and longer examples are {done}.\n"
                     "Fix: add data.overlong=split to train them in overlapping windows, or drop data.overlong_stride.")
    _check_sources(cfg.data, problems)
    _check_fields(cfg.data, problems)
    _check_paths(cfg, problems)
    _check_streaming(cfg, problems)
    if cfg.data.chat_template and (problem := chat_template_problem(cfg.data.chat_template)):
        problems.add(problem)
    if cfg.trainer.max_steps <= 0 and not (cfg.trainer.max_steps == -1 and cfg.trainer.max_epochs):
        problems.add(
            f"trainer.max_steps={cfg.trainer.max_steps}: give a positive number of steps, "
            "or trainer.max_steps=-1 with trainer.max_epochs=N."
        )
    _check_generation(cfg.eval, problems)
    if cfg.task == "generate":
        _check_generation(cfg.generate, problems, "generate")
        if cfg.generate.prompt is not None and cfg.generate.prompts_file is not None:
            problems.add("generate.prompt and generate.prompts_file are both set.\nFix: give one of them.")
        if not cfg.generate.chat and cfg.generate.system:  # the system turn is the template's: it would be dropped
            problems.add(f"generate.system={cfg.generate.system}: generate.chat=false continues plain text without the "
                         "chat template, which is what puts a system message before each prompt, so it would be "
                         "ignored.\nFix: drop generate.chat=false to answer under the template, or drop generate.system.")
    _check_lm_eval(cfg, problems)
    if cfg.logger.wandb and cfg.task == "train" and importlib.util.find_spec("wandb") is None:
        problems.add("logger.wandb=true needs the wandb package. Fix: pip install 'bamba_ft[wandb]', or logger=default.")
    if not 0.0 <= cfg.peft.lora_dropout < 1.0:
        problems.add(f"peft.lora_dropout={cfg.peft.lora_dropout} must be in [0, 1).")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        problems.add(f"data.val_fraction={cfg.data.val_fraction} must be in [0, 1).")
    if len(cfg.optim.betas) != 2:
        problems.add(f"optim.betas={list(cfg.optim.betas)} must hold two numbers, e.g. [0.9, 0.999].")
    if cfg.data.packing and cfg.data.max_tokens_per_batch < cfg.data.max_seq_len:
        problems.add(
            f"data.max_tokens_per_batch={cfg.data.max_tokens_per_batch} is smaller than one sequence "
            f"(data.max_seq_len={cfg.data.max_seq_len}), so the longest examples fit in no batch.\n"
            f"Fix: raise data.max_tokens_per_batch to at least {cfg.data.max_seq_len}, or lower data.max_seq_len."
        )
    if cfg.peft.init_from and cfg.peft.method != "lora" and cfg.task == "train":
        problems.add(
            f"peft.init_from={cfg.peft.init_from} loads a trained adapter into this run's LoRA adapters, and "
            f"peft.method={cfg.peft.method} (full fine-tuning) has none.\nFix: drop peft.init_from; to fine-tune every "
            "weight of the adapted model, merge it first (recipe=export export.checkpoint=RUN export.dtype=float32) "
            "and start from the export (model.name_or_path=RUN/export)."
        )
    if cfg.quant.method != "none" and cfg.peft.method == "none":
        problems.add(
            f"quant.method={cfg.quant.method} freezes quantized base weights, so full fine-tuning (peft=none) "
            "has nothing to train in them.\nFix: use peft=lora with a quantized base (recipe=qlora), or quant=none."
        )
    _validate_bench(cfg.bench, problems)
    for problem in [checkpointing_problem(cfg.model.gradient_checkpointing)] + [
            memory_mode_problem(m) for m in cfg.bench.memory_modes]:
        if problem:
            problems.add(problem)
    if cfg.model.activation_offload and cfg.trainer.strategy == "fsdp":
        problems.add("model.activation_offload=true with trainer.strategy=fsdp: the offload keeps parameters on the "
                     "device by their storage, which FSDP gathers only during the forward, so every gathered weight "
                     "would be copied to the host as well.\nFix: model.activation_offload=false (or strategy=ddp).")
    _check_sharded(cfg, problems)
    if problem := devices_problem(cfg.trainer.devices, cfg.trainer.accelerator) or launched_ranks_problem(cfg):
        problems.add(problem)
    if cfg.export.push_to_hub and not cfg.export.repo_id:
        problems.add("export.push_to_hub=true needs export.repo_id=org/name.")
    elif cfg.export.push_to_hub:
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(cfg.export.repo_id)
        except HFValidationError as e:
            problems.add(f"export.repo_id={cfg.export.repo_id} is not a Hub repository id: {str(e).split('.')[0]}. "
                         "Fix: export.repo_id=org/name.")
    if cfg.export.max_rel_diff is not None and not cfg.export.max_rel_diff > 0:
        problems.add(f"export.max_rel_diff={cfg.export.max_rel_diff} must be positive (a fraction of the largest "
                     "logit; default 1e-5 float32, 0.1 bfloat16, 0.05 float16).")
    if cfg.sweep.gpus_per_job < 0:
        problems.add(f"sweep.gpus_per_job={cfg.sweep.gpus_per_job} must be 0 (no pinning) or more.")
    if cfg.peft.use_dora and cfg.quant.method != "none":
        problems.add("peft.use_dora=true with a quantized base is not supported by peft. Fix: peft.use_dora=false.")
    problems.raise_if_any()


def devices_problem(devices: Any, accelerator: str) -> str | None:
    """Why Lightning would refuse trainer.devices (after the model has loaded), or None: a positive number of
    devices, auto, -1 (every visible GPU) or a list of GPU indices; on CPU only a number of processes or auto."""
    fix = "Fix: trainer.devices=N (N processes, N >= 1), or trainer.devices=auto"
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, str):
        if devices == "auto":
            return None
        return f"trainer.devices={devices!r} is not a number of devices, auto or a list of GPU indices.\n{fix}."
    if isinstance(devices, (list, tuple)):
        if accelerator == "cpu":
            return (f"trainer.devices={list(devices)}: a list picks GPUs by index; on CPU (trainer.accelerator=cpu) "
                    f"trainer.devices is the number of processes.\n{fix}.")
        if not devices or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices) \
                or len(set(devices)) != len(devices):
            return (f"trainer.devices={list(devices)} must list distinct GPU indices (0 or more), e.g. [0,1].\n"
                    f"{fix}.")
        return None
    if isinstance(devices, bool) or not isinstance(devices, int):
        return f"trainer.devices={devices!r} is not a number of devices, auto or a list of GPU indices.\n{fix}."
    if devices == -1 and accelerator != "cpu":
        return None  # every visible GPU, as in Lightning
    if devices < 1:
        on_cpu = " (-1, every visible GPU, is for GPUs)" if devices == -1 else ""
        return f"trainer.devices={devices} must be at least 1{on_cpu}.\n{fix}."
    return None


def torchrun_world_size(environ: dict[str, str] | None = None) -> int | None:
    """The processes torchrun started for this command (its WORLD_SIZE), or None where WORLD_SIZE is unset or no
    number. The one reader of it: the check below, runtime.launched_ranks and the benchmark's ranks ask here."""
    world = (os.environ if environ is None else environ).get("WORLD_SIZE", "")
    return int(world) if world.isdigit() else None


def launched_ranks_problem(cfg: RunConfig, environ: dict[str, str] | None = None) -> str | None:
    """Training started by torchrun (which sets WORLD_SIZE) whose trainer.devices x trainer.num_nodes is another
    number of ranks, or None. Lightning refuses it only once the model and data have loaded, with a traceback."""
    world = torchrun_world_size(environ)
    devices, nodes = cfg.trainer.devices, cfg.trainer.num_nodes
    if cfg.task != "train" or world is None or not isinstance(nodes, int) or nodes < 1:
        return None
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, (list, tuple)):
        per_node = len(devices)
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        per_node = devices
    elif devices == "auto" and cfg.trainer.accelerator == "cpu":
        per_node = 1  # Lightning's auto on CPU: one process
    else:
        return None  # auto or -1 on GPUs: Lightning counts the visible ones
    if per_node * nodes == world:
        return None
    fit = f"trainer.devices={world // nodes}" if world % nodes == 0 else "trainer.num_nodes"
    return (f"trainer.devices={devices} x trainer.num_nodes={nodes} make {per_node * nodes} ranks, and the launcher "
            f"started {world} processes (torchrun's --nproc-per-node x --nnodes: WORLD_SIZE).\nFix: {fit} to match "
            "them, or start as many processes as the run has ranks.")


def _check_sharded(cfg: RunConfig, problems: Problems) -> None:
    """trainer.strategy=fsdp builds the model without weights, shards it, then streams plain tensors in."""
    if cfg.trainer.strategy != "fsdp":
        return
    if cfg.quant.method != "none":
        problems.add(
            f"quant.method={cfg.quant.method} with trainer.strategy=fsdp: bamba_ft quantizes the base layer by layer "
            "as it loads, while FSDP loads plain weights into shards after sharding; sharding quantized tensors (as "
            "torchtune does for NF4) is not implemented here.\nFix: trainer=ddp (every GPU holds the quantized base: "
            "Bamba-9B in NF4 is about 6 GiB), or quant=none with trainer=fsdp."
        )
    if cfg.peft.use_dora:
        problems.add("peft.use_dora=true with trainer.strategy=fsdp: DoRA computes its magnitudes from the base weights "
                     "when the adapter is made, before FSDP has loaded them.\nFix: peft.use_dora=false, or trainer=ddp.")
    if cfg.trainer.precision not in ("auto", "32-true", "bf16-mixed"):
        problems.add(
            f"trainer.precision={cfg.trainer.precision} with trainer.strategy=fsdp: FSDP computes in bf16 through its "
            "mixed-precision policy under bf16-mixed; other precisions are not supported there.\nFix: "
            "trainer.precision=bf16-mixed (add model.dtype=bfloat16 to keep the parameters themselves in bf16), or 32-true."
        )


def rehearse_settings(b: BenchConfig) -> list[bool]:
    """`bench.rehearse` as a list of regimes (a single true/false is a list of one)."""
    return [b.rehearse] if isinstance(b.rehearse, bool) else list(b.rehearse)


def _validate_bench(b: BenchConfig, problems: Problems) -> None:
    settings = [b.rehearse] if isinstance(b.rehearse, bool) else b.rehearse
    if not isinstance(settings, list | tuple) or not settings or not all(isinstance(x, bool) for x in settings):
        problems.add(f"bench.rehearse={b.rehearse!r} must be true, false or a list of them, e.g. "
                     "'bench.rehearse=[false,true]'.")
    elif len(set(settings)) != len(settings):
        problems.add(f"bench.rehearse={list(settings)} names a regime twice. Fix: 'bench.rehearse=[false,true]'.")
    if not b.memory_modes or len(set(b.memory_modes)) != len(b.memory_modes):
        problems.add(f"bench.memory_modes={list(b.memory_modes)} must name each mode once, e.g. "
                     "'bench.memory_modes=[none,all]'.")
    if b.repeats < 1:
        problems.add(f"bench.repeats={b.repeats} must be at least 1 (3 or more for a Headline).")
    if not b.data_pipeline_num_proc or any(n < 1 for n in b.data_pipeline_num_proc):
        problems.add(f"bench.data_pipeline_num_proc={list(b.data_pipeline_num_proc)} must list process counts of 1 "
                     "or more, e.g. '[1,2]'.")
    unknown = [p for p in b.data_pipeline_paths if p not in ("memory", "stream")]
    if unknown or not b.data_pipeline_paths:
        problems.add(f"bench.data_pipeline_paths={list(b.data_pipeline_paths)} must name memory and/or stream, "
                     "e.g. '[memory,stream]'.")
    if any(n < 8 for n in b.token_budgets):
        problems.add(f"bench.token_budgets={list(b.token_budgets)}: every budget must hold at least one sequence "
                     "(8 tokens or more), e.g. [4096,8192,16384].")


def _check_streaming(cfg: RunConfig, problems: Problems) -> None:
    d = cfg.data
    if d.stream_buffer <= 0:
        problems.add(f"data.stream_buffer={d.stream_buffer} must be positive (examples held while packing a stream).")
    if d.shuffle_buffer < 0:
        problems.add(f"data.shuffle_buffer={d.shuffle_buffer} must be 0 (rows in stream order) or more (rows held "
                     "while shuffling a stream).")
    if not d.streaming:
        return
    if cfg.trainer.max_steps <= 0:
        problems.add(f"data.streaming=true with trainer.max_steps={cfg.trainer.max_steps}: a stream has no known "
                     "length, so epochs cannot bound training.\nFix: set trainer.max_steps=N (the stream restarts "
                     "when it runs out), or data.streaming=false to train for trainer.max_epochs.")
    if d.num_workers > 1:
        problems.add(f"data.num_workers={d.num_workers} with data.streaming=true: a stream is read in order by one "
                     "process.\nFix: set data.num_workers=1 (tokenize and pack in a background process) or 0.")
    if d.num_proc > 1:
        problems.add(f"data.num_proc={d.num_proc} with data.streaming=true: a stream is tokenized as it is read, "
                     "not by datasets.map worker processes.\nFix: set data.num_proc=1 (data.num_workers=1 moves "
                     "tokenization off the training process).")


def _check_generation(e: Sampling, problems: Problems, section: str = "eval") -> None:
    """The generation settings, checked before anything runs: a bad one used to fail only at the final
    evaluation, after the whole training (eval.batch_size=0), or pass silently (eval.top_p=1.5)."""
    for key, value in ((f"{section}.batch_size", e.batch_size), (f"{section}.max_new_tokens", e.max_new_tokens)):
        if value <= 0:
            problems.add(f"{key}={value} must be positive.")
    if isinstance(e, EvalConfig) and e.num_generate < 0:
        problems.add(f"eval.num_generate={e.num_generate} must be 0 or more (0: no generation metrics; "
                     "eval.generate=false does the same).")
    if e.do_sample:
        if e.temperature <= 0:
            problems.add(f"{section}.temperature={e.temperature} must be positive when sampling "
                         f"({section}.do_sample=true); for greedy decoding set {section}.do_sample=false.")
        if not 0.0 < e.top_p <= 1.0:
            problems.add(f"{section}.top_p={e.top_p} must be in (0, 1].")
        if e.top_k < 0:
            problems.add(f"{section}.top_k={e.top_k} must be 0 (off) or more.")
    else:  # greedy decoding reads none of them: a value given would change nothing, without a word
        given = [f"{section}.{key}={getattr(e, key)}" for key in ("temperature", "top_p", "top_k")
                 if getattr(e, key) != getattr(Sampling, key)]
        if given:
            problems.add(f"{', '.join(given)}: decoding is greedy ({section}.do_sample=false), which reads no sampling "
                         f"setting, so {'they' if len(given) > 1 else 'it'} would be ignored.\nFix: add "
                         f"{section}.do_sample=true to sample, or drop {' '.join(g.split('=')[0] for g in given)}.")


def _check_lm_eval(cfg: RunConfig, problems: Problems) -> None:
    """eval.lm_eval_tasks asks for tasks that only recipe=eval runs, with the lm-eval package: refused where they
    would not run (a training run ignored them; without the package the evaluation skipped them)."""
    tasks = cfg.eval.lm_eval_tasks
    if not tasks:
        return
    if cfg.task != "eval":
        problems.add(f"eval.lm_eval_tasks={list(tasks)} runs in recipe=eval only; this is task={cfg.task}.\n"
                     "Fix: drop it here and run python -m bamba_ft recipe=eval eval.checkpoint=RUN "
                     f"'eval.lm_eval_tasks={list(tasks)}' on the finished run.")
    elif importlib.util.find_spec("lm_eval") is None:
        problems.add(f"eval.lm_eval_tasks={list(tasks)} needs the lm-eval package, which is not installed.\n"
                     "Fix: pip install lm-eval, or drop eval.lm_eval_tasks.")


def _check_sources(data: DataConfig, problems: Problems) -> None:
    weights = [s.weight for s in data.sources]
    if data.stopping_strategy != DataConfig.stopping_strategy and all(w is None for w in weights):
        problems.add(f"data.stopping_strategy={data.stopping_strategy} ends a mix of weighted data.sources, and "
                     "this run mixes none (one source, or data.sources without weights: concatenated, each row "
                     "read once).\nFix: give every one of data.sources a weight, or drop the override.")
    if not data.sources:
        return
    if data.source != "builtin" or data.config is not None or data.field is not None:
        shorthand = (f"data.source={data.source}" if data.source != "builtin" else
                     f"data.config={data.config}" if data.config is not None else f"data.field={data.field}")
        problems.add(f"{shorthand} and data.sources are both set. Fix: list every source in data.sources, each "
                     "with its own config and field (data.source, data.config and data.field are the one-source "
                     "shorthand).")
    if data.val_split and not data.val_source:
        problems.add(f"data.val_split={data.val_split} with data.sources: the sources' validation rows are held out "
                     "of each (data.val_fraction), so the split would be ignored.\nFix: name the validation data in "
                     "data.val_source (with data.val_split for its split), or, for one dataset, use data.source and "
                     "data.config with data.val_split.")
    if any(w is None for w in weights) and any(w is not None for w in weights):
        problems.add(f"data.sources: weights {weights} are set on some sources only. Fix: give every source a "
                     "weight (mixed by weight), or none (concatenated).")
    formats = CHOICES["data.format"]
    for i, s in enumerate(data.sources):
        key = f"data.sources[{i}]"
        if not s.source:
            problems.add(f"{key}.source is empty. Fix: name a file, directory or Hub id.")
        if s.weight is not None and s.weight <= 0:
            problems.add(f"{key}.weight={s.weight} must be positive.")
        if s.max_examples is not None and s.max_examples <= 0:
            problems.add(f"{key}.max_examples={s.max_examples} must be positive (or null: every row).")
        if s.format not in formats:
            problems.add(not_an_option(f"{key}.format", s.format, formats))


def _check_fields(data: DataConfig, problems: Problems) -> None:
    """A `field` (data.field, data.val_field, data.sources[i].field) names the key under which a .json file holding
    one JSON object lists its rows: refused where its source is no .json file, which has no such key. Beside the
    built-in task, NOT_BUILTIN refuses them."""
    if data.source == "builtin" and not data.sources:
        return
    keys = [("data.field", data.field, "data.source", data.source),
            ("data.val_field", data.val_field, "data.val_source", data.val_source)]
    keys += [(f"data.sources[{i}].field", s.field, f"data.sources[{i}].source", s.source)
             for i, s in enumerate(data.sources)]
    for key, value, source_key, source in keys:
        if value is None or (key == "data.field" and data.sources):  # _check_sources names data.field beside them
            continue
        if not source:  # an empty data.sources[i].source is named by _check_sources
            if key == "data.val_field":
                problems.add(f"{key}={value}: data.val_source is not set, so there is no file to read it in.\n"
                             f"Fix: set data.val_source to a .json file, or drop {key}.")
        elif Path(source).suffix.lower() != ".json":
            problems.add(f"{key}={value}: {source_key}={source} is not a .json file; {key} names the key of the list "
                         f"that holds the rows of a .json file holding one JSON object.\nFix: drop {key}.")


def field_names(dc: Any) -> list[str]:
    """Field names of a dataclass type or instance."""
    return [f.name for f in fields(dc)] if is_dataclass(dc) else []
