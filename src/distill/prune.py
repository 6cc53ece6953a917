"""Structured pruning of Hugging Face causal LMs, as in Minitron (docs/methods.md §10).

Three steps, each a function here; ``recipes/prune.py`` runs them in order:

1. :func:`score`: forward passes over calibration batches with hooks, no gradients. Per unit, the activation
   magnitude at each position (the L2 norm of a head's output, |value| for an MLP neuron or an embedding
   channel) is averaged over the sequence, then aggregated over sequences with an L2 norm (Minitron's best
   aggregation: mean over the sequence, L2 over the batch). Heads read the input of ``o_proj`` split per head;
   neurons the input of ``down_proj``; embedding channels the output of every norm of the hidden dimension
   (each layer's and the final one: one ranking shared by the embeddings, every layer and the output layer).
   Layers get two scores: the calibration loss increase when the layer alone is skipped, and the block's
   cosine distance ``1 - cos(input, output)`` averaged over tokens.
2. :func:`make_plan`: which layers, channels, KV groups, query heads and neurons to keep for target sizes
   (explicit, or :func:`sizes_for_budget` for a parameter budget). Grouped-query attention stays valid: whole
   KV groups are ranked (by the L2 norm of their query heads' scores) and kept, then the same number of
   query heads is kept in every kept group. Kept indices stay in their original order, so a plan that
   removes nothing reproduces the model exactly.
3. :func:`slice_model`: a new model of the same class, built from the updated config (``head_dim`` kept
   explicit, ``layer_types`` of the kept layers), loaded strictly with the sliced weights; norms, biases,
   Qwen3's per-head q/k norms, tied or untied embeddings and Gemma 2's soft-capping follow.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

logger = logging.getLogger("distill")

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2")
SIZE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")

# Families whose config class requires hidden_size % num_attention_heads == 0 (transformers validates it on save).
HEADS_DIVIDE_HIDDEN = {"llama": True, "mistral": False, "qwen2": False, "qwen3": False, "gemma2": True}
# Gemma 2 multiplies the embeddings by sqrt(hidden_size) and its norms by (1 + weight): see _keep_embedding_scale.
SCALED_EMBEDDINGS = {"llama": False, "mistral": False, "qwen2": False, "qwen3": False, "gemma2": True}

# The norms of the hidden dimension in a decoder layer (llama/mistral/qwen have the first two, gemma2 all four).
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm")

# Parameter name (after ``model.layers.<i>.``, or the whole name outside the layers) -> what each dimension
# indexes: "hidden" (embedding channels), "q" / "kv" (query / key-value heads, head_dim rows each), "mlp"
# (neurons), None (kept whole: the vocabulary, Qwen3's per-head q/k norms over head_dim).
LAYER_SLICES: dict[str, tuple[str | None, ...]] = {
    "self_attn.q_proj.weight": ("q", "hidden"), "self_attn.q_proj.bias": ("q",),
    "self_attn.k_proj.weight": ("kv", "hidden"), "self_attn.k_proj.bias": ("kv",),
    "self_attn.v_proj.weight": ("kv", "hidden"), "self_attn.v_proj.bias": ("kv",),
    "self_attn.o_proj.weight": ("hidden", "q"), "self_attn.o_proj.bias": ("hidden",),
    "self_attn.q_norm.weight": (None,), "self_attn.k_norm.weight": (None,),
    "mlp.gate_proj.weight": ("mlp", "hidden"), "mlp.gate_proj.bias": ("mlp",),
    "mlp.up_proj.weight": ("mlp", "hidden"), "mlp.up_proj.bias": ("mlp",),
    "mlp.down_proj.weight": ("hidden", "mlp"), "mlp.down_proj.bias": ("hidden",),
    **{f"{norm}.weight": ("hidden",) for norm in LAYER_NORMS},
}
TOP_SLICES: dict[str, tuple[str | None, ...]] = {
    "model.embed_tokens.weight": (None, "hidden"), "model.norm.weight": ("hidden",),
    "lm_head.weight": (None, "hidden"), "lm_head.bias": (None,),
}
LAYER_PREFIX = "model.layers."
BUDGET_AXES = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")


def check_family(model_type: str | None, field: str = "model") -> str:
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"{field}: distill prune does not support model_type {model_type!r}; supported families: "
            f"{', '.join(SUPPORTED_FAMILIES)}"
        )
    return model_type


def model_sizes(config) -> dict[str, int]:
    return {k: int(getattr(config, k)) for k in SIZE_KEYS}


def head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


# ------------------------------------------------------------------------------------------------ sizes


def check_sizes(config, sizes: dict[str, int], family: str) -> None:
    """Refuse target sizes the model cannot be pruned to; each message names the setting and its range."""
    orig = model_sizes(config)
    for key in SIZE_KEYS:
        value, have = sizes[key], orig[key]
        if key == "num_hidden_layers" and value < 1:
            raise ValueError(f"target.num_hidden_layers={value} would remove every layer; allowed: 1..{have} "
                             f"(the model has {have} layers)")
        if not 1 <= value <= have:
            raise ValueError(f"target.{key}={value} is outside the allowed range 1..{have} (the model has {have}); "
                             "pruning only removes")
    heads, kv = sizes["num_attention_heads"], sizes["num_key_value_heads"]
    per_group = orig["num_attention_heads"] // orig["num_key_value_heads"]
    if heads % kv:
        raise ValueError(
            f"target.num_attention_heads={heads} is not a multiple of target.num_key_value_heads={kv}: every KV "
            f"group keeps the same number of query heads; allowed with {kv} KV heads: "
            f"{', '.join(str(kv * g) for g in range(1, per_group + 1))}"
        )
    if heads // kv > per_group:
        raise ValueError(
            f"target.num_attention_heads={heads} with target.num_key_value_heads={kv} needs {heads // kv} query heads "
            f"per KV group, but the model's groups have {per_group} ({orig['num_attention_heads']} heads, "
            f"{orig['num_key_value_heads']} KV heads); allowed with {kv} KV heads: "
            f"{', '.join(str(kv * g) for g in range(1, per_group + 1))}"
        )
    if HEADS_DIVIDE_HIDDEN[family] and sizes["hidden_size"] % heads:
        raise ValueError(
            f"target.hidden_size={sizes['hidden_size']} is not a multiple of num_attention_heads={heads}, which "
            f"transformers requires of {family} configs; choose a multiple of {heads}"
        )


def explicit_sizes(config, target: dict[str, int | None]) -> dict[str, int]:
    """Target sizes from the explicit settings; an unset size stays the model's. With only
    ``num_key_value_heads`` set, the query heads per group stay the model's."""
    sizes = model_sizes(config)
    given = {k: v for k, v in target.items() if k in SIZE_KEYS and v is not None}
    if "num_key_value_heads" in given and "num_attention_heads" not in given:
        per_group = sizes["num_attention_heads"] // sizes["num_key_value_heads"]
        given["num_attention_heads"] = given["num_key_value_heads"] * per_group
    sizes.update(given)
    return sizes


