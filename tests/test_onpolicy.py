"""On-policy batch sources (gkd, skd, distillm) and the sampled-token reverse KL: exactness, resume, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, kill_train_then_resume
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from distill import training
from distill.config import ConfigError, TrainConfig, load_config
from distill.engines.local import Correction
from distill.generation.correction import corrected_sample
from distill.generation.sampling import SamplingParams, row_seed, sample
from distill.losses import LossSpec, SparseTarget, kd_loss_per_token, token_divergence
from distill.models import load_model, load_tokenizer
from distill.sources.distillm import AdaptiveThreshold
from distill.sources.gkd import GkdSource
from distill.sources.onpolicy import example_prompt

TINY = {"gkd": REPO / "configs" / "tiny" / "gkd.yaml", "skd": REPO / "configs" / "tiny" / "skd.yaml",
        "distillm": REPO / "configs" / "tiny" / "distillm.yaml"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def cfg_of(tmp_path: Path, method: str, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, TINY[method], [f"out_dir={tmp_path / 'run'}", "log.progress=false", *overrides])


def records(cfg: TrainConfig, split: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines())
            if r["split"] == split]


def weights(cfg: TrainConfig) -> dict:
    return load_file(str(Path(cfg.out_dir) / "student" / "model.safetensors"))


def tiny_lm(seed: int, hidden: int, init: float = 0.2):
    cfg = AutoConfig.for_model("llama", vocab_size=40, hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=64, initializer_range=init, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


PROMPTS = [[2, 5, 6], [2, 7], [2, 8, 9, 10]]


# ------------------------------------------------------------------------------------------- gkd


def test_tiny_configs_train_and_log_the_on_policy_metrics(tmp_path):
    for method in ("gkd", "skd", "distillm"):
        cfg = cfg_of(tmp_path / method, method)
        summary = training.train(cfg)
        assert summary["steps"] == 8
        recs = records(cfg)
        assert len(recs) == 8
        for r in recs:
            assert {"gen_seconds", "teacher_seconds", "train_seconds", "on_policy"} <= r.keys()
            assert r["on_policy"] in (0.0, 1.0)
        if method == "skd":
            assert all(0 <= r["skd_replacement_rate"] <= 1 and r["skd_k"] == 25 and r["on_policy"] == 1.0 for r in recs)
            assert all(r["gen_length"] > 0 for r in recs)
        if method == "distillm":
            assert all(r["on_policy"] + r["replay"] <= 1.0 and 0.5 <= r["distillm_threshold"] <= 1.0 for r in recs)


def test_lambda_zero_is_supervised_kd_exactly(tmp_path):
    common = ["train.max_steps=5", "eval.every=0", "checkpoint.every=0"]
    gkd = cfg_of(tmp_path / "gkd", "gkd", *common, "train.batches.student_fraction=0")
    supervised = cfg_of(tmp_path / "sup", "gkd", *common, "train.batches=dataset")
    training.train(gkd)
    training.train(supervised)
    assert [r["loss"] for r in records(gkd)] == [r["loss"] for r in records(supervised)]
    assert all(r["on_policy"] == 0.0 for r in records(gkd))
    w1, w2 = weights(gkd), weights(supervised)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_lambda_one_trains_on_the_students_own_samples(tmp_path, monkeypatch):
    """Every step's batch is what the sampler draws from the student's weights at that step, with the seed
    of (seed, step, example)."""
    checked = []
    real = GkdSource.batches
    cfg = cfg_of(tmp_path, "gkd", "train.batches.student_fraction=1", "train.max_steps=4", "eval.every=0",
                 "checkpoint.every=0")
    settings = cfg.train.batches
    params = SamplingParams(temperature=settings.temperature, top_p=settings.top_p,
                            max_new_tokens=settings.max_new_tokens, stop_ids=(load_tokenizer(cfg.student, "student").eos_token_id,))

    def checking(source, ctx, step):
        batches = real(source, ctx, step)
        for m, batch in enumerate(batches):
            idx = ctx.indices(step, m)
            prompts = [example_prompt(ctx.train_ds[i], "gkd", ctx.tokenizer.bos_token_id) for i in idx]
            again = sample(ctx.student, prompts, params, pad_id=ctx.pad_id,
                           seeds=[row_seed(cfg.train.seed, "gkd", step, i) for i in idx]).to_batch(ctx.pad_id)
            assert torch.equal(again["input_ids"], batch["input_ids"]) and torch.equal(again["labels"], batch["labels"])
            checked.append(step)
        return batches

    monkeypatch.setattr(GkdSource, "batches", checking)
    training.train(cfg)
    assert checked == [0, 1, 2, 3]
    assert all(r["on_policy"] == 1.0 for r in records(cfg))


@pytest.mark.slow
def test_two_processes_make_the_same_choice(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "distill", "train",
           str(TINY["gkd"]), f"out_dir={out}", "log.progress=false", "train.max_steps=6", "train.batch_size=4",
           "eval.every=0", "checkpoint.every=0"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    recs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    shares = [r["on_policy"] for r in recs]
    assert len(shares) == 6 and set(shares) <= {0.0, 1.0} and 0.0 in shares and 1.0 in shares  # never 0.5


# ------------------------------------------------------------------------------------------- skd


def test_skd_with_k_equal_to_the_vocabulary_never_replaces():
    student, teacher = tiny_lm(0, 32, init=0.05), tiny_lm(1, 48)
    params = SamplingParams(temperature=1.0, max_new_tokens=8, stop_ids=(1,))
    seeds = [row_seed(3, i) for i in range(len(PROMPTS))]
    gen, replaced, proposed = corrected_sample(student, Correction(teacher, 1.0), PROMPTS, params, 40,
                                               pad_id=0, seeds=seeds)
    assert replaced == 0 and proposed > 0
    alone = sample(student, PROMPTS, params, pad_id=0, seeds=[row_seed(s, "student") for s in seeds])
    assert gen.completions() == alone.completions()  # exactly the student's own samples


def test_skd_with_k_one_and_an_argmax_teacher_is_the_teachers_greedy_continuation():
    student, teacher = tiny_lm(0, 32, init=0.05), tiny_lm(1, 48)
    params = SamplingParams(temperature=1.0, max_new_tokens=8, stop_ids=(1,))
    gen, replaced, proposed = corrected_sample(student, Correction(teacher, 0.0), PROMPTS, params, 1, pad_id=0,
                                               seeds=[row_seed(4, i) for i in range(len(PROMPTS))])
    greedy = sample(teacher, PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=8, stop_ids=(1,)), pad_id=0)
    assert gen.completions() == greedy.completions()
    assert 0 < replaced <= proposed  # the student's proposals were corrected


def test_skd_schedule_of_k(tmp_path):
    cfg = cfg_of(tmp_path, "skd", "train.batches.skd_top_k=40", "train.batches.skd_top_k_final=2", "train.max_steps=5",
                 "eval.every=0", "checkpoint.every=0")
    training.train(cfg)
    ks = [r["skd_k"] for r in records(cfg)]
    assert ks[0] == 40 and ks[-1] == 2 and ks == sorted(ks, reverse=True)


# ------------------------------------------------------------------------------------------- distillm


def test_distillm_raises_its_threshold_when_the_eval_loss_rises():
    phi = AdaptiveThreshold(0.2, step=0.1, eps=0.1)
    for loss, want in ((2.0, 0.2), (2.05, 0.2), (2.11, 0.3), (2.15, 0.3), (2.25, 0.4), (1.0, 0.4), (9.0, 0.5)):
        phi.observe(loss)
        assert phi.value == pytest.approx(want), (loss, phi.value)
    for _ in range(20):
        phi.observe(phi.last_raise + 1)
    assert phi.value == 1.0


def test_distillm_trains_from_its_replay_buffer(tmp_path):
    cfg = cfg_of(tmp_path, "distillm", "loss.divergence=skew_kl", "train.batches.adaptive_init=1.0",
                 "train.batches.replay_capacity=16", "train.max_steps=10", "eval.every=0", "checkpoint.every=0")
    training.train(cfg)
    recs = records(cfg)
    fresh = [r["on_policy"] for r in recs]
    replay = [r["replay"] for r in recs]
    assert fresh[:2] == [1.0, 1.0]  # the buffer fills first (2 steps of 8)
    assert sum(replay) > 0 and all(a + b == 1.0 for a, b in zip(fresh, replay, strict=True))
    assert all(r["distillm_threshold"] == 1.0 for r in recs)


# ------------------------------------------------------------------------------------------- resume


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gkd", "skd", "distillm"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, method):
    extra = {"gkd": [], "skd": [], "distillm": ["loss.divergence=skew_kl", "train.batches.adaptive_init=0.8",
                                                "train.batches.replay_capacity=24"]}[method]
    source = TINY[method]
    steps = ["train.max_steps=24", "checkpoint.every=4", "eval.every=8", "log.every=1", *extra]
    ref = load_config(TrainConfig, source, [f"out_dir={tmp_path / 'ref'}", "log.progress=false", *steps])
    training.train(ref)
    out = tmp_path / "killed"
    kill_train_then_resume(source, out, steps, kill_at=12, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=180)
    a, b = load_file(str(out / "student" / "model.safetensors")), weights(ref)
    assert all(torch.equal(a[k], b[k]) for k in a), method
    got = [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
           if r["split"] == "train"]
    assert got == [(r["step"], r["loss"]) for r in records(ref)]


# ------------------------------------------------------------------------------------------- bad input


def test_bad_settings_are_named(tmp_path, tiny_caches):
    with pytest.raises(ConfigError, match="train.batches.student_fraction"):
        cfg_of(tmp_path, "gkd", "train.batches.student_fraction=1.5")
    with pytest.raises(ConfigError, match="train.batches.skd_top_k"):
        cfg_of(tmp_path, "skd", "train.batches.skd_top_k=0")
    with pytest.raises(ConfigError, match=r"train.batches.skd_top_k: unknown key"):  # another source's setting
        cfg_of(tmp_path, "gkd", "train.batches.skd_top_k=5")
    with pytest.raises(ConfigError, match="set data.packing=false"):
        cfg_of(tmp_path, "gkd", "data.packing=true")
    text = ["data.source=configs/tiny/data/docstrings.jsonl", "data.format=text", "data.seq_len=32",
            "data.truncate=true"]
    with pytest.raises(ValueError, match="train.batches=gkd needs prompts"):
        training.train(cfg_of(tmp_path / "a", "gkd", *text, "train.batches.student_fraction=1"))
    with pytest.raises(ValueError, match="a cached teacher cannot score text the student writes"):
        training.train(cfg_of(tmp_path / "b", "gkd", "teacher=null", f"teacher.cache={tiny_caches['topk']['out']}",
                          "data.source=configs/tiny/data/docstrings.jsonl", "data.seq_len=128", "data.max_examples=120",
                          "data.format=auto"))
    with pytest.raises(ValueError, match="train.batches.max_new_tokens=60 .* exceeds the models' 64 positions"):
        training.train(cfg_of(tmp_path / "c", "gkd", "train.batches.max_new_tokens=60"))
    with pytest.raises(ValueError, match="needs a teacher|set a teacher"):
        training.train(cfg_of(tmp_path / "d", "gkd", "teacher=null"))
    member = ("{tokenizer: byte, config: {model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,"
              " num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64}}")
    with pytest.raises(ValueError, match="train.batches=skd: this teacher cannot correct the student's tokens"):
        training.train(cfg_of(tmp_path / "g", "skd", "teacher=null", f"teacher.teachers=[{member}, {member}]"))
    with pytest.raises(ValueError, match="loss.baseline=running: the baseline is unbiased only on tokens drawn from"):
        training.train(cfg_of(tmp_path / "e", "gkd", "loss.divergence=sampled_reverse_kl",
                              "train.batches.temperature=0.7"))
    training.train(cfg_of(tmp_path / "f", "gkd", "loss.divergence=sampled_reverse_kl", "train.batches.temperature=0.7",
                      "loss.baseline=none", "train.max_steps=1", "eval.every=0", "checkpoint.every=0"))


def test_the_onpolicy_section_is_refused_with_what_to_write_instead(tmp_path):
    """The settings of an on-policy source are its own keys of train.batches; the section they had before is
    refused with the keys to write, which then load as the same settings."""
    with pytest.raises(ConfigError) as err:
        cfg_of(tmp_path, "gkd", "onpolicy.student_fraction=1", "onpolicy.max_new_tokens=5", "onpolicy.skd_top_k=3")
    message = str(err.value).splitlines()[-1]
    assert ("write train.batches: {source: gkd, student_fraction: 1, max_new_tokens: 5} (or train.batches.source=gkd "
            "train.batches.student_fraction=1 train.batches.max_new_tokens=5) and remove `onpolicy`; drop skd_top_k "
            "(not settings of gkd)") in message
    fixed = message.split("(or ")[1].split(")")[0].split()
    settings = cfg_of(tmp_path, "gkd", *fixed).train.batches
    assert (settings.source, settings.student_fraction, settings.max_new_tokens) == ("gkd", 1.0, 5)
    with pytest.raises(ConfigError, match=r"train.batches=dataset has no on-policy settings: remove it"):
        cfg_of(tmp_path, "gkd", "train.batches=dataset", "onpolicy.temperature=1.0")


def test_a_source_named_on_the_command_line_takes_keys_after_it(tmp_path):
    """`train.batches=NAME` replaces the file's section with that source's defaults; keys given after it are
    its own; a section without a source is refused with what to write."""
    settings = cfg_of(tmp_path, "gkd", "train.batches=distillm", "train.batches.max_new_tokens=6").train.batches
    assert (settings.source, settings.max_new_tokens, settings.adaptive_init) == ("distillm", 6, 0.0)
    with pytest.raises(ConfigError, match=r"train.batches: name the source"):
        cfg_of(tmp_path, "gkd", "train.batches=null", "train.batches.max_new_tokens=6")


# ------------------------------------------------------------------------------------------- sampled reverse KL


def test_sampled_reverse_kl_gradient_is_unbiased_for_the_reverse_kl():
    """Averaged over tokens drawn from the student, the surrogate's gradient is the gradient of KL(q || p)."""
    g = torch.Generator().manual_seed(0)
    v, n = 6, 60000
    zs = (torch.randn(v, generator=g, dtype=torch.float64) * 1.2).requires_grad_()
    zt = torch.randn(v, generator=g, dtype=torch.float64) * 1.2
    q = torch.softmax(zs.detach(), -1)
    draws = torch.multinomial(q, n, replacement=True, generator=g)
    spec = LossSpec("sampled_reverse_kl")
    for teacher in (zt.expand(n, v), SparseTarget(torch.arange(v).expand(n, v), torch.softmax(zt, -1).expand(n, v),
                                                    torch.zeros(n, dtype=torch.float64))):
        out = kd_loss_per_token(zs.expand(n, v), draws, teacher, spec)
        (grad,) = torch.autograd.grad(out["loss"].mean(), zs)
        (exact,) = torch.autograd.grad(token_divergence(zs, zt, "reverse_kl"), zs)
        torch.testing.assert_close(grad, exact, atol=0.02, rtol=0)  # ~5 standard errors at n = 60,000; seeded
        assert float(out["div"].mean()) == pytest.approx(float(token_divergence(zs.detach(), zt, "reverse_kl")),
                                                         abs=0.02)
    with pytest.raises(ValueError, match="lacks some"):
        kd_loss_per_token(zs.expand(2, v), torch.tensor([0, 5]), SparseTarget(torch.tensor([[0], [1]]),
                          torch.tensor([[1.0], [1.0]]), torch.zeros(2)), spec)


