"""ChebyKAN against independent references: a NumPy recomputation and T_k(t) = cos(k arccos t)."""
from math import comb

import numpy as np
import pytest
import torch

from kan_vit import ChebyKAN, cheby_kan, cheby_kan_reference


def numpy_cheby_kan(x: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """y_j = sum_i sum_k T_k(tanh x_i) C[i, j, k], basis from the explicit polynomial sums."""
    t = np.tanh(x)
    out = np.zeros(x.shape[:-1] + (coef.shape[1],))
    for k in range(coef.shape[-1]):
        # T_k(t) = sum_m (-1)^m C(k, 2m) t^(k-2m) (1 - t^2)^m  (Chebyshev's explicit formula)
        tk = sum(
            (-1) ** m * comb(k, 2 * m) * t ** (k - 2 * m) * (1 - t**2) ** m for m in range(k // 2 + 1)
        )
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
