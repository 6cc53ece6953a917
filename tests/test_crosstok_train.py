"""`distill train` with a teacher of another tokenizer (configs/tiny/cross_tokenizer.yaml, loss.crosstok;
docs/cross_tokenizer.md): each method trains; with one tokenizer on both sides the run equals an ordinary
same-tokenizer run; a BPE student learns from a byte-level teacher; what is not supported is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, crash_after_checkpoint, run_cli_here

from distill.commands.quickstart import train_tokenizer
from distill.config import ConfigError, ModelSpec, TrainConfig, load_config
from distill.crosstok import load_projection, retokenize_batch, token_bytes
from distill.data import collate
from distill.losses import (
    IGNORE_INDEX,
    CrossTokSignal,
    DenseSignal,
    LossSpec,
    crosstok_kd_loss,
    naive_crosstok_loss,
)
from distill.models import final_hidden, flat_positions, load_model, load_tokenizer, output_head
from distill.teachers import open_teacher
from distill.tokenizer import byte_tokenizer

CONFIG = REPO / "configs" / "tiny" / "cross_tokenizer.yaml"
DATA = REPO / "configs" / "tiny" / "data" / "docstrings.jsonl"


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    """The teacher's byte-level BPE (the quickstart's recipe), trained on the tiny config's own data."""
    return train_tokenizer(DATA, 512, tmp_path_factory.mktemp("bpe") / "tok")


def quiet(tmp_path: Path) -> list[str]:
    return [f"out_dir={tmp_path / 'run'}", "log.progress=false"]


def train(tmp_path: Path, *overrides: str) -> list[dict]:
    result = run_cli_here("train", str(CONFIG), *quiet(tmp_path), *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["pkl", "gold", "uld"])
def test_each_method_trains_a_byte_student_from_a_bpe_teacher(tmp_path, bpe_dir, method):
    records = train(tmp_path, f"teacher.tokenizer={bpe_dir}", f"loss.crosstok={method}")
    steps = [r for r in records if r["split"] == "train"]
    assert len(steps) == 5 and [r for r in records if r["split"] == "eval"]
    for r in steps:
        assert all(math.isfinite(r[k]) for k in ("loss", "ce", "div", "kl")), r
        assert r["div"] >= 0 and r["kl"] >= 0
    # 10 steps at lr 3e-3 from a random init: CE falls by ~0.7 nats on any machine (5.54 -> 4.81 measured)
    assert steps[-1]["ce"] < steps[0]["ce"] - 0.2
    if method == "pkl":  # forward KL through W: the divergence is the logged KL
        assert all(r["div"] == r["kl"] for r in steps)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "preflight: cross-tokenizer:" in log and "of the student's vocabulary has an exact teacher token" in log
    assert "the student splits '1000000'" in log  # the byte student and this BPE split it differently
    assert list((tmp_path / "run" / "crosstok").glob("crosstok-*.safetensors"))  # W cached under out_dir


@pytest.mark.parametrize("chunked", ["true", "false"])
def test_one_tokenizer_on_both_sides_equals_the_ordinary_run(tmp_path, chunked):
    """With the student's tokenizer on both sides W is the identity and every group one token: pkl's loss is the
    ordinary loss, computed another way (the groups, W, the per-group sum), so the runs agree step by step, on
    the chunked path and on materialized logits."""
    common = ["teacher.tokenizer=byte", "train.max_steps=6", f"loss.chunked={chunked}"]
    cross = train(tmp_path / "cross", *common, "loss.crosstok=pkl")
    plain = train(tmp_path / "plain", *common, "loss.crosstok=null")
    cross_train = [r for r in cross if r["split"] == "train"]
    plain_train = [r for r in plain if r["split"] == "train"]
    assert len(cross_train) == len(plain_train) == 3
    for a, b in zip(cross_train, plain_train, strict=True):
        for key in ("loss", "ce", "div", "kl", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a, b)
    a, b = cross[-1], plain[-1]
    assert a["split"] == b["split"] == "eval" and a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    assert "kl_to_teacher" in b and "kl_to_teacher" not in a  # evaluation measures no distance across tokenizers


