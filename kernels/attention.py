"""Flash attention (causal or not), forward and backward, in Triton.

Plain attention writes the (T, T) score matrix to memory, reads it back for the softmax,
writes the probabilities, and reads them again for the product with V; at T = 2048 that
matrix is 8 MiB per head in bf16 and dominates the traffic. Flash attention never
stores it (Dao et al. 2022, "FlashAttention"; the loop order here is FlashAttention-2's):

* forward: one program per (batch*head, block of BLOCK_M queries). It walks over the keys
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
* the walk over the other side's rows comes in three stages (`_stage_range`): full tiles
  that need no mask at all, the tiles on the causal diagonal, and a ragged last tile.
  Causal: key tiles entirely after a query tile are never visited.
* head dims that are not a power of two (Pythia's 80) load a BLOCK_D = 128 wide tile
  with the columns past head_dim masked to zero, which adds nothing to the dot products.
* tile sizes depend on the GPU architecture and the head dim (kernels/tiles.py).

All tensors are (batch, heads, seq, head_dim) with a contiguous last dimension.
"""

import math

import torch
import triton
import triton.language as tl

from kernels import tiles

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)
MAX_HEAD_DIM = tiles.MAX_HEAD_DIM

# The stages of a walk over the other side's rows (see _stage_range).
FREE = tl.constexpr(0)  # full tiles every row of this program sees whole: no mask
DIAGONAL = tl.constexpr(1)  # causal only: tiles that straddle the diagonal
TAIL = tl.constexpr(2)  # the ragged last tile, past the last full one


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _check_tiles(HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BIG: tl.constexpr, SMALL: tl.constexpr):
    """The tile invariants, checked when a configuration is compiled (tiles.py chooses them)."""
    tl.static_assert(HEAD_DIM <= BLOCK_D, "BLOCK_D must cover the head dim")
    tl.static_assert(BLOCK_D >= 16 and (BLOCK_D & (BLOCK_D - 1)) == 0, "BLOCK_D: a power of two >= 16")
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs every tile dimension >= 16")
    # The program's own tile (BIG) is a whole number of walk steps (SMALL), so the walk's
    # unmasked stage starts and ends on step boundaries and the diagonal is whole steps.
    tl.static_assert(BIG % SMALL == 0, "the program's tile must be a multiple of the walk's step")


@triton.jit
def _program(T, BLOCK: tl.constexpr, LONGEST_FIRST: tl.constexpr):
    """(batch * head, first row of this program's tile) from the 1-D grid.

    The grid is one axis of batch * heads * tiles programs: axis 0 takes up to 2**31 - 1,
    where axis 1 stops at 65,535 (batch * heads of 4 x 16,384 would pass it). A (batch,
    head)'s tiles are consecutive, so their shared K and V stay in L2 while they run.
    LONGEST_FIRST hands a (batch, head)'s last tile out first: under causal masking it has
    the most keys to visit, and short programs then fill the gaps at the end of the launch.
    """
    n_tiles = tl.cdiv(T, BLOCK)
    pid = tl.program_id(0)
    tile = pid % n_tiles
    if LONGEST_FIRST:
        tile = n_tiles - 1 - tile
    return pid // n_tiles, tile * BLOCK


