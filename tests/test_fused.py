"""The closed-form forward KL / CE of a loss chunk (distill.losses.fused) against autograd through
kd_loss_per_token on the same logits: value, per-row CE and divergence, and the gradient w.r.t. the raw logits."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import far_tail_problem

from distill.losses import (
    LinearHead,
    LossSpec,
    SparseTarget,
    chunked_kd_loss,
    fused,
    kd_loss_per_token,
    naive_kd_loss,
)

R, V, K = 9, 50, 7
HEADS = {
    "plain": LinearHead(torch.zeros(V, 1)),
    "scaled": LinearHead(torch.zeros(V, 1), logit_scale=0.6),
    "softcap": LinearHead(torch.zeros(V, 1), logit_scale=1.3, softcap=5.0),
}


def _raw(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(R, V, generator=g, dtype=torch.float64) * 3).to(dtype), torch.randint(V, (R,), generator=g)


def _sparse(seed=0, tail="tail", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed + 7)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(R)])
    probs = torch.softmax(torch.randn(R, K, generator=g, dtype=torch.float64) * 2, -1)
    probs[::3, -2:] = 0.0
    ids[::3, -1] = ids[::3, 0]  # a padding entry repeating a member
    if tail == "tail":
        probs = probs * 0.7
        t = 1.0 - probs.sum(-1)
    else:  # sampled: counts / N, no mass outside the ids
        probs = probs / probs.sum(-1, keepdim=True)
        t = torch.zeros(R, dtype=torch.float64)
    return SparseTarget(ids, probs.to(dtype), t.to(dtype))


def _reference(head, spec, raw, labels, teacher):
    leaf = raw.detach().clone().requires_grad_()
    out = kd_loss_per_token(head.postprocess(leaf), labels, teacher, spec)
    loss = out["loss"].sum()
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), out["ce"].detach(), out.get("div", torch.zeros(0)).detach(), grad


def _fused(head, spec, raw, labels, teacher, need_grad=True):
    buf = raw.clone()
    seen = {}

    def observe(z, ce, div):
        seen.update(z=z.clone(), ce=ce.clone(), div=None if div is None else div.clone())

    loss = fused.loss_chunk(head, spec, buf, labels, teacher, need_grad, observe)
    return loss, seen, buf


def _close(a, b, dtype):
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(a, b, **tol)


SPECS = [
    LossSpec(temperature=1.0, alpha=0.0),
    LossSpec(temperature=1.0, alpha=0.3),
    LossSpec(temperature=2.0, alpha=0.0),
    LossSpec(temperature=0.7, alpha=0.5, t2_scale=False),
    LossSpec(temperature=1.5, alpha=1.0),
    LossSpec(temperature=1.0, alpha=1.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("teacher_kind", ["none", "dense", "tail", "sampled"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_matches_autograd(spec, teacher_kind, head, dtype):
    raw, labels = _raw(1, dtype)
    teacher = {
        "none": None,
        "dense": (torch.randn(R, V, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2).to(dtype),
        "tail": _sparse(1, "tail", dtype),
        "sampled": _sparse(1, "sampled", dtype),
    }[teacher_kind]
    h = HEADS[head]
    assert fused.supports(spec, raw, teacher)
    loss, seen, grad = _fused(h, spec, raw, labels, teacher)
    ref_loss, ref_ce, ref_div, ref_grad = _reference(h, spec, raw, labels, teacher)
    _close(loss, ref_loss, dtype)
    _close(seen["ce"], ref_ce, dtype)
    if teacher is not None:
        _close(seen["div"], ref_div, dtype)
    _close(grad, ref_grad, dtype)
    # observe saw the logits themselves, before the buffer was overwritten
    torch.testing.assert_close(seen["z"], h.postprocess(raw))


def test_no_grad_leaves_the_buffer():
    raw, labels = _raw(2)
    loss, seen, buf = _fused(HEADS["plain"], LossSpec(), raw, labels, _sparse(2), need_grad=False)
    assert torch.equal(buf, raw)
    torch.testing.assert_close(loss, _reference(HEADS["plain"], LossSpec(), raw, labels, _sparse(2))[0])


def test_zero_mass_teacher_ids_count_zero_and_nan_teacher_stays_nan():
    raw, labels = _raw(4)
    teacher = torch.randn(R, V, generator=torch.Generator().manual_seed(5))
    teacher[:, :10] = -math.inf  # ids the teacher rules out
    loss, seen, grad = _fused(HEADS["plain"], LossSpec(), raw, labels, teacher)
    ref_loss, _, ref_div, ref_grad = _reference(HEADS["plain"], LossSpec(), raw, labels, teacher)
    assert torch.isfinite(seen["div"]).all()
    torch.testing.assert_close(seen["div"], ref_div)
    torch.testing.assert_close(grad, ref_grad)
    teacher[2, 20] = math.nan
    _, seen, _ = _fused(HEADS["plain"], LossSpec(), raw, labels, teacher)
    assert torch.isnan(seen["div"][2]) and torch.isfinite(seen["div"][[0, 1, 3]]).all()


@pytest.mark.parametrize(("dtype", "gap"), [(torch.float32, 30.0), (torch.float32, 14.0), (torch.float64, 60.0)])
def test_tail_far_below_the_ids_is_exact(dtype, gap):
    """As tests/test_losses.py checks the autograd path: a tail far below the kept ids without underflowing
    (fp32 e^-30, e^-14: a student all but sure of the ids) keeps its exact log-mass and gradient, against a
    float64 logsumexp over the tail ids (a tail taken as the total minus the members' share would lose ~1e-7 /
    tail of its value in fp32)."""
    z, target, reference = far_tail_problem(gap, dtype)
    loss, seen, grad = _fused(HEADS["plain"], LossSpec(), z.to(dtype), torch.tensor([0, 5, 1]), target)

    zr = z.clone().requires_grad_()
    lq, lp = reference(zr)
    ref = (lp.exp() * (lp - lq)).sum(-1)
    (ref_grad,) = torch.autograd.grad(ref.sum(), zr)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    assert torch.isfinite(seen["div"]).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(seen["div"].double(), ref, **tol)
    torch.testing.assert_close(grad.double(), ref_grad, **tol)


def test_underflowing_tail_goes_back_to_autograd():
    """A row whose tail is below what fp32 keeps beside its maximum: the chunk is refused untouched, and the
    chunked loss (which then takes the autograd path) still equals the materialized one."""
    raw, labels = _raw(8)
    ids = torch.arange(K).expand(R, K).clone()
    raw[:, :K] = 150.0  # exp(-150 - 3 * 4) underflows in fp32
    target = SparseTarget(ids, torch.full((R, K), 0.9 / K), torch.full((R,), 0.1))
    buf = raw.clone()
    assert fused.loss_chunk(HEADS["plain"], LossSpec(), buf, labels, target, True, lambda *a: None) is None
    assert torch.equal(buf, raw)
    hidden = torch.eye(R).requires_grad_()  # hidden @ W.T = raw with W = raw.T
    w = raw.T.contiguous().requires_grad_()
    head = LinearHead(w)
    loss, _ = chunked_kd_loss(hidden, head, labels, target, R, LossSpec(), chunk_size=4)
    ref = naive_kd_loss(hidden, head, labels, target, R, LossSpec())
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, w)[0], torch.autograd.grad(ref, w)[0])


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd", "tvd"])
def test_other_divergences_and_renormalized_targets_are_not_fused(kind):
    raw, _ = _raw(9)
    assert not fused.supports(LossSpec(kind), raw, raw)
    assert not fused.supports(LossSpec(), raw, SparseTarget(torch.zeros(R, K, dtype=torch.long), torch.ones(R, K)))
    assert not fused.supports(LossSpec("sampled_reverse_kl"), raw, None)
    with fused.disabled():
        assert not fused.supports(LossSpec(), raw, raw)
    assert fused.supports(LossSpec(), raw, raw)


@pytest.mark.parametrize("spec", [LossSpec(alpha=0.2), LossSpec(temperature=2.0, alpha=0.2)], ids=["T1", "T2"])
@pytest.mark.parametrize("teacher_kind", ["none", "dense", "tail"])
def test_bf16_buffer_computes_in_fp32(teacher_kind, spec):
    """A bf16 logit buffer (autocast): the math in fp32, the gradient written back in bf16, as autograd on the
    bf16 logits gives it."""
    raw, labels = _raw(10)
    raw = raw.bfloat16()
    teacher = {"none": None, "dense": torch.randn(R, V, generator=torch.Generator().manual_seed(11)).bfloat16(),
               "tail": _sparse(10)}[teacher_kind]
    loss, seen, grad = _fused(HEADS["plain"], spec, raw, labels, teacher)
    ref_loss, ref_ce, _, ref_grad = _reference(HEADS["plain"], spec, raw, labels, teacher)
    assert grad.dtype == torch.bfloat16 and seen["ce"].dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["ce"], ref_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-2, atol=1e-3)
