"""The arithmetic task: seeded disjoint splits, the verifier against Python ints, the files, greedy
completions equal to transformers' generate, exact match, and a few training steps of the tiny preset through the train recipe."""

from __future__ import annotations

import json
import operator
import random
import re
import time
from pathlib import Path

import pytest
import torch

from distill.tasks import arithmetic as ar
from distill.tasks.arithmetic import cli as arithmetic_cli
from distill.tokenizer import byte_tokenizer

ALL_OPS = ("+", "-", "*")
PY_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


ANSWER_DIGITS = {"+": lambda w: w + 1, "-": lambda w: w, "*": lambda w: 2 * w}


def expected_text(value: int, op: str, width: int) -> str:
    """The answer in the task's format, written independently: a fixed number of digits for the operator
    and the operand width, leading zeros, most significant first, '-' in front of a negative one."""
    digits = str(abs(value))
    digits = "0" * (ANSWER_DIGITS[op](width) - len(digits)) + digits
    return "-" + digits if value < 0 else digits


# ------------------------------------------------------------------------------------------------ splits


def test_splits_are_deterministic_for_a_seed_and_differ_across_seeds():
    first = ar.make_splits(0, 3, ALL_OPS, 300, 100)
    again = ar.make_splits(0, 3, ALL_OPS, 300, 100)
    other = ar.make_splits(1, 3, ALL_OPS, 300, 100)
    assert first == again
    assert first[0] != other[0] and first[1] != other[1]
    # The test split is the head of the stream: it does not move when the training set grows.
    assert ar.make_splits(0, 3, ALL_OPS, 50, 100)[1] == first[1]


@pytest.mark.parametrize("digits,ops", [(1, ("+",)), (2, ("+", "*")), (3, ALL_OPS)])
def test_splits_are_disjoint_distinct_and_within_the_settings(digits, ops):
    n_train, n_test = (15, 5) if digits == 1 else (400, 100)
    train_set, test_set = ar.make_splits(3, digits, ops, n_train, n_test)
    assert (len(train_set), len(test_set)) == (n_train, n_test)
    train_keys, test_keys = {p.key() for p in train_set}, {p.key() for p in test_set}
    assert len(train_keys) == n_train and len(test_keys) == n_test  # no repeats inside a split
    assert not train_keys & test_keys
    # Commuted problems count as the same one: 12+34 in train keeps 34+12 out of test.
    commuted = {(p.b, p.op, p.a) for p in train_set if p.op in "+*"}
    assert not commuted & {(p.a, p.op, p.b) for p in test_set}
    for p in train_set + test_set:
        assert 0 <= p.a < 10**digits and 0 <= p.b < 10**digits and p.op in ops
        assert p.answer >= 0
    if digits > 1:
        assert {p.op for p in train_set} == set(ops)


def test_impossible_or_bad_settings_are_value_errors():
    with pytest.raises(ValueError, match="distinct problems"):
        ar.make_splits(0, 1, ("+",), 40, 20)  # only 55 distinct one-digit sums
    with pytest.raises(ValueError, match="operators"):
        ar.make_splits(0, 2, ("/",), 10, 10)
    with pytest.raises(ValueError, match="digits"):
        ar.make_splits(0, 0, ("+",), 10, 10)
    with pytest.raises(ValueError, match="n_train"):
        ar.make_splits(0, 2, ("+",), 0, 10)


def test_written_files(tmp_path):
    train_path, test_path = ar.write_splits(tmp_path / "data", 5, 3, ALL_OPS, 200, 60)
    assert (train_path.name, test_path.name) == ("train.jsonl", "test.jsonl")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["test.jsonl", "train.jsonl"]  # no temp debris
    expected_train, expected_test = ar.make_splits(5, 3, ALL_OPS, 200, 60)
    for path, problems in ((train_path, expected_train), (test_path, expected_test)):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["prompt"] for r in rows] == [p.prompt for p in problems]
        for r in rows:
            assert set(r) == {"prompt", "response", "answer"}
            a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)=", r["prompt"]).groups()
            assert len(a) == len(b) == 3  # operands are zero-padded to the digits setting
            value = PY_OPS[op](int(a), int(b))
            assert r["answer"] == value and r["response"] == expected_text(value, op, 3)
    assert ar.read_problems(test_path) == expected_test


