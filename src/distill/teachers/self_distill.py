"""Self-distillation (``teacher: {self: ema | snapshot}``, docs/methods.md §11): the student as its own teacher."""

from __future__ import annotations

import copy

import torch

from distill.config import SelfTeacherSpec
from distill.losses import DenseSignal
from distill.teachers.live import LiveTeacher


class SelfTeacher(LiveTeacher):
    """The student as its own teacher (docs/methods.md §11): a copy of its weights that ``follow`` keeps as
    the exponential moving average ``decay * teacher + (1 - decay) * student`` (``self: ema``), or replaces
    by the student's weights every ``every`` steps (``self: snapshot``: born-again networks within one run;
    plain CE until the first copy). Before step ``start`` the loss is plain CE. The copy is kept in
    checkpoints, so a resumed run continues with the same teacher."""

    kind = "self"

    def __init__(self, spec: SelfTeacherSpec, student, vocab_size: int, device=None):
        super().__init__(copy.deepcopy(student).to(device) if device is not None else copy.deepcopy(student),
                         vocab_size)
        self.spec, self.step = spec, 0
        self.has_copy = spec.self_ == "ema"  # a snapshot teacher exists from its first copy on

    def describe(self) -> str:
        if self.spec.self_ == "ema":
            how = f"moving average of the student's weights (decay {self.spec.decay:g})"
        else:
            how = f"the student's weights frozen every {self.spec.every} steps"
        return f"self-distillation: {how}" + (f", from step {self.spec.start}" if self.spec.start else "")

    @property
    def active(self) -> bool:
        return self.has_copy and self.step >= self.spec.start

    def signal(self, batch: dict) -> DenseSignal | None:
        return super().signal(batch) if self.active else None

    def signal_and_states(self, batch: dict):
        return super().signal_and_states(batch) if self.active else (None, None)

    def covers(self, split: str) -> bool:
        return self.active

    @torch.no_grad()
    def follow(self, student, step: int) -> None:
        """After optimizer step ``step`` (1-based): move the teacher toward the student's new weights."""
        self.step = step
        mine, theirs = list(self.model.parameters()), list(student.parameters())
        if self.spec.self_ == "ema":
            torch._foreach_lerp_(mine, [p.detach() for p in theirs], 1.0 - self.spec.decay)
        elif step % self.spec.every == 0:
            torch._foreach_copy_(mine, [p.detach() for p in theirs])
            self.has_copy = True

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"model.{k}": v.detach().clone() for k, v in self.model.state_dict().items()}
        state["step"] = torch.tensor(self.step)
        state["has_copy"] = torch.tensor(self.has_copy)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
        self.step, self.has_copy = int(state["step"]), bool(state["has_copy"])
