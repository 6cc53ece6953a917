"""The train recipe end to end on tiny random Llama models: outputs, resume, accumulation, bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    REPO,
    SHARP_TEACHER,
    SMALL_DATA,
    TINY_TRAIN,
    kill_train_then_resume,
    run_cli,
    run_cli_here,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill import training
from distill.config import ConfigError, TrainConfig, load_config
from distill.data import build_datasets, collate
from distill.engines import LocalEngine
from distill.evaluation.metrics import eval_batch_indices, eval_sums, metrics_from_sums
from distill.models import load_model, output_head
from distill.teachers.engine import EngineTeacher
from distill.tokenizer import byte_tokenizer


def cfg_with(tmp_path: Path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, TINY_TRAIN, [f"out_dir={tmp_path / 'run'}", "log.progress=false",
                                                       *overrides])


def student_state(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out_dir / "student" / "model.safetensors"))


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"largest weight difference {worst:.3g} > {atol}"


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ CLI


def test_help_lists_commands_and_sections(capsys):
    res = run_cli("--help")  # the installed command, in a fresh process
    assert res.returncode == 0 and "train" in res.stdout
    from distill import cli

    for command, wanted in (("train", ("student", "teacher", "data", "loss", "optim", "checkpoint", "--resume")),
                            ("cache", ("mode", "hybrid", "head", "draws"))):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])  # the same parser, in this process
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        for section in wanted:
            assert section in out, (command, section)


@pytest.mark.slow
def test_cli_tiny_run_writes_everything(tmp_path):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    res = run_cli("train", str(TINY_TRAIN), f"out_dir={out}")
    print(f"tiny run: {time.perf_counter() - t0:.0f} s")  # measured, not asserted (machine load varies)
    assert res.returncode == 0, res.stderr
    # checkpoints: every 10 of 20 steps, last 2 kept, complete (state written last), no temp debris
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_00000010", "step_00000020"]
    assert json.loads((out / "checkpoints" / "step_00000020" / "trainer_state.json").read_text())["step"] == 20
    assert (out / "checkpoints" / "step_00000020" / "config.yaml").is_file()
    # resolved config beside the run, loadable again
    resolved = load_config(TrainConfig, out / "config.yaml")
    assert resolved.out_dir == str(out)
    # metrics: train records every 5 steps and eval records with KL and agreement
    records = read_metrics(out)
    assert [r["step"] for r in records if r["split"] == "train"] == [5, 10, 15, 20]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20]
    for r in evals:
        assert {"val_loss", "val_ppl", "kl_to_teacher", "top1_agreement"} <= r.keys()
        assert r["kl_to_teacher"] >= 0 and 0 <= r["top1_agreement"] <= 1
    assert records[0]["tokens_per_s"] > 0 and records[0]["tokens_seen"] == 5 * 8 * 128
    # the student is an ordinary HF checkpoint with its tokenizer
    model = AutoModelForCausalLM.from_pretrained(out / "student")
    tok = AutoTokenizer.from_pretrained(out / "student")
    ids = tok("def f(x):", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] >= len(tok)
    assert (out / "train.log").read_text().count("student written to") == 1


def test_training_lowers_the_distillation_loss(tmp_path):
    # Pure KD (alpha=0) toward a teacher whose larger init gives it a sharp, non-uniform distribution.
    cfg = cfg_with(tmp_path, "train.max_steps=30", "log.every=1", "eval.every=0", "checkpoint.every=0",
                   "loss.alpha=0.0", "teacher.config.initializer_range=0.2")
    training.train(cfg)
    kls = [r["kl"] for r in read_metrics(Path(cfg.out_dir)) if r["split"] == "train"]
    assert sum(kls[-5:]) / 5 < 0.95 * sum(kls[:5]) / 5, kls  # measured over student seeds 1-4: 0.887-0.892


def test_no_teacher_is_plain_cross_entropy(tmp_path):
    cfg = cfg_with(tmp_path, "teacher=null", "train.max_steps=4", "eval.every=2", "log.every=1")
    summary = training.train(cfg)
    records = read_metrics(Path(cfg.out_dir))
    train_rec = [r for r in records if r["split"] == "train"]
    assert all("kl" not in r for r in train_rec)
    # with no teacher the loss is the CE itself
    assert train_rec[-1]["loss"] == pytest.approx(train_rec[-1]["ce"], rel=1e-5)
    assert "kl_to_teacher" not in summary and summary["val_loss"] > 0


# ---------------------------------------------------------------------------------- exactness


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    common = ["train.max_steps=2", "eval.every=0", "checkpoint.every=0", "data.eval_fraction=0.0",
              "data.packing=false", "data.truncate=true"]  # unpacked: micro-batches differ in padding and tokens
    big = cfg_with(tmp_path / "a", *common, "train.batch_size=4", "train.grad_accum=1")
    small = cfg_with(tmp_path / "b", *common, "train.batch_size=2", "train.grad_accum=2")
    training.train(big)
    training.train(small)
    assert_same_weights(student_state(Path(big.out_dir)), student_state(Path(small.out_dir)), atol=1e-6)


def train_both_paths(tmp_path: Path, common: list[str], chunk_size: int) -> tuple[list, list, Path, Path]:
    """Train with the chunked and the naive loss; their per-step train losses and run directories."""
    chunked = cfg_with(tmp_path / "c", *common, "loss.chunked=true", f"loss.chunk_size={chunk_size}")
    naive = cfg_with(tmp_path / "n", *common, "loss.chunked=false")
    training.train(chunked)
    training.train(naive)
    runs = Path(chunked.out_dir), Path(naive.out_dir)
    lc, ln = ([r["loss"] for r in read_metrics(run) if r["split"] == "train"] for run in runs)
    return lc, ln, *runs


def test_chunked_and_naive_paths_train_the_same(tmp_path):
    common = ["train.max_steps=20", "eval.every=0", "checkpoint.every=0", "log.every=1", "loss.divergence=jsd",
              "loss.temperature=2.0"]
    lc, ln, chunked_dir, naive_dir = train_both_paths(tmp_path, common, chunk_size=100)
    assert len(lc) == len(ln) == 20
    assert max(abs(a - b) for a, b in zip(lc, ln, strict=True)) < 1e-4
    assert_same_weights(student_state(chunked_dir), student_state(naive_dir), atol=1e-4)


def test_bf16_precision_trains_along_both_paths(tmp_path):
    """train.precision=bf16 (autocast): the chunked and naive paths give close losses, fp32 weights out."""
    common = ["train.max_steps=6", "eval.every=0", "checkpoint.every=0", "log.every=1", "train.precision=bf16",
              "data.packing=false", "data.truncate=true"]  # padding: masked rows take the chunked path's index_copy branch
    lc, ln, chunked_dir, _ = train_both_paths(tmp_path, common, chunk_size=64)
    assert len(lc) == len(ln) == 6 and all(math.isfinite(x) for x in lc)
    assert max(abs(a - b) for a, b in zip(lc, ln, strict=True)) < 0.05
    assert lc[-1] < lc[0]  # measured over student seeds 1-4: 2.79-2.81 -> 2.51-2.56
    state = student_state(chunked_dir)
    assert all(t.dtype == torch.float32 for t in state.values())

@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    steps = ["train.max_steps=30", "checkpoint.every=5", "eval.every=10", "log.every=1"]
    ref = cfg_with(tmp_path / "ref", *steps)
    training.train(ref)

    out = tmp_path / "killed"
    # The killed half at this process's thread count, as the reference and the resumed half run here.
    res = kill_train_then_resume(TINY_TRAIN, out, steps, kill_at=15)
    assert "resumed from" in res.stderr
    assert_same_weights(student_state(out), student_state(Path(ref.out_dir)), atol=1e-6)
    # the metrics log continues without duplicates and equals the uninterrupted one
    got = [(r["step"], r["split"]) for r in read_metrics(out)]
    want = [(r["step"], r["split"]) for r in read_metrics(Path(ref.out_dir))]
    assert got == want
    ref_loss = {r["step"]: r["loss"] for r in read_metrics(Path(ref.out_dir)) if r["split"] == "train"}
    for r in read_metrics(out):
        if r["split"] == "train":
            assert r["loss"] == pytest.approx(ref_loss[r["step"]], abs=1e-6)


@pytest.mark.slow
def test_two_process_accelerate_matches_single_process(tmp_path):
    common = ["train.max_steps=4", "eval.every=2", "checkpoint.every=0", "log.progress=false"]
    single = cfg_with(tmp_path / "single", *common, "train.batch_size=2", "train.grad_accum=2")
    single_summary = training.train(single)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "distill", "train", str(TINY_TRAIN), f"out_dir={out}", *common,
           "train.batch_size=2", "train.grad_accum=1"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_weights(student_state(out), student_state(Path(single.out_dir)), atol=1e-5)
    ddp_eval = [r for r in read_metrics(out) if r["split"] == "eval"][-1]
    assert ddp_eval["val_loss"] == pytest.approx(single_summary["val_loss"], rel=1e-4)
    assert ddp_eval["val_tokens"] == single_summary["val_tokens"]


def test_tensorboard_and_prompt_response_data(tmp_path):
    rows = [{"prompt": f"Q{i}: what is {i}+{i}?", "response": f" It is {2 * i}."} for i in range(60)]
    data, held_out = tmp_path / "pairs.jsonl", tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:50]))
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows[50:]))
    cfg = cfg_with(tmp_path, f"data.source={data}", f"data.eval_source={held_out}", "data.seq_len=64",
                   "data.packing=false", "train.max_steps=3", "log.tensorboard=true", "log.every=1", "eval.every=0")
    summary = training.train(cfg)
    # Only the responses are scored: each response's bytes plus the eos (the byte tokenizer: a token a byte).
    assert summary["val_tokens"] == sum(len(r["response"].encode()) + 1 for r in rows[50:])
    # TensorBoard holds the same scalars as metrics.jsonl.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((Path(cfg.out_dir) / "tensorboard" / "distill").glob("events.out.tfevents.*"))  # (hparams: a subdir)
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    logged = {r["step"]: r for r in read_metrics(Path(cfg.out_dir)) if r["split"] == "train"}
    tb_loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert tb_loss.keys() == logged.keys() == {1, 2, 3}
    for step, value in tb_loss.items():
        assert value == pytest.approx(logged[step]["loss"], rel=1e-6)
    assert [e.step for e in acc.Scalars("eval/val_loss")] == [3]


def _save_padded_and_sliced_teachers(root: Path, extra_rows: int) -> tuple[Path, Path]:
    """The tiny teacher with ``extra_rows`` padding rows in its output layer (and embeddings), saved, and the same
    teacher with those rows sliced off by hand, saved as its own checkpoint. The padding rows are large (logits
    of tens of nats), so that a softmax over them, or a vocabulary padded instead of cut, would show."""
    tok = byte_tokenizer()
    v = len(tok)
    spec = load_config(TrainConfig, TINY_TRAIN).teacher
    padded = load_model(spec.model_copy(update={"config": {**spec.config, "vocab_size": v + extra_rows}}), "teacher",
                        tok)
    with torch.no_grad():
        padded.lm_head.weight[v:] = 5.0 * torch.randn(extra_rows, padded.config.hidden_size,
                                                      generator=torch.Generator().manual_seed(0))
    sliced_config = padded.config.to_dict()
    sliced_config["vocab_size"] = v
    sliced = AutoModelForCausalLM.from_config(type(padded.config).from_dict(sliced_config))
    cut = {"model.embed_tokens.weight", "lm_head.weight"}
    sliced.load_state_dict({k: t[:v] if k in cut else t for k, t in padded.state_dict().items()}, strict=True)
    ids = torch.tensor([tok("def f(x):\n    return x + 1", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        full = torch.softmax(padded(ids).logits.double(), -1)
        torch.testing.assert_close(padded(ids).logits[..., :v], sliced(ids).logits, rtol=1e-5, atol=1e-5)
    assert full[..., v:].sum(-1).mean() > 0.9  # over all rows, the padding would take nearly all the mass
    out = []
    for name, model in (("padded", padded), ("sliced", sliced)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out.append(root / name)
    return out[0], out[1]


def test_teacher_with_padded_vocabulary_is_truncated(tmp_path):
    """A teacher whose output layer has 9 padding rows trains the student exactly as the same teacher with those
    rows removed by hand: the same losses and KLs every step, the same eval KL, the same weights."""
    padded, sliced = _save_padded_and_sliced_teachers(tmp_path, 9)
    runs = {}
    for name, path in (("padded", padded), ("sliced", sliced)):
        cfg = cfg_with(tmp_path / name, "teacher.config=null", "teacher.tokenizer=null", f"teacher.path={path}",
                       "train.max_steps=2", "log.every=1", "eval.every=0", "checkpoint.every=0", "loss.alpha=0.2")
        summary = training.train(cfg)
        runs[name] = summary, [r for r in read_metrics(Path(cfg.out_dir)) if r["split"] == "train"], cfg.out_dir
    (summary_p, recs_p, out_p), (summary_s, recs_s, out_s) = runs["padded"], runs["sliced"]
    assert len(recs_p) == len(recs_s) == 2
    for a, b in zip(recs_p, recs_s, strict=True):
        for key in ("loss", "ce", "kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (key, a[key], b[key])
    assert summary_p["kl_to_teacher"] == pytest.approx(summary_s["kl_to_teacher"], rel=1e-6)
    assert summary_p["top1_agreement"] == pytest.approx(summary_s["top1_agreement"], abs=1e-3)  # (a near-tie)
    assert_same_weights(student_state(Path(out_p)), student_state(Path(out_s)), atol=1e-6)
    strict = cfg_with(tmp_path / "strict", "teacher.config=null", "teacher.tokenizer=null", f"teacher.path={padded}",
                      "loss.vocab_policy=error")
    with pytest.raises(ValueError, match=r"teacher: the output layer has 272 rows for 263 tokenizer tokens"):
        training.train(strict)


# ----------------------------------------------------------------------------------------- bad input


def test_unknown_key_and_wrong_type_are_listed_together(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, TINY_TRAIN, ["optim.lrr=1", "train.max_steps=many"])
    msg = str(err.value)
    assert "train.yaml + overrides: 2 problem(s)" in msg
    assert "optim.lrr: unknown key" in msg
    assert "train.max_steps" in msg and "'many'" in msg


def test_cli_reports_config_errors_without_traceback(tmp_path):
    res = run_cli_here("train", str(TINY_TRAIN), "loss.divergnce=tvd")
    assert res.returncode == 2
    assert "loss.divergnce: unknown key" in res.stderr and "Traceback" not in res.stderr
    res = run_cli_here("train", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2 and "missing.yaml does not exist" in res.stderr


def test_missing_data_file(tmp_path):
    cfg = cfg_with(tmp_path, f"data.source={tmp_path / 'nope.jsonl'}")
    with pytest.raises(ValueError, match="nope.jsonl"):
        training.train(cfg)


def test_missing_model_directory(tmp_path):
    cfg = cfg_with(tmp_path, "teacher.config=null", f"teacher.path={tmp_path / 'no-teacher'}", "teacher.tokenizer=null")
    with pytest.raises(ValueError, match=r"teacher.path: .*no-teacher does not exist"):
        training.train(cfg)


def test_mismatched_tokenizers_are_refused(tmp_path):
    other = byte_tokenizer()
    other.add_tokens(["<|extra|>"])
    other.save_pretrained(tmp_path / "other-tok")
    cfg = cfg_with(tmp_path, f"teacher.tokenizer={tmp_path / 'other-tok'}")
    with pytest.raises(ValueError, match=r"the student tokenizer \(byte\) and the teacher tokenizer .*differ: 263 vs 264"):
        training.train(cfg)


def test_empty_dataset(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = cfg_with(tmp_path, f"data.source={empty}")
    with pytest.raises(ValueError, match="empty"):
        training.train(cfg)


def test_sequence_longer_than_the_model_allows(tmp_path):
    cfg = cfg_with(tmp_path, "data.seq_len=512")
    with pytest.raises(ValueError, match=r"data.seq_len.*512.*256"):
        training.train(cfg)


def test_existing_run_needs_resume(tmp_path):
    cfg = cfg_with(tmp_path, "train.max_steps=2", "eval.every=0")
    training.train(cfg)
    with pytest.raises(ValueError, match="pass --resume"):
        training.train(cfg)


def test_non_finite_loss_stops_with_diagnosis_and_keeps_last_checkpoint(tmp_path):
    # An absurd learning rate blows the weights up after the first update.
    cfg = cfg_with(tmp_path, "optim.lr=1e30", "optim.max_grad_norm=null", "optim.warmup_steps=0",
                   "checkpoint.every=1", "eval.every=0", "train.max_steps=10")
    with pytest.raises(training.NonFiniteLossError) as err:
        training.train(cfg)
    msg = str(err.value)
    assert "the loss is not finite" in msg and "Lower optim.lr" in msg
    ckpts = sorted((Path(cfg.out_dir) / "checkpoints").iterdir())
    assert ckpts, "no good checkpoint was kept"
    assert f"the last good checkpoint is {ckpts[-1]}" in msg
    assert not list((Path(cfg.out_dir) / "checkpoints").glob("*.tmp"))
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    assert state["step"] >= 1
    assert not (Path(cfg.out_dir) / "student").exists()


def test_broken_teacher_is_diagnosed(tmp_path):
    teacher_dir = tmp_path / "teacher"
    spec = yaml.safe_load(TINY_TRAIN.read_text())["teacher"]["config"]
    from transformers import AutoConfig

    model_type = spec.pop("model_type")
    tok = byte_tokenizer()
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=len(tok), **spec))
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    model.save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    cfg = cfg_with(tmp_path, "teacher.config=null", "teacher.tokenizer=null", f"teacher.path={teacher_dir}")
    with pytest.raises(training.NonFiniteLossError, match="the teacher's hidden states are non-finite"):
        training.train(cfg)
    shutil.rmtree(teacher_dir)


# ------------------------------------------------------------------------------------- teacher cache


def cache_run(tmp_path: Path, cache: str, *overrides: str) -> TrainConfig:
    """The tiny train config with a cached teacher (on the data the session's caches hold)."""
    return cfg_with(tmp_path, "teacher=null", f"teacher.cache={cache}", *SMALL_DATA, *overrides)


def kl_to_live_teacher(model, cfg: TrainConfig) -> float:
    """KL(teacher || model) on the eval split, measured against the live teacher of configs/tiny/train.yaml."""
    full = load_config(TrainConfig, TINY_TRAIN, [*SMALL_DATA, *SHARP_TEACHER])
    tok = byte_tokenizer()
    teacher = EngineTeacher(LocalEngine(load_model(full.teacher, "teacher", tok), tok), "live")
    _, eval_ds = build_datasets(cfg.data, tok)
    batches = [collate([eval_ds[i] for i in range(j, min(j + 8, len(eval_ds)))], tok.pad_token_id)
               for j in range(0, len(eval_ds), 8)]
    sums = eval_sums(model, output_head(model, len(tok)), batches, teacher)
    return metrics_from_sums(sums, teacher.eval_estimates)["kl_to_teacher"]


@pytest.mark.parametrize(("mode", "tail"), [("topk", True), ("topk", False), ("sampled", True)])
def test_train_from_cache_moves_the_student_toward_the_teacher(tmp_path, tiny_caches, mode, tail):
    cfg = cache_run(tmp_path, tiny_caches[mode]["out"], f"teacher.topk_tail={tail}", "train.max_steps=30",
                    "log.every=1", "eval.every=15", "checkpoint.every=0", "loss.alpha=0.0", "optim.lr=1e-2")
    training.train(cfg)
    records = read_metrics(Path(cfg.out_dir))
    kls = [r["kl"] for r in records if r["split"] == "train"]
    assert len(kls) == 30 and sum(kls[-5:]) < sum(kls[:5])  # measured (student seeds 1-3): 0.86-0.95 of it
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [15, 30]
    if mode == "sampled":  # what sampled targets estimate without bias (distill.teachers)
        assert all(r["ce_to_teacher"] > 0 and 0 < r["teacher_prob_of_top1"] < 1 for r in evals)
    else:
        assert all(r["kl_to_teacher"] >= 0 and 0 <= r["top1_agreement"] <= 1 for r in evals)
    # Against the live teacher (not the cache): the student is closer than where it started, which
    # targets of some other distribution would not give (measured over student seeds 1-3: 0.80-0.82 of the
    # initial KL of 1.23 with the tail or sampled, 0.876-0.882 renormalized).
    before = kl_to_live_teacher(load_model(cfg.student, "student", byte_tokenizer()), cfg)
    after = kl_to_live_teacher(AutoModelForCausalLM.from_pretrained(Path(cfg.out_dir) / "student"), cfg)
    assert after < 0.92 * before, (before, after)


def test_top_k_cache_of_the_whole_vocabulary_trains_like_the_live_teacher(tmp_path, tiny_caches):
    """k = V with 16-bit probability codes holds the full distribution (to ~1e-5): the per-step losses
    and the final KL equal those of training from the live teacher."""
    common = [*SMALL_DATA, "train.max_steps=8", "log.every=1", "eval.every=0", "checkpoint.every=0",
              "loss.divergence=jsd", "loss.alpha=0.3"]
    live = cfg_with(tmp_path / "live", *common, *SHARP_TEACHER)
    cached = cache_run(tmp_path / "cached", tiny_caches["topk_all"]["out"], *common[1:])
    training.train(live)
    training.train(cached)
    runs = [read_metrics(Path(c.out_dir)) for c in (live, cached)]
    for key in ("loss", "ce", "kl", "div"):
        a, b = ([r[key] for r in run if r["split"] == "train"] for run in runs)
        assert len(a) == len(b) == 8
        assert max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True)) < 1e-4, (key, a, b)
    ev_live, ev_cached = (next(r for r in run if r["split"] == "eval") for run in runs)
    assert ev_cached["kl_to_teacher"] == pytest.approx(ev_live["kl_to_teacher"], rel=1e-3)
    assert ev_cached["top1_agreement"] == pytest.approx(ev_live["top1_agreement"], abs=0.01)


