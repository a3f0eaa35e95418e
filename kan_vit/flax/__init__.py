"""The original's Flax checkpoints: the `.msgpack` format (`msgpack`) and the Flax <-> timm
mapping (`layout`). Importing it lets `kan_vit.models.pretrained` read `.msgpack` files."""

from kan_vit.flax import layout, msgpack
from kan_vit.models import pretrained


def _read_msgpack(path) -> dict:
    state_dict, _, _ = layout.flax_to_timm(msgpack.load(path))  # weights do not depend on image size
    return state_dict


pretrained.register_format(".msgpack", _read_msgpack)
