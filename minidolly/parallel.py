"""Parallelism applied to an unmodified GPTNeoX from outside, torchtitan style.

The model file knows nothing of this module. Here we

- start the process group (`init_distributed`): nccl on CUDA, gloo on CPU, and a one-rank
  group when the script was not launched by torchrun, so a single process runs the very same
  loop (collectives, DCP checkpoints) as a cluster;
- wrap each transformer layer in activation checkpointing (`apply_activation_checkpointing`);
- compile each layer with torch.compile (`apply_compile`);
- shard with FSDP2 (`apply_fsdp`): `fully_shard` on every layer, then on the root, which
  picks up what is left (embed_in, final_layer_norm, embed_out), when `needs_fsdp` says it
  has something to do.

Each FSDP unit all-gathers its parameters just before it runs and frees them right after,
so at any moment a rank holds 1/N of the model plus about two unsharded layers.

FSDP and the checkpoint wrapper are imported by the functions that apply them: FSDP pulls in
DTensor (a second or more), which the memory plan (`needs_fsdp`, `train.py --dry-run`) never needs.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class Distributed:
    """Where this process runs: its global rank, the world size, its local rank on the node,
    and the torch device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_minutes: float = 30, cpu_offload: bool = False) -> Distributed:
    """Join (or create) the default process group and pick this rank's device.

    Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) it joins the launcher's group; otherwise
    it creates a one-rank group in memory (a HashStore), so single-process training is simply
    FSDP on a world of one. Backend: nccl when CUDA is visible, else gloo. With `cpu_offload`
    on CUDA the group is "cuda:nccl,cpu:gloo": the offloaded shards live in host memory, and
    the collectives on them (loading the weights, the gradient norm, gathering the final
    weights) need a backend that takes CPU tensors; FSDP's own traffic stays on nccl.
    """
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = ("cuda:nccl,cpu:gloo" if cpu_offload else "nccl") if cuda else "gloo"
        timeout = datetime.timedelta(minutes=timeout_minutes)
        # device_id binds the group to this rank's GPU (without it every barrier warns that it guesses)
        device_id = device if cuda else None
        if "RANK" in os.environ:
            dist.init_process_group(backend, timeout=timeout, device_id=device_id)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout,
                                    device_id=device_id)
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, device)


def apply_activation_checkpointing(model: nn.Module, preserve_rng_state: bool = False) -> None:
    """Recompute each layer's activations in the backward pass instead of storing them:
    a layer then keeps only its input (B, T, C) alive between forward and backward, at the
    price of one more forward per layer (~33% more compute). GPT-NeoX draws no random
    numbers; a model that does (LoRA's dropout) needs `preserve_rng_state`, so that the
    recomputation draws what the forward drew."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, layer in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(layer, preserve_rng_state=preserve_rng_state)


def apply_compile(model: nn.Module) -> None:
    """torch.compile each transformer layer in place, torchtitan style: the layers are the
    same code, so they share one compiled graph (forward and backward), which fuses the
    elementwise work between the matmuls (LayerNorm, rotary, GELU, residual adds); the last
    layer, which also gathers the rows that have a target, gets a second one whose row count
    is dynamic. The data-dependent parts outside the layers (embedding, finding the target
    rows, the loss) stay eager. `Module.compile` keeps the module and its parameter names, so FSDP, checkpoints
    and state dicts see the same model. Apply after activation checkpointing, before FSDP."""
    for layer in model.layers:
        layer.compile()


def needs_fsdp(world_size: int, param_dtype: torch.dtype | None, cpu_offload: bool) -> bool:
    """FSDP gives us three things: sharding over ranks, mixed precision (bf16 compute over fp32
    master weights) and CPU offload. With one rank, fp32 compute and no offload it would give
    none of them and only cost: it still copies every parameter into its unsharded buffer and
    every gradient out of it, each step (about 20% of a CPU step). Then the plain module
    trains, as torchtitan does when its data-parallel shard degree is 1."""
    return world_size > 1 or param_dtype is not None or cpu_offload


def apply_fsdp(model: nn.Module, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype = torch.float32, cpu_offload: bool = False) -> nn.Module:
    """Shard `model` in place with FSDP2 over the default process group and return it.

    param_dtype: the dtype layers compute in (bf16 on GPU); the sharded master weights,
        gradients and optimizer state stay fp32. None computes in the parameters' dtype.
    reduce_dtype: the dtype gradients are reduce-scattered in.
    cpu_offload: keep sharded parameters, gradients and optimizer state in CPU memory;
        each layer is copied to the GPU only while it runs.

    Gradients are *summed* over ranks (divide factor 1), not averaged: the loop already
    divides each rank's summed token loss by the global batch's target-token count, so the
    sum is exactly the gradient of the global token-mean loss.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kwargs = dict(mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
                  offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    n = len(model.layers)
    for i, layer in enumerate(model.layers):
        # The last layer's parameters are needed again at once by backward: keep them.
        fully_shard(layer, reshard_after_forward=i < n - 1, **kwargs)
    fully_shard(model, **kwargs)
    for module in [*model.layers, model]:  # these setters act on one FSDP unit, not its children
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    return model
