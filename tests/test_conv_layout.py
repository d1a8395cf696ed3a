"""The column convolution's memory format: measured once per geometry on the CPU (capture/conv_layout.py)."""

import time

import pytest
import torch

from lightning_influence.capture import HookGradientCapture, per_sample_grads_hooks
from lightning_influence.capture import conv_layout, measured

from test_layers import ConvPaths, PATH_SPLITS, _folded_projector, _image_case, seq_loss
from test_per_sample import brute_force


@pytest.fixture(autouse=True)
def fresh_choices():
    """No choice left from another test, and deterministic algorithms off (a Trainer(deterministic=True) of an earlier
    test leaves them on for the process), each restored after."""
    deterministic, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    conv_layout.chosen.clear()
    conv_layout.orders.clear()
    yield
    conv_layout.chosen.clear()
    conv_layout.orders.clear()
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _busy(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def _timed_conv(nchw_s: float, last_s: float):
    """A stand-in convolution that takes ``nchw_s`` or ``last_s`` seconds of thread CPU by its input's format."""
    calls = []

    def conv(x):
        last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        calls.append(last)
        _busy(last_s if last else nchw_s)
        return x
    return conv, calls


@pytest.mark.parametrize("channels, nchw_s, last_s, expected", [
    (32, 0.004, 0.002, True),    # many channels (fixed rule NCHW), channels-last twice as fast: taken
    (32, 0.002, 0.004, False),   # channels-last slower: the fixed rule's NCHW
    (32, 0.004, 0.0039, False),  # within the margin: the fixed rule
    (3, 0.002, 0.004, False),    # a few channels (fixed rule channels-last), NCHW twice as fast: NCHW taken
    (3, 0.002, 0.00205, True),   # NCHW faster, but within the margin: the fixed rule's channels-last
])
def test_the_faster_format_is_taken_beyond_the_margin(monkeypatch, channels, nchw_s, last_s, expected):
    monkeypatch.setattr(conv_layout, "MEASURED_FLOPS", 0)
    x, kernel = torch.zeros(2, channels, 6, 6), torch.zeros(4, channels, 3, 3)
    conv, calls = _timed_conv(nchw_s, last_s)
    assert conv_layout.channels_last(x, kernel, (1, 1, 1, 1), conv, None) is expected
    assert sorted(calls) == [False] * (measured.REPEATS + 1) + [True] * (measured.REPEATS + 1)
    assert conv_layout.channels_last(x, kernel, (1, 1, 1, 1), conv, None) is expected  # cached: not measured again
    assert len(calls) == 2 * (measured.REPEATS + 1)
    assert conv_layout.channels_last(x, kernel, (2, 1, 1, 1), conv, None) is expected  # another stride: measured
    assert len(calls) == 4 * (measured.REPEATS + 1)


def test_a_long_measurement_stops_after_one_pair(monkeypatch):
    monkeypatch.setattr(conv_layout, "MEASURED_FLOPS", 0)
    monkeypatch.setattr(measured, "LONG_SECONDS", 0.003)
    conv, calls = _timed_conv(0.004, 0.002)
    assert conv_layout.channels_last(torch.zeros(2, 32, 6, 6), torch.zeros(4, 32, 3, 3), (1, 1, 1, 1), conv, None)
    assert sorted(calls) == [False, True]


def test_small_convolutions_follow_the_fixed_rule_unmeasured():
    conv, calls = _timed_conv(0.0, 0.0)
    assert conv_layout.channels_last(torch.zeros(2, 3, 6, 6), torch.zeros(4, 3, 3, 3), (1, 1, 1, 1), conv, None)
    assert not conv_layout.channels_last(torch.zeros(2, 8, 6, 6), torch.zeros(4, 8, 3, 3), (1, 1, 1, 1), conv, None)
    assert calls == []


def test_deterministic_algorithms_take_the_fixed_rule_unmeasured(monkeypatch):
    """Trainer(deterministic=True) sets torch.use_deterministic_algorithms: no timing may decide the rows' rounding."""
    monkeypatch.setattr(conv_layout, "MEASURED_FLOPS", 0)
    conv, calls = _timed_conv(0.004, 0.001)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert not conv_layout.channels_last(torch.zeros(2, 8, 6, 6), torch.zeros(4, 8, 3, 3), (1, 1, 1, 1), conv, None)
    assert calls == []


def test_an_input_in_channels_last_stays_so(monkeypatch):
    monkeypatch.setattr(conv_layout, "MEASURED_FLOPS", 0)
    conv, calls = _timed_conv(0.0, 0.0)
    x = torch.zeros(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    assert conv_layout.channels_last(x, torch.zeros(4, 8, 3, 3), (1, 1, 1, 1), conv, None) and calls == []


@pytest.mark.parametrize("last", [False, True])
def test_rows_match_brute_force_in_either_format(monkeypatch, last):
    """Every convolution path (strides, dilation, groups, 1x1 kernels, padding modes) measured, then forced to one
    format: float64 rows equal projected brute-force per-sample autograd at 1e-10 either way."""
    model, batch, names = _image_case(ConvPaths, (3, 8, 8))
    proj = _folded_projector(model, names, 20, PATH_SPLITS)
    expected = proj.project(brute_force(model, seq_loss, batch, names))
    monkeypatch.setattr(conv_layout, "MEASURED_FLOPS", 0)
    capture = HookGradientCapture(model, names, proj)
    measured, _ = per_sample_grads_hooks(model, seq_loss, batch, capture)
    torch.testing.assert_close(measured, expected, rtol=1e-10, atol=1e-12)
    assert len(conv_layout.chosen) >= 3  # c1, c3, gc measured (the 1x1 kernels run no column convolution)
    conv_layout.chosen.update({key: last for key in conv_layout.chosen})
    grads, _ = per_sample_grads_hooks(model, seq_loss, batch, capture)
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)


def test_a_large_product_order_is_measured_once_per_shape_and_strides(monkeypatch):
    """The two orders of ``g colsᵀ`` are timed at a shape's first call (both orders, the same product), then the
    choice is reused; another layout of the columns is another key; deterministic algorithms measure nothing."""
    runs = []
    real = measured.fastest

    def spy(cache, key, options, default):
        runs.append(key)
        return real(cache, key, options, default)

    monkeypatch.setattr(measured, "fastest", spy)
    monkeypatch.setattr(conv_layout, "MEASURED_FLOPS", 0)
    g = torch.randn(4, 6, 50, dtype=torch.float64)
    cols = torch.randn(4, 3, 50, dtype=torch.float64)
    last = torch.randn(4, 50, 3, dtype=torch.float64).transpose(1, 2)
    for c in (cols, cols, last):
        torch.testing.assert_close(conv_layout.times_columns(g, c), torch.einsum("brl,bkl->brk", g, c),
                                   rtol=1e-12, atol=1e-12)
    assert len(conv_layout.orders) == 2 and len(runs) == 3  # measured per key; a repeat finds its choice cached
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    conv_layout.times_columns(torch.randn(4, 7, 50, dtype=torch.float64), cols)
    assert len(conv_layout.orders) == 2 and len(runs) == 3


def test_small_products_follow_the_fixed_order_unmeasured():
    g, cols = torch.randn(2, 6, 10), torch.randn(2, 10, 3).transpose(1, 2)
    conv_layout.times_columns(g, cols)
    assert conv_layout.orders == {}


@pytest.mark.parametrize("transposed", [False, True])
def test_rows_match_brute_force_in_either_product_order(monkeypatch, transposed):
    """Every convolution path with its products forced to one order: float64 rows equal projected brute-force
    per-sample autograd at 1e-10 either way."""
    model, batch, names = _image_case(ConvPaths, (3, 8, 8))
    proj = _folded_projector(model, names, 20, PATH_SPLITS)
    expected = proj.project(brute_force(model, seq_loss, batch, names))
    monkeypatch.setattr(conv_layout, "MEASURED_FLOPS", 0)
    capture = HookGradientCapture(model, names, proj)
    per_sample_grads_hooks(model, seq_loss, batch, capture)
    assert len(conv_layout.orders) >= 2
    conv_layout.orders.update({key: transposed for key in conv_layout.orders})
    grads, _ = per_sample_grads_hooks(model, seq_loss, batch, capture)
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)
