"""Co-distillation (``teacher: {peers: [...]}``, docs/methods.md §13): the student's peers train beside it and
are its teachers."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch

from distill.checkpoint import commit_dir, tmp_dir_for
from distill.config import PeersTeacherSpec
from distill.losses import DenseSignal, LinearHead, LossSpec, MixtureSignal, chunked_kd_loss
from distill.models import (
    count_parameters,
    final_hidden,
    flat_positions,
    max_positions,
    output_head,
    save_pretrained,
)


def _frozen_head(head: LinearHead) -> LinearHead:
    """A copy of an output layer that later updates of the model do not change."""
    return replace(head, weight=head.weight.detach().clone(),
                   bias=None if head.bias is None else head.bias.detach().clone())


class PeersTeacher:
    """Co-distillation (docs/methods.md §13): the student's teachers are its peers, which train in the same
    run. Before each optimizer step (``begin_step``) every model's predictions on the step's micro-batches are
    taken (no gradient; the output layers copied), then each peer takes its own optimizer step toward the
    mixture of the others' (the student included) with the run's loss, and the student's signal for those
    batches is the mixture of the peers' predictions from before their update: all models distill from the
    same, pre-step predictions. Plain CE for every model during ``burn_in`` steps. Batches other than the
    step's (evaluation) get the peers' current predictions. Runs in one process (the peers' gradients are
    not reduced across processes)."""

    kind = "peers"
    eval_estimates = "exact"
    eval_temperature = 1.0
    scores_any_text = True
    has_states = False

    def __init__(self, spec: PeersTeacherSpec, student, models: list, vocab_size: int, loss: LossSpec,
                 optimizer_for, max_grad_norm: float | None, chunk_size: int | None):
        self.spec, self.student, self.models, self.vocab_size, self.loss = spec, student, models, vocab_size, loss
        self.names = [f"peer{i}" for i in range(len(models))]
        self.optimizers = [optimizer_for(m) for m in models]
        self.max_grad_norm, self.chunk_size = max_grad_norm, chunk_size
        self.step = 0
        self.pending: dict[int, object] = {}  # id(batch) -> the student's signal for this step's batches
        for m in models:
            m.train()
        limits = [max_positions(m) for m in models if max_positions(m)]
        self.max_positions = min(limits) if limits else None

    def describe(self) -> str:
        sizes = ", ".join(f"{count_parameters(m) / 1e6:.2f}M" for m in self.models)
        return (f"co-distillation with {len(self.models)} peer(s) ({sizes} parameters)"
                + (f", plain CE for {self.spec.burn_in} steps" if self.spec.burn_in else ""))

    def check_data(self, train_ds, eval_ds) -> None:
        """Nothing to check: the peers score whatever they are given."""

    def covers(self, split: str) -> bool:
        return True

    def _signal_of(self, hidden: list, heads: list, skip: int | None) -> DenseSignal | MixtureSignal:
        """The mixture (equal weights, probability space, the loss temperature) of every model but ``skip``."""
        sigs = [DenseSignal(h, hd) for i, (h, hd) in enumerate(zip(hidden, heads, strict=True)) if i != skip]
        if len(sigs) == 1:
            return sigs[0]
        return MixtureSignal(sigs, [1.0 / len(sigs)] * len(sigs), [self.loss.temperature] * len(sigs),
                             "probability")

    @torch.no_grad()
    def signal(self, batch: dict):
        if id(batch) in self.pending:
            return self.pending[id(batch)]
        if self.step < self.spec.burn_in:
            return None
        was = [m.training for m in self.models]
        for m in self.models:
            m.eval()
        hidden = [flat_positions(final_hidden(m, batch)) for m in self.models]
        for m, w in zip(self.models, was, strict=True):
            m.train(w)
        return self._signal_of(hidden, [output_head(m, self.vocab_size) for m in self.models], None)

    def begin_step(self, batches: list[dict], num_tokens, step: int) -> None:
        """Train every peer one step on ``batches`` toward the others' pre-step predictions; keep the
        peers' pre-step predictions for the student's loss on the same batches."""
        self.pending = {}
        distill = step >= self.spec.burn_in
        everyone = [self.student, *self.models]  # index 0 is the student
        if distill:
            with torch.no_grad():
                heads = [_frozen_head(output_head(m, self.vocab_size)) for m in everyone]
                per_batch = [[flat_positions(final_hidden(m, b)) for m in everyone] for b in batches]
            for b, hidden in zip(batches, per_batch, strict=True):
                self.pending[id(b)] = self._signal_of(hidden[1:], heads[1:], None)
        for k, (model, (optimizer, scheduler)) in enumerate(zip(self.models, self.optimizers, strict=True)):
            for i, b in enumerate(batches):
                teacher = self._signal_of(per_batch[i], heads, k + 1) if distill else None
                labels = b["labels"][:, 1:].reshape(-1)
                hidden = flat_positions(final_hidden(model, b))
                loss, _ = chunked_kd_loss(hidden, output_head(model, self.vocab_size), labels, teacher, num_tokens,
                                          self.loss, chunk_size=self.chunk_size, top1_stats=False)
                loss.backward()
            if self.max_grad_norm is not None and num_tokens > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_grad_norm)
            if num_tokens > 0:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

    def follow(self, student, step: int) -> None:
        self.step, self.pending = step, {}

    def diagnose(self, batch: dict) -> str | None:
        for name, m in zip(self.names, self.models, strict=True):
            with torch.no_grad():
                if not torch.isfinite(final_hidden(m, batch)).all():
                    return f"the hidden states of {name} are non-finite"
        return None

    def corrector(self, temperature: float):
        raise ValueError("speculative KD (train.batches=skd) corrects with one teacher; co-distillation's peers "
                         "cannot")

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
            scheduler.last_epoch = int(state[f"peer{k}.last_epoch"])
            for group, base, lam in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
                group["lr"] = base * lam(scheduler.last_epoch)
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]

    def save_models(self, out_dir, tokenizer) -> None:
        """Each peer as an ordinary Hugging Face checkpoint with the tokenizer: ``OUT/peers/peer<i>``."""
        for name, model in zip(self.names, self.models, strict=True):
            final = Path(out_dir) / "peers" / name
            tmp = tmp_dir_for(final)
            shutil.rmtree(tmp, ignore_errors=True)
            save_pretrained(model, tokenizer, tmp)
            commit_dir(tmp, final)
