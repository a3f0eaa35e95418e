"""Optimization as the original (docs/original.md, "Training"): decay mask, layer-wise lr decay,
AdamW / LAMB, and the warmup-cosine schedule computed on the device.

XLA: the schedule runs on a 0-dim device step tensor and `set_lr` stores device tensors in the
param groups, so the lr lives inside the step graph (no per-step host->device scalar upload,
no `.item()`); AdamW (GroupStepAdamW on XLA) and LAMB (ChunkedTrustLamb) keep their step counts
and bias corrections on the device too, so neither uploads, recompiles or falls back to the CPU.

Trainer use, per optimizer update (`step` a 0-dim int tensor on the device, the update's
0-based index):
    set_lr(optimizer, lr_at(step, cfg.optim.learning_rate, warmup, training_steps))
    ... backward ...; torch.nn.utils.clip_grad_norm_(params, clip) if clip > 0; optimizer.step()
"""

from __future__ import annotations

import math
import re
from typing import get_args

import torch
from timm.optim import Lamb
from timm.optim.lamb import lamb
from torch import nn

from kan_vit.models.chebykan import ChebyKAN
from kan_vit.training.config import OptimConfig, OptimizerName

__all__ = [
    "param_groups",
    "create_optimizer",
    "GroupStepAdamW",
    "ChunkedTrustLamb",
    "lr_at",
    "set_lr",
    "WARMUP_INIT_LR",
    "COSINE_END_LR",
]

WARMUP_INIT_LR = 1e-6
COSINE_END_LR = 1e-5

# The original decays exactly its `kernel` params: the weights of Dense and Conv layers.
_KERNEL_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_EMBED_PREFIXES = ("patch_embed.", "cls_token", "reg_token", "pos_embed")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
# The fused q, k, v weight is three kernels in the original: LAMB takes one trust ratio per third.
_QKV_WEIGHT_SUFFIX = "attn.qkv.weight"


def _kernel_names(model: nn.Module) -> set[str]:
    return {
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if isinstance(module, _KERNEL_MODULES)
    }


def _layer_id(name: str, num_layers: int) -> int:
    if name.startswith(_EMBED_PREFIXES):
        return 0
    match = _BLOCK_RE.match(name)
    return int(match.group(1)) + 1 if match else num_layers


