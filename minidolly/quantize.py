"""Weight-only quantization (int8, int4, fp16, bf16) and the 16-bit CPU path, applied to a model from outside.

    from minidolly import load_model
    model = load_model("databricks/dolly-v2-3b", quantize="int4")   # or quantize_model(model, "int4")

Why it pays: a decode step multiplies one token's activations by every weight matrix once, so
its time is the time to read the weights (docs/generation.md, "What a token costs"). Storing
them in 8 or 4 bits reads 4x or 8x fewer bytes than fp32, and the step is that much faster as
long as the kernel unpacks them no slower than memory delivers them.

    int8   one scale per output row (per channel): w ≈ q * scale[n], q in [-127, 127]
    int4   a scale and a zero per row and per group of `group_size` inputs (group-wise):
           w ≈ (q - 8) * scale[n, g] + zero[n, g], q in [0, 15]
    fp16   the weight rounded to float16, no scales (llama.cpp's f16): half of fp32's bytes
    bf16   with the activations left in fp32, where a whole-model bf16 or fp16 (--dtype)
           rounds them too (Weight16Linear; docs/generation.md, "The 16-bit quality gap");
           fp16 keeps 11 significant bits, bf16 8 but decodes faster (its convert is a shift)

Only the weight matrices of the linear layers (the four of every block and embed_out) are
quantized (an int4 model keeps embed_out in int8: layer_mode). Activations stay in the model's
dtype (fp32 by default on CPU, or bf16) between the layers; what each kernel does with them is
below. What stays in full precision, and why:
    embed_in    a decode step reads one row of it per token, so its bytes cost memory, never
                time; and generation takes the activation dtype and device from it.
    LayerNorms, biases   O(hidden) numbers per layer: nothing to save, and the LayerNorm gain
                sets the scale of everything after it.

The kernels are PyTorch's own, chosen per device and CPU by measurement (bench/quant_kernels.py,
bench/generate.py, docs/generation.md):
    CPU   int8, on x86 CPUs whose fbgemm multiplies int8 exactly (VNNI, AMX; fbgemm_int8_native):
          fbgemm's int8 GEMM (the kernel of torch's x86 quantization backends) on a weight it
          packed once, the activations written as two int8 digits (int8_digits), fp32 out;
          elsewhere torch._weight_int8pack_mm with bf16 activations, or inductor's `gemv` loop
          in a compiled batch-1 decode step.
          int4: torch._weight_int4pack_mm_for_cpu on weights repacked once by
          torch._convert_weight_to_int4pack_for_cpu (a layout of the CPU's vector width), with
          bf16 activations (cast at the kernel, the result cast back): with fp32 or fp16 it is
          50x slower.
          fp16, bf16: inductor's `gemv` loop in a compiled batch-1 decode step (fp32 activations
          times the 16-bit weight converted in registers); eager, torch's 16-bit GEMV at batch 1
          and, for prompts and batches, fp32 GEMMs on slices of rows converted one at a time.
    CUDA  int8: w.to(x.dtype) then F.linear, times the scales (torch.compile fuses the three,
          as gpt-fast does), and fp16 / bf16 likewise; int4: torch._weight_int4pack_mm (tinygemm) on
          weights repacked by torch._convert_weight_to_int4pack.
Each module also has a canonical, device-independent form (its state_dict), which is what
minidolly/checkpoint.py writes: int8 rows as they are, int4 as two nibbles a byte with the
scales and zeros as (out_features, in_features / group_size) tensors, fp16 / bf16 rows as they are.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # opaque objects as custom-op arguments (FbgemmWeight), in recent torch (2.13 has them)
    from torch._library.opaque_object import get_opaque_type_name, register_opaque_type
    from torch._opaque_base import OpaqueBase
except ImportError:  # an older torch: int8 keeps its other kernels (fbgemm_int8_native() is False)
    OpaqueBase = None

MODES = ("int8", "int4", "fp16", "bf16")
WEIGHT16 = {"fp16": torch.float16, "bf16": torch.bfloat16}  # the 16-bit weight-only modes
GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 kernels accept, on CPU and CUDA
DEFAULT_GROUP_SIZE = 64
FORMAT_VERSION = 1  # of the quantized checkpoint layout above; checkpoint.py refuses others
INT4_ROWS = 64  # CPU int4 kernels work on blocks of 64 output rows; shorter layers are padded
EXACT_TOP_K = 32  # logits an int8 embed_out recomputes in fp32 (Int8Linear)
PACK_BATCH = 16  # the batch OneDNNLinear tells oneDNN to lay its weight out for (see there)
GEMV_ROWS = 1  # under torch.compile on CPU, products with this many input rows run as `gemv` (see there)
CONVERT_FLOATS = 2**19  # Weight16Linear converts this many weights at a time to fp32 for an eager CPU GEMM (2 MB)


class QuantizationError(ValueError):
    """A quantization setting that cannot apply to this model (mode, group size, shape)."""


# ----------------------------------------------------------------- the numbers


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w (N, K) -> (q int8 (N, K), scale bf16 (N,)), w ≈ q * scale[:, None].

    The scale maps each row's largest |w| to 127 (-128 is never used, so the grid is
    symmetric). It is rounded to bf16, the dtype the kernels take, before q is chosen."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-30).to(torch.bfloat16)  # an all-zero row gets q = 0
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4: w (N, K) -> (nibbles uint8 (N, K/2), scale, zero bf16 (N, K/g)).

    Each group of `group_size` consecutive inputs of a row maps [min, max] onto q = 0..15, so a
    group that is all positive wastes no levels on negatives (symmetric int4 would lose one bit
    there). w ≈ (q - 8) * scale + zero, the convention of torch's int4 kernels (zero is the
    value at q = 8, the middle of the grid). scale and zero are rounded to bf16 *before* q is
    chosen, so q is the best code for the dequantization that actually runs.
    Nibbles: byte j of row n holds q[n, 2j] in its high and q[n, 2j + 1] in its low 4 bits.
    """
    N, K = w.shape
    g = w.float().reshape(N, K // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-6).to(torch.bfloat16)  # (N, K/g)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)
    base = zero.float() - 8 * scale.float()  # the value of q = 0
    q = torch.round((g - base[..., None]) / scale.float()[..., None]).clamp_(0, 15).to(torch.uint8)
    return pack_nibbles(q.reshape(N, K)), scale, zero


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] -> (N, K/2) uint8, even columns in the high nibble."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 in [0, 15]; the inverse of pack_nibbles."""
    return torch.stack((nibbles >> 4, nibbles & 15), dim=-1).flatten(-2)


