"""The training run (what ``distill train`` runs): a student from a teacher (token-level KD), or from data
alone when there is no teacher.

    distill train configs/tiny/train.yaml out_dir=runs/tiny            # tiny CPU run, < 1 minute
    distill train my.yaml loss.divergence=jsd loss.beta=0.9 --resume   # continue the latest checkpoint
    accelerate launch --multi_gpu --num_processes 2 -m distill train my.yaml   # data parallel (CPU too: gloo)

Loss per supervised token: ``alpha * CE + (1 - alpha) * T^2 * D(p_T || q_T)`` (``distill.losses``). The
reduction divides by the number of supervised tokens in the whole optimizer step (all micro-batches,
all processes), so the step's gradient does not depend on how the global batch is split.

A step's micro-batches come from the batch source ``train.batches`` names (:mod:`distill.sources`), a pure
function of (seed, step) and of state the checkpoints carry. The dataset's order: step ``s`` uses global
examples ``[s*G, (s+1)*G)`` of a per-epoch permutation, ``G = batch_size * grad_accum * processes``. Resuming
needs no data iterator state, and 1 process with ``grad_accum=2`` sees the same batches as 2 processes with
``grad_accum=1``.

Writes into ``out_dir``: ``config.yaml`` (resolved), ``metrics.jsonl``, ``train.log``,
``checkpoints/step_XXXXXXXX/`` (accelerate state + ``trainer_state.json``), ``student/`` (an ordinary
Hugging Face checkpoint with its tokenizer; a LoRA student's adapters merged in, and the adapters alone in
``student_adapter/``), and ``tensorboard/`` when ``log.tensorboard`` is set.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from distill import checkpoint as ckpt
from distill import lora, sharding
from distill.config import LossConfig, OptimConfig, TrainConfig, dump_config
from distill.data import build_datasets, collate
from distill.engines import layer_states
from distill.errors import NonFiniteLossError
from distill.evaluation import preflight
from distill.evaluation.metrics import eval_batch_indices, eval_sums, metrics_from_sums
from distill.losses import (
    IGNORE_INDEX,
    CrossTokSignal,
    LinearHead,
    chunked_kd_loss,
    crosstok_kd_loss,
    naive_kd_loss,
    reduce_loss,
)
from distill.models import (
    check_tokenizer_saves,
    count_parameters,
    final_hidden,
    flat_positions,
    has_accelerator,
    load_model,
    load_tokenizer,
    max_positions,
    output_head,
    resolve_vocab,
    save_pretrained,
)
from distill.sources import SourceContext, TeacherView, source_type
from distill.teachers import Teacher, hidden_state_loss, open_teacher
from distill.training_hooks import LoopHook

logger = logging.getLogger("distill")

__all__ = ["NonFiniteLossError", "Run", "train"]


# --------------------------------------------------------------------------------------------------
# Pieces the loop uses


def lr_lambda(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio``."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    progress = (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cosine


@dataclass
class Run:
    """What the loop and evaluation share (built once by :func:`train`)."""

    cfg: TrainConfig
    accelerator: Accelerator
    tokenizer: Any
    model: torch.nn.Module  # the student, prepared by accelerate
    teacher: Teacher | None
    train_ds: Any
    eval_ds: Any
    pad_id: int
    source: Any = None  # the batch source (train.batches: distill/sources/), with its state
    hidden: torch.nn.Module | None = None  # the hidden-state loss term (loss.hidden), its projections prepared
    stats: dict[str, float] = field(default_factory=dict)  # timings since the last log line (teacher_seconds)

    def student_head(self) -> LinearHead:
        model = self.accelerator.unwrap_model(self.model)
        sharding.gathered_output_layer(model)  # FSDP: the loss reads the output layer's whole weight
        return output_head(model, len(self.tokenizer))

    def collate(self, dataset, indices, split: str) -> dict:
        """Examples ``indices`` of ``dataset`` as a batch on the device; ``index`` and ``split`` say which
        examples they are (a cached teacher finds its targets by them)."""
        indices = list(indices)
        batch = {k: v.to(self.accelerator.device) for k, v in collate([dataset[i] for i in indices],
                                                                        self.pad_id).items()}
        return {**batch, "index": indices, "split": split}

    def source_context(self) -> SourceContext:
        """What the batch source sees of this run."""
        cfg, acc = self.cfg, self.accelerator
        return SourceContext(
            student=acc.unwrap_model(self.model), tokenizer=self.tokenizer, pad_id=self.pad_id,
            teacher=TeacherView.of(self.teacher), loss=cfg.loss, train_ds=self.train_ds, collate=self.collate,
            seq_len=cfg.data.seq_len, seed=cfg.train.seed, max_steps=cfg.train.max_steps,
            batch_size=cfg.train.batch_size, grad_accum=cfg.train.grad_accum, rank=acc.process_index,
            world=acc.num_processes, device=acc.device, out_dir=cfg.out_dir)


def kd_step_loss(model, student_head_fn, teacher: Teacher | None, batch: dict, num_tokens: int, loss: LossConfig,
                 stats: dict | None = None, hidden_loss: torch.nn.Module | None = None, baseline: float = 0.0):
    """Loss of one micro-batch (already divided by ``num_tokens``) and its summed statistics. ``stats``, when
    given, accumulates the seconds spent on the teacher's signal (``teacher_seconds``). ``hidden_loss``: the
    hidden-state term (``loss.hidden``), added to the logit loss. ``baseline``: sampled_reverse_kl's baseline
    for this step (the batch source's :class:`~distill.sources.onpolicy.RunningBaseline`)."""
    labels = batch["labels"][:, 1:].reshape(-1)  # position t predicts token t + 1
    t0 = time.perf_counter()
    t_states = None
    if hidden_loss is not None:
        signal, t_states = teacher.states.of(batch)
    else:
        signal = teacher.signal(batch) if teacher is not None else None
    if stats is not None:
        stats["teacher_seconds"] = stats.get("teacher_seconds", 0.0) + time.perf_counter() - t0
    s_states = layer_states(model, batch) if t_states is not None else None
    hidden = flat_positions(s_states[-1] if s_states is not None else final_hidden(model, batch))
    head = student_head_fn()
    spec = loss.spec(baseline)
    # Training logs CE, the divergence and KL; the argmax statistics are evaluation's.
    if isinstance(signal, CrossTokSignal):  # a teacher with another tokenizer: per group (docs/methods.md §14)
        value, out = crosstok_kd_loss(hidden, head, labels, signal, num_tokens, spec, chunked=loss.chunked,
                                      chunk_size=loss.chunk_size)
    elif loss.chunked:
        value, out = chunked_kd_loss(hidden, head, labels, signal, num_tokens, spec, chunk_size=loss.chunk_size,
                                     top1_stats=False)
    else:
        # The reference path (materialized logits, plain autograd); statistics come from a no-grad pass.
        value = naive_kd_loss(hidden, head, labels, signal, num_tokens, spec)
        with torch.no_grad():
            _, out = chunked_kd_loss(hidden.detach(), head, labels, signal, num_tokens, spec, top1_stats=False)
    if t_states is not None:
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        per_position = hidden_loss(s_states, t_states, rows)
        value = value + reduce_loss(per_position, torch.ones_like(rows, dtype=torch.bool), num_tokens)
        out["hidden_sum"] = per_position.detach().sum()
    return value, out


def _diagnose_nonfinite(step: int, model, teacher: Teacher | None, batch, last_ckpt: Path | None, lr: float) -> str:
    """Say which part went non-finite, so the user knows what to change."""
    causes = []
    bad_params = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad_params:
        causes.append(f"student weights are non-finite ({', '.join(bad_params[:3])}...): the last update diverged")
    teacher_cause = teacher.diagnose(batch) if teacher is not None and teacher.diagnose is not None else None
    if teacher_cause:
        causes.append(teacher_cause)
    with torch.no_grad():
        if not torch.isfinite(final_hidden(model, batch)).all():
            causes.append("the student's hidden states are non-finite")
    if not causes:
        causes.append("the logits are finite but the loss is not (extreme logits at a low temperature?)")
    where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
    return (
        f"step {step + 1}: the loss is not finite. Diagnosis: {'; '.join(causes)}. Current lr={lr:.3g}. "
        f"Nothing was written for this step and {where}. Lower optim.lr, raise optim.warmup_steps, set "
        "optim.max_grad_norm, or use train.precision=fp32, then continue with --resume."
    )


def evaluate(run: Run) -> dict:
    """Held-out CE/perplexity/ECE and, when the teacher covers the eval split, its distance to the student
    (what that means per teacher kind: :mod:`distill.teachers`); all processes."""
    accelerator, eval_ds, bs = run.accelerator, run.eval_ds, run.cfg.eval.batch_size
    teacher = run.teacher if run.teacher is not None and run.teacher.covers("eval") else None
    chosen = eval_batch_indices(math.ceil(len(eval_ds) / bs), run.cfg.eval.max_batches)
    mine = chosen[accelerator.process_index :: accelerator.num_processes]
    batches = (run.collate(eval_ds, range(b * bs, min((b + 1) * bs, len(eval_ds))), "eval") for b in mine)
    if sharding.is_sharded():  # forward passes are collective: every process runs as many (empty ones score nothing)
        empty = {**run.collate(eval_ds, range(min(bs, len(eval_ds))), "eval")}
        empty["labels"] = torch.full_like(empty["labels"], IGNORE_INDEX)
        pad = math.ceil(len(chosen) / accelerator.num_processes) - len(mine)
        batches = itertools.chain(batches, [empty] * pad)
    sums = eval_sums(accelerator.unwrap_model(run.model), run.student_head(), batches, teacher,
                     autocast=accelerator.autocast)
    sums = accelerator.reduce(sums.to(accelerator.device), "sum").cpu()
    return metrics_from_sums(sums, teacher.eval_estimates if teacher is not None else None)


class Window:
    """Running sums since the last train log line (reduced over processes when a record is made).
    ``teacher_names``: several teachers' names, whose KLs are logged as ``kl_<name>``; ``hidden``: the
    hidden-state term is logged as ``hidden``."""

    KEYS = ("ce_sum", "div_sum", "kl_sum", "count", "hidden_sum")

    def __init__(self, accelerator: Accelerator, start_step: int, teacher_names: list[str] | None = None,
                 hidden: bool = False):
        self.accelerator, self.names, self.hidden = accelerator, list(teacher_names or []), hidden
        # KEYS, tokens, then each teacher's KL sum
        self.sums = torch.zeros(len(self.KEYS) + 1 + len(self.names), dtype=torch.float64, device=accelerator.device)
        self.loss, self.start, self.t0 = 0.0, start_step, time.perf_counter()

    def add(self, stats: dict, batch: dict) -> None:
        dev = self.sums.device
        # One named teacher whose signal is not a mixture (a single peer): its KL is the KL.
        alone = stats.get("kl_sum", torch.zeros(())).reshape(1) if len(self.names) == 1 else torch.zeros(len(self.names))
        members = stats.get("teacher_kl_sums", alone).double().to(dev)
        self.sums += torch.cat([torch.stack([stats.get(k, torch.zeros(())).double().to(dev) for k in self.KEYS]
                                            + [batch["attention_mask"].sum().double().to(dev)]), members])

    # Per-process counters, summed over processes at each record (a batch source sums its own).
    EXTRA = ("teacher_seconds",)

    def record(self, step: int, lr: float, tokens_seen: int, grad_norm, with_teacher: bool,
               extra: dict[str, float] | None = None, source=None) -> dict:
        """The train record for the steps since the last one; then starts a new window. ``extra``: this
        process's counters (:attr:`EXTRA`) since the last record; ``source``: the batch source, whose
        ``log_fields`` follow (``train_seconds``, after a source's ``gen_seconds``: the rest of a step)."""
        extra = extra or {}
        local = torch.tensor([extra.get(k, 0.0) for k in self.EXTRA], dtype=torch.float64, device=self.sums.device)
        totals = self.accelerator.reduce(torch.cat([self.sums, local]), "sum").tolist()
        ce_sum, div_sum, kl_sum, count, hidden_sum, tokens = totals[:6]
        member_kl = totals[6 : 6 + len(self.names)]
        more = dict(zip(self.EXTRA, totals[6 + len(self.names) :], strict=True))
        count = max(count, 1.0)
        steps, world = max(step - self.start, 1), self.accelerator.num_processes
        elapsed = time.perf_counter() - self.t0
        record = {"step": step, "split": "train", "loss": self.loss / steps,
                  "ce": ce_sum / count, "lr": lr, "tokens_seen": tokens_seen,
                  "tokens_per_s": tokens / max(elapsed, 1e-9), "step_seconds": elapsed / steps}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if with_teacher:
            record["kl"] = kl_sum / count
            record["div"] = div_sum / count
            record["teacher_seconds"] = more["teacher_seconds"] / world / steps
            for name, kl in zip(self.names, member_kl, strict=True):
                record[f"kl_{name}"] = kl / count
        if self.hidden:
            record["hidden"] = hidden_sum / count
        for key, value in (source.log_fields(step, steps, self.reduce) if source is not None else {}).items():
            record[key] = value
            if key == "gen_seconds":
                record["train_seconds"] = record["step_seconds"] - value - record.get("teacher_seconds", 0.0)
        self.sums.zero_()
        self.loss, self.start, self.t0 = 0.0, step, time.perf_counter()
        return record

    def reduce(self, values: list[float]) -> list[float]:
        """``values`` summed over the processes (float64)."""
        local = torch.tensor(values, dtype=torch.float64, device=self.sums.device)
        return self.accelerator.reduce(local, "sum").tolist()


Callback = Callable[[dict], object]


@dataclass(frozen=True)
class Callbacks:
    """What the caller of :func:`train` is told: each train-log record (``on_step``) and each evaluation
    (``on_eval``), on the main process."""

    on_step: Callback | None = None
    on_eval: Callback | None = None


class MetricsWriter:
    """metrics.jsonl (always), TensorBoard (through accelerate's tracker) and the caller's callbacks, on the main
    process."""

    def __init__(self, accelerator: Accelerator, path: Path, resume_step: int | None, callbacks: Callbacks):
        self.accelerator, self.path, self.callbacks = accelerator, path, callbacks
        if accelerator.is_main_process and resume_step is not None and path.exists():
            # Records past the checkpoint came from the interrupted run; the resumed run rewrites them.
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            ckpt.atomic_write_text(path, "".join(ln + "\n" for ln in kept))
        elif accelerator.is_main_process and resume_step is None:
            path.unlink(missing_ok=True)

    def write(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        scalars = {f"{record['split']}/{k}": v for k, v in record.items()
                   if isinstance(v, (int, float)) and k not in ("step", "split")}
        self.accelerator.log(scalars, step=record["step"])
        callback = self.callbacks.on_eval if record["split"] == "eval" else self.callbacks.on_step
        if callback is not None:
            callback(dict(record))


def _source_file(accelerator: Accelerator) -> str:
    return f"batch_source_rank{accelerator.process_index}.json"


def _source_state(resume_from: Path, accelerator: Accelerator) -> dict | None:
    """This process's batch source state in a checkpoint (``onpolicy_rank<i>.json`` in older ones), if any."""
    for name in (_source_file(accelerator), f"onpolicy_rank{accelerator.process_index}.json"):
        if (resume_from / name).is_file():
            return json.loads((resume_from / name).read_text())
    return None


TEACHER_STATE = "teacher_state.safetensors"  # a loop hook's state (self-distillation's copy, the peers)


def save_checkpoint(accelerator: Accelerator, cfg: TrainConfig, step: int, state: dict,
                    source=None, hook: LoopHook | None = None) -> Path:
    root = Path(cfg.out_dir) / "checkpoints"
    final = ckpt.step_dir(root, step)
    tmp = ckpt.tmp_dir_for(final)
    if accelerator.is_main_process:
        ckpt.prune_checkpoints(root, keep_last=cfg.checkpoint.keep_last + 1)  # clears stale *.tmp too
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    source_state = source.state_dict() if source is not None else {}
    if source_state:  # each process's own (distillm: its replay buffer and threshold)
        ckpt.atomic_write_text(tmp / _source_file(accelerator), json.dumps(source_state))
    hook_state = hook.state_dict() if hook is not None else {}
    if hook_state and accelerator.is_main_process:  # the same on every process
        save_file({k: v.contiguous().cpu() for k, v in hook_state.items()}, str(tmp / TEACHER_STATE))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        dump_config(cfg, tmp / "config.yaml")
        ckpt.atomic_write_json(tmp / ckpt.STATE_FILE, state)  # written last: marks the state complete
        ckpt.commit_dir(tmp, final)
        ckpt.prune_checkpoints(root, keep_last=cfg.checkpoint.keep_last)
    accelerator.wait_for_everyone()
    return final


def save_student(accelerator: Accelerator, model, tokenizer, cfg: TrainConfig, summary: dict) -> Path:
    final = Path(cfg.out_dir) / "student"
    tmp = ckpt.tmp_dir_for(final)
    accelerator.wait_for_everyone()
    # FSDP: the whole weights, gathered onto the main process (every process takes part)
    state_dict = accelerator.get_state_dict(model) if sharding.is_sharded() else None
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        if lora.is_lora(unwrapped):  # the adapters alone, then merged into an ordinary checkpoint
            adapter = Path(cfg.out_dir) / "student_adapter"
            adapter_tmp = ckpt.tmp_dir_for(adapter)
            shutil.rmtree(adapter_tmp, ignore_errors=True)
            lora.save_adapter(unwrapped, adapter_tmp)
            ckpt.commit_dir(adapter_tmp, adapter)
            unwrapped = lora.merged(unwrapped)
        save_pretrained(unwrapped, tokenizer, tmp, state_dict=state_dict)
        dump_config(cfg, tmp / "distill_config.yaml")
        ckpt.atomic_write_json(tmp / "distill_summary.json", summary)
        ckpt.commit_dir(tmp, final)
    accelerator.wait_for_everyone()
    return final


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    out_dir = Path(cfg.out_dir)
    # Each run sets its own precision: forget an earlier run's settings in this process (the process
    # group itself, PartialState, is kept).
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        cpu=not has_accelerator(),  # on a CPU-only machine, lets launched processes form a gloo group
        mixed_precision="bf16" if cfg.train.precision == "bf16" else "no",
        log_with="tensorboard" if cfg.log.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "tensorboard")),
        step_scheduler_with_optimizer=False,  # we step the scheduler exactly once per optimizer step
    )
    sharding.enable_cpu_fsdp(accelerator)  # an FSDP launch on CPU (accelerate only shards on GPUs)
    return accelerator