def test_the_validation_split_is_disjoint_and_leaves_train_and_test_as_they_were(tmp_path):
    train, test = ar.make_splits(4, 3, ("+",), 300, 80)
    train_v, test_v, valid = ar.make_splits(4, 3, ("+",), 300, 80, n_valid=50)
    assert (train_v, test_v) == (train, test) and len(valid) == 50
    keys = [p.key() for p in train + test + valid]
    assert len(set(keys)) == len(keys)  # no problem in two splits
    ar.write_splits(tmp_path / "data", 4, 3, ("+",), 300, 80, n_valid=50)
    assert ar.read_problems(tmp_path / "data" / "valid.jsonl") == valid


def test_a_run_reads_the_validation_split_never_the_test_split(tmp_path):
    """What a run evaluates while it trains (DistiLLM's schedule reads that loss) is the validation split; the
    test split is kept for the reported exact match."""
    preset = ar.PRESETS["tiny"]
    preset.write_data(tmp_path / "data")
    for role in ("teacher", "student"):
        cfg = ar.ground_truth_config(preset, tmp_path / "data", tmp_path / role, role=role)
        assert Path(cfg.data.eval_source) == tmp_path / "data" / "valid.jsonl"
        assert Path(cfg.data.source) == tmp_path / "data" / "train.jsonl"


# ------------------------------------------------------------------------------------------------ verify


def test_verify_against_python_ints():
    rng = random.Random(1234)
    for _ in range(2000):
        width = rng.randint(1, 7)
        a, b = rng.randrange(10 ** rng.randint(1, width)), rng.randrange(10 ** rng.randint(1, width))
        op = rng.choice(ALL_OPS)
        prompt, value = f"{a:0{width}d}{op}{b:0{width}d}=", PY_OPS[op](a, b)  # `-` may be negative here
        right = expected_text(value, op, width)
        assert ar.verify(prompt, right) == 1.0
        assert ar.verify(prompt, f"  {right} \t") == 1.0
        assert ar.verify(prompt, f"{right}\n999 anything after the first line") == 1.0
        assert ar.verify(f" {prompt}\n", right) == 1.0
        # Unpadded operands are the same problem when the longer one has the full width.
        if max(len(str(a)), len(str(b))) == width:
            assert ar.verify(f"{a}{op}{b}=", right) == 1.0
        # Wrong answers: one digit changed, one too many or too few, without the leading zeros, reversed,
        # the sign flipped, garbage.
        i = rng.randrange(len(right))
        if right[i] != "-":
            changed = right[:i] + str((int(right[i]) + rng.randint(1, 9)) % 10) + right[i + 1 :]
            assert ar.verify(prompt, changed) == 0.0
        assert ar.verify(prompt, right + str(rng.randrange(10))) == 0.0
        assert ar.verify(prompt, right[:-1]) == 0.0
        for other in (str(value), right[::-1]):
            if other != right:
                assert ar.verify(prompt, other) == 0.0
        assert ar.verify(prompt, right[1:] if value < 0 else "-" + right) == 0.0
        for garbled in ("", "   ", "\n" + right, right.replace(right[0], "x", 1), right + ".", f"{right} {right}"):
            assert ar.verify(prompt, garbled) == 0.0, (prompt, garbled)


@pytest.mark.parametrize("prompt", ["", "12+", "12+3", "+3=", "a+b=", "1/2=", "1+2=3", "1 + 2=", "-1+2=", "1+2==",
                                    "١+2="])
def test_verify_refuses_malformed_prompts(prompt):
    with pytest.raises(ValueError, match="malformed arithmetic prompt"):
        ar.verify(prompt, "3")


def test_verify_refuses_non_strings():
    with pytest.raises(ValueError, match="prompt must be a string"):
        ar.verify(None, "3")
    with pytest.raises(ValueError, match="completion must be a string"):
        ar.verify("1+2=", 3)


def test_verify_is_importable_by_its_dotted_name():
    import importlib

    module, _, name = "distill.tasks.arithmetic:verify".partition(":")
    assert getattr(importlib.import_module(module), name) is ar.verify


# ------------------------------------------------------------------------------------------------ exact match


