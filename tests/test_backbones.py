"""HVPs of torchvision's own architectures (small configurations of them) against finite differences of
gradients, in every kernel: the attention of a ViT and a Swin (fused SDPA kernels have no double
backward), ConvNeXt's LayerNorm2d and layer scales, and the parameter groups they fill."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

from conftest import flat_loss
from flatlens.measure.objective import Objective


def _vit() -> nn.Module:
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=4)


def _swin() -> nn.Module:
    return SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2],
                           num_classes=4)


def _convnext() -> nn.Module:
    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=4)


@pytest.mark.parametrize("build, other", [
    (_vit, ["class_token", "encoder.pos_embedding"]),
    (_swin, ["features.1.0.attn.relative_position_bias_table", "features.3.0.attn.relative_position_bias_table"]),
    (_convnext, ["features.1.0.layer_scale", "features.3.0.layer_scale"]),
])
def test_torchvision_architectures_get_right_hvps_and_name_what_weights_leave_out(build, other):
    torch.manual_seed(0)
    net = build().double().eval()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 3, 32, 32, generator=gen, dtype=torch.float64), torch.tensor([0, 3, 1])
    with pytest.warns(UserWarning, match="belong to no layer group and are not measured: " + ", ".join(other)):
        obj = Objective(net, batches=[(x, y)], kernel="double_backward")
    assert obj.left_out == other
    if build is _vit:  # the Q/K/V projections are weights (they were in no group)
        assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in obj.space.names
    grad = torch.func.grad(flat_loss(obj))
    w = obj.space.origin_vector()
    v = torch.randn(len(w), generator=gen, dtype=torch.float64)
    v /= v.norm()
    fd = (grad(w + 1e-6 * v) - grad(w - 1e-6 * v)) / 2e-6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for kernel in ("graph_reuse", "double_backward", "forward_over_reverse"):
            hv = Objective(net, batches=[(x, y)], kernel=kernel).hvp(v)
            assert float((hv - fd).norm() / fd.norm()) < 1e-6, kernel


def test_a_quantized_vit_in_latent_space_is_the_masked_dequant_hessian():
    """4-bit LSQ quantizers attached to a torchvision ViT: the latent-space HVP is the straight-through
    surrogate's, ``m * H_dequant (m * v)`` with ``m`` the unclipped mask (the check of
    test_hessian.py for a CNN), in every kernel."""
    from flatlens.quant import LSQQuantizer, attach_quantizers

    torch.manual_seed(0)
    net = _vit().double()
    attach_quantizers(net, enabled=True, bits=4)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 3, 32, 32, generator=gen, dtype=torch.float64), torch.tensor([0, 3, 1])
    with torch.no_grad():
        net(x)  # initialises the step sizes
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # class token and position embedding left out
        deq = Objective(net, batches=[(x, y)], space="dequant", kernel="double_backward")
        latent = [Objective(net, batches=[(x, y)], space="latent", kernel=k)
                  for k in ("graph_reuse", "double_backward", "forward_over_reverse")]
    assert all("straight-through" in o.differentiated for o in latent)
    modules = dict(net.named_modules())
    masks = []
    for name, p in zip(deq.space.names, latent[0].space.params):
        q = getattr(modules[name.rpartition(".")[0]], "weight_quantizer", None)
        if isinstance(q, LSQQuantizer) and q.is_enabled():
            r = p.detach() / q.step_size.detach().reshape(-1, *[1] * (p.dim() - 1))
            masks.append(((r >= -q.q_n) & (r <= q.q_p)).double().reshape(-1))
        else:  # the attention's in-projection is no Linear module: it stays float
            masks.append(torch.ones(p.numel(), dtype=torch.float64))
    m = torch.cat(masks)
    assert 0 < int(sum(1 for n in deq.space.names if isinstance(
        getattr(modules[n.rpartition(".")[0]], "weight_quantizer", None), LSQQuantizer)))
    v = torch.randn(len(m), generator=gen, dtype=torch.float64)
    with torch.no_grad():
        deq.space.set_offset([deq.space.unflatten(m * v)], [1e-5])
        plus = deq.grad()
        deq.space.set_offset([deq.space.unflatten(m * v)], [-1e-5])
        minus = deq.grad()
        deq.space.restore()
    fd = m * (plus - minus) / 2e-5
    for obj in latent:
        assert float((obj.hvp(v) - fd).abs().max() / fd.abs().max()) < 1e-5, obj.hvp_engine.kernel
