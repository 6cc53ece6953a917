"""Cross-tokenizer losses (docs/methods.md §14) against references written out here in float64.

The reference builds each group's V + 1 class distributions in probability space, with the tail as one minus
the rest (the library works in log space with the tail from log1mexp), W as a dense matrix (tiny vocabularies
only), and sums the divergences class by class. With the same tokenizer on both sides every loss must equal
its same-tokenizer counterpart (``token_divergence``, or a sorted L1 written here).
"""

from __future__ import annotations

import math

import pytest
import torch

from distill.crosstok import build_projection
from distill.losses import (
    DIVERGENCES,
    AlignedGroups,
    DenseSignal,
    ExactMatches,
    LinearHead,
    LossSpec,
    Projection,
    SparseTarget,
    chunked_crosstok_loss,
    naive_crosstok_loss,
    token_divergence,
)
from distill.tokenizer import byte_tokenizer

KL_LIKE = ["forward_kl", "reverse_kl", "jeffreys", "tvd"]


def ref_kl(p: list[float], q: list[float]) -> float:
    return sum((a * math.log(a / b) if b > 0 else math.inf) for a, b in zip(p, q, strict=True) if a > 0)


def ref_divergence(p: list[float], q: list[float], kind: str) -> float:
    if kind == "forward_kl":
        return ref_kl(p, q)
    if kind == "reverse_kl":
        return ref_kl(q, p)
    if kind == "jeffreys":
        return 0.5 * ref_kl(p, q) + 0.5 * ref_kl(q, p)
    if kind == "tvd":
        return 0.5 * sum(abs(a - b) for a, b in zip(p, q, strict=True))
    raise AssertionError(kind)


def ref_sorted_l1(a: list[float], b: list[float]) -> float:
    n = max(len(a), len(b))
    a = sorted(a, reverse=True) + [0.0] * (n - len(a))
    b = sorted(b, reverse=True) + [0.0] * (n - len(b))
    return sum(abs(x - y) for x, y in zip(a, b, strict=True))


def ref_group_dists(logits: torch.Tensor, group: list[int], labels: list[int], num_groups: int, t: float):
    """Each group's first-row distribution and e^c, c the sum of its later labels' log-probabilities."""
    out = []
    for g in range(num_groups):
        rows = [r for r, k in enumerate(group) if k == g]
        probs = torch.softmax(logits[rows[0]].double() / t, -1).tolist()
        c = sum(float(torch.log_softmax(logits[r].double() / t, -1)[labels[r]]) for r in rows[1:])
        out.append((probs, math.exp(c)))
    return out


def ref_loss(method, zs, zt, groups: AlignedGroups, kind="forward_kl", t=1.0, w_dense=None, pairs=None):
    """pkl and gold's divergence: the first rows' probabilities of some tokens (pkl: those W reaches, the
    student's pushed through W; gold: the matched ones), renormalized on each side. ULD: the group's
    probabilities e^c · π and the tail 1 − e^c (gold's sorted L1: the unmatched tokens' e^c · π)."""
    s = ref_group_dists(zs, groups.student_group.tolist(), groups.student_labels.tolist(), groups.num_groups, t)
    te = ref_group_dists(zt, groups.teacher_group.tolist(), groups.teacher_labels.tolist(), groups.num_groups, t)

    def norm(xs):
        return [x / sum(xs) for x in xs]

    out = []
    for (qs, es), (pt, et) in zip(s, te, strict=True):
        if method == "uld":
            out.append(ref_sorted_l1([es * x for x in qs] + [1 - es], [et * x for x in pt] + [1 - et]))
        elif method == "pkl":
            support = [j for j in range(len(pt)) if any(w_dense[i][j] > 0 for i in range(len(qs)))]
            q = norm([sum(qs[i] * w_dense[i][j] for i in range(len(qs))) for j in support])
            p = norm([pt[j] for j in support])
            out.append(ref_divergence(p, q, kind))
        else:  # gold
            s_m, t_m = [i for i, _ in pairs], [j for _, j in pairs]
            q = norm([qs[i] for i in s_m])
            p = norm([pt[j] for j in t_m])
            s_rest = [es * qs[i] for i in range(len(qs)) if i not in s_m]
            t_rest = [et * pt[j] for j in range(len(pt)) if j not in t_m]
            out.append(ref_divergence(p, q, kind) + ref_sorted_l1(s_rest, t_rest))
    return torch.tensor(out, dtype=torch.float64)


