"""Teachers: the one place in distill with several implementations.

A teacher is opened once from its config by :func:`open_teacher` (the only branch on the config's kind),
checks there that it fits the run, and then, for any batch, returns its **signal** for the batch's
next-token positions (``labels[:, 1:]``, flattened to ``B * (T - 1)`` rows):

* :class:`LiveTeacher` (``teacher: {path: DIR}`` or ``{config: ...}``): a Hugging Face model in this
  process. Dense signal: its final hidden states and output layer (:class:`distill.chunked.DenseSignal`);
  the loss forms the logits a chunk of rows at a time.
* :class:`CachedTeacher` (``teacher: {cache: DIR}``): targets captured by ``distill cache``. Sparse signal:
  ids + probabilities, with or without the tail mass (:class:`distill.losses.SparseTarget`).

Training and evaluation use the same object. What evaluation can say about the student's distance to the
teacher depends on the signal (:attr:`eval_estimates`):

* ``exact`` (live): ``kl_to_teacher`` = KL(p || q) over the vocabulary, ``top1_agreement``.
* ``topk_tail`` (top-k + tail cache): KL over the k kept ids + one tail class (by the data-processing
  inequality a lower bound of the full KL; exact when k = V) and ``top1_agreement`` (the teacher's top-1 is
  stored exactly).
* ``topk`` (renormalized top-k cache): KL between teacher and student renormalized over the k ids, and
  ``top1_agreement``.
* ``sampled`` (sampled cache, N draws ``x_i ~ p``, ``p_hat = counts / N``): the KL and the teacher's argmax
  cannot be estimated without bias from N draws. What can: ``ce_to_teacher`` = ``-sum p_hat log q``, an
  unbiased estimate of the cross-entropy H(p, q) = KL(p || q) + H(p) (H(p) does not depend on the student,
  so differences between students are differences in KL), and ``teacher_prob_of_top1`` = ``p_hat(argmax q)``,
  an unbiased estimate of p(argmax q), the chance that a teacher sample equals the student's top-1.

Adding a kind of teacher: a spec in ``config.py`` (a member of ``TeacherSpec``), a class here with the
same attributes and methods as these two, and its branch in :func:`open_teacher`. The train and eval
code only calls ``signal``, ``diagnose``, ``covers``, ``check_data`` and ``describe``.
"""

from __future__ import annotations

import logging

import torch

from distill.cache import TeacherCache, data_fingerprint
from distill.chunked import DenseSignal
from distill.config import ModelSpec, TeacherCacheSpec
from distill.losses import LossSpec, SparseTarget
from distill.models import (
    check_tokenizers_agree,
    count_parameters,
    final_hidden,
    flat_positions,
    load_model,
    load_tokenizer,
    max_positions,
    output_head,
    resolve_vocab,
)
from distill.tokenizer import tokenizer_fingerprint

logger = logging.getLogger("distill")


class LiveTeacher:
    """A causal LM run in this process under ``torch.no_grad``; dense signal."""

    kind = "live"
    eval_estimates = "exact"
    eval_temperature = 1.0
    scores_any_text = True  # can score batches that are not dataset examples (generated text)

    def __init__(self, model, vocab_size: int):
        self.model = model.eval().requires_grad_(False)
        self.head = output_head(model, vocab_size)

    @property
    def max_positions(self) -> int | None:
        return max_positions(self.model)

    def describe(self) -> str:
        return f"live model, {count_parameters(self.model) / 1e6:.2f}M parameters"

    def check_data(self, train_ds, eval_ds) -> None:
        """Nothing to check: a live teacher scores whatever it is given."""

    def covers(self, split: str) -> bool:
        return True

    @torch.no_grad()
    def signal(self, batch: dict) -> DenseSignal:
        return DenseSignal(flat_positions(final_hidden(self.model, batch)), self.head)

    @torch.no_grad()
    def diagnose(self, batch: dict) -> str | None:
        """A cause for a non-finite loss that lies with the teacher, or None."""
        if not torch.isfinite(final_hidden(self.model, batch)).all():
            return "the teacher's hidden states are non-finite (a broken teacher checkpoint or fp16 overflow)"
        return None


