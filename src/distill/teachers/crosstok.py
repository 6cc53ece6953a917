"""A teacher with a tokenizer of its own, live (``teacher: {path: DIR}`` or ``{config: ..., tokenizer: ...}``) or
served (``teacher: {server: URL, tokenizer: ...}``), with ``loss.crosstok: pkl | gold | uld``; docs/cross_tokenizer.md,
docs/methods.md §14.

Each batch's text is re-tokenized for the teacher (:func:`distill.crosstok.retokenize_batch`), the teacher scores
its own tokens (live, or a server with ``signal: hidden``: final hidden states and output layer, a dense signal
over its own rows; a server with ``signal: logprobs``: its top-k and realized token per row, sparse, every id
with ``top_k: all``), and the signal carries the aligned groups of both sides' rows, the method, and W and the
exact matches
(:func:`distill.crosstok.load_projection`, cached on disk keyed by both tokenizers' fingerprints). Evaluation
measures no distance to such a teacher: it covers no ``eval`` split (held-out CE, perplexity and calibration of
the student are reported as without a teacher). Any student batch is re-tokenized alike: the dataset's
examples and GKD's samples of the student (config.py refuses the other batch sources).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from distill.crosstok import load_projection, preflight, retokenize_batch, token_bytes
from distill.losses import AlignedGroups, CrossTokSignal

logger = logging.getLogger("distill")


def projection_dir(out_dir: str | None) -> Path:
    """Where W is cached: ``$DISTILL_CACHE/crosstok`` when that is set, else ``<out_dir>/crosstok``."""
    base = os.environ.get("DISTILL_CACHE")
    if base:
        return Path(base).expanduser() / "crosstok"
    return Path(out_dir or ".") / "crosstok"


class CrossTokTeacher:
    """A teacher over its own tokenization of each batch, its engine a model in this process or a server
    (:mod:`distill.teachers.base` for the protocol). Its signal is a :class:`distill.losses.CrossTokSignal`,
    which the training loss reads group by group."""

    kind = "cross-tokenizer"
    eval_estimates = "exact"  # never read: it covers no eval split
    max_positions = None  # the teacher's own length is checked on its tokens (signal)
    scores_any_text = True  # any student batch is re-tokenized, the student's own samples too
    states = None  # hidden states do not line up position by position across tokenizations
    corrector = None
    names = None
    diagnose = None
    check_data = None
    prefetch = None

    def __init__(self, engine, student_tok, teacher_tok, method: str, cache_dir: Path):
        self.engine, self.tokenizer, self.method = engine, teacher_tok, method
        # A dense engine's logits are tempered by the loss; a server's log-probs come at the loss's temperature.
        self.eval_temperature = 1.0 if engine.dense else engine.temperature
        self.model = engine.model
        self.projection, self.matches, self.path = load_projection(student_tok, teacher_tok, cache_dir)
        self.s_table, self.t_table = token_bytes(student_tok), token_bytes(teacher_tok)
        pad = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else teacher_tok.eos_token_id
        self.pad_id = pad if pad is not None else 0
        self.limit = engine.max_positions
        report = preflight(student_tok, teacher_tok, self.matches)
        logger.info("preflight: %s", report.line())
        for warning in report.warnings:
            logger.warning("preflight: %s", warning)
        self.sizes = (len(self.s_table), len(self.t_table))

    def describe(self) -> str:
        return (f"{self.engine.describe()}, its own tokenizer ({self.sizes[1]} tokens; the student's "
                f"{self.sizes[0]}): {self.method} over byte-aligned groups, W from {self.path}")

    def covers(self, split: str) -> bool:
        return split == "train"

    def signal(self, batch: dict) -> CrossTokSignal:
        cross = retokenize_batch(batch, self.tokenizer, self.s_table, self.t_table, teacher_pad_id=self.pad_id)
        width = cross.teacher_batch["input_ids"].shape[1]
        if self.limit is not None and width > self.limit:
            raise ValueError(f"teacher: its tokenization of a batch is {width} tokens long, more than the {self.limit} "
                             "positions the teacher model has; lower data.seq_len (the student's tokens) so that "
                             "the teacher's tokens of the same text fit")
        device = batch["input_ids"].device
        rows = self.engine.score({k: v.to(device) for k, v in cross.teacher_batch.items()})
        g = cross.groups
        groups = AlignedGroups(g.student_group.to(device), g.student_labels.to(device), g.teacher_group.to(device),
                               g.teacher_labels.to(device), g.num_groups)
        return CrossTokSignal(rows, groups, self.method, self.projection, self.matches)
