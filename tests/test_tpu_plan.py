"""kan-vit-tpu-plan: the trainer's update as XLA's TPU compiler sees it, checked against a real
torch_xla sync, JAX's own compilation for the same TPU device, and closed-form counts."""

import glob
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("jax")
pytest.importorskip("libtpu", reason="the tpu-plan extra (jax[tpu]) is not installed")

from kan_vit import tpu_plan  # noqa: E402
from kan_vit.training.config import load  # noqa: E402
from kan_vit.training.model_factory import build_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "deit_t16.yaml")
# One block of ViT-B width on 64 px (4 x 4 patches + the class token): GEMMs are ~98% of its update's FLOPs
TINY = ["model.layers=1", "model.dim=768", "model.heads=12", "model.image_size=64", "model.labels=10"]
COMMAND = [sys.executable, "-c", "from kan_vit.tpu_plan import main; raise SystemExit(main())"]


def run_command(*args):
    return subprocess.run([*COMMAND, *args], capture_output=True, text=True, cwd=ROOT, timeout=900)


def _main_signature(hlo_module: bytes) -> tuple[list, list]:
    """The entry function's (element type, dims) of parameters and results, in HLO's spelling."""
    from jax._src.interpreters import mlir
    from jax._src.lib import xla_client
    from jax._src.lib.mlir import ir

    with mlir.make_ir_context():
        module = ir.Module.parse(xla_client._xla.mlir.hlo_to_stablehlo(hlo_module))
        main = next(op for op in module.body.operations if ir.StringAttr(op.attributes["sym_name"]).value == "main")
        signature = ir.FunctionType(ir.TypeAttr(main.attributes["function_type"]).value)
        spell = {"i1": "pred", "ui8": "u8", "i64": "s64", "i32": "s32"}
        return tuple(
            [
                (spell.get(str(t.element_type), str(t.element_type)), ",".join(map(str, t.shape)))
                for t in map(ir.RankedTensorType, types)
            ]
            for types in (signature.inputs, signature.results)
        )


REAL_STEP = textwrap.dedent(
    """
    import sys, torch, torch_xla
    from kan_vit.training import loop
    from kan_vit.training.config import load
    cfg = load(sys.argv[1], sys.argv[3:])
    device = torch_xla.device()
    state = loop.build_state(cfg, device)
    micro = int(sys.argv[2]) // cfg.optim.grad_accum
    micro_batches = [
        (torch.zeros(micro, 3, 64, 64, dtype=torch.uint8, device=device), torch.zeros(micro, 10, device=device),
         torch.zeros(1, dtype=torch.int64, device=device))
        for _ in range(cfg.optim.grad_accum)
    ]
    torch_xla.sync()
    loop.train_step(state, micro_batches, cfg)  # a real update: torch_xla's sync compiles and runs it
    """
)


@pytest.mark.slow  # a traced run and a traced plan in child processes: 12-15 s each
@pytest.mark.parametrize("overrides", [[], ["model.use_kan=true", "optim.grad_accum=2", "run.bf16=true"]])
def test_planned_update_is_the_update_a_run_compiles(tmp_path, overrides):
    """The graph handed to the TPU compiler (the child stopped at its dump) is the graph torch_xla's
    sync builds and runs for the trainer's update when the step completes: the same parameters,
    results and buffer donors (read from XLA's text dump of a real, completed step)."""
    cfg_args = [*TINY, "model.dim=64", "model.heads=2", *overrides]
    env = {
        **os.environ,
        "PJRT_DEVICE": "CPU",
        "KAN_VIT_XLA_TARGET": "TPU",  # the KAN graph a TPU runs, as the plan traces it
        "PYTHONPATH": ROOT,
        "XLA_FLAGS": f"--xla_dump_to={tmp_path} --xla_dump_hlo_as_text",
    }
    subprocess.run([sys.executable, "-c", REAL_STEP, CONFIG, "8", *cfg_args], env=env, check=True, timeout=600)
    dumps = glob.glob(str(tmp_path / "*before_optimizations.txt"))
    header = open(max(dumps, key=lambda p: int(re.search(r"module_(\d+)", p)[1]))).readline()
    real_donors = sorted(
        int(n) for n in re.findall(r"\((\d+), \{\}\)", re.search(r"buffer_donor=\{(.*?) \}", header)[1])
    )
    layout = re.search(r"entry_computation_layout=\{\((.*)\)->\((.*)\)\}", header)
    real_inputs, real_outputs = (re.findall(r"([a-z]+\d*)\[([\d,]*)\]", part) for part in layout.groups())

    cfg = load(CONFIG, cfg_args)
    hlo, donated = tpu_plan.step_graph("train", cfg, 8)
    assert donated == real_donors
    assert len(donated) >= 3 * len(list(build_model(cfg).parameters()))  # parameters and both moments
    inputs, outputs = _main_signature(hlo)
    assert inputs == real_inputs and outputs == real_outputs


