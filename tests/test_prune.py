"""distill prune: importance, plan and slicing on tiny random Llama, Qwen2, Qwen3 and Gemma 2 checkpoints; the
pruned checkpoint as the student of distill train; the errors of bad targets and data."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch
from conftest import REPO
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill import prune
from distill.cli import main as cli_main
from distill.config import DataConfig, ModelSpec, PruneConfig, TrainConfig, load_config
from distill.data import build_datasets, collate
from distill.models import load_model, load_tokenizer
from distill.recipes import prune as prune_recipe

TINY_PRUNE = REPO / "configs" / "tiny" / "prune.yaml"
TINY_TRAIN = REPO / "configs" / "tiny" / "train.yaml"
DATA = str(REPO / "configs" / "tiny" / "data" / "docstrings.jsonl")

# 3 layers, 4 query heads in 2 KV groups, head_dim 16 (= hidden / heads, so the pruned configs must keep it
# explicit). Llama and Qwen2/Qwen3 untied, Gemma 2 tied with its soft-capping, sliding layers and extra norms.
_BASE = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 128}
FAMILIES = {
    "llama": {"model_type": "llama", **_BASE},
    # Padded output rows, as Qwen's (and room for the <|endoftext|> token transformers adds to a byte-level
    # tokenizer saved beside a qwen2 config).
    "qwen2": {"model_type": "qwen2", "vocab_size": 272, **_BASE},
    "qwen3": {"model_type": "qwen3", "head_dim": 16, **_BASE},
    "gemma2": {"model_type": "gemma2", "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
               "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "tie_word_embeddings": True,
               **_BASE},
}
SMALL = {"num_hidden_layers": 2, "hidden_size": 48, "intermediate_size": 40, "num_attention_heads": 2,
         "num_key_value_heads": 1}


def _random_init(model):
    """Spread the weights of a random model (norm gains too), so that every unit differs from the others."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for p in model.parameters():
            p.data.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """family -> a saved tiny random checkpoint directory (with the byte-level tokenizer)."""
    root = tmp_path_factory.mktemp("prune_models")
    out = {}
    for family, config in FAMILIES.items():
        spec = ModelSpec(config=config, tokenizer="byte", seed=0)
        tok = load_tokenizer(spec, "model")
        model = _random_init(load_model(spec, "model", tok))
        model.save_pretrained(root / family)
        tok.save_pretrained(root / family)
        out[family] = root / family
    return out


def _cfg(model_dir, out_dir, **target) -> PruneConfig:
    return PruneConfig(out_dir=str(out_dir), model=ModelSpec(path=str(model_dir)),
                       data=DataConfig(source=DATA, seq_len=64, eval_fraction=0.0, max_examples=100),
                       target=target, importance={"samples": 16, "batch_size": 8})


