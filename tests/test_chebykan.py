"""ChebyKAN against independent references: a NumPy recomputation and T_k(t) = cos(k arccos t).

The memory-efficient autograd Function: exact against the einsum reference, saves only its input
for backward, keeps dtypes (float64 end to end, bf16 autocast with an fp32 basis), and runs under
torch_xla."""

import os
import re
import subprocess
import sys
from math import comb

import numpy as np
import pytest
import torch

from kan_vit import ChebyKAN, cheby_kan, cheby_kan_reference
from kan_vit.models.chebykan import chebyshev_power


def numpy_cheby_kan(x: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """y_j = sum_i sum_k T_k(tanh x_i) C[i, j, k], basis from the explicit polynomial sums."""
    t = np.tanh(x)
    out = np.zeros(x.shape[:-1] + (coef.shape[1],))
    for k in range(coef.shape[-1]):
        # T_k(t) = sum_m (-1)^m C(k, 2m) t^(k-2m) (1 - t^2)^m  (Chebyshev's explicit formula)
        tk = sum((-1) ** m * comb(k, 2 * m) * t ** (k - 2 * m) * (1 - t**2) ** m for m in range(k // 2 + 1))
        out += np.einsum("...i,ij->...j", tk, coef[:, :, k])
    return out


@pytest.mark.parametrize("degree", [1, 2, 3, 8])
@pytest.mark.parametrize("memory_efficient", [True, False])
def test_matches_numpy(degree, memory_efficient):
    torch.manual_seed(degree)
    layer = ChebyKAN(6, 5, degree, memory_efficient=memory_efficient).double()
    with torch.no_grad():
        layer.coefficients.normal_()
    x = torch.randn(3, 4, 6, dtype=torch.float64) * 2
    expected = numpy_cheby_kan(x.numpy(), layer.coefficients.detach().numpy())
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_basis_closed_form(memory_efficient):
    """With C one-hot at (i=0, j=k, k), output j is T_k(tanh x_0) = cos(k * arccos(tanh x_0))."""
    degree = 8
    layer = ChebyKAN(2, degree + 1, degree, memory_efficient=memory_efficient).double()
    with torch.no_grad():
        layer.coefficients.zero_()
        for k in range(degree + 1):
            layer.coefficients[0, k, k] = 1.0
    x = torch.linspace(-3, 3, 101, dtype=torch.float64)
    inputs = torch.stack([x, torch.randn_like(x)], dim=-1)
    out = layer(inputs).detach().numpy()
    k = np.arange(degree + 1)
    expected = np.cos(k[None, :] * np.arccos(np.tanh(x.numpy()))[:, None])
    np.testing.assert_allclose(out, expected, atol=1e-12)


@pytest.mark.parametrize("fn", [cheby_kan, cheby_kan_reference])
@pytest.mark.parametrize("degree", [1, 2, 5])
def test_gradcheck_float64(fn, degree):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    coef = torch.randn(4, 3, degree + 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x, coef))


@pytest.mark.parametrize("shape", [(7,), (2, 7), (2, 3, 4, 7)])
def test_any_leading_shape(shape):
    layer = ChebyKAN(7, 3, 4).double()
    x = torch.randn(*shape, dtype=torch.float64)
    out = layer(x)
    assert out.shape == shape[:-1] + (3,)
    expected = numpy_cheby_kan(x.numpy(), layer.coefficients.detach().numpy())
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("degree", [0, -1, 2.0, True])
def test_rejects_bad_degree(degree):
    with pytest.raises(ValueError, match="degree must be an integer >= 1"):
        ChebyKAN(4, 4, degree)


def test_rejects_wrong_input_width():
    with pytest.raises(ValueError, match="last dim 4"):
        ChebyKAN(4, 4, 2)(torch.randn(2, 5))


def test_init_std():
    """The original: C ~ Normal(0, 1 / (in * (K + 1)))."""
    torch.manual_seed(0)
    layer = ChebyKAN(64, 64, 8)
    std = 1.0 / (64 * 9)
    assert layer.coefficients.shape == (64, 64, 9)
    assert abs(layer.coefficients.std().item() / std - 1) < 0.02
    assert abs(layer.coefficients.mean().item()) < 5 * std / layer.coefficients.numel() ** 0.5


@pytest.mark.parametrize("degree", [1, 2, 4, 8])
def test_chebyshev_power_matches_monte_carlo(degree):
    """S_K = sum_k E[T_k(tanh z)^2], z ~ N(0, 1): quadrature vs 2M NumPy samples, T_k by
    NumPy's Chebyshev Vandermonde matrix (3 sigma of the Monte Carlo error is ~0.2%)."""
    t = np.tanh(np.random.default_rng(0).standard_normal(2_000_000))
    monte_carlo = (np.polynomial.chebyshev.chebvander(t, degree) ** 2).sum(1).mean()
    assert chebyshev_power(degree) == pytest.approx(monte_carlo, rel=3e-3)
    assert chebyshev_power(1) == pytest.approx(1 + np.mean(t**2), rel=3e-3)


@pytest.mark.parametrize("degree", [2, 8])
def test_variance_preserving_init_keeps_unit_variance(degree):
    """Standard-normal inputs (a LayerNorm's output) keep Var = 1 through the layer (the
    original's init gives S_K / (in (K + 1)^2), about 1e-4 at in = 384, K = 8)."""
    torch.manual_seed(0)
    x = torch.randn(4096, 384)
    vp = ChebyKAN(384, 384, degree, init="variance_preserving")
    assert vp.coefficients.std().item() == pytest.approx((384 * chebyshev_power(degree)) ** -0.5, rel=0.01)
    with torch.no_grad():
        assert vp(x).var().item() == pytest.approx(1.0, rel=0.05)
        original = ChebyKAN(384, 384, degree)(x).var().item()
    assert original == pytest.approx(chebyshev_power(degree) / (384 * (degree + 1) ** 2), rel=0.05)


def test_rejects_unknown_init():
    with pytest.raises(ValueError, match="init must be one of .*'variance_preserving'"):
        ChebyKAN(4, 4, 2, init="xavier")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtypes(dtype):
    torch.manual_seed(0)
    layer = ChebyKAN(8, 8, 4).to(dtype)
    x = torch.randn(3, 8, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype
    y.sum().backward()
    assert x.grad.dtype == dtype and layer.coefficients.grad.dtype == dtype
    expected = numpy_cheby_kan(x.detach().double().numpy(), layer.coefficients.detach().double().numpy())
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    np.testing.assert_allclose(y.detach().double().numpy(), expected, atol=tol, rtol=tol)


# --- the memory-efficient autograd Function ---------------------------------------------------


def _inputs(dtype, degree=8, shape=(2, 5, 7), d_out=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(*shape, generator=gen)).to(dtype).requires_grad_()
    coef = (torch.randn(shape[-1], d_out, degree + 1, generator=gen) / 4).to(dtype).requires_grad_()
    return x, coef


@pytest.mark.parametrize("degree", [1, 2, 3, 8])
def test_gradcheck_float64_second_point(degree):
    x, coef = _inputs(torch.float64, degree, shape=(3, 4), d_out=3, seed=degree)
    assert torch.autograd.gradcheck(cheby_kan, (x, coef))


@pytest.mark.parametrize("degree", [1, 2, 5, 8])
def test_float32_outputs_and_grads_match_reference(degree):
    """Both formulations in float32 (to 1e-5)."""
    x, coef = _inputs(torch.float32, degree, shape=(64, 48), d_out=40, seed=degree)
    grad = torch.randn(64, 40, generator=torch.Generator().manual_seed(1))
    y = cheby_kan(x, coef)
    gx, gc = torch.autograd.grad(y, (x, coef), grad)
    y_ref = cheby_kan_reference(x, coef)
    gx_ref, gc_ref = torch.autograd.grad(y_ref, (x, coef), grad)
    for got, want in [(y, y_ref), (gx, gx_ref), (gc, gc_ref)]:
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_float32_gradients_as_accurate_as_the_reference():
    """Against float64 truth, the float32 gradients are no less accurate than the einsum's
    (Clenshaw's recurrence is stable; summing k U_(k-1) re-expanded in T_m was ~3x worse)."""
    gen = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(256, 96, generator=gen, dtype=torch.float64)
    coef = torch.randn(96, 80, 9, generator=gen, dtype=torch.float64) / (96 * 9)
    grad = torch.randn(256, 80, generator=gen, dtype=torch.float64)
    truth = torch.autograd.grad(cheby_kan_reference(x.requires_grad_(), coef.requires_grad_()), (x, coef), grad)

    def max_rel_err(fn):
        xf, cf = x.detach().float().requires_grad_(), coef.detach().float().requires_grad_()
        got = torch.autograd.grad(fn(xf, cf), (xf, cf), grad.float())
        return [((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(got, truth)]

    ours, reference = max_rel_err(cheby_kan), max_rel_err(cheby_kan_reference)
    for err, ref_err in zip(ours, reference):
        assert err < 1.5 * ref_err, (ours, reference)


def test_only_input_sized_tensor_saved_for_backward():
    """<= 2·D floats per token saved, parameters not counted (the reference saves ~(K+3)·D)."""
    layer = ChebyKAN(32, 32, 8)
    x = torch.randn(10, 32, requires_grad=True)
    param_ptr = layer.coefficients.untyped_storage().data_ptr()
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() != param_ptr:
            saved.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    assert sum(saved) <= 2 * 32 * 10 * 4, saved
    assert x.grad is not None and layer.coefficients.grad is not None


def test_only_coefficient_grad_or_only_input_grad():
    x, coef = _inputs(torch.float64, shape=(4, 5), d_out=3)
    ref_gx, ref_gc = torch.autograd.grad(cheby_kan_reference(x, coef).sum(), (x, coef))
    (gc,) = torch.autograd.grad(cheby_kan(x.detach(), coef).sum(), (coef,))
    (gx,) = torch.autograd.grad(cheby_kan(x, coef.detach()).sum(), (x,))
    torch.testing.assert_close(gc, ref_gc)
    torch.testing.assert_close(gx, ref_gx)


def test_float64_stays_float64():
    x, coef = _inputs(torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is never autocast
        y = cheby_kan(x, coef)
    gx, gc = torch.autograd.grad(y.sum(), (x, coef))
    assert y.dtype == gx.dtype == gc.dtype == torch.float64


def test_bf16_autocast_cpu_close_to_fp32():
    x, coef = _inputs(torch.float32, shape=(32, 64), d_out=64)
    want = cheby_kan_reference(x.double(), coef.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = cheby_kan(x, coef)
    gx, gc = torch.autograd.grad(y.float().sum(), (x, coef))
    assert y.dtype == torch.bfloat16 and gx.dtype == gc.dtype == torch.float32
    rel = (y.double() - want).norm() / want.norm()
    assert rel < 2e-2, rel  # bf16 GEMM operands (8-bit mantissa), basis itself in fp32


def test_bf16_input_basis_in_float32():
    """bf16 inputs: the recurrence runs in fp32 (T_8 in bf16 would lose ~2 digits)."""
    x, coef = _inputs(torch.float32, shape=(32, 16), d_out=8)
    y = cheby_kan(x.detach().bfloat16(), coef.detach().bfloat16())
    want = cheby_kan_reference(x.detach().bfloat16().double(), coef.detach().bfloat16().double())
    assert y.dtype == torch.bfloat16
    assert ((y.double() - want).norm() / want.norm()) < 1e-2


@pytest.mark.parametrize("target", ["CPU", "TPU"])  # the recurrence and the angle form
def test_xla_matches_cpu(target, monkeypatch):
    import torch_xla

    monkeypatch.setenv("KAN_VIT_XLA_TARGET", target)

    dev = torch_xla.device()
    x, coef = _inputs(torch.float32, shape=(2, 16, 24), d_out=20)  # tokens, in and out all differ
    gx, gc = torch.autograd.grad(cheby_kan_reference(x, coef).sum(), (x, coef))
    xx = x.detach().to(dev).requires_grad_()
    cx = coef.detach().to(dev).requires_grad_()
    y = cheby_kan(xx, cx)
    gxx, gcx = torch.autograd.grad(y.sum(), (xx, cx))
    # XLA's CPU tanh and GEMM differ from ATen's in the last bits
    torch.testing.assert_close(y.cpu(), cheby_kan_reference(x, coef).detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gxx.cpu(), gx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gcx.cpu(), gc, rtol=1e-4, atol=1e-4)


def test_xla_angle_basis_holds_at_saturation(monkeypatch):
    """XLA for a TPU builds the basis as cos(k acos t): at inputs whose tanh rounds to +-1
    (|x| >= 9.1 in float32), next to them and at 0, the output and both gradients stay within a few float32
    roundings of the float64 reference (relative to each tensor's largest entry)."""
    import torch_xla

    monkeypatch.setenv("KAN_VIT_XLA_TARGET", "TPU")  # the graph a TPU runs, traced on the CPU

    dev = torch_xla.device()
    g = torch.Generator().manual_seed(0)
    edge = torch.tensor([0.0, 1e-4, 0.5, 2.0, 3.47, 5.0, 8.0, 9.0, 9.1, 12.0, 20.0, 100.0])
    x = torch.cat([edge, -edge, 3 * torch.randn(104, generator=g)]).view(8, 16)
    coef = torch.randn(16, 8, 9, generator=g) / 16
    grad_y = torch.randn(8, 8, generator=g)
    x64, c64 = x.double().requires_grad_(), coef.double().requires_grad_()
    y64 = cheby_kan_reference(x64, c64)
    want = (y64, *torch.autograd.grad(y64, (x64, c64), grad_y.double()))
    xx, cx = x.to(dev).requires_grad_(), coef.to(dev).requires_grad_()
    y = cheby_kan(xx, cx)
    got = (y, *torch.autograd.grad(y, (xx, cx), grad_y.to(dev)))
    for name, g32, g64 in zip(("y", "dL/dx", "dL/dC"), got, want):
        error = (g32.cpu().double() - g64).abs().max() / g64.abs().max()
        assert error < 2e-5, f"{name}: {error:.2e}"


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_xla_non_finite_gradient_spreads_as_in_the_reference(poison):
    """A non-finite incoming gradient at [0, 0] (the entry the backward's recomputation waits on)
    makes exactly the reference's entries non-finite: row 0 of dL/dx, column 0 of dL/dC."""
    import torch_xla

    dev = torch_xla.device()
    x, coef = _inputs(torch.float32, shape=(6, 5), d_out=4)
    grad_y = torch.ones(6, 4)
    grad_y[0, 0] = poison
    want = torch.autograd.grad(cheby_kan_reference(x, coef), (x, coef), grad_y)
    xx, cx = x.detach().to(dev).requires_grad_(), coef.detach().to(dev).requires_grad_()
    got = torch.autograd.grad(cheby_kan(xx, cx), (xx, cx), grad_y.to(dev))
    for g, w in zip(got, want):
        assert torch.equal(g.cpu().isfinite(), w.isfinite())
        assert not w.isfinite().all() and w.isfinite().any()


def test_xla_empty_batch():
    """No tokens: an empty output and input gradient, all-zero coefficient gradient, on XLA too."""
    import torch_xla

    dev = torch_xla.device()
    x = torch.randn(0, 5, device=dev, requires_grad=True)
    coef = torch.randn(5, 4, 9, device=dev, requires_grad=True)
    y = cheby_kan(x, coef)
    gx, gc = torch.autograd.grad(y.sum(), (x, coef))
    assert y.shape == (0, 4) and gx.shape == (0, 5)
    assert torch.equal(gc.cpu(), torch.zeros(5, 4, 9))


@pytest.mark.slow  # compiles a forward and backward on XLA: ~6 s
def test_xla_backward_recomputes_the_basis(tmp_path):
    """Eight stacked layers' forward + backward compiled by XLA:CPU: its temporary buffer holds
    fewer than the eight layers' bases (each K * in floats per token) that keeping them all, as
    XLA's CSE would without the recompute select, needs (without it: 10 bases' worth)."""
    script = (
        "import torch, torch_xla\n"
        "from kan_vit import cheby_kan\n"
        "dev = torch_xla.device()\n"
        "x = torch.randn(1024, 64).to(dev).requires_grad_()\n"
        "coefs = [(0.02 * torch.randn(64, 64, 9)).to(dev).requires_grad_() for _ in range(8)]\n"
        "torch_xla.sync()\n"
        "h = x\n"
        "for c in coefs:\n"
        "    h = cheby_kan(h, c)\n"
        "grads = torch.autograd.grad(h.square().sum(), [x, *coefs])\n"
        "torch_xla.sync()\n"
    )
    env = dict(os.environ, PJRT_DEVICE="CPU", XLA_FLAGS=f"--xla_dump_to={tmp_path}")
    subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True, timeout=300)
    (assignment,) = tmp_path.glob("*SyncTensorsGraph*cpu_after_optimizations-buffer-assignment.txt")
    temp = re.search(r"^allocation \d+: size (\d+), preallocated-temp:", assignment.read_text(), re.MULTILINE)
    basis_bytes = 8 * 64 * 1024 * 4
    assert int(temp.group(1)) < 8 * basis_bytes


@pytest.mark.parametrize("device_type", ["cpu", "xla"])
def test_bf16_autocast_sums_the_t0_term_in_float32(device_type):
    """sum_i C[i, :, 0] and dL/dC[:, :, 0] = sum_n dL/dy_n accumulate in fp32 under bf16 autocast.
    1000 terms of 1 + 2^-7 (exact in bf16): 1007.8 in fp32, rounded once to 1008; XLA's bf16
    reduction gives 1004."""
    if device_type == "xla":
        import torch_xla

        device = torch_xla.device()
    else:
        device = torch.device("cpu")
    n = 1000
    coef = torch.zeros(n, 2, 3)
    coef[:, :, 0] = 1 + 2**-7
    coef = coef.to(device).requires_grad_()
    x = torch.zeros(n, n, device=device)  # N = 1000 rows too, for the gradient's column sum
    with torch.autocast(device_type, dtype=torch.bfloat16):
        y = cheby_kan(x, coef)
    (gc,) = torch.autograd.grad(y.float().sum() * (1 + 2**-7), (coef,))
    exact = n * (1 + 2**-7)
    torch.testing.assert_close(y.float().cpu(), torch.full((n, 2), exact), rtol=1e-3, atol=0)
    torch.testing.assert_close(gc[:, :, 0].cpu(), torch.full((n, 2), exact), rtol=1e-3, atol=0)
