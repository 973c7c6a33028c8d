"""Shared test helpers: where ../shared/data lives and how to build HF-format checkpoints."""

import os
import pathlib

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("MINIDOLLY_SHARED_DATA", REPO.parent / "shared" / "data"))
TOKENIZER_JSON = SHARED_DATA / "gpt-neox-20b-tokenizer.json"
DOLLY_DIR = SHARED_DATA / "configs" / "dolly-v2-3b"
DOLLY_RECORDS = SHARED_DATA / "databricks-dolly-15k.head789.jsonl"

# Real Pythia shapes, shrunk where the vocabulary or depth only costs test time.
PYTHIA_14M = dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512,
                  vocab_size=50304, rotary_pct=0.25)
PYTHIA_70M = dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048,
                  vocab_size=50304, rotary_pct=0.25)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one (run them with `pytest -m cuda`)")


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped, with the reason, where torch sees no CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def make_hf_checkpoint(directory, seed=0, perturb_norms=True, initializer_range=0.02, **config_kwargs):
    """Save a random-weight transformers GPTNeoXForCausalLM to `directory`; returns the HF model.

    LayerNorm weights and biases are moved away from 1 and 0 so that a model that skips or
    misplaces a norm gives different logits.
    """
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(PYTHIA_14M, max_position_embeddings=2048, rotary_emb_base=10000,
                  use_parallel_residual=True, tie_word_embeddings=False, initializer_range=initializer_range)
    kwargs.update(config_kwargs)
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(**kwargs)).eval()
    if perturb_norms:
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if "layernorm" in name or "final_layer_norm" in name:
                    p.add_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(directory)
    return hf


@pytest.fixture(scope="module")
def one_thread():
    """For files of tiny models: a second torch thread only adds barrier waits, which on a busy
    2-core machine triple such a file's runtime."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def meta_reads(monkeypatch):
    """On the meta device a tensor has no values, so every read of one on the host (.item(),
    bool(), .nonzero(), .cpu(), a boolean index, ...) raises. With this fixture .tolist() of a
    meta tensor answers instead, token 7 for each row, and is counted: the list of the shapes
    read. A meta model then shows how many times a loop reads the device."""
    reads, real_tolist = [], torch.Tensor.tolist

    def tolist(t):
        if not t.is_meta:
            return real_tolist(t)
        reads.append(tuple(t.shape))
        return [7] * t.shape[0]

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    return reads


@pytest.fixture(scope="session")
def tokenizer():
    from minidolly import load_tokenizer

    if not TOKENIZER_JSON.exists():
        pytest.fail(f"{TOKENIZER_JSON} is missing: the tests need ../shared/data beside the checkout.")
    return load_tokenizer(str(TOKENIZER_JSON))


@pytest.fixture(scope="session")
def ckpt_14m(tmp_path_factory):
    """A pythia-14m-shaped HF checkpoint (safetensors) and its transformers model."""
    d = tmp_path_factory.mktemp("pythia14m")
    hf = make_hf_checkpoint(d, seed=0)
    return d, hf
