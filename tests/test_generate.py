"""The generation layer (distill.generation) and `distill generate`: exactness against transformers, seeds,
stop tokens as labels, resume, best-of-N, different tokenizers, bad input."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, kill_when, run_cli_here
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from distill import training
from distill.commands import generate as recipe
from distill.config import GenerateConfig, TrainConfig, load_config
from distill.generation.sampling import (
    Decoder,
    SamplingParams,
    left_pad,
    pick,
    processed_logprobs,
    row_seed,
    sample,
    uniforms,
)
from distill.generation.speculative import speculative_sample
from distill.tokenizer import byte_tokenizer

TINY_GENERATE = REPO / "configs" / "tiny" / "generate.yaml"
TINY_TRAIN = REPO / "configs" / "tiny" / "train.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def tiny_model(seed: int = 0, vocab: int = 263, init: float = 0.2):
    cfg = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                               initializer_range=init, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


PROMPTS = [[2, 5, 6, 7, 8, 9, 10], [2, 11], [2, 12, 13, 14], [2, 40, 41, 42, 43, 44, 45, 46, 47]]


# ------------------------------------------------------------------------------------------- the sampler


def test_greedy_equals_transformers_greedy_generate():
    model = tiny_model()
    params = SamplingParams(temperature=0.0, max_new_tokens=30, stop_ids=(1,))
    ours = sample(model, PROMPTS, params, pad_id=0)
    ids, mask = left_pad(PROMPTS, 0, "cpu")
    gc = GenerationConfig(do_sample=False, max_new_tokens=30, pad_token_id=0, eos_token_id=1)
    theirs = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
    assert ours.sequences.shape == theirs.shape
    assert torch.equal(ours.sequences, theirs)
    # One prompt at a time (no padding at all) gives the same tokens too.
    for i, p in enumerate(PROMPTS):
        alone = sample(model, [p], params, pad_id=0)
        assert alone.completions()[0] == ours.completions()[i]


def test_sampling_is_reproducible_by_seed_and_independent_of_the_batch():
    model = tiny_model(init=0.05)  # a flat teacher: many different tokens get sampled
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, stop_ids=(1,))
    seeds = [row_seed(7, "p", i) for i in range(len(PROMPTS))]
    a = sample(model, PROMPTS, params, pad_id=0, seeds=seeds)
    b = sample(model, PROMPTS, params, pad_id=0, seeds=seeds)
    assert a.completions() == b.completions()
    # The same rows in another batch (reordered, fewer) draw the same tokens.
    c = sample(model, [PROMPTS[2], PROMPTS[0]], params, pad_id=0, seeds=[seeds[2], seeds[0]])
    assert c.completions() == [a.completions()[2], a.completions()[0]]
    other = sample(model, PROMPTS, params, pad_id=0, seeds=[row_seed(8, "p", i) for i in range(len(PROMPTS))])
    assert other.completions() != a.completions()
    # The process's own random state plays no part.
    torch.manual_seed(123)
    d = sample(model, PROMPTS, params, pad_id=0, seeds=seeds)
    assert d.completions() == a.completions()


def test_processed_distribution_matches_transformers_warpers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 50, generator=g) * 3
    for temperature, top_k, top_p in ((1.0, 0, 0.9), (0.7, 10, 1.0), (1.3, 8, 0.5), (1.0, 0, 0.05)):
        ours = processed_logprobs(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
        ref = logits / temperature
        if top_k:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p < 1:
            ref = TopPLogitsWarper(top_p)(None, ref)
        torch.testing.assert_close(ours, torch.log_softmax(ref, -1))


def test_sampled_tokens_follow_the_sampler_distribution():
    """Chi-square test of many draws against the processed distribution (top-k and top-p included)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 12, generator=g) * 1.5
    params = SamplingParams(temperature=0.8, top_k=8, top_p=0.95)
    probs = processed_logprobs(logits, params).exp()[0]
    n = 40_000
    seeds = torch.arange(n).numpy().astype("uint64") * 7919 + 17
    u = torch.from_numpy(uniforms(seeds, 0))
    tokens, lp = pick(logits.expand(n, 12), params, u)
    counts = torch.bincount(tokens, minlength=12).double()
    assert (counts[probs == 0] == 0).all()  # never a token outside top-k / top-p
    kept = probs > 0
    expected = probs[kept].double() * n
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    dof = int(kept.sum()) - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5, (chi2, dof)  # ~6 sigma of the chi-square's spread; seeded
    torch.testing.assert_close(lp, probs.log()[tokens])  # the sampler's log-probs are of that distribution


