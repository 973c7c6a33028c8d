"""Hugging Face checkpoints in and out: the one place that knows the file formats.

A GPT-NeoX checkpoint directory holds `config.json` and weights in one of four layouts:
`model.safetensors`, sharded `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`,
`pytorch_model.bin`, or sharded `.bin` + `pytorch_model.bin.index.json` (the official dolly-v2
weights are .bin only). HF keys are ours with a `gpt_neox.` prefix, except `embed_out`.

Loading never holds two copies of the weights: the model is built on the meta device (no
memory), each tensor is a view into the memory-mapped file, converted to the requested
dtype/device one tensor at a time, and assigned into the model.

A LoRA adapter directory (PEFT's layout, minidolly/lora.py) holds `adapter_config.json` (rank,
alpha, targets and `base_model_name_or_path`) and `adapter_model.safetensors`, whose keys are
the Hugging Face keys of the adapted modules with PEFT's `base_model.model.` prefix.
`load_model` recognises one and returns its base with the adapter merged in.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from . import quantize as Q
from .config import ModelConfig
from .lora import merged_weight
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


PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model


def peft_key(name: str) -> str:
    """Our adapter parameter name -> PEFT's key in adapter_model.safetensors, e.g.
    layers.0.attention.query_key_value.lora_A.weight ->
    base_model.model.gpt_neox.layers.0.attention.query_key_value.lora_A.weight."""
    return PEFT_PREFIX + hf_key(name)


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
               quantize: str | None = None, group_size: int | None = None, adapter=None) -> GPTNeoX:
    """Load a GPT-NeoX checkpoint in Hugging Face layout (or one that save_model wrote
    quantized), optionally with a LoRA adapter.

    source: a local directory (config.json + weights) or a Hub id such as "EleutherAI/pythia-70m";
        or a LoRA adapter directory (adapter_config.json), which loads the base it names
        (`base_model_name_or_path`) with the adapter.
    dtype: the parameters' dtype; None keeps the dtype stored in the file. For a quantized
        model, the dtype of what stays unquantized (embed_in, LayerNorms, biases) and of the
        activations.
    device: where the parameters live (default CPU).
    quantize: None, "int8", "int4", "fp16" or "bf16" (minidolly/quantize.py): every linear layer's weight is
        quantized as it is read, so the full-precision model is never in memory. A quantized
        checkpoint loads quantized as it was saved; asking it for another quantization is an error.
    group_size: int4's group size (default quantize.DEFAULT_GROUP_SIZE).
    adapter: a LoRA adapter directory (ours or PEFT's) to apply to `source`. An adapter is
        merged into the base weights (W + (alpha/r)·B·A, in fp32, then `dtype`), so the model
        is a plain GPTNeoX that runs at the base's speed; with `quantize`, the merged weights
        are quantized (the base is then whole in memory once, in `dtype`).
    Returns the model in eval mode. Raises FileNotFoundError / DownloadError when the source
    cannot be found, CheckpointError when a file is corrupt or does not fit the config (naming
    the tensor, the file and both shapes), is quantized in a format this version cannot read,
    or when the adapter does not fit the base (naming both) or the base is stored quantized;
    QuantizationError (a ValueError) for a quantize / group_size that cannot apply.
    """
    directory = resolve(source)
    if adapter is None and os.path.isfile(os.path.join(directory, ADAPTER_CONFIG)):
        adapter, directory = directory, resolve(adapter_base(directory))
    if adapter is not None:
        lora = read_adapter(resolve(adapter))
        if quantize is not None:
            Q.check_quantize(quantize, group_size or Q.DEFAULT_GROUP_SIZE)
        model = load_model(directory, dtype=dtype, device=device, use_kernels=use_kernels)
        if Q.quantization_of(model) is not None:
            raise CheckpointError(f"The adapter {lora.directory} cannot be merged into {directory}: its weights are "
                                  "stored quantized; use the full-precision base (and --quantize).")
        merge_adapter(model, lora, base=directory)
        if quantize is not None:
            Q.quantize_model(model, quantize, group_size or Q.DEFAULT_GROUP_SIZE)
        return model
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
                key = hf_key(name + ".weight")
                parts = Q.quantize_to_file_layout(state.pop(name + ".weight").to(device), layer, group_size,
                                                  f"{seen.get(key, directory)}: tensor {key}")
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


# ------------------------------------------------------------ LoRA adapters

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT's names, safetensors first
# PEFT options that change what an adapter computes beyond W + (alpha/r)·B·A: refused, not ignored
UNSUPPORTED_ADAPTER_OPTIONS = ("use_dora", "lora_bias", "modules_to_save", "alpha_pattern", "layer_replication",
                               "fan_in_fan_out", "trainable_token_indices")


@dataclass
class Adapter:
    """A LoRA adapter as read from disk: its adapter_config.json and its A and B matrices
    under our parameter names (`<module>.lora_A.weight` (r, in), `<module>.lora_B.weight`
    (out, r))."""

    directory: str
    config: dict
    tensors: dict[str, torch.Tensor]

    def modules(self) -> list[str]:
        """The adapted modules, e.g. "layers.0.attention.query_key_value"."""
        return [k.removesuffix(".lora_A.weight") for k in self.tensors if k.endswith(".lora_A.weight")]

    def scaling(self, module: str) -> float:
        """alpha / r of `module` (alpha / sqrt(r) with PEFT's use_rslora); r is read from the
        tensor, which also covers PEFT's per-module `rank_pattern`."""
        r = self.tensors[f"{module}.lora_A.weight"].shape[0]
        return self.config["lora_alpha"] / (math.sqrt(r) if self.config.get("use_rslora") else r)


def adapter_base(directory: str) -> str:
    """The base model an adapter directory names (`base_model_name_or_path`). Raises
    CheckpointError when it names none."""
    config = _read_adapter_config(directory)
    base = config.get("base_model_name_or_path")
    if not base:
        raise CheckpointError(f"{os.path.join(directory, ADAPTER_CONFIG)} names no base model "
                              f"(base_model_name_or_path); pass the base and the adapter: load_model(base, adapter=...).")
    return base


def _read_adapter_config(directory: str) -> dict:
    path = os.path.join(directory, ADAPTER_CONFIG)
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory} is not a LoRA adapter: it has no {ADAPTER_CONFIG}.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path} is not a LoRA adapter (peft_type {config.get('peft_type')!r}); "
                              f"minidolly loads LoRA adapters only.")
    for option in UNSUPPORTED_ADAPTER_OPTIONS:
        if config.get(option):
            raise CheckpointError(f"{path} sets {option}; minidolly loads plain LoRA adapters (W + alpha/r·B·A) only.")
    if not (isinstance(config.get("lora_alpha"), (int, float)) and config["lora_alpha"] > 0):
        raise CheckpointError(f"{path}: lora_alpha must be a positive number, got {config.get('lora_alpha')!r}.")
    return config


