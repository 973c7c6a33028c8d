"""minidolly.data against the real databricks-dolly-15k excerpt, the real GPT-NeoX tokenizer,
Dolly's own masking rule (re-implemented from databrickslabs/dolly with transformers'
tokenizer), and a single-rank / uninterrupted sampler for multi-rank / resumed ones."""

import collections
import json
import random
import warnings

import pytest
import torch

from conftest import DOLLY_DIR, DOLLY_RECORDS, SHARED_DATA
from minidolly.checkpoint import DownloadError
from minidolly.data import (
    DOLLY_RELEASES,
    BatchSampler,
    DataError,
    Example,
    collate,
    count_targets,
    load_records,
    padding_fraction,
    tokenize_records,
    train_val_split,
)
from minidolly.prompt import format_prompt, format_training_example

VERSIONS = json.loads((SHARED_DATA / "databricks-dolly-15k.versions.json").read_text())
MAX_LENGTH = 1024


@pytest.fixture(scope="module")
def records():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the excerpt is a known file: loading it must not warn
        return load_records(str(DOLLY_RECORDS))


@pytest.fixture(scope="module")
def tokenized(records, tokenizer):
    return tokenize_records(records[0], tokenizer, MAX_LENGTH)


@pytest.fixture(scope="module")
def lengths(tokenized):
    return [len(e.input_ids) for e in tokenized[0]]


