"""Several teachers (teacher.teachers): the mixture loss against an independent reference, chunked and naive;
the train recipe with two identical teachers, with weights (1, 0), with a cached member; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, SMALL_DATA, TINY_TRAIN

from distill import training
from distill.config import ConfigError, TrainConfig, load_config
from distill.evaluation.metrics import eval_batch_indices
from distill.losses import (
    IGNORE_INDEX,
    DenseSignal,
    LinearHead,
    LossSpec,
    MixtureSignal,
    SparseTarget,
    chunked_kd_loss,
    naive_kd_loss,
)

N, H, V = 37, 8, 30
MASKED = [3, 4, 5, 20]


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).requires_grad_()
    head = LinearHead((torch.randn(V + 2, H, generator=g) * 0.7).requires_grad_(), None, vocab_size=V)
    labels = torch.randint(V, (N,), generator=g)
    labels[MASKED] = IGNORE_INDEX
    teachers = []
    for width, scale in ((6, 1.1), (10, 0.5), (7, 1.6)):
        t_head = LinearHead(torch.randn(V + 1, width, generator=g) * scale, torch.randn(V + 1, generator=g) * 0.2,
                            vocab_size=V)
        teachers.append(DenseSignal(torch.randn(N, width, generator=g), t_head))
    return hidden, head, labels, teachers


def _reference(hidden, head, labels, teachers, weights, temps, mix, spec: LossSpec) -> torch.Tensor:
    """Written out from docs/methods.md §9 on materialized logits, in float64."""
    keep = labels != IGNORE_INDEX
    z = (hidden.double() @ head.weight.double()[:V].T)[keep]
    y = labels[keep]
    ce = -torch.log_softmax(z, -1).gather(-1, y[:, None]).squeeze(-1)
    t_logits = [(t.hidden.double() @ t.head.weight.double()[:V].T + t.head.bias.double()[:V])[keep] for t in teachers]
    a, temp = spec.alpha, spec.temperature
    if mix == "probability":
        p = sum(w * torch.softmax(tz / tk, -1) for w, tz, tk in zip(weights, t_logits, temps, strict=True))
        logq = torch.log_softmax(z / temp, -1)
        kl = (p * (p.log() - logq)).sum(-1)
        per = a * ce + (1 - a) * temp**2 * kl
    else:
        per = 0
        for w, tz, tk in zip(weights, t_logits, temps, strict=True):
            logp, logq = torch.log_softmax(tz / tk, -1), torch.log_softmax(z / tk, -1)
            per = per + w * (a * ce + (1 - a) * tk**2 * (logp.exp() * (logp - logq)).sum(-1))
    return per.sum() / 29.0


@pytest.mark.parametrize("mix", ["probability", "loss"])
@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_mixture_loss_and_gradients_match_the_reference(mix, alpha):
    hidden, head, labels, teachers = _problem()
    weights, temps = [0.5, 0.2, 0.3], [1.0, 2.0, 0.7]
    spec = LossSpec(temperature=1.5, alpha=alpha)
    signal = MixtureSignal(teachers, weights, temps, mix)
    params = [hidden, head.weight]
    want = _reference(hidden, head, labels, teachers, weights, temps, mix, spec)
    want_grads = torch.autograd.grad(want, params)
    for chunk, loss_chunk in ((4, 3), (None, None)):
        loss, stats = chunked_kd_loss(hidden, head, labels, signal, 29, spec, chunk_size=chunk,
                                      loss_chunk_size=loss_chunk)
        grads = torch.autograd.grad(loss, params)
        torch.testing.assert_close(loss.double(), want, rtol=2e-5, atol=1e-6)
        for g, r in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(g.double(), r.double(), rtol=2e-4, atol=1e-6)
        # Each teacher's forward KL to the student at its own temperature is logged.
        assert stats["teacher_kl_sums"].shape == (3,)
        for k, t in enumerate(teachers):
            one = _reference(hidden, head, labels, [t], [1.0], [temps[k]], "loss", LossSpec(temperature=temps[k]))
            assert stats["teacher_kl_sums"][k].item() / 29.0 == pytest.approx(one.item() / temps[k] ** 2, rel=1e-4)
    naive = naive_kd_loss(hidden, head, labels, signal, 29, spec)
    torch.testing.assert_close(naive.double(), want, rtol=2e-5, atol=1e-6)


def test_a_mixture_of_one_teacher_is_that_teacher_exactly():
    hidden, head, labels, teachers = _problem(1)
    spec = LossSpec("jsd", temperature=2.0, alpha=0.3)
    params = [hidden, head.weight]
    alone, alone_stats = chunked_kd_loss(hidden, head, labels, teachers[0], 29, spec, chunk_size=5)
    alone_grads = torch.autograd.grad(alone, params)
    for mix in ("probability", "loss"):
        signal = MixtureSignal(teachers[:2], [1.0, 0.0], [2.0, 1.0], mix)
        loss, stats = chunked_kd_loss(hidden, head, labels, signal, 29, spec, chunk_size=5)
        assert torch.equal(loss, alone)
        for g, r in zip(torch.autograd.grad(loss, params), alone_grads, strict=True):
            assert torch.equal(g, r)
        assert stats["teacher_kl_sums"][0] == alone_stats["kl_sum"] and stats["teacher_kl_sums"][1] > 0


def test_two_identical_teachers_equal_one():
    hidden, head, labels, teachers = _problem(2)
    spec = LossSpec(temperature=1.3, alpha=0.2)
    alone = chunked_kd_loss(hidden, head, labels, teachers[1], 29, spec)[0]
    for mix in ("probability", "loss"):
        both = chunked_kd_loss(hidden, head, labels, MixtureSignal([teachers[1]] * 2, [0.5, 0.5], [1.3, 1.3], mix),
                               29, spec)[0]
        torch.testing.assert_close(both, alone, rtol=1e-6, atol=1e-7)


def test_loss_space_mixes_sparse_and_dense_teachers():
    hidden, head, labels, teachers = _problem(3)
    g = torch.Generator().manual_seed(9)
    ids = torch.stack([torch.randperm(V, generator=g)[:5] for _ in range(N)])
    probs = torch.softmax(torch.randn(N, 5, generator=g), -1) * 0.9
    target = SparseTarget(ids, probs, 1.0 - probs.sum(-1))
    spec = LossSpec(alpha=0.0)
    signal = MixtureSignal([teachers[0], target], [0.25, 0.75], [1.0, 1.0], "loss")
    loss = chunked_kd_loss(hidden, head, labels, signal, 29, spec, chunk_size=6, loss_chunk_size=4)[0]
    parts = [chunked_kd_loss(hidden, head, labels, t, 29, spec)[0] for t in (teachers[0], target)]
    torch.testing.assert_close(loss, 0.25 * parts[0] + 0.75 * parts[1], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="probability-space mixture needs every teacher's full distribution"):
        MixtureSignal([teachers[0], target], [0.5, 0.5], [1.0, 1.0], "probability")


# ------------------------------------------------------------------------------------------- train recipe

MEMBER = {"tokenizer": "byte", "seed": 0, "config": {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}}
COMMON = ["train.max_steps=4", "log.every=1", "eval.every=0", "checkpoint.every=0", "loss.alpha=0.2"]


def _cfg(tmp_path: Path, teacher: dict | None, *overrides: str) -> TrainConfig:
    cfg = load_config(TrainConfig, TINY_TRAIN, [f"out_dir={tmp_path}", "log.progress=false", *COMMON, *overrides])
    if teacher is not None:
        cfg.teacher = teacher
    return cfg


def _records(cfg: TrainConfig) -> list[dict]:
    return [json.loads(x) for x in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]


def _weights(cfg: TrainConfig) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(cfg.out_dir) / "student" / "model.safetensors"))


def test_two_identical_teachers_train_like_one_and_weights_one_zero_like_the_first(tmp_path):
    other = {**MEMBER, "seed": 5}
    one = _cfg(tmp_path / "one", None)
    training.train(one)
    runs = {
        "half": [{**MEMBER, "weight": 0.5, "name": "a"}, {**MEMBER, "weight": 0.5, "name": "b"}],
        "first": [{**MEMBER, "weight": 1.0, "name": "a"}, {**other, "weight": 0.0, "name": "b"}],
    }
    ref = [r for r in _records(one) if r["split"] == "train"]
    for name, members in [*runs.items(), ("half_loss", runs["half"])]:
        cfg = _cfg(tmp_path / name, {"teachers": members, "mix": "loss" if name == "half_loss" else "probability"})
        training.train(cfg)
        got = [r for r in _records(cfg) if r["split"] == "train"]
        assert len(got) == len(ref) == 4
        if name == "first":  # exactly the first teacher's run
            assert [r["loss"] for r in got] == [r["loss"] for r in ref]
            assert all(torch.equal(a, b) for a, b in zip(_weights(cfg).values(), _weights(one).values(), strict=True))
            assert got[-1]["kl_a"] == pytest.approx(ref[-1]["kl"], rel=1e-9) and got[-1]["kl_b"] > 0
        else:
            for a, b in zip(got, ref, strict=True):
                assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
                assert a["kl_a"] == pytest.approx(b["kl"], rel=1e-5) and a["kl_b"] == pytest.approx(b["kl"], rel=1e-5)
            worst = max((x - y).abs().max().item() for x, y in zip(_weights(cfg).values(), _weights(one).values(),
                                                                   strict=True))
            assert worst < 1e-5


def test_loss_space_mixture_of_a_live_and_a_cached_teacher_trains(tmp_path, tiny_caches):
    members = [{**MEMBER, "config": {**MEMBER["config"], "initializer_range": 0.2}, "weight": 1.0, "name": "live"},
               {"cache": str(tiny_caches["topk"]["out"]), "weight": 3.0, "name": "cached"}]
    cfg = _cfg(tmp_path, {"teachers": members, "mix": "loss"}, *SMALL_DATA, "eval.every=4")
    summary = training.train(cfg)
    got = [r for r in _records(cfg) if r["split"] == "train"]
    assert all(r["kl_live"] > 0 and r["kl_cached"] > 0 for r in got)
    # loss space: the logged KL is the weighted mean of the teachers' KLs
    assert got[-1]["kl"] == pytest.approx(0.25 * got[-1]["kl_live"] + 0.75 * got[-1]["kl_cached"], rel=1e-5)
    assert summary["kl_to_teacher"] >= 0


def _mixture(tmp_path: Path, members: list[dict], mix: str = "probability", *overrides: str) -> TrainConfig:
    """The tiny config with ``teacher: {teachers: members, mix: mix}``, validated as a whole."""
    tree = load_config(TrainConfig, TINY_TRAIN, [f"out_dir={tmp_path}", "log.progress=false", *overrides]).model_dump()
    return TrainConfig.model_validate({**tree, "teacher": {"teachers": members, "mix": mix}})


def test_bad_mixtures_are_refused_naming_the_setting(tmp_path, tiny_caches):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"teacher.teachers\[1\].weight=-0.5: weights must be finite and >= 0"):
        _mixture(tmp_path, [MEMBER, {**MEMBER, "weight": -0.5}])
    with pytest.raises(ValidationError, match="the weights sum to 0"):
        _mixture(tmp_path, [{**MEMBER, "weight": 0.0}, {**MEMBER, "weight": 0.0}])
    with pytest.raises(ConfigError, match=r"teacher.teachers: .*at least one teacher"):
        load_config(TrainConfig, REPO / "configs" / "tiny" / "multi_teacher.yaml", ["teacher.teachers=[]"])
    from distill.tokenizer import byte_tokenizer

    other = byte_tokenizer()
    other.add_tokens(["<|extra|>"])
    other.save_pretrained(tmp_path / "other-tok")
    cfg = _mixture(tmp_path / "tok", [MEMBER, {**MEMBER, "tokenizer": str(tmp_path / "other-tok"), "name": "odd"}])
    with pytest.raises(ValueError, match=r"teacher.teachers\[1\] \(odd\): the student tokenizer .* differ"):
        training.train(cfg)
    cfg = _mixture(tmp_path / "prob", [MEMBER, {"cache": str(tiny_caches["topk"]["out"])}], "probability",
                   *SMALL_DATA)
    with pytest.raises(ValueError, match=r"teacher.mix=probability .* teacher.teachers\[1\] .*use teacher.mix=loss"):
        training.train(cfg)


def _mixture_kl_on_the_eval_split(cfg: TrainConfig, student) -> float:
    """KL(sum_k w_k softmax(t_k / T_k) || softmax(s / T)) per supervised eval position, averaged: written out
    from docs/methods.md §9 on the full logits of freshly built teachers, over the batches the run evaluates."""
    from distill.data import build_datasets, collate
    from distill.models import load_model
    from distill.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    v = len(tok)
    members = cfg.teacher.teachers
    teachers = [load_model(m, f"teacher.teachers[{i}]", tok).eval() for i, m in enumerate(members)]
    total = sum(m.weight for m in members)
    temps = [m.temperature or cfg.loss.temperature for m in members]
    _, eval_ds = build_datasets(cfg.data, tok)
    bs = cfg.eval.batch_size
    kl_sum, count = 0.0, 0
    with torch.no_grad():
        for b in eval_batch_indices(-(-len(eval_ds) // bs), cfg.eval.max_batches):
            batch = collate([eval_ds[i] for i in range(b * bs, min((b + 1) * bs, len(eval_ds)))], tok.pad_token_id)
            keep = batch["labels"][:, 1:] != IGNORE_INDEX

            def logits(model, batch=batch, keep=keep):
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                return out[:, :-1, :v][keep].double()

            p = sum(m.weight / total * torch.softmax(logits(t) / tk, -1)
                    for m, t, tk in zip(members, teachers, temps, strict=True))
            logq = torch.log_softmax(logits(student) / cfg.loss.temperature, -1)
            kl_sum += float((p * (p.log() - logq)).sum())
            count += int(keep.sum())
    return kl_sum / count


def test_the_tiny_multi_teacher_config_runs(tmp_path):
    """configs/tiny/multi_teacher.yaml (two live teachers mixed in probability space, one at its own temperature):
    every train record has each teacher's KL and a loss that is alpha * CE + (1 - alpha) * T^2 * KL(mixture);
    the final eval's KL to the teacher is the KL to the mixture written out here."""
    from transformers import AutoModelForCausalLM

    cfg = load_config(TrainConfig, REPO / "configs" / "tiny" / "multi_teacher.yaml",
                      [f"out_dir={tmp_path}", "log.progress=false", "train.max_steps=2", "log.every=1", "eval.every=2"])
    assert cfg.teacher.mix == "probability" and len({m.temperature for m in cfg.teacher.teachers}) == 2
    summary = training.train(cfg)
    got = [r for r in _records(cfg) if r["split"] == "train"]
    assert len(got) == 2
    a, temp = cfg.loss.alpha, cfg.loss.temperature
    for r in got:
        assert all(r[f"kl_{name}"] > 0 for name in cfg.teacher.names())
        assert r["loss"] == pytest.approx(a * r["ce"] + (1 - a) * temp**2 * r["kl"], rel=1e-5)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    want = _mixture_kl_on_the_eval_split(cfg, student)
    assert summary["kl_to_teacher"] == pytest.approx(want, rel=1e-4)
