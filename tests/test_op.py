"""The torch custom op and the module-level API: opcheck, fake kernels, memory format, fallbacks,
GroupedConv2d and compile_layer."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import gconvgen
from gconvgen import ConvSpec, knobs, memo
from gconvgen.ops import conv2d as ops
from conftest import assert_close

P = pytest.param
# x shape, weight shape, bias, stride, padding (4 sides), dilation, groups, policy, channels_last
OP_CASES = [
    P((2, 12, 7, 7), (12, 4, 3, 3), True, (1, 1), (1, 1, 1, 1), (1, 1), 3, "strict", False, id="grouped"),
    P((2, 8, 7, 7), (16, 1, 3, 3), False, (2, 2), (1, 0, 1, 0), (1, 1), 8, "strict", True, id="depthwise-cl"),
    P((2, 11, 6, 6), (7, 4, 3, 3), True, (1, 1), (1, 1, 1, 1), (2, 2), 3, "pad", False, id="uneven-pad"),
]


@pytest.mark.parametrize("x_shape, w_shape, bias, stride, padding, dilation, groups, policy, channels_last", OP_CASES)
def test_opcheck(x_shape, w_shape, bias, stride, padding, dilation, groups, policy, channels_last):
    x = torch.randn(x_shape)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    args = (x, torch.randn(w_shape), torch.randn(w_shape[0]) if bias else None, stride, padding, dilation, groups,
            policy)
    torch.library.opcheck(ops.conv2d_op, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_fake_kernel_reproduces_shape_dtype_and_memory_format():
    with FakeTensorMode():
        x = torch.empty(4, 16, 14, 10, dtype=torch.float16).to(memory_format=torch.channels_last)
        out = ops.conv2d_op(x, torch.empty(32, 1, 3, 3, dtype=torch.float16), None, (2, 2), (1, 1, 1, 1), (1, 1),
                            16, "strict")
        assert out.shape == (4, 32, 7, 5) and out.dtype == torch.float16
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.cpu_only
def test_cpu_without_interpreter_falls_back_exactly_and_says_so():
    x, weight, bias = torch.randn(2, 11, 6, 6), torch.randn(7, 4, 3, 3), torch.randn(7)
    with knobs.scoped(INTERPRET=0, FALLBACK="warn"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        memo.reset()
        out = gconvgen.conv2d(x, weight, bias, 1, 1, 1, 3, channel_policy="pad")
        gconvgen.conv2d(x, weight, bias, 1, 1, 1, 3, channel_policy="pad")
    assert sum("aten fallback" in str(w.message) for w in caught) == 1, "said once"
    x_padded = F.pad(x.double(), (0, 0, 0, 0, 0, 1))
    expected = torch.cat([F.conv2d(x_padded[:, 4 * g: 4 * g + 4], weight[3 * g: 3 * g + 3].double(),
                                   bias[3 * g: 3 * g + 3].double(), 1, 1) for g in range(3)], dim=1)
    assert_close(out, expected, torch.float32)
    with knobs.scoped(INTERPRET=0, FALLBACK="error"), pytest.raises(RuntimeError, match="GCONVGEN_FALLBACK=error"):
        gconvgen.conv2d(x, weight, bias, 1, 1, 1, 3, channel_policy="pad")


def test_module_is_state_dict_compatible_with_nn_conv2d():
    reference = nn.Conv2d(12, 24, 3, stride=2, padding=1, groups=4, bias=True)
    module = gconvgen.GroupedConv2d(12, 24, 3, stride=2, padding=1, groups=4)
    assert module.state_dict().keys() == reference.state_dict().keys()
    module.load_state_dict(reference.state_dict())
    x = torch.randn(2, 12, 9, 9)
    assert_close(module(x), F.conv2d(x.double(), reference.weight.double(), reference.bias.double(), 2, 1, 1, 4),
                 torch.float32)


def test_module_from_conv_shares_parameters():
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    module = gconvgen.GroupedConv2d.from_conv(conv)
    assert module.weight is conv.weight and module.bias is conv.bias
    x = torch.randn(2, 8, 6, 6)
    assert_close(module(x), F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), 1, 1, 1, 8), torch.float32)


def test_module_pad_policy_and_same_at_stride_2():
    module = gconvgen.GroupedConv2d(11, 7, 3, stride=2, padding="same", groups=3, channel_policy="pad")
    assert module.weight.shape == (7, 4, 3, 3) and module.bias.shape == (7,)
    assert "channel_policy='pad'" in repr(module)
    out = module(torch.randn(2, 11, 9, 8))
    assert out.shape == (2, 7, 5, 4)  # ceil(9 / 2), ceil(8 / 2)


def test_compile_layer_from_spec_and_from_module():
    spec = ConvSpec(8, 16, 8, (3, 3), padding=(1, 1, 1, 1), bias=True)
    layer = gconvgen.compile_layer(spec, device=torch.empty(0).device)
    x, weight, bias = torch.randn(2, 8, 6, 6), torch.randn(16, 1, 3, 3), torch.randn(16)
    assert_close(layer(x, weight, bias), F.conv2d(x.double(), weight.double(), bias.double(), 1, 1, 1, 8),
                 torch.float32)
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
    module_layer = gconvgen.compile_layer(conv)
    assert_close(module_layer(x), F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), 1, 1, 1, 2),
                 torch.float32)
    with pytest.raises(ValueError, match="compiled for"):
        layer(x.half(), weight.half(), bias.half())
    with pytest.raises(ValueError, match="weight has 2 input channels per group"):
        layer(x, torch.randn(16, 2, 3, 3), bias)  # a weight of the wrong shape is refused, never read out of bounds
    with pytest.raises(ValueError, match="bias"):
        layer(x, weight, torch.randn(15))


def test_compile_layer_of_a_grouped_module_with_integer_padding():
    module = gconvgen.GroupedConv2d(11, 7, 3, padding=1, groups=3, channel_policy="pad")
    layer = gconvgen.compile_layer(module)
    x = torch.randn(2, 11, 5, 5)
    torch.testing.assert_close(layer(x), module(x))


@pytest.mark.cpu_only
def test_compile_layer_on_cpu_without_the_interpreter_falls_back():
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=4)
    x = torch.randn(2, 8, 5, 5)
    with knobs.scoped(INTERPRET=0, FALLBACK="warn"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = gconvgen.compile_layer(conv)
        assert layer.kernel is None
        assert_close(layer(x), F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), 1, 1, 1, 4),
                     torch.float32)


def test_converted_module_traces_with_fake_kernels():
    """A model using the op compiles end to end without graph breaks (aot_eager keeps CPU compile time low)."""
    model = nn.Sequential(gconvgen.GroupedConv2d(8, 8, 3, padding=1, groups=4), nn.ReLU())
    x = torch.randn(2, 8, 6, 6)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_inference_skips_the_dispatcher_only_where_nothing_can_tell(monkeypatch):
    """Plain tensors needing no gradient run the op's implementation directly (the dispatcher's Python
    overhead would outweigh small layers); autograd and dispatch modes still see gconvgen::conv2d."""
    x, weight = torch.randn(2, 8, 6, 6), torch.randn(8, 2, 3, 3)
    dispatched = []
    real_op = ops.conv2d_op
    monkeypatch.setattr(ops, "conv2d_op", lambda *args: dispatched.append(1) or real_op(*args))
    expected = F.conv2d(x.double(), weight.double(), None, 1, 1, 1, 4)
    assert_close(gconvgen.conv2d(x, weight, None, 1, 1, 1, 4), expected, torch.float32)
    assert dispatched == []

    weight.requires_grad_()
    gconvgen.conv2d(x, weight, None, 1, 1, 1, 4).sum().backward()  # autograd needs the op
    assert dispatched == [1] and weight.grad is not None

    class SeenOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    seen = []
    with torch.no_grad(), SeenOps():
        assert_close(gconvgen.conv2d(x, weight, None, 1, 1, 1, 4), expected, torch.float32)
    assert torch.ops.gconvgen.conv2d.default in seen and dispatched == [1, 1]
