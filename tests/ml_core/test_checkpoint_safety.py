"""Nothing loaded from a file runs code: hostile pickles are refused wherever a file is read."""
import os

import numpy as np
import pytest
import torch

from distill_app.cli import main
from ml_core.checkpoint import load_model, model_meta, read_checkpoint, save_checkpoint
from ml_core.models import build_model


class _MakesADirectory:
    """Unpickling this calls os.mkdir(path): a stand-in for any code an attacker would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def hostile_checkpoint(tmp_path, marker):
    path = tmp_path / "hostile.pt"
    torch.save({"meta": {"format": "distill-checkpoint/1", "payload": _MakesADirectory(marker)}, "model": {}}, path)
    return path


def test_the_hostile_file_really_runs_code_when_unpickled(tmp_path):
    # Guards the other tests: the payload works, so its absence below means it was not run.
    marker = tmp_path / "pwned"
    torch.load(hostile_checkpoint(tmp_path, marker), weights_only=False)
    assert marker.exists()


def test_read_checkpoint_refuses_a_hostile_pickle(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(ValueError, match="refused"):
        read_checkpoint(hostile_checkpoint(tmp_path, marker))
    assert not marker.exists()


def test_initial_weights_refuse_a_hostile_pickle(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(ValueError, match="refused"):
        build_model("fasterrcnn_tiny", 3, min_size=64, max_size=96, weights_path=hostile_checkpoint(tmp_path, marker))
    assert not marker.exists()


def test_cli_train_weights_refuses_a_hostile_pickle(tmp_path, capsys):
    data, marker = tmp_path / "d", tmp_path / "pwned"
    main(["synth", str(data), "--size", "64", "--labeled", "4", "--unlabeled", "2", "--val", "2"])
    rc = main(["train", str(data / "labeled.json"), "--out", str(tmp_path / "t.pt"), "--arch", "fasterrcnn_tiny",
               "--iterations", "1", "--batch-size", "2", "--workers", "0", "--device", "cpu",
               "--weights", str(hostile_checkpoint(tmp_path, marker))])
    assert rc != 0 and "refused" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "t.pt").exists()


@pytest.mark.parametrize("content, message", [
    ({"meta": 3}, "not a Distill checkpoint"),
    ([1, 2], "not a Distill checkpoint"),
    ({"meta": {"format": "distill-checkpoint/1", "arch": "nope"}, "model": {}}, "unknown architecture"),
    ({"meta": {"format": "distill-checkpoint/1", "arch": "fasterrcnn_tiny", "categories": "x"}}, "categories"),
    ({"meta": {"format": "distill-checkpoint/1", "arch": "fasterrcnn_tiny", "categories": [{"id": 1, "name": "a"}],
               "min_size": 64, "max_size": 10 ** 9}}, "max_size"),
    ({"meta": {"format": "distill-checkpoint/1", "arch": "fasterrcnn_tiny", "categories": [{"id": 1, "name": "a"}],
               "min_size": 64, "max_size": 96}, "model": {"w": 3}}, "not a named tensor"),
])
def test_malformed_checkpoints_are_value_errors(tmp_path, content, message):
    torch.save(content, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=message):
        read_checkpoint(tmp_path / "bad.pt")


def test_weights_that_do_not_fit_the_architecture_are_a_value_error(tmp_path):
    meta = model_meta("fasterrcnn_tiny", [{"id": 1, "name": "a"}], None, 64, 96)
    torch.save({"meta": meta, "model": {"roi_heads.box_predictor.cls_score.weight": torch.zeros(7, 7)}}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="do not fit"):
        load_model(tmp_path / "m.pt")


def test_a_keypointrcnn_tiny_checkpoint_of_the_stride_8_layout_is_refused(tmp_path):
    # keypointrcnn_tiny before its stride-4 keypoint map had no backbone.lateral / backbone.smooth:
    # its checkpoints must not load with those layers left at random (nor fail with a RuntimeError)
    from ml_core.schema import KeypointSchema
    m, _ = build_model("keypointrcnn_tiny", 2, 3, min_size=64, max_size=96)
    schema = KeypointSchema(names=["a", "b", "c"])
    meta = model_meta("keypointrcnn_tiny", [{"id": 1, "name": "person"}], schema, 64, 96)
    save_checkpoint(tmp_path / "new.pt", m, meta)
    load_model(tmp_path / "new.pt")
    old = {k: v for k, v in m.state_dict().items() if not k.startswith(("backbone.lateral.", "backbone.smooth."))}
    torch.save({"meta": meta, "model": old}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"old.pt: the weights do not fit a keypointrcnn_tiny .* lack "
                                         r"backbone.lateral.weight.*earlier version of keypointrcnn_tiny"):
        load_model(tmp_path / "old.pt")


def test_a_keypointrcnn_tiny_checkpoint_of_the_heavier_box_head_is_refused(tmp_path):
    # keypointrcnn_tiny before 2026-11-28 had fasterrcnn_tiny's box head (1,024 features)
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from ml_core.schema import KeypointSchema
    m, _ = build_model("keypointrcnn_tiny", 2, 3, min_size=64, max_size=96)
    m.roi_heads.box_head = TwoMLPHead(48 * 7 * 7, 1024)
    m.roi_heads.box_predictor = FastRCNNPredictor(1024, 2)
    meta = model_meta("keypointrcnn_tiny", [{"id": 1, "name": "person"}], KeypointSchema(names=["a", "b", "c"]), 64, 96)
    torch.save({"meta": meta, "model": m.state_dict()}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"old.pt: the weights do not fit a keypointrcnn_tiny .*: "
                                         r"roi_heads.box_head.fc6.weight.* differ in size .*earlier version of keypointrcnn_tiny"):
        load_model(tmp_path / "old.pt")


def test_a_plain_state_dict_loads_as_initial_weights(tmp_path):
    # torchvision's published files are plain state dicts: they must keep working.
    m, _ = build_model("fasterrcnn_tiny", 3, min_size=64, max_size=96)
    torch.save(m.state_dict(), tmp_path / "tv.pth")
    _, init = build_model("fasterrcnn_tiny", 3, min_size=64, max_size=96, weights_path=tmp_path / "tv.pth")
    assert init.startswith("tv.pth (") and "tensors" in init


def test_saved_checkpoints_hold_plain_values_only(tmp_path):
    m, _ = build_model("fasterrcnn_tiny", 2, min_size=64, max_size=96)
    meta = model_meta("fasterrcnn_tiny", [{"id": 1, "name": "a"}], None, 64, 96, metrics={"AP": np.float64(12.5)})
    save_checkpoint(tmp_path / "m.pt", m, meta, history=[{"loss": np.float32(1.5)}])
    ck = read_checkpoint(tmp_path / "m.pt")  # weights_only load: would fail on a NumPy scalar
    assert ck["meta"]["metrics"]["AP"] == 12.5 and type(ck["meta"]["metrics"]["AP"]) is float
    with pytest.raises(TypeError, match="plain values"):
        save_checkpoint(tmp_path / "n.pt", m, {**meta, "x": object()})


def test_a_training_checkpoint_without_metadata_that_does_not_fit_says_so():
    """fit() may run without metadata (meta {}): a resume that does not fit is a ValueError too."""
    from ml_core.checkpoint import load_state
    m = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="lack bias"):
        load_state(m, {"model": {"weight": torch.zeros(2, 2)}, "meta": {}})
