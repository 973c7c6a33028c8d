"""Generation: an instruction in, Dolly's answer out, one token at a time.

    from minidolly import load_model, load_tokenizer, generate, stream
    model, tokenizer = load_model("databricks/dolly-v2-3b"), load_tokenizer("databricks/dolly-v2-3b")
    print(generate(model, tokenizer, "Explain gravity.", temperature=0))
    for piece in stream(model, tokenizer, "Write a haiku about rain."):
        print(piece, end="", flush=True)

How it works (docs/generation.md has shapes and costs):
  1. The instruction is put in Dolly's prompt template (minidolly/prompt.py) and tokenized.
  2. Prefill: one forward over the prompts, right-padded into one batch, writes their keys
     and values into a KVCache from position 0 and gives each row's logits at its own last
     token (`prefill`).
  3. Decode: each step feeds one token per row at that row's own position (`decode_step`):
     its key and value are written into the cache at that position, and it attends over the
     whole cache under a mask (positions <= its own). Every step has the same shapes, so
     `compile=True` compiles it once, and on CUDA captures it as a CUDA graph.
  4. The only host sync of a step is reading the new tokens. A row stops at `### End` or EOS
     (it keeps decoding what it drew, unread); the loop ends when every row has stopped or
     after max_new_tokens.

For a server: one KVCache with a slot per request, `prefill(..., slot=i)` when a request
joins, `decode_step` (or `compiled_decode_step`) for all slots at once, and a slot is free
again as soon as its request ends (docs/generation.md, "An API for servers").
"""

from __future__ import annotations

import time
import warnings
import weakref
from typing import Iterator

import torch

from .model import GPTNeoX, KVCache
from .prompt import format_prompt
from .quantize import quantization_of
from .tokenizer import Tokenizer


class PromptTruncatedWarning(UserWarning):
    """A prompt did not fit the context window; the start of its context (or instruction) was cut."""


class SamplingError(ValueError):
    """A sampling argument out of range. `param` names it (e.g. "top_p"); `message(name)` is the
    same sentence naming it as a caller spells it (the CLI's --top-p, a server's field)."""

    def __init__(self, param: str, requirement: str, value):
        self.param, self.requirement, self.value = param, requirement, value
        super().__init__(self.message(param))

    def message(self, name: str) -> str:
        return f"{name} {self.requirement}, got {self.value!r}."


class NonFiniteLogitsError(ValueError):
    """The model produced NaN or infinite logits: its weights (or dtype) are broken, and
    sampling from them would be noise. The message names the step."""


class CompilerMissingError(RuntimeError):
    """compile=True on CPU, where inductor writes C++, without a C++ compiler."""


# ------------------------------------------------------------------- arguments


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """Raise SamplingError (a ValueError) naming the first sampling argument out of range."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise SamplingError("max_new_tokens", "must be an integer >= 1", max_new_tokens)
    if not temperature >= 0:  # also catches NaN
        raise SamplingError("temperature", "must be >= 0 (0 means greedy)", temperature)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise SamplingError("top_k", "must be an integer >= 0 (0 turns it off)", top_k)
    if not 0 < top_p <= 1:
        raise SamplingError("top_p", "must be in (0, 1] (1 turns it off)", top_p)


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


@torch.inference_mode()
def prefill(model: GPTNeoX, cache: KVCache, prompts: list[list[int]], *, pad_id: int = 0, slot: int = 0) -> torch.Tensor:
    """Run `prompts` into slots [slot, slot + len(prompts)) of `cache`, each from position 0.

    The prompts are right-padded with `pad_id` into one (B, P) batch: a padded position's key
    lands beyond its row's last token, where no later token looks before overwriting it (see
    GPTNeoX.forward). Row b's next token therefore goes to position len(prompts[b]).
    Returns (B, V) logits: each row's at its own last prompt token. A server adds a request
    to a running batch with `prefill(model, cache, [ids], slot=i)`; the other slots are
    untouched. Raises ValueError for an empty prompt or one longer than the cache.
    """
    B, P = len(prompts), max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0 or P > cache.max_length:
        raise ValueError(f"Every prompt needs 1 to {cache.max_length} tokens (the cache's length); got "
                         f"lengths {sorted({len(p) for p in prompts})}.")
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    keep = torch.zeros(B, P, dtype=torch.bool)  # built on the host: no device sync to find the rows
    for row, p in enumerate(prompts):
        ids[row, : len(p)] = torch.tensor(p, dtype=torch.long)
        keep[row, len(p) - 1] = True
    ids = ids.to(model.embed_in.weight.device, non_blocking=True)
    return model(ids, cache=cache.rows(slot, slot + B), keep=keep)  # (B, V)


def decode_step(model: GPTNeoX, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One new token for every slot of `cache`: tokens (S,) at positions (S,) -> logits (S, V).

    Slot s's token is written at positions[s] of its row and sees that row's keys at positions
    <= positions[s]. Its shapes depend only on the cache, never on how far a row has come,
    so it compiles once (`compiled_decode_step`). A slot with no request in it is fed any
    token at any position (0, say): its row computes garbage that nobody reads. Call it under
    torch.inference_mode(), as `decode` does.
    """
    return model(tokens[:, None], positions=positions[:, None], cache=cache)[:, 0]