def test_stop_token_is_a_label_also_when_pad_is_eos():
    model = tiny_model()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10)
    free = sample(model, PROMPTS[:2], greedy, pad_id=0).completions()
    stop = free[0][3]  # make the 4th token of the first row the stop token, and the pad token as well
    gen = sample(model, PROMPTS[:2], SamplingParams(temperature=0.0, max_new_tokens=10, stop_ids=(stop,)),
                 pad_id=stop)
    comp = gen.completions()
    assert comp[0] == free[0][:4] and comp[0][-1] == stop and bool(gen.finished[0])
    batch = gen.to_batch(pad_id=stop)
    labels = batch["labels"][0]
    supervised = labels[labels != -100].tolist()
    assert supervised == comp[0]  # the stop token (== pad) is supervised
    n_prompt = len(PROMPTS[0])
    assert batch["input_ids"][0, : n_prompt + 4].tolist() == PROMPTS[0] + comp[0]
    assert batch["attention_mask"][0].sum() == n_prompt + 4


def test_the_checkpoints_generation_config_does_not_leak_in(tmp_path):
    model = tiny_model(init=0.05)
    params = SamplingParams(temperature=1.0, max_new_tokens=8)
    seeds = [row_seed(0, i) for i in range(len(PROMPTS))]
    plain = sample(model, PROMPTS, params, pad_id=0, seeds=seeds).completions()
    model.generation_config = GenerationConfig(do_sample=True, top_k=1, top_p=0.01, temperature=0.1,
                                               max_new_tokens=2, eos_token_id=[5, 6, 7])
    model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert reloaded.generation_config.top_k == 1
    assert sample(reloaded, PROMPTS, params, pad_id=0, seeds=seeds).completions() == plain


def test_decoder_append_and_crop_match_one_token_at_a_time():
    model = tiny_model()
    ids, mask = left_pad(PROMPTS, 0, "cpu")
    one = Decoder(model)
    steps = [one.prefill(ids, mask)]
    extra = torch.tensor([[3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14]])
    for k in range(3):
        steps.append(one.step(extra[:, k]))
    many = Decoder(model)
    first = many.prefill(ids, mask)
    block = many.append(extra)  # (B, 3, V): the logits after each appended token
    torch.testing.assert_close(first, steps[0])
    torch.testing.assert_close(block, torch.stack(steps[1:], 1), rtol=1e-5, atol=1e-5)
    many.crop(ids.shape[1] + 1)  # reject the last two
    again = many.append(extra[:, 1:])
    torch.testing.assert_close(again, block[:, 1:], rtol=1e-5, atol=1e-5)


def test_bad_sampling_settings_are_refused():
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="one seed per prompt"):
        sample(tiny_model(), PROMPTS, SamplingParams(), pad_id=0)
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []], 0, "cpu")


# ------------------------------------------------------------------------------------------- distill generate


def gen_cfg(out: Path, *overrides: str) -> GenerateConfig:
    return load_config(GenerateConfig, TINY_GENERATE, [f"out_dir={out}", "progress=false", *overrides])


def read_records(out: Path) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [json.loads(line) for s in manifest["shards"] for line in (out / s["file"]).read_text().splitlines()]


