"""Held-out evaluation of a student: loss, perplexity, bits per byte, calibration, KL to the teacher,
agreement.

The sums are computed with the same memory-efficient loss path as training (no (tokens, V) logits),
with the same teacher object as training (live or cached: :mod:`distill.teacher` says what each can
estimate), over whichever batches a process is given; callers that shard across processes add the sums
up (a plain float64 tensor) before turning them into metrics.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch

from distill.chunked import LinearHead, chunked_kd_loss
from distill.losses import IGNORE_INDEX, LossSpec
from distill.models import final_hidden, flat_positions

SUM_KEYS = ("ce_sum", "kl_sum", "agree_sum", "correct_sum", "count", "teacher_entropy_sum", "teacher_p_top1_sum")
CALIBRATION_BINS = 15  # equal-width bins of top-1 confidence for the expected calibration error (ECE)


@torch.no_grad()
def eval_sums(model, head: LinearHead, batches: Iterable[dict], teacher=None,
              autocast: Callable = contextlib.nullcontext) -> torch.Tensor:
    """Summed statistics over ``batches`` as a float64 tensor: ``SUM_KEYS`` in order, then the
    (3, ``CALIBRATION_BINS``) calibration counts flattened (see :func:`distill.chunked.chunked_kd_loss`).

    ``teacher``: a :mod:`distill.teacher` teacher (or None); its signal is compared with the student's at
    the teacher's ``eval_temperature`` (1 for a live teacher, the capture temperature for a cache).
    ``autocast``: a context factory for the forward passes (the train recipe passes accelerate's).
    """
    was_training = model.training
    model.eval()
    spec = LossSpec("forward_kl", temperature=teacher.eval_temperature if teacher is not None else 1.0, alpha=1.0)
    sums = torch.zeros(len(SUM_KEYS) + 3 * CALIBRATION_BINS, dtype=torch.float64)
    for batch in batches:
        labels = batch["labels"][:, 1:].reshape(-1)
        with autocast():
            signal = teacher.signal(batch) if teacher is not None else None
            _, stats = chunked_kd_loss(flat_positions(final_hidden(model, batch)), head, labels, signal, 1, spec,
                                       calibration_bins=CALIBRATION_BINS)
        scalars = [stats[k].double().cpu() if k in stats else torch.zeros((), dtype=torch.float64) for k in SUM_KEYS]
        sums += torch.cat([torch.stack(scalars), stats["calibration"].cpu().reshape(-1)])
    model.train(was_training)
    return sums


def metrics_from_sums(sums: torch.Tensor, estimates: str | None = None, target_bytes: int | None = None) -> dict:
    """Turn summed statistics into metrics; ``target_bytes`` (UTF-8 bytes of the scored tokens) adds bpb.

    ``estimates``: the teacher's ``eval_estimates`` (None: no teacher). ``exact``, ``topk_tail`` and ``topk``
    give ``kl_to_teacher`` and ``top1_agreement``; ``sampled`` gives the unbiased ``ce_to_teacher`` and
    ``teacher_prob_of_top1`` instead (see :mod:`distill.teacher`).
    """
    s = dict(zip(SUM_KEYS, sums[: len(SUM_KEYS)].tolist(), strict=True))
    count = max(s["count"], 1.0)
    out = {
        "val_loss": s["ce_sum"] / count,
        "val_ppl": math.exp(min(s["ce_sum"] / count, 50.0)),
        "val_top1_accuracy": s["correct_sum"] / count,
        "val_tokens": int(s["count"]),
    }
    if sums.numel() > len(SUM_KEYS):
        out["val_ece"] = expected_calibration_error(sums[len(SUM_KEYS):].reshape(3, -1))
    if target_bytes:
        out["bits_per_byte"] = s["ce_sum"] / (target_bytes * math.log(2))
    if estimates == "sampled":
        out["ce_to_teacher"] = (s["kl_sum"] + s["teacher_entropy_sum"]) / count
        out["teacher_prob_of_top1"] = s["teacher_p_top1_sum"] / count
    elif estimates is not None:
        out["kl_to_teacher"] = s["kl_sum"] / count
        out["top1_agreement"] = s["agree_sum"] / count
    return out


def expected_calibration_error(calibration: torch.Tensor) -> float:
    """ECE = sum over bins of (positions in bin / all) * |accuracy in bin - mean confidence in bin|.

    ``calibration``: (3, B) rows of positions, summed top-1 confidence and correct top-1 predictions.
    """
    n, conf, hits = (calibration[i].double() for i in range(3))
    total = float(n.sum())
    if total == 0:
        return 0.0
    return float((hits - conf).abs().sum() / total)  # |acc_b - conf_b| * n_b = |hits_b - conf_b|


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's reversible byte <-> printable-character map, character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (0 for special tokens), for bits-per-byte.

    Byte-level BPE tokens are read through the byte alphabet (exact even for tokens that hold part of
    a multi-byte character); other tokenizers fall back to decoding each token on its own.
    """
    alphabet = _byte_level_alphabet()
    lengths = torch.zeros(len(tokenizer), dtype=torch.long)
    special = set(tokenizer.all_special_ids)
    for token, idx in tokenizer.get_vocab().items():
        if idx >= len(lengths) or idx in special or tokenizer.convert_ids_to_tokens(idx) != token:
            continue
        if token and all(c in alphabet for c in token):
            lengths[idx] = len(token)
        else:
            lengths[idx] = len(tokenizer.convert_tokens_to_string([token]).encode("utf-8"))
    return lengths


def target_bytes(examples: Iterable[dict], byte_lengths: torch.Tensor) -> int:
    """UTF-8 bytes of the supervised next-token targets of ``examples``."""
    total = 0
    for ex in examples:
        labels = torch.as_tensor(ex["labels"][1:], dtype=torch.long)
        labels = labels[labels != IGNORE_INDEX]
        total += int(byte_lengths[labels].sum())
    return total
