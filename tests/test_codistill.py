"""Co-distillation (teacher: {peers: [...]}): during burn-in it is independent CE training of every model
(exactly); afterwards each model distills from the others; every model is saved as a Hugging Face
checkpoint; an interrupted run resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, crash_after_checkpoint, kill_train_then_resume
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from distill import training
from distill.config import TrainConfig, load_config

CODISTILL = REPO / "configs" / "tiny" / "codistill.yaml"


def _cfg(out: Path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, CODISTILL, [f"out_dir={out}", "log.progress=false", *overrides])


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _weights(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_burn_in_is_independent_training_of_every_model(tmp_path):
    """With the burn-in covering the run, the student and the peer are exactly two plain CE runs."""
    steps = ["train.max_steps=3", "eval.every=0", "checkpoint.every=0", "teacher.burn_in=3"]
    cfg = _cfg(tmp_path / "co", *steps)
    training.train(cfg)
    plain = _cfg(tmp_path / "plain", *steps[:3], "teacher=null")
    training.train(plain)
    peer = plain.model_copy(update={"out_dir": str(tmp_path / "peer"), "student": cfg.teacher.peers[0]})
    training.train(peer)
    assert _same(_weights(tmp_path / "co" / "student"), _weights(tmp_path / "plain" / "student"))
    assert _same(_weights(tmp_path / "co" / "peers" / "peer0"), _weights(tmp_path / "peer" / "student"))


def test_codistillation_trains_both_models_toward_each_other(tmp_path):
    cfg = _cfg(tmp_path / "co", "train.max_steps=8", "log.every=1", "eval.every=8", "checkpoint.every=0",
               "teacher.burn_in=2", "loss.alpha=0.0", "optim.lr=1e-2")
    summary = training.train(cfg)
    rec = [r for r in _records(tmp_path / "co") if r["split"] == "train"]
    assert [r["kl"] for r in rec[:2]] == [0.0, 0.0] and all(r["kl"] > 0 for r in rec[2:])
    assert rec[2]["kl_peer0"] == rec[2]["kl"]
    # The student has moved toward its peer (measured, student seeds 1 and 3: 0.003 against 0.015).
    assert summary["kl_to_teacher"] < rec[2]["kl"]
    peer = AutoModelForCausalLM.from_pretrained(tmp_path / "co" / "peers" / "peer0")
    assert (tmp_path / "co" / "peers" / "peer0" / "tokenizer_config.json").is_file()
    ids = torch.tensor([[1, 70, 80, 90]])
    assert peer(ids).logits.shape[-1] >= 263


def test_interrupted_codistillation_resumes_exactly(tmp_path, monkeypatch):
    steps = ["train.max_steps=6", "checkpoint.every=3", "eval.every=3", "log.every=1", "teacher.burn_in=2"]
    training.train(_cfg(tmp_path / "ref", *steps))
    crash_after_checkpoint(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        training.train(_cfg(tmp_path / "cut", *steps))
    monkeypatch.undo()
    training.train(_cfg(tmp_path / "cut", *steps), resume=True)
    for model in ("student", "peers/peer0"):
        assert _same(_weights(tmp_path / "ref" / model), _weights(tmp_path / "cut" / model)), model
    clock = {"tokens_per_s", "step_seconds", "teacher_seconds"}
    runs = [[{k: v for k, v in r.items() if k not in clock} for r in _records(tmp_path / d)] for d in ("ref", "cut")]
    assert runs[0] == runs[1]


def test_a_peer_with_another_tokenizer_is_refused(tmp_path):
    from distill.tokenizer import byte_tokenizer

    other = byte_tokenizer()
    other.add_tokens(["<|extra|>"])
    other.save_pretrained(tmp_path / "other-tok")
    with pytest.raises(ValueError, match=r"teacher.peers\[0\]: the student tokenizer .* differ"):
        training.train(_cfg(tmp_path / "run", f"teacher.peers=[{{tokenizer: {tmp_path / 'other-tok'}, config: "
                                          "{model_type: llama, hidden_size: 32, intermediate_size: 64, "
                                          "num_hidden_layers: 1, num_attention_heads: 4}}]"))


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_codistillation(tmp_path):
    steps = ["train.max_steps=16", "checkpoint.every=4", "eval.every=8", "log.every=1"]
    ref = tmp_path / "ref"
    training.train(_cfg(ref, *steps))
    out = tmp_path / "killed"
    # The killed half at this process's thread count, as the reference and the resumed half run here.
    kill_train_then_resume(CODISTILL, out, steps, kill_at=8)
    for model in ("student", "peers/peer0"):
        a, b = _weights(ref / model), _weights(out / model)
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, model
    losses = {r["step"]: r["loss"] for r in _records(ref) if r["split"] == "train"}
    assert {r["step"]: r["loss"] for r in _records(out) if r["split"] == "train"} == pytest.approx(losses, rel=1e-6)
