"""Flash attention (causal or not), forward and backward, in Triton.

Plain attention writes the (T, T) score matrix to memory, reads it back for the softmax,
writes the probabilities, and reads them again for the product with V; at T = 2048 that
matrix is 8 MiB per head in bf16 and dominates the traffic. Flash attention never
stores it (Dao et al. 2022, "FlashAttention"; the loop order here is FlashAttention-2's):

* forward: one program per (block of BLOCK_M queries, batch*head). It walks over the keys
  BLOCK_N at a time, computes that tile of scores in registers and folds it into a
  running softmax ("online softmax"): the row maximum m, the row sum l, and the
  un-normalised output acc are rescaled whenever a new tile raises the maximum. At the
  end acc / l is the output, and m + log(l) (the log-sum-exp, LSE) is all the backward
  needs to rebuild any tile of probabilities exactly: P = exp(S - LSE).
* backward: a preprocess kernel computes delta = rowsum(dO * O) per query; then one
  kernel per block of keys accumulates dK and dV over all the queries that see it, and
  one kernel per block of queries accumulates dQ over the keys it sees. Splitting dQ from
  dK/dV costs recomputing S and dP once more, but keeps every accumulator in the
  registers of one program: no atomics, deterministic results.

Speed details, each explained where it happens:
* exp2 instead of exp: the scale is multiplied by log2(e) once, on the host.
* causal: key tiles entirely after a query tile are never visited; tiles entirely before
  it run without any mask; only the diagonal tiles (and a ragged last tile) pay for one.
* head dims that are not a power of two (Pythia's 80) load a BLOCK_D = 128 wide tile
  with the columns past head_dim masked to zero, which adds nothing to the dot products;
  head dim 256 uses smaller tiles so the accumulators still fit in registers.

All tensors are (batch, heads, seq, head_dim) with a contiguous last dimension.
"""

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)
MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _load_tile(base, rows, stride_row, n_rows,
               CHECK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Load a (len(rows), BLOCK_D) tile; rows >= n_rows (if CHECK_ROWS) and columns >= HEAD_DIM read as 0."""
    cols = tl.arange(0, BLOCK_D)
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    # The branches are resolved at compile time, so a full interior tile of a power-of-two
    # head dim is an unmasked load, the fastest kind.
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _store_tile(base, rows, stride_row, n_rows, value, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a (len(rows), BLOCK_D) tile, skipping rows >= n_rows and columns >= HEAD_DIM."""
    cols = tl.arange(0, BLOCK_D)
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM))


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr):
    """acc + a @ b with an fp32 result.

    DOT_FP32 does the product in true fp32 ("ieee", not TF32). It is set for fp32
    inputs, so fp32 results match torch's, and for bf16 under the CPU interpreter, whose
    bf16 dot is broken in triton 3.9 (the upcast is exact: a bf16 value is an fp32 value).
    """
    if DOT_FP32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _bh_offset(stride_b, stride_h, H):
    """Element offset of this program's (batch, head) slice; grid axis 1 is batch * H + head."""
    bh = tl.program_id(1)
    # int64: batch * stride_b passes 2**31 elements for long sequences at large batch.
    return (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, K, V, stride_kt, stride_vt, offs_m, lo, hi, T, qk_scale,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Fold key tiles [lo, hi) into the running softmax of one query tile.

    MASK=False is for tiles known to be full and wholly visible: no masking work at all.
    MASK=True hides keys >= T and, if CAUSAL, keys after the query.
    """
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K, offs_n, stride_kt, T, MASK, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D)
        # Scores in log2 units: s = (q . k) * scale * log2(e).
        s = _dot(q, tl.trans(k), None, DOT_FP32) * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASK:
            visible = offs_n[None, :] < T
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(visible, s, float("-inf"))

        # Online softmax: raise the running max, rescale what was summed under the old one.
        # No row is ever fully masked (key 0 is visible to every query, and it is in the
        # first tile visited), so m_new is finite and no inf - inf appears.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)  # (BLOCK_M,), 0 on the first tile
        p = tl.math.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N)
        l_i = l_i * alpha + tl.sum(p, 1)

        v = _load_tile(V, offs_n, stride_vt, T, MASK, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D)
        # P is rounded to V's dtype, as every flash attention does, so the second product
        # also runs on the tensor cores.
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_FP32)  # (BLOCK_M, BLOCK_D)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE,  # q, k, v, o: (B, H, T, D); lse: fp32 (B * H, T)
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    H, T, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
):
    # Under causal masking the last query tiles have the most keys to visit; handing them
    # out first lets the short ones fill the gaps at the end instead of a long one trailing.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    Q += _bh_offset(stride_qb, stride_qh, H)
    K += _bh_offset(stride_kb, stride_kh, H)
    V += _bh_offset(stride_vb, stride_vh, H)
    O += _bh_offset(stride_ob, stride_oh, H)
    LSE += tl.program_id(1).to(tl.int64) * T

    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(Q, offs_m, stride_qt, T, True, HEAD_DIM, BLOCK_D)  # (BLOCK_M, BLOCK_D), stays in registers
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if CAUSAL:
        # Keys [0, start_m) precede every query of this tile: full tiles, nothing to mask
        # (BLOCK_M is a multiple of BLOCK_N, so they tile exactly).
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K, V, stride_kt, stride_vt, offs_m,
                                   0, start_m, T, qk_scale,
                                   False, CAUSAL, DOT_FP32, HEAD_DIM, BLOCK_D, BLOCK_N)
        # Keys [start_m, start_m + BLOCK_M): the diagonal, masked. Later keys are skipped.
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K, V, stride_kt, stride_vt, offs_m,
                                   start_m, tl.minimum(start_m + BLOCK_M, T), T, qk_scale,
                                   True, CAUSAL, DOT_FP32, HEAD_DIM, BLOCK_D, BLOCK_N)
    else:
        # Every key is visible: full tiles unmasked, then the ragged last tile masked.
        full_end = (T // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K, V, stride_kt, stride_vt, offs_m,
                                   0, full_end, T, qk_scale,
                                   False, CAUSAL, DOT_FP32, HEAD_DIM, BLOCK_D, BLOCK_N)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K, V, stride_kt, stride_vt, offs_m,
                                   full_end, T, T, qk_scale,
                                   True, CAUSAL, DOT_FP32, HEAD_DIM, BLOCK_D, BLOCK_N)

    _store_tile(O, offs_m, stride_ot, T, acc / l_i[:, None], HEAD_DIM, BLOCK_D)
    # LSE in log2 units, matching qk_scale: P = exp2(s - lse) in the backward.
    tl.store(LSE + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < T)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_delta(
    O, DO, DELTA,  # o, do: (B, H, T, D); delta: fp32 (B * H, T)
    stride_ob, stride_oh, stride_ot,
    stride_dob, stride_doh, stride_dot,
    H, T,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # delta_i = sum_j P_ij dP_ij = dO_i . O_i: the term the softmax backward subtracts.
    # Computing it once here saves every dK/dV program from redoing it per query tile.
    O += _bh_offset(stride_ob, stride_oh, H)
    DO += _bh_offset(stride_dob, stride_doh, H)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _load_tile(O, offs_m, stride_ot, T, True, HEAD_DIM, BLOCK_D).to(tl.float32)
    do = _load_tile(DO, offs_m, stride_dot, T, True, HEAD_DIM, BLOCK_D).to(tl.float32)
    tl.store(DELTA + tl.program_id(1).to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _bwd_dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dot, offs_n, lo, hi, T, qk_scale,
                    MASK: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Add the contribution of query tiles [lo, hi) to one key tile's dK and dV.

    Works on the transposed problem (keys on rows) so that dK and dV come out with keys on
    rows too: S^T = K Q^T, dV += P^T dO, dS^T = P^T * (V dO^T - delta), dK += dS^T Q.
    """
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(Q, offs_m, stride_qt, T, MASK, HEAD_DIM, BLOCK_D)  # (BLOCK_M, BLOCK_D)
        do = _load_tile(DO, offs_m, stride_dot, T, MASK, HEAD_DIM, BLOCK_D)  # (BLOCK_M, BLOCK_D)
        if MASK:
            lse = tl.load(LSE + offs_m, mask=offs_m < T, other=0.0)
            delta = tl.load(DELTA + offs_m, mask=offs_m < T, other=0.0)
        else:
            lse = tl.load(LSE + offs_m)
            delta = tl.load(DELTA + offs_m)

        s_t = _dot(k, tl.trans(q), None, DOT_FP32) * qk_scale  # (BLOCK_N, BLOCK_M), log2 units
        p_t = tl.math.exp2(s_t - lse[None, :])  # exactly the forward's probabilities
        if MASK:
            visible = offs_m[None, :] < T
            if CAUSAL:
                visible = visible & (offs_m[None, :] >= offs_n[:, None])
            p_t = tl.where(visible, p_t, 0.0)

        dv = _dot(p_t.to(do.dtype), do, dv, DOT_FP32)  # (BLOCK_N, BLOCK_D)
        dp_t = _dot(v, tl.trans(do), None, DOT_FP32)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])  # gradient w.r.t. the scaled scores
        dk = _dot(ds_t.to(q.dtype), q, dk, DOT_FP32)  # (BLOCK_N, BLOCK_D)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,  # dk and dv are allocated alike
    H, T, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # BLOCK_M queries per step, BLOCK_N keys per program
    CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N  # the first key tiles see the most queries: longest first already
    Q += _bh_offset(stride_qb, stride_qh, H)
    K += _bh_offset(stride_kb, stride_kh, H)
    V += _bh_offset(stride_vb, stride_vh, H)
    DO += _bh_offset(stride_dob, stride_doh, H)
    DK += _bh_offset(stride_dkb, stride_dkh, H)
    DV += _bh_offset(stride_dkb, stride_dkh, H)
    LSE += tl.program_id(1).to(tl.int64) * T
    DELTA += tl.program_id(1).to(tl.int64) * T

    offs_n = start_n + tl.arange(0, BLOCK_N)
    # Keys past T load as zeros; their dK/dV rows are garbage but never stored, and a key
    # row only ever affects its own dK/dV row, so no mask is needed on that axis.
    k = _load_tile(K, offs_n, stride_kt, T, True, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D)
    v = _load_tile(V, offs_n, stride_vt, T, True, HEAD_DIM, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    if CAUSAL:
        # Queries before start_n see none of these keys: skipped. Queries in
        # [start_n, start_n + BLOCK_N) straddle the diagonal: masked.
        dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dot, offs_n,
                                 start_n, tl.minimum(start_n + BLOCK_N, T), T, qk_scale,
                                 True, CAUSAL, DOT_FP32, HEAD_DIM, BLOCK_D, BLOCK_M)
        first_unmasked = start_n + BLOCK_N
    else:
        first_unmasked = 0
    # Later full query tiles see every key of this tile: no mask. Then the ragged end.
    full_end = (T // BLOCK_M) * BLOCK_M
    dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dot, offs_n,
                             first_unmasked, full_end, T, qk_scale,
                             False, CAUSAL, DOT_FP32, HEAD_DIM, BLOCK_D, BLOCK_M)
    dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dot, offs_n,
                             tl.maximum(first_unmasked, full_end), T, T, qk_scale,
                             True, CAUSAL, DOT_FP32, HEAD_DIM, BLOCK_D, BLOCK_M)

    # S = scale * Q K^T, so dK = scale * dS^T Q (dS w.r.t. the scaled scores, in nats:
    # the log2(e) inside qk_scale cancels against exp2).
    _store_tile(DK, offs_n, stride_dkt, T, dk * scale, HEAD_DIM, BLOCK_D)
    _store_tile(DV, offs_n, stride_dkt, T, dv, HEAD_DIM, BLOCK_D)


