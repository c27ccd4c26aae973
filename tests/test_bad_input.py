"""Every bad input raises TypeError or ValueError whose message names the parameter and the value."""
from __future__ import annotations

import pytest
import torch

import gconvgen
from gconvgen import ConvSpec

P = pytest.param


def x_():
    return torch.randn(2, 12, 9, 9)


def w_():
    return torch.randn(12, 4, 3, 3)


# call, expected exception, fragments the message must contain
CONV2D_CASES = [
    P(lambda: gconvgen.conv2d([[1.0]], w_(), groups=3), TypeError, ["input", "list"], id="input-not-tensor"),
    P(lambda: gconvgen.conv2d(torch.randn(12, 9), w_(), groups=3), ValueError, ["input", "(12, 9)"], id="input-rank-2"),
    P(lambda: gconvgen.conv2d(torch.randn(1, 2, 12, 9, 9), w_(), groups=3), ValueError, ["input", "5-D"],
      id="input-rank-5"),
    P(lambda: gconvgen.conv2d(x_().long(), w_(), groups=3), TypeError, ["input.dtype", "int64"], id="integer-input"),
    P(lambda: gconvgen.conv2d(x_(), w_().half(), groups=3), TypeError, ["weight.dtype", "float16", "float32"],
      id="mismatched-dtypes"),
    P(lambda: gconvgen.conv2d(x_(), torch.randn(12, 4, 3), groups=3), ValueError, ["weight", "(12, 4, 3)"],
      id="weight-rank-3"),
    P(lambda: gconvgen.conv2d(x_(), w_().to("meta"), groups=3), ValueError, ["weight", "meta", "cpu"],
      id="mismatched-devices"),
    P(lambda: gconvgen.conv2d(x_(), w_(), stride=0, groups=3), ValueError, ["stride=0", ">= 1"], id="zero-stride"),
    P(lambda: gconvgen.conv2d(x_(), w_(), stride=(1, -2), groups=3), ValueError, ["stride=(1, -2)"],
      id="negative-stride"),
    P(lambda: gconvgen.conv2d(x_(), w_(), stride=1.5, groups=3), TypeError, ["stride=1.5"], id="float-stride"),
    P(lambda: gconvgen.conv2d(x_(), w_(), stride=(1, 1, 1), groups=3), ValueError, ["stride=(1, 1, 1)", "3 values"],
      id="stride-tuple-length"),
    P(lambda: gconvgen.conv2d(x_(), w_(), dilation=0, groups=3), ValueError, ["dilation=0"], id="zero-dilation"),
    P(lambda: gconvgen.conv2d(x_(), w_(), padding=-1, groups=3), ValueError, ["padding=-1", ">= 0"],
      id="negative-padding"),
    P(lambda: gconvgen.conv2d(x_(), w_(), padding="full", groups=3), ValueError, ["padding='full'", "'same'"],
      id="unknown-padding-word"),
    P(lambda: gconvgen.conv2d(x_(), w_(), padding=(1, 1, 1), groups=3), ValueError, ["padding=(1, 1, 1)", "2 or 4"],
      id="padding-tuple-length"),
    P(lambda: gconvgen.conv2d(torch.randn(2, 12, 3, 3), torch.randn(12, 4, 7, 7), groups=3), ValueError,
      ["kernel_size=(7, 7)", "padded input"], id="kernel-larger-than-padded-input"),
    P(lambda: gconvgen.conv2d(x_(), w_(), torch.randn(11), groups=3), ValueError, ["bias", "(11,)", "[12]"],
      id="bias-wrong-size"),
    P(lambda: gconvgen.conv2d(x_(), w_(), torch.randn(12).half(), groups=3), TypeError, ["bias.dtype", "float16"],
      id="bias-wrong-dtype"),
    P(lambda: gconvgen.conv2d(x_(), w_(), groups=3, channel_policy="zeros"), ValueError,
      ["channel_policy='zeros'", "'pad'"], id="unknown-channel-policy"),
    P(lambda: gconvgen.conv2d(x_(), w_(), groups=3, data_format="NCWH"), ValueError, ["data_format='NCWH'", "'NHWC'"],
      id="unknown-data-format"),
    P(lambda: gconvgen.conv2d(x_(), w_(), groups=0), ValueError, ["groups=0"], id="zero-groups"),
    P(lambda: gconvgen.conv2d(x_(), w_(), groups=3.0), TypeError, ["groups=3.0"], id="float-groups"),
    P(lambda: gconvgen.conv2d(x_(), w_(), groups=24), ValueError, ["groups=24", "12"], id="groups-exceed-channels"),
    P(lambda: gconvgen.conv2d(x_(), torch.randn(12, 3, 3, 3), groups=3), ValueError, ["weight", "3", "needs 4"],
      id="weight-channels-per-group"),
    P(lambda: gconvgen.conv2d(torch.randn(2, 11, 9, 9), torch.randn(6, 4, 3, 3), groups=3), ValueError,
      ["in_channels=11 is not divisible by groups=3", "1", "channel_policy='pad'", "11 -> 12", "+9.1%"],
      id="uneven-groups-strict"),
    P(lambda: gconvgen.conv2d(torch.randn(2, 5, 9, 9), torch.randn(8, 2, 3, 3), groups=4, channel_policy="pad"),
      ValueError, ["in_channels=5", "groups=4", "no input channels"], id="pad-leaves-empty-group"),
    P(lambda: gconvgen.conv2d(torch.randn(2, 3, 9, 9), torch.randn(3, 2, 3, 3), groups=2, channel_policy="pad"),
      ValueError, ["in_channels=3", "groups=2", "+60.0%", "budget"], id="pad-over-budget"),
    P(lambda: gconvgen.conv2d(x_(), w_(), groups=3, activation=""), ValueError,
      ["activation=''", "use None or one of 'relu'"], id="empty-activation"),    # was taken as None
    P(lambda: gconvgen.conv2d(x_(), w_(), groups=3, activation=1), TypeError, ["activation=1"], id="int-activation"),
    P(lambda: gconvgen.conv2d(x_(), w_(), groups=3, residual=torch.randn(12, 7, 7)), ValueError,
      ["residual has shape (12, 7, 7)", "[2, 12, 7, 7]", "[1, 12, 1, 1] for one value per channel"],
      id="residual-missing-batch-dimension"),
]

