"""Training-step throughput: minidolly vs transformers, and MFU against a measured matmul peak.

    python bench/train.py                       # pythia-70m and 160m shapes, seq 512, CPU fp32
    python bench/train.py --sizes 70m --dolly-batches 5 --steps 3        # quicker, less representative
    python bench/train.py --device cuda --sizes 160m 410m 1b --batch 8   # a GPU, bf16
    python bench/train.py --lora-rank 16 --sizes 160m      # LoRA: ours vs PEFT + transformers

One step = forward + backward + AdamW on one (batch, seq) micro-batch, single process, in
fp32, or with --precision bf16 (the default on CUDA) mixed precision as each side does it:
our loop through FSDP's MixedPrecisionPolicy (bf16 compute over fp32 master weights, as
train.py runs one GPU), transformers under torch.autocast(bf16), as the HF Trainer's bf16=True.
"minidolly" is the training loop's own step: `minidolly.train.loss_sum` on the model as the
loop wraps it (`needs_fsdp` decides: no FSDP for one fp32 rank) with the loop's optimizer,
and "--compile" the same with train.py's --compile (each layer torch.compile'd);
"transformers" is GPTNeoXForCausalLM with the same weights, computing its loss from
`labels=`, with fused AdamW (the HF Trainer's adamw_torch_fused). Two workloads:

- dolly: real databricks-dolly-15k records (../shared/data, or --data), tokenized and labelled
  exactly as train.py does (prompt tokens are -100), packed end to end into rows of seq
  tokens, --dolly-batches different micro-batches each timed once per model: the mix of
  prompt and response tokens of the real data (47-48% targets with the default 20 batches;
  the first 5 alone are 57%, which would understate what the loop skips);
- all-target: random tokens, every position a target (the least our loop can skip).

FLOPs per step count the work the step needs: 6·N·tokens for the layers (N: their matmul
parameters) less the last layer's attention output projection and MLP at positions without a
target (nothing reads them), 6·V·C per target token for the unembedding, and 12·L·T·C·tokens
for attention's QK^T and AV, forward and backward. MFU is that over the speed of a 2048³
matmul (in the compute dtype), for both models (transformers unembeds every position, so it
does more than this count). The three are timed interleaved (ours, theirs, matmul, ours, ...), so a busy machine slows all
alike; all-target times --steps steps of one batch.

With --lora-rank R it compares LoRA steps instead, on the dolly workload: the loop's full
fine-tuning step, the loop's LoRA step (minidolly/lora.py on query_key_value, alpha 2R, dropout
0.05, the base frozen, AdamW over the adapters; as train.py --lora-rank builds it) and PEFT's
`get_peft_model` with the same LoRA config on transformers' GPTNeoXForCausalLM, timed
interleaved; and the peak memory of each, measured in a fresh process per step kind (so one
kind's memory cannot hide in another's): on CPU the resident set's high-water mark
(VmHWM, reset through /proc/self/clear_refs after the model and optimizer are built; glibc's
mmap threshold fixed at 64 KiB so that freed buffers leave the resident set), on a
GPU torch.cuda.max_memory_allocated; "peak" is that high-water mark, "step" the part above
what was resident before the first step (activations, gradients, AdamW state, temporaries).
"FLOP ceiling" is PEFT's FLOPs per step over ours (matmuls and attention, counted with
torch's flop formulas), the ratio the two would reach if every FLOP ran at the same speed.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minidolly.config import ModelConfig  # noqa: E402
from minidolly.model import GPTNeoX  # noqa: E402
from minidolly.data import IGNORE_INDEX, load_records, tokenize_records  # noqa: E402
from minidolly.lora import apply_lora  # noqa: E402
from minidolly.parallel import apply_compile, apply_fsdp, init_distributed, needs_fsdp  # noqa: E402
from minidolly.tokenizer import load_tokenizer  # noqa: E402
from minidolly.train import TrainConfig, build_optimizer, loss_sum  # noqa: E402

SHARED = os.environ.get("MINIDOLLY_SHARED_DATA",  # as tests/conftest.py: ../shared/data unless told
                        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data"))


def synced(step, device: torch.device):
    """`step`, made to return only when the device has finished its work (CUDA is asynchronous)."""
    if device.type != "cuda":
        return step

    def run():
        step()
        torch.cuda.synchronize(device)

    return run


class Feed:
    """The micro-batches a step cycles through, in order; `bench` points every model's feed at
    the next workload's batches, so each model is built (and compiled) once per size."""

    def __init__(self, batches: list[dict]):
        self.use(batches)

    def use(self, batches: list[dict]):
        self.batches, self.next = batches, 0

    def __next__(self) -> dict:
        micro = self.batches[self.next % len(self.batches)]
        self.next += 1
        return micro

    @staticmethod
    def of(batches) -> "Feed":
        return batches if isinstance(batches, Feed) else Feed(batches)


