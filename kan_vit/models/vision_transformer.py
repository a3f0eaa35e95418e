"""KAN-ViT: the original JAX/Flax ViT (DeiT recipes) with a Chebyshev-KAN feed-forward, on timm.

Built on timm's `VisionTransformer`; the options below express the original's semantics:
  * position embedding on patch tokens only, class token prepended after (`no_embed_class`)
  * `posemb='sincos2d'`: fixed 2-D sin-cos table, recomputed in the input's dtype (not stored)
  * `pooling='gap'`: no class token, final norm over all tokens, then the mean (no fc_norm)
  * LayerNorm eps 1e-6, tanh-approximated GELU, LayerScale init 1e-4
  * kernels and embeddings ~ normal(0.02) truncated at +-2 std, biases zero
  * feed-forward: `ChebyKAN` (D -> D, no bias, no dropout) or the DeiT MLP

Ablation switches, all off by default (then neither parameters nor outputs change): per-block
KAN degrees, a learned input scale before tanh, and the KAN paper's residual base branch.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Literal, get_args

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerScale, Mlp, register_notrace_module, resample_abs_pos_embed, trunc_normal_tf_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn import functional as F

from kan_vit.models.chebykan import ChebyKAN, KanInit
from kan_vit.models.pretrained import checkpoint_filter_fn, load_weights

__all__ = ["KanVisionTransformer", "ChebyKANFeedForward", "sincos2d_position_embedding"]

# Option values, declared once (the config schema uses these types)
Posemb = Literal["learnable", "sincos2d"]
Pooling = Literal["cls", "gap"]
DropPathSchedule = Literal["linear", "constant"]
LAYERSCALE_INIT = 1e-4
LAYERNORM_EPS = 1e-6
INIT_STD = 0.02

# timm options that KanVisionTransformer derives from the original's options.
_DERIVED_TIMM_ARGS = {
    "class_token": "pooling",
    "global_pool": "pooling",
    "fc_norm": "pooling",
    "no_embed_class": "posemb",
    "pos_embed": "posemb",
    "init_values": "layerscale",
    "mlp_layer": "use_kan",
    "attn_layer": None,
    "act_layer": None,
    "norm_layer": None,
    "pos_drop_rate": "dropout",
    "proj_drop_rate": "dropout",
    "attn_drop_rate": "dropout",
}


def sincos2d_position_embedding(
    grid_h: int, grid_w: int, dim: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> torch.Tensor:
    """The original's fixed table, (grid_h * grid_w, dim), rows in row-major patch order.

    Token (h, w) gets concat[sin(w f), cos(w f), sin(h f), cos(h f)],
    f = 1 / 10000 ** linspace(0, 1, dim / 4) (endpoint included).
    """
    if dim % 4:
        raise ValueError(f"posemb='sincos2d' needs dim divisible by 4, got {dim}")
    freqs = 1.0 / 10000 ** torch.linspace(0, 1, dim // 4, dtype=torch.float64, device=device)
    h, w = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64, device=device),
        torch.arange(grid_w, dtype=torch.float64, device=device),
        indexing="ij",
    )
    wf = w.reshape(-1, 1) * freqs
    hf = h.reshape(-1, 1) * freqs
    return torch.cat([wf.sin(), wf.cos(), hf.sin(), hf.cos()], dim=1).to(dtype)


# A leaf for timm's fx feature extraction: its shape check and autograd Function do not trace.
register_notrace_module(ChebyKAN)


class ChebyKANFeedForward(nn.Module):
    """The original's KAN feed-forward as a timm `mlp_layer`: one ChebyKAN D -> D.

    timm passes MLP options (hidden_features, act_layer, drop, bias, norm_layer, ...); the
    original's KAN branch has no hidden expansion, activation, bias or dropout, so they are unused.
    `base_branch=True` adds the KAN paper's residual term: y = KAN(x) + W_b SiLU(x), W_b a Linear
    without bias (an ablation; the original has none).
    """

    def __init__(
        self,
        in_features: int,
        degree: int = 8,
        input_scale: bool = False,
        base_branch: bool = False,
        init: KanInit = "original",
        device=None,
        dtype=None,
        **mlp_kwargs,
    ):
        super().__init__()
        self.kan = ChebyKAN(
            in_features, in_features, degree, input_scale=input_scale, init=init, device=device, dtype=dtype
        )
        self.base = nn.Linear(in_features, in_features, bias=False, device=device, dtype=dtype) if base_branch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kan(x)
        if self.base is not None:
            y = y + self.base(F.silu(x))
        return y


def _per_block_feed_forward(degrees: list, depth: int, kan_options: dict):
    """A timm `mlp_layer` giving the i-th block it builds (timm builds them in order) degree i."""
    if len(degrees) != depth:
        raise ValueError(f"polynomial_degree lists {len(degrees)} degrees for {depth} blocks: give one per block")
    remaining = iter(degrees)
    return lambda in_features, **kwargs: ChebyKANFeedForward(
        in_features, degree=next(remaining), **kan_options, **kwargs
    )


def _checkpoint_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "xla":
        # torch_xla's checkpoint adds an optimization barrier; without it XLA's CSE undoes remat.
        from torch_xla.utils.checkpoint import checkpoint as xla_checkpoint

        return xla_checkpoint(block, x, use_reentrant=True)  # XLA supports only reentrant
    return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)


class KanVisionTransformer(VisionTransformer):
    """ViT with the original's semantics; `use_kan` selects the Chebyshev-KAN feed-forward.

    Args (the original's flags; everything else is timm's `VisionTransformer`):
        use_kan: ChebyKAN feed-forward instead of the MLP.
        polynomial_degree: Chebyshev degree K >= 1 of the KAN layers, or one degree per block.
        kan_input_scale: learned per-channel scale before each KAN layer's tanh (ablation).
        kan_base_branch: residual base branch W_b SiLU(x) beside each KAN layer (ablation).
        kan_init: the KAN coefficients' init, 'original' or 'variance_preserving' (`ChebyKAN`).
        posemb: 'learnable' (trained, patch tokens only) or 'sincos2d' (fixed).
        pooling: 'cls' (class token) or 'gap' (mean over all tokens, no class token).
        layerscale: learned per-channel residual scales, init 1e-4.
        dropout: embedding, attention-probability and projection dropout rate.
        drop_path_schedule: how `drop_path_rate` spreads over the blocks: 'linear' (timm's rule,
            0 in the first block up to the rate in the last) or 'constant' (the rate in every
            block, as the original; the trainer uses it).
    """

    def __init__(
        self,
        use_kan: bool = True,
        polynomial_degree: int | Sequence[int] = 8,
        kan_input_scale: bool = False,
        kan_base_branch: bool = False,
        kan_init: KanInit = "original",
        posemb: str = "learnable",
        pooling: str = "cls",
        layerscale: bool = False,
        dropout: float = 0.0,
        drop_path_schedule: str = "linear",
        **kwargs,
    ):
        if posemb not in get_args(Posemb):
            raise ValueError(f"posemb must be one of {get_args(Posemb)}, got {posemb!r}")
        if pooling not in get_args(Pooling):
            raise ValueError(f"pooling must be one of {get_args(Pooling)}, got {pooling!r}")
        if drop_path_schedule not in get_args(DropPathSchedule):
            raise ValueError(
                f"drop_path_schedule must be one of {get_args(DropPathSchedule)}, got {drop_path_schedule!r}"
            )
        global_pool = "token" if pooling == "cls" else "avg"
        if kwargs.get("global_pool") == global_pool:  # timm's exported config.json records it
            del kwargs["global_pool"]
        for key in _DERIVED_TIMM_ARGS.keys() & kwargs.keys():
            hint = f"; set {_DERIVED_TIMM_ARGS[key]}= instead" if _DERIVED_TIMM_ARGS[key] else ""
            raise ValueError(f"KanVisionTransformer fixes timm's {key!r} to the original's{hint}")
        self.use_kan = use_kan
        self.polynomial_degree = polynomial_degree
        self.posemb = posemb
        self.pooling = pooling
        if use_kan:
            kan_options = dict(input_scale=kan_input_scale, base_branch=kan_base_branch, init=kan_init)
            if isinstance(polynomial_degree, int):
                mlp_layer = partial(ChebyKANFeedForward, degree=polynomial_degree, **kan_options)
            else:
                mlp_layer = _per_block_feed_forward(list(polynomial_degree), kwargs.get("depth", 12), kan_options)
        else:
            mlp_layer = Mlp
        super().__init__(
            class_token=pooling == "cls",
            global_pool=global_pool,
            fc_norm=False,
            no_embed_class=True,
            pos_embed="learn" if posemb == "learnable" else "none",
            init_values=LAYERSCALE_INIT if layerscale else None,
            pos_drop_rate=dropout,
            proj_drop_rate=dropout,
            attn_drop_rate=dropout,
            mlp_layer=mlp_layer,
            act_layer="gelu_tanh",
            norm_layer=partial(nn.LayerNorm, eps=LAYERNORM_EPS),
            **kwargs,
        )
        rate = kwargs.get("drop_path_rate", 0.0)
        if drop_path_schedule == "constant" and rate > 0:  # timm built its linear ramp: replace it
            for block in self.blocks:
                block.drop_path1, block.drop_path2 = DropPath(rate), DropPath(rate)

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        """The original's init (timm's default does not truncate at +-2 std nor init the conv)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                trunc_normal_tf_(module.weight, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, ChebyKAN, LayerScale)):
                module.reset_parameters()
        for param in (self.pos_embed, self.cls_token):
            if param is not None:
                trunc_normal_tf_(param, std=INIT_STD)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """What the original does not decay beyond timm's ndim <= 1 rule (biases, norms, LayerScale):
        it decays only Dense/Conv kernels, so not the embeddings nor the KAN coefficients."""
        coefficients = {name for name, _ in self.named_parameters() if name.endswith(".kan.coefficients")}
        return {"pos_embed", "cls_token"} | coefficients

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """The original's layer ids for layer-wise lr decay: embedding 0, block k -> k + 1, and the
        final norm and head (timm's MATCH_PREV_GROUP, 99999) with the last block, id L."""
        return dict(
            stem=r"^cls_token|^pos_embed|^patch_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^(?:norm|head)\.", (99999,))],
        )

    def load_pretrained(self, checkpoint_path: str) -> None:
        """timm calls this instead of its state-dict loader when the pretrained cfg sets
        `custom_load` (the original's `.msgpack` weights): any file `kan_vit.models.pretrained` reads,
        converted, with the position embedding and head adapted as `checkpoint_filter_fn` does."""
        load_weights(self, checkpoint_path)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """timm's `no_embed_class` path: position embedding on the patch tokens, class (and
        register) tokens prepended, then dropout; the sincos table is computed for the grid.
        Written out rather than through super(), which TorchScript does not support."""
        if self.dynamic_img_size:  # NHWC patch grid
            grid_h, grid_w = x.shape[1], x.shape[2]
            x = x.flatten(1, 2)
        else:
            grid_h, grid_w = self.patch_embed.grid_size
        if self.pos_embed is None:
            pos_embed = sincos2d_position_embedding(grid_h, grid_w, x.shape[-1], x.dtype, x.device)
        elif self.dynamic_img_size:
            pos_embed = resample_abs_pos_embed(
                self.pos_embed,
                new_size=(grid_h, grid_w),
                old_size=self.patch_embed.grid_size,
                num_prefix_tokens=0,
            )
        else:
            pos_embed = self.pos_embed
        x = x + pos_embed
        prefix: list[torch.Tensor] = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        if prefix:
            x = torch.cat(prefix + [x], dim=1)
        return self.pos_drop(x)

    def forward_features(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """timm's, with grad checkpointing per block by `_checkpoint_block` (torch_xla's on XLA)."""
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        checkpointed = self.grad_checkpointing and attn_mask is None and not is_causal
        for block in self.blocks:
            if checkpointed and not torch.jit.is_scripting():
                x = _checkpoint_block(block, x)
            else:
                x = block(x, attn_mask=attn_mask, is_causal=is_causal)
        return self.norm(x)


def _create_kan_vit(variant: str, pretrained: bool = False, **kwargs) -> KanVisionTransformer:
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if pretrained and "num_classes" not in overlay:
        # timm silently drops a head whose size differs from the cfg's 1000 classes;
        # checkpoint_filter_fn decides by the head's actual shape instead.
        kwargs["pretrained_cfg_overlay"] = dict(overlay, num_classes=kwargs.get("num_classes", 1000))
    return build_model_with_cfg(
        KanVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


# The original's published ImageNet-1k weights (the deit3-jax README's "ckpt" links): Flax
# `.msgpack` files, which timm downloads through its hub machinery and hands to
# `KanVisionTransformer.load_pretrained` (custom_load="hf") to convert.
DEIT3_JAX_HUB_ID = "affjljoo3581/deit3-jax"


def _deit3_jax_cfg(size: str) -> dict:
    return _cfg(
        hf_hub_id=DEIT3_JAX_HUB_ID, hf_hub_filename=f"deit-{size}16-224-in1k-300ep-best.msgpack", custom_load="hf"
    )


default_cfgs = generate_default_cfgs(
    {
        "kan_vit_tiny_patch16_224": _cfg(),
        "kan_vit_small_patch16_224": _cfg(),
        "kan_vit_base_patch16_224": _cfg(),
        "deit_jax_tiny_patch16_224.in1k": _deit3_jax_cfg("t"),
        "deit_jax_small_patch16_224.in1k": _deit3_jax_cfg("s"),
        "deit_jax_base_patch16_224.in1k": _deit3_jax_cfg("b"),
    }
)


@register_model
def kan_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> KanVisionTransformer:
    """KAN-ViT-Ti/16: Chebyshev-KAN feed-forward (degree 8), the original's kan T/16 recipe."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, use_kan=True)
    return _create_kan_vit("kan_vit_tiny_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def kan_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> KanVisionTransformer:
    """KAN-ViT-S/16: Chebyshev-KAN feed-forward (degree 8), the original's kan S/16 recipe."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, use_kan=True)
    return _create_kan_vit("kan_vit_small_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def kan_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> KanVisionTransformer:
    """KAN-ViT-B/16: Chebyshev-KAN feed-forward (degree 8), the original's kan B/16 recipe."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, use_kan=True)
    return _create_kan_vit("kan_vit_base_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_jax_tiny_patch16_224(pretrained: bool = False, **kwargs) -> KanVisionTransformer:
    """The original's DeiT-Ti/16 (MLP feed-forward with tanh-GELU, no class-token posemb)."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, use_kan=False)
    return _create_kan_vit("deit_jax_tiny_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_jax_small_patch16_224(pretrained: bool = False, **kwargs) -> KanVisionTransformer:
    """The original's DeiT-S/16 (MLP feed-forward with tanh-GELU, no class-token posemb)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, use_kan=False)
    return _create_kan_vit("deit_jax_small_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_jax_base_patch16_224(pretrained: bool = False, **kwargs) -> KanVisionTransformer:
    """The original's DeiT-B/16 (MLP feed-forward with tanh-GELU, no class-token posemb)."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, use_kan=False)
    return _create_kan_vit("deit_jax_base_patch16_224", pretrained, **dict(model_args, **kwargs))