# the 1-D API and decoding: call, expected exception, fragments; a fragment starting with "!" must be absent
CONV1D_CASES = [
    P(lambda: gconvgen.conv1d(torch.randn(2, 8, 4), torch.randn(8, 1, 3), padding=1, groups=8,
                              residual=torch.randn(2, 8, 5)), ValueError,
      ["residual has shape (2, 8, 5)", "[2, 8, 4]", "[1, 8, 1]", "!(2, 8, 1, 5)", "!(2, 1, 8, 4)"],
      id="residual-shown-in-1d"),                                    # not the internal height-1 view
    P(lambda: gconvgen.conv1d(torch.randn(2, 4, 8), torch.randn(3, 1, 8), padding=1, groups=8, data_format="NLC",
                              residual=torch.randn(2, 5, 8)), ValueError,
      ["residual has shape (2, 5, 8)", "[2, 4, 8]", "!(2, 1, 5, 8)"], id="residual-nlc-shown-in-1d"),
    P(lambda: gconvgen.conv1d(torch.randn(2, 8, 4), torch.randn(8, 1, 3), stride=(1, 2), groups=8), ValueError,
      ["stride=(1, 2) has 2 values; give one int", "!1 ints"], id="stride-pair"),
    P(lambda: gconvgen.conv1d(torch.randn(2, 8, 4), torch.randn(8, 1, 3), groups=8, activation=""), ValueError,
      ["activation=''"], id="empty-activation"),
    P(lambda: gconvgen.GroupedConv1d(8, 8, 3, groups=8, activation=""), ValueError, ["activation=''"],
      id="module-empty-activation"),
    P(lambda: gconvgen.GroupedConv2d(8, 8, 3, groups=8, activation=""), ValueError, ["activation=''"],
      id="2d-module-empty-activation"),
    P(lambda: gconvgen.causal_conv1d_update(torch.randn(2, 0), torch.randn(2, 0, 3), torch.randn(0, 1, 4)),
      ValueError, ["x has shape (2, 0), 0 channels", "channels >= 1", "!reshape"], id="decode-zero-channels"),
    P(lambda: gconvgen.causal_conv1d_update(torch.randn(2, 3), torch.randn(2, 3, 0), torch.randn(3, 0)),
      ValueError, ["weight has shape (3, 0)", "kernel size k", "!reshape"], id="decode-zero-taps"),
]


@pytest.mark.parametrize("call, error, fragments", CONV1D_CASES)
def test_1d_and_decoding_reject(call, error, fragments):
    with pytest.raises(error) as raised:
        call()
    for fragment in fragments:
        if fragment.startswith("!"):
            assert fragment[1:] not in str(raised.value), f"{fragment[1:]!r} in: {raised.value}"
        else:
            assert fragment in str(raised.value), f"{fragment!r} missing from: {raised.value}"


@pytest.mark.parametrize("call, error, fragments", CONV2D_CASES)
def test_conv2d_rejects(call, error, fragments):
    with pytest.raises(error) as raised:
        call()
    for fragment in fragments:
        assert fragment in str(raised.value), f"{fragment!r} missing from: {raised.value}"


SPEC_CASES = [
    P(dict(in_channels=0), ValueError, ["in_channels=0"], id="zero-channels"),
    P(dict(groups=True), TypeError, ["groups=True"], id="bool-groups"),
    P(dict(kernel_size=3), TypeError, ["kernel_size=3", "tuple of 2"], id="kernel-not-tuple"),
    P(dict(stride=(0, 1)), ValueError, ["stride=(0, 1)"], id="zero-stride"),
    P(dict(padding=(1, 1)), TypeError, ["padding=(1, 1)", "tuple of 4"], id="padding-two-sides"),
    P(dict(dtype="int8"), ValueError, ["dtype='int8'", "bfloat16"], id="unknown-dtype"),
    P(dict(layout="nwhc"), ValueError, ["layout='nwhc'", "nhwc"], id="unknown-layout"),
    P(dict(channel_policy="zeros"), ValueError, ["channel_policy='zeros'"], id="unknown-policy"),
    P(dict(groups=16), ValueError, ["groups=16", "exceeds"], id="groups-exceed-channels"),
]


@pytest.mark.parametrize("override, error, fragments", SPEC_CASES)
def test_conv_spec_rejects(override, error, fragments):
    arguments = dict(in_channels=12, out_channels=12, groups=3, kernel_size=(3, 3)) | override
    with pytest.raises(error) as raised:
        ConvSpec(**arguments)
    for fragment in fragments:
        assert fragment in str(raised.value), f"{fragment!r} missing from: {raised.value}"


def test_module_rejects_padding_mode():
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        gconvgen.GroupedConv2d(8, 8, 3, groups=2, padding_mode="reflect")


def test_module_rejects_uneven_channels_under_strict():
    with pytest.raises(ValueError, match="in_channels=11 is not divisible by groups=3"):
        gconvgen.GroupedConv2d(11, 6, 3, groups=3)