def test_compiler_figures_match_jax_for_the_same_graph():
    """A torch graph (two matmuls, tanh, an in-place SGD step of w1) through the command's path and
    the same function through jax.jit's public API, compiled for one v4 device: the same FLOPs,
    bytes and aliased bytes, and the FLOPs the closed form gives (2 m k n per matmul + tanh)."""
    import jax
    import jax.numpy as jnp
    import torch_xla
    from jax.sharding import SingleDeviceSharding

    batch, d_in, hidden, d_out = 256, 512, 1024, 128
    tgt = tpu_plan.target("v4")
    device = torch_xla.device()
    x, w1, w2 = (torch.randn(*shape).to(device) for shape in ((batch, d_in), (d_in, hidden), (hidden, d_out)))
    torch_xla.sync()
    h = torch.tanh(x @ w1)
    loss = (h @ w2).sum()
    w1.copy_(w1 - 0.1 * (x.t() @ ((1 - h * h) * w2.sum(1))))
    hlo = torch_xla._XLAC._get_xla_tensors_hlo_proto([w1, loss])
    w1_input = _main_signature(hlo)[0].index(("f32", f"{d_in},{hidden}"))
    ours = tpu_plan.compile_hlo(hlo, [w1_input], tgt)  # w1 donated, as a sync of its in-place update does

    def step(w1, x, w2):
        h = jnp.tanh(x @ w1)
        return w1 - 0.1 * (x.T @ ((1 - h * h) * w2.sum(1))), (h @ w2).sum()

    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=SingleDeviceSharding(tgt.device))  # noqa: E731
    reference = tpu_plan.measure(
        jax.jit(step, donate_argnums=0).lower(spec(d_in, hidden), spec(batch, d_in), spec(hidden, d_out)).compile()
    )
    assert ours.flops == pytest.approx(reference.flops, rel=0.01)
    assert ours.bytes_accessed == pytest.approx(reference.bytes_accessed, rel=0.05)
    assert ours.alias_bytes == reference.alias_bytes == d_in * hidden * 4  # w1 donated, as JAX donates it
    # torch_xla passes the Python scalars as parameters (a TPU scalar buffer takes 512 bytes)
    scalars = sum(1 for _, dims in _main_signature(hlo)[0] if dims == "")
    assert ours.argument_bytes == reference.argument_bytes + 512 * scalars
    gemms = 2 * batch * hidden * (d_in + d_out) + 2 * d_in * batch * hidden
    assert gemms <= ours.flops <= gemms * 1.02


def _gemm_update_flops(batch, layers, dim, tokens, patch, labels, ffn):
    """Forward GEMMs per sample x 3 (backward: input and weight gradients), but the patch embedding's
    once more only (no image gradient). ffn: GEMM FLOPs per token of the feed-forward."""
    block = 2 * tokens * dim * 3 * dim + 2 * 2 * tokens**2 * dim + 2 * tokens * dim**2 + tokens * ffn
    patch_embed = 2 * (tokens - 1) * 3 * patch**2 * dim
    forward = layers * block + patch_embed + 2 * dim * labels
    return batch * (3 * forward - patch_embed)


