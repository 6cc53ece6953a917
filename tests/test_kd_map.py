"""benchmarks/kd_map.py: the docs' tables are the committed record's, and the record holds every run and seed.
(Its smoke mode takes minutes on one core, too long for the suite: it is not run here.)"""

from __future__ import annotations

import json

from conftest import REPO, benchmark_module

SECTION = "## When distillation pays (kd_map)"


def bench():
    return benchmark_module("kd_map")


def record() -> dict:
    return json.loads((REPO / "benchmarks" / "results" / "kd_map.json").read_text())


def test_the_record_holds_every_run_and_seed():
    rec, kd_map = record(), bench()
    seeds = {str(s) for s in rec["seeds"]}
    assert len(seeds) >= 2
    assert rec["missing"] == [p for p in ("a", "b", "c") if p not in rec]
    if "a" in rec:
        labels = {"scratch"} | {f"{t}_a{a:g}" for t in rec["a"]["teachers"] for a in kd_map.ALPHAS}
        assert set(rec["a"]["runs"]) == labels
        for per_seed in rec["a"]["runs"].values():
            assert set(per_seed) == seeds
        for row in rec["a"]["map"]:  # the map's numbers are the runs' differences
            for s, p in row["per_seed"].items():
                scratch, kd = rec["a"]["runs"]["scratch"][s], rec["a"]["runs"][f"{row['teacher']}_a{row['alpha']:g}"][s]
                assert p["gain"] == scratch["val_loss"] - kd["val_loss"]
                assert p["teacher_gap"] == scratch["val_loss"] - rec["a"]["teachers"][row["teacher"]]["val_loss"]
    for part, labels in (("b", {"ce", "kd"}), ("c", {"ce", "forward_kl", "reverse_kl"})):
        if part in rec:
            assert set(rec[part]["runs"]) == labels
            assert all(set(per_seed) == seeds for per_seed in rec[part]["runs"].values())


def test_docs_tables_are_the_committed_record():
    docs = (REPO / "docs" / "benchmarks.md").read_text()
    assert SECTION in docs, f"docs/benchmarks.md should have the section {SECTION!r}"
    section = docs.split(SECTION, 1)[1]
    for table in bench().tables(record()).split("\n\n"):
        assert table in section, f"docs/benchmarks.md's kd_map section should hold the table:\n{table}"
