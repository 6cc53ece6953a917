"""Importance of heads, MLP neurons, embedding channels and layers from activations on calibration batches
(:func:`score`; docs/methods.md §10), and the model with layers skipped (:func:`skipping`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from distill.evaluation.metrics import eval_sums, metrics_from_sums
from distill.models import output_head
from distill.pruning.sizes import LAYER_NORMS, head_dim


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
