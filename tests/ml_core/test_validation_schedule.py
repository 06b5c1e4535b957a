"""Training with validation: AP tracked every N iterations, the best weights kept and saved, the
plateau schedule dropping the rate and stopping on converged AP; schedule bounds from the data."""
import pytest
import torch

from ml_core import pipeline
from ml_core.checkpoint import read_checkpoint
from ml_core.data import CocoDetection, load_coco
from ml_core.engine import TrainConfig, default_iterations, fit
from ml_core.models import build_model
from ml_core.serialization import safe_load
from ml_core.transforms import training_transform


class Scripted:
    """A validation function that returns given AP values in turn and remembers the weights it saw,
    so the test can check which weights ended in the checkpoint (the schedule logic under test
    does not care where the AP comes from)."""

    def __init__(self, values):
        self.values, self.seen = list(values), []

    def __call__(self, model):
        assert not model.training
        self.seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return self.values[len(self.seen) - 1] if len(self.seen) <= len(self.values) else self.values[-1]


def _dataset(det_data):
    data = load_coco(det_data / "labeled.json")
    return CocoDetection(data, str(det_data / "labeled"), training_transform(None, "detection", True), data.label_of())


def _cfg(**kw):
    return TrainConfig(**{"iterations": 40, "batch_size": 2, "lr": 0.01, "warmup_iters": 2, "num_workers": 0,
                          "log_every": 1, "eval_every": 2, "patience": 2, "steps": (0.7, 0.9), **kw})


def test_plateau_drops_the_rate_then_stops_and_keeps_the_best_weights(det_data, tmp_path):
    torch.manual_seed(0)
    model, _ = build_model("fasterrcnn_tiny", 4, min_size=64, max_size=96)
    # evaluations at 2, 4, 6, ...: best at 4; two without gain -> drop; two more -> drop; two more -> stop
    val = Scripted([5.0, 9.0, 8.0, 8.5, 7.0, 9.05, 6.0, 6.0])
    state = fit(model, _dataset(det_data), _cfg(schedule="plateau"), validate=val, checkpoint_path=tmp_path / "m.pt")
    assert [v["iteration"] for v in state.val_history] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert state.best == {"iteration": 4, "AP": 9.0}  # 9.05 is within min_delta of 9.0: not better
    assert state.drops == 2 and state.iteration == 16 and "converged" in state.stopped
    lrs = [v["lr"] for v in state.val_history]
    assert lrs[3] == pytest.approx(0.01) and lrs[5] == pytest.approx(0.001) and lrs[7] == pytest.approx(0.0001)
    ck = safe_load(tmp_path / "m.pt")  # fit() alone writes no model metadata
    for k, v in val.seen[1].items():  # the weights evaluated at iteration 4
        assert torch.equal(ck["model"][k], v), k
    assert ck["validation"]["best"]["iteration"] == 4 and len(ck["validation"]["history"]) == 8


def test_steps_schedule_with_validation_tracks_without_stopping(det_data):
    model, _ = build_model("fasterrcnn_tiny", 4, min_size=64, max_size=96)
    state = fit(model, _dataset(det_data), _cfg(iterations=8, schedule="steps"), validate=Scripted([3.0, 2.0, 1.0, 0.5]))
    assert state.iteration == 8 and state.drops == 0 and state.best["iteration"] == 2
    assert state.stopped == "reached the iteration bound"


def test_automatic_eval_interval_keeps_evaluation_near_a_tenth(det_data):
    import time

    def slow(model):
        time.sleep(0.5)
        return 1.0
    model, _ = build_model("fasterrcnn_tiny", 4, min_size=64, max_size=96)
    state = fit(model, _dataset(det_data), _cfg(iterations=30, eval_every=0, schedule="steps"), validate=slow)
    assert state.val_history[0]["iteration"] == 10 and state.eval_every >= 10


def test_automatic_eval_interval_follows_the_latest_evaluation(det_data):
    import time

    calls = []

    def first_slow(model):  # a barely trained model's evaluation costs more than later ones
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.5)
        return float(len(calls))
    model, _ = build_model("fasterrcnn_tiny", 4, min_size=64, max_size=96)
    state = fit(model, _dataset(det_data), _cfg(iterations=60, eval_every=0, schedule="steps"), validate=first_slow)
    # the first evaluation sets the interval to its bound (60 // 5); the cheap second one brings it to 10,
    # and each evaluation counts from the last one
    assert [v["iteration"] for v in state.val_history] == [10, 22, 32, 42, 52, 60]
    assert state.eval_every == 10


