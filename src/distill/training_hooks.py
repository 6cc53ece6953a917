"""Teachers that change the training loop, not the signal: the loop hooks of the training run.

A hook is called by :func:`distill.training.train` around each optimizer step and keeps its own state in the
run's checkpoints (``teacher_state.safetensors``):

* :class:`SelfDistillHook` (docs/methods.md §11): after each step, the teacher's copy of the student moves
  toward the student's new weights (``ema``) or becomes a copy of them every N steps (``snapshot``). Its
  teacher is an ordinary live teacher over that copy (:mod:`distill.teachers.self_distill`).
* :class:`PeersHook` (docs/methods.md §13): before each step, every peer takes its own optimizer step on the
  step's micro-batches with the run's own loss and update (the ``model_step`` the training run gives it),
  toward the others' pre-step predictions; the student's signal for those batches is the mixture of the
  peers' pre-step predictions (:mod:`distill.teachers.peers`). At the end every peer is saved.

What a hook does not do is None: ``before_step`` (before the step's losses, on its micro-batches) and
``save`` (after training, into the output directory); ``after_step``, ``state_dict`` and
``load_state_dict`` every hook has.
"""

from __future__ import annotations

import copy
import functools
import shutil
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import torch

from distill.checkpoint import commit_dir, tmp_dir_for
from distill.losses import DenseSignal, LinearHead, MixtureSignal
from distill.models import final_hidden, flat_positions, output_head, save_pretrained


class LoopHook(Protocol):
    """What the training run calls around its optimizer steps (module docstring)."""

    before_step: Callable[[list[dict], int, int], None] | None
    save: Callable[[Path, object], None] | None

    def after_step(self, student, step: int) -> None:
        """After optimizer step ``step`` (1-based) of ``student`` (unwrapped)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of the hook."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from what a checkpoint kept."""


class SelfDistillHook:
    """Self-distillation's copy of the student: the moving average ``decay * copy + (1 - decay) * student``
    (``mode="ema"``), or the student's weights copied every ``every`` steps (``mode="snapshot"``: born-again
    networks within one run; no copy before the first). The teacher speaks from step ``start`` on, once a
    copy exists (:attr:`active`)."""

    before_step = None
    save = None

    def __init__(self, student, mode: str, *, decay: float, every: int | None, start: int, device=None):
        self.model = copy.deepcopy(student).to(device) if device is not None else copy.deepcopy(student)
        self.mode, self.decay, self.every, self.start = mode, decay, every, start
        self.step = 0
        self.has_copy = mode == "ema"  # a snapshot exists from its first copy on

    @property
    def active(self) -> bool:
        return self.has_copy and self.step >= self.start

    @torch.no_grad()
    def after_step(self, student, step: int) -> None:
        """Move the copy toward the student's new weights."""
        self.step = step
        mine, theirs = list(self.model.parameters()), list(student.parameters())
        if self.mode == "ema":
            torch._foreach_lerp_(mine, [p.detach() for p in theirs], 1.0 - self.decay)
        elif step % self.every == 0:
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


def _frozen_head(head: LinearHead) -> LinearHead:
    """A copy of an output layer that later updates of the model do not change."""
    return replace(head, weight=head.weight.detach().clone(),
                   bias=None if head.bias is None else head.bias.detach().clone())


class _Given:
    """Signals computed before the step, by batch, as the loss reads a teacher's."""

    states = None

    def __init__(self, signals: dict[int, object]):
        self.signals = signals

    def signal(self, batch: dict):
        return self.signals[id(batch)]


