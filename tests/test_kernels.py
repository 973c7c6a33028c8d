"""The Triton kernels against torch: F.layer_norm, and an fp32 softmax(QK^T)V reference;
how they decide where they run; and what they compile to on each GPU architecture.

Without a GPU they run on the CPU through Triton's interpreter, which must be switched on
before triton is first imported (triton.jit reads it when it defines a kernel, ours and
triton.language's own; importing minidolly does not import triton). With a GPU the same tests
run on it, compiled, and the tests marked `cuda` add wider sweeps (`pytest -m cuda`). The
interpreter is slow: shapes are small, and the attention cases are a hand-picked list
that covers each Pythia head dim and each tiling edge case rather than a cross product.

Tolerances are per dtype and compare the kernel to an fp32 reference computed from the
same (rounded) inputs, so they measure the kernel's own error: fp32 ~ rounding noise;
fp16 / bf16 ~ one or two units in the last place of the output dtype (the interpreter
truncates fp32 -> bf16 instead of rounding, hence two for bf16), plus, for attention,
the rounding of P and dS to the input dtype before their matmuls.
"""

import json
import math
import os
import pathlib
import subprocess
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import kernels  # noqa: E402
from kernels import flash_attention, layer_norm, tiles  # noqa: E402
from minidolly.config import ModelConfig  # noqa: E402
from minidolly.model import GPTNeoX  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO = pathlib.Path(__file__).resolve().parents[1]
# A test that means to run the kernels must not pass because the model quietly fell back.
pytestmark = pytest.mark.filterwarnings("error::kernels.FallbackWarning")

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


@pytest.fixture(autouse=True)
def _on_device():
    """Tensors made in these tests are made on DEVICE (the GPU when there is one)."""
    with torch.device(DEVICE):
        yield


def test_available_here():
    assert kernels.available(DEVICE)


# -------------------------------------------------------------------- LayerNorm


def _layer_norm_pairs(shape, dtype, seed=0):
    """[(name, kernel's, fp32 reference's)] for y, dx, dw and db on random inputs."""
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
    return list(zip(("y", "dx", "dw", "db"), (y, *grads), (y_ref, *ref_grads)))


def _layer_norm_check(shape, dtype, seed=0):
    atol, rtol = TOL[dtype]
    for name, got, want in _layer_norm_pairs(shape, dtype, seed):
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


def _attention_pairs(B, H, T, D, dtype, causal, layout="bhtd", scale=None, seed=0):
    """[(name, kernel's, fp32 reference's)] for o, dq, dk and dv on random inputs."""
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
    return list(zip(("o", "dq", "dk", "dv"), (o, *grads), (o_ref, *ref_grads)))


def _attention_check(B, H, T, D, dtype, causal, layout="bhtd", scale=None, seed=0):
    atol, rtol = ATTN_TOL[dtype]
    for name, got, want in _attention_pairs(B, H, T, D, dtype, causal, layout, scale, seed):
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
    (3, 2, 150, 64, torch.float16, True),  # several (batch, head)s x query tiles on the 1-D grid
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


def _model_pair(config, dtype=torch.float32):
    """(torch path, kernel path): two GPTNeoX with the same weights, LayerNorms moved away from
    (1, 0) so that a skipped or misapplied affine shows."""
    torch.manual_seed(0)
    torch_model = GPTNeoX(config, use_kernels=False)
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            if "layernorm" in name or "final_layer_norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    kernel_model = GPTNeoX(config, use_kernels=True)
    kernel_model.load_state_dict(torch_model.state_dict())
    return torch_model.to(dtype), kernel_model.to(dtype)


def _logits_and_grads(model, ids, targets):
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()
    return logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}