def matmul(device: torch.device, dtype: torch.dtype, n: int = 2048):
    """A closure doing one n x n x n matmul in the compute dtype: 2·n³ FLOP, the peak a model
    step can hope for."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return synced(lambda: a @ b, device)


def time_interleaved(steps: dict, repeats: int) -> dict:
    """Mean seconds per call of each function over `repeats` calls, after two warm-up calls
    each. The calls alternate (a, b, a, b, ...) so that load from elsewhere on the machine
    hits all alike."""
    for step in steps.values():
        step()
        step()
    times = {name: 0.0 for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name] += time.perf_counter() - t
    return {name: total / repeats for name, total in times.items()}


def dolly_batches(path: str, tokenizer_path: str, count: int, batch: int, seq: int) -> list[dict]:
    """`count` micro-batches of (batch, seq) input_ids and labels: the records' examples as
    train.py makes them, in a seeded shuffle, concatenated and cut into rows (packing keeps
    the shape fixed and the prompt/response mix that of the data)."""
    records, _ = load_records(path)
    examples, _ = tokenize_records(records, load_tokenizer(tokenizer_path), max_length=seq)
    random.Random(0).shuffle(examples)
    ids = torch.tensor([t for e in examples for t in e.input_ids])
    labels = torch.tensor([t for e in examples for t in e.labels])
    n = count * batch * seq
    if len(ids) < n:
        raise SystemExit(f"{path} holds {len(ids)} tokens, fewer than --dolly-batches x --batch x --seq = {n}.")
    return [{"input_ids": i, "labels": y} for i, y in zip(ids[:n].view(count, batch, seq), labels[:n].view(count, batch, seq))]


def loop_step(config: ModelConfig, state: dict, batches: list[dict], compile: bool, device, bf16: bool,
              lora_rank: int = 0):
    """The training loop's step on a model built as the loop builds it (LoRA adapters with
    `lora_rank`, the frozen base in bf16 under bf16 compute; torch.compile'd layers with
    --compile; FSDP when `needs_fsdp`), cycling through `batches`."""
    with torch.device(device):  # initialised where it runs: a 1.4b init on the host takes longer than its steps
        model = GPTNeoX(config)
    model.load_state_dict(state)
    if lora_rank:
        if bf16:
            model.to(torch.bfloat16)
        apply_lora(model, lora_rank, 2.0 * lora_rank, LORA_DROPOUT, ["query_key_value"], dtype=torch.float32)
    if compile:
        apply_compile(model)
    param_dtype = torch.bfloat16 if bf16 else None
    if needs_fsdp(torch.distributed.get_world_size(), param_dtype, False):
        apply_fsdp(model, param_dtype=param_dtype)
    opt, _ = build_optimizer(model, TrainConfig(lr=1e-5, warmup_steps=0), total_steps=100)  # the loop's own
    data = Feed.of(batches)

    def step():
        micro = next(data)
        targets = (micro["labels"][:, 1:] != IGNORE_INDEX).sum()
        (loss_sum(model, micro, device) / targets.to(device)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return synced(step, device)


LORA_DROPOUT = 0.05


def hf_step(config: ModelConfig, state: dict, batches: list[dict], device, bf16: bool, lora_rank: int = 0):
    """transformers' GPTNeoXForCausalLM step with the same weights, cycling through `batches`;
    with `lora_rank`, PEFT's LoRA on it (`get_peft_model`: the same rank, alpha, dropout and
    target as ours), AdamW over the adapters."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    with torch.device(device):
        hf = GPTNeoXForCausalLM(GPTNeoXConfig(**config.to_hf())).train()
    head = "lm_head.weight" if "lm_head.weight" in hf.state_dict() else "embed_out.weight"  # transformers 5 renamed it
    hf.load_state_dict({(head if k == "embed_out.weight" else "gpt_neox." + k): v for k, v in state.items()})
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        hf = get_peft_model(hf, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=LORA_DROPOUT,
                                           target_modules=["query_key_value"], task_type="CAUSAL_LM"))
    # the HF Trainer's default, adamw_torch_fused, over what trains
    opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-5, fused=True)
    data = Feed.of(batches)

    def step():
        micro = next(data)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = hf(input_ids=micro["input_ids"].to(device), labels=micro["labels"].to(device)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return synced(step, device)


def lora_steps(config: ModelConfig, state: dict, batches: list[dict], device, bf16: bool, rank: int) -> dict:
    """The three steps the LoRA comparison times: full fine-tuning, our LoRA, PEFT's."""
    return {"full": loop_step(config, state, batches, False, device, bf16),
            "lora": loop_step(config, state, batches, False, device, bf16, lora_rank=rank),
            "peft": hf_step(config, state, batches, device, bf16, lora_rank=rank)}


class CountFlops(TorchDispatchMode):
    """The FLOPs of every op torch's flop counter knows (matmuls, attention), summed in
    `total`. torch's own FlopCounterMode also tracks modules, which keeps tensors alive and
    would inflate the memory measured beside it; this holds nothing."""

    total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket in flop_registry:
            self.total += flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
        return out


def _resident() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    with open("/proc/self/status") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["VmRSS"].split()[0]) * 1024, int(info["VmHWM"].split()[0]) * 1024


