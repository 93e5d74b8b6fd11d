"""Model pieces whose behaviour the trainer relies on."""

from __future__ import annotations

import torch

from models.layers import LayerNorm2d, layout_preserving_layer_norm


def test_the_layout_preserving_layer_norm_equals_group_norm_through_the_double_backward():
    """What LayerNorm2d runs on CUDA for channels_last inputs (there native_group_norm would convert to NCHW)."""
    torch.manual_seed(0)
    norm = LayerNorm2d(8)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(4, 8, 6, 6).to(memory_format=torch.channels_last).requires_grad_(True)
    y = layout_preserving_layer_norm(x, norm.weight, norm.bias, norm.eps)
    reference = norm(x)  # GroupNorm(1, C) on the CPU
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)
    # The penalty differentiates the input gradient once more, down to the weights.
    grad = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)[0]
    expected = torch.autograd.grad(reference.pow(3).sum(), x, create_graph=True)[0]
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-4)
    second = torch.autograd.grad(grad.pow(2).sum(), norm.weight)[0]
    expected_second = torch.autograd.grad(expected.pow(2).sum(), norm.weight)[0]
    torch.testing.assert_close(second, expected_second, rtol=1e-4, atol=1e-4)
