"""Dolly's supervised fine-tuning of a Pythia model, on one process or many (FSDP2).

    from minidolly.train import TrainConfig, train
    train(TrainConfig(size="70m", data="dolly.jsonl", max_steps=100))

One optimizer step consumes one global batch of --global-batch-size examples. Each rank runs
its share of the batch as micro-batches (forward, backward, gradients accumulate), then the
gradients are summed over ranks, clipped, and AdamW steps. The loss of a step is the mean
over every target token of the global batch: each micro-batch contributes
sum(token losses) / (target tokens in the whole global batch), a count every rank knows
from the global batch's indices, and FSDP sums (not averages) over ranks. So N ranks take
exactly the step one rank would, up to float summation order.

The run writes to --out: metrics.jsonl, checkpoints/step-XXXXXXXX/ (torch.distributed
.checkpoint, sharded, everything needed to resume exactly), final/ (Hugging Face format)
and loss.png. docs/training.md explains the loop, the sharding and the memory arithmetic.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from .checkpoint import DownloadError, load_model, resolve, save_model
from .config import ModelConfig
from .data import (
    IGNORE_INDEX,
    BatchSampler,
    collate,
    count_targets,
    load_records,
    padding_fraction,
    tokenize_records,
    train_val_split,
)
from .model import GPTNeoX
from .parallel import apply_activation_checkpointing, apply_compile, apply_fsdp, init_distributed, needs_fsdp
from .tokenizer import load_tokenizer

GiB = 2**30
SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("auto", "bf16", "fp32")


class UsageError(Exception):
    """A mistake the user can fix (a flag, a path, a file's content); the CLI prints the
    one-line message and exits 2."""


class TrainingStopped(RuntimeError):
    """The run stopped itself (a non-finite loss); the last checkpoint is intact."""


@dataclass
class TrainConfig:
    """Every knob of a run; `train.py --help` documents each flag of the same name.
    Defaults are Dolly v2's recipe (databrickslabs/dolly: lr 5e-6, 2 epochs, warmup 50 steps
    then constant (DeepSpeed WarmupLR), AdamW without weight decay, global batch 48)."""

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
    warmup_steps: int = 50
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
    skip_bad_records: bool = False
    resume: bool = False
    dry_run: bool = False
    world_size: int | None = None  # --dry-run only: plan for this many ranks
    device_memory: float | None = None  # --dry-run only: plan for GPUs of this many GiB
    stop_after_step: int | None = None  # tests: die like a crash right after this step

    def validate(self) -> None:
        """Raise UsageError naming the first flag whose value cannot work."""
        positive = ["max_length", "epochs", "global_batch_size", "micro_batch_size", "log_every", "keep_checkpoints"]
        at_least_zero = ["warmup_steps", "val_size", "eval_every", "save_every"]
        for name in positive + at_least_zero:
            value, low = getattr(self, name), 1 if name in positive else 0
            if not isinstance(value, int) or value < low:
                raise UsageError(f"--{_flag(name)} must be an integer >= {low}, got {value!r}.")
        for name, low in (("max_steps", 1), ("world_size", 1), ("stop_after_step", 1)):
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


def _size_key(size: str) -> str:
    return size.strip().lower().rsplit("/", 1)[-1].removeprefix("pythia-").removesuffix("-deduped")


def _hub_id(size: str) -> str:
    key = _size_key(size)
    return f"databricks/{key}" if key.startswith("dolly-v2-") else f"EleutherAI/pythia-{key}"


def resolve_sources(cfg: TrainConfig, *, offline: bool = False) -> Sources:
    """Work out the model config and where the weights and tokenizer come from.

    With `offline` (the dry run) a Hub id is never fetched: the shape comes from --size.
    Raises UsageError when --size and --init disagree, and lets DownloadError,
    FileNotFoundError and ValueError (bad config.json) through for the caller to word.
    """
    preset = ModelConfig.from_size(cfg.size) if cfg.size else None
    init = cfg.init or _hub_id(cfg.size)
    name = _size_key(cfg.size) if cfg.size else os.path.basename(os.path.normpath(init))
    if init == "scratch":
        return Sources(preset, "scratch", cfg.tokenizer or _hub_id(cfg.size), name)
    if offline and not os.path.isdir(os.path.expanduser(init)):
        if preset is None:
            raise UsageError(f"--init {init} is not a local directory; pass --size to plan without downloading it.")
        return Sources(preset, init, cfg.tokenizer or init, name)
    directory = resolve(init)
    config = ModelConfig.from_hf(directory)
    if preset is not None:
        shape = lambda c: (c.num_layers, c.hidden_size, c.num_heads)  # noqa: E731
        if shape(preset) != shape(config):
            raise UsageError(f"--init {init} has {config.num_layers} layers of width {config.hidden_size} but "
                             f"--size {cfg.size} has {preset.num_layers} of width {preset.hidden_size}; drop one of them.")
    return Sources(config, directory, cfg.tokenizer or directory, name)


# ----------------------------------------------------------------- memory plan


@dataclass
class MemoryPlan:
    """Bytes one rank needs, item by item, and whether they fit. `rows` are
    (what, where: "device" | "host", bytes, formula)."""

    rows: list[tuple[str, str, int, str]]
    device_budget: int
    host_budget: int
    device_name: str
    header: str
    skip_sync: bool
    note: str = ""

    def total(self, where: str) -> int:
        return sum(b for _, w, b, _ in self.rows if w == where)

    @property
    def fits(self) -> bool:
        return self.total("device") <= self.device_budget and self.total("host") <= self.host_budget

    def __str__(self) -> str:
        lines = [self.header, f"{'':2}{'per rank':<44}{'GiB':>9}  {'where':<7}formula"]
        for what, where, nbytes, formula in self.rows:
            lines.append(f"{'':2}{what:<44}{nbytes / GiB:>9.2f}  {where:<7}{formula}")
        for where, budget in (("device", self.device_budget), ("host", self.host_budget)):
            if self.total(where) or where == "device":
                verdict = "fits" if self.total(where) <= budget else "DOES NOT FIT"
                lines.append(f"  total on {where if where == 'host' else self.device_name}: "
                             f"{self.total(where) / GiB:.2f} GiB of {budget / GiB:.2f} GiB usable -> {verdict}")
        if self.note:
            lines.append(f"  {self.note}")
        return "\n".join(lines)


def _host_memory() -> int:
    """Bytes of RAM this machine can give (MemAvailable), shared by its local ranks."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan_memory(config: ModelConfig, cfg: TrainConfig, world_size: int, seq_len: int | None = None) -> MemoryPlan:
    """The per-rank memory of a run with these options (docs/training.md derives each formula).

    P parameters, N ranks, L layers, C hidden, V vocab, a bytes per compute element
    (2 bf16, 4 fp32), t = micro-batch x sequence tokens. FSDP keeps fp32 shards of
    parameters (4P/N), gradients (4P/N) and AdamW's two moments (8P/N); while a unit runs
    it holds its unsharded parameters and their gradients in compute dtype. A layer stores
    about 18·C·t activation elements for backward (LN inputs/outputs, q/k/v, attention
    output, the 4C MLP hidden before and after GELU); the head stores logits plus fp32
    log-probabilities and their gradient, t·V·(a+8) bytes.

    `seq_len`: the longest example (a real run knows it); default --max-length.
    The device budget is 95% of one GPU (or --device-memory GiB), or of this machine's
    available RAM split over its local ranks when computing on CPU.
    """
    cuda = torch.cuda.is_available() and cfg.device_memory is None
    gpu = cuda or cfg.device_memory is not None
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and gpu)
    a = 2 if bf16 else 4
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    host = _host_memory() // local_ranks
    if cfg.device_memory is not None:
        device_bytes, device_name = int(cfg.device_memory * GiB), f"a {cfg.device_memory:g} GiB GPU"
    elif cuda:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        device_bytes, device_name = props.total_memory, f"{props.name} ({props.total_memory / GiB:.1f} GiB)"
    else:
        device_bytes, device_name = host, f"CPU RAM ({host / GiB:.1f} GiB available to each of {local_ranks} local rank(s))"

    P, N, L = config.num_params(), world_size, config.num_layers
    C, V = config.hidden_size, config.vocab_size
    per_layer = (P - 2 * V * C - 2 * C) // L
    root = P - L * per_layer
    T = min(seq_len or cfg.max_length, cfg.max_length)
    t = cfg.micro_batch_size * T
    accumulation = cfg.global_batch_size // max(1, cfg.micro_batch_size * N)
    state_where = "host" if cfg.cpu_offload else "device"
    act = "a·t·C·(L + 18)" if cfg.activation_checkpointing else "18·a·t·C·L"
    act_bytes = a * t * C * (L + 18) if cfg.activation_checkpointing else 18 * a * t * C * L
    # One fp32 rank trains the plain module (`needs_fsdp`): whole fp32 tensors, no unsharded
    # copies, and gradients that accumulate in place.
    fsdp = needs_fsdp(N, torch.bfloat16 if bf16 else None, cfg.cpu_offload)
    kind = "fp32 shards" if fsdp else "fp32, whole"
    rows = [
        (f"parameters ({kind})", state_where, 4 * P // N, "4·P/N"),
        (f"gradients ({kind})", state_where, 4 * P // N, "4·P/N"),
        (f"AdamW exp_avg + exp_avg_sq ({kind})", state_where, 8 * P // N, "8·P/N"),
        *([("unsharded root + 2 layers, params + grads", "device", 2 * a * (root + 2 * per_layer),
            "2·a·(2·V·C + 2·P_layer)")] if fsdp else []),
        (f"activations, {'checkpointed ' if cfg.activation_checkpointing else ''}layers", "device", act_bytes, act),
        ("activations, logits + loss", "device", t * V * (a + 8), "t·V·(a + 8)"),
        ("CUDA context, allocator slack" if gpu else "runtime (libraries, buffers)", "device", GiB if gpu else GiB // 2, "1 GiB" if gpu else "0.5 GiB"),
    ]
    budget = int(0.95 * device_bytes)
    header = (f"Memory plan: pythia shape {L} layers x {C} wide, P = {P / 1e9:.2f}B parameters, "
              f"N = {N} rank(s), {'bf16' if bf16 else 'fp32'} compute (a = {a}), micro-batch {cfg.micro_batch_size} "
              f"x {T} tokens (t = {t}), activation checkpointing {'on' if cfg.activation_checkpointing else 'off'}, "
              f"CPU offload {'on' if cfg.cpu_offload else 'off'}, FSDP {'on' if fsdp else 'off (one fp32 rank)'}")
    plan = MemoryPlan(rows, budget, int(0.95 * host), device_name, header, skip_sync=False)
    if cfg.global_batch_size % (cfg.micro_batch_size * N):
        plan.note = (f"note: --global-batch-size {cfg.global_batch_size} is not a multiple of --micro-batch-size "
                     f"{cfg.micro_batch_size} x {N} ranks, so a real run would refuse it")
    elif accumulation > 1 and not fsdp:
        plan.note = f"gradients accumulate in place over {accumulation} micro-batches"
    elif accumulation > 1:
        # Skipping the reduce-scatter on all but the last micro-batch is faster but keeps a
        # whole unsharded fp32 gradient per rank until then; take it only where it fits.
        extra = ("unsharded gradients while accumulating (no sync)", state_where, 4 * P, "4·P")
        trial = dataclasses.replace(plan, rows=rows + [extra])
        if trial.fits:
            plan = dataclasses.replace(trial, skip_sync=True,
                                       note=f"gradient sync: on the last of {accumulation} micro-batches only")
        else:
            plan.note = (f"gradient sync: reduce-scatter after each of {accumulation} micro-batches "
                         f"(skipping it would need {4 * P / GiB:.1f} GiB more)")
    return plan


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
    Raises UsageError (on every rank) when rank 0 cannot read the checkpoint.
    """
    with torch.device("meta"):
        model = GPTNeoX(sources.config)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
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
                full = load_model(sources.init).state_dict()  # file dtype; each shard converts on copy
        except (ValueError, OSError) as e:
            error = str(e)
    error = _broadcast(error)
    if error:
        raise UsageError(error)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def build_optimizer(model, cfg: TrainConfig, total_steps: int):
    """AdamW with Dolly's betas/eps (HF defaults) and no weight decay on biases and LayerNorm
    weights (every 1-D parameter), fused, and the LambdaLR schedule: linear warmup over
    --warmup-steps (step s uses lr·(s+1)/warmup), then constant, cosine or linear decay to 0
    at the last step."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for the whole update instead of a loop over tensors (CUDA and CPU alike)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
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
    unembedded (`keep`): the prompt and the padding never reach the (C -> V) matmul.
    """
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX).to(device, non_blocking=True)  # (B, T)
    keep = targets != IGNORE_INDEX  # (B, T)
    logits = model(input_ids, keep=keep)  # (N, V), N = target tokens
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


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


# ----------------------------------------------------------------- checkpoints


def _broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def checkpoint_dirs(out: str) -> list[str]:
    """Complete checkpoints under <out>/checkpoints, oldest first (a `.tmp` is an
    interrupted save and never counts)."""
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if n.startswith("step-") and n[5:].isdigit()]
    return [os.path.join(root, n) for n in sorted(names, key=lambda n: int(n[5:]))]


def _train_state(step, scheduler, sampler) -> dict:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return {"train": {"step": step, "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict()},
            f"rng.rank{dist.get_rank()}": rng}


def save_checkpoint(out: str, step: int, model, optimizer, scheduler, sampler, keep: int) -> str:
    """Write a sharded DCP checkpoint of everything a resume needs: model and optimizer
    shards, scheduler, step, the sampler's position and each rank's RNG state.

    All ranks write into step-XXXXXXXX.tmp; after a barrier rank 0 renames it into place and
    deletes all but the newest `keep`. A crash mid-save leaves only a .tmp behind, which
    resume ignores, so the previous checkpoint stays the latest good one. Returns the path.
    """
    final = os.path.join(out, "checkpoints", f"step-{step:08d}")
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state, **_train_state(step, scheduler, sampler)},
             checkpoint_id=tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: str, model, optimizer, scheduler, sampler) -> int:
    """Restore a checkpoint written by `save_checkpoint` (any world size; RNG states only
    where the rank existed before). Returns the step it was taken after. Raises ValueError
    when the sampler's data, seed or global batch size differ from the checkpoint's."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state, **_train_state(0, scheduler, sampler)}
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    rng_key = f"rng.rank{dist.get_rank()}"
    if not any(k.startswith(rng_key + ".") for k in saved):
        del state[rng_key]
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    scheduler.load_state_dict(state["train"]["scheduler"])
    sampler.load_state_dict(state["train"]["sampler"])
    if rng_key in state:
        torch.set_rng_state(state[rng_key]["cpu"])
        if "cuda" in state[rng_key] and torch.cuda.is_available():
            torch.cuda.set_rng_state(state[rng_key]["cuda"])
    return int(state["train"]["step"])


def save_final(directory: str, model, tokenizer, dtype: torch.dtype) -> None:
    """Gather the full weights onto rank 0 (one tensor at a time, into host memory) and
    write them with the tokenizer in Hugging Face format."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        save_model(model, directory, state_dict={k: v.to(dtype) for k, v in full.items()})
        tokenizer.save(directory)
    dist.barrier()


# --------------------------------------------------------------------- metrics


def _read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss(metrics_path: str, png_path: str) -> bool:
    """Draw training and validation loss from metrics.jsonl. Returns False (and draws
    nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = _read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train")
    ax.plot([r["step"] for r in val_rows], [r["val_loss"] for r in val_rows], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over target tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return True


def _peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # Linux: KiB


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ------------------------------------------------------------------------ train


def dry_run(cfg: TrainConfig) -> MemoryPlan:
    """The memory plan for --size/--init, --world-size and the options, without touching
    data, weights or the network."""
    cfg.validate()
    try:
        sources = resolve_sources(cfg, offline=True)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    return plan_memory(sources.config, cfg, cfg.world_size or int(os.environ.get("WORLD_SIZE", 1)))


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
        return _train(cfg, env)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def _say(env, *lines) -> None:
    if env.is_main:
        print(*lines, sep="\n", flush=True)


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
        records, data_stats = load_records(cfg.data, skip_bad_records=cfg.skip_bad_records)
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


def _train(cfg: TrainConfig, env) -> dict:
    if cfg.cpu_offload and env.device.type != "cuda":
        raise UsageError("--cpu-offload moves GPU state to the host; there is no GPU here, so drop it.")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and env.device.type == "cuda")
    compute_dtype = torch.bfloat16 if bf16 else None  # None: compute in the fp32 parameters
    if cfg.compile and bf16 and env.device.type == "cpu":
        # torch 2.13's inductor emits C++ that does not compile for the bf16 layer backward
        raise UsageError("--compile with --precision bf16 fails inside torch.compile on CPU (an inductor bug); "
                         "use one of the two.")
    torch.manual_seed(cfg.seed)

    sources, tokenizer, train_set, val_set, sampler, stats = _read_inputs(cfg, env)
    lengths = sampler.lengths

    out = cfg.out or os.path.join("runs", f"dolly-{sources.name}")
    metrics_path = os.path.join(out, "metrics.jsonl")
    existing = checkpoint_dirs(out)
    if cfg.resume and not existing:
        raise UsageError(f"--resume: {out}/checkpoints holds no checkpoint; start without --resume.")
    if not cfg.resume and existing:
        raise UsageError(f"{out} holds checkpoints of an earlier run; pass --resume to continue it, "
                         f"or another --out (or delete the directory) to start afresh.")

    steps_per_epoch = sampler.steps_per_epoch
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    accumulation = cfg.global_batch_size // (cfg.micro_batch_size * env.world_size)
    plan = plan_memory(sources.config, cfg, env.world_size, seq_len=max(lengths))
    if not plan.fits:
        _say(env, str(plan))
        raise UsageError(f"This run does not fit in memory (plan above); try --activation-checkpointing, a smaller "
                         f"--micro-batch-size or --max-length, more ranks{', or --cpu-offload' if env.device.type == 'cuda' else ''}.")

    P = sources.config.num_params()
    _say(env,
         f"model: {sources.init if sources.init == 'scratch' else 'from ' + sources.init} "
         f"({P / 1e6:.1f}M parameters), tokenizer {sources.tokenizer}",
         f"data: {stats['path']}: {stats['records']} records -> {stats['examples']} examples "
         f"({stats['too_long']} longer than {cfg.max_length} tokens dropped), {len(train_set)} train / "
         f"{len(val_set)} validation",
         f"ranks: {env.world_size} x {env.device.type}, {'bf16' if bf16 else 'fp32'} compute; global batch "
         f"{cfg.global_batch_size} = {accumulation} micro-batches of {cfg.micro_batch_size} x {env.world_size} "
         f"rank(s); {total_steps} steps ({steps_per_epoch} per epoch)",
         f"memory: {plan.total('device') / GiB:.2f} GiB per rank planned on {plan.device_name}; {plan.note or 'no accumulation'}",
         f"output: {out}")

    model = build_model(sources, cfg, env.device, compute_dtype)
    optimizer, scheduler = build_optimizer(model, cfg, total_steps)
    step = 0
    if cfg.resume:
        try:
            step = load_checkpoint(existing[-1], model, optimizer, scheduler, sampler)
        except ValueError as e:
            raise UsageError(f"--resume from {existing[-1]}: {e}") from None
        _say(env, f"resumed from {existing[-1]} after step {step}")
    if env.is_main:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "train_config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
        # Rows after the checkpoint belong to steps that will now be run again.
        rows = [r for r in _read_metrics(metrics_path) if r["step"] <= step] if cfg.resume else []
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    def log(row: dict) -> None:
        if env.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    val_loss = None
    if step == 0 and val_set:
        val_loss = evaluate(model, val_set, cfg.micro_batch_size, tokenizer.pad_id, env.device)
        log({"step": 0, "val_loss": val_loss})
        _say(env, f"step 0/{total_steps} | val_loss {val_loss:.4f}")

    mb = cfg.micro_batch_size
    batches = iter(sampler)
    loss, started, timed_steps = float("nan"), time.perf_counter(), 0
    while step < total_steps:
        t0 = time.perf_counter()
        batch = next(batches)
        n_targets = count_targets([train_set[i] for i in batch.global_indices])
        total = torch.zeros((), dtype=torch.float64, device=env.device)
        for j, indices in enumerate(batch.micro_batches):
            if hasattr(model, "set_requires_gradient_sync"):  # an FSDP module
                model.set_requires_gradient_sync(j == len(batch.micro_batches) - 1 or not plan.skip_sync)
            micro = loss_sum(model, collate([train_set[i] for i in indices], tokenizer.pad_id), env.device) / n_targets
            micro.backward()
            total += micro.detach()
        dist.all_reduce(total)
        loss = total.item()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
        grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            last = checkpoint_dirs(out)
            what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
            raise TrainingStopped(f"The {what} at step {step + 1}; stopping without updating the weights. "
                                  f"The last checkpoint ({last[-1] if last else 'none yet'}) is intact; "
                                  f"try a lower --lr.")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        elapsed = time.perf_counter() - t0
        timed_steps += 1
        if step % cfg.log_every == 0 or step == total_steps:
            tokens = sum(lengths[i] for i in batch.global_indices)
            pad = padding_fraction([batch.global_indices[i : i + mb] for i in range(0, len(batch.global_indices), mb)], lengths)
            eta = (time.perf_counter() - started) / timed_steps * (total_steps - step)
            mem = _peak_memory(env.device)
            log({"step": step, "epoch": batch.epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                 "tokens_per_s": tokens / elapsed, "padding": pad, "mem_gib": mem})
            _say(env, f"step {step}/{total_steps} | loss {loss:.4f} | lr {lr:.2e} | {tokens / elapsed:,.0f} tok/s | "
                      f"pad {100 * pad:.0f}% | mem {mem:.2f} GiB | eta {_duration(eta)}")
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps and val_set:
            val_loss = evaluate(model, val_set, cfg.micro_batch_size, tokenizer.pad_id, env.device)
            log({"step": step, "val_loss": val_loss})
            _say(env, f"step {step}/{total_steps} | val_loss {val_loss:.4f}")
        if cfg.save_every and step % cfg.save_every == 0:
            path = save_checkpoint(out, step, model, optimizer, scheduler, sampler, cfg.keep_checkpoints)
            _say(env, f"saved {path}")
        if cfg.stop_after_step == step:
            sys.stdout.flush()
            os._exit(3)  # a crash, as far as the run can tell: no cleanup, no final save

    if val_set:
        val_loss = evaluate(model, val_set, cfg.micro_batch_size, tokenizer.pad_id, env.device)
        log({"step": step, "val_loss": val_loss})
        _say(env, f"step {step}/{total_steps} | val_loss {val_loss:.4f}")
    final = os.path.join(out, "final")
    save_final(final, model, tokenizer, compute_dtype or torch.float32)
    _say(env, f"saved {final} (Hugging Face format)")
    if env.is_main and not plot_loss(metrics_path, os.path.join(out, "loss.png")):
        print("note: matplotlib is not installed, so no loss.png (pip install matplotlib)", flush=True)
    return {"steps": step, "loss": loss, "val_loss": val_loss, "final": final}
