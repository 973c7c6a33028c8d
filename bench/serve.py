"""Serving speed: the continuous-batching server against the same server one request at a time.

    python bench/serve.py                                  # 160m shape, fp32, CPU, 1/4/8/16 clients
    python bench/serve.py --threads 1                      # one torch thread per server (a small shared machine)
    python bench/serve.py --clients 1 8 --requests-per-client 1 --max-tokens 32 --size 14m   # a smoke test

Both servers are `generate.py --serve` processes on a random-weight checkpoint in a Pythia
shape: "batched" with --max-batch-size = the most clients, "one at a time" with
--max-batch-size 1, which serves requests in arrival order, each alone: what a transformers
pipeline behind a web framework does. Both run throughout; each client count is measured on
one and then the other, so a ratio compares neighbouring runs. Each of C clients sends --requests-per-client chat
requests back to back, streamed, greedy, exactly --max-tokens new tokens each (ignore_eos),
instructions from the real dolly-15k records in ../shared/data. The clients start spread
evenly over the time one request takes alone, as a closed loop of clients settles (a burst of
C requests in the same millisecond would make the last one wait C prefills, whatever the server).
Each client sends 4 requests by default: the batch fills while the clients start and drains
while they finish, so with fewer requests those ramps (about one solo request's time at each
end) would weigh on the aggregate figure, which is meant to be the load the server sustains.

Per row: aggregate tokens/s (all new tokens / wall time), time to first token (TTFT: request
sent -> first text) and inter-token latency (ITL: gaps between streamed pieces), p50 and p95
over all requests. The targets: throughput at 8 clients >= 4x one-at-a-time's, and p95 TTFT at
8 clients <= 2 x the one-client p95 plus one prefill (a prefill of the median prompt, timed
in this process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minidolly import load_model, load_tokenizer, save_model  # noqa: E402
from minidolly.config import ModelConfig  # noqa: E402
from minidolly.generate import prefill  # noqa: E402
from minidolly.model import GPTNeoX, KVCache  # noqa: E402
from minidolly.prompt import format_prompt  # noqa: E402

DATA = pathlib.Path(os.environ.get("MINIDOLLY_SHARED_DATA", REPO.parent / "shared" / "data"))


def make_checkpoint(size: str, directory: pathlib.Path) -> None:
    """A random-weight checkpoint of `size` with the real GPT-NeoX tokenizer (speed does not
    depend on the values)."""
    torch.manual_seed(0)
    save_model(GPTNeoX(ModelConfig.from_size(size)), str(directory))
    shutil.copy(DATA / "gpt-neox-20b-tokenizer.json", directory / "tokenizer.json")


def instructions(count: int) -> list[str]:
    with open(DATA / "databricks-dolly-15k.head789.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return [r["instruction"] for r in records if not r["context"]][:count]


def prefill_seconds(model_dir: pathlib.Path, prompts: list[str]) -> float:
    """The median time of one prefill of the median-length prompt, loaded and run on a thread
    of its own, as the server's engine thread runs it (with several torch threads, OpenMP
    teams of two OS threads slow each other down, so the main thread's time would differ)."""
    times = []

    def run():
        model, tokenizer = load_model(str(model_dir)), load_tokenizer(str(model_dir))
        ids = sorted((tokenizer.encode(format_prompt(p)) for p in prompts), key=len)[len(prompts) // 2]
        cache = KVCache(model.config, 1, len(ids))
        for _ in range(6):
            start = time.perf_counter()
            prefill(model, cache, [ids])
            times.append(time.perf_counter() - start)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return statistics.median(times[1:])


class Server:
    """A `generate.py --serve` process on a free port."""

    def __init__(self, model_dir: pathlib.Path, max_batch_size: int, max_queue: int, threads: int | None):
        self.err = tempfile.TemporaryFile("w+")
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "generate.py"), "--serve", "--model", str(model_dir), "--port", "0",
             "--dtype", "float32", "--device", "cpu", "--max-batch-size", str(max_batch_size),
             "--max-queue", str(max_queue)], stdout=subprocess.DEVNULL, stderr=self.err, env=env)
        deadline = time.monotonic() + 300
        while True:
            self.err.seek(0)
            if m := re.search(r" on (http://\S+) ", self.err.read()):
                self.url = m.group(1)
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.err.seek(0)
                sys.exit(f"error: the server did not start:\n{self.err.read()}")
            time.sleep(0.1)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(60)


