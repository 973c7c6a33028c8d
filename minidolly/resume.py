"""A training run's own checkpoints, for `train.py --resume`: sharded
torch.distributed.checkpoint (DCP) snapshots under <out>/checkpoints/step-XXXXXXXX/, and the
policy that decides what a run in --out continues from.

    path, notes = resume_from(out, resume=True, overwrite=False)   # the policy; None: start afresh
    saved = read_run(path)                                         # the settings it was made with
    step = load_checkpoint(path, model, optimizer, scheduler, sampler)
    path = save_checkpoint(out, step, model, optimizer, scheduler, sampler, keep=2, run=saved)

A checkpoint holds everything needed to continue a run exactly, on any number of ranks and on
another kind of device: model and optimizer shards, the LR schedule's position, the step, the
data sampler's position, each rank's random generators, and `run`, a dict of plain values the
loop records (the settings the run was made with). Only parameters that train are saved
(`requires_grad`); frozen ones come from --init again (a LoRA run records its base's
fingerprint in `run`, so a resume cannot pair its adapters with other weights).

What keeps it safe (docs/training.md, "What is safe"):
- A checkpoint appears under its name only when complete: every rank writes into
  step-XXXXXXXX.tmp, then `manifest.json` (every file's name, size and sha256) is written last,
  and only then is the directory renamed into place. Old checkpoints are renamed to .tmp before
  they are deleted, and anything named .tmp is never resumed from.
- Resume checks the manifest of the newest checkpoint and falls back to the newest intact one.
- A save that fails (a full disk) removes its .tmp and leaves the previous checkpoint as it was.
- Nothing in a checkpoint is executed: `.metadata` is read by an allow-list unpickler, the
  pickled plain values by torch's weights-only unpickler.

torch.distributed.checkpoint is imported inside the functions that use it: it pulls in
DTensor (a second or more), which `train.py --dry-run` and the resume policy never need.

This is not the model file format: minidolly/checkpoint.py reads and writes Hugging Face
checkpoints (the --init weights, <out>/final/), which `load_model`, transformers and
generate.py read. Nor is it activation checkpointing (minidolly/parallel.py), which trades
compute for memory inside a step.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil

import torch
import torch.distributed as dist

MANIFEST = "manifest.json"
# What a run writes into --out; an --out holding any of them holds a run.
RUN_FILES = ("train_config.json", "metrics.jsonl", "checkpoints", "final", "loss.png")


class ResumeError(ValueError):
    """The checkpoints in --out do not allow this start or resume; the message says why and
    which flag to change."""


class UnsafeCheckpointError(ResumeError):
    """A checkpoint file asks the unpickler for something a checkpoint never holds."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (a full disk, say); the previous one is intact."""


# ------------------------------------------------------------------ the policy


def checkpoint_dirs(out: str) -> list[str]:
    """The checkpoints under <out>/checkpoints by name, oldest first. A `.tmp` (an interrupted
    save, or a checkpoint being deleted) never counts; whether one of these is complete is
    `verify_checkpoint`'s to say."""
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if n.startswith("step-") and n[5:].isdigit()]
    return [os.path.join(root, n) for n in sorted(names, key=lambda n: int(n[5:]))]


