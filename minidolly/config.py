"""Model sizes: one dataclass for the GPT-NeoX shape, presets for every Pythia and Dolly v2.

`ModelConfig` carries exactly the numbers that change the math of `minidolly.model.GPTNeoX`.
It is built three ways:

    ModelConfig.from_size("70m")              # a named preset (also "pythia-70m", "dolly-v2-3b")
    ModelConfig.from_hf("path/to/config.json")  # a Hugging Face gpt_neox config (file, dir or dict)
    ModelConfig(vocab_size=..., hidden_size=..., ...)  # by hand, e.g. tiny test models

`size_key` and `hub_id` are the one place a size name is parsed ("EleutherAI/pythia-70m" ->
"70m" -> "EleutherAI/pythia-70m").
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass


@dataclass
class ModelConfig:
    """The shape and numerics of one GPT-NeoX model (defaults: pythia-70m)."""

    vocab_size: int = 50304
    hidden_size: int = 512
    num_layers: int = 6
    num_heads: int = 8
    intermediate_size: int = 2048
    rotary_pct: float = 0.25  # fraction of each head's dims that get rotary embedding
    rotary_base: float = 10000.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    tie_word_embeddings: bool = False
    attention_bias: bool = True  # HF's `attention_bias`: query_key_value and dense carry biases
    initializer_range: float = 0.02  # only used by HF for its init; we keep it for round trips

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}."
            )
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ValueError(f"rotary_pct must be in (0, 1], got {self.rotary_pct}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head are rotated (HF: int(head_dim * rotary_pct))."""
        return int(self.head_dim * self.rotary_pct)

    def num_params(self) -> int:
        """Parameter count from the shapes alone (docs/architecture.md derives it)."""
        h, f, v, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        qkv_bias = 3 * h if self.attention_bias else 0
        dense_bias = h if self.attention_bias else 0
        per_layer = (
            4 * h  # two LayerNorms, weight + bias each
            + 3 * h * h + qkv_bias  # query_key_value
            + h * h + dense_bias  # attention output projection
            + h * f + f  # dense_h_to_4h
            + f * h + h  # dense_4h_to_h
        )
        embeddings = v * h * (1 if self.tie_word_embeddings else 2)
        return embeddings + L * per_layer + 2 * h

    # ------------------------------------------------------------------ presets

    @classmethod
    def from_size(cls, name: str) -> "ModelConfig":
        """A preset by name: "70m", "pythia-1.4b", "EleutherAI/pythia-12b-deduped", "dolly-v2-3b".

        Raises ValueError naming the valid sizes for an unknown name.
        """
        key = size_key(name)
        if key.startswith("dolly-v2-"):
            size = DOLLY_TO_PYTHIA.get(key[len("dolly-v2-"):])
            if size is None:
                raise ValueError(
                    f"Unknown Dolly size {name!r}; Dolly v2 comes in "
                    f"{', '.join('dolly-v2-' + k for k in DOLLY_TO_PYTHIA)}."
                )
            # Dolly's released checkpoints trimmed the embedding to the tokenizer plus its
            # three instruction tokens: 50277 + 3 = 50280 rows (see dolly-v2-3b/config.json).
            return dataclasses.replace(cls.from_size(size), vocab_size=50280)
        if key not in PYTHIA_SIZES:
            raise ValueError(
                f"Unknown model size {name!r}; choose one of {', '.join(PYTHIA_SIZES)} "
                f"(or pythia-<size>, dolly-v2-3b/7b/12b)."
            )
        layers, hidden, heads, vocab = PYTHIA_SIZES[key]
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            intermediate_size=4 * hidden,
        )

    # ------------------------------------------------------------ Hugging Face

    @classmethod
    def from_hf(cls, source) -> "ModelConfig":
        """Read a Hugging Face GPT-NeoX config: a dict, a config.json path, or its directory.

        Understands both the legacy keys (`rotary_pct`, `rotary_emb_base`) and the newer
        `rope_parameters` / `partial_rotary_factor` / `rope_theta` spelling.
        Raises FileNotFoundError for a missing file and ValueError for another model_type.
        """
        where = "the config dict"
        if not isinstance(source, dict):
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"No model config at {path}.")
            try:
                with open(path, encoding="utf-8") as f:
                    source = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}.") from None
            where = path
        d = source
        if d.get("model_type") != "gpt_neox":
            raise ValueError(
                f"{where} has model_type {d.get('model_type')!r}; minidolly only reads "
                f"GPT-NeoX (model_type 'gpt_neox') models such as Pythia and Dolly v2."
            )
        if d.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{where} uses hidden_act {d['hidden_act']!r}; only 'gelu' is supported.")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"{where} uses rope_type {rope['rope_type']!r}; only 'default' is supported.")
        rotary_pct = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", d.get("rotary_pct", 0.25)))
        rotary_base = rope.get("rope_theta", d.get("rope_theta", d.get("rotary_emb_base", 10000.0)))
        try:
            return cls(
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                num_layers=d["num_hidden_layers"],
                num_heads=d["num_attention_heads"],
                intermediate_size=d["intermediate_size"],
                rotary_pct=float(rotary_pct),
                rotary_base=float(rotary_base),
                max_position_embeddings=d.get("max_position_embeddings", 2048),
                layer_norm_eps=d.get("layer_norm_eps", 1e-5),
                use_parallel_residual=d.get("use_parallel_residual", True),
                tie_word_embeddings=d.get("tie_word_embeddings", False),
                attention_bias=d.get("attention_bias", True),
                initializer_range=d.get("initializer_range", 0.02),
            )
        except KeyError as e:
            raise ValueError(f"{where} lacks the key {e.args[0]!r}.") from None

    def to_hf(self) -> dict:
        """The config.json that transformers' GPTNeoXForCausalLM reads (legacy keys, which
        every transformers version since 4.25 understands)."""
        return {
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "gelu",
            "rotary_pct": self.rotary_pct,
            "rotary_emb_base": self.rotary_base,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": self.rotary_base,
                "partial_rotary_factor": self.rotary_pct,
            },
            "max_position_embeddings": self.max_position_embeddings,
            "layer_norm_eps": self.layer_norm_eps,
            "use_parallel_residual": self.use_parallel_residual,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "initializer_range": self.initializer_range,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "use_cache": True,
        }