def test_tiny_generate_writes_shards_manifest_and_trains(tmp_path):
    out = tmp_path / "gen"
    counts = recipe.main(gen_cfg(out))
    assert counts == {"prompts": 8, "samples": 16, "kept": 8, "unfinished": counts["unfinished"], "scorer_failures": 0}
    records = read_records(out)
    assert [r["prompt_index"] for r in records] == list(range(8))
    for r in records:
        assert {"prompt", "response", "score", "sample", "key", "finished", "id"} <= r.keys()
        assert r["score"] < 0 and r["sample"] in (0, 1)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sampling"]["top_p"] == 0.95 and manifest["n"] == 2 and len(manifest["shards"]) == 3
    # best-of-2 by the teacher's mean log-prob: the kept sample is the more likely one of each prompt
    everything = gen_cfg(tmp_path / "all", "keep=all")
    recipe.main(everything)
    by_prompt: dict[int, list[dict]] = {}
    for r in read_records(tmp_path / "all"):
        by_prompt.setdefault(r["prompt_index"], []).append(r)
    for r in records:
        assert r["score"] == max(s["score"] for s in by_prompt[r["prompt_index"]])
    # The output trains directly, without and with a teacher on top.
    common = ["data.packing=false", "data.truncate=true", "data.eval_fraction=0", "train.max_steps=2",
              "eval.every=0", "checkpoint.every=0", "log.progress=false", "train.batch_size=4", "train.grad_accum=1"]
    for i, teacher in enumerate((["teacher=null"], [])):
        cfg = load_config(TrainConfig, TINY_TRAIN, [f"out_dir={tmp_path / f'train{i}'}", f"data.source={out}",
                                                    *common, *teacher])
        summary = training.train(cfg)
        assert summary["steps"] == 2 and (tmp_path / f"train{i}" / "student" / "model.safetensors").is_file()


def test_best_of_n_with_a_verifier_keeps_the_highest_score(tmp_path, monkeypatch):
    (tmp_path / "my_checks.py").write_text(
        "def count_e(prompt, completion):\n"
        "    return float(completion.count('e') * 10 + len(prompt) % 3)\n"
        "def flaky(prompt, completion):\n"
        "    if 'Close' in prompt:\n"
        "        raise RuntimeError('cannot check this one')\n"
        "    return 1.0\n"
        "def words(prompt, completion):\n"
        "    return 'yes'\n"
    )
    monkeypatch.chdir(tmp_path)  # verifiers import from the working directory
    data = REPO / "configs" / "tiny" / "data" / "prompts.jsonl"
    base = [f"prompts.source={data}", "n=4", "scorer=verifier"]
    recipe.main(gen_cfg(tmp_path / "all", *base, "verifier=my_checks:count_e", "keep=all"))
    recipe.main(gen_cfg(tmp_path / "best", *base, "verifier=my_checks:count_e", "keep=best"))
    recipe.main(gen_cfg(tmp_path / "top", *base, "verifier=my_checks:count_e", "keep=top", "keep_top=2"))
    every = read_records(tmp_path / "all")
    assert len(every) == 32
    for r in every:
        assert r["score"] == r["response"].count("e") * 10 + len(r["prompt"]) % 3
    for kept, k in ((read_records(tmp_path / "best"), 1), (read_records(tmp_path / "top"), 2)):
        assert len(kept) == 8 * k
        for r in kept:
            pool = sorted((-s["score"], s["sample"]) for s in every if s["prompt_index"] == r["prompt_index"])
            assert (-r["score"], r["sample"]) in pool[:k]
    # A scorer that raises on one prompt: its samples are recorded as failed, the run goes on and counts them.
    counts = recipe.main(gen_cfg(tmp_path / "flaky", *base, "verifier=my_checks:flaky", "keep=all"))
    assert counts["scorer_failures"] == 4
    failed = [r for r in read_records(tmp_path / "flaky") if "error" in r]
    assert len(failed) == 4 and all("cannot check this one" in r["error"] and r["score"] is None for r in failed)
    with pytest.raises(ValueError, match=r"returned 'yes' \(str\), not a number"):
        recipe.main(gen_cfg(tmp_path / "words", *base, "verifier=my_checks:words"))
    with pytest.raises(ValueError, match="module 'no_such_module' does not import"):
        recipe.main(gen_cfg(tmp_path / "x", *base, "verifier=no_such_module:f"))
    with pytest.raises(ValueError, match="has no function 'nope'"):
        recipe.main(gen_cfg(tmp_path / "y", *base, "verifier=my_checks:nope"))


