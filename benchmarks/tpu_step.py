"""The training update on one TPU device, as XLA's TPU compiler sees it: this project's (the trainer's
`train_step`, through `kan_vit.tpu_plan`) beside the original JAX/Flax `training_step`, for the six
recipes, on TPU topologies compiled for without a TPU (libtpu's deviceless compilation).

    python benchmarks/tpu_step.py --original PATH [--tpu v3 v4 v5e] [--batch 32 128]
        [--models kan_s16 deit_s16 ...] [--code ours original] [--out rows.jsonl]

Per device: FLOPs, bytes accessed, temporaries and peak HBM (arguments + outputs - aliased +
temporaries), the aliased (donated) bytes, and the FLOPs over a closed-form count of the update's
GEMMs (`update_gemm_flops`), which must lie within 2%. fp32 (the recipes' precision). The original
(`--original`: the `src` folder of a KAN-ViT checkout; needs flax, optax and chex) runs its pmapped
`training_step` body in `jax.shard_map` over one device of the topology, state donated as its
`pmap(donate_argnums=0)` donates it, with mixup and label smoothing drawn on the device as it
draws them. A graph the compiler cannot fit is reported as such (RESOURCE_EXHAUSTED).
"""

import argparse
import contextlib
import importlib.metadata
import io
import json
import os
import sys
from dataclasses import asdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import machine_info  # noqa: E402

from kan_vit import tpu_plan  # noqa: E402
from kan_vit.training.config import load  # noqa: E402

MODELS = {
    "kan_t16": "KAN-ViT-T/16",
    "kan_s16": "KAN-ViT-S/16",
    "kan_b16": "KAN-ViT-B/16",
    "deit_t16": "DeiT-T/16",
    "deit_s16": "DeiT-S/16",
    "deit_b16": "DeiT-B/16",
}


def update_gemm_flops(model, batch: int, original: bool) -> int:
    """FLOPs of the GEMMs of one update (forward, input and weight gradients) for `batch` images.

    Per image, forward: patch embedding 2 N (3 p^2) D (N patches); per block qkv 2 T D 3D, scores
    and weighted values 2 * 2 T^2 D (T tokens), projection 2 T D^2, feed-forward 2 * 2 T D 4D (MLP)
    or 2 T (K D) D (ChebyKAN of degree K: this project folds T_0 = 1 into a constant, the original
    contracts all K + 1 basis blocks); head 2 D C. The update runs each GEMM 3 times (forward,
    input gradient, weight gradient), except the patch embedding's twice (no image gradient)."""
    d, patches = model.dim, (model.image_size // model.patch_size) ** 2
    tokens = patches + (model.pooling == "cls")
    if model.use_kan:
        ffn = 2 * tokens * (model.polynomial_degree + original) * d * d
    else:
        ffn = 2 * 2 * tokens * d * 4 * d
    block = 2 * tokens * d * 3 * d + 2 * 2 * tokens * tokens * d + 2 * tokens * d * d + ffn
    patch_embed = 2 * patches * 3 * model.patch_size**2 * d
    return batch * (3 * (model.layers * block + 2 * d * model.labels) + 2 * patch_embed)


def recipe(name: str):
    return load(os.path.join(ROOT, "configs", f"{name}.yaml"), ["run.bf16=false"])


def ours(cfg, batch: int, tgt) -> tpu_plan.Measure:
    return tpu_plan.plan_step("train", cfg, batch, tgt)


def original(cfg, batch: int, tgt, source: str) -> tpu_plan.Measure:
    """The original's training_step body for one device, compiled for the topology's first device."""
    if source not in sys.path:
        sys.path.insert(0, source)
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    if not hasattr(jax, "tree_map"):  # the original calls jax.tree_map, which JAX 0.6 removed
        jax.tree_map = jax.tree_util.tree_map
    import training  # the original's module

    sections = (cfg.data, cfg.augment, cfg.model, cfg.optim, cfg.schedule)
    args = argparse.Namespace(**{key: value for section in sections for key, value in asdict(section).items()})
    with jax.default_device(jax.devices("cpu")[0]), contextlib.redirect_stdout(io.StringIO()):  # its model table
        state = training.create_train_state(args)
    mesh = Mesh([tgt.device], ("batch",))
    replicated = NamedSharding(mesh, P())
    # every leaf an array, as pmap makes them (the state's Python ints too)
    spec = lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.asarray(x).dtype, sharding=replicated)  # noqa: E731
    size = cfg.model.image_size
    images = jax.ShapeDtypeStruct((batch, 3, size, size), jnp.uint8, sharding=replicated)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=replicated)
    step = jax.jit(
        jax.shard_map(training.training_step.__wrapped__, mesh=mesh, in_specs=(P(), P()), out_specs=(P(), P())),
        donate_argnums=0,
    )
    return tpu_plan.measure_within_hbm(
        lambda: step.lower(jax.tree_util.tree_map(spec, state), (images, labels)).compile(), tgt
    )


