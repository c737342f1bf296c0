"""Per-vector symmetric int8 (shared by InContext K/V and INTRA token states)."""

from __future__ import annotations

import torch

from intrinsic_retrieval.models.quant import dequantize_int8, quantize_int8


def test_round_trip_error_is_half_a_step() -> None:
    x = torch.randn(5, 3, 64, generator=torch.Generator().manual_seed(0)) * 4
    q, s = quantize_int8(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (5, 3)
    assert int(q.abs().max()) == 127
    back = dequantize_int8(q, s)
    assert back.dtype == torch.float32 and back.shape == x.shape
    step = s.float()[..., None]
    # half a step, plus the float16 rounding of the scale itself (relative 2^-11 at 127 steps)
    assert ((back - x).abs() <= step / 2 + x.abs() * 2**-11 + 1e-6).all()


def test_zero_and_mixed_rows() -> None:
    x = torch.zeros(3, 8)
    x[1] = torch.linspace(-2, 2, 8)
    q, s = quantize_int8(x)
    back = dequantize_int8(q, s)
    assert torch.isfinite(back).all()
    assert torch.equal(back[0], torch.zeros(8)) and torch.equal(back[2], torch.zeros(8))
    assert q[1, 0] == -127 and q[1, -1] == 127  # the row's absmax maps to the last step
    torch.testing.assert_close(back[1], x[1], rtol=0, atol=float(s[1]) / 2 + 1e-3)


def test_incontext_reexport_is_the_shared_function() -> None:
    from intrinsic_retrieval.retrievers.incontext import attention

    assert attention.quantize_int8 is quantize_int8
    assert attention.dequantize_int8 is dequantize_int8
