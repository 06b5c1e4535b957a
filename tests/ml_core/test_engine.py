import pytest
import torch

from ml_core import pipeline
from ml_core.checkpoint import read_checkpoint
from ml_core.engine import Cancelled, Hook, TrainConfig, lr_factor


def test_schedule_warms_up_then_decays_at_70_and_90_percent():
    cfg = TrainConfig(iterations=100, warmup_iters=10, warmup_factor=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(69, cfg) == pytest.approx(1.0)
    assert lr_factor(70, cfg) == pytest.approx(0.1)
    assert lr_factor(90, cfg) == pytest.approx(0.01)


def test_bad_config_values():
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"epochs": 3})
    with pytest.raises(ValueError):
        TrainConfig(iterations=0)
    with pytest.raises(ValueError, match="num_workers"):
        TrainConfig(num_workers=-1)


def test_default_loader_workers_follow_the_device(det_data, tmp_path, monkeypatch):
    """num_workers=None (the default): no worker processes when training on the CPU."""
    from ml_core import engine
    seen = []
    real = engine.loader_kwargs
    monkeypatch.setattr(engine, "loader_kwargs", lambda n: seen.append(n) or real(n))
    cfg = TrainConfig(iterations=2, batch_size=2, lr=0.01, warmup_iters=1, log_every=1)
    assert cfg.num_workers is None
    pipeline.train(str(det_data / "labeled.json"), str(det_data / "labeled"), str(tmp_path / "t.pt"),
                   arch="fasterrcnn_tiny", config=cfg, device="cpu")
    assert seen == [0]


class StopAt(Hook):
    def __init__(self, n):
        self.n, self.seen = n, []

    def after_step(self, state):
        self.seen.append(state.iteration)
        if state.iteration == self.n:
            raise Cancelled()


def _cfg(**kw):
    return TrainConfig(**{"iterations": 6, "batch_size": 2, "lr": 0.01, "warmup_iters": 2, "num_workers": 0,
                          "log_every": 1, **kw})


def test_teacher_training_cancel_and_resume(det_data, tmp_path):
    out = tmp_path / "t.pt"
    stop = StopAt(3)
    with pytest.raises(Cancelled):
        pipeline.train(str(det_data / "labeled.json"), str(det_data / "labeled"), str(out), arch="fasterrcnn_tiny",
                       config=_cfg(), hooks=[stop], device="cpu")
    assert read_checkpoint(out)["iteration"] == 3
    seen = StopAt(-1)
    state = pipeline.train(str(det_data / "labeled.json"), str(det_data / "labeled"), str(out), arch="fasterrcnn_tiny",
                           config=_cfg(), hooks=[seen], device="cpu")
    assert seen.seen == [4, 5, 6] and state.iteration == 6
    ck = read_checkpoint(out)
    assert "optimizer" not in ck and ck["meta"]["role"] == "teacher" and ck["meta"]["init"] == "random"
    assert [h["iteration"] for h in ck["history"]] == [1, 2, 3, 4, 5, 6]

    # run again with the same settings (a pipeline restarted after it stopped): nothing trains twice
    again = StopAt(-1)
    state = pipeline.train(str(det_data / "labeled.json"), str(det_data / "labeled"), str(out), arch="fasterrcnn_tiny",
                           config=_cfg(), hooks=[again], device="cpu")
    assert again.seen == [] and state.iteration == 6 and len(state.history) == 6 and state.already_trained
    assert all(torch.equal(a, b) for a, b in zip(read_checkpoint(out)["model"].values(), ck["model"].values()))
    # only the bookkeeping changed (how often it checkpoints and logs): still nothing trains twice
    kept = StopAt(-1)
    state = pipeline.train(str(det_data / "labeled.json"), str(det_data / "labeled"), str(out), arch="fasterrcnn_tiny",
                           config=_cfg(checkpoint_every=5, log_every=3), hooks=[kept], device="cpu")
    assert kept.seen == [] and state.already_trained
    # other training data (a new pseudo-label file, say) with the same settings: trained again
    other = tmp_path / "labeled_copy.json"
    other.write_text((det_data / "labeled.json").read_text() + " ")
    changed = StopAt(-1)
    pipeline.train(str(other), str(det_data / "labeled"), str(out), arch="fasterrcnn_tiny", config=_cfg(),
                   hooks=[changed], device="cpu")
    assert changed.seen == list(range(1, 7))
    # other settings at the same path: that is a new run, trained from the start
    longer = StopAt(-1)
    state = pipeline.train(str(det_data / "labeled.json"), str(det_data / "labeled"), str(out), arch="fasterrcnn_tiny",
                           config=_cfg(iterations=7), hooks=[longer], device="cpu")
    assert longer.seen == list(range(1, 8)) and state.iteration == 7


def test_a_run_stopped_part_way_starts_over_on_other_inputs_or_settings(det_data, tmp_path):
    """A partial checkpoint continues only on what it began with: run again with other data (new
    pseudo-labels, say) or other settings, training starts from the beginning instead of finishing
    the old model on the new inputs."""
    labeled, root, out = str(det_data / "labeled.json"), str(det_data / "labeled"), tmp_path / "t.pt"
    with pytest.raises(Cancelled):
        pipeline.train(labeled, root, str(out), arch="fasterrcnn_tiny", config=_cfg(), hooks=[StopAt(3)], device="cpu")
    other = tmp_path / "labeled_copy.json"
    other.write_text((det_data / "labeled.json").read_text() + " ")
    changed = StopAt(-1)
    pipeline.train(str(other), root, str(out), arch="fasterrcnn_tiny", config=_cfg(), hooks=[changed], device="cpu")
    assert changed.seen == list(range(1, 7))

    with pytest.raises(Cancelled):
        pipeline.train(labeled, root, str(out), arch="fasterrcnn_tiny", config=_cfg(), hooks=[StopAt(3)], device="cpu")
    assert read_checkpoint(out)["iteration"] == 3
    longer = StopAt(-1)
    state = pipeline.train(labeled, root, str(out), arch="fasterrcnn_tiny", config=_cfg(iterations=7), hooks=[longer],
                           device="cpu")
    assert longer.seen == list(range(1, 8)) and state.iteration == 7
    # the same settings and inputs again: it goes on from where it stopped
    with pytest.raises(Cancelled):
        pipeline.train(labeled, root, str(out), arch="fasterrcnn_tiny", config=_cfg(), hooks=[StopAt(3)], device="cpu")
    resumed = StopAt(-1)
    pipeline.train(labeled, root, str(out), arch="fasterrcnn_tiny", config=_cfg(), hooks=[resumed], device="cpu")
    assert resumed.seen == [4, 5, 6]


