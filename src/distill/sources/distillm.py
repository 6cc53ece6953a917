"""``train.batches: {source: distillm, ...}`` (Ko et al., DistiLLM's adaptive off-policy schedule, as its
reference code does it): a threshold phi starts at ``adaptive_init``; after each evaluation, when the eval loss
is at least ``adaptive_loss_eps`` above the last loss that raised phi, phi grows by ``adaptive_step`` (at most
1) and that loss is remembered. Each step draws r ~ U(0, 1) from (seed, step): if r < phi (1 - step / steps),
or r < phi while the replay buffer is not full, the student writes the completions (kept in the buffer,
``replay_capacity`` sequences per process, the oldest dropped) and the step trains on them; else if r < phi,
the step trains on sequences drawn from the buffer; else on the dataset's. Meant with ``skew_kl`` /
``skew_reverse_kl``. The buffer and phi are the source's state, which checkpoints carry."""

from __future__ import annotations

import random
from collections.abc import Callable

from distill.config import DistillmBatches
from distill.data import collate
from distill.generation.sampling import row_seed
from distill.sources.context import SourceContext, TeacherView
from distill.sources.onpolicy import OnPolicy, check_teacher, coin


class AdaptiveThreshold:
    """DistiLLM's threshold phi: it grows by ``step`` (at most 1) after an evaluation whose loss is at least
    ``eps`` above the loss that last raised it (the first evaluation's loss to begin with)."""

    def __init__(self, init: float, step: float, eps: float):
        self.value, self.step, self.eps = init, step, eps
        self.last_raise: float | None = None

    def observe(self, eval_loss: float) -> None:
        if self.last_raise is None:
            self.last_raise = eval_loss
        elif eval_loss >= self.last_raise + self.eps:
            self.value = min(1.0, self.value + self.step)
            self.last_raise = eval_loss


class DistillmSource:
    """The student's samples, its replay buffer or the dataset's completions, by phi (module docstring)."""

    ahead = False  # its batches are the student's own samples, drawn when the step comes

    @staticmethod
    def check_teacher(settings: DistillmBatches, teacher: TeacherView | None) -> None:
        check_teacher(settings.source, teacher)

    def __init__(self, settings: DistillmBatches, ctx: SourceContext):
        self.settings = settings
        self.op = OnPolicy(settings, ctx, own_samples=True, counters=("replay_steps",))
        self.baseline = self.op.baseline
        self.buffer: list[tuple[list[int], list[int]]] = []  # (input_ids, labels) per sequence
        self.threshold = AdaptiveThreshold(settings.adaptive_init, settings.adaptive_step, settings.adaptive_loss_eps)

    def batches(self, ctx: SourceContext, step: int) -> list[dict]:
        self.op.own(False)
        r = coin(ctx.seed, step, "distillm")
        phi = self.threshold.value
        fresh = phi * (1.0 - step / ctx.max_steps)
        full = len(self.buffer) >= self.settings.replay_capacity
        if r < fresh or (r < phi and not full):
            batches = self.op.student_batches(ctx, step)
            for b in batches:
                self.remember(b)
            self.op.count("on_policy_steps", 1.0)
            self.op.own(True)
            return batches
        if r < phi and self.buffer:
            self.op.count("replay_steps", 1.0)
            return [self.replay(ctx, step, m) for m in range(ctx.grad_accum)]
        return [ctx.dataset_batch(step, m) for m in range(ctx.grad_accum)]

    def remember(self, batch: dict) -> None:
        for ids, labels, mask in zip(batch["input_ids"].cpu(), batch["labels"].cpu(), batch["attention_mask"].cpu(),
                                     strict=True):
            n = int(mask.sum())
            self.buffer.append((ids[:n].tolist(), labels[:n].tolist()))
        del self.buffer[: max(0, len(self.buffer) - self.settings.replay_capacity)]

    def replay(self, ctx: SourceContext, step: int, micro: int) -> dict:
        """``batch_size`` sequences drawn from the buffer, by (seed, step, micro-batch, process)."""
        rng = random.Random(row_seed(ctx.seed, "replay", step, micro, ctx.rank))
        chosen = rng.sample(self.buffer, k=min(ctx.batch_size, len(self.buffer)))
        batch = collate([{"input_ids": ids, "labels": labels} for ids, labels in chosen], ctx.pad_id)
        return {k: v.to(ctx.device) for k, v in batch.items()}

    def observe_eval(self, metrics: dict) -> None:
        self.threshold.observe(metrics["val_loss"])

    def log_fields(self, step: int, steps: int, reduce: Callable[[list[float]], list[float]]) -> dict:
        sums = self.op.take(reduce)
        return {**self.op.log_fields(sums, steps), "replay": sums["replay_steps"] / self.op.world / steps,
                "distillm_threshold": self.threshold.value, **self.op.baseline_field(sums, steps)}

    def state_dict(self) -> dict:
        return {"buffer": self.buffer, "threshold": self.threshold.value, "last_raise": self.threshold.last_raise,
                **self.op.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = [(list(a), list(b)) for a, b in state["buffer"]]
        self.threshold.value, self.threshold.last_raise = state["threshold"], state["last_raise"]
        self.op.load_state_dict(state)
