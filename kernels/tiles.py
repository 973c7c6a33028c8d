"""Which tiles each GPU architecture runs, and whether a device can run the kernels at all.

A Triton kernel's tile sizes decide its speed, and whether it runs at all. Two budgets:

* registers: 64K 32-bit registers per SM and at most 255 per thread on every architecture
  here. A tile that needs more is "spilled" to local memory (off-chip, cached in L1), and
  a spill inside the inner loop costs more than a smaller tile would.
* shared memory: Triton stages the tiles that feed `tl.dot` through it, `num_stages`
  copies deep so the next loads overlap this step's math. The opt-in limit per block
  differs by architecture (ARCHS), and a kernel that asks for more fails at launch with
  OutOfResources.

So each architecture gets its own table. Every entry is compiled ahead of time for its
architecture by tests/test_kernels.py (through kernels/aot.py, no GPU needed; `python -m
kernels.aot --full` compiles every specialisation), which checks that ptxas spills no
registers and shared memory stays within the limit; the figures are in docs/kernels.md. Tiles are not autotuned on purpose: one configuration per
(architecture, head dim, precision) compiles once and is written down here.
"""

import os
from typing import NamedTuple

import torch

MAX_HEAD_DIM = 256
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KIB = 1024


class Arch(NamedTuple):
    gpus: str  # examples
    shared_memory: int  # opt-in shared memory per block, bytes (cudaDevAttrMaxSharedMemoryPerBlockOptin)
    tensor_cores: bool  # whether Triton 3.9 lowers tl.dot to tensor-core instructions here


# Compute capability (major * 10 + minor) -> what it offers. Shared memory from NVIDIA's CUDA
# C++ Programming Guide, "Compute Capabilities" table (227 KB on sm_90 is 232,448 bytes).
ARCHS = {
    75: Arch("T4, RTX 20xx", 64 * KIB, False),  # Triton 3.9 compiles tl.dot to FMA loops here
    80: Arch("A100, A30", 163 * KIB, True),  # mma.sync
    86: Arch("A10, A40, RTX 30xx", 99 * KIB, True),
    89: Arch("L4, L40S, RTX 40xx", 99 * KIB, True),
    90: Arch("H100, H200", 227 * KIB, True),  # wgmma
}
SAME_AS = {87: 80}  # Jetson Orin: sm_80's instructions and shared memory
INTERPRETER_ARCH = 90  # the tiles the CPU interpreter runs, so the tests walk the H100 tiling


class AttentionTiles(NamedTuple):
    """Launch settings of the three big attention kernels, each (rows, cols, warps, stages)."""

    fwd: tuple  # BLOCK_M queries per program, BLOCK_N keys per step
    dkdv: tuple  # BLOCK_M queries per step, BLOCK_N keys per program
    dq: tuple  # BLOCK_M queries per program, BLOCK_N keys per step


# arch -> {"16": fp16/bf16 entries, "32": fp32 entries}; each entry maps the widest BLOCK_D it
# serves to its tiles (head dims 32 and 64 share the 64 entry, 80 and 128 the 128 one). In
# each (rows, cols) the program's own tile is a multiple of the walk's step, which the
# kernels static_assert: the causal diagonal is then whole steps.
# Chosen by compiling candidates for each architecture (kernels/aot.py) and keeping, among
# those with no spill and shared memory within the limit, the largest tiles; on sm_86/89,
# with 99 KiB per SM, the smaller square tiles FlashAttention-2 measured fastest there.
# No timing went into them (no GPU was at hand): bench/kernels.py is how to revisit them.
_T = AttentionTiles
_FP32 = {  # true fp32 dots run on CUDA cores, and fp32 operands take twice the shared memory:
    # the fp32 path is for exactness, not speed, so small tiles (16 is tl.dot's minimum)
    64: _T((32, 32, 8, 1), (32, 32, 8, 1), (32, 32, 4, 1)),
    128: _T((16, 16, 4, 1), (16, 16, 8, 1), (16, 16, 4, 1)),
    256: _T((16, 16, 4, 1), (16, 16, 8, 1), (16, 16, 4, 1)),
}
_ATTENTION = {
    90: {  # wgmma wants 64-row tiles per warpgroup; 227 KiB lets the forward keep 3 stages at 128
        "16": {
            64: _T((128, 64, 8, 3), (32, 128, 8, 3), (128, 32, 8, 3)),
            128: _T((128, 64, 8, 3), (32, 128, 8, 2), (128, 32, 8, 3)),
            # 256: a 64 x 256 fp32 accumulator alone is 64 registers per thread at 8 warps
            256: _T((64, 32, 8, 2), (32, 32, 8, 3), (32, 32, 8, 3)),
        },
        "32": _FP32,
    },
    80: {  # mma.sync, 163 KiB: the sm_90 tiles, but dK/dV at 128 spilled with 32-query steps
        "16": {
            64: _T((128, 64, 8, 3), (32, 128, 8, 3), (128, 32, 8, 3)),
            128: _T((128, 64, 8, 3), (16, 128, 8, 3), (128, 32, 8, 3)),
            256: _T((64, 64, 8, 2), (32, 32, 8, 3), (32, 32, 8, 3)),
        },
        "32": {**_FP32, 128: _T((16, 16, 4, 1), (16, 16, 4, 1), (16, 16, 4, 1)),
               256: _T((16, 16, 4, 1), (16, 32, 8, 1), (16, 16, 4, 1))},
    },
    86: {  # 99 KiB per SM and per block: 64 x 64 at head dim 128, 2 stages
        "16": {
            64: _T((128, 64, 8, 2), (32, 128, 8, 3), (128, 32, 8, 3)),  # <= 48 KiB each: two programs per SM
            128: _T((64, 64, 4, 2), (64, 64, 8, 2), (64, 64, 8, 2)),
            256: _T((64, 32, 8, 2), (32, 32, 8, 2), (32, 32, 8, 2)),
        },
        "32": _FP32,
    },
    75: {"32": {64: _FP32[64], 128: _T((16, 16, 4, 1), (16, 16, 4, 1), (16, 16, 4, 1))}},  # no tensor cores from Triton 3.9; fp32 at 256 needs 65 KiB
}
_ATTENTION[89] = _ATTENTION[86]  # same shared memory and instructions for these kernels


