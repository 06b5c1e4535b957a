"""Celery tasks: thin shells that load rows, call ml_core with plain arguments and store results.

Queues (settings.CELERY_TASK_ROUTES): train_model, infer_chunk and evaluate_checkpoint run on
`gpu`; the rest on `cpu`. Every message carries its job's attempt (and job, attempt and part in its
headers, so the reaper can tell a lost message from a waiting one). Every task is safe to receive
twice (jobs.running skips final jobs, earlier attempts and parts a live holder runs; an inference
chunk whose rows exist is skipped), so late acknowledgement and re-sending can redeliver freely.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from django.conf import settings
from django.db import OperationalError, transaction
from django.utils import timezone

from ml_core import pipeline
from ml_core.engine import TrainConfig, default_iterations, default_train_scales
from ml_core.models import get_arch
from ml_core.transforms import TransformSet
from ml_core.tta import EnsembleOptions

from . import review_order, threshold_stats
from .celery import app
from .ingest import dataset_to_coco, ingest_zip
from .jobs import BROKER_ERRORS, JobHook, Skip, check_cancel, progress_writer, running
from .models import (Dataset, Evaluation, Image, InferenceRun, Job, ModelCheckpoint, Prediction, PseudoLabelSet,
                     TrainingRun)
from .selection_apply import write_pseudo_label_set
from .workers import message_headers

logger = logging.getLogger(__name__)


def _device() -> str:
    return settings.DISTILL_DEVICE or pipeline.default_device()


def _rel(path: Path) -> str:
    return str(Path(path).resolve().relative_to(Path(settings.MEDIA_ROOT).resolve()))


# A database that is briefly busy (SQLite under load, a PostgreSQL fail-over) is retried, with backoff.
# Results live in the database, not in the result backend.
TASK_OPTIONS = dict(acks_late=True, autoretry_for=(OperationalError,), retry_backoff=2, retry_jitter=True,
                    max_retries=6, ignore_result=True)


def _guard(fn):
    """Skip is how `running` says 'nothing to do': not an error for Celery."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except Skip as e:
            logger.warning("%s: skipped: %s", fn.__name__, e)
            return "skipped"
    return wrapper


def _send(task, args: tuple, job: Job, part: str = "", **options):
    task.apply_async(args, {"attempt": job.attempt}, headers=message_headers(job, part), **options)


def send_job(job: Job):
    """Send the messages of a job's current attempt: at creation, on retry, and when the reaper
    finds them lost. What has been done already (finished chunks, checkpoints) is not redone."""
    if job.kind == "train":
        _send(train_model, (job.training_run.pk,), job)
    elif job.kind == "infer":
        launch_inference(job.inference_run)
    elif job.kind == "evaluate":
        _send(evaluate_checkpoint, (job.evaluation.pk,), job)
    elif job.kind == "pseudo_labels":
        _send(build_pseudo_labels, (job.pseudo_label_set.pk,), job)
    elif job.kind == "ingest":
        _send(ingest_zip_task, (job.pk, job.params["dataset"], job.params["zip"]), job)
    elif job.kind == "ping":
        _send(ping, (job.pk,), job)
    else:
        raise ValueError(f"no task sends a {job.kind} job")


@app.task(**TASK_OPTIONS)
@_guard
def ping(job_id: int, attempt: int | None = None):
    """Round trip through the broker and a worker into the database (the foundation test)."""
    with running(job_id, attempt=attempt) as job:
        job.beat(result={"pong": True, "worker": job.worker, "pid": os.getpid()})
    return "pong"


@app.task(**TASK_OPTIONS)
@_guard
def ingest_zip_task(job_id: int, dataset_id: int, zip_path: str, attempt: int | None = None):
    with running(job_id, attempt=attempt) as job:
        try:
            result = ingest_zip(Dataset.objects.get(pk=dataset_id), zip_path,
                                progress=progress_writer(job, label="files "))
        finally:
            if os.path.exists(zip_path):
                os.unlink(zip_path)
        counts = {s: sum(1 for f in result["files"] if f["status"] == s) for s in ("accepted", "duplicate", "rejected")}
        job.beat(result={**result, "counts": counts})