HEADER = (
    "| TPU | model | code | batch / device | GFLOP | GEMM closed form | bytes accessed (GB) | "
    "temporaries (GB) | aliased (MB) | peak (GiB) | roofline (ms) |\n"
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def row(tpu: str, model: str, code: str, batch: int, m, closed_form: int, tgt) -> str:
    head = f"| {tpu} | {MODELS[model]} | {code} | {batch} |"
    if isinstance(m, str):
        return f"{head} does not fit: {m} | | | | | | |"
    bound, by = tpu_plan.roofline(m, tgt)
    return (
        f"{head} {m.flops / 1e9:,.0f} | {m.flops / closed_form:.3f}x | {m.bytes_accessed / 1e9:.1f} | "
        f"{m.temp_bytes / 1e9:.2f} | {m.alias_bytes / 1e6:.0f} | {m.peak_bytes / 2**30:.2f} | "
        f"{bound * 1e3:.1f} ({'FLOPs' if by == 'compute' else 'HBM'}) |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", help="the original's src folder (needed for --code original)")
    parser.add_argument("--tpu", nargs="+", default=["v3", "v4", "v5e"], choices=list(tpu_plan.TPUS))
    parser.add_argument("--batch", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--code", nargs="+", default=["ours", "original"], choices=["ours", "original"])
    parser.add_argument("--out", help="also append each row as a JSON line to this file")
    args = parser.parse_args()
    if "original" in args.code and not args.original:
        parser.error("--code original needs --original PATH")
    print(machine_info())
    versions = {name: importlib.metadata.version(name) for name in ("jax", "jaxlib", "libtpu", "torch", "torch_xla")}
    print(", ".join(f"{name} {version}" for name, version in versions.items()))
    print(HEADER, flush=True)
    failures = []
    for tpu in args.tpu:
        tgt = tpu_plan.target(tpu)
        for model in args.models:
            cfg = recipe(model)
            for batch in args.batch:
                for code in args.code:
                    closed = update_gemm_flops(cfg.model, batch, original=code == "original")
                    try:
                        m = ours(cfg, batch, tgt) if code == "ours" else original(cfg, batch, tgt, args.original)
                    except tpu_plan.OutOfMemory as error:
                        m = str(error)
                    print(row(tpu, model, code, batch, m, closed, tgt), flush=True)
                    if not isinstance(m, str) and abs(m.flops / closed - 1) > 0.02:
                        failures.append(f"{tpu} {model} {code} {batch}: {m.flops / closed:.3f}x the closed form")
                    if args.out:
                        record = {"tpu": tpu, "model": model, "code": code, "batch": batch, **versions}
                        record |= {"error": m} if isinstance(m, str) else {**asdict(m), "peak_bytes": m.peak_bytes}
                        with open(args.out, "a") as file:
                            file.write(json.dumps(record | {"gemm_flops": closed}) + "\n")
    if failures:
        raise SystemExit("FLOPs off the closed form by more than 2%: " + "; ".join(failures))


if __name__ == "__main__":
    main()
