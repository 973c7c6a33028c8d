"""Ask Dolly: python generate.py [--model SOURCE] [options] "INSTRUCTION"

    python generate.py "Explain the difference between nuclear fission and fusion."
    python generate.py --model ./my-checkpoint --temperature 0 --context "$(cat notes.txt)" "Summarize this."
    python generate.py --interactive
    python generate.py --input-file questions.jsonl --output-file answers.jsonl --batch-size 8
    python generate.py --model ./my-checkpoint --quantize int4 "Explain gravity."
    python generate.py --model ./my-checkpoint --export-gguf dolly.q8_0.gguf --gguf-type q8_0
    python generate.py --serve --model ./my-checkpoint     # OpenAI-compatible API + chat page, docs/serving.md

stdout carries only the answers (streamed token by token unless --no-stream); loading
messages, warnings and --verbose timings go to stderr. A user mistake prints one line on
stderr and exits with status 2. All the work happens in minidolly/generate.py.

--output-file is written as OUTPUT.partial, one batch at a time, and renamed to OUTPUT when
every record is answered: a stopped run leaves any earlier OUTPUT as it was, and the same
command run again picks up OUTPUT.partial and answers only the records it lacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

from minidolly.generate import KV_CACHE_DTYPES, CompilerMissingError, SamplingError, check_sampling
from minidolly.gguf_export import GGUF_TYPES
from minidolly.quantize import DEFAULT_GROUP_SIZE, GROUP_SIZES, MODES
from minidolly.train import UsageError

KERNELS = {"auto": None, "on": True, "off": False}  # --kernels -> GPTNeoX.use_kernels


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise UsageError(f"{message} (see --help).")


def parse_args(argv):
    p = Parser(description="Generate Dolly answers with minidolly.")
    p.add_argument("instruction", nargs="?", help="the instruction to answer")
    p.add_argument("--model", default="databricks/dolly-v2-3b",
                   help="checkpoint directory or Hugging Face Hub id; the tokenizer comes from the same place")
    p.add_argument("--context", default=None, help="optional input text (the prompt's 'Input:' section)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.92, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-stream", action="store_true", help="print each answer only when it is complete")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step once (CUDA graphs on a GPU; on CPU inductor's own batch-1 GEMV, "
                        "1.6-1.9x eager at 410m); 20-30 s of compiling pays after its first answer, see docs/generation.md")
    p.add_argument("--kernels", choices=list(KERNELS), default="auto",
                   help="minidolly's Triton kernels in the prefill: auto = on a CUDA GPU that can run them")
    p.add_argument("--interactive", action="store_true", help="answer one instruction per line until 'exit' or Ctrl-D")
    p.add_argument("--input-file", help="jsonl with 'instruction' (and optional 'context') per line")
    p.add_argument("--output-file", help="jsonl written with each input record plus 'response', through OUTPUT.partial "
                        "(a stopped run resumes from it)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch with --input-file")
    p.add_argument("--verbose", action="store_true", help="timings on stderr (with --serve: one line per request)")
    # Weight formats (minidolly/quantize.py, minidolly/gguf_export.py; docs/generation.md).
    p.add_argument("--quantize", choices=MODES, default=None,
                   help="weight-only quantization applied at load (a checkpoint saved quantized loads as it was); "
                        "fp16 / bf16: 16-bit weights with the activations kept in --dtype (fp16: llama.cpp f16's "
                        "numerics; bf16: less accurate, faster with --compile)")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=None,
                   help=f"int4 group size (default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default="auto",
                   help="what the KV cache stores keys and values in; auto: float16 with --quantize and float32 "
                        "activations (as llama.cpp's cache), else --dtype")
    p.add_argument("--export-gguf", metavar="PATH", default=None,
                   help="write --model as a GGUF file for llama.cpp / Ollama, then exit")
    p.add_argument("--gguf-type", choices=GGUF_TYPES, default="f16",
                   help="the GGUF weight type for --export-gguf")
    add_serve_flags(p)
    args = p.parse_args(argv)
    check_serve_flags(p, args)
    if args.group_size is not None and args.quantize != "int4":
        raise UsageError("--group-size applies to --quantize int4 only.")
    if args.export_gguf is not None:  # a mode of its own: no instruction, no generation
        if args.instruction is not None or args.interactive or args.input_file or args.quantize or args.serve:
            raise UsageError("--export-gguf converts --model and exits; drop the instruction and generation flags.")
        return args

    try:
        check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    except SamplingError as e:
        raise UsageError(e.message("--" + e.param.replace("_", "-"))) from None
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}.")
    modes = (args.instruction is not None) + args.interactive + (args.input_file is not None) + args.serve
    if modes != 1:
        raise UsageError("Give exactly one of: an INSTRUCTION, --interactive, --input-file, or --serve.")
    if args.instruction is not None and not args.instruction.strip():
        raise UsageError("The instruction is empty; give the model something to answer.")
    if (args.input_file is None) != (args.output_file is None):
        raise UsageError("--input-file and --output-file go together.")
    if args.input_file is not None:
        for output in (args.output_file, partial_path(args.output_file)):
            if same_file(args.input_file, output):
                raise UsageError(f"--output-file {output} is the --input-file itself; writing it would destroy the "
                                 f"instructions. Pick another --output-file.")
    return args


def same_file(a: str, b: str) -> bool:
    """Whether paths a and b name one file (the same inode: links and other spellings too)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def partial_path(output_file: str) -> str:
    """Where --output-file's answers collect until every record is answered."""
    return output_file + ".partial"


