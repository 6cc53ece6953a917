"""benchmarks/cache_quality.py: the docs' table is the committed records' (the first with every signal, the
others other draws of the sampled and hybrid targets), and those records hold every signal the table speaks
of. (One run takes most of an hour on this machine's cores: it is not run here.)"""

from __future__ import annotations

import json

from conftest import REPO, benchmark_module

RESULTS = REPO / "benchmarks" / "results"


DRAW_SEEDS = (0, 1, 2, 3)


def records() -> list[dict]:
    names = ["cache_quality.json", *(f"cache_quality_seed{s}.json" for s in DRAW_SEEDS[1:])]
    return [json.loads((RESULTS / name).read_text()) for name in names]


def test_records_hold_every_signal_and_every_draw():
    recs = records()
    signals = {r["teacher_signal"] for r in recs[0]["records"]}
    assert {"teacher", "scratch", "live", "topk_renorm", "topk_tail", "sampled", "hybrid"} <= signals
    for rec, seed in zip(recs, DRAW_SEEDS, strict=True):
        live = next(r for r in rec["records"] if r["teacher_signal"] == "live")
        # one live student for every record (the draws are what differs): the same reference for each gap
        assert live["val_loss"] == next(r for r in recs[0]["records"] if r["teacher_signal"] == "live")["val_loss"]
        for r in rec["records"]:
            if r["teacher_signal"] in ("sampled", "hybrid"):
                assert r["seed"] == seed
            if "val_loss_vs_live" in r:  # each gap is to the live run of the same record
                assert r["val_loss_vs_live"] == (r["val_loss"] - live["val_loss"]) / live["val_loss"]
        assert {"sampled", "hybrid"} <= {r["teacher_signal"] for r in rec["records"]}
        hybrid = sorted(r["n"] for r in rec["records"] if r["teacher_signal"] == "hybrid")
        assert hybrid == sorted(recs[0]["settings"]["hybrid_n"])
        settings = {k: v for k, v in rec["settings"].items() if k != "seconds"}
        assert settings == {k: v for k, v in recs[0]["settings"].items() if k != "seconds"}


def test_docs_table_is_the_committed_records():
    docs = (REPO / "docs" / "benchmarks.md").read_text()
    table = benchmark_module("cache_quality").tables(*records())
    assert table in docs, f"docs/benchmarks.md should hold the cache quality table:\n{table}"