@pytest.mark.slow  # two TPU compilations of a traced update: about a minute each on 2 cores
@pytest.mark.parametrize("use_kan", [False, True])
def test_command_reports_the_tiny_update_on_v4(use_kan):
    """The command's numbers for a one-block model: FLOPs 0-3% above the closed-form GEMM count of
    the update (the rest: GELU, softmax, layer norms, AdamW), the donated bytes = parameters and
    both AdamW moments, a peak that adds up. The KAN at degree 3: its TPU compile time grows with
    the degree."""
    batch, dim, degree = 32, 768, 3
    overrides = [*TINY, f"model.use_kan={str(use_kan).lower()}", f"model.polynomial_degree={degree}"]
    result = run_command(
        "--config", CONFIG, "--tpu", "v4", "--batch", str(batch), "--eval-batch", "8", "--json",
        *[a for o in overrides for a in ("--set", o)],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads(result.stdout)
    train = plan["steps"][0]
    # MLP: 2 GEMMs D -> 4D -> D; KAN: one GEMM of the K basis blocks (T_0 folded) D * K -> D
    ffn = 2 * 2 * dim * 4 * dim if not use_kan else 2 * degree * dim * dim
    expected = _gemm_update_flops(batch, 1, dim, 17, 16, 10, ffn)
    assert expected <= train["flops"] <= expected * 1.03
    params = sum(p.numel() for p in build_model(load(CONFIG, overrides)).parameters())
    assert 3 * 4 * params <= train["alias_bytes"] <= 3 * 4 * params * 1.25  # TPU layouts pad small tensors
    assert train["peak_bytes"] == (
        train["argument_bytes"] + train["output_bytes"] - train["alias_bytes"] + train["temp_bytes"]
    )
    assert train["fits"] and plan["steps"][1]["fits"]
    assert train["bound_s"] == pytest.approx(
        max(train["flops"] / 137.5e12, train["bytes_accessed"] / 600e9)
    )  # v4: 275 TFLOP/s and 1,200 GB/s per chip, 2 devices per chip


def test_unknown_tpu_and_bad_batch_are_one_line():
    result = run_command("--config", CONFIG, "--tpu", "v9")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: unknown TPU 'v9'")


@pytest.mark.slow
def test_a_config_that_cannot_fit_names_the_largest_batch_that_does():
    """Attention over 3,137 tokens (4 px patches of 224 px images) in 16 heads needs ~1.2 GB per
    sample: 16 per device cannot fit a v3 core (16 GiB), 8 can. The command says both, from two
    compiled answers."""
    small = ["model.layers=1", "model.dim=32", "model.heads=16", "model.patch_size=4", "model.labels=10"]
    sets = [a for o in small for a in ("--set", o)]
    result = run_command("--config", CONFIG, "--tpu", "v3", "--batch", "16", "--eval-batch", "8", "--max-batch", *sets)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "train step, 16 per device: does not fit one device (RESOURCE_EXHAUSTED" in result.stdout
    assert "largest training batch per device that fits (a multiple of 8): 8\n" in result.stdout
    assert "training batches compiled: 8 fits, 16 no\n" in result.stdout


@pytest.mark.parametrize("start", [8, 96, 1024])
@pytest.mark.parametrize("largest", [0, 40, 512])
def test_max_batch_search_names_the_largest_fitting_multiple_from_any_start(start, largest):
    """The search on answers already compiled (`known`, as the command passes the batch it planned):
    from any start, doubling or halving, then bisecting, it names the largest multiple of 8 that
    fits, and needs no answer it was not given (a missing one would start a compile)."""
    known = {size: size <= largest for size in range(8, 2049, 8)}
    given = dict(known)
    assert tpu_plan.max_batch("train", None, None, start, 8, known) == largest
    assert known == given


def test_a_step_that_fails_inside_is_one_error():
    """The traced child dies after the step began (here: train_step raises): step_graph names it
    and shows the child's error, instead of waiting for a graph that never comes."""
    setup = (
        "from kan_vit.training import loop\n"
        "def _fail(*args): raise RuntimeError('boom in the step')\n"
        "loop.train_step = _fail"
    )
    with pytest.raises(RuntimeError, match="exited within the step") as error:
        tpu_plan.step_graph("train", load(CONFIG, [*TINY, "model.dim=64", "model.heads=2"]), 8, setup)
    assert "boom in the step" in str(error.value)


def _kan_layer_bytes(k_minor: bool) -> tuple[float, int]:
    """Bytes accessed by one ChebyKAN layer's forward and backward (x: 8 x 256 tokens x 128,
    degree 8) compiled for one v4 device, with the basis as XLA builds it (k_minor) or by the
    recurrence; and the bytes of that basis in bf16 (what the TPU's single-pass GEMM reads)."""
    import torch_xla

    from kan_vit.models import chebykan

    device, shape, degree = torch_xla.device(), (8, 256, 128), 8
    x = torch.randn(*shape).to(device).requires_grad_()
    coefficients = (0.01 * torch.randn(shape[-1], shape[-1], degree + 1)).to(device).requires_grad_()
    torch_xla.sync()
    chosen = chebykan._k_minor
    chebykan._k_minor = lambda t: k_minor
    try:
        grads = torch.autograd.grad(chebykan.cheby_kan(x, coefficients).square().sum(), (x, coefficients))
    finally:
        chebykan._k_minor = chosen
    hlo = torch_xla._XLAC._get_xla_tensors_hlo_proto(list(grads))
    return tpu_plan.compile_hlo(hlo, [], tpu_plan.target("v4")).bytes_accessed, x.numel() * degree * 2


@pytest.mark.slow  # two TPU compilations of one layer: ~30 s
def test_the_kan_basis_never_reaches_hbm_on_a_tpu():
    """cos(k acos t) fuses into both GEMMs' operands: against the recurrence's stacked basis, the
    layer's forward and backward move less by at least the basis written once and read twice."""
    fused, basis_bytes = _kan_layer_bytes(k_minor=True)
    stacked, _ = _kan_layer_bytes(k_minor=False)
    assert stacked - fused >= 3 * basis_bytes
