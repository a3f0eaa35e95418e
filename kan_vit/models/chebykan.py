"""Chebyshev Kolmogorov-Arnold layer, the original's `ChebyKAN`.

    t = tanh(x),  T_0 = 1,  T_1 = t,  T_k = 2 t T_(k-1) - T_(k-2)
    y_j = sum_i sum_k T_k(t_i) * C[i, j, k]          (no bias)

Two formulations compute the same function:

* `cheby_kan_reference`: stack T_0..T_K into an (..., in, K+1) tensor and contract it with an
  einsum. Autograd keeps the whole basis alive for backward (about (K+3)*in floats per token).
* `cheby_kan` (the default): an autograd Function that saves only its input x and recomputes
  tanh and the basis in backward; dL/dt = sum_k dL/dT_k * k U_(k-1)(t) is summed by Clenshaw's
  recurrence. T_0 = 1 is folded into a constant (sum_i C[i, :, 0]), so the GEMM has K*in
  columns: exactly the FLOPs of a 4x MLP at K = 8. On XLA for a TPU or GPU the basis is
  sigma_k cos(k acos t), which the compiler fuses into the GEMMs' operands, and the GEMMs keep
  the input's leading axes (`_chebyshev_basis_operand`, `_gemm_rows`). The backward reads x through
  `_after_gradient`, so that XLA's common-subexpression elimination cannot merge the
  recomputation with the forward's and keep it alive in between (KAN-ViT-S/16 update at 128
  per v4 device: 5.4% less peak memory for 1.9% more bytes; docs/performance.md).

`ChebyKAN` uses `cheby_kan` eagerly, on XLA and under torch.compile / torch.export (both trace
it), and the reference when scripted: TorchScript cannot compile an autograd Function.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Literal, get_args

import torch
from torch import nn

__all__ = ["ChebyKAN", "KanInit", "cheby_kan", "cheby_kan_reference", "chebyshev_basis", "chebyshev_power"]

KanInit = Literal["original", "variance_preserving"]


def chebyshev_basis(t: torch.Tensor, degree: int) -> torch.Tensor:
    """T_0(t)..T_K(t) stacked on a new last axis, by the recurrence."""
    basis = [torch.ones_like(t), t]
    for _ in range(2, degree + 1):
        basis.append(2 * t * basis[-1] - basis[-2])
    return torch.stack(basis[: degree + 1], dim=-1)


@functools.lru_cache
def chebyshev_power(degree: int) -> float:
    """S_K = sum_k E[T_k(tanh z)^2] for z ~ N(0, 1), k = 0..K: the mean square of one input's
    basis. By 128-point Gauss-Hermite quadrature (exact to float64 rounding for these smooth
    integrands); the derivation that uses it is in docs/why_kan_trails.md."""
    # Golub-Welsch: the nodes are the eigenvalues of the probabilists' Hermite Jacobi matrix,
    # the N(0, 1) weights the squared first components of its eigenvectors
    off = torch.arange(1, 128, dtype=torch.float64).sqrt()
    nodes, vectors = torch.linalg.eigh(torch.diag(off, 1) + torch.diag(off, -1))
    weights = vectors[0] ** 2
    t = torch.tanh(nodes)
    prev, cur, total = torch.ones_like(t), t, 1.0
    for _ in range(degree):
        total += float(weights @ cur**2)
        prev, cur = cur, 2 * t * cur - prev
    return total


def cheby_kan_reference(x: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Straightforward formulation (the original's code path), kept as the reference."""
    degree = coefficients.shape[-1] - 1
    return torch.einsum("...ik,iok->...o", chebyshev_basis(torch.tanh(x), degree), coefficients)


def _writes_in_place(t: torch.Tensor) -> bool:
    """Eager: recurrences write into slices of one buffer (no temporaries, no concatenation).
    XLA: fresh tensors and one cat instead; slice updates made its graph 2.6x larger (720 vs 275
    HLO instructions for one layer's forward + backward, counted as in benchmarks/kan_xla.py).
    torch.compile / torch.export trace the functional ops too: out= into a slice does not
    functionalize, and the compiler plans its own buffers."""
    return t.device.type != "xla" and not torch.compiler.is_compiling()


def _sign(j):
    """sigma_j = +, +, -, -, +, +, ... for j = 0, 1, 2, ... (sigma_j = -sigma_(j-2)); ints or tensors."""
    return 1 - (j & 2)


