"""GPT-NeoX, the network behind EleutherAI's Pythia and Databricks' Dolly v2, in one file.

Read it top to bottom; it follows the forward pass:

    token ids ─ embed_in ─┬─ layer 0 ─ ... ─ layer L-1 ─ final_layer_norm ─ embed_out ─ logits
                          │
    one layer (parallel residual, as every Pythia uses):
        x ──┬───────────────────────────────────────────────┐
            ├─ input_layernorm ─ attention (rotary on q, k) ─┤
            └─ post_attention_layernorm ─ mlp ──────────────(+)── x'

Module and parameter names are Hugging Face's GPT-NeoX names (minus the `gpt_neox.` prefix),
so a Pythia checkpoint lines up with this file key for key (minidolly/checkpoint.py).
Shapes: B batch, T new tokens, S keys attention reads (T, or a KVCache's length in a decode
step), H heads, D head_dim, C hidden, V vocab.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels  # our Triton kernels (kernels/); cheap: triton loads on their first use

from .config import ModelConfig

# ------------------------------------------------------------- rotary embedding
# RoPE (Su et al. 2021) encodes position by rotating pairs of dims of q and k by an angle
# proportional to the position; a dot product q·k then depends only on their distance.
# GPT-NeoX rotates only the first `rotary_dim = head_dim * rotary_pct` dims of each head (25% in
# Pythia) and pairs dim i with dim i + rotary_dim/2 ("rotate half"), not neighbours (GPT-J).


def rotary_cos_sin(config: ModelConfig, positions: torch.Tensor, dtype: torch.dtype):
    """cos and sin of the rotary angles at `positions` (integer tensor of any shape) -> two
    tensors of shape (*positions.shape, rotary_dim). A KVCache keeps this for every position
    it holds (a table made once) and decode steps look their rows up in it."""
    d = config.rotary_dim
    # inverse frequencies 1 / base^(2i/d), i = 0 .. d/2-1, in fp32 as HF and GPT-NeoX do
    inv_freq = 1.0 / (config.rotary_base ** (torch.arange(0, d, 2, device=positions.device, dtype=torch.float32) / d))
    angles = positions[..., None].float() * inv_freq  # (..., d/2)
    angles = torch.cat((angles, angles), dim=-1)  # (..., d): dim i and i + d/2 share an angle
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim: a 90° turn of each pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim dims of x (B, H, T, D); the rest pass through unchanged."""
    d = cos.shape[-1]
    x_rot, x_pass = x[..., :d], x[..., d:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


# ------------------------------------------------------------------ attention


class Attention(nn.Module):
    """Causal multi-head self-attention with one fused q/k/v projection."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        C = config.hidden_size
        # One matmul makes q, k and v. Its 3C output rows are grouped per head as
        # [head 0: q k v][head 1: q k v]..., i.e. (H, 3, D): Megatron's layout, kept by HF.
        self.query_key_value = nn.Linear(C, 3 * C, bias=config.attention_bias)
        self.dense = nn.Linear(C, C, bias=config.attention_bias)

    def forward(self, x, cos, sin, mask, kv_cache=None, fused=False, rows=None):
        B, T, C = x.shape
        H, D = self.config.num_heads, self.config.head_dim
        qkv = self.query_key_value(x).view(B, T, H, 3 * D).transpose(1, 2)  # (B, H, T, 3D)
        q, k, v = qkv.split(D, dim=-1)  # 3 x (B, H, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # (B, H, S, D) in the cache's dtype: a decode step reads the whole cache
        if T == 1 and mask is not None and q.device.type == "cpu" and torch.compiler.is_compiling():
            y = decode_attention(q, k, v, mask)  # a compiled CPU decode step: see there
        else:
            k, v = k.to(q.dtype), v.to(q.dtype)  # a no-op unless a 16-bit cache serves fp32 activations
            if fused and mask is None and T > 1:
                y = kernels.flash_attention(q, k, v, causal=True)  # kernels/attention.py
            elif mask is not None and q.dtype != torch.float32 and q.device.type == "cpu":
                # A decode step on CPU in 16 bits: torch's CPU attention kernel takes 4-8x longer
                # for one query over the cache in bf16 than in fp32 (310 vs 46 us a layer at 410m,
                # docs/generation.md), so it runs on fp32 copies; the same result to bf16 rounding.
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(q.dtype)
            else:
                # mask None: plain causal (or one new query, which may see every cached key)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, H, D) -> (B, T, C)
        if rows is not None:
            y = y.flatten(0, 1)[rows]  # (N, C): only the queries whose output is read
        return self.dense(y)


def decode_attention(q, k, v, mask):
    """One query per row over the cache, q (B, H, 1, D), k, v (B, H, S, D), mask (B, 1, 1, S),
    written as two sums and a softmax for torch.compile on CPU. Inductor makes it a few loops
    that read each key and value once in the cache's dtype and compute in fp32; torch's CPU
    SDPA kernel, made for many queries, took 1.6x as long per layer in fp32 and 2.4x in bf16,
    whose keys it first copies to fp32 (docs/generation.md, "Compiled decode on CPU")."""
    scores = (q.float() * k.float()).sum(-1) * q.shape[-1] ** -0.5  # (B, H, S)
    scores = scores.masked_fill(~mask[:, :, 0], float("-inf"))
    p = scores.softmax(-1)
    return (p.unsqueeze(-1) * v.float()).sum(-2, keepdim=True).to(q.dtype)  # (B, H, S, D) -> (B, H, 1, D)


# ------------------------------------------------------------------------ MLP


class MLP(nn.Module):
    """Position-wise feed-forward: C -> 4C, exact (erf) GELU, 4C -> C."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


# ---------------------------------------------------------------------- layer


def layer_norm(ln: nn.LayerNorm, x: torch.Tensor, fused: bool) -> torch.Tensor:
    """ln(x), through our fused Triton kernel (kernels/layernorm.py) when `fused`."""
    if fused:
        return kernels.layer_norm(x, ln.weight, ln.bias, ln.eps)
    return ln(x)


class Layer(nn.Module):
    """One transformer block: pre-LayerNorm attention and MLP, added to the residual stream."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask=None, kv_cache=None, fused=False, rows=None):
        """x (B, T, C) -> (B, T, C). With `rows`, flat indices into the B·T positions, only those
        come out, (N, C): keys and values still cover every position, but the attention output
        projection and the MLP run on N rows. The model passes it to its last layer, whose
        other positions nobody reads."""
        attn = self.attention(layer_norm(self.input_layernorm, x, fused), cos, sin, mask, kv_cache, fused, rows)
        if rows is not None:
            x = x.flatten(0, 1)[rows]  # (N, C)
        if self.use_parallel_residual:
            # GPT-J's parallel residual: attention and MLP read the same x, so on many GPUs
            # their two matmul chains run without waiting on each other (one all-reduce in TP).
            return x + attn + self.mlp(layer_norm(self.post_attention_layernorm, x, fused))
        x = x + attn  # the classic sequential block
        return x + self.mlp(layer_norm(self.post_attention_layernorm, x, fused))


# ------------------------------------------------------------------- KV cache


class KVCache:
    """Keys and values of every layer for `batch_size` slots of `max_length` positions.

    Per layer k, v: (slots, H, max_length, D), allocated once and never resized or sliced, so
    every decode step sees the same shapes: what torch.compile needs to compile the step once
    and CUDA graphs need to replay it (docs/generation.md). A slot (row) holds one sequence;
    the key of its token at position p lives at index p. Nothing here counts how full a slot
    is: each forward says where its tokens are (`positions`), row by row, so rows of
    different lengths share the cache with no padding on the left, and a server can put a new
    request into a free slot (`rows`) while the others keep decoding.

    `cos`, `sin`: the rotary table, (max_length, rotary_dim), made once here and looked up by
    position in every step.
    dtype: the model's activations (the rotary table's dtype); kv_dtype: what keys and values
    are stored in, dtype by default. A 16-bit cache under fp32 activations halves what a
    decode step reads of it (generate.kv_cache_dtype chooses); keys and values are rounded to
    it as they are stored, and every attention reads them so, prefill included.
    The tensors are marked static for torch.compile: CUDA graphs then update them in place
    instead of copying them into the graph's own memory at every replay.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int, device=None, dtype=None, kv_dtype=None):
        shape = (batch_size, config.num_heads, max_length, config.head_dim)
        kv_dtype = kv_dtype or dtype
        self.k = [torch.zeros(shape, device=device, dtype=kv_dtype) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=kv_dtype) for _ in range(config.num_layers)]
        self.cos, self.sin = rotary_cos_sin(config, torch.arange(max_length, device=device),
                                            dtype or torch.get_default_dtype())
        self.batch_size, self.max_length = batch_size, max_length
        for t in self.k + self.v + [self.cos, self.sin]:
            torch._dynamo.mark_static_address(t)

    def rows(self, start: int, stop: int) -> "KVCache":
        """Slots [start, stop) as a cache of their own: views, so writes land in this cache.
        A server prefills a new request into free slot i with `model(ids, cache=cache.rows(i, i + 1))`."""
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"slots [{start}, {stop}) are not in a cache of {self.batch_size}.")
        view = copy.copy(self)
        view.k, view.v = [t[start:stop] for t in self.k], [t[start:stop] for t in self.v]
        view.batch_size = stop - start
        return view

    def window(self, length: int, dynamic: bool = False) -> "KVCache":
        """Positions [0, length) of every slot as a cache of their own: views, so writes land in
        this cache, and a decode step through the view reads `length` keys per row instead of
        max_length (`window_length` chooses it). Made once per length and kept, the views are
        the same tensors at every step, which is what a compiled (CUDA-graph) step needs.
        dynamic: mark the length as dynamic for torch.compile, so that one graph serves every
        window (the compiled CPU step); otherwise each length compiles a graph of its own."""
        if not 0 < length <= self.max_length:
            raise ValueError(f"a window of {length} positions is not in a cache of {self.max_length}.")
        view = copy.copy(self)
        view.k, view.v = [t[:, :, :length] for t in self.k], [t[:, :, :length] for t in self.v]
        view.cos, view.sin, view.max_length = self.cos[:length], self.sin[:length], length
        for t in view.k + view.v + [view.cos, view.sin]:
            torch._dynamo.mark_static_address(t)
            if dynamic:
                torch._dynamo.mark_dynamic(t, 2 if t.dim() == 4 else 0)
        return view

    def layer(self, i: int, positions: torch.Tensor | None) -> "_LayerCache":
        return _LayerCache(self.k[i], self.v[i], positions)


