"""Dolly's supervised fine-tuning of a Pythia model, on one process or many (FSDP2): the loop.

    from minidolly.train import TrainConfig, train
    train(TrainConfig(size="70m", data="dolly.jsonl", max_steps=100))

One optimizer step consumes one global batch of --global-batch-size examples. Each rank runs
its share of the batch as micro-batches (forward, backward, gradients accumulate), then the
gradients are summed over ranks, clipped, and AdamW steps. The loss of a step is the mean
over every target token of the global batch: each micro-batch contributes
sum(token losses) / (target tokens in the whole global batch), a count every rank knows
from the global batch's indices, and FSDP sums (not averages) over ranks. So N ranks take
exactly the step one rank would, up to float summation order.

`train` runs four rooms, torchtitan style:

    setup(cfg, env) -> Run       read the inputs, apply the resume policy, check the memory
                                 plan, build the sharded model and the optimizer, resume
    train_step(run, batch)       one global batch: forward/backward of this rank's
                                 micro-batches, clipping, AdamW; one host sync
    after_step(run, ...)         the metrics row and progress line, evaluation, checkpoint
    finish(run)                  last evaluation, final/ in Hugging Face format, loss.png

The loop's neighbours each hold one concept: minidolly/parallel.py (process group, FSDP2,
activation checkpointing, compile), minidolly/memory.py (the memory plan),
minidolly/resume.py (the run's DCP checkpoints and the resume policy) and
minidolly/metrics.py (metrics.jsonl, loss.png). The run writes to --out: metrics.jsonl,
checkpoints/step-XXXXXXXX/, final/ (Hugging Face format) and loss.png. docs/training.md
explains the loop, the sharding and the memory arithmetic.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import kernels  # our Triton kernels; importing them is cheap (triton loads on first use)

from .checkpoint import (
    ADAPTER_CONFIG,
    DownloadError,
    adapter_config,
    fingerprint,
    load_model,
    looks_like_hub_id,
    resolve,
    save_adapter,
    save_model,
)
from .config import ModelConfig, hub_id, size_key
from .data import (
    IGNORE_INDEX,
    BatchSampler,
    DataWarning,
    Example,
    Step,
    collate,
    count_targets,
    load_records,
    padding_fraction,
    tokenize_records,
    train_val_split,
)
from .lora import DEFAULT_TARGETS, LoRAConfig, apply_lora, lora_parameter_count, merge_state_dict, parse_targets
from .memory import GiB, MemoryPlan, plan_memory
from .metrics import MetricsLog, duration, peak_memory, plot_loss
from .model import GPTNeoX
from .parallel import (
    Distributed,
    apply_activation_checkpointing,
    apply_compile,
    apply_fsdp,
    init_distributed,
    needs_fsdp,
)
from .resume import (
    CheckpointSaveError,
    ResumeError,
    checkpoint_dirs,
    clear_run,
    load_checkpoint,
    read_run,
    resume_from,
    save_checkpoint,
)
from .tokenizer import Tokenizer, load_tokenizer

SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("auto", "bf16", "fp32")
KERNELS = {"auto": None, "on": True, "off": False}  # --kernels -> GPTNeoX.use_kernels


class UsageError(Exception):
    """A mistake the user can fix (a flag, a path, a file's content); the CLI prints the
    one-line message and exits 2."""


class TrainingStopped(RuntimeError):
    """The run stopped itself (a non-finite loss); the last checkpoint is intact."""


@dataclass
class TrainConfig:
    """Every knob of a run; `train.py --help` documents each flag of the same name.
    Defaults are Dolly v2's recipe (databrickslabs/dolly: lr 5e-6, 2 epochs, warmup 50 steps
    then constant (DeepSpeed WarmupLR), AdamW without weight decay, global batch 48); a run
    shorter than 500 steps warms up for a tenth of its steps."""

    size: str | None = None  # Pythia shape, e.g. "70m"; optional when --init is a local checkpoint
    init: str | None = None  # None: EleutherAI/pythia-<size>; "scratch"; a local dir or Hub id
    tokenizer: str | None = None  # None: the init checkpoint's, or EleutherAI/pythia-<size> for scratch
    data: str | None = None  # None: databricks-dolly-15k from the Hub
    out: str | None = None  # None: runs/dolly-<size>
    max_length: int = 2048  # longer examples are dropped (Pythia's context length)
    epochs: int = 2
    max_steps: int | None = None  # overrides epochs
    global_batch_size: int = 48
    micro_batch_size: int = 8
    lr: float = 5e-6
    warmup_steps: int | None = None  # None: 50, or a tenth of a shorter run (`default_warmup`)
    schedule: str = "constant"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 42
    val_size: int = 200
    eval_every: int = 100  # 0: only before training and at the end
    save_every: int = 200  # 0: never
    keep_checkpoints: int = 2
    log_every: int = 10
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each layer
    cpu_offload: bool = False
    precision: str = "auto"  # auto: bf16 compute on GPU, fp32 on CPU
    kernels: str = "auto"  # our Triton kernels: auto (on CUDA where they run), on, off
    skip_bad_records: bool = False
    lora_rank: int = 0  # 0: full fine-tune; R >= 1: train LoRA adapters of rank R beside the frozen base
    lora_alpha: float | None = None  # None: 2 x --lora-rank
    lora_dropout: float | None = None  # None: 0.05
    lora_targets: str | None = None  # None: query_key_value (PEFT's default for GPT-NeoX); all-linear; a comma list
    merge: bool = False  # LoRA: also write final-merged/, the base with the adapters folded in
    resume: bool = False
    overwrite: bool = False  # replace the run already in --out
    dry_run: bool = False
    world_size: int | None = None  # --dry-run only: plan for this many ranks
    device_memory: float | None = None  # --dry-run only: plan for GPUs of this many GiB
    stop_after_step: int | None = None  # tests: die like a crash right after this step

    def validate(self) -> None:
        """Raise UsageError naming the first flag whose value cannot work."""
        positive = ["max_length", "epochs", "global_batch_size", "micro_batch_size", "log_every", "keep_checkpoints"]
        at_least_zero = ["val_size", "eval_every", "save_every"]
        for name in positive + at_least_zero:
            value, low = getattr(self, name), 1 if name in positive else 0
            if not isinstance(value, int) or value < low:
                raise UsageError(f"--{_flag(name)} must be an integer >= {low}, got {value!r}.")
        for name, low in (("max_steps", 1), ("world_size", 1), ("stop_after_step", 1), ("warmup_steps", 0)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < low):
                raise UsageError(f"--{_flag(name)} must be an integer >= {low}, got {value!r}.")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"--lr must be a positive number, got {self.lr!r}.")
        for name in ("weight_decay", "max_grad_norm"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise UsageError(f"--{_flag(name)} must be a number >= 0, got {getattr(self, name)!r}.")
        if self.device_memory is not None and not self.device_memory > 0:
            raise UsageError(f"--device-memory must be a positive number of GiB, got {self.device_memory!r}.")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}.")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}.")
        if self.kernels not in KERNELS:
            raise UsageError(f"--kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}.")
        if self.resume and self.overwrite:
            raise UsageError("--resume continues the run in --out and --overwrite replaces it; pass one of them.")
        if not self.dry_run and (self.world_size is not None or self.device_memory is not None):
            raise UsageError("--world-size and --device-memory only plan (--dry-run); a real run takes its world "
                             "size from torchrun and its memory from the devices it sees.")
        if self.size is None and (self.init in (None, "scratch")):
            raise UsageError("Pass --size (e.g. --size 70m) to pick the model, or --init with a checkpoint directory.")
        if self.size is not None:
            try:
                ModelConfig.from_size(self.size)
            except ValueError as e:
                raise UsageError(f"--size: {e}") from None
        self._validate_lora()

    def _validate_lora(self) -> None:
        """The LoRA flags: a rank >= 1 before any other, then each value's range."""
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise UsageError(f"--lora-rank must be an integer >= 1 (or 0 for a full fine-tune), got {self.lora_rank!r}.")
        given = [f"--{_flag(n)}" for n in ("lora_alpha", "lora_dropout", "lora_targets") if getattr(self, n) is not None]
        given += ["--merge"] if self.merge else []
        if self.lora_rank == 0:
            if given:
                raise UsageError(f"{given[0]} applies to LoRA; pass --lora-rank R (R >= 1) with it, "
                                 f"or drop it for a full fine-tune.")
            return
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise UsageError(f"--lora-alpha must be a number > 0, got {self.lora_alpha!r}.")
        if self.lora_dropout is not None and not 0 <= self.lora_dropout < 1:
            raise UsageError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout!r}.")
        try:
            self.lora()
        except ValueError as e:  # an unknown --lora-targets name
            raise UsageError(str(e)) from None
        if self.init == "scratch":
            raise UsageError("--lora-rank adapts pretrained weights, and --init scratch has none; pass --init with "
                             "a checkpoint (or drop --init for EleutherAI/pythia-<size>).")

    def lora(self) -> LoRAConfig | None:
        """The LoRA settings with their defaults filled in, or None for a full fine-tune."""
        if not self.lora_rank:
            return None
        return LoRAConfig(rank=self.lora_rank,
                          alpha=float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank,
                          dropout=self.lora_dropout if self.lora_dropout is not None else 0.05,
                          targets=tuple(parse_targets(self.lora_targets or ",".join(DEFAULT_TARGETS))))


