"""benchmarks/cross_tokenizer.py: the docs' measured tables are the committed record's, and its smoke mode runs."""

from __future__ import annotations

import json

from conftest import REPO, benchmark_module

SECTION = "## Measured: which cross-tokenizer loss teaches best"


def bench():
    return benchmark_module("cross_tokenizer")


def test_docs_tables_are_the_committed_record():
    """Every table line of the docs section comes from table() of benchmarks/results/cross_tokenizer.json,
    which holds both experiments with every seed."""
    record = json.loads((REPO / "benchmarks" / "results" / "cross_tokenizer.json").read_text())
    assert record["arithmetic"]["seeds"] == [0, 1, 2, 3] and record["quickstart"]["seeds"] == [0, 1]
    for m in ("ce_ground_truth", "seq_kd", "uld", "gold", "pkl", "same_tokenizer_kd"):
        assert set(record["arithmetic"]["methods"][m]["exact_match"]) == {"0", "1", "2", "3"}, m
    for m in ("scratch", "uld", "gold", "pkl"):
        assert set(record["quickstart"]["methods"][m]["per_seed"]) == {"0", "1"}, m
    docs = (REPO / "docs" / "cross_tokenizer.md").read_text()
    assert SECTION in docs, f"docs/cross_tokenizer.md should have the section {SECTION!r}"
    section = docs[docs.index(SECTION):]
    want = bench().table(record)
    for block in want.split("\n\n"):
        assert block in section, f"the docs section should hold, as written by table():\n{block}"


def test_smoke_mode(tmp_path, one_thread):
    """--preset tiny runs the arithmetic part end to end (both teachers, the packing tokenizer, a P-KL student)."""
    record = bench().main(["--preset", "tiny", "--parts", "arithmetic", "--seeds", "0", "--only", "pkl",
                           "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out.json")])
    a = record["arithmetic"]
    assert set(a["methods"]) == {"pkl"} and set(a["methods"]["pkl"]["exact_match"]) == {"0"}
    assert a["teachers"]["packing"]["digit_chunk"] == 3
    # 2-digit sums: a 3-digit answer is one teacher token against three student tokens; the eos matches.
    assert a["teachers"]["packing"]["unmatched_answer_token_share"] == 0.75
    assert json.loads((tmp_path / "out.json").read_text())["arithmetic"]["seeds"] == [0]
