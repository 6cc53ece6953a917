"""Before a training run (``distill preflight``): what it starts from and what it costs, on its own data.

    distill preflight configs/tiny/train.yaml                  # the config distill train takes
    distill preflight my.yaml teacher.path=big --json pre.json    # and the numbers as JSON

On a few batches of the train split (and of the eval split when there is one): the teacher's loss and bits per
byte, the student's starting loss and bits per byte and the gap between them; the vocabulary's fit to each
output layer; one teacher signal against one student training step on the same micro-batch (a cache's size
on disk); and what the project's own measurements (the quickstart's, and the distillation map of
``benchmarks/results/kd_map.json``) say to expect. ``distill train`` logs the same report on
one batch per split before its first step. See ``docs/preflight.md`` and :mod:`distill.evaluation.preflight`.
"""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator

from distill import lora
from distill.checkpoint import atomic_write_json
from distill.config import TrainConfig
from distill.data import build_datasets
from distill.evaluation.preflight import measure, render
from distill.models import has_accelerator, load_model, load_tokenizer, max_positions
from distill.training import open_run_teacher

BATCHES = 4  # micro-batches per split: enough for a loss to two digits on small data, seconds on CPU


def main(cfg: TrainConfig, batches: int = BATCHES, json_out: str | Path | None = None) -> dict:
    """Measure ``cfg``'s run as the module docstring says; prints the report and returns its numbers
    (also written to ``json_out``)."""
    device = Accelerator(cpu=not has_accelerator()).device
    tokenizer = load_tokenizer(cfg.student, "student")
    # Not checked against the tokenizer here (training refuses too few rows): the report counts what it misses.
    student = load_model(cfg.student, "student", tokenizer).to(device)
    if cfg.student.lora is not None:  # as the run trains it: a LoRA student's base can be its teacher
        student = lora.add_adapters(student, cfg.student.lora, seed=cfg.student.seed)
    teacher, _ = open_run_teacher(cfg, tokenizer, student, device)
    limits = [m for m in (max_positions(student), teacher and teacher.max_positions) if m]
    train_ds, eval_ds = build_datasets(cfg.data, tokenizer, max_positions=min(limits) if limits else None)
    if teacher is not None and teacher.check_data is not None:
        teacher.check_data(train_ds, eval_ds)
    report = measure(student, tokenizer, teacher, {"train": train_ds, "eval": eval_ds}, batch_size=cfg.train.batch_size,
                     batches=batches, device=device, vocab_policy=cfg.loss.vocab_policy,
                     teacher_spec=cfg.teacher)
    print("\n".join(render(report)))
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(json_out), report)
    return report