def _flag(name: str) -> str:
    return name.replace("_", "-")


# ------------------------------------------------------------------ the sources


@dataclass
class Sources:
    """Where the run's model shape, weights and tokenizer come from."""

    config: ModelConfig
    init: str  # "scratch" or a local checkpoint directory
    tokenizer: str
    name: str  # for the default output directory: runs/dolly-<name>


def resolve_sources(cfg: TrainConfig, *, offline: bool = False) -> Sources:
    """Work out the model config and where the weights and tokenizer come from.

    With `offline` (the dry run) a Hub id is never fetched: the shape comes from --size.
    Raises UsageError when --size and --init disagree, and lets DownloadError,
    FileNotFoundError and ValueError (bad config.json) through for the caller to word.
    """
    preset = ModelConfig.from_size(cfg.size) if cfg.size else None
    init = cfg.init or hub_id(cfg.size)
    name = _run_name(cfg)
    if init == "scratch":
        return Sources(preset, "scratch", cfg.tokenizer or hub_id(cfg.size), name)
    if offline and not os.path.isdir(os.path.expanduser(init)):
        if preset is None:
            raise UsageError(f"--init {init} is not a local directory; pass --size to plan without downloading it.")
        return Sources(preset, init, cfg.tokenizer or init, name)
    directory = resolve(init)
    if os.path.isfile(os.path.join(directory, ADAPTER_CONFIG)):
        raise UsageError(f"--init {init} is a LoRA adapter, not a model; start from its base, or from the model "
                         f"with the adapter merged in (train.py --merge writes it to final-merged/).")
    config = ModelConfig.from_hf(directory)
    if preset is not None:
        shape = lambda c: (c.num_layers, c.hidden_size, c.num_heads)  # noqa: E731
        if shape(preset) != shape(config):
            raise UsageError(f"--init {init} has {config.num_layers} layers of width {config.hidden_size} but "
                             f"--size {cfg.size} has {preset.num_layers} of width {preset.hidden_size}; drop one of them.")
    return Sources(config, directory, cfg.tokenizer or directory, name)