def make_optimizer(student, cfg: TrainConfig, extra: torch.nn.Module | None = None):
    """AdamW (no weight decay on vectors: norms, biases) and the warmup + cosine schedule; ``extra``: more
    trained parameters (the hidden-state loss's projections)."""
    params = list(student.named_parameters()) + (list(extra.named_parameters()) if extra is not None else [])
    params = [(n, p) for n, p in params if p.requires_grad]  # a LoRA student: its adapters only
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_lambda, optim=cfg.optim, max_steps=cfg.train.max_steps)
    )
    return optimizer, scheduler


def optimizer_step(run: Run, optimizer, scheduler, micro_batches: list[dict], step: int, window: Window,
                   last_ckpt: Path | None, hook: LoopHook | None = None) -> tuple[float, float | None, int]:
    """One optimizer step over the micro-batches; returns (lr used, grad norm or None, tokens of all processes).
    ``hook``: the teacher's loop hook, whose ``before_step`` runs once the step's normalizer is known."""
    accelerator, model, cfg = run.accelerator, run.model, run.cfg
    # Supervised tokens in the whole step, all processes: the one normalizer for every micro-batch.
    local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
    step_tokens = int(accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum").item())
    if step_tokens == 0:
        logger.warning("step %d: the batch has no supervised token; the update is skipped "
                       "(check the data's prompt masking)", step + 1)
    if hook is not None and hook.before_step is not None:  # co-distillation: the peers step on the same batches
        with accelerator.autocast():
            hook.before_step(micro_batches, step_tokens, step)
    step_loss = torch.zeros((), device=accelerator.device)
    # sampled_reverse_kl's running baseline: this step uses the mean over earlier steps, then adds its own f.
    running = run.source.baseline
    baseline = running.value() if running is not None else 0.0
    rewards = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # f summed, tokens
    for m, batch in enumerate(micro_batches):
        sync = m == len(micro_batches) - 1
        with (contextlib.nullcontext() if sync else accelerator.no_sync(model)), accelerator.autocast():
            loss, stats = kd_step_loss(model, run.student_head, run.teacher, batch, step_tokens, cfg.loss, run.stats,
                                       run.hidden, baseline)
            # DDP averages gradients over processes; the loss is already a global-token mean.
            scaled = loss * accelerator.num_processes
        bad = accelerator.reduce(torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=accelerator.device), "sum")
        if bad.item() > 0:
            raise NonFiniteLossError(_diagnose_nonfinite(step, accelerator.unwrap_model(model), run.teacher, batch,
                                                         last_ckpt, scheduler.get_last_lr()[0]))
        accelerator.backward(scaled)
        step_loss += loss.detach()
        window.add(stats, batch)
        if running is not None:
            rewards += torch.stack([stats["div_sum"].double(), stats["count"].double()]).to(rewards.device)
    if running is not None:
        f_sum, count = accelerator.reduce(rewards, "sum").tolist()
        running.observe(f_sum, count)
    params = list(model.parameters()) + (list(run.hidden.parameters()) if run.hidden is not None else [])
    lr, grad_norm = apply_update(params, optimizer, scheduler, step_tokens, cfg.optim.max_grad_norm,
                                 clip=accelerator.clip_grad_norm_)
    window.loss += accelerator.reduce(step_loss, "sum").item()  # each process holds its share of the mean
    tokens = accelerator.reduce(torch.stack([b["attention_mask"].sum() for b in micro_batches]).sum(), "sum")
    return lr, grad_norm, int(tokens.item())


