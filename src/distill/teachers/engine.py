"""A teacher that is one engine (:mod:`distill.engines`): a model in this process (``teacher: {path: DIR}`` or
``{config: ...}``), a model behind a server (``teacher: {server: URL}``), and the live teachers built on the
student (self-distillation's copy, a LoRA student's base)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from distill.teachers.base import HiddenStates


class EngineTeacher:
    """A teacher whose signal is its engine's score of the batch (:mod:`distill.teachers.base` for the
    protocol). A dense engine (a model in this process) gives the exact distance to the teacher at T = 1 and
    its hidden states; a sparse one (a server) its top-k + tail at the temperature it scores at.

    ``ready``: whether the teacher speaks yet (self-distillation: from ``start`` on, once a copy exists);
    before, its signal is None (plain CE) and it covers no split. ``description`` replaces the engine's in
    the start-up log."""

    names = None
    check_data = None  # an engine scores whatever it is sent
    prefetch = None  # its signal is one forward pass or request, made when asked
    scores_any_text = True  # an engine scores any text it is sent

    def __init__(self, engine, kind: str, *, description: str | None = None, ready: Callable[[], bool] | None = None):
        self.engine, self.kind, self.description = engine, kind, description
        self.ready = ready if ready is not None else (lambda: True)
        self.eval_estimates = "exact" if engine.dense else "topk_tail"
        self.eval_temperature = 1.0 if engine.dense else engine.temperature
        self.model, self.corrector = engine.model, engine.corrector
        self.states = HiddenStates(engine.layers, engine.width, self._states) if engine.hidden_states else None
        self.diagnose = self._diagnose if engine.dense else None

    @property
    def max_positions(self) -> int | None:
        return self.engine.max_positions

    def describe(self) -> str:
        return self.description or self.engine.describe()

    def covers(self, split: str) -> bool:
        return self.ready()

    def signal(self, batch: dict):
        return self.engine.score(batch) if self.ready() else None

    def _states(self, batch: dict) -> tuple:
        return self.engine.states(batch) if self.ready() else (None, None)

    def _diagnose(self, batch: dict) -> str | None:
        if not torch.isfinite(self.engine.hidden(batch)).all():
            return "the teacher's hidden states are non-finite (a broken teacher checkpoint or fp16 overflow)"
        return None
