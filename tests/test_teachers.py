"""Every teacher kind through the same contract (distill/teachers/base.py): the protocol's members, a signal of
the batch's shape whose probabilities sum to 1 per row and agree with the model behind it, ``covers``,
``describe``, and a state round trip where the kind keeps state (its loop hook)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import REPO, SHARP_TEACHER, SMALL_CACHE, TINY_CACHE, serving_in_process

from distill import training
from distill.config import (
    CacheConfig,
    MixtureTeacherSpec,
    SelfTeacherSpec,
    ServerTeacherSpec,
    StudentBaseTeacherSpec,
    TeacherCacheSpec,
    TrainConfig,
    load_config,
)
from distill.data import build_datasets, collate
from distill.losses import IGNORE_INDEX, DenseSignal, LossSpec, MixtureSignal, SparseTarget
from distill.models import load_model
from distill.teachers import HiddenStates, Teacher, open_teacher
from distill.tokenizer import byte_tokenizer

KINDS = ["live", "cache_topk", "cache_sampled", "server", "mixture", "student_base", "self", "peers"]
CAPABILITIES = ("states", "corrector", "names", "model", "diagnose", "check_data", "prefetch")
V = 263  # the byte tokenizer's vocabulary


@pytest.fixture(scope="module")
def setting(tiny_caches):
    """The tiny sharp teacher the session's caches were captured from, its data, and a batch of its eval split
    (dataset examples: ``index`` and ``split``, as the training run collates them)."""
    cfg = load_config(CacheConfig, TINY_CACHE, [*SMALL_CACHE, *SHARP_TEACHER])
    tok = byte_tokenizer()
    train_ds, eval_ds = build_datasets(cfg.data, tok)
    idx = list(range(4))
    batch = {**collate([eval_ds[i] for i in idx], tok.pad_token_id), "index": idx, "split": "eval"}
    model = load_model(cfg.teacher, "teacher", tok).eval()
    return {"cfg": cfg, "tok": tok, "train_ds": train_ds, "eval_ds": eval_ds, "batch": batch, "model": model,
            "caches": tiny_caches}


@pytest.fixture(scope="module")
def served(setting):
    """``distill serve``'s app on the same model, in this process (uvicorn on a thread)."""
    with serving_in_process(setting["model"], setting["tok"], "tiny", max_logprobs=300,
                            logprobs_mode="processed") as address:
        yield address