def test_cli_train_from_cache_reports_kl_to_the_teacher(tmp_path, tiny_caches):
    out = tmp_path / "run"
    res = run_cli("train", str(TINY_TRAIN), "teacher=null", f"teacher.cache={tiny_caches['topk']['out']}",
                  *SMALL_DATA, f"out_dir={out}", "train.max_steps=4", "eval.every=2", "log.progress=false")
    assert res.returncode == 0, res.stderr
    evals = [r for r in read_metrics(out) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    assert all({"kl_to_teacher", "top1_agreement"} <= r.keys() for r in evals)


def test_naive_loss_from_a_top_k_cache_with_reverse_kl_has_finite_gradients(tmp_path, tiny_caches):
    """Unsupervised positions (each document's bos in the packed stream) carry no cached target (zero
    mass); the naive path must not turn their infinite reverse KL into NaN gradients."""
    cfg = cache_run(tmp_path, tiny_caches["topk"]["out"], "loss.chunked=false", "loss.divergence=reverse_kl",
                    "train.max_steps=3", "log.every=1", "eval.every=0")
    training.train(cfg)  # raises NonFiniteLossError on NaN gradients (the weights turn NaN after the update)
    records = [r for r in read_metrics(Path(cfg.out_dir)) if r["split"] == "train"]
    assert len(records) == 3 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)


