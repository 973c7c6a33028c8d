"""Serving: the batching engine, and the OpenAI-compatible server driven by the official
`openai` client and by a real browser, against `generate()` run alone.

One server process (`generate.py --serve --port 0`) on a random 14m-shaped checkpoint whose
`### End` row is doubled, so greedy answers end at `### End` after 6 to 229 tokens depending
on the prompt (both finish reasons occur), serves most tests; the queue and Ctrl-C tests
start a second one with one slot.
"""

import concurrent.futures
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from conftest import REPO, TOKENIZER_JSON, make_hf_checkpoint
from test_generate import cli_main  # generate.py's main() in this process
import minidolly.engine as engine_module
from minidolly import generate, load_model
from minidolly.engine import Engine, EngineClosedError, QueueFullError, SamplingParams, StopStrings
from minidolly.generate import encode_prompt
from minidolly.prompt import format_prompt


END = 50277
WINDOW = 512
PROMPTS = {  # instruction -> greedy tokens until ### End (of 300 at most): both finish reasons below
    "Explain gravity.": 6, "What is the capital of France?": 32, "Résumé 日本語 😀": 43, "Write a haiku about rain.": 51,
    "Give me three tips for sleeping well.": 59, "Tell me a story.": 86, "Summarize the passage.": 108,
    "Name a prime.": 127, "Why is the sky blue?": 229,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The checkpoint directory and our model of it."""
    d = tmp_path_factory.mktemp("serve")
    hf = make_hf_checkpoint(d, seed=1, initializer_range=0.15, vocab_size=50280, max_position_embeddings=WINDOW)
    with torch.no_grad():
        hf.get_output_embeddings().weight[END] *= 2
    hf.save_pretrained(d)
    shutil.copy(TOKENIZER_JSON, d / "tokenizer.json")
    return d, load_model(d)


_solo = {}


def solo(ckpt, tokenizer, instruction, context=None, **kw):
    """generate() alone, and how it ended: (text, finish_reason, new tokens)."""
    key = (instruction, context, tuple(sorted(kw.items())))
    if key not in _solo:
        kw = {"temperature": 0, **kw}
        stats = {}
        text = generate(ckpt[1], tokenizer, instruction, context, stats=stats, **kw)
        _solo[key] = text, "length" if stats["new_tokens"] == kw["max_new_tokens"] else "stop", stats["new_tokens"]
    return _solo[key]


# ---------------------------------------------------------------- the server


class Live:
    """A `generate.py --serve` process on a free port of 127.0.0.1."""

    def __init__(self, model_dir, tmp_path, *flags):
        self.log = tmp_path / f"server-{os.getpid()}-{time.monotonic_ns()}.log"
        self.model = str(model_dir)
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO / "generate.py"), "--serve", "--model", self.model, "--port", "0", *flags],
                stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 120
        while not (m := re.search(r" on (http://\S+) ", self.log.read_text())):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)
        self.url = m.group(1)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def health(self):
        return self.http.get("/health").json()

    def idle(self, timeout=30):
        """Wait until no request runs or waits; returns /health."""
        deadline = time.monotonic() + timeout
        while (h := self.health())["running"] or h["waiting"]:
            assert time.monotonic() < deadline, h
            time.sleep(0.02)
        return h

    def rss(self):
        status = pathlib.Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024

    def stop(self, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout)
        self.http.close()


@pytest.fixture(scope="module")
def live(ckpt, tmp_path_factory):
    server = Live(ckpt[0], tmp_path_factory.mktemp("live"), "--max-batch-size", "8", "--max-queue", "64")
    yield server
    server.stop()
    assert server.proc.returncode == 130, server.log.read_text()  # Ctrl-C's status, after a clean stop
    assert "Traceback" not in server.log.read_text()


def chat(live, instruction, context=None, stream=False, **kw):
    """(text, finish_reason, usage or None, response) of a chat completion."""
    messages = [{"role": "user", "content": instruction}]
    extra = {**kw.pop("extra_body", {}), **({"context": context} if context else {})} or None
    kw.setdefault("temperature", 0)
    if not stream:
        r = live.client.chat.completions.create(model=live.model, messages=messages, extra_body=extra, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage, r
    chunks = list(live.client.chat.completions.create(model=live.model, messages=messages, extra_body=extra,
                                                      stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and chunks[-1].usage is not None
    return text, finish[0], chunks[-1].usage, chunks


# ------------------------------------------------------- answers equal generate()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_and_completions_equal_generate(live, ckpt, tokenizer, stream):
    cases = [("Explain gravity.", None, 40), ("Write a haiku about rain.", None, 30),
             ("Résumé 日本語 😀", "Ünïcödé cöntext — “quotes” ✓", 24)]
    for instruction, context, n in cases:
        expected, finish, new_tokens = solo(ckpt, tokenizer, instruction, context, max_new_tokens=n)
        prompt = format_prompt(instruction, context)
        text, got_finish, usage, _ = chat(live, instruction, context, stream=stream, max_tokens=n)
        assert (text, got_finish) == (expected, finish)
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(tokenizer.encode(prompt)), new_tokens)
        # the same prompt, raw, through /v1/completions: the unstripped continuation
        kw = dict(model=live.model, prompt=prompt, max_tokens=n, temperature=0)
        if stream:
            chunks = list(live.client.completions.create(stream=True, **kw))
            raw = "".join(c.choices[0].text for c in chunks)
            got_finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason][0]
        else:
            r = live.client.completions.create(**kw)
            raw, got_finish = r.choices[0].text, r.choices[0].finish_reason
            assert r.usage.completion_tokens == new_tokens and r.model_extra["prompt_truncated"] is False
        assert raw.strip() == expected and got_finish == finish


def test_both_finish_reasons_and_streamed_pieces(live, ckpt, tokenizer):
    text, finish, usage, chunks = chat(live, "Explain gravity.", stream=True, max_tokens=40)
    assert finish == "stop" and usage.completion_tokens == PROMPTS["Explain gravity."]  # `### End` counts
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 2 and "".join(pieces) == text  # streamed token by token
    text, finish, usage, _ = chat(live, "Why is the sky blue?", max_tokens=10)
    assert finish == "length" and usage.completion_tokens == 10


def test_seeded_sampling_is_reproducible_per_request(live, ckpt, tokenizer):
    """Two requests with one seed, sent together with a greedy one, each sample exactly what
    generate() samples alone with that seed; another seed samples something else."""
    kw = dict(max_tokens=24, temperature=0.9, top_p=0.9, extra_body={"top_k": 40})
    expected = generate(ckpt[1], tokenizer, "Tell me a story.", max_new_tokens=24, temperature=0.9, top_p=0.9,
                        top_k=40, seed=7)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(chat, live, "Tell me a story.", seed=7, **kw),
                pool.submit(chat, live, "Tell me a story.", seed=7, stream=True, **kw),
                pool.submit(chat, live, "Name a prime.", max_tokens=24),
                pool.submit(chat, live, "Tell me a story.", seed=8, **kw)]
        answers = [j.result()[0] for j in jobs]
    assert answers[0] == answers[1] == expected and answers[3] != expected


def test_stop_strings_end_the_answer_where_they_start(live, ckpt, tokenizer):
    full, _, _ = solo(ckpt, tokenizer, "Tell me a story.", max_new_tokens=60)
    cut = len(full) // 2
    stop = full[cut : cut + 5]  # starts inside the answer: held back until it is known to match
    before = full[: full.index(stop)]
    for stream in (False, True):
        text, finish, _, _ = chat(live, "Tell me a story.", stream=stream, max_tokens=60, stop=["zzzz", stop])
        assert (text, finish) == (before, "stop")
    assert chat(live, "Tell me a story.", max_tokens=60, stop="never there")[:2] == (full, "length")


def test_chat_turns_and_system_become_dollys_input(live, ckpt, tokenizer):
    """docs/serving.md: earlier turns (and the system message) become the Input: section."""
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Name a prime."},
                {"role": "assistant", "content": [{"type": "text", "text": "Seven."}]},
                {"role": "user", "content": "And another one?"}]
    r = live.client.chat.completions.create(model=live.model, messages=messages, max_tokens=20, temperature=0,
                                            extra_body={"context": "Primes are integers."})
    context = "Primes are integers.\n\nAnswer briefly.\n\nUser: Name a prime.\n\nAssistant: Seven."
    assert r.choices[0].message.content == solo(ckpt, tokenizer, "And another one?", context, max_new_tokens=20)[0]


def test_a_prompt_too_long_is_cut_on_the_left_and_flagged(live, ckpt, tokenizer):
    context = " ".join(f"word{i}" for i in range(600)) + " THE END"
    with pytest.warns(UserWarning, match="window"):
        expected = solo(ckpt, tokenizer, "Summarize.", context, max_new_tokens=16)[0]
    text, _, usage, r = chat(live, "Summarize.", context, max_tokens=16)
    assert text == expected and r.model_extra["prompt_truncated"] is True
    assert usage.prompt_tokens == len(encode_prompt(tokenizer, "Summarize.", context, WINDOW - 16)[0])
    _, _, _, chunks = chat(live, "Summarize.", context, stream=True, max_tokens=16)
    assert all(c.model_extra["prompt_truncated"] is True for c in chunks)
    r = live.client.completions.create(model=live.model, prompt=context, max_tokens=16, temperature=0)
    assert r.model_extra["prompt_truncated"] is True and r.usage.prompt_tokens == WINDOW - 16
    assert not chat(live, "Summarize.", "short", max_tokens=16)[3].model_extra["prompt_truncated"]


# --------------------------------------------------------------- concurrency


def test_eight_concurrent_clients_each_get_their_solo_answer(live, ckpt, tokenizer):
    instructions = list(PROMPTS)[1:9]
    expected = [solo(ckpt, tokenizer, i, max_new_tokens=48)[:2] for i in instructions]
    ready = threading.Barrier(len(instructions))  # no thread starts late on a busy machine

    def client(instruction):
        ready.wait()
        start = time.monotonic()
        text, finish, _, chunks = chat(live, instruction, stream=True, max_tokens=48)
        return text, finish, start, time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(client, instructions))
    assert [r[:2] for r in results] == expected
    assert max(r[2] for r in results) < min(r[3] for r in results)  # all eight were in flight at once


def stream_then_leave(live, chunks=3):
    stream = live.client.chat.completions.create(
        model=live.model, messages=[{"role": "user", "content": "Why is the sky blue?"}], max_tokens=400,
        temperature=0, stream=True, extra_body={"ignore_eos": True})
    got = [c for _, c in zip(range(chunks), stream)]
    stream.close()  # the client goes away mid-answer
    return got


def test_a_client_that_leaves_mid_stream_frees_its_slot(live, ckpt, tokenizer):
    live.idle()
    steps = live.health()["steps"]
    assert len(stream_then_leave(live)) == 3
    after = live.idle()  # the slot is free again ...
    assert after["steps"] - steps < 100  # ... long before its 400 tokens would have been decoded
    expected = solo(ckpt, tokenizer, "Name a prime.", max_new_tokens=20)[0]
    assert all(chat(live, "Name a prime.", stream=s, max_tokens=20)[0] == expected for s in (False, True))
    # a client that gives up waiting for a whole (unstreamed) answer frees its slot too
    steps = live.health()["steps"]
    with pytest.raises(httpx.ReadTimeout):
        live.http.post("/v1/completions", json={"prompt": "Once", "max_tokens": 400, "ignore_eos": True}, timeout=0.3)
    assert live.idle()["steps"] - steps < 300


# ---------------------------------------------------------------- bad input

BAD = {  # case -> (path, body (a str is sent as is), status, param, words in the message)
    "malformed json": ("/v1/chat/completions", '{"messages": [', 400, None, "not valid JSON"),
    "nan in json": ("/v1/chat/completions", '{"messages": [], "temperature": NaN}', 400, None, "not valid JSON"),
    "body not an object": ("/v1/completions", "[1, 2]", 400, None, "JSON object"),
    "missing messages": ("/v1/chat/completions", {"model": "{m}"}, 400, "messages", "required"),
    "empty messages": ("/v1/chat/completions", {"messages": []}, 400, "messages", "non-empty"),
    "messages not an array": ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "must be an array"),
    "message not an object": ("/v1/chat/completions", {"messages": ["hi"]}, 400, "messages[0]", "object"),
    "unknown role": ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400,
                     "messages[0].role", "role"),
    "content not text": ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400,
                         "messages[0].content", "string"),
    "image content": ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages[0].content", "text"),
    "last message not user": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"},
                                                                    {"role": "assistant", "content": "b"}]},
                              400, "messages", "last message"),
    "empty instruction": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "  "}]}, 400,
                          "messages[0].content", "empty"),
    "missing prompt": ("/v1/completions", {"model": "{m}", "max_tokens": 5}, 400, "prompt", "required"),
    "empty prompt": ("/v1/completions", {"prompt": ""}, 400, "prompt", "empty"),
    "several prompts": ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", "one prompt"),
    "token id out of range": ("/v1/completions", {"prompt": [1, 999999]}, 400, "prompt", "token ids"),
    "unknown model": ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "a"}]},
                      404, "model", "gpt-4"),
    "n above one": ("/v1/completions", {"prompt": "a", "n": 2}, 400, "n", "n=1"),
    "max_tokens zero": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_tokens": 0},
                        400, "max_tokens", "max_tokens"),
    "max_tokens not int": ("/v1/completions", {"prompt": "a", "max_tokens": 2.5}, 400, "max_tokens", "integer"),
    "max_tokens fills the window": ("/v1/completions", {"prompt": "a", "max_tokens": WINDOW}, 400, "max_tokens",
                                    "window"),
    "max_tokens leaves no room for the template": (
        "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_tokens": WINDOW - 5}, 400,
        "max_tokens", "template"),
    "negative temperature": ("/v1/completions", {"prompt": "a", "temperature": -1}, 400, "temperature", "temperature"),
    "temperature a string": ("/v1/completions", {"prompt": "a", "temperature": "hot"}, 400, "temperature", "number"),
    "top_p zero": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_p": 0}, 400,
                   "top_p", "top_p"),
    "top_p above one": ("/v1/completions", {"prompt": "a", "top_p": 1.5}, 400, "top_p", "top_p"),
    "negative top_k": ("/v1/completions", {"prompt": "a", "top_k": -3}, 400, "top_k", "top_k"),
    "seed not int": ("/v1/completions", {"prompt": "a", "seed": "x"}, 400, "seed", "integer"),
    "seed too large": ("/v1/completions", {"prompt": "a", "seed": 2**70}, 400, "seed", "seed"),
    "stop not strings": ("/v1/completions", {"prompt": "a", "stop": [1]}, 400, "stop", "string"),
    "empty stop": ("/v1/completions", {"prompt": "a", "stop": ""}, 400, "stop", "non-empty"),
    "five stops": ("/v1/completions", {"prompt": "a", "stop": list("abcde")}, 400, "stop", "at most 4"),
    "stream not bool": ("/v1/completions", {"prompt": "a", "stream": "yes"}, 400, "stream", "boolean"),
    "logprobs": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "logprobs": True}, 400,
                 "logprobs", "not supported"),
    "unknown route": ("/v1/embeddings", {"input": "a"}, 404, None, "/v1/embeddings"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_its_status_and_a_sentence(live, case):
    path, body, status, param, words = BAD[case]
    if isinstance(body, dict):
        body = json.dumps(body).replace("{m}", live.model)
    r = live.http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"
    assert error["message"].endswith(".")


def test_bad_input_through_the_openai_client_and_the_server_stays_up(live):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        live.client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "a"}])
    with pytest.raises(openai.BadRequestError, match="n=1"):
        live.client.completions.create(model=live.model, prompt="a", n=3)
    assert live.http.get("/v1/chat/completions").status_code == 405
    assert live.health()["status"] == "ok"
    assert live.client.models.list().data[0].id == live.model


# ------------------------------------------------------------------ the load


def test_load_200_requests_from_16_clients(live, ckpt, tokenizer):
    """10% leave mid-stream, 10% are malformed; no 5xx, every answer is its solo answer, and
    the server's memory after the run is within 10% of its memory after a warm-up."""
    instructions = list(PROMPTS)[:8]
    expected = {i: solo(ckpt, tokenizer, i, max_new_tokens=12 + 2 * k)[:2] for k, i in enumerate(instructions)}
    bad = [v for v in BAD.values() if v[2] < 500][:10]

    def one(n):
        if n % 10 == 3:
            path, body, status, _, _ = bad[n // 10 % len(bad)]
            body = body if isinstance(body, str) else json.dumps(body).replace("{m}", live.model)
            return "bad", live.http.post(path, content=body).status_code == status
        if n % 10 == 7:
            return "left", len(stream_then_leave(live, chunks=2)) == 2
        k = n % len(instructions)
        got = chat(live, instructions[k], stream=n % 2 == 0, max_tokens=12 + 2 * k)[:2]
        return "answer", got == expected[instructions[k]]

    def run(count):
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(count), timeout=240))
        assert all(ok for _, ok in results), [r for r in results if not r[1]]
        live.idle()
        return results

    run(32)  # warm-up: every kind of request once, buffers and caches grown
    warm = live.rss()
    results = run(200)
    assert sorted({kind for kind, _ in results}) == ["answer", "bad", "left"]
    assert sum(kind == "left" for kind, _ in results) == 20 and sum(kind == "bad" for kind, _ in results) == 20
    assert abs(live.rss() - warm) <= 0.1 * warm, (live.rss(), warm)
    assert live.health()["status"] == "ok"