def _probs(model, batch) -> torch.Tensor:
    """softmax of ``model``'s logits at the batch's next-token positions, (B * (T - 1), V), float64."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :V]
    return torch.softmax(logits.double(), -1).reshape(-1, V)


def _lora_student(setting):
    """A LoRA student whose adapters change its outputs (B initialized away from 0), and its base as it was."""
    pytest.importorskip("peft")
    from distill import lora
    from distill.config import LoraConfig

    student = load_model(setting["cfg"].teacher, "student", setting["tok"])
    base = copy.deepcopy(student).eval()
    student = lora.add_adapters(student, LoraConfig(r=4), seed=0)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return student, base


def _peers_config(setting) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs" / "tiny" / "codistill.yaml", ["teacher.burn_in=0"])


def open_kind(kind: str, setting, served_url=None):
    """(teacher, loop hook or None, the reference: next-token probabilities of the model behind it, or None)."""
    tok, cfg, model = setting["tok"], setting["cfg"], setting["model"]
    common = {"tokenizer": tok, "student_ref": "byte", "loss": LossSpec(), "seq_len": cfg.data.seq_len,
              "vocab_policy": "truncate", "device": "cpu"}
    reference = functools.partial(_probs, model)
    if kind == "live":
        return (*open_teacher(cfg.teacher, **common), reference)
    if kind in ("cache_topk", "cache_sampled"):
        out = setting["caches"]["topk" if kind == "cache_topk" else "sampled"]["out"]
        return (*open_teacher(TeacherCacheSpec(cache=str(out)), **common), reference)
    if kind == "server":
        return (*open_teacher(ServerTeacherSpec(server=served_url, top_k=20), **common), reference)
    if kind == "mixture":
        spec = MixtureTeacherSpec.model_validate({"mix": "loss", "teachers": [
            {**cfg.teacher.model_dump(), "weight": 3.0, "name": "live"},
            {"cache": str(setting["caches"]["topk"]["out"]), "name": "cached"}]})
        return (*open_teacher(spec, **common), reference)
    if kind == "student_base":
        student, base = _lora_student(setting)
        spec = StudentBaseTeacherSpec(student_base=True)
        return (*open_teacher(spec, **common, student=student), functools.partial(_probs, base))
    if kind == "self":
        student = load_model(cfg.teacher, "student", tok)
        spec = SelfTeacherSpec(self="ema", decay=0.9)
        return (*open_teacher(spec, **common, student=student), functools.partial(_probs, copy.deepcopy(student)))
    assert kind == "peers"
    run = _peers_config(setting)
    student = load_model(run.student, "student", tok)
    teacher, hook = open_teacher(run.teacher, **common, student=student,
                                 optimizer_for=functools.partial(training.make_optimizer, cfg=run),
                                 model_step=functools.partial(training.model_step, loss=run.loss, max_grad_norm=1.0))
    return teacher, hook, functools.partial(_probs, hook.models[0])


# How far a kind's probabilities may be from the model behind it: computed alike (1e-5), or a cache's codes
# (measured: at most 1.1e-3 on these targets); None for draws (a sampled cache's counts / N).
TOLERANCE = {"cache_topk": 5e-3, "cache_sampled": None}


def check_signal(signal, rows: int, supervised: torch.Tensor, reference: torch.Tensor, atol: float | None) -> None:
    """Shape and probability mass per row; where ``atol`` is given, the probabilities it holds against the
    reference (the model behind the teacher), on the supervised rows."""
    if isinstance(signal, MixtureSignal):
        assert sum(signal.weights) == pytest.approx(1.0)
        for member in signal.signals:  # the live member against the reference; the cached one on its own
            check_signal(member, rows, supervised, reference, 1e-5 if isinstance(member, DenseSignal) else None)
        return
    if isinstance(signal, DenseSignal):
        assert signal.hidden.shape[0] == rows and signal.head.num_classes == V
        p = torch.softmax(signal.head.logits(signal.hidden).double(), -1)
        torch.testing.assert_close(p.sum(-1), torch.ones(rows, dtype=torch.float64))
        if atol is not None:
            torch.testing.assert_close(p[supervised], reference[supervised], atol=atol, rtol=0)
        return
    assert isinstance(signal, SparseTarget) and signal.ids.shape[0] == rows == signal.probs.shape[0]
    ids, probs = signal.ids[supervised], signal.probs[supervised].double()
    tail = signal.tail[supervised].double() if signal.tail is not None else torch.zeros(len(ids), dtype=torch.float64)
    assert (probs >= 0).all() and (tail >= 0).all()
    torch.testing.assert_close(probs.sum(-1) + tail, torch.ones(len(ids), dtype=torch.float64), atol=2e-3, rtol=0)
    if atol is not None:
        want = reference[supervised].gather(1, ids)
        torch.testing.assert_close(torch.where(probs > 0, probs, want), want, atol=atol, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_every_teacher_kind_keeps_the_contract(kind, setting, request):
    served_url = request.getfixturevalue("served") if kind in ("server",) else None
    teacher, hook, reference = open_kind(kind, setting, served_url)
    for name in (*Teacher.__annotations__, "signal", "covers", "describe"):
        assert hasattr(teacher, name), name
    for name in CAPABILITIES:  # a capability is there or None, never a stand-in that does nothing
        value = getattr(teacher, name)
        assert value is None or callable(value) or isinstance(value, (HiddenStates, list, torch.nn.Module)), name
    assert teacher.eval_estimates in ("exact", "topk_tail", "topk", "sampled") and teacher.eval_temperature > 0
    assert isinstance(teacher.describe(), str) and teacher.describe()
    if teacher.check_data is not None:
        teacher.check_data(setting["train_ds"], setting["eval_ds"])
    assert teacher.covers("train") and teacher.covers("eval")
    batch = setting["batch"]
    b, t = batch["input_ids"].shape
    supervised = (batch["labels"][:, 1:] != IGNORE_INDEX).reshape(-1)
    signal = teacher.signal(batch)
    check_signal(signal, b * (t - 1), supervised, reference(batch), TOLERANCE.get(kind, 1e-5))
    if teacher.diagnose is not None:
        assert teacher.diagnose(batch) is None
    if teacher.states is not None:
        again, states = teacher.states.of(batch)
        assert len(states) == teacher.states.layers + 1 and states[-1].shape == (b, t, teacher.states.width)
        check_signal(again, b * (t - 1), supervised, reference(batch), 1e-5)
    if hook is not None:
        check_state_round_trip(kind, teacher, hook, setting, batch)


def check_state_round_trip(kind: str, teacher, hook, setting, batch) -> None:
    """One step of the hook, then its checkpoint state loaded into a freshly opened one: the same state, the
    same signal."""
    student = hook.student if kind == "peers" else load_model(setting["cfg"].teacher, "student", setting["tok"])
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    if hook.before_step is not None:
        step_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        hook.before_step([batch], step_tokens, 0)
    hook.after_step(student, 1)
    state = hook.state_dict()
    fresh, fresh_hook, _ = open_kind(kind, setting)
    fresh_hook.load_state_dict(state)
    again = fresh_hook.state_dict()
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    a, b = teacher.signal(batch), fresh.signal(batch)
    assert torch.equal(a.hidden, b.hidden)
    if kind == "peers":  # the schedule resumes at the kept step
        for (_, s1), (_, s2) in zip(hook.optimizers, fresh_hook.optimizers, strict=True):
            assert s1.last_epoch == s2.last_epoch == 1 and s1.get_last_lr() == s2.get_last_lr()


def test_cross_tokenizer_teacher_keeps_what_applies(setting, tmp_path):
    """A live teacher with its own tokenizer (loss.crosstok) keeps the protocol's members and capabilities, but
    its signal is over its own rows and vocabulary, so the contract's row-for-row checks against the student's
    batch do not apply. What does: it covers train and not eval (evaluation measures no distance to it), and
    its signal's dense part has one row per next-token position of its own tokenization of the batch, whose
    probabilities sum to 1 and equal the teacher model's on that tokenization (tokenized here from the text)."""
    from distill.commands.quickstart import train_tokenizer
    from distill.losses import CrossTokSignal

    data = REPO / "configs" / "tiny" / "data" / "docstrings.jsonl"
    bpe_dir = train_tokenizer(data, 400, tmp_path / "bpe")
    tok, cfg = setting["tok"], setting["cfg"]
    spec = cfg.teacher.model_copy(update={"tokenizer": str(bpe_dir)})
    teacher, hook = open_teacher(spec, tokenizer=tok, student_ref="byte", loss=LossSpec(), seq_len=cfg.data.seq_len,
                                 vocab_policy="truncate", device="cpu", crosstok="pkl", cache_dir=str(tmp_path))
    assert hook is None
    for name in (*Teacher.__annotations__, "signal", "covers", "describe"):
        assert hasattr(teacher, name), name
    for name in CAPABILITIES:
        value = getattr(teacher, name)
        assert value is None or callable(value) or isinstance(value, (HiddenStates, list, torch.nn.Module)), name
    assert teacher.eval_estimates in ("exact", "topk_tail", "topk", "sampled") and teacher.eval_temperature > 0
    assert isinstance(teacher.describe(), str) and "pkl" in teacher.describe()
    assert teacher.covers("train") and not teacher.covers("eval")
    batch = setting["batch"]
    signal = teacher.signal(batch)
    assert isinstance(signal, CrossTokSignal)
    t_tok = teacher.tokenizer
    model = teacher.model
    start = 0
    for b in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][b].sum())
        text = tok.decode(batch["input_ids"][b, :n].tolist())
        ids = torch.tensor([t_tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            want = torch.softmax(model(input_ids=ids).logits[0, :-1, :len(t_tok)].double(), -1)
        width = signal.teacher.hidden.shape[0] // batch["input_ids"].shape[0]  # T_t - 1 rows per sequence
        rows = signal.teacher.hidden[b * width:b * width + want.shape[0]]
        got = torch.softmax(signal.teacher.head.logits(rows).double(), -1)
        assert signal.teacher.head.num_classes == len(t_tok) != V
        torch.testing.assert_close(got.sum(-1), torch.ones(len(got), dtype=torch.float64))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        start += want.shape[0]
    assert start > 0
    signal.groups.check()
