"""Benchmark minidolly's Triton kernels against the torch ops they replace.

    python bench/kernels.py --device cuda    # on a GPU: three tables and the targets, see below
    python bench/kernels.py --device cpu     # the interpreter, tiny shapes: proves the path runs
    python bench/kernels.py --batch 4 --seq 2048 --skip model

Tables (each with the peer measured in the same run and the ratio ours / peer):
1. attention, causal, bf16: TFLOP/s of forward and forward+backward against
   F.scaled_dot_product_attention restricted to its flash backend; head dims 64/80/128/256,
   seq 512..4096.
2. LayerNorm, bf16: GB/s of forward and backward against F.layer_norm, and our share of
   the HBM bandwidth measured in the same run (a device-to-device copy).
3. tokens/s of one pythia-1.4b training step (forward, backward, AdamW) with the
   kernels on and off.
Then the targets of issue 10, each with its figure and PASS or MISS:
- flash attention forward+backward >= 0.9x SDPA-flash at T = 2048, head_dim 128, bf16;
- LayerNorm forward and backward >= 85% of the measured copy bandwidth at width 5120.

FLOPs counted are the useful ones: forward 4*B*H*T*T*D (QK^T and PV), halved for causal;
backward 2.5x the forward (five matmuls of that size), the usual flash-attention
convention; our backward's recomputation is not credited.
Bytes counted for LayerNorm are the unavoidable ones: forward reads x and writes y,
backward reads x and dy and writes dx; weights and per-row statistics are < 1%.
"""

import argparse
import os
import sys
import time

# HBM bandwidth from NVIDIA's datasheets, printed beside the measured copy for context;
# first match in the device name wins.
DATASHEET_GBPS = {"H200": 4800, "H100 PCIe": 2000, "H100": 3350, "A100": 2039}
ATTENTION_TARGET = 0.9  # ours / SDPA-flash, forward+backward, T = 2048, D = 128, bf16
LAYER_NORM_TARGET = 0.85  # of the measured copy bandwidth, width 5120


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda: time on the GPU; cpu: Triton's interpreter with tiny shapes (timings meaningless)")
    p.add_argument("--interpret", action="store_true", help="the same as --device cpu")
    p.add_argument("--quick", action="store_true",
                   help="only the shapes the targets need and a few more: attention at T=2048, LayerNorm at 2048 and 5120")
    p.add_argument("--batch", type=int, default=4, help="training-step batch size (sequences)")
    p.add_argument("--seq", type=int, default=2048, help="training-step sequence length")
    p.add_argument("--model-size", default="1.4b", help="ModelConfig.from_size name for the training step")
    p.add_argument("--skip", default="", help="comma-separated tables to skip: attention,layernorm,model")
    return p.parse_args()


args = parse_args()
args.interpret = args.interpret or args.device == "cpu"
if args.interpret:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402

DEVICE = "cpu" if args.interpret else "cuda"


