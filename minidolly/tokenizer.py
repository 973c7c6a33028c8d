"""The GPT-NeoX-20B BPE tokenizer every Pythia uses, plus Dolly's three instruction tokens.

Dolly v2 added `### End`, `### Instruction:` and `### Response:` as special tokens right after
the 50,277 GPT-NeoX tokens, so they get ids 50277, 50278, 50279 (see the released
dolly-v2-3b tokenizer.json). `load_tokenizer` adds them the same way; a tokenizer that already
has them (a Dolly one, or one saved by train.py) keeps its ids.
"""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer as _HFTokenizer

END_KEY = "### End"
INSTRUCTION_KEY = "### Instruction:"
RESPONSE_KEY = "### Response:"
DOLLY_SPECIAL_TOKENS = (END_KEY, INSTRUCTION_KEY, RESPONSE_KEY)
EOS_TOKEN = "<|endoftext|>"


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the few calls minidolly needs."""

    def __init__(self, tokenizer: _HFTokenizer):
        self._tok = tokenizer
        self._tok.add_special_tokens(list(DOLLY_SPECIAL_TOKENS))  # no-op for tokens it has
        self._tok.no_padding()
        self._tok.no_truncation()
        self.eos_id = self.token_to_id(EOS_TOKEN)
        self.pad_id = self.eos_id  # Dolly pads with EOS (special_tokens_map.json: pad = eos)
        self.end_id = self.token_to_id(END_KEY)
        self.instruction_id = self.token_to_id(INSTRUCTION_KEY)
        self.response_id = self.token_to_id(RESPONSE_KEY)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS added, as GPT-NeoX does)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of many texts at once (parallel in the Rust library)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (EOS, the Dolly keys) are dropped unless asked for."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of one token string, or None when the vocabulary lacks it."""
        return self._tok.token_to_id(token)

    def save(self, directory: str) -> None:
        """Write tokenizer.json and the small HF side files, so transformers'
        AutoTokenizer and `load_tokenizer` both read `directory`."""
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, "tokenizer.json"))
        specials = {
            "bos_token": EOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "unk_token": EOS_TOKEN,
            "pad_token": EOS_TOKEN,
            "additional_special_tokens": list(DOLLY_SPECIAL_TOKENS),
        }
        with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
            json.dump(specials, f, indent=2)
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "GPTNeoXTokenizer", "add_prefix_space": False, **specials}, f, indent=2)


def load_tokenizer(source: str) -> Tokenizer:
    """Load a tokenizer from a tokenizer.json file, a directory holding one, or a Hub id.

    Raises FileNotFoundError when a local path has no tokenizer.json, and
    minidolly.checkpoint.DownloadError when a Hub id cannot be fetched.
    """
    path = os.path.expanduser(os.fspath(source))
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{os.path.dirname(path)} has no tokenizer.json.")
    elif not os.path.isfile(path):
        from .checkpoint import hub_download, looks_like_hub_id

        if not looks_like_hub_id(source):
            raise FileNotFoundError(f"No tokenizer at {source}: no such file or directory.")
        path = hub_download(source, "tokenizer.json")
    try:
        return Tokenizer(_HFTokenizer.from_file(path))
    except Exception as e:  # the Rust library raises a bare Exception on bad JSON
        raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from None
