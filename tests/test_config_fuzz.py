"""Seeded random mutations of the tiny configs (a value's type, sign or size changed, NaN/inf, 0, empty strings,
keys deleted or invented, nested garbage in a model's ``config:``) through the command line, in this process:
each either runs (exit 0) or stops with a clear error: exit 2 (bad input) or 1 (a run that stopped), a
``distill: error:`` message that is not a bare exception, and no traceback.

The fast test runs the first few mutations of each command that pass validation and validates the rest; the
slow one runs every valid mutation of another seed."""

from __future__ import annotations

import copy
import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli_here

from distill.config import (
    CacheConfig,
    ConfigError,
    EvalRunConfig,
    GenerateConfig,
    PruneConfig,
    TrainConfig,
    load_config,
)

TINY = REPO / "configs" / "tiny"
DATA = str(TINY / "data" / "docstrings.jsonl")
PROMPTS = str(TINY / "data" / "prompts.jsonl")

# Per command: its config file, its config model, and settings that make a valid run take seconds (applied
# before the mutation, which may change them).
SMALL_DATA = {"source": DATA, "seq_len": 64, "eval_fraction": 0.1}
COMMANDS = {
    "train": ("train.yaml", TrainConfig, {
        "data": SMALL_DATA, "train": {"batch_size": 2, "grad_accum": 1},
        "eval": {"every": 0}, "checkpoint": {"every": 0}, "log": {"every": 1, "progress": False}}),
    "cache": ("cache.yaml", CacheConfig, {"data": SMALL_DATA, "shard_examples": 16, "progress": False}),
    "generate": ("generate.yaml", GenerateConfig, {"prompts": {"source": PROMPTS}, "progress": False}),
    "eval": ("eval.yaml", EvalRunConfig, {
        "data": SMALL_DATA, "progress": False,
        "speculative": {"gammas": [1, 2], "prompts": 2, "prompt_tokens": 8, "batch_sizes": [1], "reps": 1}}),
    "prune": ("prune.yaml", PruneConfig, {"data": SMALL_DATA, "importance": {"batch_size": 8}, "report": False}),
}
# What bounds a run's cost: never mutated, and set again after a mutation that deleted or replaced its section.
COST = {
    "train": {("data", "max_examples"): 40, ("train", "max_steps"): 2, ("eval", "max_batches"): 1},
    "cache": {("data", "max_examples"): 24},
    "generate": {("prompts", "max_prompts"): 3, ("sampling", "max_new_tokens"): 4},
    "eval": {("data", "max_examples"): 40, ("max_batches",): 1, ("speculative", "max_new_tokens"): 4},
    "prune": {("data", "max_examples"): 40, ("importance", "samples"): 8},
}
# Where each command writes: set per mutation, never mutated (a mutated path would only write elsewhere).
OUT_KEY = {"train": "out_dir", "cache": "out_dir", "generate": "out_dir", "eval": "out", "prune": "out_dir"}
MODEL_SECTIONS = (("student",), ("teacher",), ("model",), ("models", "student"))

KINDS = ("type", "sign", "size", "zero", "nan", "empty", "null", "delete", "unknown", "garbage")
GARBAGE = ({"a": [float("nan"), "x", {"b": None}]}, [1, [2, {}]], {"nested": {"deeper": {"x": -1}}}, "¿?",
           [None], {"rope_type": "nope"}, -7, {}, [], True)

# The first line of a message that is an exception's own text rather than a message for the user.
BARE = re.compile(r"^('[^']*'|\w+(Error|Exception)\b.*|.*(index out of range|division or modulo by zero|"
                  r"object has no attribute|unsupported operand|object is not (subscriptable|iterable|callable)|"
                  r"takes \d+ positional|got an unexpected keyword).*)$")


def base_tree(command: str) -> dict:
    file, _, caps = COMMANDS[command]
    tree = yaml.safe_load((TINY / file).read_text())

    def merge(node: dict, update: dict) -> None:
        for key, value in update.items():
            if isinstance(value, dict) and isinstance(node.get(key), dict):
                merge(node[key], value)
            else:
                node[key] = value

    merge(tree, caps)
    bound_cost(tree, command)
    return tree


def bound_cost(tree: dict, command: str) -> None:
    """Set the keys that bound a run's cost wherever their section is (still, or again) a mapping."""
    for path, value in COST[command].items():
        node = tree
        for key in path[:-1]:
            if key not in node:
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                break
        else:
            node[path[-1]] = value