# ------------------------------------------- queue, Ctrl-C and the command line


def test_full_queue_is_a_503_and_ctrl_c_ends_streams_with_an_error(ckpt, tmp_path):
    server = Live(ckpt[0], tmp_path, "--max-batch-size", "1", "--max-queue", "1")
    try:
        long = dict(model=server.model, messages=[{"role": "user", "content": "Why is the sky blue?"}],
                    max_tokens=WINDOW // 2, temperature=0, stream=True, extra_body={"ignore_eos": True})
        running = server.client.chat.completions.create(**long)
        chunks = iter(running)
        next(chunks), next(chunks)  # the role, then the first token: it is running
        waiting = server.client.chat.completions.create(**long)
        with pytest.raises(openai.InternalServerError) as e:
            server.client.chat.completions.create(**{**long, "stream": False})
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
        assert "busy" in e.value.message and server.health() | {"steps": 0} == dict(
            status="ok", model=server.model, slots=1, running=1, waiting=1, steps=0)
        server.proc.send_signal(signal.SIGINT)  # Ctrl-C with two requests in flight
        for stream in (running, waiting):
            with pytest.raises(openai.APIError, match="shutting down"):
                list(chunks if stream is running else stream)  # an error event ends the stream, not a hang
        assert server.proc.wait(30) == 130
    finally:
        server.stop()
    log = server.log.read_text()
    assert "Traceback" not in log and "ERROR" not in log


def test_cli_serve_flags_are_checked_before_loading(ckpt, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = [(["--serve", "--model", "/nonexistent", "--port", port], f"127.0.0.1:{port}"),  # before loading
                 (["--serve", "--model", ckpt[0], "--temperature", "0"], "--temperature does not apply to --serve"),
                 (["--model", ckpt[0], "--port", "9000", "Hi."], "--port goes with --serve"),
                 (["--serve", "--model", ckpt[0], "--max-batch-size", "0"], "--max-batch-size"),
                 (["--serve", "--model", ckpt[0], "--port", "70000"], "--port"),
                 (["--serve", "--model", ckpt[0], "Hi."], "exactly one of")]
        for args, needle in cases:
            assert cli_main(*args) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_the_package_ships_the_chat_page(tmp_path):
    """setup.py's package_data: a wheel holds minidolly/static/chat.html, and the page needs
    nothing from the network (no CDN: every byte is in the file)."""
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path,
                    REPO], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("minidolly-*.whl")
    with zipfile.ZipFile(wheel) as z:
        page = z.read("minidolly/static/chat.html").decode()
    assert page == (REPO / "minidolly" / "static" / "chat.html").read_text()
    assert not re.search(r"https?://|//[a-z]|\bsrc=|<link", page)


# ---------------------------------------------------------------- the engine


class Collect:
    """A request's outputs, gathered on the engine thread."""

    def __init__(self):
        self.outputs, self.done = [], threading.Event()

    def __call__(self, output):
        self.outputs.append(output)
        if output.finish_reason is not None:
            self.done.set()

    def result(self, timeout=60):
        assert self.done.wait(timeout)
        last = self.outputs[-1]
        return "".join(o.text for o in self.outputs), last.finish_reason, last.completion_tokens


def run_greedy(engine, jobs):
    """Start `engine`, submit every (instruction, max_new_tokens) of `jobs` greedily, wait for
    them all, close it; returns each request's (text, finish_reason, tokens)."""
    engine.start()
    try:
        collects = [Collect() for _ in jobs]
        for (instruction, n), c in zip(jobs, collects):
            engine.submit(engine.tokenizer.encode(format_prompt(instruction)), SamplingParams(n, temperature=0), c)
        return [c.result() for c in collects]
    finally:
        engine.close()


def test_eager_steps_read_keys_only_up_to_the_furthest_row(ckpt, tokenizer):
    """An eager step reads the next multiple of 16 keys above the furthest row's position (not
    the 256 of a compiled step): the window grows as the rows do, and answers stay solo."""
    _, model = ckpt
    engine = Engine(model, tokenizer, max_batch_size=2, max_queue=4)
    seen, real_step = [], engine._step

    def step(model, cache, tokens, positions):
        seen.append((cache.max_length, int(positions.max())))
        return real_step(model, cache, tokens, positions)

    engine._step = step
    jobs = [("Explain gravity.", 80), ("Tell me a story.", 40)]
    results = run_greedy(engine, jobs)
    assert all(window == (furthest // 16 + 1) * 16 for window, furthest in seen)
    assert {32, 48, 64, 80} <= {window for window, _ in seen}
    assert results == [solo(ckpt, tokenizer, i, max_new_tokens=n) for i, n in jobs]


def test_engine_joins_one_prefill_between_steps_and_gives_solo_answers(ckpt, tokenizer, monkeypatch):
    """Five requests through three slots: a newcomer is prefilled between two decode steps,
    never two prefills in a row while others run, a request leaves the step right after its
    last token, and every request gets what generate() gives it alone."""
    _, model = ckpt
    events, real_prefill = [], engine_module.prefill
    monkeypatch.setattr(engine_module, "prefill", lambda *a, **k: events.append("prefill") or real_prefill(*a, **k))
    engine = Engine(model, tokenizer, max_batch_size=3, max_queue=8)
    real_step = engine._step
    windows = set()

    def step(m, cache, tokens, positions):
        windows.add(cache.max_length)
        # a running row is never at position 0 (its prompt is there); a free slot always is
        events.append(int((positions > 0).sum()))
        return real_step(m, cache, tokens, positions)

    engine._step = step
    jobs = [("Explain gravity.", 30), ("Write a haiku about rain.", 20), ("Name a prime.", 8),
            ("Summarize the passage.", 25), ("Tell me a story.", 12)]
    results = run_greedy(engine, jobs)
    assert results == [solo(ckpt, tokenizer, i, max_new_tokens=n) for i, n in jobs]
    assert events.count("prefill") == 5 and events[0] == "prefill"
    assert all(not (a == b == "prefill") for a, b in zip(events, events[1:]))
    assert max(e for e in events if e != "prefill") == 3  # three slots, all busy at once
    assert max(windows) < 512  # a step reads the keys in use, not the whole 512-position cache
    # the decode steps each request took part in: one fewer than its tokens
    assert sum(e for e in events if e != "prefill") == sum(r[2] - 1 for r in results)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_engine_serves_a_quantized_model_with_solo_answers(ckpt, tokenizer, quantize):
    """`generate.py --serve --quantize`: the batched step runs the quantized linears as the
    solo decode does, so two requests batched together each get generate()'s answer."""
    model = load_model(ckpt[0], quantize=quantize)
    jobs = [("Explain gravity.", 10), ("Name a prime.", 6)]
    engine = Engine(model, tokenizer, max_batch_size=2).start()
    try:
        collects = [Collect() for _ in jobs]
        for (instruction, n), c in zip(jobs, collects):
            engine.submit(tokenizer.encode(format_prompt(instruction)), SamplingParams(n, temperature=0), c)
        results = [c.result()[0] for c in collects]
    finally:
        engine.close()
    assert results == [generate(model, tokenizer, i, temperature=0, max_new_tokens=n) for i, n in jobs]


def test_engine_cancel_frees_the_slot_at_the_next_step(ckpt, tokenizer):
    _, model = ckpt
    engine = Engine(model, tokenizer, max_batch_size=1, max_queue=2).start()
    try:
        prompt = tokenizer.encode(format_prompt("Why is the sky blue?"))
        long = SamplingParams(300, temperature=0, ignore_eos=True)
        running, waiting, after = Collect(), Collect(), Collect()

        def cancel_at_third(output):  # on the engine thread, between two steps
            running(output)
            if output.completion_tokens == 3:
                engine.cancel(request)

        request = engine.submit(prompt, long, cancel_at_third)
        queued = engine.submit(prompt, long, waiting)
        engine.cancel(queued)  # a waiting request leaves the queue without a prefill
        engine.submit(tokenizer.encode(format_prompt("Name a prime.")), SamplingParams(8, temperature=0), after)
        assert running.result()[1:] == ("cancelled", 3)  # no step ran for it after the cancel
        assert waiting.result() == ("", "cancelled", 0)
        assert after.result() == solo(ckpt, tokenizer, "Name a prime.", max_new_tokens=8)
    finally:
        engine.close()


def test_engine_queue_bound_and_shutdown(ckpt, tokenizer):
    _, model = ckpt
    engine = Engine(model, tokenizer, max_batch_size=1, max_queue=1)
    prompt, long = tokenizer.encode(format_prompt("Hi.")), SamplingParams(400, temperature=0, ignore_eos=True)
    with pytest.raises(EngineClosedError):
        engine.submit(prompt, long, Collect())
    engine.start()
    a, b = Collect(), Collect()
    engine.submit(prompt, long, a)
    engine.submit(prompt, long, b)
    with pytest.raises(QueueFullError, match="1 slots are busy and 1 requests are waiting"):
        engine.submit(prompt, long, Collect())
    with pytest.raises(ValueError, match="top_p"):
        engine.submit(prompt, SamplingParams(5, top_p=0), Collect())
    with pytest.raises(ValueError, match="window"):
        engine.submit(prompt, SamplingParams(WINDOW), Collect())
    engine.close()
    assert a.result()[1] == b.result()[1] == "shutdown"
    assert "shutting down" in a.outputs[-1].error
    with pytest.raises(EngineClosedError, match="shutting down"):
        engine.submit(prompt, long, Collect())


def test_engine_reads_the_device_once_per_step(tokenizer, meta_reads):
    """An engine over a meta model, where any host read of a tensor raises and only .tolist()
    answers (with made-up tokens; conftest.py), proves that a prefill or a decode step reads
    the device once: the new tokens."""
    from minidolly import GPTNeoX, ModelConfig

    with torch.device("meta"):
        model = GPTNeoX(ModelConfig(vocab_size=50280, hidden_size=64, num_layers=2, num_heads=4,
                                    intermediate_size=256, max_position_embeddings=64))
    engine = Engine(model, tokenizer, max_batch_size=3, max_queue=4)
    steps = []
    real_step = engine._step
    engine._step = lambda *a: steps.append(1) or real_step(*a)
    engine.start()
    try:
        # greedy rows: a meta device has no generators (test_generate reads the sampling filters)
        collects = [Collect() for _ in range(4)]
        for n, c in enumerate(collects):
            engine.submit([1, 2, 3 + n], SamplingParams(6 - n, temperature=0), c)
        assert [c.result()[1:] for c in collects] == [("length", 6), ("length", 5), ("length", 4), ("length", 3)]
    finally:
        engine.close()
    assert len(meta_reads) == len(steps) + 4  # one read per decode step and per prefill


def test_stop_strings_are_found_across_pieces():
    s = StopStrings(("END", "xyz"))
    assert s.feed("abc E") == ("abc ", False)  # "E" may start "END": held back
    assert s.feed("N") == ("", False)
    assert s.feed("Dless") == ("", True)  # found; nothing after it passes
    s = StopStrings(("END",))
    assert s.feed("EN") == ("", False) and s.feed("E") == ("EN", False) and s.flush() == "E"
    assert StopStrings(()).feed("anything") == ("anything", False)


# ------------------------------------------------------------- the chat page


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium from Debian (chromium, chromium-driver; .ci/run installs them)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)
    b = webdriver.Chrome(service=Service(driver), options=options)
    yield b
    b.quit()


def test_chat_page_streams_the_api_answer_and_stops(live, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60, poll_frequency=0.02)
    browser.get(live.url + "/")
    wait.until(lambda b: b.find_element(By.ID, "model").text == live.model)

    def set_field(name, value):
        browser.execute_script("document.getElementById(arguments[0]).value = arguments[1]", name, value)

    def ask(instruction):
        browser.find_element(By.ID, "instruction").send_keys(instruction)
        browser.find_element(By.ID, "send").click()
        return wait.until(lambda b: (b.find_elements(By.CSS_SELECTOR, ".msg.assistant") or [None])[-1])

    def text_of(answer):
        return browser.execute_script("return arguments[0].querySelector('.text').textContent", answer)

    set_field("temperature", "0")
    set_field("max-tokens", "60")
    answer = ask("Write a haiku about rain.")
    wait.until(lambda b: answer.get_attribute("data-state") == "done")
    expected = chat(live, "Write a haiku about rain.", max_tokens=60, top_p=0.92)[0]
    assert text_of(answer) == expected and int(answer.get_attribute("data-chunks")) > 2  # streamed

    browser.find_element(By.ID, "clear").click()  # a new conversation: no earlier turns in the prompt
    set_field("max-tokens", "250")
    answer = ask("Why is the sky blue?")
    wait.until(lambda b: len(text_of(answer)) > 5)
    browser.find_element(By.ID, "stop").click()
    wait.until(lambda b: answer.get_attribute("data-state") == "stopped")
    shown = text_of(answer)
    time.sleep(0.3)
    assert text_of(answer) == shown  # the stream ended
    full = chat(live, "Why is the sky blue?", max_tokens=250, top_p=0.92)[0]
    assert full.startswith(shown) and len(shown) < len(full)
    live.idle()  # and the server freed the slot

    set_field("max-tokens", "0")  # the server says why it refuses, and the page shows it
    ask("Hello?")
    error = wait.until(lambda b: b.find_element(By.ID, "error").text)
    assert "max_tokens must be an integer >= 1" in error


def test_engine_compiled_step_is_one_graph_on_cpu(ckpt, tokenizer, monkeypatch):
    """compile=True: every step decodes all slots through compiled_decode_step, whose graph is
    traced once and then reused, step after step, whoever joins or leaves; on CPU the window of
    keys it reads grows in steps of 16 (a dynamic size of that one graph), on CUDA it would be a
    graph per power of two. The answers are eager's. (A backend that records the graphs stands
    in for inductor: tracing and recompiles are the point.)"""
    graphs, real_compile = [], torch.compile

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(sys.modules["minidolly.generate"], "_compiled_steps", {})
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "options": None, "backend": record}))
    _, model = ckpt
    engine = Engine(model, tokenizer, max_batch_size=3, max_queue=8, compile=True).start()
    try:
        jobs = [("Explain gravity.", 30), ("Write a haiku about rain.", 20), ("Tell me a story.", 12)]
        collects = [Collect() for _ in jobs]
        for (instruction, n), c in zip(jobs, collects):
            engine.submit(tokenizer.encode(format_prompt(instruction)), SamplingParams(n, temperature=0), c)
        results = [c.result() for c in collects]
        assert len(graphs) == 1
        long = Collect()  # runs past position 256: more windows, the same graph
        engine.submit(tokenizer.encode(format_prompt("Name a prime.")), SamplingParams(300, temperature=0,
                                                                                       ignore_eos=True), long)
        assert long.result()[1:] == ("length", 300)
    finally:
        engine.close()
    assert results == [solo(ckpt, tokenizer, i, max_new_tokens=n) for i, n in jobs]
    assert len(graphs) == 1


