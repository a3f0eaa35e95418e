"""The model a config describes: its timm name and arguments from model.*, the seeded init, the
fine-tuning start (model.pretrained_ckpt) and gradient checkpointing."""
from __future__ import annotations

import dataclasses

import timm
import torch

from .config import Config
from .pretrained import load_pretrained, load_weights
from .seeding import seeded_host_rngs


def build_model(cfg: Config) -> torch.nn.Module:
    """The configured model on the host; parameters from model.init_seed, identical on all replicas."""
    m = cfg.model
    with seeded_host_rngs(m.init_seed):
        model = timm.create_model(
            "kan_vit_base_patch16_224" if m.use_kan else "deit_jax_base_patch16_224",
            num_classes=m.labels, img_size=m.image_size, patch_size=m.patch_size, embed_dim=m.dim,
            depth=m.layers, num_heads=m.heads, use_kan=m.use_kan, polynomial_degree=m.kan_degrees or m.polynomial_degree,
            kan_input_scale=m.kan_input_scale, kan_base_branch=m.kan_base_branch, mlp_ratio=m.mlp_ratio,
            posemb=m.posemb, pooling=m.pooling, layerscale=m.layerscale, dropout=m.dropout,
            drop_path_rate=m.droppath, drop_path_schedule="constant",  # the original's: one rate in every block
        )
    if m.pretrained_ckpt:
        load_pretrained(model, m)
    if m.grad_ckpt:
        model.set_grad_checkpointing(True)
    return model


def build_model_with_weights(cfg: Config, path: str, *, new_head: bool = True) -> torch.nn.Module:
    """The configured model with the weights of checkpoint `path` instead of model.pretrained_ckpt's
    (evaluation and inspection); `new_head=False` refuses a head that does not fit model.labels."""
    model = build_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained_ckpt=None)))
    load_weights(model, path, new_head=new_head)
    return model
