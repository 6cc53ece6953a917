"""What an engine is: a model that can score, sample and correct, in this process or behind a server.

An engine says what it can do as attributes, and callers ask those, never its type:

* ``dense``: :meth:`score` gives the model's final hidden states and output layer
  (:class:`~distill.losses.DenseSignal`: the whole distribution, formed a chunk of rows at a time), and the
  engine has ``head`` and ``hidden(batch)`` (full logits for a cache capture); otherwise :meth:`score` gives
  its top-k and realized-token probabilities and the tail mass (:class:`~distill.losses.SparseTarget`), and
  the engine has ``top_logprobs(seqs, k, temperature)``.
* ``hidden_states``: ``states(batch)`` gives every layer's hidden states with the signal (the hidden-state
  loss); ``layers`` and ``width`` say how many and how wide.
* ``max_top_k``: the most log-probabilities per position it returns (the vocabulary for a dense engine).
* ``max_positions``: the longest sequence it scores (None: no known limit).
* ``model``: the model when it runs in this process (speculative decoding's target), else None.
* ``corrector``: speculative KD's teacher side, ``corrector(temperature) -> Corrector``, or None for an
  engine that cannot decode beside the student (a LoRA student's base shares the student's weights).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from distill.generation.sampling import SamplingParams
from distill.losses import DenseSignal, SparseTarget


class Corrector(Protocol):
    """Speculative KD's teacher side over a batch of sequences being written
    (:func:`distill.generation.correction.corrected_sample`)."""

    def prefill(self, ids_BP: torch.Tensor, mask_BP: torch.Tensor) -> None:
        """Start from the (left-padded) prompts."""

    def check(self, proposed_B: torch.Tensor, k: int, u_B: torch.Tensor, active_B: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(whether each proposed token is in the teacher's top-``k`` at this position, a teacher sample drawn
        with the uniforms ``u_B``); ``active_B``: the rows still writing."""

    def step(self, tokens_B: torch.Tensor) -> None:
        """Append the token each row kept."""


class Engine(Protocol):
    """A model that can score a batch, sample completions and correct a student's tokens (module docstring)."""

    dense: bool
    hidden_states: bool
    max_top_k: int | None
    max_positions: int | None
    model: torch.nn.Module | None
    corrector: Callable[[float], Corrector] | None

    def describe(self) -> str:
        """One line for the start-up log."""

    def score(self, batch: dict) -> DenseSignal | SparseTarget:
        """The signal for the batch's next-token positions (``labels[:, 1:]``, ``B * (T - 1)`` rows)."""

    def sample(self, rows: list[dict], keys: list[str], params: SamplingParams, *, n: int, seed: int,
               logprobs: bool, batch_size: int, on_batch=None) -> list[list[dict]]:
        """``n`` samples of each prompt row (``ids``: token ids, or None with ``value`` / ``format`` for a
        server that tokenizes), seeded from (``seed``, the row's key, the sample index), as records
        ``sample``, ``response``, ``response_tokens``, ``finished``, ``_mean_logprob`` (None unless
        ``logprobs``); ``on_batch(new_tokens)`` after each batch."""
