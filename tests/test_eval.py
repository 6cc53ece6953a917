"""`distill eval` (metrics, distance to the teacher, speculative drafts) and `distill report`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_TRAIN, run_cli, run_cli_here

from distill import training
from distill.commands import eval as eval_recipe
from distill.config import ConfigError, EvalRunConfig, TrainConfig, load_config
from distill.evaluation.metrics import acceptance_estimate, eval_batch_indices, predicted_tokens_per_call
from distill.generation.sampling import SamplingParams, row_seed, sample
from distill.tokenizer import byte_tokenizer

TINY_EVAL = REPO / "configs" / "tiny" / "eval.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "run"
    cfg = load_config(TrainConfig, TINY_TRAIN, [f"out_dir={out}", "log.progress=false", "train.max_steps=4",
                                                "eval.every=0", "checkpoint.every=0"])
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests run (one_thread): its final eval is then the eval's to the last bit
    try:
        training.train(cfg)
    finally:
        torch.set_num_threads(before)
    return out


def test_eval_reproduces_the_training_runs_final_eval(tmp_path, trained):
    final = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["split"] == "eval"
    cfg = load_config(EvalRunConfig, TINY_EVAL, [f"out={tmp_path / 'eval.json'}", "models.student.config=null",
                                                 "models.student.tokenizer=null", f"models.student.path={trained / 'student'}",
                                                 "speculative=null", "progress=false"])
    got = eval_recipe.main(cfg)["models"]["student"]
    for key in ("val_loss", "kl_to_teacher", "top1_agreement", "val_ece", "val_top1_accuracy"):
        assert got[key] == pytest.approx(final[key], rel=1e-5, abs=1e-7), key
    assert got["val_tokens"] == final["val_tokens"]
    # The other divergences, with their spread over positions.
    for key in ("reverse_kl_to_teacher", "tvd_to_teacher", "kl_to_teacher_std", "tvd_to_teacher_std"):
        assert got[key] > 0
    assert 0 < got["tvd_to_teacher"] < 1
    assert json.loads((tmp_path / "eval.json").read_text())["models"]["student"]["val_loss"] == got["val_loss"]


def _plain_metrics(cfg: EvalRunConfig, name: str) -> dict:
    """val_loss, kl_to_teacher and top1_agreement of ``models.<name>``, written out on the full logits of freshly
    built models, over the batches distill eval scores (``batch_size`` rows, ``max_batches`` of them spread over
    the split)."""
    from distill.data import build_datasets, collate
    from distill.models import load_model

    tok = byte_tokenizer()
    v = len(tok)
    student = load_model(cfg.models[name], name, tok).eval()
    teacher = load_model(cfg.teacher, "teacher", tok).eval()
    _, dataset = build_datasets(cfg.data, tok, max_positions=256)
    bs = cfg.batch_size
    ce = kl = agree = 0.0
    count = 0
    with torch.no_grad():
        for b in eval_batch_indices(-(-len(dataset) // bs), cfg.max_batches):
            batch = collate([dataset[i] for i in range(b * bs, min((b + 1) * bs, len(dataset)))], tok.pad_token_id)
            labels = batch["labels"][:, 1:]
            keep = labels != -100
            zs, zt = (m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                      .logits[:, :-1, :v][keep].double() for m in (student, teacher))
            logq, logp = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
            ce += float(-logq.gather(-1, labels[keep][:, None]).sum())
            kl += float((logp.exp() * (logp - logq)).sum())
            agree += float((zs.argmax(-1) == zt.argmax(-1)).sum())
            count += int(keep.sum())
    return {"val_loss": ce / count, "kl_to_teacher": kl / count, "top1_agreement": agree / count}


def test_cli_eval_writes_json_and_the_speculative_table(tmp_path, capsys):
    out = tmp_path / "eval.json"
    twin = ["models.twin.seed=1", "models.twin.tokenizer=byte", "models.twin.config.model_type=llama",
            "models.twin.config.hidden_size=32", "models.twin.config.intermediate_size=64",
            "models.twin.config.num_hidden_layers=2", "models.twin.config.num_attention_heads=4",
            "models.twin.config.num_key_value_heads=2", "models.twin.config.max_position_embeddings=256"]
    res = run_cli_here("eval", str(TINY_EVAL), f"out={out}", *twin)
    assert res.returncode == 0, res.stderr[-2000:]
    stdout = capsys.readouterr().out
    assert "| student |" in stdout and "| twin |" in stdout and "speed-up, batch 1" in stdout
    data = json.loads(out.read_text())
    # The numbers against the same quantities written out on full logits here (agreement: a near-tie of two
    # logits may round the other way).
    want = _plain_metrics(load_config(EvalRunConfig, TINY_EVAL), "student")
    got = data["models"]["student"]
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    assert got["kl_to_teacher"] == pytest.approx(want["kl_to_teacher"], rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(want["top1_agreement"], abs=1e-3)
    # The twin is the same model (config and seed): everything but the clock is the same.
    assert data["models"]["twin"] == got
    drafts = data["speculative"]["drafts"]
    spec = drafts["student"]
    assert drafts["twin"]["alpha_hat"] == spec["alpha_hat"] and 0 <= spec["alpha_hat"] <= 1
    assert set(spec["gammas"]) == {"1", "2", "4"}
    for g, r in spec["gammas"].items():
        gamma, a = int(g), spec["alpha_hat"]
        # (1 - a^(gamma + 1)) / (1 - a) is the geometric series 1 + a + ... + a^gamma.
        assert r["predicted_tokens_per_target_call"] == pytest.approx(sum(a**j for j in range(gamma + 1)), rel=1e-9)
        assert r["accepted"] <= r["proposed"] <= gamma * r["row_rounds"] and r["row_rounds"] >= r["rounds"] > 0
        assert r["acceptance_rate"] == pytest.approx(r["accepted"] / r["proposed"])
        assert r["tokens_per_target_call"] == pytest.approx(r["tokens"] / r["row_rounds"])
        assert r["tokens_per_target_call"] >= 1
        assert r["tokens"] <= r["accepted"] + r["row_rounds"]  # a round writes its accepted drafts + 1 (or stops)
        twin_counts = {k: v for k, v in drafts["twin"]["gammas"][g].items() if k != "speedup"}
        assert twin_counts == {k: v for k, v in r.items() if k != "speedup"}
        assert set(r["speedup"]) == {"1", "4"} and all(v["ratio"] > 0 for v in r["speedup"].values())
        assert f"| student | {g} | {r['acceptance_rate']:.3f} | {a:.3f} |" in stdout


def test_the_offline_estimate_matches_a_perfect_draft():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2, pad_token_id=0, eos_token_id=1)).eval()
    params = SamplingParams(temperature=1.0, max_new_tokens=6)
    gen = sample(model, [[2, 3, 4], [2, 5]], params, pad_id=0, seeds=[row_seed(0, i) for i in range(2)])
    assert acceptance_estimate(model, model, gen.to_batch(0), params) == pytest.approx(1.0, abs=1e-5)
    assert predicted_tokens_per_call(1.0, 4) == 5.0
    assert predicted_tokens_per_call(0.5, 2) == pytest.approx(1.75)


def _sampler_probs(logits_NV: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampler's distribution written out: softmax(z / T), kept to the k largest logits, then to the
    smallest set of most probable tokens reaching top_p, renormalized; the argmax one-hot when greedy."""
    z = logits_NV.double()
    if params.greedy:
        return torch.nn.functional.one_hot(z.argmax(-1), z.shape[-1]).double()
    p = torch.softmax(z / params.temperature, -1)
    if params.top_k:
        keep = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, z.topk(params.top_k, -1).indices, True)
        p = torch.where(keep, p, 0.0)
        p = p / p.sum(-1, keepdim=True)
    if params.top_p < 1.0:
        for row in p:
            order = row.argsort(descending=True)
            mass = 0.0
            for j, idx in enumerate(order.tolist()):
                if mass >= params.top_p:
                    row[order[j:]] = 0.0
                    break
                mass += float(row[idx])
        p = p / p.sum(-1, keepdim=True)
    return p


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, max_new_tokens=8),
                                    SamplingParams(temperature=0.7, top_k=10, max_new_tokens=8),
                                    SamplingParams(temperature=1.3, top_p=0.8, max_new_tokens=8),
                                    SamplingParams(temperature=0.0, max_new_tokens=8)],
                         ids=["plain", "top_k", "top_p", "greedy"])