def dequantize_int4(nibbles, scale, zero, group_size: int) -> torch.Tensor:
    """The fp32 (N, K) weight that int4 (nibbles, scale, zero) stands for."""
    q = unpack_nibbles(nibbles).float()
    N, K = q.shape
    q = q.view(N, K // group_size, group_size)
    return ((q - 8) * scale.float()[..., None] + zero.float()[..., None]).view(N, K)


def scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor, dtype) -> torch.Tensor:
    """(N, K/g) scale and zero -> the (K/g, N, 2) tensor torch's int4 kernels take."""
    return torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous().to(dtype)


# ------------------------------------------------------------ int4 repacking


def pack_int4(nibbles: torch.Tensor) -> torch.Tensor:
    """Canonical nibbles (N, K/2), N a multiple of 64, -> the layout of the int4 kernel of their
    device: torch._convert_weight_to_int4pack_for_cpu on CPU, whose layout follows the CPU's
    vector width (rows interleaved in blocks of 64 with AVX-512, 32 with AVX2), tinygemm's
    torch._convert_weight_to_int4pack on CUDA. Made at load time, never written to a file."""
    if nibbles.is_cuda:
        return torch._convert_weight_to_int4pack(nibbles, _inner_k_tiles(2 * nibbles.shape[1]))
    return torch._convert_weight_to_int4pack_for_cpu(unpack_nibbles(nibbles).to(torch.int32), 1)


def unpack_int4(packed: torch.Tensor, K: int) -> torch.Tensor:
    """The inverse of pack_int4: kernel layout (N rows, a multiple of 64) -> canonical nibbles."""
    raw = packed.contiguous().view(torch.uint8).flatten()  # int32 words of tinygemm as bytes too
    N = 2 * raw.numel() // K
    slots = _int4_slots(K, packed.device)  # canonical index of every nibble slot of a 64-row block
    blocks = raw.view(N // INT4_ROWS, INT4_ROWS * K // 2)  # both layouts keep 64-row blocks whole
    nib = torch.stack((blocks & 15, blocks >> 4), dim=-1).flatten(1)  # (N/64, 64K), slot order
    q = torch.empty_like(nib)
    q[:, slots] = nib
    return pack_nibbles(q.view(N, K))


@functools.lru_cache(maxsize=None)
def _int4_slots(K: int, device: torch.device) -> torch.Tensor:
    """For a (64, K) block, the canonical index (row * K + column) that each nibble slot of the
    packed block holds (slot 2b is byte b's low nibble, 2b + 1 its high one).

    The layout is torch's to choose (it differs by CPU and GPU), so rather than copy it we ask
    the packing op itself: pack probe matrices whose values spell out, four bits at a time,
    each element's own index, and read the indices back out of the nibbles."""
    index = torch.arange(INT4_ROWS * K, device=device)
    found = torch.zeros_like(index)
    for shift in range(0, (INT4_ROWS * K - 1).bit_length(), 4):
        probe = pack_nibbles(((index >> shift) & 15).view(INT4_ROWS, K))
        raw = pack_int4(probe).contiguous().view(torch.uint8).flatten()
        found |= torch.stack((raw & 15, raw >> 4), dim=-1).flatten().long() << shift
    if not torch.equal(found.sort().values, index):
        raise RuntimeError("torch's int4 layout does not keep 64-row blocks whole; cannot unpack it.")
    return found


def _inner_k_tiles(K: int) -> int:
    """tinygemm's innerKTiles: K must be a multiple of 16 x innerKTiles; the largest that fits."""
    return next(t for t in (8, 4, 2) if K % (16 * t) == 0)


# ---------------------------------------------------------- CPU capabilities


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, feature flags) of the first CPU in /proc/cpuinfo; ("", {}) where unreadable."""
    name, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not name:
                    name = value.strip()
                elif key.strip() == "flags":
                    return name, frozenset(value.split())
    except OSError:
        pass
    return name, flags


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports (avx512_bf16, amx_bf16, ...); empty where unknown."""
    return _cpuinfo()[1]


def cpu_description() -> str:
    """One line for benchmark tables: the CPU's model, the flags that decide the kernels, and
    the vector width torch's CPU kernels were dispatched to."""
    import platform

    name, flags = _cpuinfo()
    wanted = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "amx_fp16")
    have = " ".join(f for f in wanted if f in flags) or "flags unknown"
    return (f"{name or platform.processor() or platform.machine()}; {have}; "
            f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}")


