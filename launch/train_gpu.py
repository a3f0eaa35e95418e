"""Train KAN-ViT / DeiT on GPUs through accelerate (DDP), one process per GPU, on one or many machines.

    accelerate config                                    # once: which GPUs / machines
    accelerate launch launch/train_gpu.py --config configs/kan_s16.yaml [--set section.key=value ...]
    torchrun --standalone --nproc_per_node=2 launch/train_gpu.py --config configs/demo_digits.yaml

The last runs two CPU processes that talk over gloo (the CI test of this path). The same as
`kan-vit-train --backend accelerate` (kan_vit/commands.py): the trainer, the config and the
checkpoints are those of launch/train_tpu.py; run.bf16 is autocast on the GPU (on
CPU processes, CPU autocast), run.compile torch.compiles the model. The config is checked in
every process before training; a problem prints one line and exits with status 2. Rerunning the
same command resumes from run.output_dir/last.pth (run.resume: auto | never | PATH).
"""

import sys

from kan_vit.commands import train_main
from kan_vit.training.config import ACCELERATE

if __name__ == "__main__":
    sys.exit(train_main(backend_name=ACCELERATE, doc=__doc__))