@triton.jit
def _bwd_dq_tiles(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m, lo, hi, T, qk_scale,
                  MASK: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Add the contribution of key tiles [lo, hi) to one query tile's dQ: dQ += dS K."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K, offs_n, stride_kt, T, MASK, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D)
        v = _load_tile(V, offs_n, stride_vt, T, MASK, HEAD_DIM, BLOCK_D)
        s = _dot(q, tl.trans(k), None, DOT_FP32) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s - lse[:, None])
        if MASK:
            # Unlike in the dK/dV kernel, keys past T must be hidden here: a zero key still
            # gets probability exp2(-lse) and would leak into every dQ row.
            visible = offs_n[None, :] < T
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(visible, p, 0.0)
        dp = _dot(do, tl.trans(v), None, DOT_FP32)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, DOT_FP32)  # (BLOCK_M, BLOCK_D)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    H, T, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # BLOCK_M queries per program, BLOCK_N keys per step
    CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # longest first, as in the forward
    Q += _bh_offset(stride_qb, stride_qh, H)
    K += _bh_offset(stride_kb, stride_kh, H)
    V += _bh_offset(stride_vb, stride_vh, H)
    DO += _bh_offset(stride_dob, stride_doh, H)
    DQ += _bh_offset(stride_dqb, stride_dqh, H)
    LSE += tl.program_id(1).to(tl.int64) * T
    DELTA += tl.program_id(1).to(tl.int64) * T

    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(Q, offs_m, stride_qt, T, True, HEAD_DIM, BLOCK_D)  # (BLOCK_M, BLOCK_D)
    do = _load_tile(DO, offs_m, stride_dot, T, True, HEAD_DIM, BLOCK_D)
    lse = tl.load(LSE + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # The same three-way split as the forward (BLOCK_M is a multiple of BLOCK_N).
    if CAUSAL:
        dq = _bwd_dq_tiles(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m,
                           0, start_m, T, qk_scale,
                           False, CAUSAL, DOT_FP32, HEAD_DIM, BLOCK_D, BLOCK_N)
        dq = _bwd_dq_tiles(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m,
                           start_m, tl.minimum(start_m + BLOCK_M, T), T, qk_scale,
                           True, CAUSAL, DOT_FP32, HEAD_DIM, BLOCK_D, BLOCK_N)
    else:
        full_end = (T // BLOCK_N) * BLOCK_N
        dq = _bwd_dq_tiles(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m,
                           0, full_end, T, qk_scale,
                           False, CAUSAL, DOT_FP32, HEAD_DIM, BLOCK_D, BLOCK_N)
        dq = _bwd_dq_tiles(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m,
                           full_end, T, T, qk_scale,
                           True, CAUSAL, DOT_FP32, HEAD_DIM, BLOCK_D, BLOCK_N)

    _store_tile(DQ, offs_m, stride_dqt, T, dq * scale, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------- launch


def _block_d(head_dim):
    # tl.arange needs a power of two and tl.dot an inner size of at least 16.
    return max(16, triton.next_power_of_2(head_dim))


def _config(head_dim, dtype=torch.bfloat16):
    """Tile sizes and launch settings for one head dim (no autotuning, on purpose).

    Keys: fwd = (BLOCK_M queries, BLOCK_N keys, warps, stages); bwd_dkdv and bwd_dq =
    (queries per tile, keys per tile, warps, stages). The diagonal logic needs the larger
    of each pair to be a multiple of the smaller.

    The register file decides. A forward program holds q and acc (BLOCK_M x BLOCK_D) and
    a (BLOCK_M x BLOCK_N) score tile; a dK/dV program holds k, v, dk and dv (keys x
    BLOCK_D each). At BLOCK_D = 256 those tiles are twice as wide as at 128, so the row
    counts shrink to keep the footprint. These were chosen by compiling every candidate
    for sm_90 and keeping the largest tiles whose inner loops have no register spills
    (ptxas output; see docs/kernels.md), not by timing: re-check them with
    bench/kernels.py on the GPU at hand.
    """
    block_d = _block_d(head_dim)
    if dtype == torch.float32:
        # True fp32 dots run on CUDA cores, not tensor cores, and their operands take twice
        # the shared memory; this path is for exactness, not speed, so small tiles that fit
        # any GPU (the tensor-core tiles at head_dim 256 would need 200 KB of it).
        t = 32 if block_d <= 64 else 16
        return dict(fwd=(t, t, 4, 1), bwd_dkdv=(t, t, 4, 1), bwd_dq=(t, t, 4, 1))
    if block_d <= 64:
        return dict(fwd=(128, 64, 8, 3), bwd_dkdv=(32, 128, 8, 3), bwd_dq=(128, 32, 8, 3))
    if block_d == 128:  # 80 and 128
        return dict(fwd=(128, 64, 8, 3), bwd_dkdv=(32, 128, 8, 2), bwd_dq=(128, 32, 8, 3))
    # 256: a 64 x 256 fp32 accumulator alone is 64 registers per thread at 8 warps.
    return dict(fwd=(64, 32, 8, 2), bwd_dkdv=(32, 32, 8, 3), bwd_dq=(32, 32, 8, 3))


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _dot_fp32(dtype):
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _interpreting())


def _strides(t):
    """(batch, head, seq) strides; the last dimension is contiguous by construction."""
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(q, k, v, causal, scale):
    B, H, T, D = q.shape
    block_m, block_n, warps, stages = _config(D, q.dtype)["fwd"]
    o = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B * H, T), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(T, block_m), B * H)
    _attn_fwd[grid](
        q, k, v, o, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        H, T, scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=causal, DOT_FP32=_dot_fp32(q.dtype),
        num_warps=warps, num_stages=stages,
    )
    return o, lse