def test_the_offline_estimate_of_another_draft_is_the_mean_overlap_of_the_two_distributions(params):
    """alpha-hat with a draft that is not the target: the mean over the written tokens of the target's own samples
    of sum_v min(p_v, q_v), each row scored alone (no padding) by both models, p and q the sampler's distributions
    written out here (measured: 0.68 to 0.77)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, pad_token_id=0,
                                  eos_token_id=1)
    torch.manual_seed(0)
    target = AutoModelForCausalLM.from_config(config).eval()
    draft = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # a draft that agrees with the target in part: the target's weights plus noise
        g = torch.Generator().manual_seed(1)
        for pd, pt in zip(draft.parameters(), target.parameters(), strict=True):
            pd.copy_(pt + 0.02 * torch.randn(pt.shape, generator=g))
    prompts = [[2, 3, 4], [2, 5], [7, 8, 9, 10, 11], [3]]
    params = SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                            max_new_tokens=params.max_new_tokens, stop_ids=(1,))
    seeds = None if params.greedy else [row_seed(4, i) for i in range(len(prompts))]
    gen = sample(target, prompts, params, pad_id=0, seeds=seeds)
    batch = gen.to_batch(0)
    assert not batch["attention_mask"].all()  # rows of different lengths: right padding the estimate must skip
    got = acceptance_estimate(target, draft, batch, params)

    overlaps = []
    with torch.no_grad():
        for prompt, written in zip(prompts, gen.completions(), strict=True):
            ids = torch.tensor([prompt + written])
            at = slice(len(prompt) - 1, len(prompt) - 1 + len(written))  # the positions that predict the written
            p, q = (_sampler_probs(m(ids).logits[0, at], params) for m in (target, draft))
            overlaps += torch.minimum(p, q).sum(-1).tolist()
    want = sum(overlaps) / len(overlaps)
    print(f"{len(overlaps)} written tokens, alpha-hat {got:.4f}")
    assert 0.05 < want < 0.95  # neither a perfect nor a useless draft: the estimate is a real average
    assert got == pytest.approx(want, abs=1e-5)


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ConfigError, match="gammas must be >= 1"):
        load_config(EvalRunConfig, TINY_EVAL, ["speculative.gammas=[0, 2]"])
    other = byte_tokenizer()
    other.add_tokens(["<|x|>"])
    other.save_pretrained(tmp_path / "tok")
    cfg = load_config(EvalRunConfig, TINY_EVAL, [f"out={tmp_path / 'e.json'}", f"teacher.tokenizer={tmp_path / 'tok'}",
                                                 "speculative=null"])
    with pytest.raises(ValueError, match=r"tokenizer \(models.student\) and the teacher tokenizer .* differ"):
        eval_recipe.main(cfg)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        eval_recipe.main(load_config(EvalRunConfig, TINY_EVAL, [f"out={tmp_path / 'e.json'}", f"data.source={empty}"]))


def test_report_of_two_runs_and_an_eval(tmp_path, trained):
    from distill.commands import report

    other = tmp_path / "other"
    training.train(load_config(TrainConfig, TINY_TRAIN, [f"out_dir={other}", "log.progress=false", "train.max_steps=4",
                                                     "eval.every=2", "checkpoint.every=0", "loss.divergence=tvd"]))
    ev = tmp_path / "eval.json"
    eval_recipe.main(load_config(EvalRunConfig, TINY_EVAL, [f"out={ev}", "speculative.gammas=[1,2]",
                                                            "speculative.batch_sizes=[1]"]))
    (tmp_path / "empty-dir").mkdir()
    res = run_cli("report", str(trained), str(other), str(tmp_path / "empty-dir"), "--eval", str(ev),
                  "--out", str(tmp_path / "report"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "empty-dir has no metrics.jsonl" in res.stderr
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| run | steps |" in text and "| run | 4 |" in text and "| other | 4 |" in text
    assert "curves.png" in text and "speculative.png" in text and "| student |" in text
    for png in ("curves.png", "speculative.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="nothing to report"):
        report.main([str(tmp_path / "empty-dir")], out=str(tmp_path / "r2"))


LM_EVAL_TASK = """\
task: tiny_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""


