"""The GPU suite (issue 14): every GPU figure of Distill in one prepared, time-boxed run.

Steps, in order; each runs in its own time budget inside try/except (an error is recorded and the
next step runs), and the whole run ends within --budget-s (default 420 s):
  1. tta_fasterrcnn    ml_core.tta against the hand loop (one image, one view at a time, fp32) in
                       the same run: Faster R-CNN R50-FPN, random weights, 640x480 JPEGs, shorter
                       sides 400/600/800/1000 x flip; plus where the time goes (images/s up to the
                       transform, the backbone, the RPN, the RoI heads, and the whole predict()).
  2. tta_keypointrcnn  the same for Keypoint R-CNN R50-FPN with keypoint heatmap ensembling.
  3. box_ensembling    ml_core.ensemble on the device: padded batch path, per-image path,
                       ensemble-boxes (whatever of it imports; its NMS needs numba).
  4. train_pipeline    fit() with DataLoader workers against the same steps on tensors in memory.
  5. distillation      teacher, single-view and ensembled students, and the control (the teacher
                       trained on labels alone for as many more iterations as a student got),
                       ResNet-18 FPN at 320 px, iterations sized to what is left of the budget;
                       COCO box AP (pycocotools).
Figures go to OUT/gpu_suite.json after every step (and within steps) and a short table to
OUT/gpu_suite.txt, so a run cut short still leaves what it measured. OUT is --out, else $OUT,
else var/gpu_suite/. Device, versions and every setting are in the JSON.

Nothing here imports distill_app, Django or Celery; pycocotools is needed by step 5 alone.
Run (project root, a CUDA machine): bash benchmarks/gpu_suite.sh [--budget-s 420]
      or: python3 benchmarks/gpu_suite.py [--budget-s 420] [--out DIR] [--steps 1,2,3,4,5]
Smoke test (CPU, tiny sizes, every step, under two minutes): python benchmarks/gpu_suite.py --smoke
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

STEPS = ("tta_fasterrcnn", "tta_keypointrcnn", "box_ensembling", "train_pipeline", "distillation")
COCO_FLIP = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]  # 17 COCO keypoints, left <-> right

# budget_s: the step's own time budget (None: all that is left); min_s: below this it is skipped
GPU = {
    "tta_fasterrcnn": dict(arch="fasterrcnn_resnet50_fpn", size=[640, 480], scales=[400, 600, 800, 1000],
                           max_size=2000, group=8, workers=6, hand_images=32, tta_images=128, split_reps=4,
                           budget_s=105, min_s=20),
    "tta_keypointrcnn": dict(arch="keypointrcnn_resnet50_fpn", num_keypoints=17, size=[640, 480],
                             scales=[400, 600, 800, 1000], max_size=2000, group=8, workers=6, hand_images=24,
                             tta_images=96, split_reps=3, budget_s=85, min_s=20),
    "box_ensembling": dict(images=300, batch=64, union_images=64, union_per_view=1000, budget_s=35, min_s=8),
    "train_pipeline": dict(arch="fasterrcnn_resnet50_fpn", size=512, batch=16, iterations=60, workers=8, images=64,
                           budget_s=50, min_s=15),
    "distillation": dict(arch="fasterrcnn_resnet18_fpn", size=320, labeled=200, unlabeled=800, val=150,
                         batch=16, lr=0.02, scales=[224, 320, 416, 512], workers=6, group=8,
                         calibration_iterations=15, min_iterations=50, max_iterations=4000, reserve_s=35,
                         budget_s=None, min_s=60),
}
SMOKE = {
    "tta_fasterrcnn": dict(arch="fasterrcnn_tiny", size=[96, 72], scales=[48, 64, 80, 96], max_size=2000,
                           group=2, workers=1, hand_images=2, tta_images=4, split_reps=1, union_per_view=100,
                           budget_s=30, min_s=5),
    "tta_keypointrcnn": dict(arch="keypointrcnn_tiny", num_keypoints=17, size=[96, 72], scales=[48, 64, 80, 96],
                             max_size=2000, group=2, workers=0, hand_images=2, tta_images=2, split_reps=1,
                             detections_per_img=20, budget_s=30, min_s=5),
    "box_ensembling": dict(images=6, batch=4, union_images=2, union_per_view=150, budget_s=10, min_s=3),
    "train_pipeline": dict(arch="fasterrcnn_tiny", size=64, batch=2, iterations=8, workers=1, images=8,
                           budget_s=25, min_s=5),
    "distillation": dict(arch="fasterrcnn_tiny", size=64, labeled=8, unlabeled=8, val=4, batch=2, lr=0.01,
                         scales=[48, 64], workers=0, group=4, calibration_iterations=7, min_iterations=2,
                         max_iterations=3, reserve_s=5, budget_s=None, min_s=10),
}
END_MARGIN_S = 8  # left free at the end of the budget: writing, printing, process exit


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _r(x, nd=3):
    return None if x is None else round(float(x), nd)


def _json_default(o):
    if hasattr(o, "item"):
        try:
            return o.item()
        except Exception:
            pass
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _benchmark(name: str):
    """A sibling benchmark script as a module, loaded from its file (so that a package named
    'benchmarks' elsewhere on sys.path cannot shadow it)."""
    key = f"_distill_benchmark_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[key]
            raise
    return sys.modules[key]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except Exception:
        return None


def environment(device: torch.device) -> dict:
    import torchvision
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "torch_threads": torch.get_num_threads(), "device": str(device),
           "numpy": np.__version__, "pycocotools": _version("pycocotools"), "ensemble_boxes": _version("ensemble-boxes"),
           "numba": _version("numba"), "PYTHONPATH": os.environ.get("PYTHONPATH"),
           "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if device.type == "cuda":
        try:
            p = torch.cuda.get_device_properties(device)
            env.update(device_name=p.name, capability=f"{p.major}.{p.minor}",
                       gpu_memory_gib=round(p.total_memory / 2 ** 30, 1), multiprocessors=p.multi_processor_count)
        except Exception as e:
            env.update(device_name=f"CUDA device (properties unavailable: {type(e).__name__}: {e})")
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=10).stdout.strip() or None
        except Exception:
            env["driver"] = None
    else:
        env["device_name"] = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except Exception:
        env["git_commit"] = None
    env["torch_settings"] = {"cudnn.benchmark": torch.backends.cudnn.benchmark,
                             "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                             "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                             "float32_matmul_precision": torch.get_float32_matmul_precision()}
    return env


# ---------------------------------------------------------------------------------------------------------
# background data generation (CPU, while the GPU runs steps 1-3)

def _generate_jobs(jobs: list[tuple[str, dict]]):
    from ml_core.synth import SynthConfig, generate
    torch.set_num_threads(1)
    for out, cfg in jobs:
        generate(out, SynthConfig(**cfg))
        (Path(out) / ".done").write_text("ok")


# ---------------------------------------------------------------------------------------------------------
# the runner

class StepContext:
    def __init__(self, suite: "Suite", name: str, rec: dict, budget: float):
        self.suite, self.name, self.rec, self.budget = suite, name, rec, budget
        self.start = time.perf_counter()
        self.deadline = self.start + budget
        self.device = suite.device
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{name}_", dir=suite.tmp))

    @property
    def fig(self) -> dict:
        return self.rec["figures"]

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def cap(self, fraction: float, floor: float = 0.5) -> float:
        """fraction of the step's budget, but no more than what is left of it (at least floor)."""
        return max(floor, min(fraction * self.budget, self.left()))

    def summary(self, text: str):
        self.rec["summary"] = text

    def save(self):
        self.suite.save()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def log(self, msg: str):
        print(f"[{time.perf_counter() - self.suite.t0:6.1f}s] {self.name}: {msg}", flush=True)


