"""On-policy batch sources (gkd, skd, distillm) and the sampled-token reverse KL: exactness, resume, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, kill_train_then_resume
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from distill.config import ConfigError, TrainConfig, load_config
from distill.generate import LiveCorrector, SamplingParams, corrected_sample, row_seed, sample
from distill.losses import LossSpec, SparseTarget, kd_loss_per_token, token_divergence
from distill.recipes import train

TINY = {"gkd": REPO / "configs" / "tiny" / "gkd.yaml", "skd": REPO / "configs" / "tiny" / "skd.yaml"}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cfg_of(tmp_path: Path, method: str, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, TINY[method], [f"out_dir={tmp_path / 'run'}", "log.progress=false", *overrides])


def records(cfg: TrainConfig, split: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines())
            if r["split"] == split]


def weights(cfg: TrainConfig) -> dict:
    return load_file(str(Path(cfg.out_dir) / "student" / "model.safetensors"))


def tiny_lm(seed: int, hidden: int, init: float = 0.2):
    cfg = AutoConfig.for_model("llama", vocab_size=40, hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=64, initializer_range=init, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


PROMPTS = [[2, 5, 6], [2, 7], [2, 8, 9, 10]]


# ------------------------------------------------------------------------------------------- gkd


def test_tiny_configs_train_and_log_the_on_policy_metrics(tmp_path):
    for method in ("gkd", "skd"):
        cfg = cfg_of(tmp_path / method, method)
        summary = train.main(cfg)
        assert summary["steps"] == 8
        recs = records(cfg)
        assert len(recs) == 8
        for r in recs:
            assert {"gen_seconds", "teacher_seconds", "train_seconds", "on_policy"} <= r.keys()
            assert r["on_policy"] in (0.0, 1.0)
        if method == "skd":
            assert all(0 <= r["skd_replacement_rate"] <= 1 and r["skd_k"] == 25 and r["on_policy"] == 1.0 for r in recs)
            assert all(r["gen_length"] > 0 for r in recs)


def test_lambda_zero_is_supervised_kd_exactly(tmp_path):
    common = ["train.max_steps=5", "eval.every=0", "checkpoint.every=0"]
    gkd = cfg_of(tmp_path / "gkd", "gkd", *common, "onpolicy.student_fraction=0")
    supervised = cfg_of(tmp_path / "sup", "gkd", *common, "train.batches=dataset")
    train.main(gkd)
    train.main(supervised)
    assert [r["loss"] for r in records(gkd)] == [r["loss"] for r in records(supervised)]
    assert all(r["on_policy"] == 0.0 for r in records(gkd))
    w1, w2 = weights(gkd), weights(supervised)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_lambda_one_trains_on_the_students_own_samples(tmp_path, monkeypatch):
    """Every step's batch is what the sampler draws from the student's weights at that step, with the seed
    of (seed, step, example)."""
    from distill import onpolicy

    checked = []
    real = train.BATCH_SOURCES["gkd"]

    def checking(run, step):
        batches = real(run, step)
        student = run.accelerator.unwrap_model(run.model)
        for m, batch in enumerate(batches):
            idx = run.indices(step, m)
            prompts = [onpolicy.example_prompt(run.train_ds[i], "gkd", run.tokenizer.bos_token_id) for i in idx]
            again = sample(student, prompts, run.onpolicy.params, pad_id=run.pad_id,
                           seeds=[row_seed(run.cfg.train.seed, "gkd", step, i) for i in idx]).to_batch(run.pad_id)
            assert torch.equal(again["input_ids"], batch["input_ids"]) and torch.equal(again["labels"], batch["labels"])
            checked.append(step)
        return batches

    monkeypatch.setitem(train.BATCH_SOURCES, "gkd", checking)
    cfg = cfg_of(tmp_path, "gkd", "onpolicy.student_fraction=1", "train.max_steps=4", "eval.every=0",
                 "checkpoint.every=0")
    train.main(cfg)
    assert checked == [0, 1, 2, 3]
    assert all(r["on_policy"] == 1.0 for r in records(cfg))


@pytest.mark.slow
def test_two_processes_make_the_same_choice(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "distill", "train",
           str(TINY["gkd"]), f"out_dir={out}", "log.progress=false", "train.max_steps=6", "train.batch_size=4",
           "eval.every=0", "checkpoint.every=0"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    recs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    shares = [r["on_policy"] for r in recs]
    assert len(shares) == 6 and set(shares) <= {0.0, 1.0} and 0.0 in shares and 1.0 in shares  # never 0.5


# ------------------------------------------------------------------------------------------- skd


def test_skd_with_k_equal_to_the_vocabulary_never_replaces():
    student, teacher = tiny_lm(0, 32, init=0.05), tiny_lm(1, 48)
    params = SamplingParams(temperature=1.0, max_new_tokens=8, stop_ids=(1,))
    seeds = [row_seed(3, i) for i in range(len(PROMPTS))]
    gen, replaced, proposed = corrected_sample(student, LiveCorrector(teacher, 1.0), PROMPTS, params, 40,
                                               pad_id=0, seeds=seeds)
    assert replaced == 0 and proposed > 0
    alone = sample(student, PROMPTS, params, pad_id=0, seeds=[row_seed(s, "student") for s in seeds])
    assert gen.completions() == alone.completions()  # exactly the student's own samples


def test_skd_with_k_one_and_an_argmax_teacher_is_the_teachers_greedy_continuation():
    student, teacher = tiny_lm(0, 32, init=0.05), tiny_lm(1, 48)
    params = SamplingParams(temperature=1.0, max_new_tokens=8, stop_ids=(1,))
    gen, replaced, proposed = corrected_sample(student, LiveCorrector(teacher, 0.0), PROMPTS, params, 1, pad_id=0,
                                               seeds=[row_seed(4, i) for i in range(len(PROMPTS))])
    greedy = sample(teacher, PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=8, stop_ids=(1,)), pad_id=0)
    assert gen.completions() == greedy.completions()
    assert 0 < replaced <= proposed  # the student's proposals were corrected


def test_skd_schedule_of_k(tmp_path):
    cfg = cfg_of(tmp_path, "skd", "onpolicy.skd_top_k=40", "onpolicy.skd_top_k_final=2", "train.max_steps=5",
                 "eval.every=0", "checkpoint.every=0")
    train.main(cfg)
    ks = [r["skd_k"] for r in records(cfg)]
    assert ks[0] == 40 and ks[-1] == 2 and ks == sorted(ks, reverse=True)


# ------------------------------------------------------------------------------------------- distillm


def test_distillm_raises_its_threshold_when_the_eval_loss_rises():
    from distill.onpolicy import AdaptiveThreshold

    phi = AdaptiveThreshold(0.2, step=0.1, eps=0.1)
    for loss, want in ((2.0, 0.2), (2.05, 0.2), (2.11, 0.3), (2.15, 0.3), (2.25, 0.4), (1.0, 0.4), (9.0, 0.5)):
        phi.observe(loss)
        assert phi.value == pytest.approx(want), (loss, phi.value)
    for _ in range(20):
        phi.observe(phi.last_raise + 1)
    assert phi.value == 1.0


def test_distillm_trains_from_its_replay_buffer(tmp_path):
    cfg = cfg_of(tmp_path, "gkd", "train.batches=distillm", "loss.divergence=skew_kl", "onpolicy.adaptive_init=1.0",
                 "onpolicy.replay_capacity=16", "train.max_steps=10", "eval.every=0", "checkpoint.every=0")
    train.main(cfg)
    recs = records(cfg)
    fresh = [r["on_policy"] for r in recs]
    replay = [r["replay"] for r in recs]
    assert fresh[:2] == [1.0, 1.0]  # the buffer fills first (2 steps of 8)
    assert sum(replay) > 0 and all(a + b == 1.0 for a, b in zip(fresh, replay, strict=True))
    assert all(r["distillm_threshold"] == 1.0 for r in recs)


# ------------------------------------------------------------------------------------------- resume


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gkd", "skd", "distillm"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, method):
    extra = {"gkd": [], "skd": [], "distillm": ["train.batches=distillm", "loss.divergence=skew_kl",
                                                "onpolicy.adaptive_init=0.8", "onpolicy.replay_capacity=24"]}[method]
    source = TINY["skd" if method == "skd" else "gkd"]
    steps = ["train.max_steps=24", "checkpoint.every=4", "eval.every=8", "log.every=1", *extra]
    ref = load_config(TrainConfig, source, [f"out_dir={tmp_path / 'ref'}", "log.progress=false", *steps])
    train.main(ref)
    out = tmp_path / "killed"
    kill_train_then_resume(source, out, steps, kill_at=12, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=180)
    a, b = load_file(str(out / "student" / "model.safetensors")), weights(ref)
    assert all(torch.equal(a[k], b[k]) for k in a), method
    got = [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
           if r["split"] == "train"]
    assert got == [(r["step"], r["loss"]) for r in records(ref)]


# ------------------------------------------------------------------------------------------- bad input


def test_bad_settings_are_named(tmp_path, tiny_caches):
    with pytest.raises(ConfigError, match="onpolicy.student_fraction"):
        cfg_of(tmp_path, "gkd", "onpolicy.student_fraction=1.5")
    with pytest.raises(ConfigError, match="onpolicy.skd_top_k"):
        cfg_of(tmp_path, "skd", "onpolicy.skd_top_k=0")
    with pytest.raises(ConfigError, match="set data.packing=false"):
        cfg_of(tmp_path, "gkd", "data.packing=true")
    text = ["data.source=configs/tiny/data/docstrings.jsonl", "data.format=text", "data.seq_len=32",
            "data.truncate=true"]
    with pytest.raises(ValueError, match="train.batches=gkd needs prompts"):
        train.main(cfg_of(tmp_path / "a", "gkd", *text, "onpolicy.student_fraction=1"))
    with pytest.raises(ValueError, match="a cached teacher cannot score text the student writes"):
        train.main(cfg_of(tmp_path / "b", "gkd", "teacher=null", f"teacher.cache={tiny_caches['topk']['out']}",
                          "data.source=configs/tiny/data/docstrings.jsonl", "data.seq_len=128", "data.max_examples=120",
                          "data.format=auto"))
    with pytest.raises(ValueError, match="onpolicy.max_new_tokens=60 .* exceeds the models' 64 positions"):
        train.main(cfg_of(tmp_path / "c", "gkd", "onpolicy.max_new_tokens=60"))
    with pytest.raises(ValueError, match="needs a teacher|set a teacher"):
        train.main(cfg_of(tmp_path / "d", "gkd", "teacher=null"))


# ------------------------------------------------------------------------------------------- sampled reverse KL


def test_sampled_reverse_kl_gradient_is_unbiased_for_the_reverse_kl():
    """Averaged over tokens drawn from the student, the surrogate's gradient is the gradient of KL(q || p)."""
    g = torch.Generator().manual_seed(0)
    v, n = 6, 60000
    zs = (torch.randn(v, generator=g, dtype=torch.float64) * 1.2).requires_grad_()
    zt = torch.randn(v, generator=g, dtype=torch.float64) * 1.2
    q = torch.softmax(zs.detach(), -1)
    draws = torch.multinomial(q, n, replacement=True, generator=g)
    spec = LossSpec("sampled_reverse_kl")
    for teacher in (zt.expand(n, v), SparseTarget(torch.arange(v).expand(n, v), torch.softmax(zt, -1).expand(n, v),
                                                    torch.zeros(n, dtype=torch.float64))):
        out = kd_loss_per_token(zs.expand(n, v), draws, teacher, spec)
        (grad,) = torch.autograd.grad(out["loss"].mean(), zs)
        (exact,) = torch.autograd.grad(token_divergence(zs, zt, "reverse_kl"), zs)
        torch.testing.assert_close(grad, exact, atol=0.02, rtol=0)  # ~5 standard errors at n = 60,000; seeded
        assert float(out["div"].mean()) == pytest.approx(float(token_divergence(zs.detach(), zt, "reverse_kl")),
                                                         abs=0.02)
    with pytest.raises(ValueError, match="lacks some"):
        kd_loss_per_token(zs.expand(2, v), torch.tensor([0, 5]), SparseTarget(torch.tensor([[0], [1]]),
                          torch.tensor([[1.0], [1.0]]), torch.zeros(2)), spec)


def test_gkd_with_sampled_reverse_kl_trains(tmp_path):
    cfg = cfg_of(tmp_path, "gkd", "loss.divergence=sampled_reverse_kl", "onpolicy.student_fraction=1",
                 "train.max_steps=4", "eval.every=0", "checkpoint.every=0")
    train.main(cfg)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records(cfg))
