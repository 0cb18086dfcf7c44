"""Quantization core: parameters, rounding, clamping, channel axes, observers, GPTQ, packing.

Expected values are worked out by hand in the comments, not recomputed with the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graphopt.quantization import (OBSERVERS, QuantSpec, TensorQuant, block_params, dequantize, fake_quantize,
                                   fake_quantize_dynamic, gptq, make_observer, qparams, quantize, weight_format)
from graphopt.quantization.onnx_ops import pack_nbits, unsigned_codes


pytestmark = pytest.mark.usefixtures("one_thread")

U8 = TensorQuant(8, False, "asymmetric", "per-tensor")
S8_CHANNEL = TensorQuant(8, True, "symmetric", "per-channel", axis=0)


def test_asymmetric_u8_parameters_by_hand():
    # [-1, 3] over 255 steps: scale 4/255; zero point round(0 - (-1) / (4/255)) = round(63.75) = 64.
    scale, zero = qparams(torch.tensor(-1.0), torch.tensor(3.0), U8)
    assert scale.item() == pytest.approx(4 / 255)
    assert zero.item() == 64


def test_range_is_widened_to_include_zero():
    # [2, 4] becomes [0, 4]: scale 4/255, zero point 0, so 0.0 is exact.
    scale, zero = qparams(torch.tensor(2.0), torch.tensor(4.0), U8)
    assert scale.item() == pytest.approx(4 / 255) and zero.item() == 0


def test_symmetric_s8_per_channel_by_hand():
    # Row amax 1.27 and 0.5: restricted range [-127, 127], scales 0.01 and 0.5/127, zero points 0.
    w = torch.tensor([[1.27, -0.3, 0.0], [0.1, -0.5, 0.25]])
    scale, zero = qparams(w.amin(1), w.amax(1), S8_CHANNEL)
    np.testing.assert_allclose(scale.numpy(), [0.01, 0.5 / 127], rtol=1e-6)
    assert zero.tolist() == [0, 0]
    assert (S8_CHANNEL.qmin, S8_CHANNEL.qmax) == (-127, 127)


def test_rounding_is_half_to_even_and_clamps_at_the_range():
    tq = S8_CHANNEL.with_params(np.array([0.5], np.float32), np.array([0], np.int32))
    # x / 0.5 = 0.5, 1.5, 2.5, -2.5 -> ties to even: 0, 2, 2, -2; 100 / 0.5 = 200 -> 127; -200 -> -127.
    x = torch.tensor([[0.25, 0.75, 1.25, -1.25, 100.0, -100.0]])
    assert quantize(x, tq).tolist() == [[0, 2, 2, -2, 127, -127]]
    assert dequantize(quantize(x, tq), tq).tolist() == [[0.0, 1.0, 1.0, -1.0, 63.5, -63.5]]


def test_zero_point_offsets_codes_and_clamps_to_u8():
    tq = U8.with_params(np.array(0.1, np.float32), np.array(10, np.int32))
    # round(x / 0.1) + 10: -1.0 -> 0, -2.0 -> -10 clamps to 0, 1.0 -> 20, 30.0 -> 310 clamps to 255.
    assert quantize(torch.tensor([-1.0, -2.0, 1.0, 30.0]), tq).tolist() == [0, 0, 20, 255]


def test_channel_axis_selects_which_scale_applies():
    # axis 1: column j uses scale[j]; 1.0 / [0.5, 0.25, 1.0] = [2, 4, 1] in every row.
    tq = TensorQuant(8, True, "symmetric", "per-channel", axis=1).with_params(
        np.array([0.5, 0.25, 1.0], np.float32), np.zeros(3, np.int32))
    assert quantize(torch.ones(2, 3), tq).tolist() == [[2, 4, 1], [2, 4, 1]]
    tq0 = TensorQuant(8, True, "symmetric", "per-channel", axis=0).with_params(
        np.array([0.5, 0.25], np.float32), np.zeros(2, np.int32))
    assert quantize(torch.ones(2, 3), tq0).tolist() == [[2, 2, 2], [4, 4, 4]]


def test_reduced_range_uses_seven_bits():
    tq = weight_format(8, reduce_range=True)
    assert (tq.qmin, tq.qmax) == (-63, 63)
    scale, _ = qparams(torch.tensor([-1.26]), torch.tensor([0.5]), tq)
    assert scale.item() == pytest.approx(0.02)  # 1.26 / 63


def test_per_block_scales_cover_blocks_along_inputs():
    # One row, two blocks of 4: [0..3] -> amax 3, [4..7] -> amax 7; s4 symmetric range [-7, 7].
    w = torch.arange(8, dtype=torch.float32).reshape(1, 8)
    tq = block_params(w, weight_format(4, "symmetric", "per-block", 4))
    np.testing.assert_allclose(tq.scale, [[3 / 7, 1.0]], rtol=1e-6)
    assert quantize(w, tq).tolist() == [[0, 2, 5, 7, 4, 5, 6, 7]]  # 1/(3/7)=2.33->2, 2/(3/7)=4.67->5


@pytest.mark.parametrize("tq", [U8, S8_CHANNEL, weight_format(4, "asymmetric", "per-block", 16)])
def test_fake_quantize_equals_dequantize_of_quantize(tq):
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    if tq.granularity == "per-block":
        tq = block_params(x, tq)
    elif tq.granularity == "per-channel":
        tq = tq.with_params(*qparams(x.amin(1), x.amax(1), tq))
    else:
        tq = tq.with_params(*qparams(x.min(), x.max(), tq))
    torch.testing.assert_close(fake_quantize(x, tq), dequantize(quantize(x, tq), tq), rtol=0, atol=1e-6)


def test_dynamic_fake_quantize_uses_the_tensors_own_range():
    # DynamicQuantizeLinear: [-0.5, 2.0] -> scale 2.5/255, zero point round(0.5 / scale) = round(51) = 51.
    x = torch.tensor([-0.5, 0.0, 2.0, 1.0])
    scale = 2.5 / 255
    expected = (torch.clamp(torch.round(x / scale) + 51, 0, 255) - 51) * scale
    torch.testing.assert_close(fake_quantize_dynamic(x, U8), expected, rtol=0, atol=1e-6)


def test_minmax_observer_keeps_the_running_extremes():
    obs = make_observer("minmax", U8)
    obs.update(torch.tensor([-1.0, 0.5]))
    obs.update(torch.tensor([0.0, 3.0]))
    tq = obs.compute()
    assert float(tq.scale) == pytest.approx(4 / 255) and int(tq.zero_point) == 64
    assert tq.observer == "minmax"


def test_moving_average_observer_by_hand():
    obs = make_observer("moving-average", U8, averaging_constant=0.5)
    obs.update(torch.tensor([-1.0, 1.0]))   # lo -1, hi 1
    obs.update(torch.tensor([-3.0, 5.0]))   # lo -1 + 0.5(-3+1) = -2, hi 1 + 0.5(5-1) = 3
    assert float(obs.compute().scale) == pytest.approx(5 / 255)


def test_per_channel_minmax_observer_on_axis_0():
    obs = make_observer("minmax", S8_CHANNEL)
    obs.update(torch.tensor([[1.27, -0.5], [0.2, -2.54]]))
    np.testing.assert_allclose(obs.compute().scale, [0.01, 0.02], rtol=1e-6)


def test_percentile_observer_clips_the_tails():
    # 0..9999 uniform with one far outlier: the 99th percentile is about 9900, not the outlier.
    x = torch.cat([torch.arange(10000, dtype=torch.float32), torch.tensor([1e6])])
    obs = make_observer("percentile", U8, percentile=99.0)
    obs.update(x)
    lo, hi = obs.range()
    assert float(lo) <= 0.0 and 9000 < float(hi) < 1.1e4


def test_mse_observer_clips_an_outlier_but_not_uniform_data():
    uniform = torch.linspace(0, 1, 10001)
    obs = make_observer("mse", U8)
    obs.update(uniform)
    assert float(obs.range()[1]) == pytest.approx(1.0, rel=0.02)
    # One outlier at 60 among a million N(0, 1) values: the rounding error saved over the
    # million outweighs clipping the one value, so the range is cut well below 60.
    outlier = torch.cat([torch.randn(1_000_000, generator=torch.Generator().manual_seed(0)), torch.tensor([60.0])])
    obs = make_observer("mse", U8)
    obs.update(outlier)
    assert float(obs.range()[1]) < 55.0


def test_mse_observer_per_channel_never_worse_than_minmax():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    w[0, 0] = 12.0
    errors = {}
    for name in ("minmax", "mse"):
        obs = make_observer(name, S8_CHANNEL)
        obs.update(w)
        errors[name] = float(((fake_quantize(w, obs.compute()) - w) ** 2).sum())
    assert errors["mse"] <= errors["minmax"]


def test_bad_formats_and_observers_are_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"3-bit quantization is not supported; use one of \(4, 8\)"):
        TensorQuant(3, True, "symmetric", "per-tensor")
    with pytest.raises(ValueError, match="unknown observer 'minmx': did you mean 'minmax'"):
        make_observer("minmx", U8)
    with pytest.raises(ValueError, match="per-block quantization needs block_size"):
        TensorQuant(4, False, "asymmetric", "per-block", axis=1)
    with pytest.raises(ValueError, match="needs a calibrated input"):
        QuantSpec("static", "linear", (2, 2), weight=S8_CHANNEL, input=U8)
    assert set(OBSERVERS) == {"minmax", "moving-average", "percentile", "mse"}


def test_gptq_beats_round_to_nearest_on_correlated_inputs_and_is_representable():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(64, 64, generator=g)
    x = torch.randn(512, 64, generator=g) @ mix  # correlated input features
    w = torch.randn(32, 64, generator=g)
    fmt = weight_format(4, "asymmetric", "per-block", 16)
    w_gptq, tq = gptq(w, 2 * x.T @ x / len(x), fmt)
    w_rtn = fake_quantize(w, block_params(w, fmt))
    err_gptq = float(((x @ (w_gptq - w).T) ** 2).sum())
    err_rtn = float(((x @ (w_rtn - w).T) ** 2).sum())
    assert err_gptq < 0.8 * err_rtn
    torch.testing.assert_close(dequantize(quantize(w_gptq, tq), tq), w_gptq, rtol=0, atol=1e-6)


def test_pack_nbits_low_nibble_first_and_unsigned_shift():
    assert pack_nbits(np.array([[1, 2, 15, 0]]), 4).tolist() == [[0x21, 0x0F]]
    assert pack_nbits(np.array([[1, 2, 3]]), 4).tolist() == [[0x21, 0x03]]  # odd length padded with 0
    tq = weight_format(4, "symmetric", "per-block", 16)
    codes, zero = unsigned_codes(np.array([-7, 0, 7]), np.array([0]), tq)
    assert codes.tolist() == [1, 8, 15] and zero.tolist() == [8]


def test_smoothing_factors_by_hand():
    from graphopt.quantization import smoothing_factors

    # alpha 0.5: s_j = sqrt(max|x_j|) / sqrt(max|W_:j|): [sqrt(4)/sqrt(1), sqrt(1)/sqrt(4)] = [2, 0.5];
    # a channel that never fires keeps 1. The two weights share one factor (max over both).
    w1 = torch.tensor([[1.0, -2.0, 3.0]])
    w2 = torch.tensor([[-0.5, 4.0, 1.0]])
    s = smoothing_factors(torch.tensor([4.0, 1.0, 0.0]), [w1, w2], 0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 0.5, 1.0]))


def test_smoothed_quant_linear_quantizes_x_over_s_and_w_times_s():
    from graphopt.quantization import QuantLinear

    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, generator=g)
    s = torch.rand(8, generator=g) + 0.5
    act = U8.with_params(*qparams((x / s).min(), (x / s).max(), U8))
    wtq = weight_format(8).with_params(*qparams((linear.weight * s).amin(1), (linear.weight * s).amax(1),
                                                weight_format(8)))
    spec = QuantSpec("static", "linear", (4, 8), weight=wtq, input=act, smoothing=s.numpy())
    expected = torch.nn.functional.linear(fake_quantize(x / s, act), fake_quantize(linear.weight * s, wtq), linear.bias)
    torch.testing.assert_close(QuantLinear(linear, spec)(x), expected)
    with pytest.raises(ValueError, match="one factor per input channel"):
        QuantSpec("static", "linear", (4, 8), weight=wtq, input=act, smoothing=s[:4].numpy())
