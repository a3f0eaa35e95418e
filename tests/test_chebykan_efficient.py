"""The memory-efficient ChebyKAN autograd Function: exact against the einsum reference,
saves only its input for backward, keeps dtypes (float64 end to end, bf16 autocast with an fp32
basis), and runs under torch_xla."""
import pytest
import torch

from kan_vit import ChebyKAN, cheby_kan, cheby_kan_reference


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


def test_xla_matches_cpu():
    import torch_xla

    dev = torch_xla.device()
    x, coef = _inputs(torch.float32, shape=(16, 24), d_out=24)
    gx, gc = torch.autograd.grad(cheby_kan_reference(x, coef).sum(), (x, coef))
    xx = x.detach().to(dev).requires_grad_()
    cx = coef.detach().to(dev).requires_grad_()
    y = cheby_kan(xx, cx)
    gxx, gcx = torch.autograd.grad(y.sum(), (xx, cx))
    # XLA's CPU tanh and GEMM differ from ATen's in the last bits
    torch.testing.assert_close(y.cpu(), cheby_kan_reference(x, coef).detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gxx.cpu(), gx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gcx.cpu(), gc, rtol=1e-4, atol=1e-4)


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
