"""The model computes what transformers' GPTNeoXForCausalLM computes, and the presets are Pythia's."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import PYTHIA_14M, PYTHIA_70M, make_hf_checkpoint
from minidolly import GPTNeoX, KVCache, ModelConfig, load_model

TEXTS = [
    "The quick brown fox jumps over the lazy dog. Pythia is a suite of models from EleutherAI.",
    "Dolly 2.0 was instruction-tuned on 15,011 records written by Databricks employees.",
    "Rotary embeddings rotate the first quarter of each head's dimensions; the rest pass through.",
]

CONFIGS = {
    "pythia-14m": PYTHIA_14M,
    "pythia-70m": PYTHIA_70M,
    # not a Pythia: full rotary, another base, sequential residual, Dolly's 50280 vocabulary
    "other": dict(PYTHIA_14M, rotary_pct=1.0, rotary_emb_base=500, use_parallel_residual=False, vocab_size=50280),
}


def text_batch(tokenizer):
    ids = [tokenizer.encode(t) for t in TEXTS]
    n = min(len(i) for i in ids)
    return torch.tensor([i[:n] for i in ids])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, tokenizer, name):
    hf = make_hf_checkpoint(tmp_path, seed=1, **CONFIGS[name])
    model = load_model(tmp_path)
    ids = text_batch(tokenizer)
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == (len(TEXTS), ids.shape[1], CONFIGS[name]["vocab_size"])
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["pythia-14m", "other"])  # parallel and sequential residual
def test_keep_computes_only_the_kept_positions(tmp_path, tokenizer, name):
    make_hf_checkpoint(tmp_path, seed=1, **CONFIGS[name])
    model = load_model(tmp_path)
    ids = text_batch(tokenizer)
    keep = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.4
    with torch.no_grad():
        full = model(ids)
        with FlopCounterMode(display=False) as counter:
            kept = model(ids, keep=keep)
    assert kept.shape == (int(keep.sum()), model.config.vocab_size)
    torch.testing.assert_close(kept, full[keep], rtol=1e-5, atol=1e-5)
    # and it does less work: the last layer's attention output projection and MLP, and the
    # unembedding, run on the N kept rows; q/k/v and every earlier layer on all B·T
    c = model.config
    BT, N, C, F, V = ids.numel(), int(keep.sum()), c.hidden_size, c.intermediate_size, c.vocab_size
    after_attention = 2 * C * C + 2 * 2 * C * F  # dense, then MLP up and down, per position
    expected = c.num_layers * BT * 2 * C * 3 * C + (c.num_layers - 1) * BT * after_attention + N * after_attention \
        + N * 2 * C * V
    matmul = sum(n for op, n in counter.get_flop_counts()["Global"].items() if str(op) in ("aten.mm", "aten.addmm"))
    assert matmul == expected


def test_kv_cache_decode_equals_full_forward(ckpt_14m, tokenizer):
    model = load_model(ckpt_14m[0])
    ids = text_batch(tokenizer)
    B, T = ids.shape
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, B, T + 5)  # longer than needed: the step reads all of it
        steps = [model(ids[:, :7], cache=cache)]  # prefill 7 tokens, then one at a time
        for t in range(7, T):
            steps.append(model(ids[:, t : t + 1], positions=torch.full((B, 1), t), cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16])
def test_16bit_cache_under_fp32_activations(ckpt_14m, tokenizer, kv_dtype):
    """A cache that stores keys and values in 16 bits for an fp32 model: the rotary table stays
    fp32, the logits stay fp32, and prefill and decode steps see the same rounded keys: each
    step equals the prefill of the whole text through such a cache, and both are the full
    forward to the 16-bit rounding of keys and values."""
    model = load_model(ckpt_14m[0])
    ids = text_batch(tokenizer)
    B, T = ids.shape
    with torch.no_grad():
        full = model(ids)
        whole = model(ids, cache=KVCache(model.config, B, T, dtype=torch.float32, kv_dtype=kv_dtype))
        cache = KVCache(model.config, B, T + 5, dtype=torch.float32, kv_dtype=kv_dtype)
        assert cache.k[0].dtype == cache.v[-1].dtype == kv_dtype and cache.cos.dtype == torch.float32
        steps = [model(ids[:, :7], cache=cache)]
        for t in range(7, T):
            steps.append(model(ids[:, t : t + 1], positions=torch.full((B, 1), t), cache=cache))
    steps = torch.cat(steps, dim=1)
    assert steps.dtype == torch.float32
    torch.testing.assert_close(steps, whole, rtol=0, atol=1e-4)
    rounding = 1e-2 if kv_dtype == torch.bfloat16 else 2e-3
    assert 0 < (whole - full).abs().max() <= rounding * full.abs().max()


def test_rows_of_different_lengths_each_decode_at_their_own_position(ckpt_14m, tokenizer):
    """Right-padded prefill, then decode steps where every row is at another position: each
    row computes what it computes alone, although the pad tokens wrote keys into its row."""
    model = load_model(ckpt_14m[0])
    rows = [tokenizer.encode(t) for t in TEXTS]
    lengths = [len(r) for r in rows]
    T = max(lengths)
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])  # right padding
    last = torch.zeros(ids.shape, dtype=torch.bool)
    last[range(len(rows)), [n - 1 for n in lengths]] = True
    new = torch.tensor([[11, 21, 31], [12, 22, 32], [13, 23, 33]])  # three decode steps per row
    with torch.no_grad():
        cache = KVCache(model.config, len(rows), T + 3)
        outs = [model(ids, cache=cache, keep=last)]  # (B, V): each row at its own last token
        for s in range(3):
            positions = torch.tensor(lengths)[:, None] + s  # (B, 1): every row its own
            outs.append(model(new[:, s : s + 1], positions=positions, cache=cache)[:, 0])
        for b, r in enumerate(rows):
            alone = model(torch.tensor([r + new[b].tolist()]))[0, len(r) - 1 :]  # (4, V)
            torch.testing.assert_close(torch.stack([o[b] for o in outs]), alone, rtol=0, atol=1e-4)



def test_bf16_decode_attention_on_cpu_runs_in_fp32(ckpt_14m, tokenizer, monkeypatch):
    """torch's CPU attention kernel is 4-5x slower in bf16 than in fp32 for one query over the
    cache, so a bf16 decode step on CPU attends in fp32: SDPA sees fp32 inputs, and the logits
    are those of the bf16 model attending in bf16, to bf16's rounding."""
    model = load_model(ckpt_14m[0], dtype=torch.bfloat16)
    ids = text_batch(tokenizer)[:, :8]
    B, T = ids.shape
    sdpa = torch.nn.functional.scaled_dot_product_attention
    seen = []

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, kwargs.get("attn_mask") is not None))
        return sdpa(q, k, v, **kwargs)

    with torch.no_grad():
        cache = KVCache(model.config, B, T + 1, dtype=torch.bfloat16)
        model(ids[:, :7], cache=cache)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        step = model(ids[:, 7:8], positions=torch.full((B, 1), 7), cache=cache)
        monkeypatch.undo()
        full = model(ids)
    assert seen and all(dtype == torch.float32 and masked for dtype, masked in seen)
    assert step.dtype == torch.bfloat16
    torch.testing.assert_close(step[:, 0].float(), full[:, 7].float(), rtol=0, atol=0.05 * full.float().abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decode_attention_on_cpu_equals_sdpa(dtype):
    """A compiled CPU decode step attends through decode_attention (two sums and a softmax that
    inductor fuses): the same output as SDPA over the same masked cache, rows of different
    lengths, in fp32 and bf16 (to the input's rounding)."""
    from minidolly.model import decode_attention

    torch.manual_seed(0)
    B, H, S, D = 3, 4, 40, 16
    q, k, v = (torch.randn(B, H, n, D).to(dtype) for n in (1, S, S))
    mask = torch.arange(S) <= torch.tensor([0, 17, S - 1])[:, None, None, None]  # (B, 1, 1, S)
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    got = torch.compile(decode_attention, fullgraph=True, dynamic=False)(q, k, v, mask)
    assert got.dtype == dtype and got.shape == (B, H, 1, D)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


# Table 1 of the Pythia paper (arXiv:2304.01373); 14m and 31m from their HF model cards' totals.
PAPER_PARAMS = {
    "70m": 70_426_624,
    "160m": 162_322_944,
    "410m": 405_334_016,
    "1b": 1_011_781_632,
    "1.4b": 1_414_647_808,
    "2.8b": 2_775_208_960,
    "6.9b": 6_857_302_016,
    "12b": 11_846_072_320,
}


@pytest.mark.parametrize("size", list(PAPER_PARAMS))
def test_preset_parameter_counts_equal_the_paper(size):
    config = ModelConfig.from_size(size)
    with torch.device("meta"):
        model = GPTNeoX(config)
    assert sum(p.numel() for p in model.parameters()) == PAPER_PARAMS[size] == config.num_params()
    assert next(model.parameters()).is_meta


def test_preset_names_and_shapes():
    assert ModelConfig.from_size("pythia-1.4b-deduped") == ModelConfig.from_size("1.4b")
    assert ModelConfig.from_size("EleutherAI/pythia-70m").hidden_size == 512
    assert ModelConfig.from_size("1b").head_dim == 256
    assert ModelConfig.from_size("2.8b").head_dim == 80
    assert ModelConfig.from_size("6.9b").vocab_size == 50432
    assert ModelConfig.from_size("12b").vocab_size == 50688
    dolly = ModelConfig.from_size("dolly-v2-7b")
    assert dolly.vocab_size == 50280 and dolly.hidden_size == 4096
    for s in ("14m", "31m"):
        assert ModelConfig.from_size(s).num_layers == 6
    with pytest.raises(ValueError, match="Unknown model size '13b'"):
        ModelConfig.from_size("13b")


def test_from_hf_reads_the_real_dolly_config(tmp_path):
    from conftest import DOLLY_DIR

    config = ModelConfig.from_hf(DOLLY_DIR / "config.json")
    assert config == ModelConfig.from_size("dolly-v2-3b")
    # the newer spelling (transformers >= 4.56 writes rope_parameters) reads the same
    new = dict(model_type="gpt_neox", vocab_size=50280, hidden_size=2560, num_hidden_layers=32,
               num_attention_heads=32, intermediate_size=10240,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
    assert ModelConfig.from_hf(new) == config


def test_from_hf_rejects_another_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    with pytest.raises(ValueError, match="model_type 'llama'.*only reads GPT-NeoX"):
        ModelConfig.from_hf(tmp_path)


def test_init_follows_gpt_neox():
    config = ModelConfig(vocab_size=1000, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024)
    torch.manual_seed(0)
    m = GPTNeoX(config)
    small, wang = (2 / (5 * 256)) ** 0.5, 2 / (4 * 256**0.5)
    assert abs(m.layers[0].attention.query_key_value.weight.std().item() - small) < 0.05 * small
    assert abs(m.layers[0].mlp.dense_4h_to_h.weight.std().item() - wang) < 0.05 * wang
    assert abs(m.embed_in.weight.std().item() - small) < 0.05 * small
    assert m.layers[1].input_layernorm.weight.eq(1).all() and m.layers[1].attention.dense.bias.eq(0).all()
