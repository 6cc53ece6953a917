"""Tests of distill.losses against independent references.

Reference values are written from the formulas in docs/methods.md sections 1-2 with numpy float64 (or
plain torch ops / ``torch.nn.functional``); no reference calls ``distill.losses``. Invariant tests
(padding, sparse vs dense, micro-batches) compare the library with itself on purpose.
Convention: ``p`` = teacher, ``q`` = student.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import far_tail_problem

from distill.losses import (
    DIVERGENCES,
    IGNORE_INDEX,
    LossSpec,
    SparseTarget,
    cross_entropy_per_token,
    divergence_from_logprobs,
    kd_loss_per_token,
    reduce_loss,
    sparse_logprobs,
    supervised_mask,
    token_divergence,
)

# (kind, kwargs) pairs covering every divergence and several beta / skew values.
CONFIGS = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.9}),
    ("jsd", {"beta": 1.0}),
    ("skew_kl", {"skew": 0.0}),
    ("skew_kl", {"skew": 0.1}),
    ("skew_kl", {"skew": 0.5}),
    ("skew_reverse_kl", {"skew": 0.0}),
    ("skew_reverse_kl", {"skew": 0.1}),
    ("skew_reverse_kl", {"skew": 0.5}),
    ("tvd", {}),
    ("jeffreys", {}),
]
CONFIG_IDS = [kind + "".join(f"-{k}={v}" for k, v in kw.items()) for kind, kw in CONFIGS]
# Divergences that stay finite when the teacher has zero mass where the student does not.
# (reverse KL, its 0.5 share in Jeffreys, JSD at beta = 1 and skew reverse KL at skew = 0 are infinite.)
FINITE_WITH_ZERO_TEACHER_MASS = [
    (kind, kw)
    for kind, kw in CONFIGS
    if kind not in ("reverse_kl", "jeffreys")
    and kw.get("beta") != 1.0
    and not (kind == "skew_reverse_kl" and kw["skew"] == 0.0)
]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Everything here is tiny; one intra-op thread avoids OpenMP stalls when the CPUs are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def configs():
    return pytest.mark.parametrize(("kind", "kw"), CONFIGS, ids=CONFIG_IDS)


# ----------------------------------------------------------------------------------------------------
# Independent references (numpy float64)
# ----------------------------------------------------------------------------------------------------


def np64(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float64).numpy()


def np_softmax(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum a log(a / b) over the last axis, with 0 log 0 = 0 (and +inf where a > 0 = b)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(a > 0, a * (np.log(a) - np.log(b)), 0.0)
    return terms.sum(-1)


def ref_divergence(
    p: np.ndarray, q: np.ndarray, kind: str, beta: float = 0.5, skew: float = 0.1
) -> np.ndarray:
    """docs/methods.md section 1, straight from the probabilities."""
    if kind == "forward_kl":
        return np_kl(p, q)
    if kind == "reverse_kl":
        return np_kl(q, p)
    if kind == "jeffreys":
        return 0.5 * np_kl(p, q) + 0.5 * np_kl(q, p)
    if kind == "jsd":  # scaled generalized JSD; endpoints are its limits
        if beta == 0.0:
            return np_kl(p, q)
        if beta == 1.0:
            return np_kl(q, p)
        m = beta * p + (1 - beta) * q
        return (beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)) / (beta * (1 - beta))
    if kind == "skew_kl":
        return np_kl(p, skew * p + (1 - skew) * q)
    if kind == "skew_reverse_kl":
        return np_kl(q, (1 - skew) * p + skew * q)
    if kind == "tvd":
        return 0.5 * np.abs(p - q).sum(-1)
    raise AssertionError(f"no reference for {kind}")


def rand_logits(*shape, seed: int, scale: float = 2.0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def assert_np_close(actual: torch.Tensor, expected: np.ndarray, rtol: float, atol: float) -> None:
    np.testing.assert_allclose(np64(actual), expected, rtol=rtol, atol=atol)


def tol(dtype):
    return {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-6}


def grad_of(fn, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    return g


def topk_target(teacher_logits: torch.Tensor, k: int, with_tail: bool) -> SparseTarget:
    p = torch.softmax(teacher_logits.double(), -1)
    probs, ids = p.topk(k, dim=-1)
    tail = (1.0 - probs.sum(-1)) if with_tail else None
    return SparseTarget(ids, probs, tail)


def test_configs_cover_every_divergence():
    assert {kind for kind, _ in CONFIGS} == set(DIVERGENCES)


# ----------------------------------------------------------------------------------------------------
# Dense divergences vs references
# ----------------------------------------------------------------------------------------------------


@configs()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_matches_float64_reference(kind, kw, dtype):
    zs, zt = rand_logits(3, 4, 11, seed=1, dtype=dtype), rand_logits(3, 4, 11, seed=2, dtype=dtype)
    out = token_divergence(zs, zt, kind, **kw)
    assert out.shape == (3, 4) and out.dtype == dtype
    expected = ref_divergence(np_softmax(np64(zt)), np_softmax(np64(zs)), kind, **kw)
    assert (expected > 1e-2).all()  # the inputs are far enough apart to be a real test
    assert_np_close(out, expected, **tol(dtype))


def test_low_precision_inputs_are_computed_in_fp32():
    zs, zt = rand_logits(4, 9, seed=3).bfloat16(), rand_logits(4, 9, seed=4).bfloat16()
    out = token_divergence(zs, zt, "forward_kl")
    assert out.dtype == torch.float32
    assert_np_close(out, ref_divergence(np_softmax(np64(zt)), np_softmax(np64(zs)), "forward_kl"), 2e-5, 2e-6)


def test_forward_kl_equals_F_kl_div():
    zs, zt = rand_logits(2, 5, 13, seed=5), rand_logits(2, 5, 13, seed=6)
    log_q, log_p = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    expected = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(token_divergence(zs, zt, "forward_kl"), expected, rtol=1e-12, atol=1e-14)
    # The log-prob entry point agrees too.
    torch.testing.assert_close(divergence_from_logprobs(log_q, log_p, "forward_kl"), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_two_token_hand_computed_example(dtype):
    # V = 2. Teacher logits (0, 0)      -> p = (0.5, 0.5).
    #        Student logits (ln 4, 0)   -> q = (4/5, 1/5) = (0.8, 0.2).
    # forward KL(p||q) = 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2) = 0.5 ln(0.625 * 2.5) = 0.5 ln(1.5625)
    #                  = ln(1.25) = 0.22314355131420976
    # reverse KL(q||p) = 0.8 ln(0.8/0.5) + 0.2 ln(0.2/0.5) = 0.8 ln 1.6 + 0.2 ln 0.4
    #                  = 0.8 (3 ln2 - ln5) + 0.2 (ln2 - ln5) = 2.6 ln2 - ln5 = 0.19274475702175753
    # TVD              = 0.5 (|0.5 - 0.8| + |0.5 - 0.2|) = 0.3
    zs = torch.tensor([[math.log(4.0), 0.0]], dtype=dtype)
    zt = torch.tensor([[0.0, 0.0]], dtype=dtype)
    expected = {"forward_kl": 0.22314355131420976, "reverse_kl": 0.19274475702175753, "tvd": 0.3}
    for kind, value in expected.items():
        out = token_divergence(zs, zt, kind)
        torch.testing.assert_close(out, torch.tensor([value], dtype=dtype), **tol(dtype), msg=kind)


# ----------------------------------------------------------------------------------------------------
# Invariants
# ----------------------------------------------------------------------------------------------------


@configs()
def test_zero_for_identical_inputs(kind, kw):
    z = rand_logits(3, 5, 9, seed=7, scale=3.0)
    zero = torch.zeros(3, 5, dtype=torch.float64)
    torch.testing.assert_close(token_divergence(z, z, kind, **kw), zero, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        token_divergence(z.float(), z.float(), kind, **kw), zero.float(), rtol=0, atol=1e-6
    )
    # Sparse: every id, top-k with tail, renormalized top-k.
    p = torch.softmax(z, -1)
    full = SparseTarget(torch.arange(9).expand(3, 5, 9), p, torch.zeros(3, 5, dtype=torch.float64))
    for target in (full, topk_target(z, 4, True), topk_target(z, 4, False)):
        torch.testing.assert_close(token_divergence(z, target, kind, **kw), zero, rtol=0, atol=1e-12)


@configs()
def test_nonnegative_on_random_inputs(kind, kw):
    zs, zt = rand_logits(64, 10, seed=8, scale=4.0), rand_logits(64, 10, seed=9, scale=4.0)
    for dtype in (torch.float32, torch.float64):
        assert (token_divergence(zs.to(dtype), zt.to(dtype), kind, **kw) >= 0).all()
    for target in (topk_target(zt, 3, True), topk_target(zt, 3, False)):
        assert (token_divergence(zs, target, kind, **kw) >= 0).all()


@pytest.mark.parametrize("num_tokens", [0, 0.0, torch.tensor(0)], ids=["int", "float", "tensor"])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_reduce_loss_all_masked_is_zero_with_zero_grad(num_tokens, kind):
    zs = rand_logits(2, 3, 7, seed=10).float().requires_grad_(True)
    zt = rand_logits(2, 3, 7, seed=11).float()
    labels = torch.full((2, 3), IGNORE_INDEX)
    mask = supervised_mask(labels)
    assert not mask.any()
    out = kd_loss_per_token(zs, labels, zt, LossSpec(kind, alpha=0.5, temperature=2.0))
    loss = reduce_loss(out["loss"], mask, num_tokens)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(zs.grad, torch.zeros_like(zs))


# ----------------------------------------------------------------------------------------------------
# JSD: continuity in beta and the scale
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_jsd_is_continuous_at_both_ends(dtype):
    zs, zt = rand_logits(4, 6, 12, seed=12, scale=1.0), rand_logits(4, 6, 12, seed=13, scale=1.0)
    p, q = np_softmax(np64(zt)), np_softmax(np64(zs))
    fwd, rev = np_kl(p, q), np_kl(q, p)
    # First-order expansion of the scaled JSD (worked out from the definition, r = p / q):
    #   KL(q||M) / beta = beta chi2(p||q) / 2 + O(beta^2),  KL(p||M) / (1-beta) = KL + beta (KL - chi2) + O(beta^2)
    #   => JSD(beta) = KL(p||q) + beta [KL(p||q) - chi2(p||q) / 2] + O(beta^2), and symmetrically at beta -> 1.
    slope0 = fwd - 0.5 * ((p * p / q).sum(-1) - 1.0)
    slope1 = rev - 0.5 * ((q * q / p).sum(-1) - 1.0)
    zs, zt = zs.to(dtype), zt.to(dtype)
    # The end points are the limits.
    assert_np_close(token_divergence(zs, zt, "jsd", beta=0.0), fwd, **tol(dtype))
    assert_np_close(token_divergence(zs, zt, "jsd", beta=1.0), rev, **tol(dtype))
    atol = 1e-12 if dtype == torch.float64 else 3e-5
    for eps in (1e-3, 1e-5):
        near0 = np64(token_divergence(zs, zt, "jsd", beta=eps))
        near1 = np64(token_divergence(zs, zt, "jsd", beta=1.0 - eps))
        # Within O(beta) of the end point value (the unscaled JSD would be ~beta * KL, far away)...
        assert (np.abs(near0 - fwd) <= 1.1 * eps * np.abs(slope0) + atol).all()
        assert (np.abs(near1 - rev) <= 1.1 * eps * np.abs(slope1) + atol).all()
        # ...and accurate (fp32 included) right next to the ends.
        ref_tol = {"rtol": 1e-8, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
        np.testing.assert_allclose(near0, ref_divergence(p, q, "jsd", beta=eps), **ref_tol)
        np.testing.assert_allclose(near1, ref_divergence(p, q, "jsd", beta=1.0 - eps), **ref_tol)
        if dtype == torch.float64:  # the approach has the right slope
            np.testing.assert_allclose((near0 - fwd) / eps, slope0, rtol=100 * eps)
            np.testing.assert_allclose((near1 - rev) / eps, slope1, rtol=100 * eps)


def test_jsd_at_half_is_four_times_textbook_jsd():
    zs, zt = rand_logits(3, 7, 10, seed=14), rand_logits(3, 7, 10, seed=15)
    log_q, log_p = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    log_m = torch.log(0.5 * log_p.exp() + 0.5 * log_q.exp())
    # F.kl_div(input=log M, target=log a) = sum a (log a - log M) = KL(a || M)
    kl_p_m = F.kl_div(log_m, log_p, log_target=True, reduction="none").sum(-1)
    kl_q_m = F.kl_div(log_m, log_q, log_target=True, reduction="none").sum(-1)
    textbook = 0.5 * kl_p_m + 0.5 * kl_q_m
    assert (textbook <= math.log(2) + 1e-12).all()  # sanity: the textbook JSD is bounded by ln 2
    torch.testing.assert_close(
        token_divergence(zs, zt, "jsd", beta=0.5), 4 * textbook, rtol=1e-10, atol=1e-12
    )


# ----------------------------------------------------------------------------------------------------
# Sparse targets
# ----------------------------------------------------------------------------------------------------


@configs()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_all_ids_equals_dense(kind, kw, dtype):
    V = 9
    zs, zt = rand_logits(2, 4, V, seed=16, dtype=dtype), rand_logits(2, 4, V, seed=17, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(V, generator=g) for _ in range(8)]).reshape(2, 4, V)  # any order
    target = SparseTarget(ids, torch.softmax(zt, -1).gather(-1, ids), torch.zeros(2, 4, dtype=dtype))
    dense = token_divergence(zs, zt, kind, **kw)
    t = tol(dtype)
    torch.testing.assert_close(token_divergence(zs, target, kind, **kw), dense, **t)
    torch.testing.assert_close(
        grad_of(lambda x: token_divergence(x, target, kind, **kw), zs),
        grad_of(lambda x: token_divergence(x, zt, kind, **kw), zs),
        rtol=t["rtol"] * 10,
        atol=t["atol"] * 10,
    )


@configs()
def test_sparse_topk_renormalized_matches_reference(kind, kw):
    zs, zt = rand_logits(3, 5, 12, seed=18), rand_logits(3, 5, 12, seed=19)
    target = topk_target(zt, 4, with_tail=False)
    ids = target.ids.numpy()
    p = np.take_along_axis(np_softmax(np64(zt)), ids, -1)
    q = np.take_along_axis(np_softmax(np64(zs)), ids, -1)
    expected = ref_divergence(p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True), kind, **kw)
    assert_np_close(token_divergence(zs, target, kind, **kw), expected, rtol=1e-10, atol=1e-12)
    # The stored probabilities need not be normalized; scaling them changes nothing.
    scaled = SparseTarget(target.ids, 0.37 * target.probs, None)
    assert_np_close(token_divergence(zs, scaled, kind, **kw), expected, rtol=1e-10, atol=1e-12)


@configs()
def test_sparse_topk_with_tail_matches_k_plus_one_reference(kind, kw):
    zs, zt = rand_logits(3, 5, 12, seed=20), rand_logits(3, 5, 12, seed=21)
    target = topk_target(zt, 4, with_tail=True)
    ids = target.ids.numpy()
    p = np.take_along_axis(np_softmax(np64(zt)), ids, -1)
    q = np.take_along_axis(np_softmax(np64(zs)), ids, -1)
    p_k1 = np.concatenate([p, np64(target.tail)[..., None]], -1)
    q_k1 = np.concatenate([q, 1.0 - q.sum(-1, keepdims=True)], -1)  # student tail = 1 - sum q[ids]
    expected = ref_divergence(p_k1, q_k1, kind, **kw)
    assert_np_close(token_divergence(zs, target, kind, **kw), expected, rtol=1e-9, atol=1e-12)
    # fp32 student logits too.
    assert_np_close(token_divergence(zs.float(), target, kind, **kw), expected, rtol=2e-5, atol=2e-6)


def _pad(target: SparseTarget, seed: int) -> SparseTarget:
    """Add zero-probability entries (duplicates of kept ids, id 0 twice, random ids) and shuffle."""
    g = torch.Generator().manual_seed(seed)
    lead = target.ids.shape[:-1]
    pad_ids = torch.cat(
        [
            target.ids[..., :2],  # duplicates of real ids
            torch.zeros(*lead, 2, dtype=torch.long),  # the same id twice
            torch.randint(0, 12, (*lead, 2), generator=g),
        ],
        -1,
    )
    ids = torch.cat([target.ids, pad_ids], -1)
    probs = torch.cat([target.probs, torch.zeros(pad_ids.shape, dtype=target.probs.dtype)], -1)
    perm = torch.randperm(ids.shape[-1], generator=g)
    return SparseTarget(ids[..., perm], probs[..., perm], target.tail)


@configs()
@pytest.mark.parametrize("with_tail", [True, False], ids=["tail", "renormalized"])
def test_sparse_padding_is_ignored(kind, kw, with_tail):
    zs, zt = rand_logits(3, 4, 12, seed=22), rand_logits(3, 4, 12, seed=23)
    target = topk_target(zt, 4, with_tail)
    padded = _pad(target, seed=24)
    assert padded.ids.shape[-1] == 10 and (padded.probs == 0).sum() == 3 * 4 * 6
    torch.testing.assert_close(
        token_divergence(zs, padded, kind, **kw),
        token_divergence(zs, target, kind, **kw),
        rtol=1e-12,
        atol=1e-14,
    )
    torch.testing.assert_close(
        grad_of(lambda x: token_divergence(x, padded, kind, **kw), zs),
        grad_of(lambda x: token_divergence(x, target, kind, **kw), zs),
        rtol=1e-12,
        atol=1e-14,
    )


@configs()
def test_sparse_all_padding_position_gives_zero_and_finite_grad(kind, kw):
    zs = rand_logits(2, 6, seed=25)
    target = SparseTarget(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.float64), None)
    assert torch.equal(token_divergence(zs, target, kind, **kw), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(grad_of(lambda x: token_divergence(x, target, kind, **kw), zs), torch.zeros_like(zs))


def sampled_target(teacher_logits: torch.Tensor, n: int, k: int, generator: torch.Generator):
    """Draw n ids per position from softmax(teacher); return (SparseTarget with tail 0, dense counts)."""
    V = teacher_logits.shape[-1]
    p = torch.softmax(teacher_logits.double(), -1).reshape(-1, V)
    draws = torch.multinomial(p, n, replacement=True, generator=generator)  # (P, n)
    counts = F.one_hot(draws, V).sum(-2).to(torch.float64)  # (P, V)
    top_counts, ids = counts.topk(k, dim=-1)
    ids = torch.where(top_counts > 0, ids, torch.zeros_like(ids))  # padding: id 0, repeated
    lead = teacher_logits.shape[:-1]
    target = SparseTarget(
        ids.reshape(*lead, k), (top_counts / n).reshape(*lead, k), torch.zeros(lead, dtype=torch.float64)
    )
    return target, counts.reshape(*lead, V)


def test_sampled_target_forward_kl_and_gradient_are_exact():
    N, V = 10, 16
    zs, zt = rand_logits(3, 4, V, seed=26), rand_logits(3, 4, V, seed=27)
    target, counts = sampled_target(zt, N, N, torch.Generator().manual_seed(1))
    assert (target.probs == 0).any()  # some padding is present
    p_hat = counts / N
    # value: KL(p_hat || q) over the whole vocabulary
    expected = ref_divergence(np64(p_hat), np_softmax(np64(zs)), "forward_kl")
    assert_np_close(token_divergence(zs, target, "forward_kl"), expected, rtol=1e-10, atol=1e-12)
    # gradient: that of the sampled cross-entropy -sum (c / N) log q
    ce_grad = grad_of(lambda x: -(p_hat * torch.log_softmax(x, -1)).sum(-1), zs)
    torch.testing.assert_close(grad_of(lambda x: token_divergence(x, target, "forward_kl"), zs), ce_grad)
    # and the analytic form q - p_hat
    torch.testing.assert_close(ce_grad, torch.softmax(zs, -1) - p_hat)


@configs()
def test_sampled_target_every_divergence_matches_k_plus_one_reference(kind, kw):
    N, V = 10, 16
    zs, zt = rand_logits(3, 4, V, seed=28), rand_logits(3, 4, V, seed=29)
    target, _ = sampled_target(zt, N, N, torch.Generator().manual_seed(2))
    q = np_softmax(np64(zs))
    q_ids = np.take_along_axis(q, target.ids.numpy(), -1) * (np64(target.probs) > 0)
    p_k1 = np.concatenate([np64(target.probs), np.zeros((3, 4, 1))], -1)
    q_k1 = np.concatenate([q_ids, 1.0 - q_ids.sum(-1, keepdims=True)], -1)
    expected = ref_divergence(p_k1, q_k1, kind, **kw)
    out = token_divergence(zs, target, kind, **kw)
    assert not out.isnan().any()
    if (kind, kw) in FINITE_WITH_ZERO_TEACHER_MASS:
        assert np.isfinite(expected).all() and torch.isfinite(out).all()
    else:
        assert np.isposinf(expected).all()  # KL(q || p_hat) is infinite: q has mass where p_hat has none
    assert_np_close(out, expected, rtol=1e-10, atol=1e-12)
    # The loss spec's own claim (what the train recipe checks before training from sampled targets) agrees
    # with the reference: it once let jsd with beta = 1 through.
    assert LossSpec(kind, **kw).tolerates_zero_teacher_mass == bool(np.isfinite(expected).all())


def test_sampled_target_gradient_is_unbiased():
    V, N, M = 8, 8, 4000  # M independent draws of N samples each
    zt, zs = rand_logits(V, seed=30, scale=1.5), rand_logits(V, seed=31, scale=1.5)
    p, q = torch.softmax(zt, -1), torch.softmax(zs, -1)
    full_grad = q - p  # d KL(p || softmax(z)) / dz
    torch.testing.assert_close(grad_of(lambda x: token_divergence(x, zt, "forward_kl"), zs), full_grad)

    target, _ = sampled_target(zt.expand(M, V), N, N, torch.Generator().manual_seed(3))
    mean_grad = grad_of(lambda x: token_divergence(x.expand(M, V), target, "forward_kl").sum() / M, zs)
    # Per-component std of the mean is sqrt(p(1-p) / (N M)) <= 0.0028; the tolerance is > 5 sigma and the
    # generator is seeded, so this is deterministic. The signal is far above the tolerance.
    atol = 0.015
    assert full_grad.abs().max() > 10 * atol
    torch.testing.assert_close(mean_grad, full_grad, rtol=0, atol=atol)
    # A single draw is far from the mean (it is the average that is unbiased, not each draw).
    one_draw = grad_of(lambda x: token_divergence(x[None], target[:1], "forward_kl"), zs)
    assert (one_draw - full_grad).abs().max() > atol


# ----------------------------------------------------------------------------------------------------
# Temperature, T^2, alpha, cross-entropy
# ----------------------------------------------------------------------------------------------------


@configs()
@pytest.mark.parametrize("T", [0.5, 2.0, 4.0])
def test_temperature_applies_to_both_distributions(kind, kw, T):
    zs, zt = rand_logits(2, 3, 10, seed=32), rand_logits(2, 3, 10, seed=33)
    expected = ref_divergence(np_softmax(np64(zt) / T), np_softmax(np64(zs) / T), kind, **kw)
    assert_np_close(token_divergence(zs, zt, kind, temperature=T, **kw), expected, rtol=1e-10, atol=1e-12)
    # Sparse targets hold teacher probabilities already at T; the student is tempered.
    ids = torch.arange(10).expand(2, 3, 10)
    target = SparseTarget(ids, torch.softmax(zt / T, -1), torch.zeros(2, 3, dtype=torch.float64))
    assert_np_close(token_divergence(zs, target, kind, temperature=T, **kw), expected, rtol=1e-10, atol=1e-12)


def ref_ce(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    logp = np.log(np_softmax(np64(logits)))
    lab = labels.numpy()
    picked = np.take_along_axis(logp, np.where(lab == IGNORE_INDEX, 0, lab)[..., None], -1)[..., 0]
    return np.where(lab == IGNORE_INDEX, 0.0, -picked)


def make_batch(seed: int, B: int = 2, T: int = 5, V: int = 7):
    zs, zt = rand_logits(B, T, V, seed=seed), rand_logits(B, T, V, seed=seed + 1)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
    labels[0, :2] = IGNORE_INDEX
    labels[1, -1] = IGNORE_INDEX
    return zs, zt, labels


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("T", [0.5, 1.0, 3.0])
def test_t2_scale(kind, T):
    zs, zt, labels = make_batch(34)
    expected = ref_divergence(np_softmax(np64(zt) / T), np_softmax(np64(zs) / T), kind)
    on = kd_loss_per_token(zs, labels, zt, LossSpec(kind, temperature=T, t2_scale=True))
    off = kd_loss_per_token(zs, labels, zt, LossSpec(kind, temperature=T, t2_scale=False))
    assert_np_close(on["div"], expected, rtol=1e-10, atol=1e-12)
    assert_np_close(off["div"], expected, rtol=1e-10, atol=1e-12)
    assert_np_close(on["loss"], T**2 * expected, rtol=1e-10, atol=1e-12)
    assert_np_close(off["loss"], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.75])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_alpha_mixes_ce_and_scaled_divergence(alpha, T):
    zs, zt, labels = make_batch(36)
    d = ref_divergence(np_softmax(np64(zt) / T), np_softmax(np64(zs) / T), "forward_kl")
    ce = ref_ce(zs, labels)  # hard-label CE at T = 1
    out = kd_loss_per_token(zs, labels, zt, LossSpec("forward_kl", temperature=T, alpha=alpha))
    assert_np_close(out["loss"], alpha * ce + (1 - alpha) * T**2 * d, rtol=1e-10, atol=1e-12)
    assert_np_close(out["ce"], ce, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("with_tail", [True, False], ids=["tail", "renormalized"])
@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "reverse_kl"])
def test_alpha_mixing_with_a_sparse_target(kind, with_tail):
    """With a sparse target at T = 1 the CE comes from the same normalizer as the tail: it must still equal
    the plain hard-label CE, value and gradient."""
    zs, zt, labels = make_batch(37)
    target = topk_target(zt, 3, with_tail)
    spec = LossSpec(kind, alpha=0.4)
    zs = zs.clone().requires_grad_()
    out = kd_loss_per_token(zs, labels, target, spec)
    assert_np_close(out["ce"], ref_ce(zs, labels), rtol=1e-10, atol=1e-12)
    ref = 0.4 * F.cross_entropy(zs.reshape(-1, 7), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    ref = ref.reshape(labels.shape) + 0.6 * token_divergence(zs, target, kind)
    mask = labels != IGNORE_INDEX
    (g,) = torch.autograd.grad(out["loss"][mask].sum(), zs)
    (g_ref,) = torch.autograd.grad(ref[mask].sum(), zs)
    torch.testing.assert_close(out["loss"][mask], ref[mask], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_full_coverage_with_padded_duplicates_has_no_tail():
    """Every id is kept, and padding entries (probability 0) repeat some of them: the student's tail is
    empty (log 0), however the duplicates are ordered; the CE label, gathered beside the ids, is one too."""
    zs, zt, labels = make_batch(39)
    p = torch.softmax(zt, -1)
    pad = torch.zeros(*p.shape[:-1], 3, dtype=torch.long)  # id 0 again, three times, as padding
    target = SparseTarget(torch.cat([torch.arange(7).expand(*p.shape), pad], -1),
                          torch.cat([p, torch.zeros(*p.shape[:-1], 3, dtype=p.dtype)], -1), torch.zeros(p.shape[:-1]))
    for kw in ({}, {"labels": labels}):
        lq = sparse_logprobs(zs, target, **kw)[0]
        assert (lq[..., -1] == -math.inf).all()
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        out = kd_loss_per_token(zs, labels, target, LossSpec(kind, alpha=0.5))
        ref = kd_loss_per_token(zs, labels, zt, LossSpec(kind, alpha=0.5))
        mask = labels != IGNORE_INDEX
        torch.testing.assert_close(out["loss"][mask], ref["loss"][mask], rtol=1e-10, atol=1e-12)


def test_alpha_one_gives_ce_and_no_teacher_gives_ce():
    zs, zt, labels = make_batch(38)
    ce = ref_ce(zs, labels)
    out = kd_loss_per_token(zs, labels, zt, LossSpec("reverse_kl", temperature=2.0, alpha=1.0))
    assert torch.equal(out["loss"], out["ce"])
    assert_np_close(out["loss"], ce, rtol=1e-10, atol=1e-12)
    plain = kd_loss_per_token(zs, labels, None, LossSpec("jsd", temperature=2.0, alpha=0.3))
    assert set(plain) == {"loss", "ce"}
    assert torch.equal(plain["loss"], plain["ce"])
    assert_np_close(plain["loss"], ce, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_entropy_matches_F_cross_entropy_with_ignore_index(dtype):
    zs, _, labels = make_batch(40)
    zs = zs.to(dtype)
    out = cross_entropy_per_token(zs, labels)
    V = zs.shape[-1]
    expected = F.cross_entropy(zs.reshape(-1, V), labels.reshape(-1), ignore_index=-100, reduction="none")
    assert IGNORE_INDEX == -100
    torch.testing.assert_close(out, expected.reshape(labels.shape))
    assert (out[labels == IGNORE_INDEX] == 0).all() and (out[labels != IGNORE_INDEX] > 0).all()
    assert_np_close(out, ref_ce(zs, labels), **tol(dtype))


# ----------------------------------------------------------------------------------------------------
# Reduction
# ----------------------------------------------------------------------------------------------------


def test_reduce_loss_micro_batches_sum_to_full_batch_token_mean():
    g = torch.Generator().manual_seed(42)
    loss1 = torch.rand(2, 3, generator=g, dtype=torch.float64) + 1.0
    loss2 = torch.rand(2, 4, generator=g, dtype=torch.float64) * 0.1
    mask1 = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)  # 5 supervised tokens
    mask2 = torch.tensor([[0, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)  # 2 supervised tokens
    loss1[0, 2] = math.inf  # unsupervised positions may hold anything
    loss2[0, 0] = math.nan
    full_mean = torch.cat([loss1[mask1], loss2[mask2]]).mean()
    mean_of_means = 0.5 * (loss1[mask1].mean() + loss2[mask2].mean())
    assert (full_mean - mean_of_means).abs() > 0.1  # the data tells the two reductions apart
    for n in (7, 7.0, torch.tensor(7)):
        total = reduce_loss(loss1, mask1, n) + reduce_loss(loss2, mask2, n)
        torch.testing.assert_close(total, full_mean)
        torch.testing.assert_close(reduce_loss(loss1, mask1, n), loss1[mask1].sum() / 7)
    # Gradient: 1 / num_tokens on supervised positions, 0 elsewhere.
    x = loss2.clone().requires_grad_(True)
    reduce_loss(x, mask2, 7).backward()
    torch.testing.assert_close(x.grad, mask2.double() / 7)


# ----------------------------------------------------------------------------------------------------
# Gradients vs finite differences (float64)
# ----------------------------------------------------------------------------------------------------


@configs()
def test_gradcheck_dense(kind, kw):
    zs = rand_logits(2, 3, 5, seed=44).requires_grad_(True)
    zt = rand_logits(2, 3, 5, seed=45).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: token_divergence(a, b, kind, temperature=1.5, **kw), (zs, zt)
    )


@configs()
@pytest.mark.parametrize("with_tail", [True, False], ids=["tail", "renormalized"])
def test_gradcheck_sparse(kind, kw, with_tail):
    zs = rand_logits(2, 3, 12, seed=46).requires_grad_(True)
    target = _pad(topk_target(rand_logits(2, 3, 12, seed=47), 3, with_tail), seed=48)
    assert torch.autograd.gradcheck(lambda a: token_divergence(a, target, kind, temperature=0.7, **kw), (zs,))


@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"])
def test_gradcheck_sampled(kind):
    zs = rand_logits(2, 3, 12, seed=49).requires_grad_(True)
    target, _ = sampled_target(rand_logits(2, 3, 12, seed=50), 6, 6, torch.Generator().manual_seed(4))
    assert torch.autograd.gradcheck(lambda a: token_divergence(a, target, kind), (zs,))


# ----------------------------------------------------------------------------------------------------
# Extreme logits
# ----------------------------------------------------------------------------------------------------


def _assert_finite_value_and_grads(fn, *inputs):
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*inputs)
    assert torch.isfinite(out).all(), out
    grads = torch.autograd.grad(out.sum(), inputs)
    for g in grads:
        assert torch.isfinite(g).all(), g


def _extreme(dtype):
    g = torch.Generator().manual_seed(51)
    zs = 80.0 * torch.sign(torch.randn(4, 3, 10, generator=g))  # +-80
    zt = torch.full((4, 3, 10), -80.0)
    hot = torch.randint(0, 10, (4, 3, 1), generator=g)
    zt.scatter_(-1, hot, 80.0)  # one-hot-ish teacher
    zs[0] = zt[0]  # and a position where the student agrees with it
    return zs.to(dtype), zt.to(dtype), hot


@configs()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_dense(kind, kw, dtype):
    zs, zt, _ = _extreme(dtype)
    for T in (1.0, 0.5):
        _assert_finite_value_and_grads(
            lambda a, b, T=T: token_divergence(a, b, kind, temperature=T, **kw), zs, zt
        )
    # The huge values are right, too (float64 reference).
    expected = ref_divergence(np_softmax(np64(zt)), np_softmax(np64(zs)), kind, **kw)
    assert_np_close(token_divergence(zs, zt, kind, **kw), expected, rtol=1e-5, atol=1e-5)


@configs()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_sparse(kind, kw, dtype):
    zs, _, hot = _extreme(dtype)
    other = (hot + 1) % 10
    ids = torch.cat([hot, other, hot], -1)  # last entry is a padded duplicate
    probs = torch.tensor([1 - 2e-6, 1e-6, 0.0], dtype=dtype).expand(4, 3, 3)
    for tail in (torch.full((4, 3), 1e-6, dtype=dtype), None):
        target = SparseTarget(ids, probs, tail)
        _assert_finite_value_and_grads(lambda a, t=target: token_divergence(a, t, kind, **kw), zs)
    if (kind, kw) in FINITE_WITH_ZERO_TEACHER_MASS:  # sampled: every sample hit the same id, tail 0
        target = SparseTarget(hot, torch.ones(4, 3, 1, dtype=dtype), torch.zeros(4, 3, dtype=dtype))
        _assert_finite_value_and_grads(lambda a: token_divergence(a, target, kind, **kw), zs)


# Masking padded vocabulary rows with -inf in both models (docs/methods.md section 7) must not poison gradients.
@pytest.mark.parametrize(("kind", "kw"), CONFIGS, ids=CONFIG_IDS)
def test_minus_inf_masked_vocabulary(kind, kw):
    zs, zt = rand_logits(3, 8, seed=52), rand_logits(3, 8, seed=53)
    zs[:, -2:] = -math.inf
    zt[:, -2:] = -math.inf
    expected = ref_divergence(np_softmax(np64(zt[:, :-2])), np_softmax(np64(zs[:, :-2])), kind, **kw)
    assert_np_close(token_divergence(zs, zt, kind, **kw), expected, rtol=1e-10, atol=1e-12)
    _assert_finite_value_and_grads(lambda a, b: token_divergence(a, b, kind, **kw), zs, zt)


# ----------------------------------------------------------------------------------------------------
# Invalid arguments
# ----------------------------------------------------------------------------------------------------


def test_unknown_divergence_raises():
    zs, zt, labels = make_batch(54)
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        token_divergence(zs, zt, "kl")
    with pytest.raises(ValueError, match="unknown divergence"):
        token_divergence(zs, topk_target(zt, 3, True), "fkl")
    with pytest.raises(ValueError, match="unknown divergence"):
        kd_loss_per_token(zs, labels, zt, LossSpec("mse"))


@pytest.mark.parametrize("beta", [-0.1, 1.1, float("nan")])
def test_beta_out_of_range_raises(beta):
    zs, zt, labels = make_batch(56)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        token_divergence(zs, zt, "jsd", beta=beta)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        kd_loss_per_token(zs, labels, topk_target(zt, 3, False), LossSpec("jsd", beta=beta))


@pytest.mark.parametrize("kind", ["skew_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("skew", [-0.1, 1.0])
def test_skew_out_of_range_raises(kind, skew):
    zs, zt, _ = make_batch(58)
    with pytest.raises(ValueError, match=r"skew must be in \[0, 1\)"):
        token_divergence(zs, zt, kind, skew=skew)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_nonpositive_temperature_raises(temperature):
    zs, zt, labels = make_batch(60)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_divergence(zs, zt, "forward_kl", temperature=temperature)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kd_loss_per_token(zs, labels, topk_target(zt, 3, True), LossSpec(temperature=temperature))


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_out_of_range_raises(alpha):
    zs, zt, labels = make_batch(62)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        kd_loss_per_token(zs, labels, zt, LossSpec(alpha=alpha))


@pytest.mark.parametrize("teacher_shape", [(2, 5, 8), (2, 4, 7), (5, 7)])
def test_mismatched_dense_shapes_raise(teacher_shape):
    zs, _, labels = make_batch(64)  # (2, 5, 7)
    zt = torch.zeros(teacher_shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"teacher logits .* and student logits .* differ"):
        token_divergence(zs, zt, "forward_kl")
    with pytest.raises(ValueError, match="differ"):
        kd_loss_per_token(zs, labels, zt)


@pytest.mark.parametrize("with_tail", [True, False], ids=["tail", "renormalized"])
def test_mismatched_sparse_positions_raise(with_tail):
    zs, zt, _ = make_batch(66)  # (2, 5, 7)
    target = topk_target(zt[:, :3], 3, with_tail)  # positions (2, 3) != (2, 5)
    with pytest.raises(ValueError, match="differ"):
        token_divergence(zs, target, "forward_kl")


@pytest.mark.parametrize(("dtype", "gap"), [(torch.float32, 120.0), (torch.float32, 30.0), (torch.float32, 14.0),
                                           (torch.float64, 800.0)])
@pytest.mark.parametrize(("kind", "kw"), [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.5})])
def test_sparse_tail_far_below_the_kept_ids_stays_exact(dtype, gap, kind, kw):
    """A tail whose exp underflows next to the row maximum (fp32: e^-120; fp64: e^-800), or is far below it
    without underflowing (fp32: e^-30, e^-14: a student all but sure of the kept ids), keeps its exact
    log-mass and gradient; compared with logsumexp over the tail ids in float64. (A gradient formed as the
    members' share of the total minus their share of the tail loses ~1e-7 / tail of its value in fp32.)"""
    z, target, reference = far_tail_problem(gap, dtype)

    zs = z.to(dtype).requires_grad_()
    div = token_divergence(zs, target, kind, **kw)
    (grad,) = torch.autograd.grad(div.sum(), zs)

    zr = z.clone().requires_grad_()
    ref = divergence_from_logprobs(*reference(zr), kind, **kw)
    (ref_grad,) = torch.autograd.grad(ref.sum(), zr)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    assert torch.isfinite(div).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(div.double(), ref, **tol)
    torch.testing.assert_close(grad.double(), ref_grad, **tol)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda a: token_divergence(a, target, kind, **kw), (z.clone().requires_grad_(),))


