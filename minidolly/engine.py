"""The continuous-batching engine: many requests, one model, one decode step for all of them.

    engine = Engine(model, tokenizer, max_batch_size=8, max_queue=32).start()
    request = engine.submit(prompt_ids, SamplingParams(max_new_tokens=64, temperature=0), on_output=print)
    engine.cancel(request)      # from any thread; its slot is free at the next step
    engine.close()

A request is a tokenized prompt and its sampling settings. The engine keeps one KVCache with
a slot (a row) per running request, and one thread runs this loop:

      submit() ──> waiting queue (at most max_queue) ──┐
                                                       │ join: prefill ONE request into a free slot
         ┌─────────────────────────────────────────────┘
         └─> decode step: one forward for every slot at its own position ──> a token per request
               │  a request that stops (### End, EOS, a stop string), reaches max_new_tokens
               └─ or is cancelled leaves at once: its slot is free for the next join

    the cache at one step (capitals: prompt, lower case: generated, '.': not yet written)
        slot 0  A A A A A A A a a a a .     position 11
        slot 1  B B B b b b b b b . . .     position 9
        slot 2  C C C C C C C C C C c .     position 11: joined one step ago
        slot 3  - - - - - - - - - - - -     free: decodes token 0 at position 0, unread

Every row attends only to keys at its own positions or before (a mask from its position),
so rows of different lengths and ages share one batched forward, and each request gets the
tokens it would get alone: greedy equals `generate`, and a seeded request samples with its
own torch.Generator, whatever runs beside it. Joining costs one prefill, and at most one
runs between two decode steps, so a long prompt stalls the running requests by one prefill;
leaving costs nothing. docs/serving.md has the costs and the picture at more length.

This module knows nothing of HTTP: minidolly/serve.py translates OpenAI's requests into
`submit` calls and the outputs back.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
from typing import Callable

import torch

from .generate import (SamplingError, TextAssembler, check_sampling, checked_tokens, choose_kv_dtype, compiled_decode_step,
                       decode_step, prefill, suspects, window_length)
from .model import GPTNeoX, KVCache
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Every slot is busy and max_queue requests already wait: try again later."""


class EngineClosedError(RuntimeError):
    """The engine is not running (not started yet, or shutting down) and takes no requests."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request generates: the arguments of `generate`, plus OpenAI's stop strings.

    temperature 0 is greedy; top_k 0 and top_p 1 turn those filters off. With `seed` the
    request samples with its own generator seeded so, and gets what `generate(..., seed=seed)`
    gets; without one it gets a generator seeded at random. `stop`: strings that end the text
    where they first appear (they are not part of it). `ignore_eos`: run to max_new_tokens
    past ### End and EOS (vLLM's flag, for benchmarks).
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def check(self) -> None:
        """Raise SamplingError (a ValueError) naming the first field out of range."""
        check_sampling(self.max_new_tokens, self.temperature, self.top_k, self.top_p)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -2**63 <= self.seed < 2**64):
            raise SamplingError("seed", "must be an integer in [-2**63, 2**64)", self.seed)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise SamplingError("stop", "must hold non-empty strings", self.stop)


@dataclasses.dataclass
class Output:
    """What a request's `on_output` receives, on the engine thread, as its text grows.

    text: the new text since the last output, whole UTF-8 characters ('' when only the end
        is news). The texts of all outputs concatenate to the answer.
    finish_reason: None while running; then "stop" (### End, EOS or a stop string), "length"
        (max_new_tokens), "cancelled", "shutdown" (the engine closed) or "error".
    error: the sentence that says what went wrong, with "shutdown" and "error".
    completion_tokens: tokens generated so far; a stop token counts, as it was generated.
    """

    text: str
    finish_reason: str | None = None
    error: str | None = None
    completion_tokens: int = 0


class StopStrings:
    """Finds the first of some stop strings in text that arrives in pieces.

    `feed` returns the text that is safe to pass on: a tail that could still become a stop
    string is held back until the next piece decides (vLLM and OpenAI do the same). A stop
    string may span any number of pieces.
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.held = stops, ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text to pass on, whether a stop string was found); after a find, nothing more."""
        text = self.held + piece
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.held = ""
            return text[: min(found)], True
        keep = max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The held-back tail, at the end of the text (it never became a stop string)."""
        text, self.held = self.held, ""
        return text


