"""Offline teacher caches: bit packing, quantization error, sampling, the files, resume, bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SHARP_TEACHER, SMALL_CACHE, TINY_CACHE

from distill.caching import capture, codec, reader
from distill.caching.codec import CacheParams
from distill.caching.reader import (
    CacheMismatchError,
    CorruptShardError,
    IncompleteCacheError,
    TeacherCache,
    collate_targets,
)
from distill.commands import cache as recipe
from distill.config import CacheConfig, ConfigError, load_config
from distill.data import build_datasets, collate
from distill.losses import IGNORE_INDEX, SparseTarget, chunked_kd_loss, naive_kd_loss
from distill.models import final_hidden, load_model, load_tokenizer, output_head

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def cfg_with(out: Path, *overrides: str) -> CacheConfig:
    """The tiny cache config on the small data, with the teacher of the session's caches (``tiny_caches``)."""
    return load_config(CacheConfig, TINY_CACHE, [f"out_dir={out}", *SMALL_CACHE, *SHARP_TEACHER, *overrides])


def files_of(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tiny_caches):
    """The session's top-k cache of the small tiny config, with the teacher and the dataset it came from."""
    cfg = tiny_caches["topk"]["cfg"]
    tok = load_tokenizer(cfg.teacher, "teacher")
    teacher = load_model(cfg.teacher, "teacher", tok).eval()
    train_ds, _ = build_datasets(cfg.data, tok, 256)
    return {**tiny_caches["topk"], "tok": tok, "teacher": teacher, "ds": train_ds}