def _leaves(node, path=()):
    """(path, value) of every value that is not a section; lists are values."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    elif path:
        yield path, node


def _sections(node, path=()):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _sections(value, (*path, key))


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _wrong_type(value, rng: random.Random):
    if isinstance(value, bool):
        return rng.choice(["maybe", 2, [True]])
    if isinstance(value, int):
        return rng.choice(["x", 1.5, True, [value], {"v": value}, "12abc"])
    if isinstance(value, float):
        return rng.choice(["x", "1e-3", [value], {"v": value}, False])
    if isinstance(value, str):
        return rng.choice([7, 0.5, [value], {"k": value}, True])
    if isinstance(value, list):
        return rng.choice(["x", 5, {"a": value}, [["nested"]]])
    return rng.choice(["x", 3, [1]])


def _resized(value, rng: random.Random):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value * 2 if isinstance(value, (str, list)) else value
    if isinstance(value, int):  # small factors: a valid mutation must still run in seconds
        return rng.choice([value * 2, value * 3, value + 1, value - 1, value // 2])
    return rng.choice([value * 10, value / 10, value + 1.0, 1e30, 1e-30])


def mutate(tree: dict, command: str, rng: random.Random) -> str:
    """Apply one random mutation to ``tree`` in place; returns what it did."""
    protected = {OUT_KEY[command]}
    leaves = [(p, v) for p, v in _leaves(tree) if p[0] not in protected and p not in COST[command]]
    kind = rng.choice(KINDS)
    if kind == "unknown":
        path, section = rng.choice(list(_sections(tree)))
        key = rng.choice(["bogus", "lr", "max_step", "Teacher", "seqlen", "config", "0"])
        section[key] = rng.choice([1, "x", None, {"a": 1}])
        return f"unknown {'.'.join(map(str, (*path, key)))}={section[key]!r}"
    if kind == "garbage":
        models = [p for p in MODEL_SECTIONS if isinstance(_get_or_none(tree, p), dict)
                  and isinstance(_get(tree, p).get("config"), dict)]
        if models:
            config = _get(tree, rng.choice(models))["config"]
            key = rng.choice([*config, "extra_thing", "rope_scaling", "layer_types", "head_dim"])
            config[key] = copy.deepcopy(rng.choice(GARBAGE))
            return f"garbage config.{key}={config[key]!r}"
        kind = "type"
    if kind == "delete":
        path, section = rng.choice([(p, s) for p, s in _sections(tree) if p and p[0] not in protected] or [((), tree)])
        if path and rng.random() < 0.3:  # a whole section
            del _get(tree, path[:-1])[path[-1]]
            return f"delete section {'.'.join(map(str, path))}"
        if section:
            key = rng.choice(list(section))
            if not (path == () and key in protected) and (*path, key) not in COST[command]:
                del section[key]
                return f"delete {'.'.join(map(str, (*path, key)))}"
        kind = "null"
    path, value = rng.choice(leaves)
    new = {
        "type": lambda: _wrong_type(value, rng),
        "sign": lambda: -value if isinstance(value, (int, float)) and not isinstance(value, bool) and value else -1,
        "size": lambda: _resized(value, rng),
        "zero": lambda: 0,
        "nan": lambda: rng.choice([math.nan, math.inf, -math.inf]),
        "empty": lambda: rng.choice(["", " ", [], {}]),
        "null": lambda: None,
    }[kind]()
    _get(tree, path[:-1])[path[-1]] = new
    return f"{kind} {'.'.join(map(str, path))}: {value!r} -> {new!r}"


def _get_or_none(tree, path):
    try:
        return _get(tree, path)
    except (KeyError, TypeError):
        return None


def problem(res) -> str | None:
    """Why a command's result is not acceptable, or None."""
    if res.returncode == 0:
        return None
    err = res.stderr
    if "Traceback" in err:
        return "a traceback on stderr"
    if res.returncode not in (1, 2):
        return f"exit code {res.returncode}"
    if "distill: error: " not in err:
        return "no `distill: error:` message"
    first = err[err.index("distill: error: ") + len("distill: error: "):].strip().splitlines()[0]
    if len(first) < 25 or BARE.match(first):
        return f"a bare exception as the message: {first!r}"
    return None