class PeersHook:
    """Co-distillation's peers, trained beside the student (module docstring). ``optimizer_for(model) ->
    (optimizer, scheduler)`` and ``model_step(model, head_fn, optimizer, scheduler, batches, teacher,
    step_tokens)``: the student's optimizer settings and the run's own micro-batch loss and update. Plain CE
    for every model during ``burn_in`` steps; the mixture of several models is in probability space at
    ``temperature``. Runs in one process (the peers' gradients are not reduced across processes)."""

    def __init__(self, student, models: list, vocab_size: int, *, temperature: float, burn_in: int,
                 optimizer_for: Callable, model_step: Callable):
        self.student, self.models, self.vocab_size = student, models, vocab_size
        self.temperature, self.burn_in, self.model_step = temperature, burn_in, model_step
        self.names = [f"peer{i}" for i in range(len(models))]
        self.optimizers = [optimizer_for(m) for m in models]
        self.step = 0
        self.pending: dict[int, object] = {}  # id(batch) -> the student's signal for this step's batches
        for m in models:
            m.train()

    def mixture(self, hidden: list, heads: list, skip: int | None = None) -> DenseSignal | MixtureSignal:
        """The mixture (equal weights, probability space) of every model's signal but ``skip``."""
        sigs = [DenseSignal(h, hd) for i, (h, hd) in enumerate(zip(hidden, heads, strict=True)) if i != skip]
        if len(sigs) == 1:
            return sigs[0]
        return MixtureSignal(sigs, [1.0 / len(sigs)] * len(sigs), [self.temperature] * len(sigs), "probability")

    def before_step(self, batches: list[dict], num_tokens: int, step: int) -> None:
        """Train every peer one step on ``batches`` toward the others' pre-step predictions; keep the
        peers' pre-step predictions for the student's loss on the same batches."""
        self.pending = {}
        distill = step >= self.burn_in
        everyone = [self.student, *self.models]  # index 0 is the student
        if distill:
            with torch.no_grad():
                heads = [_frozen_head(output_head(m, self.vocab_size)) for m in everyone]
                per_batch = [[flat_positions(final_hidden(m, b)) for m in everyone] for b in batches]
            for b, hidden in zip(batches, per_batch, strict=True):
                self.pending[id(b)] = self.mixture(hidden[1:], heads[1:])
        for k, (model, (optimizer, scheduler)) in enumerate(zip(self.models, self.optimizers, strict=True)):
            teacher = _Given({id(b): self.mixture(per_batch[i], heads, k + 1) if distill else None
                              for i, b in enumerate(batches)})
            self.model_step(model, functools.partial(output_head, model, self.vocab_size), optimizer, scheduler,
                            batches, teacher, num_tokens)

    def after_step(self, student, step: int) -> None:
        self.step, self.pending = step, {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"step": torch.tensor(self.step)}
        for k, (model, (optimizer, scheduler)) in enumerate(zip(self.models, self.optimizers, strict=True)):
            state.update({f"peer{k}.model.{n}": t.detach().clone() for n, t in model.state_dict().items()})
            for pid, entry in optimizer.state_dict()["state"].items():
                state.update({f"peer{k}.opt.{pid}.{key}": t.detach().clone() for key, t in entry.items()})
            state[f"peer{k}.last_epoch"] = torch.tensor(scheduler.last_epoch)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.step = int(state["step"])
        for k, (model, (optimizer, scheduler)) in enumerate(zip(self.models, self.optimizers, strict=True)):
            prefix = f"peer{k}.model."
            model.load_state_dict({n[len(prefix):]: t for n, t in state.items() if n.startswith(prefix)})
            opt: dict[int, dict] = {}
            prefix = f"peer{k}.opt."
            for n, t in state.items():
                if n.startswith(prefix):
                    pid, key = n[len(prefix):].split(".", 1)
                    opt.setdefault(int(pid), {})[key] = t
            optimizer.load_state_dict({"state": opt, "param_groups": optimizer.state_dict()["param_groups"]})
            # The schedule at the kept step, set as a step sets it (warning: this step follows no optimizer step).
            scheduler.last_epoch = int(state[f"peer{k}.last_epoch"]) - 1
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected call of")
                scheduler.step()

    def save(self, out_dir, tokenizer) -> None:
        """Each peer as an ordinary Hugging Face checkpoint with the tokenizer: ``OUT/peers/peer<i>``."""
        for name, model in zip(self.names, self.models, strict=True):
            final = Path(out_dir) / "peers" / name
            tmp = tmp_dir_for(final)
            shutil.rmtree(tmp, ignore_errors=True)
            save_pretrained(model, tokenizer, tmp)
            commit_dir(tmp, final)