def _rel_err(got, want, floor=1e-6):
    """max |got - want| / max(max |want|, floor): one number per tensor, robust to tiny reference entries."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(floor)).item()


def test_model_with_kernels_matches_torch_path():
    """Whole model with kernels on equals the torch path on a tiny config, forward and backward."""
    config = ModelConfig(vocab_size=96, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256,
                         rotary_pct=0.25, max_position_embeddings=64)  # head_dim 32, as pythia-14m
    torch_model, kernel_model = _model_pair(config)
    ids = torch.randint(0, config.vocab_size, (2, 19))
    targets = torch.randint(0, config.vocab_size, (2, 19))
    ref_logits, ref_grads = _logits_and_grads(torch_model, ids, targets)
    logits, grads = _logits_and_grads(kernel_model, ids, targets)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert ref_grads.keys() == grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------ autocast


def test_model_with_kernels_under_autocast_matches_torch_path():
    """fp32 weights under torch.autocast(fp16): the usual mixed-precision call. The fp32
    rotary cos/sin leave q and k in fp32 while v is fp16; the kernels must cast as SDPA does
    (and run LayerNorm in fp32 as autocast does) instead of failing on mixed dtypes."""
    config = ModelConfig.from_size("14m")
    torch_model, kernel_model = _model_pair(config)
    ids = torch.randint(0, config.vocab_size, (2, 37))
    targets = torch.randint(0, config.vocab_size, (2, 37))
    with torch.autocast(DEVICE, dtype=torch.float16):
        ref_logits, ref_grads = _logits_and_grads(torch_model, ids, targets)
        logits, grads = _logits_and_grads(kernel_model, ids, targets)
    assert _rel_err(logits, ref_logits) < 1e-2
    for name in ref_grads:
        assert _rel_err(grads[name], ref_grads[name]) < 3e-2, name


def test_flash_attention_under_autocast_casts_like_sdpa():
    torch.manual_seed(0)
    q, k = (torch.randn(2, 2, 40, 64, requires_grad=True) for _ in range(2))  # fp32
    v = torch.randn(2, 2, 40, 64).half().requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.float16):
        o = flash_attention(q, k, v)
        o_ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert o.dtype == o_ref.dtype == torch.float16
    torch.testing.assert_close(o, o_ref, atol=5e-3, rtol=5e-3)
    (o.float() ** 2).sum().backward()
    assert q.grad.dtype == torch.float32 and v.grad.dtype == torch.float16  # gradients in each input's dtype


def test_layer_norm_under_autocast_runs_in_fp32():
    torch.manual_seed(0)
    x = torch.randn(6, 256).half()
    w, b = 1 + 0.2 * torch.randn(256), 0.2 * torch.randn(256)  # fp32 parameters, as a model under autocast has
    with torch.autocast(DEVICE, dtype=torch.float16):
        y = layer_norm(x, w, b, 1e-5)
    assert y.dtype == torch.float32  # what F.layer_norm gives under CUDA's autocast
    torch.testing.assert_close(y, F.layer_norm(x.float(), (256,), w, b, 1e-5), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------ which device runs them

GPUS = {  # name: (compute capability, opt-in shared memory per block in KiB)
    "H100": ((9, 0), 227), "A100": ((8, 0), 163), "A10": ((8, 6), 99), "L4": ((8, 9), 99),
    "Jetson Orin": ((8, 7), 163), "T4": ((7, 5), 64), "V100": ((7, 0), 96), "B200": ((10, 0), 227),
    "sm_80 with 99 KiB": ((8, 0), 99),  # less than the sm_80 tiles were checked against
}


@pytest.fixture
def fake_gpu(monkeypatch):
    """install(name): torch reports one CUDA GPU of that kind (GPUS); no GPU is touched."""
    def install(name):
        capability, smem = GPUS[name]
        props = types.SimpleNamespace(name=name, major=capability[0], minor=capability[1],
                                      shared_memory_per_block_optin=smem * 1024, multi_processor_count=100)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(kernels, "_warned", set())  # each test sees its own first warning
        return torch.device("cuda", 0)

    return install


@pytest.mark.parametrize("gpu,head_dim,dtype,runs", [
    ("H100", 128, torch.bfloat16, True), ("A100", 128, torch.bfloat16, True), ("A100", 256, torch.float16, True),
    ("A10", 80, torch.float16, True), ("L4", 256, torch.bfloat16, True), ("Jetson Orin", 64, torch.bfloat16, True),
    ("T4", 128, torch.float16, False),  # Triton 3.9 has no tensor-core code for sm_75
    ("T4", 64, torch.float32, True),  # but the exact fp32 path fits its 64 KiB
    ("V100", 64, torch.float16, False), ("B200", 128, torch.bfloat16, False),  # no table: never checked there
    ("sm_80 with 99 KiB", 64, torch.bfloat16, False),
])
def test_available_decides_per_device(fake_gpu, gpu, head_dim, dtype, runs):
    device = fake_gpu(gpu)
    assert kernels.available(device, head_dim, dtype) is runs
    assert kernels.available(None, head_dim, dtype) is runs  # None: the current CUDA device
    reason = kernels.unavailable_reason(device, head_dim, dtype)
    assert (reason is None) is runs
    if not runs:
        assert "\n" not in reason and (gpu in reason or "sm_" in reason)


def test_each_gpu_runs_its_own_architectures_tiles(fake_gpu):
    assert tiles.arch_of(fake_gpu("A100")) == 80
    assert tiles.arch_of(fake_gpu("Jetson Orin")) == 80  # sm_87: sm_80's shared memory and tiles
    assert tiles.arch_of(fake_gpu("L4")) == 89
    for arch in tiles.ARCHS:  # and every table entry keeps its invariants
        for head_dim in (32, 64, 80, 128, 256):
            for dtype in tiles.DTYPES:
                if tiles.unsupported_on_arch(arch, head_dim, dtype) is None:
                    cfg = tiles.attention_tiles(head_dim, dtype, arch)
                    assert cfg.fwd[0] % cfg.fwd[1] == 0 and cfg.dq[0] % cfg.dq[1] == 0 and cfg.dkdv[1] % cfg.dkdv[0] == 0


def _fake_cuda_input():
    return types.SimpleNamespace(device=torch.device("cuda", 0), is_cuda=True)


def _tiny(dtype=torch.float32, use_kernels=None):
    config = ModelConfig(vocab_size=64, hidden_size=256, num_layers=1, num_heads=2, intermediate_size=256,
                         max_position_embeddings=32)  # head_dim 128
    return GPTNeoX(config, use_kernels=use_kernels).to(dtype)


def test_model_falls_back_to_torch_where_no_tiles_fit_and_says_so_once(fake_gpu):
    fake_gpu("T4")
    model = _tiny(torch.float16)
    with pytest.warns(kernels.FallbackWarning, match=r"kernels are off: .*sm_75.*using torch's SDPA"):
        assert model._fused(_fake_cuda_input()) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model._fused(_fake_cuda_input()) is False  # the note comes once
    model.use_kernels = True  # asked for explicitly: still no crash, torch's ops instead
    assert model._fused(_fake_cuda_input()) is False


def test_default_switch_uses_kernels_on_cuda_for_fp16_and_bf16_only(fake_gpu):
    fake_gpu("H100")
    cuda_input, cpu_input = _fake_cuda_input(), torch.zeros(1, 1, dtype=torch.long)
    assert _tiny(torch.bfloat16)._fused(cuda_input) is True
    assert _tiny(torch.float16)._fused(cuda_input) is True
    assert _tiny(torch.float32)._fused(cuda_input) is False  # fp32 goes to SDPA, which is faster there
    assert _tiny(torch.float32, use_kernels=True)._fused(cuda_input) is True  # the exact fp32 reference, on request
    assert _tiny(torch.bfloat16)._fused(cpu_input) is False  # the default never picks the interpreter
    assert _tiny(torch.bfloat16, use_kernels=False)._fused(cuda_input) is False


def test_default_switch_leaves_the_kernels_where_torch_was_measured_faster(fake_gpu):
    """An H200 ran SDPA's flash backend 2x faster than our head_dim 256 tiles (pythia-1b):
    there the default switch picks torch's ops, with the measurement as its one-line note,
    and an explicit use_kernels=True (`--kernels on`) still runs ours."""
    fake_gpu("H100")
    config = ModelConfig(vocab_size=64, hidden_size=512, num_layers=1, num_heads=2, intermediate_size=256,
                         max_position_embeddings=32)  # head_dim 256
    model = GPTNeoX(config).to(torch.bfloat16)
    with pytest.warns(kernels.FallbackWarning, match="head_dim 256 2.0-2.4x faster"):
        assert model._fused(_fake_cuda_input()) is False
    model.use_kernels = True
    assert model._fused(_fake_cuda_input()) is True
    assert kernels.unavailable_reason(torch.device("cuda", 0), 256, torch.bfloat16) is None  # they can run
    assert _tiny(torch.bfloat16)._fused(_fake_cuda_input()) is True  # head_dim 128: ours are faster
    fake_gpu("A100")  # not measured on sm_80: the kernels stay the default there
    model.use_kernels = None
    assert model._fused(_fake_cuda_input()) is True


def test_kernels_requested_where_they_cannot_run_fall_back(monkeypatch):
    monkeypatch.setattr(kernels, "_warned", set())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a plain CPU: neither GPU nor interpreter
    model = _tiny(use_kernels=True)
    with pytest.warns(kernels.FallbackWarning, match="TRITON_INTERPRET=1"):
        assert model._fused(torch.zeros(1, 1, dtype=torch.long, device="cpu")) is False


def test_the_switch_is_a_constant_to_torch_compile():
    """A fullgraph compile of a forward must not trace device queries or the fallback warning."""
    model = _tiny(use_kernels=True)
    ids = torch.zeros(1, 3, dtype=torch.long)
    eager = model._fused(ids)
    compiled = torch.compile(lambda x: x + 1 if model._fused(x) else x - 1, fullgraph=True, backend="eager")
    assert torch.equal(compiled(ids), ids + 1 if eager else ids - 1)


def test_importing_the_model_does_not_import_triton():
    """triton.jit reads TRITON_INTERPRET when triton.language and our kernels are defined, so
    importing the model must leave triton alone until a kernel is used."""
    code = "import sys, minidolly.model, kernels; assert 'triton' not in sys.modules, 'triton imported'"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


# ------------------------------------------------------ tiles and the launch grid


@pytest.mark.parametrize("arch", [a for a in tiles.ARCHS if a != tiles.INTERPRETER_ARCH])
def test_each_architectures_tiles_compute_attention(arch, monkeypatch):
    """Every architecture's table, run here: a tiling bug in one would show in its output."""
    if DEVICE == "cuda" and tiles._shared_memory(torch.device("cuda")) < tiles.ARCHS[arch].shared_memory:
        pytest.skip(f"this GPU has less shared memory than sm_{arch}'s tiles may use")
    monkeypatch.setattr(tiles, "arch_of", lambda device: arch)
    dtype = torch.float16 if tiles.ARCHS[arch].tensor_cores else torch.float32
    _attention_check(1, 2, 150, 80, dtype, True)