class Suite:
    def __init__(self, args, presets: dict, device: torch.device):
        self.args, self.presets, self.device = args, presets, device
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + args.budget_s
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
        self._lock = threading.RLock()
        self.bg = None
        self.bg_dirs: dict[str, Path] = {}
        self.current = None
        self.report = {
            "suite": "distill gpu_suite (issue 14)", "smoke": args.smoke, "command": sys.argv,
            "started_at": _now(), "budget_s": args.budget_s, "elapsed_s": 0.0, "finished": False, "current_step": None,
            "environment": environment(device),
            "settings": {"steps": {k: v for k, v in presets.items() if k in self.selected()}, "budget_s": args.budget_s,
                         "end_margin_s": END_MARGIN_S, "args": vars(args), "out": str(self.out), "device": str(device),
                         "timing": "warm-up before every timed run; torch.cuda.synchronize() around every timed "
                                   "interval on CUDA; images/s = timed images / wall seconds"},
            "steps": {name: {"status": "pending", "figures": {}} for name in self.selected()},
        }

    def selected(self) -> list[str]:
        return [s for s in STEPS if s in self.args.steps]

    # ---- output
    def save(self):
        with self._lock:
            self.report["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
            for _ in range(3):
                try:
                    text = json.dumps(self.report, indent=1, default=_json_default)
                    break
                except RuntimeError:  # a dict changed size under another thread; try again
                    time.sleep(0.01)
            else:
                return
            tmp = self.out / "gpu_suite.json.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / "gpu_suite.json")
            tmp = self.out / "gpu_suite.txt.tmp"
            tmp.write_text(self.table())
            os.replace(tmp, self.out / "gpu_suite.txt")

    def table(self) -> str:
        env = self.report["environment"]
        lines = [f"Distill GPU suite{' (SMOKE, CPU)' if self.args.smoke else ''}: {env.get('device_name')}; "
                 f"torch {env['torch']}, torchvision {env['torchvision']}, CUDA {env['cuda']}",
                 f"started {self.report['started_at']}, elapsed {self.report['elapsed_s']} s of {self.args.budget_s} s"
                 f"{'' if self.report['finished'] else ' (not finished)'}", ""]
        for i, (name, rec) in enumerate(self.report["steps"].items(), 1):
            secs = rec.get("seconds")
            lines.append(f"{i}. {name:<17} {rec['status']:<8} {'' if secs is None else f'{secs:6.1f} s'}  "
                         f"{rec.get('summary', '')}")
            if rec.get("error"):
                lines.append(f"   error: {rec['error']}")
        for name, rec in self.report["steps"].items():
            if rec["figures"].get("table"):
                lines += ["", f"{name}:", rec["figures"]["table"]]
        if self.report.get("stopped"):
            lines += ["", f"STOPPED: {self.report['stopped']}"]
        return "\n".join(lines) + "\n"

    # ---- hard stops
    def emergency_stop(self, why: str, code: int):
        with self._lock:
            self.report["stopped"] = f"{why} at {time.perf_counter() - self.t0:.1f} s, during {self.current}"
            if self.current and self.report["steps"][self.current]["status"] == "running":
                self.report["steps"][self.current]["status"] = "stopped"
                self.report["steps"][self.current]["error"] = why
            try:
                self.save()
                print(self.table(), flush=True)
            except Exception:
                pass
        if self.bg is not None and self.bg.is_alive():
            self.bg.kill()
        os._exit(code)

    # ---- background data
    def start_background_data(self):
        jobs = []
        if "train_pipeline" in self.selected():
            p = self.presets["train_pipeline"]
            d = self.tmp / "data_train"
            jobs.append((str(d), dict(kind="detection", image_size=p["size"], labeled=p["images"], unlabeled=p["images"],
                                      val=1, seed=0)))
            self.bg_dirs["train_pipeline"] = d
        if "distillation" in self.selected():
            p = self.presets["distillation"]
            d = self.tmp / "data_distill"
            jobs.append((str(d), dict(kind="detection", image_size=p["size"], labeled=p["labeled"],
                                      unlabeled=p["unlabeled"], val=p["val"], seed=0)))
            self.bg_dirs["distillation"] = d
        if not jobs:
            return
        import multiprocessing
        self.bg = multiprocessing.get_context("forkserver").Process(target=_generate_jobs, args=(jobs,), daemon=True)
        self.bg.start()

    def background_data(self, name: str, wait_s: float) -> Path | None:
        """The step's synthetic data once the background process has written it (waiting up to wait_s)."""
        d = self.bg_dirs.get(name)
        if d is None:
            return None
        t = time.perf_counter()
        while not (d / ".done").is_file():
            if self.bg is None or not self.bg.is_alive() or time.perf_counter() - t > wait_s:
                return None
            time.sleep(0.2)
        return d

    # ---- steps
    def run(self, funcs: dict):
        self.save()
        names = self.selected()
        for i, name in enumerate(names):
            p = self.presets[name]
            rec = self.report["steps"][name]
            later_min = sum(self.presets[n]["min_s"] for n in names[i + 1:])
            left = self.deadline - time.perf_counter() - END_MARGIN_S
            budget = left - later_min if p["budget_s"] is None else min(p["budget_s"], left - later_min)
            rec["budget_s"] = round(budget, 1)
            if budget < p["min_s"]:
                rec.update(status="skipped", error=f"no time left ({budget:.0f} s for a step that needs {p['min_s']} s)")
                self.save()
                continue
            rec["status"] = "running"
            self.current = self.report["current_step"] = name
            ctx = StepContext(self, name, rec, budget)
            ctx.log(f"start, budget {budget:.0f} s")
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            self.save()
            try:
                funcs[name](ctx, p)
                rec["status"] = "ok"
            except Exception as e:
                rec["status"] = "error"
                rec["error"] = f"{type(e).__name__}: {e}"
                rec["traceback"] = traceback.format_exc(limit=12)
                ctx.log(f"ERROR {rec['error']}")
            finally:
                rec["seconds"] = round(time.perf_counter() - ctx.start, 1)
                if self.device.type == "cuda":
                    rec["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.current = self.report["current_step"] = None
                self.save()
                ctx.log(f"{rec['status']} in {rec['seconds']} s  {rec.get('summary', '')}")
        self.report["web_stack_modules_loaded"] = sorted(
            m for m in sys.modules if m.split(".")[0] in ("django", "celery", "rest_framework", "distill_app"))
        self.report["finished"] = True
        self.save()


# ---------------------------------------------------------------------------------------------------------
# steps 1 and 2: multi-transform inference

def _write_jpegs(folder: Path, n: int, size) -> list[str]:
    from PIL import Image
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        p = folder / f"{i}.jpg"
        Image.fromarray(arr).save(p, quality=90)
        paths.append(str(p))
    return paths


def hand_loop_keypoints(model, path: str, scales: list[int], max_size: int, device, flip_inds: list[int]):
    """One image, one view at a time, fp32, as one writes it first: every view through the model
    (keeping its features), the boxes ensembled, then the keypoint head of every view on the
    ensembled boxes, heatmaps averaged and decoded."""
    from ml_core.data import load_image
    from ml_core.ensemble import decode_heatmaps, ensemble_boxes, ensemble_heatmaps
    from ml_core.transforms import View, boxes_to_view, flip_boxes

    t, rh = model.transform, model.roi_heads
    with torch.no_grad():
        img = load_image(path).to(device)
        h, w = img.shape[-2:]
        views, boxes, scores, labels = [], [], [], []
        for s in scales:
            for flip in (False, True):
                t.min_size, t.max_size = (s,), max_size
                il, _ = t([img.flip(-1) if flip else img])
                feats = model.backbone(il.tensors)
                props, _ = model.rpn(il, feats)
                dets, _ = rh(feats, props, il.image_sizes)
                d = t.postprocess(dets, il.image_sizes, [(h, w)])[0]
                boxes.append(flip_boxes(d["boxes"], w) if flip else d["boxes"])
                scores.append(d["scores"])
                labels.append(d["labels"])
                views.append((View(s, flip), feats, tuple(il.image_sizes[0])))
        b, sc, lab = ensemble_boxes(torch.cat(boxes), torch.cat(scores), torch.cat(labels), num_views=len(views))
        if len(b) == 0:
            return b, sc, lab, None
        heat, flips = [], []
        for v, feats, size in views:
            vb = boxes_to_view(b, v, (h, w), size)
            x = rh.keypoint_roi_pool(feats, [vb], [size])
            heat.append(rh.keypoint_predictor(rh.keypoint_head(x)))
            flips.append(v.flip)
        kps, _ = decode_heatmaps(ensemble_heatmaps(heat, flips, flip_inds, "mean"), b)
    return b, sc, lab, kps


def _upto(predictor, images: list[torch.Tensor], stage: str):
    """The first stages of MultiTransformPredictor's forward pass over every view of the group
    (on its fast path, ml_core.fast_rcnn.BatchedViews, where the predictor uses it)."""
    model, ts = predictor.model, predictor.transforms
    if predictor.fast:
        # as predict() runs it: a pre-NMS union post-processes twice (the union, then the views shown)
        rh = model.roi_heads
        heads = rh.nms_thresh, rh.detections_per_img
        pre_nms = predictor.union == "pre_nms"
        if pre_nms:
            rh.nms_thresh, rh.detections_per_img = 1.0, predictor.options.union_per_view
        try:
            predictor.batched.run(images, ts.scales, ts.flip, ts.max_size, predictor.flip_inds, predictor._autocast,
                                  stop_after=stage, shown=heads if pre_nms else None)
        finally:
            rh.nms_thresh, rh.detections_per_img = heads
        return
    t = model.transform
    flipped = [im.flip(-1) for im in images] if ts.flip else []
    with torch.inference_mode(), predictor._autocast():
        for scale in ts.scales:
            t.min_size, t.max_size = (scale,), ts.max_size
            il, _ = t(images + flipped)
            if stage == "transform":
                continue
            feats = model.backbone(il.tensors)
            if stage == "backbone":
                continue
            props, _ = model.rpn(il, feats)
            if stage == "rpn":
                continue
            dets, _ = model.roi_heads(feats, props, il.image_sizes)
            t.postprocess(dets, il.image_sizes, [tuple(im.shape[-2:]) for im in images + flipped])


def _time_tta(ctx: StepContext, predictor, paths: list[str], group: int, workers: int, cap: float) -> dict:
    """ml_core.tta.run_inference over the files, stopped at a group boundary once cap seconds have passed."""
    from ml_core.tta import run_inference
    ctx.sync()
    t0 = time.perf_counter()
    n, n_first, t_first, t_last = 0, 0, None, None
    gen = run_inference(predictor, paths, group_size=group, num_workers=workers)
    try:
        for _i, pred, err in gen:
            if pred is None:
                raise RuntimeError(f"image failed: {err}")
            n += 1
            if n % group == 0 or n == len(paths):
                t_last = time.perf_counter()
                if t_first is None:
                    t_first, n_first = t_last, n
                if t_last - t0 > cap:
                    break
    finally:
        gen.close()
    ctx.sync()
    secs = time.perf_counter() - t0
    steady = (n - n_first) / (t_last - t_first) if t_last is not None and n > n_first else None
    return {"images": n, "seconds": _r(secs), "images_per_s": _r(n / secs), "first_group_s": _r(t_first - t0),
            "steady_images_per_s": _r(steady), "loader_workers": workers}


def _predict_split(ctx: StepContext, predictor, images: list[torch.Tensor], reps: int) -> dict:
    """Where one predict() call's time goes: the views' backbone passes (BatchedViews.scale_passes:
    transform, backbone and the RPN's candidates), the rest of their forward pass (.detections), the box
    ensembling, the agreement measure and, for keypoint models, the keypoint ensembling, each
    call wrapped between device synchronisations; the rest is the host copy and building results."""
    from ml_core import ensemble
    spent: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            ctx.sync()
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                ctx.sync()
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
        return wrapper
    targets = [(predictor.batched, "scale_passes", "views_backbone_passes"),
               (predictor.batched, "detections", "views_heads"),
               (ensemble, "ensemble_boxes_flat", "box_ensembling"), (ensemble, "agreement_padded", "agreement")]
    if predictor.keypoints:
        targets.append((predictor, "_ensemble_keypoints_fast", "keypoint_ensembling"))
    saved = [(obj, attr, obj.__dict__.get(attr)) for obj, attr, _ in targets]
    try:
        for obj, attr, name in targets:
            setattr(obj, attr, timed(name, getattr(obj, attr)))
        predictor.predict(images)                       # warm-up
        spent.clear()
        ctx.sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            predictor.predict(images)
        ctx.sync()
        total = time.perf_counter() - t0
    finally:
        for obj, attr, before in saved:
            if before is None:
                delattr(obj, attr)                          # an instance's method: the class's again
            else:
                setattr(obj, attr, before)
    per = reps * len(images)
    ms = {k: _r(1000 * v / per, 2) for k, v in spent.items()}
    ms["host_copy_and_results"] = _r(1000 * (total - sum(spent.values())) / per, 2)
    return {"what": "one group, predict() with each part timed between device synchronisations (adds a little)",
            "ms_per_image": ms, "predict_ms_per_image": _r(1000 * total / per, 2)}


def _profile(ctx: StepContext, fn, rows: int = 25) -> dict:
    """One call of fn under torch.profiler (after a warm-up): the operators with the most self time
    on the device (on the CPU, CPU self time), as a share of the total."""
    from torch.profiler import ProfilerActivity, profile
    cuda = ctx.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()
    ctx.sync()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        ctx.sync()
    wall = time.perf_counter() - t0
    from torch.autograd import DeviceType
    events = prof.key_averages()
    if cuda:
        # the kernels alone: an operator's device time is its kernels' time, so counting both doubles it
        events = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]

    def self_us(e):
        return getattr(e, "self_device_time_total", 0) if cuda else e.self_cpu_time_total
    total = sum(self_us(e) for e in events) or 1
    top = sorted(events, key=self_us, reverse=True)[:rows]
    busy = None
    if cuda:
        # how much of the profiled interval the device was busy at all (the union of the intervals
        # of its kernels and copies): the rest it waited for the host
        spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False))
        busy, end = 0.0, float("-inf")
        for a, b in spans:
            if b > end:
                busy += b - max(a, end)
                end = b
        busy = {"device_busy_ms": _r(busy / 1000, 2),
                "device_span_ms": _r((end - spans[0][0]) / 1000, 2) if spans else None}
    return {"what": "one MultiTransformPredictor.predict over the group, under torch.profiler (slower than "
                    "unprofiled); " + ("GPU kernels by self time" if cuda else "operators by CPU self time"),
            "wall_s_profiled": _r(wall), "device_self_ms_total": _r(total / 1000, 2), **(busy or {}),
            "top": [{"name": e.key, "calls": e.count, "self_ms": _r(self_us(e) / 1000, 3),
                     "share": _r(self_us(e) / total, 4)} for e in top]}


