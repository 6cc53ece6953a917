"""distill preflight: the report's sections, and its numbers against references written out here (plain torch in
float64 on the same examples), a teacher equal to the student, a vocabulary built to miss known tokens, a cache's
manifest. The forward-cost ratio is timing: printed, never asserted as a value."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, SMALL_CACHE, SMALL_DATA, TINY_CACHE, TINY_TRAIN, run_cli_here

from distill import api
from distill.config import TrainConfig, load_config
from distill.data import build_datasets
from distill.evaluation.preflight import render
from distill.losses import IGNORE_INDEX
from distill.models import load_model, load_tokenizer, save_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def reference_loss(model, examples: list[dict]) -> tuple[float, int]:
    """Mean CE of each example's supervised next tokens under ``model``, one unpadded example at a time, in
    float64 from the full logits; and the number of those tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            labels = torch.tensor(ex["labels"][1:])
            logits = model(input_ids=ids).logits[0, :-1].double()
            keep = labels != IGNORE_INDEX
            total += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count, count


def tiny_setup(*overrides: str):
    cfg = load_config(TrainConfig, TINY_TRAIN, list(overrides))
    tok = load_tokenizer(cfg.student, "student")
    train_ds, eval_ds = build_datasets(cfg.data, tok, max_positions=256)
    return cfg, tok, {"train": train_ds, "eval": eval_ds}


def test_cli_prints_every_section_and_writes_json(tmp_path, capsys):
    out = tmp_path / "pre.json"
    res = run_cli_here("preflight", str(TINY_TRAIN), "--batches", "2", "--json", str(out))
    assert res.returncode == 0, res.stderr
    text = capsys.readouterr().out
    for section in ("teacher: live model", "losses (nats/token, bits/byte):", "  train: student", "  eval: student",
                    "vocabulary: tokenizer 263 tokens", "  student: 263 output rows", "cost (one micro-batch",
                    "teacher signal (live teacher, no grad)", "what to expect", "benchmarks/results/quickstart.json"):
        assert section in text, section
    report = json.loads(out.read_text())
    assert set(report["splits"]) == {"train", "eval"}
    ratio = report["cost"]["ratio"]
    print(f"teacher signal / student step on one tiny micro-batch: {ratio:.2f}x (timing; not asserted)")
    assert math.isfinite(ratio) and ratio > 0


def test_losses_and_bits_per_byte_match_a_float64_reference():
    cfg, tok, datasets = tiny_setup()
    report = api.preflight(TINY_TRAIN, batches=2).report
    student = load_model(cfg.student, "student", tok).eval()
    teacher = load_model(cfg.teacher, "teacher", tok).eval()
    special = set(tok.all_special_ids)
    for split, got in report["splits"].items():
        examples = [datasets[split][i] for i in got["examples"]]
        assert len(examples) == 2 * cfg.train.batch_size
        s_loss, s_count = reference_loss(student, examples)
        t_loss, t_count = reference_loss(teacher, examples)
        assert got["student"]["tokens"] == s_count and got["teacher"]["tokens"] == t_count
        assert got["student"]["loss"] == pytest.approx(s_loss, rel=1e-5)
        assert got["teacher"]["loss"] == pytest.approx(t_loss, rel=1e-5)
        assert got["gap"] == pytest.approx(s_loss - t_loss, abs=1e-4)
        # the byte tokenizer: one byte per ordinary token, none for a special one
        n_bytes = sum(1 for ex in examples for lab in ex["labels"][1:] if lab != IGNORE_INDEX and lab not in special)
        assert got["target_bytes"] == n_bytes
        assert got["teacher"]["bits_per_byte"] == pytest.approx(t_loss * t_count / (n_bytes * math.log(2)), rel=1e-5)
        assert got["student"]["bits_per_byte"] == pytest.approx(s_loss * s_count / (n_bytes * math.log(2)), rel=1e-5)


def test_a_teacher_equal_to_the_student_has_no_gap(tmp_path):
    cfg, tok, _ = tiny_setup()
    save_pretrained(load_model(cfg.student, "student", tok), tok, tmp_path / "copy")
    report = api.preflight(TINY_TRAIN, "teacher.config=null", "teacher.tokenizer=null", f"teacher.path={tmp_path / 'copy'}",
                           batches=2).report
    for split in ("train", "eval"):
        assert report["splits"][split]["gap"] == 0.0
    assert "expected to give nothing" in "\n".join(render(report))


