"""The GPU suite (benchmarks/gpu_suite.py) cannot break unseen between GPU runs: its smoke mode runs
every step on the CPU on tiny sizes, and a step whose dependency is missing records the error and
lets the others run."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
STEPS = ["tta_fasterrcnn", "tta_keypointrcnn", "box_ensembling", "train_pipeline", "distillation"]


def run_suite(out: Path, *args, env=None, timeout=300):
    r = subprocess.run([sys.executable, str(SUITE), "--smoke", "--threads", "1", "--out", str(out), *args],
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert (out / "gpu_suite.json").is_file(), r.stdout[-3000:] + r.stderr[-3000:]
    return r, json.loads((out / "gpu_suite.json").read_text())


def test_smoke_runs_every_step_with_figures_and_no_error(tmp_path):
    # about 55 s on two idle cores (the smoke default budget is 110 s). A loaded machine gets more:
    # with two benchmarks beside the test run on two cores, the first two steps alone took about 240 s and
    # a budget of 240 s skipped the third; the budget bounds the time, the steps' work is the same
    r, report = run_suite(tmp_path, "--budget-s", "600", timeout=660)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert report["finished"] and report["smoke"]
    assert report["elapsed_s"] < 600
    assert report["web_stack_modules_loaded"] == []
    env = report["environment"]
    for key in ("device_name", "torch", "torchvision", "cuda"):
        assert key in env
    assert list(report["steps"]) == STEPS
    assert set(report["settings"]["steps"]) == set(STEPS)
    for name, step in report["steps"].items():
        assert step["status"] == "ok", (name, step.get("error"), step.get("traceback"))
        assert not step.get("error") and step["figures"], name
    for name in STEPS[:2]:
        f = report["steps"][name]["figures"]
        assert f["hand_loop"]["images_per_s"] > 0 and f["ml_core_tta"]["images_per_s"] > 0 and f["speedup"] > 0
        assert f["views_per_image"] == 8 and f["backbone_only_images_per_s"] > 0
        assert set(f["time_split"]["ms_per_image"]) == {"transform", "backbone", "rpn", "roi_heads", "ensembling_and_rest"}
        assert f["ml_core_tta_fp32"]["images_per_s"] > 0
        assert f["hand_loop_cudnn_benchmark"]["images_per_s"] > 0
        assert f["baseline_images_per_s"] >= f["hand_loop"]["images_per_s"]
        assert f["profile"]["top"] and all(r["self_ms"] >= 0 for r in f["profile"]["top"])
        split = f["predict_split"]["ms_per_image"]
        assert {"views_backbone_passes", "views_heads", "box_ensembling", "agreement",
                "host_copy_and_results"} <= set(split)
        assert split["views_backbone_passes"] > 0 and split["views_heads"] > 0 and ("keypoint_ensembling" in split) == (name == "tta_keypointrcnn")
        assert f["ml_core_tta_unfused_backbone"]["images_per_s"] > 0
        assert f["ml_core_tta_unfused_backbone"]["features_max_rel_diff_fused"] < 1e-3   # the CPU: the same ops
    f = report["steps"]["tta_fasterrcnn"]["figures"]
    assert f["ml_core_tta"]["union"] == "pre_nms" and f["ml_core_tta_post_nms_union"]["images_per_s"] > 0
    ips = report["steps"]["box_ensembling"]["figures"]["images_per_second"]
    assert ips["distill nms+vote, padded batch"] > 0 and ips["distill nms+vote"] > 0
    union = report["steps"]["box_ensembling"]["figures"]["pre_nms_union"]
    assert union["detections_per_img"] == 100 and union["images_per_second"]["distill nms+vote, padded batch"] > 0
    f = report["steps"]["train_pipeline"]["figures"]
    assert f["pipeline_images_per_s"] > 0 and f["in_memory_images_per_s"] > 0
    ap = report["steps"]["distillation"]["figures"]["ap"]
    assert len(ap) == 4 and all(0 <= row["AP"] <= 100 for row in ap.values())
    text = (tmp_path / "gpu_suite.txt").read_text()
    assert "distillation" in text and "teacher" in text and "error" not in text


def test_a_missing_pycocotools_fails_only_the_distillation_step(tmp_path):
    blocker = tmp_path / "block" / "pycocotools"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('pycocotools blocked by the test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), str(ROOT)])}
    r, report = run_suite(tmp_path / "out", "--steps", "3,5", env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert list(report["steps"]) == ["box_ensembling", "distillation"]
    assert report["steps"]["box_ensembling"]["status"] == "ok"
    step = report["steps"]["distillation"]
    assert step["status"] == "error" and "pycocotools" in step["error"]
    assert report["finished"]