def _write_coco(doc: dict, path: Path) -> str:
    return pipeline.write_json(path, doc)


def _sized_config(run: TrainingRun, pseudo) -> TrainConfig:
    """The run's config; iterations None ('auto') becomes a bound sized from the data and this
    worker's device (engine.default_iterations), and train_scales None the task's default training
    sizes, both written back so the page shows them."""
    config = dict(run.config)
    if config.get("iterations") is None:
        n = run.labeled.images.filter(annotations__isnull=False).distinct().count()
        n += pseudo.counts.get("images", 0) if pseudo is not None else 0
        config["iterations"] = default_iterations(n, config.get("batch_size", 4), _device())
        config["warmup_iters"] = min(config.get("warmup_iters", 100), max(1, config["iterations"] // 4))
    if config.get("train_scales") is None:
        config["train_scales"] = list(default_train_scales(get_arch(run.arch).task))
    if config != run.config:
        TrainingRun.objects.filter(pk=run.pk).update(config=config)
    return TrainConfig.from_dict(config)


@app.task(**TASK_OPTIONS)
@_guard
def train_model(run_id: int, attempt: int | None = None):
    run = TrainingRun.objects.select_related("job", "labeled", "pseudo_label_set", "teacher", "validation").get(pk=run_id)
    with running(run.job_id, attempt=attempt) as job:
        folder = run.folder
        labeled_json = _write_coco(dataset_to_coco(run.labeled), folder / "labeled.json")
        out = folder / "model.pt"
        pseudo = run.pseudo_label_set
        if pseudo is not None and pseudo.job.state != Job.SUCCEEDED:
            raise ValueError("the pseudo-label set is not finished")
        span = 0.9 if run.validation_id else 1.0
        config = _sized_config(run, pseudo)
        # With a validation set, AP is tracked during training (best weights kept, stop on convergence).
        val_json = _write_coco(dataset_to_coco(run.validation), folder / "val.json") if run.validation_id else None
        pipeline.train(labeled_json, settings.MEDIA_ROOT, str(out), arch=run.arch,
                       config=config, pseudo_json=str(pseudo.path) if pseudo else None,
                       pseudo_root=str(settings.MEDIA_ROOT), teacher=str(run.teacher.path) if run.teacher else None,
                       init=run.init, min_size=run.min_size, role=run.role, hooks=[JobHook(job, run, span=span)], device=_device(),
                       val_json=val_json, val_root=str(settings.MEDIA_ROOT) if val_json else None)
        meta = pipeline.read_checkpoint(str(out))["meta"]
        ckpt, _ = ModelCheckpoint.objects.get_or_create(
            training_run=run, defaults=dict(project=run.project, name=f"{run.role} #{run.pk}", role=run.role,
                                            arch=run.arch, file=_rel(out), meta=meta))
        if run.validation_id:
            job.beat(message="evaluating on the validation set", progress=span)
            _evaluate_inline(ckpt, run.validation, job)
            if run.teacher and not Evaluation.objects.filter(checkpoint=run.teacher, dataset=run.validation,
                                                             job__state=Job.SUCCEEDED).exists():
                _evaluate_inline(run.teacher, run.validation, job)


def _coco_ap(ckpt: ModelCheckpoint, dataset: Dataset, progress=None) -> dict:
    """COCO AP of a checkpoint on a dataset of its project (the dataset written as COCO JSON first)."""
    val_json = _write_coco(dataset_to_coco(dataset), ckpt.project.folder / "evaluations" / f"dataset{dataset.pk}.json")
    return pipeline.evaluate(str(ckpt.path), val_json, settings.MEDIA_ROOT, device=_device(), progress=progress,
                             num_workers=0)


def _evaluate_inline(ckpt: ModelCheckpoint, dataset: Dataset, job: Job) -> Evaluation:
    """An evaluation done inside a training job, recorded with its own (finished) job row."""
    started = timezone.now()
    stats = _coco_ap(ckpt, dataset)
    ev_job = Job.objects.create(project=ckpt.project, owner=job.owner, kind="evaluate", state=Job.SUCCEEDED,
                                progress=1.0, started=started, finished=timezone.now(), message="done")
    Job.objects.filter(pk=ev_job.pk).update(created=started)  # it was made inside its training job
    return Evaluation.objects.create(project=ckpt.project, checkpoint=ckpt, dataset=dataset, stats=stats, job=ev_job)


@app.task(**TASK_OPTIONS)
@_guard
def evaluate_checkpoint(evaluation_id: int, attempt: int | None = None):
    ev = Evaluation.objects.select_related("checkpoint", "dataset", "job").get(pk=evaluation_id)
    with running(ev.job_id, attempt=attempt) as job:
        ev.stats = _coco_ap(ev.checkpoint, ev.dataset, progress=progress_writer(job, label="images "))
        ev.save(update_fields=["stats"])


# --- multi-transform inference: chunks any GPU worker can take, then one finaliser -------------
# The chunk that completes the set sends the finaliser (no chord: nothing waits on a counter in
# the result backend, which a Redis restart would lose).

def run_images(run: InferenceRun) -> list[tuple[int, str]]:
    """(image id, path) of every image the run covers, in chunk order: unlabeled, then validation."""
    ids = list(Image.objects.filter(dataset=run.dataset).order_by("id").values_list("id", "file"))
    if run.validation_id:
        ids += list(Image.objects.filter(dataset=run.validation).order_by("id").values_list("id", "file"))
    return ids


def launch_inference(run: InferenceRun):
    """Queue the chunks not yet done (all of them the first time; the rest on a retry or a re-send),
    or the finaliser when every chunk is done."""
    job = run.job
    done = set(Prediction.objects.filter(run=run).values_list("chunk", flat=True).distinct())
    todo = [c for c in range(run.chunks_total) if c not in done]
    if not todo:
        _send(finalize_inference, (run.pk,), job, "finalize", link_error=job_failed.s(job.pk, job.attempt))
    for c in todo:
        _send(infer_chunk, (run.pk, c), job, f"chunk-{c}", link_error=job_failed.s(job.pk, job.attempt))


@app.task(ignore_result=True)
def job_failed(request, exc, traceback, job_id: int, attempt: int | None = None):
    """Errback of a job's parts: a part that failed outside its job wrapper (its row gone, the
    database unreachable after every retry) fails the job now instead of leaving it running."""
    from .jobs import friendly_error
    jobs = Job.objects.filter(pk=job_id) if attempt is None else Job.objects.filter(pk=job_id, attempt=attempt)
    jobs.exclude(state__in=Job.FINAL).update(
        state=Job.FAILED, error=f"a part of this job failed: {friendly_error(exc)}"[:5000], finished=timezone.now())


@functools.lru_cache(maxsize=1)
def _predictor(path: str, mtime: float, transforms: str, options: str, device: str, extra: tuple = ()):
    """extra: (path, mtime) of the models ensembled with it."""
    import json
    return pipeline.predictor_for(path, TransformSet.from_dict(json.loads(transforms)),
                                  EnsembleOptions.from_dict(json.loads(options)), device,
                                  extra_checkpoints=[p for p, _ in extra])


def _chunk_progress(run: InferenceRun, job: Job, total: int):
    """Progress within a chunk (at most once a second): images of the finished chunks plus this
    chunk's so far, and the time left at the rate since the job started."""
    import time as _time
    total = max(1, total)
    last = [0.0]

    def report(done_here: int):
        now = _time.monotonic()
        if now - last[0] < 1.0:
            return
        last[0] = now
        finished = Prediction.objects.filter(run=run).count()
        fraction = min(1.0, (finished + done_here) / total)
        message = f"images {min(total, finished + done_here)}/{total}"
        if job.started and fraction > 0:
            elapsed = (timezone.now() - job.started).total_seconds()
            message += f", about {int(elapsed / fraction * (1 - fraction))} s left"
        job.beat(progress=round(0.95 * fraction, 4), message=message)
    return report


@app.task(**TASK_OPTIONS)
@_guard
def infer_chunk(run_id: int, chunk: int, attempt: int | None = None):
    import json
    run = InferenceRun.objects.select_related("checkpoint", "ensemble_with", "job").get(pk=run_id)
    if Prediction.objects.filter(run=run, chunk=chunk).exists():
        return "done before"
    done = 0
    with running(run.job_id, attempt=attempt, part=f"chunk-{chunk}", finish=False) as job:
        every = run_images(run)
        items = every[chunk * run.chunk_size:(chunk + 1) * run.chunk_size]
        val_ids = set(Image.objects.filter(dataset_id=run.validation_id, id__in=[i for i, _ in items])
                      .values_list("id", flat=True)) if run.validation_id else set()
        path = str(run.checkpoint.path)
        extra = [str(run.ensemble_with.path)] if run.ensemble_with_id else []
        predictor, _ = _predictor(path, os.path.getmtime(path), json.dumps(run.transforms, sort_keys=True),
                                  json.dumps(run.options, sort_keys=True), _device(),
                                  tuple((p, os.path.getmtime(p)) for p in extra))
        cat_index = {c["id"]: i for i, c in enumerate(run.project.categories)}
        rows = []
        report = _chunk_progress(run, job, len(every))
        for i, pred, err in pipeline.infer(path, [str(Path(settings.MEDIA_ROOT) / f) for _, f in items],
                                           transforms=predictor.transforms, predictor=predictor, num_workers=0):
            check_cancel(job)
            report(len(rows) + 1)
            image_id = items[i][0]
            if pred is None:
                rows.append(Prediction(run=run, image_id=image_id, chunk=chunk, agreement=0, max_score=0,
                                       num_instances=0, error=err[:500], validation=image_id in val_ids))
                continue
            ens = [{k: d[k] for k in ("bbox", "score", "category_id", "keypoints", "keypoint_scores") if k in d}
                   for d in pred["ensembled"]]
            views = {v: [{k: d[k] for k in ("bbox", "score", "category_id", "keypoints") if k in d} for d in items_]
                     for v, items_ in pred["views"].items()}
            mask = 0
            for d in ens:
                mask |= 1 << cat_index.get(d["category_id"], 0)
            rows.append(Prediction(run=run, image_id=image_id, chunk=chunk, agreement=pred["agreement"],
                                   validation=image_id in val_ids,
                                   max_score=max((d["score"] for d in ens), default=0.0), num_instances=len(ens),
                                   class_mask=mask, ensembled=ens, views=views))
        check_cancel(job)
        with transaction.atomic():
            # only for the job's current attempt (a cancelled and retried job's chunk writes nothing)
            if Job.objects.filter(pk=job.pk, attempt=job.attempt).exists() and \
                    not Prediction.objects.filter(run=run, chunk=chunk).exists():
                Prediction.objects.bulk_create(rows, batch_size=500)
        done = Prediction.objects.filter(run=run).values("chunk").distinct().count()
        job.beat(progress=round(0.95 * done / max(1, run.chunks_total), 4),
                 message=f"{done}/{run.chunks_total} chunks of {run.chunk_size} images")
    if done >= run.chunks_total:
        try:
            _send(finalize_inference, (run.pk,), job, "finalize", link_error=job_failed.s(job.pk, job.attempt))
        except BROKER_ERRORS:  # the reaper sends it once the broker is back
            logger.warning("inference run %s: could not send its finaliser", run.pk)


@app.task(**TASK_OPTIONS)
@_guard
def finalize_inference(run_id: int, attempt: int | None = None):
    run = InferenceRun.objects.select_related("job").get(pk=run_id)
    with running(run.job_id, attempt=attempt, part="finalize") as job:
        done = Prediction.objects.filter(run=run).values("chunk").distinct().count()
        if done < run.chunks_total:
            raise ValueError(f"only {done} of {run.chunks_total} chunks finished; retry to run the rest")
        summary = threshold_stats.build(run)
        review_order.build(run)
        job.beat(result=summary, message="finished")


@app.task(**TASK_OPTIONS)
@_guard
def build_pseudo_labels(set_id: int, attempt: int | None = None):
    pls = PseudoLabelSet.objects.select_related("run", "job").get(pk=set_id)
    with running(pls.job_id, attempt=attempt) as job:
        write_pseudo_label_set(pls, progress=progress_writer(job, label="images "))
