"""Generation: an instruction in, Dolly's answer out, one token at a time.

    from minidolly import load_model, load_tokenizer, generate, stream
    model, tokenizer = load_model("databricks/dolly-v2-3b"), load_tokenizer("databricks/dolly-v2-3b")
    print(generate(model, tokenizer, "Explain gravity.", temperature=0))
    for piece in stream(model, tokenizer, "Write a haiku about rain."):
        print(piece, end="", flush=True)

How it works (docs/generation.md has shapes and costs):
  1. The instruction is put in Dolly's prompt template (minidolly/prompt.py) and tokenized.
     The rows of a batch are left-padded, so every row's next token sits at the last position.
  2. Prefill: one forward over the whole prompt fills a KVCache preallocated for
     prompt + max_new_tokens positions, and gives the first new token's logits.
  3. Decode: each step feeds only the newest token of each row; its keys and values are
     written into the cache in place, so a step reads the weights and the cache once and
     never recomputes the prompt.
  4. A row stops at `### End` or EOS (its later tokens are padding nobody reads); the loop
     ends when every row has stopped or after max_new_tokens.
"""

from __future__ import annotations

import time
import warnings
import weakref
from typing import Iterator

import torch

from .model import GPTNeoX, KVCache
from .prompt import format_prompt
from .tokenizer import Tokenizer


class PromptTruncatedWarning(UserWarning):
    """A prompt did not fit the context window; the start of its context (or instruction) was cut."""


