"""LoRA (Hu et al. 2021, "Low-Rank Adaptation of Large Language Models"), applied to an
unmodified GPTNeoX from outside, as FSDP is (minidolly/parallel.py).

Fine-tuning changes a pretrained weight W (out x in) by some ΔW. LoRA bets that the change a
task needs has low rank, and trains it as a product instead:

    y = x Wᵀ + b  +  (alpha / r) · dropout(x) Aᵀ Bᵀ         A: (r, in), B: (out, r), r << in

W and b stay frozen; only A and B train: r·(in + out) numbers instead of in·out. A starts
Kaiming-uniform and B at zero, so at step 0 the model is exactly the pretrained one, and the
scale alpha / r keeps the size of an update roughly independent of r.

    apply_lora(model, rank=16, alpha=32, dropout=0.05, targets=["query_key_value"])
    merge_lora(model)            # W += (alpha / r) · B A, then the plain nn.Linear again

Names line up with Hugging Face PEFT's (`peft/tuners/lora/layer.py`): the wrapper sits where the
nn.Linear was, keeps its `weight` and `bias`, and holds `lora_A` and `lora_B` as bias-free
nn.Linear modules. So `layers.0.attention.query_key_value.lora_A.weight` here is
`base_model.model.gpt_neox.layers.0.attention.query_key_value.lora_A.weight` in a PEFT
`adapter_model.safetensors` (minidolly/checkpoint.py does that rename), and the base weights
keep their Hugging Face names. We carry one adapter, not PEFT's dictionary of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig

# The linear layers of a GPT-NeoX block, by module name (PEFT matches these as name suffixes).
# The unembedding (embed_out) is left out, as PEFT's "all-linear" leaves out the output layer.
TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
DEFAULT_TARGETS = ("query_key_value",)  # PEFT's default for GPT-NeoX (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)


@dataclass(frozen=True)
class LoRAConfig:
    """What defines a LoRA run: the rank r, alpha (the update is scaled by alpha / r), the
    dropout on the adapters' input, and the names of the targeted modules."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def parse_targets(spec: str) -> list[str]:
    """`--lora-targets` -> module names: "all-linear" (every linear layer of the blocks, as
    PEFT's shorthand), or a comma list of names from TARGETS. Raises ValueError naming the
    unknown name and listing the valid ones."""
    if spec.strip().lower() == "all-linear":
        return list(TARGETS)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    for name in names:
        if name not in TARGETS:
            raise ValueError(f"--lora-targets: {name!r} is not a linear layer of a GPT-NeoX block; "
                             f"valid names are {', '.join(TARGETS)} (or all-linear).")
    if not names:
        raise ValueError(f"--lora-targets is empty; name one or more of {', '.join(TARGETS)} (or all-linear).")
    return sorted(set(names), key=TARGETS.index)


def target_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each target's nn.Linear in one block of `config`."""
    C, I = config.hidden_size, config.intermediate_size
    return {"query_key_value": (C, 3 * C), "dense": (C, C), "dense_h_to_4h": (C, I), "dense_4h_to_h": (I, C)}


def lora_parameter_count(config: ModelConfig, rank: int, targets: list[str]) -> int:
    """Trainable parameters of LoRA at `rank` on `targets` of every block: sum of r·(in + out)."""
    shapes = target_shapes(config)
    return config.num_layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


# ---------------------------------------------------------------- the wrapper


class LoRALinear(nn.Module):
    """An nn.Linear's frozen `weight` (out, in) and `bias`, plus a trainable low-rank update
    `lora_B(lora_A(dropout(x))) · scaling`. Built by `apply_lora` from the layer it replaces,
    whose parameters it takes over (same tensors, same names)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        # PEFT's choice: an Identity when there is no dropout, so it costs nothing
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kwargs = dict(bias=False, device=base.weight.device, dtype=dtype or base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, rank, **kwargs)  # weight (r, in)
        self.lora_B = nn.Linear(rank, self.out_features, **kwargs)  # weight (out, r)
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT's initialisation: A Kaiming-uniform (nn.Linear's own, a = √5), B zeros, so the
        update starts at 0."""
        if self.lora_A.weight.is_meta:  # built on meta: the values come with the state dict
            return
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out), the frozen path
        # adapters may be held in another dtype than the base (fp32 over a bf16 base)
        h = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))  # (..., r)
        return y + (self.lora_B(h) * self.scaling).to(y.dtype)  # (..., out)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha:g}"


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str],
               dtype: torch.dtype | None = None) -> list[str]:
    """Freeze every parameter of `model` and replace each nn.Linear whose name is in `targets`
    (its last component, e.g. "query_key_value") with a LoRALinear of `rank`, `alpha`,
    `dropout`. Apply it before activation checkpointing, compile and FSDP, as torchtitan
    orders its wrappers. The adapters are created in `dtype` (default: the base weight's)
    on the base weight's device, and initialised as PEFT does unless that is meta.

    Returns the qualified names of the wrapped modules. Raises ValueError for rank < 1,
    alpha <= 0, dropout outside [0, 1), or targets that match no nn.Linear.
    """
    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}.")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}.")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}.")
    model.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout, dtype))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"LoRA targets {', '.join(targets)} match no nn.Linear of the model.")
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of `model`, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


# ------------------------------------------------------------------- merging


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling · B A, computed in fp32 and returned in W's dtype: (out, in)."""
    return (weight.float() + scaling * (lora_B.float() @ lora_A.float())).to(weight.dtype)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put a plain nn.Linear back in its place,
    so the model is the unmodified network again (as PEFT's `merge_and_unload`); returns it.
    Its parameters stay frozen."""
    for name, lora in lora_modules(model).items():
        parent = model.get_submodule(name.rpartition(".")[0])
        weight = merged_weight(lora.weight, lora.lora_A.weight, lora.lora_B.weight, lora.scaling)  # a new tensor
        with torch.device("meta"):
            linear = nn.Linear(lora.in_features, lora.out_features, bias=lora.bias is not None)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if lora.bias is not None:
            linear.bias = lora.bias
        setattr(parent, name.rpartition(".")[2], linear)
    return model


def merge_state_dict(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A full state dict of a LoRA model (our names) -> the merged model's: each
    `X.weight` gets scaling · `X.lora_B.weight` `X.lora_A.weight` added, and the lora_ keys
    go. Tensors are replaced one at a time (a gathered state dict of a large model is large)."""
    for key in [k for k in state if k.endswith(".lora_A.weight")]:
        prefix = key.removesuffix(".lora_A.weight")
        state[f"{prefix}.weight"] = merged_weight(state[f"{prefix}.weight"], state.pop(key),
                                                  state.pop(f"{prefix}.lora_B.weight"), scaling)
    return state
