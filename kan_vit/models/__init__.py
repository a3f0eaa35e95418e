"""The models: the Chebyshev-KAN layer and the Vision Transformer registered with timm.
Needs only torch and timm."""

from kan_vit.models.chebykan import ChebyKAN, cheby_kan, cheby_kan_reference
from kan_vit.models.vision_transformer import ChebyKANFeedForward, KanVisionTransformer, sincos2d_position_embedding

__all__ = [
    "ChebyKAN",
    "ChebyKANFeedForward",
    "KanVisionTransformer",
    "cheby_kan",
    "cheby_kan_reference",
    "sincos2d_position_embedding",
]
