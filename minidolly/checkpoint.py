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

from . import quantize as Q
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


def safetensors_header(path: str) -> tuple[int, dict]:
    """(header length, header) of a .safetensors file: 8-byte little-endian length, then a
    JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            return n, json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({e}); is it truncated or corrupt?") from None


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file as a zero-copy view into one private memory map,
    after the header (safetensors_header). Pages are read from disk only when touched.
    """
    size = os.path.getsize(path)
    n, header = safetensors_header(path)
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


def load_model(source, dtype: torch.dtype | None = None, device=None, use_kernels: bool | None = None,
               quantize: str | None = None, group_size: int | None = None) -> GPTNeoX:
    """Load a GPT-NeoX checkpoint in Hugging Face layout, or one that save_model wrote quantized.

    source: a local directory (config.json + weights) or a Hub id such as "EleutherAI/pythia-70m".
    dtype: the parameters' dtype; None keeps the dtype stored in the file. For a quantized
        model, the dtype of what stays unquantized (embed_in, LayerNorms, biases) and of the
        activations.
    device: where the parameters live (default CPU).
    quantize: None, "int8" or "int4" (minidolly/quantize.py): every linear layer's weight is
        quantized as it is read, so the full-precision model is never in memory. A quantized
        checkpoint loads quantized as it was saved; asking it for another quantization is an error.
    group_size: int4's group size (default quantize.DEFAULT_GROUP_SIZE).
    Returns the model in eval mode. Raises FileNotFoundError / DownloadError when the source
    cannot be found, CheckpointError when a file is corrupt or does not fit the config (naming
    the tensor, the file and both shapes) or is quantized in a format this version cannot
    read, QuantizationError (a ValueError) for a quantize / group_size that cannot apply.
    """
    directory = resolve(source)
    files = weight_files(directory)
    config = ModelConfig.from_hf(directory)
    stored = stored_quantization(files)
    mode, group_size = _quantization_to_load(stored, quantize, group_size, directory)
    with torch.device("meta"):
        model = GPTNeoX(config, use_kernels=use_kernels)
    linears = {name: m for name, m in Q.linear_layers(model)}
    if mode is not None:
        Q.check_shapes([(n, m.in_features) for n, m in linears.items()], mode, group_size)
    expected = {hf_key(k): (None, v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings and not (stored and mode):  # a quantized file keeps its own embed_out
        expected.pop("embed_out.weight")
    if stored:  # the stored tensors of each quantized weight replace its full-precision entry
        for name, m in linears.items():
            del expected[hf_key(name + ".weight")]
            layout = Q.file_layout(m.out_features, m.in_features, Q.layer_mode(name, mode), group_size)
            for suffix, (dt, shape) in layout.items():
                expected[hf_key(f"{name}.{suffix}")] = (dt, torch.Size(shape))

    state, seen = {}, {}
    for path in files:
        for key, tensor in read_weights(path).items():
            if key.endswith(IGNORED_SUFFIXES):
                continue
            if key not in expected:
                raise CheckpointError(f"{path} has tensor {key}, which a GPT-NeoX with this config.json does not have.")
            want_dtype, want_shape = expected[key]
            if tuple(tensor.shape) != tuple(want_shape):
                raise CheckpointError(
                    f"{path}: tensor {key} has shape {tuple(tensor.shape)} but config.json implies "
                    f"{tuple(want_shape)}."
                )
            if want_dtype is not None and tensor.dtype != want_dtype:
                raise CheckpointError(f"{path}: tensor {key} is {tensor.dtype}; the {mode} format stores {want_dtype}.")
            seen[key] = path
            name = our_key(key)
            if want_dtype is not None or (mode and name.removesuffix(".weight") in linears):
                state[name] = tensor  # quantized (or about to be): kept as stored, a view of the file
            else:
                state[name] = tensor.to(device=device, dtype=dtype or tensor.dtype)
    missing = [k for k in expected if k not in seen]
    if missing:
        names = ", ".join(os.path.basename(p) for p in files)
        raise CheckpointError(
            f"{directory} ({names}) lacks tensor {missing[0]} (shape {tuple(expected[missing[0]][1])})"
            + (f" and {len(missing) - 1} more." if len(missing) > 1 else ".")
        )
    if config.tie_word_embeddings and "embed_out.weight" not in state and "embed_out.weight_scale" not in state:
        state["embed_out.weight"] = state["embed_in.weight"]
    if mode is not None:
        for name in linears:  # one weight at a time: the full-precision model is never whole
            layer = Q.layer_mode(name, mode)
            if stored:
                parts = {suffix: state.pop(f"{name}.{suffix}") for suffix in Q.STORED[layer]}
            else:
                parts = Q.quantize_to_file_layout(state.pop(name + ".weight").to(device), layer, group_size)
            bias = state.pop(name + ".bias", None)
            model.set_submodule(name, Q.linear_from_file(name, parts, bias, layer, group_size, device))
    model.load_state_dict(state, strict=mode is None, assign=True)
    if config.tie_word_embeddings and mode is None:
        model.embed_out.weight = model.embed_in.weight
    return model.eval()


def stored_quantization(files: list[str]) -> dict | None:
    """{"mode", "group_size"} of a checkpoint that save_model wrote quantized, None for a
    full-precision one. Raises CheckpointError for a format version this code cannot read,
    or shards that disagree."""
    found = {}
    for path in files:
        meta = (safetensors_header(path)[1].get("__metadata__") or {}) if path.endswith(".safetensors") else {}
        if "minidolly.quantization" not in meta:
            found[path] = None
            continue
        version = meta.get("minidolly.format_version")
        if version != str(Q.FORMAT_VERSION):
            raise CheckpointError(
                f"{path} is a quantized minidolly checkpoint of format version {version or '(none)'}, "
                f"but this minidolly reads version {Q.FORMAT_VERSION} only; load it with the minidolly that wrote it, "
                f"or quantize the full-precision checkpoint again.")
        mode, g = meta["minidolly.quantization"], meta.get("minidolly.group_size", "")
        if mode not in Q.MODES or (mode == "int4" and not g.isdigit()):
            raise CheckpointError(f"{path} has unknown quantization metadata ({mode!r}, group size {g!r}).")
        found[path] = {"mode": mode, "group_size": int(g) if mode == "int4" else None}
    kinds = list(found.values())
    if any(k != kinds[0] for k in kinds):
        raise CheckpointError(f"The weight files {', '.join(found)} are not all quantized alike; re-save the checkpoint.")
    return kinds[0]


def _quantization_to_load(stored, quantize, group_size, directory) -> tuple[str | None, int | None]:
    """(mode, group_size) for load_model, from what the files hold and what was asked for."""
    if stored is None:
        if quantize is None:
            if group_size is not None:
                raise Q.QuantizationError("group_size applies to quantize='int4' only.")
            return None, None
        group_size = Q.DEFAULT_GROUP_SIZE if group_size is None and quantize == "int4" else group_size
        Q.check_quantize(quantize, group_size)
        return quantize, group_size if quantize == "int4" else None
    if quantize not in (None, stored["mode"]) or group_size not in (None, stored["group_size"]):
        held = stored["mode"] + (f" (group size {stored['group_size']})" if stored["group_size"] else "")
        raise Q.QuantizationError(
            f"{directory} holds {held} weights, which cannot be quantized again to {quantize or stored['mode']}"
            f"{f' (group size {group_size})' if group_size else ''}; load the full-precision checkpoint instead.")
    return stored["mode"], stored["group_size"]


# --------------------------------------------------------------------- saving


def save_model(model: GPTNeoX, directory: str, *, state_dict: dict | None = None,
               max_shard_size: int = 5 * 2**30) -> None:
    """Write `config.json` + `model.safetensors` that transformers' GPTNeoXForCausalLM and
    `load_model` both read. Above `max_shard_size` bytes the weights are split into
    `model-0000k-of-0000n.safetensors` shards with a `model.safetensors.index.json`, as HF does.

    A quantized model (minidolly/quantize.py) is written in minidolly's quantized layout
    (docs/generation.md): each quantized weight as its stored tensors, the quantization and
    the format version in every file's metadata, and a `quantization_config` in config.json
    that makes transformers refuse the directory instead of misreading it. `load_model` reads
    it back without the full-precision checkpoint.
    state_dict: the full (unsharded) weights to write instead of `model.state_dict()`, e.g. the
    gathered state of an FSDP-sharded model; `model` then only supplies the config.
    Files are written to temporary names and renamed, so a crash never leaves a half file.
    """
    os.makedirs(directory, exist_ok=True)
    config = model.config
    quantized = Q.quantization_of(model)
    state = state_dict if state_dict is not None else model.state_dict()
    tensors = {}
    for name, t in state.items():
        if config.tie_word_embeddings and name == "embed_out.weight" and not quantized:
            continue
        tensors[hf_key(name)] = t.detach().to("cpu").contiguous()
    # the activation dtype: what the unquantized tensors share (embed_in's, in a quantized file)
    dtypes = {tensors[hf_key("embed_in.weight")].dtype} if quantized else {t.dtype for t in tensors.values()}
    hf_config = config.to_hf() | {"torch_dtype": str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"}
    metadata = {"format": "pt"}
    if quantized:
        metadata |= {"minidolly.quantization": quantized["mode"], "minidolly.format_version": str(Q.FORMAT_VERSION)}
        if quantized["group_size"]:
            metadata["minidolly.group_size"] = str(quantized["group_size"])
        hf_config["quantization_config"] = {"quant_method": f"minidolly-{quantized['mode']}",
                                            "format_version": Q.FORMAT_VERSION, "group_size": quantized["group_size"]}

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
        _write_atomic(os.path.join(directory, "model.safetensors"), lambda p: save_file(shards[0], p, metadata=metadata))
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _write_atomic(os.path.join(directory, name), lambda p, s=shard: save_file(s, p, metadata=metadata))
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