def onednn_bf16_supported() -> bool:
    """Whether oneDNN (mkldnn) takes bf16 matmuls on this CPU (natively or by emulation)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def onednn_bf16_native() -> bool:
    """Whether the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16), so oneDNN's bf16
    kernels stream weights at memory speed; without them they convert in software."""
    return onednn_bf16_supported() and bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def onednn_fp16_native() -> bool:
    """Whether oneDNN runs fp16 matmuls in hardware here (AVX512-FP16 or AMX-FP16)."""
    return (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_fp16_supported()
            and bool({"avx512_fp16", "amx_fp16"} & cpu_flags()))


# -------------------------------------------------------------- decode GEMV


def gemv(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x2 (M, K) @ weight.T in fp32, written as a multiply and a sum, for torch.compile.
    weight: (N, K) rows, or the same rows in `gemv_blocks` layout (J, N, K/J), which streams
    faster when K > GEMV_CHUNK.

    A decode step at batch 1 multiplies one row of activations by each weight matrix: a GEMV,
    whose time is the time to read the weight. Written this way, inductor makes it one C++
    loop per output row that loads the weight in its own dtype (fp32, bf16, fp16 or int8),
    converts it in registers and accumulates x * w in fp32 vectors, streaming the weight
    faster than the library kernels F.linear calls at batch 1 (docs/generation.md, "Compiled
    decode on CPU"). The products are exact fp32 (no bf16 rounding of the input).

    x2 goes through a no-op as_strided first. It is a fusion barrier: without it inductor
    inlines whatever made x2 (the layer norm before query_key_value, the GELU before
    dense_4h_to_h) into the loop over K, recomputing it once for each of the N output rows,
    and the step runs 2-3x slower than eager. as_strided needs a real buffer, so x2 is
    computed once. Never call gemv eager: there the product is a real (M, N, K) tensor. Each
    extra row re-reads and re-converts the weight, so from two rows on the GEMM kernels win
    (GEMV_ROWS)."""
    x2 = x2.float()
    x2 = torch.as_strided(x2, x2.shape, x2.stride())  # the fusion barrier above
    blocks = weight if weight.dim() == 3 else gemv_blocks(weight, copy=False)  # (J, N, K/J)
    (M, K), (J, N, KJ) = x2.shape, blocks.shape
    y = (x2.view(M, J, 1, KJ) * blocks.float()).sum(-1)  # (M, J, 1, K/J) * (J, N, K/J) -> (M, J, N)
    return y[:, 0] if J == 1 else y.sum(1)  # (M, N)


GEMV_CHUNK = 2048  # the longest sum `gemv` lets inductor write as one loop (see gemv_chunks)


