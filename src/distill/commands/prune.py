"""Prune a Hugging Face model to smaller sizes (Minitron), ready to be distilled from the original.

    distill prune configs/tiny/prune.yaml out_dir=runs/tiny-pruned          # seconds on CPU
    distill train configs/tiny/train.yaml student.path=runs/tiny-pruned student.config=null   # then distill

1. The model and its tokenizer; families llama, qwen2, qwen3, gemma2 (anything else is refused first).
2. Calibration: ``importance.samples`` examples of the data section's train split, evenly spread.
3. Importance of heads, MLP neurons, embedding channels and layers from activations
   (``distill.pruning.importance.score``; docs/methods.md §10), and the calibration loss of the model (one plain forward pass, timed: the cost of
   pruning is reported against it).
4. The plan for the target (explicit sizes, or a parameter budget over ``target.axes``) and the sliced model.
5. The report: the calibration loss before any training of the chosen plan and, at about the same parameter
   count, of width-only and depth-only plans (depth ranked by each layer metric).
6. ``out_dir``: an ordinary HF checkpoint (config, weights, tokenizer) with ``prune_report.json`` (written
   last) and ``prune_report.md``; written under a temporary name and renamed.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig

from distill import checkpoint as ckpt
from distill.config import PruneConfig, dump_config
from distill.data import build_datasets, collate
from distill.models import (
    check_tokenizer_saves,
    count_parameters,
    load_model,
    load_tokenizer,
    max_positions,
    resolve_vocab,
    save_pretrained,
)
from distill.pruning.importance import Importance, calibration_loss, score
from distill.pruning.plan import Plan, comparison_plans, make_plan
from distill.pruning.report import evaluate_plans, report_markdown, spearman
from distill.pruning.sizes import (
    check_family,
    check_sizes,
    explicit_sizes,
    model_sizes,
    param_count,
    sizes_for_budget,
)
from distill.pruning.slicing import slice_model

logger = logging.getLogger("distill")

REPORT = "prune_report.json"


def model_type(cfg: PruneConfig) -> str | None:
    """The family, read before any weight is loaded."""
    if cfg.model.config is not None:
        return cfg.model.config.get("model_type")
    path = os.path.expanduser(cfg.model.path)
    try:
        return AutoConfig.from_pretrained(path).model_type
    except (OSError, ValueError) as exc:
        raise ValueError(f"model.path: cannot read a model config from {cfg.model.path!r}: {exc}") from None


def check_out_dir(cfg: PruneConfig) -> Path:
    out = Path(cfg.out_dir).expanduser()
    if cfg.model.path is not None and out.resolve() == Path(cfg.model.path).expanduser().resolve():
        raise ValueError(f"out_dir={cfg.out_dir} is the model being pruned; choose another out_dir")
    if out.exists() and not (out / REPORT).is_file():
        raise ValueError(f"out_dir={cfg.out_dir} exists and is not the output of distill prune (no {REPORT}); "
                         "choose another out_dir or remove it")
    if out.exists() and not cfg.overwrite:
        raise ValueError(f"out_dir={cfg.out_dir} already holds a pruned model; choose another out_dir, or pass "
                         "overwrite=true to replace it")
    return out


def calibration_batches(cfg: PruneConfig, tokenizer, model) -> list[dict]:
    train_ds, _ = build_datasets(cfg.data, tokenizer, max_positions=max_positions(model))
    n = len(train_ds)
    if n == 0:
        raise ValueError(f"data.source={cfg.data.source}: no calibration example; give data with text")
    k = min(cfg.importance.samples, n)
    if k < cfg.importance.samples:
        logger.warning("calibration: importance.samples=%d but the data has %d examples; using all of them",
                       cfg.importance.samples, n)
    rows = [(j * n) // k for j in range(k)]  # evenly spread over the split
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bs = cfg.importance.batch_size
    device = next(model.parameters()).device
    return [{key: v.to(device) for key, v in collate([train_ds[i] for i in rows[b:b + bs]], pad).items()}
            for b in range(0, k, bs)]


@dataclass
class Calibration:
    """The calibration data and what the passes over the original model measured on it."""

    batches: list[dict]
    examples: int
    tokens: int
    loss: float  # the original model's calibration loss
    forward_seconds: float  # one plain forward pass over the batches: what the pruning costs are reported against
    imp: Importance


@dataclass
class Pruned:
    """The chosen plan and the model it cut."""

    plan: Plan
    model: torch.nn.Module
    metric: str  # what ranked the layers
    seconds: float  # planning and slicing


def main(cfg: PruneConfig, on_eval: Callable[[str, dict], object] | None = None) -> dict:
    """Prune ``cfg.model`` to ``cfg.target`` and write ``cfg.out_dir``: the steps of the module docstring, in
    order. Returns the report. ``on_eval`` is told of each plan's calibration loss and parameters, ``(name,
    row)``, as it is measured (the original, the chosen plan, then the comparison plans)."""
    family = check_family(model_type(cfg))
    out = check_out_dir(cfg)
    tokenizer, model, orig = load(cfg, family)  # 1
    sizes = target_sizes(cfg, model, family)  # 2
    vocab = len(tokenizer)
    cal = calibrate(cfg, tokenizer, model, vocab, sizes["num_hidden_layers"] < orig["num_hidden_layers"])  # 3
    pruned = prune(cfg, model, cal.imp, sizes)  # 4
    plans, report_seconds = compare_plans(cfg, model, orig, sizes, family, vocab, cal, pruned, on_eval)  # 5
    report = build_report(cfg, family, cal, pruned, plans, report_seconds)
    write_output(out, cfg, pruned.model, tokenizer, report)  # 6
    return report


def load(cfg: PruneConfig, family: str):
    """Step 1: the tokenizer, the model (its vocabulary the tokenizer's, on one device, in eval mode) and its
    sizes."""
    tokenizer = load_tokenizer(cfg.model, "model")
    model = load_model(cfg.model, "model", tokenizer)
    resolve_vocab(model, len(tokenizer), "model", "truncate")
    check_tokenizer_saves(model, tokenizer, "model")  # before the passes: the output will reload its tokenizer
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()  # forward passes only: one device
    orig = model_sizes(model.config)
    logger.info("model: %s, %.2fM parameters, %s", family, count_parameters(model) / 1e6,
                ", ".join(f"{k}={v}" for k, v in orig.items()))
    return tokenizer, model, orig


def target_sizes(cfg: PruneConfig, model, family: str) -> dict[str, int]:
    """Step 2: the target sizes, explicit or for a parameter budget; checked before the data and the passes, so
    that a bad target fails fast."""
    target = cfg.target
    if target.params is not None:
        sizes = sizes_for_budget(model, target.params, target.axes, target.multiple_of, family)
    else:
        sizes = explicit_sizes(model.config, target.model_dump())
        check_sizes(model.config, sizes, family)
    logger.info("target: %s (%s parameters)", ", ".join(f"{k}={v}" for k, v in sizes.items()),
                f"{param_count(model, sizes):,}")
    return sizes


def calibrate(cfg: PruneConfig, tokenizer, model, vocab: int, depth_changes: bool) -> Calibration:
    """Step 3: the calibration batches, the model's calibration loss (one timed forward pass) and the
    importance scores. The layer-drop losses cost one pass per layer: computed when they rank the kept layers
    (``depth_changes``: the target drops layers) or the report compares the two layer metrics."""
    batches = calibration_batches(cfg, tokenizer, model)
    n_tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    n_examples = sum(len(b["input_ids"]) for b in batches)
    logger.info("calibration: %d examples, %d tokens", n_examples, n_tokens)
    t0 = time.perf_counter()
    with torch.no_grad():
        base_loss = calibration_loss(model, batches, vocab)
    forward_seconds = time.perf_counter() - t0
    imp = score(model, batches, vocab,
                layer_loss=cfg.report or (depth_changes and cfg.importance.layer_metric == "loss"))
    logger.info("importance: %s", ", ".join(f"{k} {v:.2f} s" for k, v in imp.seconds.items()))
    if imp.layer_loss is not None:
        logger.info("layer loss increase when skipped: %s", ", ".join(f"{x:.4f}" for x in imp.layer_loss.tolist()))
    logger.info("layer cosine distance: %s", ", ".join(f"{x:.4f}" for x in imp.layer_cosine.tolist()))
    return Calibration(batches, n_examples, n_tokens, base_loss, forward_seconds, imp)


def prune(cfg: PruneConfig, model, imp: Importance, sizes: dict[str, int]) -> Pruned:
    """Step 4: the plan for the target sizes and the model it cuts (layers ranked by the configured metric, or
    by cosine distance when the layer-drop losses were not computed: then every layer is kept)."""
    metric = cfg.importance.layer_metric if imp.layer_loss is not None else "cosine"
    t0 = time.perf_counter()
    plan = make_plan(model.config, imp, sizes, metric)
    pruned = slice_model(model, plan)
    seconds = time.perf_counter() - t0
    assert model_sizes(pruned.config) == sizes, (model_sizes(pruned.config), sizes)
    return Pruned(plan, pruned, metric, seconds)


def compare_plans(cfg: PruneConfig, model, orig: dict[str, int], sizes: dict[str, int], family: str, vocab: int,
                  cal: Calibration, pruned: Pruned, on_eval: Callable[[str, dict], object] | None = None
                  ) -> tuple[dict, float]:
    """Step 5: the calibration loss and parameters of the original, the chosen plan and (``cfg.report``)
    width-only and depth-only plans of about the same parameter count; and the seconds they took."""
    plans: dict = {"original": {"sizes": orig, "params": count_parameters(model), "loss": cal.loss, "note": ""}}
    t0 = time.perf_counter()
    chosen_loss = calibration_loss(pruned.model, cal.batches, vocab)
    plans["chosen"] = {"sizes": sizes, "params": count_parameters(pruned.model), "loss": chosen_loss,
                       "note": f"target; layers ranked by {pruned.metric}"}
    logger.info("calibration loss: original %.4f, pruned %.4f", cal.loss, chosen_loss)

    def tell(name: str, row: dict) -> None:
        if on_eval is not None:
            on_eval(name, dict(row))

    tell("original", plans["original"])
    tell("chosen", plans["chosen"])
    if cfg.report:
        def on_plan(name: str, row: dict) -> None:
            logger.info("calibration loss, %s: %.4f (%s parameters)", name, row["loss"], f"{row['params']:,}")
            tell(name, row)

        others = comparison_plans(model, cal.imp, sizes, family, cfg.target.multiple_of)
        plans.update(evaluate_plans(model, others, cal.batches, vocab, on_plan=on_plan))
    return plans, time.perf_counter() - t0


def build_report(cfg: PruneConfig, family: str, cal: Calibration, pruned: Pruned, plans: dict,
                 report_seconds: float) -> dict:
    """``prune_report.json``: the plans compared, the chosen plan, the importance scores and what each step
    cost."""
    imp = cal.imp
    seconds = {"forward": cal.forward_seconds, **{f"importance_{k}": v for k, v in imp.seconds.items()},
               "slicing": pruned.seconds, "report": report_seconds}
    seconds["importance_and_slicing"] = sum(v for k, v in seconds.items() if k.startswith("importance_")) + \
        pruned.seconds
    return {
        "model": cfg.model.path or f"{family} from config (seed {cfg.model.seed})",
        "family": family,
        "calibration": {"examples": cal.examples, "tokens": cal.tokens, "source": cfg.data.source},
        "plans": plans,
        "plan": pruned.plan.to_json(),
        "gqa": "whole KV groups ranked and kept; the same number of query heads kept in every kept group",
        "aggregation": "per unit: activation magnitude per position, mean over the sequence, L2 over sequences",
        "layer_importance": {"metric": pruned.metric, "loss_increase": None if imp.layer_loss is None
                             else imp.layer_loss.tolist(), "cosine_distance": imp.layer_cosine.tolist(),
                             "spearman": None if imp.layer_loss is None
                             else spearman(imp.layer_loss, imp.layer_cosine)},
        "importance": imp.to_json(),
        "seconds": seconds,
    }


def write_output(out: Path, cfg: PruneConfig, model, tokenizer, report: dict) -> None:
    """Step 6: ``out``, complete or absent: the pruned model, its config and the report (written last), under a
    temporary name, then renamed."""
    tmp = ckpt.tmp_dir_for(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    save_pretrained(model, tokenizer, tmp)
    dump_config(cfg, tmp / "distill_prune_config.yaml")
    ckpt.atomic_write_text(tmp / "prune_report.md", report_markdown(report))
    ckpt.atomic_write_json(tmp / REPORT, report)  # written last: marks the output complete
    ckpt.commit_dir(tmp, out)
    logger.info("pruned model written to %s\n%s", out, report_markdown(report))