def apply_update(params: list, optimizer, scheduler, step_tokens: int, max_grad_norm: float | None,
                 clip: Callable = torch.nn.utils.clip_grad_norm_) -> tuple[float, float | None]:
    """The update that ends an optimizer step, once the gradients are in: clip them to ``max_grad_norm``, step
    the optimizer (not on a step without a supervised token), the schedule, and zero the gradients; returns
    (the lr used, the grad norm or None)."""
    grad_norm = None
    if max_grad_norm is not None and step_tokens > 0:
        grad_norm = float(clip(params, max_grad_norm))
    lr = scheduler.get_last_lr()[0]
    if step_tokens > 0:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, grad_norm


def model_step(model, head_fn, optimizer, scheduler, batches: list[dict], teacher, step_tokens: int, *,
               loss: LossConfig, max_grad_norm: float | None) -> None:
    """One optimizer step of a model trained beside the student (co-distillation's peers,
    :class:`distill.training_hooks.PeersHook`): the student's micro-batch loss (:func:`kd_step_loss`, toward
    ``teacher``'s signal) and update (:func:`apply_update`), with the step's normalizer ``step_tokens``."""
    for batch in batches:
        value, _ = kd_step_loss(model, head_fn, teacher, batch, step_tokens, loss)
        value.backward()
    apply_update(list(model.parameters()), optimizer, scheduler, step_tokens, max_grad_norm)


