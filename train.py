"""Fine-tune a Pythia model into Dolly on databricks-dolly-15k.

    python train.py --size 70m                                   # one process (CPU or one GPU)
    torchrun --nproc_per_node 8 train.py --size 12b --activation-checkpointing
    python train.py --size 12b --dry-run --world-size 8          # the memory plan only
    python train.py --size 12b --lora-rank 16 --merge            # LoRA: adapters beside the frozen base

The loop lives in minidolly/train.py; docs/training.md explains it. This file only parses
flags. A mistake in a flag or an input file prints one line and exits 2.
"""

import argparse
import os
import sys

from minidolly.train import KERNELS, PRECISIONS, SCHEDULES, TrainConfig, TrainingStopped, UsageError, dry_run, train


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line and exit 2, like ours
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except where there is none to show (None, a switch
    that is off) or the help text already says it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None) -> TrainConfig:
    """Flags -> TrainConfig (defaults: Dolly v2's recipe)."""
    d = TrainConfig()
    p = _Parser(description="Fine-tune a GPT-NeoX/Pythia model on databricks-dolly-15k (Dolly v2's recipe).",
                formatter_class=_Help)
    g = p.add_argument_group("model and data")
    g.add_argument("--size", help="Pythia shape: 14m, 31m, 70m, 160m, 410m, 1b, 1.4b, 2.8b, 6.9b, 12b")
    g.add_argument("--init", help="weights to start from: a local HF checkpoint dir, a Hub id, or 'scratch' "
                                  "(default: EleutherAI/pythia-<size>)")
    g.add_argument("--tokenizer", help="tokenizer.json file or dir (default: the --init checkpoint's; "
                                       "EleutherAI/pythia-<size> for scratch)")
    g.add_argument("--data", help="databricks-dolly-15k .jsonl (default: download it from the Hub)")
    g.add_argument("--skip-bad-records", action="store_true", help="skip malformed lines instead of stopping")
    g.add_argument("--max-length", type=int, default=d.max_length, help="drop examples longer than this (tokens)")
    g.add_argument("--val-size", type=int, default=d.val_size, help="examples held out for validation")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training set")
    g.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    g.add_argument("--global-batch-size", type=int, default=d.global_batch_size, help="examples per optimizer step")
    g.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size, help="examples per forward per rank")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps (default: 50, or a tenth of a shorter run)")
    g.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help="after warmup")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay (not on biases/LayerNorms)")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="clip gradients to this norm (0: off)")
    g.add_argument("--seed", type=int, default=d.seed, help="data order, validation split, scratch init")
    g = p.add_argument_group("LoRA (low-rank adapters beside the frozen base; docs/training.md)")
    g.add_argument("--lora-rank", type=int, default=d.lora_rank,
                   help="train LoRA adapters of this rank instead of every weight (0: full fine-tune)")
    g.add_argument("--lora-alpha", type=float, help="the update is scaled by alpha / rank (default: 2 x rank)")
    g.add_argument("--lora-dropout", type=float, help="dropout on the adapters' input (default: 0.05)")
    g.add_argument("--lora-targets", help="query_key_value (default, PEFT's for GPT-NeoX), all-linear, or a comma "
                                          "list of: query_key_value, dense, dense_h_to_4h, dense_4h_to_h")
    g.add_argument("--merge", action="store_true", help="also write final-merged/: the base with the adapters "
                                                        "folded in (Hugging Face format)")
    g = p.add_argument_group("memory and precision")
    g.add_argument("--precision", choices=PRECISIONS, default=d.precision, help="auto: bf16 on GPU, fp32 on CPU")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute each layer in backward")
    g.add_argument("--compile", action="store_true", help="torch.compile each layer (needs a C++ compiler on CPU)")
    g.add_argument("--cpu-offload", action="store_true", help="keep parameters, gradients and AdamW state in host RAM")
    g.add_argument("--kernels", choices=KERNELS, default=d.kernels,
                   help="our Triton LayerNorm and attention: auto (on a GPU that runs them), on, off (torch's)")
    g.add_argument("--dry-run", action="store_true", help="print the per-rank memory plan and exit")
    g.add_argument("--world-size", type=int, help="with --dry-run: plan for this many ranks")
    g.add_argument("--device-memory", type=float, help="with --dry-run: plan for GPUs with this many GiB")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="output directory (default: runs/dolly-<size>)")
    g.add_argument("--log-every", type=int, default=d.log_every, help="steps between progress lines")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between validations (0: start and end only)")
    g.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints (0: none)")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="how many checkpoints to keep")
    g.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in --out "
                                                         "(--lr, warm-up, schedule, clipping, steps and cadence may change)")
    g.add_argument("--overwrite", action="store_true", help="replace the run already in --out (without it, a run "
                                                            "refuses an --out that holds one)")
    g.add_argument("--stop-after-step", type=int, help=argparse.SUPPRESS)  # tests: simulate a crash
    return TrainConfig(**vars(p.parse_args(argv)))


def main(argv=None) -> int:
    cfg = parse_args(argv)
    quiet = int(os.environ.get("RANK", 0)) != 0  # every rank hits the same error; one says it
    try:
        if cfg.dry_run:
            plan = dry_run(cfg)
            print(plan)
            return 0
        train(cfg)
    except UsageError as e:
        if not quiet:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        if not quiet:
            print(f"stopped: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