def _batch(tok, n=4, seq=48):
    ds, _ = build_datasets(DataConfig(source=DATA, seq_len=seq, eval_fraction=0.0, max_examples=60), tok)
    return collate([ds[i] for i in range(n)], tok.pad_token_id)


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruned_checkpoint_loads_generates_and_has_the_sizes(family, checkpoints, tmp_path):
    t0 = time.perf_counter()
    report = prune_recipe.main(_cfg(checkpoints[family], tmp_path / "out", **SMALL))
    out = tmp_path / "out"
    assert not (tmp_path / "out.tmp").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(checkpoints[family])
    assert prune.model_sizes(model.config) == SMALL
    assert model.config.model_type == family
    assert model.config.head_dim == 16  # kept explicit: hidden / heads is now 24
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (2 * 16, 48)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (16, 48)
    assert model.model.layers[0].mlp.down_proj.weight.shape == (48, 40)
    assert sum(p.numel() for p in model.parameters()) == report["plans"]["chosen"]["params"] == prune.param_count(
        original, SMALL)
    assert model.config.tie_word_embeddings == original.config.tie_word_embeddings
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    if family == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias.shape == (32,)
    if family == "qwen3":
        assert model.model.layers[0].self_attn.q_norm.weight.shape == (16,)
    kept = report["plan"]["layers"]
    if getattr(original.config, "layer_types", None):
        assert model.config.layer_types == [original.config.layer_types[i] for i in kept]
    if family == "gemma2":
        assert model.config.final_logit_softcapping == 30.0 and model.config.attn_logit_softcapping == 50.0
        assert model.model.layers[0].post_feedforward_layernorm.weight.shape == (48,)
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("def f(x):", add_special_tokens=False)["input_ids"]])
    gen = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape == (1, ids.shape[1] + 5)
    assert (out / "prune_report.md").is_file() and json.loads((out / "prune_report.json").read_text())["plans"]
    print(f"{family}: prune + load + generate in {time.perf_counter() - t0:.1f} s")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_plan_that_removes_nothing_gives_the_same_logits(family, checkpoints, tmp_path):
    original = AutoModelForCausalLM.from_pretrained(checkpoints[family])
    sizes = prune.model_sizes(original.config)
    prune_recipe.main(_cfg(checkpoints[family], tmp_path / "out", **sizes).model_copy(update={"report": False}))
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    batch = _batch(AutoTokenizer.from_pretrained(checkpoints[family]))
    assert torch.equal(_logits(pruned, batch), _logits(original, batch))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_slicing_equals_masking_the_removed_units(family, checkpoints):
    """Removing MLP neurons, query heads / KV groups and layers is the same function as zeroing the removed
    neurons' and heads' output weights and skipping the removed layers in the original model (an independent
    reference for the slicing; the hidden size stays, since a norm over fewer channels is another function)."""
    original = AutoModelForCausalLM.from_pretrained(checkpoints[family])
    config = original.config
    g = torch.Generator().manual_seed(3)
    imp = prune.Importance(heads=torch.rand(3, 4, generator=g), neurons=torch.rand(3, 96, generator=g),
                           channels=torch.rand(64, generator=g), layer_cosine=torch.rand(3, generator=g),
                           layer_loss=torch.rand(3, generator=g), base_loss=0.0)
    sizes = {**prune.model_sizes(config), "num_hidden_layers": 2, "intermediate_size": 50,
             "num_attention_heads": 2, "num_key_value_heads": 1}
    plan = prune.make_plan(config, imp, sizes, "loss")
    assert plan.sizes() == sizes
    pruned = prune.slice_model(original, plan)

    reference = copy.deepcopy(original)
    for i, layer in enumerate(reference.model.layers):
        gone_neurons = sorted(set(range(96)) - set(plan.neurons[i]))
        layer.mlp.down_proj.weight.data[:, gone_neurons] = 0
        for h in sorted(set(range(4)) - set(plan.heads[i])):
            layer.self_attn.o_proj.weight.data[:, h * 16:(h + 1) * 16] = 0
    batch = _batch(AutoTokenizer.from_pretrained(checkpoints[family]))
    with prune.skipping(reference, set(range(3)) - set(plan.layers)):
        want = _logits(reference, batch)
    torch.testing.assert_close(_logits(pruned, batch), want, atol=2e-5, rtol=1e-5)


