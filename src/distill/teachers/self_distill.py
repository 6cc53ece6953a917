"""Self-distillation (``teacher: {self: ema | snapshot}``, docs/methods.md §11): the student as its own teacher.

The copy of the student is kept by the training run's loop hook
(:class:`distill.training_hooks.SelfDistillHook`: it follows the student after each optimizer step and is kept
in checkpoints); the teacher is an ordinary live teacher over that copy, silent (plain CE) before step
``start`` and, for ``snapshot``, before the first copy.
"""

from __future__ import annotations

from distill.config import SelfTeacherSpec
from distill.engines import LocalEngine
from distill.teachers.engine import EngineTeacher
from distill.training_hooks import SelfDistillHook


def self_teacher(spec: SelfTeacherSpec, student, tokenizer, device=None) -> tuple[EngineTeacher, SelfDistillHook]:
    """The teacher over a copy of ``student`` and the hook that keeps the copy."""
    hook = SelfDistillHook(student, spec.self_, decay=spec.decay, every=spec.every, start=spec.start, device=device)
    if spec.self_ == "ema":
        how = f"moving average of the student's weights (decay {spec.decay:g})"
    else:
        how = f"the student's weights frozen every {spec.every} steps"
    what = f"self-distillation: {how}" + (f", from step {spec.start}" if spec.start else "")
    teacher = EngineTeacher(LocalEngine(hook.model, tokenizer), "self", description=what,
                            ready=lambda: hook.active)
    return teacher, hook
