"""Decode speed at every weight width: minidolly vs transformers vs llama.cpp, on one checkpoint.

    python bench/generate.py                          # CPU: 160m 410m 1.4b, every row, ~60 min on 2 cores
    python bench/generate.py --sizes 410m --repeats 1 --dtypes --quantize int4 --gguf-types q4_0
    python bench/generate.py --sizes 2.8b --engines minidolly llama.cpp    # dolly-v2-3b's shape, if it fits
    python bench/generate.py --device cuda --sizes dolly-v2-3b --dtypes bfloat16 --repeats 2

For each size, one random-weight checkpoint in the Pythia shape (speed does not depend on the
values) is written once: our safetensors (HF layout, which transformers reads too) and, for
llama.cpp, GGUF files of the same weights: f32 and f16 by save_gguf, q8_0 and q4_0 made from
the f32 file by llama.cpp's own quantizer (llama_model_quantize, default settings, as users
make them). Every row is then a fresh process that loads its engine from those files the way
a user does (minidolly: load_model(dtype=, quantize=) and prepare_for_cpu, as generate.py),
warms up, and generates 128 greedy tokens after a 32-token prompt at batch 1 (--new-tokens,
--prompt-tokens: a long prompt makes the KV cache a share of what each decode step reads):

    minidolly fp32 / bf16      the whole model in that dtype (eager: oneDNN-packed linears)
    minidolly int8 / int4 / fp16w / bf16w   weight-only int8 per channel / int4 g64 (embed_out
                               int8) / fp16 or bf16 (--quantize fp16 / bf16: 16-bit weights, fp32
                               activations; fp16 is llama.cpp f16's arithmetic), loaded from
                               checkpoints saved quantized (as llama.cpp loads a quantized file);
                               their KV cache is fp16, as llama.cpp's (generate.choose_kv_dtype)
    ... compiled               the same with compile=True (the static decode step through inductor,
                               after prepare_for_cpu(model, compile=True): at batch 1 every linear but
                               int4's is inductor's own GEMV loop; the best settings on CPU)
    transformers fp32 / bf16   GPTNeoXForCausalLM.generate
    llama.cpp f32 / f16 / q8_0 / q4_0   llama-cpp-python, default settings (repacked buffers)

The rows are interleaved (every row once, then every row again, --repeats times) and each
figure is the median over the repeats, so a neighbour's load hits every row alike; the load
average is printed before and after. Per row:
    tok/s       1 / the median decode step (each step ends with the token read on the host)
    prefill ms  the prompt to the first token
    MB/token    bytes of weights a decode step reads: every parameter and buffer (quantized
                weights are buffers, or fbgemm's packed int8) but the token embedding, of which it reads one row; for
                llama.cpp, every tensor of the GGUF file but token_embd
    GB/s        MB/token x tok/s, and "of probe": that over what torch.mv reads from memory
                (a 256 MiB fp32 matrix, far past the caches) between the rows of the same run
    RSS GB      the row's process: its peak resident memory (VmHWM, which counts the pages of
                the files it maps), and its private memory after the last token, the engine still
                loaded (RssAnon: without the mapped files' pages, which are clean and which the
                kernel drops under memory pressure and reads again); on CUDA the peak of allocated
                GPU memory
    vs llama    tok/s over llama.cpp's at the same width (bf16, fp16, fp16w, bf16w vs f16, int8 vs q8_0,
                int4 vs q4_0, fp32 vs f32); vs HF: over transformers fp32's (bf16 on CUDA)
Every engine gets --threads threads (default: half the cores, llama-cpp-python's own default
for decoding). The targets of issue 14 are checked at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from minidolly.quantize import cpu_description  # noqa: E402

TOKENIZER = os.path.join(REPO, "..", "shared", "data", "gpt-neox-20b-tokenizer.json")
PROMPT_TOKENS = 32
GPU_TARGET = 0.70  # compiled decode's weight bandwidth / copy bandwidth
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
QUANTIZED = {"int8": "int8", "int4": "int4", "fp16": "fp16w", "bf16": "bf16w"}  # --quantize mode -> its rows' width
SAME_WIDTH = {"fp32": "f32", "bf16": "f16", "fp16": "f16", "fp16w": "f16", "bf16w": "f16", "int8": "q8_0", "int4": "q4_0"}


# ------------------------------------------------------------------ the rows


def plan_rows(args) -> list[dict]:
    """The rows to measure, in the order they run: {engine, width, compile, ...}."""
    rows = []
    if "minidolly" in args.engines:
        for width in [DTYPES[d] for d in args.dtypes] + [QUANTIZED[q] for q in args.quantize]:
            if not args.compiled_only:
                rows.append(dict(engine="minidolly", width=width, compile=False))
            if width in args.compiled:
                rows.append(dict(engine="minidolly", width=width, compile=True))
    if "transformers" in args.engines:
        rows += [dict(engine="transformers", width=DTYPES[d], compile=False) for d in args.dtypes]
    if "llama.cpp" in args.engines and args.device == "cpu":
        rows += [dict(engine="llama.cpp", width=t, compile=False) for t in args.gguf_types]
    return rows


def row_name(row) -> str:
    return f"{row['engine']} {row['width']}" + (" compiled" if row["compile"] else "")


# ------------------------------------------------------- one row, in its own process


def proc_status_bytes(field: str) -> int | None:
    """A memory figure of this process from /proc/self/status (in kB there), in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_anon_bytes() -> int:
    """This process's private (anonymous) resident memory now: what it allocated itself, without
    the pages of files it maps (which the kernel can drop and read again)."""
    return proc_status_bytes("RssAnon") or 0


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM, which starts afresh at exec (ru_maxrss keeps
    the parent's peak from before the fork on Linux)."""
    peak = proc_status_bytes("VmHWM")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return peak


def weight_bytes(model, skip: str) -> int:
    """Bytes of every parameter and buffer of `model` (each storage once) but those whose name
    starts with `skip` (the token embedding: a decode step reads one row of it), and of every
    int8 weight fbgemm packed (an object, not a tensor: one byte a weight)."""
    from minidolly.quantize import Int8Linear

    total = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Int8Linear) and m.fbgemm)
    seen = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith(skip) or t.is_meta:
            continue
        try:
            key = t.data_ptr()  # not the storage: a loaded checkpoint is one mapped file
        except (RuntimeError, NotImplementedError):  # an opaque (oneDNN-blocked) tensor
            key = id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def run_minidolly(job) -> dict:
    from minidolly import load_model, prepare_for_cpu
    from minidolly.generate import decode

    width, device = job["width"], job["device"]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(width, torch.float32)
    # every width from a checkpoint saved in it (write_checkpoint), as llama.cpp loads a file of its type
    saved = os.path.join(job["checkpoint"], width)
    start = time.perf_counter()
    model = load_model(saved if os.path.isdir(saved) else job["checkpoint"], dtype=dtype, device=device,
                       use_kernels=False)
    prepare_for_cpu(model, compile=job["compile"])  # what generate.py does at load
    out = dict(load_s=time.perf_counter() - start, weight_bytes=weight_bytes(model, "embed_in"))

    def timed(n):
        stats = {}
        stamps = [time.perf_counter() for _ in decode(model, [job["prompt"]], max_new_tokens=n, temperature=0,
                                                      compile=job["compile"], stats=stats)]
        return [b - a for a, b in zip(stamps, stamps[1:])], stats["prefill_seconds"]

    start = time.perf_counter()
    timed(4)  # compile=True compiles here (and on CUDA records the graph)
    out["warmup_s"] = time.perf_counter() - start
    timed(4)
    out["steps"], out["prefill_s"] = timed(job["new_tokens"])
    out["anon_bytes"] = rss_anon_bytes()  # with the model still loaded
    if job.get("profile"):
        out["profile"] = profile_steps(lambda: timed(17), 16)
    return out