def test_gkd_with_sampled_reverse_kl_trains(tmp_path):
    cfg = cfg_of(tmp_path, "gkd", "loss.divergence=sampled_reverse_kl", "train.batches.student_fraction=1",
                 "train.max_steps=4", "eval.every=0", "checkpoint.every=0")
    training.train(cfg)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records(cfg))


# ------------------------------------------------------------------------------------------- what the recipe minimizes
#
# A 9-token vocabulary and completions of 1-2 tokens: every completion can be enumerated, so the exact reverse KL
# between the student's and the teacher's completion distributions is computed from the two models' logits alone.

VOCAB = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "b", "c", "d", "="]
LETTERS = "abcd"


@pytest.fixture(scope="module")
def tiny_vocab(tmp_path_factory) -> Path:
    """A character tokenizer of the 9 tokens above, and 4 prompts ("a=" .. "d=") with 16 rows each (rows are
    sampled with their own seeds, so a step of 64 rows draws 16 completions per prompt)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny_vocab")
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(root / "tokenizer")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"{c}=", "response": "a"}) + "\n"
                                                for c in LETTERS for _ in range(16)))
    return root


def tiny_vocab_cfg(root: Path, out: Path, length: int, baseline: str, steps: int = 30, lr: float = 1e-2,
                   fraction: float = 1.0, **sections) -> TrainConfig:
    """gkd with sampled_reverse_kl, completions of up to ``length`` tokens, a step = all 64 rows; the teacher
    is a random model with a large init (peaked), the student a random one with a small init (flat)."""
    arch = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32}
    tok = str(root / "tokenizer")
    return TrainConfig.model_validate({
        "out_dir": str(out),
        "student": {"tokenizer": tok, "seed": 1, "config": arch},
        "teacher": {"tokenizer": tok, "seed": 0, "config": {**arch, "hidden_size": 64, "initializer_range": 1.0}},
        "data": {"source": str(root / "prompts.jsonl"), "format": "prompt_response", "packing": False, "seq_len": 8,
                 "eval_fraction": 0.0},
        "loss": {"divergence": "sampled_reverse_kl", "alpha": 0.0, "baseline": baseline},
        "train": {"batches": {"source": "gkd", "student_fraction": fraction, "temperature": 1.0,
                              "max_new_tokens": length}, "max_steps": steps, "batch_size": 16 * len(LETTERS)},
        "optim": {"lr": lr, "warmup_steps": 0}, "eval": {"every": 0}, "checkpoint": {"every": 0},
        "log": {"every": 1, "progress": False}, **sections})


@torch.no_grad()
def exact_reverse_kl(student, teacher, prompts: list[list[int]], eos: int, length: int) -> float:
    """The mean over prompts of KL(q || p) = sum_y q(y) log(q(y) / p(y)) over every completion y of up to
    ``length`` tokens (a completion ends at eos or at ``length``), enumerated: the sum over positions of each
    unfinished prefix's probability under q times the full-vocabulary KL of the next token there."""
    v = len(VOCAB)
    total = 0.0
    for prompt in prompts:
        frontier = [(list(prompt), 1.0)]  # unfinished prefixes and their probability under the student
        for _ in range(length):
            ids = torch.tensor([p for p, _ in frontier])
            weight = torch.tensor([w for _, w in frontier], dtype=torch.float64)
            lq = torch.log_softmax(student(input_ids=ids).logits[:, -1, :v].double(), -1)
            lp = torch.log_softmax(teacher(input_ids=ids).logits[:, -1, :v].double(), -1)
            total += float((weight * (lq.exp() * (lq - lp)).sum(-1)).sum())
            frontier = [(p + [t], w * float(lq[i, t].exp())) for i, (p, w) in enumerate(frontier)
                        for t in range(v) if t != eos]
    return total / len(prompts)


