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

from distill.cli import main as cli_main
from distill.commands import prune as prune_recipe
from distill.config import DataConfig, ModelSpec, PruneConfig, TrainConfig, load_config
from distill.data import build_datasets, collate
from distill.models import load_model, load_tokenizer
from distill.pruning.importance import Importance, score, skipping
from distill.pruning.plan import Plan, make_plan
from distill.pruning.sizes import model_sizes, param_count, sizes_for_budget
from distill.pruning.slicing import slice_model

TINY_PRUNE = REPO / "configs" / "tiny" / "prune.yaml"
TINY_TRAIN = REPO / "configs" / "tiny" / "train.yaml"
DATA = str(REPO / "configs" / "tiny" / "data" / "docstrings.jsonl")

# 3 layers, 4 query heads in 2 KV groups, head_dim 16 (= hidden / heads, so the pruned configs must keep it
# explicit). Llama and Qwen2/Qwen3 untied, Gemma 2 tied with its soft-capping, sliding layers and extra norms.
_BASE = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 128}
FAMILIES = {
    "llama": {"model_type": "llama", **_BASE},
    "mistral": {"model_type": "mistral", "head_dim": 16, "sliding_window": 8, **_BASE},
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
    assert model_sizes(model.config) == SMALL
    assert model.config.model_type == family
    assert model.config.head_dim == 16  # kept explicit: hidden / heads is now 24
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (2 * 16, 48)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (16, 48)
    assert model.model.layers[0].mlp.down_proj.weight.shape == (48, 40)
    assert sum(p.numel() for p in model.parameters()) == report["plans"]["chosen"]["params"] == param_count(
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
    sizes = model_sizes(original.config)
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
    imp = Importance(heads=torch.rand(3, 4, generator=g), neurons=torch.rand(3, 96, generator=g),
                           channels=torch.rand(64, generator=g), layer_cosine=torch.rand(3, generator=g),
                           layer_loss=torch.rand(3, generator=g), base_loss=0.0)
    sizes = {**model_sizes(config), "num_hidden_layers": 2, "intermediate_size": 50,
             "num_attention_heads": 2, "num_key_value_heads": 1}
    plan = make_plan(config, imp, sizes, "loss")
    assert plan.sizes() == sizes
    pruned = slice_model(original, plan)

    reference = copy.deepcopy(original)
    for i, layer in enumerate(reference.model.layers):
        gone_neurons = sorted(set(range(96)) - set(plan.neurons[i]))
        layer.mlp.down_proj.weight.data[:, gone_neurons] = 0
        for h in sorted(set(range(4)) - set(plan.heads[i])):
            layer.self_attn.o_proj.weight.data[:, h * 16:(h + 1) * 16] = 0
    batch = _batch(AutoTokenizer.from_pretrained(checkpoints[family]))
    with skipping(reference, set(range(3)) - set(plan.layers)):
        want = _logits(reference, batch)
    torch.testing.assert_close(_logits(pruned, batch), want, atol=2e-5, rtol=1e-5)


def test_gemma2_kept_channels_keep_their_embedding_values(checkpoints):
    """Gemma 2 scales its embeddings by sqrt(hidden_size): the pruned embeddings of the kept channels equal the
    original's, and (tied) the logits of a hidden state restricted to the kept channels are unchanged."""
    original = AutoModelForCausalLM.from_pretrained(checkpoints["gemma2"])
    keep = list(range(0, 64, 2))
    plan = Plan(layers=[0, 1, 2], channels=keep, kv_heads=[[0, 1]] * 3, heads=[[0, 1, 2, 3]] * 3,
                      neurons=[list(range(96))] * 3)
    pruned = slice_model(original, plan)
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
#
# Known answers built into a random model (no training, whose outcome would depend on the machine's rounding):
# a unit scaled up 30x must rank first and one scaled down 1000x (or silenced) last, and removing the first
# must change the model's predictions by orders of magnitude more than removing the last. Which of the
# ordinary units ranks where is left unasserted: that is chance.

LOUD, QUIET = 30.0, 1e-3
HD = 8  # head_dim of the planted model: 8 query heads in 4 KV groups of 2 over hidden 64


@pytest.fixture(scope="module")
def planted_base():
    """A random 4-layer Llama (spread weights), its calibration batches and vocabulary size."""
    spec = ModelSpec(config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                             "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
                             "max_position_embeddings": 128}, tokenizer="byte", seed=0)
    tok = load_tokenizer(spec, "model")
    model = _random_init(load_model(spec, "model", tok)).eval()
    ds, _ = build_datasets(DataConfig(source=DATA, seq_len=64, eval_fraction=0.0, max_examples=40), tok)
    # Rows cut to different lengths: padding that every score must leave out.
    rows = [{k: ds[i][k][:64 - 5 * (i % 8)] for k in ("input_ids", "labels")} for i in range(16)]
    cal = [collate(rows[j:j + 8], tok.pad_token_id) for j in (0, 8)]
    return model, cal, len(tok)


def _logprobs(model, cal, vocab) -> torch.Tensor:
    """(real positions, vocab) float64 next-token log-probabilities over the calibration batches."""
    with torch.no_grad():
        return torch.cat([torch.log_softmax(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                                            .logits[..., :vocab].double(), -1)[b["attention_mask"].bool()]
                          for b in cal])


def _kl(ref_logprobs: torch.Tensor, model, cal, vocab) -> float:
    """Mean KL(reference || model) over the calibration positions: how much a change moved the predictions."""
    lp = _logprobs(model, cal, vocab)
    return float((ref_logprobs.exp() * (ref_logprobs - lp)).sum(-1).mean())


def _kl_with_zeroed(ref, model, cal, vocab, weight, cols) -> float:
    saved = weight.data.clone()
    weight.data[:, cols] = 0
    try:
        return _kl(ref, model, cal, vocab)
    finally:
        weight.data.copy_(saved)


def _mean_ce(model, cal, vocab) -> float:
    """Next-token cross-entropy (nats/token) over the supervised positions, from the full logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in cal:
            z = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1, :vocab].double()
            labels = b["labels"][:, 1:]
            keep = labels != -100
            total += float(torch.nn.functional.cross_entropy(z[keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


def _loud_and_quiet(i: int) -> tuple[int, int, int, int]:
    """Layer i's planted KV groups (loud, quiet) and MLP neurons (loud, quiet)."""
    return i % 4, (i + 2) % 4, 7 + 13 * i, 50 + 11 * i


def test_planted_heads_and_neurons_rank_first_and_last_and_cost_accordingly(planted_base):
    """A head's score reads its output (the input of o_proj): scaling a KV group's v_proj rows scales the
    output of both its query heads (heads 2g, 2g + 1: GQA's layout); a neuron's score reads the input of
    down_proj: scaling its up_proj row scales it. Each layer gets one loud and one quiet group and neuron."""
    base, cal, vocab = planted_base
    model = copy.deepcopy(base)
    for i, layer in enumerate(model.model.layers):
        g_loud, g_quiet, n_loud, n_quiet = _loud_and_quiet(i)
        v = layer.self_attn.v_proj.weight.data
        v[g_loud * HD:(g_loud + 1) * HD] *= LOUD
        v[g_quiet * HD:(g_quiet + 1) * HD] *= QUIET
        layer.mlp.up_proj.weight.data[n_loud] *= LOUD
        layer.mlp.up_proj.weight.data[n_quiet] *= QUIET
    imp = score(model, cal, vocab, layer_loss=False)
    ref = _logprobs(model, cal, vocab)
    for i, layer in enumerate(model.model.layers):
        g_loud, g_quiet, n_loud, n_quiet = _loud_and_quiet(i)
        order = torch.argsort(imp.heads[i], descending=True).tolist()
        assert set(order[:2]) == {2 * g_loud, 2 * g_loud + 1}, (i, imp.heads[i])
        assert set(order[-2:]) == {2 * g_quiet, 2 * g_quiet + 1}, (i, imp.heads[i])
        order = torch.argsort(imp.neurons[i], descending=True).tolist()
        assert order[0] == n_loud and order[-1] == n_quiet, (i, order[:3], order[-3:])
        # Zeroing the first-ranked head's (neuron's) output weights moves the predictions; the last one's barely.
        o, down = layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight
        head_cost = [_kl_with_zeroed(ref, model, cal, vocab, o, slice(h * HD, (h + 1) * HD))
                     for h in (2 * g_loud, 2 * g_quiet)]
        neuron_cost = [_kl_with_zeroed(ref, model, cal, vocab, down, [n]) for n in (n_loud, n_quiet)]
        print(f"layer {i}: KL when zeroing the first / last ranked head {head_cost}, neuron {neuron_cost}")
        # measured: heads 2e-2..5e-2 against ~1e-10, neurons 1e-4..1e-3 against ~1e-12
        assert head_cost[0] > 1e4 * head_cost[1] and neuron_cost[0] > 1e4 * neuron_cost[1]


def _l2_sq_of_sequence_means(x_BTU: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """(U,): the sum over sequences of the squared mean over each sequence's real positions."""
    means_BU = (x_BTU.double() * mask_BT[..., None]).sum(1) / mask_BT.sum(1, keepdim=True)
    return means_BU.pow(2).sum(0)


def test_importance_scores_follow_their_definition(planted_base):
    """Written out from score's definition on activations captured here: per unit, the activation
    magnitude averaged over each sequence's real positions, then the L2 norm over the sequences; the
    layer's cosine distance averaged over the real tokens."""
    model, cal, vocab = planted_base
    imp = score(model, cal, vocab, layer_loss=False)
    seen = {"heads": [], "neurons": [], "norms": [], "blocks": []}
    layers = model.model.layers
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: seen["heads"].append((i, a[0])))
             for i, layer in enumerate(layers)]
    hooks += [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: seen["neurons"].append((i, a[0])))
              for i, layer in enumerate(layers)]
    norms = [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    hooks += [n.register_forward_hook(lambda m, a, out: seen["norms"].append(out))
              for n in [*norms, model.model.norm]]
    hooks += [layer.register_forward_hook(lambda m, a, kw, out, i=i: seen["blocks"].append(
        (i, kw.get("hidden_states", a[0] if a else None), out[0] if isinstance(out, tuple) else out)), with_kwargs=True)
        for i, layer in enumerate(layers)]
    heads = torch.zeros(4, 8, dtype=torch.float64)
    neurons = torch.zeros(4, 128, dtype=torch.float64)
    channels = torch.zeros(64, dtype=torch.float64)
    cos, tokens = torch.zeros(4, dtype=torch.float64), 0
    try:
        for b in cal:
            for v in seen.values():
                v.clear()
            with torch.no_grad():
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            mask = b["attention_mask"].double()
            for i, x in seen["heads"]:
                heads[i] += _l2_sq_of_sequence_means(x.reshape(*x.shape[:2], 8, HD).norm(dim=-1), mask)
            for i, x in seen["neurons"]:
                neurons[i] += _l2_sq_of_sequence_means(x.abs(), mask)
            for x in seen["norms"]:
                channels += _l2_sq_of_sequence_means(x.abs(), mask)
            for i, x_in, x_out in seen["blocks"]:
                c = torch.nn.functional.cosine_similarity(x_in.double(), x_out.double(), dim=-1)
                cos[i] += float(((1 - c) * mask).sum())
            tokens += int(mask.sum())
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(imp.heads, heads.sqrt(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(imp.neurons, neurons.sqrt(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(imp.channels, channels.sqrt(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(imp.layer_cosine, cos / tokens, rtol=1e-4, atol=1e-6)


def test_planted_layers_rank_and_the_layer_loss_is_the_loss_without_the_layer(planted_base):
    """Layer 1 made the identity (its o_proj and down_proj zeroed: a Llama layer then adds nothing) has cosine
    distance 0 and layer loss exactly 0, so it ranks last by cosine; layer 2 with its MLP output scaled up
    30x ranks first. The loss metric is checked against its definition instead (whether dropping a random
    model's layer helps or hurts is chance): the loss of a copy with that layer made the identity, minus the
    full model's, both from the full logits."""
    base, cal, vocab = planted_base
    model = copy.deepcopy(base)
    model.model.layers[1].self_attn.o_proj.weight.data.zero_()
    model.model.layers[1].mlp.down_proj.weight.data.zero_()
    model.model.layers[2].mlp.down_proj.weight.data *= LOUD
    imp = score(model, cal, vocab)
    print("cosine distance", imp.layer_cosine.tolist(), "loss increase", imp.layer_loss.tolist())
    order = torch.argsort(imp.layers("cosine"), descending=True).tolist()
    assert order[0] == 2 and order[-1] == 1
    assert imp.layer_cosine[1] < 1e-6 and imp.layer_loss[1] == 0.0
    ref = _logprobs(model, cal, vocab)
    with skipping(model, {2}):
        first = _kl(ref, model, cal, vocab)
    with skipping(model, {1}):
        last = _kl(ref, model, cal, vocab)
    assert first > 0.01 and last == 0.0, (first, last)  # measured: 0.18

    base_ce = _mean_ce(model, cal, vocab)
    assert imp.base_loss == pytest.approx(base_ce, rel=1e-6)
    for i in range(4):
        without = copy.deepcopy(model)
        without.model.layers[i].self_attn.o_proj.weight.data.zero_()
        without.model.layers[i].mlp.down_proj.weight.data.zero_()
        assert float(imp.layer_loss[i]) == pytest.approx(_mean_ce(without, cal, vocab) - base_ce, abs=1e-5), i


def test_planted_channels_rank_first_and_last_and_cost_accordingly(planted_base):
    """Embedding channels scored on the norms' outputs: 8 channels whose embedding column is scaled up 30x rank
    first; 8 silenced ones (embedding column, norm gains and the rows that write them all zero) score 0 and
    rank last. Removing the silenced ones only changes the norms' mean over 56 channels instead of 64;
    removing the loud ones changes the model."""
    base, cal, vocab = planted_base
    model = copy.deepcopy(base)
    dead, loud = [3, 11, 17, 29, 40, 44, 52, 58], [1, 9, 22, 25, 31, 37, 48, 60]
    model.model.embed_tokens.weight.data[:, loud] *= LOUD
    model.model.embed_tokens.weight.data[:, dead] = 0
    model.model.norm.weight.data[dead] = 0
    for layer in model.model.layers:
        layer.input_layernorm.weight.data[dead] = 0
        layer.post_attention_layernorm.weight.data[dead] = 0
        layer.self_attn.o_proj.weight.data[dead] = 0
        layer.mlp.down_proj.weight.data[dead] = 0
    imp = score(model, cal, vocab, layer_loss=False)
    order = torch.argsort(imp.channels, descending=True).tolist()
    assert set(order[:8]) == set(loud) and set(order[-8:]) == set(dead), imp.channels
    assert (imp.channels[dead] == 0).all()
    sizes = {**model_sizes(model.config), "hidden_size": 56}  # a multiple of the 8 heads, as llama needs
    full = make_plan(model.config, imp, model_sizes(model.config), "cosine")
    ref = _logprobs(model, cal, vocab)

    def without(channels):
        plan = Plan(layers=full.layers, channels=[c for c in range(64) if c not in channels],
                          kv_heads=full.kv_heads, heads=full.heads, neurons=full.neurons)
        assert plan.sizes() == sizes
        return _kl(ref, slice_model(model, plan), cal, vocab)

    first, last = without(order[:8]), without(order[-8:])
    print("KL without the 8 first / last ranked channels:", first, last)
    assert first > 30 * last  # measured: 0.17 against 5e-4


# ------------------------------------------------------------------------------------ budget, recipe, two commands


def test_a_parameter_budget_over_each_axis_policy(checkpoints, tmp_path):
    original = AutoModelForCausalLM.from_pretrained(checkpoints["llama"])
    total = sum(p.numel() for p in original.parameters())
    for axes in (["hidden_size", "intermediate_size"], ["num_hidden_layers"], ["num_attention_heads",
                                                                                "intermediate_size"]):
        sizes = sizes_for_budget(original, 0.7, axes, 1, "llama")
        count = param_count(original, sizes)
        assert count <= 0.7 * total
        changed = {k for k, v in sizes.items() if v != model_sizes(original.config)[k]}
        assert changed <= set(axes) | {"num_key_value_heads"} and changed
        assert sizes["hidden_size"] % sizes["num_attention_heads"] == 0
    sizes = sizes_for_budget(original, 0.5, ["hidden_size", "intermediate_size"], 8, "llama")
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
    assert model_sizes(student.config) == {**model_sizes(
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
    (["model.config.model_type=gpt2"], "supported families: llama, mistral, qwen2, qwen3, gemma2"),
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


def test_an_existing_output_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    base = ["prune", str(TINY_PRUNE), f"out_dir={out}", "importance.samples=8", "report=false"]
    assert cli_main(base) == 0
    first = (out / "prune_report.json").read_bytes()
    (out / "marker.txt").write_text("mine")
    capsys.readouterr()
    assert cli_main(base) == 2  # as distill train refuses an existing run
    err = capsys.readouterr().err
    assert "already holds a pruned model" in err and "overwrite=true" in err
    assert (out / "marker.txt").is_file() and (out / "prune_report.json").read_bytes() == first
    assert cli_main([*base, "overwrite=true"]) == 0
    assert not (out / "marker.txt").exists() and (out / "prune_report.json").is_file()