class CachedTeacher:
    """Targets from ``distill cache``, one :class:`~distill.cache.TeacherCache` per captured split; sparse
    signal. Batches must be dataset examples (``batch["index"]``, ``batch["split"]``): each example is
    checked against the hash the cache stored for it."""

    kind = "cache"
    max_positions = None
    scores_any_text = False

    def __init__(self, spec: TeacherCacheSpec, tokenizer, loss: LossSpec, seq_len: int, device):
        train = TeacherCache(spec.cache, "train", topk_tail=spec.topk_tail)
        self.path, self.device = train.path, device
        self.caches = {"train": train}
        if "eval" in train.manifest["splits"]:
            self.caches["eval"] = TeacherCache(spec.cache, "eval", topk_tail=spec.topk_tail)
        train.check_compatible(tokenizer_fingerprint(tokenizer), len(tokenizer), seq_len)
        if abs(train.temperature - loss.temperature) > 1e-9:
            raise ValueError(
                f"teacher.cache: the targets in {spec.cache} were captured at temperature {train.temperature}, but "
                f"loss.temperature={loss.temperature}; set loss.temperature={train.temperature} or rebuild the cache"
            )
        if train.mode == "sampled" and not loss.tolerates_zero_teacher_mass:
            setting = f"loss.divergence={loss.divergence}"
            if loss.divergence == "jsd":
                setting += f" with loss.beta={loss.beta:g}"
            elif loss.divergence == "skew_reverse_kl":
                setting += f" with loss.skew={loss.skew:g}"
            raise ValueError(
                f"{setting} is infinite on sampled targets (the teacher puts no mass outside the sampled ids, "
                "and this divergence contains KL(q || p)); use forward_kl, skew_kl, tvd, jsd with loss.beta < 1 "
                "or skew_reverse_kl with loss.skew > 0"
            )
        self.mode = train.mode
        self.eval_temperature = train.temperature
        self.eval_estimates = "sampled" if train.mode == "sampled" else ("topk_tail" if spec.topk_tail else "topk")

    def describe(self) -> str:
        split_note = "" if "eval" in self.caches else " (no eval split: eval reports no KL to the teacher)"
        return f"{self.mode} targets from {self.path}, eval metrics: {self.eval_estimates}{split_note}"

    def check_data(self, train_ds, eval_ds) -> None:
        """Refuse targets of other data before training on them; forget a cached eval split that the run
        does not have."""
        self.caches["train"].check_compatible(data_fingerprint=data_fingerprint(train_ds), num_examples=len(train_ds))
        if "eval" in self.caches:
            if eval_ds is None:
                del self.caches["eval"]
            else:
                self.caches["eval"].check_compatible(data_fingerprint=data_fingerprint(eval_ds),
                                                     num_examples=len(eval_ds))

    def covers(self, split: str) -> bool:
        return split in self.caches

    def signal(self, batch: dict) -> SparseTarget:
        if "index" not in batch:
            raise ValueError(
                "a cached teacher can only score the dataset examples it was captured on; these batches are "
                "not dataset examples (use a live teacher for generated batches)"
            )
        cache = self.caches[batch["split"]]
        ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
        lengths = batch["attention_mask"].sum(1).tolist()  # right-padded (data.collate)
        examples = [{"input_ids": ids[i, :n], "labels": labels[i, :n]} for i, n in enumerate(lengths)]
        target = cache.batch_target(batch["index"], examples, width=ids.shape[1])
        k = target.ids.shape[-1]
        flat = SparseTarget(target.ids.reshape(-1, k), target.probs.reshape(-1, k),
                            None if target.tail is None else target.tail.reshape(-1))
        return flat.to(self.device)

    def diagnose(self, batch: dict) -> str | None:
        return None  # stored targets are checked when they are read


Teacher = LiveTeacher | CachedTeacher


def open_teacher(
    spec: ModelSpec | TeacherCacheSpec | None,
    *,
    tokenizer,
    student_ref: str,
    loss: LossSpec,
    seq_len: int,
    vocab_policy: str,
    device,
) -> Teacher | None:
    """The teacher a config describes, checked against this run (tokenizer, vocabulary, sequence length,
    temperature, divergence), on ``device``; None for ``teacher: null``."""
    if spec is None:
        return None
    if isinstance(spec, TeacherCacheSpec):
        return CachedTeacher(spec, tokenizer, loss, seq_len, device)
    teacher_tok = load_tokenizer(spec, "teacher")
    check_tokenizers_agree(tokenizer, teacher_tok, student_ref, spec.tokenizer or spec.path)
    model = load_model(spec, "teacher", teacher_tok)
    resolve_vocab(model, len(tokenizer), "teacher", vocab_policy)
    return LiveTeacher(model.to(device), len(tokenizer))