def bench_ms(fn):
    """Median milliseconds per call of fn."""
    if args.interpret:
        fn()  # first call includes the interpreter's setup
        t0 = time.perf_counter()
        reps = 2
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) * 1e3 / reps
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def table(title, header, rows):
    print(f"\n{title}")
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(str(h).rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


def fmt(x, digits=1):
    if x is None:
        return "n/a"
    return f"{x:.2g}" if args.interpret else f"{x:.{digits}f}"  # CPU numbers are tiny


def ratio(a, b):
    return "n/a" if a is None or b is None else f"{a / b:.2f}x"


TARGETS = []


def target(what, value, goal, unit):
    """Record one of the issue's speed targets; main() prints them last."""
    shown = (lambda v: f"{100 * v:.0f}%") if unit == "%" else (lambda v: f"{v:.2f}x")
    TARGETS.append((what, shown(value), ">= " + shown(goal), "PASS" if value >= goal else "MISS"))


# ------------------------------------------------------------------- attention


def sdpa_flash(q, k, v):
    if args.interpret:  # no flash backend on the CPU; the math backend stands in
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def time_attention(attn, q, k, v, do):
    """(forward ms, forward+backward ms), or (None, None) if this backend rejects the shape."""
    try:
        attn(q, k, v)
    except RuntimeError:  # e.g. SDPA's flash backend refusing a head dim
        return None, None
    fwd = bench_ms(lambda: attn(q, k, v))

    def step():
        q.grad = k.grad = v.grad = None
        attn(q, k, v).backward(do)

    return fwd, bench_ms(step)


def bench_attention():
    dtype = torch.bfloat16
    if args.interpret:
        shapes = [(1, 2, 80, 64)]
    else:  # 16k tokens per batch, 16 heads: pythia-1.4b's attention at D = 128
        seqs = (2048,) if args.quick else (512, 1024, 2048, 4096)
        shapes = [(16384 // T, 16, T, D) for D in (64, 80, 128, 256) for T in seqs]
    rows = []
    for B, H, T, D in shapes:
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, H, T, D, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
        do = torch.randn(B, H, T, D, device=DEVICE, dtype=dtype)
        with torch.no_grad():
            err = (kernels.flash_attention(q, k, v).float() - sdpa_flash(q, k, v).float()).abs().max().item()
        fwd_flops = 4 * B * H * T * T * D / 2  # causal: half the score matrix
        ours = time_attention(lambda a, b, c: kernels.flash_attention(a, b, c, causal=True), q, k, v, do)
        peer = time_attention(sdpa_flash, q, k, v, do)
        tf = [None if ms is None else f / ms / 1e9 for ms, f in zip(ours + peer, [fwd_flops, 3.5 * fwd_flops] * 2)]
        rows.append((D, T, B, H, fmt(tf[0]), fmt(tf[2]), ratio(tf[0], tf[2]),
                     fmt(tf[1]), fmt(tf[3]), ratio(tf[1], tf[3]), f"{err:.1e}"))
        if (T, D) == (2048, 128) and None not in (tf[1], tf[3]):
            target("flash attention fwd+bwd / SDPA-flash, T=2048 D=128 bf16", tf[1] / tf[3], ATTENTION_TARGET, "x")
    table("Causal attention, bf16, TFLOP/s (ours vs SDPA's flash backend)",
          ["D", "T", "B", "H", "fwd ours", "fwd sdpa", "ratio", "f+b ours", "f+b sdpa", "ratio", "max|o-sdpa|"], rows)


# ------------------------------------------------------------------- LayerNorm


def copy_gbps():
    """The device's HBM bandwidth as a device-to-device copy of 1 GiB achieves it, GB/s."""
    x = torch.empty(2**28, dtype=torch.float32, device=DEVICE)
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / ms / 1e6  # read + write


def bench_layer_norm():
    dtype = torch.bfloat16
    peak = None if args.interpret else copy_gbps()
    name = "" if args.interpret else torch.cuda.get_device_name()
    sheet = next((g for key, g in DATASHEET_GBPS.items() if key in name), None)
    M = 64 if args.interpret else 16384  # tokens: e.g. 8 sequences of 2048
    widths = (256,) if args.interpret else (2048, 5120) if args.quick else (1024, 2048, 2560, 4096, 5120)  # Pythia 410m .. 12b
    rows = []
    for N in widths:
        torch.manual_seed(0)
        x = torch.randn(M, N, device=DEVICE, dtype=dtype, requires_grad=True)
        w = torch.randn(N, device=DEVICE, dtype=dtype, requires_grad=True)
        b = torch.randn(N, device=DEVICE, dtype=dtype, requires_grad=True)
        dy = torch.randn(M, N, device=DEVICE, dtype=dtype)
        err = (kernels.layer_norm(x, w, b, 1e-5).float() - F.layer_norm(x, (N,), w, b, 1e-5).float()).abs().max().item()
        result = []
        for fn in (lambda: kernels.layer_norm(x, w, b, 1e-5), lambda: F.layer_norm(x, (N,), w, b, 1e-5)):
            y = fn()
            fwd = bench_ms(fn)
            bwd = bench_ms(lambda: torch.autograd.grad(y, (x, w, b), dy, retain_graph=True))
            result += [2 * M * N * x.element_size() / fwd / 1e6, 3 * M * N * x.element_size() / bwd / 1e6]
        pct = (lambda g: "n/a" if peak is None else f"{100 * g / peak:.0f}%")
        rows.append((M, N, fmt(result[0], 0), fmt(result[2], 0), ratio(result[0], result[2]), pct(result[0]),
                     fmt(result[1], 0), fmt(result[3], 0), ratio(result[1], result[3]), pct(result[1]), f"{err:.1e}"))
        if N == 5120 and peak is not None:
            target("LayerNorm fwd GB/s / copy GB/s, width 5120 bf16", result[0] / peak, LAYER_NORM_TARGET, "%")
            target("LayerNorm bwd GB/s / copy GB/s, width 5120 bf16", result[1] / peak, LAYER_NORM_TARGET, "%")
    source = "n/a on the CPU" if peak is None else (
        f"measured copy {peak:.0f} GB/s" + (f"; datasheet {sheet} GB/s" if sheet else ""))
    table(f"LayerNorm, bf16, GB/s of the unavoidable bytes (% of the HBM copy bandwidth: {source})",
          ["M", "N", "fwd ours", "fwd torch", "ratio", "% copy", "bwd ours", "bwd torch", "ratio", "% copy",
           "max|y-torch|"], rows)


# ---------------------------------------------------------------- training step


def bench_model():
    try:
        from minidolly.config import ModelConfig
        from minidolly.model import GPTNeoX
    except ImportError as e:
        print(f"\nTraining step skipped: minidolly is not importable ({e}).")
        return
    if args.interpret:
        config = ModelConfig(vocab_size=96, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256,
                             max_position_embeddings=64)
        batch, seq, dtype, name = 2, 32, torch.float32, "tiny (interpreter)"
    else:
        config = ModelConfig.from_size(args.model_size)
        batch, seq, dtype, name = args.batch, args.seq, torch.bfloat16, f"pythia-{args.model_size}"
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq + 1), device=DEVICE)

    def tokens_per_s(use_kernels):
        torch.manual_seed(0)
        model = GPTNeoX(config, use_kernels=use_kernels).to(device=DEVICE, dtype=dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step():
            logits = model(ids[:, :-1])  # (B, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return batch * seq / bench_ms(step) * 1e3

    results = {}
    for use_kernels in (True, False):
        results[use_kernels] = tokens_per_s(use_kernels)  # the model is freed on return
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    rows = [(name, batch, seq, str(dtype)[6:], fmt(results[True], 0), fmt(results[False], 0),
             ratio(results[True], results[False]))]
    table("Training step (forward + backward + AdamW), tokens/s",
          ["model", "batch", "seq", "dtype", "kernels on", "kernels off", "ratio"], rows)


def main():
    if args.interpret:
        print("Running under TRITON_INTERPRET=1 on the CPU with tiny shapes. This proves the kernels "
              "run end to end; the timings below mean NOTHING about GPU speed.")
    elif not torch.cuda.is_available():
        sys.exit("bench/kernels.py --device cuda needs a CUDA GPU; --device cpu exercises the kernels on the interpreter.")
    else:
        print(f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    skip = set(filter(None, args.skip.split(",")))
    if "attention" not in skip:
        bench_attention()
    if "layernorm" not in skip:
        bench_layer_norm()
    if "model" not in skip:
        bench_model()
    if TARGETS:
        print("\nTargets (issue 10):")
        for what, value, goal, verdict in TARGETS:
            print(f"TARGET {verdict}  {what}: {value} ({goal})")


if __name__ == "__main__":
    main()