def gemv_chunks(K: int) -> int:
    """How many equal chunks `gemv` sums a row of K inputs in: the fewest of at most GEMV_CHUNK.
    Over 4096 inputs inductor sums through a CascadeSumHelper (for accuracy), which ran 5x
    slower: 1.4b's 8192-input dense_4h_to_h streamed 3.2 GB/s (int8, one thread) against 15
    for its 2048-input layers. Chunks of 2048 measured best among 512-4096."""
    J = -(-K // GEMV_CHUNK)
    while K % J:
        J += 1
    return J


def gemv_blocks(weight: torch.Tensor, copy: bool = True) -> torch.Tensor:
    """weight (N, K) -> (J, N, K/J), J = gemv_chunks(K): block j holds inputs [j K/J, (j+1) K/J)
    of every row, contiguous when `copy` (a view of weight when J == 1, nothing copied).

    Summed in chunks straight from (N, K) rows, an 8192-input matrix streamed at half the rate
    of a 2048-input one (int8, one thread: 8.2 against 16.3 G weights/s, 2048 x 8192 from
    memory); stored as blocks, each a plain 2048-input matrix read front to back, it streams
    at 16.1. So layers that decode through `gemv` (DecodeLinear, an Int8Linear after
    prepare_for_cpu(compile=True)) keep their weight in this layout."""
    N, K = weight.shape
    J = gemv_chunks(K)
    blocks = weight.view(N, J, K // J).transpose(0, 1)  # (J, N, K/J)
    return blocks.contiguous() if copy else blocks


def gemv_rows(blocks: torch.Tensor) -> torch.Tensor:
    """The (N, K) rows of a `gemv_blocks` weight (J, N, K/J): a copy when J > 1."""
    J, N, KJ = blocks.shape
    return blocks[0] if J == 1 else blocks.transpose(0, 1).reshape(N, J * KJ)


def use_gemv(x2: torch.Tensor) -> bool:
    """Whether a linear layer should run `gemv` on its input rows x2 (M, K): while torch.compile
    traces it, on CPU, for at most GEMV_ROWS rows (a batch-1 decode step)."""
    return torch.compiler.is_compiling() and x2.device.type == "cpu" and x2.shape[0] <= GEMV_ROWS


class DecodeLinear(nn.Module):
    """A linear layer whose batch-1 decode products, when torch.compile traces it on CPU, run
    as `gemv`; F.linear otherwise (prompts, batches, eager), block by block. Its weight is
    kept in `gemv_blocks` layout, (J, N, K/J); its state_dict is nn.Linear's, (N, K).
    prepare_for_cpu(model, compile=True) gives these to a full-precision model."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(gemv_blocks(weight.detach()), requires_grad=False)  # (J, N, K/J)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "DecodeLinear":
        """The same layer. Its weight is shared (nothing copied) when K <= GEMV_CHUNK."""
        return cls(linear.weight, linear.bias)

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if use_gemv(x2):
            y = gemv(x2, self.weight)  # (M, N) fp32
            y = (y if self.bias is None else y + self.bias.float()).to(x.dtype)
        else:  # one F.linear per block of inputs, summed
            parts = x2.split(self.weight.shape[-1], dim=-1)  # J x (M, K/J)
            y = F.linear(parts[0], self.weight[0], self.bias)
            for part, block in zip(parts[1:], self.weight[1:]):
                y = torch.addmm(y, part, block.t())
        return y.view(*x.shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = gemv_rows(self.weight if keep_vars else self.weight.detach())
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if prefix + "weight" in state_dict:
            state_dict = dict(state_dict)
            state_dict[prefix + "weight"] = gemv_blocks(state_dict[prefix + "weight"])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"gemv when compiled ({self.weight.shape[0]} blocks)")


class Weight16Linear(DecodeLinear):
    """nn.Linear with an fp16 or bf16 weight in a model whose activations keep their dtype (fp32
    by default): weight-only 16 bits, as llama.cpp's f16 files run. Half of fp32's bytes, like a
    whole-model bf16 or fp16 (--dtype), but only the weights are rounded, so it keeps much more
    of fp32's accuracy where those round every activation too (docs/generation.md, "The 16-bit
    quality gap").

    fp16 (quantize="fp16") keeps 11 significant bits, bf16 (quantize="bf16") 8, and a trained
    model's weights lie far inside fp16's range (quantize_to_file_layout refuses one that does
    not); bf16's convert to fp32 is a shift, fp16's a conversion instruction, which at 410m made
    fp16 decode ~20 % slower. The weight is kept in `gemv_blocks` layout like a DecodeLinear's,
    whose compiled batch-1 product it shares: `gemv` loads the 16-bit rows and converts them in
    registers, the activations stay fp32. Other products:
      - eager batch 1 on CPU: torch's 16-bit GEMV (fp32 sums), its input rounded to the
        weight's dtype as llama.cpp rounds it for an f16 matmul;
      - eager prompts and batches on CPU: fp32 GEMMs on the weight converted a slice of rows
        at a time (CONVERT_FLOATS weights, 2 MB in fp32), so each converted slice is used
        while it is in the cache: a 32-row product of an 8192 x 2048 weight took 17 ms so,
        55 ms converting the whole weight first, and 7 ms in bf16 (oneDNN, bf16 activations);
      - compiled with several rows, and CUDA: the weight converted to the activations' dtype
        and F.linear (under torch.compile on CUDA the cast fuses into the GEMV, as int8's does).
    The state_dict holds the (N, K) 16-bit rows."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        # 16-bit rows read from a file stay a view of it, as a bf16 model's do (the loop does not need them aligned)
        if weight.dtype not in WEIGHT16.values():
            raise TypeError(f"Weight16Linear takes an fp16 or bf16 weight, not {weight.dtype}.")
        super().__init__(weight.detach(), bias)

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if use_gemv(x2):
            return super().forward(x)
        parts = x2.split(self.weight.shape[-1], dim=-1)  # J x (M, K/J)
        eager_cpu = x2.device.type == "cpu" and not torch.compiler.is_compiling()
        if eager_cpu and x2.shape[0] == 1:
            ys = [F.linear(part.to(block.dtype), block) for part, block in zip(parts, self.weight)]  # J x (1, N) 16-bit
        elif eager_cpu:
            rows = max(1, CONVERT_FLOATS // self.weight.shape[-1])
            ys = [torch.cat([F.linear(part, chunk.to(x.dtype)) for chunk in block.split(rows)], dim=-1)
                  for part, block in zip(parts, self.weight)]  # J x (M, N)
        else:
            ys = [F.linear(part, block.to(x.dtype)) for part, block in zip(parts, self.weight)]  # J x (M, N)
        y = ys[0].to(x.dtype) if len(ys) == 1 else torch.stack(ys).float().sum(0).to(x.dtype)  # blocks summed in fp32
        y = y if self.bias is None else y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{str(self.weight.dtype).removeprefix('torch.')} weight ({self.weight.shape[0]} blocks)")


# ------------------------------------------------------------------- modules
# The quantized tensors are buffers (not parameters): nothing trains them, and torch's kernels
# have no backward. Every module keeps `in_features` / `out_features` as nn.Linear does.


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight and one scale per output row: y = (x @ q.T) * scale + bias.

    Three kernels, chosen where the module is built (bench/quant_kernels.py measured them):
      - x86 CPUs whose fbgemm multiplies int8 exactly (fbgemm_int8_native: VNNI or AMX):
        fbgemm's int8 GEMM, the kernel of torch's x86 quantization backends, on a weight it
        packed once (FbgemmWeight). It multiplies uint8 by int8 with the CPU's dot-product
        instructions, so the activations are written as two int8 digits, x ≈ s (d1 + d2 / 254)
        per row (`int8_digits`): one GEMM with two rows per token reads the weight once and
        gives the product to ~16 bits, summed in int32, scaled in fp32, fp32 out. At batch 1
        it streams the weight near memory speed, eager or compiled (a custom op, below).
      - elsewhere on CPU: torch._weight_int8pack_mm with bf16 activations (its output is rounded
        to bf16, so embed_out recomputes its `exact_top_k` largest logits in fp32 from the same
        int8 rows, see _exact_top); and while torch.compile traces a one-row product (the batch-1
        decode step after prepare_for_cpu(model, compile=True)) `gemv`, inductor's own loop over
        the int8 rows, exact fp32 products times the row scale.
      - CUDA: w.to(x.dtype), F.linear and the scales, which torch.compile fuses into one GEMV
        as gpt-fast does.
    `weight` is in the kernel's layout (fbgemm's packed object; plain rows (N, K), or (J, N, K/J)
    after use_blocks for `gemv`); the state_dict holds the canonical (q (N, K) int8, scale (N,)
    bf16) either way."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, exact_top_k: int = 0,
                 fbgemm: bool | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.exact_top_k = exact_top_k
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.fbgemm = q.device.type == "cpu" and fbgemm_int8_native() if fbgemm is None else fbgemm  # None: by the CPU
        self.blocked = False  # plain rows in gemv_blocks layout (use_blocks)
        self._pack(q, scale)

    def _pack(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        """Canonical (q, scale) into this module's kernel layout."""
        if self.fbgemm:
            self.weight = FbgemmWeight(q)  # an object, not a buffer: .to() cannot move it
            self.register_buffer("weight_scale", scale.float())  # (N,), applied after the GEMM in fp32
        else:
            q = gemv_blocks(q) if self.blocked else q.clone(memory_format=torch.contiguous_format)  # never a file's view
            self.register_buffer("weight", q)  # (N, K) or (J, N, K/J) int8
            self.register_buffer("weight_scale", scale.to(torch.bfloat16, copy=True))  # (N,), bf16 as the kernels take it

    def canonical(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q (N, K) int8, scale (N,) bf16): the device-independent form."""
        q = self.weight.rows() if self.fbgemm else gemv_rows(self.weight) if self.blocked else self.weight
        return q, self.weight_scale.to(torch.bfloat16)

    def use_fbgemm(self, fbgemm: bool) -> None:
        """Move the weight to fbgemm's kernel (True) or to the plain rows of the others (False)."""
        if fbgemm != self.fbgemm:
            q, scale = self.canonical()
            del self.weight, self.weight_scale
            self.fbgemm, self.blocked = fbgemm, False
            self._pack(q, scale)

    def use_blocks(self, blocked: bool) -> None:
        """Keep plain rows in `gemv_blocks` layout (True), which a compiled decode step streams
        fastest, or as (N, K) (False). Not for fbgemm's weight."""
        if blocked != self.blocked:
            if self.fbgemm:
                raise ValueError("use_blocks is for plain int8 rows; call use_fbgemm(False) first.")
            q, scale = self.canonical()
            self.blocked = blocked
            self._pack(q, scale)

    def forward(self, x):
        shape, x2 = x.shape, x.reshape(-1, self.in_features)  # (M, K)
        if self.fbgemm:
            M = x2.shape[0]
            digits, s = int8_digits(x2)  # (2M, K) fp32 integers in [-127, 127], (M, 1)
            mm = torch.ops.minidolly.fbgemm_int8_mm if torch.compiler.is_compiling() else _fbgemm_int8_mm  # eager: no dispatch
            y2 = mm(digits, self.weight, self.out_features)  # (2M, N) fp32: digits @ q.T
            y = torch.add(y2[:M], y2[M:], alpha=1 / 254) * s * self.weight_scale  # (M, N)
            y = (y if self.bias is None else y + self.bias).to(x.dtype)
            return y.view(*shape[:-1], self.out_features)
        elif self.weight.is_cuda:  # a GEMV with the cast fused in under torch.compile (gpt-fast's int8)
            y = F.linear(x2, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)  # (prepare blocks CPU layers only)
        elif use_gemv(x2):  # compiled batch-1 decode: exact fp32 products, no bf16 rounding
            y = (gemv(x2, self.weight) * self.weight_scale.float()).to(x.dtype)  # (M, N)
        else:  # torch's CPU kernel is vectorized for bf16 activations only (bench/quant_kernels.py);
            # it also crashes on inputs that are not 16-byte aligned (torch 2.13, AVX-512: a view at
            # an 8-byte offset segfaults), so x always gets a fresh (64-byte aligned) copy
            blocks = self.weight if self.blocked else self.weight[None]  # (J, N, K/J)
            ys = [torch._weight_int8pack_mm(part.to(torch.bfloat16, memory_format=torch.contiguous_format, copy=True),
                                            block, self.weight_scale)
                  for part, block in zip(x2.split(blocks.shape[-1], dim=-1), blocks)]  # J x (M, N) bf16
            y = (ys[0] if len(ys) == 1 else torch.stack(ys).float().sum(0)).to(x.dtype)  # blocks summed in fp32
            if self.exact_top_k and x.dtype == torch.float32:
                y = self._exact_top(x2, y)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def _exact_top(self, x2: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (M, N) with its exact_top_k largest entries per row recomputed in fp32."""
        top = y.topk(min(self.exact_top_k, self.out_features), dim=-1).indices  # (M, k)
        exact = []
        for xs, ids in zip(x2.split(16), top.split(16)):  # 16 rows at a time: a small (16, k, K) temporary
            rows = self._rows(ids).float() * self.weight_scale[ids].float()[..., None]  # (m, k, K)
            exact.append(torch.einsum("mK,mkK->mk", xs.float(), rows))
        return y.scatter(1, top, torch.cat(exact))

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The int8 rows `ids` (...) of the weight: (..., K)."""
        if not self.blocked:
            return self.weight[ids]
        picked = self.weight[:, ids]  # (J, ..., K/J)
        return picked.movedim(0, -2).flatten(-2)  # (..., J, K/J) -> (..., K)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        q, scale = self.canonical()
        destination[prefix + "weight"] = q
        destination[prefix + "weight_scale"] = scale
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        names = ["weight", "weight_scale"] + (["bias"] if self.bias is not None else [])
        missing = [prefix + n for n in names if prefix + n not in state_dict]
        missing_keys.extend(missing)
        if missing:
            return
        q, scale = (state_dict[prefix + n].to(self.weight_scale.device) for n in names[:2])  # _pack copies
        del self.weight, self.weight_scale
        self._pack(q, scale)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.copy_(state_dict[prefix + "bias"])

    def extra_repr(self):
        kernel = "fbgemm int8 x 2 digits" if self.fbgemm else "bf16 activations" + (", gemv blocks" if self.blocked else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel, {kernel}"
                + (f", exact top {self.exact_top_k}" if self.exact_top_k and not self.fbgemm else ""))


def int8_digits(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float -> (digits (2M, K) fp32, s (M, 1) fp32) with x ≈ s (d1 + d2 / 254).

    Row m's scale s maps its largest |x| to 127; d1 = round(x / s) and d2 = round(254 (x / s - d1)),
    both integers in [-127, 127]: rows [0, M) hold d1, rows [M, 2M) hold d2 (fbgemm stores
    each + 128 as uint8, exactly). The error is at most s / 508, 2^-16 of the row's largest
    value: an int8 GEMM on the digits is as exact as one on 16-bit activations."""
    x = x.float()
    s = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny) / 127
    u = x / s
    d1 = u.round()
    d2 = u.sub_(d1).mul_(254).round_()  # in place: u is not needed again
    return torch.cat((d1, d2)), s


class FbgemmWeight(OpaqueBase or object):
    """An int8 weight q (N, K) packed once for fbgemm's GEMM (torch.ops.quantized.linear_prepack,
    fbgemm engine, scale 1 and zero point 0: the row scales are applied after the GEMM).

    fbgemm's packed weight is a TorchScript object, which torch.compile cannot hand to an op;
    this class is registered as an opaque reference type (torch._library.opaque_object), so
    our op torch.ops.minidolly.fbgemm_int8_mm takes it and a compiled graph receives it as an
    input: the same graph for every layer and every model."""

    def __init__(self, q: torch.Tensor):
        self.shape = tuple(q.shape)
        engine = torch.backends.quantized.engine
        torch.backends.quantized.engine = "fbgemm"  # linear_prepack packs for the current engine
        try:
            with warnings.catch_warnings():  # torch 2.13 marks quantized tensors deprecated (docs/generation.md)
                warnings.filterwarnings("ignore", message=".*quantized tensor creation functions", category=UserWarning)
                qtensor = torch._make_per_tensor_quantized_tensor(q.contiguous(), 1.0, 0)
            self.packed = torch.ops.quantized.linear_prepack(qtensor, None)
        finally:
            torch.backends.quantized.engine = engine

    def rows(self) -> torch.Tensor:
        """The int8 weight q (N, K), unpacked."""
        return torch.ops.quantized.linear_unpack(self.packed)[0].int_repr()

    def __deepcopy__(self, memo):
        return FbgemmWeight(self.rows())

    def __getstate__(self):
        # torch.compile's graph cache pickles a graph's inputs into its key; the compiled code
        # takes this object as an input, so its shape is all the key needs (and the packed
        # object does not pickle).
        return {"shape": self.shape}

    def __setstate__(self, state):
        raise TypeError("fbgemm's packed int8 weights do not unpickle; save the model's state_dict instead.")


if OpaqueBase is not None:
    register_opaque_type(FbgemmWeight, typ="reference")


def _fbgemm_int8_mm(digits: torch.Tensor, weight: FbgemmWeight, out_features: int) -> torch.Tensor:
    """digits (M, K) fp32 integers in [-127, 127] @ q.T -> (M, out_features) fp32: fbgemm
    quantizes the digits to uint8 with scale 1 and zero point 128 (exact), multiplies, and
    converts the int32 sums."""
    # The packed weight is a TorchScript object, and an op called from Python looks for
    # __torch_function__ on each argument: on this object the lookup throws and catches a C++
    # exception, 8 of the 13 us a call took (a 410m decode step makes 97). With torch functions
    # off there is no lookup.
    with torch._C.DisableTorchFunction():
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(digits, 1.0, 128, weight.packed)


# _fbgemm_int8_mm as an op of our own, torch.ops.minidolly.fbgemm_int8_mm, so that torch.compile
# calls it as it is. Defined with torch.library.Library rather than the @custom_op decorator,
# whose Python wrapper cost 11 us a call against 3 here: a decode step calls it once per linear
# layer (97 times at 410m).
if OpaqueBase is not None:
    _LIBRARY = torch.library.Library("minidolly", "FRAGMENT")
    _LIBRARY.define(f"fbgemm_int8_mm(Tensor digits, {get_opaque_type_name(FbgemmWeight)} weight, int out_features) -> Tensor")
    _LIBRARY.impl("fbgemm_int8_mm", _fbgemm_int8_mm, "CPU")
    torch.library.register_fake("minidolly::fbgemm_int8_mm", lambda digits, weight, out_features:
                                digits.new_empty(digits.shape[0], out_features))


@functools.lru_cache(maxsize=None)
def fbgemm_int8_native() -> bool:
    """Whether this torch has fbgemm (x86 builds) and its int8 GEMM sums uint8 x int8 products
    exactly in int32 here: true on CPUs with int8 dot-product instructions (AVX512-VNNI,
    AMX-INT8), where it also streams weights near memory speed. Without them it adds pairs of
    products in saturating 16 bits (torch's own quantization then uses 7-bit activations), which
    the full-range digits of Int8Linear would overflow. So it is probed, not read from the
    flags: the largest digits times the largest weights against the exact sum."""
    if OpaqueBase is None or "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    q = torch.full((8, 64), 127, dtype=torch.int8)
    digits = torch.full((2, 64), 127.0)
    try:
        return torch.equal(_fbgemm_int8_mm(digits, FbgemmWeight(q), 8), torch.full((2, 8), 127.0 * 127 * 64))
    except RuntimeError:  # a build or CPU fbgemm turns down
        return False


class Int4Linear(nn.Module):
    """nn.Linear with a group-wise int4 weight: w = (q - 8) * scale + zero per group of inputs.

    In memory the nibbles are in the layout of the device's kernel (`weight`, made from the
    canonical form at construction) with scales and zeros as one (K/g, N, 2) tensor; the
    state_dict holds the canonical form (quantize_int4), so files do not depend on the CPU.
    Output rows are padded to a multiple of 64 for the kernels and cut off again."""

    def __init__(self, nibbles: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 bias: torch.Tensor | None, group_size: int):
        super().__init__()
        self.out_features, self.in_features = nibbles.shape[0], 2 * nibbles.shape[1]
        self.group_size = group_size
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        weight, sz = self._pack(nibbles, scale, zero)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scales_and_zeros", sz)

    def _pack(self, nibbles, scale, zero):
        """Canonical (nibbles, scale, zero) -> (kernel-layout weight, (K/g, N_pad, 2) bf16)."""
        N = nibbles.shape[0]
        pad = -N % INT4_ROWS
        if pad:  # zero scale and zero: the padded rows compute 0 and are cut off
            nibbles = F.pad(nibbles, (0, 0, 0, pad), value=0x88)
            scale, zero = F.pad(scale, (0, 0, 0, pad)), F.pad(zero, (0, 0, 0, pad))
        return pack_int4(nibbles), scales_and_zeros(scale, zero, torch.bfloat16)

    def canonical(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(nibbles (N, K/2) uint8, scale, zero (N, K/g) bf16): the device-independent form."""
        N = self.out_features
        nibbles = unpack_int4(self.weight, self.in_features)
        sz = self.weight_scales_and_zeros.transpose(0, 1)  # (N_pad, K/g, 2)
        return nibbles[:N], sz[:N, :, 0].contiguous(), sz[:N, :, 1].contiguous()

    def forward(self, x):
        shape, x2 = x.shape, x.reshape(-1, self.in_features)  # (B*T, K)
        x2 = x2.to(torch.bfloat16).contiguous()  # tinygemm takes bf16 only; the CPU kernel is fast in bf16 only
        if self.weight.is_cuda:
            y = torch._weight_int4pack_mm(x2, self.weight, self.group_size, self.weight_scales_and_zeros)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.weight_scales_and_zeros)
        y = y[:, : self.out_features]  # (B*T, N) bf16, padding rows dropped
        # with a bias the add promotes to the activations' dtype: one op for the cast and the add
        y = y.to(x.dtype) if self.bias is None else torch.add(y, self.bias).to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        nibbles, scale, zero = self.canonical()
        destination[prefix + "weight"] = nibbles
        destination[prefix + "weight_scale"] = scale
        destination[prefix + "weight_zero"] = zero
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        names = ["weight", "weight_scale", "weight_zero"] + (["bias"] if self.bias is not None else [])
        missing = [prefix + n for n in names if prefix + n not in state_dict]
        missing_keys.extend(missing)
        if missing:
            return
        nibbles, scale, zero = (state_dict[prefix + n].to(self.weight.device) for n in names[:3])
        self.weight, self.weight_scales_and_zeros = self._pack(nibbles, scale, zero)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.copy_(state_dict[prefix + "bias"])

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group_size={self.group_size}"


@torch.library.custom_op("minidolly::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x @ weight.T + bias with a weight oneDNN reordered (torch.ops.mkldnn._reorder_linear_weight).
    An op of our own so that torch.compile calls it as it is: inductor's lowering of the mkldnn
    op expects weights it packed itself (freezing) and fails on ours."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@onednn_linear.register_fake
def _(x, weight, bias, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


class OneDNNLinear(nn.Module):
    """An nn.Linear (fp32, bf16 or fp16) whose weight oneDNN reordered once into its blocked layout.

    F.linear in bf16 hands oneDNN a plain weight and oneDNN reorders it on every call; done
    once here, a decode step streams the weights at the rate of torch's fp16 GEMV, 1.7x the
    plain bf16 call. In fp32 F.linear goes to MKL, whose GEMV streams 10-40 % slower than
    oneDNN's on the packed weight (bench/quant_kernels.py). The state_dict holds the plain weight.

    The reorder takes the batch the GEMM will see as a hint of which layout to choose. With a
    hint of 1 oneDNN picks, for fp32, a layout that streams at two thirds of the memory's rate
    even at batch 1; with PACK_BATCH it picks a blocked one that is faster at every batch (the
    24 layers and unembedding of pythia-410m, 2-core EPYC, one thread: 58.7 against 37.7 ms
    at batch 1, 87.9 against 54.5 at batch 8). bf16 is as fast either way (20.3, 20.1 ms); fp16
    was not measured (oneDNN runs it natively only with AVX512-FP16 or AMX-FP16)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACK_BATCH))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x):
        if torch.compiler.is_compiling():
            return onednn_linear(x, self.weight, self.bias, self.out_features)
        # eager: the op itself, without the custom op's dispatch (~8 us a call, 3 % of a step)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight.to_dense()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed {self.weight.dtype}"


# ---------------------------------------------------------------- the model


def check_quantize(mode, group_size) -> None:
    """Raise QuantizationError for a mode or group size that no model can take."""
    if mode not in MODES:
        raise QuantizationError(f"Unknown quantization {mode!r}; choose one of {', '.join(MODES)}.")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise QuantizationError(
            f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))} (what torch's int4 kernels take), got {group_size!r}.")


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every nn.Linear: the four of each block and embed_out."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def check_shapes(layers, mode: str, group_size: int) -> None:
    """Raise QuantizationError naming the first (name, in_features) that `group_size` does not divide."""
    if mode != "int4":
        return
    for name, in_features in layers:
        if in_features % group_size:
            fits = [str(g) for g in GROUP_SIZES if in_features % g == 0]
            raise QuantizationError(
                f"int4 group size {group_size} does not divide the input width {in_features} of {name}; "
                + (f"use {' or '.join(fits)}." if fits else "no int4 group size fits this model; use int8."))


STORED = {"int8": ("weight", "weight_scale"), "int4": ("weight", "weight_scale", "weight_zero"),
          "fp16": ("weight",), "bf16": ("weight",)}


def file_layout(out_features: int, in_features: int, mode: str, group_size: int | None) -> dict:
    """How one quantized linear's weight is stored: {suffix: (dtype, shape)}, the bias apart.
    The one definition of the file format (docs/generation.md documents it)."""
    N, K = out_features, in_features
    if mode == "int8":
        return {"weight": (torch.int8, (N, K)), "weight_scale": (torch.bfloat16, (N,))}
    if mode in WEIGHT16:
        return {"weight": (WEIGHT16[mode], (N, K))}
    return {"weight": (torch.uint8, (N, K // 2)), "weight_scale": (torch.bfloat16, (N, K // group_size)),
            "weight_zero": (torch.bfloat16, (N, K // group_size))}


def linear_from_file(name: str, tensors: dict, bias: torch.Tensor | None, mode: str, group_size: int | None,
                     device=None) -> nn.Module:
    """The Int8Linear / Int4Linear for the layer `name` from its stored tensors ({suffix:
    tensor}, see file_layout), which may be views into a safetensors file: each module copies
    what it keeps as it is into memory of its own (a view into the file is not aligned as the
    kernels need). embed_out's int8 module computes its top logits exactly."""
    t = {k: v.to(device) for k, v in tensors.items()}
    bias = None if bias is None else bias.to(device)
    if mode == "int8":
        return Int8Linear(t["weight"], t["weight_scale"], bias, EXACT_TOP_K if name == "embed_out" else 0)
    if mode in WEIGHT16:
        return Weight16Linear(t["weight"], bias)
    return Int4Linear(t["weight"], t["weight_scale"], t["weight_zero"], bias, group_size)


def check_fp16_range(weight: torch.Tensor, name: str) -> None:
    """Raise QuantizationError naming `name` if the weight holds a value fp16 cannot (|w| > 65504, NaN)."""
    largest = weight.abs().max().item() if weight.numel() else 0.0
    if not largest <= torch.finfo(torch.float16).max:
        raise QuantizationError(f"{name} holds values up to {largest:.4g}, beyond float16's range (65504); "
                                "quantize this model to int8, or load it in bfloat16 instead.")


def quantize_to_file_layout(weight: torch.Tensor, mode: str, group_size: int | None, name: str = "weight") -> dict:
    """A full-precision weight (N, K) quantized into its stored tensors (see file_layout).
    Raises QuantizationError, naming the layer `name`, for fp16 of a weight outside fp16's range."""
    if mode == "fp16":
        check_fp16_range(weight, name)
    if mode in WEIGHT16:
        return {"weight": weight.to(WEIGHT16[mode])}
    if mode == "int8":
        q, scale = quantize_int8(weight)
        return {"weight": q, "weight_scale": scale}
    nibbles, scale, zero = quantize_int4(weight, group_size)
    return {"weight": nibbles, "weight_scale": scale, "weight_zero": zero}


def layer_mode(name: str, mode: str) -> str:
    """The quantization of the layer `name` in a model quantized to `mode`: int4 models keep
    embed_out in int8. Its error goes straight into the logits; in int4 it is half the KL
    divergence from full precision (bench/quality.py), for 4 % more weight bytes at 1.4b
    (llama.cpp's q4_0 keeps it wider too, in q6_K)."""
    return "int8" if mode == "int4" and name == "embed_out" else mode


def quantize_linear(linear: nn.Linear, mode: str, group_size: int = DEFAULT_GROUP_SIZE, name: str = "") -> nn.Module:
    """One nn.Linear (the model's layer `name`) as an Int8Linear, Int4Linear or Weight16Linear, on its device."""
    stored = quantize_to_file_layout(linear.weight.detach(), mode, group_size, name)
    layer = linear_from_file(name, stored, linear.bias, mode, group_size, linear.weight.device)
    return layer.train(linear.training)


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module:
    """Quantize, in place, the weight of every linear layer of `model` (each block's four and
    embed_out) to int8 per output channel, to int4 in groups of `group_size` inputs (embed_out
    then in int8, see layer_mode) or to fp16 or bf16; embed_in, LayerNorms and biases keep their dtype
    (see the module docstring for why).

    Quantize on the device the model will run on: the packed weights are that device's layout.
    Returns the model. Raises QuantizationError (a ValueError) for an unknown mode, a group size
    torch's kernels do not take, one that does not divide some layer's input width, or fp16 of
    a weight beyond fp16's range; the model is unchanged then."""
    check_quantize(mode, group_size)
    layers = linear_layers(model)
    check_shapes([(name, m.in_features) for name, m in layers], mode, group_size)
    if mode == "fp16":
        for name, linear in layers:
            check_fp16_range(linear.weight.detach(), name)
    for name, linear in layers:
        model.set_submodule(name, quantize_linear(linear, layer_mode(name, mode), group_size, name))
    return model


def quantization_of(model: nn.Module) -> dict | None:
    """{"mode": "int8" | "int4" | "fp16" | "bf16", "group_size": g or None} for a quantized model, None otherwise."""
    int4 = [m for m in model.modules() if isinstance(m, Int4Linear)]
    if int4:
        return {"mode": "int4", "group_size": int4[0].group_size}
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        return {"mode": "int8", "group_size": None}
    weight16 = [m for m in model.modules() if isinstance(m, Weight16Linear)]
    if weight16:
        return {"mode": "bf16" if weight16[0].weight.dtype == torch.bfloat16 else "fp16", "group_size": None}
    return None


@torch.no_grad()
def prepare_for_cpu(model: nn.Module, compile: bool = False) -> nn.Module:
    """Give a model's linear layers the fastest kernel this CPU has, for eager or compiled decoding.

    compile=False (eager): fp32 models, and bf16 ones where the CPU computes bf16 natively
    (AVX512-BF16 or AMX flags): each nn.Linear becomes a OneDNNLinear, its weight reordered
    once for oneDNN. fp16 models keep F.linear, which runs torch's own fp16 GEMV at batch 1
    (oneDNN's fp16 needs AVX512-FP16 or AMX-FP16, and uses those where present).
    compile=True (for generate(..., compile=True)): each nn.Linear becomes a DecodeLinear, the
    same weight in `gemv_blocks` layout, which the compiled decode step multiplies as a `gemv`;
    int8 layers keep fbgemm's kernel where the CPU has it (faster still: it streams at memory
    speed), and otherwise keep plain int8 rows in that layout, for the same reason. int4
    layers keep their kernel. Prepare last: a DecodeLinear is no nn.Linear to quantize_model.
    Models on other devices are left as they are. In place; returns the model. Undo by saving
    and loading: the state_dict is plain.
    """
    layers = [(name, m) for name, m in linear_layers(model) if m.weight.device.type == "cpu"]
    if compile:
        for name, linear in layers:
            model.set_submodule(name, DecodeLinear.from_linear(linear))
        for m in model.modules():
            if isinstance(m, Int8Linear) and m.weight_scale.device.type == "cpu" and not m.fbgemm:
                m.use_blocks(True)
        return model
    if not layers:
        return model
    dtype = layers[0][1].weight.dtype
    native = {torch.float32: torch.backends.mkldnn.is_available(), torch.bfloat16: onednn_bf16_native(),
              torch.float16: onednn_fp16_native()}.get(dtype, False)
    if native:
        for name, linear in layers:
            model.set_submodule(name, OneDNNLinear(linear))
    return model
