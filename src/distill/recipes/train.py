"""Train a student from a teacher (token-level KD), or from data alone when there is no teacher.

    distill train configs/tiny/train.yaml out_dir=runs/tiny            # tiny CPU run, < 1 minute
    distill train my.yaml loss.divergence=jsd loss.beta=0.9 --resume   # continue the latest checkpoint
    accelerate launch --multi_gpu --num_processes 2 -m distill train my.yaml   # data parallel (CPU too: gloo)

Loss per supervised token: ``alpha * CE + (1 - alpha) * T^2 * D(p_T || q_T)`` (``losses.py``). The
reduction divides by the number of supervised tokens in the whole optimizer step (all micro-batches,
all processes), so the step's gradient does not depend on how the global batch is split.

Data order is a pure function of (seed, step): step ``s`` uses global examples ``[s*G, (s+1)*G)`` of a
per-epoch permutation, ``G = batch_size * grad_accum * processes``. Resuming needs no data iterator
state, and 1 process with ``grad_accum=2`` sees the same batches as 2 processes with ``grad_accum=1``.

Writes into ``out_dir``: ``config.yaml`` (resolved), ``metrics.jsonl``, ``train.log``,
``checkpoints/step_XXXXXXXX/`` (accelerate state + ``trainer_state.json``), ``student/`` (an ordinary
Hugging Face checkpoint with its tokenizer), and ``tensorboard/`` when ``log.tensorboard`` is set.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration
from tqdm.auto import tqdm

from distill import checkpoint as ckpt
from distill.cache import TeacherCache, data_fingerprint
from distill.chunked import chunked_kd_loss, naive_kd_loss
from distill.config import LoopConfig, LossConfig, OptimConfig, TeacherCacheSpec, TrainConfig, dump_config
from distill.data import build_datasets, collate
from distill.evaluate import eval_sums, final_hidden, flat_positions, metrics_from_sums
from distill.losses import IGNORE_INDEX, ZERO_TEACHER_MASS_OK
from distill.models import (
    check_tokenizers_agree,
    count_parameters,
    load_model,
    load_tokenizer,
    max_positions,
    output_head,
    resolve_vocab,
)
from distill.tokenizer import tokenizer_fingerprint

logger = logging.getLogger("distill")


class NonFiniteLossError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------------
# Pieces the loop uses


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def example_indices(step: int, micro: int, rank: int, world: int, loop: LoopConfig, n: int) -> list[int]:
    """Dataset rows of one micro-batch: a pure function of the step, so resume needs no iterator."""
    global_batch = loop.batch_size * loop.grad_accum * world
    start = step * global_batch + (micro * world + rank) * loop.batch_size
    out = []
    for k in range(start, start + loop.batch_size):
        epoch, offset = divmod(k, n)
        out.append(_epoch_permutation(n, loop.seed, epoch)[offset])
    return out


def lr_lambda(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio``."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    progress = (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cosine


def kd_step_loss(model, student_head_fn, teacher, teacher_head, batch, num_tokens, loss: LossConfig):
    """Loss of one micro-batch (already divided by ``num_tokens``) and its summed statistics.

    The teacher signal is the live teacher's final hidden states + output layer, the cached sparse
    targets carried in the batch, or nothing (plain CE).
    """
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    teacher_signal = batch.get("teacher_target")  # cached sparse targets, aligned with labels[:, 1:]
    if teacher is not None:
        with torch.no_grad():
            teacher_signal = (flat_positions(final_hidden(teacher, batch)), teacher_head)

    hidden = flat_positions(final_hidden(model, batch))
    head = student_head_fn()
    kw = dict(kind=loss.divergence, temperature=loss.temperature, alpha=loss.alpha, t2_scale=loss.t2_scale,
              beta=loss.beta, skew=loss.skew)
    labels = labels.reshape(-1)
    if loss.chunked:
        return chunked_kd_loss(hidden, head, labels, teacher_signal, num_tokens, chunk_size=loss.chunk_size, **kw)
    # The reference path (materialized logits, plain autograd); statistics come from a no-grad pass.
    value = naive_kd_loss(hidden, head, labels, teacher_signal, num_tokens, **kw)
    with torch.no_grad():
        _, stats = chunked_kd_loss(hidden.detach(), head, labels, teacher_signal, num_tokens, **kw)
    return value, stats


def _diagnose_nonfinite(step: int, model, teacher, batch, last_ckpt: Path | None, lr: float) -> str:
    """Say which part went non-finite, so the user knows what to change."""
    causes = []
    bad_params = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad_params:
        causes.append(f"student weights are non-finite ({', '.join(bad_params[:3])}...): the last update diverged")
    with torch.no_grad():
        if teacher is not None and not torch.isfinite(final_hidden(teacher, batch)).all():
            causes.append("the teacher's hidden states are non-finite (a broken teacher checkpoint or fp16 overflow)")
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


def evaluate(accelerator, model, student_head_fn, teacher, teacher_head, eval_ds, cfg: TrainConfig,
             collate_fn) -> dict:
    """Held-out CE/perplexity and, with a teacher, KL(p||q) at T=1 and top-1 agreement (all processes)."""
    bs = cfg.eval.batch_size
    chosen = eval_batch_indices(math.ceil(len(eval_ds) / bs), cfg.eval.max_batches)
    mine = chosen[accelerator.process_index :: accelerator.num_processes]
    batches = (collate_fn([eval_ds[i] for i in range(b * bs, min((b + 1) * bs, len(eval_ds)))]) for b in mine)
    sums = eval_sums(accelerator.unwrap_model(model), student_head_fn(), batches, teacher, teacher_head,
                     autocast=accelerator.autocast)
    sums = accelerator.reduce(sums.to(accelerator.device), "sum").cpu()
    return metrics_from_sums(sums, with_teacher=teacher is not None)


def eval_batch_indices(total: int, max_batches: int | None) -> list[int]:
    """Which of ``total`` eval batches to run: all, or ``max_batches`` of them evenly spread over the split
    (so a capped eval is a sample of the whole split, not of its beginning)."""
    if not max_batches or max_batches >= total:
        return list(range(total))
    return [(j * total) // max_batches for j in range(max_batches)]


class MetricsWriter:
    """metrics.jsonl (always) and TensorBoard (through accelerate's tracker) on the main process."""

    def __init__(self, accelerator: Accelerator, path: Path, resume_step: int | None):
        self.accelerator, self.path = accelerator, path
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


def save_checkpoint(accelerator: Accelerator, cfg: TrainConfig, step: int, state: dict) -> Path:
    root = Path(cfg.out_dir) / "checkpoints"
    final = ckpt.step_dir(root, step)
    tmp = ckpt.tmp_dir_for(final)
    if accelerator.is_main_process:
        ckpt.prune_checkpoints(root, keep_last=cfg.checkpoint.keep_last + 1)  # clears stale *.tmp too
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
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
    if accelerator.is_main_process:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        dump_config(cfg, tmp / "distill_config.yaml")
        ckpt.atomic_write_json(tmp / "distill_summary.json", summary)
        ckpt.commit_dir(tmp, final)
    accelerator.wait_for_everyone()
    return final


# --------------------------------------------------------------------------------------------------
# The recipe


def main(cfg: TrainConfig, resume: bool = False) -> dict:
    out_dir = Path(cfg.out_dir)
    # Each run sets its own precision: forget an earlier run's settings in this process (the process
    # group itself, PartialState, is kept).
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        cpu=not _has_accelerator(),  # on a CPU-only machine, lets launched processes form a gloo group
        mixed_precision="bf16" if cfg.train.precision == "bf16" else "no",
        log_with="tensorboard" if cfg.log.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "tensorboard")),
        step_scheduler_with_optimizer=False,  # we step the scheduler exactly once per optimizer step
    )
    is_main = accelerator.is_main_process
    if not is_main:
        logger.setLevel(logging.WARNING)  # one process reports progress
    world = accelerator.num_processes
    if is_main:
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

    # 1. Tokenizer and models. ------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.student, "student")
    vocab = len(tokenizer)
    student = load_model(cfg.student, "student", tokenizer)
    resolve_vocab(student, vocab, "student", cfg.loss.vocab_policy)
    teacher = cache = None
    if isinstance(cfg.teacher, TeacherCacheSpec):
        cache = open_teacher_cache(cfg, tokenizer)
    elif cfg.teacher is not None:
        teacher_tok = load_tokenizer(cfg.teacher, "teacher")
        check_tokenizers_agree(tokenizer, teacher_tok, cfg.student.tokenizer or cfg.student.path,
                               cfg.teacher.tokenizer or cfg.teacher.path)
        teacher = load_model(cfg.teacher, "teacher", teacher_tok)
        resolve_vocab(teacher, vocab, "teacher", cfg.loss.vocab_policy)
        teacher.to(accelerator.device).eval().requires_grad_(False)
    limits = [m for m in (max_positions(student), teacher and max_positions(teacher)) if m]
    described = (f"; teacher: {count_parameters(teacher) / 1e6:.2f}M" if teacher is not None
                 else f"; teacher: {cache.mode} targets from {cache.path}" if cache is not None
                 else " (no teacher: plain CE)")
    logger.info("student: %.2fM parameters%s", count_parameters(student) / 1e6, described)

    # 2. Data. ----------------------------------------------------------------------------------------
    with accelerator.main_process_first():  # the main process fills the datasets cache first
        train_ds, eval_ds = build_datasets(cfg.data, tokenizer, max_positions=min(limits) if limits else None)
    if cache is not None:  # refuse targets of other data before training on them
        cache.check_compatible(data_fingerprint=data_fingerprint(train_ds), num_examples=len(train_ds))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate_fn = functools.partial(_collate_to, pad_token_id=pad_id, device=accelerator.device)
    logger.info("data: %d train / %d eval examples of up to %d tokens", len(train_ds),
                len(eval_ds) if eval_ds is not None else 0, cfg.data.seq_len)

    # 3. Optimizer and schedule. ---------------------------------------------------------------------
    decay = [p for n, p in student.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in student.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_lambda, optim=cfg.optim, max_steps=cfg.train.max_steps)
    )
    model, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    student_head_fn = lambda: output_head(accelerator.unwrap_model(model), vocab)  # noqa: E731
    teacher_head = output_head(teacher, vocab) if teacher is not None else None

    # 4. Resume. --------------------------------------------------------------------------------------
    start_step, tokens_seen = 0, 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state = ckpt.read_state(resume_from)
        start_step, tokens_seen = state["step"], state["tokens_seen"]
        logger.info("resumed from %s (step %d)", resume_from, start_step)
    if is_main:
        dump_config(cfg, out_dir / "config.yaml")
    if cfg.log.tensorboard:
        accelerator.init_trackers("distill", config=_flat_hparams(cfg))
    metrics = MetricsWriter(accelerator, out_dir / "metrics.jsonl", start_step if resume_from else None)
    last_ckpt = resume_from

    # 5. The loop. ------------------------------------------------------------------------------------
    model.train()
    progress = tqdm(total=cfg.train.max_steps, initial=start_step, desc="train", unit="step",
                    disable=not (is_main and cfg.log.progress), dynamic_ncols=True,
                    mininterval=0.5 if sys.stderr.isatty() else 30.0)  # keep redirected logs short
    # Running sums since the last log line: ce, div, kl, supervised count, tokens (reduced over processes).
    window = torch.zeros(5, dtype=torch.float64, device=accelerator.device)
    window_loss, window_from, window_t0 = 0.0, start_step, time.perf_counter()
    last_eval: dict = {}
    for step in range(start_step, cfg.train.max_steps):
        micro_batches = [load_batch(train_ds, example_indices(step, m, accelerator.process_index, world, cfg.train,
                                                              len(train_ds)), collate_fn, cache, accelerator.device)
                         for m in range(cfg.train.grad_accum)]
        # Supervised tokens in the whole step, all processes: the one normalizer for every micro-batch.
        local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
        step_tokens = int(accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum").item())
        if step_tokens == 0:
            logger.warning("step %d: the batch has no supervised token; the update is skipped "
                           "(check the data's prompt masking)", step + 1)
        step_loss = torch.zeros((), device=accelerator.device)
        for m, batch in enumerate(micro_batches):
            sync = m == len(micro_batches) - 1
            with (contextlib.nullcontext() if sync else accelerator.no_sync(model)), accelerator.autocast():
                loss, stats = kd_step_loss(model, student_head_fn, teacher, teacher_head, batch, step_tokens,
                                           cfg.loss)
                # DDP averages gradients over processes; the loss is already a global-token mean.
                scaled = loss * world
            bad = accelerator.reduce(torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=accelerator.device),
                                     "sum")
            if bad.item() > 0:
                raise NonFiniteLossError(_diagnose_nonfinite(step, accelerator.unwrap_model(model), teacher, batch,
                                                             last_ckpt, scheduler.get_last_lr()[0]))
            accelerator.backward(scaled)
            step_loss += loss.detach()
            window += torch.stack([stats.get(k, torch.zeros(())).double().to(window.device)
                                   for k in ("ce_sum", "div_sum", "kl_sum", "count")]
                                  + [batch["attention_mask"].sum().double()])
        grad_norm = None
        if cfg.optim.max_grad_norm is not None and step_tokens > 0:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        if step_tokens > 0:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss = accelerator.reduce(step_loss, "sum").item()  # each process holds its share of the mean
        tokens_seen += int(accelerator.reduce(torch.stack([b["attention_mask"].sum() for b in micro_batches]).sum(),
                                              "sum").item())
        window_loss += step_loss
        done = step + 1

        if done % cfg.log.every == 0 or done == cfg.train.max_steps:
            ce_sum, div_sum, kl_sum, count, tokens = accelerator.reduce(window, "sum").tolist()
            count = max(count, 1.0)
            record = {"step": done, "split": "train", "loss": window_loss / max(done - window_from, 1),
                      "ce": ce_sum / count, "lr": lr, "tokens_seen": tokens_seen,
                      "tokens_per_s": tokens / max(time.perf_counter() - window_t0, 1e-9)}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            if teacher is not None or cache is not None:
                record["kl"] = kl_sum / count
                record["div"] = div_sum / count
            metrics.write(record)
            progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            window.zero_()
            window_loss, window_from, window_t0 = 0.0, done, time.perf_counter()
        progress.update(1)

        if eval_ds is not None and ((cfg.eval.every and done % cfg.eval.every == 0) or done == cfg.train.max_steps):
            last_eval = evaluate(accelerator, model, student_head_fn, teacher, teacher_head, eval_ds, cfg,
                                 collate_fn)
            metrics.write({"step": done, "split": "eval", **last_eval})
            logger.info("step %d eval: %s", done, _fmt(last_eval))

        if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == cfg.train.max_steps:
            last_ckpt = save_checkpoint(accelerator, cfg, done, {"step": done, "tokens_seen": tokens_seen})
    progress.close()

    summary = {"steps": cfg.train.max_steps, "tokens": tokens_seen, **last_eval}
    student_dir = save_student(accelerator, model, tokenizer, cfg, summary)
    if is_main:
        logger.info("student written to %s", student_dir)
    accelerator.end_training()
    return summary


