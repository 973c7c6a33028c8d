"""The training loop against references we did not write: a 2-rank run against a 1-rank run,
a killed-and-resumed run against an uninterrupted one, the saved model against transformers.

A tiny GPT-NeoX (hidden 64, 2 layers, real 50304-row vocabulary) fine-tunes on the real
Dolly records cut to 96 tokens, so every run takes seconds on a CPU.
"""

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from conftest import DOLLY_RECORDS, REPO, TOKENIZER_JSON, make_hf_checkpoint
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from minidolly import load_model, load_tokenizer, resume
from minidolly.config import ModelConfig, hub_id, size_key
from minidolly.data import BatchSampler, collate, load_records, tokenize_records
from minidolly.memory import plan_memory
from minidolly.parallel import init_distributed
from minidolly.train import (
    TrainConfig,
    TrainingStopped,
    UsageError,
    build_model,
    build_optimizer,
    dry_run,
    loss_sum,
    resolve_sources,
    train,
)

spec = importlib.util.spec_from_file_location("train_cli", REPO / "train.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)

STEPS = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    make_hf_checkpoint(d, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
    return str(d)


def common(tiny, out, *extra):
    # val 38 = 19 micro-batches of 2: with 2 ranks, rank 1 runs a dummy forward in evaluation
    return ["--init", tiny, "--tokenizer", str(TOKENIZER_JSON), "--data", str(DOLLY_RECORDS), "--out", str(out),
            "--max-length", "96", "--val-size", "38", "--global-batch-size", "8", "--micro-batch-size", "2",
            "--log-every", "1", "--lr", "1e-3", "--warmup-steps", "2", "--eval-every", "0",
            "--max-steps", str(STEPS), *extra]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out):
    return {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}


def final_weights(out):
    return load_file(os.path.join(out, "final", "model.safetensors"))


def exit_code(argv):
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


def run_cli(*args, env_extra=None, torchrun=False, nproc=2):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if torchrun else [sys.executable]
    return subprocess.run([*launcher, str(REPO / "train.py"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def one_rank():
    """A one-rank process group for calling the loop's pieces directly (train() makes its own)."""
    created = not dist.is_initialized()
    init_distributed()
    yield
    if created:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """An uninterrupted 1-rank run, checkpointing every 2 steps."""
    out = tmp_path_factory.mktemp("reference")
    summary = train(cli.parse_args(common(tiny, out, "--save-every", "2")))
    assert summary["steps"] == STEPS
    return str(out)


def test_loss_and_gradients_equal_transformers_on_real_records(tiny):
    # loss_sum unembeds only the target positions; transformers scores every position with -100
    # ignored. Same loss, same gradient for every parameter.
    from transformers import GPTNeoXForCausalLM

    records, _ = load_records(DOLLY_RECORDS)
    examples, _ = tokenize_records(records[:4], load_tokenizer(TOKENIZER_JSON), max_length=2048)
    batch = collate(examples, pad_id=0)  # right-padded, with and without context
    ours, hf = load_model(tiny), GPTNeoXForCausalLM.from_pretrained(tiny)
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    loss = loss_sum(ours, batch, torch.device("cpu")) / n_targets
    loss.backward()
    expected = hf(input_ids=batch["input_ids"], labels=batch["labels"])
    expected.loss.backward()
    torch.testing.assert_close(loss, expected.loss, rtol=1e-5, atol=0)
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        hf_name = name.replace("embed_out", "embed_out" if "embed_out.weight" in theirs else "lm_head")
        hf_name = hf_name if hf_name in theirs else "gpt_neox." + hf_name
        torch.testing.assert_close(p.grad, theirs[hf_name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_two_ranks_take_the_same_steps_as_one(tiny, reference, tmp_path):
    # checkpointing activations and compiling the layers change memory and speed, never the numbers
    r = run_cli(*common(tiny, tmp_path, "--activation-checkpointing", "--compile", "--save-every", "2"), torchrun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    # both ranks' shards are in the manifest the ranks hashed together
    manifest = json.loads((tmp_path / "checkpoints" / "step-00000004" / "manifest.json").read_text())
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(manifest["files"])
    assert resume.verify_checkpoint(str(tmp_path / "checkpoints" / "step-00000004")) is None
    one, two = losses(reference), losses(tmp_path)
    assert sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert abs(two[step] - one[step]) <= 1e-5 * abs(one[step]), (step, one[step], two[step])
    assert one[1] != one[STEPS]  # the steps did change the weights
    val = lambda out: [r["val_loss"] for r in metrics(out) if "val_loss" in r]  # noqa: E731
    torch.testing.assert_close(val(tmp_path), val(reference), rtol=1e-5, atol=0)
    a, b = final_weights(reference), final_weights(tmp_path)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4, msg=k)


def test_bf16_mixed_precision_on_two_ranks_tracks_fp32(tiny, reference, tmp_path):
    # The GPU default, run over gloo: FSDP all-gathers bf16 copies of the fp32 shards, computes
    # in bf16, reduce-scatters in fp32 and steps fp32 master weights; final/ is written in bf16.
    r = run_cli(*common(tiny, tmp_path, "--precision", "bf16"), torchrun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "bf16 compute" in r.stdout
    one, two = losses(reference), losses(tmp_path)
    for step in one:
        assert abs(two[step] - one[step]) <= 1e-4 * abs(one[step]), (step, one[step], two[step])
    a, b = final_weights(reference), final_weights(tmp_path)
    for k in a:
        assert b[k].dtype == torch.bfloat16, k
        torch.testing.assert_close(b[k].float(), a[k], rtol=1e-2, atol=1e-2, msg=k)


def test_killed_run_resumes_exactly(tiny, reference, tmp_path):
    r = run_cli(*common(tiny, tmp_path, "--save-every", "2", "--stop-after-step", "3"))
    assert r.returncode == 3, r.stderr[-3000:]  # died after step 3, one step past its last checkpoint
    ckpts = tmp_path / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["step-00000002"]
    (ckpts / "step-00000003.tmp").mkdir()  # what a crash in the middle of a save leaves behind
    assert losses(tmp_path)[3] == losses(reference)[3]

    summary = train(cli.parse_args(common(tiny, tmp_path, "--save-every", "2", "--resume")))
    assert summary["steps"] == STEPS
    assert losses(tmp_path) == losses(reference)  # bit for bit
    steps = [r["step"] for r in metrics(tmp_path) if "loss" in r]
    assert steps == sorted(set(steps)), "the rerun steps replace their first rows"
    a, b = final_weights(reference), final_weights(tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_one_rank_checkpoint_resumes_on_two_ranks(tiny, reference, tmp_path):
    # One fp32 rank saves plain tensors, two ranks load them into FSDP shards (DCP reshards).
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000004")
    shutil.rmtree(tmp_path / "final")
    r = run_cli(*common(tiny, tmp_path, "--save-every", "2", "--resume"), torchrun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "after step 2" in r.stdout
    one, two = losses(reference), losses(tmp_path)
    assert sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert abs(two[step] - one[step]) <= 1e-5 * abs(one[step]), (step, one[step], two[step])
    a, b = final_weights(reference), final_weights(tmp_path)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4, msg=k)


def test_finetuning_lowers_validation_loss_and_saves_a_hf_model(tiny, tmp_path):
    from transformers import GPTNeoXForCausalLM

    args = common(tiny, tmp_path, "--eval-every", "10", "--max-steps", "20", "--lr", "3e-3")
    summary = train(cli.parse_args(args))
    val = [r["val_loss"] for r in metrics(tmp_path) if "val_loss" in r]
    assert [r["step"] for r in metrics(tmp_path) if "val_loss" in r] == [0, 10, 20]
    assert val[-1] < val[0] - 2.0, val
    assert summary["val_loss"] == val[-1]
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "loss.png").stat().st_size > 0

    final = summary["final"]
    hf = GPTNeoXForCausalLM.from_pretrained(final).eval()
    ours = load_model(final)
    ids = torch.tensor([load_tokenizer(final).encode("### Instruction:\nName a primary colour.\n\n### Response:\n")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    assert load_tokenizer(final).end_id == 50277


def test_scratch_init_is_gpt_neox_init_seeded(tmp_path):
    from minidolly.model import GPTNeoX

    # lr 1e-30: one step leaves the weights as they started, so final/ shows the init
    summary = train(cli.parse_args([
        "--size", "14m", "--init", "scratch", "--tokenizer", str(TOKENIZER_JSON), "--data", str(DOLLY_RECORDS),
        "--out", str(tmp_path), "--max-length", "96", "--val-size", "0", "--global-batch-size", "2",
        "--micro-batch-size", "2", "--max-steps", "1", "--lr", "1e-30", "--seed", "7"]))
    assert summary["val_loss"] is None
    torch.manual_seed(7)
    expected = GPTNeoX(ModelConfig.from_size("14m")).state_dict()
    got = load_model(summary["final"]).state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6, msg=k)


def test_dry_run_plans_12b_on_eight_ranks():
    r = run_cli("--size", "12b", "--dry-run", "--world-size", "8")
    assert r.returncode == 0, r.stderr
    assert "Memory plan" in r.stdout and "N = 8 rank(s)" in r.stdout and "AdamW" in r.stdout
    assert "not counted: writing final/" in r.stdout and "4·P = 44.13 GiB" in r.stdout  # rank 0's host RAM

    config = ModelConfig.from_size("12b")
    plan = dry_run(TrainConfig(size="12b", dry_run=True, world_size=8, device_memory=80, activation_checkpointing=True))
    assert plan.rows[0][2] == 4 * config.num_params() // 8  # fp32 parameter shards
    assert plan.fits, str(plan)
    assert "not counted: NCCL's own buffers" in str(plan)  # planned for a GPU
    no_shard = dry_run(TrainConfig(size="12b", dry_run=True, world_size=1, device_memory=80))
    assert not no_shard.fits and "DOES NOT FIT" in str(no_shard)


def test_a_run_that_cannot_fit_stops_with_the_plan(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("minidolly.memory.host_memory", lambda: 2**26)  # 64 MiB of RAM
    with pytest.raises(UsageError, match="does not fit"):
        train(cli.parse_args(common(tiny, tmp_path)))
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert not (tmp_path / "final").exists()


def test_nan_loss_stops_at_the_step_and_keeps_the_checkpoint(tiny, tmp_path, capsys):
    args = common(tiny, tmp_path, "--save-every", "1", "--lr", "1e30")  # the last --lr wins
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("stopped:") and "at step 2" in last and "step-00000001" in last, err
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-00000001"]
    assert (tmp_path / "checkpoints" / "step-00000001" / ".metadata").exists()
    with pytest.raises(TrainingStopped, match="at step 2"):  # the library raises it for programs that call it
        train(cli.parse_args(common(tiny, tmp_path / "again", "--lr", "1e30")))


@pytest.mark.parametrize("argv, words", [
    (["--size", "7b"], "--size"),
    (["--size", "14m", "--lr", "-1"], "--lr"),
    (["--size", "14m", "--micro-batch-size", "0"], "--micro-batch-size"),
    (["--size", "14m", "--world-size", "8"], "--dry-run"),
    (["--size", "14m", "--schedule", "steep"], "--schedule"),
    (["--size", "14m", "--compile", "--precision", "bf16"], "--compile"),
    (["--size", "14m", "--kernels", "maybe"], "--kernels"),
    (["--size", "14m", "--init", "scratch", "--data", "/no/such.jsonl"], "--tokenizer"),  # the Hub is offline
])
def test_bad_flags_exit_2_with_one_line(argv, words, capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # fail at once, not after timeouts
    assert exit_code(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err


def test_bad_inputs_exit_2_with_one_line(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = open(DOLLY_RECORDS).readline()
    bad.write_text(good + '{"instruction": "hi", "context": ""}\n')
    cases = [
        (common(tiny, tmp_path / "a", "--data", str(tmp_path / "missing.jsonl")), "missing.jsonl"),
        (common(tiny, tmp_path / "b", "--data", str(bad)), "line 2"),
        (common(tiny, tmp_path / "c", "--global-batch-size", "7"), "--global-batch-size"),
        (common(tiny, tmp_path / "d", "--resume"), "--resume"),
        (common(tiny, tmp_path / "e", "--tokenizer", tiny), "tokenizer"),
    ]
    for argv, words in cases:
        assert cli.main(argv) == 2, argv
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("error:") and words in last, last

    # and for real, in a fresh process: exactly one line, no traceback
    r = run_cli(*common(tiny, tmp_path / "f", "--data", str(tmp_path / "missing.jsonl")))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


def test_help_shows_the_defaults(capsys):
    assert exit_code(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for shown in ("--lr LR peak learning rate (default: 5e-06)", "(default: 48)", "(default: 2048)",
                  "--warmup-steps WARMUP_STEPS linear warmup steps (default: 50, or a tenth of a shorter run)"):
        assert shown in text, shown
    assert "(default: None)" not in text and "(default: False)" not in text


def _readme_train_commands():
    """The `python train.py ...` commands of the README, as argument lists."""
    commands = []
    for line in (REPO / "README.md").read_text().replace("\\\n", " ").splitlines():  # continuation lines joined
        for part in line.split("&&"):
            part = part.split("#")[0].strip()
            if part.startswith("python train.py"):
                commands.append(shlex.split(part)[2:])
    return commands


def test_the_readme_dry_run_fits_and_imports_no_sharding_machinery():
    # The README's 12b plan lacked --device-memory 80 --micro-batch-size 6, so on a laptop it
    # said DOES NOT FIT and that the batch would be refused. And the plan is arithmetic: it
    # should not import DCP, FSDP or DTensor (about a second of its few).
    (dry,) = [c for c in _readme_train_commands() if "--dry-run" in c]
    probe = ("import runpy, sys\n"
             "sys.argv = ['train.py', *sys.argv[1:]]\n"
             "try:\n    runpy.run_path('train.py', run_name='__main__')\n"
             "except SystemExit as e:\n    assert not e.code, e.code\n"
             "heavy = ('torch.distributed.checkpoint', 'torch.distributed.fsdp', 'torch.distributed.tensor')\n"
             "print('imported:', sorted(m for m in sys.modules if m.startswith(heavy)))\n")
    r = subprocess.run([sys.executable, "-c", probe, *dry], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "-> fits" in r.stdout and "DOES NOT FIT" not in r.stdout and "refuse" not in r.stdout, r.stdout
    assert "imported: []" in r.stdout


def test_the_readme_run_is_not_all_warm_up():
    # The README's 50-step run spent all 50 steps in the default 50-step warm-up.
    from minidolly.train import default_warmup

    runs = [c for c in _readme_train_commands() if "--max-steps" in c]
    assert len(runs) == 2  # the main command and the LoRA one
    for run in runs:
        cfg = cli.parse_args(run)
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else default_warmup(cfg.max_steps)
        assert warmup <= cfg.max_steps // 5, (run, warmup, cfg.max_steps)
    assert default_warmup(50) == 5 and default_warmup(5000) == 50  # Dolly's 50 for a real run


def test_the_banner_counts_what_was_dropped_and_warns_in_one_line(tiny, tmp_path, capsys, recwarn):
    # Records skipped by --skip-bad-records, dropped for an empty response or for their length
    # were counted and never shown; the unknown-file warning came as a Python warning with
    # its source line echoed. A run shorter than the warm-up warms up for a tenth of it.
    lines = open(DOLLY_RECORDS).read().splitlines()[:120]
    empty = json.loads(lines[5])
    empty["response"] = " "
    lines[5] = json.dumps(empty)
    lines.insert(7, "{not json")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    args = common(tiny, tmp_path / "out", "--data", str(data), "--skip-bad-records", "--val-size", "4",
                  "--max-steps", "10", "--log-every", "100")
    i = args.index("--warmup-steps")
    del args[i : i + 2]
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    kept = re.search(r"data: .*: 119 records -> (\d+) examples", out)
    dropped = re.search(r"dropped: 1 bad lines \(--skip-bad-records\), 1 empty responses, (\d+) longer than "
                        r"--max-length 96", out)
    assert kept and dropped and int(kept[1]) + int(dropped[1]) == 119, out
    assert "10 steps (5 per epoch), 1 of warm-up" in out
    assert json.loads((tmp_path / "out" / "train_config.json").read_text())["warmup_steps"] == 1
    assert err.strip().splitlines() == [f"warning: {data} (sha256 {hashlib.sha256(data.read_bytes()).hexdigest()[:16]}...) "
                                        f"matches no published release of databricks-dolly-15k; loading it anyway."]
    assert not [w for w in recwarn if "published release" in str(w.message)]  # said once, as our line


def test_plan_arithmetic():
    config = ModelConfig.from_size("70m")
    cfg = TrainConfig(size="70m", micro_batch_size=2, max_length=512, global_batch_size=2, precision="fp32")
    plan = {what: nbytes for what, _, nbytes, _ in plan_memory(config, cfg, world_size=2).rows}
    P = config.num_params()
    assert plan["parameters (fp32 shards)"] == 4 * P // 2
    assert plan["AdamW exp_avg + exp_avg_sq (fp32 shards)"] == 8 * P // 2
    assert plan["activations, layers"] == 18 * 4 * (2 * 512) * 512 * 6
    assert plan["activations, logits + loss"] == (2 * 512) * 50304 * (4 + 8)
    # FSDP's flat collective buffers: the root's fp32 reduce-scatter input (the largest unit),
    # one layer's all-gather output in the compute dtype
    root = 2 * 50304 * 512 + 2 * 512
    assert plan["reduce-scatter input (fp32), largest unit"] == 4 * root
    assert plan["all-gather output (compute dtype), one layer"] == 4 * (P - root) // 6
    # one fp32 rank trains without FSDP: whole tensors, no unsharded copies, no collectives
    one = {what: nbytes for what, _, nbytes, _ in plan_memory(config, cfg, world_size=1).rows}
    assert one["parameters (fp32, whole)"] == 4 * P
    assert not any(what.startswith(("unsharded", "reduce-scatter", "all-gather")) for what in one)
    bf16 = dataclasses.replace(cfg, precision="bf16")  # FSDP again, for mixed precision
    rows = [what for what, *_ in plan_memory(config, bf16, world_size=1).rows]
    assert any(what.startswith("unsharded") for what in rows)
    assert any(what.startswith("reduce-scatter") for what in rows)  # even on one rank
    assert not any(what.startswith("all-gather") for what in rows)  # one rank gathers nothing


@pytest.mark.parametrize("cuda, offload, backend", [
    (False, False, "gloo"), (False, True, "gloo"), (True, False, "nccl"), (True, True, "cuda:nccl,cpu:gloo")])
def test_process_group_backend(cuda, offload, backend, monkeypatch):
    # No GPU here, so the choice is checked, not run: offloaded shards live in host memory and
    # their collectives (weight broadcast, gradient norm, final gather) need gloo beside nccl.
    import minidolly.parallel as parallel

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(parallel.dist, "init_process_group", lambda backend, **kwargs: chosen.append(backend))
    monkeypatch.setattr(parallel.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(parallel.dist, "get_world_size", lambda: 1)
    parallel.init_distributed(cpu_offload=offload)
    assert chosen == [backend]


def test_one_host_sync_per_step(tiny, tmp_path, monkeypatch):
    # Reading a tensor's value on the host (.item(), float(), bool(), .tolist()) waits for the
    # GPU to finish everything queued. A step reads once: the loss and the gradient norm
    # together, to stop before a non-finite value reaches the weights. Counted on CPU as the
    # difference between a 5-step and a 2-step run, so setup, the last step and the final
    # save cancel out.
    syncs = 0

    class CountReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal syncs
            syncs += func is torch.ops.aten._local_scalar_dense.default  # item(), float(), bool()
            return func(*args, **(kwargs or {}))

    tolist = torch.Tensor.tolist

    def counted_tolist(self):  # tolist reads the data without a dispatched op
        nonlocal syncs
        syncs += 1
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)

    def run(steps):
        nonlocal syncs
        syncs = 0
        with CountReads():
            train(cli.parse_args(common(tiny, tmp_path / str(steps), "--val-size", "0", "--log-every", "100",
                                        "--max-steps", str(steps))))
        return syncs

    assert run(5) - run(2) == 3


def _parts(seed=0, frozen=False):
    """A small model, its optimizer and schedule (the loop's), and a sampler."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    model[0].requires_grad_(not frozen)
    optimizer, scheduler = build_optimizer(model, TrainConfig(lr=1e-2, warmup_steps=0), total_steps=10)
    model(torch.randn(2, 4)).square().sum().backward()
    optimizer.step()  # so AdamW has state to save
    scheduler.step()
    return model, optimizer, scheduler, BatchSampler([5] * 8, 4, 2, seed=1)


@pytest.mark.parametrize("saved_on, resumed_on", [("cpu", "cuda"), ("cuda", "cpu"), ("cuda", "cuda")])
def test_a_checkpoint_resumes_on_another_device(saved_on, resumed_on, one_rank, tmp_path, monkeypatch):
    # A process on a GPU also has the GPU's generator: its state is 16 bytes (seed, offset),
    # which torch.cuda.get_rng_state returns. No GPU here, so a "cuda" process is this one with
    # that generator mocked; a checkpoint saved on one kind of device must load on the other.
    real_state, real_set = resume.rng_state, resume.set_rng_state
    gpu_generator = torch.arange(16, dtype=torch.uint8)
    restored = {}

    def on(device):
        if device == "cuda":
            monkeypatch.setattr(resume, "rng_state", lambda: {**real_state(), "cuda": gpu_generator.clone()})
        else:
            monkeypatch.setattr(resume, "rng_state", real_state)

    def set_rng(state):
        restored.update(state)
        real_set({k: v for k, v in state.items() if k == "cpu"})

    monkeypatch.setattr(resume, "set_rng_state", set_rng)
    on(saved_on)
    model, optimizer, scheduler, sampler = _parts(seed=0)
    next(iter(sampler))
    torch.manual_seed(123)
    path = resume.save_checkpoint(str(tmp_path), 7, model, optimizer, scheduler, sampler, keep=2)
    expected_draw = torch.rand(5)

    on(resumed_on)
    fresh, fresh_optimizer, fresh_scheduler, fresh_sampler = _parts(seed=1)
    assert resume.load_checkpoint(path, fresh, fresh_optimizer, fresh_scheduler, fresh_sampler) == 7
    assert torch.equal(torch.rand(5), expected_draw)  # the CPU generator continues
    assert set(restored) == ({"cpu", "cuda"} if saved_on == resumed_on == "cuda" else {"cpu"})
    if "cuda" in restored:
        assert torch.equal(restored["cuda"], gpu_generator)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh_optimizer.state_dict()["state"][0]["exp_avg"].equal(optimizer.state_dict()["state"][0]["exp_avg"])
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert fresh_sampler.state_dict() == sampler.state_dict()


def test_frozen_parameters_stay_out_of_checkpoints_and_the_optimizer(one_rank, tmp_path):
    # What adapters (LoRA) need: only trainable parameters are optimized and saved; frozen
    # ones come from --init again and keep their values on resume.
    model, optimizer, scheduler, sampler = _parts(seed=0, frozen=True)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 2  # model[1]'s weight and bias
    path = resume.save_checkpoint(str(tmp_path), 1, model, optimizer, scheduler, sampler, keep=1)
    saved = resume._reader(path).read_metadata().state_dict_metadata
    assert "model.1.weight" in saved and not any(k.startswith("model.0.") for k in saved)

    fresh, fresh_optimizer, fresh_scheduler, fresh_sampler = _parts(seed=1, frozen=True)
    own = fresh[0].weight.clone()
    resume.load_checkpoint(path, fresh, fresh_optimizer, fresh_scheduler, fresh_sampler)
    assert torch.equal(fresh[1].weight, model[1].weight) and torch.equal(fresh[0].weight, own)


@pytest.mark.parametrize("choice, use_kernels", [("auto", None), ("on", True), ("off", False)])
def test_kernels_flag_sets_the_models_switch(choice, use_kernels, tiny, one_rank):
    cfg = cli.parse_args(["--init", tiny, "--kernels", choice])
    model = build_model(resolve_sources(cfg), cfg, torch.device("cpu"), None)
    assert model.use_kernels is use_kernels


def test_kernels_on_where_they_cannot_run_exits_2(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("kernels.unavailable_reason", lambda *args, **kwargs: "no GPU here")
    assert cli.main(common(tiny, tmp_path, "--kernels", "on")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--kernels on" in err, err
    assert not os.path.exists(tmp_path / "metrics.jsonl")  # refused before any work


@pytest.mark.parametrize("name, key, hub", [
    ("70m", "70m", "EleutherAI/pythia-70m"),
    ("EleutherAI/pythia-1.4B-deduped", "1.4b", "EleutherAI/pythia-1.4b"),
    ("databricks/dolly-v2-3b", "dolly-v2-3b", "databricks/dolly-v2-3b"),
])
def test_size_names_parse_in_one_place(name, key, hub):
    assert size_key(name) == key and hub_id(name) == hub
    assert ModelConfig.from_size(name) == ModelConfig.from_size(key)


@pytest.mark.cuda
def test_one_gpu_bf16_with_every_memory_option_resumes_exactly(tmp_path):
    # For a GPU owner (`pytest -m cuda`): the loop on one GPU through torchrun and nccl, in bf16
    # with torch.compile, activation checkpointing and CPU offload, killed after step 3 and
    # resumed from its step-2 checkpoint. Step 3's loss is a forward of the checkpoint's weights
    # on the same batch, so it must come out bit for bit (a backward may use atomics; a
    # forward does not).
    args = ["--size", "14m", "--init", "scratch", "--tokenizer", str(TOKENIZER_JSON), "--data", str(DOLLY_RECORDS),
            "--out", str(tmp_path), "--max-length", "256", "--val-size", "16", "--global-batch-size", "8",
            "--micro-batch-size", "4", "--log-every", "1", "--lr", "1e-3", "--warmup-steps", "2", "--eval-every", "0",
            "--max-steps", "4", "--save-every", "2", "--precision", "bf16", "--compile", "--activation-checkpointing",
            "--cpu-offload"]
    killed = run_cli(*args, "--stop-after-step", "3", torchrun=True, nproc=1)
    assert "1 x cuda, bf16 compute" in killed.stdout, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert killed.returncode != 0 and sorted(os.listdir(tmp_path / "checkpoints")) == ["step-00000002"]
    before = losses(tmp_path)
    assert sorted(before) == [1, 2, 3]

    resumed = run_cli(*args, "--resume", torchrun=True, nproc=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "after step 2" in resumed.stdout
    after = losses(tmp_path)
    assert sorted(after) == [1, 2, 3, 4] and after[3] == before[3]
    assert all(t.dtype == torch.bfloat16 for t in final_weights(tmp_path).values())
