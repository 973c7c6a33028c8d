"""A training run's own checkpoints, for `train.py --resume`: sharded
torch.distributed.checkpoint (DCP) snapshots under <out>/checkpoints/step-XXXXXXXX/, and the
policy that decides what a run continues from.

    path = save_checkpoint(out, step, model, optimizer, scheduler, sampler, keep=2)
    path = resume_from(out, resume=True)        # the resume policy; None: start afresh
    step = load_checkpoint(path, model, optimizer, scheduler, sampler)

A checkpoint holds everything needed to continue a run exactly, on any number of ranks and on
another kind of device: model and optimizer shards, the LR schedule, the step, the data
sampler's position and each rank's random generators. Only parameters that train are saved
(`requires_grad`); frozen ones come from --init again. A LoRA run's checkpoints also record its
LoRA settings and its base's identity, which `check_lora_settings` holds a resume to.

This is not the model file format: minidolly/checkpoint.py reads and writes Hugging Face
checkpoints (the --init weights, <out>/final/), which `load_model`, transformers and
generate.py read. Nor is it activation checkpointing (minidolly/parallel.py), which trades
compute for memory inside a step.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

# Saved and restored: the trainable parameters and their optimizer state. Full fine-tuning
# trains all of them; with frozen parameters `strict=False` lets those keep what --init gave.
_TRAINABLE = StateDictOptions(ignore_frozen_params=True, strict=False)


class ResumeError(ValueError):
    """The checkpoints in --out do not allow this start or resume; the message says why and
    which flag to change."""


def checkpoint_dirs(out: str) -> list[str]:
    """Complete checkpoints under <out>/checkpoints, oldest first (a `.tmp` is an
    interrupted save and never counts)."""
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if n.startswith("step-") and n[5:].isdigit()]
    return [os.path.join(root, n) for n in sorted(names, key=lambda n: int(n[5:]))]


def resume_from(out: str, resume: bool) -> str | None:
    """The resume policy: the checkpoint a run in `out` continues from, or None to start afresh.

    With `resume` it is the newest complete checkpoint; without, `out` must hold none, so a
    new run never mixes its checkpoints with an earlier run's. Raises ResumeError (naming the
    flag to use) otherwise.
    """
    existing = checkpoint_dirs(out)
    if resume and not existing:
        raise ResumeError(f"--resume: {out}/checkpoints holds no checkpoint; start without --resume.")
    if not resume and existing:
        raise ResumeError(f"{out} holds checkpoints of an earlier run; pass --resume to continue it, "
                          f"or another --out (or delete the directory) to start afresh.")
    return existing[-1] if resume else None


# ------------------------------------------------------------------ the state


def rng_state() -> dict[str, torch.Tensor]:
    """This process's random generators, by device type: "cpu", and "cuda" (the current
    GPU's) where there is one."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore the generators `state` has (from `rng_state`) that this process also has; a
    generator missing from it (a CPU checkpoint resumed on a GPU) keeps its --seed state."""
    if "cpu" in state:
        torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _state(model, optimizer, step: int, scheduler, sampler) -> dict:
    """The dict DCP saves (and loads into): tensors are sharded or per-rank, the rest is
    pickled by rank 0. Nested keys flatten to dotted names, e.g. "rng.rank1.cuda"."""
    model_state, optim_state = get_state_dict(model, optimizer, options=_TRAINABLE)
    return {"model": model_state, "optimizer": optim_state,
            "train": {"step": step, "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict()},
            f"rng.rank{dist.get_rank()}": rng_state()}


def _reader(path: str) -> dcp.FileSystemReader:
    """The one place a checkpoint directory is opened for reading."""
    return dcp.FileSystemReader(path)


# --------------------------------------------------------------- save and load


def save_checkpoint(out: str, step: int, model, optimizer, scheduler, sampler, keep: int,
                    lora: dict | None = None) -> str:
    """Write a sharded DCP checkpoint of everything a resume needs (see the module docstring)
    into <out>/checkpoints/step-XXXXXXXX; every rank calls it. `lora`: a LoRA run's
    settings and base identity, which `check_lora_settings` compares on resume.

    All ranks write into step-XXXXXXXX.tmp; after a barrier rank 0 renames it into place and
    deletes all but the newest `keep`. A crash mid-save leaves only a .tmp behind, which
    resume ignores, so the previous checkpoint stays the latest good one. Returns the path.
    """
    final = os.path.join(out, "checkpoints", f"step-{step:08d}")
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    state = _state(model, optimizer, step, scheduler, sampler)
    if lora is not None:
        state[LORA_KEY] = json.dumps(lora, sort_keys=True)
    dcp.save(state, checkpoint_id=tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: str, model, optimizer, scheduler, sampler) -> int:
    """Restore a checkpoint written by `save_checkpoint`; every rank calls it. Returns the
    step it was taken after.

    Any world size (DCP reshards), any device: a rank restores the random generators that
    both its saver and itself have (a rank that did not exist before keeps its --seed state).
    Raises ResumeError when the sampler's data, seed or global batch size differ from the
    checkpoint's.
    """
    state = _state(model, optimizer, 0, scheduler, sampler)
    saved = _reader(path).read_metadata().state_dict_metadata
    rng_key = f"rng.rank{dist.get_rank()}"
    state[rng_key] = {k: v for k, v in state[rng_key].items() if f"{rng_key}.{k}" in saved}
    if not state[rng_key]:
        del state[rng_key]
    dcp.load(state, storage_reader=_reader(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_TRAINABLE)
    scheduler.load_state_dict(state["train"]["scheduler"])
    try:
        sampler.load_state_dict(state["train"]["sampler"])
    except ValueError as e:
        raise ResumeError(f"--resume from {path}: {e}") from None
    set_rng_state(state.get(rng_key, {}))
    return int(state["train"]["step"])


# ------------------------------------------------------------- LoRA runs

LORA_KEY = "lora"  # a LoRA run's settings and base identity, as one JSON string
LORA_FLAGS = {"rank": "--lora-rank", "alpha": "--lora-alpha", "dropout": "--lora-dropout", "targets": "--lora-targets"}


def check_lora_settings(path: str, lora: dict | None) -> None:
    """Refuse to resume a LoRA run from checkpoint `path` with other LoRA settings or on another
    base. `lora` is this run's record (the LoRA settings, "base": the --init it names,
    "base_fingerprint": `checkpoint.fingerprint` of its files), None for a full fine-tune.

    The checkpoint holds only the adapters; the frozen base comes from --init again, so a
    resume on another base would silently train adapters for weights they were not fitted
    to. Raises ResumeError naming every setting that differs (the checkpoint's value
    beside this run's), and for a base, both bases."""
    saved_keys = _reader(path).read_metadata().state_dict_metadata
    saved = None
    if LORA_KEY in saved_keys:
        box = {LORA_KEY: ""}
        dcp.load(box, storage_reader=_reader(path))
        saved = json.loads(box[LORA_KEY])
    if saved is None and lora is None:
        return
    if saved is None or lora is None:
        was, now = ("a full fine-tune", "LoRA") if saved is None else (f"LoRA (--lora-rank {saved['rank']})", "a full fine-tune")
        raise ResumeError(f"--resume: {path} is a checkpoint of {was} but this run is {now}; "
                          f"resume with the first run's LoRA flags.")
    show = lambda v: ",".join(v) if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else v  # noqa: E731
    differ = [f"{flag} {show(lora[key])} (checkpoint: {show(saved[key])})" for key, flag in LORA_FLAGS.items()
              if lora[key] != saved[key]]
    if differ:
        raise ResumeError(f"--resume: {path} was trained with other LoRA settings: {'; '.join(differ)}; "
                          f"resume with the first run's.")
    if lora["base_fingerprint"] != saved["base_fingerprint"]:
        raise ResumeError(f"--resume: {path} holds adapters trained on the base {saved['base']}, but --init "
                          f"{lora['base']} has other weights; resume with the first run's --init.")
