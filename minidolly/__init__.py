"""minidolly: Databricks' Dolly 2.0 (GPT-NeoX / Pythia) from scratch in PyTorch.

    from minidolly import load_model, load_tokenizer, save_gguf
    model = load_model("databricks/dolly-v2-3b")  # or a local checkpoint directory
    model = load_model("databricks/dolly-v2-3b", quantize="int4")  # 4-bit weights (minidolly/quantize.py)
    save_gguf("databricks/dolly-v2-3b", "dolly-v2-3b.q8_0.gguf", "q8_0")  # for llama.cpp / Ollama
    model = load_model("runs/dolly-12b/final")    # a LoRA adapter: its base, with the adapter merged in
"""

from .checkpoint import CheckpointError, DownloadError, load_model, save_model
from .config import ModelConfig
from .generate import generate, stream
from .gguf_export import save_gguf
from .lora import apply_lora, merge_lora
from .model import GPTNeoX, KVCache
from .quantize import QuantizationError, prepare_for_cpu, quantize_model
from .tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "CheckpointError",
    "DownloadError",
    "GPTNeoX",
    "KVCache",
    "ModelConfig",
    "QuantizationError",
    "Tokenizer",
    "apply_lora",
    "generate",
    "load_model",
    "load_tokenizer",
    "merge_lora",
    "prepare_for_cpu",
    "quantize_model",
    "save_gguf",
    "save_model",
    "stream",
]
