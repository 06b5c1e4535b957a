import pytest
import torch

from ml_core.models import build_model
from ml_core.transforms import TransformSet
from ml_core.tta import EnsembleOptions, MultiTransformPredictor, run_inference


@pytest.fixture
def det_model():
    torch.manual_seed(0)
    m, _ = build_model("fasterrcnn_tiny", 4, min_size=64, max_size=96)
    m.roi_heads.score_thresh = 0.0
    return m


def test_every_view_is_returned_in_original_coordinates(det_model):
    p = MultiTransformPredictor(det_model, TransformSet([48, 80], flip=True, max_size=200))
    out = p.predict([torch.rand(3, 60, 90), torch.rand(3, 90, 60)])
    assert [list(o.views) for o in out] == [["s48", "s48-flip", "s80", "s80-flip"]] * 2
    for o in out:
        for inst in o.views.values():
            if len(inst.boxes):
                assert inst.boxes[:, 2].max() <= o.width + 1e-3 and inst.boxes[:, 3].max() <= o.height + 1e-3
        assert 0 <= o.agreement <= 1 and len(o.ensembled.boxes) <= 100


def test_flip_inversion_is_exact(det_model):
    """The flipped view of image Y = mirror(X), mapped back into Y, must be the plain view of X
    mirrored: the model saw the same pixels, only the inversion differs."""
    from ml_core.transforms import flip_boxes
    x = torch.rand(3, 64, 80)
    p = MultiTransformPredictor(det_model, TransformSet([64], flip=True, max_size=200),
                                options=EnsembleOptions(score_thresh=0.0))
    a = p.predict([x])[0]
    b = p.predict([x.flip(-1)])[0]
    assert len(a.views["s64"].boxes) > 0
    assert torch.allclose(b.views["s64-flip"].boxes, flip_boxes(a.views["s64"].boxes, 80), atol=1e-3)
    assert torch.allclose(b.views["s64-flip"].scores, a.views["s64"].scores, atol=1e-5)


def test_keypoint_model_ensembles_heatmaps_on_fixed_boxes():
    torch.manual_seed(0)
    m, _ = build_model("keypointrcnn_tiny", 2, 5, min_size=64, max_size=96)
    m.roi_heads.score_thresh = 0.0
    p = MultiTransformPredictor(m, TransformSet([48, 64]), flip_inds=[0, 2, 1, 4, 3])
    o = p.predict([torch.rand(3, 64, 64)])[0]
    assert o.ensembled.keypoints.shape == (len(o.ensembled.boxes), 5, 3)
    # each keypoint's score is the merged heatmap's logit there, as torchvision scores its own keypoints
    assert o.ensembled.keypoint_scores.shape == (len(o.ensembled.boxes), 5)
    assert all(len(d["keypoint_scores"]) == 5 for d in o.ensembled.as_list())
    assert o.views["s48-flip"].keypoints is not None
    with pytest.raises(ValueError, match="flip map"):
        MultiTransformPredictor(m, TransformSet([64]), flip_inds=None)


