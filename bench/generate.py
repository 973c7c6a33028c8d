"""Decode speed: minidolly's generate loop vs transformers' generate, same weights, same prompt.

    python bench/generate.py                     # pythia-160m and 410m shapes, fp32 and bf16
    python bench/generate.py --sizes 160m --dtypes float32 --repeats 5 --threads 1

Random weights in Pythia shapes (speed does not depend on the values), a 32-token prompt,
128 new tokens, greedy, batch 1, on CPU. Both sides run in this process, alternately
(ours, transformers, a GEMV probe, again), and every decode step is timed (transformers'
through a StoppingCriteria, called once per step), so tokens/s is 1 / the median step time:
robust to other processes sharing the cores, which on a small shared machine otherwise
decide the result. "weights GB/s" is the bytes of weights one decode step reads times
tokens/s; "GEMV GB/s" is torch.mv on a 256 MiB fp32 / 128 MiB bf16 matrix (far past any
cache) measured between those runs: the bandwidth a decode step can at best reach.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minidolly.checkpoint import IGNORED_SUFFIXES, our_key  # noqa: E402
from minidolly.config import ModelConfig  # noqa: E402
from minidolly.generate import decode  # noqa: E402
from minidolly.model import GPTNeoX  # noqa: E402

PROMPT_TOKENS, NEW_TOKENS = 32, 128


def gemv_seconds(W, x, repeats=5) -> list[float]:
    """Times of torch.mv(W, x)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mv(W, x)
        times.append(time.perf_counter() - start)
    return times


def build(size: str, dtype: torch.dtype):
    """A transformers GPTNeoXForCausalLM in a Pythia shape and our GPTNeoX sharing its weights."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = ModelConfig.from_size(size)
    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(**{k: v for k, v in cfg.to_hf().items() if k != "architectures"}))
    hf = hf.to(dtype).eval()
    with torch.device("meta"):
        ours = GPTNeoX(cfg)
    # transformers 5 calls embed_out "lm_head" in memory (its files still say embed_out)
    state = {our_key(k).replace("lm_head.", "embed_out."): v for k, v in hf.state_dict().items()
             if not k.endswith(IGNORED_SUFFIXES)}
    ours.load_state_dict(state, strict=True, assign=True)
    return hf, ours.eval()


def weight_bytes_per_token(model: GPTNeoX) -> int:
    """Bytes of parameters one decode step reads: all of them but embed_in, of which it reads one row."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("embed_in"))


def step_times_ours(model, prompt, n, compile=False) -> list[float]:
    """Seconds of each decode step of our loop (the first, which includes the prefill, dropped)."""
    steps = decode(model, [prompt], max_new_tokens=n, temperature=0, compile=compile)  # no stop ids: n steps
    stamps = [time.perf_counter() for _ in steps]
    return [b - a for a, b in zip(stamps, stamps[1:])]


@torch.inference_mode()
def step_times_hf(hf, prompt, n) -> list[float]:
    """Seconds of each decode step of transformers' generate, stamped by a StoppingCriteria."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                      pad_token_id=0, stopping_criteria=StoppingCriteriaList([Stamp()]))
    assert out.shape[1] == len(prompt) + n
    return [b - a for a, b in zip(stamps, stamps[1:])]


def median(xs):
    return sorted(xs)[len(xs) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["160m", "410m"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    p.add_argument("--compile", action="store_true", help="also time our loop with the decode step compiled")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"prompt {PROMPT_TOKENS} tokens, {NEW_TOKENS} new tokens, greedy, batch 1, CPU, {args.repeats} repeats")
    print(f"{'model':<13}{'dtype':<10}{'HF tok/s':>9}{'ours tok/s':>11}{'ratio':>7}{'weights GB/s':>13}"
          f"{'GEMV GB/s':>10}{'of GEMV':>8}" + (f"{'compiled tok/s':>15}{'ratio':>7}{'compile s':>10}" if args.compile else ""))
    for size in args.sizes:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            hf, ours = build(size, dtype)
            W, x = torch.randn(8192, 8192).to(dtype), torch.randn(8192).to(dtype)
            prompt = torch.randint(0, 50000, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()
            step_times_ours(ours, prompt, 4), step_times_hf(hf, prompt, 4), gemv_seconds(W, x)  # warm up
            if args.compile:
                start = time.perf_counter()
                step_times_ours(ours, prompt, 4, compile=True)
                compile_seconds = time.perf_counter() - start
            t_ours, t_hf, t_gemv, t_compiled = [], [], [], []
            for _ in range(args.repeats):
                t_ours += step_times_ours(ours, prompt, NEW_TOKENS)
                if args.compile:
                    t_compiled += step_times_ours(ours, prompt, NEW_TOKENS, compile=True)
                t_gemv += gemv_seconds(W, x)
                t_hf += step_times_hf(hf, prompt, NEW_TOKENS)
                t_gemv += gemv_seconds(W, x)
            ours_rate, hf_rate = 1 / median(t_ours), 1 / median(t_hf)
            bw = weight_bytes_per_token(ours) * ours_rate / 1e9
            gemv = W.numel() * W.element_size() / median(t_gemv) / 1e9
            print(f"{'pythia-' + size:<13}{dtype_name:<10}{hf_rate:>9.1f}{ours_rate:>11.1f}{ours_rate / hf_rate:>6.2f}x"
                  f"{bw:>13.1f}{gemv:>10.1f}{bw / gemv:>8.0%}", end="")
            if args.compile:
                rate = 1 / median(t_compiled)
                print(f"{rate:>15.1f}{rate / hf_rate:>6.2f}x{compile_seconds:>10.0f}", end="")
            print(flush=True)
            del hf, ours, W, x


if __name__ == "__main__":
    main()
