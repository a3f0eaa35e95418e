"""The model a config describes: its timm name and arguments from model.*, the seeded init, the
fine-tuning start (model.pretrained_ckpt) and gradient checkpointing."""

from __future__ import annotations

import dataclasses

import timm
import torch

from kan_vit.models.pretrained import load_pretrained, load_weights
from kan_vit.training.config import Config
from kan_vit.training.seeding import seeded_host_rngs


def build_model(cfg: Config) -> torch.nn.Module:
    """The configured model on the host; parameters from model.init_seed, identical on all replicas."""
    model_cfg = cfg.model
    with seeded_host_rngs(model_cfg.init_seed):
        model = timm.create_model(
            "kan_vit_base_patch16_224" if model_cfg.use_kan else "deit_jax_base_patch16_224",
            num_classes=model_cfg.labels,
            img_size=model_cfg.image_size,
            patch_size=model_cfg.patch_size,
            embed_dim=model_cfg.dim,
            depth=model_cfg.layers,
            num_heads=model_cfg.heads,
            use_kan=model_cfg.use_kan,
            polynomial_degree=model_cfg.kan_degrees or model_cfg.polynomial_degree,
            kan_input_scale=model_cfg.kan_input_scale,
            kan_base_branch=model_cfg.kan_base_branch,
            kan_init=model_cfg.kan_init,
            mlp_ratio=model_cfg.mlp_ratio,
            posemb=model_cfg.posemb,
            pooling=model_cfg.pooling,
            layerscale=model_cfg.layerscale,
            dropout=model_cfg.dropout,
            drop_path_rate=model_cfg.droppath,
            drop_path_schedule="constant",  # the original's: one rate in every block
        )
    if model_cfg.pretrained_ckpt:
        load_pretrained(model, model_cfg)
    if model_cfg.grad_ckpt:
        model.set_grad_checkpointing(True)
    return model


def build_model_with_weights(cfg: Config, path: str, *, new_head: bool = True) -> torch.nn.Module:
    """The configured model with the weights of checkpoint `path` instead of model.pretrained_ckpt's
    (evaluation and inspection); `new_head=False` refuses a head that does not fit model.labels."""
    model = build_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained_ckpt=None)))
    load_weights(model, path, new_head=new_head)
    return model
