"""Evaluate a checkpoint on a config's validation data, on every XLA device of this host or, through
accelerate, on every process of an `accelerate launch` / torchrun job (or one GPU / CPU process).

    python launch/evaluate.py --config configs/kan_s16.yaml --checkpoint runs/kan-s16/best.pth
    accelerate launch launch/evaluate.py --config configs/kan_s16.yaml --checkpoint runs/kan-s16/best.pth

--backend auto (the default) picks accelerate when started by accelerate launch / torchrun or when
torch_xla is not installed, else XLA. The checkpoint may be a trainer checkpoint from either backend
(last.pth / best.pth), a .safetensors / .pth state dict, or an original `.msgpack`; a learnable
position embedding is resized to model.image_size. Prints val/acc1, val/acc5, val/loss and the
exact number of images evaluated. The same as `kan-vit-eval` (kan_vit/commands.py).
"""

import sys

from kan_vit.commands import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