def _run_name(cfg: TrainConfig) -> str:
    return size_key(cfg.size) if cfg.size else os.path.basename(os.path.normpath(cfg.init))


def output_dir(cfg: TrainConfig) -> str:
    """--out, or runs/dolly-<size> (runs/dolly-<--init's directory name> without --size)."""
    return cfg.out or os.path.join("runs", f"dolly-{_run_name(cfg)}")


# ------------------------------------------------------- what a resume may change

# The settings that define a run. A checkpoint records them, and --resume refuses to continue
# it under others: its weights, optimizer state and data order were made with these. The data
# is compared by content (its sha256), so a moved copy is the same data and a shuffled one is
# not. A LoRA run's checkpoints hold only its adapters, so its frozen base must be the same
# weights again: `run_record` adds the base's fingerprint (`base_record`) to these.
RUN_SETTINGS = ("size", "init", "data", "seed", "global_batch_size", "max_length", "val_size", "precision",
                "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")

# The settings that only steer the optimisation from here on: a resumed run applies the new
# value and prints one line per change (the NaN advice "try a lower --lr" relies on it).
STEERING_SETTINGS = ("lr", "warmup_steps", "schedule", "weight_decay", "max_grad_norm", "epochs", "max_steps",
                     "eval_every", "save_every", "log_every", "keep_checkpoints")


