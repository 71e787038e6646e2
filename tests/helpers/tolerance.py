"""Tolerances derived from the reference computation's own rounding error.

A comparison of two float32 computations (a fast path against its reference) allows
``FACTOR`` times the error the float32 reference itself makes against the same reference
run in float64, plus a few float32 ulps of the values' scale for the case where the
reference happens to be exact. Nothing is a guessed constant.
"""

from __future__ import annotations

import torch

FACTOR = 4.0  # a different summation order may double the error; twice that is the margin
ULPS = 8


def reference_error(ref32: torch.Tensor, ref64: torch.Tensor) -> float:
    """Max |ref32 - ref64|: what float32 rounding costs the reference on these inputs."""
    return (ref32.detach().double() - ref64.detach().double()).abs().max().item()


def derived_atol(ref32: torch.Tensor, ref64: torch.Tensor, factor: float = FACTOR) -> float:
    scale = max(ref64.detach().abs().max().item(), 1.0)
    return factor * reference_error(ref32, ref64) + ULPS * torch.finfo(torch.float32).eps * scale


def assert_close_derived(
    got: torch.Tensor, ref32: torch.Tensor, ref64: torch.Tensor, factor: float = FACTOR, msg: str = ""
) -> None:
    """``got`` (float32) is within the derived tolerance of the fp64 reference."""
    allowed = derived_atol(ref32, ref64, factor)
    err = reference_error(got, ref64)
    assert err <= allowed, f"{msg}: error {err:.3g} > allowed {allowed:.3g} (reference's own error x{factor})"


def sum_atol(n: int, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> float:
    """Bound on the rounding error of a sum of ``n`` terms of magnitude ``scale`` (n ulps)."""
    return n * torch.finfo(dtype).eps * scale
