"""ChebyKAN under torch_xla: graph size and compile time of one block, bf16 autocast error.

    PJRT_DEVICE=CPU python benchmarks/kan_xla.py [--tokens 197] [--dim 384] [--degree 8]

Graph: forward + backward of (a) the ChebyKAN layer alone and (b) one KAN-ViT-S block, as one
lazy graph; op count = HLO instructions in its text, compile time from torch_xla's metrics.
bf16: forward under autocast('xla') and autocast('cpu'), relative L2 error of the output and
of the input gradient against the float32 result (the basis is computed in float32 either way).
"""

import argparse
import os
from functools import partial

os.environ.setdefault("PJRT_DEVICE", "CPU")

import torch  # noqa: E402
import torch_xla  # noqa: E402
import torch_xla.debug.metrics as met  # noqa: E402
from common import machine_info  # noqa: E402
from timm.models.vision_transformer import Block  # noqa: E402

from kan_vit.models.chebykan import ChebyKAN  # noqa: E402
from kan_vit.models.vision_transformer import ChebyKANFeedForward  # noqa: E402


def graph_stats(module, x):
    """(HLO instruction count, compile seconds) of forward + backward of `module` on `x`."""
    out = module(x)
    out.float().square().sum().backward()
    tensors = [x.grad] + [p.grad for p in module.parameters()]
    hlo = torch_xla._XLAC._get_xla_tensors_hlo(tensors)
    ops = sum(1 for line in hlo.splitlines() if " = " in line and not line.lstrip().startswith("ROOT ="))
    met.clear_metrics()
    torch_xla.sync()
    _, total_ns, _ = met.metric_data("CompileTime") or (0, 0, None)
    return ops, total_ns / 1e9


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def bf16_errors(layer, x, device_type):
    """Relative error of y and dL/dx under bf16 autocast vs float32, on `device_type`."""
    results = []
    for autocast in (False, True):
        xi = x.detach().clone().requires_grad_()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            y = layer(xi)
        y.float().square().sum().backward()
        results.append((y.float().cpu(), xi.grad.cpu()))
    (y32, g32), (y16, g16) = results
    return rel_err(y16, y32), rel_err(g16, g32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--degree", type=int, default=8)
    args = parser.parse_args()
    dev = torch_xla.device()
    d = args.dim
    torch.manual_seed(0)
    layer = ChebyKAN(d, d, args.degree)
    block = Block(d, num_heads=6, mlp_layer=partial(ChebyKANFeedForward, degree=args.degree))
    x = torch.randn(1, args.tokens, d)

    print(machine_info(), f"torch_xla {torch_xla.__version__}, PJRT_DEVICE={os.environ['PJRT_DEVICE']}")
    print(f"{args.tokens} tokens x D={d}, degree {args.degree}\n")
    print("| graph (forward + backward) | HLO instructions | compile s |")
    print("|---|---:|---:|")
    reference = ChebyKAN(d, d, args.degree, memory_efficient=False)
    for name, module in [
        ("ChebyKAN layer", layer),
        ("ChebyKAN reference (einsum)", reference),
        ("KAN-ViT-S block", block),
    ]:
        ops, secs = graph_stats(module.to(dev), x.to(dev).requires_grad_())
        print(f"| {name} | {ops} | {secs:.2f} |")

    print("\n| bf16 autocast vs float32 | rel. error y | rel. error dL/dx |")
    print("|---|---:|---:|")
    for device_type, device in [("xla", dev), ("cpu", torch.device("cpu"))]:
        ey, eg = bf16_errors(layer.to(device), x.to(device), device_type)
        print(f"| autocast('{device_type}') | {ey:.2e} | {eg:.2e} |")


if __name__ == "__main__":
    main()