def write_lines(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def real_lines(n):
    with open(DOLLY_RECORDS) as f:
        return [next(f).rstrip("\n") for _ in range(n)]


# ---------------------------------------------------------------------- records


def test_real_records_load_and_are_recognised(records):
    recs, stats = records
    excerpt = VERSIONS["head_excerpt"]
    assert len(recs) == stats["records"] == excerpt["records"] == 789
    assert dict(collections.Counter(r["category"] for r in recs)) == excerpt["category_counts"]
    assert stats["sha256"] == excerpt["sha256"] and "789" in stats["release"]
    assert stats["bad_lines"] == stats["empty_response"] == 0
    assert set(recs[0]) == {"instruction", "context", "response", "category"}
    assert recs[38]["instruction"] == "How can I contribute to Spark?"
    # Every public Hub release is known, and nothing else.
    hub = {v["sha256"] for v in VERSIONS["huggingface_dataset_repo_history"]["versions"]}
    assert set(DOLLY_RELEASES) == hub


def test_unknown_file_warns(tmp_path):
    path = write_lines(tmp_path, real_lines(10))
    with pytest.warns(UserWarning, match="matches no published release"):
        recs, stats = load_records(path)
    assert len(recs) == 10 and stats["release"] is None


def test_malformed_lines_name_file_and_line(tmp_path):
    lines = real_lines(6)
    lines[2] = lines[2][:-1]  # line 3: JSON cut short
    missing = json.loads(lines[4])
    del missing["response"]
    lines[4] = json.dumps(missing)  # line 5: no response field
    path = write_lines(tmp_path, lines)
    with pytest.warns(UserWarning), pytest.raises(DataError, match="not valid JSON") as e:
        load_records(path)
    assert f"{path}, line 3:" in str(e.value)

    lines[2] = real_lines(3)[2]  # with line 3 repaired, line 5 is the first bad one
    path = write_lines(tmp_path, lines)
    with pytest.warns(UserWarning), pytest.raises(DataError, match="lacks the field response") as e:
        load_records(path)
    assert f"{path}, line 5:" in str(e.value)


@pytest.mark.parametrize("line, what", [
    ('["a list"]', "is a JSON list, not an object"),
    ('{"instruction": "x", "context": null, "response": "y", "category": "open_qa"}', "field context of type NoneType"),
])
def test_wrong_shapes_are_reported(tmp_path, line, what):
    path = write_lines(tmp_path, real_lines(1) + [line])
    with pytest.warns(UserWarning), pytest.raises(DataError, match=what) as e:
        load_records(path)
    assert f"{path}, line 2:" in str(e.value)


def test_skip_bad_records_blank_lines_and_empty_responses(tmp_path):
    lines = real_lines(8)
    lines[2] = "{not json"
    lines[4] = json.dumps({"instruction": "x", "context": "", "category": "open_qa"})
    empty = json.loads(lines[6])
    empty["response"] = "  \n "
    lines[6] = json.dumps(empty)
    lines.insert(1, "")  # a blank line is neither a record nor an error
    path = write_lines(tmp_path, lines)
    with pytest.warns(UserWarning):
        recs, stats = load_records(path, skip_bad_records=True)
    assert (stats["records"], stats["bad_lines"], stats["empty_response"]) == (5, 2, 1) and len(recs) == 5
    assert [r["instruction"] for r in recs] == [json.loads(real_lines(8)[i])["instruction"] for i in (0, 1, 3, 5, 7)]


@pytest.mark.parametrize("content, skip, what", [
    ("", False, "(0 lines)"),
    ("\n  \n", False, "(2 lines: 2 blank)"),
    ('{not json\n\n{"instruction": "x", "context": "", "response": " ", "category": "open_qa"}\n', True,
     "(3 lines: 1 blank, 1 malformed, skipped by --skip-bad-records, 1 with an empty response)"),
])
def test_a_file_without_usable_records_says_what_its_lines_were(tmp_path, content, skip, what):
    # It used to load "successfully" and fail later on --val-size.
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.warns(UserWarning), pytest.raises(DataError) as e:
        load_records(str(path), skip_bad_records=skip)
    assert str(e.value) == f"No usable records in {path} {what}."


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(str(tmp_path / "nope.jsonl"))


def test_offline_download_says_to_pass_data(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # Offline, and an empty cache, so a copy downloaded on this machine earlier cannot answer.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(DownloadError, match="--data PATH") as e:
        load_records(None)
    assert "databricks/databricks-dolly-15k" in str(e.value)


# ------------------------------------------------------------------- tokenizing


def dolly_labels(ids, response_key_ids):
    """databrickslabs/dolly's DataCollatorForCompletionOnlyLM: find the response key token in
    the whole text's ids and mask everything through the end of the key ("### Response:\\n")."""
    start = ids.index(response_key_ids[0])
    end = start + len(response_key_ids)
    return [-100] * end + ids[end:]


def test_masking_matches_dolly(records, tokenized, tokenizer):
    from transformers import PreTrainedTokenizerFast

    recs, (examples, stats) = records[0], tokenized
    hf = PreTrainedTokenizerFast(tokenizer_file=str(DOLLY_DIR / "tokenizer.json"))  # Dolly's own tokenizer
    key = hf.encode("### Response:\n")
    assert key == [tokenizer.response_id, tokenizer.encode("\n")[0]]
    texts = [format_training_example(r["instruction"], r["response"], r["context"]) for r in recs]
    kept = [ids for ids in hf(texts)["input_ids"] if len(ids) <= MAX_LENGTH]
    assert len(kept) == len(examples)
    # Tokenizing prompt and answer apart gives Dolly's joint ids on every record of the excerpt
    # (a response starting with a newline would differ: its "\n" would merge with the key's).
    assert [e.input_ids for e in examples] == kept
    assert [e.labels for e in examples] == [dolly_labels(ids, key) for ids in kept]


@pytest.mark.parametrize("with_context", [True, False])
def test_labels_cover_exactly_the_response_and_end(records, tokenizer, with_context):
    rec = next(r for r in records[0] if bool(r["context"]) == with_context)
    (ex,), stats = tokenize_records([rec], tokenizer, MAX_LENGTH)
    prompt = format_prompt(rec["instruction"], rec["context"])
    assert ("\nInput:\n" in prompt) == with_context
    n = len(tokenizer.encode(prompt))
    assert ex.input_ids[n - 2 : n] == tokenizer.encode("### Response:\n")
    assert ex.labels[:n] == [-100] * n
    assert ex.labels[n:] == ex.input_ids[n:] and ex.input_ids[-1] == tokenizer.end_id
    assert tokenizer.decode(ex.labels[n:], skip_special_tokens=False) == rec["response"] + "\n\n### End"
    full = format_training_example(rec["instruction"], rec["response"], rec["context"])
    assert tokenizer.decode(ex.input_ids, skip_special_tokens=False) == full
    assert stats == {"examples": 1, "too_long": 0, "target_tokens": len(ex.input_ids) - n, "tokens": len(ex.input_ids)}


def test_too_long_records_are_dropped_not_truncated(records, tokenized, tokenizer, lengths):
    recs = records[0]
    examples, stats = tokenized
    assert stats["examples"] + stats["too_long"] == len(recs) and stats["too_long"] > 0
    assert stats["tokens"] == sum(lengths) and max(lengths) <= MAX_LENGTH
    assert stats["target_tokens"] == sum(sum(y != -100 for y in e.labels) for e in examples)
    limit = sorted(lengths)[len(lengths) // 2]
    short, short_stats = tokenize_records(recs, tokenizer, limit)
    assert short_stats["too_long"] == stats["too_long"] + sum(n > limit for n in lengths)
    assert all(e.input_ids[-1] == tokenizer.end_id for e in short)
    with pytest.raises(ValueError, match="--max-length"):
        tokenize_records(recs[:5], tokenizer, 20)


def test_split_is_deterministic_and_disjoint():
    items = list(range(500))
    train, val = train_val_split(items, 50, seed=1)
    assert (train, val) == train_val_split(items, 50, seed=1)
    assert val != train_val_split(items, 50, seed=2)[1]
    assert len(val) == 50 and sorted(train + val) == items and not set(train) & set(val)
    with pytest.raises(ValueError, match="--val-size 500"):
        train_val_split(items, 500, seed=1)


# --------------------------------------------------------------------- batching


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("world_size, micro", [(2, 4), (4, 2), (2, 16)])
def test_sampler_global_batches_independent_of_world_size(lengths, world_size, micro):
    one = BatchSampler(lengths, 64, 8, seed=3)
    n = 2 * one.steps_per_epoch + 1  # two epochs and into the third
    ref = take(one, n)
    ranks = [take(BatchSampler(lengths, 64, micro, world_size, r, seed=3), n) for r in range(world_size)]
    for s, step in enumerate(ref):
        assert (step.epoch, step.step_in_epoch) == divmod(s, one.steps_per_epoch)
        per_rank = [rank_steps[s].micro_batches for rank_steps in ranks]
        assert all(rank_steps[s].global_indices == step.global_indices for rank_steps in ranks)
        assert all(len(mbs) == 64 // (micro * world_size) for mbs in per_rank)
        assert all(len(mb) == micro for mbs in per_rank for mb in mbs)
        flat = [i for mbs in per_rank for mb in mbs for i in mb]
        assert sorted(flat) == sorted(step.global_indices) and len(set(flat)) == 64  # ranks disjoint, union = batch
    for epoch in range(2):
        seen = [i for s in ref if s.epoch == epoch for i in s.global_indices]
        assert len(seen) == len(set(seen)) == one.steps_per_epoch * 64
    assert ref[0].global_indices != ref[one.steps_per_epoch].global_indices


def test_length_grouping_reduces_padding(lengths):
    sampler = BatchSampler(lengths, 64, 8)
    steps = take(sampler, sampler.steps_per_epoch)
    grouped = sum(padding_fraction(s.micro_batches, lengths) for s in steps) / len(steps)
    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    ungrouped = padding_fraction([order[i : i + 8] for i in range(0, len(order) - 7, 8)], lengths)
    assert ungrouped > 0.3 and grouped < ungrouped / 4, (grouped, ungrouped)
    assert padding_fraction([[0, 1]], [5, 3]) == pytest.approx(0.2)


def test_sampler_resumes_exactly(lengths):
    run = BatchSampler(lengths, 64, 8, seed=7)
    it = iter(run)
    for _ in range(run.steps_per_epoch - 2):
        next(it)
    state = run.state_dict()
    assert (state["epoch"], state["step_in_epoch"]) == (0, run.steps_per_epoch - 2)
    rest = [next(it) for _ in range(5)]  # crosses into epoch 1
    resumed = BatchSampler(lengths, 64, 8, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    assert take(resumed, 5) == rest
    other = BatchSampler(lengths, 64, 8, seed=8)
    with pytest.raises(ValueError, match="seed=7"):
        other.load_state_dict(state)


def test_sampler_rejects_indivisible_batch_sizes(lengths):
    with pytest.raises(ValueError) as e:
        BatchSampler(lengths, 60, 8, world_size=2)
    msg = str(e.value)
    assert "--global-batch-size 60" in msg and "--micro-batch-size 8" in msg and "world size 2" in msg
    assert "try --global-batch-size 64" in msg
    with pytest.raises(ValueError, match="fewer than --global-batch-size"):
        BatchSampler(lengths[:10], 16, 8)


def test_collate_and_count_targets(tokenized, tokenizer):
    examples = tokenized[0][:3] + [Example(input_ids=[5, 6, 7], labels=[-100, 6, 7])]
    batch = collate(examples, pad_id=tokenizer.pad_id)
    T = max(len(e.input_ids) for e in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == (4, T)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        assert batch["input_ids"][b, :n].tolist() == e.input_ids and batch["labels"][b, :n].tolist() == e.labels
        assert (batch["input_ids"][b, n:] == tokenizer.pad_id).all() and (batch["labels"][b, n:] == -100).all()
    assert count_targets(examples) == int((batch["labels"][:, 1:] != -100).sum())
    assert count_targets(examples[3:]) == 2
