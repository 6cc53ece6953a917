"""The plan: which layers, embedding channels, KV groups, query heads and MLP neurons to keep for target sizes
(:func:`make_plan`), and the width-only and depth-only plans the report compares (:func:`comparison_plans`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from distill.pruning.importance import Importance
from distill.pruning.sizes import model_sizes, param_count, sizes_for_budget


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
