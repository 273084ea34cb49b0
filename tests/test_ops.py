"""seg.ops: the reachable-tap convolution equals the plain convolution, output and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from seg import ops

_PLAIN = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}

CASES = [  # dims, channels in/out, groups, kernel, dilation, input size
    (3, 8, 8, 8, 7, 1, (2, 2, 1)),        # depthwise 7^3 on a deep level smaller than the kernel
    (3, 8, 8, 8, 7, 1, (4, 4, 2)),        # partly cropped (7, 7, 3)
    (3, 6, 5, 1, 3, 6, (4, 4, 2)),        # ASPP branch whose rate exceeds the map
    (3, 6, 5, 1, 3, (1, 2, 3), (3, 5, 4)),  # per-axis dilation
    (2, 6, 4, 2, (7, 3), (1, 2), (3, 9)),  # grouped, anisotropic kernel
    (2, 4, 4, 1, 3, 12, (5, 6)),          # 1x1 effective
    (2, 4, 4, 1, 5, 1, (16, 16)),         # nothing to crop
    (1, 4, 4, 4, 7, 1, (3,)),
]


@pytest.mark.parametrize("dims,cin,cout,groups,k,dil,size", CASES)
def test_reachable_conv_equals_plain_conv(dims, cin, cout, groups, k, dil, size):
    torch.manual_seed(0)
    conv = ops.conv(dims, cin, cout, k, dilation=dil, groups=groups).double()
    plain = _PLAIN[dims](cin, cout, conv.kernel_size, padding=conv.padding, dilation=conv.dilation,
                         groups=groups).double()
    plain.load_state_dict(conv.state_dict())  # same parameters and state dict layout
    x1 = torch.randn(2, cin, *size, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = conv(x1), plain(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv.weight.grad, plain.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv.bias.grad, plain.bias.grad, rtol=1e-12, atol=1e-12)


def test_reachable_taps_closed_form():
    # 7-tap kernel on a 2-long axis: only offsets -1, 0, +1 can reach the input
    assert ops.reachable_taps((7, 7, 7), (1, 1, 1), (3, 3, 3), (2, 5, 1)) == \
        (slice(2, 5), slice(0, 7), slice(3, 4))
    # rate 6 on an axis of 6: offsets +-6 never reach; on 7 they do
    assert ops.reachable_taps((3,), (6,), (6,), (6,)) == (slice(1, 2),)
    assert ops.reachable_taps((3,), (6,), (6,), (7,)) is None
    # not a 'same' convolution: left alone
    assert ops.reachable_taps((3,), (1,), (0,), (1,)) is None
    assert ops.reachable_taps((4,), (1,), (2,), (1,)) is None


def test_strided_and_non_zero_padding_convs_are_plain():
    torch.manual_seed(0)
    for conv in (ops.conv(2, 3, 3, 3, stride=2), ops.conv(2, 3, 3, 3, padding_mode="reflect")):
        x = torch.randn(1, 3, 2, 2)
        ref = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect") if conv.padding_mode == "reflect"
                       else x, conv.weight, conv.bias, conv.stride,
                       0 if conv.padding_mode == "reflect" else conv.padding)
        torch.testing.assert_close(conv(x), ref)
