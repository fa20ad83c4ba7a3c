"""The run configuration's schema: one typed dataclass per section, each checking its own value ranges in
`__post_init__`. Loading it from YAML and `--set` overrides is config.py's job."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from .errors import ConfigError
from .specs import STABILITY_ACTIONS, parse_action, parse_fault


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class AttentionConfig:
    # "auto" picks the fastest kernel that is available and correct for the device (SDPA on CPU);
    # see kernels/README.md for what each of sdpa, triton, cuda and flash_attn supports.
    impl: Literal["auto", "sdpa", "triton", "cuda", "flash_attn"] = "auto"


# The other fused ops (kernels/ops.py): "torch" is the model's own math; "auto" is torch on CPU, and on
# CUDA keel's Triton kernel where it fits (a judgement, not a measurement: see kernels/README.md).
@dataclass
class RMSNormConfig:
    # "cuda" is keel's CUDA C++ kernel; "liger" Liger-Kernel's (CUDA only). Tensor parallelism needs
    # torch/auto: its sequence-parallel norms run on DTensors.
    impl: Literal["auto", "torch", "triton", "cuda", "liger"] = "auto"


@dataclass
class SwiGLUConfig:
    impl: Literal["auto", "torch", "triton", "liger"] = "auto"


@dataclass
class RoPEConfig:
    # No "liger": Liger's RoPE rotates (x[i], x[i + d/2]) pairs, the model (x[2i], x[2i+1]).
    impl: Literal["auto", "torch", "triton"] = "auto"


@dataclass
class CrossEntropyConfig:
    # "unfused" computes the [B, T, V] logits, then the loss. The others compute the loss from the final
    # hidden states and the output weight chunk by chunk, never holding all logits (kernels/cross_entropy.py):
    # "chunked" in PyTorch, "triton" with a Triton softmax kernel, "liger" Liger-Kernel's (CUDA); "auto" is
    # triton on CUDA, chunked on CPU. Not with parallel.tp > 1 or parallel.pp > 1 (see parallel/dims.py).
    impl: Literal["auto", "unfused", "chunked", "triton", "liger"] = "unfused"
    # Tokens per chunk; None = as many as keep one chunk's fp32 logits within 256 MiB.
    chunk_size: Optional[int] = None

    def __post_init__(self):
        _require(self.chunk_size is None or self.chunk_size > 0,
                 f"model.cross_entropy.chunk_size must be positive or null, got {self.chunk_size}")


@dataclass
class ModelConfig:
    vocab_size: int = 256
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    # Grouped-query attention: fewer key/value heads than query heads (must divide n_heads).
    n_kv_heads: Optional[int] = None
    # SwiGLU hidden size; None means the Llama rule: 8/3 * dim rounded up to `ffn_multiple_of`.
    ffn_dim: Optional[int] = None
    ffn_multiple_of: int = 64
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    # QK-norm (RMSNorm on queries and keys) and z-loss both keep attention/output logits from growing
    # without bound, two known causes of loss spikes (Dehghani et al. 2023; PaLM).
    qk_norm: bool = False
    z_loss: float = 0.0
    init_std: float = 0.02
    # Start from a Hugging Face Llama checkpoint instead of random weights: "hf:PATH", a local folder with
    # config.json and model.safetensors (continued pretraining). Model fields left out of the config are
    # taken from its config.json; fields given must agree with it. A resumed run restores its own
    # checkpoint instead.
    init_from: Optional[str] = None
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    rmsnorm: RMSNormConfig = field(default_factory=RMSNormConfig)
    swiglu: SwiGLUConfig = field(default_factory=SwiGLUConfig)
    rope: RoPEConfig = field(default_factory=RoPEConfig)
    cross_entropy: CrossEntropyConfig = field(default_factory=CrossEntropyConfig)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            _require(getattr(self, name) > 0, f"model.{name} must be positive, got {getattr(self, name)}")
        _require(self.dim % self.n_heads == 0,
                 f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}; "
                 f"pick n_heads that divides dim")
        _require(self.n_heads % self.n_kv_heads == 0,
                 f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads}")
        _require((self.dim // self.n_heads) % 2 == 0,
                 f"head dim {self.dim // self.n_heads} must be even for RoPE; change model.dim or n_heads")
        _require(self.z_loss >= 0, f"model.z_loss must be >= 0, got {self.z_loss}")
        _require(self.init_from is None or self.init_from.startswith("hf:"),
                 f"model.init_from={self.init_from!r}: expected hf:PATH (a local Hugging Face Llama folder)")
        _require(not (self.init_from and self.qk_norm),
                 "model.qk_norm=true cannot start from a Hugging Face Llama (it has no query/key norms); "
                 "set model.qk_norm=false or drop model.init_from")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        hidden = int(8 * self.dim / 3)
        return self.ffn_multiple_of * -(-hidden // self.ffn_multiple_of)


@dataclass
class DataConfig:
    # None = the embedded default corpus (this Python's own standard library sources), prepared on first
    # use. Otherwise a directory written by `keel data prepare`.
    path: Optional[str] = None
    # The built-in corpus's tokenizer (a prepared data.path brings its own, recorded in its meta.json).
    tokenizer: Literal["byte", "bpe"] = "byte"
    seq_len: int = 256
    # Percentage held out for validation when the built-in corpus is prepared: whole documents by hash of
    # their path, or the last val_percent of the tokens when documents are too few (training/corpus.py).
    val_percent: float = 5.0

    def __post_init__(self):
        _require(self.seq_len > 0, f"data.seq_len must be positive, got {self.seq_len}")
        _require(0 < self.val_percent < 100, f"data.val_percent must be in (0, 100), got {self.val_percent}")


@dataclass
class OptimConfig:
    name: Literal["adamw"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    # A smaller epsilon than PyTorch's 1e-8 avoids the update-size collapse seen at scale (Wortsman et al.
    # 2023); raise it if tiny second moments make updates explode.
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    def __post_init__(self):
        _require(self.lr > 0, f"optim.lr must be positive, got {self.lr}; set e.g. optim.lr=3e-4")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _require(all(0 <= b < 1 for b in self.betas), f"optim.betas must lie in [0, 1), got {self.betas}")
        _require(self.eps > 0, f"optim.eps must be positive, got {self.eps}")
        _require(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    # Floor of the decay, as a fraction of optim.lr.
    min_lr_ratio: float = 0.1
    # WSD only: the final fraction of the run spent decaying (warmup-stable-decay, Hu et al. 2024).
    decay_fraction: float = 0.2

    def __post_init__(self):
        _require(self.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(0 <= self.min_lr_ratio <= 1, f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _require(0 < self.decay_fraction <= 1,
                 f"schedule.decay_fraction must be in (0, 1], got {self.decay_fraction}")


@dataclass
class TrainConfig:
    name: Optional[str] = None  # run name; None = the config file's stem
    output_dir: str = "runs"
    steps: int = 1000
    # Sequences per optimizer step across all data-parallel ranks; micro_batch_size sequences go through
    # the model at once, the rest is gradient accumulation.
    global_batch_size: int = 32
    micro_batch_size: int = 8
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_every: int = 100  # 0 = only at the end
    eval_batches: int = 8
    # Threads per process on CPU; 0 = leave PyTorch's default.
    cpu_threads: int = 0
    # A forecast.json (written by `keel train --forecast fit.json`): the eval loss predicted for this run,
    # with its interval, shown beside every eval; leaving the interval is an off_forecast event.
    forecast: Optional[str] = None
    # A capability suite scored at the end of the run and kept in record.json (training/tasks.py): None =
    # none; "heldout" = next-line completion drawn from the corpus's val split; else a JSONL task file of
    # {"prompt", "answer"} lines. Single-process runs only, for now.
    tasks: Optional[str] = None
    task_samples: int = 8  # sampled completions per problem for its pass rate
    # Problems of the built-in suite (training/tasks.py HELDOUT_PROBLEMS). Each costs a share of one forward
    # pass; 64 left ~2% of sampling noise in the mean answer NLL (benchmarks/RESULTS.md, ladder J).
    task_problems: int = 512

    def __post_init__(self):
        for name in ("steps", "global_batch_size", "micro_batch_size", "eval_batches", "task_samples",
                     "task_problems"):
            _require(getattr(self, name) > 0, f"train.{name} must be positive, got {getattr(self, name)}")
        _require(self.tasks in (None, "heldout") or Path(self.tasks).is_file(),
                 f"train.tasks={self.tasks!r} is neither 'heldout' nor an existing file; set train.tasks=heldout "
                 f"or the path of a JSONL file of {{\"prompt\": ..., \"answer\": ...}} lines")
        _require(self.eval_every >= 0, f"train.eval_every must be >= 0, got {self.eval_every}")
        _require(self.global_batch_size % self.micro_batch_size == 0,
                 f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                 f"train.micro_batch_size={self.micro_batch_size}")


# DeepSpeed keys keel derives from its own config (parallel/deepspeed.py ds_config), with the keel key to set.
DEEPSPEED_OWNED = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size and train.micro_batch_size",
    "gradient_clipping": "optim.grad_clip",
    "optimizer": "the optim section (keel passes DeepSpeed its AdamW)",
    "scheduler": "the schedule section (keel sets the learning rate of each step)",
    "fp16": "train.precision",
    "bf16": "train.precision",
    "zero_optimization.stage": "parallel.zero_stage",
}


@dataclass
class ParallelConfig:
    # Degrees of the device mesh; their product must equal the world size. -1 means "the rest".
    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    pp: int = 1
    engine: Literal["native", "deepspeed", "megatron"] = "native"
    # Pipeline schedule; the interleaved ones run pp_stages_per_rank stages on each rank. The micro-batches
    # are train.micro_batch_size rows each. (torch's ZBVZeroBubble is left out: its forward-only eval
    # fails in torch 2.13.)
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "interleaved_zero_bubble"] = "1f1b"
    pp_stages_per_rank: int = 1
    # Recompute activations in the backward pass: "full" per block, "selective" every other block.
    activation_checkpoint: Literal["none", "full", "selective"] = "none"
    compile: bool = False  # torch.compile each block
    # With tp > 1, compute the cross-entropy on the vocab-sharded logits instead of gathering them.
    loss_parallel: bool = True
    # engine: deepspeed. ZeRO stage 1 (optimizer state sharded), 2 (+ gradients) or 3 (+ parameters), and
    # the optimizer's state and update on the CPU (ZeRO-Offload).
    zero_stage: int = 1
    zero_offload_optimizer: bool = False
    # engine: deepspeed. More DeepSpeed config keys, merged over the ones keel derives (a nested mapping
    # merges key by key), e.g. {zero_optimization: {reduce_bucket_size: 5e7, overlap_comm: true}}. What keel
    # already sets from its own keys is refused here (DEEPSPEED_OWNED): two places for one setting would
    # disagree.
    deepspeed: dict = field(default_factory=dict)

    def __post_init__(self):
        _require(self.zero_stage in (1, 2, 3), f"parallel.zero_stage must be 1, 2 or 3, got {self.zero_stage}")
        for key, ours in DEEPSPEED_OWNED.items():
            head, _, tail = key.partition(".")
            section = self.deepspeed.get(head) if tail else None
            given = key in self.deepspeed if not tail else isinstance(section, dict) and tail in section
            _require(not given, f"parallel.deepspeed.{key} is set by keel; use {ours} instead")
        _require(not self.deepspeed or self.engine == "deepspeed",
                 f"parallel.deepspeed is set but parallel.engine={self.engine}; set parallel.engine=deepspeed, or "
                 f"leave parallel.deepspeed out")
        _require(self.pp_stages_per_rank >= 1,
                 f"parallel.pp_stages_per_rank must be >= 1, got {self.pp_stages_per_rank}")
        if self.pp_schedule in ("gpipe", "1f1b"):
            _require(self.pp_stages_per_rank == 1, f"parallel.pp_schedule={self.pp_schedule} runs one stage per "
                     f"rank; set parallel.pp_stages_per_rank=1 or pick an interleaved schedule")

        degrees = {"dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "tp": self.tp, "pp": self.pp}
        for name, d in degrees.items():
            _require(d == -1 or d >= 1, f"parallel.{name} must be >= 1 or -1 (the rest), got {d}")
        _require(sum(d == -1 for d in degrees.values()) <= 1,
                 f"only one parallel degree may be -1 (the rest), got {degrees}")


@dataclass
class CheckpointConfig:
    interval: int = 0  # steps between saves (and one at the last step); 0 = never save
    # Where checkpoints live; None = <run dir>/checkpoints.
    folder: Optional[str] = None
    # Retention: the newest keep_last, plus every keep_every-th step (0 = none kept for good).
    keep_last: int = 3
    keep_every: int = 0
    # Write in the background while training goes on (at most one save in flight).
    async_save: bool = True
    # "auto": resume from the newest committed checkpoint of this run, if any; "never"; or a checkpoint path.
    resume: str = "auto"
    # Resume even though settings that decide the data order or the optimization (batch size, sequence
    # length, data, tokenizer, seed, steps, schedule, optimizer; checkpoints/compat.py) differ from the
    # checkpoint's. Off, such a resume is refused naming each change: silently, it would be another run.
    resume_changed: bool = False

    def __post_init__(self):
        for name in ("interval", "keep_every"):
            _require(getattr(self, name) >= 0, f"checkpoint.{name} must be >= 0, got {getattr(self, name)}")
        _require(self.keep_last >= 1, f"checkpoint.keep_last must be >= 1 (the newest is always kept), "
                 f"got {self.keep_last}")


@dataclass
class StabilityConfig:
    # Judge every step's loss and gradient norm against the median/MAD of the last `window` healthy steps
    # (training/stability.py says why); judgments start after `warmup` steps. Non-finite values are
    # anomalies at once: their update is never applied.
    enabled: bool = True
    window: int = 100
    warmup: int = 50
    loss_z: float = 6.0           # a spike: loss this many robust standard deviations above the baseline
    grad_z: float = 20.0          # ... or log(gradient norm) this many (heavy-tailed: see stability.py)
    divergence_z: float = 3.0     # a divergence: the loss above this z for divergence_steps steps in a row
    divergence_steps: int = 20
    # What to do, in order of escalation: the first anomaly gets the first action, another one within
    # escalate_within steps of the previous the next, and so on (the last repeats). See STABILITY_ACTIONS.
    actions: list[str] = field(default_factory=lambda: ["skip_step", "rollback(skip_batches=200)",
                                                         "lower_lr(factor=0.5, steps=100)"])
    escalate_within: int = 10
    max_rollbacks: int = 3        # then the run stops with a report of the steps and batches involved

    def __post_init__(self):

        _require(self.actions != [], f"stability.actions must name at least one of {STABILITY_ACTIONS}")
        for action in self.actions:
            parse_action(action)
        _require(1 <= self.warmup <= self.window, f"stability: need 1 <= warmup <= window, got "
                 f"warmup={self.warmup}, window={self.window}")


@dataclass
class WandbConfig:
    # offline by default: nothing leaves the machine; `wandb sync runs/<name>/wandb` uploads later.
    mode: Literal["online", "offline", "disabled"] = "offline"
    project: str = "keel"
    entity: Optional[str] = None


@dataclass
class LoggingConfig:
    log_every: int = 10  # console lines; metrics.jsonl gets every step
    progress: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self):
        _require(self.log_every > 0, f"logging.log_every must be positive, got {self.log_every}")


@dataclass
class FaultConfig:
    max_restarts: int = 3
    # A rank that makes no progress for this long is hung: restart. None (the default) adapts it to the
    # run: max(hang_min_s, hang_step_factor x the slowest of the recent steps), so it needs no tuning
    # and catches a hang in tens of seconds where torchrun waits for the collective's timeout (10
    # minutes for NCCL). Evaluations, checkpoint saves and rollbacks get their own allowance (the same
    # factor times their longest observed duration; startup_timeout_s until one has been seen). A set
    # value is used for steps as it is (and as a floor for those phases).
    hang_timeout_s: Optional[float] = None
    hang_min_s: float = 30.0
    hang_step_factor: float = 20.0
    # With the adaptive limit on CPUs: a group whose every rank has been silent mid-step this long while
    # its training processes sleep and use no CPU (stuck in a gloo collective, or in a sleep) is hung now,
    # not at the limit; a slow step keeps a core busy. 0 turns it off. Slow storage that leaves a rank
    # blocked on reads for this long mid-step would look the same: raise it, or turn it off, there.
    idle_hang_s: float = 10.0
    # How long a restart waits for the cluster to have room for the whole group again (a lost node
    # to be replaced) before the run gives up, or, with `elastic`, goes on with fewer nodes.
    capacity_timeout_s: float = 300.0
    # When a lost node's room does not come back within capacity_timeout_s, continue on the nodes that
    # are left with fewer data-parallel replicas: the same global batch (more gradient accumulation per
    # replica), resumed by resharding the newest checkpoint. tp and pp stay as they are.
    elastic: bool = False
    # Before a group's first step (imports, process group, data, checkpoint restore) the hang clock
    # allows this much instead.
    startup_timeout_s: float = 600.0
    # Failures to inject, for tests and drills (see training/faults.py): "kill@23" SIGKILLs every rank
    # right after step 23, "hang:r1@15" stops rank 1 after step 15, "raise:r0@10" raises in rank 0,
    # "kill_in_save@30" SIGKILLs while the step-30 checkpoint is being written, before it commits;
    # "enospc_in_save@30" fails that write as a full disk would (the run reports it and goes on);
    # "slow@40-60" adds SLOW_S seconds to each of those steps (every time they run: a slow machine).
    # For the stability drills: "nan@40" makes step 40's gradients NaN, "garbage@150-160" replaces the
    # batches first served at steps 150..160 with random tokens, "lr_spike@200-205" multiplies the
    # learning rate of steps 200..205 by 100 (once: a replay after a rollback runs clean).
    inject: list[str] = field(default_factory=list)

    def __post_init__(self):
        for spec in self.inject:
            parse_fault(spec)
        _require(self.max_restarts >= 0, f"fault.max_restarts must be >= 0, got {self.max_restarts}")
        for name in ("hang_timeout_s", "hang_min_s", "hang_step_factor", "capacity_timeout_s", "startup_timeout_s"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"fault.{name} must be positive, got {value}")
        _require(self.idle_hang_s >= 0, f"fault.idle_hang_s must be >= 0 (0 turns it off), got {self.idle_hang_s}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    def __post_init__(self):
        _require(self.data.seq_len <= self.model.max_seq_len,
                 f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