def test_unreadable_images_are_reported_not_fatal(det_model, tmp_path):
    from PIL import Image
    Image.new("RGB", (40, 30)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    p = MultiTransformPredictor(det_model, TransformSet([32], flip=False, max_size=100))
    out = list(run_inference(p, [str(tmp_path / "ok.png"), str(tmp_path / "bad.png")], num_workers=0))
    assert out[0][1] is not None and out[1][1] is None and "bad.png" in out[1][2]
    with pytest.raises(ValueError, match="no images"):
        list(run_inference(p, []))


def test_bad_ensemble_option():
    with pytest.raises(ValueError, match="vote_thresh"):
        EnsembleOptions(vote_thresh=2)
    with pytest.raises(ValueError, match="unknown ensembling option"):
        EnsembleOptions.from_dict({"nope": 1})


def test_keypoint_size_dependence_changes_only_what_the_rule_says():
    """Every box here is small (area < 150^2), so with the rule on the down-scaled views (48 < the
    model's 64) must not count: the result equals a run over the other views alone."""
    torch.manual_seed(0)
    m, _ = build_model("keypointrcnn_tiny", 2, 5, min_size=64, max_size=96)
    m.roi_heads.score_thresh = 0.0
    x = torch.rand(3, 64, 64)
    opts = EnsembleOptions(score_thresh=0.0, keypoint_size_dependence=True, keypoint_scales="all")
    dep = MultiTransformPredictor(m, TransformSet([48, 64, 80], flip=False), options=opts).predict([x])[0]
    plain = MultiTransformPredictor(m, TransformSet([48, 64, 80], flip=False),
                                    options=EnsembleOptions(score_thresh=0.0, keypoint_scales="all")).predict([x])[0]
    assert len(dep.ensembled.boxes) > 0 and torch.equal(dep.ensembled.boxes, plain.ensembled.boxes)
    # the same boxes, heatmaps of views 64 and 80 only
    p = MultiTransformPredictor(m, TransformSet([48, 64, 80], flip=False),
                                options=EnsembleOptions(score_thresh=0.0, keypoint_scales="all"))
    from ml_core import ensemble
    original = ensemble.ensemble_heatmaps
    ensemble.ensemble_heatmaps = lambda h, f, inds, method, keep=None: original(h[1:], f[1:], inds, method)
    try:
        upper = p.predict([x])[0]
    finally:
        ensemble.ensemble_heatmaps = original
    assert torch.allclose(dep.ensembled.keypoints, upper.ensembled.keypoints)
    assert not torch.allclose(dep.ensembled.keypoints, plain.ensembled.keypoints)


def test_keypoint_heatmaps_come_from_the_views_keypoint_scales_names():
    """The boxes come from every view either way; the keypoints from the named views' heatmaps
    only. By default ("auto") those are the views at or below the model's own size (64 here)."""
    torch.manual_seed(0)
    m, _ = build_model("keypointrcnn_tiny", 2, 5, min_size=64, max_size=96)
    x = torch.rand(3, 64, 64)
    ts = TransformSet([48, 64, 80], flip=False)
    run = lambda **kw: MultiTransformPredictor(m, ts, options=EnsembleOptions(score_thresh=0.0, **kw)).predict([x])[0]  # noqa: E731
    auto, named, every, one = run(), run(keypoint_scales="48,64"), run(keypoint_scales="all"), run(keypoint_scales="80")
    assert len(auto.ensembled.boxes) > 0
    for o in (named, every, one):
        assert torch.equal(o.ensembled.boxes, auto.ensembled.boxes) and torch.equal(o.ensembled.scores, auto.ensembled.scores)
    assert torch.equal(auto.ensembled.keypoints, named.ensembled.keypoints)
    assert not torch.allclose(auto.ensembled.keypoints, every.ensembled.keypoints)
    assert not torch.allclose(every.ensembled.keypoints, one.ensembled.keypoints)
    with pytest.raises(ValueError, match="keypoint_scales 100 not among the views' scales"):
        MultiTransformPredictor(m, ts, options=EnsembleOptions(keypoint_scales="64,100"))


def test_a_keypoint_view_with_no_detection_is_an_empty_list_not_a_crash():
    from ml_core.tta import ImagePrediction, Instances
    empty = Instances(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, 9, 3))
    one = Instances(torch.tensor([[0., 0, 4, 4]]), torch.tensor([0.9]), torch.tensor([1]), torch.ones(1, 9, 3))
    j = ImagePrediction(8, 8, views={"s64": empty, "s64-flip": one}, ensembled=one).to_json()
    assert j["views"]["s64"] == [] and len(j["views"]["s64-flip"][0]["keypoints"]) == 27


def test_a_keypoint_model_that_finds_nothing_predicts_empty_lists(tmp_path):
    from PIL import Image

    from ml_core.pipeline import predict_single_view
    torch.manual_seed(0)
    m, _ = build_model("keypointrcnn_tiny", 2, 5, min_size=64, max_size=96)
    m.roi_heads.score_thresh = 1.01  # nothing passes
    p = MultiTransformPredictor(m, TransformSet([48, 64]), flip_inds=[0, 2, 1, 4, 3])
    o = p.predict([torch.rand(3, 64, 64)])[0].to_json()
    assert o["ensembled"] == [] and all(v == [] for v in o["views"].values())
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    meta = {"categories": [{"id": 1, "name": "figure"}]}
    assert predict_single_view(m, meta, [tmp_path / "a.png"], device="cpu") == [[]]


@pytest.mark.parametrize("fast", [False, True])
def test_pre_nms_union_votes_over_every_box_and_shows_each_view_nmsd(det_model, fast):
    """Detectron's SCORE_HEUR UNION: the ensemble sees every per-class box above the score
    threshold, before NMS; the views shown are what the model's own NMS makes of them."""
    ts = TransformSet([48, 80], flip=True, max_size=200)
    x = [torch.rand(3, 60, 90), torch.rand(3, 72, 64)]
    post = MultiTransformPredictor(det_model, ts, fast=fast, options=EnsembleOptions(union="post_nms")).predict(x)
    assert MultiTransformPredictor(det_model, ts, fast=fast).union == "pre_nms"  # the measured default
    pre_p = MultiTransformPredictor(det_model, ts, fast=fast, options=EnsembleOptions(union="pre_nms"))
    pre = pre_p.predict(x)
    assert det_model.roi_heads.nms_thresh == 0.5 and det_model.roi_heads.detections_per_img == 100  # restored
    for a, b in zip(post, pre):
        for name in a.views:
            assert len(a.views[name].boxes) == len(b.views[name].boxes)
            assert torch.allclose(a.views[name].boxes, b.views[name].boxes, atol=1e-3)
            assert torch.allclose(a.views[name].scores, b.views[name].scores, atol=1e-5)
        assert 0 <= b.agreement <= 1 and len(b.ensembled.boxes) <= 100
    # the ensembles differ because voting saw more boxes
    assert any(len(a.ensembled.boxes) != len(b.ensembled.boxes)
               or not torch.allclose(a.ensembled.boxes, b.ensembled.boxes) for a, b in zip(post, pre))