def test_plateau_needs_a_validation_set(det_data):
    model, _ = build_model("fasterrcnn_tiny", 4, min_size=64, max_size=96)
    with pytest.raises(ValueError, match="validation set"):
        fit(model, _dataset(det_data), _cfg(schedule="plateau"))


def test_schedule_bound_grows_with_the_data_but_not_per_image():
    small, large = default_iterations(60, 4, "cuda"), default_iterations(260, 4, "cuda")
    assert 300 <= small < large
    assert large / small < 260 / 60  # fewer epochs as data grows
    # a CPU caps the images seen, whatever the batch
    assert default_iterations(260, 4, "cpu") == 4000 and default_iterations(260, 8, "cpu") == 2000
    assert default_iterations(118_000, 16, "cuda") == pytest.approx(90_000, rel=0.05)


def test_pipeline_train_with_a_validation_set_saves_the_best(det_data, tmp_path):
    out = tmp_path / "t.pt"
    state = pipeline.train(str(det_data / "labeled.json"), str(det_data / "labeled"), str(out), arch="fasterrcnn_tiny",
                           config=_cfg(iterations=6, eval_every=3), device="cpu",
                           val_json=str(det_data / "val.json"), val_root=str(det_data / "val"))
    assert [v["iteration"] for v in state.val_history] == [3, 6] and state.best is not None
    assert read_checkpoint(out)["validation"]["best"] == state.best


def test_plateau_schedule_decays_by_the_step_schedule_at_the_latest():
    from ml_core.engine import lr_factor
    cfg = TrainConfig(iterations=100, warmup_iters=1, steps=(0.7, 0.9))
    assert lr_factor(50, cfg, drops=0) == pytest.approx(1.0)
    assert lr_factor(50, cfg, drops=1) == pytest.approx(0.1)   # a plateau came first
    assert lr_factor(75, cfg, drops=0) == pytest.approx(0.1)   # a curve still creeping up at 70%
    assert lr_factor(95, cfg, drops=1) == pytest.approx(0.01)
    assert lr_factor(95, cfg, drops=2) == pytest.approx(0.01)


def test_a_curve_that_keeps_rising_still_decays_then_stops_on_a_plateau(det_data):
    model, _ = build_model("fasterrcnn_tiny", 4, min_size=64, max_size=96)
    # rising by more than min_delta at every evaluation until 28, then flat
    values = [float(i) for i in range(1, 15)] + [14.0] * 20
    state = fit(model, _dataset(det_data), _cfg(iterations=40, eval_every=2, patience=2, schedule="plateau"),
                validate=Scripted(values))
    lrs = {v["iteration"]: v["lr"] for v in state.val_history}
    assert lrs[26] == pytest.approx(0.01) and lrs[28] == pytest.approx(0.001)  # decayed at 70% of the bound
    assert state.drops == 2 and "converged" in state.stopped and state.iteration == 36


def test_auto_schedule_takes_no_noise_for_a_plateau_before_the_first_decay(det_data):
    model, _ = build_model("fasterrcnn_tiny", 4, min_size=64, max_size=96)
    # best at 4, then noise below it: "plateau" would drop at 8; "auto" keeps the rate until 70% (28),
    # counts patience afresh from there (28, 30: drop), then 32, 34: stop
    values = [5.0, 9.0] + [8.0, 7.0] * 20
    state = fit(model, _dataset(det_data), _cfg(iterations=40, eval_every=2, patience=2), validate=Scripted(values))
    lrs = {v["iteration"]: v["lr"] for v in state.val_history}
    assert lrs[26] == pytest.approx(0.01) and lrs[28] == pytest.approx(0.001) and lrs[30] == pytest.approx(0.001)
    assert lrs[32] == pytest.approx(0.0001)
    assert state.drops == 2 and "converged" in state.stopped and state.iteration == 34
    assert state.best == {"iteration": 4, "AP": 9.0}
