"""The real GPT-NeoX-20B tokenizer with Dolly's three instruction tokens."""

import pytest

from conftest import DOLLY_DIR, TOKENIZER_JSON
from minidolly import load_tokenizer


def test_known_ids(tokenizer):
    assert tokenizer.encode("Hello world") == [12092, 1533]
    assert (tokenizer.eos_id, tokenizer.pad_id) == (0, 0)
    assert [tokenizer.token_to_id(t) for t in ("### End", "### Instruction:", "### Response:")] == [50277, 50278, 50279]
    assert (tokenizer.end_id, tokenizer.instruction_id, tokenizer.response_id) == (50277, 50278, 50279)
    # a special token is one id even inside text, and decoding drops it unless asked
    assert tokenizer.encode("Hi\n\n### End") == tokenizer.encode("Hi\n\n") + [50277]
    assert tokenizer.decode([12092, 50277]) == "Hello"
    assert tokenizer.decode([12092, 50277], skip_special_tokens=False) == "Hello### End"


def test_dolly_tokenizer_keeps_its_ids(tmp_path):
    dolly = load_tokenizer(DOLLY_DIR)  # a directory that already has the three tokens
    assert (dolly.end_id, dolly.instruction_id, dolly.response_id) == (50277, 50278, 50279)
    assert len(dolly) == 50280


def test_unicode_round_trip(tokenizer):
    text = "Ünïcödé: naïve café, 日本語のテキスト, emoji 🦙🐑, math ∑∫√, RTL שלום"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_save_and_reload(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode("### Response:\nHi") == tokenizer.encode("### Response:\nHi") == [50279, 187, 12764]
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.encode("Hello world ### End") == tokenizer.encode("Hello world ### End")


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"No tokenizer at \./nope\.json"):
        load_tokenizer("./nope.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not a valid tokenizer.json"):
        load_tokenizer(bad)
    assert TOKENIZER_JSON.exists()
