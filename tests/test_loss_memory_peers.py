"""benchmarks/loss_memory.py's peers: the docs' "side by side with torchtune" table is the committed record's,
and in that record torchtune's chunked forward KL, fed as the benchmark feeds it, is our naive forward KL plus
the teacher's entropy (the benchmark computes both on the same inputs; torchtune itself is in the ``bench``
extra, installed apart from ``dev``, so the suite reads its numbers from the record rather than running it)."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, benchmark_module

RESULTS = REPO / "benchmarks" / "results" / "loss_memory.json"


def bench():
    return benchmark_module("loss_memory")


def test_docs_peers_table_is_the_committed_record():
    records = json.loads(RESULTS.read_text())
    peers = [r for r in records if r["impl"] == "torchtune"]
    assert {(r["vocab"], r["tokens"]) for r in peers} >= {(32768, 2048), (131072, 2048)}
    for r in peers:  # naive, chunked and torchtune of a case come from one run: the same loss, the same inputs
        same = [x for x in records if (x["divergence"], x["vocab"], x["tokens"], x["hidden"], x.get("dtype"))
                == (r["divergence"], r["vocab"], r["tokens"], r["hidden"], r.get("dtype"))]
        assert {x["impl"] for x in same} >= {"naive", "chunked", "torchtune"}
        naive = next(x for x in same if x["impl"] == "naive")
        assert r["forward_kl"] == pytest.approx(naive["loss"], rel=1e-3)
        assert r["loss"] == pytest.approx(r["forward_kl"] + r["teacher_entropy"], rel=1e-6)
    table = bench().peers_table(records)
    assert table.count("| torchtune |") == len(peers)
    docs = (REPO / "docs" / "benchmarks.md").read_text()
    assert table in docs, f"docs/benchmarks.md should hold, as written by peers_table():\n{table}"