def run_record(cfg: TrainConfig, data_sha256: str, base: dict | None = None) -> dict:
    """What a checkpoint records of the run: {"defines": RUN_SETTINGS and "base", "steers":
    STEERING_SETTINGS, "base_name"}, by name. The size is normalised ("pythia-70m" is "70m"),
    the data is the file's sha256, LoRA's settings are the values the run uses (an unset
    --lora-alpha is 2 x rank), and "base" a LoRA run's base fingerprint (`base_record`; None
    for a full fine-tune, whose checkpoints hold every weight)."""
    defines = {name: getattr(cfg, name) for name in RUN_SETTINGS}
    defines |= {"size": size_key(cfg.size) if cfg.size else None, "data": data_sha256,
                "base": base and base["base_fingerprint"]}
    if lora := cfg.lora():
        defines |= {"lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "lora_targets": ",".join(lora.targets)}
    return {"defines": defines, "steers": {name: getattr(cfg, name) for name in STEERING_SETTINGS},
            "base_name": base and base["base"]}


def compare_runs(record: dict, saved: dict, path: str) -> list[str]:
    """Hold this run's `record` against the one saved with the checkpoint at `path`. Raises
    UsageError naming every run-defining setting that differs (one the checkpoint predates
    counts as its default); returns one line per steering setting that changed, e.g.
    "--lr 1e-05 (checkpoint: 0.001)"."""
    def shown(name, value):
        if value is None:
            return "(default)"
        if name == "data":
            return f"sha256 {value[:12]}..."
        if name == "lora_rank" and value == 0:
            return "0 (a full fine-tune)"
        return f"{value:g}" if isinstance(value, float) else value

    def differs(name):
        if name == "base":  # the same path may hold other weights, another path the same ones
            return (f"--init {record.get('base_name')} has other weights than {saved.get('base_name')}, the base "
                    f"the checkpoint's adapters were trained on")
        return f"--{_flag(name)} {shown(name, new[name])} (checkpoint: {shown(name, old[name])})"

    if not saved:
        return []  # a checkpoint saved without a record (outside the loop): nothing to hold it to
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    old = {k: saved.get("defines", {}).get(k, defaults.get(k)) for k in record["defines"]}
    new = record["defines"]
    differ = [differs(k) for k in new if old[k] != new[k]]
    if differ:
        raise UsageError(f"--resume: this run's settings differ from those of the checkpoint {path}: "
                         f"{', '.join(differ)}; resume with the checkpoint's settings, or start afresh with "
                         f"--overwrite or another --out.")
    old, new = saved.get("steers", {}), record["steers"]
    return [f"--{_flag(k)} {new[k]} (checkpoint: {old[k]})" for k in new if k in old and old[k] != new[k]]


def default_warmup(total_steps: int) -> int:
    """--warmup-steps when not given: Dolly's 50 steps, or a tenth of a shorter run, so that a
    short run spends most of its steps at the learning rate it asked for."""
    return min(50, total_steps // 10)


# ----------------------------------------------------------- model & optimizer


def build_model(sources: Sources, cfg: TrainConfig, device: torch.device, compute_dtype) -> GPTNeoX:
    """The sharded model, with weights in place, never whole on any rank but rank 0's host.

    Every rank builds the model on the meta device (no memory), applies activation
    checkpointing, torch.compile and FSDP (when `needs_fsdp`), and allocates only its shards
    (`to_empty`). Rank 0 then supplies the full weights one tensor at a time and
    `set_model_state_dict(broadcast_from_rank0)` sends each to every rank, which keeps its slice:
    pretrained: `load_model` memory-maps the checkpoint files, so rank 0 reads each tensor
        from disk only as it is broadcast;
    scratch: rank 0 builds the model on CPU with GPT-NeoX's init, seeded by --seed, so the
        starting weights are the same whatever the world size (4·P bytes of host RAM on rank 0).
    --kernels sets `GPTNeoX.use_kernels`. Raises UsageError (on every rank) when rank 0
    cannot read the checkpoint.

    With LoRA (`cfg.lora()`), adapters go in right after the model is built, before the other
    wrappers (torchtitan's order; minidolly/lora.py): every base parameter is frozen and, with
    bf16 compute, held in bf16 (it is never updated, so an fp32 master copy would buy
    nothing), while the adapters are fp32; FSDP shards both. Rank 0 draws the adapters'
    initial values (PEFT's init, seeded by --seed) into the full state dict it broadcasts.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict  # DTensor: not at import

    lora = cfg.lora()
    with torch.device("meta"):
        model = GPTNeoX(sources.config, use_kernels=KERNELS[cfg.kernels])
    if lora:
        model.to(compute_dtype or torch.float32)
        apply_lora(model, lora.rank, lora.alpha, lora.dropout, list(lora.targets), dtype=torch.float32)
    if cfg.activation_checkpointing:
        # LoRA's dropout draws random masks: the recomputed forward must draw the same ones
        apply_activation_checkpointing(model, preserve_rng_state=bool(lora and lora.dropout > 0))
    if cfg.compile:
        apply_compile(model)
    if needs_fsdp(dist.get_world_size(), compute_dtype, cfg.cpu_offload):
        apply_fsdp(model, param_dtype=compute_dtype, cpu_offload=cfg.cpu_offload)
    model.to_empty(device="cpu" if cfg.cpu_offload else device)

    full, error = {}, None
    if dist.get_rank() == 0:
        try:
            if sources.init == "scratch":
                torch.manual_seed(cfg.seed)
                full = GPTNeoX(sources.config).state_dict()
            else:
                base = load_model(sources.init)  # file dtype; each shard converts on copy
                if lora:
                    torch.manual_seed(cfg.seed)
                    apply_lora(base, lora.rank, lora.alpha, lora.dropout, list(lora.targets), dtype=torch.float32)
                full = base.state_dict()
        except (ValueError, OSError) as e:
            error = str(e)
    error = _broadcast(error)
    if error:
        raise UsageError(error)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def _broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def build_optimizer(model, cfg: TrainConfig, total_steps: int):
    """AdamW over the parameters that train (`requires_grad`), with Dolly's betas/eps (HF
    defaults) and no weight decay on biases and LayerNorm weights (every 1-D parameter),
    fused, and the LambdaLR schedule: linear warmup over --warmup-steps (step s uses
    lr·(s+1)/warmup), then constant, cosine or linear decay to 0 at the last step.
    Returns (optimizer, scheduler)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trained if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in trained if p.ndim < 2], "weight_decay": 0.0}]
    # fused: one kernel for the whole update instead of a loop over tensors (CUDA and CPU alike)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)

    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else default_warmup(total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------- the loss


def loss_sum(model, batch: dict, device: torch.device) -> torch.Tensor:
    """Summed cross-entropy of every target token of a collated micro-batch (fp32).

    The prediction at position t is scored against token t+1, so the labels are shifted left
    (padded with IGNORE_INDEX) rather than the logits sliced. Only positions with a target are
    unembedded (`keep`): the prompt and the padding never reach the (C -> V) matmul. The
    target rows are picked where the batch is (the host, from `collate`), so picking them
    does not wait for the GPU.
    """
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
    keep = labels != IGNORE_INDEX  # (B, T)
    logits = model(input_ids, keep=keep.to(device, non_blocking=True))  # (N, V), N = target tokens
    return F.cross_entropy(logits.float(), labels[keep].to(device, non_blocking=True), reduction="sum")


@torch.no_grad()
def evaluate(model, examples, micro_batch_size: int, pad_id: int, device) -> float | None:
    """Token-mean loss over `examples` (the validation set), split over the ranks.

    Every rank runs the same number of forwards (FSDP all-gathers are collective), padding
    with a one-token dummy batch that counts for nothing. Returns None for an empty set.
    """
    if not examples:
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))  # little padding
    cuts = [[examples[i] for i in order[j : j + micro_batch_size]] for j in range(0, len(order), micro_batch_size)]
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    model.eval()
    for r in range(math.ceil(len(cuts) / world)):
        j = r * world + rank
        if j < len(cuts):
            totals[0] += loss_sum(model, collate(cuts[j], pad_id), device).double()
            totals[1] += count_targets(cuts[j])
        else:
            model(torch.full((1, 1), pad_id, device=device))
    model.train()
    dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