class _LayerCache:
    """One layer's cache, bound to the positions of the tokens of one forward."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None):
        self.k, self.v, self.positions = k, v, positions

    def update(self, k, v):
        """Store the new keys and values (B, H, T, D); return the ones attention reads.

        positions None (a prefill from position 0): they go to [0, T) of every row and
        attention reads just them, causally. positions (B, T): row b's t-th token goes to index
        positions[b, t], and attention reads the whole cache, (B, H, S, D), under a mask.
        Either way in the cache's dtype: attention sees what a later step will read."""
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)  # (B, H, T, D)
        if self.positions is None:
            self.k[:, :, : k.shape[2]] = k
            self.v[:, :, : v.shape[2]] = v
            return k, v
        rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
        self.k[rows, :, self.positions] = k.transpose(1, 2)  # (B, T, H, D) into (B, H, S, D)
        self.v[rows, :, self.positions] = v.transpose(1, 2)
        return self.k, self.v


# ---------------------------------------------------------------------- model


class GPTNeoX(nn.Module):
    """The full causal language model.

    `use_kernels`: True runs LayerNorm and causal attention through our Triton kernels
    (kernels/), in any dtype (fp32 kernels are the exact reference); False through torch
    (F.layer_norm, SDPA); None (default) uses the kernels on CUDA for fp16/bf16 compute only,
    where they compete with SDPA's (fp32 goes to SDPA), except where torch's ops were measured
    faster on that GPU (kernels/tiles.py SLOWER: head_dim 256 on an H200). Where the kernels cannot run (no
    triton, a GPU without tiles for this head dim: see kernels.available), the model uses
    torch's ops and warns once. It is the one switch; change it as an attribute any time.
    """

    def __init__(self, config: ModelConfig, use_kernels: bool | None = None):
        super().__init__()
        self.config = config
        self.use_kernels = use_kernels
        # An uninitialised table (init_weights fills it): nn.Embedding's own normal_ init would
        # cost seconds on the meta device, where loaders and FSDP build the model.
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size,
                                     _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.embed_out.weight = self.embed_in.weight
        if not self.embed_in.weight.is_meta:  # on meta there is nothing to fill (load, FSDP)
            self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """GPT-NeoX's initialisation, as Pythia was trained from (see docs/architecture.md):
        every weight N(0, sqrt(2 / 5C)) ("small_init", Nguyen & Salazar 2019), except the two
        projections that write into the residual stream, N(0, 2 / (L sqrt(C))) ("wang_init",
        Wang 2021), so the stream's variance stays bounded as L layers add to it.
        Biases 0, LayerNorm weights 1."""
        C, L = self.config.hidden_size, self.config.num_layers
        small, wang = math.sqrt(2 / (5 * C)), 2 / (L * math.sqrt(C))
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("final_layer_norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith("attention.dense.weight") or name.endswith("dense_4h_to_h.weight"):
                p.normal_(0.0, wang)
            else:
                p.normal_(0.0, small)

    def _fused(self, x: torch.Tensor) -> bool:
        """Whether this forward on x's device runs LayerNorm and attention through kernels/."""
        if self.use_kernels is False or (self.use_kernels is None and not x.is_cuda):
            return False
        # The compute dtype: autocast's when it is on, else the embedding's (under FSDP's mixed
        # precision the root's parameters are already in the compute dtype when forward runs).
        device = x.device.type
        autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else self.embed_in.weight.dtype
        if self.use_kernels is None and dtype not in (torch.float16, torch.bfloat16):
            return False
        return kernels.available(x.device, self.config.head_dim, dtype, warn=True, only_if_faster=self.use_kernels is None)

    def forward(self, input_ids, positions=None, cache: KVCache | None = None, keep: torch.Tensor | None = None):
        """Logits for every position of `input_ids`, or only for those in `keep`.

        input_ids: (B, T) token ids.
        positions: optional (B, T) position of each token, every row its own; by default
            0 .. T-1 in every row. Without a cache they only set the rotary angles.
        cache: optional KVCache with B slots (a whole cache, or `cache.rows(i, j)`).
            Without `positions`, a prefill: the tokens' keys and values go to positions
            [0, T) of every row and attention is plain causal over them. With `positions`, a
            decode step (or a later chunk): each token's key and value go to its own position
            in its row, and a token sees every cached key at a position <= its own. Positions
            must be < cache.max_length. Keys a row wrote beyond its real length (a shorter row
            of a right-padded prefill; an earlier request in a reused slot) stay invisible,
            since a token only sees positions up to its own, and are overwritten by the token
            that reaches their position before anything can see them.
        keep: optional (B, T) bool, on any device; logits only where it is True. Training
            scores only response tokens, so it skips the prompt's and the padding's share of
            the (C -> V) matmul, forward and backward (about half of Dolly's tokens are
            prompt); a prefill keeps one position per row, the last real token, and skips
            (T-1) x V x C multiply-adds per row, often the largest matmul of the prefill. The
            last layer's MLP and attention output projection also run only on those positions:
            their outputs feed nothing but the logits.
        Returns logits (B, T, V), or (N, V) with `keep`, N = keep.sum(), in row-major order.
        """
        B, T = input_ids.shape
        device = input_ids.device
        mask = None  # None: plain causal over the T tokens of this call
        if positions is not None and cache is not None:
            # query (b, t) sees key slot s when s <= positions[b, t]: (B, 1, T, S). S is read off
            # a tensor, not cache.max_length: torch.compile keeps it symbolic in a dynamic window.
            mask = torch.arange(cache.k[0].shape[2], device=device) <= positions[:, None, :, None]
        layer_caches = [cache.layer(i, positions) for i in range(len(self.layers))] if cache is not None else None
        if positions is None:
            positions = torch.arange(T, device=device)[None]  # (1, T), the same for every row
        fused = mask is None and self._fused(input_ids)  # a decode step (masked, one token) keeps to torch
        rows = None  # the positions whose logits are wanted, as flat indices into B·T
        if keep is not None:
            rows = keep.flatten().nonzero().squeeze(1).to(device, non_blocking=True)  # (N,), row-major

        x = self.embed_in(input_ids)  # (B, T, C)
        if cache is not None:
            cos, sin = cache.cos[positions], cache.sin[positions]  # (B, T, rotary_dim) from the table
        else:
            cos, sin = rotary_cos_sin(self.config, positions, x.dtype)
        cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B, 1, T, rotary_dim): every head
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
            x = layer(x, cos, sin, mask, layer_caches[i] if cache is not None else None, fused,
                      rows if last else None)  # (B, T, C); after the last layer (N, C) with rows
        x = layer_norm(self.final_layer_norm, x, fused)
        return self.embed_out(x)  # (B, T, V) or (N, V)
