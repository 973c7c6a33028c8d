"""minidolly: Databricks' Dolly 2.0 (GPT-NeoX / Pythia) from scratch in PyTorch.

    from minidolly import load_model, load_tokenizer
    model = load_model("databricks/dolly-v2-3b")  # or a local checkpoint directory
    model = load_model("runs/dolly-12b/final")    # a LoRA adapter: its base, with the adapter merged in
"""

from .checkpoint import CheckpointError, DownloadError, load_model, save_model
from .config import ModelConfig
from .generate import generate, stream
from .lora import apply_lora, merge_lora
from .model import GPTNeoX, KVCache
from .tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "CheckpointError",
    "DownloadError",
    "GPTNeoX",
    "KVCache",
    "ModelConfig",
    "Tokenizer",
    "apply_lora",
    "generate",
    "load_model",
    "load_tokenizer",
    "merge_lora",
    "save_model",
    "stream",
]
