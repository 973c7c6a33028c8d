"""The Triton kernels against torch: F.layer_norm, and an fp32 softmax(QK^T)V reference.

Runs on the CPU through Triton's interpreter, so the environment variable must be set
before triton is first imported (triton.jit reads it when a kernel is defined). The
interpreter is slow: shapes are small, and the attention cases are a hand-picked list
that covers each Pythia head dim and each tiling edge case rather than a cross product.

Tolerances are per dtype and compare the kernel to an fp32 reference computed from the
same (rounded) inputs, so they measure the kernel's own error: fp32 ~ rounding noise;
fp16 / bf16 ~ one or two units in the last place of the output dtype (the interpreter
truncates fp32 -> bf16 instead of rounding, hence two for bf16), plus, for attention,
the rounding of P and dS to the input dtype before their matmuls.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
from kernels import flash_attention, layer_norm  # noqa: E402

TOL = {  # (atol, rtol)
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
ATTN_TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def test_available_under_interpreter():
    assert kernels.available()


# -------------------------------------------------------------------- LayerNorm


def _layer_norm_check(shape, dtype, seed=0):
    torch.manual_seed(seed)
    n = shape[-1]
    x = (torch.randn(shape) * 2 + 0.5).to(dtype).requires_grad_()  # nonzero mean on purpose
    w = (1 + 0.2 * torch.randn(n)).to(dtype).requires_grad_()
    b = (0.2 * torch.randn(n)).to(dtype).requires_grad_()
    y = layer_norm(x, w, b, 1e-5)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), dy)

    ref_in = [t.detach().float().requires_grad_() for t in (x, w, b)]
    y_ref = F.layer_norm(ref_in[0], (n,), ref_in[1], ref_in[2], 1e-5)
    ref_grads = torch.autograd.grad(y_ref, ref_in, dy.float())

    assert y.dtype == dtype and y.shape == x.shape
    atol, rtol = TOL[dtype]
    for name, got, want in zip(("y", "dx", "dw", "db"), (y, *grads), (y_ref, *ref_grads)):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [128, 1920, 2560, 5120])  # Pythia's smallest, and the non-powers of two
def test_layer_norm_matches_torch(n, dtype):
    _layer_norm_check((3, 5, n), dtype)


@pytest.mark.parametrize("shape", [(7,), (1, 100), (2, 3, 2, 96), (37, 512)])
def test_layer_norm_leading_shapes(shape):
    # (37, 512): more rows than the interpreter's 8 backward groups, uneven split.
    _layer_norm_check(shape, torch.float32)


def test_layer_norm_default_weight_and_bias():
    x = torch.randn(4, 96, requires_grad=True)
    y = layer_norm(x, None, None, 1e-5)
    torch.testing.assert_close(y, F.layer_norm(x, (96,), eps=1e-5))


def test_layer_norm_backward_is_deterministic():
    x = torch.randn(50, 256, requires_grad=True)
    w = torch.randn(256, requires_grad=True)
    b = torch.randn(256, requires_grad=True)
    dy = torch.randn(50, 256)
    first = torch.autograd.grad(layer_norm(x, w, b, 1e-5), (x, w, b), dy)
    second = torch.autograd.grad(layer_norm(x, w, b, 1e-5), (x, w, b), dy)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_layer_norm_bad_inputs():
    x = torch.randn(4, 64)
    w, b = torch.ones(64), torch.zeros(64)
    with pytest.raises(ValueError, match=r"weight has shape \(32,\)"):
        layer_norm(x, torch.ones(32), b)
    with pytest.raises(ValueError, match="bias has shape"):
        layer_norm(x, w, torch.zeros(64, 1))
    with pytest.raises(ValueError, match="weight is torch.float16 but x is torch.float32"):
        layer_norm(x, w.half(), b)
    with pytest.raises(ValueError, match="at least one dimension"):
        layer_norm(torch.tensor(1.0), w, b)
    with pytest.raises(ValueError, match="float64"):
        layer_norm(x.double(), w.double(), b.double())


# -------------------------------------------------------------------- attention


def _attention_reference(q, k, v, causal, scale):
    """softmax(q k^T * scale) v, spelled out in fp32 with the (T, T) matrix materialised."""
    s = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, T, T)
    if causal:
        T = q.shape[-2]
        future = torch.ones(T, T, dtype=torch.bool).triu(1)
        s = s.masked_fill(future, float("-inf"))
    return torch.softmax(s, dim=-1) @ v.float()


def _attention_check(B, H, T, D, dtype, causal, layout="bhtd", scale=None, seed=0):
    torch.manual_seed(seed)
    if layout == "bhtd":
        q, k, v = (torch.randn(B, H, T, D).to(dtype).requires_grad_() for _ in range(3))
        qkv = (q, k, v)
    else:  # (B, T, H, D) storage viewed as (B, H, T, D): strided, as the model produces
        leaves = [torch.randn(B, T, H, D).to(dtype).requires_grad_() for _ in range(3)]
        qkv = [t.transpose(1, 2) for t in leaves]
    o = flash_attention(*qkv, causal=causal, scale=scale)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, qkv, do)

    ref_in = [t.detach().float().requires_grad_() for t in qkv]
    o_ref = _attention_reference(*ref_in, causal, D**-0.5 if scale is None else scale)
    ref_grads = torch.autograd.grad(o_ref, ref_in, do.float())

    assert o.dtype == dtype and o.shape == (B, H, T, D)
    atol, rtol = ATTN_TOL[dtype]
    for name, got, want in zip(("o", "dq", "dk", "dv"), (o, *grads), (o_ref, *ref_grads)):
        torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# (B, H, T, D, dtype, causal). fp16/bf16 run the tensor-core tiles (forward 128 x 64
# queries x keys for D <= 128, 64 x 32 at 256; dK/dV 32 x 128): T = 129 and 200 reach the
# unmasked off-diagonal tiles, the ragged last tile, and (T = 200) the dK/dV kernel's
# unmasked middle range. fp32 runs its own 32 x 32 (16 x 16 for D > 64) tiles, so T = 300
# crosses many of them.
ATTENTION_CASES = [
    (2, 2, 17, 64, torch.float32, True),  # batch > 1, one ragged tile
    (1, 1, 300, 64, torch.float32, True),
    (1, 1, 300, 64, torch.float32, False),
    (1, 2, 129, 32, torch.float32, True),
    (1, 2, 33, 32, torch.float16, False),
    (2, 1, 129, 80, torch.float16, True),  # 80: padded to 128 columns
    (1, 2, 129, 80, torch.float16, False),
    (1, 1, 1, 128, torch.float16, True),  # a single token
    (1, 2, 200, 128, torch.float16, True),
    (1, 1, 100, 256, torch.float32, False),  # 256: smaller tiles
    (2, 1, 70, 256, torch.float16, True),
    (1, 2, 65, 64, torch.bfloat16, True),  # bf16 dot upcast under the interpreter
]


@pytest.mark.parametrize("B,H,T,D,dtype,causal", ATTENTION_CASES,
                         ids=[f"B{c[0]}H{c[1]}T{c[2]}D{c[3]}-{str(c[4])[6:]}-{'causal' if c[5] else 'full'}" for c in ATTENTION_CASES])
def test_flash_attention_matches_reference(B, H, T, D, dtype, causal):
    _attention_check(B, H, T, D, dtype, causal)


def test_flash_attention_matches_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 50, 64) for _ in range(3))
    torch.testing.assert_close(flash_attention(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True),
                               atol=2e-5, rtol=2e-5)


def test_flash_attention_strided_inputs_and_custom_scale():
    _attention_check(2, 3, 40, 64, torch.float32, True, layout="bthd", scale=0.3)


def test_flash_attention_bad_inputs():
    q = torch.randn(1, 2, 8, 64)
    with pytest.raises(ValueError, match=r"q must be a 4-D tensor .* got \(2, 8, 64\)"):
        flash_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match=r"k \(1, 2, 9, 64\)"):
        flash_attention(q, torch.randn(1, 2, 9, 64), q)
    with pytest.raises(ValueError, match="head_dim is 320"):
        big = torch.randn(1, 1, 4, 320)
        flash_attention(big, big, big)
    with pytest.raises(ValueError, match="v torch.float16"):
        flash_attention(q, q, q.half())


# ----------------------------------------------------------------- whole model


def test_model_with_kernels_matches_torch_path():
    """Whole model with kernels on equals the torch path on a tiny config, forward and backward."""
    from minidolly.config import ModelConfig
    from minidolly.model import GPTNeoX

    config = ModelConfig(vocab_size=96, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256,
                         rotary_pct=0.25, max_position_embeddings=64)  # head_dim 32, as pythia-14m
    torch.manual_seed(0)
    torch_model = GPTNeoX(config, use_kernels=False)
    with torch.no_grad():  # LayerNorms away from (1, 0) so a skipped or misapplied affine shows
        for name, p in torch_model.named_parameters():
            if "layernorm" in name or "final_layer_norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    kernel_model = GPTNeoX(config, use_kernels=True)
    kernel_model.load_state_dict(torch_model.state_dict())

    ids = torch.randint(0, config.vocab_size, (2, 19))
    targets = torch.randint(0, config.vocab_size, (2, 19))
    results = []
    for model in (torch_model, kernel_model):
        logits = model(ids)
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))

    (ref_logits, ref_grads), (logits, grads) = results
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert ref_grads.keys() == grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
