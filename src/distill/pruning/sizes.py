"""Which models can be pruned, and to which sizes: the supported families and their parameter layout, checks of
target sizes, exact parameter counts, and the sizes for a parameter budget (:func:`sizes_for_budget`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from transformers import PreTrainedModel

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


def slice_kinds(name: str, table: dict) -> tuple[str | None, ...]:
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
        return sum(math.prod(dims[k] if k else n for k, n in zip(slice_kinds(name, table), shape, strict=True))
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