def test_bpe_student_from_a_byte_teacher(tmp_path, bpe_dir):
    """The reverse direction: the teacher's sequences are longer than the student's (bytes vs BPE tokens)."""
    records = train(tmp_path, f"student.tokenizer={bpe_dir}", "teacher.tokenizer=byte", "data.seq_len=48",
                    "teacher.config.max_position_embeddings=512", "train.max_steps=4", "eval.max_batches=1")
    steps = [r for r in records if r["split"] == "train"]
    assert steps and all(math.isfinite(r[k]) for r in steps for k in ("loss", "ce", "div", "kl"))


def test_teacher_too_short_for_its_tokens_names_the_setting(tmp_path, bpe_dir):
    result = run_cli_here("train", str(CONFIG), *quiet(tmp_path), f"student.tokenizer={bpe_dir}",
                          "teacher.tokenizer=byte", "data.seq_len=128", "teacher.config.max_position_embeddings=64",
                          "train.max_steps=1")
    assert result.returncode == 2 and "data.seq_len" in result.stderr and "64 positions" in result.stderr


def test_crosstok_loss_matches_a_reference_written_out(bpe_dir):
    """crosstok_kd_loss (chunked and naive) against alpha * CE / n + (1 - alpha) * T^2 * Σ per-group / n formed
    here from plain torch CE and the naive per-group divergence; gradients of the two paths agree."""
    cfg = load_config(TrainConfig, CONFIG, [f"teacher.tokenizer={bpe_dir}"])
    s_tok, t_tok = byte_tokenizer(), load_tokenizer(cfg.teacher, "teacher")
    student = load_model(cfg.student, "student", s_tok)
    teacher = load_model(cfg.teacher, "teacher", t_tok).eval()
    texts = [json.loads(x)["text"] for x in DATA.read_text().splitlines()[:3]]
    rows = []
    for text in texts:
        ids = s_tok(text, add_special_tokens=False)["input_ids"][:60]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 5 + ids[5:]})
    batch = collate(rows, s_tok.pad_token_id)
    projection, matches, _ = load_projection(s_tok, t_tok, Path(bpe_dir).parent / "w")
    cross = retokenize_batch(batch, t_tok, token_bytes(s_tok), token_bytes(t_tok), teacher_pad_id=t_tok.pad_token_id)
    with torch.no_grad():
        t_hidden = flat_positions(final_hidden(teacher, cross.teacher_batch))
    signal = CrossTokSignal(DenseSignal(t_hidden, output_head(teacher, len(t_tok))), cross.groups, "gold",
                            projection, matches)
    spec = LossSpec(divergence="forward_kl", temperature=2.0, alpha=0.3)
    labels = batch["labels"][:, 1:].reshape(-1)
    n = int((labels != IGNORE_INDEX).sum())
    head = output_head(student, len(s_tok))
    results = []
    for chunked in (True, False):
        student.zero_grad()
        hidden = flat_positions(final_hidden(student, batch))
        value, stats = crosstok_kd_loss(hidden, head, labels, signal, n, spec, chunked=chunked)
        value.backward()
        results.append((value.detach(), [p.grad.clone() for p in student.parameters()], stats))
    with torch.no_grad():
        hidden = flat_positions(final_hidden(student, batch)).double()
        logits = hidden @ head.weight.double().T
        keep = labels != IGNORE_INDEX
        ce = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
        per_group = naive_crosstok_loss(logits, (t_hidden.double() @ head_weight(teacher, len(t_tok)).T), cross.groups,
                                        "gold", spec, projection=projection, matches=matches)
        want = 0.3 * ce / n + 0.7 * 4.0 * per_group.sum() / n
    for value, _, stats in results:
        assert float(value) == pytest.approx(float(want), rel=1e-5)
        assert float(stats["ce_sum"]) == pytest.approx(float(ce), rel=1e-5)
        assert float(stats["div_sum"]) == pytest.approx(float(per_group.sum()), rel=1e-5)
    for g_chunked, g_naive in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(g_chunked, g_naive, rtol=1e-4, atol=1e-6)


