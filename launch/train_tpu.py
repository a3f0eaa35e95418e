"""Train KAN-ViT / DeiT on every XLA device of this host (run it on every host of a TPU pod).

    python launch/train_tpu.py --config configs/kan_s16.yaml [--set section.key=value ...]

The same as `kan-vit-train --backend xla` (kan_vit/commands.py). The whole config (keys, values,
combinations, datasets) is checked before any process starts; a problem prints one line and exits
with status 2. Rerunning the same command resumes from run.output_dir/last.pth (run.resume:
auto | never | PATH).
"""

import sys

from kan_vit.commands import train_main
from kan_vit.training.config import XLA

if __name__ == "__main__":
    sys.exit(train_main(backend_name=XLA, doc=__doc__))
