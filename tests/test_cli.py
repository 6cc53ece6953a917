"""The command line itself: --help that lists every key, the advice after a teacher server fails, a generation
that keeps nothing, the mode of the files written, the start-up loss line."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import stat
import typing
from pathlib import Path

import pytest
from conftest import REPO, run_cli_here
from pydantic import BaseModel

from distill import cli
from distill.config import (
    CacheConfig,
    EvalRunConfig,
    GenerateConfig,
    LossConfig,
    MixtureTeacherSpec,
    PeersTeacherSpec,
    PruneConfig,
    SelfTeacherSpec,
    ServerTeacherSpec,
    StudentBaseTeacherSpec,
    TeacherCacheSpec,
    TrainConfig,
)

TINY = REPO / "configs" / "tiny"


def help_of(command: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    return out.getvalue()


def keys_of(model) -> set[str]:
    return {field.alias or name for name, field in model.model_fields.items()}


def sections_in(annotation) -> set:
    """Every config section an annotation can hold, at any depth of unions, Annotated, lists and dicts."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {annotation}
    return set().union(*(sections_in(arg) for arg in typing.get_args(annotation)))


def all_sections(model) -> set:
    found, todo = set(), [model]
    while todo:
        for field in todo.pop().model_fields.values():
            new = sections_in(field.annotation) - found
            found |= new
            todo += new
    return found


@pytest.mark.parametrize("command, model", [("train", TrainConfig), ("cache", CacheConfig), ("generate", GenerateConfig),
                                            ("eval", EvalRunConfig), ("prune", PruneConfig)])
def test_help_lists_every_key_of_every_section_with_real_defaults(command, model):
    text = help_of(command)
    assert "PydanticUndefined" not in text and "[...]" not in text
    listed = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text))
    assert keys_of(model) <= listed
    for section in all_sections(model):
        missing = keys_of(section) - listed
        assert not missing, f"{command} --help does not list {sorted(missing)} of {section.__name__}"
    if command == "eval":
        assert "divergences (default ['reverse_kl', 'tvd'])" in text


def test_train_help_lists_every_kind_of_teacher():
    text = help_of("train")
    for kind in (TeacherCacheSpec, ServerTeacherSpec, MixtureTeacherSpec, SelfTeacherSpec, PeersTeacherSpec,
                 StudentBaseTeacherSpec):
        name, field = next(iter(kind.model_fields.items()))
        line = next((line for line in text.splitlines() if line.strip().startswith(f"teacher: {field.alias or name},")
                     or line.strip() == f"teacher: {field.alias or name}"), None)
        assert line is not None, f"no line for {kind.__name__}'s keys"
    for key in ("api_key_env", "determinism_tolerance", "topk_tail", "mix", "burn_in", "decay", "student_base"):
        assert key in text


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command, config, extra", [
    ("cache", "cache.yaml", ["data.max_examples=16"]),
    ("generate", "generate.yaml", ["prompts.max_prompts=2"]),
])
def test_an_unreachable_server_gets_the_advice_of_the_command(command, config, extra, tmp_path):
    """Exit 1 (the run stopped, its config is fine) and what to do for this command: rerun it, no --resume."""
    url = f"http://127.0.0.1:{closed_port()}"
    res = run_cli_here(command, str(TINY / config), f"out_dir={tmp_path / 'out'}", "teacher=null",
                       f"teacher.server={url}", "teacher.tokenizer=byte", "teacher.retries=0", "progress=false", *extra)
    assert res.returncode == 1, res.stderr
    assert f"teacher server {url} did not answer" in res.stderr and "Traceback" not in res.stderr
    assert "--resume" not in res.stderr and "training run" not in res.stderr, res.stderr
    assert f"run the same `distill {command}` command" in res.stderr


def test_server_advice_keeps_the_training_advice_for_train():
    message = ("teacher server http://x did not answer /v1/models after 1 tries (URLError: refused). Check that it "
               "is running and reachable; a training run stops here with its last checkpoint intact (start the "
               "server again and rerun with --resume)")
    assert cli.server_advice(message, "train") == message
    cache = cli.server_advice(message, "cache")
    assert "--resume" not in cache and cache.endswith("it continues after the last complete shard.")
    assert cache.startswith("teacher server http://x did not answer /v1/models after 1 tries")