def measure_memory(kind: str, size: str, batches: list[dict], device, bf16: bool, rank: int) -> dict:
    """In this (fresh) process: build one kind of step, then run it over `batches`
    once and return {"peak": bytes, "step": bytes above what was resident before the first step,
    "flops": per step, counted by `CountFlops`}."""
    torch.manual_seed(0)
    config = ModelConfig.from_size(size)
    state = GPTNeoX(config).state_dict()
    step = {"full": lambda: loop_step(config, state, batches, False, device, bf16),
            "lora": lambda: loop_step(config, state, batches, False, device, bf16, lora_rank=rank),
            "peft": lambda: hf_step(config, state, batches, device, bf16, lora_rank=rank)}[kind]()
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the resident set's high-water mark to the current size
        base = _resident()[0]
    with CountFlops() as flops:
        for _ in range(len(batches)):
            step()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _resident()[1]
    return {"peak": peak, "step": peak - base, "flops": flops.total / len(batches)}


def bench_lora(size: str, batches: list[dict], device: torch.device, bf16: bool, rank: int, args) -> dict:
    """Mean seconds of a step of each kind (timed interleaved), and each kind's memory,
    measured by a fresh copy of this script."""
    config = ModelConfig.from_size(size)
    torch.manual_seed(0)
    state = GPTNeoX(config).state_dict()
    t = time_interleaved(lora_steps(config, state, batches, device, bf16, rank), len(batches))
    memory = {}
    for kind in ("full", "lora", "peft"):
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-of", kind, "--sizes", size, "--lora-rank", str(rank),
               "--batch", str(args.batch), "--seq", str(args.seq), "--dolly-batches", str(len(batches)),
               "--data", args.data, "--tokenizer", args.tokenizer, "--device", args.device,
               "--precision", "bf16" if bf16 else "fp32"]
        # glibc keeps freed buffers below its (growing) mmap threshold for reuse, so the resident
        # set's high-water mark would also count what the allocator hoards; with a fixed 64 KiB
        # threshold every larger buffer is returned when freed and the mark follows live memory
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
        memory[kind] = json.loads(out.strip().splitlines()[-1])
    return {"tokens": batches[0]["input_ids"].numel(), **t, "memory": memory}


