"""GGUF out: a minidolly (or any GPT-NeoX) checkpoint as a file llama.cpp and Ollama run.

    from minidolly import save_gguf
    save_gguf("runs/dolly-14m/final", "dolly-14m.q8_0.gguf", "q8_0")

GGUF is llama.cpp's single-file format: a header of key/value metadata (architecture,
hyperparameters, tokenizer) and then every tensor, each in its own ggml type. We write it with
`gguf`, the format's own Python package (pip install "minidolly[gguf]"), and follow what
llama.cpp's loader for the `gptneox` architecture reads (src/llama-model.cpp) and what its
converter (convert_hf_to_gguf.py, GPTNeoXModel) writes:

- hyperparameters: context length, width, blocks, MLP width, heads, rotary dims (rotary_pct of
  each head) and base, LayerNorm epsilon, parallel residual;
- tensors under llama.cpp's names (token_embd, blk.N.attn_qkv, ..., output), every bias and
  norm in f32, every matrix in the asked type (f32, f16, q8_0, q4_0). Two differences from our
  layout: the fused q/k/v rows are regrouped from per-head [q k v] (Megatron's, ours) to
  [all q][all k][all v], as llama.cpp splits them; and llama.cpp needs an `output` matrix
  even when the embeddings are tied, and every bias, so those are written out (zeros for
  absent biases).
- q4_0 keeps `output` (the unembedding) in q8_0: its error goes straight into the logits, and
  llama.cpp's own quantizer keeps it wider too (q6_K, which the gguf package cannot write).
- the tokenizer: GPT-NeoX's byte-level BPE (tokens, merges, token types; pre-tokenizer
  "olmo", llama.cpp's name for this tokenizer's GPT-2 regex), the vocabulary padded with
  unused [PADn] tokens to the embedding's rows, no BOS/EOS added to prompts (as GPT-NeoX),
  and Dolly's keys as control tokens: `### End` as end-of-turn, so llama.cpp and Ollama stop
  where minidolly stops, and a chat template that writes Dolly's prompt.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import torch

from .checkpoint import hf_key, load_model
from .model import GPTNeoX
from .prompt import INTRO
from .tokenizer import END_KEY, INSTRUCTION_KEY, RESPONSE_KEY, Tokenizer, load_tokenizer

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")

# Dolly's prompt (minidolly/prompt.py) as a Jinja chat template: each user turn is one
# instruction, each assistant turn an answer closed by `### End`.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ " + json.dumps(f"{INTRO}\n\n{INSTRUCTION_KEY}\n") + " }}{{ message['content'] }}"
    "{{ " + json.dumps(f"\n\n{RESPONSE_KEY}\n") + " }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ " + json.dumps(f"\n\n{END_KEY}") + " }}"
    "{% endif %}{% endfor %}"
)


class GGUFExportError(ValueError):
    """A model, type or path that save_gguf cannot write."""


def save_gguf(model_or_path, out_path: str, dtype: str = "f16", *, tokenizer: Tokenizer | str | None = None,
              name: str | None = None, overwrite: bool = False) -> str:
    """Write a full-precision GPT-NeoX model as a GGUF file for llama.cpp's `gptneox` architecture.

    model_or_path: a checkpoint directory (or Hub id) that load_model reads, or a GPTNeoX.
    dtype: "f32", "f16", "q8_0" or "q4_0": the ggml type of the weight matrices (llama.cpp's
        own blocks of 32: q8_0 one fp16 scale per block, q4_0 one fp16 scale, 4-bit codes).
    tokenizer: a Tokenizer or a path load_tokenizer reads; default: the checkpoint's own.
    name: general.name in the file (default: the directory's name).
    overwrite: replace an existing out_path (by default that is an error).
    Returns out_path. The file is written under a temporary name and renamed when complete.
    Raises GGUFExportError (a ValueError) for an unknown dtype, an existing file, a quantized
    model (export the full-precision checkpoint instead: quantizing twice adds both errors),
    or a model without a tokenizer; ImportError when the gguf package is missing.
    """
    try:
        import gguf
    except ImportError:
        raise ImportError('Writing GGUF needs the gguf package: pip install "minidolly[gguf]" (or pip install gguf).') from None
    if dtype not in GGUF_TYPES:
        raise GGUFExportError(f"Unknown GGUF type {dtype!r}; choose one of {', '.join(GGUF_TYPES)}.")
    out_path = os.fspath(out_path)
    if os.path.exists(out_path) and not overwrite:
        raise GGUFExportError(f"{out_path} already exists; remove it or choose another path.")
    if isinstance(model_or_path, GPTNeoX):
        model, source = model_or_path, None
    else:
        model, source = load_model(model_or_path), os.fspath(model_or_path)
    from .quantize import quantization_of

    if quantization_of(model):
        raise GGUFExportError("save_gguf needs full-precision weights, not a quantized model; "
                              "pass the full-precision checkpoint (quantizing twice adds both errors).")
    if tokenizer is None:
        if source is None:
            raise GGUFExportError("A GGUF file carries its tokenizer: pass tokenizer= with the model.")
        tokenizer = source
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer)
    name = name or (os.path.basename(os.path.normpath(source)) if source else "minidolly")

    config = model.config
    writer = gguf.GGUFWriter(None, "gptneox")
    writer.add_name(name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[dtype])
    if dtype.startswith("q"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_rope_dimension_count(config.rotary_dim)
    writer.add_rope_freq_base(config.rotary_base)
    writer.add_layer_norm_eps(config.layer_norm_eps)
    writer.add_parallel_residual(config.use_parallel_residual)
    writer.add_vocab_size(config.vocab_size)
    _add_tokenizer(writer, gguf, tokenizer, config.vocab_size)

    tensors = list(_gguf_tensors(model))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPTNEOX, config.num_layers)
    plan = []  # (gguf name, our tensor, ggml type), in file order
    for our_name, t in tensors:
        gguf_name = names.get_name(hf_key(our_name), try_suffixes=(".weight", ".bias"))
        if t.dim() == 1 or dtype == "f32":
            qtype = gguf.GGMLQuantizationType.F32
        elif dtype == "f16":
            qtype = gguf.GGMLQuantizationType.F16
        elif dtype == "q4_0" and our_name == "embed_out.weight":
            qtype = gguf.GGMLQuantizationType.Q8_0
        else:
            qtype = getattr(gguf.GGMLQuantizationType, dtype.upper())
        if t.dim() == 2 and t.shape[1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            raise GGUFExportError(f"{our_name} has {t.shape[1]} columns, not a multiple of {dtype}'s block of "
                                  f"{gguf.GGML_QUANT_SIZES[qtype][0]}; use f16 or f32.")
        plan.append((gguf_name, t, qtype))
        byte_shape = gguf.quant_shape_to_byte_shape(t.shape, qtype)  # what quantize() returns, as uint8
        writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)

    tmp = out_path + ".tmp"
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, t, qtype in plan:  # one tensor in memory at a time
            data = gguf.quants.quantize(t.detach().float().cpu().numpy(), qtype)
            writer.write_tensor_data(data.view(np.uint8))
        writer.close()
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out_path


def _gguf_tensors(model: GPTNeoX):
    """(our name, tensor) of everything llama.cpp reads, in llama.cpp's layout: the fused q/k/v
    regrouped per projection, the unembedding written even when tied, absent biases as zeros."""
    c = model.config
    H, D, C = c.num_heads, c.head_dim, c.hidden_size
    state = model.state_dict()
    if c.tie_word_embeddings:
        state["embed_out.weight"] = state["embed_in.weight"]
    for i in range(c.num_layers):
        for proj, rows in (("query_key_value", 3 * C), ("dense", C)):
            key = f"layers.{i}.attention.{proj}.bias"
            if key not in state:
                state[key] = torch.zeros(rows)
    for name in sorted(state, key=_file_order):
        t = state[name]
        if name.endswith("query_key_value.weight"):
            t = t.view(H, 3, D, C).transpose(0, 1).reshape(3 * C, C)  # (H, 3, D) rows -> (3, H, D)
        elif name.endswith("query_key_value.bias"):
            t = t.view(H, 3, D).transpose(0, 1).reshape(3 * C)
        yield name, t


def _file_order(name: str):
    """embed_in, then the blocks in order, then the final norm and embed_out (as convert writes)."""
    if name.startswith("layers."):
        return (1, int(name.split(".")[1]), name)
    return (0 if name.startswith("embed_in") else 2, 0, name)


def _add_tokenizer(writer, gguf, tokenizer: Tokenizer, vocab_size: int) -> None:
    """The GPT-NeoX BPE vocabulary, merges and special tokens, as llama.cpp's gpt2 tokenizer reads them."""
    with tempfile.TemporaryDirectory() as d:  # the tokenizers library's own JSON, through its public save
        tokenizer.save(d)
        with open(os.path.join(d, "tokenizer.json"), encoding="utf-8") as f:
            spec = json.load(f)
    vocab = dict(spec["model"]["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for i, t in added.items():
        vocab[t["content"]] = i
    if len(vocab) > vocab_size:
        raise GGUFExportError(f"The tokenizer has {len(vocab)} tokens but the model only {vocab_size} embedding rows.")
    by_id = {i: tok for tok, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # the embedding is padded past the tokenizer (50304 rows for 50277 + 3 tokens)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("olmo")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.eos_id)  # GPT-NeoX's one special text token serves all roles
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_unk_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if tokenizer.end_id is not None and tokenizer.end_id < vocab_size:
        writer.add_eot_token_id(tokenizer.end_id)
        writer.add_chat_template(CHAT_TEMPLATE)
