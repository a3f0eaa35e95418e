"""Each change this project made to the XLA training step, undone alone, on XLA's TPU compiler's
measure: what the trainer's update (kan_vit.tpu_plan) needs with the change and without it.

    python benchmarks/tpu_changes.py [--tpu v4] [--batch 128] [--changes NAME ...] [--out rows.jsonl]

Per device, fp32, the recipes' configs (configs/deit_s16.yaml, configs/kan_s16.yaml): FLOPs, bytes
accessed, temporaries, aliased bytes and peak HBM of the step as shipped and of the step with one
change undone; a change is worth keeping on a TPU when undoing it costs bytes or memory. The undo
runs in the tracing child before the step is traced (`tpu_plan.step_graph`'s `setup`).
"""

import argparse
import importlib.metadata
import json
import os
import sys
from dataclasses import asdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import machine_info  # noqa: E402

from kan_vit import tpu_plan  # noqa: E402
from kan_vit.training.config import load  # noqa: E402

# Each XLA backend `prepare` setting undone: the model's attention modules get `attribute = value`
_PREPARED = """
from kan_vit.training.backend import XlaBackend
_prepare = XlaBackend.prepare
def _undone(self, model):
    model = _prepare(self, model)
    for module in model.modules():
        if hasattr(module, {attribute!r}):
            setattr(module, {attribute!r}, {value!r})
    return model
XlaBackend.prepare = _undone
"""

# torch's AdamW (capturable: it reads the device lr; a step count per parameter) with its zero state
# made up front, as create_optimizer makes GroupStepAdamW's, so the traced update is the steady one
_TORCH_ADAMW = """
import torch
from kan_vit.training import loop
_create = loop.create_optimizer
def _torch_adamw(model, optim_cfg):
    optimizer = torch.optim.AdamW(_create(model, optim_cfg).param_groups)
    for group in optimizer.param_groups:  # the groups carry GroupStepAdamW's settings: override them
        group.pop("step", None)
        group.update(capturable=True, foreach=False)
        for param in group["params"]:
            optimizer.state[param] = dict(
                step=torch.zeros((), device=param.device),
                exp_avg=torch.zeros_like(param),
                exp_avg_sq=torch.zeros_like(param),
            )
    return optimizer
loop.create_optimizer = _torch_adamw
"""

# name: (model, what the undone step does instead, setup code)
CHANGES = {
    "explicit_attention": (
        "deit_s16",
        "attention by F.scaled_dot_product_attention instead of q k^T, softmax, @ v",
        _PREPARED.format(attribute="fused_attn", value=True),
    ),
    "group_step_adamw": (
        "deit_s16",
        "torch's capturable AdamW (a step count per parameter, in-place moments) instead of GroupStepAdamW",
        _TORCH_ADAMW,
    ),
    "kan_angle_basis": (
        "kan_s16",
        "the KAN basis by the recurrence, stacked (k major), instead of cos(k acos t) (k minor)",
        "from kan_vit.models import chebykan\n"
        "chebykan._k_minor = lambda t: False\n"
        "chebykan._gemm_rows = lambda x, k_minor: x",
    ),
    "kan_token_axes": (
        "kan_s16",
        "the KAN GEMMs on (batch x tokens, D) matrices instead of on the (batch, tokens, D) input",
        "from kan_vit.models import chebykan\nchebykan._gemm_rows = lambda x, k_minor: x.reshape(-1, x.shape[-1])",
    ),
    "kan_recompute": (
        "kan_s16",
        "the KAN backward reads x itself instead of through the select that waits for the gradient",
        "from kan_vit.models import chebykan\nchebykan._after_gradient = lambda x, grad: x",
    ),
}

NAMES = {"deit_s16": "DeiT-S/16", "kan_s16": "KAN-ViT-S/16"}
HEADER = (
    "| model | step | GFLOP | bytes accessed (GB) | temporaries (GB) | aliased (MB) | peak (GiB) | "
    "bytes vs shipped | peak vs shipped |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"
)


def measure(model: str, batch: int, tgt, setup: str = ""):
    cfg = load(os.path.join(ROOT, "configs", f"{model}.yaml"), ["run.bf16=false"])
    try:
        return tpu_plan.compile_hlo(*tpu_plan.step_graph("train", cfg, batch, setup), tgt)
    except tpu_plan.OutOfMemory as error:
        return str(error)


def row(model: str, label: str, m, shipped) -> str:
    model = NAMES[model]
    if isinstance(m, str):
        return f"| {model} | {label} | does not fit: {m} | | | | | | |"
    ratios = (
        "| | |"
        if shipped is None or isinstance(shipped, str)
        else (f"| {m.bytes_accessed / shipped.bytes_accessed:.3f}x | {m.peak_bytes / shipped.peak_bytes:.3f}x |")
    )
    return (
        f"| {model} | {label} | {m.flops / 1e9:,.0f} | {m.bytes_accessed / 1e9:.1f} | {m.temp_bytes / 1e9:.2f} | "
        f"{m.alias_bytes / 1e6:.0f} | {m.peak_bytes / 2**30:.2f} {ratios}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tpu", default="v4", choices=list(tpu_plan.TPUS))
    parser.add_argument("--batch", type=int, default=128, help="per device")
    parser.add_argument("--changes", nargs="+", default=list(CHANGES), choices=list(CHANGES))
    parser.add_argument("--out", help="also append each row as a JSON line to this file")
    args = parser.parse_args()
    print(machine_info())
    versions = {name: importlib.metadata.version(name) for name in ("jax", "jaxlib", "libtpu", "torch", "torch_xla")}
    print(", ".join(f"{name} {version}" for name, version in versions.items()))
    print(f"{args.tpu}, {args.batch} per device, fp32")
    print(HEADER, flush=True)
    tgt = tpu_plan.target(args.tpu)
    shipped = {}
    for name in args.changes:
        model, label, setup = CHANGES[name]
        if model not in shipped:
            shipped[model] = measure(model, args.batch, tgt)
            print(row(model, "as shipped", shipped[model], None), flush=True)
        undone = measure(model, args.batch, tgt, setup)
        print(row(model, f"undone: {label}", undone, shipped[model]), flush=True)
        if args.out:
            with open(args.out, "a") as file:
                for change, m in (("as shipped", shipped[model]), (name, undone)):
                    record = {"tpu": args.tpu, "batch": args.batch, "model": model, "change": change, **versions}
                    record |= {"error": m} if isinstance(m, str) else {**asdict(m), "peak_bytes": m.peak_bytes}
                    file.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