def test_cache_from_other_data_or_settings_is_refused(tmp_path, tiny_caches):
    topk = tiny_caches["topk"]["out"]
    with pytest.raises(ValueError, match=r"data.seq_len=128, this config has data.seq_len=64"):
        training.train(cache_run(tmp_path / "a", topk, "data.seq_len=64"))
    with pytest.raises(ValueError, match=r"captured at temperature 1.0, but loss.temperature=2.0"):
        training.train(cache_run(tmp_path / "b", topk, "loss.temperature=2.0"))
    with pytest.raises(ValueError, match="other data|another data|different data"):
        training.train(cache_run(tmp_path / "c", topk, "data.max_examples=100"))
    sampled = tiny_caches["sampled"]["out"]
    with pytest.raises(ValueError, match=r"loss.divergence=reverse_kl is infinite on sampled targets"):
        training.train(cache_run(tmp_path / "d", sampled, "loss.divergence=reverse_kl"))
    with pytest.raises(ValueError, match=r"loss.divergence=jsd with loss.beta=1 is infinite on sampled targets"):
        training.train(cache_run(tmp_path / "e", sampled, "loss.divergence=jsd", "loss.beta=1.0"))
    with pytest.raises(ValueError, match=r"skew_reverse_kl with loss.skew=0 is infinite"):
        training.train(cache_run(tmp_path / "f", sampled, "loss.divergence=skew_reverse_kl", "loss.skew=0.0"))
    training.train(cache_run(tmp_path / "g", sampled, "loss.divergence=jsd", "loss.beta=0.9", "train.max_steps=1",
                         "eval.every=0"))  # finite for beta < 1: accepted


