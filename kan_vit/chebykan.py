"""Chebyshev Kolmogorov-Arnold layer, the original's `ChebyKAN`.

    t = tanh(x),  T_0 = 1,  T_1 = t,  T_k = 2 t T_(k-1) - T_(k-2)
    y_j = sum_i sum_k T_k(t_i) * C[i, j, k]          (no bias)

Two formulations compute the same function:

* `cheby_kan_reference`: stack T_0..T_K into an (..., in, K+1) tensor and contract it with an
  einsum. Autograd keeps the whole basis alive for backward (about (K+3)*in floats per token).
* `cheby_kan` (the default): an autograd Function that saves only t = tanh(x) and recomputes
  the basis in backward; dL/dt = sum_k dL/dT_k * k U_(k-1)(t) is summed by Clenshaw's
  recurrence. T_0 = 1 is folded into a constant (sum_i C[i, :, 0]), so the GEMM has K*in
  columns: exactly the FLOPs of a 4x MLP at K = 8.
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


def _writes_in_place(t: torch.Tensor) -> bool:
    """Eager: recurrences write into slices of one buffer (no temporaries, no concatenation).
    XLA: fresh tensors and one cat instead; slice updates made its graph 2.6x larger (595 vs 229
    HLO instructions for one layer's forward + backward, benchmarks/kan_xla.py)."""
    return t.device.type != "xla"


def _basis_signs(degree: int) -> list[float]:
    """sigma_1..sigma_K = +, -, -, +, +, -, -, ... (sigma_k = -sigma_(k-2), sigma_0 = sigma_1 = 1)."""
    return [1.0 if k % 4 in (0, 1) else -1.0 for k in range(1, degree + 1)]


def _row_scale(degree: int, kind: str, dtype: torch.dtype, device) -> torch.Tensor:
    """k ("degree") or sigma_k ("sign", as `_basis_signs`) for k = 1..K, built on the device
    (an iota on XLA: no host-to-device upload per step)."""
    k = torch.arange(1, degree + 1, device=device)
    return (k if kind == "degree" else 1 - 2 * (k % 4 // 2)).to(dtype)


def _chebyshev_basis(t: torch.Tensor, degree: int) -> torch.Tensor:
    """sigma_k T_k(t) for k = 1..K, as one (N, K * D) k-major matrix (the GEMM operand).

    With R_k = sigma_k T_k the recurrence T_k = 2t T_(k-1) - T_(k-2) becomes
    R_k = R_(k-2) + 2 sigma_k sigma_(k-1) t R_(k-1): one addcmul (one element-wise pass) per k.
    The signs are undone in the GEMM weight (`_gemm_weight` with `_row_scale(K, "sign", ...)`).
    """
    n, d = t.shape
    buffer = t.new_empty(n, degree * d) if _writes_in_place(t) else None

    def slot(k):
        return None if buffer is None else buffer[:, (k - 1) * d : k * d]

    polys = [t.new_ones(()), t if buffer is None else slot(1).copy_(t)]  # R_0 = 1, R_1 = t
    signs = [1.0] + _basis_signs(degree)
    for k in range(2, degree + 1):
        value = 2 * signs[k] * signs[k - 1]
        polys.append(torch.addcmul(polys[k - 2], t, polys[k - 1], value=value, out=slot(k)))
    return torch.cat(polys[1:], dim=1) if buffer is None else buffer


def _gemm_weight(coefficients: torch.Tensor, dtype: torch.dtype, row_scale: torch.Tensor) -> torch.Tensor:
    """C[:, :, 1:] as a (K * in, out) matrix whose rows match `_chebyshev_basis`'s columns,
    row block k multiplied by row_scale[k - 1]."""
    d_in, d_out, k1 = coefficients.shape
    blocks = coefficients[:, :, 1:].permute(2, 0, 1)
    scale = row_scale.view(-1, 1, 1)
    if _writes_in_place(coefficients):  # gather, scale and cast in one pass into a contiguous matrix
        weight = torch.mul(blocks, scale, out=blocks.new_empty(blocks.shape, dtype=dtype))
    else:
        weight = blocks.to(dtype) * scale
    return weight.reshape((k1 - 1) * d_in, d_out)


class _ChebyKANFunction(torch.autograd.Function):
    """Saves only t = tanh(x) (in floats per token); recomputes the basis in backward."""

    @staticmethod
    def forward(ctx, x, coefficients, compute_dtype):
        d_in, d_out, k1 = coefficients.shape
        basis_dtype = torch.promote_types(x.dtype, torch.float32)  # basis always >= fp32
        t = torch.tanh(x.reshape(-1, d_in).to(basis_dtype))
        basis = _chebyshev_basis(t, k1 - 1).to(compute_dtype)
        const = coefficients[:, :, 0].sum(0).to(compute_dtype)  # T_0 = 1 term
        signs = _row_scale(k1 - 1, "sign", compute_dtype, x.device)
        y = torch.addmm(const, basis, _gemm_weight(coefficients, compute_dtype, signs))
        ctx.save_for_backward(t, coefficients)
        ctx.compute_dtype = compute_dtype
        ctx.x_dtype = x.dtype
        return y.reshape(*x.shape[:-1], d_out)

    @staticmethod
    def backward(ctx, grad_y):
        t, coefficients = ctx.saved_tensors
        d_in, d_out, k1 = coefficients.shape
        degree = k1 - 1
        cd = ctx.compute_dtype
        out_shape = grad_y.shape[:-1] + (d_in,)
        grad_y = grad_y.reshape(-1, d_out).to(cd)
        grad_x = grad_c = None

        if ctx.needs_input_grad[1]:
            grad_w = torch.mm(_chebyshev_basis(t, degree).to(cd).t(), grad_y)  # sigma_k dL/dC_k
            signs = _row_scale(degree, "sign", cd, grad_w.device).view(degree, 1, 1)
            grad_c = torch.cat(
                [
                    grad_y.sum(0).expand(d_in, d_out).unsqueeze(-1),  # T_0 = 1
                    (grad_w.view(degree, d_in, d_out) * signs).permute(1, 2, 0),
                ],
                dim=-1,
            ).to(coefficients.dtype)

        if ctx.needs_input_grad[0]:
            # a_m = (m + 1) dL/dT_(m+1); dL/dt = sum_m a_m U_m(t), summed by Clenshaw's recurrence
            # b_m = a_m + 2t b_(m+1) - b_(m+2), dL/dt = b_0, in place over the GEMM's output.
            degrees = _row_scale(degree, "degree", cd, t.device)
            a = torch.mm(grad_y, _gemm_weight(coefficients, cd, degrees).t()).to(t.dtype)
            b = list(a.split(d_in, dim=1))
            in_place = _writes_in_place(t)
            if degree >= 2:
                two_t = t + t
                for m in range(degree - 2, -1, -1):
                    b[m] = torch.addcmul(b[m], two_t, b[m + 1], out=b[m] if in_place else None)
                    if m + 2 < degree:
                        b[m].sub_(b[m + 2])
            grad_t = b[0]
            grad_x = torch.addcmul(grad_t, grad_t * t, t, value=-1)  # dt/dx = 1 - t^2
            grad_x = grad_x.to(ctx.x_dtype).reshape(out_shape)

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
