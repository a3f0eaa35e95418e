"""Chebyshev Kolmogorov-Arnold layer, the original's `ChebyKAN`.

    t = tanh(x),  T_0 = 1,  T_1 = t,  T_k = 2 t T_(k-1) - T_(k-2)
    y_j = sum_i sum_k T_k(t_i) * C[i, j, k]          (no bias)

Two formulations compute the same function:

* `cheby_kan_reference`: stack T_0..T_K into an (..., in, K+1) tensor and contract it with an
  einsum. Autograd keeps the whole basis alive for backward (about (K+3)*in floats per token).
* `cheby_kan` (the default): an autograd Function that saves only its input and recomputes
  the basis in backward, using dT_k/dt = k U_(k-1)(t). T_0 = 1 is folded into a constant
  (sum_i C[i, :, 0]), so the GEMM has K*in columns: exactly the FLOPs of a 4x MLP at K = 8.
"""
from __future__ import annotations


import torch
from torch import nn

__all__ = ["ChebyKAN", "cheby_kan", "cheby_kan_reference"]


def cheby_kan_reference(x: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Straightforward formulation (the original's code path), kept as the reference."""
    degree = coefficients.shape[-1] - 1
    t = torch.tanh(x)
    basis = [torch.ones_like(t), t]
    for _ in range(2, degree + 1):
        basis.append(2 * t * basis[-1] - basis[-2])
    basis = torch.stack(basis[: degree + 1], dim=-1)
    return torch.einsum("...ik,iok->...o", basis, coefficients)


def _basis_t1_to_tk(t: torch.Tensor, degree: int) -> torch.Tensor:
    """T_1..T_K of `t` (N, D), stacked to (N, K * D) in k-major order (one GEMM operand)."""
    polys = [t]
    if degree >= 2:
        polys.append(2 * t * t - 1)
    for _ in range(3, degree + 1):
        polys.append(2 * t * polys[-1] - polys[-2])
    return torch.cat(polys, dim=1)


def _gemm_weight(coefficients: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """C[:, :, 1:] as a (K * in, out) matrix whose rows match `_basis_t1_to_tk`'s columns."""
    d_in, d_out, k1 = coefficients.shape
    return coefficients[:, :, 1:].permute(2, 0, 1).reshape((k1 - 1) * d_in, d_out).to(dtype)


class _ChebyKANFunction(torch.autograd.Function):
    """Saves only x; recomputes the basis in backward (memory: in floats per token)."""

    @staticmethod
    def forward(ctx, x, coefficients, compute_dtype):
        d_in, d_out, k1 = coefficients.shape
        basis_dtype = torch.promote_types(x.dtype, torch.float32)  # basis always >= fp32
        t = torch.tanh(x.reshape(-1, d_in).to(basis_dtype))
        basis = _basis_t1_to_tk(t, k1 - 1).to(compute_dtype)
        const = coefficients[:, :, 0].sum(0).to(compute_dtype)  # T_0 = 1 term
        y = torch.addmm(const, basis, _gemm_weight(coefficients, compute_dtype))
        ctx.save_for_backward(x, coefficients)
        ctx.compute_dtype = compute_dtype
        return y.reshape(*x.shape[:-1], d_out)

    @staticmethod
    def backward(ctx, grad_y):
        x, coefficients = ctx.saved_tensors
        d_in, d_out, k1 = coefficients.shape
        degree = k1 - 1
        cd = ctx.compute_dtype
        basis_dtype = torch.promote_types(x.dtype, torch.float32)
        t = torch.tanh(x.reshape(-1, d_in).to(basis_dtype))
        grad_y = grad_y.reshape(-1, d_out).to(cd)
        grad_x = grad_c = None

        if ctx.needs_input_grad[1]:
            basis = _basis_t1_to_tk(t, degree).to(cd)
            grad_w = (basis.t() @ grad_y).reshape(degree, d_in, d_out).permute(1, 2, 0)
            grad_t0 = grad_y.sum(0).expand(d_in, d_out).unsqueeze(-1)
            grad_c = torch.cat([grad_t0, grad_w], dim=-1).to(coefficients.dtype)

        if ctx.needs_input_grad[0]:
            grad_basis = (grad_y @ _gemm_weight(coefficients, cd).t()).to(basis_dtype)
            # dL/dt = sum_k g_k * k * U_(k-1)(t);  U_0 = 1, U_1 = 2t, U_k = 2t U_(k-1) - U_(k-2)
            grad_t = grad_basis[:, :d_in].clone()
            u_prev, u = 1.0, 2 * t
            for k in range(2, degree + 1):
                grad_t.addcmul_(grad_basis[:, (k - 1) * d_in : k * d_in], u, value=k)
                u_prev, u = u, 2 * t * u - u_prev
            grad_x = (grad_t * (1 - t * t)).to(x.dtype).reshape(x.shape)

        return grad_x, grad_c, None


def _compute_dtype(x: torch.Tensor, coefficients: torch.Tensor) -> torch.dtype:
    """The GEMM dtype: autocast's (bf16/fp16) when active, else the inputs' promoted dtype."""
    dtype = torch.promote_types(x.dtype, coefficients.dtype)
    device_type = x.device.type
    if dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def cheby_kan(x: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Memory-efficient Chebyshev-KAN: same function as `cheby_kan_reference`."""
    return _ChebyKANFunction.apply(x, coefficients, _compute_dtype(x, coefficients))


class ChebyKAN(nn.Module):
    """Chebyshev-KAN layer: `coefficients` of shape (in_features, out_features, degree + 1).

    Init as the original: C ~ Normal(0, 1 / (in_features * (degree + 1))).
    `memory_efficient=False` selects the straightforward reference formulation.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        degree: int,
        memory_efficient: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise ValueError(
                f"ChebyKAN degree must be an integer >= 1 (got {degree!r}); "
                "degree 0 would make the layer a constant"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.degree = degree
        self.memory_efficient = memory_efficient
        self.coefficients = nn.Parameter(
            torch.empty(in_features, out_features, degree + 1, device=device, dtype=dtype)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.coefficients, std=1.0 / (self.in_features * (self.degree + 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"ChebyKAN expects inputs with last dim {self.in_features}, got shape {tuple(x.shape)}"
            )
        if self.memory_efficient:
            return cheby_kan(x, self.coefficients)
        return cheby_kan_reference(x, self.coefficients)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, degree={self.degree}"