_compiled_steps = {}  # device type -> decode_step through torch.compile


def compiled_decode_step(device):
    """`decode_step` through torch.compile, made once per device type and shared by every
    model and cache (each new model or cache shape compiles at its first call; nothing else
    recompiles).

    fullgraph=True: a graph break would hide a host sync or a Python fallback, so it is an
    error. dynamic=False: the shapes are static by design, and a cache of another size gets a
    graph of its own rather than one with symbolic sizes. On CUDA mode="reduce-overhead": the
    step is captured as a CUDA graph and replayed with one launch, instead of launching ~20
    kernels per layer from Python; the cache tensors are static (KVCache marks them), so the
    graph writes them in place. On CPU, inductor's default mode (fused C++ loops) without its
    size and alignment asserts: the generated Python would check every input's strides and
    every op's output on each call, some 400 checks a step, which the guards and the ops' own
    shapes already ensure (410m int8: 46.2 -> 47.6 tok/s, docs/generation.md).
    A different module (a quantized Linear swapped in) is traced like any other.
    Raises CompilerMissingError on CPU without a C++ compiler.
    """
    kind = torch.device(device).type
    if kind not in _compiled_steps:
        if kind == "cpu":
            from torch._inductor.cpp_builder import get_cpp_compiler
            from torch._inductor.exc import InvalidCxxCompiler

            try:
                get_cpp_compiler()
            except InvalidCxxCompiler:
                raise CompilerMissingError("compile=True on CPU needs a C++ compiler (inductor generates C++); "
                                           "install g++, or generate without compiling.") from None
        if kind == "cuda":
            compiled = torch.compile(decode_step, fullgraph=True, dynamic=False, mode="reduce-overhead")

            def step(*args):
                # The previous step's logits (graph memory that this replay overwrites) are read.
                torch.compiler.cudagraph_mark_step_begin()
                return compiled(*args)

            _compiled_steps[kind] = step
        else:
            options = {"size_asserts": False, "alignment_asserts": False} if kind == "cpu" else None
            _compiled_steps[kind] = torch.compile(decode_step, fullgraph=True, dynamic=False, options=options)
    return _compiled_steps[kind]


WINDOW_STEP = 16  # eager and compiled-CPU windows grow in steps of this many keys (window_length)