def save_final(directory: str, model, tokenizer, dtype: torch.dtype, lora_scaling: float | None = None) -> None:
    """Gather the full weights onto rank 0 (one tensor at a time, into host memory: 4·P
    bytes) and write them in `dtype` with the tokenizer in Hugging Face format. A LoRA model
    (`lora_scaling` = alpha / r) is written merged: each adapted weight + scaling · B A."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        if lora_scaling is not None:
            merge_state_dict(full, lora_scaling)
        for k in full:  # in place: each fp32 tensor is freed as its copy is made
            full[k] = full[k].to(dtype)
        save_model(model, directory, state_dict=full)
        tokenizer.save(directory)
    dist.barrier()


def save_lora_final(directory: str, model, tokenizer, config: dict) -> None:
    """Gather the adapters onto rank 0 (frozen parameters stay where they are) and write
    them as a PEFT adapter (`config`: its adapter_config.json) with the tokenizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    adapters = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                    ignore_frozen_params=True))
    if dist.get_rank() == 0:
        save_adapter(directory, adapters, config)
        tokenizer.save(directory)
    dist.barrier()


def base_record(cfg: TrainConfig, sources: Sources) -> dict:
    """The identity of a LoRA run's frozen base, which its checkpoints do not hold: the
    --init it was given (a Hub id, or the directory's absolute path, which the adapter's
    base_model_name_or_path also names) and the `fingerprint` of its files. Rank 0 reads
    the files; every rank gets the same record."""
    init = cfg.init or hub_id(cfg.size)
    name = init if looks_like_hub_id(init) else os.path.abspath(os.path.expanduser(init))
    return {"base": name, "base_fingerprint": _broadcast(fingerprint(sources.init) if dist.get_rank() == 0 else None)}


def micro_batch_seed(seed: int, step: int, first_example: int) -> int:
    """The random seed of one micro-batch's dropout: a function of --seed, the step and the
    micro-batch's first example, so the masks do not depend on the world size (micro-batches
    are the same on 1 or N ranks, only dealt out differently) nor on where a resume started."""
    return ((seed * 1_000_003 + step) * 1_000_003 + first_example) % 2**63  # torch.manual_seed's range


# ------------------------------------------------------------------------ setup


@dataclass
class Run:
    """What the loop's rooms share: built by `setup`, advanced by `train_step`."""

    cfg: TrainConfig
    env: Distributed
    sources: Sources
    tokenizer: Tokenizer
    train_set: list[Example]
    val_set: list[Example]
    sampler: BatchSampler
    plan: MemoryPlan
    out: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    compute_dtype: torch.dtype | None  # None: compute in the fp32 parameters
    total_steps: int
    metrics: MetricsLog
    step: int = 0  # optimizer steps taken
    record: dict = dataclasses.field(default_factory=dict)  # `run_record`, saved with each checkpoint
    lora: LoRAConfig | None = None  # a LoRA run's settings; None: full fine-tune
    base: dict | None = None  # a LoRA run's frozen base (`base_record`): its name and fingerprint


def dry_run(cfg: TrainConfig) -> MemoryPlan:
    """The memory plan for --size/--init, --world-size and the options, without touching
    data, weights or the network."""
    cfg.validate()
    try:
        sources = resolve_sources(cfg, offline=True)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    return plan_memory(sources.config, cfg, cfg.world_size or int(os.environ.get("WORLD_SIZE", 1)))


def _say(env, *lines) -> None:
    if env.is_main:
        print(*lines, sep="\n", flush=True)


