"""The chunked loss path equals the naive one (materialized logits + kd_loss_per_token + reduce_loss)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from distill.losses import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    DIVERGENCES,
    IGNORE_INDEX,
    DenseSignal,
    LinearHead,
    LossSpec,
    SparseTarget,
    chunked_kd_loss,
    kd_loss_per_token,
    naive_kd_loss,
    plan_chunks,
    reduce_loss,
    temporaries_per_token,
    token_divergence,
)

N, H, H_T, V, V_ROWS, K = 45, 12, 10, 40, 44, 6
# 45 positions, of which 6..17 and 30..37 are unsupervised: with chunk_size 4 over the 25 supervised rows
# the last chunk has 1 row; in position space whole chunks of 4 are masked.
MASKED = list(range(6, 18)) + list(range(30, 38))
CHUNK = 4
SETTINGS = [
    dict(temperature=1.0, t2_scale=True, alpha=0.0),
    dict(temperature=2.0, t2_scale=False, alpha=0.5),
    dict(temperature=0.7, t2_scale=True, alpha=0.5),
]
TOL = dict(rtol=2e-5, atol=2e-6)


def _ref_logits(hidden, head: LinearHead):
    """Independent materialization of ``softcap(scale * (h @ W.T + b))[:, :vocab_size]``."""
    z = hidden @ head.weight.T
    if head.bias is not None:
        z = z + head.bias
    if head.vocab_size is not None:
        z = z[..., : head.vocab_size]
    up = (lambda x: x) if z.dtype == torch.float64 else (lambda x: x.float())
    if head.logit_scale != 1.0:
        z = up(z) * head.logit_scale
    if head.softcap is not None:
        z = head.softcap * torch.tanh(up(z) / head.softcap)
    return z


def _problem(seed=0, dtype=torch.float32, bias=True, post=True, masked=MASKED):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V_ROWS, H, generator=g) * 0.7).to(dtype).requires_grad_()
    b = (torch.randn(V_ROWS, generator=g) * 0.3).to(dtype).requires_grad_() if bias else None
    s_head = LinearHead(
        weight, b, logit_scale=0.8 if post else 1.0, softcap=6.0 if post else None, vocab_size=V
    )
    t_hidden = torch.randn(N, H_T, generator=g).to(dtype)
    t_weight = (torch.randn(V + 2, H_T, generator=g) * 0.9).to(dtype)
    t_head = LinearHead(
        t_weight, None, logit_scale=1.3 if post else 1.0, softcap=8.0 if post else None, vocab_size=V
    )
    labels = torch.randint(V, (N,), generator=g)
    labels[masked] = IGNORE_INDEX
    return hidden, s_head, labels, DenseSignal(t_hidden, t_head)


def _sparse(seed=0, tail="tail"):
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])
    probs = torch.softmax(torch.randn(N, K, generator=g) * 2, -1)
    probs[::3, -2:] = 0.0  # padding entries
    if tail == "tail":
        probs = probs * 0.8
        return SparseTarget(ids, probs, 1.0 - probs.sum(-1))
    if tail == "sampled":
        return SparseTarget(ids, probs / probs.sum(-1, keepdim=True), torch.zeros(N))
    return SparseTarget(ids, probs, None)


def _params(hidden, head):
    return [t for t in (hidden, head.weight, head.bias) if t is not None]


def _spec(kind="forward_kl", **kw) -> LossSpec:
    return LossSpec(kind, **kw)


def _naive(hidden, head, labels, teacher, num_tokens, **kw):
    logits = _ref_logits(hidden, head)
    if isinstance(teacher, DenseSignal):
        with torch.no_grad():
            teacher = _ref_logits(teacher.hidden, teacher.head)
    out = kd_loss_per_token(logits, labels, teacher, _spec(**kw))
    return reduce_loss(out["loss"], labels != IGNORE_INDEX, num_tokens)


def _check(
    hidden,
    head,
    labels,
    teacher,
    num_tokens=31,
    chunk_size=CHUNK,
    tol=TOL,
    budget=None,
    loss_chunk_size=None,
    **kw,
):
    params = _params(hidden, head)
    loss, stats = chunked_kd_loss(
        hidden,
        head,
        labels,
        teacher,
        num_tokens,
        _spec(**kw),
        chunk_size=chunk_size,
        loss_chunk_size=loss_chunk_size,
        memory_budget_bytes=budget,
    )
    grads = torch.autograd.grad(loss, params)
    ref = _naive(hidden, head, labels, teacher, num_tokens, **kw)
    ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(loss, ref, **tol)
    for g, r, p in zip(grads, ref_grads, params, strict=True):
        assert g.dtype == p.dtype and g.shape == p.shape
        torch.testing.assert_close(g, r, **tol)
    return loss, stats


@pytest.mark.parametrize("setting", SETTINGS, ids=["T1", "T2-noT2-a.5", "T.7-a.5"])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_dense_teacher_matches_naive(kind, setting):
    hidden, head, labels, teacher = _problem()
    _check(hidden, head, labels, teacher, kind=kind, **setting)


@pytest.mark.parametrize("tail", ["tail", "renormalized"])
@pytest.mark.parametrize("setting", SETTINGS, ids=["T1", "T2-noT2-a.5", "T.7-a.5"])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_sparse_teacher_matches_naive(kind, setting, tail):
    hidden, head, labels, _ = _problem(seed=1)
    _check(hidden, head, labels, _sparse(1, tail), kind=kind, **setting)


@pytest.mark.parametrize("kind", [d for d in DIVERGENCES if LossSpec(d).tolerates_zero_teacher_mass])
def test_sampled_sparse_target_matches_naive(kind):
    hidden, head, labels, _ = _problem(seed=2, post=False)
    _check(hidden, head, labels, _sparse(2, "sampled"), kind=kind, temperature=1.0)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 25, 1000, None])
def test_chunk_sizes(chunk_size):
    hidden, head, labels, teacher = _problem(seed=3)
    _check(
        hidden, head, labels, teacher, chunk_size=chunk_size, kind="jsd", beta=0.3, temperature=1.5, alpha=0.5
    )


@pytest.mark.parametrize("kind", ["jsd", "skew_kl", "skew_reverse_kl"])
def test_beta_and_skew_are_passed(kind):
    hidden, head, labels, teacher = _problem(seed=4, post=False, bias=False)
    _check(hidden, head, labels, teacher, kind=kind, beta=0.2, skew=0.3)


def test_no_masking_plain_head():
    hidden, head, labels, teacher = _problem(seed=5, post=False, bias=False, masked=[])
    _check(hidden, head, labels, teacher, kind="forward_kl", chunk_size=8)


def test_float64_is_exact():
    hidden, head, labels, teacher = _problem(seed=6, dtype=torch.float64)
    _check(
        hidden,
        head,
        labels,
        teacher,
        kind="reverse_kl",
        temperature=2.0,
        alpha=0.5,
        tol=dict(rtol=1e-10, atol=1e-12),
    )


@pytest.mark.parametrize("teacher_kind", ["dense", "sparse"])
def test_stats_match_naive(teacher_kind):
    hidden, head, labels, teacher = _problem(seed=7)
    if teacher_kind == "sparse":
        teacher = _sparse(7, "tail")
    kw = dict(kind="jsd", temperature=2.0, alpha=0.5)
    _, stats = _check(hidden, head, labels, teacher, **kw)

    mask = labels != IGNORE_INDEX
    with torch.no_grad():
        logits = _ref_logits(hidden, head)
        if teacher_kind == "dense":
            t = _ref_logits(teacher.hidden, teacher.head)
            t_arg = t.argmax(-1)
        else:
            t = teacher
            t_arg = teacher.ids.gather(-1, teacher.probs.argmax(-1, keepdim=True)).squeeze(-1)
        out = kd_loss_per_token(logits, labels, t, _spec(**kw))
        kl = token_divergence(logits, t, "forward_kl", temperature=2.0)
        s_arg = logits.argmax(-1)
    assert int(stats["count"]) == int(mask.sum())
    torch.testing.assert_close(stats["ce_sum"], out["ce"][mask].sum(), **TOL)
    torch.testing.assert_close(stats["div_sum"], out["div"][mask].sum(), **TOL)
    torch.testing.assert_close(stats["kl_sum"], kl[mask].sum(), **TOL)
    assert int(stats["agree_sum"]) == int((s_arg == t_arg)[mask].sum())
    assert int(stats["correct_sum"]) == int((s_arg == labels)[mask].sum())
    assert all(not v.requires_grad for v in stats.values())
    if teacher_kind == "sparse":  # the target's entropy and its probability of the student's top-1
        p = teacher.probs[mask].double().numpy()
        tail = teacher.tail[mask].double().numpy()
        hits = (teacher.ids[mask] == s_arg[mask].unsqueeze(-1)).numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = -np.where(p > 0, p * np.log(p), 0.0).sum() - np.where(tail > 0, tail * np.log(tail), 0.0).sum()
        torch.testing.assert_close(stats["teacher_entropy_sum"].double(), torch.tensor(entropy), **TOL)
        torch.testing.assert_close(stats["teacher_p_top1_sum"].double(), torch.tensor((p * hits).sum()), **TOL)


@pytest.mark.parametrize("kind", ["reverse_kl", "jeffreys", "jsd"])
def test_naive_path_with_zero_mass_rows_at_masked_positions_has_finite_gradients(kind):
    """A cached target is all zeros (no ids, no tail) at unsupervised positions; reverse KL there is
    infinite. The naive path once masked those rows after computing them (0 * inf = NaN gradients); both
    paths must give the same finite loss and gradients."""
    hidden, head, labels, _ = _problem(seed=22)
    target = _sparse(22, "tail")
    masked = labels == IGNORE_INDEX
    target.probs[masked] = 0.0
    target.tail[masked] = 0.0
    spec = _spec(kind=kind, beta=1.0) if kind == "jsd" else _spec(kind=kind)
    params = _params(hidden, head)
    naive = naive_kd_loss(hidden, head, labels, target, 31, spec)
    naive_grads = torch.autograd.grad(naive, params)
    chunked, _ = chunked_kd_loss(hidden, head, labels, target, 31, spec, chunk_size=CHUNK)
    chunked_grads = torch.autograd.grad(chunked, params)
    assert torch.isfinite(naive)
    torch.testing.assert_close(naive, chunked, **TOL)
    for a, b in zip(naive_grads, chunked_grads, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **TOL)


def test_forward_kl_stat_is_the_divergence():
    hidden, head, labels, teacher = _problem(seed=8)
    _, stats = chunked_kd_loss(hidden, head, labels, teacher, 10, _spec(kind="forward_kl", temperature=3.0))
    torch.testing.assert_close(stats["kl_sum"], stats["div_sum"])


def test_teacher_none_is_cross_entropy():
    hidden, head, labels, _ = _problem(seed=9)
    _, stats = _check(hidden, head, labels, None)
    assert set(stats) == {"ce_sum", "correct_sum", "count"}
    mask = labels != IGNORE_INDEX
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(
            _ref_logits(hidden, head)[mask].float(), labels[mask], reduction="sum"
        )
    torch.testing.assert_close(stats["ce_sum"], ce, **TOL)


@pytest.mark.parametrize("teacher_kind", ["dense", "sparse", "none"])
def test_all_masked_gives_zero(teacher_kind):
    hidden, head, labels, teacher = _problem(seed=10, masked=list(range(N)))
    teacher = {"dense": teacher, "sparse": _sparse(10), "none": None}[teacher_kind]
    loss, stats = chunked_kd_loss(hidden, head, labels, teacher, 0, _spec(kind="reverse_kl"))
    loss.backward()
    assert float(loss.detach()) == 0.0
    for p in _params(hidden, head):
        assert torch.isfinite(p.grad).all() and not p.grad.any()
    assert int(stats["count"]) == 0 and float(stats["ce_sum"]) == 0.0


def test_num_tokens_tensor_and_scaling():
    hidden, head, labels, teacher = _problem(seed=11)
    _check(hidden, head, labels, teacher, num_tokens=torch.tensor(17), kind="tvd", alpha=0.5)
    loss_a, _ = chunked_kd_loss(hidden, head, labels, teacher, 10)
    loss_b, _ = chunked_kd_loss(hidden, head, labels, teacher, 20)
    torch.testing.assert_close(loss_a, 2 * loss_b)


def test_upstream_gradient_scales_and_accumulates():
    hidden, head, labels, teacher = _problem(seed=12)
    params = _params(hidden, head)
    loss, _ = chunked_kd_loss(hidden, head, labels, teacher, 31, chunk_size=CHUNK)
    (3.0 * loss).backward()
    loss2, _ = chunked_kd_loss(hidden, head, labels, teacher, 31, chunk_size=CHUNK)
    loss2.backward()  # accumulates into .grad
    ref = _naive(hidden, head, labels, teacher, 31)
    ref_grads = torch.autograd.grad(4.0 * ref, params)
    for p, r in zip(params, ref_grads, strict=True):
        torch.testing.assert_close(p.grad, r, **TOL)


def test_backward_twice_raises():
    hidden, head, labels, teacher = _problem(seed=13)
    loss, _ = chunked_kd_loss(hidden, head, labels, teacher, 31)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_no_grad_mode():
    hidden, head, labels, teacher = _problem(seed=14)
    with torch.no_grad():
        loss, stats = chunked_kd_loss(hidden, head, labels, teacher, 31, _spec(kind="jeffreys"), chunk_size=CHUNK)
        ref = _naive(hidden, head, labels, teacher, 31, kind="jeffreys")
    assert loss.grad_fn is None and not loss.requires_grad
    torch.testing.assert_close(loss, ref, **TOL)
    assert {"ce_sum", "div_sum", "kl_sum", "agree_sum", "correct_sum", "count"} <= set(stats)


def test_partial_requires_grad():
    hidden, head, labels, teacher = _problem(seed=15)
    frozen_head = LinearHead(head.weight.detach(), head.bias.detach(), head.logit_scale, head.softcap, V)
    loss, _ = chunked_kd_loss(hidden, frozen_head, labels, teacher, 31, _spec(kind="skew_kl"), chunk_size=CHUNK)
    (g,) = torch.autograd.grad(loss, [hidden])
    ref = _naive(hidden, frozen_head, labels, teacher, 31, kind="skew_kl")
    torch.testing.assert_close(g, torch.autograd.grad(ref, [hidden])[0], **TOL)

    h_const = hidden.detach()
    loss, _ = chunked_kd_loss(h_const, head, labels, teacher, 31, _spec(kind="skew_kl"), chunk_size=CHUNK)
    gw, gb = torch.autograd.grad(loss, [head.weight, head.bias])
    ref = _naive(h_const, head, labels, teacher, 31, kind="skew_kl")
    rw, rb = torch.autograd.grad(ref, [head.weight, head.bias])
    torch.testing.assert_close(gw, rw, **TOL)
    torch.testing.assert_close(gb, rb, **TOL)

    loss, _ = chunked_kd_loss(h_const, frozen_head, labels, teacher, 31)
    assert not loss.requires_grad


def test_tied_weights_and_batched_shapes():
    """The head weight is also the input embedding; hidden/labels come as (B, T, ...)."""
    hidden, head, labels, teacher = _problem(seed=16)
    t_hidden, t_head = teacher.hidden, teacher.head
    emb = head.weight
    tokens = torch.randint(V, (N,))

    def run(fn):
        h = (hidden + emb[tokens]).reshape(5, 9, H)
        return fn(
            h, head, labels.reshape(5, 9), DenseSignal(t_hidden.reshape(5, 9, H_T), t_head), 31,
            _spec(kind="tvd", alpha=0.5),
        )

    loss, _ = run(lambda *a, **k: chunked_kd_loss(*a, chunk_size=CHUNK, **k))
    g = torch.autograd.grad(loss, [hidden, emb])
    ref = run(naive_kd_loss)
    r = torch.autograd.grad(ref, [hidden, emb])
    for a, b in zip(g, r, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_naive_kd_loss_helper_matches_reference():
    hidden, head, labels, teacher = _problem(seed=17)
    torch.testing.assert_close(
        naive_kd_loss(hidden, head, labels, teacher, 31, _spec(kind="jsd")),
        _naive(hidden, head, labels, teacher, 31, kind="jsd"),
    )


def test_bfloat16_inputs():
    hidden, head, labels, teacher = _problem(seed=18, dtype=torch.bfloat16, post=False)
    params = _params(hidden, head)
    loss, _ = chunked_kd_loss(hidden, head, labels, teacher, 31, _spec(alpha=0.5), chunk_size=CHUNK)
    grads = torch.autograd.grad(loss, params)
    ref = _naive(hidden, head, labels, teacher, 31, alpha=0.5)
    ref_grads = torch.autograd.grad(ref, params)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    for g, r, p in zip(grads, ref_grads, params, strict=True):
        assert g.dtype == torch.bfloat16 and g.shape == p.shape
        # The naive path accumulates the weight gradient in bf16, the chunked one in fp32.
        torch.testing.assert_close(g.float(), r.float(), rtol=3e-2, atol=2e-3)


@pytest.mark.parametrize("teacher_kind", ["dense", "sparse"])
def test_under_bf16_autocast_matches_naive_and_keeps_param_dtypes(teacher_kind):
    """train.precision=bf16: fp32 parameters, the loss called inside autocast, masked rows (index_copy)."""
    hidden, head, labels, teacher = _problem(seed=21, post=False)
    if teacher_kind == "sparse":
        teacher = _sparse(seed=21)
    params = _params(hidden, head)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, stats = chunked_kd_loss(hidden, head, labels, teacher, 31, _spec(alpha=0.5), chunk_size=CHUNK)
        ref = _naive(hidden, head, labels, teacher, 31, alpha=0.5)
    grads = torch.autograd.grad(loss, params)
    ref_grads = torch.autograd.grad(ref, params)
    assert loss.dtype == torch.float32 and stats["count"] == N - len(MASKED)
    torch.testing.assert_close(loss, ref.float(), rtol=2e-2, atol=2e-2)
    for g, r, p in zip(grads, ref_grads, params, strict=True):
        assert g.dtype == p.dtype == torch.float32 and g.shape == p.shape
        torch.testing.assert_close(g, r.float(), rtol=5e-2, atol=5e-3)
    # Autocast is honoured: the logits come from bf16 matmuls, so the value differs from the fp32 call.
    loss_fp32, _ = chunked_kd_loss(hidden, head, labels, teacher, 31, _spec(alpha=0.5), chunk_size=CHUNK)
    assert not torch.equal(loss, loss_fp32)


def test_mismatched_vocab_raises():
    hidden, head, labels, teacher = _problem(seed=19)
    bad = LinearHead(teacher.head.weight, vocab_size=V + 1)
    with pytest.raises(ValueError, match="classes"):
        chunked_kd_loss(hidden, head, labels, DenseSignal(teacher.hidden, bad), 31)


def test_chunk_sizes_from_budget():
    temps = temporaries_per_token("dense", "forward_kl")
    budgets = (1, 2**20, 2**24, 2**26, 2**28, 2**30, 2**40)
    plans = [plan_chunks(131072, 4096, temporaries=temps, memory_budget_bytes=b) for b in budgets]
    chunks = [c for c, _ in plans]
    loss_chunks = [r for _, r in plans]
    assert chunks == sorted(chunks) and loss_chunks == sorted(loss_chunks)
    assert plans[0] == (1, 1) and chunks[-1] == 4096
    assert all(1 <= r <= c for c, r in plans)
    # The budget is respected (unless a single row does not fit): two logit buffers + the loss chunk.
    for b, (c, r) in zip(budgets[2:6], plans[2:6], strict=True):
        assert (2 * c + (temps - 2) * r) * 131072 * 4 <= b
    assert plan_chunks(131072, 0, temporaries=temps) == (1, 1)
    default = plan_chunks(131072, 10**6, temporaries=temps)
    assert default == plan_chunks(
        131072, 10**6, temporaries=temps, memory_budget_bytes=DEFAULT_MEMORY_BUDGET_BYTES
    )
    assert 64 <= default[0] <= 512 and 4 <= default[1] <= 32
    # More temporaries (JSD) -> smaller loss chunks; no teacher (one buffer) -> bigger chunks.
    assert plan_chunks(131072, 10**6, temporaries=temporaries_per_token("dense", "jsd"))[1] < default[1]
    assert plan_chunks(131072, 10**6, temporaries=temporaries_per_token("none"), buffers=1)[0] > default[0]
    assert temporaries_per_token("dense", "jsd", grad=False) < temporaries_per_token("dense", "jsd")
    assert temporaries_per_token("dense", "forward_kl", grad=False) <= temps
    # Explicit sizes are kept; the loss chunk never exceeds the chunk.
    assert plan_chunks(131072, 4096, temporaries=temps, chunk_size=100, loss_chunk_size=7) == (100, 7)
    assert plan_chunks(131072, 4096, temporaries=temps, chunk_size=5, loss_chunk_size=7) == (5, 5)
    assert plan_chunks(131072, 30, temporaries=temps, chunk_size=100)[0] == 30


@pytest.mark.parametrize(("chunk", "loss_chunk"), [(10, 3), (7, 7), (25, 4), (1000, 6), (6, None)])
def test_loss_chunks_within_chunks(chunk, loss_chunk):
    hidden, head, labels, teacher = _problem(seed=21)
    _check(
        hidden,
        head,
        labels,
        teacher,
        chunk_size=chunk,
        loss_chunk_size=loss_chunk,
        kind="skew_reverse_kl",
        temperature=1.5,
        alpha=0.5,
    )
    _check(hidden, head, labels, _sparse(21), chunk_size=chunk, loss_chunk_size=loss_chunk, kind="jeffreys")


@pytest.mark.parametrize("budget", [1, V * 4 * 40, 10**12])
def test_chunk_sizes_from_budget_run(budget):
    hidden, head, labels, teacher = _problem(seed=20)
    _check(hidden, head, labels, teacher, chunk_size=None, budget=budget, kind="reverse_kl")


class _LargestOutput(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("teacher_kind", ["dense", "sparse"])
def test_never_materializes_all_logits(teacher_kind):
    """No op (forward or backward) outputs as many elements as (supervised tokens, V)."""
    n, h, v, chunk = 64, 8, 300, 8
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    labels = torch.randint(v, (n,))
    if teacher_kind == "dense":
        teacher = DenseSignal(torch.randn(n, h), LinearHead(torch.randn(v, h)))
    else:
        teacher = SparseTarget(torch.randint(v, (n, 4)), torch.full((n, 4), 0.2), torch.full((n,), 0.2))
    mode = _LargestOutput()
    with mode:
        loss, _ = chunked_kd_loss(hidden, LinearHead(weight), labels, teacher, n, _spec(kind="jsd"), chunk_size=chunk)
        loss.backward()
    assert v * h < n * v  # the weight gradient itself is smaller than the logits
    assert mode.largest <= max(chunk * v, v * h), mode.largest
    assert math.isfinite(float(loss.detach()))