# --------------------------------------------------------------------------------------------------
# The run


def train(cfg: TrainConfig, resume: bool = False, on_step: Callback | None = None,
          on_eval: Callback | None = None) -> dict:
    """Train ``cfg`` (``--resume``: from its latest checkpoint); returns the summary. The ``distill`` log goes to
    the run's ``train.log`` while it runs, and only then: the handler is closed however the run ends.
    ``on_step`` and ``on_eval`` are called on the main process with each train-log record and each evaluation
    record, as they are written to ``metrics.jsonl``."""
    try:
        return _train(cfg, resume, Callbacks(on_step, on_eval))
    finally:
        _stop_logging_to_file(Path(cfg.out_dir) / "train.log")


def _train(cfg: TrainConfig, resume: bool, callbacks: Callbacks) -> dict:
    sharding.check_supported(cfg)  # FSDP / DeepSpeed launches distill cannot run, before anything starts
    accelerator = make_accelerator(cfg)
    resume_from = _begin(cfg, accelerator, resume)
    tokenizer, student, teacher, hook, hidden, source_class = _open_models(cfg, accelerator)
    train_ds, eval_ds = _read_data(cfg, accelerator, tokenizer, student, teacher)
    model, hidden, optimizer, scheduler = _prepare(cfg, accelerator, student, hidden)
    if resume_from is None and accelerator.num_processes == 1:  # a resumed student is not the one it starts from
        report = preflight.measure(accelerator.unwrap_model(model), tokenizer, teacher, {"train": train_ds, "eval": eval_ds},
                                   batch_size=cfg.train.batch_size, batches=1, device=accelerator.device,
                                   vocab_policy=cfg.loss.vocab_policy, teacher_spec=cfg.teacher)
        for line in filter(None, preflight.render(report)):
            logger.info("preflight: %s", line)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    run = Run(cfg, accelerator, tokenizer, model, teacher, train_ds, eval_ds, pad_id, hidden=hidden)
    run.source = source_class(cfg.train.batches, run.source_context())
    start_step, tokens_seen = _resume(run, hook, resume_from)
    if accelerator.is_main_process:
        dump_config(cfg, Path(cfg.out_dir) / "config.yaml")
    if cfg.log.tensorboard:
        accelerator.init_trackers("distill", config=_flat_hparams(cfg))
    metrics = MetricsWriter(accelerator, Path(cfg.out_dir) / "metrics.jsonl", start_step if resume_from else None,
                            callbacks)
    tokens_seen, last_eval = _loop(run, optimizer, scheduler, hook, metrics, start_step, tokens_seen, resume_from)
    return _finish(run, hook, {"steps": cfg.train.max_steps, "tokens": tokens_seen, **last_eval})