def test_completions_are_transformers_greedy_decoding():
    """distill's sampler at temperature 0 writes what transformers' greedy generate writes, prompt by prompt
    (prompts of different lengths share a left-padded batch)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = byte_tokenizer()
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config).eval()
    prompts = ["1+2=", "0412+0037=", "99*9=", "123-45="]
    got = ar.completions(model, tok, prompts, batch_size=3, max_new_tokens=6)
    for prompt, text in zip(prompts, got, strict=True):
        ids = torch.tensor([[tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, top_p=None, top_k=None,
                             temperature=None)[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in out:
            out = out[: out.index(tok.eos_token_id)]
        assert text == tok.decode(out, skip_special_tokens=False)


def test_exact_match_is_the_verified_fraction_of_completions(monkeypatch):
    _, problems = ar.make_splits(7, 4, ALL_OPS, 10, 101)
    # Right for odd first operands, one off for even ones.
    texts = [expected_text(p.answer + (p.a % 2 == 0), p.op, p.width) for p in problems]
    seen = {}

    def fake(model, tokenizer, prompts, batch_size, max_new_tokens):
        seen["prompts"] = prompts
        return texts

    monkeypatch.setattr(ar, "completions", fake)
    n_odd = sum(p.a % 2 for p in problems)
    assert ar.exact_match(None, None, problems) == pytest.approx(n_odd / len(problems))
    assert seen["prompts"] == [p.prompt for p in problems]
    assert ar.exact_match(None, None, [p.record() for p in problems]) == pytest.approx(n_odd / len(problems))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="no problems"):
        ar.exact_match(None, byte_tokenizer(), [])


# ------------------------------------------------------------------------------------------------ presets and training


def test_presets_fit_and_the_student_is_smaller():
    from transformers import AutoConfig, AutoModelForCausalLM

    def params(arch: dict) -> int:
        cfg = dict(arch)
        config = AutoConfig.for_model(cfg.pop("model_type"), vocab_size=len(byte_tokenizer()), **cfg)
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())

    for name, preset in ar.PRESETS.items():
        length = ar.max_length(preset.digits, preset.operators)
        assert preset.teacher["max_position_embeddings"] >= length and preset.student["max_position_embeddings"] >= length
        assert params(preset.student) * 2 < params(preset.teacher), name
    assert ar.PRESETS["default"].n_test >= 500


def test_ground_truth_config_refuses_missing_data_and_unknown_roles(tmp_path):
    preset = ar.PRESETS["tiny"]
    with pytest.raises(ValueError, match="write the data first"):
        ar.ground_truth_config(preset, tmp_path / "nothing", tmp_path / "run")
    preset.write_data(tmp_path / "data")
    with pytest.raises(ValueError, match="role="):
        ar.ground_truth_config(preset, tmp_path / "data", tmp_path / "run", role="teaher")


def test_command_line_prepares_configs_that_train_and_scores_the_model(tmp_path, capsys):
    from distill.cli import main as distill_main
    from distill.config import TrainConfig, load_config

    out = tmp_path / "arith"
    assert arithmetic_cli.main(["prepare", str(out), "--preset", "tiny"]) == 0
    assert ar.read_problems(out / "data" / "test.jsonl") == ar.make_splits(0, 2, ("+",), 200, 50)[1]
    for role in ("teacher", "student"):
        cfg = load_config(TrainConfig, out / f"{role}.yaml")
        assert cfg == ar.ground_truth_config(ar.PRESETS["tiny"], out / "data", out / f"{role}-run", role=role
                                             ).model_copy(update={"log": cfg.log})
    preset = ar.PRESETS["tiny"]
    assert cfg.teacher is None and cfg.data.format == "prompt_response" and not cfg.data.packing
    assert cfg.student.config == preset.student
    t0 = time.perf_counter()
    assert distill_main(["-q", "train", str(out / "student.yaml"), "log.progress=false"]) == 0
    print(f"tiny preset: {preset.student_steps} steps in {time.perf_counter() - t0:.1f} s")
    records = [json.loads(line) for line in (out / "student-run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "eval"] == [preset.student_steps]
    capsys.readouterr()
    assert arithmetic_cli.main(["score", str(out / "student-run" / "student"), str(out / "data" / "test.jsonl")]) == 0
    assert re.fullmatch(r"exact match: \d+\.\d% of .*test\.jsonl\n", capsys.readouterr().out)
    assert arithmetic_cli.main(["score", str(out / "nothing"), str(out / "data" / "test.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
