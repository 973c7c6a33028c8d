"""Weight-only quantization: the kernels against a dequantized reference, a quantized model
against full precision, save/load of a quantized checkpoint, the 16-bit CPU path, the CLI."""

import copy
import json
import os
import pickle
import struct
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import REPO, TOKENIZER_JSON, make_hf_checkpoint
from minidolly import CheckpointError, QuantizationError, load_model, save_model
from minidolly import quantize as Q

IDS = torch.tensor([[12092, 1533, 13, 50277, 187, 510, 4062, 8516], [510, 4062, 8516, 13, 50277, 187, 12092, 1533]])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: a second thread only adds barrier waits on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference(x, weight, bias):
    """x @ weight.T + bias in fp64, from the bf16-rounded activations the kernels take."""
    y = x.to(torch.bfloat16).double() @ weight.double().T
    return y + bias.double() if bias is not None else y


# ------------------------------------------------------------------ kernels


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 256), (3, 5, 256)])  # batch-1 decode; a small batch of several tokens
def test_kernel_matches_dequantized_reference(mode, dtype, shape):
    torch.manual_seed(0)
    N = 200  # not a multiple of 64: the int4 kernel's padding rows must be cut off again
    linear = nn.Linear(shape[-1], N).to(dtype)
    q = Q.quantize_linear(linear, mode, group_size=64)
    stored = Q.quantize_to_file_layout(linear.weight.detach(), mode, 64)
    if mode == "int8":
        deq = stored["weight"].double() * stored["weight_scale"].double()[:, None]
    else:
        deq = Q.dequantize_int4(stored["weight"], stored["weight_scale"], stored["weight_zero"], 64)
    x = torch.randn(*shape).to(dtype)
    y = q(x)
    assert y.dtype == dtype and y.shape == (*shape[:-1], N)
    ref = reference(x, deq, linear.bias)
    # the kernels round their output to bf16 (8 significant bits) before the bias is added
    assert (y.double() - ref).abs().max() <= 0.01 * ref.abs().max()
    # and the dequantized weight is the float weight to within half a quantization step
    w = linear.weight.detach().double()
    if mode == "int8":
        step = stored["weight_scale"].double()[:, None]
    else:
        step = stored["weight_scale"].double().repeat_interleave(64, dim=1)
    assert ((deq.double() - w).abs() <= 0.5 * step * 1.01 + 1e-6).all()


@pytest.mark.parametrize("mode", ["fp16", "bf16"])
@pytest.mark.parametrize("K", [256, 4096])  # one block; two gemv blocks (K > GEMV_CHUNK)
def test_16bit_weights_keep_fp32_activations(mode, K, monkeypatch):
    """Weight16Linear (quantize="fp16" / "bf16"): the weight rounded to 16 bits, nothing else.
    Prompts and batches multiply the fp32 activations exactly (a slice of rows converted at a
    time); eager batch 1 runs torch's 16-bit GEMV, whose input is rounded to the weight's
    dtype as llama.cpp's f16 matmul rounds it."""
    torch.manual_seed(0)
    linear = nn.Linear(K, 200)
    q = Q.quantize_linear(linear, mode)
    assert isinstance(q, Q.Weight16Linear) and q.weight.dtype == Q.WEIGHT16[mode]
    w16 = linear.weight.detach().to(Q.WEIGHT16[mode]).double()
    assert torch.equal(q.state_dict()["weight"].double(), w16)
    monkeypatch.setattr(Q, "CONVERT_FLOATS", 64 * 2048)  # 64-row slices (32 with K=4096): the last one short
    for shape, tol in (((3, 5, K), 1e-5), ((1, 1, K), 2e-3 if mode == "fp16" else 1.5e-2)):
        x = torch.randn(*shape)
        with torch.no_grad():
            y = q(x)
        ref = x.double() @ w16.T + linear.bias.double()
        assert y.dtype == torch.float32 and y.shape == (*shape[:-1], 200)
        assert (y.double() - ref).abs().max() <= tol * ref.abs().max(), shape
    q.to(torch.bfloat16)  # Module.to casts the weight too; batch 1 must still run (a bf16 GEMV then)
    with torch.no_grad():
        y = q(x.to(torch.bfloat16)).double()
    assert (y - ref).abs().max() <= 0.02 * ref.abs().max()