def test_tile_invariants_are_checked_when_a_kernel_compiles(monkeypatch):
    bad = tiles.AttentionTiles((64, 128, 4, 1), (32, 64, 4, 1), (64, 32, 4, 1))  # 64 queries, 128-key steps
    monkeypatch.setitem(tiles._ATTENTION, tiles.INTERPRETER_ARCH, {"16": {256: bad}, "32": {256: bad}})
    monkeypatch.setattr(tiles, "arch_of", lambda device: tiles.INTERPRETER_ARCH)
    q = torch.randn(1, 1, 16, 64)
    with pytest.raises(Exception, match="must be a multiple of the walk"):
        flash_attention(q, q, q)


class _Recorder:
    """Stands in for a triton kernel: records the grid of each launch, runs nothing."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return lambda *args, **kwargs: None


def test_attention_grid_takes_any_batch_times_heads(monkeypatch):
    """CUDA caps grid axes 1 and 2 at 65,535 programs (axis 0 at 2**31 - 1). 4100 x 16 =
    65,600 (batch, head)s must not land on a capped axis."""
    from kernels import attention

    recorders = {name: _Recorder() for name in ("_attn_fwd", "_bwd_delta", "_attn_bwd_dkdv", "_attn_bwd_dq")}
    for name, recorder in recorders.items():
        monkeypatch.setattr(attention, name, recorder)
    B, H, T, D = 4100, 16, 3, 32
    q = torch.zeros(B, H, T, D, dtype=torch.float16)
    o, lse = attention._forward(q, q, q, True, 0.125)
    attention._backward(q, q, q, q, o, lse, True, 0.125)
    for name, recorder in recorders.items():
        (grid,) = recorder.grids
        assert grid[0] < 2**31 and all(g <= 65535 for g in grid[1:]), (name, grid)
        assert math.prod(grid) >= B * H, (name, grid)  # every (batch, head) has a program


def test_every_tile_configuration_compiles_without_spills_within_shared_memory():
    """Each architecture's tiles, compiled ahead of time for it (kernels/aot.py: Triton's
    compiler and ptxas, no GPU): zero bytes of register spill, and shared memory within the
    architecture's opt-in limit. A separate process, since this one runs the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "kernels.aot", "--json"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    rows = json.loads(run.stdout)
    for arch, spec in tiles.ARCHS.items():
        cases = {r["case"] for r in rows if r["arch"] == arch}
        wanted = {f"attention D={d} bfloat16" for d in (32, 64, 80, 128, 256) if spec.tensor_cores}
        widest_fp32 = max(d for d in (32, 64, 80, 128, 256) if tiles.attention_tiles(d, torch.float32, arch))
        wanted.add(f"attention D={widest_fp32} float32")
        wanted |= {"layer_norm N=5120 bfloat16", "layer_norm N=5120 float32"}
        assert wanted <= cases, (arch, wanted - cases)
    bad = [r for r in rows if r["spill_bytes"] > 0 or r["shared"] > r["shared_limit"]]
    assert not bad, "\n".join(map(str, bad))