def kl_before_and_after(cfg: TrainConfig, monkeypatch) -> tuple[float, float]:
    """Train with the recipe (training.train) and return the exact reverse KL of the student before its first step
    and after its last (to the teacher, built again from its config as the run builds it: a seeded random init)."""
    seen: dict = {}
    real = GkdSource.batches
    teacher = load_model(cfg.teacher, "teacher", load_tokenizer(cfg.teacher, "teacher")).eval()
    length = cfg.train.batches.max_new_tokens

    def first_step(source, ctx, step):
        if step == 0:
            tok = ctx.tokenizer
            seen["prompts"] = [[tok.bos_token_id, VOCAB.index(c), VOCAB.index("=")] for c in LETTERS]
            trained = {tuple(example_prompt(ex, "gkd", tok.bos_token_id)) for ex in ctx.train_ds}
            assert trained == {tuple(p) for p in seen["prompts"]}  # the prompts the recipe trains on
            seen["models"] = (ctx.student, teacher)  # the student is trained in place
            seen["eos"] = tok.eos_token_id
            seen["before"] = exact_reverse_kl(*seen["models"], seen["prompts"], seen["eos"], length)
        return real(source, ctx, step)

    monkeypatch.setattr(GkdSource, "batches", first_step)
    training.train(cfg)
    monkeypatch.setattr(GkdSource, "batches", real)
    after = exact_reverse_kl(*seen["models"], seen["prompts"], seen["eos"], length)
    return seen["before"], after


