"""The memory plan of a training run: how many bytes one rank needs, item by item, and
whether they fit.

    plan = plan_memory(ModelConfig.from_size("12b"), cfg, world_size=8)
    print(plan); plan.fits

It is what `train.py --dry-run` prints and what every run checks before it builds anything,
so a run that cannot fit stops at once instead of dying of an out-of-memory error hours in.
This module is arithmetic on shapes and flags only: it allocates nothing, builds no model
and reads no file. It does not measure memory (the loop's `mem` column does that).
docs/training.md derives each formula.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .config import ModelConfig
from .lora import lora_parameter_count, target_shapes
from .parallel import needs_fsdp

if TYPE_CHECKING:
    from .train import TrainConfig

GiB = 2**30


@dataclass
class MemoryPlan:
    """Bytes one rank needs, item by item, and whether they fit.

    rows: (what, where: "device" | "host", bytes, formula).
    skip_sync: gradient accumulation may skip the reduce-scatter until the last micro-batch
        (it keeps an unsharded fp32 gradient, which the rows then include).
    activation_checkpointing: whether the plan checkpoints activations (a LoRA run's plan
        turns it on by itself when the run would not fit without it).
    left_out: what the rows do not count, one phrase each, printed under the totals.
    advice: for a plan that does not fit, how many ranks would make it fit.
    """

    rows: list[tuple[str, str, int, str]]
    device_budget: int
    host_budget: int
    device_name: str
    header: str
    skip_sync: bool
    note: str = ""
    left_out: list[str] = dataclasses.field(default_factory=list)
    activation_checkpointing: bool = False
    advice: str = ""

    def total(self, where: str) -> int:
        """Bytes planned on "device" or "host"."""
        return sum(b for _, w, b, _ in self.rows if w == where)

    @property
    def fits(self) -> bool:
        return self.total("device") <= self.device_budget and self.total("host") <= self.host_budget

    def __str__(self) -> str:
        lines = [self.header, f"{'':2}{'per rank':<48}{'GiB':>9}  {'where':<7}formula"]
        for what, where, nbytes, formula in self.rows:
            lines.append(f"{'':2}{what:<48}{nbytes / GiB:>9.2f}  {where:<7}{formula}")
        for where, budget in (("device", self.device_budget), ("host", self.host_budget)):
            if self.total(where) or where == "device":
                verdict = "fits" if self.total(where) <= budget else "DOES NOT FIT"
                lines.append(f"  total on {where if where == 'host' else self.device_name}: "
                             f"{self.total(where) / GiB:.2f} GiB of {budget / GiB:.2f} GiB usable -> {verdict}")
        if self.note:
            lines.append(f"  {self.note}")
        if self.advice:
            lines.append(f"  {self.advice}")
        lines += [f"  not counted: {what}" for what in self.left_out]
        return "\n".join(lines)


def host_memory() -> int:
    """Bytes of RAM this machine can give (MemAvailable), shared by its local ranks."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan_memory(config: ModelConfig, cfg: TrainConfig, world_size: int, seq_len: int | None = None,
                advise: bool = True) -> MemoryPlan:
    """The per-rank memory of a run of `config` with the options of `cfg` on `world_size` ranks.

    P parameters, N ranks, L layers, C hidden, V vocab, a bytes per compute element
    (2 bf16, 4 fp32), t = micro-batch x sequence tokens. FSDP keeps fp32 shards of
    parameters (4P/N), gradients (4P/N) and AdamW's two moments (8P/N); while a unit runs
    it holds its unsharded parameters and their gradients in compute dtype, plus the flat
    buffers of its collectives (below). A layer stores about 18·C·t activation elements for
    backward (LN inputs/outputs, q/k/v, attention output, the 4C MLP hidden before and after
    GELU); the head stores logits plus fp32 log-probabilities and their gradient, t·V·(a+8)
    bytes.

    A LoRA run (`cfg.lora_rank` >= 1) holds the frozen base in the compute dtype (a·P/N: no
    fp32 master, no gradient, no optimizer state) and the P_A adapter parameters like a full
    fine-tune holds all of them (16·P_A/N). Its layers store less: a frozen linear layer
    needs no input for a weight gradient, so a layer keeps 11·C elements per token plus, per
    adapted layer, its input (in features; twice with dropout, for the mask) and its r
    outputs. When such a run would not fit, the plan turns activation checkpointing on if
    that makes it fit (PEFT's k-bit recipe turns gradient checkpointing on by default).

    `seq_len`: the longest example (a real run knows it); default --max-length.
    The device budget is 95% of one GPU (or --device-memory GiB), or of this machine's
    available RAM split over its local ranks when computing on CPU.
    `advise`: for a plan that does not fit, find how many ranks would (`MemoryPlan.advice`).
    Returns the plan; never raises for a plan that does not fit (see `MemoryPlan.fits`).
    """
    plan = _plan(config, cfg, world_size, seq_len)
    lora = cfg.lora()
    if lora and not plan.fits and not cfg.activation_checkpointing:
        trial = _plan(config, dataclasses.replace(cfg, activation_checkpointing=True), world_size, seq_len)
        if trial.fits:
            note = (f"activation checkpointing: on, which this LoRA run needs (without it "
                    f"{plan.total('device') / GiB:.2f} GiB per rank)")
            return dataclasses.replace(trial, note=f"{trial.note}; {note}" if trial.note else note)
    if advise and not plan.fits:
        plan.advice = _ranks_needed(config, cfg, world_size, seq_len)
    return plan