def _begin(cfg: TrainConfig, accelerator: Accelerator, resume: bool) -> Path | None:
    """The run's directory and log file; the checkpoint to resume from (``--resume``), or None. An earlier run's
    checkpoints without ``--resume`` are refused."""
    out_dir = Path(cfg.out_dir)
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)  # one process reports progress
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        _log_to_file(out_dir / "train.log")
    ckpt_root = out_dir / "checkpoints"
    resume_from = ckpt.latest_checkpoint(ckpt_root) if resume else None
    if resume and resume_from is None:
        logger.warning("--resume: no complete checkpoint in %s; starting from scratch", ckpt_root)
    if not resume and ckpt.list_checkpoints(ckpt_root):
        raise ValueError(
            f"{out_dir} already has checkpoints from an earlier run; pass --resume to continue it, "
            "or choose another out_dir"
        )
    return resume_from


def _open_models(cfg: TrainConfig, accelerator: Accelerator) -> tuple:
    """The tokenizer, the student, the teacher and its loop hook, the hidden-state term, and the batch source's
    type (which refuses a teacher that cannot score its batches before the data is read)."""
    tokenizer = load_tokenizer(cfg.student, "student")
    student = load_model(cfg.student, "student", tokenizer)
    resolve_vocab(student, len(tokenizer), "student", cfg.loss.vocab_policy)
    check_tokenizer_saves(student, tokenizer, "student")  # before training: student/ will reload its tokenizer
    if cfg.student.lora is not None:  # only the adapters train (distill/lora.py)
        student = lora.add_adapters(student, cfg.student.lora, seed=cfg.student.seed)
        logger.info("student: %s", lora.describe(student))
    teacher, hook = open_run_teacher(cfg, tokenizer, student, accelerator.device)
    hidden = hidden_state_loss(cfg.loss.hidden, student, teacher, cfg.train.seed) if cfg.loss.hidden else None
    source = source_type(cfg.train.batches)
    source.check_teacher(cfg.train.batches, TeacherView.of(teacher))  # before the data: a cache scores no new text
    logger.info("student: %.2fM parameters; teacher: %s; loss: %s", count_parameters(student) / 1e6,
                teacher.describe() if teacher is not None else "none (plain CE)",
                cfg.loss.describe() if teacher is not None else "CE")
    return tokenizer, student, teacher, hook, hidden, source


