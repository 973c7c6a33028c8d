"""The run's own checkpoints and the resume policy, abused the way users abuse them: resumed
with other flags or other data, a second run into the same --out, tampered, corrupt and
half-deleted checkpoints, a full disk, a crash during the final save. Each case ends in one
sentence (and exit 2, or 1 for a stopped run) or in a run equal to an uninterrupted one.

The runs are test_train.py's tiny GPT-NeoX on the real Dolly records; `reference` is an
uninterrupted 4-step run with checkpoints after steps 2 and 4.
"""

import errno
import hashlib
import json
import os
import pathlib
import pickle
import random
import shutil

import pytest
import torch
from conftest import DOLLY_RECORDS, TOKENIZER_JSON
from test_train import (  # noqa: F401  (tiny, reference, one_rank are fixtures)
    _parts,
    cli,
    common,
    exit_code,
    final_weights,
    losses,
    metrics,
    one_rank,
    reference,
    tiny,
)

from minidolly import CheckpointError, load_model, resume


class MakesAFile:
    """Unpickling this opens (so creates) a file: what a malicious pickle does, harmlessly."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def copy_run(reference, tmp_path, name="run"):
    """A copy of the reference run, as a user's --out."""
    out = tmp_path / name
    shutil.copytree(reference, out)
    return out


def step_dir(out, step):
    return pathlib.Path(out) / "checkpoints" / f"step-{step:08d}"


def rewrite_manifest(path):
    """What an attacker who rewrites a checkpoint also does: a manifest that matches."""
    files = {n: {"size": (path / n).stat().st_size, "sha256": hashlib.sha256((path / n).read_bytes()).hexdigest()}
             for n in sorted(os.listdir(path)) if n != "manifest.json"}
    (path / "manifest.json").write_text(json.dumps({"files": files}))


