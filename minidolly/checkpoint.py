"""Hugging Face checkpoints in and out: the one place that knows the file formats.

A GPT-NeoX checkpoint directory holds `config.json` and weights in one of four layouts:
`model.safetensors`, sharded `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`,
`pytorch_model.bin`, or sharded `.bin` + `pytorch_model.bin.index.json` (the official dolly-v2
weights are .bin only). HF keys are ours with a `gpt_neox.` prefix, except `embed_out`.

Loading never holds two copies of the weights: the model is built on the meta device (no
memory), each tensor is a view into the memory-mapped file, converted to the requested
dtype/device one tensor at a time, and assigned into the model.
"""

from __future__ import annotations

import json
import os
import struct

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .model import GPTNeoX


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match the model's config."""


class DownloadError(OSError):
    """A Hub id could not be fetched (offline, private, or no such repository)."""


# Buffers that old GPT-NeoX code saved with the weights; they are recomputed, never learned.
IGNORED_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".attention.rotary_emb.inv_freq")

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def hf_key(name: str) -> str:
    """Our parameter name -> the Hugging Face GPTNeoXForCausalLM key."""
    return name if name.startswith("embed_out.") else "gpt_neox." + name


def our_key(key: str) -> str:
    """Hugging Face key -> our parameter name (inverse of `hf_key`)."""
    return key.removeprefix("gpt_neox.")


# ------------------------------------------------------------------- locating


def looks_like_hub_id(source: str) -> bool:
    """'org/name' with no local meaning: not absolute, not ./ or ~, exactly one slash."""
    s = os.fspath(source)
    return s.count("/") == 1 and not s.startswith((".", "/", "~")) and not os.path.exists(s)


def hub_download(repo_id: str, filename: str | None = None, patterns: list[str] | None = None,
                 repo_type: str = "model") -> str:
    """Fetch one file (returns its path) or a filtered snapshot (returns the directory) into
    the standard Hugging Face cache; `repo_type` is "model" or "dataset". Raises DownloadError
    with what to do instead."""
    import huggingface_hub

    try:
        if filename is not None:
            return huggingface_hub.hf_hub_download(repo_id, filename, repo_type=repo_type)
        return huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, repo_type=repo_type)
    except Exception as e:  # offline, 404, gated: all end the same way for the user
        what = f"{filename} of {repo_id}" if filename else repo_id
        raise DownloadError(
            f"Could not download {what} from the Hugging Face Hub ({type(e).__name__}); "
            f"check the name and your network, or pass a local directory with config.json and weights instead."
        ) from None


def resolve(source: str) -> str:
    """A local checkpoint directory for `source`, downloading a Hub id if needed.
    Raises FileNotFoundError for a local path that does not exist."""
    path = os.path.expanduser(os.fspath(source))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json.")
    if not looks_like_hub_id(source):
        raise FileNotFoundError(f"No checkpoint at {source}: no such directory.")
    common = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    directory = hub_download(source, patterns=common + ["*.safetensors", "model.safetensors.index.json"])
    if not any(f.endswith(".safetensors") for f in os.listdir(directory)):
        # Only .bin weights published (e.g. databricks/dolly-v2-*): fetch those instead.
        directory = hub_download(source, patterns=common + ["pytorch_model*.bin", "pytorch_model.bin.index.json"])
    return directory


def weight_files(directory: str) -> list[str]:
    """The weight files of a checkpoint directory, safetensors preferred over .bin."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if os.path.isfile(os.path.join(directory, single)):
            return [os.path.join(directory, single)]
        index_path = os.path.join(directory, index)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise CheckpointError(f"{index_path} is not a valid shard index ({e}).") from None
            return [os.path.join(directory, s) for s in shards]
    raise CheckpointError(
        f"{directory} has no weights: expected model.safetensors, model.safetensors.index.json, "
        f"pytorch_model.bin or pytorch_model.bin.index.json."
    )


# -------------------------------------------------------------------- reading


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file as a zero-copy view into one private memory map.

    The format: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}}, then the raw bytes. Pages are read from disk only when touched.
    """
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({e}); is it truncated or corrupt?") from None
    header.pop("__metadata__", None)
    data = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)[8 + n :]
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}.")
        if end > data.numel():
            raise CheckpointError(
                f"{path} is truncated: tensor {name} needs bytes up to {8 + n + end:,} but the file has {size:,}."
            )
        raw = data[start:end]
        if start % dtype.itemsize:
            raw = raw.clone()  # unaligned in the file: view() needs aligned storage
        tensors[name] = raw.view(dtype).view(info["shape"])
    return tensors