def open_run_teacher(cfg: TrainConfig, tokenizer, student, device) -> tuple:
    """The run's teacher and its loop hook (:func:`distill.teachers.open_teacher` with the run's settings), as
    training and the pre-flight report open it."""
    return open_teacher(
        cfg.teacher, tokenizer=tokenizer, student_ref=cfg.student.tokenizer or cfg.student.path, loss=cfg.loss.spec(),
        seq_len=cfg.data.seq_len, vocab_policy=cfg.loss.vocab_policy, device=device, student=student,
        optimizer_for=functools.partial(make_optimizer, cfg=cfg),
        model_step=functools.partial(model_step, loss=cfg.loss, max_grad_norm=cfg.optim.max_grad_norm),
        crosstok=cfg.loss.crosstok, cache_dir=cfg.out_dir)


def _read_data(cfg: TrainConfig, accelerator: Accelerator, tokenizer, student, teacher: Teacher | None) -> tuple:
    """The train and eval splits, no longer than the models allow, checked against the teacher."""
    limits = [m for m in (max_positions(student), teacher and teacher.max_positions) if m]
    with accelerator.main_process_first():  # the main process fills the datasets cache first
        train_ds, eval_ds = build_datasets(cfg.data, tokenizer, max_positions=min(limits) if limits else None)
    if teacher is not None and teacher.check_data is not None:
        teacher.check_data(train_ds, eval_ds)  # e.g. refuse cached targets of other data before training
    logger.info("data: %d train / %d eval examples of up to %d tokens", len(train_ds),
                len(eval_ds) if eval_ds is not None else 0, cfg.data.seq_len)
    return train_ds, eval_ds


