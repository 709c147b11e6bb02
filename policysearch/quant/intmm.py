"""The integer GEMM engine: exact integer products for the ``paper`` wiring's linear layers and
attention matmuls.

:func:`int_matmul` multiplies two int8 matrices into int32 accumulators with ``torch._int_mm``
(VNNI on x86 CPUs, IMMA tensor cores on CUDA). CUDA's ``_int_mm`` wants ``M > 16`` and ``K``,
``N`` multiples of 8: the operands are zero-padded to those shapes on every device (one code path;
zero rows and columns add nothing) and the result is cut back. Operands that are not int8 (a
16-bit activation, a 10-bit weight) take the exact wide path, :func:`exact_matmul`.

:func:`exact_matmul` multiplies integer-valued tensors (any float or integer dtype, batched) and
returns the exact integer product: in float32 where the bound ``K * max|a| * max|b| < 2^24``
proves every partial sum exact (float32 holds every integer up to 2^24), else in float64 where
the bound is below 2^53; beyond that it refuses. Attention's two matmuls use it with the bounds
of their operands' bit widths (8-bit ``q·kᵀ`` over a head of 64: ``64 * 128 * 128 = 2^20``).

The engine can be switched to ``"float"`` (:func:`set_engine`, :func:`use_engine`): the linear
layers then run the old float32 simulation (a float32 GEMM over the integer values, exact only
while partial sums stay below 2^24, i.e. up to ``K = 1040`` for 8-bit operands). It is kept for
benchmarks and tests that compare the two; nothing else should switch it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from policysearch.errors import PolicySearchError

__all__ = [
    "ENGINES",
    "FLOAT32_EXACT",
    "FLOAT64_EXACT",
    "exact_matmul",
    "get_engine",
    "int8_fits",
    "int_bmm",
    "int_matmul",
    "set_engine",
    "to_float32",
    "use_engine",
]

#: the engines: "int" (integer GEMMs) and "float" (the old float32 simulation, for comparisons)
ENGINES = ("int", "float")
#: float32 / float64 hold every integer of magnitude up to these exactly
FLOAT32_EXACT = 2**24
FLOAT64_EXACT = 2**53

_engine = "int"


def set_engine(name: str) -> None:
    """Select the linear layers' engine process-wide (``"int"``, default, or ``"float"``)."""
    global _engine
    if name not in ENGINES:
        raise PolicySearchError(f"unknown GEMM engine {name!r}; valid: {', '.join(ENGINES)}")
    _engine = name


def get_engine() -> str:
    return _engine


@contextlib.contextmanager
def use_engine(name: str) -> Iterator[None]:
    """Run a block with the given engine, restoring the previous one after."""
    old = _engine
    set_engine(name)
    try:
        yield
    finally:
        set_engine(old)


def int8_fits(bits: int) -> bool:
    """Whether signed ``bits``-bit integers fit int8 (the fast path)."""
    return bits <= 8


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for ``a`` (M, K) and ``b`` (K, N): int32 from int8 operands via ``torch._int_mm``
    (zero-padded to ``M >= 17`` and ``K``, ``N`` multiples of 8 on every device, as CUDA requires;
    not while tracing for ONNX export, where it becomes ``MatMulInteger``).

    Operands of another dtype take :func:`exact_matmul` (float32 or float64, exact by its bound)
    and the result is int64. int8 products accumulate in int32, which holds any ``K < 2^17``.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise PolicySearchError(f"int_matmul needs (M, K) @ (K, N), got {tuple(a.shape)} @ {tuple(b.shape)}")
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        return exact_matmul(a, b).to(torch.int64)
    M, K = a.shape
    N = b.shape[1]
    if torch.jit.is_tracing():  # ONNX export (MatMulInteger): no shape constraint, and a padding
        return torch._int_mm(a, b)  # computed from the example's M would be baked into the graph
    Mp, Kp, Np = max(M, 17), _round_up(max(K, 1), 8), _round_up(max(N, 1), 8)
    if (Mp, Kp) != (M, K):
        a = F.pad(a, (0, Kp - K, 0, Mp - M))
    if (Kp, Np) != (K, N):
        b = F.pad(b, (0, Np - N, 0, Kp - K))
    out = torch._int_mm(a, b)
    return out if (Mp, Np) == (M, N) else out[:M, :N]


def int_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched ``a @ b`` for int8 ``a`` (..., M, K) and ``b`` (..., K, N) with equal batch shapes:
    int32 (..., M, N), one ``torch._int_mm`` per matrix, zero-padded as :func:`int_matmul`.

    For large matrices (a ViT's attention heads: one Python call per head is cheap next to the
    GEMM); the result may be a strided view of the padded product. Not for tracing (the loop
    would unroll into the graph): callers take :func:`exact_matmul` then.
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() < 2 or a.shape[:-2] != b.shape[:-2] \
            or a.shape[-1] != b.shape[-2]:
        raise PolicySearchError(f"int_bmm needs int8 (..., M, K) @ (..., K, N), got {a.dtype} "
                                f"{tuple(a.shape)} @ {b.dtype} {tuple(b.shape)}")
    *batch, M, K = a.shape
    N = b.shape[-1]
    Mp, Kp, Np = max(M, 17), _round_up(max(K, 1), 8), _round_up(max(N, 1), 8)
    a3 = F.pad(a.reshape(-1, M, K), (0, Kp - K, 0, Mp - M))  # contiguous copies
    b3 = F.pad(b.reshape(-1, K, N), (0, Np - N, 0, Kp - K))
    out = torch.empty((a3.shape[0], Mp, Np), dtype=torch.int32, device=a.device)
    for i in range(a3.shape[0]):
        torch._int_mm(a3[i], b3[i], out=out[i])
    if (Mp, Np) != (M, N):
        out = out[:, :M, :N]
    return out.view(*batch, M, N)


def to_float32(acc: torch.Tensor) -> torch.Tensor:
    """``acc.to(torch.float32)``: a contiguous int32 ``acc`` (a GEMM's fresh accumulators) is
    converted in its own buffer (same width, element by element: no new tensor), except while
    tracing (no dtype views there). The caller gives up ``acc``."""
    if acc.dtype == torch.int32 and acc.is_contiguous() and not torch.jit.is_tracing():
        return acc.view(torch.float32).copy_(acc)
    return acc.to(torch.float32)


def _absmax(t: torch.Tensor) -> float:
    if not t.numel():
        return 0.0
    lo, hi = torch.aminmax(t.detach())  # max |t| in one pass, no |t| buffer
    return max(abs(float(lo)), abs(float(hi)))


def exact_matmul(a: torch.Tensor, b: torch.Tensor, a_max: float | None = None,
                 b_max: float | None = None) -> torch.Tensor:
    """The exact integer product ``a @ b`` of integer-valued tensors (batched as ``torch.matmul``).

    ``a_max`` / ``b_max`` bound ``|a|`` / ``|b|`` (e.g. ``2^(bits-1)``); measured when omitted.
    float32 when ``K * a_max * b_max < 2^24``, float64 when below 2^53 (the result is then float64:
    convert after scaling), else a :class:`PolicySearchError`.
    """
    K = a.shape[-1]
    bound = K * (_absmax(a) if a_max is None else a_max) * (_absmax(b) if b_max is None else b_max)
    if bound < FLOAT32_EXACT:
        return torch.matmul(a.to(torch.float32), b.to(torch.float32))
    if bound < FLOAT64_EXACT:
        return torch.matmul(a.to(torch.float64), b.to(torch.float64))
    raise PolicySearchError(f"integer matmul bound {bound:.3g} exceeds 2^53; use fewer bits")
