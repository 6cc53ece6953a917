"""A served teacher with another tokenizer (``teacher: {server: URL, tokenizer: DIR}`` with ``loss.crosstok``;
docs/cross_tokenizer.md): ``distill serve`` on a model with a byte-level BPE, a byte-level student.

The server scores the teacher's own tokenization of each batch through the OpenAI-compatible completions
request vLLM answers (``prompt_logprobs``, ``echo``, ``max_tokens: 0``; tests/test_engine_contract.py holds the
request rules, cited from vLLM's source): with every id (``top_k: all``) or its hidden states (``signal:
hidden``) the loss is the live teacher's to rounding, with a top-k it runs over the ids sent. `distill train`
runs with it on the dataset and on GKD's samples of the student, and the pre-flight lines are logged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli_here, serving_in_process

from distill.commands.quickstart import train_tokenizer
from distill.config import ModelSpec, ServerTeacherSpec, TrainConfig, load_config
from distill.data import collate
from distill.losses import IGNORE_INDEX, LossSpec, SparseTarget, crosstok_kd_loss
from distill.models import (
    final_hidden,
    flat_positions,
    load_model,
    load_tokenizer,
    output_head,
    save_pretrained,
)
from distill.teachers import open_teacher
from distill.tokenizer import byte_tokenizer

CONFIG = REPO / "configs" / "tiny" / "cross_tokenizer.yaml"
GKD = REPO / "configs" / "tiny" / "gkd.yaml"
DATA = REPO / "configs" / "tiny" / "data" / "docstrings.jsonl"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """The tiny config's teacher (random init, seed 0) on a byte-level BPE of the tiny data, saved as an HF
    checkpoint with its tokenizer."""
    root = tmp_path_factory.mktemp("served_teacher")
    bpe = train_tokenizer(DATA, 512, root / "tok")
    cfg = load_config(TrainConfig, CONFIG, [f"teacher.tokenizer={bpe}"])
    tok = load_tokenizer(cfg.teacher, "teacher")
    out = root / "teacher"
    save_pretrained(load_model(cfg.teacher, "teacher", tok), tok, out)
    return out


@pytest.fixture(scope="module")
def served(teacher_dir):
    """The teacher behind ``distill serve``'s app with no cap on log-probs and log-probs at the request's
    temperature (``--max-logprobs -1 --logprobs-mode processed``)."""
    model = load_model(ModelSpec(path=str(teacher_dir)), "teacher").eval()
    with serving_in_process(model, load_tokenizer(ModelSpec(path=str(teacher_dir)), "t"), "bpe-teacher",
                            max_logprobs=-1, logprobs_mode="processed") as url:
        yield url


def open_kind(spec, crosstok: str, tmp_path: Path):
    teacher, _ = open_teacher(spec, tokenizer=byte_tokenizer(), student_ref="byte", loss=LossSpec(temperature=1.5),
                              seq_len=128, vocab_policy="truncate", device="cpu", crosstok=crosstok,
                              cache_dir=str(tmp_path))
    return teacher


def batch_of_text() -> dict:
    tok = byte_tokenizer()
    rows = []
    for line in DATA.read_text().splitlines()[:3]:
        ids = tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"][:70]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 4 + ids[4:]})
    return collate(rows, tok.pad_token_id)


def loss_of(teacher, batch: dict, student, spec: LossSpec) -> float:
    labels = batch["labels"][:, 1:].reshape(-1)
    n = int((labels != IGNORE_INDEX).sum())
    with torch.no_grad():
        hidden = flat_positions(final_hidden(student, batch))
        value, _ = crosstok_kd_loss(hidden, output_head(student, len(byte_tokenizer())), labels, teacher.signal(batch), n, spec)
    return float(value)


@pytest.mark.parametrize("method", ["pkl", "gold", "uld"])
def test_every_id_or_hidden_states_from_the_server_give_the_live_teachers_loss(tmp_path, teacher_dir, served, method):
    """The same model live and served: the loss from the server's whole distribution (top_k: all) and from its
    hidden states (signal: hidden) equals the live teacher's (T = 1.5, which the server applies); from its
    top-5 it differs (the divergence runs over the ids sent) but stays finite."""
    cfg = load_config(TrainConfig, CONFIG)
    student = load_model(cfg.student, "student", byte_tokenizer()).eval()
    batch = batch_of_text()
    spec = LossSpec(temperature=1.5, alpha=0.2)
    tok = str(teacher_dir)
    live = loss_of(open_kind(ModelSpec(path=tok), method, tmp_path), batch, student, spec)
    every = open_kind(ServerTeacherSpec(server=served, tokenizer=tok, top_k="all"), method, tmp_path)
    assert isinstance(every.signal(batch).teacher, SparseTarget)
    assert loss_of(every, batch, student, spec) == pytest.approx(live, rel=2e-5)
    hidden = open_kind(ServerTeacherSpec(server=served, tokenizer=tok, signal="hidden"), method, tmp_path)
    assert loss_of(hidden, batch, student, spec) == pytest.approx(live, rel=2e-5)
    top5 = loss_of(open_kind(ServerTeacherSpec(server=served, tokenizer=tok, top_k=5), method, tmp_path), batch,
                   student, spec)
    assert math.isfinite(top5) and abs(top5 - live) > 1e-4


def records(tmp_path: Path) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_train_with_a_served_teacher_of_another_tokenizer(tmp_path, teacher_dir, served):
    """configs/tiny/cross_tokenizer.yaml with the teacher served (top-20, vLLM's default cap): it trains, and
    the pre-flight lines (the vocabularies' overlap, numerals split differently) are in the log."""
    result = run_cli_here("train", str(CONFIG), f"out_dir={tmp_path / 'run'}", "log.progress=false",
                          "teacher=null",
                          f"teacher={{server: {served}, tokenizer: {teacher_dir}}}", "train.max_steps=4")
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [r for r in records(tmp_path) if r["split"] == "train"]
    assert steps and all(math.isfinite(r[k]) and r[k] >= 0 for r in steps for k in ("loss", "div", "kl"))
    log = (tmp_path / "run" / "train.log").read_text()
    assert "preflight: cross-tokenizer:" in log and "of the student's vocabulary has an exact teacher token" in log
    assert f"server {served}" in log and "top-20" in log


def test_gkd_samples_of_the_student_scored_by_a_served_teacher_of_another_tokenizer(tmp_path, teacher_dir, served):
    """GKD's on-policy steps: the student's samples are decoded, re-tokenized with the teacher's tokenizer and
    scored by the server."""
    result = run_cli_here("train", str(GKD), f"out_dir={tmp_path / 'run'}", "log.progress=false", "teacher=null",
                          f"teacher={{server: {served}, tokenizer: {teacher_dir}, top_k: all}}", "loss.crosstok=pkl")
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [r for r in records(tmp_path) if r["split"] == "train"]
    assert sum(r["on_policy"] for r in steps) > 0
    assert all(math.isfinite(r[k]) and r[k] >= 0 for r in steps for k in ("loss", "div", "kl"))


@pytest.mark.parametrize(("teacher", "named"), [
    ("{server: http://127.0.0.1:9}", "teacher.tokenizer is not set"),
    ("{server: http://127.0.0.1:9, tokenizer: byte, realized_token: false}", "teacher.realized_token=true"),
])
def test_what_a_served_teacher_needs_across_tokenizers_is_asked_for(teacher, named):
    with pytest.raises(ValueError, match="loss.crosstok=pkl") as info:
        load_config(TrainConfig, CONFIG, ["teacher=null", f"teacher={teacher}"])
    assert named in str(info.value)
