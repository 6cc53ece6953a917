"""Held-out evaluation of a student: loss, perplexity, bits per byte, calibration, KL to the teacher,
agreement.

The sums are computed with the same memory-efficient loss path as training (no (tokens, V) logits),
with the same teacher object as training (live or cached: :mod:`distill.teachers` says what each can
estimate), over whichever batches a process is given; callers that shard across processes add the sums
up (a plain float64 tensor) before turning them into metrics.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterable

import torch

from distill.generation.sampling import processed_logprobs, row_seed, sample
from distill.generation.speculative import speculative_sample
from distill.losses import IGNORE_INDEX, LinearHead, LossSpec, chunked_kd_loss
from distill.models import final_hidden, flat_positions

SUM_KEYS = ("ce_sum", "kl_sum", "agree_sum", "correct_sum", "count", "teacher_entropy_sum", "teacher_p_top1_sum",
            "kl_sq_sum")
CALIBRATION_BINS = 15  # equal-width bins of top-1 confidence for the expected calibration error (ECE)


@torch.no_grad()
def eval_sums(model, head: LinearHead, batches: Iterable[dict], teacher=None,
              autocast: Callable = contextlib.nullcontext, divergences: tuple[str, ...] = ()) -> torch.Tensor:
    """Summed statistics over ``batches`` as a float64 tensor: ``SUM_KEYS`` in order, the (3,
    ``CALIBRATION_BINS``) calibration counts flattened (see :func:`distill.losses.chunked.chunked_kd_loss`), then
    for each of ``divergences`` (other than forward KL: one more pass each) its sum and sum of squares.

    ``teacher``: a :mod:`distill.teachers` teacher (or None); its signal is compared with the student's at
    the teacher's ``eval_temperature`` (1 for a live teacher, the capture temperature for a cache).
    ``autocast``: a context factory for the forward passes (the training run passes accelerate's).
    """
    was_training = model.training
    model.eval()
    spec = LossSpec("forward_kl", temperature=teacher.eval_temperature if teacher is not None else 1.0, alpha=1.0)
    sums = torch.zeros(len(SUM_KEYS) + 3 * CALIBRATION_BINS + 2 * len(divergences), dtype=torch.float64)
    for batch in batches:
        labels = batch["labels"][:, 1:].reshape(-1)
        with autocast():
            signal = teacher.signal(batch) if teacher is not None else None
            hidden = flat_positions(final_hidden(model, batch))
            _, stats = chunked_kd_loss(hidden, head, labels, signal, 1, spec, calibration_bins=CALIBRATION_BINS)
            extra = []
            for d in divergences:
                _, more = chunked_kd_loss(hidden, head, labels, signal, 1,
                                          LossSpec(d, temperature=spec.temperature, alpha=1.0), log_kl=False,
                                          top1_stats=False)
                extra += [more["div_sum"].double().cpu(), more["div_sq_sum"].double().cpu()]
        scalars = [stats[k].double().cpu() if k in stats else torch.zeros((), dtype=torch.float64) for k in SUM_KEYS]
        sums += torch.cat([torch.stack(scalars), stats["calibration"].cpu().reshape(-1),
                           torch.stack(extra) if extra else torch.zeros(0, dtype=torch.float64)])
    model.train(was_training)
    return sums


def metrics_from_sums(sums: torch.Tensor, estimates: str | None = None, target_bytes: int | None = None,
                      divergences: tuple[str, ...] = ()) -> dict:
    """Turn summed statistics into metrics; ``target_bytes`` (UTF-8 bytes of the scored tokens) adds bpb.

    ``estimates``: the teacher's ``eval_estimates`` (None: no teacher). ``exact``, ``topk_tail`` and ``topk``
    give ``kl_to_teacher`` and ``top1_agreement``; ``sampled`` gives the unbiased ``ce_to_teacher`` and
    ``teacher_prob_of_top1`` instead (see :mod:`distill.teachers`).
    """
    s = dict(zip(SUM_KEYS, sums[: len(SUM_KEYS)].tolist(), strict=True))
    count = max(s["count"], 1.0)
    out = {
        "val_loss": s["ce_sum"] / count,
        "val_ppl": math.exp(min(s["ce_sum"] / count, 50.0)),
        "val_top1_accuracy": s["correct_sum"] / count,
        "val_tokens": int(s["count"]),
    }
    if sums.numel() >= len(SUM_KEYS) + 3 * CALIBRATION_BINS:
        out["val_ece"] = expected_calibration_error(sums[len(SUM_KEYS) : len(SUM_KEYS) + 3 * CALIBRATION_BINS].reshape(3, -1))
    if target_bytes:
        out["bits_per_byte"] = s["ce_sum"] / (target_bytes * math.log(2))
    if estimates == "sampled":
        out["ce_to_teacher"] = (s["kl_sum"] + s["teacher_entropy_sum"]) / count
        out["teacher_prob_of_top1"] = s["teacher_p_top1_sum"] / count
    elif estimates is not None:
        out["kl_to_teacher"] = s["kl_sum"] / count
        out["kl_to_teacher_std"] = _std(s["kl_sum"], s["kl_sq_sum"], count)
        out["top1_agreement"] = s["agree_sum"] / count
        base = len(SUM_KEYS) + 3 * CALIBRATION_BINS
        for i, d in enumerate(divergences):
            total, squares = sums[base + 2 * i].item(), sums[base + 2 * i + 1].item()
            out[f"{d}_to_teacher"] = total / count
            out[f"{d}_to_teacher_std"] = _std(total, squares, count)
    return out


def eval_batch_indices(total: int, max_batches: int | None) -> list[int]:
    """Which of ``total`` eval batches to run: all, or ``max_batches`` of them evenly spread over the split
    (so a capped eval is a sample of the whole split, not of its beginning)."""
    if not max_batches or max_batches >= total:
        return list(range(total))
    return [(j * total) // max_batches for j in range(max_batches)]


def _std(total: float, squares: float, count: float) -> float:
    """The standard deviation over positions from a sum and a sum of squares."""
    mean = total / count
    return math.sqrt(max(squares / count - mean * mean, 0.0))


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


# ------------------------------------------------------------------------------------------- speculative decoding


@torch.no_grad()
def acceptance_estimate(target, draft, sequences: dict, params) -> float:
    """The offline estimate of speculative decoding's acceptance rate: alpha-hat = the mean over the
    completion positions of sum_v min(p, q), with p and q the target's and the draft's sampling
    distributions (``params``: temperature, top-k, top-p; the argmax for greedy), from one teacher-forced
    pass of each model over ``sequences`` (a right-padded batch of the target's own samples:
    :meth:`distill.generation.sampling.Generation.to_batch`)."""
    positions = sequences["labels"][:, 1:] != IGNORE_INDEX  # the positions that predict a written token
    outs = []
    for model in (target, draft):
        logits = model(input_ids=sequences["input_ids"], attention_mask=sequences["attention_mask"]).logits[:, :-1]
        z = logits[positions].float()
        if params.greedy:
            outs.append(torch.nn.functional.one_hot(z.argmax(-1), z.shape[-1]).float())
        else:
            outs.append(processed_logprobs(z, params).exp())
    if not outs[0].numel():
        raise ValueError("acceptance_estimate: the sequences hold no written token")
    return float(torch.minimum(outs[0], outs[1]).sum(-1).mean())


def predicted_tokens_per_call(alpha: float, gamma: int) -> float:
    """(1 - alpha^(gamma + 1)) / (1 - alpha): the expected tokens one target call yields (Leviathan et al.)."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def measure_speculative(target, draft, prompts: list[list[int]], params, gammas: list[int], batch_sizes: list[int],
                        *, pad_id: int, seed: int = 0, reps: int = 3) -> dict:
    """Speculative decoding with ``draft`` for ``target``, measured: per gamma the acceptance rate, tokens per
    target call, and per batch size the wall-clock speed-up over the target decoding alone (the same prompts,
    settings and seeds; medians of ``reps``); beside them the offline prediction from alpha-hat on the
    target's own samples."""
    seeds = [row_seed(seed, "prompt", i) for i in range(len(prompts))]
    own = sample(target, prompts, params, pad_id=pad_id, seeds=None if params.greedy else seeds)
    alpha_hat = acceptance_estimate(target, draft, own.to_batch(pad_id), params)
    out: dict = {"alpha_hat": alpha_hat, "gammas": {}}
    for gamma in gammas:
        _, stats = speculative_sample(target, draft, prompts, params, gamma, pad_id=pad_id,
                                      seeds=None if params.greedy else seeds)
        rec = {**stats.to_json(), "predicted_tokens_per_target_call": predicted_tokens_per_call(alpha_hat, gamma),
               "speedup": {}}
        for bs in batch_sizes:
            chunk = prompts[:bs]
            chunk_seeds = None if params.greedy else seeds[:bs]
            plain, spec = [], []
            for _ in range(reps):
                t0 = time.perf_counter()
                ref = sample(target, chunk, params, pad_id=pad_id, seeds=chunk_seeds, model_logprobs=False)
                plain.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                got, _ = speculative_sample(target, draft, chunk, params, gamma, pad_id=pad_id, seeds=chunk_seeds)
                spec.append(time.perf_counter() - t0)
            tokens_plain = int(ref.completion_mask.sum())
            tokens_spec = int(got.completion_mask.sum())
            rec["speedup"][str(bs)] = {
                "target_tokens_per_s": tokens_plain / statistics.median(plain),
                "speculative_tokens_per_s": tokens_spec / statistics.median(spec),
            }
            rec["speedup"][str(bs)]["ratio"] = (rec["speedup"][str(bs)]["speculative_tokens_per_s"]
                                                / rec["speedup"][str(bs)]["target_tokens_per_s"])
        out["gammas"][str(gamma)] = rec
    return out