def flip_the_reward(monkeypatch) -> None:
    """The surrogate with -f in place of f (alpha = 0: the loss is s * stopgrad(f - b) * log q(x), negated)."""
    from distill.losses import divergences

    real = divergences._sampled_reverse_kl

    def flipped(*args, **kwargs):
        out = real(*args, **kwargs)
        return {**out, "loss": -out["loss"]}

    monkeypatch.setattr(divergences, "_sampled_reverse_kl", flipped)


@pytest.mark.parametrize("length", [1, 2])
def test_the_recipe_descends_the_exact_reverse_kl_on_the_students_own_completions(tmp_path, tiny_vocab, monkeypatch,
                                                                                  length):
    """gkd (lambda = 1) with sampled_reverse_kl through the train recipe: the exact KL(q || p) over the student's
    own completions falls; with the reward's sign flipped it rises. One token: the KL of that token, exactly
    the objective whose gradient the estimator is (docs/methods.md §8). Two tokens: the sequence-level KL,
    which the estimator descends without its credit to the first token for the second's KL."""
    plain = kl_before_and_after(tiny_vocab_cfg(tiny_vocab, tmp_path / "plain", length, "none"), monkeypatch)
    with monkeypatch.context() as m:
        flip_the_reward(m)
        flipped = kl_before_and_after(tiny_vocab_cfg(tiny_vocab, tmp_path / "flipped", length, "none"), monkeypatch)
    runs = {"plain": plain, "flipped": flipped}
    if length == 2:
        runs["running"] = kl_before_and_after(tiny_vocab_cfg(tiny_vocab, tmp_path / "running", length, "running"),
                                              monkeypatch)
    print(f"\nexact KL(q || p), completions of up to {length} token(s), 30 steps: "
          + ", ".join(f"{k} {a:.2f} -> {b:.2f}" for k, (a, b) in runs.items()))
    assert plain[0] == flipped[0] > 5.0  # the same start: a flat student, a peaked teacher
    assert plain[1] < 0.5 * plain[0]  # seeds 0-2 of student and data: -60% to -90% (30 steps)
    assert flipped[1] > 1.2 * flipped[0]  # +30% to +90%
    if length == 2:
        assert runs["running"][1] < 0.5 * runs["running"][0]  # -70% to -80%


