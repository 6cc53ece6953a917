"""Self-distillation (teacher: {self: ema | snapshot}): the teacher follows the student as written in
docs/methods.md §11, is kept in checkpoints, and a run interrupted and resumed equals an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, crash_after_checkpoint, kill_train_then_resume
from safetensors.torch import load_file

from distill import training
from distill.config import TrainConfig, load_config
from distill.training_hooks import SelfDistillHook

SELF = REPO / "configs" / "tiny" / "self_distill.yaml"


def _cfg(out: Path, *overrides: str, path: Path = SELF) -> TrainConfig:
    return load_config(TrainConfig, path, [f"out_dir={out}", "log.progress=false", *overrides])


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _student(out: Path) -> dict:
    return load_file(str(Path(out) / "student" / "model.safetensors"))


def test_ema_and_snapshot_teachers_follow_the_student():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    ema = SelfDistillHook(student, "ema", decay=0.8, every=None, start=0)
    snap = SelfDistillHook(student, "snapshot", decay=0.999, every=3, start=0)
    want = [p.detach().clone() for p in student.parameters()]
    history = []
    for step in range(1, 8):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        history.append([p.detach().clone() for p in student.parameters()])
        want = [0.8 * w + 0.2 * p for w, p in zip(want, history[-1], strict=True)]
        ema.after_step(student, step)
        snap.after_step(student, step)
        for got, w in zip(ema.model.parameters(), want, strict=True):
            torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-6)
        assert snap.active == (step >= 3)
        if step >= 3:  # the copy of the last multiple of 3
            frozen = history[(step // 3) * 3 - 1]
            assert all(torch.equal(a, b) for a, b in zip(snap.model.parameters(), frozen, strict=True))
    # what a checkpoint keeps restores the teacher exactly
    again = SelfDistillHook(student, "snapshot", decay=0.999, every=3, start=0)
    assert not again.active
    again.load_state_dict(snap.state_dict())
    assert again.active and again.step == 7
    assert all(torch.equal(a, b) for a, b in zip(again.model.parameters(), snap.model.parameters(), strict=True))


def test_self_distillation_trains_and_logs_the_kl_to_its_own_average(tmp_path):
    cfg = _cfg(tmp_path / "run", "train.max_steps=4", "log.every=1", "eval.every=4", "checkpoint.every=2")
    summary = training.train(cfg)
    rec = [r for r in _records(tmp_path / "run") if r["split"] == "train"]
    assert [r["kl"] for r in rec[:2]] == [0.0, 0.0]  # plain CE before teacher.start = 2
    assert all(r["kl"] > 0 for r in rec[2:])
    assert rec[0]["loss"] == pytest.approx(rec[0]["ce"], rel=1e-6)
    assert summary["kl_to_teacher"] > 0
    state = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000004" / training.TEACHER_STATE))
    assert int(state["step"]) == 4 and any(k.startswith("model.") for k in state)


def test_interrupted_self_distillation_resumes_exactly(tmp_path, monkeypatch):
    """EMA (the snapshot teacher's state round trip is in test_ema_and_snapshot_teachers_follow_the_student)."""
    steps = ["train.max_steps=6", "checkpoint.every=3", "eval.every=3", "log.every=1"]
    training.train(_cfg(tmp_path / "ref", *steps))
    crash_after_checkpoint(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        training.train(_cfg(tmp_path / "cut", *steps))
    monkeypatch.undo()
    training.train(_cfg(tmp_path / "cut", *steps), resume=True)
    a, b = _student(tmp_path / "ref"), _student(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _comparable(tmp_path / "ref") == _comparable(tmp_path / "cut")


def _comparable(out: Path) -> list[dict]:
    """The metrics without the wall-clock ones."""
    clock = {"tokens_per_s", "step_seconds", "teacher_seconds"}
    return [{k: v for k, v in r.items() if k not in clock} for r in _records(out)]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_self_distillation(tmp_path):
    steps = ["train.max_steps=16", "checkpoint.every=4", "eval.every=8", "log.every=1"]
    ref = tmp_path / "ref"
    training.train(_cfg(ref, *steps))
    out = tmp_path / "killed"
    # The killed half at this process's thread count, as the reference and the resumed half run here.
    kill_train_then_resume(SELF, out, steps, kill_at=8)
    a, b = _student(ref), _student(out)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    losses = {r["step"]: r["loss"] for r in _records(ref) if r["split"] == "train"}
    assert {r["step"]: r["loss"] for r in _records(out) if r["split"] == "train"} == pytest.approx(losses, rel=1e-6)
