"""Decode speed: minidolly's generate loop, eager and compiled, vs transformers' generate.

    python bench/generate.py                     # CPU: pythia-160m and 410m shapes, fp32 and bf16
    python bench/generate.py --sizes 160m --dtypes float32 --repeats 5 --threads 1
    python bench/generate.py --device cuda       # GPU: dolly-v2-3b (pythia-2.8b) shape, bf16

Random weights in Pythia shapes (speed does not depend on the values), a 32-token prompt,
128 new tokens, greedy, batch 1. Three rows per model: transformers' generate, our loop
eager, our loop with compile=True (the static decode step through torch.compile: inductor's
C++ on CPU, CUDA graphs on a GPU; its compile time is shown, paid once). All run in this
process, alternately (compiled, eager, a bandwidth probe, transformers, the probe, again),
and every decode step is timed (transformers' through a StoppingCriteria, called once per
step), so tokens/s is 1 / the median step time: robust to other processes sharing the cores.

"weights GB/s" is the bytes of weights one decode step reads times tokens/s; at batch 1 a
decode step is a chain of matrix-vector products, so this is the figure that counts.
"probe GB/s" is what the memory can deliver, measured between the runs: on CPU torch.mv on a
256 MiB fp32 / 128 MiB bf16 matrix (far past any cache), on CUDA a 1 GiB device-to-device
copy (bytes read + written). The GPU target: compiled decode of the 2.8b shape in bf16 at
>= 70% of the copy bandwidth.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minidolly.checkpoint import IGNORED_SUFFIXES, our_key  # noqa: E402
from minidolly.config import ModelConfig  # noqa: E402
from minidolly.generate import decode  # noqa: E402
from minidolly.model import GPTNeoX  # noqa: E402

PROMPT_TOKENS = 32
GPU_TARGET = 0.70  # compiled decode's weight bandwidth / copy bandwidth


def build(size: str, dtype: torch.dtype, device: str):
    """A transformers GPTNeoXForCausalLM in a Pythia shape and our GPTNeoX sharing its weights,
    made directly on `device` in `dtype` (a 2.8b model never passes through fp32 on the host)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = ModelConfig.from_size(size)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = GPTNeoXForCausalLM(GPTNeoXConfig(**{k: v for k, v in cfg.to_hf().items() if k != "architectures"}))
    finally:
        torch.set_default_dtype(default)
    hf = hf.to(dtype).eval()
    with torch.device("meta"):
        ours = GPTNeoX(cfg, use_kernels=False)
    # transformers 5 calls embed_out "lm_head" in memory (its files still say embed_out)
    state = {our_key(k).replace("lm_head.", "embed_out."): v for k, v in hf.state_dict().items()
             if not k.endswith(IGNORED_SUFFIXES)}
    ours.load_state_dict(state, strict=True, assign=True)
    return hf, ours.eval()


def weight_bytes_per_token(model: GPTNeoX) -> int:
    """Bytes of parameters one decode step reads: all of them but embed_in, of which it reads one row."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("embed_in"))


class Probe:
    """The memory bandwidth a decode step can at best reach, in GB/s per call of `seconds`."""

    def __init__(self, device: str, dtype: torch.dtype):
        self.device = device
        if device == "cuda":
            self.src = torch.empty(2**30, dtype=torch.uint8, device=device)
            self.dst = torch.empty_like(self.src)
            self.bytes = 2 * self.src.numel()  # read and written
        else:
            self.W, self.x = torch.randn(8192, 8192).to(dtype), torch.randn(8192).to(dtype)
            self.bytes = self.W.numel() * self.W.element_size()

    def seconds(self, repeats=5) -> list[float]:
        times = []
        for _ in range(repeats):
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self.dst.copy_(self.src)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                start = time.perf_counter()
                torch.mv(self.W, self.x)
                times.append(time.perf_counter() - start)
        return times


def step_times_ours(model, prompt, n, compile=False) -> list[float]:
    """Seconds of each decode step of our loop (the first, which includes the prefill, dropped).
    Each step ends with the token read (a host sync), so the host's clock times the device."""
    steps = decode(model, [prompt], max_new_tokens=n, temperature=0, compile=compile)  # no stop ids: n steps
    stamps = [time.perf_counter() for _ in steps]
    return [b - a for a, b in zip(stamps, stamps[1:])]


