"""KAN-ViT: Vision Transformers with a Chebyshev-KAN feed-forward, for timm and PyTorch/XLA.

Importing the package registers the models with timm (`timm.list_models("kan_vit*")`) and lets
them load the original's `.msgpack` checkpoints.

Layers, each importing only those below it: `models` (torch and timm only) <- `flax` <- `training`
<- `analysis` and the commands (`commands`, `convert`); `utils` serves all.
"""

from kan_vit import flax  # noqa: F401  (lets the models read the original's .msgpack checkpoints)
from kan_vit.models import (
    ChebyKAN,
    ChebyKANFeedForward,
    KanVisionTransformer,
    cheby_kan,
    cheby_kan_reference,
    sincos2d_position_embedding,
)

__version__ = "0.1.0"

__all__ = [
    "ChebyKAN",
    "ChebyKANFeedForward",
    "KanVisionTransformer",
    "cheby_kan",
    "cheby_kan_reference",
    "sincos2d_position_embedding",
]