@triton.jit
def _bh_offset(bh, H, stride_b, stride_h):
    """Element offset of the (batch, head) slice bh = batch * H + head.

    int64: batch * stride_b passes 2**31 elements for long sequences at large batch.
    """
    return (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h


@triton.jit
def _stage_range(STAGE: tl.constexpr, start, T, CAUSAL: tl.constexpr,
                 TILE: tl.constexpr, STEP: tl.constexpr, WALK_QUERIES: tl.constexpr):
    """The rows [lo, hi) a program visits in one STAGE, STEP rows at a time.

    The program owns rows [start, start + TILE) of one side and walks the other side:
    a query tile walks keys (forward, dQ), or, WALK_QUERIES, a key tile walks queries
    (dK/dV). Under causal masking query i sees keys <= i, so a query tile's keys end at
    its diagonal and a key tile's queries start at it.

        stage      query tile walking keys          key tile walking queries
        FREE       [0, start) causal, else          [start + TILE, last full step) causal,
                   [0, last full step)              else [0, last full step)
        DIAGONAL   [start, start + TILE) causal     [start, start + TILE) causal
        TAIL       [last full step, T), non-causal  [last full step, T), not before the diagonal

    Only FREE runs without a mask; the diagonal and the ragged end (keys or queries >= T)
    are masked. A stage that does not apply is the empty range (0, 0).
    """
    full_end = T - T % STEP  # rows in whole steps
    lo = 0
    hi = 0
    if STAGE == FREE:
        if not CAUSAL:
            hi = full_end
        elif WALK_QUERIES:
            lo = start + TILE
            hi = full_end
        else:
            hi = start
    elif STAGE == DIAGONAL:
        if CAUSAL:
            lo = start
            hi = tl.minimum(start + TILE, T)
    else:  # TAIL
        if not CAUSAL:
            lo = full_end
            hi = T
        elif WALK_QUERIES:
            lo = tl.maximum(start + TILE, full_end)
            hi = T
        # a causal query tile's diagonal stage already ends at its last visible key
    return lo, hi


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
def _as_fp32(x):
    """A float argument as fp32. Triton's own launcher passes a Python float as fp32, but
    torch.compile, launching our kernels from its generated code, passes it as fp64: one fp64
    factor would make every score fp64, and tl.dot then refuses the fp32 accumulator."""
    return tl.cast(x, tl.float32)


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


# ----------------------------------------------------------------------------- forward


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE,  # q, k, v, o: (B, H, T, D); lse: fp32 (B * H, T)
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    H, T, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # BLOCK_M queries per program, BLOCK_N keys per step
    CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
):
    _check_tiles(HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, BLOCK_M, BLOCK_N)
    qk_scale = _as_fp32(qk_scale)
    bh, start_m = _program(T, BLOCK_M, True)
    Q += _bh_offset(bh, H, stride_qb, stride_qh)
    K += _bh_offset(bh, H, stride_kb, stride_kh)
    V += _bh_offset(bh, H, stride_vb, stride_vh)
    O += _bh_offset(bh, H, stride_ob, stride_oh)
    LSE += bh.to(tl.int64) * T

    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(Q, offs_m, stride_qt, T, True, HEAD_DIM, BLOCK_D)  # (BLOCK_M, BLOCK_D), stays in registers
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for stage in tl.static_range(3):  # FREE, DIAGONAL, TAIL; each compiled on its own
        lo, hi = _stage_range(stage, start_m, T, CAUSAL, BLOCK_M, BLOCK_N, False)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = _load_tile(K, offs_n, stride_kt, T, stage != FREE, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D)
            # Scores in log2 units: s = (q . k) * scale * log2(e).
            s = _dot(q, tl.trans(k), None, DOT_FP32) * qk_scale  # (BLOCK_M, BLOCK_N)
            if stage != FREE:
                visible = offs_n[None, :] < T
                if CAUSAL:
                    visible = visible & (offs_n[None, :] <= offs_m[:, None])
                s = tl.where(visible, s, float("-inf"))

            # Online softmax: raise the running max, rescale what was summed under the old
            # one. Every query sees at least one key of the first tile it visits (key 0, or
            # its own position on the diagonal), so m_new is finite and no inf - inf appears.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)  # (BLOCK_M,), 0 on the first tile
            p = tl.math.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N)
            l_i = l_i * alpha + tl.sum(p, 1)

            v = _load_tile(V, offs_n, stride_vt, T, stage != FREE, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D)
            # P is rounded to V's dtype, as every flash attention does, so the second product
            # also runs on the tensor cores.
            acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_FP32)  # (BLOCK_M, BLOCK_D)
            m_i = m_new

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
    bh, start_m = _program(T, BLOCK_M, False)
    O += _bh_offset(bh, H, stride_ob, stride_oh)
    DO += _bh_offset(bh, H, stride_dob, stride_doh)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    o = _load_tile(O, offs_m, stride_ot, T, True, HEAD_DIM, BLOCK_D).to(tl.float32)
    do = _load_tile(DO, offs_m, stride_dot, T, True, HEAD_DIM, BLOCK_D).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


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
    # Works on the transposed problem (keys on rows) so that dK and dV come out with keys on
    # rows too: S^T = K Q^T, dV += P^T dO, dS^T = P^T * (V dO^T - delta), dK += dS^T Q.
    _check_tiles(HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, BLOCK_N, BLOCK_M)
    qk_scale, scale = _as_fp32(qk_scale), _as_fp32(scale)
    bh, start_n = _program(T, BLOCK_N, False)  # the first key tiles see the most queries: longest first already
    Q += _bh_offset(bh, H, stride_qb, stride_qh)
    K += _bh_offset(bh, H, stride_kb, stride_kh)
    V += _bh_offset(bh, H, stride_vb, stride_vh)
    DO += _bh_offset(bh, H, stride_dob, stride_doh)
    DK += _bh_offset(bh, H, stride_dkb, stride_dkh)
    DV += _bh_offset(bh, H, stride_dkb, stride_dkh)
    LSE += bh.to(tl.int64) * T
    DELTA += bh.to(tl.int64) * T

    offs_n = start_n + tl.arange(0, BLOCK_N)
    # Keys past T load as zeros; their dK/dV rows are garbage but never stored, and a key
    # row only ever affects its own dK/dV row, so no mask is needed on that axis.
    k = _load_tile(K, offs_n, stride_kt, T, True, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D)
    v = _load_tile(V, offs_n, stride_vt, T, True, HEAD_DIM, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    for stage in tl.static_range(3):
        lo, hi = _stage_range(stage, start_n, T, CAUSAL, BLOCK_N, BLOCK_M, True)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _load_tile(Q, offs_m, stride_qt, T, stage != FREE, HEAD_DIM, BLOCK_D)  # (BLOCK_M, BLOCK_D)
            do = _load_tile(DO, offs_m, stride_dot, T, stage != FREE, HEAD_DIM, BLOCK_D)  # (BLOCK_M, BLOCK_D)
            if stage != FREE:
                lse = tl.load(LSE + offs_m, mask=offs_m < T, other=0.0)
                delta = tl.load(DELTA + offs_m, mask=offs_m < T, other=0.0)
            else:
                lse = tl.load(LSE + offs_m)
                delta = tl.load(DELTA + offs_m)

            s_t = _dot(k, tl.trans(q), None, DOT_FP32) * qk_scale  # (BLOCK_N, BLOCK_M), log2 units
            p_t = tl.math.exp2(s_t - lse[None, :])  # exactly the forward's probabilities
            if stage != FREE:
                visible = offs_m[None, :] < T
                if CAUSAL:
                    visible = visible & (offs_m[None, :] >= offs_n[:, None])
                p_t = tl.where(visible, p_t, 0.0)

            dv = _dot(p_t.to(do.dtype), do, dv, DOT_FP32)  # (BLOCK_N, BLOCK_D)
            dp_t = _dot(v, tl.trans(do), None, DOT_FP32)  # (BLOCK_N, BLOCK_M)
            ds_t = p_t * (dp_t - delta[None, :])  # gradient w.r.t. the scaled scores
            dk = _dot(ds_t.to(q.dtype), q, dk, DOT_FP32)  # (BLOCK_N, BLOCK_D)

    # S = scale * Q K^T, so dK = scale * dS^T Q (dS w.r.t. the scaled scores, in nats:
    # the log2(e) inside qk_scale cancels against exp2).
    _store_tile(DK, offs_n, stride_dkt, T, dk * scale, HEAD_DIM, BLOCK_D)
    _store_tile(DV, offs_n, stride_dkt, T, dv, HEAD_DIM, BLOCK_D)


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
    # dQ += dS K over the keys this query tile sees, walked as the forward walks them.
    _check_tiles(HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, BLOCK_M, BLOCK_N)
    qk_scale, scale = _as_fp32(qk_scale), _as_fp32(scale)
    bh, start_m = _program(T, BLOCK_M, True)
    Q += _bh_offset(bh, H, stride_qb, stride_qh)
    K += _bh_offset(bh, H, stride_kb, stride_kh)
    V += _bh_offset(bh, H, stride_vb, stride_vh)
    DO += _bh_offset(bh, H, stride_dob, stride_doh)
    DQ += _bh_offset(bh, H, stride_dqb, stride_dqh)
    LSE += bh.to(tl.int64) * T
    DELTA += bh.to(tl.int64) * T

    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(Q, offs_m, stride_qt, T, True, HEAD_DIM, BLOCK_D)  # (BLOCK_M, BLOCK_D)
    do = _load_tile(DO, offs_m, stride_dot, T, True, HEAD_DIM, BLOCK_D)
    lse = tl.load(LSE + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for stage in tl.static_range(3):
        lo, hi = _stage_range(stage, start_m, T, CAUSAL, BLOCK_M, BLOCK_N, False)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = _load_tile(K, offs_n, stride_kt, T, stage != FREE, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D)
            v = _load_tile(V, offs_n, stride_vt, T, stage != FREE, HEAD_DIM, BLOCK_D)
            s = _dot(q, tl.trans(k), None, DOT_FP32) * qk_scale  # (BLOCK_M, BLOCK_N)
            p = tl.math.exp2(s - lse[:, None])
            if stage != FREE:
                # Unlike in the dK/dV kernel, keys past T must be hidden here: a zero key still
                # gets probability exp2(-lse) and would leak into every dQ row.
                visible = offs_n[None, :] < T
                if CAUSAL:
                    visible = visible & (offs_n[None, :] <= offs_m[:, None])
                p = tl.where(visible, p, 0.0)
            dp = _dot(do, tl.trans(v), None, DOT_FP32)  # (BLOCK_M, BLOCK_N)
            ds = p * (dp - delta[:, None])
            dq = _dot(ds.to(k.dtype), k, dq, DOT_FP32)  # (BLOCK_M, BLOCK_D)

    _store_tile(DQ, offs_m, stride_dqt, T, dq * scale, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------- launch


def _dot_fp32(dtype):
    return dtype == torch.float32 or (dtype == torch.bfloat16 and tiles.interpreting())


def _strides(t):
    """(batch, head, seq) strides; the last dimension is contiguous by construction."""
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _grid(B, H, T, rows_per_program):
    """One axis of B * H * tiles programs (see _program): no 65,535 limit on batch * heads."""
    return (B * H * triton.cdiv(T, rows_per_program),)


def _forward(q, k, v, causal, scale, arch=None):
    """Launch the forward; `arch` (e.g. 80) picks the tiles, default q's device's."""
    B, H, T, D = q.shape
    cfg = tiles.attention_tiles(D, q.dtype, tiles.arch_of(q.device) if arch is None else arch)
    block_m, block_n, warps, stages = cfg.fwd
    o = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B * H, T), dtype=torch.float32, device=q.device)
    _attn_fwd[_grid(B, H, T, block_m)](
        q, k, v, o, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        H, T, scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=tiles.block_d(D), BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=causal, DOT_FP32=_dot_fp32(q.dtype),
        num_warps=warps, num_stages=stages,
    )
    return o, lse


def _backward(do, q, k, v, o, lse, causal, scale, arch=None):
    """Launch the three backward kernels; returns dq, dk, dv."""
    B, H, T, D = q.shape
    cfg = tiles.attention_tiles(D, q.dtype, tiles.arch_of(q.device) if arch is None else arch)
    block_d = tiles.block_d(D)
    dot_fp32 = _dot_fp32(q.dtype)

    delta = torch.empty_like(lse)  # (B * H, T) fp32
    block_m = 8192 // block_d  # 8192-element tiles: 32 values of each input per thread
    _bwd_delta[_grid(B, H, T, block_m)](
        o, do, delta, *_strides(o), *_strides(do), H, T,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m, num_warps=8,
    )

    dq = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)

    block_m, block_n, warps, stages = cfg.dkdv
    _attn_bwd_dkdv[_grid(B, H, T, block_n)](
        q, k, v, do, dk, dv, lse, delta,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk),
        H, T, scale * LOG2E, scale,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=causal, DOT_FP32=dot_fp32,
        num_warps=warps, num_stages=stages,
    )

    block_m, block_n, warps, stages = cfg.dq
    _attn_bwd_dq[_grid(B, H, T, block_m)](
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
    reason = tiles.unsupported(q.device, head_dim, q.dtype)
    if reason is not None:
        raise ValueError(f"flash_attention: {reason}")


def flash_attention(q, k, v, causal=True, scale=None):
    """Scaled dot-product attention without materialising the (seq x seq) matrix.

    Equivalent to `F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)`
    for self-attention (queries and keys at the same positions), under torch.autocast too:
    there, as SDPA does, q, k and v are first cast to the autocast dtype.

    Args:
        q, k, v: (batch, heads, seq, head_dim) tensors of one dtype (float32, float16 or
            bfloat16) on CUDA, or on the CPU when TRITON_INTERPRET=1. Any seq >= 1 and
            head_dim <= 256; the last dimension should be contiguous (else it is copied).
        causal: if True, query i attends to keys 0..i only.
        scale: multiplies q . k before the softmax; default head_dim ** -0.5.

    Returns:
        (batch, heads, seq, head_dim) attention output in q's dtype (the autocast dtype
        under autocast), differentiable in q, k and v.

    Raises:
        ValueError: on a tensor that is not 4-D, mismatched shapes, dtypes or devices,
            head_dim > 256, or a device the kernel cannot run on (`kernels.available`).
    """
    if isinstance(q, torch.Tensor) and torch.is_autocast_enabled(q.device.type):
        # SDPA's autocast policy: run in the autocast dtype. The model's rotary cos/sin are
        # fp32, so under autocast q and k arrive in fp32 while v is already in bf16/fp16.
        low = torch.get_autocast_dtype(q.device.type)
        q, k, v = (t.to(low) if isinstance(t, torch.Tensor) and t.dtype in tiles.DTYPES else t for t in (q, k, v))
    _check(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if q.numel() == 0:
        return q.new_empty(q.shape)
    return _FlashAttention.apply(q, k, v, bool(causal), float(scale))
