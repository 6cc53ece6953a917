"""The hidden-state loss term (docs/methods.md §12): a distance between the student's and a teacher's hidden
states at mapped layers, per supervised position, beside the logit loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses.divergences import upcast


def uniform_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Student hidden state i -> teacher hidden state round(i * L_t / L_s), for the intermediate layers
    1 .. L_s - 1 (the final output states have their own term). The identity when L_s = L_t."""
    return {i: (2 * i * teacher_layers + student_layers) // (2 * student_layers) for i in range(1, student_layers)}


def hidden_distance(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-position distance between hidden states (..., H) in fp32: ``cosine`` = 1 - cos(a, b), ``mse`` =
    the mean over the width of (a - b)^2. Returns (...)."""
    a, b = upcast(a), upcast(b)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(a, b, dim=-1, eps=1e-8)
    if kind == "mse":
        return (a - b).square().mean(-1)
    raise ValueError(f"unknown hidden-state distance {kind!r}; choose cosine or mse")


class HiddenStateLoss(torch.nn.Module):
    """The hidden-state loss term per position (docs/methods.md §12):

        weight * mean_{(i, j) in pairs} d(P_i h_s[i], h_t[j]) + final_weight * (1 - cos(P_f h_s[-1], h_t[-1]))

    ``pairs``: (student hidden-state index, teacher hidden-state index); ``P`` a learned linear map (no bias)
    from the student's width to the teacher's when ``project`` (identity-initialized between equal widths),
    else the identity. Its parameters are the module's: trained with the student and kept in the run's
    checkpoints, never in the student's own checkpoint.
    """

    def __init__(self, pairs: list[tuple[int, int]], student_width: int, teacher_width: int, *, distance: str,
                 weight: float, final_weight: float, project: bool):
        super().__init__()
        self.pairs, self.distance, self.weight, self.final_weight = list(pairs), distance, weight, final_weight

        def proj() -> torch.nn.Module:
            if not project:
                return torch.nn.Identity()
            lin = torch.nn.Linear(student_width, teacher_width, bias=False)
            if student_width == teacher_width:
                torch.nn.init.eye_(lin.weight)
            return lin

        self.proj = torch.nn.ModuleList([proj() for _ in self.pairs])
        self.final_proj = proj() if final_weight > 0 else None

    def forward(self, student_states, teacher_states, rows: torch.Tensor) -> torch.Tensor:
        """student_states, teacher_states: every hidden state (B, T, H) of each model; rows: (M,) indices of the
        supervised positions among the B * (T - 1) that predict a next token. Returns (M,) fp32."""

        def pick(states, i):
            h = states[i][:, :-1]
            return h.reshape(-1, h.shape[-1]).index_select(0, rows)

        out = torch.zeros(rows.shape[0], dtype=torch.float32, device=rows.device)
        if self.pairs and self.weight > 0:
            terms = [hidden_distance(p(pick(student_states, i)), pick(teacher_states, j).detach(), self.distance)
                     for p, (i, j) in zip(self.proj, self.pairs, strict=True)]
            out = out + self.weight * torch.stack(terms).mean(0)
        if self.final_proj is not None:
            s = self.final_proj(pick(student_states, -1))
            out = out + self.final_weight * hidden_distance(s, pick(teacher_states, -1).detach(), "cosine")
        return out