def fuzz(tmp_path: Path, seed: int, count: int, run_per_command: int | None) -> Counter:
    """``count`` mutations from ``seed``; runs at most ``run_per_command`` valid ones per command (None: all) and
    only validates the others. Returns the counts; fails on any result that is not acceptable."""
    rng = random.Random(seed)
    counts: Counter = Counter()
    ran: Counter = Counter()
    bad = []
    for i in range(count):
        command = rng.choice(sorted(COMMANDS))
        tree = base_tree(command)
        what = mutate(tree, command, rng)
        bound_cost(tree, command)
        tree[OUT_KEY[command]] = str(tmp_path / f"m{i}" / ("eval.json" if command == "eval" else "out"))
        path = tmp_path / f"m{i}.yaml"
        path.write_text(yaml.safe_dump(tree, sort_keys=False, allow_unicode=True))
        try:
            load_config(COMMANDS[command][1], path)
            valid = True
        except ConfigError:
            valid = False
        if valid and run_per_command is not None and ran[command] >= run_per_command:
            counts["valid, not run"] += 1
            continue
        ran[command] += valid
        try:
            res = run_cli_here(command, str(path))
        except BaseException as exc:  # noqa: BLE001 - an exception through cli.main is what this test looks for
            bad.append(f"[{i}] {command} {what}: raised {type(exc).__name__}: {exc}")
            counts["traceback"] += 1
            continue
        why = problem(res)
        if why is not None:
            bad.append(f"[{i}] {command} {what}: {why}\n{res.stderr[-1500:]}")
            counts["unclear"] += 1
        else:
            counts[{0: "ran", 1: "stopped (exit 1)", 2: "clear error (exit 2)"}[res.returncode]] += 1
            counts["refused at validation"] += not valid
    print(f"seed {seed}: {count} mutations: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    assert not bad, f"{len(bad)} of {count} mutations ended badly:\n" + "\n\n".join(bad[:10])
    return counts


def test_mutated_tiny_configs_run_or_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a mutated config writes relative to the working directory lands here
    counts = fuzz(tmp_path, seed=0, count=300, run_per_command=2)
    assert counts["ran"] >= 5, counts  # some mutations really run, end to end
    assert counts["clear error (exit 2)"] >= 150, counts  # most fail, at validation
    assert counts["refused at validation"] >= 150, counts


@pytest.mark.slow
def test_every_valid_mutation_runs_or_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    counts = fuzz(tmp_path, seed=1, count=300, run_per_command=None)
    assert counts["ran"] >= 20, counts


@pytest.mark.parametrize("command, overrides, message", [
    ("train", ['student.config.num_hidden_layers="x"'], "student.config.num_hidden_layers: 'x' is not a size"),
    ("train", ["student.config.hidden_size=-1"], "student.config.hidden_size: -1 is not a size"),
    ("train", ["student.config.num_key_value_heads=.nan"], "student.config.num_key_value_heads: nan is not a size"),
    ("train", ["student.config.num_attention_heads=0"], "student.config.num_attention_heads: 0 is not a size"),
    ("train", ["student.config.num_hidden_layers=0"], "student.config.num_hidden_layers: 0 is not a size"),
    ("train", ["teacher.config.num_key_value_heads=3"], "teacher.config.num_key_value_heads: 3 does not divide"),
    ("train", ["teacher.config.hidden_size=30"], "teacher.config.hidden_size: refused by transformers"),
    ("train", ["student.config.rms_norm_eps=1e-5"], "write 1.0e-5"),
    ("train", ["student.config.hidden_act=silux"], "student.config.hidden_act: 'silux' is not an activation"),
    ("train", ["student.config.model_type=lama"], "did you mean llama"),
    ("train", ["teacher=null", "teacher.peers=[{tokenizer: byte, config: {model_type: llama, hidden_size: 0}}]"],
     "teacher.peers.0.config.hidden_size: 0 is not a size"),
    ("train", ["teacher=null", "teacher.teachers=[{tokenizer: byte, config: {model_type: llama, "
               "num_attention_heads: 0}}]"], "teacher.teachers.0.config.num_attention_heads: 0"),
    ("eval", ["models.student.config.num_hidden_layers=0"], "models.student.config.num_hidden_layers: 0"),
    ("generate", ["teacher.config.intermediate_size=-4"], "teacher.config.intermediate_size: -4"),
    ("cache", ["teacher.config.num_attention_heads=0"], "teacher.config.num_attention_heads: 0"),
    ("prune", ["model.config.num_hidden_layers=-1"], "model.config.num_hidden_layers: -1"),
    ("train", ['data.source="0"'], "data.source: '0' is neither an existing path nor a hub id"),
    ("train", ["data.source="], "data.source: is empty"),
    ("train", ['data.eval_source="1.5"'], "data.eval_source: '1.5' is neither"),
    ("generate", ['prompts.source="0"'], "prompts.source: '0' is neither"),
    ("train", ['student.tokenizer="0"'], "student.tokenizer: '0' is neither"),
])
def test_bad_model_configs_and_sources_name_the_key(command, overrides, message, tmp_path):
    """One line per problem, naming the key as the user wrote it, before any model is built."""
    res = run_cli_here(command, str(TINY / f"{command}.yaml"), f"{OUT_KEY[command]}={tmp_path / 'out'}", *overrides)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_every_problem_of_every_model_is_listed_at_once(tmp_path):
    res = run_cli_here("train", str(TINY / "train.yaml"), f"out_dir={tmp_path}", "student.config.num_hidden_layers=0",
                       "student.config.num_attention_heads=0", "teacher.config.hidden_size=-2", 'data.source="0"')
    assert res.returncode == 2
    assert "4 problem(s)" in res.stderr, res.stderr
    for key in ("student.config.num_hidden_layers", "student.config.num_attention_heads", "teacher.config.hidden_size",
                "data.source"):
        assert f"  - {key}: " in res.stderr


def test_a_source_that_cannot_be_a_hub_id_is_never_sent_to_the_hub(monkeypatch):
    """data.py refuses it too (a source that reached it without the config's check), without calling datasets."""
    import datasets

    from distill.data import load_raw

    def no_hub(*args, **kwargs):
        raise AssertionError(f"load_dataset called with {args}")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    for source in ("0", "1.5", "a/b/c?", "-x"):
        with pytest.raises(ValueError, match="neither an existing path nor a hub dataset id|does not exist"):
            load_raw(source)
