"""Which matmul kernel should decode use on this CPU? Every candidate, timed at Pythia's linear shapes.

    python bench/quant_kernels.py                           # 410m and 1.4b shapes, batch 1 and 4
    python bench/quant_kernels.py --sizes 160m --batches 1 --no-compile --threads 1
    python bench/quant_kernels.py --kernels "bf16 compiled gemv" --weight-offsets 0 8 48   # where a weight starts

A decode step is a chain of (B, C) x (C, N) products against every weight matrix of the
model. For each Pythia size the script times each candidate kernel on the four block linears
(query_key_value, attention.dense, dense_h_to_4h, dense_4h_to_h) and on embed_out, and sums
them as one decode step meets them (layers x block linears + embed_out): the matmul time of
one step, whose inverse is the tokens/s that kernel allows at best. A decode step reads every
weight from memory, never from the cache (the model is larger than the L3), so each kernel
cycles through copies of its weight that fill --pool-mib, more than the L3 holds.
"GB/s" is the weight bytes a step reads over that time; "of mv" compares it with a torch.mv
bandwidth probe (fp32, a 256 MiB matrix) measured in the same run. Kernels
(minidolly/quantize.py uses the winners; docs/generation.md explains them):

    fp32 / bf16 / fp16 linear   F.linear in that dtype (MKL, oneDNN, or torch's own GEMV)
    bf16 linear, no oneDNN      F.linear in bf16 with oneDNN switched off: torch's own GEMV
    fp32 / bf16 onednn packed   the weight reordered once into oneDNN's blocked layout
    int8 fbgemm digits          fbgemm's int8 GEMM (VNNI) on the prepacked int8 weight, the fp32
                                activations as two int8 digits per row (minidolly's Int8Linear),
                                eager and through torch.compile ("compiled")
    int8 pack_mm                torch._weight_int8pack_mm: int8 weight, one scale per row
    int8 dequant                w.to(x.dtype), F.linear, times the scales (eager)
    int8 compiled               the same three ops through torch.compile (inductor C++)
    ... compiled gemv           quantize.gemv through torch.compile: x times the weight as stored,
                                summed per output row in inductor's own loop (DecodeLinear and
                                Int8Linear under generate(compile=True); batch 1 only there)
    int4 pack_mm gN             torch._weight_int4pack_mm_for_cpu, a scale and zero per N inputs
    int4 dequant g64            nibbles unpacked and dequantized, then F.linear (eager)
    int4 compiled g64           the same through torch.compile
    int4 template g64           torch._weight_int4pack_mm_for_cpu under torch.compile's
                                max-autotune with freezing: inductor times its own C++ WoQ-int4
                                GEMM template (AVX-512 or AMX micro-kernel) against torch's kernel
                                and keeps the faster; the template needs the weight as a frozen
                                constant, so each weight copy compiles its own graph
    int4 int-dot g64            q4_0's arithmetic written for inductor: the activations quantized
                                to int8 per row, times the nibbles in int32, summed per group,
                                scaled (torch.compile)
    int4 ebag g64               fbgemm's 4-bit embedding bag (quantized::embedding_bag_4bit_rowwise_offsets)
                                summing the weight's columns times the activations: a GEMV
                                whose 64-output pieces of a column carry their own scale
    int4 dyn_quant g64          torch._dyn_quant_matmul_4bit: activations quantized to int8 per
                                row, integer products with the nibbles (KleidiAI on Arm; a
                                reference loop on x86)
    torchao ...                 torchao's int8 / int4 weight-only Linear, when torchao is installed

Activations are fp32 ("/f32"), bf16 ("/bf16") or fp16 ("/fp16"). Each time is the median of
--repeats calls, the kernels interleaved call by call so that a neighbour's load hits them alike.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import types

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minidolly import quantize as Q  # noqa: E402
from minidolly.config import ModelConfig  # noqa: E402

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
SHORT = {FP32: "f32", BF16: "bf16", FP16: "fp16"}


def shapes(size: str) -> tuple[int, list[tuple[str, int, int]]]:
    """(layers, [(name, out_features N, in_features K)]) of one Pythia size."""
    c = ModelConfig.from_size(size)
    C, I = c.hidden_size, c.intermediate_size
    return c.num_layers, [("query_key_value", 3 * C, C), ("attention.dense", C, C), ("dense_h_to_4h", I, C),
                          ("dense_4h_to_h", C, I), ("embed_out", c.vocab_size, C)]


def candidates(W: torch.Tensor, compile: bool, group_sizes: list[int]) -> dict:
    """name -> (weights tuple, call(x, *weights), activation dtype, weight bytes) for W (N, K).
    Each kernel gets the weight in its own form (cast, reordered, quantized, packed) once."""
    N, K = W.shape
    out = {
        "fp32 linear": ((W,), F.linear, FP32, 4 * N * K),
        "bf16 linear": ((W.to(BF16),), F.linear, BF16, 2 * N * K),
        "fp16 linear": ((W.to(FP16),), F.linear, FP16, 2 * N * K),
    }
    out["bf16 linear, no oneDNN"] = ((W.to(BF16),), linear_without_onednn, BF16, 2 * N * K)
    onednn = lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")  # noqa: E731
    if torch.backends.mkldnn.is_available():
        out["fp32 onednn packed"] = ((torch.ops.mkldnn._reorder_linear_weight(W, Q.PACK_BATCH),), onednn, FP32, 4 * N * K)
    if Q.onednn_bf16_supported():
        out["bf16 onednn packed"] = ((torch.ops.mkldnn._reorder_linear_weight(W.to(BF16), Q.PACK_BATCH),), onednn, BF16, 2 * N * K)

    q8, s8 = Q.quantize_int8(W)
    if Q.fbgemm_int8_native():
        out["int8 fbgemm digits/f32"] = ((Q.Int8Linear(q8, s8, None, fbgemm=True),), lambda x, m: m(x), FP32, N * K)
        if compile:
            out["int8 fbgemm digits compiled/f32"] = ((Q.Int8Linear(q8, s8, None, fbgemm=True),),
                                                      torch.compile(lambda x, m: m(x), dynamic=False), FP32, N * K)
    for act in (FP32, BF16, FP16):
        out[f"int8 pack_mm/{SHORT[act]}"] = ((q8, s8.to(act)), torch._weight_int8pack_mm, act, N * K)
    dequant8 = lambda x, q, s: F.linear(x, q.to(x.dtype)) * s  # noqa: E731
    out["int8 dequant/bf16"] = ((q8, s8.to(BF16)), dequant8, BF16, N * K)
    if compile:
        compiled8 = torch.compile(dequant8, dynamic=False)
        for act in (FP32, BF16):
            out[f"int8 compiled/{SHORT[act]}"] = ((q8, s8.to(act)), compiled8, act, N * K)
        gemv = torch.compile(Q.gemv, dynamic=False)
        for name, act in (("fp32", FP32), ("bf16", BF16), ("fp16", FP16)):
            out[f"{name} compiled gemv"] = ((W.to(act),), gemv, act, W.to(act).nbytes)
        gemv8 = torch.compile(lambda x, q, s: Q.gemv(x, q) * s.float(), dynamic=False)
        out["int8 compiled gemv/f32"] = ((q8, s8), gemv8, FP32, N * K)

    def dequant4(x, nib, scale, zero):
        return F.linear(x, Q.dequantize_int4(nib, scale, zero, 64).to(x.dtype))

    for g in group_sizes:
        if K % g:
            continue
        nibbles, scale, zero = Q.quantize_int4(W, g)
        packed, nbytes = Q.pack_int4(nibbles), N * K // 2 + 2 * scale.nbytes
        for act in (FP32, BF16, FP16):
            out[f"int4 pack_mm g{g}/{SHORT[act]}"] = (
                (packed, Q.scales_and_zeros(scale, zero, act)),
                lambda x, p, sz, g=g: torch._weight_int4pack_mm_for_cpu(x, p, g, sz), act, nbytes)
        if g == 64:
            out["int4 dequant g64/bf16"] = ((nibbles, scale, zero), dequant4, BF16, nbytes)
            out.update(dyn_quant_candidate(nibbles, scale, g, nbytes))
            out.update(embedding_bag_candidate(W, g))
            if compile:
                compiled4 = torch.compile(dequant4, dynamic=False)
                for act in (FP32, BF16):
                    out[f"int4 compiled g64/{SHORT[act]}"] = ((nibbles, scale, zero), compiled4, act, nbytes)
                int_dot = torch.compile(int4_integer_dot, dynamic=False)
                out["int4 int-dot g64/f32"] = ((nibbles, scale, zero), int_dot, FP32, nbytes)
                out["int4 template g64/bf16"] = ((Int4Template(packed, Q.scales_and_zeros(scale, zero, BF16), g),),
                                                 lambda x, m: m(x), BF16, nbytes)
    out.update(torchao_candidates(W))
    return out


def int4_integer_dot(x, nibbles, scale, zero, group_size=64):
    """x (B, K) @ the int4 weight, as q4_0 computes it: x quantized to int8 per row (scale
    s; the first of Int8Linear's two digits), each group's integer dot product with the
    nibbles, then scale * s * dot + zero * sum(x)."""
    B, K = x.shape
    N, G, half = nibbles.shape[0], K // group_size, group_size // 2
    digits, s = Q.int8_digits(x)  # (2B, K): the first B rows are round(x / s), s (B, 1)
    xq = digits[:B].to(torch.int32).view(B, 1, G, half, 2)  # (B, 1, G, g/2, 2): pairs of a byte
    w = nibbles.view(1, N, G, half)  # (1, N, G, g/2): q[2j] high, q[2j+1] low
    dot = ((w >> 4).to(torch.int32) * xq[..., 0] + (w & 15).to(torch.int32) * xq[..., 1]).sum(-1, dtype=torch.int32)
    dot = dot - 8 * xq.sum((-1, -2), dtype=torch.int32)  # (B, N, G): sum of (q - 8) x
    group_sums = x.view(B, 1, G, group_size).sum(-1)  # (B, 1, G)
    return (dot.float() * (scale.float() * s[..., None]) + zero.float() * group_sums).sum(-1)  # (B, N)


def dyn_quant_candidate(nibbles: torch.Tensor, scale: torch.Tensor, group_size: int, nbytes: int) -> dict:
    """torch._dyn_quant_matmul_4bit on our nibbles, swapped into the order its packing reads
    (q[2j] in the low, q[2j+1] in the high nibble). Its kernel is symmetric, (q - 8) * scale:
    no zeros, so its output differs from the others' by the zeros' term, which does not change
    its speed. Skipped with a note where this torch build turns it down."""
    N, K = nibbles.shape[0], 2 * nibbles.shape[1]
    try:
        packed = torch.ops.aten._dyn_quant_pack_4bit_weight((nibbles >> 4) | (nibbles << 4), scale.float(), None,
                                                            group_size, K, N)
    except (RuntimeError, NotImplementedError) as e:
        print(f"  (int4 dyn_quant skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]})")
        return {}
    mm = lambda x, w: torch.ops.aten._dyn_quant_matmul_4bit(x, w, group_size, K, N)  # noqa: E731
    return {f"int4 dyn_quant g{group_size}/f32": ((packed,), mm, FP32, nbytes)}


def embedding_bag_candidate(W: torch.Tensor, group_size: int) -> dict:
    """fbgemm's 4-bit embedding bag as a matrix-vector product: y = sum_k x_k W[:, k] is a bag
    of W's columns weighted by x. The table's rows are pieces of `group_size` outputs of one
    column, each with its own fp16 scale and offset (group-wise along the outputs, not the
    inputs: another quantization than ours, the same 4.5 bits a weight at 64), laid out so
    that bag n / group_size reads its K rows one after another; fbgemm's JIT-compiled AVX-512
    loop dequantizes each row and accumulates it times its activation in fp32."""
    N, K = W.shape
    g = group_size
    if N % g:
        return {}
    rows = W.reshape(N // g, g, K).transpose(1, 2).reshape(N // g * K, g)  # row j*K + k: W[j*g:(j+1)*g, k]
    table = torch.ops.quantized.embedding_bag_4bit_prepack(rows.contiguous())  # (N/g * K, g/2 + 4) uint8
    index = torch.arange(N // g * K, dtype=torch.int32)

    def bag(x, table):  # x (B, K) -> (B, N): B * N/g bags of K rows each
        B = x.shape[0]
        weights = x.repeat_interleave(N // g, dim=0).reshape(-1)  # (B * N/g * K,): bag (b, j) weighs by x[b]
        offsets = torch.arange(0, B * N // g * K + 1, K, dtype=torch.int32)
        y = torch.ops.quantized.embedding_bag_4bit_rowwise_offsets(
            table, index.repeat(B), offsets, False, 0, False, weights, None, True)
        return y.reshape(B, N)

    return {f"int4 ebag g{g}/f32": ((table,), bag, FP32, table.nbytes)}


class Int4Template(torch.nn.Module):
    """One int4 weight through torch.compile(mode="max-autotune") with freezing (see the
    docstring's "int4 template"). The template needs the weight as a constant, so each copy
    (`clone`) compiles a graph of its own, from a code object of its own: Dynamo keeps one
    cache per code object, and one cache holding every copy's graph would be searched on
    every call."""

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros)
        self.group_size, self.warm = group_size, False
        code = _int4_template_mm.__code__.replace()  # a new code object, the same code
        self.compiled = torch.compile(types.FunctionType(code, globals(), "int4_template_mm", (self,)),
                                      mode="max-autotune-no-cudagraphs", dynamic=False)

    @torch.no_grad()
    def forward(self, x):
        if not self.warm:  # freezing matters while compiling (the first call) only
            self.warm = True
            with inductor_config.patch(freezing=True):
                return self.compiled(x)
        return self.compiled(x)

    def __deepcopy__(self, memo):
        return Int4Template(self.packed.clone(), self.scales_zeros.clone(), self.group_size)


def _int4_template_mm(x, m):
    return torch._weight_int4pack_mm_for_cpu(x, m.packed, m.group_size, m.scales_zeros)


def linear_without_onednn(x, w):
    """F.linear with oneDNN switched off: bf16 then takes torch's own GEMV/GEMM (cpublas)."""
    with torch.backends.mkldnn.flags(enabled=False):
        return F.linear(x, w)


def torchao_candidates(W) -> dict:
    """torchao's weight-only int8 and int4 nn.Linear (bf16 activations), if torchao is installed."""
    try:
        import torchao.quantization as tq
    except ImportError:
        return {}
    N, K = W.shape
    found = {}
    for name, config, nbytes in (("torchao int8/bf16", lambda: tq.Int8WeightOnlyConfig(), N * K),
                                 ("torchao int4 g64/bf16", lambda: tq.Int4WeightOnlyConfig(group_size=64), N * K // 2)):
        try:
            lin = torch.nn.Linear(K, N, bias=False, dtype=BF16)
            lin.weight.data.copy_(W)
            tq.quantize_(lin, config())
            lin(torch.randn(1, K, dtype=BF16))
            found[name] = ((lin,), lambda x, m: m(x), BF16, nbytes)
        except Exception as e:  # a torchao/torch version pair that does not fit: say so, go on
            print(f"  ({name} skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]})")
    return found


def copies(weights: tuple, nbytes: int, pool_bytes: int, offset: int | None = None) -> list[tuple]:
    """Enough copies of `weights` to fill `pool_bytes` (at least two); with an offset, each
    tensor placed `offset` bytes past a 64-byte boundary (see clone)."""
    n = max(2, -(-pool_bytes // nbytes))
    first = weights if offset is None else tuple(clone(w, offset) for w in weights)
    return [first] + [tuple(clone(w, offset) for w in weights) for _ in range(n - 1)]


def clone(w, offset: int | None = None):
    """A copy of a weight tensor or module. With an offset, a plain contiguous tensor is copied
    into a buffer of its own, `offset` bytes past the buffer's start (which torch aligns to 64
    bytes), as a tensor read from a safetensors file starts wherever the file's header ended."""
    if isinstance(w, torch.nn.Module):
        return copy.deepcopy(w)
    if offset is None or w.layout != torch.strided or not w.is_contiguous():  # oneDNN's packed weights among them
        return w.clone()
    e = w.element_size()
    if offset % e:
        raise ValueError(f"a {w.dtype} weight cannot start {offset} bytes past a boundary")
    buffer = torch.empty(w.numel() + (offset + 64) // e, dtype=w.dtype)
    start = (-(buffer.data_ptr() % 64) % 64 + offset) // e
    placed = buffer[start : start + w.numel()].view(w.shape)
    placed.copy_(w)
    return placed


def time_all(calls: dict[str, list], repeats: int) -> dict[str, float]:
    """Median seconds of each kernel; calls[k] is a list of zero-argument functions (one per
    weight copy) called in turn, the kernels interleaved call by call."""
    for fs in calls.values():  # warm up every copy: first calls allocate, compile, pack (oneDNN's
        for f in fs:             # int8 GEMM also prepares each weight at its first call), as a
            f()                  # decode step's modules are warm after the first token
    times = {k: [] for k in calls}
    for r in range(repeats):
        for k, fs in calls.items():
            start = time.perf_counter()
            fs[r % len(fs)]()
            times[k].append(time.perf_counter() - start)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def mv_bandwidth(repeats: int) -> float:
    """GB/s of torch.mv on a 256 MiB fp32 matrix."""
    W, x = torch.randn(8192, 8192), torch.randn(8192)
    return W.nbytes / time_all({"mv": [lambda: torch.mv(W, x)]}, repeats)["mv"] / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["410m", "1.4b"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    p.add_argument("--group-sizes", nargs="+", type=int, default=[32, 64, 128, 256])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (each compiles per shape)")
    p.add_argument("--kernels", nargs="+", default=None, help="only the kernels whose names contain one of these")
    p.add_argument("--weight-offsets", nargs="+", type=int, default=None,
                   help="time each kernel with its weight tensors copied this many bytes (a multiple of 4) past "
                        "a 64-byte boundary, one row per offset (\"@8\" in the name); modules and oneDNN's "
                        "packed weights stay where torch puts them")
    p.add_argument("--pool-mib", type=int, default=128,
                   help="each kernel cycles through copies of its weight filling this much memory (> the L3 cache)")
    args = p.parse_args()
    if args.weight_offsets and any(o < 0 or o % 4 for o in args.weight_offsets):
        p.error("--weight-offsets are bytes past a boundary: multiples of 4, 0 or more")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch._dynamo.config.recompile_limit = 1024  # one compiled function serves every shape and dtype
    print(f"CPU: {Q.cpu_description()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}, "
          f"weights cycled through {args.pool_mib} MiB, {'no compile' if args.no_compile else 'with torch.compile rows'}")
    bw = mv_bandwidth(args.repeats)
    print(f"torch.mv fp32 bandwidth probe: {bw:.1f} GB/s")
    for size in args.sizes:
        layers, mats = shapes(size)
        total = {B: {} for B in args.batches}
        weight_bytes = {}
        for name, N, K in mats:
            fns = candidates(torch.randn(N, K) * K**-0.5, not args.no_compile, args.group_sizes)
            if args.kernels:  # fp32 stays: it is the baseline of the ratio
                fns = {k: v for k, v in fns.items() if k == "fp32 linear" or any(f in k for f in args.kernels)}
            reps = 1 if name == "embed_out" else layers
            offsets = args.weight_offsets or [None]
            named = {(k if o is None else f"{k} @{o}"): (k, o) for k in fns for o in offsets}
            pools = {n: copies(fns[k][0], fns[k][3], args.pool_mib * 2**20, o) for n, (k, o) in named.items()}
            for n, (k, _) in named.items():
                weight_bytes[n] = weight_bytes.get(n, 0) + reps * fns[k][3]
            for B in args.batches:
                x = torch.randn(B, K)
                calls = {n: [lambda w=w, f=fns[k][1], x=x.to(fns[k][2]): f(x, *w) for w in pools[n]]
                         for n, (k, _) in named.items()}
                for k, t in time_all(calls, args.repeats).items():
                    total[B][k] = total[B].get(k, 0.0) + reps * t
            del fns, pools
        for B in args.batches:
            base = total[B]["fp32 linear" if args.weight_offsets is None else f"fp32 linear @{args.weight_offsets[0]}"]
            print(f"\npythia-{size}, batch {B}: matmul time of one decode step ({layers} layers x 4 linears + embed_out)")
            print(f"{'kernel':<28}{'ms/step':>9}{'tok/s':>8}{'GB/s':>7}{'of mv':>7}{'vs fp32':>9}")
            for k in sorted(total[B], key=total[B].get):
                gbs = weight_bytes[k] / total[B][k] / 1e9
                print(f"{k:<28}{total[B][k] * 1e3:>9.2f}{B / total[B][k]:>8.1f}{gbs:>7.1f}{gbs / bw:>7.0%}"
                      f"{base / total[B][k]:>8.2f}x")
        print(f"torch.mv probe again: {mv_bandwidth(args.repeats):.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
