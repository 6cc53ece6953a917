"""``distill eval``'s results as markdown tables (printed by ``distill eval``, embedded by ``distill report``)."""

from __future__ import annotations

_COLUMNS = [("val_loss", "loss", ".4f"), ("val_ppl", "ppl", ".2f"), ("bits_per_byte", "bits/byte", ".3f"),
            ("val_ece", "ECE", ".4f"), ("val_top1_accuracy", "top-1 acc", ".1%"),
            ("kl_to_teacher", "KL", ".4f"), ("reverse_kl_to_teacher", "reverse KL", ".4f"),
            ("tvd_to_teacher", "TVD", ".4f"), ("top1_agreement", "agreement", ".1%"),
            ("ce_to_teacher", "CE to teacher", ".4f")]


def eval_table(results: dict) -> str:
    """``distill eval``'s results (its JSON) as markdown: a row per model, then the speculative drafts and the
    lm-eval tasks when the results hold them."""
    rows = results["models"]
    cols = [c for c in _COLUMNS if any(c[0] in r for r in rows.values())]
    lines = ["| model | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"] if cols else []
    for name, r in rows.items() if cols else ():
        cells = []
        for key, _, fmt in cols:
            value = r.get(key)
            cell = "–" if value is None else format(value, fmt)
            if f"{key}_std" in r:
                cell += f" ± {r[key + '_std']:.3f}"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    spec = results.get("speculative")
    if spec:
        first = next(iter(next(iter(spec["drafts"].values()))["gammas"].values()))
        sizes = list(first["speedup"])
        lines += ["", "| draft | gamma | alpha | alpha-hat | tokens/call (predicted) | "
                  + " | ".join(f"speed-up, batch {b}" for b in sizes) + " |", "|---" * (5 + len(sizes)) + "|"]
        for name, d in spec["drafts"].items():
            for g, r in d["gammas"].items():
                ups = " | ".join(f"{r['speedup'][b]['ratio']:.2f}x" for b in sizes)
                lines.append(f"| {name} | {g} | {r['acceptance_rate']:.3f} | {d['alpha_hat']:.3f} | "
                             f"{r['tokens_per_target_call']:.2f} ({r['predicted_tokens_per_target_call']:.2f}) | {ups} |")
    harness = results.get("lm_eval")
    if harness:
        metrics = sorted({(t, m) for per_model in harness.values() for t, ms in per_model.items() for m in ms
                          if "stderr" not in m})
        lines += ["", "| model | " + " | ".join(f"{t} {m.split(',')[0]}" for t, m in metrics) + " |",
                  "|---" * (len(metrics) + 1) + "|"]
        for name, per_model in harness.items():
            cells = []
            for t, m in metrics:
                value, err = per_model.get(t, {}).get(m), per_model.get(t, {}).get(m.replace(",", "_stderr,", 1))
                cells.append("–" if value is None else f"{value:.3f}" + (f" ± {err:.3f}" if err is not None else ""))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines).strip()