def test_gemma2_kept_channels_keep_their_embedding_values(checkpoints):
    """Gemma 2 scales its embeddings by sqrt(hidden_size): the pruned embeddings of the kept channels equal the
    original's, and (tied) the logits of a hidden state restricted to the kept channels are unchanged."""
    original = AutoModelForCausalLM.from_pretrained(checkpoints["gemma2"])
    keep = list(range(0, 64, 2))
    plan = prune.Plan(layers=[0, 1, 2], channels=keep, kv_heads=[[0, 1]] * 3, heads=[[0, 1, 2, 3]] * 3,
                      neurons=[list(range(96))] * 3)
    pruned = prune.slice_model(original, plan)
    ids = torch.tensor([[5, 17, 99]])
    torch.testing.assert_close(pruned.model.embed_tokens(ids), original.model.embed_tokens(ids)[..., keep])
    h = torch.randn(1, 3, 32)
    full = torch.zeros(1, 3, 64)
    full[..., keep] = h
    # The final norm's gain was divided by the factor the embeddings (= the output layer) were multiplied by.
    gain_new = 1 + pruned.model.norm.weight
    gain_old = (1 + original.model.norm.weight)[keep]
    torch.testing.assert_close((h * gain_new) @ pruned.lm_head.weight.T, (full[..., keep] * gain_old)
                               @ original.lm_head.weight[:, keep].T, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ the importance means something


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama trained briefly on the docstrings (a random model's units are all alike), with its
    calibration batches and importance."""
    torch.manual_seed(0)
    spec = ModelSpec(config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                             "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "max_position_embeddings": 128}, tokenizer="byte")
    tok = load_tokenizer(spec, "model")
    model = load_model(spec, "model", tok)
    ds, _ = build_datasets(DataConfig(source=DATA, seq_len=64, eval_fraction=0.0), tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(60):
        batch = collate([ds[i] for i in torch.randint(len(ds), (16,), generator=g).tolist()], tok.pad_token_id)
        model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
        opt.step()
        opt.zero_grad()
    print(f"trained the tiny llama in {time.perf_counter() - t0:.1f} s")
    model.eval()
    cal = [collate([ds[i] for i in range(j, j + 16)], tok.pad_token_id) for j in range(0, 64, 16)]
    return model, cal, len(tok), prune.score(model, cal, len(tok))


def _loss_with_zeroed(model, cal, vocab, weight, cols):
    saved = weight.data.clone()
    weight.data[:, cols] = 0
    try:
        return prune.calibration_loss(model, cal, vocab)
    finally:
        weight.data.copy_(saved)


def test_removing_the_last_ranked_head_or_neuron_costs_less_than_the_first(trained):
    model, cal, vocab, imp = trained
    base = imp.base_loss
    head_first, head_last, neuron_first, neuron_last = [], [], [], []
    for i, layer in enumerate(model.model.layers):
        order = torch.argsort(imp.heads[i], descending=True).tolist()
        o = layer.self_attn.o_proj.weight
        head_first.append(_loss_with_zeroed(model, cal, vocab, o, slice(order[0] * 16, order[0] * 16 + 16)) - base)
        head_last.append(_loss_with_zeroed(model, cal, vocab, o, slice(order[-1] * 16, order[-1] * 16 + 16)) - base)
        order = torch.argsort(imp.neurons[i], descending=True).tolist()
        down = layer.mlp.down_proj.weight
        neuron_first.append(_loss_with_zeroed(model, cal, vocab, down, [order[0]]) - base)
        neuron_last.append(_loss_with_zeroed(model, cal, vocab, down, [order[-1]]) - base)
    print("loss change, first vs last ranked head per layer:", head_first, head_last)
    print("loss change, first vs last ranked neuron per layer:", neuron_first, neuron_last)
    assert abs(head_last[0]) < head_first[0]  # the first layer's heads matter most in this model
    assert abs(sum(head_last)) < sum(head_first)
    assert abs(neuron_last[0]) < neuron_first[0] and abs(sum(neuron_last)) < sum(neuron_first)


@pytest.mark.parametrize("metric", ["loss", "cosine"])
def test_removing_the_last_ranked_layer_costs_less_than_the_first(trained, metric):
    model, cal, vocab, imp = trained
    order = torch.argsort(imp.layers(metric), descending=True).tolist()
    losses = {}
    for i in (order[0], order[-1]):
        with prune.skipping(model, {i}):
            losses[i] = prune.calibration_loss(model, cal, vocab) - imp.base_loss
    print(metric, "ranking", order, "loss change when skipped", losses)
    assert abs(losses[order[-1]]) < losses[order[0]]


def test_removing_the_last_ranked_channels_costs_less_than_the_first(trained):
    model, cal, vocab, imp = trained
    order = torch.argsort(imp.channels, descending=True).tolist()
    sizes = {**prune.model_sizes(model.config), "hidden_size": 60}  # a multiple of the 4 heads, as llama needs
    full = prune.make_plan(model.config, imp, prune.model_sizes(model.config))

    def without(channels):
        plan = prune.Plan(layers=full.layers, channels=[c for c in range(64) if c not in channels],
                          kv_heads=full.kv_heads, heads=full.heads, neurons=full.neurons)
        assert plan.sizes() == sizes
        return prune.calibration_loss(prune.slice_model(model, plan), cal, vocab) - imp.base_loss

    first, last = without(order[:4]), without(order[-4:])
    print("loss change without the 4 first / last ranked channels:", first, last)
    assert abs(last) < first


# ------------------------------------------------------------------------------------ budget, recipe, two commands


def test_a_parameter_budget_over_each_axis_policy(checkpoints, tmp_path):
    original = AutoModelForCausalLM.from_pretrained(checkpoints["llama"])
    total = sum(p.numel() for p in original.parameters())
    for axes in (["hidden_size", "intermediate_size"], ["num_hidden_layers"], ["num_attention_heads",
                                                                                "intermediate_size"]):
        sizes = prune.sizes_for_budget(original, 0.7, axes, 1, "llama")
        count = prune.param_count(original, sizes)
        assert count <= 0.7 * total
        changed = {k for k, v in sizes.items() if v != prune.model_sizes(original.config)[k]}
        assert changed <= set(axes) | {"num_key_value_heads"} and changed
        assert sizes["hidden_size"] % sizes["num_attention_heads"] == 0
    sizes = prune.sizes_for_budget(original, 0.5, ["hidden_size", "intermediate_size"], 8, "llama")
    assert sizes["hidden_size"] % 8 == 0 and sizes["intermediate_size"] % 8 == 0
    report = prune_recipe.main(_cfg(checkpoints["llama"], tmp_path / "b", params=0.5))
    assert report["plans"]["chosen"]["params"] <= 0.5 * total
    assert {"width_only", "depth_only_loss", "depth_only_cosine"} <= set(report["plans"])
    assert report["seconds"]["importance_and_slicing"] > 0 and report["seconds"]["forward"] > 0


def test_the_tiny_config_loads_and_prunes_the_tiny_teacher():
    cfg = load_config(PruneConfig, TINY_PRUNE)
    train_cfg = load_config(TrainConfig, TINY_TRAIN)
    # The two-command recipe distills the pruned model from the model it came from.
    assert cfg.model == train_cfg.teacher
    correction = load_config(TrainConfig, REPO / "configs" / "tiny" / "teacher_correction.yaml")
    assert correction.teacher is None and correction.student == cfg.model


def test_prune_then_distill_with_the_two_documented_commands(tmp_path, capsys):
    t0 = time.perf_counter()
    pruned = tmp_path / "pruned"
    assert cli_main(["prune", str(TINY_PRUNE), f"out_dir={pruned}", "importance.samples=16"]) == 0
    assert cli_main(["train", str(TINY_TRAIN), f"student.path={pruned}", "student.config=null",
                     f"out_dir={tmp_path / 'run'}", "log.progress=false", "train.max_steps=4", "eval.every=0",
                     "checkpoint.every=0"]) == 0
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    assert prune.model_sizes(student.config) == {**prune.model_sizes(
        AutoModelForCausalLM.from_pretrained(pruned).config)}
    assert student.config.hidden_size == 32 and student.config.intermediate_size == 64
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("kl" in r for r in rows if r["split"] == "train")  # trained against the teacher
    print(f"prune + train: {time.perf_counter() - t0:.1f} s")


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("overrides, message", [
    (["target.hidden_size=128"], "target.hidden_size=128 is outside the allowed range 1..64"),
    (["target.num_hidden_layers=0"], "target.num_hidden_layers=0 would remove every layer; allowed: 1..2"),
    (["target.hidden_size=null", "target.intermediate_size=null", "target.num_attention_heads=3"],
     "target.num_attention_heads=3 is not a multiple of target.num_key_value_heads=2"),
    (["target.hidden_size=null", "target.intermediate_size=null", "target.num_attention_heads=4",
      "target.num_key_value_heads=1"], "needs 4 query heads per KV group, but the model's groups have 2"),
    (["target.hidden_size=30"], "target.hidden_size=30 is not a multiple of num_attention_heads=4"),
    (["model.config.model_type=gpt2"], "supported families: llama, qwen2, qwen3, gemma2"),
    (["target.hidden_size=null", "target.intermediate_size=null", "target.params=10"],
     "below the smallest model"),
    (["target.hidden_size=null", "target.intermediate_size=null", "target.params=1e9"],
     "must be below the model's"),
    (["target.params=0.5"], "not both"),
    (["target.hidden_size=null", "target.intermediate_size=null"], "give the pruned sizes"),
])
def test_bad_targets_are_refused_with_the_setting_and_range(overrides, message, tmp_path, capsys):
    rc = cli_main(["prune", str(TINY_PRUNE), f"out_dir={tmp_path / 'out'}", *overrides])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_empty_calibration_data_and_foreign_out_dir_are_refused(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli_main(["prune", str(TINY_PRUNE), f"out_dir={tmp_path / 'out'}", f"data.source={empty}"]) == 2
    assert "data.source" in capsys.readouterr().err
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": ""}\n' * 4)
    assert cli_main(["prune", str(TINY_PRUNE), f"out_dir={tmp_path / 'out'}", f"data.source={blank}",
                     "data.eval_fraction=0"]) == 2
    assert "empty after tokenization" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert cli_main(["prune", str(TINY_PRUNE), f"out_dir={other}"]) == 2
    assert "is not the output of distill prune" in capsys.readouterr().err
    assert (other / "keep.txt").is_file()


def test_an_interrupted_write_leaves_no_output(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(prune_recipe.ckpt, "atomic_write_json", fail)  # the report, written last
    cfg = load_config(PruneConfig, TINY_PRUNE, [f"out_dir={tmp_path / 'out'}", "importance.samples=8", "report=false"])
    with pytest.raises(OSError):
        prune_recipe.main(cfg)
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    prune_recipe.main(cfg)  # the debris is replaced by the next run
    assert (tmp_path / "out" / "prune_report.json").is_file() and not (tmp_path / "out.tmp").exists()
