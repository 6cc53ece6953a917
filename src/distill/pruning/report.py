"""The prune report: the calibration loss of each plan's pruned model (:func:`evaluate_plans`) and the report as
markdown."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel

from distill.pruning.importance import calibration_loss
from distill.pruning.plan import Plan
from distill.pruning.slicing import slice_model


def spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Rank correlation of two score vectors (None for fewer than two entries)."""
    if len(a) < 2:
        return None
    ra = torch.argsort(torch.argsort(a.double())).double()
    rb = torch.argsort(torch.argsort(b.double())).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom else None


def report_markdown(report: dict) -> str:
    lines = [f"# distill prune: {report['model']}", "",
             f"Calibration: {report['calibration']['examples']} examples, {report['calibration']['tokens']:,} tokens. "
             f"Loss = mean next-token cross-entropy on them (nats/token), before any training.", "",
             "| plan | layers | hidden | intermediate | heads | kv heads | parameters | calibration loss | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in report["plans"].items():
        if row.get("sizes") is None:
            lines.append(f"| {name} | | | | | | | | {row['note']} |")
            continue
        s = row["sizes"]
        lines.append(f"| {name} | {s['num_hidden_layers']} | {s['hidden_size']} | {s['intermediate_size']} | "
                     f"{s['num_attention_heads']} | {s['num_key_value_heads']} | {row['params']:,} | "
                     f"{row['loss']:.4f} | {row.get('note', '')} |")
    layers = report["layer_importance"]
    lines += ["", "Layer importance (higher = more important):", "",
              "| layer | loss increase when skipped | cosine distance in -> out |", "|---|---|---|"]
    for i, c in enumerate(layers["cosine_distance"]):
        loss = layers["loss_increase"][i] if layers["loss_increase"] is not None else None
        lines.append(f"| {i} | {'' if loss is None else f'{loss:.4f}'} | {c:.4f} |")
    rho = layers.get("spearman")
    lines += ["", f"Rank correlation of the two layer metrics (Spearman): {'n/a' if rho is None else f'{rho:.3f}'}; "
              f"plan ranks layers by `{layers['metric']}`.", "",
              "Seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in report["seconds"].items()), ""]
    return "\n".join(lines)


def evaluate_plans(model: PreTrainedModel, plans: dict[str, tuple[Plan | None, str]], batches: Sequence[dict],
                   vocab_size: int, on_plan: Callable[[str, dict], None] | None = None) -> dict[str, dict]:
    """Calibration loss and parameter count of each plan's pruned model (built in memory, then dropped)."""
    rows = {}
    for name, (plan, note) in plans.items():
        if plan is None:
            rows[name] = {"sizes": None, "note": note}
            continue
        pruned = slice_model(model, plan)
        rows[name] = {"sizes": plan.sizes(), "params": sum(p.numel() for p in pruned.parameters()),
                      "loss": calibration_loss(pruned, batches, vocab_size), "note": note}
        if on_plan is not None:
            on_plan(name, rows[name])
        del pruned
    return rows