def layer_param_shapes(model: PreTrainedModel) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(parameters outside the layers, parameters of one layer): name -> shape, each tied tensor once."""
    top, layer = {}, {}
    for name, p in model.named_parameters():  # tied weights appear once
        if name.startswith(LAYER_PREFIX):
            idx, rest = name[len(LAYER_PREFIX):].split(".", 1)
            if idx == "0":
                layer[rest] = tuple(p.shape)
        else:
            top[name] = tuple(p.shape)
    return top, layer


def _slice_kinds(name: str, table: dict) -> tuple[str | None, ...]:
    kinds = table.get(name)
    if kinds is None:
        raise ValueError(f"the model has a parameter {name!r} that distill prune does not know how to slice "
                         f"(supported families: {', '.join(SUPPORTED_FAMILIES)})")
    return kinds


def param_count(model: PreTrainedModel, sizes: dict[str, int]) -> int:
    """Parameters of ``model`` pruned to ``sizes`` (exact: every parameter's sliced shape)."""
    hd = head_dim(model.config)
    dims = {"hidden": sizes["hidden_size"], "q": sizes["num_attention_heads"] * hd,
            "kv": sizes["num_key_value_heads"] * hd, "mlp": sizes["intermediate_size"]}
    top, layer = layer_param_shapes(model)

    def count(shapes: dict, table: dict) -> int:
        return sum(math.prod(dims[k] if k else n for k, n in zip(_slice_kinds(name, table), shape, strict=True))
                   for name, shape in shapes.items())

    return count(top, TOP_SLICES) + sizes["num_hidden_layers"] * count(layer, LAYER_SLICES)


def sizes_for_budget(model: PreTrainedModel, budget: float, axes: Sequence[str], multiple_of: int,
                     family: str) -> dict[str, int]:
    """The largest sizes within ``budget`` parameters (a count, or a fraction of the model's when < 1) that
    shrink every axis in ``axes`` by one common ratio (rounded down: layers and heads to whole units, hidden
    and intermediate sizes to ``multiple_of``); what the rounding leaves of the budget then goes to
    intermediate_size when it is one of the axes."""
    config = model.config
    orig = model_sizes(config)
    total = param_count(model, orig)
    want = budget * total if budget < 1 else budget
    if not 0 < want < total:
        raise ValueError(f"target.params={budget:g} must be below the model's {total:,} parameters "
                         f"(a count, or a fraction in (0, 1))")
    bad = [a for a in axes if a not in BUDGET_AXES]
    if bad or not axes:
        raise ValueError(f"target.axes={list(axes)}: choose one or more of {', '.join(BUDGET_AXES)}")
    per_group = orig["num_attention_heads"] // orig["num_key_value_heads"]

    def at(ratio: float) -> dict[str, int]:
        s = dict(orig)
        if "num_hidden_layers" in axes:
            s["num_hidden_layers"] = max(1, math.floor(orig["num_hidden_layers"] * ratio))
        if "num_attention_heads" in axes:
            if per_group > 1:  # fewer query heads per group, every KV head kept
                s["num_attention_heads"] = orig["num_key_value_heads"] * max(1, math.floor(per_group * ratio))
            else:  # multi-head attention: whole heads (each its own KV group)
                s["num_key_value_heads"] = s["num_attention_heads"] = max(1, math.floor(orig["num_key_value_heads"]
                                                                                        * ratio))
        step = math.lcm(multiple_of, s["num_attention_heads"]) if HEADS_DIVIDE_HIDDEN[family] else multiple_of
        if "hidden_size" in axes:
            s["hidden_size"] = max(step, math.floor(orig["hidden_size"] * ratio / step) * step)
        if "intermediate_size" in axes:
            s["intermediate_size"] = max(multiple_of,
                                         math.floor(orig["intermediate_size"] * ratio / multiple_of) * multiple_of)
        return {k: min(v, orig[k]) for k, v in s.items()}

    lo, hi = 0.0, 1.0
    if param_count(model, at(lo)) > want:
        smallest = at(lo)
        raise ValueError(
            f"target.params={budget:g} ({want:,.0f} parameters) is below the smallest model that shrinking "
            f"{', '.join(axes)} reaches ({param_count(model, smallest):,} parameters at "
            f"{', '.join(f'{k}={smallest[k]}' for k in axes)}); add axes to target.axes or raise target.params"
        )
    for _ in range(60):  # the largest ratio whose sizes fit
        mid = (lo + hi) / 2
        if param_count(model, at(mid)) <= want:
            lo = mid
        else:
            hi = mid
    sizes = at(lo)
    if "intermediate_size" in axes:  # what rounding left of the budget goes to the finest axis
        lo_i, hi_i = sizes["intermediate_size"] // multiple_of, orig["intermediate_size"] // multiple_of
        while lo_i < hi_i:
            mid = (lo_i + hi_i + 1) // 2
            if param_count(model, {**sizes, "intermediate_size": mid * multiple_of}) <= want:
                lo_i = mid
            else:
                hi_i = mid - 1
        sizes["intermediate_size"] = max(sizes["intermediate_size"], lo_i * multiple_of)
    check_sizes(config, sizes, family)
    return sizes


# ------------------------------------------------------------------------------------------------ importance


@dataclass
class Importance:
    """Scores, higher = more important. heads (L, n_heads), neurons (L, intermediate), channels (hidden,),
    layer_cosine (L,): mean over tokens of 1 - cos(block input, block output); layer_loss (L,): calibration
    loss with the layer skipped minus the full model's (None when not computed)."""

    heads: torch.Tensor
    neurons: torch.Tensor
    channels: torch.Tensor
    layer_cosine: torch.Tensor
    layer_loss: torch.Tensor | None
    base_loss: float
    seconds: dict[str, float] = field(default_factory=dict)

    def layers(self, metric: str) -> torch.Tensor:
        if metric == "loss":
            if self.layer_loss is None:
                raise ValueError("importance.layer_metric=loss needs the layer-drop losses, which were not computed")
            return self.layer_loss
        return self.layer_cosine

    def to_json(self) -> dict:
        return {"heads": self.heads.tolist(), "neurons_top": self.neurons.topk(min(8, self.neurons.shape[1])).indices
                .tolist(), "channels_top": self.channels.topk(min(16, len(self.channels))).indices.tolist(),
                "layer_cosine_distance": self.layer_cosine.tolist(),
                "layer_loss_increase": None if self.layer_loss is None else self.layer_loss.tolist()}


def _decoder_layers(model: PreTrainedModel):
    return model.model.layers


def _mean_over_sequence(values_BTU: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """(B, U): the mean over each sequence's real positions (padding excluded)."""
    mask = mask_BT.to(values_BTU.dtype).unsqueeze(-1)
    return (values_BTU * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def calibration_loss(model: PreTrainedModel, batches: Iterable[dict], vocab_size: int) -> float:
    """Mean next-token cross-entropy (nats/token) over the batches' supervised positions."""
    from distill.evaluation.metrics import eval_sums, metrics_from_sums
    from distill.models import output_head

    return metrics_from_sums(eval_sums(model, output_head(model, vocab_size), batches))["val_loss"]


@torch.no_grad()
def score(model: PreTrainedModel, batches: Sequence[dict], vocab_size: int, layer_loss: bool = True) -> Importance:
    """Importance of every head, neuron, embedding channel and layer from ``batches`` (see the module doc)."""
    config = model.config
    layers = _decoder_layers(model)
    n_layers, n_heads, hd = len(layers), config.num_attention_heads, head_dim(config)
    heads_sq = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    neurons_sq = torch.zeros(n_layers, config.intermediate_size, dtype=torch.float64)
    channels_sq = torch.zeros(config.hidden_size, dtype=torch.float64)
    cos_sum, tokens = torch.zeros(n_layers, dtype=torch.float64), [0.0]
    current: dict[str, torch.Tensor] = {}

    def add_sq(acc: torch.Tensor, per_seq_BU: torch.Tensor) -> None:
        acc += per_seq_BU.double().pow(2).sum(0).cpu()  # L2 over the batch: sum of squares now, sqrt at the end

    def on_heads(i: int):
        def hook(module, args):
            x_BTD = args[0].float()
            norms_BTN = x_BTD.reshape(*x_BTD.shape[:2], n_heads, hd).norm(dim=-1)
            add_sq(heads_sq[i], _mean_over_sequence(norms_BTN, current["mask"]))
        return hook

    def on_neurons(i: int):
        def hook(module, args):
            add_sq(neurons_sq[i], _mean_over_sequence(args[0].float().abs(), current["mask"]))
        return hook

    def on_channels(module, args, out):
        add_sq(channels_sq, _mean_over_sequence(out.float().abs(), current["mask"]))

    def on_block(i: int):
        def hook(module, args, kwargs, out):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = out[0] if isinstance(out, tuple) else out
            cos_BT = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
            mask = current["mask"].to(cos_BT.dtype)
            cos_sum[i] += float(((1.0 - cos_BT) * mask).sum())
        return hook

    handles = []
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_heads(i)))
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_neurons(i)))
            handles.append(layer.register_forward_hook(on_block(i), with_kwargs=True))
            for norm in LAYER_NORMS:
                if hasattr(layer, norm):
                    handles.append(getattr(layer, norm).register_forward_hook(on_channels))
        handles.append(model.model.norm.register_forward_hook(on_channels))

        def tracked():
            for batch in batches:
                current["mask"] = batch["attention_mask"]
                tokens[0] += float(batch["attention_mask"].sum())
                yield batch

        t0 = time.perf_counter()
        base = calibration_loss(model, tracked(), vocab_size)
        seconds = {"activations": time.perf_counter() - t0}
    finally:
        for h in handles:
            h.remove()

    drop = None
    if layer_loss:
        t0 = time.perf_counter()
        losses = []
        for i in range(n_layers):
            with skipping(model, {i}):
                losses.append(calibration_loss(model, batches, vocab_size) - base)
        drop = torch.tensor(losses, dtype=torch.float64)
        seconds["layer_loss"] = time.perf_counter() - t0
    return Importance(heads=heads_sq.sqrt(), neurons=neurons_sq.sqrt(), channels=channels_sq.sqrt(),
                      layer_cosine=cos_sum / max(tokens[0], 1.0), layer_loss=drop, base_loss=base, seconds=seconds)