def stored_row_logits(teacher, tok, examples: list[dict]) -> list[torch.Tensor]:
    """Each example's logits at its stored positions, computed exactly as the capture does (one batch)."""
    batch = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        hidden = final_hidden(teacher, batch)
        sel = torch.zeros_like(batch["labels"], dtype=torch.bool)
        sel[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
        z = output_head(teacher, len(tok)).logits(hidden[sel]).float()
    return list(z.split(sel.sum(1).tolist()))


# ----------------------------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("vocab", [263, 131073, 262144, 256, 65536, 2**32])
def test_bit_packing_roundtrip_and_random_access(vocab):
    """Any width; 8, 16 and 32 bits (read as whole words) also against the stream's definition: LSB-first,
    so value i is the i-th little-endian word."""
    rng = np.random.default_rng(vocab)
    bits = codec.id_bits_for(vocab)
    assert bits == math.ceil(math.log2(vocab))
    for n in (0, 1, 7, 8, 9, 1000):
        values = rng.integers(0, vocab, n)
        values[: min(n, 2)] = vocab - 1  # the largest id must fit
        packed = codec.pack_bits(values, bits)
        assert packed.nbytes == codec.packed_nbytes(n, bits) == math.ceil(n / 8) * bits
        assert np.array_equal(codec.unpack_bits(packed.tobytes(), bits, 0, n), values)
        if bits in (8, 16, 32):
            assert np.array_equal(np.frombuffer(packed.tobytes(), f"<u{bits // 8}")[:n], values)
        for start in range(0, n, max(1, n // 7)):
            count = int(rng.integers(0, n - start + 1))
            assert np.array_equal(codec.unpack_bits(packed, bits, start, count), values[start : start + count])
    with pytest.raises(ValueError, match="must be in"):
        codec.pack_bits(np.array([vocab]) << 1, bits)


@pytest.mark.parametrize("n", [1, 16, 50, 64, 256])
def test_count_fields_use_the_fewest_bits(n):
    params = CacheParams.make("sampled", 131073, n=n)
    assert params.count_bits == (n - 1).bit_length()  # count - 1 in [0, N - 1]
    counts = np.arange(1, n + 1)
    packed = codec.pack_bits(counts - 1, params.count_bits)
    assert np.array_equal(codec.unpack_bits(packed, params.count_bits, 0, n) + 1, counts)


@pytest.mark.parametrize("scale", [0, 3, 1000, 100_000])
def test_rice_roundtrip_random_access_and_optimal_parameter(scale):
    rng = np.random.default_rng(scale)
    values = rng.geometric(1.0 / (scale + 1), 997) - 1 if scale else np.zeros(997, np.int64)
    values[::50] = rng.integers(0, 10 * scale + 2, len(values[::50]))  # some outliers
    max_k = 20
    k = codec.rice_parameter(values, max_k)
    sizes = [sum(int(v >> j) + 1 + j for v in values) for j in range(max_k + 1)]  # bits, by brute force
    assert sizes[k] == min(sizes)
    unary, rem, starts = codec.rice_encode(values, k)
    assert starts[-1] == sum(int(v >> k) + 1 for v in values) and unary.nbytes == math.ceil(starts[-1] / 8)
    assert np.array_equal(codec.rice_decode(unary, rem, k, 0, len(values), 0, int(starts[-1])), values)
    for first in (0, 1, 7, 8, 500, 996):
        for count in (0, 1, 9, 997 - first):
            if first + count <= len(values):
                got = codec.rice_decode(unary.tobytes(), rem, k, first, count, int(starts[first]),
                                      int(starts[first + count]))
                assert np.array_equal(got, values[first : first + count])
    with pytest.raises(ValueError, match="Rice stream"):
        codec.rice_decode(unary, rem, k, 0, 5, 0, int(starts[4]))  # a range that holds only 4 values


@pytest.mark.parametrize(("vocab", "spread"), [(4096, 0.0), (4096, 4.0), (131073, 1.0), (131073, 3.0)])
def test_sampled_encoding_is_smaller_than_fixed_width_fields(tmp_path, vocab, spread):
    """Rice-coded sorted gaps + counts: lossless, and below the fixed-width layout
    (ids in ceil(log2 V) bits, counts in bit_length(N - 1) bits) by a margin that grows with entropy."""
    gen = torch.Generator().manual_seed(vocab)
    rows, n = 256, 50
    logits = spread * torch.randn(rows, vocab, generator=gen)
    out = capture.sampled_targets(logits, torch.rand(rows, n, generator=gen, dtype=torch.float64))
    params = CacheParams.make("sampled", vocab, n=n)
    arrays = {k: v.numpy() for k, v in out.items()}
    blob = codec.encode_shard(params, "train", 0, 0, [b"\0" * 8], [rows + 1], [rows], arrays)
    d = arrays["distinct"]
    fixed_bits = (d * (params.id_bits + params.count_bits) - params.count_bits + params.distinct_bits).sum()
    ratio = len(blob) / (fixed_bits / 8)
    entropy = float(-(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1).mean())
    print(f"V={vocab} entropy {entropy:.2f} nats, {d.mean():.1f} distinct: {len(blob) / rows:.1f} B/token, "
          f"{ratio:.2f} of fixed width")
    assert ratio < (0.65 if entropy > 5 else 0.85)
    path = tmp_path / "shard.bin"
    path.write_bytes(blob)
    entry = {"file": path.name, "examples": [0, 1], "bytes": len(blob), "sha256": codec.hashlib.sha256(blob).hexdigest()}
    shard = reader._Shard(path, entry, params, tmp_path, "train")
    assert shard.problem is None
    back = shard.rows(0)
    for key in ("distinct", "ids", "counts"):
        assert np.array_equal(back[key], arrays[key]), key


def test_sampled_shard_with_examples_without_stored_positions(tmp_path):
    """Examples whose labels are all masked store nothing; a shard may hold only such examples."""
    params = CacheParams.make("sampled", 300, n=8)
    for positions, arrays in (
        ([0, 0], {"distinct": np.zeros(0, np.int64), "ids": np.zeros(0, np.int64), "counts": np.zeros(0, np.int64)}),
        ([0, 2], {"distinct": np.array([2, 1]), "ids": np.array([3, 299, 0]), "counts": np.array([5, 3, 8])}),
    ):
        blob = codec.encode_shard(params, "train", 0, 0, [b"\0" * 8, b"\1" * 8], [5, 3], positions, arrays)
        path = tmp_path / "shard.bin"
        path.write_bytes(blob)
        entry = {"file": path.name, "examples": [0, 2], "bytes": len(blob), "sha256": codec.hashlib.sha256(blob).hexdigest()}
        shard = reader._Shard(path, entry, params, tmp_path, "train")
        assert shard.problem is None
        assert all(len(v) == 0 for v in shard.rows(0).values())
        back = shard.rows(1)
        for key in ("distinct", "ids", "counts"):
            assert np.array_equal(back[key], arrays[key]), key


@pytest.mark.parametrize("vocab", [263, 131072, 131073, 262144])
@pytest.mark.parametrize("k", [8, 32, 64])
def test_default_top_k_encoding_is_at_most_three_bytes_per_entry(vocab, k):
    p = CacheParams.make("topk", vocab, k=k)
    seq_len = 128
    per_position = k * p.id_bits + (k - 1) * p.prob_bits + p.tail_bits
    index = codec.INDEX_DTYPE.itemsize * 8 / (seq_len - 1)
    assert (per_position + index) / k <= 24, (p, per_position / k)
    assert p.prob_bits >= 5


def _sharp_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """LM-like logits: a Zipfian prior plus noise at several sharpness levels (entropy ~0.5 to ~7 nats)."""
    gen = torch.Generator().manual_seed(seed)
    prior = -torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    scale = torch.linspace(0.5, 6.0, rows).unsqueeze(1)
    return scale * torch.randn(rows, vocab, generator=gen) + 1.5 * prior[torch.randperm(vocab, generator=gen)]


@pytest.mark.parametrize(("bits", "kl_bound"), [(5, 2e-3), (6, 5e-4), (8, 4e-5)])
def test_top_k_quantization_error_is_measured_and_bounded(bits, kl_bound):
    """The error of the documented scheme: ratio codes within half a step on the fourth-root grid,
    mean KL(exact renormalized top-k || decoded) below the documented bound, tail within half a step."""
    k, vocab = 64, 4096
    logits = _sharp_logits(512, vocab, seed=bits)
    out = capture.topk_targets(logits, k, bits)
    logp = torch.log_softmax(logits.double(), -1)
    top, ids = logp.topk(k, -1)
    assert torch.equal(out["ids"], ids)
    exact_tail = 1 - top.exp().sum(-1)
    assert torch.allclose(out["tail"], exact_tail, rtol=1e-4, atol=1e-9)

    ratios = (top[:, 1:] - top[:, :1]).exp()
    levels = codec.ratio_levels(bits)
    decoded = torch.from_numpy(levels[out["codes"].numpy()])
    half_step = 0.5 / ((1 << bits) - 1)
    assert ((ratios.pow(0.25) - decoded.pow(0.25)).abs() <= half_step + 1e-6).all()  # fp32 codes

    p = top.exp() / top.exp().sum(-1, keepdim=True)
    q = torch.cat([torch.ones(len(p), 1, dtype=torch.float64), decoded], 1)
    q = q / q.sum(-1, keepdim=True)
    kl = torch.where(q > 0, p * (p.log() - q.log()), p * 50.0).sum(-1)  # a dropped entry counts heavily
    assert kl.mean() < kl_bound, kl.mean()
    assert kl.max() < 20 * kl_bound

    for tail_bits, step in ((8, 40 / 254), (16, 40 / 65534)):
        codes = codec.encode_tail(exact_tail, tail_bits)
        back = torch.from_numpy(codec.decode_tail(codes, tail_bits))
        logit = lambda t: t.log() - (-t).log1p()
        ok = exact_tail > 1e-8
        assert ((logit(back[ok]) - logit(exact_tail[ok])).abs() <= step / 2 + 1e-9).all()
    assert codec.decode_tail(codec.encode_tail(torch.tensor([0.0, 1e-12])), 8).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("vocab", [40, 5000])  # one fp64 CDF; the two-level CDF (blocks of 256)
def test_sampled_counts_are_unbiased(vocab):
    gen = torch.Generator().manual_seed(0)
    rows, n = 4000, 50
    logits = (2.0 * torch.randn(vocab, generator=gen)).expand(rows, vocab).contiguous()
    p = torch.softmax(logits[0].double(), -1)
    out = capture.sampled_targets(logits, torch.rand(rows, n, generator=gen, dtype=torch.float64))
    assert out["counts"].sum() == rows * n
    assert int(out["distinct"].sum()) == len(out["ids"])
    row = torch.repeat_interleave(torch.arange(rows), out["distinct"])
    freq = torch.zeros(rows, vocab, dtype=torch.float64)
    freq[row, out["ids"]] = out["counts"].double() / n
    mean = freq.mean(0)
    sigma = (p * (1 - p) / (n * rows)).sqrt()
    z = (mean - p) / sigma
    frequent = p * n * rows >= 25  # where the normal approximation holds
    assert (z[frequent].abs() <= 5).all(), z[frequent].abs().max()
    assert abs(float((z**2).mean()) - 1) < 4 * math.sqrt(2 / vocab)  # chi-square / dof: no bias anywhere
    # ids are increasing within a row, and zero-probability ids are never drawn
    logits[:, :5] = -math.inf
    zero_end = 300 if vocab > 300 else 0  # a whole zero-mass block at the end, and a partial one
    logits[:, vocab - zero_end :] = -math.inf
    out = capture.sampled_targets(logits, torch.rand(rows, n, generator=gen, dtype=torch.float64))
    assert out["ids"].min() >= 5 and out["ids"].max() < vocab - zero_end


def hybrid_estimates(out: dict, vocab: int, n: int) -> torch.Tensor:
    """(rows, V) decoded hybrid probabilities of :func:`capture.hybrid_targets`' arrays, written out from the
    format's description (codec: head codes / 255; ``(1 - sum(codes) / 255) * count / ceil(n * t)``)."""
    codes = out["head_codes"].double()
    rows = codes.shape[0]
    rest = 1.0 - codes.sum(-1) / 255
    draws = torch.ceil(torch.round(rest * 255) * n / 255 - 1e-9)
    est = torch.zeros(rows, vocab, dtype=torch.float64).scatter_(1, out["head_ids"], codes / 255)
    row = torch.repeat_interleave(torch.arange(rows), out["distinct"])
    est[row, out["ids"]] += out["counts"].double() * (rest / draws.clamp_min(1))[row]
    return est, draws


@pytest.mark.parametrize("vocab", [40, 5000])  # one fp64 CDF; the two-level CDF (blocks of 256)
def test_hybrid_targets_are_unbiased_and_sum_to_one(vocab):
    gen = torch.Generator().manual_seed(1)
    rows, n, head = 4000, 16, 2
    logits = (2.0 * torch.randn(vocab, generator=gen)).expand(rows, vocab).contiguous()
    p = torch.softmax(logits[0].double(), -1)
    uniforms = torch.rand(rows, 2, generator=gen, dtype=torch.float64)
    out = capture.hybrid_targets(logits, head, n, uniforms)
    est, draws = hybrid_estimates(out, vocab, n)
    assert torch.equal(out["head_ids"], p.topk(head).indices.expand(rows, head))
    assert torch.equal(torch.from_numpy(codec.hybrid_draws(out["head_codes"].numpy(), n)), draws.long())
    assert torch.equal(out["counts"].sum().reshape(1), draws.sum().long().reshape(1))
    assert (out["distinct"] <= draws.long()).all() and not (est.scatter(1, out["head_ids"], 0.0) < 0).any()
    assert torch.allclose(est.sum(-1), torch.ones(rows, dtype=torch.float64), atol=1e-12)
    # The mean of 4,000 draws against the teacher: each id's z-score on its own standard error; the ids'
    # errors are correlated (one rounding and one systematic offset per row), so no chi-square over them.
    mean, se = est.mean(0), est.std(0) / rows**0.5
    frequent = p * rows * n >= 25  # where the normal approximation holds
    z = (mean - p)[frequent] / se[frequent]
    assert (z.abs() <= 5).all(), z.abs().max()
    # The test sees a bias of a fraction of a grid step: the head rounded to the nearest level is one.
    nearest = capture.hybrid_targets(logits, head, n, torch.cat([torch.full((rows, 1), 0.5), uniforms[:, 1:]], 1))
    biased, _ = hybrid_estimates(nearest, vocab, n)
    top = p.argmax()
    bias_z = (biased[:, top].mean() - p[top]) / (biased[:, top].std() / rows**0.5 + 1e-12)
    assert bias_z.abs() > 5 or (biased[:, top].std() == 0 and abs(biased[0, top] - p[top]) > 1e-4)


def test_hybrid_targets_edge_rows():
    """A teacher sure of one token stores no draws; ids without mass are never drawn; a row whose only mass
    is in the head draws nothing; systematic draws give each id floor or ceil of its expected count."""
    v, n = 300, 16
    logits = torch.full((4, v), -math.inf)
    logits[0, 7] = 0.0  # all mass on one id
    logits[1, :] = 0.0  # uniform
    logits[1, 250:] = -math.inf
    logits[2, [3, 9]] = torch.tensor([0.0, -0.5])  # all mass in a head of 2
    logits[3, :] = torch.linspace(0, -8, v)
    out = capture.hybrid_targets(logits, 2, n, torch.rand(4, 2, generator=torch.Generator().manual_seed(0),
                                                          dtype=torch.float64))
    est, draws = hybrid_estimates(out, v, n)
    assert draws[0] == 0 and draws[2] == 0 and out["distinct"][0] == out["distinct"][2] == 0
    assert est[0, 7] == 1.0 and math.isclose(float(est[2, 3] + est[2, 9]), 1.0)
    assert out["ids"].max() < 250
    row1 = torch.repeat_interleave(torch.arange(4), out["distinct"]) == 1
    assert draws[1] == 16 and (out["counts"][row1] == 1).all()  # 248 equal ids, 16 draws: 16 different ones
    q = torch.softmax(logits[3].double(), -1).scatter(0, out["head_ids"][3], 0.0)
    expected = draws[3] * q / q.sum()
    got = torch.zeros(v, dtype=torch.float64)
    row3 = torch.repeat_interleave(torch.arange(4), out["distinct"]) == 3
    got[out["ids"][row3]] = out["counts"][row3].double()
    assert ((got - expected.floor() >= 0) & (got - expected.ceil() <= 0)).all()


def test_hybrid_shard_roundtrip_and_size(tmp_path):
    """Hybrid arrays survive the shard (rows without draws included); at the same noise as N = 50 sampled
    targets on a high-entropy teacher it takes fewer bytes than they do."""
    gen = torch.Generator().manual_seed(3)
    rows, vocab = 256, 4096
    logits = 2.0 * torch.randn(rows, vocab, generator=gen)
    logits[:64, 5] = 30.0  # sure of one token: no draws
    out = capture.hybrid_targets(logits, 2, 16, torch.rand(rows, 2, generator=gen, dtype=torch.float64))
    params = CacheParams.make("hybrid", vocab, n=16, head=2)
    arrays = {k: v.numpy() for k, v in out.items()}
    assert (arrays["distinct"][:64] == 0).all()
    blob = codec.encode_shard(params, "train", 0, 0, [b"\0" * 8, b"\1" * 8], [101, rows - 99], [100, rows - 100],
                              arrays)
    path = tmp_path / "shard.bin"
    path.write_bytes(blob)
    entry = {"file": path.name, "examples": [0, 2], "bytes": len(blob), "sha256": codec.hashlib.sha256(blob).hexdigest()}
    shard = reader._Shard(path, entry, params, tmp_path, "train")
    assert shard.problem is None
    back = [shard.rows(0), shard.rows(1)]
    for key in ("head_ids", "head_codes", "distinct", "ids", "counts"):
        assert np.array_equal(np.concatenate([b[key] for b in back]), arrays[key]), key
    bad = {**arrays, "counts": arrays["counts"] + 1}
    with pytest.raises(ValueError, match="do not add up to its draws"):
        codec.encode_shard(params, "train", 0, 0, [b"\0" * 8], [rows + 1], [rows], bad)


def test_hybrid_cache_reproduces_the_targets_and_trains(tmp_path, tiny):
    cfg = load_config(CacheConfig, REPO / "configs" / "tiny" / "cache_hybrid.yaml",
                      [f"out_dir={tmp_path / 'h'}", *SMALL_CACHE, *SHARP_TEACHER, "seed=5", "temperature=2.0"])
    assert cfg.mode == "hybrid" and recipe.draws_per_token(cfg) == 16 and cfg.head == 1
    summary = recipe.main(cfg)
    ds, tok, teacher = tiny["ds"], tiny["tok"], tiny["teacher"]
    cache = TeacherCache(cfg.out_dir)
    assert cache.mode == "hybrid" and cache.manifest["params"]["head"] == 1 and cache.manifest["seed"] == 5
    examples = [ds[i] for i in range(8, 16)]
    logits = stored_row_logits(teacher, tok, examples)
    for j, ex in enumerate(examples):
        rows = torch.from_numpy(codec.stored_positions(ex["labels"]))
        want = capture.hybrid_targets(logits[j] / 2.0, 1, 16, capture.example_uniforms(5, "train", 8 + j, len(rows), 2))
        est, _ = hybrid_estimates(want, 263, 16)
        t = cache.target(8 + j, ex["input_ids"], ex["labels"])
        got = torch.zeros(len(rows), 263, dtype=torch.float64)
        got.scatter_add_(1, t.ids[rows], t.probs[rows].double())
        assert torch.allclose(got, est, atol=1e-6) and torch.equal(t.tail, torch.zeros(len(t.ids)))
    idx = [3, 40, 9, 17]  # the batch, assembled at once, equals its examples' targets collated
    exs = [ds[i] for i in idx]
    bt = cache.batch_target(idx, exs, width=140)
    want = collate_targets([cache.target(i, ex["input_ids"], ex["labels"]) for i, ex in zip(idx, exs, strict=True)],
                           length=139)
    assert torch.equal(bt.ids, want.ids) and torch.equal(bt.probs, want.probs) and torch.equal(bt.tail, want.tail)
    assert summary["splits"]["train"]["bytes_per_token"] < tiny["summary"]["splits"]["train"]["bytes_per_token"] / 4
    from distill import training
    from distill.config import TrainConfig

    run = load_config(TrainConfig, REPO / "configs" / "tiny" / "train.yaml",
                      [f"out_dir={tmp_path / 'run'}", "teacher=null", f"teacher.cache={cfg.out_dir}",
                       "loss.temperature=2.0", *SMALL_CACHE[1:-1], "train.max_steps=2", "eval.every=0",
                       "log.progress=false"])
    assert training.train(run)["steps"] == 2
    with pytest.raises(ValueError, match=r"reverse_kl is infinite on hybrid targets"):
        training.train(run.model_copy(update={"out_dir": str(tmp_path / "rkl"),
                                              "loss": run.loss.model_copy(update={"divergence": "reverse_kl"})}))


# ----------------------------------------------------------------------------------------------- the cache


def test_top_k_cache_matches_the_teacher(tiny):
    out, ds, tok, teacher = tiny["out"], tiny["ds"], tiny["tok"], tiny["teacher"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == codec.FORMAT_NAME and manifest["version"] == codec.FORMAT_VERSION
    assert manifest["params"]["mode"] == "topk" and manifest["params"]["k"] == 64
    assert manifest["tokenizer_fingerprint"] and manifest["teacher"]["sha256"] and manifest["seq_len"] == 128
    assert manifest["splits"]["train"]["num_examples"] == len(ds)
    assert all(len(s["sha256"]) == 64 for s in manifest["splits"]["train"]["shards"])
    assert tiny["summary"]["splits"]["train"]["bytes_per_token"] <= 3 * 64

    examples = [ds[i] for i in range(8)]  # the first batch of the first shard
    logits = stored_row_logits(teacher, tok, examples)
    with_tail, renorm = TeacherCache(out), TeacherCache(out, topk_tail=False)
    for i, ex in enumerate(examples):
        rows = torch.from_numpy(codec.stored_positions(ex["labels"]))
        vals, ids = logits[i].topk(64, -1)
        top = vals.double() - torch.logsumexp(logits[i].double(), -1, keepdim=True)
        t = with_tail.target(i, ex["input_ids"], ex["labels"])
        assert t.ids.shape == (len(ex["input_ids"]) - 1, 64)
        assert torch.equal(t.ids[rows], ids)
        p = top.exp()
        tail = 1 - p.sum(-1)
        assert torch.allclose(t.tail[rows].double(), tail, rtol=1e-3)
        # 8-bit codes at V = 263 on the fourth-root grid of ratios to the top-1: within half a step there.
        got = t.probs[rows].double()
        step = 1.0 / ((1 << manifest["params"]["prob_bits"]) - 1)
        assert ((got / got[:, :1]) ** 0.25 - (p / p[:, :1]) ** 0.25).abs().max() <= 0.5 * step + 1e-6
        assert torch.allclose(got.sum(-1) + t.tail[rows].double(), torch.ones(len(rows), dtype=torch.float64))
        r = renorm.target(i, ex["input_ids"], ex["labels"])
        assert r.tail is None
        assert torch.allclose(r.probs[rows].sum(-1), torch.ones(len(rows)), atol=1e-5)
        assert torch.allclose(r.probs[rows].double(), got / got.sum(-1, keepdim=True), rtol=1e-5)
        unstored = torch.ones(len(t.ids), dtype=torch.bool)
        unstored[rows] = False
        assert (t.probs[unstored] == 0).all()


def test_sampled_cache_reproduces_the_draws(tmp_path, tiny):
    cfg = cfg_with(tmp_path / "s", "mode=sampled", "n=16", "temperature=2.0", "seed=3", "splits=[train,eval]")
    summary = recipe.main(cfg)
    _, eval_ds = build_datasets(cfg.data, tiny["tok"], 256)
    ev = TeacherCache(cfg.out_dir, split="eval")
    assert len(ev) == len(eval_ds) == summary["splits"]["eval"]["examples"]
    t = ev.target(len(ev) - 1, eval_ds[-1]["input_ids"], eval_ds[-1]["labels"])
    assert torch.allclose(
        t.probs.sum(-1)[torch.from_numpy(codec.stored_positions(eval_ds[-1]["labels"]))], torch.tensor(1.0)
    )
    ds, tok, teacher = tiny["ds"], tiny["tok"], tiny["teacher"]
    cache = TeacherCache(cfg.out_dir)
    assert cache.mode == "sampled" and cache.temperature == 2.0
    examples = [ds[i] for i in range(8, 16)]  # the first batch of the second shard
    logits = stored_row_logits(teacher, tok, examples)
    for j, ex in enumerate(examples):
        rows = torch.from_numpy(codec.stored_positions(ex["labels"]))
        u = capture.example_uniforms(3, "train", 8 + j, len(rows), 16)
        want = capture.sampled_targets(logits[j] / 2.0, u)
        t = cache.target(8 + j, ex["input_ids"], ex["labels"])
        assert torch.equal(t.tail, torch.zeros(len(t.ids)))
        assert torch.allclose(t.probs[rows].sum(-1), torch.ones(len(rows)))
        got_ids = t.ids[rows][t.probs[rows] > 0]
        assert torch.equal(got_ids, want["ids"])
        assert torch.equal((t.probs[rows][t.probs[rows] > 0] * 16).round().long(), want["counts"])
    assert summary["splits"]["train"]["bytes_per_token"] < 16 * (9 + 4) / 8 + 2


def test_random_access_across_shards_and_batches(tiny):
    cache, ds = TeacherCache(tiny["out"]), tiny["ds"]
    n = len(ds)
    assert n > 3 * cache.shard_examples
    order = np.random.default_rng(0).permutation(n)[:40]
    got = {int(i): cache.target(int(i), ds[int(i)]["input_ids"], ds[int(i)]["labels"]) for i in order}
    fresh = TeacherCache(tiny["out"])
    streamed = dict(fresh.iter_targets(ds[i] for i in range(n)))
    for i, t in got.items():
        assert torch.equal(t.ids, streamed[i].ids) and torch.equal(t.probs, streamed[i].probs)
    idx = [int(i) for i in order[:4]]
    exs = [ds[i] for i in idx]
    bt = cache.batch_target(idx, exs, width=130)
    assert bt.ids.shape == (4, 129, 64) and bt.tail.shape == (4, 129)
    assert (bt.probs[:, 127:] == 0).all()
    assert torch.equal(bt.ids[1, :127], got[idx[1]].ids)


@pytest.mark.parametrize(("name", "topk_tail"), [("topk", True), ("topk", False), ("topk_all", True), ("sampled", True)])
def test_batch_target_equals_the_examples_targets_collated(tiny, tiny_caches, name, topk_tail):
    """The batch, assembled in one pass over all its examples' rows, equals the per-example targets padded and
    stacked (collate_targets), whatever shards the examples come from and however wide the batch."""
    cache, ds = TeacherCache(tiny_caches[name]["out"], topk_tail=topk_tail), tiny["ds"]
    idx = [int(i) for i in np.random.default_rng(1).permutation(len(ds))[:6]]
    exs = [ds[i] for i in idx]
    longest = max(len(ex["input_ids"]) for ex in exs)
    for width in (None, longest + 3):
        got = cache.batch_target(idx, exs, width=width)
        want = collate_targets([cache.target(i, ex["input_ids"], ex["labels"]) for i, ex in zip(idx, exs, strict=True)],
                               length=(longest if width is None else width) - 1)
        assert torch.equal(got.ids, want.ids) and torch.equal(got.probs, want.probs)
        assert (got.tail is None) == (want.tail is None) == (not topk_tail)
        if topk_tail:
            assert torch.equal(got.tail, want.tail)
    with pytest.raises(ValueError, match="shorter than the longest"):
        cache.batch_target(idx, exs, width=longest - 1)


def test_collate_targets_pads_with_zero_probability():
    a = SparseTarget(torch.ones(3, 2, dtype=torch.long), torch.full((3, 2), 0.5), torch.zeros(3))
    b = SparseTarget(torch.full((5, 4), 7), torch.full((5, 4), 0.25), torch.zeros(5))
    out = collate_targets([a, b])
    assert out.ids.shape == (2, 5, 4) and out.tail.shape == (2, 5)
    assert (out.probs[0, 3:] == 0).all() and (out.probs[0, :, 2:] == 0).all()
    assert collate_targets([SparseTarget(a.ids, a.probs, None), b]).tail is None


def test_cached_targets_feed_the_chunked_sparse_loss(tiny):
    """The training path: a batch's targets from the cache through chunked_kd_loss == the naive loss."""
    from distill.losses import LinearHead

    cache, ds = TeacherCache(tiny["out"]), tiny["ds"]
    idx = [3, 17, 40, 41]
    exs = [ds[i] for i in idx]
    batch = collate(exs, 258)
    target = cache.batch_target(idx, exs, width=batch["input_ids"].shape[1])
    labels = batch["labels"][:, 1:]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(*labels.shape, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    head = LinearHead(torch.randn(263, 16, generator=gen, dtype=torch.float64))
    n = int((labels != IGNORE_INDEX).sum())
    for tgt in (target, TeacherCache(tiny["out"], topk_tail=False).batch_target(idx, exs)):
        loss, _ = chunked_kd_loss(hidden, head, labels, tgt, n)
        ref = naive_kd_loss(hidden, head, labels, tgt, n)
        assert torch.isfinite(loss) and torch.allclose(loss, ref)


# ----------------------------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_sigkill_then_resume_with_two_processes_is_byte_identical(tmp_path):
    """Kill a capture mid-way (SIGKILL), resume it with ``accelerate launch`` on 2 processes (each writes
    its own shards, the main process merges the manifest): the files equal an uninterrupted
    single-process capture byte for byte."""
    overrides = ["data.max_examples=240"]
    ref = cfg_with(tmp_path / "ref", *overrides)
    recipe.main(ref)

    out = tmp_path / "killed"
    args = [str(TINY_CACHE), f"out_dir={out}", *SMALL_CACHE, *SHARP_TEACHER, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, *["-m", "distill", "cache"], *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    try:
        while len(list(out.glob("shard-*.bin"))) < 6:
            assert proc.poll() is None, (
                f"the capture ended before it could be killed: {proc.stderr.read()[-2000:]}"
            )
            assert time.time() < deadline, "no shard appeared"
            time.sleep(0.01)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert not (out / "manifest.json").exists(), "the capture was not killed mid-way"
    with pytest.raises(IncompleteCacheError, match="incomplete cache.*run the same `distill cache` command"):
        TeacherCache(out)

    # debris of a killed writer and a damaged complete shard are both handled on resume
    (out / ".shard-train-000003.bin.abc.tmp").write_bytes(b"half a shard")
    first = out / "shard-train-000000.bin"
    first.write_bytes(first.read_bytes()[:100])
    kept = len(list(out.glob("shard-*.bin"))) - 1
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        *["-m", "distill", "cache"],
        *args,
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rewriting it" in res.stderr and "resuming the capture" in res.stderr
    assert files_of(out) == files_of(tmp_path / "ref")
    assert not list(out.glob(".*.tmp"))
    assert kept >= 5
    # a finished cache is left alone; other settings are refused
    assert recipe.main(cfg_with(out, *overrides))["shards_written"] == 0
    with pytest.raises(ValueError, match="other settings.*k: 64"):
        recipe.main(cfg_with(out, *overrides, "k=8"))


def test_resume_of_a_partial_cache_with_other_settings_is_refused(tmp_path):
    cfg = cfg_with(tmp_path / "c")
    recipe.main(cfg)
    (tmp_path / "c" / "manifest.json").unlink()
    with pytest.raises(ValueError, match="partial cache built with other settings.*temperature"):
        recipe.main(cfg_with(tmp_path / "c", "temperature=2.0"))


# ----------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def copy_of(tiny, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny["out"], dst)
    return dst


def test_missing_manifest_is_an_incomplete_cache(copy_of):
    (copy_of / "manifest.json").unlink()
    with pytest.raises(
        IncompleteCacheError, match="incomplete cache.*run the same `distill cache` command to resume"
    ):
        TeacherCache(copy_of)
    with pytest.raises(reader.CacheError, match="does not exist"):
        TeacherCache(copy_of / "nope")


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "delete"])
def test_damaged_shard_names_the_shard_and_example(copy_of, tiny, damage):
    ds = tiny["ds"]
    shard = copy_of / "shard-train-000002.bin"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "bitflip":
        data[len(data) // 2] ^= 0x10
        shard.write_bytes(data)
    else:
        shard.unlink()
    cache = TeacherCache(copy_of)
    ex = ds[5]
    assert cache.target(5, ex["input_ids"], ex["labels"]).ids.shape[0] == 127  # other shards still read
    ex = ds[19]
    reason = {"truncate": "truncated", "bitflip": "corrupt", "delete": "missing"}[damage]
    with pytest.raises(
        CorruptShardError, match=rf"shard-train-000002\.bin .*examples 16-23\) .*{reason}.*example 19 "
    ):
        cache.target(19, ex["input_ids"], ex["labels"])
    with pytest.raises(CorruptShardError):  # and again: a bad shard is never half-used
        cache.target(16, ds[16]["input_ids"], ds[16]["labels"])


def test_unsupported_format_version(copy_of):
    manifest = json.loads((copy_of / "manifest.json").read_text())
    manifest["version"] = 99
    (copy_of / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(reader.CacheError, match="unsupported format version 99.*reads versions 2 and 3"):
        TeacherCache(copy_of)


def test_version_2_caches_still_read(copy_of, tiny):
    """Version 3 added the hybrid mode and changed no layout of version 2 (top-k, sampled): a cache written
    as version 2 (its manifest and every shard's header say so) reads to the same targets."""
    ds = tiny["ds"]
    want = TeacherCache(copy_of).target(3, ds[3]["input_ids"], ds[3]["labels"])
    manifest = json.loads((copy_of / "manifest.json").read_text())
    manifest["version"] = 2
    for entry in manifest["splits"]["train"]["shards"]:
        path = copy_of / entry["file"]
        data = bytearray(path.read_bytes())
        data[8:12] = (2).to_bytes(4, "little")
        data[-32:] = codec.hashlib.sha256(data[:-32]).digest()
        path.write_bytes(bytes(data))
        entry["sha256"] = codec.hashlib.sha256(bytes(data)).hexdigest()
    (copy_of / "manifest.json").write_text(json.dumps(manifest))
    got = TeacherCache(copy_of).target(3, ds[3]["input_ids"], ds[3]["labels"])
    assert torch.equal(got.ids, want.ids) and torch.equal(got.probs, want.probs) and torch.equal(got.tail, want.tail)
    # the same `distill cache` command leaves the complete version-2 cache as it is (it reads)
    again = recipe.main(tiny["cfg"].model_copy(update={"out_dir": str(copy_of)}))
    assert again["shards_written"] == 0
    assert json.loads((copy_of / "manifest.json").read_text())["version"] == 2
    manifest["params"]["mode"] = "dense"
    (copy_of / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(reader.CacheError, match="unknown cache mode 'dense'"):
        TeacherCache(copy_of)


def test_other_tokenizer_vocabulary_seq_len_or_data_is_refused(tiny):
    cache, ds, tok = TeacherCache(tiny["out"]), tiny["ds"], tiny["tok"]
    from distill.tokenizer import tokenizer_fingerprint

    fp = tokenizer_fingerprint(tok)
    cache.check_compatible(fp, len(tok), 128, codec.data_fingerprint(ds), len(ds))  # the right one passes
    with pytest.raises(CacheMismatchError, match="another tokenizer"):
        cache.check_compatible(tokenizer_fingerprint="0" * 64)
    with pytest.raises(CacheMismatchError, match="vocabulary of 263 tokens.*has 300"):
        cache.check_compatible(vocab_size=300)
    with pytest.raises(CacheMismatchError, match="data.seq_len=128.*data.seq_len=64"):
        cache.check_compatible(seq_len=64)
    with pytest.raises(CacheMismatchError, match="other data"):
        cache.check_compatible(data_fingerprint=codec.data_fingerprint(hashes=[b"x" * 8]))
    with pytest.raises(CacheMismatchError, match="other data: it holds"):
        cache.check_compatible(num_examples=len(ds) + 1)

    ex = ds[10]
    other = list(ex["input_ids"])
    other[5] = (other[5] + 1) % 256
    with pytest.raises(
        CacheMismatchError, match="example 10: its tokens do not match.*other data, another tokenizer"
    ):
        cache.target(10, other, ex["labels"])
    with pytest.raises(CacheMismatchError, match="128 tokens for it, the data 64: another data.seq_len"):
        cache.target(10, ex["input_ids"][:64], ex["labels"][:64])
    with pytest.raises(IndexError, match="out of range"):
        cache.target(len(ds), ex["input_ids"], ex["labels"])


def test_config_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="mode"):
        cfg_with(tmp_path, "mode=full")
    with pytest.raises(ConfigError, match="unknown key"):
        cfg_with(tmp_path, "kk=3")
    with pytest.raises(ValueError, match="k=999 must be between 1 and the vocabulary size 263"):
        recipe.main(cfg_with(tmp_path / "c", "k=999"))