@pytest.mark.parametrize("baseline", [0.0, 1.5, -0.7])
@pytest.mark.parametrize(("alpha", "T"), [(0.0, 1.0), (0.3, 2.0)])
def test_sampled_reverse_kl_value_and_gradient_match_reference(baseline, alpha, T):
    """Per position with label x: loss = (1 - alpha) T^2 (f - b) log q_T(x) + alpha CE(x), f = log q_T(x) -
    log p_T(x) held constant; div = f. Gradient w.r.t. the student logits: (1 - alpha) T (f - b) (e_x - q_T)
    + alpha (q_1 - e_x), q_1 the student's distribution at T = 1 (the CE's)."""
    g = torch.Generator().manual_seed(3)
    zs = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    zt = 2.0 * torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, 0] = labels[1, 3] = IGNORE_INDEX
    z = zs.clone().requires_grad_()
    out = kd_loss_per_token(z, labels, zt, LossSpec("sampled_reverse_kl", temperature=T, alpha=alpha, baseline=baseline))
    mask = labels != IGNORE_INDEX
    (grad,) = torch.autograd.grad(out["loss"][mask].sum(), z)
    zs_np, zt_np, lab = zs.numpy(), zt.numpy(), labels.clamp_min(0).numpy()
    q, p, q1 = np_softmax(zs_np / T), np_softmax(zt_np / T), np_softmax(zs_np)
    onehot = np.eye(7)[lab]
    pick = lambda a: (a * onehot).sum(-1)  # noqa: E731
    f = np.log(pick(q)) - np.log(pick(p))
    want = (1 - alpha) * T**2 * (f - baseline) * np.log(pick(q)) - alpha * np.log(pick(q1))
    want_grad = (1 - alpha) * T * (f - baseline)[..., None] * (onehot - q) + alpha * (q1 - onehot)
    want_grad = want_grad * mask.numpy()[..., None]
    np.testing.assert_allclose(out["loss"][mask].detach().numpy(), want[mask.numpy()], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["div"][mask].numpy(), f[mask.numpy()], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-9, atol=1e-12)
