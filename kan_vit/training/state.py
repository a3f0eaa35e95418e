"""The training state: what one update reads and changes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kan_vit.training.kan_health import KanHealth


@dataclass
class TrainState:
    """Everything an update changes. Device tensors: `step` (updates done), `loss_sum` (sum of
    update losses since the last log), `acc_sums` (sums of update train acc1, acc5 since the last
    log), `skipped` (samples skipped since the last log),
    `first_bad_step` (first update with a non-finite loss, -1 while none). `host_step` mirrors
    `step` on the host, so the loop never reads the device to know where it is. `health` keeps
    the run.kan_health interval sums (None when off)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: torch.Tensor
    loss_sum: torch.Tensor
    acc_sums: torch.Tensor
    skipped: torch.Tensor
    first_bad_step: torch.Tensor
    health: KanHealth | None = None
    host_step: int = 0
    best_acc1: float = -1.0
    diverged_at: int = -1  # set by the log closure from first_bad_step