def _prepare(cfg: TrainConfig, accelerator: Accelerator, student, hidden) -> tuple:
    """The student (and the hidden-state term's projections), the optimizer and the schedule, prepared by
    accelerate: (model, hidden, optimizer, scheduler)."""
    if hidden is not None and any(True for _ in hidden.parameters()):
        # The projections train with the student and are saved in checkpoints (accelerate's second model),
        # never in the student's own checkpoint.
        model, hidden, optimizer, scheduler = accelerator.prepare(student, hidden.to(accelerator.device),
                                                                  *make_optimizer(student, cfg, hidden))
    else:
        model, optimizer, scheduler = accelerator.prepare(student, *make_optimizer(student, cfg))
    if cfg.student.lora is not None:
        lora.adapter_only_checkpoints(accelerator)  # checkpoints hold the adapters, not the frozen base
    return model, hidden, optimizer, scheduler


def _resume(run: Run, hook: LoopHook | None, resume_from: Path | None) -> tuple[int, int]:
    """Continue from ``resume_from`` (the model, optimizer, schedule and RNG states, the batch source's and the
    hook's): (the step to start at, tokens seen so far)."""
    if resume_from is None:
        return 0, 0
    accelerator = run.accelerator
    accelerator.load_state(str(resume_from), **({"strict": False} if run.cfg.student.lora is not None else {}))
    state = ckpt.read_state(resume_from)
    source_state = _source_state(resume_from, accelerator)
    if source_state is not None:  # the batch source of this process (distillm: its buffer and threshold)
        run.source.load_state_dict(source_state)
    if (resume_from / TEACHER_STATE).is_file() and hook is not None:  # a teacher that changes the loop
        hook.load_state_dict(load_file(str(resume_from / TEACHER_STATE), device=str(accelerator.device)))
    logger.info("resumed from %s (step %d)", resume_from, state["step"])
    return state["step"], state["tokens_seen"]


