"""Quantization quality, measured: how far 16/8/4-bit weights move the next-token distributions,
ours and llama.cpp's, on the same checkpoint and the same real dolly records.

    python bench/quality.py --model runs/dolly-31m/final              # a checkpoint trained on the records
    python bench/quality.py --model runs/dolly-31m/final --examples 16 --no-llama

For each held-out example (the validation split train.py makes: --val-size 200, --seed 0, of
the records in ../shared/data), the whole training text (Dolly's prompt, the response,
`### End`) goes through the full-precision model (ours, fp32) and through each quantized one.
At every position we compare the next-token distributions P (full precision) and Q:
    KL     mean over positions of KL(P || Q) = sum_v P(v) (log P(v) - log Q(v)), in nats
    top-1  how often argmax Q is argmax P
llama.cpp runs through llama-cpp-python (logits_all=True) on GGUF files of the same weights:
f32 written by save_gguf (its row checks the two implementations agree), q8_0 and q4_0 made
from that f32 file by llama.cpp's own quantizer (llama_model_quantize, default settings, as
users make them: q4_0 keeps `output` in q6_K), and save_gguf's own q8_0 / q4_0.
"bits" is bits per weight of the block matrices (scales and zeros included).
"ours fp16 / bf16 (weight-only)" are load_model(quantize="fp16" / "bf16"): 16-bit weights, fp32
activations, as a prompt and a compiled decode step compute them (eager batch-1 decoding
rounds each linear's input and output to 16 bits as well: the "... in/out*" rows).
Every row of ours runs the text as a prompt through the KV cache generate would use: for
quantized weights its keys and values are fp16, as llama.cpp's f16 cache holds them
(generate.choose_kv_dtype); the "fp32 cache" rows keep them exact, to show the cache's share.
Rows marked * are numerics only: 16-bit weights in an fp32 model (F.linear on fp32 copies of the
16-bit weights, with the roundings of the input and output a kernel would make); they say where
whole-model bf16 loses its accuracy (docs/generation.md, "The 16-bit quality gap").

The checkpoint matters: random weights give nearly flat distributions, on which any error
looks small and top-1 is a coin toss. Train one on the records first (a few minutes on CPU):
    python train.py --size 31m --init scratch --tokenizer ../shared/data/gpt-neox-20b-tokenizer.json \\
        --data ../shared/data/databricks-dolly-15k.head789.jsonl --max-steps 500 --global-batch-size 8 \\
        --micro-batch-size 8 --max-length 512 --lr 1e-3 --warmup-steps 50 --out runs/dolly-31m
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minidolly import load_model, load_tokenizer, save_gguf  # noqa: E402
from minidolly.data import load_records, tokenize_records, train_val_split  # noqa: E402
from minidolly.generate import generation_cache  # noqa: E402
from minidolly.quantize import cpu_description  # noqa: E402

RECORDS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                       "databricks-dolly-15k.head789.jsonl")


def kl_top1(ref_logp: torch.Tensor, logits: torch.Tensor) -> tuple[float, float, int]:
    """(sum of KL(P || Q) over positions, top-1 matches, positions) for (T, V) log P and logits of Q."""
    logq = torch.log_softmax(logits.double(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logq)).sum(-1)
    return kl.sum().item(), (logq.argmax(-1) == ref_logp.argmax(-1)).sum().item(), ref_logp.shape[0]


@torch.inference_mode()
def ours_logits(model, ids: list[int], kv_dtype=None) -> torch.Tensor:
    """(T, V) logits of the text as one prompt through a generation cache, whose keys and values
    are in generate's dtype for the model (choose_kv_dtype: fp16 for quantized weights, as
    llama.cpp's rows go through its f16 cache), or in `kv_dtype`."""
    cache = generation_cache(model, 1, len(ids), reuse=False, kv_dtype=kv_dtype)
    return model(torch.tensor([ids]), cache=cache)[0].float()


class WeightOnly16(torch.nn.Module):
    """A linear with `dtype` weights in an fp32 model: its input rounded to `io`, its output
    to `io` too unless out_fp32 (numerics only, see the docstring's rows marked *)."""

    def __init__(self, linear, dtype, io, out_fp32=False):
        super().__init__()
        self.weight = linear.weight.detach().to(dtype).float()  # the 16-bit values, held in fp32
        self.bias, self.io, self.out_fp32 = linear.bias, io, out_fp32

    def forward(self, x):
        y = torch.nn.functional.linear(x.to(self.io).float(), self.weight)
        y = y if self.out_fp32 else y.to(self.io).float()
        return y if self.bias is None else y + self.bias


def weight_only_16(model, dtype, io, logits_fp32):
    """`model` (fp32) with every linear a WeightOnly16; embed_out's output in fp32 if logits_fp32."""
    for name, m in list(model.named_modules()):
        if isinstance(m, torch.nn.Linear):
            model.set_submodule(name, WeightOnly16(m, dtype, io, logits_fp32 and name == "embed_out"))
    return model


