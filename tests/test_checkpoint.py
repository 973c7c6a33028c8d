"""Checkpoints in every layout people have, out in a layout transformers reads, and clear errors."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_hf_checkpoint
from minidolly import CheckpointError, DownloadError, load_model, save_model

IDS = torch.tensor([[12092, 1533, 13, 50277, 187, 510, 4062, 8516]])


def logits(model):
    with torch.no_grad():
        out = model(IDS)
    return out if isinstance(out, torch.Tensor) else out.logits


def test_round_trip_through_transformers(ckpt_14m, tmp_path):
    from transformers import GPTNeoXForCausalLM

    model = load_model(ckpt_14m[0])
    save_model(model, tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    hf = GPTNeoXForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (logits(hf) - logits(model)).abs().max().item() < 1e-5
    assert torch.equal(logits(load_model(tmp_path / "out")), logits(model))


def test_sharded_save_and_load(ckpt_14m, tmp_path):
    from transformers import GPTNeoXForCausalLM

    model = load_model(ckpt_14m[0])
    save_model(model, tmp_path, max_shard_size=4 * 2**20)  # 4 MiB: the embeddings alone exceed it
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "model.safetensors").exists()
    assert torch.equal(logits(load_model(tmp_path)), logits(model))
    hf = GPTNeoXForCausalLM.from_pretrained(tmp_path).eval()
    assert (logits(hf) - logits(model)).abs().max().item() < 1e-5


def test_saved_files_get_the_usual_mode(ckpt_14m, tmp_path):
    # safetensors writes its file 0600; final/ should read like any other file the user makes
    save_model(load_model(ckpt_14m[0]), tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    modes = {name: oct(os.stat(tmp_path / name).st_mode & 0o777) for name in os.listdir(tmp_path)}
    assert modes == dict.fromkeys(["config.json", "model.safetensors"], oct(0o666 & ~umask))


def test_bin_checkpoints_with_legacy_buffers(ckpt_14m, tmp_path):
    """The official dolly-v2 weights: pytorch_model.bin shards holding attention.bias,
    attention.masked_bias and rotary inv_freq buffers besides the weights."""
    src, hf = ckpt_14m
    state = load_file(src / "model.safetensors")
    state["gpt_neox.layers.0.attention.bias"] = torch.tril(torch.ones(1, 1, 2048, 2048, dtype=torch.bool))
    state["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    state["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(4)
    keys = sorted(state)
    half = len(keys) // 2
    parts = {"pytorch_model-00001-of-00002.bin": keys[:half], "pytorch_model-00002-of-00002.bin": keys[half:]}
    for name, ks in parts.items():
        torch.save({k: state[k] for k in ks}, tmp_path / name)
    (tmp_path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {k: n for n, ks in parts.items() for k in ks}}))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    model = load_model(tmp_path, dtype=torch.float32)
    assert (logits(model) - logits(hf)).abs().max().item() < 1e-4


def test_dtype_and_zero_copy(ckpt_14m):
    model = load_model(ckpt_14m[0], dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    assert load_model(ckpt_14m[0]).embed_in.weight.dtype == torch.float32  # None: as stored


def _copy(src, dst, mutate):
    state = load_file(src / "model.safetensors")
    mutate(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())


def test_missing_tensor_is_named(ckpt_14m, tmp_path):
    _copy(ckpt_14m[0], tmp_path, lambda s: s.pop("gpt_neox.layers.3.mlp.dense_h_to_4h.bias"))
    with pytest.raises(CheckpointError, match=r"lacks tensor gpt_neox\.layers\.3\.mlp\.dense_h_to_4h\.bias \(shape \(512,\)\)"):
        load_model(tmp_path)


def test_unexpected_tensor_is_named(ckpt_14m, tmp_path):
    _copy(ckpt_14m[0], tmp_path, lambda s: s.update({"gpt_neox.layers.9.mlp.extra": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors has tensor gpt_neox\.layers\.9\.mlp\.extra"):
        load_model(tmp_path)


def test_shape_mismatch_names_both_shapes(ckpt_14m, tmp_path):
    _copy(ckpt_14m[0], tmp_path, lambda s: s.update({"embed_out.weight": torch.zeros(50280, 128)}))
    with pytest.raises(CheckpointError, match=r"embed_out\.weight has shape \(50280, 128\) but config\.json implies \(50304, 128\)"):
        load_model(tmp_path)


def test_truncated_safetensors_names_the_file(ckpt_14m, tmp_path):
    _copy(ckpt_14m[0], tmp_path, lambda s: None)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        load_model(tmp_path)
    path.write_bytes(b"\x07garbage")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a valid safetensors file"):
        load_model(tmp_path)


def test_corrupt_bin_names_the_file(ckpt_14m, tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a zip file at all")
    (tmp_path / "config.json").write_text((ckpt_14m[0] / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin could not be read"):
        load_model(tmp_path)


def test_missing_paths_and_offline_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No checkpoint at \./no/such/dir"):
        load_model("./no/such/dir")
    with pytest.raises(CheckpointError, match="has no weights"):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
        load_model(tmp_path)
    with pytest.raises(DownloadError, match=r"Could not download EleutherAI/pythia-70m.*local directory"):
        load_model("EleutherAI/pythia-70m")  # no network in tests (or CI): the Hub is unreachable


def test_dolly_vocab_loads_as_is(tmp_path):
    make_hf_checkpoint(tmp_path, vocab_size=50280)
    assert load_model(tmp_path).embed_in.weight.shape == (50280, 128)