def _backward(do, q, k, v, o, lse, causal, scale):
    B, H, T, D = q.shape
    cfg = _config(D, q.dtype)
    block_d = _block_d(D)
    dot_fp32 = _dot_fp32(q.dtype)

    delta = torch.empty_like(lse)  # (B * H, T) fp32
    block_m = 8192 // block_d  # 8192-element tiles: 32 values of each input per thread
    _bwd_delta[(triton.cdiv(T, block_m), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, T,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m, num_warps=8,
    )

    dq = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)

    block_m, block_n, warps, stages = cfg["bwd_dkdv"]
    _attn_bwd_dkdv[(triton.cdiv(T, block_n), B * H)](
        q, k, v, do, dk, dv, lse, delta,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk),
        H, T, scale * LOG2E, scale,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=causal, DOT_FP32=dot_fp32,
        num_warps=warps, num_stages=stages,
    )

    block_m, block_n, warps, stages = cfg["bwd_dq"]
    _attn_bwd_dq[(triton.cdiv(T, block_m), B * H)](
        q, k, v, do, dq, lse, delta,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        H, T, scale * LOG2E, scale,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=causal, DOT_FP32=dot_fp32,
        num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        o, lse = _forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)  # O(T) extra: lse is one float per query
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(_last_dim_contiguous(do), q, k, v, o, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def _check(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"flash_attention: {name} must be a 4-D tensor (batch, heads, seq, head_dim); got {shape}.")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"flash_attention: q, k and v must have the same shape; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}.")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: q, k and v must have the same dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}.")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"flash_attention: q has dtype {q.dtype}; the kernel supports float32, float16 and bfloat16.")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k and v must be on one device; got q {q.device}, k {k.device}, v {v.device}.")
    head_dim = q.shape[-1]
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head_dim is {head_dim} (q has shape {tuple(q.shape)}); the kernel supports head_dim up to {MAX_HEAD_DIM}.")
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(f"flash_attention: q is on {q.device}; the Triton kernel needs CUDA tensors, or TRITON_INTERPRET=1 to run on the CPU interpreter.")


def flash_attention(q, k, v, causal=True, scale=None):
    """Scaled dot-product attention without materialising the (seq x seq) matrix.

    Equivalent to `F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)`
    for self-attention (queries and keys at the same positions).

    Args:
        q, k, v: (batch, heads, seq, head_dim) tensors of one dtype (float32, float16 or
            bfloat16) on CUDA, or on the CPU when TRITON_INTERPRET=1. Any seq >= 1 and
            head_dim <= 256; the last dimension should be contiguous (else it is copied).
        causal: if True, query i attends to keys 0..i only.
        scale: multiplies q . k before the softmax; default head_dim ** -0.5.

    Returns:
        (batch, heads, seq, head_dim) attention output in q's dtype, differentiable in
        q, k and v.

    Raises:
        ValueError: on a tensor that is not 4-D, mismatched shapes, dtypes or devices,
            head_dim > 256, or a device the kernel cannot run on.
    """
    _check(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if q.numel() == 0:
        return q.new_empty(q.shape)
    return _FlashAttention.apply(q, k, v, bool(causal), float(scale))