def test_each_step_comes_from_the_batch_source_and_resume_continues_it(tmp_path, monkeypatch):
    """The loop asks train.batches' source for every step once, by step number; a resumed run asks for the
    steps after its checkpoint. A source that is not registered is refused before anything loads."""
    from distill.sources.dataset import DatasetSource

    steps = []
    real = DatasetSource.batches

    def recording(source, ctx, step):
        steps.append(step)
        batches = real(source, ctx, step)
        assert len(batches) == ctx.grad_accum and all(b["split"] == "train" for b in batches)
        return batches

    monkeypatch.setattr(DatasetSource, "batches", recording)
    training.train(cfg_with(tmp_path, "train.max_steps=4", "checkpoint.every=2", "eval.every=0"))
    assert steps == [0, 1, 2, 3]
    training.train(cfg_with(tmp_path, "train.max_steps=6", "checkpoint.every=2", "eval.every=0"), resume=True)
    assert steps == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match=r"train.batches.source='generated' is not a batch source: give one of "
                                          r"dataset, gkd, skd, distillm"):
        training.train(cfg_with(tmp_path / "other", "train.batches=generated"))
    assert not (tmp_path / "other" / "run" / "config.yaml").exists()


# A batch source written outside the package: one module. It gives each step's dataset micro-batches in reverse
# order, counts the steps it has given (its state) and logs the count.
PLUGIN_SOURCE = """
from distill.sources.dataset import DatasetSource


class ReversedSource(DatasetSource):
    def __init__(self, settings, ctx):
        super().__init__(settings, ctx)
        self.given = 0

    def batches(self, ctx, step):
        self.given += 1
        return [ctx.dataset_batch(step, m) for m in reversed(range(ctx.grad_accum))]

    def log_fields(self, step, steps, reduce):
        return {"given": reduce([float(self.given)])[0]}

    def state_dict(self):
        return {"given": self.given}

    def load_state_dict(self, state):
        self.given = state["given"]
"""