def test_student_retrains_from_the_teacher_initialisation(det_data, tmp_path):
    teacher = tmp_path / "teacher.pt"
    pipeline.train(str(det_data / "labeled.json"), str(det_data / "labeled"), str(teacher), arch="fasterrcnn_tiny",
                   config=_cfg(iterations=2), device="cpu")
    gt = str(det_data / "unlabeled_gt.json")
    student = tmp_path / "student.pt"
    pipeline.train(str(det_data / "labeled.json"), str(det_data / "labeled"), str(student), arch="fasterrcnn_tiny",
                   config=_cfg(iterations=2, ratio="1:1"), pseudo_json=gt, pseudo_root=str(det_data / "unlabeled"),
                   teacher=str(teacher), role="student", device="cpu")
    meta = read_checkpoint(student)["meta"]
    assert meta["role"] == "student" and meta["student_init"] == "retrain" and meta["data"]["pseudo_images"] > 0


def test_task_mismatch_is_refused(det_data, tmp_path):
    with pytest.raises(ValueError, match="keypoints architecture"):
        pipeline.train(str(det_data / "labeled.json"), str(det_data / "labeled"), str(tmp_path / "x.pt"),
                       arch="keypointrcnn_tiny", config=_cfg(), device="cpu")


def test_keypoint_teacher_trains_with_flip_augmentation(kp_data, tmp_path):
    state = pipeline.train(str(kp_data / "labeled.json"), str(kp_data / "labeled"), str(tmp_path / "k.pt"),
                           arch="keypointrcnn_tiny", config=_cfg(iterations=2), device="cpu")
    assert torch.isfinite(torch.tensor(state.losses["loss"]))


@pytest.mark.parametrize("workers", [0, 2])
def test_the_same_seed_trains_the_same_weights(kp_data, tmp_path, workers):
    """Flip augmentation draws from torch's seeded generators (fit's, or each loader worker's)."""
    weights = []
    for run in ("a", "b"):
        out = tmp_path / f"{run}.pt"
        pipeline.train(str(kp_data / "labeled.json"), str(kp_data / "labeled"), str(out), arch="keypointrcnn_tiny",
                       config=_cfg(iterations=4, num_workers=workers), device="cpu")
        weights.append(read_checkpoint(out)["model"])
    for k, v in weights[0].items():
        assert torch.equal(v, weights[1][k]), k


@pytest.mark.parametrize("task", ["keypoints", "detection"])
def test_training_sizes_jitter_for_keypoints_and_validation_keeps_the_models_own(kp_data, det_data, tmp_path,
                                                                                monkeypatch, task):
    """Keypoint models train at Detectron's 0.8-1.0 of their size, box models at their size; every
    evaluation and the saved model use the model's own size."""
    data, arch = (kp_data, "keypointrcnn_tiny") if task == "keypoints" else (det_data, "fasterrcnn_tiny")
    seen, models = {"train": [], "eval": []}, []
    real_build = pipeline.build_model

    def build(*a, **kw):
        model, init = real_build(*a, **kw)
        resize = model.transform.resize

        def recorded(image, target=None):
            image, target = resize(image, target)
            seen["train" if model.transform.training else "eval"].append(min(image.shape[-2:]))
            return image, target
        model.transform.resize = recorded
        models.append(model)
        return model, init
    monkeypatch.setattr(pipeline, "build_model", build)
    pipeline.train(str(data / "labeled.json"), str(data / "labeled"), str(tmp_path / "m.pt"), arch=arch,
                   config=_cfg(iterations=8, eval_every=4), device="cpu", val_json=str(data / "val.json"),
                   val_root=str(data / "val"))
    if task == "keypoints":
        assert set(seen["train"]) <= {51, 54, 56, 59, 61, 64} and len(set(seen["train"])) > 1
    else:
        assert set(seen["train"]) == {64}
    assert seen["eval"] and set(seen["eval"]) == {64}
    assert tuple(models[0].transform.min_size) == (64,)


def test_train_scales_are_checked():
    with pytest.raises(ValueError, match="train_scales"):
        TrainConfig(train_scales=(0.1,))
    assert TrainConfig.from_dict({"train_scales": [0.9, 1]}).train_scales == (0.9, 1.0)


def test_two_process_data_parallel_training_under_torchrun(det_data, tmp_path):
    """The multi-GPU path (torchrun + DistributedDataParallel), run small on the CPU with gloo."""
    import os
    import subprocess
    import sys
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(29500 + os.getpid() % 1000), "-m", "ml_core.cli", "train", str(det_data / "labeled.json"),
                        "--out", str(out), "--arch", "fasterrcnn_tiny", "--iterations", "2", "--batch-size", "2",
                        "--workers", "0", "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ck = read_checkpoint(out)
    assert ck["iteration"] == 2 and not any(k.startswith("module.") for k in ck["model"])
