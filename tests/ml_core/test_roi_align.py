"""ml_core.roi_align: RoIAlign as matrix products gives torchvision's values and gradients."""
import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from ml_core.models import build_model
from ml_core.roi_align import SMALL_MAP, SmallMapRoIAlign, roi_align_small


def random_boxes(g, n, height, width, scale, dtype):
    """Boxes partly and wholly outside the map, tiny ones, empty images."""
    boxes = []
    size = torch.tensor([width, height], dtype=dtype) / scale
    for k in range(n):
        r = int(torch.randint(0, 7, (1,), generator=g))
        xy = (torch.rand(r, 2, generator=g, dtype=dtype) * 1.6 - 0.3) * size
        wh = torch.rand(r, 2, generator=g, dtype=dtype) * size * (0.01 if k % 3 == 2 else 0.9)
        boxes.append(torch.cat([xy, xy + wh], 1))
    return boxes


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_values_and_gradients_equal_torchvision(dtype, tol):
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        height, width = (int(x) for x in torch.randint(2, 24, (2,), generator=g))
        scale = (1.0, 0.5, 0.125)[trial % 3]
        f = torch.randn(3, 4, height, width, generator=g, dtype=dtype, requires_grad=True)
        boxes = random_boxes(g, 3, height, width, scale, dtype)
        for aligned in (False, True):
            for ratio in (1, 2, 3):
                size = (int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g)))
                want = roi_align(f, boxes, size, scale, ratio, aligned)
                got = roi_align_small(f, boxes, size, scale, ratio, aligned)
                assert got.shape == want.shape and got.dtype == want.dtype
                if not want.numel():
                    continue
                torch.testing.assert_close(got, want, atol=tol, rtol=tol)
                up = torch.randn(want.shape, generator=g, dtype=dtype)
                (gw,) = torch.autograd.grad(want, f, up)
                (gg,) = torch.autograd.grad(got, f, up)
                torch.testing.assert_close(gg, gw, atol=tol, rtol=tol)


def test_adaptive_sampling_is_refused():
    f = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align_small(f, [torch.tensor([[0.0, 0, 4, 4]])], (2, 2), 1.0, 0)


def test_pooler_takes_the_product_form_only_where_it_should(monkeypatch):
    calls = []
    import ml_core.roi_align as mod
    real = mod.roi_align_small
    monkeypatch.setattr(mod, "roi_align_small", lambda *a, **k: calls.append(1) or real(*a, **k))
    ours, theirs = SmallMapRoIAlign(["0"], 7, 2), MultiScaleRoIAlign(["0"], 7, 2)
    boxes = [torch.tensor([[4.0, 4, 60, 50], [0, 0, 95, 95]]), torch.tensor([[10.0, 20, 30, 90]])]
    small = {"0": torch.randn(2, 8, 12, 12, requires_grad=True)}  # a 96 px image at stride 8, training
    torch.testing.assert_close(ours(small, boxes, [(96, 96)] * 2), theirs(small, boxes, [(96, 96)] * 2))
    assert len(calls) == 1
    with torch.no_grad():  # inference: torchvision's forward
        torch.testing.assert_close(ours(small, boxes, [(96, 96)] * 2), theirs(small, boxes, [(96, 96)] * 2))
    assert len(calls) == 1
    side = int(SMALL_MAP ** 0.5) + 1  # past the bound: torchvision's kernel
    big = {"0": torch.randn(2, 8, side, side, requires_grad=True)}
    torch.testing.assert_close(SmallMapRoIAlign(["0"], 7, 2)(big, boxes, [(side * 8, side * 8)] * 2),
                               MultiScaleRoIAlign(["0"], 7, 2)(big, boxes, [(side * 8, side * 8)] * 2))
    assert len(calls) == 1


@pytest.mark.parametrize("arch", ["fasterrcnn_tiny", "keypointrcnn_tiny"])
def test_tiny_models_train_and_predict_as_with_torchvision_roi_align(arch):
    """The same weights and batch: the same losses and gradients with either pooler (detections of an
    untrained model tie on scores, so their order is not compared)."""
    torch.manual_seed(0)
    kp = arch.startswith("keypoint")
    ours, _ = build_model(arch, 3, 4 if kp else 0, min_size=96, max_size=96)
    theirs, _ = build_model(arch, 3, 4 if kp else 0, min_size=96, max_size=96)
    theirs.load_state_dict(ours.state_dict())
    theirs.roi_heads.box_roi_pool = MultiScaleRoIAlign(["0"], 7, 2)
    if kp:
        theirs.roi_heads.keypoint_roi_pool = MultiScaleRoIAlign(["p2"], 14, 2)  # the stride-4 map
    assert isinstance(ours.roi_heads.box_roi_pool, SmallMapRoIAlign)
    images = [torch.rand(3, 96, 96) for _ in range(2)]
    boxes = torch.tensor([[10.0, 10, 40, 40], [50, 50, 80, 90]])
    target = {"boxes": boxes, "labels": torch.tensor([1, 2])}
    if kp:
        k = torch.zeros(2, 4, 3)
        k[..., 0], k[..., 1], k[..., 2] = boxes[:, :1] + 5, boxes[:, 1:2] + 5, 1
        target["keypoints"] = k
    grads = []
    for m in (ours, theirs):
        m.train()
        torch.manual_seed(1)  # the same sampled proposals
        losses = m(images, [target, target])
        sum(losses.values()).backward()
        grads.append((losses, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    for name, v in grads[0][0].items():
        torch.testing.assert_close(v, grads[1][0][name], atol=1e-5, rtol=1e-4)
    for name, v in grads[0][1].items():
        torch.testing.assert_close(v, grads[1][1][name], atol=1e-4, rtol=1e-3)
