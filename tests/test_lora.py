"""LoRA held to Hugging Face PEFT: the same logits and adapter gradients as PEFT on transformers'
GPTNeoXForCausalLM, adapter files that each side loads from the other, PEFT's merge; and the
training loop with LoRA against itself (1 rank = 2 ranks, killed and resumed = uninterrupted).

The runs fine-tune a tiny GPT-NeoX (hidden 64, 2 layers, real 50304-row vocabulary) on the
real Dolly records cut to 96 tokens, as tests/test_train.py does.
"""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import DOLLY_RECORDS, REPO, TOKENIZER_JSON, make_hf_checkpoint
from safetensors.torch import load_file

from minidolly import CheckpointError, load_model, load_tokenizer, resume
from minidolly.checkpoint import fingerprint, read_adapter
from minidolly.config import ModelConfig
from minidolly.data import collate, load_records, tokenize_records
from minidolly.lora import LoRALinear, apply_lora, lora_parameter_count, merge_lora, parse_targets
from minidolly.model import GPTNeoX
from minidolly.train import TrainConfig, UsageError, build_model, build_optimizer, dry_run, loss_sum, resolve_sources
from test_train import cli, losses, metrics, one_rank, run_cli, tiny  # noqa: F401 (fixtures)

STEPS = 4
TARGET_SETTINGS = ["query_key_value", "all-linear", "dense,dense_4h_to_h"]


def common(tiny, out, *extra, lora=("--lora-rank", "8", "--lora-targets", "all-linear")):
    return ["--init", tiny, "--tokenizer", str(TOKENIZER_JSON), "--data", str(DOLLY_RECORDS), "--out", str(out),
            "--max-length", "96", "--val-size", "38", "--global-batch-size", "8", "--micro-batch-size", "2",
            "--log-every", "1", "--lr", "2e-2", "--warmup-steps", "0", "--eval-every", "0", "--max-steps", str(STEPS),
            *lora, *extra]


def adapters(out):
    return load_file(os.path.join(out, "final", "adapter_model.safetensors"))


