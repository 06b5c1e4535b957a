"""ml_core.inference_backbone: the GPU's backbone copy gives the model's features."""
import pytest
import torch

from ml_core.inference_backbone import (ConvReLU, FusedResidualBlock, fold_batch_norms, fuse_conv_relu,
                                        inference_backbone)
from ml_core.models import build_model


def _model(arch):
    torch.manual_seed(0)
    m, _ = build_model(arch, 3, 0, min_size=64, max_size=64)
    return m.eval()


def test_folded_backbone_gives_the_same_features():
    m = _model("fasterrcnn_resnet18_fpn")
    m.backbone.body.bn1.running_mean.uniform_(-0.1, 0.1)   # non-trivial statistics
    m.backbone.body.bn1.running_var.uniform_(0.5, 2.0)
    fused = inference_backbone(m.backbone, fold=True, channels_last=True)
    assert fold_batch_norms(fused) == 0           # all folded already
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in fused.modules())
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = m.backbone(x), fused(x.contiguous(memory_format=torch.channels_last))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-4)
    assert any(isinstance(x, torch.nn.BatchNorm2d) for x in m.backbone.modules())  # the model is untouched



@pytest.mark.parametrize("arch", ["fasterrcnn_resnet18_fpn", "fasterrcnn_resnet50_fpn", "fasterrcnn_tiny"])
def test_fused_backbone_gives_the_same_features(arch):
    m = _model(arch)
    for bn in m.backbone.modules():                          # non-trivial statistics everywhere
        if hasattr(bn, "running_var") and bn.running_var is not None:
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
    fused = inference_backbone(m.backbone, fold=True, channels_last=True, fuse=True)
    blocks = sum(isinstance(x, FusedResidualBlock) for x in fused.modules())
    stems = sum(isinstance(x, ConvReLU) for x in fused.modules())
    if arch == "fasterrcnn_tiny":
        assert blocks == 0 and stems == 4                   # its four conv-BN-ReLU layers
    else:
        assert blocks == (8 if "18" in arch else 16) and stems >= 1
    assert not any(isinstance(x, torch.nn.ReLU) for x in fused.modules() if not isinstance(x, torch.nn.Identity))
    assert fuse_conv_relu(fused) == 0                        # nothing left to fuse
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = m.backbone(x), fused(x.contiguous(memory_format=torch.channels_last))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-4)


def test_fusion_needs_folded_batch_norms():
    m = _model("fasterrcnn_resnet18_fpn")
    with pytest.raises(ValueError, match="folded"):
        inference_backbone(m.backbone, fold=False, channels_last=False, fuse=True)
    copy = inference_backbone(m.backbone, fold=False, channels_last=True)
    assert fuse_conv_relu(copy) == 0                         # batch norms between conv and ReLU: left alone
    assert fold_batch_norms(copy) > 0


def test_the_fused_calls_get_their_arguments_in_cudnns_order(monkeypatch):
    """The CUDA branch on the CPU: the cuDNN ops replaced by the same math in torch, so the
    arguments' order (weights, residual, alpha, bias, stride, padding, ...) is checked here."""
    import ml_core.inference_backbone as ib
    from torch.nn import functional as F

    def conv_relu(x, w, b, stride, padding, dilation, groups):
        return F.relu(F.conv2d(x, w, b, stride, padding, dilation, groups))

    def conv_add_relu(x, w, z, alpha, b, stride, padding, dilation, groups):
        return F.relu(F.conv2d(x, w, b, stride, padding, dilation, groups) + alpha * z)

    m = _model("fasterrcnn_resnet18_fpn")
    fused = inference_backbone(m.backbone, fold=True, channels_last=False, fuse=True)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        want = m.backbone(x)
        monkeypatch.setattr(ib, "_on_cuda", lambda t: True)
        calls = []
        monkeypatch.setattr(torch, "cudnn_convolution_relu", lambda *a: calls.append(1) or conv_relu(*a))
        monkeypatch.setattr(torch, "cudnn_convolution_add_relu", lambda *a: calls.append(2) or conv_add_relu(*a))
        got = fused(x)
    assert calls.count(2) == 8 and calls.count(1) == 1 + 8      # 8 blocks' last convs; stem + 8 first convs
    for k in want:
        assert torch.allclose(want[k], got[k], atol=1e-4, rtol=1e-4)


