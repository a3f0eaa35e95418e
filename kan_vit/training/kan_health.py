"""KAN health metrics during training, computed on the device inside the update's graph.

    kan/saturated_frac/layer_i   fraction of block i's KAN inputs (what reaches tanh) with
                                 |x| > SATURATION: there tanh(x) rounds to exactly +-1 in bfloat16,
                                 so every such input lands on T_k(+-1), where |T_K'| = K^2
    kan/coef_norm_by_degree/k    sqrt(sum over layers of ||C[:, :, k]||^2) after the update
    train/grad_norm              global L2 norm of the (replica-mean) gradients, before clipping

The first and last are means over the log interval. Their sums are device tensors restarted by a
torch.where on the step, like the trainer's loss sum, so every update runs the same graph; the
trainer reads them only in its log closure, after the graph ran (`metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch.nn import functional as F

from kan_vit.models.chebykan import ChebyKAN

__all__ = ["KanHealth", "SATURATION", "degree_energy", "metrics"]

SATURATION = math.atanh(1 - 2**-9)  # 3.4653...: above it bf16 tanh rounds to 1 (1 - 2**-8 is the next value below)


def degree_energy(coefficients: torch.Tensor) -> torch.Tensor:
    """sum_(i, j) C[i, j, k]^2 for each degree k: (K + 1,) float32."""
    return coefficients.detach().float().pow(2).sum((0, 1))


class KanHealth:
    """Hooks on every ChebyKAN of `model` plus the interval sums; call `observe_grad_norm` with the
    gradient norm before clipping and `end_update` after the optimizer step, in every update."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.layers = [module for module in model.modules() if isinstance(module, ChebyKAN)]
        for index, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(partial(self._count_saturated, index))
        self._update_fractions = [[] for _ in self.layers]  # per layer: one per forward this update
        self._grad_norm = None
        self.saturated_sum = torch.zeros(len(self.layers), device=device)
        self.grad_norm_sum = torch.zeros((), device=device)
        self.coef_norms = None

    def _count_saturated(self, index: int, layer: ChebyKAN, args: tuple) -> None:
        if layer.training:  # evaluation passes are not training health
            x = layer.tanh_input(args[0].detach())
            self._update_fractions[index].append((x.abs() > SATURATION).float().mean())

    def observe_grad_norm(self, grad_norm: torch.Tensor) -> None:
        """The update's global gradient norm before clipping (the trainer's clipping computes it anyway)."""
        self._grad_norm = grad_norm

    def end_update(self, restart: torch.Tensor, replica_mean: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Add this update to the interval sums (restarted where `restart`), then take the
        coefficient norms. A forward run twice (micro-batches, checkpoint recomputation) counts
        as its mean, so every update weighs the same."""
        if self.layers:
            fractions = torch.stack([torch.stack(f).mean() for f in self._update_fractions])
            self.saturated_sum = torch.where(restart, 0.0, self.saturated_sum) + replica_mean(fractions)
            energies = [degree_energy(layer.coefficients) for layer in self.layers]
            width = max(e.numel() for e in energies)  # per-block degrees may differ
            self.coef_norms = sum(F.pad(e, (0, width - e.numel())) for e in energies).sqrt()
        self.grad_norm_sum = torch.where(restart, 0.0, self.grad_norm_sum) + self._grad_norm
        self._update_fractions = [[] for _ in self.layers]

    def tensors(self) -> tuple:
        """The values to hand to the log closure (this update's tensors, read after its graph ran)."""
        return self.saturated_sum, self.grad_norm_sum, self.coef_norms


def metrics(
    saturated_sum: torch.Tensor, grad_norm_sum: torch.Tensor, coef_norms: torch.Tensor | None, interval: int
) -> dict:
    """`KanHealth.tensors()` as logged numbers; `interval` updates went into the sums."""
    values = {"train/grad_norm": float(grad_norm_sum.cpu()) / interval}
    for i, total in enumerate((saturated_sum.cpu() / interval).tolist()):
        values[f"kan/saturated_frac/layer_{i}"] = total
    if coef_norms is not None:
        for k, norm in enumerate(coef_norms.cpu().tolist()):
            values[f"kan/coef_norm_by_degree/{k}"] = norm
    return values
