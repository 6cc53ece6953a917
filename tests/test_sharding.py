"""Sharded runs (distill/sharding.py): FSDP2 through accelerate on CPU/gloo, the refusals (DeepSpeed, LoRA or a
self/base teacher with FSDP), the shipped accelerate configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY_TRAIN, kill_when
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from distill import sharding, training
from distill.config import TrainConfig, load_config

FSDP_CONFIG = REPO / "configs" / "accelerate" / "fsdp.yaml"
ZERO3_CONFIG = REPO / "configs" / "accelerate" / "deepspeed_zero3.yaml"
TINY_LORA = REPO / "configs" / "tiny" / "lora.yaml"


def cfg_with(path: Path, *overrides: str, base: Path = TINY_TRAIN) -> TrainConfig:
    return load_config(TrainConfig, base, [f"out_dir={path}", "log.progress=false", *overrides])


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def fsdp_cmd(out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
            "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "distill", "train", str(TINY_TRAIN), f"out_dir={out}", "log.progress=false", *overrides]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ----------------------------------------------------------------------------------------- configs, refusals


def test_shipped_accelerate_configs():
    fsdp = yaml.safe_load(FSDP_CONFIG.read_text())
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2
    assert fsdp["fsdp_config"]["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    zero3 = yaml.safe_load(ZERO3_CONFIG.read_text())
    assert zero3["distributed_type"] == "DEEPSPEED" and zero3["deepspeed_config"]["zero_stage"] == 3


def test_deepspeed_is_refused_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets for a deepspeed config
    with pytest.raises(ValueError, match=r"DeepSpeed .* not supported by distill train: .* output layer's full weight"):
        training.train(cfg_with(tmp_path / "run"))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize(("base", "override", "match"), [
    (TINY_LORA, "teacher=null", r"student.lora with FSDP is not supported"),
    (TINY_LORA, "teacher.student_base=true", r"student.lora with FSDP"),
    (REPO / "configs" / "tiny" / "self_distill.yaml", "train.max_steps=2", r"a self teacher with FSDP is not supported"),
])
def test_fsdp_refuses_what_it_does_not_shard(tmp_path, monkeypatch, base, override, match):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match=match):
        sharding.check_supported(cfg_with(tmp_path / "run", override, base=base))


# ----------------------------------------------------------------------------------------- two processes


@pytest.mark.slow
def test_two_process_fsdp_matches_single_process(tmp_path):
    # 3 eval batches on 2 processes: the second pads with an empty batch (forward passes are collective)
    common = ["train.max_steps=4", "eval.every=2", "eval.max_batches=3", "checkpoint.every=2", "log.every=1"]
    single = cfg_with(tmp_path / "single", *common, "train.batch_size=2", "train.grad_accum=2")
    single_summary = training.train(single)
    out = tmp_path / "fsdp"
    t0 = time.perf_counter()
    res = subprocess.run(fsdp_cmd(out, *common, "train.batch_size=2", "train.grad_accum=1"), cwd=REPO,
                         capture_output=True, text=True, timeout=600, env=ENV)
    print(f"2-process FSDP run: {time.perf_counter() - t0:.0f} s")
    assert res.returncode == 0, res.stderr[-3000:]
    # sharded checkpoints (a distributed checkpoint per model and optimizer), no whole-model file
    step = out / "checkpoints" / "step_00000004"
    assert (step / "pytorch_model_fsdp_0").is_dir() and (step / "optimizer_0").is_dir()
    assert not (step / "model.safetensors").exists()
    # the same training as one process: losses, weights, evaluation
    want, got = losses(Path(single.out_dir)), losses(out)
    assert got.keys() == want.keys() == {1, 2, 3, 4}
    for s in want:
        assert got[s] == pytest.approx(want[s], abs=1e-5)
    a, b = load_file(str(out / "student" / "model.safetensors")), load_file(
        str(Path(single.out_dir) / "student" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, worst
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in rows if r["split"] == "eval"][-1]
    assert last_eval["val_loss"] == pytest.approx(single_summary["val_loss"], rel=1e-4)
    assert last_eval["val_tokens"] == single_summary["val_tokens"]
    assert last_eval["kl_to_teacher"] == pytest.approx(single_summary["kl_to_teacher"], rel=1e-4)
    # an ordinary HF checkpoint, whole
    model = AutoModelForCausalLM.from_pretrained(out / "student")
    assert model.lm_head.weight.shape == (263, 32)


@pytest.mark.slow
def test_two_process_fsdp_resumes_exactly_after_sigkill(tmp_path):
    steps = ["train.max_steps=8", "checkpoint.every=2", "eval.every=4", "log.every=1", "train.batch_size=2",
             "train.grad_accum=1", "checkpoint.keep_last=5"]
    ref = tmp_path / "ref"
    res = subprocess.run(fsdp_cmd(ref, *steps), cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]

    out = tmp_path / "killed"
    kill_when(fsdp_cmd(out, *steps), lambda: (out / "checkpoints" / "step_00000004").exists(), env=ENV, timeout=300,
              group=True)  # the launcher and both workers
    assert not (out / "student").exists(), "the run was not killed mid-way"

    res = subprocess.run([*fsdp_cmd(out, *steps), "--resume"], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr
    a, b = load_file(str(out / "student" / "model.safetensors")), load_file(str(ref / "student" / "model.safetensors"))
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    want, got = losses(ref), losses(out)
    assert got.keys() == want.keys()
    for s in want:
        assert got[s] == pytest.approx(want[s], abs=1e-6)
