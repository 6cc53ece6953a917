"""benchmarks/loss_memory.py's peers: the docs' "side by side with torchtune" table is the committed record's,
and torchtune's chunked forward KL, fed as the benchmark feeds it, is our naive forward KL plus the teacher's
entropy (with the same gradients)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import REPO

RESULTS = REPO / "benchmarks" / "results" / "loss_memory.json"


def bench():
    spec = importlib.util.spec_from_file_location("loss_memory_bench", REPO / "benchmarks" / "loss_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_torchtune_loss_is_naive_forward_kl_plus_teacher_entropy():
    pytest.importorskip("torchtune.modules.loss", reason="torchtune is in the bench extra only")
    import torch

    lm = bench()
    g = torch.Generator().manual_seed(0)
    vocab, tokens, hidden = 300, 40, 16  # 40 tokens in 8 chunks of 5
    for temperature in (1.0, 2.0):
        w = torch.randn(vocab, hidden, generator=g).requires_grad_()
        h = torch.randn(tokens, hidden, generator=g).requires_grad_()
        tw, th = torch.randn(vocab, hidden, generator=g), torch.randn(tokens, hidden, generator=g)
        labels = torch.randint(vocab, (tokens,), generator=g)
        naive = lm.naive_loss(h, w, th, tw, "forward_kl", temperature, tokens)
        grads = torch.autograd.grad(naive, (w, h))
        ours = lm.torchtune_loss(h, w, th, tw, labels, temperature)
        their_grads = torch.autograd.grad(ours, (w, h))
        entropy = lm.teacher_entropy(th, tw, temperature, rows=7)
        assert ours.item() - temperature**2 * entropy == pytest.approx(naive.item(), rel=1e-5)
        for a, b in zip(grads, their_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