def test_fp16_weights_may_stay_an_unaligned_view():
    """fp16 rows read from a file stay a view of it (as a bf16 model's do), at whatever offset
    safetensors put them; every product path takes them."""
    torch.manual_seed(0)
    buffer = torch.randn(200 * 256 + 1).half()
    rows = buffer[1:].view(200, 256)  # 2 bytes off any vector boundary
    layer = Q.Weight16Linear(rows, torch.zeros(200))
    assert layer.weight.data_ptr() == rows.data_ptr()
    for x in (torch.randn(1, 256), torch.randn(5, 256)):
        with torch.no_grad():
            y = layer(x).double()
        ref = x.double() @ rows.double().T
        assert (y - ref).abs().max() <= 2e-3 * ref.abs().max()
    with torch.no_grad():
        y, _ = compiled_code(layer, x[:1])
    assert (y.double() - ref[:1]).abs().max() <= 1e-5 * ref[:1].abs().max()


def test_fp16_refuses_weights_beyond_its_range(ckpt, tmp_path):
    """A weight fp16 cannot hold is an error naming the layer (in place: the model unchanged)
    or the file and tensor (at load), never a layer of infinities."""
    model = load_model(ckpt)
    with torch.no_grad():
        model.layers[1].mlp.dense_h_to_4h.weight[3, 4] = 1e5
    with pytest.raises(QuantizationError, match=r"^layers\.1\.mlp\.dense_h_to_4h holds values up to 1e\+05, beyond "
                                                r"float16's range \(65504\); quantize this model to int8"):
        Q.quantize_model(model, "fp16")
    assert Q.quantization_of(model) is None and isinstance(model.layers[0].mlp.dense_h_to_4h, nn.Linear)
    save_model(model, tmp_path)
    with pytest.raises(QuantizationError, match=r"model\.safetensors: tensor gpt_neox\.layers\.1\.mlp\.dense_h_to_4h\.weight "
                                                r"holds values up to 1e\+05"):
        load_model(tmp_path, quantize="fp16")


