"""Checkpoint loading: minidolly.load_model vs transformers' from_pretrained, same file, same run.

    python bench/load.py [--size 410m] [--dtype float32] [--repeats 3]

Writes a random-weight checkpoint of the given Pythia shape (safetensors, as HF saves it), then
loads it in fresh subprocesses, one loader at a time, and prints for each: seconds to load,
seconds to load and run a first forward (which touches every weight: a memory-mapped load
that has not read the file yet is not finished), and the peak resident memory above the
process's baseline after imports, next to the file size. Each timing is the best of --repeats
runs, so the page cache is warm for both loaders.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time, torch
def hwm():  # peak resident bytes of this process (VmHWM; ru_maxrss would inherit the parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
which, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
torch.set_num_threads(max(1, torch.get_num_threads()))
if which == "minidolly":
    from minidolly import load_model
    load = lambda: load_model(path, dtype=dtype)
else:
    from transformers import GPTNeoXForCausalLM
    load = lambda: GPTNeoXForCausalLM.from_pretrained(path, dtype=dtype).eval()
base = hwm()
t0 = time.perf_counter()
model = load()
t1 = time.perf_counter()
with torch.inference_mode():
    model(torch.tensor([[12092, 1533]]))
t2 = time.perf_counter()
peak = hwm()
print(json.dumps({"load_s": t1 - t0, "load_forward_s": t2 - t0, "peak_above_base": peak - base, "peak": peak}))
"""


def measure(which: str, path: str, dtype: str, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", CHILD, which, path, dtype], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{which} failed:\n{out.stderr}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: min(r[k] for r in runs) for k in runs[0]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="410m")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import torch

    from minidolly import GPTNeoX, ModelConfig, save_model

    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        model = GPTNeoX(ModelConfig.from_size(args.size)).to(getattr(torch, args.dtype))
        save_model(model, d)
        del model
        size = os.path.getsize(os.path.join(d, "model.safetensors"))
        rows = {w: measure(w, d, args.dtype, args.repeats) for w in ("minidolly", "transformers")}

    gib = 2**30
    print(f"pythia-{args.size} shape, {args.dtype}, file {size / gib:.2f} GiB, best of {args.repeats}, CPU")
    print(f"{'loader':<13} {'load s':>8} {'load+fwd s':>11} {'peak RSS above base':>20} {'/ file':>7}")
    for w, r in rows.items():
        print(f"{w:<13} {r['load_s']:>8.3f} {r['load_forward_s']:>11.3f} "
              f"{r['peak_above_base'] / gib:>16.2f} GiB {r['peak_above_base'] / size:>7.2f}")
    m, t = rows["minidolly"], rows["transformers"]
    print(f"speed-up (transformers / minidolly): load {t['load_s'] / m['load_s']:.1f}x, "
          f"load+forward {t['load_forward_s'] / m['load_forward_s']:.1f}x")


if __name__ == "__main__":
    main()