@contextlib.contextmanager
def skipping(model: PreTrainedModel, drop: set[int]):
    """Within the block the listed decoder layers pass their input through unchanged: the model as if those
    layers were removed (their weights stay; nothing is copied)."""
    layers = _decoder_layers(model)
    try:
        for i in drop:
            layers[i].forward = _identity
        yield model
    finally:
        for i in drop:
            layers[i].__dict__.pop("forward", None)


def _identity(hidden_states, *args, **kwargs):
    return hidden_states


# ------------------------------------------------------------------------------------------------ plan


@dataclass
class Plan:
    """What is kept, as indices of the original model, each list in original order. ``heads[l]`` lists the
    query heads of layer l grouped by their kept KV head (``kv_heads[l]``), which is the layout GQA needs."""

    layers: list[int]
    channels: list[int]
    kv_heads: list[list[int]]  # per original layer
    heads: list[list[int]]
    neurons: list[list[int]]

    def sizes(self) -> dict[str, int]:
        first = self.layers[0]
        return {"num_hidden_layers": len(self.layers), "hidden_size": len(self.channels),
                "intermediate_size": len(self.neurons[first]), "num_attention_heads": len(self.heads[first]),
                "num_key_value_heads": len(self.kv_heads[first])}

    def to_json(self) -> dict:
        return {"layers": self.layers, "kv_heads": [self.kv_heads[i] for i in self.layers],
                "heads": [self.heads[i] for i in self.layers]}


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores (ties: the earlier index), in increasing order."""
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    return sorted(order[:k].tolist())


def make_plan(config, imp: Importance, sizes: dict[str, int], layer_metric: str = "loss") -> Plan:
    """Keep the most important units to reach ``sizes`` (already checked by :func:`check_sizes`)."""
    n_layers, heads, kv = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    per_group, keep_per_group = heads // kv, sizes["num_attention_heads"] // sizes["num_key_value_heads"]
    kv_heads, q_heads, neurons = [], [], []
    for i in range(n_layers):
        by_group = imp.heads[i].reshape(kv, per_group)
        groups = _top(by_group.norm(dim=1), sizes["num_key_value_heads"])
        kv_heads.append(groups)
        q_heads.append([g * per_group + h for g in groups for h in _top(by_group[g], keep_per_group)])
        neurons.append(_top(imp.neurons[i], sizes["intermediate_size"]))
    return Plan(layers=_top(imp.layers(layer_metric), sizes["num_hidden_layers"]),
                channels=_top(imp.channels, sizes["hidden_size"]), kv_heads=kv_heads, heads=q_heads, neurons=neurons)


# ------------------------------------------------------------------------------------------------ slicing


def pruned_config(config, plan: Plan):
    """The config of the pruned model: the new sizes, ``head_dim`` kept explicit (it does not follow
    hidden_size / heads any more), and ``layer_types`` (sliding / full attention) of the kept layers."""
    values = config.to_dict()
    values.update(plan.sizes(), head_dim=head_dim(config))
    if getattr(config, "layer_types", None) is not None:
        values["layer_types"] = [config.layer_types[i] for i in plan.layers]
    if "max_window_layers" in values:  # qwen: only read when layer_types is absent; keep it in range
        values["max_window_layers"] = min(values["max_window_layers"], len(plan.layers))
    try:
        new = type(config).from_dict(values)
        new.validate()
    except Exception as exc:  # transformers' strict validation: say which sizes it refused
        raise ValueError(f"transformers refuses the pruned {config.model_type} config ({plan.sizes()}): {exc}") from None
    return new


def _rows(kind: str | None, plan: Plan, layer: int | None, hd: int, n: int) -> torch.Tensor | None:
    if kind is None:
        return None
    if kind == "hidden":
        idx = plan.channels
    elif kind == "mlp":
        idx = plan.neurons[layer]
    else:
        units = plan.heads[layer] if kind == "q" else plan.kv_heads[layer]
        idx = [u * hd + j for u in units for j in range(hd)]
    if len(idx) == n:  # all kept, in order: no copy
        return None
    return torch.tensor(idx, dtype=torch.long)


def _slice(tensor: torch.Tensor, kinds: tuple, plan: Plan, layer: int | None, hd: int) -> torch.Tensor:
    out = tensor
    for dim, kind in enumerate(kinds):
        idx = _rows(kind, plan, layer, hd, tensor.shape[dim])
        if idx is not None:
            out = out.index_select(dim, idx.to(tensor.device))
    return out


def sliced_state_dict(model: PreTrainedModel, plan: Plan) -> dict[str, torch.Tensor]:
    """The pruned model's weights under its own names (kept layers renumbered 0..)."""
    hd = head_dim(model.config)
    new_index = {old: new for new, old in enumerate(plan.layers)}
    out = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(LAYER_PREFIX):
            idx, rest = name[len(LAYER_PREFIX):].split(".", 1)
            old = int(idx)
            if old in new_index:
                out[f"{LAYER_PREFIX}{new_index[old]}.{rest}"] = _slice(tensor, _slice_kinds(rest, LAYER_SLICES),
                                                                        plan, old, hd)
        else:
            out[name] = _slice(tensor, _slice_kinds(name, TOP_SLICES), plan, None, hd)
    _keep_embedding_scale(model, out, len(plan.channels))
    return out