def snapshot(out):
    """Every file under `out` with its bytes, to show that a refused run touched nothing."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def one_error_line(capsys):
    """The one `error:` line on stderr (a data-file warning may precede it), and no traceback."""
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------- settings that may and must not change


def test_resume_applies_new_steering_settings_and_says_so(tiny, reference, tmp_path, capsys):
    # Issue 11.1: the checkpoint's lr 1e-3 used to win over --lr; now --lr, --max-steps & co
    # take effect on resume, one line per change.
    out = copy_run(reference, tmp_path)
    shutil.rmtree(step_dir(out, 4))
    shutil.rmtree(out / "final")
    args = common(tiny, out, "--save-every", "2", "--resume", "--lr", "1e-4", "--max-steps", "5")
    assert cli.main(args) == 0
    said = capsys.readouterr().out
    assert "resume: --lr 0.0001 (checkpoint: 0.001)" in said and "resume: --max-steps 5 (checkpoint: 4)" in said
    rows = {r["step"]: r for r in metrics(out) if "loss" in r}
    assert sorted(rows) == [1, 2, 3, 4, 5]
    assert [rows[s]["lr"] for s in (1, 2)] == [r["lr"] for r in metrics(reference) if r.get("step") in (1, 2) and "lr" in r]
    assert [rows[s]["lr"] for s in (3, 4, 5)] == [1e-4] * 3  # after the 2 warm-up steps, the new rate
    assert rows[3]["loss"] == losses(reference)[3]  # the same weights went into step 3
    assert json.loads((out / "train_config.json").read_text())["lr"] == 1e-4


def test_resume_refuses_other_run_defining_settings(tiny, reference, tmp_path, capsys):
    # Issue 11.1 and 11.2: the data by content (a shuffled copy has the same record count),
    # the seed, the lengths; all refused in one sentence before the model is built, and
    # nothing in --out changes.
    out = copy_run(reference, tmp_path)
    before = snapshot(out)
    lines = open(DOLLY_RECORDS).read().splitlines(keepends=True)
    random.Random(0).shuffle(lines)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("".join(lines))
    cases = [
        (["--data", str(shuffled)], ["--data sha256"]),
        (["--seed", "7"], ["--seed 7 (checkpoint: 42)"]),
        (["--max-length", "128", "--val-size", "40"], ["--max-length 128 (checkpoint: 96)", "--val-size 40 (checkpoint: 38)"]),
    ]
    for extra, words in cases:
        assert exit_code(common(tiny, out, "--resume", *extra)) == 2, extra
        err = one_error_line(capsys)
        assert all(w in err for w in words) and str(step_dir(out, 4)) in err, err
    assert snapshot(out) == before


def test_resume_with_another_size_is_one_sentence(tmp_path, capsys):
    # Issue 11.8: --size 31m against a 14m checkpoint ended in DCP's shape-mismatch traceback.
    args = ["--init", "scratch", "--tokenizer", str(TOKENIZER_JSON), "--data", str(DOLLY_RECORDS), "--out",
            str(tmp_path), "--max-length", "96", "--val-size", "0", "--global-batch-size", "2", "--micro-batch-size",
            "2", "--max-steps", "1", "--save-every", "1"]
    assert cli.main(["--size", "14m", *args]) == 0
    capsys.readouterr()
    assert exit_code(["--size", "31m", *args, "--resume"]) == 2
    assert "--size 31m (checkpoint: 14m)" in one_error_line(capsys)


# ---------------------------------------------------------------- --out


def test_an_out_holding_a_run_needs_resume_or_overwrite(tiny, reference, tmp_path, capsys):
    # Issue 11.3: the README's command run twice (no checkpoints: --save-every 200 > 50 steps)
    # silently replaced final/, metrics.jsonl and train_config.json.
    out = copy_run(reference, tmp_path)
    shutil.rmtree(out / "checkpoints")
    before = snapshot(out)
    assert exit_code(common(tiny, out)) == 2
    err = one_error_line(capsys)
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert exit_code(common(tiny, out, "--resume", "--overwrite")) == 2
    assert "pass one of them" in one_error_line(capsys)
    assert snapshot(out) == before

    # --overwrite replaces the run, leaving none of its files behind (its checkpoints included)
    out = copy_run(reference, tmp_path, "again")
    (out / "loss.png").write_bytes(b"the old plot")
    (out / "notes.txt").write_text("mine")  # not the run's: left alone
    assert cli.main(common(tiny, out, "--overwrite", "--val-size", "0")) == 0
    assert not (out / "checkpoints").exists() and (out / "notes.txt").read_text() == "mine"
    assert not any("val_loss" in r for r in metrics(out)) and sorted(losses(out)) == [1, 2, 3, 4]
    assert not (out / "loss.png").exists() or (out / "loss.png").read_bytes() != b"the old plot"


@pytest.mark.parametrize("case", ["file", "under a file", "not writable"])
def test_out_must_be_a_writable_directory(case, tiny, tmp_path, capsys, monkeypatch):
    # Issue 11.8, checked before any input is read: the missing --data is never reached.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = {"file": blocker, "under a file": blocker / "run", "not writable": tmp_path / "ro" / "run"}[case]
    if case == "not writable":
        (tmp_path / "ro").mkdir()
        real_access = os.access  # root passes any permission check, so the refusal is simulated
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(tmp_path / "ro")
                            else real_access(p, mode, **kw))
    assert exit_code(common(tiny, out, "--data", str(tmp_path / "missing.jsonl"))) == 2
    err = one_error_line(capsys)
    assert f"--out {out}" in err and {"file": "is a file", "under a file": "lies under",
                                      "not writable": "not writable"}[case] in err, err


# -------------------------------------------------------- nothing executed from a checkpoint


def test_a_tampered_metadata_file_runs_nothing(tiny, reference, tmp_path, capsys):
    # Issue 11.5: DCP reads .metadata with plain pickle, so a planted one ran code on --resume.
    out = copy_run(reference, tmp_path)
    marker = tmp_path / "pwned"
    (step_dir(out, 4) / ".metadata").write_bytes(pickle.dumps(MakesAFile(marker)))
    rewrite_manifest(step_dir(out, 4))  # so the manifest does not already reject it
    assert exit_code(common(tiny, out, "--resume")) == 2
    err = one_error_line(capsys)
    assert f"{step_dir(out, 4)}/.metadata" in err and "io.open" in err
    assert not marker.exists()


def test_a_tampered_value_in_the_data_files_runs_nothing(one_rank, tmp_path):
    # DCP pickles every value that is not a tensor (the schedule, the sampler's position) into
    # the data files and loads them with torch.load(weights_only=False): a second way in.
    marker = tmp_path / "pwned"
    model, optimizer, scheduler, sampler = _parts()
    honest = sampler.state_dict
    sampler.state_dict = lambda: {**honest(), "epoch": MakesAFile(marker)}
    path = resume.save_checkpoint(str(tmp_path), 1, model, optimizer, scheduler, sampler, keep=1)
    assert not marker.exists()
    with pytest.raises(ValueError, match="the entry train.sampler.epoch is a pickled object that is not plain data"):
        resume.load_checkpoint(path, *_parts())
    assert not marker.exists()


def test_bin_weights_run_nothing(tmp_path, tiny, capsys):
    # Already safe (torch.load(weights_only=True)); kept under test: --init and load_model
    # refuse a pytorch_model.bin whose pickle would run code.
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad-init"
    bad.mkdir()
    shutil.copy(os.path.join(tiny, "config.json"), bad)
    torch.save({"gpt_neox.embed_in.weight": MakesAFile(marker)}, bad / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_model(bad)
    assert exit_code(common(tiny, tmp_path / "out", "--init", str(bad))) == 2
    assert "pytorch_model.bin" in one_error_line(capsys)
    assert not marker.exists()


# --------------------------------------------------------------- corrupt checkpoints


def test_verify_names_each_kind_of_damage(reference, tmp_path, one_rank):
    def damaged(how):
        out = copy_run(reference, tmp_path, how)
        path = step_dir(out, 4)
        data = sorted(n for n in os.listdir(path) if n.endswith(".distcp"))[0]
        if how == "truncated":
            with open(path / data, "r+b") as f:
                f.truncate(100)
        elif how == "missing":
            os.remove(path / data)
        elif how == "no metadata":
            os.remove(path / ".metadata")
        elif how == "garbled":  # same size, other bytes
            raw = bytearray((path / ".metadata").read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            (path / ".metadata").write_bytes(bytes(raw))
        elif how == "half deleted":  # killed while deleting, manifest already gone
            os.remove(path / resume.MANIFEST)
            os.remove(path / data)
        return str(path)

    assert resume.verify_checkpoint(str(step_dir(reference, 4))) is None
    expected = {"truncated": "bytes where its manifest says", "missing": "is missing",
                "no metadata": ".metadata is missing", "garbled": ".metadata does not match the sha256",
                "half deleted": "no manifest.json"}
    for how, words in expected.items():
        problem = resume.verify_checkpoint(damaged(how))
        assert problem is not None and words in problem, (how, problem)


def test_a_corrupt_latest_checkpoint_falls_back_to_the_newest_intact_one(tiny, reference, tmp_path, capsys):
    # Issue 11.6: a truncated latest checkpoint gave a raw traceback.
    out = copy_run(reference, tmp_path)
    shutil.rmtree(out / "final")
    for name in os.listdir(step_dir(out, 4)):
        if name.endswith(".distcp"):
            with open(step_dir(out, 4) / name, "r+b") as f:
                f.truncate(100)
    assert cli.main(common(tiny, out, "--save-every", "2", "--resume")) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 2, warned
    assert f"skipping checkpoint {step_dir(out, 4)}" in warned[0]
    assert f"resuming from {step_dir(out, 2)}" in warned[1]
    assert losses(out) == losses(reference)  # bit for bit, from step 2
    assert resume.verify_checkpoint(str(step_dir(out, 4))) is None  # saved afresh over the corrupt one

    for step in (2, 4):  # nothing intact: one sentence
        os.remove(step_dir(out, step) / resume.MANIFEST)
    assert exit_code(common(tiny, out, "--resume")) == 2
    assert "no checkpoint in" in one_error_line(capsys)


def test_a_rotation_killed_midway_leaves_no_half_checkpoint(one_rank, tmp_path, monkeypatch):
    model, optimizer, scheduler, sampler = _parts()
    for step in (1, 2):
        resume.save_checkpoint(str(tmp_path), step, model, optimizer, scheduler, sampler, keep=2)
    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):  # deletes one file of the old checkpoint, then "dies"
        if str(path).endswith("step-00000001.tmp"):
            os.remove(os.path.join(path, resume.MANIFEST))
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        resume.save_checkpoint(str(tmp_path), 3, model, optimizer, scheduler, sampler, keep=2)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    names = [os.path.basename(p) for p in resume.checkpoint_dirs(str(tmp_path))]
    assert names == ["step-00000002", "step-00000003"]  # the half-deleted one is a .tmp
    assert resume.resume_from(str(tmp_path), resume=True) == (str(tmp_path / "checkpoints" / "step-00000003"), [])
    resume.save_checkpoint(str(tmp_path), 4, model, optimizer, scheduler, sampler, keep=2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-00000003", "step-00000004"]  # leftovers gone


# ------------------------------------------------------------------------ faults


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tiny, tmp_path, capsys, monkeypatch):
    # Issue 11.7: ended in "unexpected pos 704 vs 598" with a .tmp left behind.
    import torch.distributed.checkpoint.filesystem as dcp_fs

    real_write = dcp_fs._write_item

    def disk_full(transforms, stream, *args, **kwargs):
        if "step-00000004" in getattr(stream, "name", ""):
            stream.write(b"\0" * 64)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(transforms, stream, *args, **kwargs)

    monkeypatch.setattr(dcp_fs, "_write_item", disk_full)
    assert exit_code(common(tiny, tmp_path, "--save-every", "2")) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("stopped: The disk is full") and str(tmp_path / "checkpoints") in last, last
    assert f"{step_dir(tmp_path, 2)} is intact" in last
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-00000002"]  # no .tmp left
    assert resume.verify_checkpoint(str(step_dir(tmp_path, 2))) is None


def test_a_crash_during_the_final_save_leaves_no_duplicate_rows(tiny, reference, tmp_path):
    # The final save comes after the last evaluation's row and the last checkpoint: resuming
    # used to evaluate again and append a second val_loss row for the last step.
    out = copy_run(reference, tmp_path)
    shutil.rmtree(out / "final")  # what a crash during the final save leaves
    assert cli.main(common(tiny, out, "--save-every", "2", "--resume")) == 0
    rows = [(r["step"], "val_loss" in r) for r in metrics(out)]
    assert len(rows) == len(set(rows)) and rows == [(r["step"], "val_loss" in r) for r in metrics(reference)]
    assert all(torch.equal(a, b) for a, b in zip(final_weights(out).values(), final_weights(reference).values()))