def test_vocabulary_fit_counts_the_tokens_an_output_layer_misses():
    """A student whose output layer has 100 rows for the byte tokenizer's 263 tokens misses every sample target
    with an id of 100 or more; training would refuse it, the report counts them and measures no student loss."""
    _, _, datasets = tiny_setup()
    report = api.preflight(TINY_TRAIN, "student.config.vocab_size=100", "student.config.pad_token_id=null", batches=2).report
    labels = [lab for split, got in report["splits"].items() for i in got["examples"]
              for lab in datasets[split][i]["labels"][1:] if lab != IGNORE_INDEX]
    missed = sum(1 for lab in labels if lab >= 100)
    assert 0 < missed < len(labels)  # the case is not trivial
    fit = report["vocabulary"]
    assert fit["sample_tokens"] == len(labels)
    assert fit["models"]["student"] == {"output_rows": 100, "padded_rows": 0, "missing_rows": 163,
                                        "uncovered_sample_tokens": missed}
    assert fit["models"]["teacher"]["uncovered_sample_tokens"] == 0
    assert all("student" not in got for got in report["splits"].values())


def test_padded_rows_are_reported():
    report = api.preflight(TINY_TRAIN, "student.config.vocab_size=300", "loss.vocab_policy=truncate", batches=1).report
    assert report["vocabulary"]["models"]["student"]["padded_rows"] == 300 - 263
    assert report["vocabulary"]["models"]["student"]["uncovered_sample_tokens"] == 0


def test_a_cached_teacher_reports_its_manifest(tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    api.cache(TINY_CACHE, f"out_dir={cache_dir}", *SMALL_CACHE)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    report = api.preflight(TINY_TRAIN, "teacher=null", f"teacher.cache={cache_dir}", *SMALL_DATA, batches=1).report
    for split, info in manifest["splits"].items():
        assert report["cache"][split]["bytes"] == info["bytes"] == sum(s["bytes"] for s in info["shards"])
        assert report["cache"][split]["positions"] == info["positions"]
        assert report["cache"][split]["bytes_per_token"] == pytest.approx(info["bytes_per_token"], abs=1e-4)
    assert "teacher_signal_s" in report["cost"]
    assert "cache on disk, train:" in capsys.readouterr().out


def test_a_bad_config_or_batch_count_is_refused_with_the_key():
    res = run_cli_here("preflight", str(TINY_TRAIN), "loss.alpha=7")
    assert res.returncode == 2 and "loss.alpha" in res.stderr, res.stderr
    res = run_cli_here("preflight", str(TINY_TRAIN), "--batches", "0")
    assert res.returncode == 2 and "--batches" in res.stderr, res.stderr


def test_what_to_expect_reads_the_distillation_map():
    """The map's line for a gap equal to one measured teacher's gap: that teacher, its gains per alpha and the
    better alpha, each as benchmarks/results/kd_map.json has it."""
    from distill.evaluation.preflight import (
        KD_MAP_RESULTS,
        expectation,
        kd_map_reference,
        quickstart_reference,
    )

    path = REPO / KD_MAP_RESULTS
    if not path.is_file() or "a" not in json.loads(path.read_text()):
        pytest.skip("no distillation map in this checkout")
    rows = json.loads(path.read_text())["a"]["map"]
    strongest = max(rows, key=lambda r: r["teacher_gap"]["mean"])["teacher"]
    mine = [r for r in rows if r["teacher"] == strongest]
    gap = mine[0]["teacher_gap"]["mean"]
    best = max(mine, key=lambda r: r["gain"]["mean"])
    report = {"reference": quickstart_reference(), "kd_map": kd_map_reference(),
              "splits": {"eval": {"gap": gap}}}
    text = "\n".join(expectation(report))
    assert str(KD_MAP_RESULTS) in text
    line = next(x for x in text.splitlines() if "the map's teacher nearest this gap" in x)
    assert f"'{strongest}', {gap:+.2f} nats" in line
    for r in mine:
        seeds = ", ".join(f"{p['gain']:+.2f}" for p in r["per_seed"].values())
        assert f"{r['gain']['mean']:+.2f} at loss.alpha={r['alpha']:g} (seeds: {seeds})" in line
    if best["gain"]["mean"] > 0:
        assert f"loss.alpha={best['alpha']:g} did best there" in line
    else:
        assert "no alpha beat the student trained alone there" in line
    assert "nearest this gap" not in "\n".join(expectation({**report, "splits": {}}))  # no gap: the summary only