def read_records(path):
    """The records of a jsonl file, each checked: a JSON object with a non-empty string
    `instruction` and an optional string (or null) `context`. Raises UsageError naming the line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"Cannot read --input-file {path}: {e}.") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} line {n} is not valid JSON ({e.msg}).") from None
        if not isinstance(r, dict):
            raise UsageError(f"{path} line {n} is not a JSON object.")
        if not isinstance(r.get("instruction"), str) or not r["instruction"].strip():
            raise UsageError(f"{path} line {n} has no non-empty string 'instruction'.")
        if r.get("context") is not None and not isinstance(r["context"], str):
            raise UsageError(f"{path} line {n}: 'context' must be a string or null.")
        records.append(r)
    if not records:
        raise UsageError(f"--input-file {path} holds no records.")
    return records


def load(args):
    """The model and tokenizer named by --model, on --device in --dtype."""
    import torch

    import kernels
    from minidolly import load_model, load_tokenizer, prepare_for_cpu

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu.")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    if args.kernels == "on" and (reason := kernels.unavailable_reason(device)) is not None:
        raise UsageError(f"--kernels on: minidolly's Triton kernels cannot run here: {reason}; "
                         "use --kernels auto or off.")
    print(f"loading {args.model} ({dtype}, {device}) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    weights = dict(dtype=getattr(torch, dtype), device=device, use_kernels=KERNELS[args.kernels], quantize=args.quantize,
                   group_size=args.group_size)
    try:
        # A Hub id fails fastest in load_model (one request, no retries); a local directory
        # fails fastest on a missing tokenizer.json, before gigabytes of weights are read.
        if os.path.exists(os.path.expanduser(args.model)):
            tokenizer = load_tokenizer(args.model)
            model = load_model(args.model, **weights)
        else:
            model = load_model(args.model, **weights)
            tokenizer = load_tokenizer(args.model)
    except (OSError, ValueError) as e:  # missing path, offline Hub id, corrupt file, --group-size vs a layer
        raise UsageError(f"Cannot load --model {args.model}: {e}") from None
    prepare_for_cpu(model, compile=args.compile)  # the CPU's fastest kernels, eager or compiled (minidolly/quantize.py)
    print(f"loaded in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
    return model, tokenizer


def answer(model, tokenizer, args, instruction, context):
    """Print one answer to stdout (streamed unless --no-stream) and timings with --verbose."""
    from minidolly import generate, stream

    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed, compile=args.compile, kv_cache_dtype=args.kv_cache_dtype)
    stats, streamed = {}, False
    try:
        if args.no_stream:
            print(generate(model, tokenizer, instruction, context, stats=stats, **kwargs), flush=True)
        else:
            for piece in stream(model, tokenizer, instruction, context, stats=stats, **kwargs):
                print(piece, end="", flush=True)
                streamed = True
            print(flush=True)
    except ValueError as e:
        if streamed:
            print(flush=True)  # end the cut-off answer's line
        raise UsageError(str(e)) from None
    if args.verbose:
        report(stats)


def report(stats):
    decode_rate = (stats["new_tokens"] - 1) / stats["decode_seconds"] if stats["decode_seconds"] > 0 else float("nan")
    print(f"prompt tokens {stats['prompt_tokens']}, new tokens {stats['new_tokens']}, "
          f"prefill {stats['prefill_seconds'] * 1e3:.0f} ms, decode {decode_rate:.1f} tokens/s", file=sys.stderr)


def answer_file(model, tokenizer, args, records):
    """Answer every record in batches of --batch-size into --output-file (jsonl, each input
    record plus "response"), through partial_path(--output-file): each batch is appended and
    flushed there, and the file is renamed to --output-file once every record is answered.
    Answers an earlier, stopped run left there are checked against the input and kept."""
    from minidolly import generate

    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed, compile=args.compile, kv_cache_dtype=args.kv_cache_dtype)
    partial = partial_path(args.output_file)
    done = answered_before(partial, records, args.input_file)
    if done:
        print(f"resuming: {done} of {len(records)} records already answered in {partial} (delete it to start over)",
              file=sys.stderr, flush=True)
    try:
        out = open(partial, "a", encoding="utf-8")
    except OSError as e:
        raise UsageError(f"Cannot write --output-file {args.output_file} (through {partial}): {e}.") from None
    with out:
        try:
            for i in range(done, len(records), args.batch_size):
                batch = records[i : i + args.batch_size]
                stats = {}
                try:
                    responses = generate(model, tokenizer, [r["instruction"] for r in batch],
                                         [r.get("context") for r in batch], stats=stats, **kwargs)
                except ValueError as e:
                    raise UsageError(f"{args.input_file} records {i + 1}-{i + len(batch)}: {e}") from None
                out.write("".join(json.dumps({**r, "response": response}, ensure_ascii=False) + "\n"
                                  for r, response in zip(batch, responses)))
                out.flush()
                print(f"{i + len(batch)}/{len(records)} answered", file=sys.stderr, flush=True)
                if args.verbose:
                    report(stats)
        except (KeyboardInterrupt, UsageError):
            print(f"stopped: the answers so far are in {partial}; the same command again resumes from there.",
                  file=sys.stderr, flush=True)
            raise
    os.replace(partial, args.output_file)


def answered_before(partial: str, records: list[dict], input_file: str) -> int:
    """How many of `records` a stopped run already answered in `partial` (0 when there is
    none). A last line cut off mid-write is dropped from the file. Raises UsageError when
    the file holds answers to other records."""
    try:
        with open(partial, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return 0
    except OSError as e:
        raise UsageError(f"Cannot read {partial}: {e}.") from None
    done = end = 0
    for n, line in enumerate(data.splitlines(keepends=True), 1):
        try:
            rec = json.loads(line) if line.endswith(b"\n") else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            rec = None
        if rec is None and end + len(line) == len(data):
            break  # the write of the last line was cut short
        if not isinstance(rec, dict) or n > len(records) or \
                {k: v for k, v in rec.items() if k != "response"} != records[n - 1]:
            raise UsageError(f"{partial} line {n} is not an answer to record {n} of --input-file {input_file}; "
                             f"delete it to start over, or pick another --output-file.")
        done, end = n, end + len(line)
    if end < len(data):
        with open(partial, "r+b") as f:
            f.truncate(end)
    return done


def interactive(model, tokenizer, args):
    """A read-answer loop on stdin; 'exit' or end of input (Ctrl-D) leaves."""
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "exit":
            print(file=sys.stderr)
            return
        if not line.strip():
            continue
        try:
            answer(model, tokenizer, args, line.strip(), args.context)
        except UsageError as e:  # one bad turn does not end the session
            print(f"error: {e}", file=sys.stderr)


def export_gguf(args):
    """--export-gguf: write --model as GGUF (minidolly/gguf_export.py)."""
    from minidolly import save_gguf

    print(f"writing {args.export_gguf} ({args.gguf_type}) from {args.model} ...", file=sys.stderr, flush=True)
    try:
        save_gguf(args.model, args.export_gguf, args.gguf_type)
    except (OSError, ValueError, ImportError) as e:  # missing model or gguf package, existing output, quantized model
        raise UsageError(f"Cannot export --model {args.model} to {args.export_gguf}: {e}") from None


# ---------------------------------------------------------------------- --serve
# An OpenAI-compatible API and a chat page over the batching engine (minidolly/serve.py,
# minidolly/engine.py, docs/serving.md).

PER_REQUEST_FLAGS = ("context", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "no_stream", "batch_size")
SERVE_FLAGS = ("host", "port", "max_batch_size", "max_queue")


def add_serve_flags(p):
    g = p.add_argument_group("serving", "python generate.py --serve --model DIR: an OpenAI-compatible API "
                                        "(/v1/chat/completions, /v1/completions) and a chat page (/)")
    g.add_argument("--serve", action="store_true", help="serve the model over HTTP until Ctrl-C")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    g.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together: the KV cache's slots")
    g.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; more get 503")


def check_serve_flags(p, args):
    """--serve's flags only with --serve, and the per-request flags not with it."""
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    if not args.serve:
        for name in SERVE_FLAGS:
            if getattr(args, name) != p.get_default(name):
                raise UsageError(f"{flag(name)} goes with --serve.")
        return
    for name in PER_REQUEST_FLAGS:
        if getattr(args, name) != p.get_default(name):
            raise UsageError(f"{flag(name)} does not apply to --serve: each request sets its own (docs/serving.md).")
    if args.max_batch_size < 1:
        raise UsageError(f"--max-batch-size must be >= 1, got {args.max_batch_size}.")
    if args.max_queue < 0:
        raise UsageError(f"--max-queue must be >= 0, got {args.max_queue}.")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}.")