def head_weight(model, vocab: int) -> torch.Tensor:
    return output_head(model, vocab).weight.double()


def test_another_tokenizer_without_the_setting_names_it(bpe_dir):
    tok = byte_tokenizer()
    spec = ModelSpec.model_validate({"tokenizer": str(bpe_dir), "config": {"model_type": "llama", "hidden_size": 16,
                                     "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}})
    with pytest.raises(ValueError, match=r"loss\.crosstok is set \(pkl, gold or uld"):
        open_teacher(spec, tokenizer=tok, student_ref="byte", loss=LossSpec(), seq_len=64, vocab_policy="truncate",
                     device="cpu")


@pytest.mark.parametrize(("overrides", "named"), [
    (["teacher=null"], "no teacher"),
    (["teacher.cache=runs/some_cache"], "a cache holds the teacher's top-k at the positions of the tokenization"),
    (["train.batches=skd", "data.packing=false"], "train.batches=skd"),
    (["loss.hidden.weight=1.0"], "loss.hidden=null"),
    (["loss.divergence=sampled_reverse_kl"], "on-policy objective"),
])
def test_what_is_not_supported_across_tokenizers_is_refused(overrides, named):
    raw = yaml.safe_load(CONFIG.read_text())
    if any(o.startswith("teacher.cache") for o in overrides):
        raw["teacher"] = {}
    with pytest.raises(ConfigError, match="loss.crosstok=pkl") as info:
        load_config(TrainConfig, raw, overrides)
    assert named in str(info.value)


def test_eval_refuses_a_teacher_with_another_tokenizer(tmp_path, bpe_dir):
    """distill eval measures no distance to a teacher with another tokenizer: it says so, and what to do."""
    result = run_cli_here("eval", str(REPO / "configs" / "tiny" / "eval.yaml"), f"out={tmp_path / 'eval.json'}",
                          f"teacher.tokenizer={bpe_dir}", "speculative=null")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "distill eval measures no distance to such a teacher" in result.stderr
    assert not (tmp_path / "eval.json").exists()


def test_preflight_opens_the_cross_tokenizer_teacher_as_training_does(tmp_path, bpe_dir):
    """distill preflight on a loss.crosstok config: the teacher of its own tokenizer is opened (not refused), its
    vocabulary is reported as its own, and the pre-flight warning for numerals split differently is logged."""
    result = run_cli_here("preflight", str(CONFIG), f"out_dir={tmp_path / 'run'}", f"teacher.tokenizer={bpe_dir}",
                          "--json", str(tmp_path / "preflight.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "preflight.json").read_text())
    assert report["vocabulary"]["teacher_tokenizer"] == len(load_tokenizer(ModelSpec(path=str(bpe_dir)), "t")) == 512
    assert "teacher" not in report["vocabulary"]["models"]  # its rows are not measured against the student's tokens
    assert "the student splits" in result.stderr  # a numeral the two tokenizers split differently


def test_preflight_measures_a_cross_tokenizer_teacher_on_its_own_tokens(tmp_path, bpe_dir):
    """distill preflight reads a teacher of another tokenizer on its own tokens of the sample's text: with the
    student's tokenizer on both sides its loss and bits per byte are the ordinary teacher's, to rounding; with a
    BPE teacher its loss is per BPE token, and only the bits per byte gap is reported."""
    reports = {}
    for name, extra in (("cross", ["teacher.tokenizer=byte", "loss.crosstok=pkl"]),
                        ("plain", ["teacher.tokenizer=byte", "loss.crosstok=null"]),
                        ("bpe", [f"teacher.tokenizer={bpe_dir}"])):
        result = run_cli_here("preflight", str(CONFIG), f"out_dir={tmp_path / name}", *extra,
                              "--json", str(tmp_path / f"{name}.json"))
        assert result.returncode == 0, result.stderr[-3000:]
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())["splits"]["train"]
    cross, plain, bpe = reports["cross"], reports["plain"], reports["bpe"]
    assert cross["teacher"]["own_tokens"] and "own_tokens" not in plain["teacher"]
    assert cross["teacher"]["tokens"] == plain["teacher"]["tokens"]  # clean text: every target is in a group
    assert cross["teacher"]["loss"] == pytest.approx(plain["teacher"]["loss"], rel=1e-5)
    assert cross["teacher"]["bits_per_byte"] == pytest.approx(plain["teacher"]["bits_per_byte"], rel=1e-5)
    assert cross["gap_bits_per_byte"] == pytest.approx(
        plain["student"]["bits_per_byte"] - plain["teacher"]["bits_per_byte"], rel=1e-4)
    assert "gap" not in cross and "gap" in plain
    assert bpe["teacher"]["tokens"] < plain["teacher"]["tokens"]  # fewer BPE tokens for the same text
    assert math.isfinite(bpe["teacher"]["bits_per_byte"]) and "gap_bits_per_byte" in bpe


def test_resumed_run_equals_an_uninterrupted_one(tmp_path, bpe_dir, monkeypatch):
    """The cross-tokenizer teacher keeps no state: a run stopped after its step-2 checkpoint and resumed (W read
    back from its cache file) writes the same records as a run that was never stopped."""
    common = [f"teacher.tokenizer={bpe_dir}", "train.max_steps=4", "checkpoint.every=2", "eval.every=0"]
    whole = train(tmp_path / "whole", *common)
    crash_after_checkpoint(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_cli_here("train", str(CONFIG), *quiet(tmp_path / "resumed"), *common)
    monkeypatch.undo()
    result = run_cli_here("train", str(CONFIG), *quiet(tmp_path / "resumed"), *common, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = [json.loads(x) for x in (tmp_path / "resumed" / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = ("step", "loss", "ce", "div", "kl", "grad_norm")
    later = [{k: r[k] for k in keys} for r in resumed if r["split"] == "train" and r["step"] > 2]
    assert later and later == [{k: r[k] for k in keys} for r in whole if r["split"] == "train" and r["step"] > 2]


GKD = REPO / "configs" / "tiny" / "gkd.yaml"


def train_gkd(tmp_path: Path, *overrides: str) -> list[dict]:
    result = run_cli_here("train", str(GKD), *quiet(tmp_path), *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_gkd_on_the_students_samples_with_one_tokenizer_against_the_ordinary_run(tmp_path):
    """GKD's on-policy steps re-tokenize the student's own samples for the teacher. With the student's tokenizer
    on both sides (and JSD, configs/tiny/gkd.yaml's divergence) every group is one token and its divergence the
    ordinary one, so the runs agree until the first step on the student's samples. There, a random student's
    bytes are not all valid UTF-8, and a sample's tokens from its first invalid byte on are in no group (they
    keep their CE): the same CE, and no more divergence than the ordinary run's (the terms left out are >= 0)."""
    cross = [r for r in train_gkd(tmp_path / "cross", "loss.crosstok=pkl") if r["split"] == "train"]
    plain = [r for r in train_gkd(tmp_path / "plain") if r["split"] == "train"]
    assert len(cross) == len(plain) == 8 and [r["on_policy"] for r in cross] == [r["on_policy"] for r in plain]
    first = next(i for i, r in enumerate(plain) if r["on_policy"] == 1.0)
    for a, b in zip(cross[:first], plain[:first], strict=True):
        for key in ("loss", "ce", "div", "kl", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a, b)
    a, b = cross[first], plain[first]
    assert a["ce"] == pytest.approx(b["ce"], rel=1e-5)
    assert 0 <= a["div"] <= b["div"] * (1 + 1e-5) and 0 <= a["kl"] <= b["kl"] * (1 + 1e-5)
    assert a["div"] > 0  # the samples were scored (8 of them: all starting with an invalid byte is ~0.5^8)


def test_gkd_from_a_bpe_teacher(tmp_path, bpe_dir):
    records = train_gkd(tmp_path, f"teacher.tokenizer={bpe_dir}", "loss.crosstok=gold")
    steps = [r for r in records if r["split"] == "train"]
    assert sum(r["on_policy"] for r in steps) > 0
    assert all(math.isfinite(r[k]) and r[k] >= 0 for r in steps for k in ("loss", "div", "kl"))