def check_out(out: str) -> None:
    """Raise ResumeError unless `out` is, or can become, a directory this process may write."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ResumeError(f"--out {out} is a file, not a directory; pass a directory (it is created if missing).")
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ResumeError(f"--out {out} lies under {existing}, which is a file, not a directory; pass another --out.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ResumeError(f"--out {out}: {existing} is not writable by this user; pass a directory you can write to.")


def resume_from(out: str, resume: bool, overwrite: bool = False) -> tuple[str | None, list[str]]:
    """The resume policy: the checkpoint a run in `out` continues from (None: start afresh),
    and the lines to tell the user about checkpoints it passed over. Every rank calls it.

    `out` must be a writable directory (`check_out`). Without `resume`, `out` must hold no
    earlier run (`RUN_FILES`) unless `overwrite`, so a new run never replaces or mixes with an
    earlier one unasked. With `resume` it is the newest checkpoint that passes
    `verify_checkpoint`; each newer one that fails is named. Raises ResumeError (naming the
    flag to use) otherwise.
    """
    check_out(out)
    if not resume:
        held = [n for n in RUN_FILES if os.path.exists(os.path.join(out, n))]
        if held and not overwrite:
            raise ResumeError(f"{out} already holds a run ({', '.join(held)}); pass --resume to continue it, "
                              f"--overwrite to replace it, or another --out.")
        return None, []
    candidates = _from_rank0(checkpoint_dirs(out))  # every rank walks the same list
    if not candidates:
        held = any(os.path.exists(os.path.join(out, n)) for n in RUN_FILES)
        raise ResumeError(f"--resume: {out} holds no checkpoint to resume from; start afresh "
                          f"{'with --overwrite' if held else 'without --resume'}.")
    notes, problems = [], []
    for path in reversed(candidates):
        problem = verify_checkpoint(path)
        if problem is None:
            if notes:
                notes.append(f"resuming from {path}, the newest intact checkpoint")
            return path, notes
        notes.append(f"skipping checkpoint {path}: {problem}")
        problems.append(f"{os.path.basename(path)}: {problem}")
    raise ResumeError(f"--resume: no checkpoint in {out}/checkpoints is intact ({'; '.join(problems)}); "
                      f"start afresh with --overwrite.")


def clear_run(out: str) -> None:
    """Delete what an earlier run wrote into `out` (`RUN_FILES`, nothing else): what
    --overwrite asks for, done once the new run is about to write its own."""
    for name in RUN_FILES:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


# ------------------------------------------------------------------ manifests


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _gather(obj) -> list:
    """`obj` from every rank, in rank order (just [obj] outside a process group)."""
    if not dist.is_initialized():
        return [obj]
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def _from_rank0(obj):
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _hash_files(directory: str, names: list[str]) -> dict[str, str]:
    """sha256 of each of `names` in `directory`; the ranks share the reading (each hashes every
    world-size'th file), so a save or a resume of a large model reads it once in all."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = {}
    for name in names[rank::world]:
        try:
            mine[name] = _sha256(os.path.join(directory, name))
        except OSError:
            mine[name] = None  # vanished or unreadable: the size check or the caller says so
    return {k: v for part in _gather(mine) for k, v in part.items()}


def _write_manifest(directory: str) -> None:
    """Every rank calls it: hash the files of a finished DCP save, then rank 0 writes
    manifest.json, flushed to disk, as the last file of the checkpoint."""
    names = _from_rank0(sorted(os.listdir(directory)))
    digests = _hash_files(directory, names)
    if dist.get_rank() == 0:
        files = {n: {"size": os.path.getsize(os.path.join(directory, n)), "sha256": digests[n]} for n in names}
        with open(os.path.join(directory, MANIFEST), "w") as f:
            json.dump({"files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())


def verify_checkpoint(path: str) -> str | None:
    """None when the checkpoint at `path` is complete: its manifest.json lists every file with
    the size and sha256 it has now. Otherwise what is wrong, in a few words. Every rank calls it
    (they share the hashing)."""
    problem, expected = _from_rank0(_check_sizes(path))
    if problem is None:
        digests = _hash_files(path, sorted(expected))
        problem = next((f"{name} does not match the sha256 in its manifest"
                        for name, (_, sha256) in sorted(expected.items()) if digests[name] != sha256), None)
    return problem


def _check_sizes(path: str) -> tuple[str | None, dict[str, tuple[int, str]]]:
    """(what is wrong or None, {file: (size, sha256)}) from the manifest and the files' sizes."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            files = json.load(f)["files"]
        expected = {name: (int(info["size"]), str(info["sha256"])) for name, info in files.items()}
    except FileNotFoundError:
        return f"it has no {MANIFEST} (an interrupted save or deletion, or a checkpoint of an older minidolly)", {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {MANIFEST} is unreadable", {}
    for name, (size, _) in sorted(expected.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing", {}
        if os.path.getsize(file) != size:
            return f"{name} has {os.path.getsize(file)} bytes where its manifest says {size}", {}
    return None, expected


# ------------------------------------------------------------------ safe reading


# Everything a DCP `.metadata` file names (torch 2.13): its dataclasses, torch.Size, dtypes and
# layouts, and the path it was saved to. The unpickler hands out these and nothing else.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata",
                                              "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size", *(name for name, value in vars(torch).items() if isinstance(value, torch.dtype))},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """pickle's Unpickler with an allow-list (the Python docs' "restricting globals"): a name
    outside `_METADATA_GLOBALS` is refused before anything is imported or called.

    Not torch's weights-only unpickler, which reads only pickle protocol 2: DCP writes
    `.metadata` with pickle's default protocol (4), whose framing and STACK_GLOBAL it rejects.
    """

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if name in _METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"{self.path} asks for {module}.{name}, which a checkpoint's metadata never "
                                    f"holds, so it was not loaded (has the file been tampered with?).")

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"{self.path} holds a persistent reference, which a checkpoint's metadata "
                                    f"never holds, so it was not loaded.")


def read_metadata(path: str):
    """The DCP `Metadata` of the checkpoint at `path`, read with `_MetadataUnpickler`. Raises
    UnsafeCheckpointError for a file that names anything else, ResumeError for one that is
    missing or cannot be parsed."""
    file = os.path.join(path, ".metadata")
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f, file).load()
    except ResumeError:
        raise
    except Exception as e:  # noqa: BLE001  a garbled pickle fails in many ways
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ResumeError(f"{file} could not be read ({type(e).__name__}: {reason}).") from None
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    if not isinstance(metadata, Metadata):
        raise ResumeError(f"{file} holds a {type(metadata).__name__}, not checkpoint metadata.")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()  # as FileSystemReader.read_metadata does
    return metadata


def _reader(path: str):
    """The one place a checkpoint directory is opened for reading: DCP's FileSystemReader with
    `.metadata` read by `read_metadata`, never by plain pickle."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self):  # no **kwargs: DCP then never falls back to per-rank metadata files
            metadata = read_metadata(path)
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def _planner(path: str):
    """DCP's load planner, except that the plain values (the step, the schedule, the sampler's
    position; DCP pickles whatever is not a tensor) are read by torch's weights-only unpickler
    instead of a full `torch.load`."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class WeightsOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            key = read_item.dest_index.fqn
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError:
                raise UnsafeCheckpointError(f"{path}: the entry {key} is a pickled object that is not plain data, so "
                                            f"it was not loaded (has the checkpoint been tampered with?).") from None
            set_element(self.original_state_dict, self.mappings[key], obj)  # DefaultLoadPlanner's own step

    return WeightsOnlyPlanner()


def _load(state: dict, path: str) -> None:
    """dcp.load `state` from the checkpoint at `path`, safely; a failure on any rank becomes a
    ResumeError naming the checkpoint."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(state, storage_reader=_reader(path), planner=_planner(path))
    except dcp.CheckpointException as e:  # DCP gathers every rank's failure into one
        failures = [exc for exc, _ in e.failures.values()]
        ours = [exc for exc in failures if isinstance(exc, ResumeError)]
        if ours:
            raise ours[0] from None
        raise ResumeError(f"--resume: {path} could not be loaded ({type(failures[0]).__name__}: "
                          f"{str(failures[0]).strip().splitlines()[0]}).") from None


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


def _state(model, optimizer, step: int, scheduler, sampler, run: dict | None = None) -> dict:
    """The dict DCP saves (and loads into): tensors are sharded or per-rank, the rest is
    pickled by rank 0. Nested keys flatten to dotted names, e.g. "rng.rank1.cuda"."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_trainable())
    state = {"model": model_state, "optimizer": optim_state,
             "train": {"step": step, "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict()},
             f"rng.rank{dist.get_rank()}": rng_state()}
    if run is not None:
        state["run"] = run
    return state


def _trainable():
    """Saved and restored: the trainable parameters and their optimizer state. Full fine-tuning
    trains all of them; with frozen parameters `strict=False` lets those keep what --init gave."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


# --------------------------------------------------------------- save and load


def save_checkpoint(out: str, step: int, model, optimizer, scheduler, sampler, keep: int,
                    run: dict | None = None) -> str:
    """Write a sharded DCP checkpoint of everything a resume needs (see the module docstring)
    into <out>/checkpoints/step-XXXXXXXX; every rank calls it. `run`: plain values to record
    with it (the loop's settings), which `read_run` returns.

    All ranks write into step-XXXXXXXX.tmp and hash what they wrote; rank 0 writes the
    manifest, renames the directory into place and deletes all but the newest `keep`
    (renaming each to .tmp first). A crash at any point leaves the previous checkpoint the
    newest complete one. Raises CheckpointSaveError when the save fails, after removing the
    partial .tmp (the previous checkpoint is untouched). Returns the path.
    """
    import torch.distributed.checkpoint as dcp

    root = os.path.join(out, "checkpoints")
    final = os.path.join(root, f"step-{step:08d}")
    tmp = final + ".tmp"
    if dist.get_rank() == 0 and os.path.isdir(root):  # leftovers of interrupted saves and deletions
        for name in os.listdir(root):
            if name.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    dist.barrier()
    error = None
    try:
        dcp.save(_state(model, optimizer, step, scheduler, sampler, run), checkpoint_id=tmp)
    except dcp.CheckpointException as e:  # raised alike on every rank
        error = next(exc for exc, _ in e.failures.values())
    if error is None:
        try:
            _write_manifest(tmp)
        except OSError as e:  # rank 0's write of the manifest
            error = e
    errors = [e for e in _gather(error) if e is not None]
    if errors:
        message = _save_failure(errors[0], final, tmp, root)  # before the .tmp goes: is the disk full?
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        raise CheckpointSaveError(message)
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)  # a corrupt checkpoint of this step, passed over on resume
        os.replace(tmp, final)
        for old in checkpoint_dirs(out)[:-keep]:
            os.replace(old, old + ".tmp")  # killed mid-deletion, it is a .tmp, never a half checkpoint
            shutil.rmtree(old + ".tmp", ignore_errors=True)
    dist.barrier()
    return final


def _save_failure(error: BaseException, final: str, tmp: str, root: str) -> str:
    """The sentence for a failed save of `final`. A full disk shows as ENOSPC, or, when the
    write happened inside torch.save, as a RuntimeError about the file position with no space
    left on the filesystem."""
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = None
    full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < 2**20)
    previous = [p for p in checkpoint_dirs(os.path.dirname(root)) if p != final]
    kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "there is no earlier checkpoint"
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if full:  # torch's own words for it ("unexpected pos 704 vs 598") would not help
        return (f"The disk is full: writing checkpoint {final} failed (no space left on the device); the partial {tmp} was removed and "
                f"{kept}. Free space on the filesystem of {root} and continue with --resume.")
    return (f"Writing checkpoint {final} failed ({type(error).__name__}: {reason}); the partial {tmp} was removed "
            f"and {kept}.")


