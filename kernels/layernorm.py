"""Fused LayerNorm over the last dimension, forward and backward, in Triton.

torch's LayerNorm is already one kernel per direction, so what we fuse here is mostly
the bookkeeping around it; the lesson is how a row reduction maps onto Triton:

* forward: one program per row. The row (at most 5120 values for Pythia) fits in
  registers, so x is read once, mean and variance come from two in-register sums, and
  y is written once. Mean and 1/std (rstd) are saved per row for the backward.
* backward: dx is again one row at a time. dw and db are sums over *all* rows, which no
  single program sees. Instead of atomics (fast but order-dependent, so not
  bit-reproducible) each program owns a contiguous group of rows and keeps its own
  running dw/db in fp32 registers; it writes them to a (groups, N) scratch buffer, and a
  second small kernel sums that buffer down its columns in a fixed order.

Every hidden size works: the row is padded to the next power of two (`BLOCK_N`) and the
padding is masked out, so 1920, 2560 and 5120 cost the same code path as 2048.
"""

import torch
import triton
import triton.language as tl

from kernels import tiles

# One program keeps a whole row in registers, and the backward five row-sized fp32 arrays:
# at 16384 wide those spill on every architecture even at 32 warps (kernels/aot.py), at
# 8192 none do. Pythia's widest model (12b) has 5120.
MAX_HIDDEN = 8192


@triton.jit
def _layer_norm_fwd(
    X, Y, W, B, Mean, Rstd,  # pointers: x, y (M, N); w, b (N,); mean, rstd (M,)
    stride_x, stride_y,  # elements between consecutive rows
    N, eps,
    BLOCK_N: tl.constexpr,  # next power of two >= N
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    # int64 row offsets: rows * stride can pass 2**31 elements on big batches.
    x = tl.load(X + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.0).to(tl.float32)

    # Two-pass statistics over the in-register row: subtracting the mean before squaring
    # avoids the cancellation of E[x^2] - E[x]^2 when |mean| >> std.
    mean = tl.sum(x, axis=0) / N
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / N
    rstd = tl.rsqrt(var + tl.cast(eps, tl.float32))  # fp32 even where torch.compile passes eps as fp64

    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * w + b
    tl.store(Y + row.to(tl.int64) * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _layer_norm_bwd_dx(
    X, DY, DX, W, Mean, Rstd,  # x, dy, dx (M, N); w (N,); mean, rstd (M,)
    DW_part, DB_part,  # fp32 scratch (groups, N): one row of partial sums per program
    stride_x, stride_dy, stride_dx,
    M, N,
    ROWS_PER_PROGRAM,
    BLOCK_N: tl.constexpr,
):
    group = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)

    row_start = group * ROWS_PER_PROGRAM
    row_end = tl.minimum(row_start + ROWS_PER_PROGRAM, M)
    # Row pointers advance by one stride per iteration; starting them from an int64
    # offset keeps the arithmetic 64-bit however far down the tensor the group is.
    X += row_start.to(tl.int64) * stride_x
    DY += row_start.to(tl.int64) * stride_dy
    DX += row_start.to(tl.int64) * stride_dx
    for row in range(row_start, row_end):
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + row)
        rstd = tl.load(Rstd + row)

        # With xhat = (x - mean) * rstd and g = w * dy, the LayerNorm gradient is
        #   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
        # the two means being the gradient flowing back through mean and variance.
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        g = w * dy
        mean_g = tl.sum(g, axis=0) / N
        mean_gx = tl.sum(g * xhat, axis=0) / N
        dx = (g - mean_g - xhat * mean_gx) * rstd
        tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)

        dw_acc += dy * xhat
        db_acc += dy
        X += stride_x
        DY += stride_dy
        DX += stride_dx

    tl.store(DW_part + group * N + cols, dw_acc, mask=mask)
    tl.store(DB_part + group * N + cols, db_acc, mask=mask)