def test_pre_nms_union_is_refused_for_keypoint_models():
    m, _ = build_model("keypointrcnn_tiny", 2, num_keypoints=3, min_size=64, max_size=96)
    with pytest.raises(ValueError, match="box models"):
        MultiTransformPredictor(m, TransformSet([64], flip=False), options=EnsembleOptions(union="pre_nms"))
    with pytest.raises(ValueError, match="union"):
        EnsembleOptions(union="everything")


def test_run_inference_gives_what_predict_gives(tmp_path):
    """run_inference over files (decoded in threads, pinned for a GPU) gives predict()'s predictions,
    group by group, in order."""
    import numpy as np
    from PIL import Image

    from ml_core.data import load_image
    torch.manual_seed(0)
    m, _ = build_model("fasterrcnn_tiny", 3, 0, min_size=64, max_size=64)
    m.eval()
    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        Image.fromarray((np.random.default_rng(i).random((48 + 8 * i, 64, 3)) * 255).astype("uint8")).save(p)
        paths.append(str(p))
    for fast in (False, True):
        pred = MultiTransformPredictor(m, TransformSet([48, 64]), fast=fast)
        got = list(run_inference(pred, paths, group_size=2, num_workers=0))
        assert [i for i, _, _ in got] == list(range(5))
        for k in range(0, 5, 2):
            want = pred.predict([load_image(p) for p in paths[k:k + 2]])
            for w, (_, p, err) in zip(want, got[k:k + 2]):
                assert err is None
                assert torch.equal(w.ensembled.boxes, p.ensembled.boxes)
                assert torch.equal(w.ensembled.scores, p.ensembled.scores)


def test_an_ensemble_of_models_votes_over_every_models_views():
    """Model ensembling: each model's views are its own predictions (named m1-..., m2-...), and the
    ensemble's keypoints come from both models' heatmaps on the same fixed boxes."""
    torch.manual_seed(0)
    a, _ = build_model("keypointrcnn_tiny", 2, 5, min_size=64, max_size=96)
    b, _ = build_model("keypointrcnn_tiny", 2, 5, min_size=64, max_size=96)
    for m in (a, b):
        m.roi_heads.score_thresh = 0.0
    ts, flips, x = TransformSet([48, 64]), [0, 2, 1, 4, 3], [torch.rand(3, 64, 64)]
    alone_a = MultiTransformPredictor(a, ts, flip_inds=flips).predict(x)[0]
    alone_b = MultiTransformPredictor(b, ts, flip_inds=flips).predict(x)[0]
    both = MultiTransformPredictor(a, ts, flip_inds=flips, extra_models=[b]).predict(x)[0]
    assert list(both.views) == [f"m{k}-{v}" for k in (1, 2) for v in alone_a.views]
    for name in alone_a.views:
        assert torch.allclose(both.views["m1-" + name].boxes, alone_a.views[name].boxes)
        assert torch.allclose(both.views["m2-" + name].boxes, alone_b.views[name].boxes)
    assert both.ensembled.keypoints.shape == (len(both.ensembled.boxes), 5, 3)
    assert len(both.ensembled.boxes) and not torch.equal(both.ensembled.boxes, alone_a.ensembled.boxes)
    assert a.transform.min_size == (64,) and b.transform.min_size == (64,)  # each model's test size restored


def test_an_ensemble_of_models_needs_the_same_heads_and_runs_the_plain_path(det_model):
    kp, _ = build_model("keypointrcnn_tiny", 4, 5, min_size=64, max_size=96)
    with pytest.raises(ValueError, match="same classes"):
        MultiTransformPredictor(det_model, TransformSet([64], flip=False), extra_models=[kp])
    other, _ = build_model("fasterrcnn_tiny", 3, min_size=64, max_size=96)
    with pytest.raises(ValueError, match="same classes"):
        MultiTransformPredictor(det_model, TransformSet([64], flip=False), extra_models=[other])
    twin, _ = build_model("fasterrcnn_tiny", 4, min_size=64, max_size=96)
    with pytest.raises(ValueError, match="plain path"):
        MultiTransformPredictor(det_model, TransformSet([64], flip=False), extra_models=[twin], fast=True)
    assert not MultiTransformPredictor(det_model, TransformSet([64]), extra_models=[twin]).fast
