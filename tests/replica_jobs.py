"""Jobs that run inside real replicas: XLA ones (xmp.spawn through `XlaBackend.spawn`) or
accelerate processes (started by torchrun).

    PJRT_DEVICE=CPU CPU_NUM_DEVICES=N python tests/replica_jobs.py JOB CONFIG_JSON DATA_PT OUT_DIR
    torchrun --standalone --nproc_per_node=N tests/replica_jobs.py JOB CONFIG_JSON DATA_PT OUT_DIR accelerate

Every replica writes what it saw to OUT_DIR/{name}_{rank}.pt; tests/test_backend.py compares
those files with one replica's results. Nothing here averages or reduces in Python: the
trainer's collectives do.
"""

import hashlib
import json
import sys

import torch

from kan_vit.training import backend, loop
from kan_vit.training.config import ACCELERATE, from_dict
from kan_vit.training.data import create_train_loader
from kan_vit.training.metrics_log import RunLogger


def _shard(tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    size = len(tensor) // world_size
    return tensor[rank * size : (rank + 1) * size]


def updates(rank: int, cfgs: dict, data_path: str, out: str) -> None:
    """`exact`: one update of this replica's share of the batch, then evaluation of this replica's
    (uneven) share of the validation images. `noisy`: several updates with dropout and drop-path."""
    device, world_size = backend.current().device, backend.current().world_size
    data = torch.load(data_path)
    cfg = from_dict(cfgs["exact"])
    state = loop.build_state(cfg, device)
    logger = RunLogger(cfg, master=rank == 0, start_step=0)
    skipped = torch.tensor([rank + 1])  # each replica reports its own skip count
    micro = [
        (
            _shard(data["images"], rank, world_size).to(device),
            _shard(data["targets"], rank, world_size).to(device),
            skipped.to(device),
        )
    ]
    loop.train_step(state, micro, cfg, logger)
    logger.close()
    valid = data["valid_parts"][rank]  # replicas hold different numbers of real images
    metrics = loop.evaluate(
        state.model, [(valid["images"].to(device), valid["labels"].to(device), torch.tensor([0]).to(device))], cfg
    )
    exact = {k: v.cpu() for k, v in state.model.state_dict().items()}

    cfg = from_dict(cfgs["noisy"])
    state = loop.build_state(cfg, device)
    loop.seed_replica(cfg, rank)  # each replica its own dropout / drop-path masks
    micro = [
        (
            _shard(data["images"], rank, world_size).to(device),
            _shard(data["targets"], rank, world_size).to(device),
            torch.tensor([0]).to(device),
        )
    ]
    for _ in range(4):
        loop.train_step(state, micro, cfg)
    noisy = {k: v.cpu() for k, v in state.model.state_dict().items()}
    torch.save(
        {"world_size": world_size, "exact": exact, "metrics": metrics, "noisy": noisy}, f"{out}/updates_{rank}.pt"
    )


def batches(rank: int, cfgs: dict, data_path: str, out: str) -> None:
    """The first two training batches this replica's loader gives, as image hashes and labels."""
    cfg = from_dict(cfgs["data"])
    loader = iter(create_train_loader(cfg, world_size=backend.current().world_size, rank=rank))
    seen = []
    for _ in range(2):
        images, targets, _ = next(loader)
        for image, target in zip(images, targets):
            # copies are flipped at random: hash the image in a flip-independent form
            pair = sorted(hashlib.sha1(x.contiguous().numpy().tobytes()).hexdigest() for x in (image, image.flip(-1)))
            seen.append((pair[0], int(target.argmax())))
    torch.save({"world_size": backend.current().world_size, "seen": seen}, f"{out}/batches_{rank}.pt")


if __name__ == "__main__":
    job, cfgs, data_path, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
    fn = {"updates": updates, "batches": batches}[job]
    if sys.argv[5:] == [ACCELERATE]:
        backend.use(backend.AccelerateBackend())
    backend.current().spawn(fn, (cfgs, data_path, out))
    # a process group left to the interpreter's exit can abort a finished job (gloo, SIGABRT)
    assert not torch.distributed.is_initialized(), "spawn returned with the process group alive"
