"""KAN-ViT: Vision Transformers with a Chebyshev-KAN feed-forward, for timm and PyTorch/XLA.

Importing the package registers the models with timm (`timm.list_models("kan_vit*")`) and lets
them load the original's `.msgpack` checkpoints.

Layers, each importing only those below it: `models` (torch and timm only) <- `flax` <- `training`
<- `analysis` and the commands (`commands`, `convert`); `utils` serves all.
"""

from kan_vit import flax  # noqa: F401  (lets the models read the original's .msgpack checkpoints)
from kan_vit.models import *  # noqa: F403  (the layer and the model classes, as kan_vit.ChebyKAN etc.)
from kan_vit.models import __all__ as __all__

__version__ = "0.1.0"
