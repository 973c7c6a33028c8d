"""databricks-dolly-15k in, padded micro-batches out.

The path of a record: `load_records` reads and checks the jsonl file, `tokenize_records` turns
each record into Dolly's training text with labels masked on the prompt, `train_val_split`
holds out a validation set, `BatchSampler` decides which examples form each global batch and
how that batch is cut into micro-batches per rank, and `collate` pads one micro-batch.

Global batches depend only on the data, the seed and --global-batch-size, never on the
number of ranks or the micro-batch size, so a 2-rank run sees exactly the batches of a
1-rank run and a resumed run sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import warnings
from dataclasses import dataclass

import torch

from .checkpoint import DownloadError, hub_download
from .prompt import format_prompt
from .tokenizer import END_KEY, RESPONSE_KEY

HUB_DATASET = "databricks/databricks-dolly-15k"
HUB_FILE = "databricks-dolly-15k.jsonl"
FIELDS = ("instruction", "context", "response", "category")
IGNORE_INDEX = -100  # torch's cross_entropy default ignore_index

# sha256 of every public release of databricks-dolly-15k.jsonl on the Hugging Face Hub
# (from ../shared/data/databricks-dolly-15k.versions.json, taken from the Hub's LFS pointers).
DOLLY_RELEASES = {
    # HF b122d1b, 2023-04-21 "Add dataset": the original text, with Wikipedia [n] refs.
    "e442d96b320010510c67a6cc0a86ea988a2a6f71c7570d1afbdf4fa631896e58": "Hub release of 2023-04-21 (b122d1b, original)",
    # HF 2fab627, 2023-05-03 "Remove Wikipedia refs (#2)".
    "8419d2c537511d5dd7565ecbb1890bc9e5aeafc6c34aebc9d208447045a168e4": "Hub release of 2023-05-03 (2fab627, Wikipedia refs removed)",
    # HF 9be7fbc, 2023-05-04 "Fix lines with duplicated response (#4)"; HEAD d72c16e has the same file.
    "2df9083338b4abd6bceb5635764dab5d833b393b55759dffb0959b6fcbf794ec": "Hub release of 2023-05-04 (9be7fbc, current)",
}

# Before the Hub, the file lived in github.com/databrickslabs/dolly under data/; only its git
# blob ids are known (sha1 of b"blob <size>\0" + content, what `git hash-object` prints).
DOLLY_GITHUB_BLOBS = {
    # databrickslabs/dolly b6a6fe6, 2023-04-11: first publication.
    "3ddff957c680428a39173c4b03fac9938805ac58": "GitHub release of 2023-04-11 (b6a6fe6, first publication)",
    # databrickslabs/dolly 126cc6c, 2023-04-12: corrects the "How can I contribute to Spark?" answer.
    "7c929c0d67d21c08fb4cd013213b5117365dddb7": "GitHub release of 2023-04-12 (126cc6c, Spark answer corrected)",
    # databrickslabs/dolly 2305eb7, 2023-04-13: removes one record.
    "9b0b912c478e7ccd61ce741ebb409ddf8c7c22e6": "GitHub release of 2023-04-13 (2305eb7, one record removed)",
}

# Excerpts we ship tests against (versions.json "head_excerpt"), so they load without a warning.
DOLLY_EXCERPTS = {
    "c2abc74b09ad3a6e1bfe95663b0cd03f1a6eb69bac826f5ded906405536cef5b":
        "excerpt: first 789 records of the 2023-04-11 first publication (head789)",
}


class DataError(ValueError):
    """A line of the data file is not a valid databricks-dolly-15k record, or no line is."""


class DataWarning(UserWarning):
    """The data file loads but deserves a look (it matches no published release)."""


# ---------------------------------------------------------------------- records


def _identify(data: bytes) -> tuple[str, str | None]:
    """(sha256, description of the known release or excerpt, or None) of a file's bytes."""
    sha256 = hashlib.sha256(data).hexdigest()
    if sha256 in DOLLY_RELEASES:
        return sha256, DOLLY_RELEASES[sha256]
    if sha256 in DOLLY_EXCERPTS:
        return sha256, DOLLY_EXCERPTS[sha256]
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return sha256, DOLLY_GITHUB_BLOBS.get(blob)