# ------------------------------------------------------------------- arguments


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """Raise ValueError naming the first sampling argument that is out of range."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}.")
    if not temperature >= 0:  # also catches NaN
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}.")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 turns it off), got {top_k!r}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 turns it off), got {top_p!r}.")


# ---------------------------------------------------------------------- prompt


def encode_prompt(tokenizer: Tokenizer, instruction: str, context: str | None, max_tokens: int) -> tuple[list[int], bool]:
    """Token ids of Dolly's prompt for `instruction` (and `context`), at most `max_tokens` long.

    A prompt that is too long keeps the template (intro, `### Instruction:`, `### Response:`,
    without which Dolly does not answer) and loses the start of the context, or of the
    instruction when there is no context (the end is nearest to the question, so it is kept).
    Returns (ids, truncated). Raises ValueError for an empty instruction, or when not even the
    template fits (max_new_tokens leaves too little of the window).
    """
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("The instruction is empty; give the model something to answer.")
    ids = tokenizer.encode(format_prompt(instruction, context))
    if len(ids) <= max_tokens:
        return ids, False
    if context:
        ids, context = _cut_left(tokenizer, lambda c: format_prompt(instruction, c), context, max_tokens)
    if len(ids) > max_tokens:
        ids, instruction = _cut_left(tokenizer, lambda i: format_prompt(i, context), instruction, max_tokens)
    if len(ids) > max_tokens:
        raise ValueError(
            f"Only {max_tokens} tokens are left for the prompt, fewer than Dolly's prompt template "
            f"alone needs ({len(ids)}); lower max_new_tokens."
        )
    return ids, True


def _cut_left(tokenizer: Tokenizer, build, text: str, max_tokens: int) -> tuple[list[int], str]:
    """Drop tokens from the start of `text` until `build(text)` encodes to <= max_tokens ids.

    Tokens are cut from `text` on its own and the prompt re-encoded, because BPE merges across
    the seams may change the count by a token or two; the loop absorbs that.
    """
    pieces = tokenizer.encode(text)
    ids, keep = tokenizer.encode(build(text)), len(pieces)
    while len(ids) > max_tokens and keep > 0:
        keep = max(0, keep - (len(ids) - max_tokens))
        # A cut inside a multi-byte character leaves U+FFFD at the start; drop it.
        text = tokenizer.decode(pieces[len(pieces) - keep :], skip_special_tokens=False).lstrip("\ufffd") if keep else ""
        ids = tokenizer.encode(build(text))
    return ids, text


# -------------------------------------------------------------------- sampling


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf the logits of tokens that top-k and then top-p rule out: (B, V) -> (B, V).

    top_k: keep the k most likely tokens (0 keeps all).
    top_p: nucleus sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens
        whose probabilities sum to at least top_p (1 keeps all). The most likely token
        always survives. Same order and rule as Hugging Face's TopK/TopPLogitsWarper.
    """
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1) the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens more likely than this one
        drop_sorted = before >= top_p  # the set already reached top_p without this token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """One token per row from logits (B, V): argmax when temperature is 0, else a draw from
    softmax(logits / temperature) restricted by `filter_logits`. Row i draws with
    generators[i] (None: torch's global generator). Returns (B,) token ids."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generators)])


# ---------------------------------------------------------------------- decode

_compiled = weakref.WeakKeyDictionary()  # model -> its compiled decode step, reused across calls


def decode_step(model: GPTNeoX, compile: bool):
    """The function a decode step calls: the model itself, or with `compile` the model through
    torch.compile (dynamic shapes, since the cached length grows every step). Compilation
    happens at the first call; if it fails (no C++ compiler, an unsupported op) the step warns
    once and the model runs eagerly from then on. Retrying eagerly is safe: a forward writes its
    keys and values to fixed cache positions and advances `cache.length` only at its end."""
    if not compile:
        return model

    def step(*args, **kwargs):
        if _compiled.get(model, "untried") is not None:  # None: compiling failed before
            try:
                if model not in _compiled:
                    _compiled[model] = torch.compile(model, dynamic=True)
                return _compiled[model](*args, **kwargs)
            except Exception as e:  # any compiler failure: eager gives the same answer
                warnings.warn(f"torch.compile failed ({type(e).__name__}); decoding eagerly.", RuntimeWarning)
                _compiled[model] = None
        return model(*args, **kwargs)

    return step


@torch.inference_mode()
def decode(model: GPTNeoX, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop_ids=(), pad_id: int = 0,
           compile: bool = False, stats: dict | None = None) -> Iterator[list[int | None]]:
    """Generate from a batch of tokenized prompts, yielding one step at a time.

    Each step yields a list with every row's new token, or None for a row that stopped at an
    earlier step. A token in `stop_ids` is yielded once and stops its row. With `seed`, row i
    samples with its own torch.Generator seeded `seed`, so each row gets exactly the tokens it
    would get alone. `compile` runs the decode steps through torch.compile (see decode_step).
    `stats`, when given, receives prompt_tokens, new_tokens, prefill_seconds and decode_seconds.
    """
    device = model.embed_in.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, P - len(p) :] = torch.tensor(p, dtype=torch.long)  # left padding
    ids = ids.to(device)
    mask = None
    if any(len(p) != P for p in prompts):
        # 1 = real token. New tokens are all real (a stopped row's tokens are never read), so
        # the mask is built once for the whole generation and sliced to the cached length.
        mask = torch.ones(B, P + max_new_tokens, dtype=torch.long)
        for row, p in enumerate(prompts):
            mask[row, : P - len(p)] = 0
        mask = mask.to(device)
    cache = KVCache(model.config, B, P + max_new_tokens, device=device, dtype=model.embed_in.weight.dtype)
    generators = None
    if seed is not None and temperature > 0:
        generators = [torch.Generator(device=device).manual_seed(seed) for _ in range(B)]
    stop_ids = set(stop_ids)
    done = [False] * B  # on the host: the stop test needs no device work and no second sync
    step_fn = decode_step(model, compile)

    start = time.perf_counter()
    logits = model(ids, attention_mask=None if mask is None else mask[:, :P], cache=cache, last_only=True)
    new_tokens, prefill_seconds = 0, None
    for step in range(max_new_tokens):
        token = next_tokens(logits[:, -1], temperature, top_k, top_p, generators)
        tokens = token.tolist()  # the one host sync per step
        if prefill_seconds is None:
            prefill_seconds = time.perf_counter() - start
        new_tokens += done.count(False)
        yield [None if d else t for t, d in zip(tokens, done)]
        done = [d or t in stop_ids for t, d in zip(tokens, done)]
        if step == max_new_tokens - 1 or all(done):
            break
        # A stopped row keeps decoding whatever it drew; its outputs are never read.
        logits = step_fn(token[:, None], attention_mask=None if mask is None else mask[:, : cache.length + 1], cache=cache)
    if stats is not None:
        stats.update(prompt_tokens=sum(len(p) for p in prompts), new_tokens=new_tokens,
                     prefill_seconds=prefill_seconds, decode_seconds=time.perf_counter() - start - prefill_seconds)


# ------------------------------------------------------------------------ text


