"""A LoRA student's own base model as its teacher (``teacher: {student_base: true}``): the student's forward pass
with its adapters switched off (``peft``'s ``disable_adapter``) and dropout off. It shares every weight with the
student, so it costs no memory beyond its activations; since the base weights are frozen it stays the model the
student started from. It cannot correct the student's tokens (speculative KD): the two would decode with one
model."""

from __future__ import annotations

import contextlib
import functools

import torch

from distill.engines import LocalEngine
from distill.models import count_parameters
from distill.teachers.engine import EngineTeacher


@contextlib.contextmanager
def _without_adapters(model):
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), model.disable_adapter():
            yield
    finally:
        model.train(training)


def student_base_teacher(student, tokenizer) -> EngineTeacher:
    """The teacher over ``student`` (a LoRA model, not frozen: it trains) with its adapters off."""
    engine = LocalEngine(student, tokenizer, context=functools.partial(_without_adapters, student))
    what = f"the student's base model without its adapters, {count_parameters(student) / 1e6:.2f}M parameters"
    return EngineTeacher(engine, "student_base", description=what)