def test_kernels_compile_with_float_arguments_as_torch_compile_passes_them():
    """torch.compile launches our kernels from its own generated code and types a Python float
    (the softmax scale, LayerNorm's eps) as fp64 where Triton's launcher says fp32. Found on an
    H200: the fp64 scale made the scores fp64 and tl.dot refused its fp32 accumulator, so
    every `train.py --compile` run died at its first forward. Every kernel, compiled for sm_90 so typed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "kernels.aot", "--arch", "90", "--floats", "fp64", "--json"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    kernels_compiled = {r["kernel"] for r in json.loads(run.stdout)}
    assert {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_layer_norm_fwd"} <= kernels_compiled


# ------------------------------------------------- on a GPU (`pytest -m cuda`)
# Wider sweeps than the interpreter affords: compiled code, every Pythia head dim, both
# 16-bit dtypes, ragged lengths from 1 to past a thousand, forward and backward. Errors are
# max |err| / max |ref| against fp32 from the same rounded inputs.

CUDA_TOL = {torch.float16: 1e-2, torch.bfloat16: 4e-2}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [32, 64, 80, 128, 256])
def test_cuda_flash_attention_every_head_dim(head_dim, dtype):
    for T, causal, layout in ((1, True, "bhtd"), (77, True, "bthd"), (129, False, "bhtd"),
                              (1000, True, "bthd"), (2048, True, "bhtd")):
        for name, got, want in _attention_pairs(2, 3, T, head_dim, dtype, causal, layout, seed=T):
            # The floor is for gradients that are zero in exact arithmetic: at T = 1 softmax over
            # one key is constant, so dQ and dK are 0, and a GPU gets rounding noise of ~1e-7
            # (delta = rowsum(dO * O) and dP = dO V^T agree only to rounding), as an H200 showed.
            err = _rel_err(got, want, floor=1e-2)
            assert err <= CUDA_TOL[dtype], f"T={T} causal={causal} {layout} {name}: {err:.2e}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_layer_norm_every_pythia_width(dtype):
    from kernels.layernorm import MAX_HIDDEN

    for n in (128, 512, 768, 1024, 2048, 2560, 4096, 5120, MAX_HIDDEN):
        for name, got, want in _layer_norm_pairs((4099, n), dtype, seed=n):  # a ragged row count
            err = _rel_err(got, want)
            assert err <= CUDA_TOL[dtype], f"N={n} {name}: {err:.2e}"


@pytest.mark.cuda
@pytest.mark.parametrize("hidden,heads", [(160, 2), (256, 2), (512, 2), (512, 8)])  # head dims 80, 128, 256, 64
def test_cuda_model_kernels_on_vs_off_bf16(hidden, heads):
    config = ModelConfig(vocab_size=512, hidden_size=hidden, num_layers=2, num_heads=heads,
                         intermediate_size=4 * hidden, max_position_embeddings=1024)
    torch_model, kernel_model = _model_pair(config, torch.bfloat16)
    assert kernel_model._fused(torch.zeros(1, 1, dtype=torch.long))  # the kernels really run
    ids = torch.randint(0, config.vocab_size, (2, 300))
    targets = torch.randint(0, config.vocab_size, (2, 300))
    ref_logits, ref_grads = _logits_and_grads(torch_model, ids, targets)
    logits, grads = _logits_and_grads(kernel_model, ids, targets)
    assert _rel_err(logits, ref_logits) < 5e-2
    for name in ref_grads:
        assert _rel_err(grads[name], ref_grads[name]) < 5e-2, name


@pytest.mark.cuda
def test_cuda_default_switch_under_autocast():
    """fp32 weights under autocast(bf16), the default switch: the kernels run, and agree."""
    config = ModelConfig(vocab_size=512, hidden_size=256, num_layers=2, num_heads=2, intermediate_size=1024,
                         max_position_embeddings=1024)
    torch_model, kernel_model = _model_pair(config)
    kernel_model.use_kernels = None
    ids = torch.randint(0, config.vocab_size, (2, 200))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert kernel_model._fused(ids)
        torch.testing.assert_close(kernel_model(ids).float(), torch_model(ids).float(), atol=0.1, rtol=0.05)


def test_gpu_command_lists_its_steps(tmp_path):
    """bench/gpu.sh is run by a GPU owner, once, with little time: its dry run must list every
    step and write the summary it promises."""
    run = subprocess.run(["bash", "bench/gpu.sh", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "DRY_RUN": "1"}, timeout=60)
    assert run.returncode == 0, run.stderr
    for name in ("cuda_tests", "bench_kernels", "bench_train_1.4b", "bench_generate_2.8b"):
        assert f"step {name} (timeout" in run.stdout, name
    assert "--device cuda" in run.stdout and "pytest -m cuda" in run.stdout
    assert (tmp_path / "out" / "summary.txt").read_text().count("DRY ") == 4