def test_a_student_with_another_tokenizer_trains_on_the_teachers_text(tmp_path):
    """The teacher writes with the byte-level tokenizer; the student re-tokenizes the text with a BPE
    tokenizer of its own (another vocabulary size, other ids, other special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(x)["text"] for x in (REPO / "configs/tiny/data/docstrings.jsonl").read_text().splitlines()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(tmp_path / "bpe")
    assert len(tok) != len(byte_tokenizer())

    out = tmp_path / "gen"
    recipe.main(gen_cfg(out))
    student = ["student.tokenizer=" + str(tmp_path / "bpe"), "data.packing=false", "data.truncate=true",
               "data.eval_fraction=0", "train.max_steps=3", "eval.every=0", "checkpoint.every=0",
               "log.progress=false", "train.batch_size=4", "train.grad_accum=1", f"data.source={out}"]
    cfg = load_config(TrainConfig, TINY_TRAIN, [f"out_dir={tmp_path / 'seq'}", "teacher=null", *student])
    summary = training.train(cfg)
    assert summary["tokens"] > 0
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "seq" / "student")
    assert saved.config.vocab_size == len(tok)
    # Token-level KD on top needs one tokenizer: refused, pointing at sequence-level distillation.
    with pytest.raises(ValueError, match="sequence-level distillation"):
        training.train(load_config(TrainConfig, TINY_TRAIN, [f"out_dir={tmp_path / 'tok'}", *student]))


def test_bad_input_is_named(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        recipe.main(gen_cfg(tmp_path / "a", f"prompts.source={empty}"))
    long_prompt = tmp_path / "long.jsonl"
    long_prompt.write_text(json.dumps({"prompt": "x" * 300}) + "\n")
    with pytest.raises(ValueError, match=r"row 0: the prompt is 301 tokens.*256 positions"):
        recipe.main(gen_cfg(tmp_path / "b", f"prompts.source={long_prompt}"))
    with pytest.raises(ValueError, match=r"n: Input should be greater than 0"):
        gen_cfg(tmp_path / "c", "n=0")
    with pytest.raises(ValueError, match="scorer=verifier needs"):
        gen_cfg(tmp_path / "d", "scorer=verifier")
    wrong_field = tmp_path / "wrong.jsonl"
    wrong_field.write_text(json.dumps({"question": "hi"}) + "\n")
    with pytest.raises(ValueError, match=r"no column `prompt`"):
        recipe.main(gen_cfg(tmp_path / "e", f"prompts.source={wrong_field}"))
    # Another run's directory is refused; an unfinished one is never read as data.
    out = tmp_path / "run"
    recipe.main(gen_cfg(out, "prompts.max_prompts=2"))
    with pytest.raises(ValueError, match=r"made with other settings \(differing: .*sampling"):
        recipe.main(gen_cfg(out, "prompts.max_prompts=2", "sampling.temperature=0.5"))
    (out / "manifest.json").unlink()
    cfg = load_config(TrainConfig, TINY_TRAIN, [f"out_dir={tmp_path / 't'}", f"data.source={out}"])
    with pytest.raises(ValueError, match="unfinished `distill generate` output"):
        training.train(cfg)


@pytest.mark.slow
def test_sigkill_then_rerun_gives_identical_files(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about number {i}."}) + "\n" for i in range(48)))
    args = [f"prompts.source={prompts}", "shard_prompts=4", "n=2", "sampling.max_new_tokens=16", "progress=false"]
    ref = tmp_path / "ref"
    recipe.main(gen_cfg(ref, *args))

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    kill_when([sys.executable, "-m", "distill", "generate", str(TINY_GENERATE), f"out_dir={out}", *args],
              lambda: (out / "shard-000002.jsonl").exists(), env=env)
    assert not (out / "manifest.json").exists(), "the run was not killed mid-way"
    res = run_cli_here("generate", str(TINY_GENERATE), f"out_dir={out}", *args)
    assert res.returncode == 0, res.stderr
    assert "continuing the generations" in res.stderr

    def files(root: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if not p.name.endswith(".tmp")}

    got, want = files(out), files(ref)
    assert got.keys() == want.keys() and got == want


# ------------------------------------------------------------------------------------------- speculative decoding


def spec_pair(vocab: int = 40):
    target = tiny_model(seed=1, vocab=vocab, init=0.2)
    draft = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, initializer_range=0.2, pad_token_id=0, eos_token_id=1))
    return target, draft.eval()


@pytest.mark.parametrize("gamma", [1, 2, 4, 7])
def test_greedy_speculative_decoding_is_the_targets_greedy_decoding(gamma):
    target, draft = spec_pair(vocab=263)
    prompts = PROMPTS + [[2, 3], [2, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70]]
    params = SamplingParams(temperature=0.0, max_new_tokens=25, stop_ids=(1,))
    ref = sample(target, prompts, params, pad_id=0).completions()
    for batch in (prompts, prompts[:1], prompts[2:5]):
        gen, stats = speculative_sample(target, draft, batch, params, gamma, pad_id=0)
        assert gen.completions() == ref[prompts.index(batch[0]) : prompts.index(batch[0]) + len(batch)]
        assert stats.tokens == sum(len(c) for c in gen.completions())
        assert stats.tokens <= stats.accepted + stats.row_rounds  # a round writes its accepted drafts + 1 (or stops)


def test_a_draft_equal_to_the_target_accepts_everything():
    target, _ = spec_pair(vocab=263)
    for params in (SamplingParams(temperature=0.0, max_new_tokens=12), SamplingParams(temperature=1.0, max_new_tokens=12)):
        gen, stats = speculative_sample(target, target, PROMPTS, params, 3, pad_id=0,
                                        seeds=[row_seed(5, i) for i in range(len(PROMPTS))])
        assert stats.acceptance_rate == 1.0 and stats.tokens_per_call == pytest.approx(4.0)


def test_sampled_speculative_decoding_is_distributed_as_the_target():
    """Chi-square test of the first two tokens over 6,000 draws (V = 6: 36 cells) against the target's exact
    joint distribution, with a draft that disagrees with it often."""
    v = 6
    target, draft = spec_pair(vocab=v)
    prompt = [2, 3]
    params = SamplingParams(temperature=1.0, max_new_tokens=2)
    with torch.no_grad():
        first = torch.softmax(target(torch.tensor([prompt])).logits[0, -1], -1)
        second = torch.softmax(target(torch.tensor([[*prompt, x] for x in range(v)])).logits[:, -1], -1)
    joint = (first.unsqueeze(1) * second).reshape(-1).double()
    n = 6000
    gen, stats = speculative_sample(target, draft, [prompt] * n, params, 3, pad_id=0,
                                    seeds=[row_seed(11, i) for i in range(n)])
    pairs = torch.tensor([c[0] * v + c[1] for c in gen.completions()])
    counts = torch.bincount(pairs, minlength=v * v).double()
    expected = joint * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = v * v - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5, chi2  # ~6 sigma; seeded
    assert 0.1 < stats.acceptance_rate < 0.95  # the residual draws were exercised
    # The target sampling on its own agrees with the same exact distribution (the test has power).
    alone = sample(target, [prompt] * n, params, pad_id=0, seeds=[row_seed(12, i) for i in range(n)])
    counts2 = torch.bincount(torch.tensor([c[0] * v + c[1] for c in alone.completions()]), minlength=v * v).double()
    assert float(((counts2 - expected) ** 2 / expected).sum()) < dof + 6 * (2 * dof) ** 0.5