MATMULS = ("mm", "linear", "qlinear", "int4pack", "int8pack")  # op names of the weight products


def profile_steps(run, steps: int) -> str:
    """torch.profiler over `run` (`steps` decode steps and one prefill): the ops by self time
    per step, and the weight products' share of the total."""
    from torch.profiler import profile

    with profile() as prof:
        run()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if any(k in e.key for k in MATMULS))
    lines = [f"  weight products {matmul / total:.0%} of {total / steps / 1e3:.1f} ms/step profiled; top ops:"]
    for e in events[:12]:
        lines.append(f"    {e.key[:58]:<58}{e.self_cpu_time_total / steps / 1e3:>7.2f} ms/step{e.count / steps:>7.0f} calls/step")
    return "\n".join(lines)


def run_transformers(job) -> dict:
    from transformers import GPTNeoXForCausalLM, StoppingCriteria, StoppingCriteriaList

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[job["width"]]
    start = time.perf_counter()
    hf = GPTNeoXForCausalLM.from_pretrained(job["checkpoint"], dtype=dtype).to(job["device"]).eval()
    out = dict(load_s=time.perf_counter() - start, weight_bytes=weight_bytes(hf, "gpt_neox.embed_in"))
    stamps = []

    class Stamp(StoppingCriteria):  # called once per step, after the token is chosen
        def __call__(self, input_ids, scores, **kwargs):
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    ids = torch.tensor([job["prompt"]], device=job["device"])

    @torch.inference_mode()
    def timed(n):
        stamps.clear()
        begin = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                    pad_token_id=0, stopping_criteria=StoppingCriteriaList([Stamp()]))
        return [b - a for a, b in zip(stamps, stamps[1:])], stamps[0] - begin

    timed(4)
    timed(4)
    out["steps"], out["prefill_s"] = timed(job["new_tokens"])
    out["anon_bytes"] = rss_anon_bytes()  # with the model still loaded
    return out


