"""GGUF export: read back with the format's own reader, and run by llama.cpp itself."""

import os
import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from conftest import REPO, TOKENIZER_JSON, make_hf_checkpoint
from minidolly import load_model, load_tokenizer, save_gguf
from minidolly.gguf_export import CHAT_TEMPLATE, GGUFExportError
from minidolly.prompt import format_prompt

PROMPT = [12092, 1533, 13, 50277, 187, 510, 4062, 8516]
DOLLY = dict(vocab_size=50280, initializer_range=0.15)  # Dolly's vocabulary; output that depends on the input


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A pythia-14m-shaped checkpoint with Dolly's vocabulary and the real tokenizer."""
    d = tmp_path_factory.mktemp("gguf_ckpt")
    make_hf_checkpoint(d, seed=1, **DOLLY)
    shutil.copy(TOKENIZER_JSON, d / "tokenizer.json")
    return d


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    """Our GGUF files, one per type."""
    out = tmp_path_factory.mktemp("gguf_out")
    return {t: save_gguf(ckpt, out / f"model.{t}.gguf", t) for t in ("f32", "f16", "q8_0", "q4_0")}


def field(reader, key):
    f = reader.fields[key]
    return f.contents()


def expected_tensors(model):
    """Our weights under llama.cpp's names and layout: q/k/v rows regrouped per projection."""
    c = model.config
    H, D, C = c.num_heads, c.head_dim, c.hidden_size
    out = {"token_embd.weight": model.embed_in.weight, "output_norm.weight": model.final_layer_norm.weight,
           "output_norm.bias": model.final_layer_norm.bias, "output.weight": model.embed_out.weight}
    for i, layer in enumerate(model.layers):
        a, m = layer.attention, layer.mlp
        out |= {
            f"blk.{i}.attn_norm.weight": layer.input_layernorm.weight, f"blk.{i}.attn_norm.bias": layer.input_layernorm.bias,
            f"blk.{i}.ffn_norm.weight": layer.post_attention_layernorm.weight,
            f"blk.{i}.ffn_norm.bias": layer.post_attention_layernorm.bias,
            f"blk.{i}.attn_qkv.weight": a.query_key_value.weight.view(H, 3, D, C).transpose(0, 1).reshape(3 * C, C),
            f"blk.{i}.attn_qkv.bias": a.query_key_value.bias.view(H, 3, D).transpose(0, 1).reshape(3 * C),
            f"blk.{i}.attn_output.weight": a.dense.weight, f"blk.{i}.attn_output.bias": a.dense.bias,
            f"blk.{i}.ffn_up.weight": m.dense_h_to_4h.weight, f"blk.{i}.ffn_up.bias": m.dense_h_to_4h.bias,
            f"blk.{i}.ffn_down.weight": m.dense_4h_to_h.weight, f"blk.{i}.ffn_down.bias": m.dense_4h_to_h.bias,
        }
    return {k: v.detach().float().numpy() for k, v in out.items()}


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0", "q4_0"])
def test_read_back_with_gguf_reader(ckpt, exported, dtype):
    reader = gguf.GGUFReader(exported[dtype])
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    c = model.config
    assert field(reader, "general.architecture") == "gptneox"
    hyper = {"context_length": c.max_position_embeddings, "embedding_length": c.hidden_size,
             "block_count": c.num_layers, "feed_forward_length": c.intermediate_size,
             "attention.head_count": c.num_heads, "rope.dimension_count": c.rotary_dim,
             "use_parallel_residual": True}
    for key, value in hyper.items():
        assert field(reader, f"gptneox.{key}") == value, key
    assert field(reader, "gptneox.attention.layer_norm_epsilon") == pytest.approx(c.layer_norm_eps)
    assert field(reader, "gptneox.rope.freq_base") == pytest.approx(c.rotary_base)
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and len(tokens) == c.vocab_size == 50280
    assert tokens[12092] == "Hello" and tokens[1533] == "Ġworld" and types[12092] == gguf.TokenType.NORMAL
    assert tokens[50277:] == ["### End", "### Instruction:", "### Response:"]
    assert set(types[50277:]) == {gguf.TokenType.CONTROL} and types[0] == gguf.TokenType.CONTROL
    assert field(reader, "tokenizer.ggml.eot_token_id") == tok.end_id == 50277
    assert field(reader, "tokenizer.ggml.eos_token_id") == 0 and field(reader, "tokenizer.ggml.add_bos_token") is False
    assert len(field(reader, "tokenizer.ggml.merges")) == 50009

    want = expected_tensors(model)
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(want)
    for name, w in want.items():
        t = got[name]
        assert tuple(reversed([int(n) for n in t.shape])) == w.shape, name  # GGUF lists dims innermost first
        deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        qtype = t.tensor_type.name
        if w.ndim == 1 or qtype == "F32":
            assert qtype == "F32" and np.array_equal(deq, w), name
        elif qtype == "F16":
            assert np.array_equal(deq, w.astype(np.float16).astype(np.float32)), name
        else:  # blocks of 32 along each row, one fp16 scale each: within one quantization step
            blocks = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True)
            step = blocks / (127 if qtype == "Q8_0" else 8)
            err = np.abs(deq.reshape(-1, 32) - w.reshape(-1, 32))
            assert (err <= step * 1.01 + 1e-7).all(), name
            assert qtype == ("Q8_0" if dtype == "q8_0" or name == "output.weight" else "Q4_0"), name