def test_int8_exact_top_logits():
    """With torch's bf16 int8 kernel (CPUs without int8 dot products), embed_out's module
    recomputes its largest outputs in fp32: they equal the reference (the kernel alone rounds
    them to bf16), and so does the argmax."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 1000, bias=False)
    stored = Q.quantize_to_file_layout(linear.weight.detach(), "int8", None)
    q = Q.Int8Linear(stored["weight"], stored["weight_scale"], None, Q.EXACT_TOP_K, fbgemm=False)
    assert Q.linear_from_file("embed_out", stored, None, "int8", None).exact_top_k == Q.EXACT_TOP_K
    assert Q.linear_from_file("layers.0.mlp.dense_4h_to_h", stored, None, "int8", None).exact_top_k == 0
    x = torch.randn(40, 256)  # more rows than one 16-row chunk
    ref = x.double() @ (stored["weight"].double() * stored["weight_scale"].double()[:, None]).T
    y = q(x)
    top = ref.topk(Q.EXACT_TOP_K // 2, dim=-1).indices
    assert torch.allclose(y.gather(1, top).double(), ref.gather(1, top), rtol=1e-5, atol=1e-5)
    assert torch.equal(y.argmax(-1), ref.argmax(-1))
    plain = Q.Int8Linear(stored["weight"], stored["weight_scale"], None, fbgemm=False)(x).double()
    assert (plain.gather(1, top) - ref.gather(1, top)).abs().max() > 1e-4  # bf16 rounding, what the refit removes


@pytest.mark.skipif(not Q.fbgemm_int8_native(), reason="this CPU's fbgemm has no exact int8 dot products (VNNI / AMX-INT8)")
def test_int8_fbgemm_kernel_is_exact_to_16_bits():
    """On CPUs with VNNI the int8 module runs fbgemm's int8 GEMM on two int8 digits of the
    activations: its outputs are those of the int8 weights times the unrounded fp32 input to
    ~2^-16, far closer than torch's bf16 kernel (input and output rounded to 8 bits), for a
    row with an outlier and for several rows with scales of their own."""
    torch.manual_seed(0)
    stored = Q.quantize_to_file_layout(torch.randn(300, 512) / 512**0.5, "int8", None)
    q = Q.linear_from_file("embed_out", stored, torch.randn(300), "int8", None)
    assert q.fbgemm
    x = torch.randn(2, 3, 512) * torch.tensor([1.0, 100.0, 0.01])[:, None]
    x[0, 0, 7] = 40.0
    ref = x.double() @ (stored["weight"].double() * stored["weight_scale"].double()[:, None]).T + q.bias.double()
    err = ((q(x).double() - ref).abs().amax(-1) / ref.abs().amax(-1)).max()
    bf16 = Q.Int8Linear(stored["weight"], stored["weight_scale"], q.bias, fbgemm=False)(x).double()
    assert err < 3e-4 and err < ((bf16 - ref).abs().amax(-1) / ref.abs().amax(-1)).max() / 10
    q2, scale = q.canonical()  # the packed layout reads back to the stored tensors
    assert torch.equal(q2, stored["weight"]) and torch.equal(scale, stored["weight_scale"])
    copied = copy.deepcopy(q)
    assert copied.weight is not q.weight and torch.equal(copied(x), q(x))
    with pytest.raises(TypeError, match="state_dict"):
        pickle.loads(pickle.dumps(q))


@pytest.mark.skipif(not Q.fbgemm_int8_native(), reason="this CPU's fbgemm has no exact int8 dot products (VNNI / AMX-INT8)")
def test_fbgemm_weight_is_an_input_of_the_compiled_graph():
    """Under torch.compile the packed fbgemm weight reaches the custom op as a graph input, not
    a constant baked into the code: two layers of the same shape run through one graph, each
    with its own weight, and the digits' preparation is fused around the op."""
    torch.manual_seed(0)
    layers = [Q.quantize_linear(nn.Linear(128, 192), "int8") for _ in range(2)]
    assert all(m.fbgemm for m in layers)
    x = torch.randn(1, 1, 128)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(lambda m, x: m(x), fullgraph=True, dynamic=False)
    for m in layers + layers[:1]:
        assert torch.allclose(compiled(m, x), m(x), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    assert not torch.allclose(layers[0](x), layers[1](x))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_kernel_takes_unaligned_input(mode):
    """torch's int8 CPU kernel segfaults on an activation 8 bytes off a 16-byte boundary (a view
    into a larger buffer); the module must hand it an aligned copy."""
    torch.manual_seed(0)
    q = Q.quantize_linear(nn.Linear(128, 384).to(torch.bfloat16), mode, group_size=64)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    unaligned = torch.cat([torch.zeros(4, dtype=torch.bfloat16), x.flatten()])[4:].view(4, 128)
    assert unaligned.data_ptr() % 16 == 8
    assert torch.equal(q(unaligned), q(x))


def test_int4_repacking_round_trips():
    """The CPU kernel's layout is torch's; unpack_int4 must invert it exactly (saving needs it)."""
    for N, K in ((64, 64), (192, 512)):
        nibbles = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
        assert torch.equal(Q.unpack_int4(Q.pack_int4(nibbles), K), nibbles)


@pytest.mark.parametrize("mode", ["int8", "int4", "fp16", "bf16", "int8 embed_out", "int8 bf16 kernel", "onednn"])
def test_quantized_module_compiles_fullgraph(mode):
    """The static decode step compiles the model with fullgraph=True; these modules must trace."""
    torch.manual_seed(0)
    if mode == "int8 embed_out":  # with its exact top logits
        stored = Q.quantize_to_file_layout(torch.randn(192, 128), "int8", None)
        q = Q.linear_from_file("embed_out", stored, None, "int8", None)
    elif mode == "int8 bf16 kernel":  # what CPUs without VNNI run
        stored = Q.quantize_to_file_layout(torch.randn(192, 128), "int8", None)
        q = Q.Int8Linear(stored["weight"], stored["weight_scale"], None, Q.EXACT_TOP_K, fbgemm=False)
    elif mode == "onednn":
        if not Q.onednn_bf16_supported():
            pytest.skip("oneDNN has no bf16 on this CPU")
        q = Q.OneDNNLinear(nn.Linear(128, 192).to(torch.bfloat16))
    else:
        q = Q.quantize_linear(nn.Linear(128, 192), mode, group_size=32)
    x = torch.randn(2, 1, 128, dtype=torch.bfloat16 if mode == "onednn" else torch.float32)
    compiled = torch.compile(q, fullgraph=True, dynamic=False)
    assert torch.allclose(compiled(x), q(x), rtol=1e-2, atol=1e-2)


# -------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A pythia-14m-shaped checkpoint whose output depends on the input (initializer 0.15)
    and a vocabulary of 50280 (Dolly's), which no int4 block of 64 rows divides."""
    d = tmp_path_factory.mktemp("ckpt")
    make_hf_checkpoint(d, seed=1, initializer_range=0.15, vocab_size=50280)
    return d


@pytest.fixture(scope="module")
def full(ckpt):
    model = load_model(ckpt)
    with torch.no_grad():
        return model, model(IDS)


@pytest.mark.parametrize("mode, cos_min, top1_min", [("int8", 0.999, 0.9), ("int4", 0.95, 0.6), ("fp16", 0.99999, 1.0),
                                                     ("bf16", 0.9999, 0.95)])
def test_quantized_logits_close_to_full_precision(ckpt, full, mode, cos_min, top1_min):
    model = load_model(ckpt, quantize=mode)
    kind = {"int8": Q.Int8Linear, "int4": Q.Int4Linear, "fp16": Q.Weight16Linear, "bf16": Q.Weight16Linear}[mode]
    assert isinstance(model.layers[0].mlp.dense_h_to_4h, kind)
    # int4 models keep embed_out in int8: its error goes straight into the logits
    assert isinstance(model.embed_out, Q.Weight16Linear if mode in Q.WEIGHT16 else Q.Int8Linear)
    assert isinstance(model.embed_in, nn.Embedding) and model.embed_in.weight.dtype == torch.float32
    with torch.no_grad():
        logits = model(IDS)
    ref = full[1]
    cos = torch.nn.functional.cosine_similarity(logits.flatten(0, 1), ref.flatten(0, 1), dim=-1)
    assert cos.min() > cos_min, cos
    top1 = (logits.argmax(-1) == ref.argmax(-1)).float().mean()
    assert top1 >= top1_min


def test_quantize_model_in_place_equals_quantize_on_load(ckpt):
    model = Q.quantize_model(load_model(ckpt), "int4", group_size=32)
    with torch.no_grad():
        assert torch.equal(model(IDS), load_model(ckpt, quantize="int4", group_size=32)(IDS))
    assert Q.quantization_of(model) == {"mode": "int4", "group_size": 32}
    assert not any(m.training for m in model.modules())  # the new layers keep the model's eval mode


@pytest.mark.parametrize("mode, group_size", [("int8", None), ("int4", 64), ("fp16", None), ("bf16", None)])
def test_save_load_round_trip_is_bit_identical(ckpt, tmp_path, mode, group_size):
    model = load_model(ckpt, quantize=mode, group_size=group_size, dtype=torch.bfloat16)
    save_model(model, tmp_path / "q", max_shard_size=2**20)  # several shards: each carries the metadata
    files = sorted(os.listdir(tmp_path / "q"))
    assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 1
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == f"minidolly-{mode}"
    again = load_model(tmp_path / "q")  # no quantize=: the files say how
    assert Q.quantization_of(again) == {"mode": mode, "group_size": group_size}
    assert again.embed_in.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(again(IDS), model(IDS))
    sizes = sum(os.path.getsize(tmp_path / "q" / f) for f in files if f.endswith(".safetensors"))
    assert sizes < 0.6 * os.path.getsize(ckpt / "model.safetensors")  # fp32 in, 8 or 4 bits out



def test_loaded_plain_int8_rows_are_aligned_copies(ckpt, tmp_path, monkeypatch):
    """The modules copy what they keep out of the file (a safetensors view need not be aligned
    as the kernels need), and nothing else: fbgemm packs from the view directly."""
    save_model(load_model(ckpt, quantize="int8"), tmp_path / "q")
    monkeypatch.setattr(Q, "fbgemm_int8_native", lambda: False)  # torch's bf16 kernel, plain rows
    model = load_model(tmp_path / "q")
    layers = [m for m in model.modules() if isinstance(m, Q.Int8Linear)]
    assert layers and not any(m.fbgemm for m in layers)
    for m in layers:
        for t in (m.weight, m.weight_scale):
            assert t.untyped_storage().nbytes() == t.nbytes and t.data_ptr() % 16 == 0

def _set_metadata(path, **changes):
    """Rewrite a safetensors file's metadata in place (header only)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"].update(changes)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_quantized_checkpoint_errors(ckpt, tmp_path):
    save_model(load_model(ckpt, quantize="int8"), tmp_path)
    with pytest.raises(QuantizationError, match="holds int8 weights, which cannot be quantized again to int4"):
        load_model(tmp_path, quantize="int4")
    _set_metadata(tmp_path / "model.safetensors", **{"minidolly.format_version": "99"})
    with pytest.raises(CheckpointError, match=r"model.safetensors is a quantized minidolly checkpoint of format version 99"):
        load_model(tmp_path)


def test_bad_quantize_arguments_are_one_sentence(ckpt):
    with pytest.raises(QuantizationError, match=r"^Unknown quantization 'int3'; choose one of int8, int4, fp16, bf16\.$"):
        load_model(ckpt, quantize="int3")
    with pytest.raises(QuantizationError, match=r"group size must be one of 32, 64, 128, 256"):
        load_model(ckpt, quantize="int4", group_size=48)
    # pythia-14m is 128 wide: 256 does not divide it
    with pytest.raises(QuantizationError, match=r"group size 256 does not divide the input width 128 of "
                                                r"layers\.0\.attention\.query_key_value; use 32 or 64 or 128\."):
        load_model(ckpt, quantize="int4", group_size=256)


# ---------------------------------------------------------------- 16-bit path


@pytest.mark.skipif(not Q.onednn_bf16_native(), reason="this CPU has no native bf16 (AVX512-BF16 / AMX)")
def test_prepare_for_cpu_packs_bf16_linears(ckpt):
    plain = load_model(ckpt, dtype=torch.bfloat16)
    packed = Q.prepare_for_cpu(load_model(ckpt, dtype=torch.bfloat16))
    assert isinstance(packed.embed_out, Q.OneDNNLinear)
    with torch.no_grad():
        a, b = packed(IDS).float(), plain(IDS).float()
    assert (a - b).abs().max() <= 0.02 * b.abs().max()  # same bf16 products, another summation order
    state = packed.state_dict()
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch was built without oneDNN")
def test_prepare_for_cpu_packs_fp32_linears_exactly(ckpt, full):
    """fp32 linears go to oneDNN too (MKL's GEMV streams slower): the same fp32 products."""
    packed = Q.prepare_for_cpu(load_model(ckpt))
    assert isinstance(packed.layers[0].attention.query_key_value, Q.OneDNNLinear)
    with torch.no_grad():
        assert torch.allclose(packed(IDS), full[1], rtol=1e-4, atol=1e-4)


def test_prepare_for_cpu_leaves_quantized_models(ckpt):
    for model in (load_model(ckpt, quantize="int8"), load_model(ckpt, quantize="int4", dtype=torch.bfloat16)):
        kinds = [type(m) for m in model.modules()]
        assert [type(m) for m in Q.prepare_for_cpu(model).modules()] == kinds


# ------------------------------------------------------------ compiled decode


def compiled_code(fn, *args):
    """fn(*args) through torch.compile (fullgraph, static shapes), and the code inductor wrote."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(fn, fullgraph=True, dynamic=False), *args)
    return out, "\n".join(code)


LIBRARY_MATMULS = ("extern_kernels.", "torch.ops.mkldnn", "int8pack_mm", "fbgemm_int8_mm")  # F.linear, the eager kernels


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8", "fp16 weights", "bf16 weights"])
def test_compiled_batch1_products_are_a_gemv_and_exact(kind):
    """Under torch.compile on CPU a batch-1 product is inductor's own loop (no library call),
    with fp32 products of the weight as stored, and the producer of its input (here a GELU)
    is computed once, not inlined into the loop over the weight; two rows go to the kernels."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 200)
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    if kind == "int8":
        layer = Q.Int8Linear(*Q.quantize_int8(linear.weight.detach()), linear.bias, fbgemm=False)
        weight = layer.weight.double() * layer.weight_scale.double()[:, None]
    elif kind.endswith("weights"):  # fp32 activations times 16-bit rows, exact
        layer = Q.Weight16Linear(linear.weight.to(Q.WEIGHT16[kind.split()[0]]), linear.bias)
        weight = Q.gemv_rows(layer.weight).double()
    else:
        layer = Q.DecodeLinear.from_linear(linear.to(dtype))
        weight = Q.gemv_rows(layer.weight).double()
    x = torch.randn(1, 1, 256).to(dtype)
    with torch.no_grad():
        y, code = compiled_code(lambda x: layer(torch.nn.functional.gelu(x)), x)
        ref = torch.nn.functional.gelu(x.double()) @ weight.T + linear.bias.double()
        assert y.dtype == dtype and y.shape == (1, 1, 200)
        # fp32 sums of exact products: only the output's own rounding (bf16: 8 bits)
        assert (y.double() - ref).abs().max() <= (1e-5 if dtype == torch.float32 else 4e-3) * ref.abs().max()
        assert not any(name in code for name in LIBRARY_MATMULS), code
        assert code.count(".erf()") == 1 and "as_strided" in code  # the GELU, once; the barrier
        _, code2 = compiled_code(lambda x: layer(x), torch.randn(2, 1, 256).to(dtype))
        assert any(name in code2 for name in LIBRARY_MATMULS)  # two rows: the GEMM kernels


@pytest.mark.parametrize("K, chunks", [(6144, 3), (5000, 4)])
def test_compiled_gemv_sums_long_rows_in_chunks(K, chunks):
    """Rows longer than GEMV_CHUNK are summed in equal chunks (inductor's plain loop), same values."""
    assert Q.gemv_chunks(K) == chunks
    torch.manual_seed(0)
    x, w = torch.randn(1, K), torch.randint(-127, 128, (8, K), dtype=torch.int8)
    with torch.no_grad():
        y, code = compiled_code(Q.gemv, x, w)
    assert "CascadeSumHelper" not in code
    ref = x.double() @ w.double().T
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_compiled_gemv_on_blocks_equals_rows():
    """gemv_blocks stores inputs [j K/J, (j+1) K/J) of every row as block j, contiguous;
    gemv_rows undoes it; compiled gemv on the blocks gives the rows' product."""
    torch.manual_seed(0)
    x, w = torch.randn(1, 8192), torch.randint(-127, 128, (8, 8192), dtype=torch.int8)
    blocks = Q.gemv_blocks(w)
    assert blocks.shape == (4, 8, 2048) and blocks.is_contiguous()
    assert torch.equal(blocks[1, 3], w[3, 2048:4096]) and torch.equal(Q.gemv_rows(blocks), w)
    small = torch.randn(8, 2048)
    assert Q.gemv_blocks(small).data_ptr() == small.data_ptr()  # one block: a view, nothing copied
    with torch.no_grad():
        y, code = compiled_code(Q.gemv, x, blocks)
    assert "CascadeSumHelper" not in code
    ref = x.double() @ w.double().T
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_blocked_layers_keep_a_plain_state_dict_and_eager_results(kind):
    """A layer with more inputs than GEMV_CHUNK in gemv_blocks layout (DecodeLinear, an
    Int8Linear after use_blocks): the state_dict is the plain layer's, loading it back restores
    the blocks, and the eager product (prompts) equals the plain layer's."""
    torch.manual_seed(0)
    linear = nn.Linear(4096, 96)
    x = torch.randn(3, 4096)
    if kind == "int8":
        plain = Q.Int8Linear(*Q.quantize_int8(linear.weight.detach()), linear.bias, fbgemm=False, exact_top_k=4)
        layer = Q.Int8Linear(*plain.canonical(), linear.bias, fbgemm=False, exact_top_k=4)
        layer.use_blocks(True)
        assert layer.weight.shape == (2, 96, 2048)
        tol = 1e-2  # bf16 activations in torch's kernel (per block, summed in fp32)
    else:
        plain, layer, tol = linear, Q.DecodeLinear.from_linear(linear), 1e-5
        assert layer.weight.shape == (2, 96, 2048)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    assert state.keys() == plain.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())
    with torch.no_grad():
        want, got = plain(x), layer(x)
        assert (got - want).abs().max() <= tol * want.abs().max()
        if kind == "int8":  # the exact top rows come from the blocks too
            assert torch.equal(layer._rows(torch.tensor([[5, 7]])), plain.weight[torch.tensor([[5, 7]])])
        for p in layer.parameters():
            p.zero_()
        layer.load_state_dict(state)
        assert torch.equal(layer(x), got)


@pytest.mark.parametrize("mode", [None, "int8", "fp16", "bf16"])
def test_prepare_for_cpu_compile_decodes_as_eager(ckpt, mode):
    """prepare_for_cpu(compile=True), as generate.py --compile does: the compiled decode
    step's logits equal eager's (the unprepared model) at every step, and the state_dict
    is unchanged."""
    from minidolly.generate import KVCache, choose_kv_dtype, compiled_decode_step, decode_step

    eager = load_model(ckpt, quantize=mode)
    model = Q.prepare_for_cpu(load_model(ckpt, quantize=mode), compile=True)
    assert not any(isinstance(m, Q.OneDNNLinear) for m in model.modules())
    if mode in (None, "fp16", "bf16"):
        assert isinstance(model.layers[0].mlp.dense_4h_to_h, Q.Weight16Linear if mode else Q.DecodeLinear)
    else:
        int8 = model.embed_out  # fbgemm's kernel where the CPU has it, inductor's gemv on blocks elsewhere
        assert int8.fbgemm == Q.fbgemm_int8_native() and int8.blocked == (not int8.fbgemm)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in eager.state_dict().items())
    torch._dynamo.reset()
    kv_dtype = choose_kv_dtype(model)  # quantized: fp16 keys and values, which the compiled step reads as they are
    assert kv_dtype == (torch.float32 if mode is None else torch.float16)
    caches = [KVCache(m.config, 1, 16, device="cpu", dtype=torch.float32, kv_dtype=kv_dtype) for m in (eager, model)]
    step = compiled_decode_step("cpu")
    with torch.inference_mode():
        for pos, token in enumerate(IDS[0].tolist()):
            args = torch.tensor([token]), torch.tensor([pos])
            a, b = decode_step(eager, caches[0], *args), step(model, caches[1], *args)
            # int8 eager rounds activations to bf16 (torch's kernel) or 16 bits (fbgemm's digits),
            # fp16 / bf16 eager to 16 bits (torch's 16-bit GEMV); compiled, all multiply fp32 activations
            tol = 1e-4 if mode is None else 2e-2
            assert (a - b).abs().max() <= tol * a.abs().max(), pos


# ------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["int8", "int4", "fp16", "bf16"])
def test_cuda_kernels_and_round_trip(ckpt, tmp_path, mode):
    """tinygemm int4, the int8 and 16-bit GEMVs on a GPU; the canonical form read back from tinygemm's layout."""
    model = load_model(ckpt, quantize=mode, dtype=torch.bfloat16, device="cuda")
    cpu = load_model(ckpt, quantize=mode, dtype=torch.bfloat16)
    with torch.no_grad():
        a, b = model(IDS.cuda()).float().cpu(), cpu(IDS).float()
    assert (a - b).abs().max() <= 0.05 * b.abs().max()
    save_model(model, tmp_path)
    again = load_model(tmp_path, device="cuda")
    with torch.no_grad():
        assert torch.equal(again(IDS.cuda()), model(IDS.cuda()))
    with torch.no_grad():  # the canonical form read back out of tinygemm's layout runs on CPU too
        c = load_model(tmp_path)(IDS).float()
    assert (c - b).abs().max() <= 0.05 * b.abs().max()


# -------------------------------------------------------------------- CLI


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "generate.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def cli_ckpt(ckpt, tmp_path_factory):
    import shutil

    d = tmp_path_factory.mktemp("cli")
    for f in os.listdir(ckpt):
        shutil.copy(ckpt / f, d / f)
    shutil.copy(TOKENIZER_JSON, d / "tokenizer.json")
    return d


@pytest.mark.parametrize("mode", ["int4", "bf16"])
def test_cli_quantized_generation(cli_ckpt, mode):
    out = run_cli("--model", cli_ckpt, "--quantize", mode, "--temperature", "0", "--max-new-tokens", "4", "--no-stream", "Hi")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


@pytest.mark.parametrize("args, message", [
    (["--quantize", "int3"], "argument --quantize: invalid choice"),
    (["--quantize", "int4", "--group-size", "256"], "group size 256 does not divide the input width 128"),
    (["--quantize", "int4", "--group-size", "48"], "argument --group-size: invalid choice: 48"),
    (["--group-size", "64"], "--group-size applies to --quantize int4 only."),
    (["--kv-cache-dtype", "int8"], "argument --kv-cache-dtype: invalid choice"),
])
def test_cli_bad_quantize_flags_exit_2(cli_ckpt, args, message):
    out = run_cli("--model", cli_ckpt, *args, "Hi")
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last and "Traceback" not in out.stderr