# (arch, BLOCK_D) -> where torch's own ops measured faster than these tiles in fp16/bf16 on that
# architecture (bench/kernels.py on a real GPU). The default switch (use_kernels=None, `--kernels
# auto`) runs torch's ops there; `--kernels on` still runs ours. Attention and LayerNorm go
# together, and at head_dim 256 (pythia-1b, 2048 wide) the LayerNorm backward was slower too.
SLOWER = {
    (90, 256): "on an H200, SDPA's flash backend ran attention at head_dim 256 2.0-2.4x faster "
               "(bench/kernels.py, 2026-11-30)",
}


def slower_on_arch(arch, head_dim, dtype):
    """Why torch's ops are faster than the kernels on `arch` for head_dim and dtype, or None."""
    if dtype not in (torch.float16, torch.bfloat16):
        return None  # fp32 takes SDPA by default anyway; its kernels are the exact reference
    return SLOWER.get((arch, block_d(head_dim)))


def interpreting():
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def block_d(head_dim):
    """The tile width for a head dim: tl.arange needs a power of two and tl.dot an inner size >= 16."""
    return max(16, 1 << (head_dim - 1).bit_length())


def attention_tiles(head_dim, dtype, arch):
    """AttentionTiles for (head_dim, dtype) on compute capability `arch` (e.g. 80), or None
    where no configuration fits that architecture."""
    table = _ATTENTION.get(arch, {}).get("32" if dtype == torch.float32 else "16", {})
    width = block_d(head_dim)
    fits = [w for w in table if w >= width]
    return table[min(fits)] if fits else None


def arch_of(device):
    """The ARCHS key whose tiles `device` runs: its compute capability, INTERPRETER_ARCH on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return INTERPRETER_ARCH
    major, minor = torch.cuda.get_device_capability(device)
    cc = 10 * major + minor
    return SAME_AS.get(cc, cc)


def _shared_memory(device):
    """Opt-in shared memory per block on `device`, in bytes: what Triton checks a launch against."""
    props = torch.cuda.get_device_properties(device)
    if hasattr(props, "shared_memory_per_block_optin"):
        return props.shared_memory_per_block_optin
    import triton  # an older torch: triton's driver reads the same attribute

    index = device.index if device.index is not None else torch.cuda.current_device()
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def unsupported(device, head_dim=None, dtype=None):
    """Why the kernels cannot run on `device` (for this head dim and dtype, when given), as
    one sentence, or None when they can.

    The CPU needs the interpreter (TRITON_INTERPRET=1). A GPU needs an NVIDIA architecture
    in ARCHS with at least the shared memory its tiles were checked against, and tiles for
    the head dim and dtype.
    """
    device = torch.device(device)
    if head_dim is not None and head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} is above the {MAX_HEAD_DIM} they support"
    if dtype is not None and dtype not in DTYPES:
        return f"they support float32, float16 and bfloat16, not {dtype}"
    if device.type != "cuda":
        if interpreting():
            return None
        return f"tensors on {device} need a CUDA GPU, or TRITON_INTERPRET=1 for Triton's CPU interpreter"
    if torch.version.hip is not None:
        return "their tiles are chosen for NVIDIA GPUs and this is a ROCm build of torch"
    arch = arch_of(device)
    if arch not in ARCHS:
        known = ", ".join(f"sm_{a}" for a in ARCHS)
        return f"{_name(device)} has no tile table (there are tables for {known})"
    smem = _shared_memory(device)
    if smem < ARCHS[arch].shared_memory:
        return (f"{_name(device)} offers {smem // KIB} KiB of shared memory per block and sm_{arch}'s "
                f"tiles were checked against {ARCHS[arch].shared_memory // KIB} KiB")
    return unsupported_on_arch(arch, head_dim, dtype)


def unsupported_on_arch(arch, head_dim=None, dtype=None):
    """Why architecture `arch` (an ARCHS key) has no attention tiles for head_dim and dtype, or None."""
    gpu = f"sm_{arch} ({ARCHS[arch].gpus})"
    if dtype in (torch.float16, torch.bfloat16) and not ARCHS[arch].tensor_cores:
        return f"Triton 3.9 compiles no tensor-core code for {gpu}, so their {str(dtype)[6:]} attention would be slower than SDPA's"
    if head_dim is not None and dtype is not None and attention_tiles(head_dim, dtype, arch) is None:
        return f"no attention tiles for head_dim {head_dim} in {str(dtype)[6:]} fit {gpu} without register spills"
    return None


def _name(device):
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