def test_chat_template_is_dollys_prompt():
    import jinja2

    text = jinja2.Template(CHAT_TEMPLATE).render(messages=[{"role": "user", "content": "Explain gravity."}])
    assert text == format_prompt("Explain gravity.")


def test_export_errors(ckpt, exported, tmp_path):
    with pytest.raises(GGUFExportError, match=r"already exists; remove it or choose another path"):
        save_gguf(ckpt, exported["f16"], "f16")
    with pytest.raises(GGUFExportError, match=r"Unknown GGUF type 'q5_k'; choose one of f32, f16, q8_0, q4_0\."):
        save_gguf(ckpt, tmp_path / "x.gguf", "q5_k")
    with pytest.raises(GGUFExportError, match="needs full-precision weights"):
        save_gguf(load_model(ckpt, quantize="int8"), tmp_path / "x.gguf", "f16", tokenizer=TOKENIZER_JSON)
    assert not os.path.exists(tmp_path / "x.gguf") and not os.path.exists(tmp_path / "x.gguf.tmp")


# ------------------------------------------------------------ llama.cpp itself


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_llama_cpp_greedy_equals_ours(ckpt, exported, dtype):
    """llama.cpp loads our file and continues a prompt greedily exactly as we do."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = load_model(ckpt)
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    llm = llama_cpp.Llama(str(exported[dtype]), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    llm.eval(PROMPT)  # the whole prompt in one batch: the multi-token path
    theirs = []
    for _ in range(10):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    assert theirs == ids[len(PROMPT):]
    tok = load_tokenizer(ckpt)
    for text in (format_prompt("Explain gravity, briefly.") + "It pulls.\n\n### End", "  indented\tcode ✓ 😀"):
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok.encode(text)


# -------------------------------------------------------------------- CLI


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "generate.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO)


def test_cli_export(ckpt, tmp_path):
    out = run_cli("--model", ckpt, "--export-gguf", tmp_path / "m.gguf", "--gguf-type", "q8_0")
    assert out.returncode == 0, out.stderr
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    again = run_cli("--model", ckpt, "--export-gguf", tmp_path / "m.gguf")
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].endswith(
        "already exists; remove it or choose another path.")
    bad = run_cli("--model", ckpt, "--export-gguf", tmp_path / "n.gguf", "--gguf-type", "q5_k")
    assert bad.returncode == 2 and "argument --gguf-type: invalid choice" in bad.stderr
    mixed = run_cli("--model", ckpt, "--export-gguf", tmp_path / "n.gguf", "Hi")
    assert mixed.returncode == 2 and "drop the instruction" in mixed.stderr