def param_groups(model: nn.Module, weight_decay: float, lr_decay: float, kan_weight_decay: bool = False) -> list[dict]:
    """Param groups with the original's decay mask and layer-wise lr scales.

    Decayed (weight_decay): Linear/Conv weights only; not KAN coefficients (unless
    `kan_weight_decay`, an ablation), biases, norms, cls_token, pos_embed, LayerScale gammas.
    lr_scale = lr_decay ** (L - i), i = 0 for the
    embedding, k + 1 for `blocks.k`, L for the rest (final norm, head); L = len(model.blocks).
    Each group has 'params', 'weight_decay', 'lr_scale', 'decayed' (the mask, for LAMB) and
    'trust_chunks' (3 for the fused attn.qkv weights, else 1: LAMB's trust ratios per weight).
    """
    if not 0.0 < lr_decay <= 1.0:
        raise ValueError(f"optim.lr_decay must be in (0, 1], got {lr_decay}")
    if weight_decay < 0.0:
        raise ValueError(f"optim.weight_decay must be >= 0, got {weight_decay}")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        raise ValueError(
            f"param_groups needs a ViT-like model with an nn.Sequential `blocks`, got {type(model).__name__}"
        )
    num_layers = len(blocks)
    kernels = _kernel_names(model)
    if kan_weight_decay:
        kernels |= {f"{name}.coefficients" for name, module in model.named_modules() if isinstance(module, ChebyKAN)}
    groups: dict[tuple[float, bool, int], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decayed = name in kernels
        lr_scale = lr_decay ** (num_layers - _layer_id(name, num_layers))
        chunks = 3 if name.endswith(_QKV_WEIGHT_SUFFIX) else 1
        group = groups.setdefault(
            (lr_scale, decayed, chunks),
            dict(
                params=[],
                weight_decay=weight_decay if decayed else 0.0,
                lr_scale=lr_scale,
                decayed=decayed,
                trust_chunks=chunks,
            ),
        )
        group["params"].append(param)
    return list(groups.values())


def create_optimizer(model: nn.Module, optim_cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (decoupled) or LAMB over `param_groups`; build it after moving the model to its device."""
    groups = param_groups(model, optim_cfg.weight_decay, optim_cfg.lr_decay, optim_cfg.kan_weight_decay)
    for group in groups:
        group["lr"] = optim_cfg.learning_rate * group["lr_scale"]
    betas = (optim_cfg.adam_b1, optim_cfg.adam_b2)
    if optim_cfg.optimizer == "adamw":
        if next(model.parameters()).device.type != "xla":
            return torch.optim.AdamW(groups, lr=optim_cfg.learning_rate, betas=betas, eps=optim_cfg.adam_eps)
        return _with_zero_state(GroupStepAdamW(groups, lr=optim_cfg.learning_rate, betas=betas, eps=optim_cfg.adam_eps))
    if optim_cfg.optimizer == "lamb":
        for group in groups:
            # Trust ratio on exactly the decayed params, also when weight_decay is 0.
            group["always_adapt"] = group["decayed"]
        # No built-in clipping (the original clips only through optim.clip_grad); L2-style decay
        # added to the Adam direction before the trust ratio, as the original.
        return _with_zero_state(
            ChunkedTrustLamb(
                groups,
                lr=optim_cfg.learning_rate,
                betas=betas,
                eps=optim_cfg.adam_eps,
                max_grad_norm=None,
                decoupled_decay=False,
                trust_clip=False,
            )
        )
    names = ", ".join(get_args(OptimizerName))
    raise ValueError(f"optim.optimizer must be one of {names}, got {optim_cfg.optimizer!r}")


def _group_step(group: dict, device: torch.device) -> torch.Tensor:
    """The group's update count as a float32 tensor on `device` (moved there once after a restore)."""
    step = group.get("step")
    if not torch.is_tensor(step) or step.device != device:
        group["step"] = torch.tensor(0.0 if step is None else float(step), device=device)
    return group["step"]


def _with_zero_state(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The zero moments and step counts that GroupStepAdamW / ChunkedTrustLamb would create in their
    first update, created now: on XLA the first update then traces the steady update's graph, and
    the step compiles once instead of twice (the trainer syncs them to the device first)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            _group_step(group, param.device)
            optimizer.state[param] = dict(exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
    return optimizer


class GroupStepAdamW(torch.optim.AdamW):
    """torch.optim.AdamW's update (decoupled weight decay, bias corrections as tensors) with one step
    count per param group, kept on the device. torch's capturable AdamW, the one that reads a device
    lr, keeps a count per param: on XLA ~5 scalar ops per param and update (~750 for ViT-S) that
    the host traces every update. The moments are formed as optax forms them (b1 m + (1 - b1) g,
    not torch's lerp) by out-of-place ops, each tensor written back by one copy_: torch_xla traces
    in-place chains (lerp_, addcmul_) more slowly. On the TPU compiler's measure torch's AdamW
    costs the DeiT-S/16 update 1.002x the bytes and 1.009x the peak memory (benchmarks/tpu_changes.py).
    For XLA devices; no amsgrad / maximize."""

    def __setstate__(self, state: dict) -> None:
        torch.optim.Optimizer.__setstate__(self, state)  # not Adam's: it expects a count per param
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"]:
                raise ValueError("GroupStepAdamW supports neither amsgrad nor maximize")
            with_grad = [param for param in group["params"] if param.grad is not None]
            if not with_grad:
                continue
            if "step" not in group:  # restored from torch's AdamW, whose equal counts are per param
                counts = [self.state[param].pop("step") for param in with_grad if "step" in self.state[param]]
                group["step"] = counts[0] if counts else None
            step = _group_step(group, with_grad[0].device)
            step.add_(1)
            beta1, beta2 = group["betas"]
            lr, eps = group["lr"], group["eps"]
            step_size = lr / (1 - beta1**step)
            bias_correction2_sqrt = (1 - beta2**step).sqrt()
            decay = 1 - lr * group["weight_decay"] if group["weight_decay"] else None
            for param in with_grad:
                state = self.state[param]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(param), torch.zeros_like(param)
                grad = param.grad
                exp_avg = state["exp_avg"] * beta1 + grad * (1 - beta1)
                exp_avg_sq = state["exp_avg_sq"] * beta2 + grad * grad * (1 - beta2)
                decayed = param * decay if decay is not None else param
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)
                param.copy_(decayed - step_size * exp_avg / (exp_avg_sq.sqrt() / bias_correction2_sqrt + eps))
        return loss


class ChunkedTrustLamb(Lamb):
    """timm's LAMB update (its functional `lamb`) with two changes of its step loop:
    - one trust ratio per 1/k of the rows of each param in a group with `trust_chunks` k > 1: the
      original keeps q, k and v as separate kernels and takes a trust ratio per kernel, where timm
      would take one for the fused attn.qkv.weight (the row blocks are views: updates land in place);
    - the step count and the bias corrections are tensors on the params' device, so an XLA step
      uploads nothing and compiles once (timm's host step count sends two new scalars every update,
      and recompiles when float32(1 - beta ** t) reaches 1.0)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        clip_grad_norm = self._get_clip_grad_norm()  # None unless max_grad_norm is set
        for group in self.param_groups:
            with_grad = [param for param in group["params"] if param.grad is not None]
            if not with_grad:
                continue
            step = _group_step(group, with_grad[0].device)
            step.add_(1)
            beta1, beta2 = group["betas"]
            if group["bias_correction"]:
                bias_correction1, bias_correction2 = 1 - beta1**step, 1 - beta2**step
            else:
                bias_correction1, bias_correction2 = 1.0, 1.0
            chunks = group.get("trust_chunks", 1)
            params, grads, exp_avgs, exp_avg_sqs = [], [], [], []
            for param in with_grad:
                state = self.state[param]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(param), torch.zeros_like(param)
                params += param.chunk(chunks)
                grads += param.grad.chunk(chunks)
                exp_avgs += state["exp_avg"].chunk(chunks)
                exp_avg_sqs += state["exp_avg_sq"].chunk(chunks)
            decoupled_decay = group.get("decoupled_decay", False)
            lamb(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                clip_grad_norm=clip_grad_norm,
                foreach=group["foreach"],
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                beta3=1 - beta1 if group["grad_averaging"] else 1.0,
                bias_correction1=bias_correction1,
                bias_correction2=bias_correction2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                decoupled_decay=decoupled_decay,
                max_lr=group["max_lr_snapshot"] if decoupled_decay and group["corrected_weight_decay"] else None,
                trust_clip=group["trust_clip"],
                always_adapt=group["always_adapt"],
                caution=group["caution"],
            )
        return loss


def lr_at(step: int | torch.Tensor, peak_lr: float, warmup_steps: int, training_steps: int) -> float | torch.Tensor:
    """The lr of optimizer update `step` (0-based): linear warmup 1e-6 -> peak over
    warmup_steps, cosine peak -> 1e-5 at training_steps, constant after.

    A Python int gives a float; a 0-dim tensor gives a float32 tensor on its device, built from
    torch ops only (no host sync, same graph for every step value).
    """
    if not 0 <= warmup_steps < training_steps:
        raise ValueError(
            f"need 0 <= schedule.warmup_steps < schedule.training_steps, got {warmup_steps} and {training_steps}"
        )
    as_float = not torch.is_tensor(step)
    steps_done = torch.tensor(float(step), dtype=torch.float64) if as_float else step.to(torch.float32)
    warmup = WARMUP_INIT_LR + (peak_lr - WARMUP_INIT_LR) * steps_done / max(warmup_steps, 1)
    progress = ((steps_done - warmup_steps) / (training_steps - warmup_steps)).clamp(0.0, 1.0)
    cosine = COSINE_END_LR + (peak_lr - COSINE_END_LR) * 0.5 * (1.0 + torch.cos(math.pi * progress))
    lr = torch.where(steps_done < warmup_steps, warmup, cosine)
    return lr.item() if as_float else lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float | torch.Tensor) -> None:
    """Put lr * group['lr_scale'] into every group; a device tensor lr stays in the step graph."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
