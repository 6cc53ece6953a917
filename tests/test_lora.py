"""LoRA students (student.lora, distill/lora.py) and the student's base model as the teacher (teacher.student_base)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, kill_train_then_resume
from safetensors import safe_open
from safetensors.torch import load_file

pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from distill import (
    lora,  # noqa: E402
    training,  # noqa: E402
)
from distill.config import ConfigError, LoraConfig, TrainConfig, load_config  # noqa: E402
from distill.losses import (  # noqa: E402
    IGNORE_INDEX,
    LossSpec,
    chunked_kd_loss,  # noqa: E402
)
from distill.models import final_hidden, flat_positions, load_model, output_head  # noqa: E402
from distill.tokenizer import byte_tokenizer  # noqa: E402

TINY_LORA = REPO / "configs" / "tiny" / "lora.yaml"
V = len(byte_tokenizer())


def lora_cfg(tmp_path: Path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, TINY_LORA, [f"out_dir={tmp_path / 'run'}", "log.progress=false", *overrides])


def base_student(cfg: TrainConfig):
    return load_model(cfg.student, "student", byte_tokenizer())


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------- config, bad input


def test_tiny_lora_config_loads():
    cfg = load_config(TrainConfig, TINY_LORA)
    assert cfg.student.lora == LoraConfig(r=8, alpha=16, dropout=0.0, target_modules="all-linear")
    assert cfg.teacher.student_base is True


def test_student_base_teacher_needs_lora():
    with pytest.raises(ConfigError, match=r"teacher.student_base=true .* set student.lora"):
        load_config(TrainConfig, TINY_LORA, ["student.lora=null"])


def test_target_modules_naming_nothing_is_refused(tmp_path):
    cfg = lora_cfg(tmp_path, "student.lora.target_modules=[q_proj,qkv_proj]")
    with pytest.raises(ValueError, match=r"student.lora.target_modules: \['qkv_proj'\] name no module.*q_proj"):
        lora.add_adapters(base_student(cfg), cfg.student.lora)


def test_dropout_on_the_output_layer_is_refused(tmp_path):
    cfg = lora_cfg(tmp_path, "student.lora.target_modules=[q_proj,lm_head]", "student.lora.dropout=0.1")
    with pytest.raises(ValueError, match=r"student.lora: dropout=0.1 with the output layer \(lm_head\)"):
        lora.add_adapters(base_student(cfg), cfg.student.lora)


def test_lora_without_peft_names_the_setting(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    cfg = lora_cfg(tmp_path)
    with pytest.raises(ValueError, match=r"student.lora needs the peft library: pip install 'distill\[lora\]'"):
        lora.add_adapters(base_student(cfg), cfg.student.lora)


# ----------------------------------------------------------------------------------------- the output layer


def test_adapters_on_the_output_layer_get_the_model_s_own_gradients(tmp_path):
    """LoRA on lm_head: the chunked loss (which reads the layer's effective weight) gives the same loss and adapter
    gradients as cross-entropy on the peft model's own logits."""
    cfg = lora_cfg(tmp_path, "student.lora.target_modules=[q_proj,lm_head]")
    model = lora.add_adapters(base_student(cfg), cfg.student.lora)
    with torch.no_grad():  # B = 0 at init would make every A gradient 0
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (2, 24), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    labels = ids[:, 1:].reshape(-1).clone()
    labels[:5] = IGNORE_INDEX

    ref = F.cross_entropy(model(**batch).logits[:, :-1].reshape(-1, V), labels, ignore_index=IGNORE_INDEX,
                          reduction="sum") / (labels != IGNORE_INDEX).sum()
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    hidden = flat_positions(final_hidden(model, batch))
    spec = LossSpec(alpha=1.0)  # CE only
    value, _ = chunked_kd_loss(hidden, output_head(model, V), labels, None, int((labels != IGNORE_INDEX).sum()), spec,
                               chunk_size=8)
    value.backward()
    assert value.item() == pytest.approx(ref.item(), rel=1e-5)
    assert any("lm_head.lora_A" in n for n in want) and any("lm_head.lora_B" in n for n in want)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6, msg=n)
    with model.disable_adapter():  # adapters off: the base weight
        assert output_head(model, V).weight is model.base_model.model.lm_head.base_layer.weight


