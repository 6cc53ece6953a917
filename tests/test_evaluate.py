"""Calibration statistics of the chunked path and the expected calibration error (ECE)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.evaluation.metrics import (
    CALIBRATION_BINS,
    SUM_KEYS,
    expected_calibration_error,
    metrics_from_sums,
)
from distill.losses import IGNORE_INDEX, LinearHead, LossSpec, SparseTarget, chunked_kd_loss


def _reference_ece(logits: np.ndarray, labels: np.ndarray, bins: int) -> tuple[np.ndarray, float]:
    """Textbook ECE from materialized probabilities (numpy, float64)."""
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    conf, pred = p.max(-1), p.argmax(-1)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    table = np.zeros((3, bins))
    for b, c, hit in zip(which, conf, pred == labels, strict=True):
        table[:, b] += (1.0, c, float(hit))
    ece = sum(
        table[0, b] / len(conf) * abs(table[2, b] / table[0, b] - table[1, b] / table[0, b])
        for b in range(bins)
        if table[0, b] > 0
    )
    return table, ece


@pytest.mark.parametrize("chunk", [3, 7, 64])
def test_calibration_counts_match_materialized_probabilities(chunk):
    g = torch.Generator().manual_seed(0)
    n, h, v = 41, 8, 30
    hidden = torch.randn(n, h, generator=g) * 2
    weight = torch.randn(v, h, generator=g)
    labels = torch.randint(v, (n,), generator=g)
    labels[5:12] = IGNORE_INDEX
    _, stats = chunked_kd_loss(hidden, LinearHead(weight), labels, None, 1, chunk_size=chunk,
                               calibration_bins=CALIBRATION_BINS)
    keep = labels != IGNORE_INDEX
    table, ece = _reference_ece((hidden @ weight.T)[keep].double().numpy(), labels[keep].numpy(), CALIBRATION_BINS)
    np.testing.assert_allclose(stats["calibration"].numpy(), table, rtol=1e-6, atol=1e-6)
    assert stats["calibration"][0].sum() == keep.sum()
    assert expected_calibration_error(stats["calibration"]) == pytest.approx(ece, rel=1e-6)
    assert 0.0 < ece < 1.0


def test_ece_invariants():
    # Confident and always right, or exactly as often right as claimed: zero error.
    table = torch.zeros(3, 10, dtype=torch.float64)
    table[:, 9] = torch.tensor([50.0, 50.0, 50.0])
    assert expected_calibration_error(table) == 0.0
    table = torch.zeros(3, 10, dtype=torch.float64)
    table[:, 6] = torch.tensor([100.0, 65.0, 65.0])
    table[:, 2] = torch.tensor([100.0, 25.0, 25.0])
    assert expected_calibration_error(table) == pytest.approx(0.0)
    # Confident and always wrong: error equals the confidence.
    table = torch.zeros(3, 10, dtype=torch.float64)
    table[:, 9] = torch.tensor([10.0, 9.5, 0.0])
    assert expected_calibration_error(table) == pytest.approx(0.95)
    assert expected_calibration_error(torch.zeros(3, 10)) == 0.0


def test_metrics_report_ece_from_eval_sums_layout():
    sums = torch.zeros(len(SUM_KEYS) + 3 * CALIBRATION_BINS, dtype=torch.float64)
    sums[SUM_KEYS.index("ce_sum")] = 20.0
    sums[SUM_KEYS.index("count")] = 10.0
    calib = torch.zeros(3, CALIBRATION_BINS, dtype=torch.float64)
    calib[:, -1] = torch.tensor([10.0, 9.8, 5.0])  # claims 98%, right 50%
    sums[len(SUM_KEYS):] = calib.reshape(-1)
    out = metrics_from_sums(sums)
    assert out["val_loss"] == pytest.approx(2.0)
    assert out["val_ece"] == pytest.approx(0.48)
    assert "kl_to_teacher" not in out and "ce_to_teacher" not in out


def _sampled_targets(p: torch.Tensor, n: int, gen: torch.Generator) -> SparseTarget:
    """Rows of N draws with replacement from ``p`` (M, V), as distinct ids + counts / N (tail 0)."""
    draws = torch.multinomial(p, n, replacement=True, generator=gen)  # (M, N)
    v = p.shape[-1]
    counts = torch.zeros(p.shape, dtype=torch.float64).scatter_add_(-1, draws, torch.ones(draws.shape, dtype=torch.float64))
    ids = torch.arange(v).expand(p.shape[0], v).contiguous()
    return SparseTarget(ids, (counts / n).float(), torch.zeros(p.shape[0]))


def test_sampled_target_metrics_are_unbiased_and_the_kl_is_not():
    """From sampled targets the eval reports the cross-entropy H(p, q) and p(argmax q): their averages over
    many draws match the exact values of the full teacher; the plug-in KL(p_hat || q) does not (why it is
    not reported)."""
    g = torch.Generator().manual_seed(0)
    v, h, m, n = 12, 6, 4000, 8
    t_logits = torch.randn(1, v, generator=g, dtype=torch.float64) * 1.5
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    hidden = torch.randn(1, h, generator=g, dtype=torch.float64).expand(m, h)
    p = torch.softmax(t_logits, -1).expand(m, v)
    target = _sampled_targets(p.float(), n, g)
    _, stats = chunked_kd_loss(hidden, LinearHead(weight), torch.zeros(m, dtype=torch.long), target, 1,
                               LossSpec(alpha=1.0), calibration_bins=CALIBRATION_BINS)
    sums = torch.zeros(len(SUM_KEYS) + 3 * CALIBRATION_BINS, dtype=torch.float64)
    for i, key in enumerate(SUM_KEYS):
        sums[i] = stats[key].double()
    out = metrics_from_sums(sums, "sampled")

    p0 = torch.softmax(t_logits[0], -1).numpy()
    q0 = torch.softmax(hidden[0] @ weight.T, -1).numpy()
    cross_entropy = float(-(p0 * np.log(q0)).sum())
    kl = float((p0 * np.log(p0 / q0)).sum())
    # Standard error of a mean over 4000 draws: well under 0.01 nats here; tolerance 0.03, seeded.
    assert out["ce_to_teacher"] == pytest.approx(cross_entropy, abs=0.03)
    assert out["teacher_prob_of_top1"] == pytest.approx(float(p0[q0.argmax()]), abs=0.01)
    plug_in_kl = float(stats["kl_sum"]) / m
    assert plug_in_kl > kl + 0.2  # biased high: the draws' entropy H(p_hat) underestimates H(p)
    assert "kl_to_teacher" not in out and "top1_agreement" not in out