def _keep_embedding_scale(model: PreTrainedModel, state: dict, new_hidden: int) -> None:
    """Gemma 2 multiplies the embeddings by sqrt(hidden_size): a pruned model would scale the kept channels
    by sqrt(new / old). The embedding rows are scaled back by sqrt(old / new); with tied embeddings the output
    layer is the same matrix, so the final norm's gain (1 + w) is divided by the same factor to keep the
    logits."""
    config = model.config
    old_hidden = config.hidden_size
    if not SCALED_EMBEDDINGS[config.model_type] or new_hidden == old_hidden:
        return
    factor = math.sqrt(old_hidden / new_hidden)
    emb = state["model.embed_tokens.weight"]
    state["model.embed_tokens.weight"] = (emb.float() * factor).to(emb.dtype)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        norm = state["model.norm.weight"]
        state["model.norm.weight"] = ((1.0 + norm.float()) / factor - 1.0).to(norm.dtype)


def slice_model(model: PreTrainedModel, plan: Plan) -> PreTrainedModel:
    """A new model of the pruned config holding the kept weights (loaded strictly: every weight placed)."""
    config = pruned_config(model.config, plan)
    dtype = next(model.parameters()).dtype
    with torch.random.fork_rng(devices=[]):  # the init is overwritten; leave the caller's RNG alone
        new = AutoModelForCausalLM.from_config(config, dtype=dtype).to(next(model.parameters()).device)
    state = sliced_state_dict(model, plan)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected = {k for k in new.state_dict() if k != "lm_head.weight"}
    else:
        expected = set(new.state_dict())
    assert set(state) == expected, (sorted(set(state) ^ expected))[:5]
    new.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        new.tie_weights()
    new.eval()
    return new