def bench(size: str, workloads: dict, device: torch.device, bf16: bool):
    """For each workload (name: (batches, steps)), in turn: mean seconds of a step of each
    model, all cycling through the workload's batches in the same order. The models are built
    once (on the device: a 1.4b model's init on the host costs more than its steps) and their
    feeds moved from one workload to the next; yields (name, result)."""
    config = ModelConfig.from_size(size)
    torch.manual_seed(0)
    with torch.device(device):
        state = GPTNeoX(config).state_dict()
    first = next(iter(workloads.values()))[0]
    n = 2048
    feeds = {name: Feed(first) for name in ("ours", "hf", "compiled")}
    runs = {"ours": loop_step(config, state, feeds["ours"], False, device, bf16),
            "hf": hf_step(config, state, feeds["hf"], device, bf16),
            "matmul": matmul(device, torch.bfloat16 if bf16 else torch.float32, n)}
    if not (bf16 and device.type == "cpu"):  # torch 2.13's inductor cannot compile that backward
        runs["compiled"] = loop_step(config, state, feeds["compiled"], True, device, bf16)
    del state
    for name, (batches, steps) in workloads.items():
        for feed in feeds.values():
            feed.use(batches)
        t = {"compiled": float("nan"), **time_interleaved(runs, steps)}
        C, V = config.hidden_size, config.vocab_size
        n_layers = config.num_params() - 2 * V * C - 2 * C  # all but the embeddings and the final LayerNorm
        batch, seq = batches[0]["input_ids"].shape
        tokens = batch * seq
        targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches) / len(batches)
        after_attention = C * C + 2 * C * config.intermediate_size  # dense, MLP up and down
        flops = (6 * n_layers * tokens - 6 * after_attention * (tokens - targets) + 6 * V * C * targets
                 + 12 * config.num_layers * seq * C * tokens)
        yield name, {"tokens": tokens, "targets": targets, **t, "flops": flops, "peak": 2 * n**3 / t["matmul"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["70m", "160m"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=5, help="timed steps of the all-target batch")
    p.add_argument("--dolly-batches", type=int, default=20, help="real micro-batches, each timed once")
    p.add_argument("--data", default=os.path.join(SHARED, "databricks-dolly-15k.head789.jsonl"))
    p.add_argument("--tokenizer", default=os.path.join(SHARED, "gpt-neox-20b-tokenizer.json"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="compare LoRA steps of this rank (ours, PEFT + transformers) and full fine-tuning instead")
    p.add_argument("--memory-of", choices=["full", "lora", "peft"], help=argparse.SUPPRESS)  # the memory child
    args = p.parse_args()
    device = torch.device(args.device)
    bf16 = (args.precision or ("bf16" if device.type == "cuda" else "fp32")) == "bf16"
    init_distributed()
    dolly = dolly_batches(args.data, args.tokenizer, args.dolly_batches, args.batch, args.seq)
    if args.memory_of:
        print(json.dumps(measure_memory(args.memory_of, args.sizes[0], dolly, device, bf16, args.lora_rank)))
        return
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    if args.lora_rank:
        main_lora(args, dolly, device, bf16, where)
        return
    torch.manual_seed(0)
    random_ids = torch.randint(0, ModelConfig.from_size(args.sizes[0]).vocab_size, (args.batch, args.seq))
    workloads = {"dolly": dolly, "all-target": [{"input_ids": random_ids, "labels": random_ids}]}
    print(f"torch {torch.__version__}, {where}, {'bf16' if bf16 else 'fp32'}, batch {args.batch} x seq {args.seq}, "
          f"mean of {args.dolly_batches} (dolly) or {args.steps} (all-target) interleaved steps; tokens/s")
    print(f"{'shape':<8}{'workload':<12}{'targets':>8}{'minidolly':>11}{'--compile':>11}{'transformers':>14}{'ratio':>8}"
          f"{'ratio --compile':>17}{'matmul GFLOP/s':>16}{'MFU ours':>10}{'MFU hf':>8}")
    for size in args.sizes:
        for name, r in bench(size, {name: (data, len(data) if name == "dolly" else args.steps)
                                    for name, data in workloads.items()}, device, bf16):
            ours, compiled, hf = (r["tokens"] / r[k] for k in ("ours", "compiled", "hf"))
            print(f"{size:<8}{name:<12}{r['targets'] / r['tokens']:>8.0%}{ours:>11,.0f}{compiled:>11,.0f}{hf:>14,.0f}"
                  f"{ours / hf:>7.2f}x{compiled / hf:>16.2f}x{r['peak'] / 1e9:>16.1f}"
                  f"{r['flops'] / r['ours'] / r['peak']:>10.0%}{r['flops'] / r['hf'] / r['peak']:>8.0%}")


def main_lora(args, batches: list[dict], device: torch.device, bf16: bool, where: str) -> None:
    """The LoRA table: tokens/s of each step kind, the ratios, and peak memory."""
    targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches) / sum(b["labels"].numel() for b in batches)
    print(f"torch {torch.__version__}, {where}, {'bf16' if bf16 else 'fp32'}, batch {args.batch} x seq {args.seq}, "
          f"{len(batches)} dolly micro-batches ({targets:.0%} targets) each timed once per kind, interleaved; "
          f"LoRA rank {args.lora_rank}, alpha {2 * args.lora_rank}, dropout {LORA_DROPOUT} on query_key_value")
    memory_kind = "max_memory_allocated" if device.type == "cuda" else "resident set high-water mark"
    print(f"tokens/s; memory in GiB ({memory_kind}: peak / above the built model)")
    print(f"{'shape':<8}{'full FT':>9}{'LoRA':>8}{'PEFT+HF':>9}{'LoRA/PEFT':>11}{'LoRA/full':>11}{'FLOP ceiling':>14}"
          f"{'full mem':>15}{'LoRA mem':>15}{'PEFT mem':>15}{'LoRA/PEFT mem':>15}")
    for size in args.sizes:
        r = bench_lora(size, batches, device, bf16, args.lora_rank, args)
        full, lora, peft = (r["tokens"] / r[k] for k in ("full", "lora", "peft"))
        mem = {k: f"{v['peak'] / 2**30:.2f} / {v['step'] / 2**30:.2f}" for k, v in r["memory"].items()}
        ceiling = r["memory"]["peft"]["flops"] / r["memory"]["lora"]["flops"]
        print(f"{size:<8}{full:>9,.0f}{lora:>8,.0f}{peft:>9,.0f}{lora / peft:>10.2f}x{lora / full:>10.2f}x{ceiling:>13.2f}x"
              f"{mem['full']:>15}{mem['lora']:>15}{mem['peft']:>15}"
              f"{r['memory']['lora']['peak'] / r['memory']['peft']['peak']:>14.2f}x")


if __name__ == "__main__":
    main()
