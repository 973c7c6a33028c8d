"""Triton kernels for minidolly: a fused LayerNorm and a causal flash attention.

    from kernels import layer_norm, flash_attention
    y = layer_norm(x, weight, bias, eps)          # == F.layer_norm(x, (N,), weight, bias, eps)
    o = flash_attention(q, k, v, causal=True)    # == F.scaled_dot_product_attention(..., is_causal=True)

Both run on CUDA tensors, or on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1, set *before* triton is first imported: `triton.jit` reads it when
the kernels are defined). The interpreter is slow and only for testing. See
docs/kernels.md for how the kernels work and what they save.

Importing this package never fails for lack of triton (it is not available on every
platform); `available()` says whether the kernels can run, and calling them when they
cannot raises RuntimeError.
"""

import os

import torch

try:
    from kernels.attention import flash_attention
    from kernels.layernorm import layer_norm

    _IMPORT_ERROR = None
except ImportError as e:  # no triton here: keep `import kernels` working, fail on use
    _IMPORT_ERROR = e

    def _unavailable(*args, **kwargs):
        raise RuntimeError(f"minidolly's Triton kernels cannot run here: {_IMPORT_ERROR}. Install triton, or use the torch path.")

    layer_norm = flash_attention = _unavailable

__all__ = ["available", "layer_norm", "flash_attention"]


def available():
    """True when the Triton kernels can run in this process.

    That needs triton importable and either a CUDA device or the CPU interpreter
    (environment variable TRITON_INTERPRET=1).
    """
    if _IMPORT_ERROR is not None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