def test_lm_eval_task_with_local_data_matches_our_own_loglikelihoods(tmp_path):
    """A multiple-choice task defined locally (JSON data, no hub) through lm-evaluation-harness on a model of
    ours: its accuracy equals the one computed here by summing the model's log-probs of each choice."""
    rows = [{"question": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1), str(a * b + 3)], "answer": i % 3}
            for i, (a, b) in enumerate([(1, 2), (3, 4), (12, 5), (7, 7), (20, 13), (9, 1), (4, 40), (6, 3)])]
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_sums.yaml").write_text(LM_EVAL_TASK.format(data=data))
    out = tmp_path / "eval.json"
    model_cfg = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "intermediate_size": 64, "max_position_embeddings": 64}
    cfg = EvalRunConfig.model_validate({
        "out": str(out), "models": {"a": {"config": model_cfg, "tokenizer": "byte", "seed": 3}},
        "lm_eval": {"tasks": ["tiny_sums"], "include_path": str(tmp_path / "tasks"), "batch_size": 4}})
    results = eval_recipe.main(cfg)
    assert json.loads(out.read_text())["lm_eval"] == results["lm_eval"]
    acc = results["lm_eval"]["a"]["tiny_sums"]["acc,none"]

    from distill.models import load_model

    tok = byte_tokenizer()
    model = load_model(cfg.models["a"], "models.a", tok).eval()
    right = 0
    for r in rows:
        context = tok(r["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in r["choices"]:
            cont = tok(choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([context + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            scores.append(sum(logp[len(context) - 1 + j, t].item() for j, t in enumerate(cont)))
        right += int(max(range(3), key=scores.__getitem__) == r["answer"])
    assert acc == pytest.approx(right / len(rows))

    bad = cfg.model_copy(update={"lm_eval": cfg.lm_eval.model_copy(update={"tasks": ["tiny_sumz"]})})
    with pytest.raises(ValueError, match="no task named 'tiny_sumz'"):
        eval_recipe.main(bad)


@pytest.mark.slow
def test_two_processes_give_the_single_process_numbers(tmp_path):
    """`accelerate launch --num_processes 2 -m distill eval`: the batches are split over the processes and the
    sums reduced, so every metric equals the one-process run's."""
    import os
    import subprocess
    import sys

    common = [str(TINY_EVAL), "speculative=null", "max_batches=null"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    res = run_cli("eval", *common, f"out={one}")
    assert res.returncode == 0, res.stderr[-2000:]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "distill", "eval",
           *common, f"out={two}"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["examples"] == b["examples"] > 8  # more than one batch, so each process has its share
    for key, value in a["models"]["student"].items():
        assert b["models"]["student"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