@torch.inference_mode()
def step_times_hf(hf, prompt, n) -> list[float]:
    """Seconds of each decode step of transformers' generate, stamped by a StoppingCriteria
    (its loop reads a flag from the device every step, so the stamps time the device too)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    ids = torch.tensor([prompt], device=hf.device)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                      pad_token_id=0, stopping_criteria=StoppingCriteriaList([Stamp()]))
    assert out.shape[1] == len(prompt) + n
    return [b - a for a, b in zip(stamps, stamps[1:])]


def median(xs):
    return sorted(xs)[len(xs) // 2]


def describe(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--sizes", nargs="+", default=None,
                   help="Pythia/Dolly sizes (default: 160m 410m on CPU, dolly-v2-3b on CUDA)")
    p.add_argument("--dtypes", nargs="+", default=None, help="default: float32 bfloat16 on CPU, bfloat16 on CUDA")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch threads for every row (default: torch's)")
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled row (and its compile time)")
    p.add_argument("--no-hf", action="store_true", help="leave out transformers")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but torch sees no CUDA GPU.")
    sizes = args.sizes or (["dolly-v2-3b"] if args.device == "cuda" else ["160m", "410m"])
    dtypes = args.dtypes or (["bfloat16"] if args.device == "cuda" else ["float32", "bfloat16"])
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    n = args.new_tokens
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {describe(args.device)}; prompt "
          f"{PROMPT_TOKENS} tokens, {n} new tokens, greedy, batch 1, {args.repeats} repeats; "
          f"probe: {'1 GiB copy' if args.device == 'cuda' else 'torch.mv'}")
    print(f"{'model':<13}{'dtype':<10}{'loop':<20}{'tok/s':>8}{'vs HF':>7}{'vs eager':>9}{'weights GB/s':>13}"
          f"{'probe GB/s':>11}{'of probe':>9}{'compile s':>10}")
    for size in sizes:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            hf, ours = build(size, dtype, args.device)
            probe = Probe(args.device, dtype)
            prompt = torch.randint(0, 50000, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()
            step_times_ours(ours, prompt, 4), probe.seconds()  # warm up
            if not args.no_hf:
                step_times_hf(hf, prompt, 4)
            compile_seconds = None
            if not args.no_compile:
                start = time.perf_counter()
                step_times_ours(ours, prompt, 4, compile=True)  # compiles (and on CUDA records the graph)
                compile_seconds = time.perf_counter() - start
                step_times_ours(ours, prompt, 4, compile=True)
            times = {"transformers": [], "minidolly": [], "minidolly compiled": []}
            t_probe = []
            for _ in range(args.repeats):
                if not args.no_compile:
                    times["minidolly compiled"] += step_times_ours(ours, prompt, n, compile=True)
                times["minidolly"] += step_times_ours(ours, prompt, n)
                t_probe += probe.seconds()
                if not args.no_hf:
                    times["transformers"] += step_times_hf(hf, prompt, n)
                t_probe += probe.seconds()
            probe_bw = probe.bytes / median(t_probe) / 1e9
            eager_rate = 1 / median(times["minidolly"])
            for loop, t in times.items():
                if not t:
                    continue
                rate = 1 / median(t)
                bw = weight_bytes_per_token(ours) * rate / 1e9
                cs = f"{compile_seconds:>10.0f}" if loop == "minidolly compiled" else ""
                vs_hf = f"{rate * median(times['transformers']):>6.2f}x" if times["transformers"] else f"{'-':>7}"
                print(f"{'pythia-' + size if size[0].isdigit() else size:<13}{dtype_name:<10}{loop:<20}{rate:>8.1f}"
                      f"{vs_hf}{rate / eager_rate:>8.2f}x{bw:>13.1f}{probe_bw:>11.1f}{bw / probe_bw:>9.0%}{cs}", flush=True)
                if args.device == "cuda" and loop == "minidolly compiled":
                    verdict = "met" if bw / probe_bw >= GPU_TARGET else "NOT met"
                    print(f"target: compiled decode >= {GPU_TARGET:.0%} of the copy bandwidth: {verdict} "
                          f"({bw / probe_bw:.0%})", flush=True)
            del hf, ours, probe


if __name__ == "__main__":
    main()