def _hand_loop_cudnn_benchmark(ctx: StepContext, hand, paths: list[str], p: dict) -> dict:
    """The hand loop again with torch.backends.cudnn.benchmark on (each input shape's convolution
    algorithm chosen by timing; the warm-up pays for the search), then the setting restored:
    ml_core.tta turns it on for its own calls on CUDA, so the baseline gets the same chance."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        r = _time_hand_loop(ctx, hand, paths[:p["hand_images"]], min(ctx.cap(0.15), ctx.left() / 3))
    finally:
        torch.backends.cudnn.benchmark = before
    return {**r, "cudnn.benchmark": True}


def _time_variant(ctx: StepContext, predictor, paths: list[str], p: dict, base: float, fraction: float,
                  **what) -> dict:
    """ml_core.tta with another predictor: one warm-up group, then timed as ours, against base."""
    from ml_core.data import load_image
    predictor.predict([load_image(x) for x in paths[:p["group"]]])
    r = _time_tta(ctx, predictor, paths[:p["tta_images"]], p["group"], p["workers"],
                  min(ctx.cap(fraction), ctx.left() / 3))
    return {**r, **what, "speedup": _r(r["images_per_s"] / base, 2)}


def _time_hand_loop(ctx: StepContext, hand, paths: list[str], cap: float) -> dict:
    """The hand loop over the files after a warm-up on the first, stopped once cap seconds have passed."""
    hand(paths[0])
    ctx.sync()
    t0, n = time.perf_counter(), 0
    for path in paths:
        hand(path)
        n += 1
        if time.perf_counter() - t0 > cap:
            break
    ctx.sync()
    secs = time.perf_counter() - t0
    return {"images": n, "seconds": _r(secs), "images_per_s": _r(n / secs), "precision": "fp32"}


def step_tta(ctx: StepContext, p: dict):
    hand_loop = _benchmark("tta_throughput").hand_loop
    from ml_core.data import load_image
    from ml_core.models import build_model
    from ml_core.transforms import TransformSet
    from ml_core.tta import MultiTransformPredictor

    device, fig = ctx.device, ctx.fig
    nk = p.get("num_keypoints", 0)
    if nk and nk != len(COCO_FLIP):
        raise ValueError("keypoint models here use the 17 COCO keypoints")
    flip_inds = COCO_FLIP if nk else None
    scales, max_size, group = p["scales"], p["max_size"], p["group"]
    torch.manual_seed(0)
    model, _ = build_model(p["arch"], 2 if nk else 4, nk, min_size=scales[0], max_size=max_size)
    if p.get("detections_per_img"):
        model.roi_heads.detections_per_img = p["detections_per_img"]
    model.to(device).eval()
    paths = _write_jpegs(ctx.tmp, max(p["hand_images"], p["tta_images"], group), p["size"])
    fig.update(arch=p["arch"], weights="random", image_size=p["size"], scales=scales, flip=True,
               detections_per_img=model.roi_heads.detections_per_img,
               views_per_image=2 * len(scales), group_size=group,
               ensembling="nms_vote boxes" + (", mean keypoint heatmaps on the ensembled boxes" if nk else ""))
    ctx.log(f"model and {len(paths)} JPEGs ready")

    # the hand loop: one image, one view at a time, fp32
    if nk:
        def hand(path):
            return hand_loop_keypoints(model, path, scales, max_size, device, flip_inds)
    else:
        def hand(path):
            return hand_loop(model, [path], scales, max_size, device)
    fig["hand_loop"] = _time_hand_loop(ctx, hand, paths[:p["hand_images"]], ctx.cap(0.18))
    ctx.summary(f"hand loop {fig['hand_loop']['images_per_s']:.2f} img/s")
    ctx.log(f"hand loop {fig['hand_loop']['images_per_s']:.2f} images/s over {fig['hand_loop']['images']} images")
    if ctx.suite.args.smoke or device.type == "cuda":
        fig["hand_loop_cudnn_benchmark"] = _hand_loop_cudnn_benchmark(ctx, hand, paths, p)
        ctx.log(f"hand loop with cudnn.benchmark {fig['hand_loop_cudnn_benchmark']['images_per_s']} images/s")
    # the baseline is the faster of the two hand loops
    base = max(fig["hand_loop"]["images_per_s"], fig.get("hand_loop_cudnn_benchmark", {}).get("images_per_s", 0))
    fig["baseline_images_per_s"] = base
    ctx.save()

    # ml_core.tta: views batched per scale, fp16 autocast on CUDA, images decoded by DataLoader workers
    ts = TransformSet(scales, flip=True, max_size=max_size)
    from ml_core.tta import EnsembleOptions
    # every view's heatmaps, as the hand loop computes them: the same work on both sides
    opts = EnsembleOptions(union_per_view=p.get("union_per_view", 1000), keypoint_scales="all")
    predictor = MultiTransformPredictor(model, ts, flip_inds=flip_inds, device=device, amp=True, fast=True,
                                        options=opts)
    predictor.predict([load_image(x) for x in paths[:group]])  # warm-up
    ours = _time_tta(ctx, predictor, paths[:p["tta_images"]], group, p["workers"], ctx.cap(0.25))
    ours["precision"] = "fp16 autocast" if predictor.amp else "fp32"
    ours["path"] = "fast (ml_core.fast_rcnn.BatchedViews)" if predictor.fast else "plain (torchvision per scale)"
    ours["torch_compile"] = "not used (no compile time)"
    ours["union"], ours["union_per_view"] = predictor.union, opts.union_per_view
    ours["cudnn.benchmark"] = device.type == "cuda"
    ours["backbone"] = "folded, conv+ReLU fused (cuDNN)" if device.type == "cuda" else "the model's own"
    fig["ml_core_tta"] = ours
    fig["speedup"] = _r(ours["images_per_s"] / base, 2)
    fig["speedup_steady"] = _r(ours["steady_images_per_s"] / base, 2) if ours["steady_images_per_s"] else None
    ctx.summary(f"hand loop {base:.2f} img/s | ml_core.tta {ours['images_per_s']:.2f} img/s "
                f"(steady {ours['steady_images_per_s']}) | x{fig['speedup']}")
    ctx.log(f"ml_core.tta {ours['images_per_s']} images/s over {ours['images']} images, x{fig['speedup']}")
    ctx.save()

    # the same with the backbone compiled (torch.compile, one graph per scale): compile time measured
    if (ctx.suite.args.compile and (ctx.suite.args.smoke or device.type == "cuda")) and ctx.left() > 50:
        comp = MultiTransformPredictor(model, ts, flip_inds=flip_inds, device=device, amp=True, fast=True, options=opts,
                                       compile_backbone=True)
        ctx.sync()
        t0 = time.perf_counter()
        comp.predict([load_image(x) for x in paths[:group]])   # compiles every scale's shape
        ctx.sync()
        compile_s = time.perf_counter() - t0
        r = _time_tta(ctx, comp, paths[:p["tta_images"]], group, p["workers"], min(ctx.cap(0.15), ctx.left() / 3))
        r.update(torch_compile="backbone, inductor, static shapes", compile_and_first_group_s=_r(compile_s),
                 speedup=_r(r["images_per_s"] / base, 2))
        fig["ml_core_tta_compiled_backbone"] = r
        ctx.summary(ctx.rec["summary"] + f" | compiled backbone {r['images_per_s']:.2f} img/s x{r['speedup']}")
        ctx.log(f"ml_core.tta with the backbone compiled {r['images_per_s']} images/s, x{r['speedup']} "
                f"(compile and first group {compile_s:.1f} s)")
        ctx.save()

    # where the time goes: one group in memory, the views through the first stages only
    images = [load_image(x).to(device) for x in paths[:group]]
    split, stage_cap = {}, ctx.cap(0.2) / 5
    for stage in ("transform", "backbone", "rpn", "roi_heads", "predict"):
        def fn(stage=stage):
            return predictor.predict(images) if stage == "predict" else _upto(predictor, images, stage)
        fn()  # warm-up
        ctx.sync()
        t0, reps = time.perf_counter(), 0
        while reps < p["split_reps"]:
            fn()
            reps += 1
            if time.perf_counter() - t0 > stage_cap:
                break
        ctx.sync()
        split[stage] = (time.perf_counter() - t0) / (reps * group)
    prev, ms = 0.0, {}
    for stage, spi in split.items():
        ms[stage if stage != "predict" else "ensembling_and_rest"] = _r(1000 * (spi - prev), 2)
        prev = spi
    fig["time_split"] = {
        "what": "one group of images already on the device, all views; cumulative images/s up to the end of each "
                "stage (transform = resize+normalise+batch; rpn includes proposal NMS; roi_heads includes the "
                "detection post-processing and, for keypoint models, the keypoint head on every view's detections; "
                "predict = the whole MultiTransformPredictor.predict)",
        "images_per_s_upto": {k: _r(1 / v, 2) for k, v in split.items()},
        "ms_per_image": ms,
        "share_of_predict": {k: _r(v / 1000 / split["predict"], 3) for k, v in ms.items()},
    }
    fig["backbone_only_images_per_s"] = fig["time_split"]["images_per_s_upto"]["backbone"]
    fig["predict_split"] = _predict_split(ctx, predictor, images, p["split_reps"])
    ctx.log(f"predict split (ms per image): {fig['predict_split']['ms_per_image']}")
    ctx.summary(ctx.rec["summary"] + f" | up to backbone {fig['backbone_only_images_per_s']} img/s")
    ctx.log(f"time split (ms per image): {ms}")
    ctx.save()

    # where the device time goes inside one group (torch.profiler): the kernels that take most of it
    if ctx.suite.args.smoke or (device.type == "cuda" and ctx.left() > 12):
        fig["profile"] = _profile(ctx, lambda: predictor.predict(images))
        top = fig["profile"]["top"][:3]
        ctx.log("profile, top: " + "; ".join(f"{r['name'][:50]} {r['share']:.0%}" for r in top))
        ctx.save()

    # the backbone copy without its conv + bias + ReLU (and a ResNet block's last conv + residual
    # + ReLU) fused into single cuDNN calls: what the fusion buys; features compared on the device
    if ctx.suite.args.smoke or (device.type == "cuda" and ctx.left() > 16):
        from ml_core.inference_backbone import inference_backbone
        unfused = MultiTransformPredictor(model, ts, flip_inds=flip_inds, device=device, amp=True, fast=True,
                                          options=opts)
        unfused.batched.backbone = inference_backbone(model.backbone, fold=True,
                                                      channels_last=device.type == "cuda", fuse=False)
        with torch.inference_mode(), predictor._autocast():
            model.transform.min_size = (scales[1],)
            x = model.transform(images[:2])[0].tensors
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            fa, fb = predictor.batched.backbone(x), unfused.batched.backbone(x)
        rel = max(float((fa[k].float() - fb[k].float()).abs().max() / fb[k].float().abs().max().clamp_min(1e-6))
                  for k in fa)
        r = fig["ml_core_tta_unfused_backbone"] = _time_variant(ctx, unfused, paths, p, base, 0.1,
                                                                 backbone="folded, conv and ReLU apart",
                                                                 features_max_rel_diff_fused=_r(rel, 5))
        ctx.log(f"ml_core.tta with conv and ReLU apart {r['images_per_s']} images/s, x{r['speedup']} "
                f"(fused features' max rel. diff {rel:.2e})")
        ctx.save()

    # a box model's views enter the union before NMS by default; the NMS'd views' union for comparison
    if not nk and (ctx.suite.args.smoke or (device.type == "cuda" and ctx.left() > 16)):
        post = MultiTransformPredictor(model, ts, device=device, amp=True, fast=True,
                                       options=EnsembleOptions(union="post_nms"))
        r = fig["ml_core_tta_post_nms_union"] = _time_variant(ctx, post, paths, p, base, 0.1, union="post_nms")
        ctx.log(f"ml_core.tta with the NMS'd views' union {r['images_per_s']} images/s, x{r['speedup']}")
        ctx.save()

    # the keypoint head as the model has it (NCHW) instead of the fast path's channels_last copy
    if nk and (ctx.suite.args.smoke or (device.type == "cuda" and ctx.left() > 16)):
        alt = MultiTransformPredictor(model, ts, flip_inds=flip_inds, device=device, amp=True, fast=True, options=opts)
        b = alt.batched
        b.keypoint_head, b.keypoint_predictor = model.roi_heads.keypoint_head, model.roi_heads.keypoint_predictor
        b.keypoint_channels_last = False
        r = fig["ml_core_tta_keypoint_head_nchw"] = _time_variant(ctx, alt, paths, p, base, 0.12,
                                                                  keypoint_head="NCHW (the model's own)")
        ctx.log(f"ml_core.tta with the keypoint head in NCHW {r['images_per_s']} images/s, x{r['speedup']}")
        ctx.save()

    # the same batching in fp32: what batching alone buys (on the CPU, where there is no fp16 path,
    # the smoke test runs it only to exercise the code)
    if ctx.suite.args.smoke or (device.type == "cuda" and ctx.left() > 8):
        predictor32 = MultiTransformPredictor(model, ts, flip_inds=flip_inds, device=device, amp=False, fast=True,
                                              options=opts)
        predictor32.predict([load_image(x) for x in paths[:group]])
        r = _time_tta(ctx, predictor32, paths[:p["tta_images"]], group, p["workers"], max(1.0, ctx.left() - 4))
        r["precision"] = "fp32"
        r["path"] = "fast" if predictor32.fast else "plain"
        fig["ml_core_tta_fp32"] = r
        ctx.log(f"ml_core.tta fp32 {r['images_per_s']} images/s")


# ---------------------------------------------------------------------------------------------------------
# step 3: box ensembling

def load_ensemble_boxes():
    """(nms, wbf, note): ensemble-boxes' functions, None where they cannot be imported. The package's
    __init__ imports numba (for its NMS); its WBF is plain NumPy and is then loaded from its file alone."""
    try:
        from ensemble_boxes import nms, weighted_boxes_fusion
        return nms, weighted_boxes_fusion, f"ensemble-boxes {_version('ensemble-boxes')}"
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
    try:
        spec = importlib.util.find_spec("ensemble_boxes")
        if spec is None or not spec.submodule_search_locations:
            return None, None, f"ensemble-boxes not installed ({err}): its columns are left out"
        path = Path(list(spec.submodule_search_locations)[0]) / "ensemble_boxes_wbf.py"
        mspec = importlib.util.spec_from_file_location("_ensemble_boxes_wbf", path)
        mod = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(mod)
        return None, mod.weighted_boxes_fusion, (f"ensemble-boxes {_version('ensemble-boxes')}: package import failed "
                                                 f"({err}); its NMS left out, its WBF loaded from {path.name} alone")
    except Exception as e2:
        return None, None, f"ensemble-boxes unusable ({err}; {type(e2).__name__}: {e2}): its columns are left out"


def step_ensembling(ctx: StepContext, p: dict):
    measure = _benchmark("ensemble_throughput").measure
    eb_nms, eb_wbf, note = load_ensemble_boxes()
    ctx.fig["ensemble_boxes"] = note
    methods = 5 + (eb_nms is not None) + (eb_wbf is not None)
    per_method = ctx.cap(0.85) / methods
    ctx.fig["max_seconds_per_method"] = _r(per_method, 1)
    r = measure(p["images"], str(ctx.device), eb_nms=eb_nms, eb_wbf=eb_wbf, max_seconds=per_method, batch=p["batch"])
    ctx.fig.update(r)
    ips = r["images_per_second"]
    ctx.summary(f"padded batch nms+vote {ips['distill nms+vote, padded batch']} img/s | per image "
                f"{ips['distill nms+vote']} | nms padded {ips['distill nms, padded batch']} / per image "
                f"{ips['distill nms']}" + (f" | ensemble-boxes nms {ips['ensemble-boxes nms']}" if eb_nms else "")
                + (f" | wbf ours {ips['distill wbf']} / theirs {ips['ensemble-boxes wbf']}" if eb_wbf else ""))
    ctx.save()
    # a pre-NMS union's size (up to 1,000 boxes per view before NMS, ml_core.tta's default for box
    # models; fewer in the smoke test), in groups of 8 images keeping 100 per image as ml_core.tta
    # has them: our two paths
    if ctx.left() > 4:
        u = measure(p["union_images"], str(ctx.device), max_seconds=ctx.left() / 5, batch=min(p["batch"], 8),
                    per_view=p["union_per_view"], wbf=False, detections_per_img=100)
        ctx.fig["pre_nms_union"] = u
        ui = u["images_per_second"]
        ctx.summary(ctx.rec["summary"] + f" | union of 8 x {p['union_per_view']}: padded {ui['distill nms+vote, padded batch']} "
                    f"/ per image {ui['distill nms+vote']}")


# ---------------------------------------------------------------------------------------------------------
# step 4: the training data pipeline

def step_train(ctx: StepContext, p: dict):
    measure = _benchmark("train_throughput").measure
    data = ctx.suite.background_data("train_pipeline", wait_s=min(20.0, ctx.cap(0.2)))
    ctx.fig["data"] = "pre-generated in the background" if data else "generated in the step"
    p = {k: v for k, v in p.items() if k not in ("budget_s", "min_s")}
    r = measure(p, ctx.device, max_seconds=max(2.0, ctx.left() - 4), data_dir=str(data) if data else None)
    ctx.fig.update(r)
    ctx.summary(f"fit() {r['pipeline_images_per_s']} img/s | in memory {r['in_memory_images_per_s']} img/s | "
                f"ratio {r['ratio']:.0%} (target >= 90%)")


# ---------------------------------------------------------------------------------------------------------
# step 5: distillation at GPU scale

def step_distill(ctx: StepContext, p: dict):
    # pycocotools is needed from here on (ml_core.evaluation imports it)
    from ml_core import selection
    from ml_core.checkpoint import load_model
    from ml_core.data import load_coco
    from ml_core.engine import Cancelled, Hook, TrainConfig
    from ml_core.evaluation import format_table
    from ml_core.pipeline import (annotated_per_image, evaluate, infer, load_unlabeled, predict_single_view,
                                  pseudo_label_doc, pseudo_label_quality, train, write_json)
    from ml_core.synth import SynthConfig, generate
    from ml_core.transforms import TransformSet

    fig, device = ctx.fig, str(ctx.device)
    secs = fig.setdefault("seconds", {})

    class Deadline(Hook):
        """Ends training (as a converged run ends, keeping what it has) at `until`, at the latest the
        step's deadline, and raises only past the step's deadline; iterations after the warm-up are timed."""

        def __init__(self, until: float | None = None):
            self.t5 = None
            self.n = 0
            self.until = min(until or ctx.deadline, ctx.deadline)
            self.cut = False

        def after_step(self, state):
            if state.iteration == 5:
                self.t5 = time.perf_counter()
            elif self.t5 is not None:
                self.n += 1
            now = time.perf_counter()
            if now > ctx.deadline + 30:
                raise Cancelled(f"step time budget reached at iteration {state.iteration}")
            if now > self.until and not state.stopped:
                self.cut = True
                state.stopped = f"this row's share of the step's time ran out at iteration {state.iteration}"

        def seconds_per_iteration(self):
            return (time.perf_counter() - self.t5) / self.n if self.n else None

    t = time.perf_counter()
    data = ctx.suite.background_data("distillation", wait_s=min(60.0, ctx.cap(0.25)))
    fig["data"] = {k: p[k] for k in ("size", "labeled", "unlabeled", "val")}
    fig["data"]["kind"] = "synthetic detection (ml_core.synth), seed 0"
    if data is None:
        data = ctx.tmp / "data"
        generate(data, SynthConfig(kind="detection", image_size=p["size"], labeled=p["labeled"],
                                   unlabeled=p["unlabeled"], val=p["val"], seed=0))
        fig["data"]["generated"] = "in the step"
    else:
        fig["data"]["generated"] = "in the background"
    secs["data"] = _r(time.perf_counter() - t, 1)
    out = ctx.tmp / "run"
    lab_json, lab_root = str(data / "labeled.json"), str(data / "labeled")
    val_json, val_root = str(data / "val.json"), str(data / "val")
    common = dict(arch=p["arch"], min_size=p["size"], device=device)

    def config(iterations):
        return TrainConfig(iterations=iterations, batch_size=p["batch"], lr=p["lr"],
                           warmup_iters=max(1, min(100, iterations // 5)), ratio="6:4", num_workers=p["workers"],
                           seed=0, checkpoint_every=0, log_every=50)

    # calibration: seconds per training iteration (and the fixed cost of starting a fit)
    t = time.perf_counter()
    clock = Deadline()
    train(lab_json, lab_root, str(out / "calibration.pt"), config=config(p["calibration_iterations"]), hooks=[clock],
          resume=False, **common)
    spi = clock.seconds_per_iteration() or (time.perf_counter() - t) / p["calibration_iterations"]
    overhead = max(0.0, time.perf_counter() - t - spi * p["calibration_iterations"])
    secs["calibration"] = _r(time.perf_counter() - t, 1)
    fig["seconds_per_iteration"] = _r(spi, 4)
    fig["fit_start_overhead_s"] = _r(overhead, 2)
    # teacher T, two students S, control S: 4 fits; planned with S = T, S re-planned after the teacher
    avail = ctx.left() - p["reserve_s"] - 4 * overhead
    iters = int(max(p["min_iterations"], min(p["max_iterations"], avail / (4 * spi * 1.1))))
    fig["plan"] = {"teacher_iterations": iters, "available_for_training_s": _r(avail, 1)}
    ctx.log(f"{spi * 1000:.0f} ms/iteration, fit start {overhead:.1f} s: teacher {iters} iterations")
    ctx.save()

    ap, rows = {}, {}

    def record(row, stats):
        ap[row] = {k: stats[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
        rows[row] = stats
        fig["ap"] = ap
        fig["table"] = format_table(ap)
        ctx.save()

    t = time.perf_counter()
    teacher = str(out / "teacher.pt")
    # the teacher gets at most 40 % of what is left: inference and three fits follow
    clock = Deadline(until=time.perf_counter() + 0.4 * max(0.0, ctx.left() - p["reserve_s"]))
    st = train(lab_json, lab_root, teacher, config=config(iters), hooks=[clock], resume=False, **common)
    iters = st.iteration
    secs["teacher"] = _r(time.perf_counter() - t, 1)
    t = time.perf_counter()
    record(f"teacher ({iters} iterations, labeled only)", evaluate(teacher, val_json, val_root, device=device)["bbox"])
    secs["evaluate"] = _r(time.perf_counter() - t, 1)
    ctx.summary(f"teacher AP {next(iter(ap.values()))['AP']:.2f}")

    # pseudo-labels: ensembled over the views, and single view, both at the automatic threshold
    labeled = load_coco(lab_json)
    unlabeled = load_unlabeled(str(data / "unlabeled.json"))
    target = annotated_per_image(labeled)
    paths = [str(data / "unlabeled" / im["file_name"]) for im in unlabeled["images"]]
    ids = [im["id"] for im in unlabeled["images"]]
    ts = TransformSet(p["scales"], flip=True)
    t = time.perf_counter()
    ensembled = {}
    for i, pred, err in infer(teacher, paths, transforms=ts, device=device, group_size=p["group"],
                              num_workers=p["workers"]):
        if pred is None:
            raise RuntimeError(f"unlabeled image failed: {err}")
        ensembled[ids[i]] = pred["ensembled"]
    secs["infer_ensembled"] = _r(time.perf_counter() - t, 1)
    fig["infer_ensembled_images_per_s"] = _r(len(paths) / (time.perf_counter() - t), 1)
    t = time.perf_counter()
    model, meta = load_model(teacher, device)
    single = dict(zip(ids, predict_single_view(model, meta, paths, device=device)))
    del model
    secs["infer_single"] = _r(time.perf_counter() - t, 1)
    thr = {"ensembled": selection.auto_threshold([d["score"] for v in ensembled.values() for d in v], len(ids), target),
           "single_view": selection.auto_threshold([d["score"] for v in single.values() for d in v], len(ids), target)}
    fig["thresholds"] = {k: _r(v, 4) for k, v in thr.items()}
    docs = {"ensembled": pseudo_label_doc(unlabeled, ensembled, thr["ensembled"], labeled.categories),
            "single_view": pseudo_label_doc(unlabeled, single, thr["single_view"], labeled.categories)}
    pseudo = {k: write_json(out / f"pseudo_{k}.json", d) for k, d in docs.items()}
    truth = json.loads((data / "unlabeled_gt.json").read_text())
    fig["pseudo_label_quality"] = {k: pseudo_label_quality(d, truth) for k, d in docs.items()}
    ctx.save()

    # students (retrained from the teacher's initialisation, labeled:pseudo 6:4) and the control
    left = ctx.left() - 3 * overhead - 3 * secs["evaluate"] - 5
    s_iters = int(max(p["min_iterations"], min(iters, left / (3 * spi * 1.05))))
    fig["plan"]["student_iterations"] = s_iters
    ctx.log(f"students and control: {s_iters} iterations each")
    runs = [("student, ensembled pseudo-labels", pseudo["ensembled"], "retrain"),
            ("student, single-view pseudo-labels", pseudo["single_view"], "retrain"),
            (f"control: teacher + {s_iters} iterations on labels only", None, "finetune")]
    for k, (row, pj, init) in enumerate(runs):
        need = overhead + secs["evaluate"] + min(s_iters, 20) * spi
        if ctx.left() < need:
            fig.setdefault("skipped", []).append(f"{row}: no time left ({ctx.left():.0f} s, needs about {need:.0f} s)")
            continue
        t = time.perf_counter()
        ckpt = str(out / f"{len(rows)}.pt")
        # an equal share of what is left for each remaining row (its evaluation included)
        share = (ctx.left() - 5) / (len(runs) - k) - secs["evaluate"]
        clock = Deadline(until=t + share)
        st = train(lab_json, lab_root, ckpt, config=config(s_iters), pseudo_json=pj,
                   pseudo_root=str(data / "unlabeled") if pj else None, teacher=teacher, init=init,
                   role="student" if pj else "teacher", hooks=[clock], resume=False, **common)
        if clock.cut:
            row = f"{row} (cut at {st.iteration} of {s_iters} iterations)"
        secs[row] = _r(time.perf_counter() - t, 1)
        record(row, evaluate(ckpt, val_json, val_root, device=device)["bbox"])
        ctx.log(f"{row}: AP {ap[row]['AP']:.2f}")
    first = next(iter(ap))
    ctx.summary(" | ".join(f"{k.split(' (')[0].split(':')[0]} {v['AP']:.2f}" for k, v in ap.items()) + " box AP"
                + ("" if len(ap) == 4 else f" ({4 - len(ap)} of 4 rows missing)"))
    fig["ap_gain_over_teacher"] = {k: _r(v["AP"] - ap[first]["AP"], 2) for k, v in ap.items() if k != first}
    print(f"\ndistillation, {p['arch']} at {p['size']} px, box AP on {p['val']} validation images:\n{fig['table']}\n",
          flush=True)


FUNCS = {"tta_fasterrcnn": step_tta, "tta_keypointrcnn": step_tta, "box_ensembling": step_ensembling,
         "train_pipeline": step_train, "distillation": step_distill}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="every step on the CPU with tiny sizes (under two minutes)")
    ap.add_argument("--budget-s", type=float, default=None, help="total time budget (default 420; 110 with --smoke)")
    ap.add_argument("--out", default=None, help="output folder (default $OUT, else var/gpu_suite/)")
    ap.add_argument("--steps", default=",".join(str(i) for i in range(1, len(STEPS) + 1)),
                    help="which steps, by number or name, comma-separated (default all)")
    ap.add_argument("--device", default=None, help="default cuda when available (cpu with --smoke)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 with --smoke)")
    ap.add_argument("--compile", action="store_true",
                    help="steps 1-2 also time ml_core.tta with the backbone torch.compile'd (compile time reported)")
    args = ap.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 110.0 if args.smoke else 420.0
    if args.out is None:
        args.out = os.environ.get("OUT") or str(ROOT / "var" / "gpu_suite")
    chosen = []
    for s in args.steps.split(","):
        s = s.strip()
        if s.isdigit() and 1 <= int(s) <= len(STEPS):
            chosen.append(STEPS[int(s) - 1])
        elif s in STEPS:
            chosen.append(s)
        elif s:
            ap.error(f"unknown step {s!r}; choose numbers 1-{len(STEPS)} or names {', '.join(STEPS)}")
    args.steps = chosen
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads or args.smoke:
        torch.set_num_threads(args.threads or 1)
    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    cuda_error = None
    if device.type == "cuda":
        try:
            torch.zeros(1, device=device)  # CUDA initialisation outside every step
        except Exception as e:
            cuda_error = f"{type(e).__name__}: {e}"
    presets = copy.deepcopy(SMOKE if args.smoke else GPU)
    if args.compile:  # room for compiling the backbone at every scale (about 45 s for R50-FPN on an H100)
        for name in ("tta_fasterrcnn", "tta_keypointrcnn"):
            presets[name]["budget_s"] += 30 if args.smoke else 60
    suite = Suite(args, presets, device)
    if cuda_error:
        suite.report["environment"]["cuda_init_error"] = cuda_error
        print(f"gpu_suite: CUDA initialisation failed: {cuda_error}", flush=True)
    print(f"gpu_suite: {suite.report['environment'].get('device_name')}, torch {torch.__version__}, budget "
          f"{args.budget_s:.0f} s, steps {', '.join(suite.selected())}, writing {suite.out / 'gpu_suite.json'}", flush=True)
    if device.type != "cuda" and not args.smoke:
        print("gpu_suite: WARNING no CUDA device: the GPU sizes run on the CPU, cut short by their budgets", flush=True)
    watchdog = threading.Timer(max(1.0, args.budget_s - 2), suite.emergency_stop, args=("total time budget reached", 3))
    watchdog.daemon = True
    watchdog.start()
    signal.signal(signal.SIGTERM, lambda *_: suite.emergency_stop("SIGTERM", 143))
    suite.start_background_data()
    try:
        suite.run(FUNCS)
    finally:
        watchdog.cancel()
        if suite.bg is not None and suite.bg.is_alive():
            suite.bg.kill()
    print("\n" + suite.table(), flush=True)
    print(f"written: {suite.out / 'gpu_suite.json'}, {suite.out / 'gpu_suite.txt'}", flush=True)
    return suite.report


if __name__ == "__main__":
    main()