# --------------------------------------------------------------------------------------------------


def open_teacher_cache(cfg: TrainConfig, tokenizer) -> TeacherCache:
    """Open ``teacher: {cache: DIR}`` and refuse one that does not fit this run."""
    spec = cfg.teacher
    cache = TeacherCache(spec.cache, topk_tail=spec.topk_tail)
    cache.check_compatible(tokenizer_fingerprint(tokenizer), len(tokenizer), cfg.data.seq_len)
    if abs(cache.temperature - cfg.loss.temperature) > 1e-9:
        raise ValueError(
            f"teacher.cache: the targets in {spec.cache} were captured at temperature {cache.temperature}, but "
            f"loss.temperature={cfg.loss.temperature}; set loss.temperature={cache.temperature} or rebuild the cache"
        )
    if cache.mode == "sampled" and cfg.loss.divergence not in ZERO_TEACHER_MASS_OK:
        raise ValueError(
            f"loss.divergence={cfg.loss.divergence} is infinite on sampled targets (the teacher puts no mass "
            f"outside the sampled ids); use one of {', '.join(ZERO_TEACHER_MASS_OK)}"
        )
    return cache


def load_batch(dataset, indices: list[int], collate_fn, cache: TeacherCache | None, device) -> dict:
    examples = [dataset[i] for i in indices]
    batch = collate_fn(examples)
    if cache is not None:
        width = batch["input_ids"].shape[1]
        batch["teacher_target"] = cache.batch_target(indices, examples, width=width).to(device)
    return batch


def _has_accelerator() -> bool:
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool((xpu is not None and xpu.is_available()) or torch.backends.mps.is_available())


def _collate_to(examples, pad_token_id: int, device) -> dict:
    return {k: v.to(device) for k, v in collate(examples, pad_token_id).items()}


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