def _ranks_needed(config: ModelConfig, cfg: TrainConfig, world_size: int, seq_len: int | None) -> str:
    """One line: the fewest ranks (up to 4096) on which the run fits, as it is or with
    activation checkpointing; or why no number of ranks does. Per-rank bytes fall as the
    ranks grow, so a doubling search then a bisection finds it."""
    options = [cfg] if cfg.activation_checkpointing else [cfg, dataclasses.replace(cfg, activation_checkpointing=True)]
    for option in options:
        fits = lambda n: _plan(config, option, n, seq_len).fits  # noqa: E731
        low, high = world_size, 2 * world_size  # low does not fit
        while high <= 4096 and not fits(high):
            low, high = high, 2 * high
        if high > 4096:
            continue
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (low, mid) if fits(mid) else (mid, high)
        with_ac = " with --activation-checkpointing" if option is not cfg else ""
        return f"needs: {high} ranks of {_plan(config, option, high, seq_len).device_name}{with_ac} (--world-size {high})"
    return ("needs: more than sharding can give: what every rank keeps whole (activations, logits, working set) "
            "does not fit at any world size; use --activation-checkpointing, a smaller --micro-batch-size or "
            "--max-length, or --lora-rank")


def _plan(config: ModelConfig, cfg: TrainConfig, world_size: int, seq_len: int | None) -> MemoryPlan:
    """plan_memory's arithmetic for exactly the options of `cfg`."""
    cuda = torch.cuda.is_available() and cfg.device_memory is None
    gpu = cuda or cfg.device_memory is not None
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and gpu)
    a = 2 if bf16 else 4
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    host = host_memory() // local_ranks
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
    root = P - L * per_layer  # both embeddings and the final LayerNorm: the root FSDP unit
    T = min(seq_len or cfg.max_length, cfg.max_length)
    t = cfg.micro_batch_size * T
    accumulation = cfg.global_batch_size // max(1, cfg.micro_batch_size * N)
    state_where = "host" if cfg.cpu_offload else "device"
    lora = cfg.lora()
    if lora:
        # elements a layer keeps per token with a frozen base (measured with saved_tensors_hooks)
        shapes = target_shapes(config)
        per_token = 11 * C + sum(shapes[x][0] * (2 if lora.dropout > 0 else 1) + lora.rank for x in lora.targets)
        coef = f"{per_token / C:.2f}·C"
    else:
        per_token, coef = 18 * C, "18·C"
    if cfg.activation_checkpointing:
        act, act_bytes = f"a·t·(C·L + {coef})", a * t * (C * L + per_token)
    else:
        act, act_bytes = f"a·t·L·{coef}", a * t * L * per_token
    # One fp32 rank trains the plain module (`needs_fsdp`): whole fp32 tensors, no unsharded
    # copies, no collectives, and gradients that accumulate in place.
    fsdp = needs_fsdp(N, torch.bfloat16 if bf16 else None, cfg.cpu_offload)
    kind = "fp32 shards" if fsdp else "fp32, whole"
    if lora:
        # Only the adapters train: they are what has fp32 masters, gradients, AdamW state and
        # a reduce-scatter; the base is held once, in the compute dtype.
        trained = lora_parameter_count(config, lora.rank, lora.targets)
        trained_layer = trained // L
        state_rows = [
            (f"frozen base weights ({'bf16' if bf16 else 'fp32'}{' shards' if fsdp else ', whole'})", state_where,
             a * P // N, "a·P/N"),
            (f"LoRA adapters ({kind}), P_A = {trained / 1e6:.2f}M", state_where, 4 * trained // N, "4·P_A/N"),
            (f"adapter gradients ({kind})", state_where, 4 * trained // N, "4·P_A/N"),
            (f"AdamW state of the adapters ({kind})", state_where, 8 * trained // N, "8·P_A/N"),
        ]
        unsharded = ("unsharded root + 2 layers (+ adapter grads)", "device",
                     a * (root + 2 * per_layer) + 4 * a * trained_layer, "a·(P_root + 2·P_layer) + 4·a·P_A/L")
        reduce = ("reduce-scatter input (fp32), a layer's adapters", "device", 4 * trained_layer, "4·P_A/L")
    else:
        trained = P
        state_rows = [
            (f"parameters ({kind})", state_where, 4 * P // N, "4·P/N"),
            (f"gradients ({kind})", state_where, 4 * P // N, "4·P/N"),
            (f"AdamW exp_avg + exp_avg_sq ({kind})", state_where, 8 * P // N, "8·P/N"),
        ]
        unsharded = ("unsharded root + 2 layers, params + grads", "device", 2 * a * (root + 2 * per_layer),
                     "2·a·(P_root + 2·P_layer)")
        # FSDP2's collective buffers, beside the unsharded parameters and gradients
        # (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py, torch 2.13):
        # - foreach_reduce copies a unit's compute-dtype gradients into one flat
        #   `reduce_scatter_input` of reduce_dtype (fp32 here: MixedPrecisionPolicy's
        #   reduce_dtype), 4·P_unit bytes, even on one rank. FSDPParamGroup.post_backward keeps
        #   it alive until the next unit's reduce (comm_ctx.reduce_scatter_states, at most
        #   `reduce_scatter_max_input_buffers` = 1), so one unit's is alive at a time. The largest
        #   unit is the root (both embeddings), whose reduce comes last, after the activations
        #   are freed: counting it beside them is an upper bound.
        # - foreach_all_gather gathers a unit into one flat `all_gather_output` in param_dtype,
        #   a·P_unit bytes, and copies it out into the unsharded parameters; the flat buffer is
        #   freed after the copy-out (in forward after the next unit's, for overlap). With one
        #   rank there is no all-gather (FSDPParamGroup.unshard copies the shard in place). At
        #   the activation peak (backward) it is one layer's.
        # The reduce-scatter output is the sharded gradient itself (counted above).
        reduce = ("reduce-scatter input (fp32), largest unit", "device", 4 * max(per_layer, root),
                  "4·max(P_layer, P_root)")
    collectives = []
    if fsdp:
        collectives.append(reduce)
        if N > 1:
            collectives.append(("all-gather output (compute dtype), one layer", "device", a * per_layer, "a·P_layer"))
    rows = [
        *state_rows,
        *([unsharded] if fsdp else []),
        *collectives,
        (f"activations, {'checkpointed ' if cfg.activation_checkpointing else ''}layers", "device", act_bytes, act),
        ("activations, logits + loss", "device", t * V * (a + 8), "t·V·(a + 8)"),
        ("CUDA context, allocator slack" if gpu else "runtime (libraries, buffers)", "device",
         GiB if gpu else GiB // 2, "1 GiB" if gpu else "0.5 GiB"),
    ]
    if lora:
        final = (f"writing final/: rank 0 gathers the adapters, 4·P_A = {4 * trained / 2**20:.1f} MiB"
                 + (f"; --merge gathers the whole model into host RAM, a·P + 4·P_A = {(a * P + 4 * trained) / GiB:.2f} GiB"
                    if cfg.merge else ""))
    else:
        final = f"writing final/: after training rank 0 gathers the whole model into host RAM, 4·P = {4 * P / GiB:.2f} GiB"
    left_out = [
        *(["NCCL's own buffers (allocated outside PyTorch; their size follows NCCL_BUFFSIZE, the channels "
           "and the peers) and allocator fragmentation, assumed to fit in the 1 GiB row"] if gpu else []),
        *(["FSDP's per-unit temporaries of 1/N of a unit (the compute-dtype copy of a shard before its "
           "all-gather, a reduce-scatter output added to accumulated gradients)"] if fsdp else []),
        final,
    ]
    budget = int(0.95 * device_bytes)
    header = (f"Memory plan: pythia shape {L} layers x {C} wide, P = {P / 1e9:.2f}B parameters, "
              f"N = {N} rank(s), {'bf16' if bf16 else 'fp32'} compute (a = {a}), micro-batch {cfg.micro_batch_size} "
              f"x {T} tokens (t = {t}), activation checkpointing {'on' if cfg.activation_checkpointing else 'off'}, "
              f"CPU offload {'on' if cfg.cpu_offload else 'off'}, FSDP {'on' if fsdp else 'off (one fp32 rank)'}"
              + (f", LoRA rank {lora.rank} on {', '.join(lora.targets)}" if lora else ""))
    plan = MemoryPlan(rows, budget, int(0.95 * host), device_name, header, skip_sync=False, left_out=left_out,
                      activation_checkpointing=cfg.activation_checkpointing)
    if cfg.global_batch_size % (cfg.micro_batch_size * N):
        plan.note = (f"note: --global-batch-size {cfg.global_batch_size} is not a multiple of --micro-batch-size "
                     f"{cfg.micro_batch_size} x {N} ranks, so a real run would refuse it")
    elif accumulation > 1 and not fsdp:
        plan.note = f"gradients accumulate in place over {accumulation} micro-batches"
    elif accumulation > 1:
        # Skipping the reduce-scatter on all but the last micro-batch is faster but keeps a
        # whole unsharded fp32 gradient of what trains per rank until then; take it only where it fits.
        extra = ("unsharded gradients while accumulating (no sync)", state_where, 4 * trained,
                 "4·P_A" if lora else "4·P")
        trial = dataclasses.replace(plan, rows=rows + [extra])
        if trial.fits:
            plan = dataclasses.replace(trial, skip_sync=True,
                                       note=f"gradient sync: on the last of {accumulation} micro-batches only")
        else:
            plan.note = (f"gradient sync: reduce-scatter after each of {accumulation} micro-batches "
                         f"(skipping it would need {4 * trained / GiB:.1f} GiB more)")
    return plan
