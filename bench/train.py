"""Training-step throughput: minidolly vs transformers, and MFU against a measured matmul peak.

    python bench/train.py                       # pythia-70m and 160m shapes, seq 512, CPU fp32
    python bench/train.py --sizes 70m --batch 2 --steps 3

One step = forward + backward + AdamW on one batch of random tokens, single process, fp32.
"minidolly" is the training loop's own step (minidolly.train.loss_sum, sharded by FSDP2
over a one-rank group, exactly as train.py runs it); "transformers" is GPTNeoXForCausalLM
with the same weights, computing its loss from `labels=`. FLOPs per step are
6·N·tokens + 12·L·T·C·tokens (N: parameters that do matmuls, i.e. all but embed_in;
the second term is attention's QK^T and AV, forward and backward), and MFU is achieved
FLOP/s over the speed of a 2048³ fp32 matmul. The three are timed interleaved (ours, theirs,
matmul, ours, ...) and each reported as its median, so a busy machine slows all alike.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minidolly.config import ModelConfig  # noqa: E402
from minidolly.model import GPTNeoX  # noqa: E402
from minidolly.parallel import apply_fsdp, init_distributed  # noqa: E402
from minidolly.train import TrainConfig, build_optimizer, loss_sum  # noqa: E402


def matmul(n: int = 2048):
    """A closure doing one n x n x n fp32 matmul: 2·n³ FLOP, the peak a model step can hope for."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return lambda: a @ b


def time_interleaved(steps: dict, repeats: int) -> dict:
    """Median seconds per call of each function, after two warm-up calls each. The calls
    alternate (a, b, a, b, ...) so that load from elsewhere on the machine hits both alike."""
    for step in steps.values():
        step()
        step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench(size: str, batch: int, seq: int, steps: int) -> dict:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = ModelConfig.from_size(size)
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    data = {"input_ids": ids, "labels": ids}

    ours = GPTNeoX(config)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    # The same model without FSDP: separates what the model costs from what a one-rank
    # FSDP group adds (the loop keeps FSDP so one process runs the N-rank code path).
    bare = GPTNeoX(config)
    bare.load_state_dict(state)
    bare_opt, _ = build_optimizer(bare, TrainConfig(lr=1e-5, warmup_steps=0), total_steps=100)

    def bare_step():
        (loss_sum(bare, data, torch.device("cpu")) / (batch * (seq - 1))).backward()
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    apply_fsdp(ours)
    opt, _ = build_optimizer(ours, TrainConfig(lr=1e-5, warmup_steps=0), total_steps=100)  # the loop's own

    def our_step():
        (loss_sum(ours, data, torch.device("cpu")) / (batch * (seq - 1))).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    hf = GPTNeoXForCausalLM(GPTNeoXConfig(**config.to_hf())).train()
    head = "lm_head.weight" if "lm_head.weight" in hf.state_dict() else "embed_out.weight"  # transformers 5 renamed it
    hf.load_state_dict({(head if k == "embed_out.weight" else "gpt_neox." + k): v for k, v in state.items()})
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, fused=True)  # the HF Trainer's default, adamw_torch_fused

    def hf_step():
        hf(input_ids=ids, labels=ids).loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    n = 2048
    t = time_interleaved({"ours": our_step, "bare": bare_step, "hf": hf_step, "matmul": matmul(n)}, steps)
    n_matmul = config.num_params() - config.vocab_size * config.hidden_size
    tokens = batch * seq
    flops = 6 * n_matmul * tokens + 12 * config.num_layers * seq * config.hidden_size * tokens
    return {"size": size, "tokens": tokens, "ours": t["ours"], "bare": t["bare"], "hf": t["hf"], "flops": flops, "peak": 2 * n**3 / t["matmul"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["70m", "160m"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    init_distributed()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch {args.batch} x seq {args.seq}, "
          f"median of {args.steps} interleaved steps")
    print(f"{'shape':<8}{'minidolly tok/s':>17}{'transformers tok/s':>20}{'ratio':>8}"
          f"{'no-FSDP tok/s':>15}{'ratio':>8}{'matmul GFLOP/s':>16}{'MFU ours':>10}{'MFU hf':>8}")
    for size in args.sizes:
        r = bench(size, args.batch, args.seq, args.steps)
        ours, bare, hf = r["tokens"] / r["ours"], r["tokens"] / r["bare"], r["tokens"] / r["hf"]
        print(f"{size:<8}{ours:>17,.0f}{hf:>20,.0f}{ours / hf:>7.2f}x{bare:>15,.0f}{bare / hf:>7.2f}x{r['peak'] / 1e9:>16.1f}"
              f"{r['flops'] / r['ours'] / r['peak']:>10.0%}{r['flops'] / r['hf'] / r['peak']:>8.0%}")


if __name__ == "__main__":
    main()