# ----------------------------------------------------------------------------------------- a run


def test_lora_run_trains_only_the_adapters(tmp_path):
    # alpha > 0: the teacher is the student's base, so KL alone has a gradient of exactly 0 at the start (the
    # closed-form loss gives q - p = 0 there; only the CE term moves the adapters).
    cfg = lora_cfg(tmp_path, "train.max_steps=3", "checkpoint.every=3", "eval.every=0", "log.every=1",
                   "loss.alpha=0.5", "data.max_examples=120")
    t0 = time.perf_counter()
    training.train(cfg)
    print(f"tiny LoRA run: {time.perf_counter() - t0:.1f} s")
    out = Path(cfg.out_dir)

    # What trains: the adapters only (parameter counts), in the optimizer and in the checkpoint.
    base = base_student(cfg)
    peft_model = lora.add_adapters(base_student(cfg), cfg.student.lora, seed=cfg.student.seed)
    adapters = {n: p.numel() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    n_targets = 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert len(adapters) == 2 * n_targets
    step = out / "checkpoints" / "step_00000003"
    with safe_open(str(step / "model.safetensors"), "pt") as f:
        stored = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert set(stored) == set(adapters)
    assert sum(torch.Size(s).numel() for s in stored.values()) == sum(adapters.values())
    optim = torch.load(step / "optimizer.bin", weights_only=False)
    in_optimizer = sum(len(g["params"]) for g in optim["param_groups"])
    assert in_optimizer == len(optim["state"]) == len(adapters)
    assert sum(s["exp_avg"].numel() for s in optim["state"].values()) == sum(adapters.values())

    # The teacher is the student's base: the student starts as its base model, so the first step's KL is 0.
    first = [r for r in records(out) if r["split"] == "train"][0]
    assert first["kl"] == pytest.approx(0.0, abs=1e-7)

    # The adapter alone and merged: the merged student is an ordinary checkpoint giving base + adapter's logits.
    adapted = PeftModel.from_pretrained(base, out / "student_adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "student").eval()
    assert type(merged).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = adapted(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        plain = base_student(cfg)(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-4  # the adapters changed the model
    # Merged weights differ from the base only where the adapters are.
    merged_state, base_state = merged.state_dict(), base_student(cfg).state_dict()
    changed = {k for k in base_state if not torch.equal(merged_state[k], base_state[k])}
    assert changed and all(k.split(".")[-2] in {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"} for k in changed)


@pytest.mark.slow
def test_lora_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    steps = ["train.max_steps=16", "checkpoint.every=4", "eval.every=8", "log.every=1"]
    ref = lora_cfg(tmp_path / "ref", *steps)
    training.train(ref)

    out = tmp_path / "killed"
    # The killed half at this process's thread count, as the reference and the resumed half run here.
    res = kill_train_then_resume(TINY_LORA, out, steps, kill_at=8)
    assert "resumed from" in res.stderr
    for sub, name in (("student_adapter", "adapter_model.safetensors"), ("student", "model.safetensors")):
        a, b = load_file(str(out / sub / name)), load_file(str(Path(ref.out_dir) / sub / name))
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= 1e-6, f"{sub}: largest weight difference {worst:.3g}"
    want = {r["step"]: r["loss"] for r in records(Path(ref.out_dir)) if r["split"] == "train"}
    got = {r["step"]: r["loss"] for r in records(out) if r["split"] == "train"}
    assert got.keys() == want.keys()
    for s, v in got.items():
        assert v == pytest.approx(want[s], abs=1e-6)
