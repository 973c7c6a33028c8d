"""Compile the kernels ahead of time for GPU architectures, on a machine without a GPU, and
report what ptxas gave each configuration: registers per thread, spilled bytes, shared memory.

    python -m kernels.aot                    # every architecture in kernels/tiles.py, a table
    python -m kernels.aot --arch 80 90 --full --json
    python -m kernels.aot --arch 90 --floats fp64   # float arguments as torch.compile passes them

How, with no GPU in sight:
1. The real launchers (attention._forward/_backward, layernorm._forward/_backward) run on
   small CPU tensors, with triton's active driver replaced by a stand-in that names the
   target GPU and triton's `jit_cache_hook` recording each launch (argument types, 16-byte
   alignment, constexprs, warps, stages) instead of compiling it. What is compiled below
   is therefore exactly what a launch on that GPU would compile, tiles included.
2. Each launch is compiled by `triton.compile(ASTSource(...), target=GPUTarget("cuda",
   arch, 32))`: Triton's compiler and ptxas ship in its wheel. Results land in Triton's
   cache (~/.triton/cache), so a second run takes seconds.
3. Shared memory is the compiled kernel's `metadata.shared`, the figure Triton checks a
   launch against. Registers and spills come from `cuobjdump -res-usage` on the cubin:
   REG, and STACK, the per-thread local memory ptxas spills registers into (the driver
   reports it as CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, which Triton calls n_spills * 4).

Triton's interpreter cannot compile, and `triton.jit` picks interpreted or compiled kernels
when it defines them, so this runs as its own process with TRITON_INTERPRET unset.
"""

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernels/aot.py compiles for GPUs; unset TRITON_INTERPRET (the interpreter cannot compile).")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import attention, layernorm, tiles  # noqa: E402

HEAD_DIMS = (32, 64, 80, 128, 256)  # every Pythia head dim
WIDTHS = (512, 2048, 5120, layernorm.MAX_HIDDEN)  # LayerNorm: Pythia's 70m, 1.4b, 12b widths, the largest allowed
T = 1000  # a ragged length (not a multiple of 16): the general case, every mask compiled


def cases(arch, full=False):
    """(name, launch) pairs: each launch runs the launchers for one case on CPU tensors.

    The default set (what the test compiles, about 150 kernels over five architectures):
    every head dim in bf16 (fp16 shares its tiles), causal (the model's case); the fp32
    tiles at the widest head dim the architecture's fp32 table serves (fp32 dots become
    FMA loops that take ptxas several seconds each); LayerNorm's forward and backward at
    each width class, and in fp32 at 5120 (autocast runs LayerNorm in fp32).
    `full` adds fp16, non-causal, fp32 at every head dim and LayerNorm in fp32 throughout.
    """
    out = []
    dtypes = [torch.bfloat16, torch.float16] if full else [torch.bfloat16]
    for dtype in dtypes:
        for causal in ([True, False] if full else [True]):
            for d in HEAD_DIMS:
                out.append((f"attention D={d} {str(dtype)[6:]}{'' if causal else ' full'}", _attention(d, dtype, causal, arch)))
    fp32_dims = [d for d in HEAD_DIMS if tiles.attention_tiles(d, torch.float32, arch) is not None]
    for d in (fp32_dims if full else fp32_dims[-1:]):
        out.append((f"attention D={d} float32", _attention(d, torch.float32, True, arch)))
    for n in WIDTHS:
        for dtype in ([torch.bfloat16, torch.float32] if full or n == 5120 else [torch.bfloat16]):
            out.append((f"layer_norm N={n} {str(dtype)[6:]}", _layer_norm(n, dtype)))
    return [(name, launch) for name, launch in out if launch is not None]


def _attention(d, dtype, causal, arch):
    if tiles.unsupported_on_arch(arch, d, dtype) is not None:
        return None

    def launch():
        q, k, v, do = (torch.zeros(1, 2, T, d, dtype=dtype) for _ in range(4))
        o, lse = attention._forward(q, k, v, causal, d**-0.5, arch=arch)
        attention._backward(do, q, k, v, o, lse, causal, d**-0.5, arch=arch)

    return launch


def _layer_norm(n, dtype):
    def launch():
        x = torch.zeros(64, n, dtype=dtype)
        w = torch.ones(n, dtype=dtype)
        y, mean, rstd = layernorm._forward(x, w, w, 1e-5)
        layernorm._backward(x, x, w, mean, rstd)

    return launch