def same_tokenizer_case(n=9, vocab=263, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    zs = (2 * torch.randn(n, vocab, generator=g)).to(dtype)
    zt = (2 * torch.randn(n, vocab, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=g)
    rows = torch.arange(n)
    return zs, zt, AlignedGroups(rows, labels, rows, labels.clone(), n)


@pytest.fixture(scope="module")
def byte_identity():
    tok = byte_tokenizer()
    projection, matches = build_projection(tok, tok)  # built from the tokenizers, not Projection.identity
    return Projection(projection.ids, projection.weights.double(), projection.num_teacher), matches


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_same_tokenizer_equals_token_divergence(byte_identity, kind, temperature):
    projection, matches = byte_identity
    zs, zt, groups = same_tokenizer_case()
    spec = LossSpec(divergence=kind, temperature=temperature, beta=0.3, skew=0.2)
    want = token_divergence(zs, zt, kind, temperature=temperature, beta=0.3, skew=0.2)
    pkl = naive_crosstok_loss(zs, zt, groups, "pkl", spec, projection=projection)
    gold = naive_crosstok_loss(zs, zt, groups, "gold", spec, matches=matches)
    torch.testing.assert_close(pkl, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gold, want, rtol=1e-12, atol=1e-12)


def test_same_tokenizer_uld_is_sorted_l1():
    zs, zt, groups = same_tokenizer_case()
    want = [ref_sorted_l1(torch.softmax(a, -1).tolist(), torch.softmax(b, -1).tolist()) for a, b in zip(zs, zt, strict=True)]
    got = naive_crosstok_loss(zs, zt, groups, "uld")
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_same_tokenizer_fp32_gradients_match(byte_identity):
    projection, matches = byte_identity
    zs, zt, groups = same_tokenizer_case(dtype=torch.float32)
    projection = Projection(projection.ids, projection.weights.float(), projection.num_teacher)
    for method, kwargs in (("pkl", {"projection": projection}), ("gold", {"matches": matches})):
        a = zs.clone().requires_grad_()
        naive_crosstok_loss(a, zt, groups, method, **kwargs).sum().backward()
        b = zs.clone().requires_grad_()
        token_divergence(b, zt, "forward_kl").sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_perturbed_projection_or_matches_change_the_loss(byte_identity):
    projection, matches = byte_identity
    zs, zt, groups = same_tokenizer_case()
    want = token_divergence(zs, zt, "forward_kl")
    ids = projection.ids.clone()
    ids[[97, 98], 0] = ids[[98, 97], 0]  # 'a' <-> 'b'
    weights = projection.weights.clone()
    weights[120, 0], weights[120, 1], ids[120, 1] = 0.7, 0.3, 121  # 'x' -> 0.7 'x' + 0.3 'y'
    for w in (Projection(ids, projection.weights, 263), Projection(projection.ids.clone(), weights, 263)):
        got = naive_crosstok_loss(zs, zt, groups, "pkl", projection=w)
        assert float((got - want).abs().max()) > 1e-3
    swapped = ExactMatches(matches.student_ids.clone(), matches.teacher_ids.clone())
    swapped.teacher_ids[[97, 98]] = swapped.teacher_ids[[98, 97]]
    assert float((naive_crosstok_loss(zs, zt, groups, "gold", matches=swapped) - want).abs().max()) > 1e-3
    fewer = ExactMatches(matches.student_ids[:-20], matches.teacher_ids[:-20])  # some go to the ULD part
    assert float((naive_crosstok_loss(zs, zt, groups, "gold", matches=fewer) - want).abs().max()) > 1e-3


def cross_case(seed=0, dtype=torch.float64):
    """V_s = 6, V_t = 5; student rows 0..6, teacher rows 0..4; groups: s{0} t{0}, s{1,2} t{1}, s{3} t{2,3},
    s{5,6} t{4}; student row 4 in no group (unsupervised)."""
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(7, 6, generator=g).to(dtype)
    zt = torch.randn(5, 5, generator=g).to(dtype)
    groups = AlignedGroups(torch.tensor([0, 1, 1, 2, -1, 3, 3]), torch.tensor([1, 2, 3, 4, -100, 0, 5]),
                           torch.tensor([0, 1, 2, 2, 3]), torch.tensor([0, 1, 2, 3, 4]), 4)
    w = torch.tensor([[1, 0, 0, 0, 0], [0, 0.6, 0.4, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0.9, 0.1],
                      [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=dtype)  # teacher token 4 only via a mix; 4, 5 map nowhere
    ids = torch.zeros(6, 2, dtype=torch.long)
    weights = torch.zeros(6, 2, dtype=dtype)
    for i in range(6):
        nz = w[i].nonzero().squeeze(1)
        ids[i, :len(nz)], weights[i, :len(nz)] = nz, w[i, nz]
    projection = Projection(ids, weights, 5)
    pairs = [(0, 0), (2, 2), (4, 1)]
    matches = ExactMatches(torch.tensor([i for i, _ in pairs]), torch.tensor([j for _, j in pairs]))
    return zs, zt, groups, projection, w.tolist(), matches, pairs


@pytest.mark.parametrize("kind", KL_LIKE)
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_groups_against_reference(kind, temperature):
    zs, zt, groups, projection, w_dense, matches, pairs = cross_case()
    spec = LossSpec(divergence=kind, temperature=temperature)
    for method in ("pkl", "gold", "uld"):
        got = naive_crosstok_loss(zs, zt, groups, method, spec, projection=projection, matches=matches)
        want = ref_loss(method, zs, zt, groups, kind, temperature, w_dense, pairs)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KL_LIKE)
def test_pkl_partial_support_against_reference(kind):
    """Teacher token 4 reached by no student token: both sides are renormalized over tokens 0-3."""
    zs, zt, groups, projection, w_dense, _, _ = cross_case(seed=2)
    ids, weights = projection.ids.clone(), projection.weights.clone()
    weights[3] = torch.tensor([1.0, 0.0], dtype=weights.dtype)  # row 3: token 3 alone
    w_dense[3] = [0.0, 0.0, 0.0, 1.0, 0.0]
    partial = Projection(ids, weights, 5)
    assert partial.support().tolist() == [True, True, True, True, False]
    got = naive_crosstok_loss(zs, zt, groups, "pkl", LossSpec(divergence=kind), projection=partial)
    want = ref_loss("pkl", zs, zt, groups, kind, 1.0, w_dense)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["pkl", "gold", "uld"])
def test_gradients_against_float64_reference(method):
    zs, zt, groups, projection, w_dense, matches, pairs = cross_case(seed=3)
    a = zs.float().requires_grad_()
    proj32 = Projection(projection.ids, projection.weights.float(), 5)
    naive_crosstok_loss(a, zt.float(), groups, method, projection=proj32, matches=matches).sum().backward()
    # the reference's gradient by central differences in float64 (the reference is plain Python floats)
    eps, want = 1e-6, torch.zeros_like(zs)
    for r in range(zs.shape[0]):
        for v in range(zs.shape[1]):
            hi, lo = zs.clone(), zs.clone()
            hi[r, v] += eps
            lo[r, v] -= eps
            f = [ref_loss(method, x, zt, groups, "forward_kl", 1.0, w_dense, pairs).sum() for x in (hi, lo)]
            want[r, v] = (f[0] - f[1]) / (2 * eps)
    assert float(want.abs().max()) > 0.01 and float(want[4].abs().max()) == 0.0  # row 4 is in no group
    torch.testing.assert_close(a.grad.double(), want, rtol=1e-4, atol=1e-5)
    b = zs.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: naive_crosstok_loss(x, zt, groups, method, projection=projection, matches=matches), (b,))


class CountingHead(LinearHead):
    """An output layer that records the most rows it formed logits for at once."""

    most_rows = 0

    def logits(self, hidden):
        type(self).most_rows = max(type(self).most_rows, hidden.shape[0])
        return super().logits(hidden)


@pytest.mark.parametrize("method", ["pkl", "gold", "uld"])
@pytest.mark.parametrize("chunk_groups", [1, 3, None])
def test_chunked_equals_naive(method, chunk_groups):
    zs, zt, groups, projection, _, matches, _ = cross_case(seed=5, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    h_s, w_s = torch.randn(7, 8, generator=g, requires_grad=True), torch.randn(6, 8, generator=g, requires_grad=True)
    h_t, w_t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    proj32 = Projection(projection.ids, projection.weights.float(), 5)
    spec = LossSpec(temperature=1.5)
    naive = naive_crosstok_loss(h_s @ w_s.T, h_t @ w_t.T, groups, method, spec, projection=proj32, matches=matches)
    grads = torch.autograd.grad(naive.sum(), (h_s, w_s))
    CountingHead.most_rows = 0
    chunked = chunked_crosstok_loss(h_s, CountingHead(w_s), DenseSignal(h_t, CountingHead(w_t)), groups, method, spec,
                                    projection=proj32, matches=matches, chunk_groups=chunk_groups)
    chunked_grads = torch.autograd.grad(chunked.sum(), (h_s, w_s))
    torch.testing.assert_close(chunked, naive, rtol=1e-5, atol=1e-6)
    for a, b in zip(chunked_grads, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # logits only for a chunk's rows: one group has at most 2 rows a side, groups 0-2 have 4 student and 4
    # teacher rows, all four groups 6 student rows (row 4 is in none)
    assert CountingHead.most_rows == {1: 2, 3: 4, None: 6}[chunk_groups]


def sparse_rows(zt: torch.Tensor, t: float, keep: list[list[int]]) -> SparseTarget:
    """A server's answer for the teacher rows ``zt``: the ids ``keep[r]`` of row r with their probabilities at
    T (the rest of the row unsent), padded to one width with probability 0 and id 0."""
    probs = torch.softmax(zt.double() / t, -1)
    width = max(len(k) for k in keep)
    ids = torch.zeros(zt.shape[0], width, dtype=torch.long)
    out = torch.zeros(zt.shape[0], width, dtype=zt.dtype)
    for r, k in enumerate(keep):
        ids[r, :len(k)], out[r, :len(k)] = torch.tensor(k), probs[r, k].to(zt.dtype)
    return SparseTarget(ids, out)


def ref_sparse_loss(method, zs, zt, groups, keep, kind="forward_kl", t=1.0, w_dense=None, pairs=None):
    """ref_loss with a teacher that sent only ids ``keep[r]`` of each row r, at their probabilities under the
    whole softmax: pkl and gold's divergence run over the teacher tokens it sent (each side renormalized over
    them; none: 0), ULD's vectors hold 0 where it sent nothing; a later row's label is always among what it
    sent (the realized token), so e^c is the dense one."""
    s = ref_group_dists(zs, groups.student_group.tolist(), groups.student_labels.tolist(), groups.num_groups, t)
    t_rows = groups.teacher_group.tolist()
    te = ref_group_dists(zt, t_rows, groups.teacher_labels.tolist(), groups.num_groups, t)

    def norm(xs):
        return [x / sum(xs) for x in xs]

    out = []
    for g, ((qs, es), (pt, et)) in enumerate(zip(s, te, strict=True)):
        sent = set(keep[t_rows.index(g)])
        pt = [x if j in sent else 0.0 for j, x in enumerate(pt)]
        if method == "uld":
            out.append(ref_sorted_l1([es * x for x in qs] + [1 - es], [et * x for x in pt] + [1 - et]))
        elif method == "pkl":
            support = [j for j in sent if any(w_dense[i][j] > 0 for i in range(len(qs)))]
            q = norm([sum(qs[i] * w_dense[i][j] for i in range(len(qs))) for j in support])
            out.append(ref_divergence(norm([pt[j] for j in support]), q, kind) if support else 0.0)
        else:  # gold
            kept = [(i, j) for i, j in pairs if j in sent]
            matched = ref_divergence(norm([pt[j] for _, j in kept]), norm([qs[i] for i, _ in kept]), kind) if kept else 0.0
            s_rest = [es * qs[i] for i in range(len(qs)) if all(i != a for a, _ in pairs)]
            t_rest = [et * pt[j] for j in range(len(pt)) if all(j != b for _, b in pairs)]
            out.append(matched + ref_sorted_l1(s_rest, t_rest))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kind", KL_LIKE)
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_sparse_teacher_with_every_id_equals_the_dense_one(kind, temperature):
    """A server that sends every id (top_k: all) at T gives the dense teacher's loss, for every method."""
    zs, zt, groups, projection, _, matches, _ = cross_case(seed=6)
    spec = LossSpec(divergence=kind, temperature=temperature)
    every = sparse_rows(zt, temperature, [list(range(5))] * 5)
    for method in ("pkl", "gold", "uld"):
        dense = naive_crosstok_loss(zs, zt, groups, method, spec, projection=projection, matches=matches)
        sparse = naive_crosstok_loss(zs, every, groups, method, spec, projection=projection, matches=matches)
        torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)


# Rows 0..4 of cross_case's teacher; group firsts are rows 0, 1, 2, 4. Row 3 (group 2's later row, label 3)
# sends its label. Row 1 sends none of the ids pkl's W reaches in a way that leaves group 1 something.
TOP2 = [[0, 3], [4, 1], [1, 4], [3, 2], [2, 0]]


@pytest.mark.parametrize("kind", KL_LIKE)
@pytest.mark.parametrize("method", ["pkl", "gold", "uld"])
def test_sparse_top_k_teacher_against_reference(kind, method):
    zs, zt, groups, projection, w_dense, matches, pairs = cross_case(seed=7)
    spec = LossSpec(divergence=kind, temperature=1.3)
    got = naive_crosstok_loss(zs, sparse_rows(zt, 1.3, TOP2), groups, method, spec, projection=projection,
                              matches=matches)
    want = ref_sparse_loss(method, zs, zt, groups, TOP2, kind, 1.3, w_dense, pairs)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    dense = naive_crosstok_loss(zs, zt, groups, method, spec, projection=projection, matches=matches)
    assert float((got - dense).abs().max()) > 1e-3  # what the server did not send changes the loss


def test_sparse_teacher_naming_nothing_compared_gives_zero_and_finite_gradients():
    """A group whose first teacher row sent none of the tokens the divergence runs over compares nothing."""
    zs, zt, groups, projection, _, matches, _ = cross_case(seed=8)
    keep = [[3], [1], [2], [3], [4]]  # row 0 (group 0's first) sends only token 3, which no exact match names
    target = sparse_rows(zt, 1.0, keep)
    a = zs.clone().requires_grad_()
    got = naive_crosstok_loss(a, target, groups, "gold", projection=projection, matches=matches)
    want = ref_sparse_loss("gold", zs, zt, groups, keep, pairs=[(0, 0), (2, 2), (4, 1)])
    torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)  # group 0: the sorted L1 alone
    got.sum().backward()
    assert torch.isfinite(a.grad).all()
    b = zs.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: naive_crosstok_loss(x, target, groups, "gold", projection=projection, matches=matches), (b,))


