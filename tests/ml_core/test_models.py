import pytest
import torch

from ml_core.checkpoint import load_model, model_meta, read_checkpoint, save_checkpoint
from ml_core.models import ARCHITECTURES, build_model


def test_unknown_architecture_names_the_choices():
    with pytest.raises(ValueError, match="fasterrcnn_resnet50_fpn"):
        build_model("yolo", 3)


def test_keypoint_arch_needs_keypoints():
    with pytest.raises(ValueError, match="declare keypoints"):
        build_model("keypointrcnn_tiny", 2, 0)


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if "tiny" in a or "resnet18" in a])
def test_small_models_build_and_run(arch):
    kp = 5 if ARCHITECTURES[arch].task == "keypoints" else 0
    m, init = build_model(arch, 3, kp, min_size=64, max_size=96)
    assert init == "random"
    m.eval()
    with torch.no_grad():
        out = m([torch.rand(3, 64, 80)])
    assert set(out[0]) >= {"boxes", "scores", "labels"}


def test_checkpoint_round_trip_and_weights_file(tmp_path):
    m, _ = build_model("fasterrcnn_tiny", 3, min_size=64, max_size=96)
    meta = model_meta("fasterrcnn_tiny", [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], None, 64, 96, role="teacher")
    save_checkpoint(tmp_path / "m.pt", m, meta)
    m2, meta2 = load_model(tmp_path / "m.pt")
    assert meta2["arch"] == "fasterrcnn_tiny"
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    # the same file as initial weights of a model with other classes: matching tensors only
    m3, init = build_model("fasterrcnn_tiny", 5, min_size=64, max_size=96, weights_path=tmp_path / "m.pt")
    assert "m.pt" in init
    assert torch.equal(m3.backbone.body[0].weight, m.backbone.body[0].weight)


def test_a_plain_file_is_not_a_checkpoint(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "x.pt")


def test_keypointrcnn_tiny_pools_keypoints_from_stride_4_and_the_rpn_reads_stride_8_only():
    from torchvision.ops import roi_align

    from ml_core.fast_rcnn import BatchedViews
    from ml_core.models import rpn_features
    torch.manual_seed(0)
    m, _ = build_model("keypointrcnn_tiny", 2, 5, min_size=96, max_size=96)
    m.eval()
    feats = m.backbone(torch.rand(1, 3, 96, 96))
    assert {k: tuple(v.shape[-2:]) for k, v in feats.items()} == {"0": (12, 12), "p2": (24, 24)}
    assert m.roi_heads.box_roi_pool.featmap_names == ["0"]
    assert m.roi_heads.keypoint_roi_pool.featmap_names == ["p2"]
    boxes = torch.tensor([[10.0, 12, 40, 60], [50, 20, 90, 80]])
    with torch.no_grad():
        pooled = m.roi_heads.keypoint_roi_pool(feats, [boxes], [(96, 96)])
        torch.testing.assert_close(pooled, roi_align(feats["p2"], [boxes], 14, spatial_scale=0.25, sampling_ratio=2))
    assert [f is feats["0"] for f in rpn_features(m.rpn, feats)] == [True]
    seen = []
    m.rpn.head.register_forward_hook(lambda mod, inp, out: seen.append([tuple(f.shape[-2:]) for f in inp[0]]))
    with torch.no_grad():
        m([torch.rand(3, 96, 96)])  # torchvision's forward
        BatchedViews(m).run([torch.rand(3, 96, 96)], [96], False, 96)  # the fast path
    assert seen == [[(12, 12)], [(12, 12)]]