def test_a_new_batch_source_is_one_module_and_one_line_in_the_registry(tmp_path, monkeypatch):
    """The module above plus its line in distill.sources.SOURCES is all a source needs: `train.batches: NAME`
    trains from it through the real loop, its log field reaches metrics.jsonl, its state the checkpoints, and a
    run stopped after a checkpoint and resumed ends as an uninterrupted one."""
    import importlib

    from conftest import crash_after_checkpoint

    from distill import sources

    (tmp_path / "reversed_source.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sources.SOURCES, "reversed", importlib.import_module("reversed_source").ReversedSource)

    steps = ["train.batches=reversed", "train.grad_accum=2", "train.max_steps=4", "checkpoint.every=2",
             "eval.every=0", "log.every=1"]
    ref = cfg_with(tmp_path / "ref", *steps)
    training.train(ref)
    cut = cfg_with(tmp_path / "cut", *steps)
    with monkeypatch.context() as m:
        crash_after_checkpoint(m, 2)
        with pytest.raises(KeyboardInterrupt):
            training.train(cut)
    kept = Path(cut.out_dir) / "checkpoints" / "step_00000002" / "batch_source_rank0.json"
    assert json.loads(kept.read_text()) == {"given": 2}
    training.train(cut, resume=True)
    runs = [[(r["step"], r["given"], r["loss"]) for r in read_metrics(Path(c.out_dir)) if r["split"] == "train"]
            for c in (ref, cut)]
    assert [given for _, given, _ in runs[0]] == [1, 2, 3, 4] and runs[1] == runs[0]
    assert_same_weights(student_state(Path(cut.out_dir)), student_state(Path(ref.out_dir)), atol=0.0)


def test_cached_teacher_refuses_batches_that_are_not_dataset_examples(tiny_caches):
    from distill.config import TeacherCacheSpec
    from distill.losses import LossSpec
    from distill.teachers import CachedTeacher

    teacher = CachedTeacher(TeacherCacheSpec(cache=str(tiny_caches["topk"]["out"])), byte_tokenizer(), LossSpec(),
                            seq_len=128, device="cpu")
    batch = {"input_ids": torch.zeros(1, 8, dtype=torch.long), "labels": torch.zeros(1, 8, dtype=torch.long),
             "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    with pytest.raises(ValueError, match="only score the dataset examples it was captured on"):
        teacher.signal(batch)
    assert not teacher.scores_any_text and teacher.covers("eval") and teacher.eval_estimates == "topk_tail"


def test_prefetched_cache_targets_are_the_ones_signal_decodes_and_keep_their_errors(tiny_caches):
    """prefetch(batch) decodes on a helper thread what signal(batch) would; signal then takes it (the same
    tensors), and a batch whose tokens are not the cached ones raises the cache's error at signal()."""
    from distill.caching.reader import CacheMismatchError
    from distill.config import TeacherCacheSpec
    from distill.losses import LossSpec
    from distill.teachers import CachedTeacher

    cfg = cache_run(Path("unused"), tiny_caches["topk"]["out"])
    tok = byte_tokenizer()
    train_ds, _ = build_datasets(cfg.data, tok)
    teacher = CachedTeacher(TeacherCacheSpec(cache=str(tiny_caches["topk"]["out"])), tok, LossSpec(), seq_len=128,
                            device="cpu")
    batches = [{**collate([train_ds[i] for i in idx], tok.pad_token_id), "index": idx, "split": "train"}
               for idx in ([0, 1, 2], [3, 4, 5])]
    direct = [teacher.signal(b) for b in batches]
    for b in batches:
        teacher.prefetch(b)
    assert len(teacher._ahead) == 2
    for b, want in zip(batches, direct, strict=True):
        got = teacher.signal(b)
        assert torch.equal(got.ids, want.ids) and torch.equal(got.probs, want.probs) and torch.equal(got.tail, want.tail)
    assert not teacher._ahead  # each prefetched target is taken once
    wrong = {**batches[0], "input_ids": batches[0]["input_ids"].flip(1)}
    teacher.prefetch(wrong)
    with pytest.raises(CacheMismatchError, match="do not match the teacher cache"):
        teacher.signal(wrong)


def test_training_from_a_cache_with_and_without_prefetch_is_the_same(tmp_path, tiny_caches, monkeypatch):
    """The run hands each next step's batches to the cache to decode ahead; the records are those of a run that
    decodes each batch when it trains on it (grad accumulation: two micro-batches a step)."""
    from distill.teachers import CachedTeacher

    common = ["train.max_steps=4", "log.every=1", "eval.every=2", "checkpoint.every=0", "train.grad_accum=2"]
    ahead = cache_run(tmp_path / "ahead", tiny_caches["topk"]["out"], *common)
    handed = []
    real = CachedTeacher.prefetch
    monkeypatch.setattr(CachedTeacher, "prefetch", lambda self, batch: handed.append(batch["index"]) or real(self, batch))
    training.train(ahead)
    assert len(handed) == 8  # every micro-batch of the 4 steps, each ahead of its step (the first one's at start)
    monkeypatch.setattr(CachedTeacher, "prefetch", None)
    inline = cache_run(tmp_path / "inline", tiny_caches["topk"]["out"], *common)
    training.train(inline)
    keys = ("step", "loss", "ce", "kl", "div", "grad_norm", "val_loss", "kl_to_teacher")
    runs = [[{k: r.get(k) for k in keys} for r in read_metrics(Path(c.out_dir))] for c in (ahead, inline)]
    assert len(runs[0]) == 6 and runs[0] == runs[1]


def test_capped_eval_samples_batches_across_the_whole_split():
    assert eval_batch_indices(10, None) == list(range(10))
    assert eval_batch_indices(10, 20) == list(range(10))
    for total, cap in ((10, 4), (43, 8), (1000, 7), (9, 8)):
        chosen = eval_batch_indices(total, cap)
        assert len(chosen) == cap == len(set(chosen)) and chosen == sorted(chosen)
        assert chosen[0] == 0 and chosen[-1] >= total - math.ceil(total / cap)  # reaches the end of the split
        gaps = [b - a for a, b in zip(chosen[:-1], chosen[1:], strict=True)]
        assert max(gaps) - min(gaps) <= 1  # evenly spread