def run_llama(job) -> dict:
    import llama_cpp
    import numpy as np

    threads = job["threads"]
    start = time.perf_counter()
    llm = llama_cpp.Llama(job["gguf"], n_ctx=len(job["prompt"]) + job["new_tokens"] + 16, n_batch=len(job["prompt"]),
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    out = dict(load_s=time.perf_counter() - start)
    vocab = llm.n_vocab()

    def greedy():  # the last position's logits, as the greedy sampler reads them
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))

    def timed(n):
        llm.reset()
        begin = time.perf_counter()
        if job["one_by_one"]:
            for t in job["prompt"]:
                llm.eval([t])
        else:
            llm.eval(job["prompt"])
        token = greedy()
        stamps = [time.perf_counter()]
        for _ in range(n - 1):
            llm.eval([token])
            token = greedy()
            stamps.append(time.perf_counter())
        return [b - a for a, b in zip(stamps, stamps[1:])], stamps[0] - begin

    timed(4)
    timed(4)
    out["steps"], out["prefill_s"] = timed(job["new_tokens"])
    out["anon_bytes"] = rss_anon_bytes()  # with the model still loaded
    return out


def child(job_json: str) -> None:
    """Run one job (the --child mode of this script: a row, or writing the checkpoint) and print
    its result as one JSON line."""
    job = json.loads(job_json)
    torch.set_num_threads(job["threads"])
    if job["engine"] == "checkpoint":
        files = write_checkpoint(job["size"], job["directory"], getattr(torch, job["dtype"]), job["gguf_types"],
                                 job["saved"])
        print("RESULT " + json.dumps(files), flush=True)
        return
    out = {"minidolly": run_minidolly, "transformers": run_transformers, "llama.cpp": run_llama}[job["engine"]](job)
    if job["device"] == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
    else:
        out["peak_bytes"] = peak_rss_bytes()
    print("RESULT " + json.dumps(out), flush=True)


