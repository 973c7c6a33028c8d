"""Triton kernels for minidolly: a fused LayerNorm and a causal flash attention.

    import kernels
    y = kernels.layer_norm(x, weight, bias, eps)        # == F.layer_norm(x, (N,), weight, bias, eps)
    o = kernels.flash_attention(q, k, v, causal=True)  # == F.scaled_dot_product_attention(..., is_causal=True)
    kernels.available(device, head_dim, dtype)         # can they run there?

Both run on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1).
The interpreter is slow and only for testing. See docs/kernels.md for how the kernels
work, what they save, and which tiles each GPU gets (kernels/tiles.py).

Importing this package is cheap and never fails: triton is imported, and the kernels are
defined, on first use of `layer_norm` or `flash_attention`. `triton.jit` decides between
compiled and interpreted kernels when it defines a kernel (ours, and triton.language's own
helpers such as tl.sum), so TRITON_INTERPRET must be set before triton is first imported;
importing `kernels` or `minidolly` does not import it (a test checks). Where triton is missing,
`available()` is False and calling a kernel raises RuntimeError.
"""

import functools
import importlib
import warnings

import torch

from kernels import tiles

__all__ = ["available", "unavailable_reason", "slower_reason", "layer_norm", "flash_attention", "FallbackWarning"]
_KERNELS = {"flash_attention": "kernels.attention", "layer_norm": "kernels.layernorm"}


class FallbackWarning(UserWarning):
    """Issued (once per reason) when a model wanted the kernels and uses torch's ops instead."""


@functools.cache
def _triton_error():
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return e
    return None


def __getattr__(name):  # PEP 562: `kernels.flash_attention` imports kernels/attention.py on first use
    if name not in _KERNELS:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    if _triton_error() is not None:
        def unavailable(*args, **kwargs):
            raise RuntimeError(f"minidolly's Triton kernels cannot run here: {_triton_error()}. "
                               "Install triton, or use the torch path (use_kernels=False).")
        return unavailable
    fn = getattr(importlib.import_module(_KERNELS[name]), name)
    globals()[name] = fn
    return fn


def unavailable_reason(device=None, head_dim=None, dtype=None):
    """Why the kernels cannot run on `device` for `head_dim` and `dtype`, or None if they can.

    Args:
        device: a torch.device or string; default the current CUDA device, else the CPU.
        head_dim, dtype: the attention head dim and compute dtype; None skips those checks.

    Returns:
        None, or one sentence: triton missing, a CPU without TRITON_INTERPRET=1, a GPU
        architecture without tiles or with less shared memory than they need, or no tiles
        for this head dim and dtype there (kernels/tiles.py).
    """
    if _triton_error() is not None:
        return f"triton cannot be imported ({_triton_error()})"
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return tiles.unsupported(device, head_dim, dtype)


_warned = set()
_decided = {}  # (device, head_dim, dtype, only_if_faster) -> the last eager answer, for torch.compile


def slower_reason(device, head_dim, dtype):
    """Why torch's ops are measured faster than the kernels on `device` for head_dim and dtype
    (kernels/tiles.py SLOWER), or None."""
    device = torch.device(device)
    if device.type != "cuda" or head_dim is None:
        return None
    return tiles.slower_on_arch(tiles.arch_of(device), head_dim, dtype)


def available(device=None, head_dim=None, dtype=None, warn=False, only_if_faster=False):
    """True when the kernels can run on `device` (for `head_dim` and `dtype`, when given).

    With `only_if_faster` (the default switch's question), also False where torch's ops were
    measured faster there (`slower_reason`). With `warn`, a False comes with a one-line
    FallbackWarning naming the reason, issued once per distinct reason in the process: the
    caller is about to use torch's ops instead.
    Under torch.compile it answers as the last eager call with the same arguments did (False
    if none did) rather than have Dynamo trace device queries and a warning, which would
    break a fullgraph compile.
    """
    key = (str(device), head_dim, dtype, only_if_faster)
    if torch.compiler.is_compiling():
        return _decided.get(key, False)
    reason = unavailable_reason(device, head_dim, dtype)
    if reason is None and only_if_faster:
        reason = slower_reason(device, head_dim, dtype)
    if reason is not None and warn and reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"minidolly's Triton kernels are off: {reason}; using torch's SDPA and F.layer_norm.",
                      FallbackWarning, stacklevel=2)
    _decided[key] = reason is None
    return reason is None
