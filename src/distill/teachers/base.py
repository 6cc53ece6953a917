"""What a teacher is: the protocol every kind follows, a small core and optional capabilities.

The core, which every teacher has:

* ``signal(batch)``: its signal for the batch's next-token positions (``labels[:, 1:]``, flattened to
  ``B * (T - 1)`` rows): :class:`~distill.losses.DenseSignal`, :class:`~distill.losses.SparseTarget`,
  :class:`~distill.losses.MixtureSignal`, or None (plain CE for this batch: a teacher not speaking yet);
* ``covers(split)``: whether it can score that split (``train``, ``eval``);
* ``describe()``: one line for the start-up log;
* ``kind``: its name in messages; ``eval_estimates``: what evaluation can say about the student's distance to
  it (``exact``, ``topk_tail``, ``topk``, ``sampled``: :mod:`distill.teachers`); ``eval_temperature``: the
  temperature its eval signal is at; ``max_positions``: the longest sequence it scores (None: no limit);
  ``scores_any_text``: whether it scores text that is not a dataset example (the student's own samples).

The capabilities, each None where the teacher does not have it (never a method that does nothing):

* ``states``: :class:`HiddenStates`, for the hidden-state loss (docs/methods.md §12);
* ``corrector``: ``corrector(temperature) -> Corrector``, speculative KD's teacher side
  (:mod:`distill.engines.base`);
* ``names``: the names of the teachers whose signal it mixes (their KLs are logged as ``kl_<name>``);
* ``model``: its model in this process (speculative decoding drafts for it);
* ``diagnose``: ``diagnose(batch) -> str | None``, a cause for a non-finite loss that lies with the teacher;
* ``check_data``: ``check_data(train_ds, eval_ds)``, refuse data it cannot score, before training on it (a
  cache of other data); None for a teacher that scores whatever it is sent.
* ``prefetch``: ``prefetch(batch)``, start working out the signal of a batch the run will ask for later, off
  the training thread (a cache: reading, checking and decoding its targets); ``signal`` of that batch then
  waits for it. None where there is nothing to do ahead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from distill.engines import Corrector


@dataclass(frozen=True)
class HiddenStates:
    """A teacher's hidden states for the hidden-state loss: how many layers and how wide, and ``of(batch)`` ->
    (its signal, every hidden state (B, T, H): 0 = the embeddings' output, i = layer i's) from one forward
    pass, or (None, None) while the teacher is not speaking."""

    layers: int
    width: int
    of: Callable[[dict], tuple]


class Teacher(Protocol):
    """A teacher (module docstring)."""

    kind: str
    eval_estimates: str
    eval_temperature: float
    max_positions: int | None
    scores_any_text: bool
    states: HiddenStates | None
    corrector: Callable[[float], Corrector] | None
    names: list[str] | None
    model: torch.nn.Module | None
    diagnose: Callable[[dict], str | None] | None
    check_data: Callable[[object, object], None] | None
    prefetch: Callable[[dict], None] | None

    def signal(self, batch: dict):
        """Its signal for the batch (module docstring)."""

    def covers(self, split: str) -> bool:
        """Whether it can score ``split``."""

    def describe(self) -> str:
        """One line for the start-up log."""