# ------------------------------------------------------------------------------------------------ report


def spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Rank correlation of two score vectors (None for fewer than two entries)."""
    if len(a) < 2:
        return None
    ra = torch.argsort(torch.argsort(a.double())).double()
    rb = torch.argsort(torch.argsort(b.double())).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom else None


def comparison_plans(model: PreTrainedModel, imp: Importance, sizes: dict[str, int], family: str,
                     multiple_of: int) -> dict[str, tuple[Plan | None, str]]:
    """Width-only and depth-only plans (each layer metric) with about the parameters of ``sizes``:
    name -> (plan, note); a plan is None when no such model exists (the note says why)."""
    config = model.config
    orig = model_sizes(config)
    budget = param_count(model, sizes)
    out: dict[str, tuple[Plan | None, str]] = {}
    if budget >= param_count(model, orig):
        return out
    try:
        width = sizes_for_budget(model, budget, ("hidden_size", "intermediate_size"), multiple_of, family)
        out["width_only"] = (make_plan(config, imp, width, "loss" if imp.layer_loss is not None else "cosine"),
                             "hidden_size and intermediate_size, at most the same parameters")
    except ValueError as exc:
        out["width_only"] = (None, str(exc))
    # Depth: the layer count whose size is nearest the budget (at least one layer).
    counts = {n: param_count(model, {**orig, "num_hidden_layers": n}) for n in range(1, orig["num_hidden_layers"] + 1)}
    n = min(counts, key=lambda k: (abs(counts[k] - budget), k))
    depth = {**orig, "num_hidden_layers": n}
    for metric in ("loss", "cosine"):
        if metric == "loss" and imp.layer_loss is None:
            continue
        out[f"depth_only_{metric}"] = (make_plan(config, imp, depth, metric),
                                       f"{n} layers ranked by layer {metric}, nearest parameter count")
    return out


def report_markdown(report: dict) -> str:
    lines = [f"# distill prune: {report['model']}", "",
             f"Calibration: {report['calibration']['examples']} examples, {report['calibration']['tokens']:,} tokens. "
             f"Loss = mean next-token cross-entropy on them (nats/token), before any training.", "",
             "| plan | layers | hidden | intermediate | heads | kv heads | parameters | calibration loss | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in report["plans"].items():
        if row.get("sizes") is None:
            lines.append(f"| {name} | | | | | | | | {row['note']} |")
            continue
        s = row["sizes"]
        lines.append(f"| {name} | {s['num_hidden_layers']} | {s['hidden_size']} | {s['intermediate_size']} | "
                     f"{s['num_attention_heads']} | {s['num_key_value_heads']} | {row['params']:,} | "
                     f"{row['loss']:.4f} | {row.get('note', '')} |")
    layers = report["layer_importance"]
    lines += ["", "Layer importance (higher = more important):", "",
              "| layer | loss increase when skipped | cosine distance in -> out |", "|---|---|---|"]
    for i, c in enumerate(layers["cosine_distance"]):
        loss = layers["loss_increase"][i] if layers["loss_increase"] is not None else None
        lines.append(f"| {i} | {'' if loss is None else f'{loss:.4f}'} | {c:.4f} |")
    rho = layers.get("spearman")
    lines += ["", f"Rank correlation of the two layer metrics (Spearman): {'n/a' if rho is None else f'{rho:.3f}'}; "
              f"plan ranks layers by `{layers['metric']}`.", "",
              "Seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in report["seconds"].items()), ""]
    return "\n".join(lines)


def evaluate_plans(model: PreTrainedModel, plans: dict[str, tuple[Plan | None, str]], batches: Sequence[dict],
                   vocab_size: int, on_plan: Callable[[str, dict], None] | None = None) -> dict[str, dict]:
    """Calibration loss and parameter count of each plan's pruned model (built in memory, then dropped)."""
    rows = {}
    for name, (plan, note) in plans.items():
        if plan is None:
            rows[name] = {"sizes": None, "note": note}
            continue
        pruned = slice_model(model, plan)
        rows[name] = {"sizes": plan.sizes(), "params": sum(p.numel() for p in pruned.parameters()),
                      "loss": calibration_loss(pruned, batches, vocab_size), "note": note}
        if on_plan is not None:
            on_plan(name, rows[name])
        del pruned
    return rows