def window_length(position: int, max_length: int, graphs: bool) -> int:
    """The keys a decode step reads per row when the furthest row writes at `position`, capped at
    the cache's length (a `KVCache.window`): the next multiple of WINDOW_STEP above `position`,
    since every key past the furthest row is time lost (at batch 8 on a CPU the keys and values
    read weigh a quarter of the fp32 weights; a compiled CPU step over a whole 256-key cache
    spent a seventh of its time in attention; steps of 16 rather than 64 made a 410m int8
    compiled step 2 % faster). graphs (a compiled step on CUDA, a CUDA graph per window length):
    a power of two from 256, so a few graphs serve every length. A compiled CPU step compiles
    one graph for every length (`KVCache.window(dynamic=True)`)."""
    if graphs:
        return min(max_length, max(256, 1 << position.bit_length()))
    return min(max_length, (position // WINDOW_STEP + 1) * WINDOW_STEP)


KV_CACHE_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def choose_kv_dtype(model: GPTNeoX, requested: str | torch.dtype | None = None) -> torch.dtype:
    """The dtype a generation cache for `model` stores keys and values in: the `requested` one
    (a torch dtype or a key of KV_CACHE_DTYPES) when it names one, else ("auto", None) the model's own,
    except float16 for a model whose weights are quantized (int8, int4, or 16-bit weight-only)
    and whose activations are fp32. That is llama.cpp's default cache, f16 whatever the
    weights: a decode step reads the cache whole, and in fp32 it doubles what the step reads
    beside the weights (at 410m int8 with a 1024-token prompt, fp32 keys and values weigh
    more than half the weights). A full-precision model keeps an exact cache.
    Raises ValueError for anything else (the argument is kv_cache_dtype wherever a user gives it)."""
    if isinstance(requested, str):
        if requested not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {requested!r}.")
        requested = KV_CACHE_DTYPES[requested]
    if requested is not None:
        if requested not in KV_CACHE_DTYPES.values():
            raise ValueError(f"kv_cache_dtype must be float32, bfloat16 or float16, got {requested!r}.")
        return requested
    dtype = model.embed_in.weight.dtype
    return torch.float16 if dtype == torch.float32 and quantization_of(model) is not None else dtype


_kept_caches = weakref.WeakKeyDictionary()  # model -> the cache compile=True reuses


def generation_cache(model: GPTNeoX, batch_size: int, length: int, reuse: bool, kv_dtype: torch.dtype | None = None) -> KVCache:
    """A KVCache with at least `batch_size` slots of at least `length` positions, on the model's
    device, its rotary table in the model's dtype, its keys and values in `kv_dtype`
    (choose_kv_dtype's by default).

    reuse=False: a new one of exactly that size. reuse=True (compile=True): one cache per
    model, kept between calls (and freed with the model), so the compiled step meets the same
    tensors and shapes every time. It grows only when a call does not fit, its length in
    powers of two from 256 (capped at the model's window): a few sizes, hence a few
    compilations, over any mix of prompt lengths and max_new_tokens. Not for concurrent calls
    on one model.
    """
    weight = model.embed_in.weight
    kv_dtype = kv_dtype or choose_kv_dtype(model)
    if not reuse:
        return KVCache(model.config, batch_size, length, device=weight.device, dtype=weight.dtype, kv_dtype=kv_dtype)
    cache = _kept_caches.get(model)
    fits = cache is not None and cache.batch_size >= batch_size and cache.max_length >= length \
        and cache.k[0].dtype == kv_dtype and cache.cos.dtype == weight.dtype and cache.k[0].device == weight.device
    if not fits:
        if cache is not None:
            batch_size = max(batch_size, cache.batch_size)
            length = max(length, cache.max_length)
            del _kept_caches[model], cache  # free it before the bigger one is allocated
        bucket = max(256, 1 << (length - 1).bit_length())
        length = max(length, min(bucket, model.config.max_position_embeddings))
        cache = _kept_caches[model] = KVCache(model.config, batch_size, length, device=weight.device, dtype=weight.dtype,
                                              kv_dtype=kv_dtype)
    return cache


def suspects(model: GPTNeoX, cache: KVCache) -> str:
    """What NaN or infinite logits point to: the weights, or keys and values beyond the range of
    an fp16 cache that the model's own dtype would not have used."""
    if cache.k[0].dtype == torch.float16 and model.embed_in.weight.dtype != torch.float16:
        return ("the weights may be corrupt, or its keys and values exceed the float16 KV cache's range "
                "(kv_cache_dtype / --kv-cache-dtype float32 or bfloat16 avoids that)")
    return "the weights may be corrupt"


def checked_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                   generators: list[torch.Generator] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`next_tokens` for logits (B, V), and the same tokens for the host with a row whose
    logits hold a NaN set to -1 (an infinity: -2).

    The check rides on the token read the loop makes anyway, so it costs no second host sync.
    Rows with bad logits are sampled from zeros instead (torch.multinomial refuses NaN); the
    caller raises before anyone reads them. Returns (tokens to feed back, tokens to read).
    """
    # One pass: a row's sum is NaN if a logit is NaN (or two infinities cancel), infinite if
    # one is; finite logits of a sane model sum far below fp32's range.
    total = logits.sum(-1, dtype=torch.float32)  # (B,)
    nan, inf = total.isnan(), total.isinf()
    if temperature > 0:
        logits = logits.masked_fill((nan | inf)[:, None], 0.0)
    token = next_tokens(logits, temperature, top_k, top_p, generators)
    return token, torch.where(nan, -1, torch.where(inf, -2, token))


@torch.inference_mode()
def decode(model: GPTNeoX, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop_ids=(), pad_id: int = 0,
           compile: bool = False, kv_cache_dtype: str | torch.dtype | None = None,
           stats: dict | None = None) -> Iterator[list[int | None]]:
    """Generate from a batch of tokenized prompts, yielding one step at a time.

    Each step yields a list with every row's new token, or None for a row that stopped at an
    earlier step. A token in `stop_ids` is yielded once and stops its row. With `seed`, row i
    samples with its own torch.Generator seeded `seed`, so each row gets exactly the tokens it
    would get alone. `compile` runs the decode steps through `compiled_decode_step` with a
    cache reused across calls (`generation_cache`); the tokens are those of eager decoding.
    `kv_cache_dtype` ("auto" or None, "float32", "bfloat16", "float16", or a torch dtype): what
    the cache stores keys and values in; choose_kv_dtype says what auto picks.
    `stats`, when given, receives prompt_tokens, new_tokens, prefill_seconds and decode_seconds.
    One host sync per step: reading the new tokens. Raises NonFiniteLogitsError when a
    running row's logits are NaN or infinite.
    """
    device = model.embed_in.weight.device
    B, lengths = len(prompts), [len(p) for p in prompts]
    cache = generation_cache(model, B, max(lengths) + max_new_tokens, reuse=compile,
                             kv_dtype=choose_kv_dtype(model, kv_cache_dtype))
    step_fn = compiled_decode_step(device) if compile else decode_step
    slots = cache.batch_size  # >= B: a kept cache may have more; the spare slots decode garbage
    # The view of the cache each step reads: the least window that holds the furthest row, one
    # dynamic graph for all when compiled on CPU; under CUDA graphs the kept cache whole.
    graphs = compile and device.type != "cpu"
    windows = {}  # length -> KVCache.window
    generators = None
    if seed is not None and temperature > 0:
        generators = [torch.Generator(device=device).manual_seed(seed) for _ in range(B)]
    stop_ids = set(stop_ids)
    done = [False] * B  # on the host: the stop test needs no device work and no second sync
    # where each slot's next token goes; made on the host, copied without waiting for the device
    positions = torch.tensor(lengths + [0] * (slots - B)).to(device, non_blocking=True)  # (slots,)

    start = time.perf_counter()
    logits = prefill(model, cache, prompts, pad_id=pad_id)  # (B, V)
    new_tokens, prefill_seconds = 0, None
    for step in range(max_new_tokens):
        token, readable = checked_tokens(logits[:B], temperature, top_k, top_p, generators)  # (B,)
        tokens = readable.tolist()  # the one host sync per step
        if prefill_seconds is None:
            prefill_seconds = time.perf_counter() - start
        for row, (t, d) in enumerate(zip(tokens, done)):
            if t < 0 and not d:
                where = f" (prompt {row})" if B > 1 else ""
                raise NonFiniteLogitsError(f"The model produced {'NaN' if t == -1 else 'infinite'} logits at step "
                                           f"{step + 1}{where}; {suspects(model, cache)}.")
        new_tokens += done.count(False)
        yield [None if d else t for t, d in zip(tokens, done)]
        done = [d or t in stop_ids for t, d in zip(tokens, done)]
        if step == max_new_tokens - 1 or all(done):
            break
        # A stopped row keeps decoding the token it drew; its outputs are never read.
        window = cache.max_length if graphs else window_length(max(lengths) + step, cache.max_length, False)
        if window not in windows:
            windows[window] = cache if graphs else cache.window(window, dynamic=compile)
        logits = step_fn(model, windows[window], torch.nn.functional.pad(token, (0, slots - B)), positions)  # (slots, V)
        positions = positions + 1
    if stats is not None:
        stats.update(prompt_tokens=sum(lengths), new_tokens=new_tokens,
                     prefill_seconds=prefill_seconds, decode_seconds=time.perf_counter() - start - prefill_seconds)


# ------------------------------------------------------------------------ text


class TextAssembler:
    """Token ids in, printable text pieces out, as a stream.

    One token may end in the middle of a UTF-8 character (an emoji is often 3 tokens of raw
    bytes), so each push decodes the whole id list and hands out only the new suffix, and
    nothing while the text ends in U+FFFD, the replacement for an unfinished character.
    The pieces are cut from the stripped text, so leading whitespace never comes out and
    trailing whitespace waits until more text follows it: they concatenate to exactly
    `tokenizer.decode(ids).strip()`, what `generate` returns. With strip=False they
    concatenate to `tokenizer.decode(ids)` itself (a raw completion, whose leading space matters).
    """

    def __init__(self, tokenizer: Tokenizer, strip: bool = True):
        self.tokenizer, self.ids, self.sent, self.strip = tokenizer, [], 0, strip

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
        if self.strip:
            text = text.strip()
        piece, self.sent = text[self.sent :], len(text)
        return piece


# ------------------------------------------------------------------ public API


def _prepare(model, tokenizer, instruction, context, max_new_tokens, temperature, top_k, top_p, kv_cache_dtype):
    """Check the arguments and encode every prompt; returns (prompts, truncated flags)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    choose_kv_dtype(model, kv_cache_dtype)
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
             seed: int | None = None, compile: bool = False, kv_cache_dtype: str | torch.dtype | None = None,
             stats: dict | None = None) -> str | list[str]:
    """Dolly's answer to `instruction` (with optional `context`, the "Input:" of the prompt).

    Defaults are those of Dolly's own pipeline (sampling, top_p 0.92, 256 new tokens);
    temperature=0 is greedy. `seed` makes sampling reproducible. Generation stops at
    `### End`, at EOS, or after max_new_tokens.
    A list of instructions (and optionally a list of contexts) runs as one batch and returns
    a list of answers, each what that instruction gives alone.
    `compile` compiles the decode step once per model and cache size (CUDA graphs on a GPU):
    seconds to minutes the first time, then every later call of any prompt length and
    max_new_tokens reuses it (docs/generation.md). `kv_cache_dtype`: see `decode`. `stats`, when given, receives
    prompt_tokens, new_tokens, prefill_seconds, decode_seconds and truncated (one flag per prompt).
    Returns the answer text, stripped. Raises ValueError for an empty instruction, an
    out-of-range argument (SamplingError) or a model that produces NaN logits
    (NonFiniteLogitsError); warns (PromptTruncatedWarning) when a prompt had to be cut.
    """
    prompts, truncated = _prepare(model, tokenizer, instruction, context, max_new_tokens, temperature, top_k, top_p,
                                  kv_cache_dtype)
    outputs = [[] for _ in prompts]
    for step in decode(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=seed, stop_ids=_stop_ids(tokenizer), pad_id=tokenizer.pad_id, compile=compile,
                       kv_cache_dtype=kv_cache_dtype, stats=stats):
        for out, token in zip(outputs, step):
            if token is not None:
                out.append(token)
    if stats is not None:
        stats["truncated"] = truncated
    answers = [tokenizer.decode(out).strip() for out in outputs]  # decode drops the stop token
    return answers[0] if isinstance(instruction, str) else answers


def stream(model: GPTNeoX, tokenizer: Tokenizer, instruction: str, context: str | None = None,
           *, max_new_tokens: int = 256, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.92,
           seed: int | None = None, compile: bool = False, kv_cache_dtype: str | torch.dtype | None = None,
           stats: dict | None = None) -> Iterator[str]:
    """`generate` for one instruction, yielding text pieces as the tokens arrive.

    The pieces concatenate to exactly what `generate` returns with the same arguments; a
    character split over several tokens comes out whole (see TextAssembler). The arguments are
    checked, and the prompt encoded, when `stream` is called, not at the first piece.
    """
    if not isinstance(instruction, str):
        raise TypeError("stream() takes one instruction; use generate() for a list.")
    prompts, truncated = _prepare(model, tokenizer, instruction, context, max_new_tokens, temperature, top_k, top_p,
                                  kv_cache_dtype)
    if stats is not None:
        stats["truncated"] = truncated
    steps = decode(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, seed=seed, stop_ids=_stop_ids(tokenizer), pad_id=tokenizer.pad_id, compile=compile,
                   kv_cache_dtype=kv_cache_dtype, stats=stats)
    return _pieces(TextAssembler(tokenizer), steps)


def _pieces(assembler: TextAssembler, steps) -> Iterator[str]:
    for (token,) in steps:
        if token is not None and (piece := assembler.push(token)):
            yield piece
    if piece := assembler.finish():
        yield piece
