"""A report from training runs and evaluations (``distill report``): curves on one page, the final table.

    distill report runs/quickstart/scratch runs/quickstart/distilled --out runs/quickstart/compare
    distill report runs/a runs/b --eval runs/eval/eval.json          # + speculative acceptance vs gamma

From each run directory's ``metrics.jsonl``: the eval curves of every run on shared axes (loss, KL to the
teacher, top-1 agreement, as the runs logged them) and the train loss; the final eval of each run as a
table; from ``distill eval`` JSON files, their tables and, for speculative drafts, acceptance rate and
tokens per target call (measured and predicted) against gamma. Writes ``report.md`` with the PNG figures
beside it (all files written atomically). A directory without metrics is named and skipped.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from matplotlib.figure import Figure

from distill.checkpoint import atomic_write_text
from distill.evaluation.tables import eval_table

logger = logging.getLogger("distill")

CURVES = [("val_loss", "validation loss"), ("kl_to_teacher", "KL to teacher"), ("top1_agreement", "top-1 agreement"),
          ("ce_to_teacher", "cross-entropy to teacher (sampled targets)")]


def read_run(path: Path) -> list[dict] | None:
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        return None
    records = []
    for n, line in enumerate(metrics.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                raise ValueError(f"{metrics}, line {n}: not JSON ({line[:60]!r}); the file is damaged") from None
    return records


def _save(fig: Figure, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


def plot_curves(runs: dict[str, list[dict]], path: Path) -> list[str]:
    """One panel per metric the runs logged in eval (and the train loss); returns the panels drawn."""
    panels = [(k, t) for k, t in CURVES if any(k in r for recs in runs.values() for r in recs if r["split"] == "eval")]
    panels.append(("loss", "train loss"))
    colors = {name: f"C{i % 10}" for i, name in enumerate(runs)}  # a run has one color in every panel
    fig = Figure(figsize=(4.2 * len(panels), 3.6), dpi=110)
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        split = "train" if key == "loss" else "eval"
        for name, recs in runs.items():
            pts = [(r["step"], r[key]) for r in recs if r["split"] == split and key in r]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if split == "eval" else None,
                        markersize=3, label=name, color=colors[name])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][-1].legend()  # the train loss: every run has one
    fig.tight_layout()
    _save(fig, path)
    return [k for k, _ in panels]


def plot_speculative(evals: dict[str, dict], path: Path) -> bool:
    drafts = [(f"{src}:{name}", d) for src, e in evals.items() for name, d in (e.get("speculative") or {}).get(
        "drafts", {}).items()]
    if not drafts:
        return False
    fig = Figure(figsize=(9, 3.6), dpi=110)
    a1, a2 = fig.subplots(1, 2)
    for label, d in drafts:
        gammas = sorted(int(g) for g in d["gammas"])
        a1.plot(gammas, [d["gammas"][str(g)]["acceptance_rate"] for g in gammas], marker="o", label=label)
        line = a2.plot(gammas, [d["gammas"][str(g)]["tokens_per_target_call"] for g in gammas], marker="o",
                       label=f"{label} measured")
        a2.plot(gammas, [d["gammas"][str(g)]["predicted_tokens_per_target_call"] for g in gammas], linestyle="--",
                color=line[0].get_color(), label=f"{label} predicted")
    a1.set(title="acceptance rate", xlabel="gamma (draft tokens per round)")
    a2.set(title="tokens per target call", xlabel="gamma")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return True


def main(run_dirs: list[str], evals: list[str] | None = None, out: str = "runs/report") -> Path:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {}
    for d in run_dirs:
        path = Path(d)
        recs = read_run(path)
        if recs is None:
            logger.warning("%s has no metrics.jsonl (not a training run, or not started): skipped", path)
            continue
        name = path.name if path.name not in runs else str(path)
        runs[name] = recs
    eval_data = {}
    for e in evals or []:
        p = Path(e)
        if not p.is_file():
            raise ValueError(f"--eval {p}: no such file (the JSON `distill eval` wrote)")
        eval_data[p.stem if p.stem not in eval_data else str(p)] = json.loads(p.read_text())
    if not runs and not eval_data:
        raise ValueError("nothing to report: none of the directories holds a metrics.jsonl, and no --eval file")

    lines = ["# distill report", ""]
    if runs:
        plot_curves(runs, out_dir / "curves.png")
        lines += ["![curves](curves.png)", "", "| run | steps | " + " | ".join(k for k, _ in CURVES) + " |",
                  "|---" * (len(CURVES) + 2) + "|"]
        for name, recs in runs.items():
            evals_of_run = [r for r in recs if r["split"] == "eval"]
            last = evals_of_run[-1] if evals_of_run else {}
            steps = max((r["step"] for r in recs), default=0)
            cells = [f"{last[k]:.4f}" if isinstance(last.get(k), float) else "–" for k, _ in CURVES]
            lines.append(f"| {name} | {steps} | " + " | ".join(cells) + " |")
        lines.append("")
    for name, data in eval_data.items():
        lines += [f"## {name}", "", eval_table(data), ""]
    if plot_speculative(eval_data, out_dir / "speculative.png"):
        lines += ["![speculative decoding](speculative.png)", ""]
    report = out_dir / "report.md"
    atomic_write_text(report, "\n".join(lines))
    logger.info("report written to %s", report)
    return report
