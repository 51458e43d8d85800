"""dice_math.h's online softmax merge, run on the CPU.

The CUDA kernels spread a pixel's channels over several lanes: each lane keeps an online
normaliser (m, s) of its channels (``online_softmax_update``) and the lanes are combined by an xor
butterfly of ``online_softmax_merge`` (pixel_norm_kernel, for huge channel counts).  The extension
exposes exactly that computation as ``dicetorch::_softmax_normaliser_lanes(x, lanes)``; these tests
hold it to m = max_k x_k, s = sum_k exp(x_k - m) for every lane count, with the -inf / NaN / +inf
semantics of torch.softmax.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import INTERPRETED
from dicetorch import ops

pytestmark = [
    pytest.mark.skipif(INTERPRETED or not ops.extension_info()["cpu"], reason="needs the C++ extension"),
    pytest.mark.skipif(
        ops.extension_info()["cpu"] and not hasattr(torch.ops.dicetorch, "_softmax_normaliser_lanes"),
        reason="the built dicetorch._C predates _softmax_normaliser_lanes: rebuild the extension",
    ),
]

inf, nan = float("inf"), float("nan")
LANES = (1, 2, 4, 8, 32)


def _lanes(rows, lanes):
    return torch.ops.dicetorch._softmax_normaliser_lanes(rows, lanes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lanes", LANES)
def test_merge_matches_max_and_sum(dtype, lanes):
    g = torch.Generator().manual_seed(lanes)
    rows = 4.0 * torch.randn(64, 37, generator=g, dtype=dtype)
    rows[::3, :5] = -inf  # leading -inf channels: a lane may see only -inf
    rows[1, :] = -inf
    rows[1, 36] = 3.0  # only the last channel finite
    out = _lanes(rows, lanes)
    m = rows.amax(1)
    torch.testing.assert_close(out[:, 0], m)
    torch.testing.assert_close(out[:, 1], torch.exp(rows - m.unsqueeze(1)).sum(1), rtol=1e-6, atol=0)
    # the same values as the one-lane online update the other tests pin down
    torch.testing.assert_close(out, torch.ops.dicetorch._softmax_normaliser(rows), rtol=1e-6, atol=0)


@pytest.mark.parametrize("lanes", LANES)
def test_merge_special_values(lanes):
    rows = torch.tensor(
        [
            [-inf] * 8,  # every channel -inf: s = 0, so p = NaN, as torch.softmax gives
            [-inf, nan, -inf, -inf, -inf, -inf, -inf, -inf],  # NaN in a lane of -inf: stays NaN
            [1.0, 2.0, nan, 0.0, -inf, 5.0, 1.0, 1.0],
            [-inf, inf, 0.0, 1.0, -inf, -inf, 2.0, 3.0],  # one +inf: p = exp(x - inf) / s is NaN there
            [inf, 0.0, 0.0, 0.0, inf, 0.0, 0.0, 0.0],  # two +inf: s = NaN (inf - inf), as in torch
        ],
        dtype=torch.float64,
    )
    out = _lanes(rows, lanes)
    assert out[0, 0] == -inf and out[0, 1] == 0
    assert math.isnan(out[1, 1]) and math.isnan(out[2, 1])
    # one +inf: m = inf; s = 1 when no other lane holds a finite channel (p NaN at the +inf only),
    # else NaN (exp(inf - inf), every p NaN, which is what torch.softmax gives)
    assert out[3, 0] == inf and (out[3, 1] == 1 or math.isnan(out[3, 1]))
    assert out[4, 0] == inf and math.isnan(out[4, 1])


def test_lanes_argument_checked():
    with pytest.raises(RuntimeError, match="power of two"):
        _lanes(torch.zeros(2, 3), 3)
