"""A plan applied: a new model of the pruned config holding the kept weights (:func:`slice_model`)."""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from distill.pruning.plan import Plan
from distill.pruning.sizes import (
    LAYER_PREFIX,
    LAYER_SLICES,
    SCALED_EMBEDDINGS,
    TOP_SLICES,
    head_dim,
    slice_kinds,
)


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
                out[f"{LAYER_PREFIX}{new_index[old]}.{rest}"] = _slice(tensor, slice_kinds(rest, LAYER_SLICES),
                                                                        plan, old, hd)
        else:
            out[name] = _slice(tensor, slice_kinds(name, TOP_SLICES), plan, None, hd)
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