def _loop(run: Run, optimizer, scheduler, hook: LoopHook | None, metrics: MetricsWriter, start_step: int,
          tokens_seen: int, last_ckpt: Path | None) -> tuple[int, dict]:
    """The steps from ``start_step`` on: each step's micro-batches from the batch source, the optimizer step,
    the train log, periodic evaluation and checkpoints; returns (tokens seen, the last evaluation)."""
    cfg, accelerator, teacher, source = run.cfg, run.accelerator, run.teacher, run.source
    source_ctx = run.source_context()
    run.model.train()
    progress = tqdm(total=cfg.train.max_steps, initial=start_step, desc="train", unit="step",
                    disable=not (accelerator.is_main_process and cfg.log.progress), dynamic_ncols=True,
                    mininterval=0.5 if sys.stderr.isatty() else 30.0)  # keep redirected logs short
    window = Window(accelerator, start_step, teacher.names if teacher is not None else None, run.hidden is not None)
    last_eval: dict = {}
    # A source whose batches depend on the step alone hands the next step's to a teacher that prepares its signal
    # ahead (a cache decodes them on a helper thread while this step trains).
    prefetch = teacher.prefetch if teacher is not None and source.ahead else None
    ahead: list[dict] | None = None
    for step in range(start_step, cfg.train.max_steps):
        micro_batches = ahead if ahead is not None else source.batches(source_ctx, step)
        ahead = None
        if prefetch is not None:
            if step == start_step:
                for batch in micro_batches:
                    prefetch(batch)
            if step + 1 < cfg.train.max_steps:
                ahead = source.batches(source_ctx, step + 1)
                for batch in ahead:
                    prefetch(batch)
        lr, grad_norm, tokens = optimizer_step(run, optimizer, scheduler, micro_batches, step, window, last_ckpt, hook)
        tokens_seen += tokens
        done = step + 1
        if hook is not None:
            hook.after_step(accelerator.unwrap_model(run.model), done)  # self-distillation: the teacher follows

        if done % cfg.log.every == 0 or done == cfg.train.max_steps:
            record = window.record(done, lr, tokens_seen, grad_norm, with_teacher=teacher is not None,
                                   extra=run.stats, source=source)
            run.stats = {}
            metrics.write(record)
            progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        progress.update(1)

        if run.eval_ds is not None and ((cfg.eval.every and done % cfg.eval.every == 0) or done == cfg.train.max_steps):
            last_eval = evaluate(run)
            source.observe_eval(last_eval)
            metrics.write({"step": done, "split": "eval", **last_eval})
            logger.info("step %d eval: %s", done, _fmt(last_eval))

        if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == cfg.train.max_steps:
            last_ckpt = save_checkpoint(accelerator, cfg, done, {"step": done, "tokens_seen": tokens_seen}, source,
                                        hook)
    progress.close()
    return tokens_seen, last_eval


def _finish(run: Run, hook: LoopHook | None, summary: dict) -> dict:
    """The trained student (and the hook's models) written; the run's trackers closed; returns ``summary``."""
    accelerator = run.accelerator
    student_dir = save_student(accelerator, run.model, run.tokenizer, run.cfg, summary)
    if hook is not None and hook.save is not None and accelerator.is_main_process:
        hook.save(Path(run.cfg.out_dir), run.tokenizer)  # co-distillation: every peer as a Hugging Face checkpoint
    if accelerator.is_main_process:
        logger.info("student written to %s", student_dir)
    accelerator.end_training()
    return summary


# --------------------------------------------------------------------------------------------------


def _fmt(d: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


def _flat_hparams(cfg: TrainConfig) -> dict:
    flat = {}

    def walk(prefix, node):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            elif isinstance(v, (int, float, str, bool)):
                flat[f"{prefix}{k}"] = v

    walk("", cfg.model_dump(mode="json"))
    return flat


def _log_to_file(path: Path) -> None:
    """Send the ``distill`` log to this run's ``train.log`` (and stop sending it to earlier runs' logs)."""
    for h in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        if Path(h.baseFilename) == path.resolve():
            return
        logger.removeHandler(h)
        h.close()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)


def _stop_logging_to_file(path: Path) -> None:
    for h in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        if Path(h.baseFilename) == path.resolve():
            logger.removeHandler(h)
            h.close()