class Request:
    """A submitted request: what `Engine.submit` returns and `Engine.cancel` takes.

    `prompt_tokens` is public; the rest belongs to the engine thread.
    """

    _ids = itertools.count()

    def __init__(self, prompt: list[int], params: SamplingParams, on_output: Callable[[Output], None],
                 tokenizer: Tokenizer, strip: bool):
        self.id = next(Request._ids)
        self.prompt, self.params, self.on_output = prompt, params, on_output
        self.prompt_tokens = len(prompt)
        self.slot: int | None = None
        self.position = len(prompt)  # where its next fed token goes
        self.generated = 0
        self.generator: torch.Generator | None = None
        self.cancelled = False  # set by cancel() on any thread; acted on by the engine thread
        self.text = TextAssembler(tokenizer, strip=strip)
        self.stops = StopStrings(params.stop)

    def __repr__(self):
        return f"Request({self.id}, slot={self.slot}, prompt_tokens={self.prompt_tokens}, generated={self.generated})"


class Engine:
    """Continuous batching over one model: see the module docstring.

    max_batch_size: slots, i.e. requests decoded together; the KVCache holds that many rows of
        the model's whole window (max_position_embeddings), allocated here, once.
    max_queue: requests that may wait for a slot; one more raises QueueFullError.
    compile: decode through `compiled_decode_step` (all slots every step; on CUDA one graph
        per window length, on CPU one graph for all: `window_length`); eager decoding runs
        only the slots up to the highest busy one.
    kv_cache_dtype: what the cache stores keys and values in, as for `generate`
        (generate.choose_kv_dtype: fp16 for a quantized model with fp32 activations).
    `start()` starts the engine thread; `close()` ends every request (finish_reason
    "shutdown") and stops it.
    """

    def __init__(self, model: GPTNeoX, tokenizer: Tokenizer, *, max_batch_size: int = 8, max_queue: int = 64,
                 compile: bool = False, kv_cache_dtype: str | torch.dtype | None = None):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}.")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}.")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue, self.compile = max_batch_size, max_queue, compile
        self.max_length = model.config.max_position_embeddings
        self.stop_ids = {i for i in (tokenizer.end_id, tokenizer.eos_id) if i is not None}
        weight = model.embed_in.weight
        self.device = weight.device
        with torch.inference_mode():
            self.cache = KVCache(model.config, max_batch_size, self.max_length, device=self.device, dtype=weight.dtype,
                                 kv_dtype=choose_kv_dtype(model, kv_cache_dtype))
            self._feed = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)  # (slots,) next inputs
        self._step = compiled_decode_step(self.device) if compile else decode_step
        self._views: dict[tuple[int, int], KVCache] = {}  # (slots, window) -> a view of the cache, kept
        self._slots: list[Request | None] = [None] * max_batch_size  # engine thread only
        self._queue: collections.deque[Request] = collections.deque()
        self._busy = 0  # slots taken (joining included); like the queue, under _lock
        self._lock = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run, for /health and the tests

    # ------------------------------------------------------------ any thread

    def start(self) -> "Engine":
        """Start the engine thread; returns the engine."""
        self._thread = threading.Thread(target=self._run, name="minidolly-engine", daemon=True)
        self._thread.start()
        return self

    def close(self, wait: bool = True) -> None:
        """Stop taking requests; end the running and waiting ones with finish_reason "shutdown"
        (within one step) and stop the thread (waiting for it unless wait=False)."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if wait and self._thread is not None:
            self._thread.join()

    def submit(self, prompt: list[int], params: SamplingParams, on_output: Callable[[Output], None], *,
               strip: bool = True) -> Request:
        """Queue a request: `prompt` token ids, generated as `params` says. `on_output` is called
        on the engine thread with each Output (it must be quick and must not raise); the last
        one has a finish_reason. strip=True: the text is stripped as `generate` strips it;
        False: it is the raw decoded continuation. Raises SamplingError or ValueError for
        bad arguments, QueueFullError, or EngineClosedError."""
        params.check()
        if not prompt or len(prompt) + params.max_new_tokens > self.max_length:
            raise ValueError(f"The prompt ({len(prompt)} tokens) and max_new_tokens ({params.max_new_tokens}) "
                             f"must fit the model's {self.max_length}-token window.")
        vocab = self.model.config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
            raise ValueError(f"Prompt token ids must be integers in [0, {vocab}).")
        request = Request(prompt, params, on_output, self.tokenizer, strip)
        with self._lock:
            if self._closing or self._thread is None or not self._thread.is_alive():
                raise EngineClosedError("The server is shutting down." if self._closing else "The engine is not running.")
            # A request that will find a free slot is not waiting; only the rest count against max_queue.
            if len(self._queue) - (self.max_batch_size - self._busy) >= self.max_queue:
                raise QueueFullError(f"All {self.max_batch_size} slots are busy and {self.max_queue} requests are waiting.")
            self._queue.append(request)
            self._lock.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """End `request` (finish_reason "cancelled"): a waiting one leaves the queue and a running
        one its slot before the next decode step. A finished request is left alone."""
        with self._lock:
            request.cancelled = True
            self._lock.notify_all()

    def stats(self) -> dict:
        """slots, running and waiting requests, and decode steps so far."""
        with self._lock:
            return dict(slots=self.max_batch_size, running=self._busy, waiting=len(self._queue), steps=self.steps)

    # ------------------------------------------------------- the engine thread

    def _run(self):
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._closing or self._queue or self._busy):
                        self._lock.wait()
                    if self._closing:
                        break
                    dropped = [r for r in self._queue if r.cancelled]
                    for r in dropped:
                        self._queue.remove(r)
                    joining = None
                    if self._queue and self._busy < self.max_batch_size:
                        joining = self._queue.popleft()
                        self._busy += 1
                for r in dropped:
                    self._emit(r, Output("", "cancelled", completion_tokens=0))
                for r in self._running():
                    if r.cancelled:
                        self._leave(r, "cancelled")
                try:
                    if joining is not None:
                        self._join(joining)
                    if self._running():
                        self._decode()
                except Exception as e:  # a bug or out of memory: fail the requests in flight, keep serving
                    log.exception("the engine failed a step")
                    for r in self._running():
                        self._leave(r, "error", error=f"The engine failed: {type(e).__name__}: {e}")
                    if joining is not None and joining.slot is None:
                        with self._lock:
                            self._busy -= 1
                        self._emit(joining, Output("", "error", f"The engine failed: {type(e).__name__}: {e}"))
            with self._lock:
                waiting, self._queue = list(self._queue), collections.deque()
            for r in self._running():
                self._leave(r, "shutdown", error="The server is shutting down.")
            for r in waiting:
                self._emit(r, Output("", "shutdown", "The server is shutting down."))

    def _running(self) -> list[Request]:
        return [r for r in self._slots if r is not None]

    def _join(self, request: Request):
        """Prefill `request` into the lowest free slot (keeping the busy ones packed at the
        front, where an eager step reads them) and take its first token."""
        slot = self._slots.index(None)
        self._slots[slot], request.slot = request, slot
        p = request.params
        if p.temperature > 0:
            request.generator = torch.Generator(device=self.device)
            if p.seed is None:
                request.generator.seed()
            else:
                request.generator.manual_seed(p.seed)
        logits = prefill(self.model, self.cache, [request.prompt], pad_id=self.tokenizer.pad_id, slot=slot)  # (1, V)
        self._sample([request], logits)

    def _decode(self):
        """One decode step for every running request, then a token for each."""
        running = self._running()
        # The step reads slots [0, n) and `window` keys of each: the least that holds every running row.
        n = self.max_batch_size if self.compile else 1 + max(r.slot for r in running)
        graphs = self.compile and self.device.type != "cpu"  # one graph per window length
        window = window_length(max(r.position for r in running), self.max_length, graphs)
        if (n, window) not in self._views:
            self._views[n, window] = self.cache.rows(0, n).window(window, dynamic=self.compile and not graphs)
        positions = [0] * n  # a free slot decodes its token at position 0, unread
        for r in running:
            positions[r.slot] = r.position
        positions = self._to_device(positions)  # (n,)
        logits = self._step(self.model, self._views[n, window], self._feed[:n], positions)  # (n, V)
        self.steps += 1
        for r in running:
            r.position += 1
        self._sample(running, logits[self._to_device([r.slot for r in running])])

    def _sample(self, requests: list[Request], logits: torch.Tensor):
        """Pick each request's next token from its row of logits (R, V) with its own settings,
        feed it to its slot, and read them all (the step's one host sync)."""
        groups = collections.defaultdict(list)  # rows that sample alike go through checked_tokens together
        for i, r in enumerate(requests):
            p = r.params
            groups[(0.0, 0, 1.0) if p.temperature == 0 else (p.temperature, p.top_k, p.top_p)].append(i)
        feed = torch.empty(len(requests), dtype=torch.long, device=self.device)
        read = torch.empty_like(feed)
        for (temperature, top_k, top_p), rows in groups.items():
            generators = [requests[i].generator for i in rows] if temperature > 0 else None
            index = self._to_device(rows)
            feed[index], read[index] = checked_tokens(logits[index], temperature, top_k, top_p, generators)
        self._feed[self._to_device([r.slot for r in requests])] = feed
        for r, token in zip(requests, read.tolist()):
            self._advance(r, token)

    def _to_device(self, values: list[int]) -> torch.Tensor:
        """Positions or row indices made on the host, on the device without waiting for it: on
        CUDA through pinned memory (a copy from pageable memory would wait for the step in flight,
        a second host sync per step)."""
        values = torch.tensor(values)
        if self.device.type == "cuda":
            values = values.pin_memory()
        return values.to(self.device, non_blocking=True)

    def _advance(self, request: Request, token: int):
        """Take one generated token: pass its text on, or end the request."""
        if token < 0:  # checked_tokens marks NaN logits -1, infinite ones -2
            what = "NaN" if token == -1 else "infinite"
            return self._leave(request, "error", error=f"The model produced {what} logits at step "
                                                       f"{request.generated + 1}; {suspects(self.model, self.cache)}.")
        request.generated += 1
        if token in self.stop_ids and not request.params.ignore_eos:  # the stop token itself has no text
            return self._leave(request, "stop", self._rest(request)[0])
        text, found = request.stops.feed(request.text.push(token))
        if found:
            return self._leave(request, "stop", text)
        if request.generated == request.params.max_new_tokens:
            rest, found = self._rest(request)
            return self._leave(request, "stop" if found else "length", text + rest)
        if text:
            self._emit(request, Output(text, completion_tokens=request.generated))

    @staticmethod
    def _rest(request: Request) -> tuple[str, bool]:
        """The text still held back when a request ends on its own (an unfinished character,
        trailing whitespace of a raw completion, the start of a stop string), and whether a
        stop string turned up in it."""
        text, found = request.stops.feed(request.text.finish())
        return (text, True) if found else (text + request.stops.flush(), False)

    def _leave(self, request: Request, reason: str, text: str = "", error: str | None = None):
        """Free the request's slot (the next step runs without it) and send its last output."""
        self._slots[request.slot] = None
        with self._lock:
            self._busy -= 1
        self._emit(request, Output(text, reason, error, request.generated))

    def _emit(self, request: Request, output: Output):
        try:
            request.on_output(output)
        except Exception:  # a listener's bug must not stop the engine
            log.exception("on_output of request %d raised", request.id)