def _check_options(cfg: TrainConfig, env: Distributed) -> torch.dtype | None:
    """Refuse option combinations this machine cannot run, before any work; returns the
    compute dtype (bf16, or None for the fp32 parameters' own)."""
    if cfg.cpu_offload and env.device.type != "cuda":
        raise UsageError("--cpu-offload moves GPU state to the host; there is no GPU here, so drop it.")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and env.device.type == "cuda")
    if cfg.compile and bf16 and env.device.type == "cpu":
        # torch 2.13's inductor emits C++ that does not compile for the bf16 layer backward
        raise UsageError("--compile with --precision bf16 fails inside torch.compile on CPU (an inductor bug); "
                         "use one of the two.")
    if cfg.kernels == "on" and (reason := kernels.unavailable_reason(env.device)) is not None:
        raise UsageError(f"--kernels on: our Triton kernels cannot run here: {reason}; use --kernels auto or off.")
    return torch.bfloat16 if bf16 else None


def _read_inputs(cfg: TrainConfig, env):
    """Sources, tokenizer, train and validation examples, the sampler and the data stats.
    Everything the user supplies is read on every rank, so every rank fails alike, with a
    UsageError whose message names the flag or file."""
    try:
        sources = resolve_sources(cfg)
        tokenizer = load_tokenizer(sources.tokenizer)
        if len(tokenizer) > sources.config.vocab_size:
            raise UsageError(f"The tokenizer {sources.tokenizer} has {len(tokenizer)} tokens but the model's "
                             f"embedding has only {sources.config.vocab_size} rows; pass a matching --tokenizer.")
        with warnings.catch_warnings(record=True) as caught:  # said once, by rank 0, as our own lines
            warnings.simplefilter("always", DataWarning)
            records, data_stats = load_records(cfg.data, skip_bad_records=cfg.skip_bad_records)
        data_stats["warnings"] = [str(w.message) for w in caught]
        examples, token_stats = tokenize_records(records, tokenizer, cfg.max_length)
        train_set, val_set = train_val_split(examples, cfg.val_size, cfg.seed)
        sampler = BatchSampler([len(e.input_ids) for e in train_set], cfg.global_batch_size, cfg.micro_batch_size,
                               env.world_size, env.rank, cfg.seed)
    except DownloadError as e:
        raise UsageError(f"{e} Offline? Pass local files: --init DIR (or --init scratch), --tokenizer FILE "
                         f"and --data FILE.") from None
    except FileNotFoundError as e:
        hint = " Pass --tokenizer with a tokenizer.json." if "tokenizer" in str(e) and cfg.tokenizer is None else ""
        raise UsageError(f"{e}{hint}") from None
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    return sources, tokenizer, train_set, val_set, sampler, data_stats | token_stats


def _lora_banner(lora: LoRAConfig, config: ModelConfig, compute_dtype) -> str:
    n = lora_parameter_count(config, lora.rank, list(lora.targets))
    return (f"LoRA: rank {lora.rank}, alpha {lora.alpha:g}, dropout {lora.dropout:g} on {', '.join(lora.targets)}: "
            f"{n:,} trainable parameters ({100 * n / config.num_params():.2f}% of the model), "
            f"base frozen in {'bf16' if compute_dtype else 'fp32'}")