# Every released Pythia size: (num_layers, hidden_size, num_heads, padded vocab).
# Layers/hidden/heads come from EleutherAI's GPT-NeoX training configs
# (github.com/EleutherAI/pythia, models/<size>/pythia-<size>.yml; copies in
# ../shared/data/configs/pythia-neox/). The padded vocab is what the released HF checkpoints
# carry (huggingface.co/EleutherAI/pythia-<size>/config.json "vocab_size"): the 50,277-token
# tokenizer padded to a multiple of 128 x model-parallel size, which is why 6.9b (mp 2) and 12b
# (mp 4) are larger. Parameter counts match Table 1 of the Pythia paper (Biderman et al. 2023,
# arXiv:2304.01373); 14m and 31m were released later and are not in that table.
PYTHIA_SIZES = {
    "14m": (6, 128, 4, 50304),
    "31m": (6, 256, 8, 50304),
    "70m": (6, 512, 8, 50304),
    "160m": (12, 768, 12, 50304),
    "410m": (24, 1024, 16, 50304),
    "1b": (16, 2048, 8, 50304),
    "1.4b": (24, 2048, 16, 50304),
    "2.8b": (32, 2560, 32, 50304),
    "6.9b": (32, 4096, 32, 50432),
    "12b": (36, 5120, 40, 50688),
}

# Dolly v2 was fine-tuned from these Pythia checkpoints (huggingface.co/databricks/dolly-v2-*).
DOLLY_TO_PYTHIA = {"3b": "2.8b", "7b": "6.9b", "12b": "12b"}


def size_key(name: str) -> str:
    """The preset key of a size name, the one place names are parsed: "70m", "pythia-70m",
    "EleutherAI/pythia-70m-deduped" -> "70m"; "databricks/dolly-v2-3b" -> "dolly-v2-3b".
    Any string gives a key; `ModelConfig.from_size` says whether it names a preset."""
    key = name.strip().lower().rsplit("/", 1)[-1]
    return key if key.startswith("dolly-v2-") else key.removeprefix("pythia-").removesuffix("-deduped")


def hub_id(name: str) -> str:
    """The Hugging Face Hub repository of a size name: "70m" -> "EleutherAI/pythia-70m",
    "dolly-v2-3b" -> "databricks/dolly-v2-3b"."""
    key = size_key(name)
    return f"databricks/{key}" if key.startswith("dolly-v2-") else f"EleutherAI/pythia-{key}"