async def one_request(http, url: str, instruction: str, max_tokens: int) -> dict:
    """A streamed greedy chat request; returns its TTFT, piece times and token count."""
    body = {"messages": [{"role": "user", "content": instruction}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    start, times, tokens = time.perf_counter(), [], None
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    return {"ttft": times[0] - start, "gaps": [b - a for a, b in zip(times, times[1:])], "tokens": tokens,
            "end": times[-1], "seconds": times[-1] - start}


async def run_clients(url: str, clients: int, per_client: int, prompts: list[str], max_tokens: int,
                      spread: float) -> dict:
    """`clients` clients, client i starting at i * spread / clients, each sending its requests
    back to back. Returns tokens/s and the TTFT and ITL percentiles."""
    import httpx

    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=clients + 4)) as http:
        async def client(i: int) -> list[dict]:
            await asyncio.sleep(i * spread / clients)
            return [await one_request(http, url, prompts[(i * per_client + j) % len(prompts)], max_tokens)
                    for j in range(per_client)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(i) for i in range(clients))) for r in rs]
    wall = max(r["end"] for r in results) - start
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    return {"tok/s": sum(r["tokens"] for r in results) / wall, "ttft": pct(ttft), "itl": pct(gaps),
            "seconds": statistics.median(r["seconds"] for r in results), "tokens": sum(r["tokens"] for r in results), "requests": len(results)}


def pct(values: list[float]) -> tuple[float, float]:
    """(p50, p95) in milliseconds."""
    q = statistics.quantiles(values, n=20, method="inclusive") if len(values) > 1 else values * 19
    return statistics.median(values) * 1e3, q[18] * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="160m", help="Pythia shape of the random-weight model (default 160m)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the servers (OMP_NUM_THREADS) and of the prefill timing (default: torch's); "
                        "on a small machine shared with the clients, 1 leaves them a core")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if 8 in args.clients and 1 not in args.clients:
        sys.exit("error: the 8-client targets compare with the one-client run; keep 1 in --clients.")
    clients = sorted(set(args.clients))
    prompts = instructions(max(clients) * args.requests_per_client)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = pathlib.Path(tmp)
        make_checkpoint(args.size, model_dir)
        one_prefill = prefill_seconds(model_dir, prompts)
        print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"torch threads {torch.get_num_threads()}; pythia-{args.size} shape, float32, CPU; "
              f"{args.requests_per_client} streamed greedy requests per client, {args.max_tokens} new tokens each; "
              f"one prefill of the median prompt {one_prefill * 1e3:.0f} ms")
        print(f"{'clients':>7}  {'server':<14}{'tok/s':>8}{'TTFT p50':>10}{'p95 ms':>8}{'ITL p50':>9}{'p95 ms':>8}"
              f"{'tok/s ratio':>13}")
        rows, spread = {}, 0.0
        # Both servers run side by side (idle when not measured) and each client count runs on one,
        # then the other, so the ratio compares runs minutes apart at most, not the whole bench.
        servers = {}
        try:
            for name, slots in [("one at a time", 1), ("batched", max(clients))]:
                servers[name] = Server(model_dir, slots, max(clients) * args.requests_per_client, args.threads)
                asyncio.run(run_clients(servers[name].url, 1, 1, prompts, 8, 0))  # warm-up
            for c in clients:
                for name, server in servers.items():
                    r = asyncio.run(run_clients(server.url, c, args.requests_per_client, prompts, args.max_tokens,
                                                spread))
                    # one request alone, one at a time: the time over which later clients' starts are spread
                    spread = spread or r["seconds"]
                    rows[name, c] = r
                    ratio = f"{r['tok/s'] / rows['one at a time', c]['tok/s']:>12.2f}x"
                    print(f"{c:>7}  {name:<14}{r['tok/s']:>8.1f}{r['ttft'][0]:>10.0f}{r['ttft'][1]:>8.0f}"
                          f"{r['itl'][0]:>9.0f}{r['itl'][1]:>8.0f}{ratio}", flush=True)
        finally:
            for server in servers.values():
                server.stop()
    if 8 in clients:
        ratio = rows["batched", 8]["tok/s"] / rows["one at a time", 8]["tok/s"]
        print(f"target: tokens/s at 8 clients >= 4x one at a time: {'met' if ratio >= 4 else 'NOT met'} ({ratio:.2f}x)")
        limit = 2 * rows["batched", 1]["ttft"][1] + one_prefill * 1e3
        got = rows["batched", 8]["ttft"][1]
        print(f"target: p95 TTFT at 8 clients <= 2 x one client's + one prefill = {limit:.0f} ms: "
              f"{'met' if got <= limit else 'NOT met'} ({got:.0f} ms)")


if __name__ == "__main__":
    main()