def test_a_generation_that_keeps_nothing_warns_and_exits_1(tmp_path):
    """A verifier that raises on every sample (it expects arithmetic prompts): nothing is kept. The output is
    complete (a rerun does nothing) but holds no training data: a loud warning, manifest.json's `warnings`,
    and exit 1, on the first run and on the rerun."""
    out = tmp_path / "gen"
    args = ["generate", str(TINY / "generate.yaml"), f"out_dir={out}", "scorer=verifier", "progress=false",
            "verifier=distill.tasks.arithmetic:verify", "prompts.max_prompts=3", "sampling.max_new_tokens=4"]
    for _ in range(2):
        res = run_cli_here(*args)
        assert res.returncode == 1, res.stderr
        assert "WARNING: NOTHING WAS KEPT: the verifier distill.tasks.arithmetic:verify raised on every sample" in res.stderr
        assert "malformed arithmetic prompt" in res.stderr  # the verifier's own error, once
        assert "holds no training data" in res.stderr and "Traceback" not in res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["kept"] == 0 and manifest["counts"]["scorer_failures"] == 6
    assert len(manifest["warnings"]) == 1 and manifest["warnings"][0].startswith("NOTHING WAS KEPT")


def test_a_generation_that_keeps_something_has_no_warning(tmp_path):
    out = tmp_path / "gen"
    res = run_cli_here("generate", str(TINY / "generate.yaml"), f"out_dir={out}", "progress=false",
                       "prompts.max_prompts=2", "sampling.max_new_tokens=4")
    assert res.returncode == 0, res.stderr
    assert "WARNING" not in res.stderr
    assert json.loads((out / "manifest.json").read_text())["warnings"] == []


def test_outputs_keep_the_users_umask(tmp_path):
    """Every file of a tiny run (checkpoints, config, metrics, the student) is 0666 less the umask, as any
    file the user creates; the start-up line names the whole loss, the hidden-state term included."""
    out, umask = tmp_path / "run", 0o027  # not the usual 0o022: the modes must follow it, not be fixed
    before = os.umask(umask)
    try:
        res = run_cli_here("train", str(TINY / "hidden.yaml"), f"out_dir={out}", "log.progress=false",
                           "train.max_steps=2", "checkpoint.every=1", "eval.every=0", "data.max_examples=40",
                           "data.seq_len=64")
    finally:
        os.umask(before)
    assert res.returncode == 0, res.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "trainer_state.json" for p in files) and (out / "config.yaml") in files
    wrong = {str(p.relative_to(out)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) != 0o666 & ~umask}
    assert not wrong, f"not {oct(0o666 & ~umask)}: {wrong}"
    line = next(line for line in res.stderr.splitlines() if "loss: " in line and "teacher:" in line)
    assert "+ 1*hidden_cosine(layers: uniform; projection: auto) + 0.5*(1 - cos of the final states)" in line, line


def test_atomic_writes_keep_the_umask(tmp_path):
    from distill.checkpoint import atomic_write_text

    before = os.umask(0o002)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o664
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary file left behind


def test_loss_describe_names_the_hidden_term_only_when_set():
    assert LossConfig().describe() == LossConfig().spec().describe()
    described = LossConfig(hidden={"weight": 2.0, "distance": "mse", "layers": {1: 2, 2: 4}}).describe()
    assert described.endswith("+ 2*hidden_mse(layers: 1->2, 2->4; projection: auto)"), described


def test_a_model_config_json_that_transformers_refuses_is_a_clear_error(tmp_path):
    """A config.json on disk (not checked with the config) that transformers' strict config classes refuse."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    config = {"model_type": "llama", "hidden_size": "wide", "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 8, "vocab_size": 300}
    (model_dir / "config.json").write_text(json.dumps(config))
    res = run_cli_here("train", str(TINY / "train.yaml"), f"out_dir={tmp_path / 'out'}", f"student.path={model_dir}",
                       "student.config=null", "teacher=null")
    assert res.returncode == 2, res.stderr
    assert "hidden_size" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert Path(model_dir / "config.json").is_file()
