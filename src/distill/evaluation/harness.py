"""Downstream tasks through lm-evaluation-harness (the ``lm-eval`` extra), on a model already in memory.

``distill eval`` calls :func:`run_tasks` for each model when its config has an ``lm_eval`` section. The
model and tokenizer are handed to lm-eval's ``HFLM`` as objects (no second load, the same vocabulary
policy as the rest of the evaluation); tasks are lm-eval's by name, or defined in YAML files under
``include_path`` (a task over local JSON data needs no network). Only lm-eval's built-in task index is
skipped when ``include_path`` is given (indexing hundreds of task files takes most of a small run's time),
unless ``include_defaults: true``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from distill.config import LmEvalConfig

logger = logging.getLogger("distill")


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError("lm_eval: lm-evaluation-harness is not installed; pip install 'distill[lm-eval]'") from None
    return lm_eval, HFLM, TaskManager


def run_tasks(model, tokenizer, cfg: LmEvalConfig, device) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` (lm-eval's metric keys, e.g. ``acc,none``, and their stderr)."""
    lm_eval, HFLM, TaskManager = _lm_eval()
    include = None
    if cfg.include_path is not None:
        path = Path(cfg.include_path).expanduser()
        if not path.is_dir():
            raise ValueError(f"lm_eval.include_path: {cfg.include_path} is not a directory of task YAML files")
        include = str(path)
    defaults = cfg.include_defaults if cfg.include_defaults is not None else include is None
    manager = TaskManager(include_path=include, include_defaults=defaults)
    unknown = [t for t in cfg.tasks if t not in manager.all_tasks]
    if unknown:
        where = f"in {include}" + (" or lm-eval's built-in tasks" if defaults else "") if include else "in lm-eval"
        raise ValueError(f"lm_eval.tasks: no task named {', '.join(map(repr, unknown))} {where}")
    was_training = model.training
    lm = HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=cfg.batch_size, device=str(device))
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                                      task_manager=manager, log_samples=False)
    finally:
        model.train(was_training)
    return {task: {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for task, metrics in out["results"].items()}