# ----------------------------------------------------------------- on a GPU


@pytest.mark.cuda
def test_cuda_engine_compiled_equals_eager_with_cuda_graphs_and_one_sync_per_step(ckpt, tokenizer):
    """For the GPU owner: the engine on CUDA, compiled (a CUDA graph per window, replayed at
    every step whoever joins or leaves) gives eager's tokens; no CUDA graph is skipped; and the
    host waits for the device at most once per step and per prefill."""
    import warnings

    from torch._dynamo.utils import counters

    model = load_model(ckpt[0], device="cuda")  # fp32: the compiled step holds to eager token for token
    jobs = [("Explain gravity.", 30), ("Write a haiku about rain.", 40), ("Name a prime.", 24),
            ("Tell me a story.", 50), ("Why is the sky blue?", 60)]

    def run(compile):
        engine = Engine(model, tokenizer, max_batch_size=3, max_queue=8, compile=compile).start()
        try:
            collects = [Collect() for _ in jobs]
            for (instruction, n), c in zip(jobs, collects):
                engine.submit(tokenizer.encode(format_prompt(instruction)), SamplingParams(n, temperature=0), c)
            return [c.result() for c in collects], engine.steps
        finally:
            engine.close()

    skips = counters["inductor"]["cudagraph_skips"]
    compiled, _ = run(True)
    assert compiled == run(False)[0]
    assert counters["inductor"]["cudagraph_skips"] == skips
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, steps = run(True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= steps + len(jobs), syncs