@pytest.mark.parametrize("method", ["pkl", "gold", "uld"])
def test_chunked_equals_naive_for_a_sparse_teacher(method):
    zs, zt, groups, projection, _, matches, _ = cross_case(seed=9, dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    h_s, w_s = torch.randn(7, 8, generator=g, requires_grad=True), torch.randn(6, 8, generator=g, requires_grad=True)
    proj32 = Projection(projection.ids, projection.weights.float(), 5)
    target = sparse_rows(zt, 1.5, TOP2)
    spec = LossSpec(temperature=1.5)
    naive = naive_crosstok_loss(h_s @ w_s.T, target, groups, method, spec, projection=proj32, matches=matches)
    grads = torch.autograd.grad(naive.sum(), (h_s, w_s))
    for chunk_groups in (1, 3, None):
        chunked = chunked_crosstok_loss(h_s, LinearHead(w_s), target, groups, method, spec, projection=proj32,
                                        matches=matches, chunk_groups=chunk_groups)
        torch.testing.assert_close(chunked, naive, rtol=1e-5, atol=1e-6)
        for a, b in zip(torch.autograd.grad(chunked.sum(), (h_s, w_s)), grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_refusals():
    zs, zt, groups, projection, _, matches, _ = cross_case()
    with pytest.raises(ValueError, match="needs the projection W"):
        naive_crosstok_loss(zs, zt, groups, "pkl")
    with pytest.raises(ValueError, match="exact vocabulary matches"):
        naive_crosstok_loss(zs, zt, groups, "gold")
    with pytest.raises(ValueError, match="build W from these two tokenizers"):
        naive_crosstok_loss(zs, zt, groups, "pkl", projection=Projection.identity(6))
    with pytest.raises(ValueError, match="choose one of pkl, gold, uld"):
        naive_crosstok_loss(zs, zt, groups, "kl")
    bad = AlignedGroups(torch.tensor([1, 0, 0, 2, -1, 3, 3]), groups.student_labels, groups.teacher_group,
                        groups.teacher_labels, 4)
    with pytest.raises(ValueError, match="student's rows must number the groups"):
        naive_crosstok_loss(zs, zt, bad, "uld")