def read_bin(path: str) -> dict[str, torch.Tensor]:
    """A PyTorch .bin state dict, memory-mapped, with `weights_only=True`: tensors and plain
    containers only, never arbitrary pickled objects."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            # The legacy (pre-1.6, non-zip) format cannot be memory-mapped; read it whole.
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path} could not be read ({type(e).__name__}: {reason}); is it truncated or corrupt?") from None


def read_weights(path: str) -> dict[str, torch.Tensor]:
    return read_safetensors(path) if path.endswith(".safetensors") else read_bin(path)


# -------------------------------------------------------------------- loading


def load_model(source, dtype: torch.dtype | None = None, device=None, use_kernels: bool | None = None) -> GPTNeoX:
    """Load a GPT-NeoX checkpoint in Hugging Face layout.

    source: a local directory (config.json + weights) or a Hub id such as "EleutherAI/pythia-70m".
    dtype: the parameters' dtype; None keeps the dtype stored in the file.
    device: where the parameters live (default CPU).
    Returns the model in eval mode. Raises FileNotFoundError / DownloadError when the source
    cannot be found, CheckpointError when a file is corrupt or does not fit the config
    (naming the tensor, the file and both shapes).
    """
    directory = resolve(source)
    files = weight_files(directory)
    config = ModelConfig.from_hf(directory)
    with torch.device("meta"):
        model = GPTNeoX(config, use_kernels=use_kernels)
    expected = {hf_key(k): v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("embed_out.weight")

    state, seen = {}, {}
    for path in files:
        for key, tensor in read_weights(path).items():
            if key.endswith(IGNORED_SUFFIXES):
                continue
            if key not in expected:
                raise CheckpointError(f"{path} has tensor {key}, which a GPT-NeoX with this config.json does not have.")
            if tuple(tensor.shape) != tuple(expected[key]):
                raise CheckpointError(
                    f"{path}: tensor {key} has shape {tuple(tensor.shape)} but config.json implies "
                    f"{tuple(expected[key])}."
                )
            seen[key] = path
            state[our_key(key)] = tensor.to(device=device, dtype=dtype or tensor.dtype)
    missing = [k for k in expected if k not in seen]
    if missing:
        names = ", ".join(os.path.basename(p) for p in files)
        raise CheckpointError(
            f"{directory} ({names}) lacks tensor {missing[0]} (shape {tuple(expected[missing[0]])})"
            + (f" and {len(missing) - 1} more." if len(missing) > 1 else ".")
        )
    if config.tie_word_embeddings:
        state["embed_out.weight"] = state["embed_in.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.embed_out.weight = model.embed_in.weight
    return model.eval()


# --------------------------------------------------------------------- saving


def save_model(model: GPTNeoX, directory: str, *, state_dict: dict | None = None,
               max_shard_size: int = 5 * 2**30) -> None:
    """Write `config.json` + `model.safetensors` that transformers' GPTNeoXForCausalLM and
    `load_model` both read. Above `max_shard_size` bytes the weights are split into
    `model-0000k-of-0000n.safetensors` shards with a `model.safetensors.index.json`, as HF does.

    state_dict: the full (unsharded) weights to write instead of `model.state_dict()`, e.g. the
    gathered state of an FSDP-sharded model; `model` then only supplies the config.
    Files are written to temporary names and renamed, so a crash never leaves a half file.
    """
    os.makedirs(directory, exist_ok=True)
    config = model.config
    state = state_dict if state_dict is not None else model.state_dict()
    tensors = {}
    for name, t in state.items():
        if config.tie_word_embeddings and name == "embed_out.weight":
            continue
        tensors[hf_key(name)] = t.detach().to("cpu").contiguous()
    dtypes = {t.dtype for t in tensors.values()}
    hf_config = config.to_hf() | {"torch_dtype": str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"}

    shards, current, current_size = [], {}, 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and current_size + nbytes > max_shard_size:
            shards.append(current)
            current, current_size = {}, 0
        current[key] = t
        current_size += nbytes
    shards.append(current)

    for stale in os.listdir(directory):  # a re-save must not leave shards of an older layout
        if stale.startswith("model") and (stale.endswith(".safetensors") or stale.endswith(".index.json")):
            os.remove(os.path.join(directory, stale))
    if len(shards) == 1:
        _write_atomic(os.path.join(directory, "model.safetensors"), lambda p: save_file(shards[0], p, metadata={"format": "pt"}))
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _write_atomic(os.path.join(directory, name), lambda p, s=shard: save_file(s, p, metadata={"format": "pt"}))
            weight_map.update(dict.fromkeys(shard, name))
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": weight_map}
        _write_atomic(os.path.join(directory, "model.safetensors.index.json"), lambda p: _dump_json(index, p))
    _write_atomic(os.path.join(directory, "config.json"), lambda p: _dump_json(hf_config, p))


def _dump_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _write_atomic(path: str, write) -> None:
    tmp = path + ".tmp"
    write(tmp)
    # the mode a plain open() gives (0644 under the usual umask): safetensors writes 0600
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