@triton.jit
def _layer_norm_bwd_dwdb(
    DW_part, DB_part,  # fp32 (groups, N)
    DW, DB,  # (N,), in the weight's dtype
    GROUPS, N,
    BLOCK_G: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    # Each program owns BLOCK_COLS columns and walks down all the groups in order, so the
    # summation order (and hence the result, bit for bit) never depends on scheduling.
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < N
    dw = tl.zeros([BLOCK_G, BLOCK_COLS], dtype=tl.float32)
    db = tl.zeros([BLOCK_G, BLOCK_COLS], dtype=tl.float32)
    for g0 in range(0, GROUPS, BLOCK_G):
        groups = g0 + tl.arange(0, BLOCK_G)
        mask = (groups[:, None] < GROUPS) & col_mask[None, :]
        offs = groups[:, None] * N + cols[None, :]
        dw += tl.load(DW_part + offs, mask=mask, other=0.0)
        db += tl.load(DB_part + offs, mask=mask, other=0.0)
    tl.store(DW + cols, tl.sum(dw, axis=0).to(DW.dtype.element_ty), mask=col_mask)
    tl.store(DB + cols, tl.sum(db, axis=0).to(DB.dtype.element_ty), mask=col_mask)


def _num_warps(block_n, backward=False):
    # Enough threads that a row is 8-32 values per thread. The backward holds five
    # row-sized fp32 arrays (x, dy, w and the dw/db sums) where the forward holds three,
    # so it gets up to 16 warps: at 5120 wide, 8 warps would spill registers on sm_90. The
    # forward gets 16 at its widest too: fp32 rows of 8192 spill at 8 on sm_80/86/89.
    cap = 16 if backward or block_n >= MAX_HIDDEN else 8
    return min(max(block_n // 256, 1), cap)


def _num_groups(m, device):
    """How many programs share the rows in the backward (= rows of the dw/db scratch)."""
    if device.type == "cuda":
        # A few programs per SM keeps every SM busy while the scratch stays small
        # (groups * N * 8 bytes, a few MB at most, against M * N * 6+ bytes of x/dy/dx).
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8  # the CPU interpreter runs programs one after another
    return max(1, min(m, target))


def _forward(x2d, weight, bias, eps):
    m, n = x2d.shape
    block_n = triton.next_power_of_2(n)
    y = torch.empty_like(x2d)
    mean = torch.empty(m, dtype=torch.float32, device=x2d.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x2d.device)
    _layer_norm_fwd[(m,)](
        x2d, y, weight, bias, mean, rstd,
        x2d.stride(0), y.stride(0), n, eps,
        BLOCK_N=block_n, num_warps=_num_warps(block_n),
    )
    return y, mean, rstd


def _backward(dy2d, x2d, weight, mean, rstd):
    m, n = x2d.shape
    block_n = triton.next_power_of_2(n)
    groups = _num_groups(m, x2d.device)
    rows_per_program = triton.cdiv(m, groups)
    groups = triton.cdiv(m, rows_per_program)

    dx = torch.empty_like(x2d)
    dw_part = torch.empty((groups, n), dtype=torch.float32, device=x2d.device)
    db_part = torch.empty((groups, n), dtype=torch.float32, device=x2d.device)
    _layer_norm_bwd_dx[(groups,)](
        x2d, dy2d, dx, weight, mean, rstd, dw_part, db_part,
        x2d.stride(0), dy2d.stride(0), dx.stride(0),
        m, n, rows_per_program,
        BLOCK_N=block_n, num_warps=_num_warps(block_n, backward=True),
    )

    dw = torch.empty_like(weight)
    db = torch.empty_like(weight)
    block_cols = 128
    _layer_norm_bwd_dwdb[(triton.cdiv(n, block_cols),)](
        dw_part, db_part, dw, db, groups, n,
        BLOCK_G=32, BLOCK_COLS=block_cols, num_warps=4,
    )
    return dx, dw, db


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        n = x.shape[-1]
        x2d = x.reshape(-1, n)  # (M, N), M = product of the leading dims
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        y, mean, rstd = _forward(x2d, weight, bias, eps)
        ctx.save_for_backward(x2d, weight, mean, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, mean, rstd = ctx.saved_tensors
        dy2d = dy.reshape(x2d.shape)
        if dy2d.stride(-1) != 1:
            dy2d = dy2d.contiguous()
        dx, dw, db = _backward(dy2d, x2d, weight, mean, rstd)
        return dx.view(dy.shape), dw, db, None


def _check(x, weight, bias):
    if not isinstance(x, torch.Tensor) or x.ndim < 1:
        raise ValueError("layer_norm: x must be a tensor with at least one dimension (..., N).")
    n = x.shape[-1]
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"layer_norm: x has dtype {x.dtype}; the kernel supports float32, float16 and bfloat16.")
    if n > MAX_HIDDEN:
        raise ValueError(f"layer_norm: the last dimension of x is {n}; the kernel keeps a row in registers and supports at most {MAX_HIDDEN}.")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (n,):
            raise ValueError(f"layer_norm: {name} has shape {tuple(t.shape)} but x has shape {tuple(x.shape)}; {name} must be ({n},), the size of x's last dimension.")
        if t.dtype != x.dtype:
            raise ValueError(f"layer_norm: {name} is {t.dtype} but x is {x.dtype}; cast them to one dtype.")
        if t.device != x.device:
            raise ValueError(f"layer_norm: {name} is on {t.device} but x is on {x.device}.")
    reason = tiles.unsupported(x.device)
    if reason is not None:
        raise ValueError(f"layer_norm: {reason}")


def layer_norm(x, weight, bias, eps=1e-5):
    """LayerNorm over the last dimension, as `F.layer_norm(x, (N,), weight, bias, eps)`.

    Args:
        x: (..., N) tensor, float32, float16 or bfloat16, on CUDA (or on the CPU when
            TRITON_INTERPRET=1). Any leading shape; it is viewed as (M, N) rows.
        weight, bias: (N,) tensors of x's dtype and device; None means ones / zeros.
        eps: added to the variance before the square root.

    Under torch.autocast, x, weight and bias are cast to fp32 first, as autocast does for
    F.layer_norm on CUDA, and the result is fp32.

    Returns:
        A tensor shaped and typed like x. Differentiable in x, weight and bias; all
        statistics and the dw/db sums are kept in fp32.

    Raises:
        ValueError: if x has no dimensions or an unsupported dtype, N exceeds MAX_HIDDEN,
            weight/bias do not match x's last dimension, dtype or device, or x is not on a
            device the kernel can run on.
    """
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        # Autocast runs F.layer_norm in fp32 on CUDA (its "fp32" op list), whatever the input
        # dtypes, and returns fp32: do the same, rather than fail on mixed dtypes.
        x, weight, bias = (t.float() if isinstance(t, torch.Tensor) and t.dtype in tiles.DTYPES else t
                           for t in (x, weight, bias))
    n = x.shape[-1] if isinstance(x, torch.Tensor) and x.ndim >= 1 else None
    if weight is None and n is not None:
        weight = torch.ones(n, dtype=x.dtype, device=x.device)
    if bias is None and n is not None:
        bias = torch.zeros(n, dtype=x.dtype, device=x.device)
    _check(x, weight, bias)
    if x.numel() == 0:
        return torch.empty_like(x) + bias  # nothing to normalise; keep autograd's graph simple
    return _LayerNorm.apply(x, weight, bias, float(eps))