def run_row(job: dict, timeout: float) -> dict:
    """Run `job` in a fresh process; its result, or {"error": why}."""
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(job)],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
    return {"error": f"exit status {p.returncode}: {tail[:200]}", "crashed": p.returncode < 0}


# --------------------------------------------------------------- the checkpoint


def write_checkpoint(size: str, directory: str, dtype: torch.dtype, gguf_types: list[str], saved: list[str]) -> dict:
    """A random-weight checkpoint of `size` in `directory` (ours, which transformers reads too)
    with each width of `saved` (bf16, fp16, int8, int4, fp16w, bf16w) saved in directory/<width>, and the GGUF
    files asked for; returns {gguf type: path}."""
    from minidolly import load_model, save_gguf, save_model
    from minidolly.config import ModelConfig
    from minidolly.model import GPTNeoX
    from quality import llama_quantize  # bench/quality.py, next to this script

    torch.manual_seed(0)
    model = GPTNeoX(ModelConfig.from_size(size), use_kernels=False)  # GPT-NeoX's own init
    files = {}
    if gguf_types:
        f32 = save_gguf(model, os.path.join(directory, "model.f32.gguf"), "f32", tokenizer=TOKENIZER)
        if "f16" in gguf_types:
            files["f16"] = save_gguf(model, os.path.join(directory, "model.f16.gguf"), "f16", tokenizer=TOKENIZER)
        for t in ("q8_0", "q4_0"):
            if t in gguf_types:
                files[t] = llama_quantize(f32, os.path.join(directory, f"model.{t}.gguf"), t)
        if "f32" in gguf_types:
            files["f32"] = f32
        else:
            os.remove(f32)
    save_model(model.to(dtype), directory)
    del model
    for width in saved:  # each width saved as a user keeps it: no fp32 checkpoint read at run time
        quantize = {w: mode for mode, w in QUANTIZED.items()}.get(width)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(width, torch.float32)
        save_model(load_model(directory, quantize=quantize, dtype=dtype), os.path.join(directory, width))
    return files


def gguf_weight_bytes(path: str) -> int:
    """Bytes of every tensor in a GGUF file but token_embd (of which a step reads one row)."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if not t.name.startswith("token_embd"))


# ------------------------------------------------------------------- bandwidth


class Probe:
    """What memory can deliver, in GB/s: torch.mv on a 256 MiB fp32 matrix (CPU), a 1 GiB
    device-to-device copy, bytes read + written (CUDA)."""

    def __init__(self, device: str):
        self.device = device
        if device == "cuda":
            self.src = torch.empty(2**30, dtype=torch.uint8, device=device)
            self.dst = torch.empty_like(self.src)
            self.bytes = 2 * self.src.numel()
        else:
            self.W, self.x = torch.randn(8192, 8192), torch.randn(8192)
            self.bytes = self.W.nbytes
        self.rates = []

    def measure(self, repeats=5):
        for _ in range(repeats):
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self.dst.copy_(self.src)
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3
            else:
                start = time.perf_counter()
                torch.mv(self.W, self.x)
                seconds = time.perf_counter() - start
            self.rates.append(self.bytes / seconds / 1e9)

    def gbs(self) -> float:
        return median(self.rates)


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


# ----------------------------------------------------------------------- table


def summarize(results: list[dict]) -> dict:
    """The median over repeats of tok/s and prefill; the largest peak; the first error."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return {"error": results[-1]["error"]}
    return dict(rate=median([1 / median(r["steps"]) for r in ok]), prefill=median([r["prefill_s"] for r in ok]),
                peak=max(r["peak_bytes"] for r in ok), anon=max(r.get("anon_bytes", 0) for r in ok),
                profile=next((r["profile"] for r in ok if "profile" in r), None),
                weight_bytes=ok[0].get("weight_bytes"),
                warmup=median([r.get("warmup_s", 0) for r in ok]), runs=len(ok))