def read_run(path: str) -> dict:
    """The `run` values saved with the checkpoint at `path` (what save_checkpoint's `run` held),
    without loading the weights; {} for a checkpoint saved without them. Every rank calls it."""
    saved = read_metadata(path).state_dict_metadata
    keys = [k.split(".")[1:] for k in saved if k.startswith("run.")]
    state: dict = {"run": {}}
    for parts in keys:  # rebuild the nested dict DCP flattened, e.g. "run.defines.seed"
        node = state["run"]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = None
    if keys:
        _load(state, path)
    return state["run"]


def load_checkpoint(path: str, model, optimizer, scheduler, sampler) -> int:
    """Restore a checkpoint written by `save_checkpoint`; every rank calls it. Returns the
    step it was taken after.

    From the checkpoint come the weights, AdamW's moments and step counts, the schedule's
    position, the data position and the random generators; from this run (what `optimizer`
    and `scheduler` were built with) come the hyperparameters: the learning rate, weight
    decay and the schedule's shape, so a resumed run may change them. Any world size (DCP
    reshards), any device: a rank restores the random generators that both its saver and
    itself have (a rank that did not exist before keeps its --seed state).
    Raises ResumeError when the sampler's data, seed or global batch size differ from the
    checkpoint's, or the checkpoint cannot be read safely.
    """
    from torch.distributed.checkpoint.state_dict import set_state_dict

    own_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    own_base_lrs = list(scheduler.base_lrs)
    state = _state(model, optimizer, 0, scheduler, sampler)
    saved = read_metadata(path).state_dict_metadata
    rng_key = f"rng.rank{dist.get_rank()}"
    state[rng_key] = {k: v for k, v in state[rng_key].items() if f"{rng_key}.{k}" in saved}
    if not state[rng_key]:
        del state[rng_key]
    _load(state, path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_trainable())
    schedule = state["train"]["scheduler"]
    # this step's rate under this run's schedule, as LambdaLR.get_lr computes it
    rates = [base * factor(schedule["last_epoch"]) for base, factor in zip(own_base_lrs, scheduler.lr_lambdas)]
    scheduler.load_state_dict({**schedule, "base_lrs": own_base_lrs, "_last_lr": rates})
    for group, own, lr in zip(optimizer.param_groups, own_groups, rates):
        group.update(own, lr=lr)
    try:
        sampler.load_state_dict(state["train"]["sampler"])
    except ValueError as e:
        raise ResumeError(f"--resume from {path}: {e}") from None
    set_rng_state(state.get(rng_key, {}))
    return int(state["train"]["step"])