def llama_logits(path: str, n_ctx: int):
    """A function ids -> (T, V) logits of llama.cpp on the GGUF file at `path`."""
    import llama_cpp

    llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False)

    def run(ids):
        llm.reset()
        llm.eval(ids)  # the whole text in one batch (multi-token evaluation)
        return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))

    return run


def llama_quantize(src: str, dst: str, ftype: str) -> str:
    """llama.cpp's own quantizer (llama-quantize's library call) with its default settings."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[ftype]
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed on {src}")
    return dst


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a full-precision checkpoint directory with tokenizer.json")
    p.add_argument("--data", default=RECORDS)
    p.add_argument("--examples", type=int, default=32, help="held-out examples to score")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--group-sizes", nargs="+", type=int, default=[32, 64, 128])
    p.add_argument("--no-llama", action="store_true", help="skip llama.cpp's rows")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer(args.model)
    records, _ = load_records(args.data)
    examples, _ = tokenize_records(records, tokenizer, args.max_length)
    _, val = train_val_split(examples, 200, 0)  # train.py's defaults: records it did not learn from
    texts = [e.input_ids for e in val[: args.examples]]
    full = load_model(args.model, dtype=torch.float32)
    refs = [torch.log_softmax(ours_logits(full, ids).double(), dim=-1) for ids in texts]
    C = full.config.hidden_size

    rows = []  # (name, bits, run(ids) -> logits)
    for dtype in (torch.bfloat16, torch.float16):  # the whole model in 16 bits, as --dtype runs it
        m = load_model(args.model, dtype=dtype)
        rows.append((f"ours {str(dtype)[6:]}", 16, lambda ids, m=m: ours_logits(m, ids)))
    for mode in ("fp16", "bf16"):
        m = load_model(args.model, quantize=mode)
        rows.append((f"ours {mode} (weight-only)", 16, lambda ids, m=m: ours_logits(m, ids)))
        if mode == "fp16":
            rows.append(("ours fp16 (w-only), fp32 cache", 16, lambda ids, m=m: ours_logits(m, ids, torch.float32)))
    for name, dtype, io, logits_fp32 in (("bf16 weights, bf16 in/out*", torch.bfloat16, torch.bfloat16, False),
                                         ("bf16 weights, fp32 in/out*", torch.bfloat16, torch.float32, True),
                                         ("fp16 weights, fp16 in/out*", torch.float16, torch.float16, False),
                                         ("fp16 w, fp16 in/out, fp32 logits*", torch.float16, torch.float16, True)):
        m = weight_only_16(load_model(args.model, dtype=torch.float32), dtype, io, logits_fp32)
        rows.append((name, 16, lambda ids, m=m: ours_logits(m, ids)))
    int8 = load_model(args.model, quantize="int8")
    rows.append(("ours int8 (per channel)", 8 + 16 / C, lambda ids: ours_logits(int8, ids)))
    rows.append(("ours int8, fp32 cache", 8 + 16 / C, lambda ids: ours_logits(int8, ids, torch.float32)))
    for g in args.group_sizes:
        m = load_model(args.model, quantize="int4", group_size=g)
        rows.append((f"ours int4 g{g} (embed_out int8)", 4 + 32 / g, lambda ids, m=m: ours_logits(m, ids)))
    tmp = tempfile.TemporaryDirectory()
    if not args.no_llama:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("(llama.cpp rows skipped: pip install llama-cpp-python)")
        else:
            f32 = save_gguf(args.model, os.path.join(tmp.name, "f32.gguf"), "f32")
            n_ctx = max(len(t) for t in texts)
            rows.append(("llama.cpp f32 (check)", 32, llama_logits(f32, n_ctx)))
            rows.append(("llama.cpp f16", 16, llama_logits(save_gguf(args.model, os.path.join(tmp.name, "f16.gguf"), "f16"), n_ctx)))
            for t, bits in (("q8_0", 8.5), ("q4_0", 4.5)):
                path = llama_quantize(f32, os.path.join(tmp.name, f"llama.{t}.gguf"), t)
                rows.append((f"llama.cpp {t} (llama-quantize)", bits, llama_logits(path, n_ctx)))
                ours = save_gguf(args.model, os.path.join(tmp.name, f"ours.{t}.gguf"), t)
                rows.append((f"llama.cpp {t} (save_gguf)", bits, llama_logits(ours, n_ctx)))

    positions = sum(len(t) for t in texts)
    print(f"CPU: {cpu_description()}; torch {torch.__version__}")
    print(f"{args.model}: {len(texts)} held-out dolly examples, {positions} positions; "
          f"full-precision reference: minidolly fp32; mean top-1 probability {np.mean([r.exp().max(-1).values.mean().item() for r in refs]):.2f}")
    print(f"{'weights':<34}{'bits':>6}{'KL (nats)':>12}{'top-1':>8}")
    for name, bits, run in rows:
        kl = top1 = n = 0
        for ids, ref in zip(texts, refs):
            a, b, c = kl_top1(ref, run(ids))
            kl, top1, n = kl + a, top1 + b, n + c
        print(f"{name:<34}{bits:>6.2f}{kl / n:>12.2e}{top1 / n:>8.1%}", flush=True)
    tmp.cleanup()


if __name__ == "__main__":
    main()