# ------------------------------------------------------------------------------------------- the running baseline


def test_a_baseline_keeps_the_sampled_gradient_unbiased_and_lowers_its_variance():
    """Enumerating the sampled token x over the vocabulary: for any constant b, E_{x~q}[grad of the surrogate
    stopgrad(f(x) - b) log q(x)] is exactly the gradient of KL(q || p) at that position (a dense teacher, or
    one that gives only the sampled token's probability); its variance is lowest near b = E_q[f] = KL. A flat
    student and a peaked teacher (the start of distillation) make f large next to its spread: there the
    baseline's reduction is built in."""
    g = torch.Generator().manual_seed(0)
    v = 64
    zs = 0.3 * torch.randn(v, generator=g, dtype=torch.float64)  # the student: nearly flat
    zt = 0.3 * torch.randn(v, generator=g, dtype=torch.float64)
    zt[0] += 10.0  # the teacher: sure of one token
    lq, lp = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    q = lq.exp()
    kl = float((q * (lq - lp)).sum())
    z = zs.clone().requires_grad_()
    lqz = torch.log_softmax(z, -1)
    (exact,) = torch.autograd.grad((lqz.exp() * (lqz - lp)).sum(), z)  # the reference: plain autograd of KL
    variances = {}
    for b in (0.0, kl, 3.0, -2.0):
        spec = LossSpec("sampled_reverse_kl", baseline=b)
        for teacher in ("dense", "sampled token only"):
            grads = []
            for x in range(v):
                signal = zt[None] if teacher == "dense" else SparseTarget(torch.tensor([[x]]), lp[x].exp().reshape(1, 1))
                z = zs.clone().requires_grad_()
                out = kd_loss_per_token(z[None], torch.tensor([x]), signal, spec)
                assert float(out["div"][0]) == pytest.approx(float(lq[x] - lp[x]), abs=1e-12)  # div is f, not f - b
                grads.append(torch.autograd.grad(out["loss"].sum(), z)[0])
            grads_xV = torch.stack(grads)
            mean = (q[:, None] * grads_xV).sum(0)
            torch.testing.assert_close(mean, exact, atol=1e-12, rtol=0)  # unbiased for every b, by enumeration
            variances[b, teacher] = float((q * ((grads_xV - mean) ** 2).sum(-1)).sum())
        assert variances[b, "dense"] == pytest.approx(variances[b, "sampled token only"], rel=1e-9)
    ratio = variances[0.0, "dense"] / variances[kl, "dense"]
    print(f"\nKL = {kl:.2f}; gradient variance over x ~ q: b = 0: {variances[0.0, 'dense']:.3g}, b = KL: "
          f"{variances[kl, 'dense']:.3g} ({ratio:.1f}x lower), b = 3: {variances[3.0, 'dense']:.3g}, "
          f"b = -2: {variances[-2.0, 'dense']:.3g}")
    assert ratio > 10  # 31x here; the variance is quadratic in b, lowest near E_q[f]
    assert variances[kl, "dense"] < variances[3.0, "dense"] < variances[0.0, "dense"] < variances[-2.0, "dense"]


