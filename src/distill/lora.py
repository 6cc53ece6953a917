"""LoRA students through ``peft`` (``student.lora``; ``pip install 'distill[lora]'``).

The student becomes a ``peft`` model whose base weights are frozen: only the adapters are in the optimizer,
and the run's checkpoints hold only them (:func:`adapter_only_checkpoints`: the base weights are the
student's ``path`` or ``config`` + ``seed``, which the resumed run loads again). At the end the run writes
the adapters (``student_adapter/``, ``peft``'s format) and the student with the adapters merged into its
weights (``student/``, an ordinary Hugging Face checkpoint): :func:`save_adapter`, :func:`merged`.

The output layer may carry adapters as well (``target_modules: [..., lm_head]``): the loss reads the layer's
effective weight, base + (alpha / r) * B @ A (:func:`distill.models.layer_weight`), so the memory-efficient
loss works unchanged; dropout cannot apply there (the loss never runs the layer's own forward), so it must
be 0 when the output layer is a target.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from distill.config import LoraConfig

__all__ = ["add_adapters", "adapter_only_checkpoints", "describe", "is_lora", "merged", "save_adapter",
           "trainable_names"]


def is_lora(model) -> bool:
    """Whether ``model`` is a ``peft`` model (a LoRA student)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def add_adapters(model, spec: LoraConfig, seed: int = 0, field: str = "student.lora"):
    """``model`` with LoRA adapters on ``spec.target_modules``, its other weights frozen (a ``peft`` model). The
    adapters start at B = 0, so the student starts as its base model; A is drawn from ``seed`` (the same
    adapters in every process and every run)."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError:
        raise ValueError(f"{field} needs the peft library: pip install 'distill[lora]' (or pip install peft), "
                         "or remove student.lora to train every weight") from None
    targets = spec.target_modules
    output = model.get_output_embeddings()
    output_name = next((n for n, m in model.named_modules() if m is output), None)
    if isinstance(targets, list):
        names = [n for n, _ in model.named_modules()]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise ValueError(f"{field}.target_modules: {missing} name no module of the student; its linear layers are "
                             f"{linear} (or use target_modules: all-linear)")
        on_output = output_name is not None and any(output_name == t or output_name.endswith("." + t) for t in targets)
        if on_output and spec.dropout > 0:
            raise ValueError(f"{field}: dropout={spec.dropout:g} with the output layer ({output_name}) in target_modules: "
                             "the loss forms the logits from the layer's weight, where dropout cannot apply; set "
                             f"{field}.dropout=0 or leave {output_name} out of target_modules")
    config = PeftLoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                            bias="none", task_type="CAUSAL_LM")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return get_peft_model(model, config)
    except ValueError as exc:
        raise ValueError(f"{field}.target_modules={targets}: {exc}") from None


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def describe(model) -> str:
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = model.peft_config[model.active_adapter]
    targets = config.target_modules
    if not isinstance(targets, str):
        targets = ", ".join(sorted({t.rsplit(".", 1)[-1] for t in targets}))
    total = sum(p.numel() for p in model.parameters())
    return (f"LoRA r={config.r}, alpha={config.lora_alpha:g} on {targets}: {trained / 1e6:.3f}M of "
            f"{total / 1e6:.2f}M parameters trained")


def adapter_only_checkpoints(accelerator) -> None:
    """Make ``accelerator.save_state`` keep only the trained parameters of each model (the adapters; the base
    weights are frozen and loaded from the run's config), and ``load_state`` check that a checkpoint holds
    exactly those. Load with ``strict=False`` (the base weights are absent from the file)."""

    def keep_trained(models, weights, output_dir):
        if len(weights) != len(models):  # FSDP / DeepSpeed save their own sharded state
            return
        for model, state in zip(models, weights, strict=True):
            trained = set(trainable_names(model))
            for key in [k for k in state if k not in trained]:
                del state[key]

    def check_trained(models, input_dir):
        for i, model in enumerate(models):
            path = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            if not path.is_file():
                continue
            with safe_open(str(path), "pt") as f:
                stored = set(f.keys())
            want = set(trainable_names(model))
            if stored != want:
                extra, missing = sorted(stored - want)[:3], sorted(want - stored)[:3]
                raise ValueError(f"{input_dir}: the checkpoint's weights are not this run's trained parameters "
                                 f"(unexpected {extra}, missing {missing}): was it written with other student.lora "
                                 "settings? Resume with the run's own config")

    accelerator.register_save_state_pre_hook(keep_trained)
    accelerator.register_load_state_pre_hook(check_trained)


def save_adapter(model, out_dir: Path) -> None:
    """The adapters alone, in ``peft``'s format (``PeftModel.from_pretrained(base, out_dir)``)."""
    model.save_pretrained(str(out_dir), safe_serialization=True)


def merged(model):
    """The student with its adapters merged into the base weights: an ordinary ``transformers`` model (the
    ``peft`` model is consumed)."""
    return model.merge_and_unload()