class TextAssembler:
    """Token ids in, printable text pieces out, as a stream.

    One token may end in the middle of a UTF-8 character (an emoji is often 3 tokens of raw
    bytes), so each push decodes the whole id list and hands out only the new suffix, and
    nothing while the text ends in U+FFFD, the replacement for an unfinished character.
    The pieces are cut from the stripped text, so leading whitespace never comes out and
    trailing whitespace waits until more text follows it: they concatenate to exactly
    `tokenizer.decode(ids).strip()`, what `generate` returns.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now final ('' when there is none)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        return "" if text.endswith("\ufffd") else self._new(text)

    def finish(self) -> str:
        """The rest of the text, an unfinished character included (as U+FFFD)."""
        return self._new(self.tokenizer.decode(self.ids))

    def _new(self, text: str) -> str:
        # Once text ends in a whole character, later tokens only append to it, so the
        # stripped text only grows and `sent` characters of it are already out.
        text = text.strip()
        piece, self.sent = text[self.sent :], len(text)
        return piece


# ------------------------------------------------------------------ public API


def _prepare(model, tokenizer, instruction, context, max_new_tokens, temperature, top_k, top_p):
    """Check the arguments and encode every prompt; returns (prompts, truncated flags)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    instructions = [instruction] if isinstance(instruction, str) else list(instruction)
    if not instructions:
        raise ValueError("The list of instructions is empty.")
    if context is None or isinstance(context, str):
        contexts = [context] * len(instructions)
    else:
        contexts = list(context)
        if len(contexts) != len(instructions):
            raise ValueError(f"{len(instructions)} instructions but {len(contexts)} contexts; give one context (or None) per instruction.")
    window = model.config.max_position_embeddings
    budget = window - max_new_tokens
    if budget < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} fills the model's whole {window}-token window; lower it.")
    prompts, truncated = [], []
    for i, (ins, ctx) in enumerate(zip(instructions, contexts)):
        ids, cut = encode_prompt(tokenizer, ins, ctx, budget)
        if cut:
            where = f"Prompt {i}" if len(instructions) > 1 else "The prompt"
            warnings.warn(
                f"{where} does not fit the model's {window}-token window with max_new_tokens="
                f"{max_new_tokens}; kept its last {len(ids)} tokens, cutting the start of the "
                f"{'context' if ctx else 'instruction'}.", PromptTruncatedWarning, stacklevel=3)
        prompts.append(ids)
        truncated.append(cut)
    return prompts, truncated


def _stop_ids(tokenizer: Tokenizer) -> list[int]:
    return [i for i in (tokenizer.end_id, tokenizer.eos_id) if i is not None]


def generate(model: GPTNeoX, tokenizer: Tokenizer, instruction: str | list[str], context: str | list | None = None,
             *, max_new_tokens: int = 256, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.92,
             seed: int | None = None, compile: bool = False, stats: dict | None = None) -> str | list[str]:
    """Dolly's answer to `instruction` (with optional `context`, the "Input:" of the prompt).

    Defaults are those of Dolly's own pipeline (sampling, top_p 0.92, 256 new tokens);
    temperature=0 is greedy. `seed` makes sampling reproducible. Generation stops at
    `### End`, at EOS, or after max_new_tokens.
    A list of instructions (and optionally a list of contexts) runs as one left-padded batch
    and returns a list of answers, each what that instruction gives alone.
    `compile` runs the decode steps through torch.compile: minutes of compilation the first
    time, so it pays only over long runs (docs/generation.md). `stats`, when given, receives prompt_tokens, new_tokens, prefill_seconds, decode_seconds
    and truncated (one flag per prompt).
    Returns the answer text, stripped. Raises ValueError for an empty instruction or an
    out-of-range argument; warns (PromptTruncatedWarning) when a prompt had to be cut.
    """
    prompts, truncated = _prepare(model, tokenizer, instruction, context, max_new_tokens, temperature, top_k, top_p)
    outputs = [[] for _ in prompts]
    for step in decode(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=seed, stop_ids=_stop_ids(tokenizer), pad_id=tokenizer.pad_id, compile=compile,
                       stats=stats):
        for out, token in zip(outputs, step):
            if token is not None:
                out.append(token)
    if stats is not None:
        stats["truncated"] = truncated
    answers = [tokenizer.decode(out).strip() for out in outputs]  # decode drops the stop token
    return answers[0] if isinstance(instruction, str) else answers


def stream(model: GPTNeoX, tokenizer: Tokenizer, instruction: str, context: str | None = None,
           *, max_new_tokens: int = 256, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.92,
           seed: int | None = None, compile: bool = False, stats: dict | None = None) -> Iterator[str]:
    """`generate` for one instruction, yielding text pieces as the tokens arrive.

    The pieces concatenate to exactly what `generate` returns with the same arguments; a
    character split over several tokens comes out whole (see TextAssembler). The arguments are
    checked, and the prompt encoded, when `stream` is called, not at the first piece.
    """
    if not isinstance(instruction, str):
        raise TypeError("stream() takes one instruction; use generate() for a list.")
    prompts, truncated = _prepare(model, tokenizer, instruction, context, max_new_tokens, temperature, top_k, top_p)
    if stats is not None:
        stats["truncated"] = truncated
    steps = decode(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, seed=seed, stop_ids=_stop_ids(tokenizer), pad_id=tokenizer.pad_id, compile=compile,
                   stats=stats)
    return _pieces(TextAssembler(tokenizer), steps)


def _pieces(assembler: TextAssembler, steps) -> Iterator[str]:
    for (token,) in steps:
        if token is not None and (piece := assembler.push(token)):
            yield piece
    if piece := assembler.finish():
        yield piece
