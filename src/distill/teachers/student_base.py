"""A LoRA student's own base model as its teacher (``teacher: {student_base: true}``)."""

from __future__ import annotations

import contextlib

import torch

from distill.losses import DenseSignal
from distill.models import count_parameters, final_hidden, flat_positions, output_head
from distill.teachers.live import LiveTeacher, layer_states


class StudentBaseTeacher(LiveTeacher):
    """The LoRA student's own base model (``teacher: {student_base: true}``): the student's forward pass with its
    adapters switched off (``peft``'s ``disable_adapter``) and dropout off. It shares every weight with the
    student, so it costs no memory beyond its activations; since the base weights are frozen it stays the
    model the student started from."""

    kind = "student_base"

    def __init__(self, student, vocab_size: int):
        self.model, self.vocab_size = student, vocab_size  # not frozen or put in eval mode: the student trains

    @property
    def head(self):
        with self._base():
            return output_head(self.model, self.vocab_size)

    def describe(self) -> str:
        return f"the student's base model without its adapters, {count_parameters(self.model) / 1e6:.2f}M parameters"

    @contextlib.contextmanager
    def _base(self):
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.model.disable_adapter():
                yield
        finally:
            self.model.train(training)

    def signal(self, batch: dict) -> DenseSignal:
        with self._base():
            return DenseSignal(flat_positions(final_hidden(self.model, batch)), output_head(self.model, self.vocab_size))

    def signal_and_states(self, batch: dict):
        with self._base():
            states = layer_states(self.model, batch)
            return DenseSignal(flat_positions(states[-1]), output_head(self.model, self.vocab_size)), states

    def diagnose(self, batch: dict) -> str | None:
        with self._base():
            if not torch.isfinite(final_hidden(self.model, batch)).all():
                return "the student's base model (the teacher) has non-finite hidden states"
        return None

    def corrector(self, temperature: float):
        raise ValueError("speculative KD (train.batches=skd) with teacher.student_base is not supported; use a live "
                         "teacher (teacher: {path: ...})")