def server_socket(args):
    """The socket --host and --port name, bound (before the model loads, so a busy port fails fast)."""
    try:
        from minidolly.serve import listen
    except ImportError as e:
        raise UsageError(f'--serve needs the serve extra: pip install -e ".[serve]" ({e}).') from None
    try:
        return listen(args.host, args.port)
    except OSError as e:
        raise UsageError(f"--host/--port: {e}") from None


def run_server(model, tokenizer, args, sock):
    """Serve until Ctrl-C: one line on stderr says where."""
    from minidolly.engine import Engine
    from minidolly.serve import serve

    try:
        engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                        compile=args.compile, kv_cache_dtype=args.kv_cache_dtype)
    except RuntimeError as e:
        if "memory" not in str(e).lower():
            raise
        raise UsageError(f"The KV cache for --max-batch-size {args.max_batch_size} does not fit in memory; "
                         f"lower --max-batch-size ({e}).") from None

    def ready(url):
        print(f"serving {args.model} on {url} (chat page {url}/, OpenAI API {url}/v1); Ctrl-C stops",
              file=sys.stderr, flush=True)

    try:
        serve(engine.start(), args.model, sock, on_ready=ready, access_log=args.verbose)
    finally:
        engine.close()


def main(argv=None) -> int:
    # Warnings (a truncated prompt) as one stderr line, without the source line Python adds.
    warnings.formatwarning = lambda message, category, *_: f"warning: {message}\n"
    try:
        args = parse_args(argv)
        if args.export_gguf is not None:
            export_gguf(args)
            return 0
        records = read_records(args.input_file) if args.input_file else None
        sock = server_socket(args) if args.serve else None  # a busy port fails before the model loads
        model, tokenizer = load(args)
        if sock is not None:
            run_server(model, tokenizer, args, sock)
        elif records is not None:
            answer_file(model, tokenizer, args, records)
        elif args.interactive:
            interactive(model, tokenizer, args)
        else:
            answer(model, tokenizer, args, args.instruction, args.context)
    except (UsageError, CompilerMissingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