def _parse_line(raw: bytes) -> dict | str | None:
    """One line -> the record, None for a blank line, or a string saying what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"is not valid UTF-8 ({e.reason} at byte {e.start})"
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return f"is not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return f"is a JSON {type(obj).__name__}, not an object with fields {', '.join(FIELDS)}"
    missing = [k for k in FIELDS if k not in obj]
    if missing:
        return f"lacks the field{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
    for k in FIELDS:
        if not isinstance(obj[k], str):
            return f"has field {k} of type {type(obj[k]).__name__}, expected a string"
    return {k: obj[k] for k in FIELDS}


def load_records(path: str | None = None, *, skip_bad_records: bool = False) -> tuple[list[dict], dict]:
    """Read databricks-dolly-15k records from a jsonl file.

    `path` None downloads databricks-dolly-15k.jsonl from the Hub dataset
    databricks/databricks-dolly-15k into the Hugging Face cache (once). Every non-blank line
    must be a JSON object with string fields instruction, context, response and category;
    records whose response is empty or whitespace are skipped and counted (there is nothing
    to learn from them). A file whose sha256 matches no known release warns (DataWarning) but
    still loads.

    Returns (records, stats): records are dicts with exactly the four fields, in file order;
    stats = {"path", "records", "bad_lines", "empty_response", "sha256", "release"} where
    release describes the recognised release or excerpt, or is None.

    Raises FileNotFoundError for a missing file, DownloadError when `path` is None and the Hub
    cannot be reached, DataError naming the file and line for a malformed line (unless
    `skip_bad_records`, which skips and counts such lines instead), and DataError when no
    line is a usable record (saying what the lines were).
    """
    if path is None:
        try:
            path = hub_download(HUB_DATASET, HUB_FILE, repo_type="dataset")
        except DownloadError:
            raise DownloadError(
                f"Could not download {HUB_FILE} from the Hugging Face Hub dataset {HUB_DATASET}; "
                f"check your network, or pass --data PATH to a local copy of the jsonl file."
            ) from None
    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory; pass the .jsonl file itself with --data.")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No data file at {path}: no such file.")
    with open(path, "rb") as f:
        data = f.read()  # 13 MB for the full dataset: one read, hashed and parsed from memory

    sha256, release = _identify(data)
    if release is None:
        warnings.warn(
            f"{path} (sha256 {sha256[:16]}...) matches no published release of databricks-dolly-15k; "
            f"loading it anyway.",
            DataWarning,
            stacklevel=2,
        )

    records, bad_lines, empty_response, blank = [], 0, 0, 0
    lines = data.split(b"\n")
    if lines[-1] == b"":  # the newline that ends the last line starts no new one
        lines.pop()
    for lineno, raw in enumerate(lines, start=1):
        rec = _parse_line(raw)
        if rec is None:
            blank += 1
            continue
        if isinstance(rec, str):
            if not skip_bad_records:
                raise DataError(f"{path}, line {lineno}: the line {rec}; fix or delete it, "
                                f"or skip bad lines with --skip-bad-records.")
            bad_lines += 1
            continue
        if not rec["response"].strip():
            empty_response += 1
            continue
        records.append(rec)
    if not records:
        counts = [f"{n} {what}" for n, what in ((blank, "blank"), (bad_lines, "malformed, skipped by --skip-bad-records"),
                                                (empty_response, "with an empty response")) if n]
        raise DataError(f"No usable records in {path} ({len(lines)} lines{': ' if counts else ''}{', '.join(counts)}).")
    stats = {"path": path, "records": len(records), "bad_lines": bad_lines, "empty_response": empty_response,
             "sha256": sha256, "release": release}
    return records, stats


# ------------------------------------------------------------------- tokenizing


@dataclass
class Example:
    """One tokenized record: `labels[t]` is input_ids[t] where the token is learned from,
    IGNORE_INDEX (-100) on the prompt. Unshifted: `train.loss_sum` shifts the labels left, so
    the prediction at position t is scored against token t+1."""

    input_ids: list[int]
    labels: list[int]


def tokenize_records(records: list[dict], tokenizer, max_length: int) -> tuple[list[Example], dict]:
    """Turn records into Dolly's training examples.

    The text is exactly Dolly's: format_prompt(instruction, context) (`Input:` only with a
    non-empty context), then response + "\\n\\n### End", no EOS. The prompt and the rest are
    tokenized separately and concatenated, so the prompt's ids are what the model sees at
    generation time (tokenized together, a response starting with "\\n" would merge with the
    prompt's final "\\n"). Labels are -100 on the prompt, through the "\\n" after
    `### Response:`, and equal input_ids on the response and `### End`.

    Examples longer than `max_length` tokens are dropped, not truncated: a cut example would
    teach the model to stop without `### End`.

    Returns (examples, stats) with stats = {"examples", "too_long", "target_tokens", "tokens"}
    (target_tokens: tokens with a label; tokens: all tokens of kept examples). Raises
    ValueError when every record is too long, RuntimeError when the tokenizer splits Dolly's
    keys differently than expected (a bug, not a user error).
    """
    response_key_ids = tokenizer.encode(RESPONSE_KEY + "\n")
    if response_key_ids[0] != tokenizer.response_id or len(response_key_ids) != 2:
        raise RuntimeError(f"{RESPONSE_KEY!r} + newline encodes as {response_key_ids}, not [response_id, newline].")
    prompts = tokenizer.encode_batch([format_prompt(r["instruction"], r["context"]) for r in records])
    answers = tokenizer.encode_batch([f"{r['response']}\n\n{END_KEY}" for r in records])

    examples, too_long, target_tokens, tokens = [], 0, 0, 0
    for i, (p, a) in enumerate(zip(prompts, answers)):
        if p[-2:] != response_key_ids:
            raise RuntimeError(f"record {i}: the prompt's ids end with {p[-2:]}, not the response key {response_key_ids}.")
        if a[-1] != tokenizer.end_id:
            raise RuntimeError(f"record {i}: the answer's ids end with {a[-1]}, not {END_KEY!r} ({tokenizer.end_id}).")
        n = len(p) + len(a)
        if n > max_length:
            too_long += 1
            continue
        examples.append(Example(input_ids=p + a, labels=[IGNORE_INDEX] * len(p) + a))
        target_tokens += len(a)
        tokens += n
    if records and not examples:
        raise ValueError(f"All {len(records)} records are longer than max_length={max_length} tokens; "
                         f"raise --max-length.")
    return examples, {"examples": len(examples), "too_long": too_long, "target_tokens": target_tokens, "tokens": tokens}


def train_val_split(examples: list, val_size: int, seed: int) -> tuple[list, list]:
    """Hold out `val_size` examples chosen by a seeded shuffle; the same on every rank and run.

    Returns (train, val), each in the original order. Raises ValueError when val_size is
    negative or leaves no training examples.
    """
    if val_size < 0 or val_size >= len(examples):
        raise ValueError(f"The validation set size (--val-size {val_size}) must be at least 0 and less than "
                         f"the {len(examples)} examples.")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:val_size])
    train = [e for i, e in enumerate(examples) if i not in held_out]
    val = [e for i, e in enumerate(examples) if i in held_out]
    return train, val


# --------------------------------------------------------------------- batching


@dataclass
class Step:
    """One optimizer step: the whole global batch (same on every rank, sorted by length,
    longest first) and this rank's share of it cut into micro-batches (lists of indices)."""

    epoch: int
    step_in_epoch: int
    global_indices: list[int]
    micro_batches: list[list[int]]


class BatchSampler:
    """Decides the global batches of each epoch and this rank's micro-batches of each.

    Each epoch shuffles all indices with a seed of (seed, epoch), groups them by length (sort
    within chunks of GROUP_BATCHES global batches, cut, then shuffle the order of the batches)
    so micro-batches need little padding, and drops the last incomplete global batch. A global
    batch is sorted by length and cut into micro-batches of micro_batch_size; rank r takes
    micro-batches r, r + world_size, r + 2 * world_size, ..., which keeps the ranks' token
    counts balanced. Nothing here depends on world_size or micro_batch_size except that last
    assignment, so global batches are the same for any number of ranks.

    Iterating yields Steps forever from the current position (the loop decides when to stop);
    the position advances as each Step is yielded, so `state_dict()` taken after training on
    a Step resumes at the Step after it.
    """

    GROUP_BATCHES = 64

    def __init__(self, lengths: list[int], global_batch_size: int, micro_batch_size: int,
                 world_size: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        """Raise ValueError when the batch sizes do not divide or the data holds no full global batch."""
        per_step = micro_batch_size * world_size
        if micro_batch_size < 1 or world_size < 1 or global_batch_size < 1 or global_batch_size % per_step:
            valid = max(per_step, round(global_batch_size / per_step) * per_step) if per_step > 0 else 1
            raise ValueError(
                f"--global-batch-size {global_batch_size} must be a positive multiple of --micro-batch-size "
                f"{micro_batch_size} times the world size {world_size} (= {per_step}); try --global-batch-size {valid}."
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}.")
        if len(lengths) < global_batch_size:
            raise ValueError(f"The training set has {len(lengths)} examples, fewer than --global-batch-size "
                             f"{global_batch_size}; lower it or use more data.")
        self.lengths = list(lengths)
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.step_in_epoch = 0
        self._cached: tuple[int, list[list[int]]] | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches per epoch (the incomplete last one is dropped)."""
        return len(self.lengths) // self.global_batch_size

    def global_batches(self, epoch: int) -> list[list[int]]:
        """The global batches of `epoch`, each a list of example indices sorted longest first."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        n, gbs = len(self.lengths), self.global_batch_size
        key = lambda i: (-self.lengths[i], i)  # index breaks ties so the order is total
        order = list(range(n))
        if self.shuffle:
            # A string seed: random.Random hashes it with sha512, the same in every process.
            rng = random.Random(f"minidolly.BatchSampler/{self.seed}/{epoch}")
            rng.shuffle(order)
            order = order[: self.steps_per_epoch * gbs]
            chunk = gbs * self.GROUP_BATCHES
            grouped = [i for c in range(0, len(order), chunk) for i in sorted(order[c : c + chunk], key=key)]
            batches = [grouped[b : b + gbs] for b in range(0, len(grouped), gbs)]
            rng.shuffle(batches)  # else every chunk would run from longest to shortest
        else:
            batches = [order[b : b + gbs] for b in range(0, self.steps_per_epoch * gbs, gbs)]
        batches = [sorted(b, key=key) for b in batches]
        self._cached = (epoch, batches)
        return batches

    def micro_batches(self, global_indices: list[int]) -> list[list[int]]:
        """This rank's micro-batches of one global batch (sorted longest first)."""
        mbs = self.micro_batch_size
        cuts = [global_indices[m : m + mbs] for m in range(0, len(global_indices), mbs)]
        return cuts[self.rank :: self.world_size]

    def __iter__(self):
        while True:
            epoch, step = self.epoch, self.step_in_epoch
            global_indices = self.global_batches(epoch)[step]
            if step + 1 == self.steps_per_epoch:
                self.epoch, self.step_in_epoch = epoch + 1, 0
            else:
                self.step_in_epoch = step + 1
            yield Step(epoch, step, list(global_indices), self.micro_batches(global_indices))

    def state_dict(self) -> dict:
        """The position of the next Step, plus what must match for a resume to be exact."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "num_examples": len(self.lengths),
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`. Raises ValueError when it was saved with another seed, global
        batch size or data size (the remaining batches would not be those of the first run);
        micro-batch size and world size may change."""
        for k in ("seed", "global_batch_size", "num_examples", "shuffle"):
            if state[k] != self.state_dict()[k]:
                raise ValueError(f"Cannot resume the data order: the checkpoint has {k}={state[k]} but this run has "
                                 f"{self.state_dict()[k]}; use the same data, --seed and --global-batch-size.")
        if not 0 <= state["step_in_epoch"] < self.steps_per_epoch:
            raise ValueError(f"The checkpoint's step_in_epoch {state['step_in_epoch']} is outside this epoch's "
                             f"{self.steps_per_epoch} steps.")
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]


def padding_fraction(micro_batches: list[list[int]], lengths: list[int]) -> float:
    """Pad tokens / all tokens once each micro-batch is right-padded to its longest example."""
    total = sum(max(lengths[i] for i in mb) * len(mb) for mb in micro_batches if mb)
    real = sum(lengths[i] for mb in micro_batches for i in mb)
    return 1 - real / total if total else 0.0


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch. Returns {"input_ids": (B, T) long padded with pad_id,
    "labels": (B, T) long with -100 on padding}, T the longest example.

    Labels are not shifted: position t's label is token t, and `train.loss_sum` shifts them
    left to score the prediction at t against token t+1. Right padding needs no attention mask
    under a causal model: real tokens never attend to the pads after them.
    """
    T = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for b, e in enumerate(examples):
        input_ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[b, : len(e.labels)] = torch.tensor(e.labels, dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels}


def count_targets(examples: list[Example]) -> int:
    """Tokens that contribute to the loss after the shift (labels[1:] != -100), summed over
    `examples`; the loop divides the global batch's summed loss by this."""
    return sum(sum(1 for y in e.labels[1:] if y != IGNORE_INDEX) for e in examples)