def print_table(size, rows, stats, probe_gbs, device):
    mem = "peak GPU GB" if device == "cuda" else "RSS GB peak/anon"
    print(f"\n{size}: median of the repeats; probe {probe_gbs:.1f} GB/s")
    print(f"{'row':<28}{'tok/s':>8}{'prefill ms':>11}{'MB/token':>10}{'GB/s':>7}{'of probe':>9}{mem:>18}"
          f"{'vs llama':>9}{'vs HF':>7}{'warm-up s':>10}")
    llama = {r["width"]: stats[row_name(r)].get("rate") for r in rows if r["engine"] == "llama.cpp"}
    hf_width = "bf16" if device == "cuda" else "fp32"
    hf = next((stats[row_name(r)].get("rate") for r in rows if r["engine"] == "transformers" and r["width"] == hf_width), None)
    for r in rows:
        s = stats[row_name(r)]
        if "error" in s:
            print(f"{row_name(r):<28}  failed: {s['error']}")
            continue
        gbs = s["weight_bytes"] * s["rate"] / 1e9
        peer = llama.get(SAME_WIDTH.get(r["width"])) if r["engine"] != "llama.cpp" else None
        vs_llama = f"{s['rate'] / peer:>8.2f}x" if peer else f"{'':>9}"
        vs_hf = f"{s['rate'] / hf:>6.2f}x" if hf else f"{'':>7}"
        warm = f"{s['warmup']:>10.0f}" if r["compile"] else ""
        memory = f"{s['peak'] / 1e9:.2f}" + ("" if device == "cuda" else f" / {s['anon'] / 1e9:.2f}")
        print(f"{row_name(r):<28}{s['rate']:>8.1f}{s['prefill'] * 1e3:>11.0f}{s['weight_bytes'] / 1e6:>10.0f}{gbs:>7.1f}"
              f"{gbs / probe_gbs:>9.0%}{memory:>18}{vs_llama}{vs_hf}{warm}", flush=True)


def check_targets(size, rows, stats, device, probe_gbs) -> list[str]:
    """Issue 14's targets (CPU, 410m and 1.4b) and issue 10's GPU target, as lines of text."""
    def best(engine, widths):
        found = [(stats[row_name(r)]["rate"], row_name(r)) for r in rows
                 if r["engine"] == engine and r["width"] in widths and "rate" in stats[row_name(r)]]
        return max(found) if found else None

    lines = []
    if device == "cuda":
        for r in rows:
            s = stats[row_name(r)]
            if r["engine"] == "minidolly" and r["compile"] and "rate" in s:
                frac = s["weight_bytes"] * s["rate"] / 1e9 / probe_gbs
                lines.append(f"{size}: {row_name(r)} at {frac:.0%} of the copy bandwidth (target >= {GPU_TARGET:.0%}): "
                             f"{'met' if frac >= GPU_TARGET else 'NOT met'}")
        return lines
    for ours, theirs in ((("bf16", "fp16", "fp16w", "bf16w"), "f16"), (("int8",), "q8_0"), (("int4",), "q4_0")):
        a, b = best("minidolly", ours), best("llama.cpp", (theirs,))
        if a and b:
            lines.append(f"{size}: best of minidolly {'/'.join(ours)} ({a[1]}, {a[0]:.1f} tok/s) vs llama.cpp {theirs} "
                         f"({b[0]:.1f}): {a[0] / b[0]:.2f}x, target >= 1: {'met' if a[0] >= b[0] else 'NOT met'}")
    a, b = best("minidolly", tuple(SAME_WIDTH)), best("transformers", ("fp32",))
    if a and b:
        lines.append(f"{size}: minidolly's best ({a[1]}, {a[0]:.1f} tok/s) vs transformers fp32 ({b[0]:.1f}): "
                     f"{a[0] / b[0]:.2f}x, target >= 3: {'met' if a[0] >= 3 * b[0] else 'NOT met'}")
    return lines