def read_adapter(directory: str) -> Adapter:
    """Read a LoRA adapter directory saved by `save_adapter` or by PEFT (`save_pretrained`).
    Raises FileNotFoundError without adapter_config.json or weights, CheckpointError for
    anything but plain LoRA A/B matrices (naming the file and the tensor)."""
    config = _read_adapter_config(directory)
    paths = [os.path.join(directory, n) for n in ADAPTER_WEIGHTS if os.path.isfile(os.path.join(directory, n))]
    if not paths:
        raise FileNotFoundError(f"{directory} has {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)}.")
    tensors = {}
    for key, tensor in read_weights(paths[0]).items():
        name = our_key(key.removeprefix(PEFT_PREFIX))
        if not key.startswith(PEFT_PREFIX) or not name.endswith((".lora_A.weight", ".lora_B.weight")):
            raise CheckpointError(f"{paths[0]} has tensor {key}, which is not a LoRA A or B matrix of a "
                                  f"GPT-NeoX layer; minidolly loads plain LoRA adapters only.")
        tensors[name] = tensor
    for name in tensors:
        twin = name.replace(".lora_A.", ".lora_B.") if ".lora_A." in name else name.replace(".lora_B.", ".lora_A.")
        if twin not in tensors:
            raise CheckpointError(f"{paths[0]} has {PEFT_PREFIX + hf_key(name)} but not {PEFT_PREFIX + hf_key(twin)}.")
    return Adapter(directory, config, tensors)