class _StandIn:
    """Enough of a triton driver for a launch to reach the compile step for `arch`."""

    def __init__(self, arch):
        self.arch = arch

    def get_current_device(self):
        return self.arch  # one kernel cache per target in each JITFunction

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)


@contextlib.contextmanager
def _recording(arch, launches):
    def hook(*, fn, compile, **_):
        launches.append((fn.jit_function, compile))
        return True  # handled: do not compile, do not launch

    drivers = triton.runtime.driver
    previous = drivers._active  # reset_active() would build the real driver, which needs a GPU
    drivers.set_active(_StandIn(arch))
    triton.knobs.runtime.jit_cache_hook = hook
    try:
        yield
    finally:
        triton.knobs.runtime.jit_cache_hook = None
        drivers.set_active(previous)


def _resources(cubin):
    """(registers, spilled bytes) per thread from the cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    reg, stack, local = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out).groups()
    return int(reg), int(stack) + int(local)


def compile_arch(arch, full=False, floats="fp32"):
    """Every configuration the launchers use on `arch`, compiled: a list of dicts.

    `floats` types the float arguments (the softmax scale, LayerNorm's eps): "fp32" as
    Triton's own launcher passes a Python float, "fp64" as torch.compile's generated code
    passes it when a compiled model calls our kernels."""
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    rows, seen = [], set()
    for case, launch in cases(arch, full):
        launches = []
        with _recording(arch, launches):
            launch()
        for fn, spec in launches:
            constants = {fn.arg_names[i[0]]: v for i, v in spec["constants"].items()}
            key = (fn.__name__, json.dumps(spec["signature"]), repr(sorted(constants.items())),
                   spec["num_warps"], spec["num_stages"])
            if key in seen:  # e.g. the delta kernel is the same for causal and not
                continue
            seen.add(key)
            signature = {k: floats if t == "fp32" else t for k, t in spec["signature"].items()}  # "*fp32" stays
            src = ASTSource(fn, signature, spec["constants"], spec["configs"][0])
            start = time.perf_counter()
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]))
            regs, spill = _resources(compiled.asm["cubin"])
            tile = [constants[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_G", "BLOCK_COLS") if k in constants]
            rows.append(dict(arch=arch, case=case, kernel=fn.__name__, tile=tile, warps=spec["num_warps"],
                             stages=spec["num_stages"], registers=regs, spill_bytes=spill,
                             shared=compiled.metadata.shared, shared_limit=tiles.ARCHS[arch].shared_memory,
                             seconds=round(time.perf_counter() - start, 2),
                             mma="wgmma" if "wgmma" in compiled.asm["ptx"] else "mma" if "mma.sync" in compiled.asm["ptx"] else "-"))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(tiles.ARCHS), help="compute capabilities, e.g. 80 90")
    p.add_argument("--full", action="store_true", help="also fp16 and non-causal at every head dim")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    p.add_argument("--floats", choices=["fp32", "fp64"], default="fp32",
                   help="float arguments typed as Triton's launcher passes them (fp32) or torch.compile does (fp64)")
    p.add_argument("--jobs", type=int, default=min(len(os.sched_getaffinity(0)), 4), help="architectures compiled at once")
    args = p.parse_args(argv)
    unknown = [a for a in args.arch if a not in tiles.ARCHS]
    if unknown:
        p.error(f"--arch {unknown[0]}: kernels/tiles.py has tables for {', '.join(map(str, tiles.ARCHS))}")
    n = len(args.arch)
    with ProcessPoolExecutor(max(1, min(args.jobs, n))) as pool:
        rows = [r for part in pool.map(compile_arch, args.arch, [args.full] * n, [args.floats] * n) for r in part]
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'arch':<6}{'case':<28}{'kernel':<21}{'tile':<11}{'warps':>6}{'stages':>7}{'regs':>6}{'spill B':>8}"
          f"{'smem KiB':>10}{'limit':>7}{'mma':>7}")
    for r in rows:
        tile = "x".join(map(str, r["tile"]))
        print(f"sm_{r['arch']:<3}{r['case']:<28}{r['kernel']:<21}{tile:<11}{r['warps']:>6}{r['stages']:>7}{r['registers']:>6}"
              f"{r['spill_bytes']:>8}{r['shared'] / 1024:>10.1f}{r['shared_limit'] // 1024:>7}{r['mma']:>7}")


if __name__ == "__main__":
    main()