def setup(cfg: TrainConfig, env: Distributed) -> Run:
    """Everything before the first step, in the order that fails cheapest first: the options,
    --out and the resume policy (`resume_from`), the inputs, the checkpoint's settings against
    this run's (`compare_runs`), the memory plan (a plan that does not fit stops here, printing
    it), the banner, the model and optimizer, the checkpoint to continue from,
    train_config.json and metrics.jsonl. Raises UsageError."""
    compute_dtype = _check_options(cfg, env)
    torch.manual_seed(cfg.seed)
    out = output_dir(cfg)
    try:
        resume_path, notes = resume_from(out, cfg.resume, cfg.overwrite)
    except ResumeError as e:
        raise UsageError(str(e)) from None
    _warn(env, *notes)
    sources, tokenizer, train_set, val_set, sampler, stats = _read_inputs(cfg, env)
    _warn(env, *stats["warnings"])
    lora = cfg.lora()
    base = base_record(cfg, sources) if lora else None  # a LoRA checkpoint holds no base: it must be the same

    total_steps = cfg.max_steps or cfg.epochs * sampler.steps_per_epoch
    if cfg.warmup_steps is None:
        cfg = dataclasses.replace(cfg, warmup_steps=default_warmup(total_steps))
    record, saved, changes = run_record(cfg, stats["sha256"], base), {}, []
    if resume_path:
        try:
            saved = read_run(resume_path)
        except ResumeError as e:
            raise UsageError(str(e)) from None
        changes = compare_runs(record, saved, resume_path)
    accumulation = cfg.global_batch_size // (cfg.micro_batch_size * env.world_size)
    plan = plan_memory(sources.config, cfg, env.world_size, seq_len=max(sampler.lengths))
    if not plan.fits:
        _say(env, str(plan))
        raise UsageError(f"This run does not fit in memory (plan above); try --activation-checkpointing, a smaller "
                         f"--micro-batch-size or --max-length, more ranks{', or --cpu-offload' if env.device.type == 'cuda' else ''}.")
    if plan.activation_checkpointing and not cfg.activation_checkpointing:  # a LoRA plan turned it on
        cfg = dataclasses.replace(cfg, activation_checkpointing=True)
    _say(env,
         f"model: {sources.init if sources.init == 'scratch' else 'from ' + sources.init} "
         f"({sources.config.num_params() / 1e6:.1f}M parameters), tokenizer {sources.tokenizer}",
         f"data: {stats['path']}: {stats['records']} records -> {stats['examples']} examples, {len(train_set)} train / "
         f"{len(val_set)} validation",
         f"dropped: {stats['bad_lines']} bad lines (--skip-bad-records), {stats['empty_response']} empty responses, "
         f"{stats['too_long']} longer than --max-length {cfg.max_length}",
         f"ranks: {env.world_size} x {env.device.type}, {'bf16' if compute_dtype else 'fp32'} compute; global batch "
         f"{cfg.global_batch_size} = {accumulation} micro-batches of {cfg.micro_batch_size} x {env.world_size} "
         f"rank(s); {total_steps} steps ({sampler.steps_per_epoch} per epoch), {cfg.warmup_steps} of warm-up",
         f"memory: {plan.total('device') / GiB:.2f} GiB per rank planned on {plan.device_name}; {plan.note or 'no accumulation'}",
         *([_lora_banner(lora, sources.config, compute_dtype)] if lora else []),
         f"output: {out}{' (replacing the run there: --overwrite)' if cfg.overwrite else ''}")

    model = build_model(sources, cfg, env.device, compute_dtype)
    if lora:
        held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters()
                   if not p.requires_grad)  # FSDP shards the frozen base too
        _say(env, f"LoRA: rank 0 holds {held:,} of the base's {sources.config.num_params():,} frozen parameters")
    optimizer, scheduler = build_optimizer(model, cfg, total_steps)
    run = Run(cfg=cfg, env=env, sources=sources, tokenizer=tokenizer, train_set=train_set, val_set=val_set,
              sampler=sampler, plan=plan, out=out, model=model, optimizer=optimizer, scheduler=scheduler,
              compute_dtype=compute_dtype, total_steps=total_steps,
              metrics=MetricsLog(os.path.join(out, "metrics.jsonl"), env.is_main), record=record, lora=lora, base=base)
    if resume_path:
        try:
            run.step = load_checkpoint(resume_path, model, optimizer, scheduler, sampler)
        except ResumeError as e:
            raise UsageError(str(e)) from None
        _say(env, f"resumed from {resume_path} after step {run.step}", *(f"resume: {c}" for c in changes))
    if env.is_main:
        if cfg.overwrite:
            clear_run(out)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "train_config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
    run.metrics.start(run.step if resume_path else None, rows=saved.get("metrics_rows"))
    return run


def _warn(env, *lines) -> None:
    if env.is_main:
        for line in lines:
            print(f"warning: {line}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ the loop


@dataclass
class StepResult:
    """What one optimizer step reports, on the host."""

    loss: float  # token-mean loss of the global batch
    grad_norm: float  # before clipping
    lr: float  # the rate the step used


def train_step(run: Run, batch: Step) -> StepResult:
    """One optimizer step on one global batch (`batch`: this rank's micro-batches of it).

    Forward and backward of each micro-batch (gradients accumulate; FSDP reduce-scatters on
    the last, or after each when the plan cannot afford an unsharded gradient), the loss
    summed over ranks, the gradient norm clipped to --max-grad-norm, AdamW and the schedule
    stepped. The loss and the gradient norm come to the host together, the step's one host
    sync, so that a non-finite value stops the run before it reaches the weights: raises
    TrainingStopped then, with the weights unchanged.
    """
    model, device = run.model, run.env.device
    n_targets = count_targets([run.train_set[i] for i in batch.global_indices])
    total = torch.zeros((), dtype=torch.float64, device=device)
    for j, indices in enumerate(batch.micro_batches):
        if run.lora and run.lora.dropout > 0:
            torch.manual_seed(micro_batch_seed(run.cfg.seed, run.step, indices[0]))
        if hasattr(model, "set_requires_gradient_sync"):  # an FSDP module
            model.set_requires_gradient_sync(j == len(batch.micro_batches) - 1 or not run.plan.skip_sync)
        micro = loss_sum(model, collate([run.train_set[i] for i in indices], run.tokenizer.pad_id), device) / n_targets
        micro.backward()
        total += micro.detach()
    dist.all_reduce(total)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), run.cfg.max_grad_norm or math.inf)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP
    # The one sync. Under --cpu-offload the gradients, so their norm, are on the host.
    loss, grad_norm = torch.stack([total.to(norm.device), norm.double()]).tolist()
    if not math.isfinite(loss) or not math.isfinite(grad_norm):
        last = checkpoint_dirs(run.out)
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
        raise TrainingStopped(f"The {what} at step {run.step + 1}; stopping without updating the weights. "
                              f"The last checkpoint ({last[-1] if last else 'none yet'}) is intact; "
                              f"try a lower --lr.")
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return StepResult(loss, grad_norm, lr)


