"""KAN-ViT: Vision Transformers with a Chebyshev-KAN feed-forward, for timm and PyTorch/XLA.

Importing the package registers the models with timm (`timm.list_models("kan_vit*")`).
"""

from .chebykan import ChebyKAN, cheby_kan, cheby_kan_reference
from .vision_transformer import ChebyKANFeedForward, KanVisionTransformer, sincos2d_position_embedding

__version__ = "0.1.0"

__all__ = [
    "ChebyKAN",
    "ChebyKANFeedForward",
    "KanVisionTransformer",
    "cheby_kan",
    "cheby_kan_reference",
    "sincos2d_position_embedding",
]
