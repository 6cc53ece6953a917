"""The train recipe end to end on tiny random Llama models: outputs, resume, accumulation, bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TINY_TRAIN, run_cli
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.config import ConfigError, TrainConfig, load_config
from distill.recipes import train
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


def test_help_lists_commands_and_sections():
    res = run_cli("--help")
    assert res.returncode == 0 and "train" in res.stdout
    res = run_cli("train", "--help")
    assert res.returncode == 0
    for section in ("student", "teacher", "data", "loss", "optim", "checkpoint", "--resume"):
        assert section in res.stdout


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
    train.main(cfg)
    kls = [r["kl"] for r in read_metrics(Path(cfg.out_dir)) if r["split"] == "train"]
    assert sum(kls[-5:]) / 5 < 0.95 * sum(kls[:5]) / 5, kls


def test_no_teacher_is_plain_cross_entropy(tmp_path):
    cfg = cfg_with(tmp_path, "teacher=null", "train.max_steps=4", "eval.every=2", "log.every=1")
    summary = train.main(cfg)
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
    train.main(big)
    train.main(small)
    assert_same_weights(student_state(Path(big.out_dir)), student_state(Path(small.out_dir)), atol=1e-6)


def train_both_paths(tmp_path: Path, common: list[str], chunk_size: int) -> tuple[list, list, Path, Path]:
    """Train with the chunked and the naive loss; their per-step train losses and run directories."""
    chunked = cfg_with(tmp_path / "c", *common, "loss.chunked=true", f"loss.chunk_size={chunk_size}")
    naive = cfg_with(tmp_path / "n", *common, "loss.chunked=false")
    train.main(chunked)
    train.main(naive)
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
    assert lc[-1] < lc[0]
    state = student_state(chunked_dir)
    assert all(t.dtype == torch.float32 for t in state.values())

def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    steps = ["train.max_steps=30", "checkpoint.every=5", "eval.every=10", "log.every=1"]
    ref = cfg_with(tmp_path / "ref", *steps)
    train.main(ref)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "distill", "train", str(TINY_TRAIN), f"out_dir={out}", *steps, "log.progress=false"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while not (out / "checkpoints" / "step_00000015").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "student").exists(), "the run was not killed mid-way"

    res = run_cli("train", str(TINY_TRAIN), f"out_dir={out}", *steps, "--resume")
    assert res.returncode == 0, res.stderr
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


def test_two_process_accelerate_matches_single_process(tmp_path):
    common = ["train.max_steps=4", "eval.every=2", "checkpoint.every=0", "log.progress=false"]
    single = cfg_with(tmp_path / "single", *common, "train.batch_size=2", "train.grad_accum=2")
    single_summary = train.main(single)
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
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = cfg_with(tmp_path, f"data.source={data}", "data.seq_len=64", "data.packing=false",
                   "train.max_steps=3", "log.tensorboard=true", "log.every=1", "eval.every=0")
    train.main(cfg)
    assert list((Path(cfg.out_dir) / "tensorboard").rglob("events.out.tfevents.*"))


def test_teacher_with_padded_vocabulary_is_truncated(tmp_path):
    tok = byte_tokenizer()
    cfg = cfg_with(tmp_path, f"teacher.config.vocab_size={len(tok) + 9}", "train.max_steps=2", "eval.every=0")
    summary = train.main(cfg)
    assert summary["kl_to_teacher"] >= 0
    strict = cfg_with(tmp_path / "strict", f"teacher.config.vocab_size={len(tok) + 9}", "loss.vocab_policy=error")
    with pytest.raises(ValueError, match=r"teacher: the output layer has 272 rows for 263 tokenizer tokens"):
        train.main(strict)


# ----------------------------------------------------------------------------------------- bad input


def test_unknown_key_and_wrong_type_are_listed_together(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, TINY_TRAIN, ["optim.lrr=1", "train.max_steps=many"])
    msg = str(err.value)
    assert "train.yaml + overrides: 2 problem(s)" in msg
    assert "optim.lrr: unknown key" in msg
    assert "train.max_steps" in msg and "'many'" in msg


def test_cli_reports_config_errors_without_traceback(tmp_path):
    res = run_cli("train", str(TINY_TRAIN), "loss.divergnce=tvd")
    assert res.returncode == 2
    assert "loss.divergnce: unknown key" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("train", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2 and "missing.yaml does not exist" in res.stderr


def test_missing_data_file(tmp_path):
    cfg = cfg_with(tmp_path, f"data.source={tmp_path / 'nope.jsonl'}")
    with pytest.raises(ValueError, match="nope.jsonl"):
        train.main(cfg)


def test_missing_model_directory(tmp_path):
    cfg = cfg_with(tmp_path, "teacher.config=null", f"teacher.path={tmp_path / 'no-teacher'}", "teacher.tokenizer=null")
    with pytest.raises(ValueError, match=r"teacher.path: .*no-teacher does not exist"):
        train.main(cfg)


def test_mismatched_tokenizers_are_refused(tmp_path):
    other = byte_tokenizer()
    other.add_tokens(["<|extra|>"])
    other.save_pretrained(tmp_path / "other-tok")
    cfg = cfg_with(tmp_path, f"teacher.tokenizer={tmp_path / 'other-tok'}")
    with pytest.raises(ValueError, match=r"the student tokenizer \(byte\) and the teacher tokenizer .*differ: 263 vs 264"):
        train.main(cfg)


def test_empty_dataset(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = cfg_with(tmp_path, f"data.source={empty}")
    with pytest.raises(ValueError, match="empty"):
        train.main(cfg)


def test_sequence_longer_than_the_model_allows(tmp_path):
    cfg = cfg_with(tmp_path, "data.seq_len=512")
    with pytest.raises(ValueError, match=r"data.seq_len.*512.*256"):
        train.main(cfg)


def test_existing_run_needs_resume(tmp_path):
    cfg = cfg_with(tmp_path, "train.max_steps=2", "eval.every=0")
    train.main(cfg)
    with pytest.raises(ValueError, match="pass --resume"):
        train.main(cfg)


def test_non_finite_loss_stops_with_diagnosis_and_keeps_last_checkpoint(tmp_path):
    # An absurd learning rate blows the weights up after the first update.
    cfg = cfg_with(tmp_path, "optim.lr=1e30", "optim.max_grad_norm=null", "optim.warmup_steps=0",
                   "checkpoint.every=1", "eval.every=0", "train.max_steps=10")
    with pytest.raises(train.NonFiniteLossError) as err:
        train.main(cfg)
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
    with pytest.raises(train.NonFiniteLossError, match="the teacher's hidden states are non-finite"):
        train.main(cfg)
    shutil.rmtree(teacher_dir)


# ------------------------------------------------------------------------------------- teacher cache


@pytest.fixture(scope="module")
def tiny_caches(tmp_path_factory):
    """Top-k and sampled caches of the tiny teacher (the teacher section of configs/tiny/train.yaml)."""
    from distill.recipes import cache as cache_recipe

    root = tmp_path_factory.mktemp("caches")
    out = {}
    for mode, extra in (("topk", ["k=16"]), ("sampled", ["n=32"])):
        cfg = load_config(cache_recipe.CacheConfig, REPO / "configs" / "tiny" / "cache.yaml",
                          [f"out_dir={root / mode}", f"mode={mode}", *extra])
        cache_recipe.main(cfg)
        out[mode] = root / mode
    return out


@pytest.mark.parametrize(("mode", "tail"), [("topk", True), ("topk", False), ("sampled", True)])
def test_train_from_cache(tmp_path, tiny_caches, mode, tail):
    cfg = cfg_with(tmp_path, "teacher=null", f"teacher.cache={tiny_caches[mode]}", f"teacher.topk_tail={tail}",
                   "train.max_steps=6", "log.every=1", "eval.every=0", "loss.alpha=0.0")
    train.main(cfg)
    kls = [r["kl"] for r in read_metrics(Path(cfg.out_dir)) if r["split"] == "train"]
    assert len(kls) == 6 and all(k >= 0 for k in kls)
    assert AutoModelForCausalLM.from_pretrained(Path(cfg.out_dir) / "student") is not None


def test_cache_from_other_data_or_settings_is_refused(tmp_path, tiny_caches):
    base = ["teacher=null", f"teacher.cache={tiny_caches['topk']}", "train.max_steps=1"]
    with pytest.raises(ValueError, match=r"data.seq_len=128, this config has data.seq_len=64"):
        train.main(cfg_with(tmp_path / "a", *base, "data.seq_len=64"))
    with pytest.raises(ValueError, match=r"captured at temperature 1.0, but loss.temperature=2.0"):
        train.main(cfg_with(tmp_path / "b", *base, "loss.temperature=2.0"))
    with pytest.raises(ValueError, match="other data|another data|different data"):
        train.main(cfg_with(tmp_path / "c", *base, "data.max_examples=300"))
    sampled = ["teacher=null", f"teacher.cache={tiny_caches['sampled']}", "train.max_steps=1"]
    with pytest.raises(ValueError, match=r"reverse_kl is infinite on sampled targets"):
        train.main(cfg_with(tmp_path / "d", *sampled, "loss.divergence=reverse_kl"))


def test_capped_eval_samples_batches_across_the_whole_split():
    assert train.eval_batch_indices(10, None) == list(range(10))
    assert train.eval_batch_indices(10, 20) == list(range(10))
    for total, cap in ((10, 4), (43, 8), (1000, 7), (9, 8)):
        chosen = train.eval_batch_indices(total, cap)
        assert len(chosen) == cap == len(set(chosen)) and chosen == sorted(chosen)
        assert chosen[0] == 0 and chosen[-1] >= total - math.ceil(total / cap)  # reaches the end of the split
        gaps = [b - a for a, b in zip(chosen[:-1], chosen[1:], strict=True)]
        assert max(gaps) - min(gaps) <= 1  # evenly spread
