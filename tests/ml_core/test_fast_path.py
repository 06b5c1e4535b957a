"""The fast path (ml_core.fast_rcnn.BatchedViews, MultiTransformPredictor(fast=True)) against the
plain torchvision path on the same inputs: boxes, scores, labels and keypoints of every view, and
the ensembled predictions, equal within tolerance. CPU, tiny and ResNet-18 FPN models."""
import pytest
import torch

from ml_core import fast_rcnn
from ml_core.models import build_model
from ml_core.transforms import TransformSet, flip_boxes, flip_keypoints
from ml_core.tta import EnsembleOptions, MultiTransformPredictor

FLIP5 = [0, 2, 1, 4, 3]


def _model(arch, nk=0, classes=3):
    torch.manual_seed(0)
    m, _ = build_model(arch, classes, nk, min_size=64, max_size=200)
    m.roi_heads.score_thresh = 0.0  # every proposal reaches NMS: the hardest case for equality
    return m.eval()


def _torchvision_views(model, images, scales, flip, flip_inds):
    """The plain path: torchvision's forward per scale over the images and their mirrors, mapped
    back to the original images (what MultiTransformPredictor did before the fast path)."""
    out = []
    t = model.transform
    with torch.no_grad():
        for s in scales:
            t.min_size, t.max_size = (s,), 200
            batch = images + ([im.flip(-1) for im in images] if flip else [])
            for j, d in enumerate(model(batch)):
                f, w = j >= len(images), images[j % len(images)].shape[-1]
                kps = d.get("keypoints")
                out.append((flip_boxes(d["boxes"], w) if f else d["boxes"], d["scores"], d["labels"],
                            None if kps is None else (flip_keypoints(kps, w, flip_inds) if f else kps)))
    return out


def _matched(b1, s1, l1, b2, s2, l2, k1=None, k2=None):
    """Fraction of rows of set 1 that have an equal row (within tolerance) in set 2."""
    if len(b1) == 0:
        return 1.0
    eq = ((b1[:, None] - b2[None]).abs().amax(-1) <= 1e-3) & ((s1[:, None] - s2[None]).abs() <= 1e-5) \
        & (l1[:, None] == l2[None])
    if k1 is not None:
        eq &= (k1[:, None] - k2[None]).abs().flatten(2).amax(-1) <= 1e-3
    return float(eq.any(1).float().mean())


# Random weights on random images give many boxes with IoU exactly at the NMS threshold (edges
# clipped to the image); torchvision decides those with offset coordinates (batched_nms's
# coordinate trick), so an occasional box at the end of a view's list may differ. Everything else
# must be equal: same counts, >= 97% of rows equal, and the first rows in the same order.
MIN_MATCHED = 0.97