def test_a_cudnn_without_the_fused_kernels_falls_back_to_separate_ops(monkeypatch):
    import ml_core.inference_backbone as ib

    def missing(*a):
        raise RuntimeError("no fused kernel for this configuration")

    m = _model("fasterrcnn_resnet18_fpn")
    fused = inference_backbone(m.backbone, fold=True, channels_last=False, fuse=True)
    x = torch.rand(1, 3, 64, 64)
    monkeypatch.setattr(ib, "_on_cuda", lambda t: True)
    monkeypatch.setattr(torch, "cudnn_convolution_relu", missing)
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", missing)
    with torch.no_grad(), pytest.warns(UserWarning, match="not available"):
        got = fused(x)
        want = m.backbone(x)
    for k in want:
        assert torch.allclose(want[k], got[k], atol=1e-4, rtol=1e-4)
    stem = next(x for x in fused.modules() if isinstance(x, ConvReLU))
    assert not stem._cudnn.usable                              # not tried again


def test_the_top_down_path_in_precision_gives_the_fpns_features():
    from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

    from ml_core.inference_backbone import TopDownInPrecision
    m = _model("fasterrcnn_resnet18_fpn")
    copy = inference_backbone(m.backbone, fold=True, channels_last=False)
    assert isinstance(copy.fpn, TopDownInPrecision) and type(m.backbone.fpn) is FeaturePyramidNetwork
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        feats = m.backbone.body(x)
        a, b = m.backbone.fpn(feats), copy.fpn(feats)
    assert list(a) == list(b)                      # the same levels, in the same order
    for k in a:
        assert torch.equal(a[k], b[k])             # the same modules and operations: bit for bit
    # under autocast the upsampled map keeps the lateral's precision (torch upsamples in float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = {k: v.to(torch.bfloat16) for k, v in feats.items()}
        c = copy.fpn(low)
    for k in a:
        assert c[k].dtype == torch.bfloat16
        assert torch.allclose(c[k].float(), a[k], atol=0.05 * float(a[k].abs().max()))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("sizes", [((8, 12), (4, 6)), ((9, 12), (5, 6))])
def test_upsample_add_is_the_sum_with_the_nearest_upsampled_map(channels_last, sizes):
    from torch.nn import functional as F

    from ml_core.inference_backbone import upsample_add
    (h2, w2), (h, w) = sizes                      # exactly twice (the broadcast), and not (interpolate)
    lateral, top = torch.randn(2, 5, h2, w2), torch.randn(2, 5, h, w)
    if channels_last:
        lateral, top = (t.contiguous(memory_format=torch.channels_last) for t in (lateral, top))
    want = lateral + F.interpolate(top, size=(h2, w2), mode="nearest")
    got = upsample_add(lateral, top)
    assert got.shape == want.shape and torch.equal(got, want)


def test_the_rpn_heads_copy_gives_the_heads_outputs():
    from ml_core.inference_backbone import inference_head
    m = _model("fasterrcnn_resnet18_fpn")
    head = inference_head(m.rpn.head, channels_last=True, fuse=True)
    assert any(isinstance(x, ConvReLU) for x in head.modules()) and head is not m.rpn.head
    assert inference_head(m.rpn.head, channels_last=False, fuse=False) is m.rpn.head
    feats = [torch.randn(2, 256, s, s) for s in (16, 8, 4)]
    with torch.no_grad():
        a = m.rpn.head(feats)
        b = head([f.contiguous(memory_format=torch.channels_last) for f in feats])
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-4)