def test_the_chunked_loss_with_a_baseline_equals_the_naive_one():
    """The baseline travels in the LossSpec through the chunked path (several chunks and loss chunks)."""
    from distill.losses import DenseSignal, LinearHead, chunked_kd_loss, naive_kd_loss

    g = torch.Generator().manual_seed(1)
    n, h, v = 23, 8, 17
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    w_s = torch.randn(v, h, generator=g, dtype=torch.float64)
    teacher = DenseSignal(torch.randn(n, 6, generator=g, dtype=torch.float64),
                          LinearHead(2.0 * torch.randn(v, 6, generator=g, dtype=torch.float64)))
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[0, 5, 6]] = -100
    spec = LossSpec("sampled_reverse_kl", baseline=1.7)
    grads = []
    for path in ("naive", "chunked"):
        x, w = hidden.clone().requires_grad_(), w_s.clone().requires_grad_()
        if path == "naive":
            loss = naive_kd_loss(x, LinearHead(w), labels, teacher, 20, spec)
        else:
            loss, _ = chunked_kd_loss(x, LinearHead(w), labels, teacher, 20, spec, chunk_size=8, loss_chunk_size=3)
        loss.backward()
        grads.append((loss.detach(), x.grad, w.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    plain = naive_kd_loss(hidden, LinearHead(w_s), labels, teacher, 20, LossSpec("sampled_reverse_kl"))
    assert float(grads[0][0]) != pytest.approx(float(plain))  # the baseline is in the loss


def test_the_running_baseline_of_a_step_comes_from_earlier_steps_only(tmp_path, tiny_vocab, monkeypatch):
    """Each step's baseline is the decayed mean of f over the earlier steps the student wrote (0 before the
    first), whatever this step draws; steps on the dataset's text use none and leave it as it is."""
    used = []
    real = training.kd_step_loss

    def recording(*args, **kwargs):
        used.append(kwargs.get("baseline", args[8] if len(args) > 8 else 0.0))
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "kd_step_loss", recording)
    cfg = tiny_vocab_cfg(tiny_vocab, tmp_path / "run", 2, "running", steps=10, fraction=0.6)
    training.train(cfg)
    recs = records(cfg)
    assert len(used) == len(recs) == 10  # one micro-batch per step, one record per step
    on = [r["on_policy"] == 1.0 for r in recs]
    assert any(on) and not all(on)
    decay, mean, want = cfg.loss.baseline_decay, None, []
    for r, own in zip(recs, on, strict=True):
        want.append(mean if own and mean is not None else 0.0)
        if own:  # the logged div is this step's mean f over its tokens
            mean = r["div"] if mean is None else decay * mean + (1 - decay) * r["div"]
    assert used == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert [r["baseline"] for r in recs] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert want[on.index(True)] == 0.0 and max(want) > 5.0


def test_a_run_with_the_running_baseline_resumes_exactly(tmp_path, tiny_vocab, monkeypatch):
    from conftest import crash_after_checkpoint

    common = {"checkpoint": {"every": 3}}
    ref = tiny_vocab_cfg(tiny_vocab, tmp_path / "ref", 2, "running", steps=6, **common)
    training.train(ref)
    cfg = tiny_vocab_cfg(tiny_vocab, tmp_path / "crash", 2, "running", steps=6, **common)
    crash_after_checkpoint(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        training.train(cfg)
    monkeypatch.undo()
    kept = Path(cfg.out_dir) / "checkpoints" / "step_00000003"
    state = json.loads((kept / "batch_source_rank0.json").read_text())
    assert state["reward_mean"] > 0
    # the name of the file in checkpoints written before the sources package: read as well
    (kept / "batch_source_rank0.json").rename(kept / "onpolicy_rank0.json")
    training.train(cfg, resume=True)
    a, b = weights(cfg), weights(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["baseline"] for r in records(cfg)] == [r["baseline"] for r in records(ref)]