# ------------------------------------------------------------------------ main


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        return child(sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--sizes", nargs="+", default=None,
                   help="Pythia/Dolly sizes (default: 160m 410m 1.4b on CPU, dolly-v2-3b on CUDA)")
    p.add_argument("--engines", nargs="+", choices=["minidolly", "transformers", "llama.cpp"],
                   default=["minidolly", "transformers", "llama.cpp"])
    p.add_argument("--dtypes", nargs="*", choices=list(DTYPES), default=None,
                   help="full-precision rows of minidolly and transformers (default: float32 bfloat16 on CPU, "
                        "bfloat16 on CUDA)")
    p.add_argument("--quantize", nargs="*", choices=list(QUANTIZED), default=None,
                   help="minidolly's weight-only rows (default: int8 int4 fp16 bf16 on CPU, none on CUDA); fp16's "
                        "and bf16's rows are named fp16w and bf16w")
    p.add_argument("--gguf-types", nargs="*", choices=["f32", "f16", "q8_0", "q4_0"],
                   default=["f32", "f16", "q8_0", "q4_0"], help="llama.cpp's rows (CPU only)")
    p.add_argument("--compiled", nargs="*", choices=["fp32", "bf16", "fp16", "fp16w", "bf16w", "int8", "int4"], default=None,
                   help="minidolly widths that also get a compile=True row (default: every width on CPU, where the "
                        "compiled batch-1 step multiplies by inductor's own GEMV, see docs/generation.md; bf16 on CUDA)")
    p.add_argument("--compiled-only", action="store_true", help="leave out the eager rows of those widths")
    p.add_argument("--no-compile", action="store_true", help="no compile=True rows")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true",
                   help="also profile 16 decode steps of every minidolly row (torch.profiler) and print where the time goes")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="threads of every engine (default: half the cores, llama-cpp-python's default)")
    p.add_argument("--row-timeout", type=float, default=900, help="seconds one row may take before it counts as failed")
    p.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary directory)")
    args = p.parse_args()
    if not 1 <= args.prompt_tokens <= 2048 - 16 - args.new_tokens:
        p.error(f"--prompt-tokens {args.prompt_tokens} with --new-tokens {args.new_tokens}: the prompt needs 1 token "
                "and the two together must leave 16 of Pythia's 2048 positions.")
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but torch sees no CUDA GPU.")
    args.sizes = args.sizes or (["dolly-v2-3b"] if cuda else ["160m", "410m", "1.4b"])
    args.dtypes = args.dtypes if args.dtypes is not None else (["bfloat16"] if cuda else ["float32", "bfloat16"])
    args.quantize = args.quantize if args.quantize is not None else ([] if cuda else ["int8", "int4", "fp16", "bf16"])
    if args.compiled is None:
        args.compiled = ["bf16"] if cuda else ["fp32", "bf16", "fp16", "fp16w", "bf16w", "int8", "int4"]  # CPU: every width, the best settings
    if args.no_compile:
        args.compiled, args.compiled_only = [], False
    notes = []
    if "llama.cpp" in args.engines and not cuda:
        try:
            import llama_cpp
        except ImportError:
            args.engines.remove("llama.cpp")
            notes.append("llama.cpp rows skipped: llama_cpp is not importable (pip install llama-cpp-python)")
        else:
            if not os.path.exists(TOKENIZER):
                args.engines.remove("llama.cpp")
                notes.append(f"llama.cpp rows skipped: a GGUF file needs the tokenizer, {TOKENIZER} is missing")
            else:
                notes.append(f"llama-cpp-python {llama_cpp.__version__}; {llama_cpp.llama_print_system_info().decode().strip()}")
    if "transformers" in args.engines:
        import transformers

        notes.append(f"transformers {transformers.__version__}")
    rows = plan_rows(args)
    if not rows:
        sys.exit("error: no rows to run; check --engines, --dtypes, --quantize and --gguf-types.")
    torch.set_num_threads(args.threads)
    device = torch.cuda.get_device_name() if cuda else f"CPU {cpu_description()}"
    print(f"{time.strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}; {device}; {args.threads} threads per engine; "
          f"{platform.node()}")
    print(f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy, batch 1; median of {args.repeats} "
          f"interleaved repeats, each row in a fresh process")
    for n in notes:
        print(n)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    prompt = torch.randint(0, 50000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    all_targets, started = [], time.perf_counter()
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    for size in args.sizes:
        work = tempfile.mkdtemp(prefix=f"bench-generate-{size}-", dir=args.workdir)
        try:
            size_start = time.perf_counter()
            needs_fp32 = not cuda or "float32" in args.dtypes or args.quantize
            ggufs = [r["width"] for r in rows if r["engine"] == "llama.cpp"]
            base = "float32" if needs_fp32 else "bfloat16"  # the checkpoint's own dtype; other widths saved apart
            files = run_row(dict(engine="checkpoint", size=size, directory=work, gguf_types=ggufs, threads=args.threads,
                                 saved=sorted({r["width"] for r in rows if r["engine"] == "minidolly"} - {DTYPES[base]}),
                                 dtype=base), args.row_timeout)
            if "error" in files:  # in a process of its own: the parent stays small, llama.cpp's log stays out
                sys.exit(f"error: writing the {size} checkpoint failed: {files['error']}")
            print(f"\n{size}: checkpoint and GGUF files written in {time.perf_counter() - size_start:.0f} s", flush=True)
            probe = Probe(args.device)
            probe.measure()
            results = {row_name(r): [] for r in rows}
            one_by_one = {}
            for repeat in range(args.repeats):
                for r in rows:
                    job = dict(r, device=args.device, threads=args.threads, checkpoint=work, prompt=prompt,
                               new_tokens=args.new_tokens, gguf=files.get(r["width"]), one_by_one=one_by_one.get(r["width"], False),
                               profile=args.profile and repeat == 0)
                    res = run_row(job, args.row_timeout)
                    if r["engine"] == "llama.cpp" and res.get("crashed") and not job["one_by_one"]:
                        # llama.cpp's repacked buffers have crashed on multi-token evaluation on some CPUs
                        one_by_one[r["width"]] = job["one_by_one"] = True
                        notes_line = f"{size} llama.cpp {r['width']}: crashed on the {len(prompt)}-token prompt ({res['error']}); " \
                                     f"the prompt is fed one token at a time (decode is unaffected)"
                        print(notes_line, flush=True)
                        res = run_row(job, args.row_timeout)
                    if r["engine"] == "llama.cpp" and "error" not in res:
                        res["weight_bytes"] = gguf_weight_bytes(files[r["width"]])
                    results[row_name(r)].append(res)
                    # each row's figure as it comes, so a run stopped at its time limit keeps what it measured
                    print(f"    {row_name(r)}: " + (f"{1 / median(res['steps']):.1f} tok/s, prefill {res['prefill_s'] * 1e3:.0f} ms"
                                                  if "error" not in res else f"failed: {res['error'][:200]}"), flush=True)
                    probe.measure()
                print(f"  repeat {repeat + 1}/{args.repeats} done at {time.perf_counter() - started:.0f} s; "
                      f"load average {os.getloadavg()[0]:.2f}", flush=True)
            stats = {name: summarize(res) for name, res in results.items()}
            print_table(size, rows, stats, probe.gbs(), args.device)
            if any(one_by_one.values()):
                print(f"(llama.cpp {', '.join(w for w, v in one_by_one.items() if v)}: prompt fed one token at a time, "
                      f"so their prefill is not comparable)")
            for r in rows:
                if stats[row_name(r)].get("profile"):
                    print(f"profile of {size} {row_name(r)} (the profiler slows the small ops down):\n"
                          + stats[row_name(r)]["profile"])
            targets = check_targets(size, rows, stats, args.device, probe.gbs())
            all_targets += targets
            for t in targets:
                print("target: " + t)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