def _assert_views_equal(model, images, scales, flip, flip_inds=None):
    ref = _torchvision_views(model, images, scales, flip, flip_inds)
    det = fast_rcnn.BatchedViews(model).run(images, scales, flip, 200, flip_inds)
    assert det.valid.shape[0] == len(ref)
    total, exact = 0, 0
    for v, (b, s, lab, k) in enumerate(ref):
        n = int(det.valid[v].sum())
        assert n == len(b), f"view {v}: {n} detections, torchvision {len(b)}"
        fb, fs, fl = det.boxes[v, :n], det.scores[v, :n], det.labels[v, :n]
        fk = None if k is None else det.keypoints[v, :n]
        assert _matched(b, s, lab, fb, fs, fl, k, fk) >= MIN_MATCHED, f"view {v}"
        head = max(1, n // 2)
        assert torch.allclose(fb[:head], b[:head], atol=1e-3) and torch.allclose(fs[:head], s[:head], atol=1e-5)
        if k is not None:
            assert torch.allclose(fk[:head], k[:head], atol=1e-3), f"view {v} keypoints"
        exact += torch.allclose(fb, b, atol=1e-3) and torch.equal(fl, lab)
        total += n
    assert total > 0 and exact >= len(ref) // 2


@pytest.mark.parametrize("scales,flip", [([48, 64, 80], True), ([56], False), ([40, 72], False)])
def test_detection_views_equal_torchvision(scales, flip):
    m = _model("fasterrcnn_tiny", classes=4)
    _assert_views_equal(m, [torch.rand(3, 60, 90), torch.rand(3, 90, 60)], scales, flip)


@pytest.mark.parametrize("scales,flip", [([48, 64, 80], True), ([64], False)])
def test_keypoint_views_equal_torchvision(scales, flip):
    m = _model("keypointrcnn_tiny", nk=5, classes=2)
    _assert_views_equal(m, [torch.rand(3, 64, 80), torch.rand(3, 72, 64)], scales, flip, FLIP5)


def test_resnet18_fpn_views_equal_torchvision():
    """Five pyramid levels: RPN NMS per (view, level) group, as torchvision's batched_nms by level."""
    m = _model("fasterrcnn_resnet18_fpn", classes=3)
    _assert_views_equal(m, [torch.rand(3, 64, 96)], [64, 96], True)


def test_keypoint_resnet18_fpn_views_equal_torchvision():
    m = _model("keypointrcnn_resnet18_fpn", nk=5, classes=2)
    m.roi_heads.detections_per_img = 20
    _assert_views_equal(m, [torch.rand(3, 64, 80)], [64, 80], True, FLIP5)


@pytest.mark.parametrize("arch,nk,flip", [("fasterrcnn_tiny", 0, True), ("keypointrcnn_tiny", 5, True),
                                          ("keypointrcnn_tiny", 5, False)])
def test_predictor_fast_equals_plain(arch, nk, flip):
    m = _model(arch, nk, classes=2 if nk else 4)
    images = [torch.rand(3, 64, 80) for _ in range(2)]
    ts = TransformSet([48, 64, 80], flip=flip, max_size=200)
    kw = dict(flip_inds=FLIP5 if nk else None)
    plain = MultiTransformPredictor(m, ts, fast=False, **kw).predict(images)
    fast = MultiTransformPredictor(m, ts, fast=True, **kw).predict(images)
    for a, b in zip(plain, fast):
        assert list(a.views) == list(b.views)
        for name in a.views:
            x, y = a.views[name], b.views[name]
            assert len(x.boxes) == len(y.boxes)
            assert _matched(x.boxes, x.scores, x.labels, y.boxes, y.scores, y.labels, x.keypoints, y.keypoints) \
                >= MIN_MATCHED, name
        x, y = a.ensembled, b.ensembled
        assert len(x.boxes) == len(y.boxes) > 0
        assert _matched(x.boxes, x.scores, x.labels, y.boxes, y.scores, y.labels, x.keypoints, y.keypoints) \
            >= MIN_MATCHED
        assert a.agreement == pytest.approx(b.agreement, abs=1e-2)
        if nk:  # the ensemble's keypoint scores, by both paths
            assert x.keypoint_scores.shape == y.keypoint_scores.shape == (len(x.boxes), nk)
            assert len(x.as_list()[0]["keypoint_scores"]) == nk


def test_fast_path_keypoint_size_dependence_max_heatmaps_and_named_views():
    m = _model("keypointrcnn_tiny", 5, classes=2)
    images = [torch.rand(3, 64, 64)]
    for opts in (EnsembleOptions(score_thresh=0.0, keypoint_size_dependence=True),
                 EnsembleOptions(heatmap_method="max"), EnsembleOptions(score_thresh=0.0, keypoint_scales="48,80")):
        ts = TransformSet([48, 64, 80], flip=True, max_size=200)
        a = MultiTransformPredictor(m, ts, flip_inds=FLIP5, options=opts, fast=False).predict(images)[0]
        b = MultiTransformPredictor(m, ts, flip_inds=FLIP5, options=opts, fast=True).predict(images)[0]
        x, y = a.ensembled, b.ensembled
        assert _matched(x.boxes, x.scores, x.labels, y.boxes, y.scores, y.labels, x.keypoints, y.keypoints) \
            >= MIN_MATCHED


def test_fast_path_with_nothing_detected():
    m = _model("keypointrcnn_tiny", 5, classes=2)
    m.roi_heads.score_thresh = 1.01
    o = MultiTransformPredictor(m, TransformSet([48, 64]), flip_inds=FLIP5, fast=True).predict([torch.rand(3, 64, 64)])[0]
    assert len(o.ensembled.boxes) == 0 and o.ensembled.keypoints.shape == (0, 5, 3)
    assert all(len(v.boxes) == 0 for v in o.views.values()) and o.agreement == 1.0


def test_batched_heatmap_decoding_equals_torchvision():
    from torchvision.models.detection.roi_heads import heatmaps_to_keypoints as tv
    torch.manual_seed(0)
    maps = torch.randn(30, 4, 56, 56)
    xy = torch.rand(30, 2) * 300
    wh = torch.cat([torch.rand(20, 2) * 200, torch.rand(10, 2) * 2], 0)   # some boxes under one pixel
    rois = torch.cat([xy, xy + wh], 1)
    a, sa = tv(maps, rois)
    b, sb = fast_rcnn.heatmaps_to_keypoints(maps, rois, max_elements=2 ** 20)  # several chunks
    assert torch.allclose(a, b, atol=1e-3) and torch.allclose(sa, sb, atol=1e-4)


def test_gpu_layout_keypoint_views_equal_the_plain_fast_path():
    """The CUDA configuration (folded and fused backbone and RPN head, channels_last copies of them
    and of the keypoint head, the upsamplings outside autocast) on the CPU: the same views as the fast path without it."""
    m = _model("keypointrcnn_tiny", nk=5, classes=2)
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    a = fast_rcnn.BatchedViews(m).run(images, [48, 64], True, 200, FLIP5)
    gpu_like = fast_rcnn.BatchedViews(m, fold_bn=True, channels_last=True, fuse_conv_relu=True)
    assert gpu_like.rpn_head is not m.rpn.head
    assert gpu_like.keypoint_head is not m.roi_heads.keypoint_head          # a copy; the model is untouched
    b = gpu_like.run(images, [48, 64], True, 200, FLIP5)
    assert torch.equal(a.valid, b.valid)
    assert torch.allclose(a.boxes, b.boxes, atol=1e-3) and torch.allclose(a.scores, b.scores, atol=1e-4)
    assert torch.allclose(a.keypoints[a.valid], b.keypoints[b.valid], atol=1e-2)


def test_pre_nms_union_views_come_back_nmsed_from_the_fast_path():
    """With shown=(nms_thresh, per_view) the fast path returns the union (no NMS) and, beside it,
    each view as the model's own settings give it: the same as torchvision's forward."""
    m = _model("fasterrcnn_tiny", classes=4)
    images = [torch.rand(3, 60, 90)]
    rh = m.roi_heads
    heads = rh.nms_thresh, rh.detections_per_img
    ref = _torchvision_views(m, images, [48, 64], True, None)
    rh.nms_thresh, rh.detections_per_img = 1.0, 1000
    try:
        det = fast_rcnn.BatchedViews(m).run(images, [48, 64], True, 200, shown=heads)
    finally:
        rh.nms_thresh, rh.detections_per_img = heads
    assert det.shown is not None and det.valid.sum() > det.shown.valid.sum()
    for v, (b, s, lab, _) in enumerate(ref):
        n = int(det.shown.valid[v].sum())
        assert n == len(b)
        assert _matched(b, s, lab, det.shown.boxes[v, :n], det.shown.scores[v, :n], det.shown.labels[v, :n]) \
            >= MIN_MATCHED


def test_compiled_backbone_gives_the_same_predictions():
    """compile_backbone=True (torch.compile, inductor) on the CPU: the same views and ensemble as
    the eager fast path; the model's own backbone is left eager."""
    m = _model("fasterrcnn_tiny", classes=3)
    images = [torch.rand(3, 64, 80)]
    ts = TransformSet([48, 64], flip=True, max_size=200)
    eager = MultiTransformPredictor(m, ts, fast=True).predict(images)[0]
    compiled = MultiTransformPredictor(m, ts, fast=True, compile_backbone=True)
    assert compiled.batched.backbone is not m.backbone and not hasattr(m.backbone, "_orig_mod")
    got = compiled.predict(images)[0]
    for name in eager.views:
        x, y = eager.views[name], got.views[name]
        assert len(x.boxes) == len(y.boxes)
        assert _matched(x.boxes, x.scores, x.labels, y.boxes, y.scores, y.labels) >= MIN_MATCHED, name
    x, y = eager.ensembled, got.ensembled
    assert len(x.boxes) == len(y.boxes) > 0
    assert _matched(x.boxes, x.scores, x.labels, y.boxes, y.scores, y.labels) >= MIN_MATCHED


@pytest.mark.parametrize("fast", [False, True])
def test_shown_views_do_not_depend_on_the_union_depth(fast):
    """A pre-NMS union cut to a few boxes per view still shows each view as the model gives it (the
    NMS'd views of the post-NMS union), on both paths; and both paths ensemble the same union."""
    m = _model("fasterrcnn_tiny", classes=4)
    images = [torch.rand(3, 64, 80)]
    ts = TransformSet([48, 64], flip=True, max_size=200)
    post = MultiTransformPredictor(m, ts, fast=fast, options=EnsembleOptions(union="post_nms")).predict(images)[0]
    cut = EnsembleOptions(union="pre_nms", union_per_view=60)
    pre = MultiTransformPredictor(m, ts, fast=fast, options=cut).predict(images)[0]
    other = MultiTransformPredictor(m, ts, fast=not fast, options=cut).predict(images)[0]
    for name in post.views:
        x, y = post.views[name], pre.views[name]
        assert len(x.boxes) == len(y.boxes) > 60
        assert _matched(x.boxes, x.scores, x.labels, y.boxes, y.scores, y.labels) >= MIN_MATCHED, name
    assert pre.agreement == pytest.approx(other.agreement, abs=1e-2)   # the views against the same ensemble
    x, y = pre.ensembled, other.ensembled
    assert len(x.boxes) == len(y.boxes) > 0
    assert _matched(x.boxes, x.scores, x.labels, y.boxes, y.scores, y.labels) >= MIN_MATCHED


@pytest.mark.parametrize("sizes", [[(64, 80), (64, 80)], [(64, 80), (72, 50), (64, 80)], [(50, 72)]])
def test_the_fast_paths_transform_is_torchvisions(sizes):
    """Each image normalised once, images of one size resized together, padded in one go: the
    same batch and image sizes as torchvision's GeneralizedRCNNTransform, bit for bit."""
    m = _model("fasterrcnn_tiny")
    views = fast_rcnn.BatchedViews(m)
    images = [torch.rand(3, h, w) for h, w in sizes]
    images += [im.flip(-1) for im in images]                   # mirrors, normalised after flipping there
    t = m.transform
    for scale, max_size in ((48, 200), (100, 200), (100, 120)):
        t.min_size, t.max_size = (scale,), max_size
        want, _ = t(images)
        norm = views._normalized(images[:len(sizes)])
        got = views._transform(norm + [im.flip(-1) for im in norm], scale, max_size)
        assert got.image_sizes == want.image_sizes and torch.equal(got.tensors, want.tensors)


def test_the_fast_path_refuses_images_torchvision_refuses():
    views = fast_rcnn.BatchedViews(_model("fasterrcnn_tiny"))
    with pytest.raises(TypeError, match="floating"):
        views._normalized([torch.zeros(3, 8, 8, dtype=torch.uint8)])