@torch.no_grad()
def merge_adapter(model: GPTNeoX, adapter: Adapter, base: str) -> GPTNeoX:
    """Fold `adapter` into `model`'s weights in place: W += scaling · B A (in fp32, stored in
    W's dtype). `base` names the model in errors. Returns the model. Raises CheckpointError,
    naming the adapter and the base, when a module it adapts is missing or has another shape."""
    trained_on = adapter.config.get("base_model_name_or_path") or "an unnamed base"
    for module_name in adapter.modules():
        A, B = adapter.tensors[f"{module_name}.lora_A.weight"], adapter.tensors[f"{module_name}.lora_B.weight"]
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            module = None
        if not isinstance(module, torch.nn.Linear):
            raise CheckpointError(f"The adapter {adapter.directory} (trained on {trained_on}) does not fit the base "
                                  f"model {base}: it adapts {hf_key(module_name)}, which is not a linear layer of it.")
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != module.in_features or B.shape[0] != module.out_features \
                or A.shape[0] != B.shape[1]:
            raise CheckpointError(
                f"The adapter {adapter.directory} (trained on {trained_on}) does not fit the base model {base}: "
                f"its {hf_key(module_name)} has A {tuple(A.shape)} and B {tuple(B.shape)}, but the base's layer maps "
                f"{module.in_features} -> {module.out_features} features.")
        weight = merged_weight(module.weight, A.to(module.weight.device), B.to(module.weight.device),
                               adapter.scaling(module_name))
        module.weight = torch.nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    return model


def adapter_config(base: str, rank: int, alpha: float, dropout: float, targets: list[str]) -> dict:
    """The adapter_config.json PEFT writes for a plain LoRA on a causal LM (the fields that
    matter; PEFT fills the rest with its defaults)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": rank,
            "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha, "lora_dropout": dropout, "target_modules": list(targets), "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
            "layers_to_transform": None, "layers_pattern": None, "revision": None}


def save_adapter(directory: str, adapters: dict[str, torch.Tensor], config: dict) -> None:
    """Write a PEFT adapter directory: `adapter_config.json` (`config`, from `adapter_config`)
    and `adapter_model.safetensors` with `adapters` (our names, e.g. `layers.0.attention.
    query_key_value.lora_A.weight`) under PEFT's keys. PEFT's `PeftModel.from_pretrained` and
    `load_model` read it. Files are written to temporary names and renamed."""
    os.makedirs(directory, exist_ok=True)
    tensors = {peft_key(k): t.detach().to("cpu").contiguous() for k, t in adapters.items()}
    _write_atomic(os.path.join(directory, ADAPTER_WEIGHTS[0]), lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _write_atomic(os.path.join(directory, ADAPTER_CONFIG), lambda p: _dump_json(config, p))


def fingerprint(directory: str, samples: int = 64, block: int = 2**20) -> str:
    """A sha256 that identifies a checkpoint directory's weights, for refusing to resume a
    LoRA run on another base: its config.json (as parsed) and, per weight file, its name,
    size, and `samples` blocks of `block` bytes spread evenly over it (the first holds a
    safetensors header: every tensor's name, dtype, shape and offsets). Reading ~64 MiB per
    file instead of hashing 24 GB of a 12b checkpoint takes milliseconds; two trainings of the
    same shape differ in every block, so they never share a fingerprint."""
    h = hashlib.sha256()
    h.update(json.dumps(ModelConfig.from_hf(directory).to_hf(), sort_keys=True).encode())
    for path in weight_files(directory):
        size = os.path.getsize(path)
        h.update(f"{os.path.basename(path)}:{size}".encode())
        starts = sorted({max(0, size - block) * i // max(1, samples - 1) for i in range(samples)})
        with open(path, "rb") as f:
            for start in starts:
                f.seek(start)
                h.update(f.read(block))
    return h.hexdigest()