def file_hashes(directory):
    return {n: hashlib.sha256(open(os.path.join(directory, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(directory))}


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """An uninterrupted 1-rank LoRA run (all-linear, rank 8, dropout 0.05) that checkpoints
    every 2 steps and writes final-merged/; and the base's file hashes from before it."""
    before = file_hashes(tiny)
    out = tmp_path_factory.mktemp("lora-reference")
    r = run_cli(*common(tiny, out, "--save-every", "2", "--merge", "--eval-every", "0"))
    assert r.returncode == 0, r.stderr[-3000:]
    return str(out), before, r.stdout


def real_batch(n=4):
    records, _ = load_records(DOLLY_RECORDS)
    examples, _ = tokenize_records(records[:n], load_tokenizer(TOKENIZER_JSON), max_length=2048)
    return collate(examples, pad_id=0)


def peft_model(tiny, targets, rank=4, alpha=8.0):
    from peft import LoraConfig, get_peft_model
    from transformers import GPTNeoXForCausalLM

    hf = GPTNeoXForCausalLM.from_pretrained(tiny)
    target_modules = "all-linear" if targets == "all-linear" else targets.split(",")
    return get_peft_model(hf, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules,
                                         task_type="CAUSAL_LM"))


def peft_lora_layers(peft):
    """PEFT's LoRA layers by our module names (gpt_neox.layers.0... -> layers.0...)."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix("base_model.model.gpt_neox."): m for name, m in peft.named_modules()
            if isinstance(m, LoraLayer)}


# ----------------------------------------------------------- held to PEFT


@pytest.mark.parametrize("targets", TARGET_SETTINGS)
def test_logits_gradients_and_parameter_count_equal_peft(tiny, targets):
    # Our LoRA on our model and PEFT's on transformers' GPTNeoXForCausalLM, with the same A and
    # B (B random, not PEFT's zeros, so the update shows): the same logits, the same loss, the
    # same gradient of every A and B, and as many trainable parameters.
    torch.manual_seed(0)
    ours = load_model(tiny)
    wrapped = apply_lora(ours, rank=4, alpha=8.0, dropout=0.0, targets=parse_targets(targets))
    peft = peft_model(tiny, targets)
    theirs = peft_lora_layers(peft)
    assert sorted(theirs) == sorted(wrapped)
    with torch.no_grad():
        for name in wrapped:
            lora = ours.get_submodule(name)
            lora.lora_B.weight.normal_(0, 0.1)
            theirs[name].lora_A["default"].weight.copy_(lora.lora_A.weight)
            theirs[name].lora_B["default"].weight.copy_(lora.lora_B.weight)

    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert trainable == peft.get_nb_trainable_parameters()[0]
    assert trainable == lora_parameter_count(ours.config, 4, parse_targets(targets))  # the memory plan's count

    batch = real_batch()
    ids = batch["input_ids"]
    torch.testing.assert_close(ours(ids), peft(input_ids=ids).logits, rtol=0, atol=1e-4)
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    loss = loss_sum(ours.train(), batch, torch.device("cpu")) / n_targets
    loss.backward()
    expected = peft(input_ids=ids, labels=batch["labels"]).loss
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    for name in wrapped:
        lora = ours.get_submodule(name)
        for m in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(lora, m).weight.grad, getattr(theirs[name], m)["default"].weight.grad,
                                       rtol=1e-4, atol=1e-6, msg=f"{name}.{m}")
    assert all(p.grad is None for n, p in ours.named_parameters() if "lora_" not in n)  # the base is frozen


def test_fresh_adapters_start_at_the_base_and_merge_back_to_plain_linear(tiny):
    base = load_model(tiny)
    model = load_model(tiny)
    apply_lora(model, rank=4, alpha=8.0, dropout=0.05, targets=["query_key_value"])
    lora = model.layers[0].attention.query_key_value
    assert isinstance(lora, LoRALinear) and lora.lora_A.weight.abs().sum() > 0 and not lora.lora_B.weight.any()
    ids = torch.randint(0, 1000, (2, 16))
    torch.testing.assert_close(model.eval()(ids), base(ids), rtol=0, atol=0)  # B = 0: exactly the base
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    expected = model(ids)
    merge_lora(model)
    assert type(model.layers[0].attention.query_key_value) is torch.nn.Linear
    assert model.state_dict().keys() == base.state_dict().keys()
    torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)


def test_our_adapter_loads_in_peft_and_final_merged_equals_peft_merge(tiny, reference):
    from peft import PeftModel
    from transformers import GPTNeoXForCausalLM

    out, _, _ = reference
    final = os.path.join(out, "final")
    config = json.load(open(os.path.join(final, "adapter_config.json")))
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0.05)
    assert config["base_model_name_or_path"] == os.path.abspath(tiny)
    assert sorted(config["target_modules"]) == ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(os.listdir(final))

    peft = PeftModel.from_pretrained(GPTNeoXForCausalLM.from_pretrained(tiny), final).eval()
    ids = real_batch(2)["input_ids"]
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
        assert not torch.allclose(expected, GPTNeoXForCausalLM.from_pretrained(tiny)(input_ids=ids).logits, atol=1e-3)
        torch.testing.assert_close(load_model(final)(ids), expected, rtol=0, atol=1e-4)  # the adapter folder alone
        torch.testing.assert_close(load_model(tiny, adapter=final)(ids), expected, rtol=0, atol=1e-4)

    merged = {k: v for k, v in peft.merge_and_unload().state_dict().items()}
    ours = load_file(os.path.join(out, "final-merged", "model.safetensors"))
    head = "lm_head.weight" if "lm_head.weight" in merged else "embed_out.weight"
    for key, tensor in ours.items():
        torch.testing.assert_close(tensor, merged[head if key == "embed_out.weight" else key], rtol=1e-5, atol=1e-6,
                                   msg=key)


def test_peft_adapter_loads_in_ours(tiny, tmp_path):
    peft = peft_model(tiny, "dense_h_to_4h,query_key_value", rank=3, alpha=5.0)
    with torch.no_grad():
        for layer in peft_lora_layers(peft).values():
            layer.lora_B["default"].weight.normal_(0, 0.1)
    peft.save_pretrained(tmp_path)  # names tiny as its base_model_name_or_path
    ids = real_batch(2)["input_ids"]
    with torch.no_grad():
        expected = peft.eval()(input_ids=ids).logits
        torch.testing.assert_close(load_model(tiny, adapter=str(tmp_path))(ids), expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(load_model(str(tmp_path))(ids), expected, rtol=0, atol=1e-4)
    assert read_adapter(str(tmp_path)).modules() == [f"layers.{i}.{m}" for i in range(2)
                                                      for m in ("attention.query_key_value", "mlp.dense_h_to_4h")]


def test_an_adapter_loads_quantized_merged_first(tiny, reference, tmp_path):
    # --quantize with an adapter folder: the adapter is merged into the full-precision base,
    # then the merged weights are quantized (quantizing the base first would lose the update);
    # a base stored quantized cannot take an adapter, and says so.
    from minidolly import quantize_model, save_model

    final = os.path.join(reference[0], "final")
    ids = real_batch(2)["input_ids"]
    with torch.no_grad():
        expected = quantize_model(load_model(final), "int8")(ids)
        torch.testing.assert_close(load_model(final, quantize="int8")(ids), expected, rtol=0, atol=0)
    save_model(load_model(tiny, quantize="int8"), tmp_path / "int8-base")
    with pytest.raises(CheckpointError, match="stored quantized"):
        load_model(str(tmp_path / "int8-base"), adapter=final)


def test_an_adapter_for_another_base_is_refused_naming_both(tiny, reference, tmp_path):
    out, _, _ = reference
    other = tmp_path / "wide"
    make_hf_checkpoint(other, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512)
    final = os.path.join(out, "final")
    with pytest.raises(CheckpointError, match="does not fit the base model") as e:
        load_model(str(other), adapter=final)
    assert final in str(e.value) and str(other) in str(e.value) and tiny in str(e.value)

    # generate.py --model ADAPTER whose base has moved to another model: one line, exit 2
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in os.listdir(final):
        (moved / name).write_bytes(open(os.path.join(final, name), "rb").read())
    config = json.load(open(moved / "adapter_config.json"))
    (moved / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(other)}))
    r = subprocess.run([sys.executable, str(REPO / "generate.py"), "--model", str(moved), "Hi"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "does not fit the base model" in r.stderr.strip().splitlines()[-1]


def test_generate_answers_with_the_adapter(reference):
    out, _, _ = reference
    r = subprocess.run([sys.executable, str(REPO / "generate.py"), "--model", os.path.join(out, "final"),
                        "--max-new-tokens", "4", "--temperature", "0", "Say hi."], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    # the same tokens as the merged checkpoint gives
    merged = subprocess.run([sys.executable, str(REPO / "generate.py"), "--model", os.path.join(out, "final-merged"),
                             "--max-new-tokens", "4", "--temperature", "0", "Say hi."], capture_output=True, text=True,
                            timeout=120)
    assert r.stdout == merged.stdout


# ----------------------------------------------------------- the training loop


def test_a_lora_run_trains_only_adapters_and_lowers_validation_loss(tiny, reference):
    out, before, stdout = reference
    assert file_hashes(tiny) == before  # the base checkpoint's files are untouched
    val = [r["val_loss"] for r in metrics(out) if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0] - 0.02, val  # real records, 4 steps
    base = load_model(tiny).state_dict()
    merged = load_file(os.path.join(out, "final-merged", "model.safetensors"))
    for name, tensor in base.items():
        key = name if name == "embed_out.weight" else "gpt_neox." + name
        adapted = name.endswith(("query_key_value.weight", "dense.weight", "dense_h_to_4h.weight", "dense_4h_to_h.weight"))
        assert torch.equal(merged[key], tensor) != adapted, name  # only the adapted weights moved
    # a checkpoint holds the adapters, not the base
    saved = resume._reader(resume.checkpoint_dirs(out)[-1]).read_metadata().state_dict_metadata
    model_keys = [k for k in saved if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)
    assert len(model_keys) == 2 * 4 * 2  # A and B of 4 targets in 2 layers
    assert "LoRA: rank 8, alpha 16, dropout 0.05" in stdout


def test_lora_two_ranks_take_the_same_steps_as_one(tiny, reference, tmp_path):
    # dropout is on (0.05): each micro-batch draws its masks from a seed of (step, first
    # example), so 2 ranks draw what 1 rank draws; activation checkpointing must redraw them
    out, _, _ = reference
    r = run_cli(*common(tiny, tmp_path, "--activation-checkpointing"), torchrun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = losses(out), losses(tmp_path)
    assert sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert abs(two[step] - one[step]) <= 1e-5 * abs(one[step]), (step, one[step], two[step])
    a, b = adapters(out), adapters(tmp_path)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4, msg=k)
    # FSDP shards the frozen base over the 2 ranks as well as the adapters
    held = int(r.stdout.split("LoRA: rank 0 holds ")[1].split(" ")[0].replace(",", ""))
    P = ModelConfig.from_hf(tiny).num_params()
    assert abs(held - P / 2) < 0.01 * P, (held, P)


def test_killed_lora_run_resumes_exactly(tiny, reference, tmp_path):
    out, before, _ = reference
    killed = run_cli(*common(tiny, tmp_path, "--save-every", "2", "--stop-after-step", "3"))
    assert killed.returncode == 3, killed.stderr[-3000:]
    resumed = run_cli(*common(tiny, tmp_path, "--save-every", "2", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "after step 2" in resumed.stdout
    assert losses(tmp_path) == losses(out)  # bit for bit
    a, b = adapters(out), adapters(tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert file_hashes(tiny) == before


def test_resume_refuses_other_lora_settings_or_another_base(tiny, reference, tmp_path, capsys):
    out, _, _ = reference
    other = tmp_path / "other-base"
    make_hf_checkpoint(other, seed=1, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=256)  # the same shape, other weights
    assert fingerprint(str(other)) != fingerprint(tiny)
    cases = [
        (common(tiny, out, "--resume", "--lora-rank", "4"), ["--lora-rank 4 (checkpoint: 8)"]),
        (common(tiny, out, "--resume", "--lora-targets", "query_key_value", "--lora-alpha", "3"),
         ["--lora-alpha 3 (checkpoint: 16)", "--lora-targets query_key_value (checkpoint: query_key_value,dense,"]),
        (common(str(other), out, "--resume"), [str(other), tiny]),
        (common(tiny, out, "--resume", lora=()), ["full fine-tune"]),
    ]
    for argv, words in cases:
        assert cli.main(argv) == 2, argv
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("error:") and all(w in last for w in words), last
    assert len(resume.checkpoint_dirs(out)) == 2  # nothing written


def test_frozen_base_is_bf16_while_adapters_and_adamw_state_are_fp32(tiny, one_rank):
    # bf16 compute goes through FSDP (mixed precision) even on one rank
    cfg = cli.parse_args(["--init", tiny, "--lora-rank", "4", "--lora-targets", "all-linear", "--precision", "bf16"])
    model = build_model(resolve_sources(cfg), cfg, torch.device("cpu"), torch.bfloat16)
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.bfloat16 for p in frozen.values()) and len(frozen) == 2 * 12 + 4
    assert all(p.dtype == torch.float32 and ".lora_" in n for n, p in trained.items()) and len(trained) == 16
    optimizer, _ = build_optimizer(model, cfg, total_steps=10)
    before = {n: p.full_tensor().clone() for n, p in frozen.items()}
    (loss_sum(model, real_batch(2), torch.device("cpu")) / 100).backward()
    optimizer.step()
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values()) and len(optimizer.state) == 16
    assert all(torch.equal(p.full_tensor(), before[n]) for n, p in frozen.items())


def test_dry_run_plans_12b_lora_on_one_80gb_gpu():
    args = ["--size", "12b", "--dry-run", "--world-size", "1", "--device-memory", "80", "--precision", "bf16"]
    r = run_cli(*args, "--lora-rank", "16")
    assert r.returncode == 0, r.stderr
    assert "-> fits" in r.stdout and "frozen base weights (bf16 shards)" in r.stdout, r.stdout
    full = run_cli(*args, "--lora-rank", "0")
    assert "DOES NOT FIT" in full.stdout and "needs: 4 ranks of a 80 GiB GPU with --activation-checkpointing" in full.stdout

    config = ModelConfig.from_size("12b")
    P, P_A = config.num_params(), lora_parameter_count(config, 16, ["query_key_value"])
    assert P_A == 36 * 16 * (5120 + 3 * 5120)
    plan = dry_run(cli.parse_args([*args, "--lora-rank", "16"]))
    rows = {what.split(" (")[0]: nbytes for what, _, nbytes, _ in plan.rows}
    assert rows["frozen base weights"] == 2 * P  # bf16, no fp32 master
    assert rows["LoRA adapters"] == 4 * P_A and rows["adapter gradients"] == 4 * P_A
    assert rows["AdamW state of the adapters"] == 8 * P_A
    assert plan.activation_checkpointing  # turned on because the run needs it
    # on 2 x 24 GB with the frozen base sharded: 11 GiB of it per GPU
    two = dry_run(cli.parse_args(["--size", "12b", "--dry-run", "--world-size", "2", "--device-memory", "24",
                                  "--precision", "bf16", "--lora-rank", "16", "--micro-batch-size", "2"]))
    assert two.fits and {w.split(" (")[0]: b for w, _, b, _ in two.rows}["frozen base weights"] == P


def test_lora_plan_counts_the_activations_a_frozen_layer_keeps():
    # What a layer saves for backward, measured with saved_tensors_hooks, against the plan's
    # row: 11·C per token for a frozen layer, plus each adapter's input (twice with dropout:
    # the mask) and its r outputs. Full fine-tuning keeps 18·C.
    from minidolly.memory import plan_memory
    from minidolly.model import rotary_cos_sin

    config = dataclasses.replace(ModelConfig.from_size("70m"), num_layers=1)
    B, T = 2, 64
    for targets, dropout in (("query_key_value", 0.0), ("dense_4h_to_h", 0.05), ("all-linear", 0.0)):
        torch.manual_seed(0)
        model = GPTNeoX(config)
        apply_lora(model, 16, 32.0, dropout, parse_targets(targets))
        x = model.embed_in(torch.randint(0, 1000, (B, T))).detach().requires_grad_()
        cos, sin = rotary_cos_sin(config, torch.arange(T).expand(B, T), x.dtype)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, rotary_dim): every head, as GPTNeoX.forward passes them
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.layers[0](x, cos, sin)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        measured = sum(nbytes for ptr, nbytes in storages.items() if ptr not in params)
        cfg = TrainConfig(size="70m", lora_rank=16, lora_alpha=32, lora_dropout=dropout, lora_targets=targets,
                          micro_batch_size=B, max_length=T, precision="fp32", global_batch_size=B)
        planned = {w: b for w, _, b, _ in plan_memory(config, cfg, 1).rows}["activations, layers"]
        assert abs(planned - measured) <= 0.02 * measured, (targets, dropout, measured, planned)


@pytest.mark.parametrize("argv, words", [
    (["--lora-rank", "-1"], "--lora-rank"),
    (["--lora-alpha", "16"], "--lora-alpha"),  # without a rank
    (["--lora-rank", "0", "--lora-targets", "dense"], "--lora-targets"),
    (["--merge"], "--merge"),
    (["--lora-rank", "8", "--lora-alpha", "0"], "--lora-alpha"),
    (["--lora-rank", "8", "--lora-dropout", "1"], "--lora-dropout"),
    (["--lora-rank", "8", "--lora-targets", "query_key_value,attn"], "'attn'"),
    (["--lora-rank", "8", "--init", "scratch"], "--init scratch"),
])
def test_bad_lora_flags_exit_2_with_one_line(argv, words, capsys):
    assert cli.main(["--size", "14m", "--dry-run", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
    if "'attn'" in words:  # the valid names are listed
        assert "query_key_value, dense, dense_h_to_4h, dense_4h_to_h" in err
    with pytest.raises(UsageError):  # the library refuses it too
        cli.parse_args(["--size", "14m", *argv]).validate()


@pytest.mark.cuda
def test_one_gpu_bf16_lora_with_every_memory_option_resumes_exactly(tiny, tmp_path):
    # For a GPU owner (`pytest -m cuda`): LoRA on one GPU through torchrun and nccl, the base
    # held in bf16, with torch.compile, activation checkpointing and CPU offload, killed after
    # step 3 and resumed from its step-2 checkpoint: step 3's loss is a forward of the
    # checkpoint's adapters on the same batch with the same dropout masks, so it must come out
    # bit for bit.
    args = common(tiny, tmp_path, "--save-every", "2", "--precision", "bf16", "--compile",
                  "--activation-checkpointing", "--cpu-offload", "--merge")
    killed = run_cli(*args, "--stop-after-step", "3", torchrun=True, nproc=1)
    assert "base frozen in bf16" in killed.stdout, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert killed.returncode != 0 and sorted(os.listdir(tmp_path / "checkpoints")) == ["step-00000002"]
    before = losses(tmp_path)
    resumed = run_cli(*args, "--resume", torchrun=True, nproc=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = losses(tmp_path)
    assert sorted(after) == [1, 2, 3, 4] and after[3] == before[3]
    assert all(t.dtype == torch.float32 for t in adapters(tmp_path).values())
    merged = load_file(os.path.join(tmp_path, "final-merged", "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in merged.values())


def test_an_adapter_as_init_is_refused(reference, capsys):
    out, _, _ = reference
    assert cli.main(["--init", os.path.join(out, "final"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a LoRA adapter" in err and "final-merged" in err, err