def _weight_maps(degree: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """diag(sigma_0..sigma_K) and diag(0..K): (K+1, K+1) maps from the coefficients' k axis to
    the row blocks of a GEMM weight (`_gemm_weight`).

    signed: block k is sigma_k C[:, :, k], matching the signed basis (block 0 is C[:, :, 0]).
    scaled: block k is k C[:, :, k], so the backward GEMM gives k dL/dT_k.
    Built from an iota on the device: constant-folded by XLA, no host-to-device upload per step.
    """
    k = torch.arange(degree + 1, device=device)
    eye = k.view(-1, 1) == k
    return (eye * _sign(k)).to(dtype), (eye * k).to(dtype)


def _tanh(x: torch.Tensor) -> torch.Tensor:
    """t = tanh(x) in float32 at least (float64 stays float64): the basis is never built in bf16.
    A fresh contiguous tensor: CPU tanh into a strided slice is 2x slower than tanh + copy."""
    return torch.tanh(x.to(torch.promote_types(x.dtype, torch.float32)))


XLA_TARGET = "KAN_VIT_XLA_TARGET"  # the hardware an XLA graph is built for, when not the device's


def _k_minor(t: torch.Tensor) -> bool:
    """The basis in the angle form, k minor (`_chebyshev_basis_operand`), and the GEMMs on the
    input's own axes (`_gemm_rows`): on XLA devices whose compiler fuses element-wise producers
    into GEMM operands (TPU, GPU). XLA:CPU does not, and runs the merged matrices' GEMMs faster:
    there the recurrence, k major, on (N, in) rows. `kan_vit.tpu_plan` traces on the CPU for a
    TPU and names the target in the KAN_VIT_XLA_TARGET environment variable."""
    if t.device.type != "xla":
        return False
    target = os.environ.get(XLA_TARGET)
    if target is None:
        import torch_xla.runtime as xr

        target = xr.device_type()
    return target != "CPU"


def _gemm_rows(x: torch.Tensor, k_minor: bool) -> torch.Tensor:
    """x with its leading axes as the GEMMs' rows: merged into one (N, in) matrix, except on XLA
    for a TPU or GPU (`_k_minor`), where x itself: there merging the batch and token axes pins a
    layout that the compiler otherwise chooses freely, and copies the tensors the layer reads and
    writes to match (KAN-ViT-S/16 update at 128 per v4 device: 1.17x the bytes, 1.035x the peak
    memory). XLA:CPU runs the merged matrices' plain GEMMs faster."""
    return x if k_minor else x.reshape(-1, x.shape[-1])


def _chebyshev_basis_operand(t: torch.Tensor, degree: int, k_minor: bool) -> torch.Tensor:
    """R_k = sigma_k T_k(t) for k = 1..K: the (..., K * D) operand of the forward GEMM (the weight-
    gradient GEMM contracts it over the leading axes). The signs are undone in the GEMM weight
    (`_weight_maps`).

    k_minor (XLA for a TPU or GPU): sigma_k cos(k acos t), k minor: one element-wise expression of
    the angle and k, which XLA's TPU compiler fuses into both GEMMs' operands, so the basis never
    reaches HBM; built by the recurrence, each T_k is its own tensor and the stacked basis is
    written to HBM and read back (KAN-ViT-S/16 update at 128 per v4 device: 1.14x the bytes,
    1.055x the peak memory). Equal to the recurrence to float rounding for |t| <= 1, t = +-1
    included (the angle form has no singular point; only its derivative has, and the backward
    differentiates the polynomials).

    Elsewhere: the recurrence, with the signs R_k = R_(k-2) + 2 sigma_k sigma_(k-1) t R_(k-1), one
    addcmul (one element-wise pass) per k, column blocks k-major; eager writes them into one
    (..., K * D) buffer, torch.compile / torch.export concatenate them.
    """
    if k_minor:
        k = torch.arange(1, degree + 1, device=t.device)
        return (torch.cos(torch.acos(t).unsqueeze(-1) * k.to(t.dtype)) * _sign(k).to(t.dtype)).flatten(-2)
    d = t.shape[-1]
    buffer = t.new_empty(*t.shape[:-1], degree * d) if _writes_in_place(t) else None

    def slot(k):
        return None if buffer is None else buffer[..., (k - 1) * d : k * d]

    polys = [t.new_ones(()), t if buffer is None else slot(1).copy_(t)]  # R_0 = 1, R_1 = t
    signs = [_sign(k) for k in range(degree + 1)]
    for k in range(2, degree + 1):
        value = 2 * signs[k] * signs[k - 1]
        polys.append(torch.addcmul(polys[k - 2], t, polys[k - 1], value=value, out=slot(k)))
    return buffer if buffer is not None else torch.cat(polys[1:], dim=-1)


def _gemm_weight(coefficients: torch.Tensor, mix: torch.Tensor, k_minor: bool) -> torch.Tensor:
    """sum_k C[:, :, k] mix[k, m] for each column m of `mix`, as a (columns * in, out) matrix whose
    rows follow the basis operand's columns: (m, i) k-major, (i, m) k-minor.

    k-major: one small GEMM (inner size K+1) that also does the layout change (in, out, K+1) ->
    (K+1, in, out): BLAS reads the coefficients through a transposed view instead of a strided gather.
    """
    d_in, d_out, num_terms = coefficients.shape
    coefficients = coefficients.to(mix.dtype)
    if k_minor:
        return torch.einsum("iok,km->imo", coefficients, mix).reshape(-1, d_out)
    flat = coefficients.reshape(d_in * d_out, num_terms)
    return torch.mm(mix.t(), flat.t()).view(-1, d_out)


def _coefficient_gradient(grad_w: torch.Tensor, signed: torch.Tensor, d_in: int, k_minor: bool) -> torch.Tensor:
    """dL/dC[:, :, 1:] from the weight-gradient GEMM's (K * in, out) output (row blocks as the basis
    operand's columns, each sigma_k dL/dC[:, :, k]), as (in, out, K+1) with column k = 0 zero."""
    d_out, degree = grad_w.shape[1], signed.shape[0] - 1
    if k_minor:
        return torch.einsum("iko,km->iom", grad_w.view(d_in, degree, d_out), signed[1:])
    return torch.mm(grad_w.view(degree, d_in * d_out).t(), signed[1:]).view(d_in, d_out, degree + 1)


def _chebyshev_terms(a: torch.Tensor, d_in: int, degree: int, k_minor: bool) -> list[torch.Tensor]:
    """The (..., K * in) GEMM output split into its K (..., in) terms, k = 1..K."""
    if k_minor:
        return list(a.unflatten(-1, (d_in, degree)).unbind(-1))
    return list(a.split(d_in, dim=-1))


def _after_gradient(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """x, exactly, as a value XLA can compute only once `grad` exists, so that CSE cannot merge the
    backward's recomputation from x with the forward's. The select's predicate is true for every
    value, NaN and inf included, and XLA does not fold it. Eager autograd needs no such thing."""
    if x.device.type != "xla" or grad.numel() == 0:
        return x
    g = grad.reshape(-1)[:1]
    return torch.where((g == g) | (g != g), x, 0)


class _ChebyKANFunction(torch.autograd.Function):
    """Saves only its input x (in floats per token); recomputes tanh and the basis in backward."""

    @staticmethod
    def forward(ctx, x, coefficients, compute_dtype):
        d_in, d_out, num_terms = coefficients.shape
        k_minor = _k_minor(x)
        t = _tanh(_gemm_rows(x, k_minor))
        basis = _chebyshev_basis_operand(t, num_terms - 1, k_minor).to(compute_dtype)
        signed, _ = _weight_maps(num_terms - 1, compute_dtype, x.device)
        weight = _gemm_weight(coefficients, signed[:, 1:], k_minor)
        # T_0 = 1 term: sum_i C[i, :, 0], accumulated in float32 at least (XLA sums bf16 in bf16)
        const = coefficients[:, :, 0].to(compute_dtype).sum(0, dtype=torch.promote_types(compute_dtype, torch.float32))
        const = const.to(compute_dtype)
        y = torch.addmm(const, basis, weight) if basis.dim() == 2 else torch.matmul(basis, weight) + const
        ctx.save_for_backward(x, coefficients)
        ctx.compute_dtype = compute_dtype
        return y.reshape(*x.shape[:-1], d_out)

    @staticmethod
    def backward(ctx, grad_y):
        x, coefficients = ctx.saved_tensors
        d_in, d_out, num_terms = coefficients.shape
        degree = num_terms - 1
        compute_dtype = ctx.compute_dtype
        signed, scaled = _weight_maps(degree, compute_dtype, x.device)
        need_x, need_c = ctx.needs_input_grad[:2]
        k_minor = _k_minor(x)
        rows = _gemm_rows(_after_gradient(x, grad_y), k_minor)
        grad_y = grad_y.reshape(*rows.shape[:-1], d_out).to(compute_dtype)
        tokens = list(range(rows.dim() - 1))  # the axes the coefficient gradient sums over
        t = _tanh(rows)
        grad_x = grad_c = basis = None

        if need_c:
            basis = _chebyshev_basis_operand(t, degree, k_minor).to(compute_dtype)
            # row block k: sigma_k dL/dC[:, :, k]; an einsum, as tensordot merges the token axes
            grad_w = torch.einsum("...i,...o->io", basis, grad_y)
            grad_c = _coefficient_gradient(grad_w, signed, d_in, k_minor)
            grad_c[:, :, 0] = grad_y.sum(tokens, dtype=torch.promote_types(compute_dtype, torch.float32))
            grad_c = grad_c.to(coefficients.dtype)

        if need_x:
            # a_m = (m + 1) dL/dT_(m+1); dL/dt = sum_m a_m U_m(t), summed by Clenshaw's recurrence
            # b_m = a_m + 2t b_(m+1) - b_(m+2), dL/dt = b_0, in place over the GEMM's output.
            in_place = _writes_in_place(x)
            reuse = basis if in_place and basis is not None else None  # dead after grad_w
            weight_t = _gemm_weight(coefficients, scaled[:, 1:], k_minor).t()
            a = torch.matmul(grad_y, weight_t, out=reuse).to(t.dtype)
            b = _chebyshev_terms(a, d_in, degree, k_minor)
            for m in range(degree - 2, -1, -1):
                b[m] = torch.addcmul(b[m], t, b[m + 1], value=2, out=b[m] if in_place else None)
                if m + 2 < degree:
                    b[m] = b[m].sub_(b[m + 2]) if in_place else b[m] - b[m + 2]
            grad_x = torch.ops.aten.tanh_backward(b[0], t)  # dt/dx = 1 - t^2
            grad_x = grad_x.to(x.dtype).reshape(x.shape)

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
    compute_dtype = _compute_dtype(x, coefficients)
    if torch.compiler.is_dynamo_compiling():
        # torch.compile's partitioner merges the backward's recomputed basis with the forward's
        # and would keep it for backward (K floats per input); a checkpoint region makes it
        # recompute instead, so the compiled graph too saves only x.
        return torch.utils.checkpoint.checkpoint(
            _ChebyKANFunction.apply, x, coefficients, compute_dtype, use_reentrant=False
        )
    return _ChebyKANFunction.apply(x, coefficients, compute_dtype)


class ChebyKAN(nn.Module):
    """Chebyshev-KAN layer: `coefficients` of shape (in_features, out_features, degree + 1).

    init='original' (the default): C ~ Normal(0, std = 1 / (in_features * (degree + 1))), which
    scales the output to about 1 / sqrt(in_features) of the input's RMS.
    init='variance_preserving' (new): std = 1 / sqrt(in_features * S_K), S_K = `chebyshev_power`,
    so that Var(y) = 1 = Var(x) for standard-normal inputs, as after the block's LayerNorm.
    `memory_efficient=False` selects the straightforward reference formulation.
    `input_scale=True` (an ablation, not in the original) learns a per-input-channel scale s,
    init 1, applied before tanh: t = tanh(s * x). Off, the layer has no such parameter.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        degree: int,
        memory_efficient: bool = True,
        input_scale: bool = False,
        init: KanInit = "original",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if init not in get_args(KanInit):
            raise ValueError(f"ChebyKAN init must be one of {get_args(KanInit)}, got {init!r}")
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise ValueError(
                f"ChebyKAN degree must be an integer >= 1 (got {degree!r}); degree 0 would make the layer a constant"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.degree = degree
        self.memory_efficient = memory_efficient
        self.init = init
        self.coefficients = nn.Parameter(torch.empty(in_features, out_features, degree + 1, device=device, dtype=dtype))
        self.input_scale = nn.Parameter(torch.empty(in_features, device=device, dtype=dtype)) if input_scale else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init == "variance_preserving":
            std = 1.0 / math.sqrt(self.in_features * chebyshev_power(self.degree))
        else:
            std = 1.0 / (self.in_features * (self.degree + 1))
        nn.init.normal_(self.coefficients, std=std)
        if self.input_scale is not None:
            nn.init.ones_(self.input_scale)

    def tanh_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the layer feeds to tanh: x, or s * x with the learned input scale."""
        return x if self.input_scale is None else x * self.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"ChebyKAN expects inputs with last dim {self.in_features}, got shape {list(x.shape)}")
        x = self.tanh_input(x)
        if self.memory_efficient and not torch.jit.is_scripting():
            return cheby_kan(x, self.coefficients)
        return cheby_kan_reference(x, self.coefficients)

    def extra_repr(self) -> str:
        scale = ", input_scale=True" if self.input_scale is not None else ""
        init = f", init={self.init!r}" if self.init != "original" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, degree={self.degree}{scale}{init}"