def _evaluate(run: Run) -> float | None:
    """Validation loss now: a metrics row and a progress line. None without a validation set."""
    if not run.val_set:
        return None
    val_loss = evaluate(run.model, run.val_set, run.cfg.micro_batch_size, run.tokenizer.pad_id, run.env.device)
    run.metrics.write({"step": run.step, "val_loss": val_loss})
    _say(run.env, f"step {run.step}/{run.total_steps} | val_loss {val_loss:.4f}")
    return val_loss


def after_step(run: Run, batch: Step, result: StepResult, seconds: float, eta: float) -> None:
    """What follows a step, each at its own cadence: the metrics row and progress line
    (--log-every, and the last step), evaluation (--eval-every, except the last step, which
    `finish` evaluates), a checkpoint (--save-every). `seconds`: the step's wall time; `eta`:
    seconds left. Nothing here waits for the device except evaluation and saving."""
    cfg, step = run.cfg, run.step
    if step % cfg.log_every == 0 or step == run.total_steps:
        lengths, mb = run.sampler.lengths, cfg.micro_batch_size
        tokens = sum(lengths[i] for i in batch.global_indices)
        pad = padding_fraction([batch.global_indices[i : i + mb] for i in range(0, len(batch.global_indices), mb)], lengths)
        mem = peak_memory(run.env.device)
        run.metrics.write({"step": step, "epoch": batch.epoch, "loss": result.loss, "lr": result.lr,
                           "grad_norm": result.grad_norm, "tokens_per_s": tokens / seconds, "padding": pad,
                           "mem_gib": mem})
        _say(run.env, f"step {step}/{run.total_steps} | loss {result.loss:.4f} | lr {result.lr:.2e} | "
                      f"{tokens / seconds:,.0f} tok/s | pad {100 * pad:.0f}% | mem {mem:.2f} GiB | eta {duration(eta)}")
    if cfg.eval_every and step % cfg.eval_every == 0 and step < run.total_steps:
        _evaluate(run)
    if cfg.save_every and step % cfg.save_every == 0:
        try:
            path = save_checkpoint(run.out, step, run.model, run.optimizer, run.scheduler, run.sampler,
                                   cfg.keep_checkpoints, run={**run.record, "metrics_rows": run.metrics.count})
        except CheckpointSaveError as e:
            raise TrainingStopped(str(e)) from None
        _say(run.env, f"saved {path}")
    if cfg.stop_after_step == step:
        sys.stdout.flush()
        os._exit(3)  # a crash, as far as the run can tell: no cleanup, no final save


def finish(run: Run, last: StepResult | None) -> dict:
    """The last evaluation, final/ in Hugging Face format (in the compute dtype) and
    loss.png. Returns the summary `train` returns.

    A LoRA run's final/ is a PEFT adapter (adapter_config.json, adapter_model.safetensors, the
    tokenizer) over its --init base, and --merge adds final-merged/, the base with the
    adapters folded in, in Hugging Face format."""
    val_loss = _evaluate(run)
    final = os.path.join(run.out, "final")
    summary = {"steps": run.step, "loss": last.loss if last else float("nan"), "val_loss": val_loss, "final": final}
    if run.lora:
        lora = run.lora
        save_lora_final(final, run.model, run.tokenizer,
                        adapter_config(run.base["base"], lora.rank, lora.alpha, lora.dropout, list(lora.targets)))
        _say(run.env, f"saved {final} (PEFT LoRA adapter over {run.base['base']})")
        if run.cfg.merge:
            summary["merged"] = os.path.join(run.out, "final-merged")
            save_final(summary["merged"], run.model, run.tokenizer, run.compute_dtype or torch.float32, lora.scaling)
            _say(run.env, f"saved {summary['merged']} (Hugging Face format, adapters merged)")
    else:
        save_final(final, run.model, run.tokenizer, run.compute_dtype or torch.float32)
        _say(run.env, f"saved {final} (Hugging Face format)")
    if run.env.is_main and not plot_loss(run.metrics.path, os.path.join(run.out, "loss.png")):
        print("note: matplotlib is not installed, so no loss.png (pip install matplotlib)", flush=True)
    return summary


def train(cfg: TrainConfig) -> dict:
    """Run the whole fine-tuning described by `cfg`; returns a summary dict
    {"steps", "loss", "val_loss", "final"}.

    Raises UsageError for anything the user can fix (flags, files, an offline Hub, a plan
    that does not fit in memory) and TrainingStopped for a non-finite loss.
    """
    cfg.validate()
    created = not dist.is_initialized()
    env = init_distributed(cpu_offload=cfg.cpu_offload)
    try:
        run = setup(cfg, env)
        if run.step == 0:
            _evaluate(run)
        batches, last = iter(run.sampler), None
        started, first = time.perf_counter(), run.step
        while run.step < run.total_steps:
            t0 = time.perf_counter()
            batch = next(batches)
            last = train_step(run, batch)
            now = time.perf_counter()
            eta = (now - started) / (run.step - first) * (run.total_steps - run.step)
            after_step(run, batch, last, now - t0, eta)
        return finish(run, last)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
