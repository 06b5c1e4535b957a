"""The REST API: every action of the UI is one of these routes. Querysets are filtered by owner,
so one user's objects are invisible (404) to everybody else."""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Count
from django.http import FileResponse
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, inline_serializer
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.response import Response

from ml_core.checkpoint import load_model

from . import jobs, review_order, tasks, threshold_stats
from .exceptions import BadInput, Conflict, Unavailable
from .ingest import import_coco, ingest_upload, parse_coco_bytes
from .jobs import mark_stale_jobs
from .models import (Dataset, Evaluation, Image, InferenceRun, Job, ModelCheckpoint, Prediction, Project,
                     PseudoLabelSet, Review, TrainingRun)
from .permissions import owned
from .serializers import (DatasetSerializer, EvaluationSerializer, ImageSerializer, InferenceRunSerializer,
                          JobSerializer, ModelCheckpointSerializer, ProjectSerializer, PseudoLabelSetSerializer,
                          ReviewSerializer, TrainingRunSerializer, compact_instances)
from .validation import SafeJSONParser, id_filters, parse_id, parse_thresholds

MESSAGE = inline_serializer("Message", {"message": serializers.CharField()})
ERRORS = {400: OpenApiResponse(MESSAGE, description="bad input; `message` says what"),
          404: OpenApiResponse(MESSAGE, description="no such object among yours")}
FILE_RESULTS = inline_serializer("FileResults", {"files": serializers.ListField(child=serializers.DictField()),
                                                 "counts": serializers.DictField()})


def _new_job(request, project, kind, **fields) -> Job:
    return Job.objects.create(project=project, owner=request.user, kind=kind, **fields)


def _launch(job: Job, *undo):
    """Send a new job's messages once its rows are committed. With the broker down: the rows go
    (`undo`: the objects, then the job), and the answer is a 503 at once."""
    def remove():
        for obj in undo:
            obj.delete()
        job.delete()
    try:
        jobs.publish(job, lambda: tasks.send_job(job), remove)
    except jobs.BrokerUnavailable as e:
        raise Unavailable(str(e)) from None


def _body(request) -> dict:
    """The request body when it is a JSON object (or a form); {} for a list, a string, null."""
    return request.data if hasattr(request.data, "get") else {}


class ProjectViewSet(viewsets.ModelViewSet):
    serializer_class = ProjectSerializer

    def get_queryset(self):
        return owned(Project.objects.all(), self.request.user, "owner")

    def perform_create(self, serializer):
        serializer.save(owner=self.request.user)

    def perform_destroy(self, instance):
        """The whole project. The protected links inside it (a run's checkpoint and dataset, a set's
        run, every object's job) guard against deleting one object alone: remove the objects that
        hold them first, newest kinds first, then the project with the rest."""
        if instance.jobs.filter(state__in=(Job.QUEUED, Job.RUNNING)).exists():
            raise Conflict("jobs of this project are queued or running; cancel them first")
        with transaction.atomic():
            for model in (Evaluation, TrainingRun, PseudoLabelSet, InferenceRun):
                model.objects.filter(project=instance).delete()
            instance.delete()

    @extend_schema(responses={200: OpenApiTypes.OBJECT, **ERRORS})
    @action(detail=True)
    def pipeline(self, request, pk=None):
        """The state of each step: labeled data, teacher, unlabeled data, inference, review, student, evaluation."""
        p = self.get_object()
        mark_stale_jobs(Job.objects.filter(project=p))
        ds = {r: list(p.datasets.filter(role=r).annotate(n=Count("images")).values("id", "name", "n"))
              for r in ("labeled", "unlabeled", "validation")}

        def last(qs):
            o = qs.select_related("job").first()
            return None if o is None else {"id": o.id, "state": o.job.state, "progress": o.job.progress,
                                           "message": o.job.message}
        runs = p.training_runs
        return Response({
            "datasets": ds,
            "teacher": last(runs.filter(role="teacher")),
            "teacher_checkpoints": list(p.checkpoints.filter(role="teacher").values("id", "name", "arch", "created")),
            "inference": last(p.inference_runs),
            "reviews": Review.objects.filter(run__project=p).count(),
            "pseudo_label_set": last(p.pseudo_label_sets),
            "student": last(runs.filter(role="student")),
            "evaluations": EvaluationSerializer(p.evaluations.select_related("checkpoint", "job")[:20], many=True).data,
        })


class DatasetViewSet(viewsets.ModelViewSet):
    serializer_class = DatasetSerializer
    parser_classes = [SafeJSONParser, MultiPartParser, FormParser]

    def get_queryset(self):
        qs = owned(Dataset.objects.all(), self.request.user).annotate(
            image_count=Count("images", distinct=True), annotation_count=Count("images__annotations")).order_by("created", "id")
        qs = id_filters(qs, self.request.query_params, ("project",))
        if self.request.query_params.get("role"):
            qs = qs.filter(role=self.request.query_params["role"])
        return qs

    def perform_destroy(self, instance):
        if instance.inference_runs.exists():
            raise Conflict("inference runs use this dataset; delete them first")
        instance.delete()

    @extend_schema(request={"multipart/form-data": inline_serializer("ImageUpload", {
        "files": serializers.ListField(child=serializers.FileField())})}, responses={200: FILE_RESULTS, **ERRORS})
    @action(detail=True, methods=["post"], parser_classes=[MultiPartParser])
    def upload(self, request, pk=None):
        """Many image files at once; each gets accepted, duplicate, or rejected with a reason."""
        ds = self.get_object()
        files = request.FILES.getlist("files") or request.FILES.getlist("file")
        if not files:
            raise BadInput("send the images as multipart field 'files'")
        results = [ingest_upload(ds, f).to_dict() for f in files]
        counts = {s: sum(1 for r in results if r["status"] == s) for s in ("accepted", "duplicate", "rejected")}
        return Response({"files": results, "counts": counts})

    @extend_schema(request={"multipart/form-data": inline_serializer("ZipUpload", {"file": serializers.FileField()})},
                   responses={202: JobSerializer, **ERRORS})
    @action(detail=True, methods=["post"], url_path="upload-zip", parser_classes=[MultiPartParser])
    def upload_zip(self, request, pk=None):
        """A zip of images (and, for labeled/validation sets, one COCO JSON), ingested by a CPU worker."""
        ds = self.get_object()
        f = request.FILES.get("file")
        if f is None:
            raise BadInput("send the zip as multipart field 'file'")
        if f.size > settings.DISTILL_MAX_ZIP_BYTES:
            raise BadInput(f"the zip is {f.size:,} bytes, above the limit of {settings.DISTILL_MAX_ZIP_BYTES:,}")
        tmp_dir = ds.folder / "incoming"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=tmp_dir, suffix=".zip")
        with os.fdopen(fd, "wb") as out:
            for chunk in f.chunks():
                out.write(chunk)
        job = _new_job(request, ds.project, "ingest", params={"dataset": ds.pk, "zip": path})
        try:
            _launch(job)
        except Unavailable:
            os.unlink(path)
            raise
        return Response(JobSerializer(job).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request={"multipart/form-data": inline_serializer("CocoUpload", {
        "file": serializers.FileField(), "skip_invalid": serializers.BooleanField(required=False)}),
        "application/json": OpenApiTypes.OBJECT}, responses={200: OpenApiTypes.OBJECT, **ERRORS})
    @action(detail=True, methods=["post"], url_path="import-coco", parser_classes=[MultiPartParser, SafeJSONParser])
    def import_coco(self, request, pk=None):
        """COCO JSON annotations for the images already uploaded (matched by file name). All or nothing."""
        ds = self.get_object()
        f = request.FILES.get("file")
        skip = str(_body(request).get("skip_invalid", request.query_params.get("skip_invalid", ""))).lower() in ("1", "true", "yes")
        doc = parse_coco_bytes(f.read(), f.name) if f is not None else request.data
        if not isinstance(doc, dict) or "images" not in doc:
            raise BadInput("send a COCO JSON document (as multipart field 'file' or as the JSON body)")
        return Response(import_coco(ds, doc, skip_invalid=skip))

    @extend_schema(responses={200: OpenApiTypes.OBJECT, **ERRORS})
    @action(detail=True)
    def export(self, request, pk=None):
        """The dataset as COCO JSON (file_name as uploaded)."""
        from .ingest import dataset_to_coco
        ds = self.get_object()
        doc = dataset_to_coco(ds)
        names = dict(Image.objects.filter(dataset=ds).values_list("id", "file_name"))
        for im in doc["images"]:
            im["file_name"] = names[im["id"]]
        return Response(doc)


class ImageViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet):
    serializer_class = ImageSerializer

    def get_queryset(self):
        qs = owned(Image.objects.all(), self.request.user, "dataset__project__owner").prefetch_related("annotations")
        return id_filters(qs, self.request.query_params, ("dataset",))

    @extend_schema(parameters=[OpenApiParameter("dataset", int)])
    def list(self, request, *args, **kwargs):
        return super().list(request, *args, **kwargs)

    @extend_schema(responses={(200, "image/*"): OpenApiTypes.BINARY, **ERRORS})
    @action(detail=True)
    def file(self, request, pk=None):
        img = self.get_object()
        resp = FileResponse(open(img.path, "rb"))
        resp["Cache-Control"] = "private, max-age=86400"
        return resp

    @extend_schema(responses={(200, "image/jpeg"): OpenApiTypes.BINARY, **ERRORS})
    @action(detail=True)
    def thumbnail(self, request, pk=None):
        img = self.get_object()
        resp = FileResponse(open(Path(settings.MEDIA_ROOT) / (img.thumbnail or img.file), "rb"))
        resp["Cache-Control"] = "private, max-age=86400"
        return resp


class ModelCheckpointViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin,
                             viewsets.GenericViewSet):
    serializer_class = ModelCheckpointSerializer

    def get_queryset(self):
        qs = owned(ModelCheckpoint.objects.all(), self.request.user)
        qs = id_filters(qs, self.request.query_params, ("project",))
        return qs

    def perform_destroy(self, instance):
        if instance.inference_runs.exists() or instance.ensembled_in.exists():
            raise Conflict("inference runs use this checkpoint; delete them first")
        instance.delete()

    @extend_schema(request={"multipart/form-data": inline_serializer("CheckpointUpload", {
        "project": serializers.IntegerField(), "file": serializers.FileField(),
        "role": serializers.ChoiceField(choices=["teacher", "student"], required=False),
        "name": serializers.CharField(required=False)})}, responses={201: ModelCheckpointSerializer, **ERRORS})
    @action(detail=False, methods=["post"], parser_classes=[MultiPartParser])
    def upload(self, request):
        """Import a Distill checkpoint (e.g. a teacher trained elsewhere with `distill train`)."""
        project = owned(Project.objects.all(), request.user, "owner").filter(pk=request.data.get("project")).first()
        if project is None:
            raise BadInput("project: no such project of yours")
        f = request.FILES.get("file")
        if f is None:
            raise BadInput("send the checkpoint as multipart field 'file'")
        folder = project.folder / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=folder, suffix=".pt")
        with os.fdopen(fd, "wb") as out:
            for chunk in f.chunks():
                out.write(chunk)
        try:
            # Rebuilds the model and loads the weights (never unpickling code): what cannot be used is refused now.
            meta = load_model(path, name=os.path.basename(f.name or 'checkpoint'))[1]
            cats = [(c["id"], c["name"]) for c in meta["categories"]]
            if project.categories and cats != [(c["id"], c["name"]) for c in project.categories]:
                raise ValueError(f"the checkpoint's categories {cats} differ from the project's")
        except Exception:
            os.unlink(path)
            raise
        ckpt = ModelCheckpoint.objects.create(project=project, name=request.data.get("name") or f.name,
                                              role=request.data.get("role", "teacher"), arch=meta["arch"],
                                              file=str(Path(path).relative_to(settings.MEDIA_ROOT)), meta=meta)
        if not project.categories:
            project.categories = meta["categories"]
            project.save(update_fields=["categories"])
        return Response(self.get_serializer(ckpt).data, status=status.HTTP_201_CREATED)

    @extend_schema(responses={(200, "application/octet-stream"): OpenApiTypes.BINARY, **ERRORS})
    @action(detail=True)
    def download(self, request, pk=None):
        c = self.get_object()
        return FileResponse(open(c.path, "rb"), as_attachment=True, filename=f"{c.role}-{c.pk}-{c.arch}.pt")


class KnownCount:
    """A queryset whose length is already known (Django's paginator asks count() first)."""

    def __init__(self, qs, n: int):
        self.qs, self.n = qs, n

    def count(self) -> int:
        return self.n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k):
        return self.qs[k]


def cancel_job(job: Job) -> Response:
    """Ask a running job to stop (its task checks); a job still queued, or one whose worker is
    gone, is cancelled at once."""
    if job.is_final:
        raise Conflict(f"the job is already {job.state}")
    return Response(JobSerializer(jobs.cancel(job)).data)


class JobControl:
    """cancel and retry for objects that own a job."""

    def _cancel(self, obj):
        return cancel_job(obj.job)

    def _retry(self, obj):
        """A new attempt (the earlier attempt's messages do nothing any more), resuming from what was saved."""
        try:
            job = jobs.retry(obj.job, tasks.send_job)
        except ValueError as e:
            raise Conflict(str(e)) from None
        except jobs.BrokerUnavailable as e:
            raise Unavailable(str(e)) from None
        return Response(JobSerializer(job).data, status=status.HTTP_202_ACCEPTED)


PREDICTION_PARAMS = [
    OpenApiParameter("ordering", str, enum=["agreement", "-agreement", "max_score", "-max_score", "image"],
                     description="agreement = least agreement between views first"),
    OpenApiParameter("category", int, description="only images with an instance of this category id"),
    OpenApiParameter("review", str, enum=["none", "accepted", "rejected", "edited", "any"]),
    OpenApiParameter("min_score", float, description="only images whose best instance scores at least this "
                     "(with category: whose best instance of that category)"),
    OpenApiParameter("max_score", float, description="only images whose best instance scores at most this "
                     "(with category: whose best instance of that category)"),
    OpenApiParameter("max_agreement", float, description="only images whose views agree at most this much"),
    OpenApiParameter("thresholds", str, description='per-class JSON for kept_min/kept_max, e.g. {"default": 0.5}'),
    OpenApiParameter("kept_min", int, description="only images keeping at least this many instances at the thresholds"),
    OpenApiParameter("kept_max", int, description="only images keeping at most this many instances at the thresholds"),
    OpenApiParameter("compact", bool, description="ensembled instances as [x, y, w, h, score, category_id(, keypoints(, "
                     "keypoint_scores))] "
                     "rounded to 0.1 px and 1e-5 (as /scores/), without the derivable urls (what the review grid draws)"),
    OpenApiParameter("image", int, description="only this image"),
    OpenApiParameter("views", bool, description="include every single view's predictions (default true)"),
]


class InferenceRunViewSet(JobControl, mixins.CreateModelMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin,
                          mixins.DestroyModelMixin, viewsets.GenericViewSet):
    serializer_class = InferenceRunSerializer

    def get_queryset(self):
        qs = owned(InferenceRun.objects.select_related("job", "project"), self.request.user)
        qs = id_filters(qs, self.request.query_params, ("project",))
        mark_stale_jobs(Job.objects.filter(inference_run__in=qs))
        return qs

    def perform_create(self, serializer):
        from ml_core.transforms import TransformSet
        from ml_core.tta import model_view_name
        project = serializer.validated_data["project"]
        job = _new_job(self.request, project, "infer")
        n = Image.objects.filter(dataset=serializer.validated_data["dataset"]).count()
        v = serializer.validated_data.get("validation")
        if v is not None:
            n += Image.objects.filter(dataset=v).count()
        cs = serializer.validated_data["chunk_size"]
        n_models = 1 if serializer.validated_data.get("ensemble_with") is None else 2
        views = [model_view_name(vw.name, k, n_models) for k in range(n_models)
                 for vw in TransformSet.from_dict(serializer.validated_data["transforms"]).views]
        run = serializer.save(job=job, chunks_total=math.ceil(n / cs), view_names=views)
        _launch(job, run)

    def perform_destroy(self, instance):
        if instance.pseudo_label_sets.exists():
            raise Conflict("pseudo-label sets were made from this run; delete them first")
        job = instance.job
        instance.delete()
        job.delete()

    @extend_schema(request=None, responses={200: JobSerializer, 409: MESSAGE})
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        return self._cancel(self.get_object())

    @extend_schema(request=None, responses={202: JobSerializer, 409: MESSAGE})
    @action(detail=True, methods=["post"])
    def retry(self, request, pk=None):
        """Run the chunks that are not done yet (a killed worker's chunk is redone), then finalise."""
        run = self.get_object()
        return self._retry(run)

    @extend_schema(parameters=PREDICTION_PARAMS, responses={200: OpenApiTypes.OBJECT, **ERRORS})
    @action(detail=True)
    def predictions(self, request, pk=None):
        """Per image: the ensembled prediction, every single view's, the agreement and the review."""
        run = self.get_object()
        qs = Prediction.objects.filter(run=run, validation=False)
        p = request.query_params
        order = p.get("ordering", "image")
        fields = {"agreement": ("agreement", "id"), "-agreement": ("-agreement", "-id"),
                  "max_score": ("max_score", "id"), "-max_score": ("-max_score", "-id"), "image": ("image_id",)}
        if order not in fields:
            raise BadInput(f"ordering must be one of {', '.join(fields)}")
        category = None
        if p.get("category"):
            idx = [i for i, c in enumerate(run.project.categories) if str(c["id"]) == p["category"]]
            if not idx:
                raise BadInput(f"category {p['category']} is not one of the project's")
            category = run.project.categories[idx[0]]["id"]
            qs = qs.extra(where=["(class_mask & %s) != 0"], params=[1 << idx[0]])
        if p.get("image"):
            qs = qs.filter(image_id=parse_id(p["image"], "image"))

        def number(name):
            if not p.get(name):
                return None
            try:
                v = float(p[name])
            except ValueError:
                raise BadInput(f"{name} must be a number") from None
            if not math.isfinite(v):
                raise BadInput(f"{name} must be a finite number")
            return v
        min_score, max_score, max_agreement = number("min_score"), number("max_score"), number("max_agreement")
        kept_min, kept_max = number("kept_min"), number("kept_max")
        if min_score is not None:
            qs = qs.filter(max_score__gte=min_score)
        if max_score is not None and category is None:
            qs = qs.filter(max_score__lte=max_score)
        if max_agreement is not None:
            qs = qs.filter(agreement__lte=max_agreement)
        th = parse_thresholds(p.get("thresholds"), fallback=run.auto_threshold if run.auto_threshold is not None else 0.5) \
            if kept_min is not None or kept_max is not None else None
        review = p.get("review")
        if review == "none":
            qs = qs.exclude(image__reviews__run=run)
        elif review == "any":
            qs = qs.filter(image__reviews__run=run)
        elif review in ("accepted", "rejected", "edited"):
            qs = qs.filter(image__reviews__run=run, image__reviews__state=review)
        elif review:
            raise BadInput("review must be one of none, accepted, rejected, edited, any")
        with_views = p.get("views", "true").lower() not in ("0", "false", "no")
        cols = ["id", "image_id", "agreement", "max_score", "num_instances", "ensembled", "error"] + \
            (["views"] if with_views else [])
        # Page through ids alone (a covering index walk, cheap even at a deep offset), then load
        # only the page's rows: SQLite would otherwise read every skipped row's JSON.
        ordered = qs.order_by(*fields[order])
        if (category is not None and (min_score is not None or max_score is not None)) or th is not None:
            # Filters on the instances themselves (one category's scores, how many the thresholds
            # keep): read on the rows the indexed filters above left, in order, then paged.
            def keep(ens):
                if category is not None and (min_score is not None or max_score is not None):
                    best = max((d["score"] for d in ens if d["category_id"] == category), default=None)
                    if best is None or (min_score is not None and best < min_score) or \
                            (max_score is not None and best > max_score):
                        return False
                if th is not None:
                    n = sum(d["score"] >= th.get(str(d["category_id"]), th["default"]) for d in ens)
                    if (kept_min is not None and n < kept_min) or (kept_max is not None and n > kept_max):
                        return False
                return True
            ordered = [i for i, ens in ordered.values_list("id", "ensembled").iterator(chunk_size=2000) if keep(ens)]
        else:
            ordered = ordered.values_list("id", flat=True)
            filtered = any(p.get(k) for k in ("category", "image", "min_score", "max_score", "max_agreement", "review"))
            finished = run.job.state == Job.SUCCEEDED
            stored = review_order.ordered_ids(run, order) if finished and not filtered else None
            known = (run.job.result or {}).get("images") if finished else None
            if stored is not None:
                # the finished run's order, stored when it finished: any page is a slice
                ordered = stored
            elif not filtered and isinstance(known, int):
                # The finished run's statistics know how many images it has: no COUNT(*) over
                # millions of rows for every page of the review grid.
                ordered = KnownCount(ordered, known)
        ids = self.paginate_queryset(ordered)
        rows = {r["id"]: r for r in Prediction.objects.filter(id__in=list(ids)).values(*cols)}
        page = [rows[i] for i in ids]
        # a second query for the page's images keeps the ordering on the prediction index alone
        images = {i["id"]: i for i in Image.objects.filter(id__in=[r["image_id"] for r in page])
                  .values("id", "width", "height", "file_name")}
        for r in page:
            im = images[r["image_id"]]
            r["image__width"], r["image__height"], r["image__file_name"] = im["width"], im["height"], im["file_name"]
        reviews = {r["image_id"]: r for r in Review.objects.filter(run=run, image_id__in=[r["image_id"] for r in page])
                   .values("id", "image_id", "state", "instances", "updated")}
        out = []
        if p.get("compact", "").lower() in ("1", "true", "yes"):
            for r, ens in zip(page, compact_instances([r["ensembled"] for r in page])):
                out.append({"image": r["image_id"], "file_name": r["image__file_name"], "width": r["image__width"],
                            "height": r["image__height"], "agreement": round(r["agreement"], 4),
                            "max_score": round(r["max_score"], 4), "ensembled": ens,
                            **({"error": r["error"]} if r["error"] else {}), "review": reviews.get(r["image_id"])})
            return self.get_paginated_response(out)
        for r in page:
            out.append({"image": r["image_id"], "file_name": r["image__file_name"], "width": r["image__width"],
                        "height": r["image__height"], "url": f"/api/images/{r['image_id']}/file/",
                        "thumbnail_url": f"/api/images/{r['image_id']}/thumbnail/", "agreement": r["agreement"],
                        "max_score": r["max_score"], "num_instances": r["num_instances"], "ensembled": r["ensembled"],
                        "views": r.get("views"), "error": r["error"], "review": reviews.get(r["image_id"])})
        return self.get_paginated_response(out)

    @extend_schema(parameters=[
        OpenApiParameter("threshold", float, description="global threshold in [0, 1] (default: the automatic one, else 0.5)"),
        OpenApiParameter("thresholds", str, description='per-class JSON, e.g. {"1": 0.7, "default": 0.5}')],
        responses={200: OpenApiTypes.OBJECT, **ERRORS, 409: MESSAGE})
    @action(detail=True, url_path="threshold-stats")
    def threshold_stats(self, request, pk=None):
        """Score histograms per class, kept instances per image and images with labels against the
        threshold, the automatic threshold, and precision/recall on the validation set."""
        run = self.get_object()
        if run.job.state != Job.SUCCEEDED:
            raise Conflict(f"the run is {run.job.state}; statistics come when it has succeeded")
        q = request.query_params
        kw = {"default": q["threshold"]} if q.get("threshold") is not None else {}
        th = parse_thresholds(q.get("thresholds"), fallback=run.auto_threshold if run.auto_threshold is not None else 0.5,
                              **kw)
        try:
            return Response(threshold_stats.at(run, th))
        except FileNotFoundError:
            raise Conflict("the run's statistics files are missing from the media folder; start a new inference run") from None

    @extend_schema(responses={200: OpenApiTypes.OBJECT, 409: MESSAGE})
    @action(detail=True)
    def scores(self, request, pk=None):
        """Every ensembled score (flat arrays) so a browser can recompute the statistics live."""
        run = self.get_object()
        if run.job.state != Job.SUCCEEDED:
            raise Conflict(f"the run is {run.job.state}")
        try:
            return Response(threshold_stats.scores_payload(run))
        except FileNotFoundError:
            raise Conflict("the run's statistics files are missing from the media folder; start a new inference run") from None

    @extend_schema(request=inline_serializer("BulkAccept", {"threshold": serializers.FloatField(required=False),
                                                            "thresholds": serializers.DictField(required=False),
                                                            "dry_run": serializers.BooleanField(required=False)}),
                   responses={200: OpenApiTypes.OBJECT, **ERRORS})
    @action(detail=True, methods=["post"], url_path="bulk-accept")
    def bulk_accept(self, request, pk=None):
        """Accept every unreviewed image that has an instance at or above the threshold."""
        run = self.get_object()
        body = _body(request)
        th = parse_thresholds(body.get("thresholds"), **({"default": body["threshold"]} if "threshold" in body else {}))
        reviewed = set(Review.objects.filter(run=run).values_list("image_id", flat=True))
        low = min(th.values())
        new = []
        for image_id, ens in Prediction.objects.filter(run=run, validation=False, max_score__gte=low) \
                .values_list("image_id", "ensembled").iterator(chunk_size=2000):
            if image_id in reviewed:
                continue
            if any(d["score"] >= th.get(str(d["category_id"]), th["default"]) for d in ens):
                new.append(Review(run=run, image_id=image_id, state="accepted", user=request.user,
                                  history=[{"state": None, "instances": None, "at": timezone.now().isoformat()}]))
        if body.get("dry_run") is True:  # the count a confirmation shows, nothing written
            return Response({"accepted": len(new)})
        Review.objects.bulk_create(new, batch_size=1000, ignore_conflicts=True)
        return Response({"accepted": len(new), "images": [r.image_id for r in new]})

    @extend_schema(request=inline_serializer("BulkUndo", {"images": serializers.ListField(child=serializers.IntegerField())}),
                   responses={200: OpenApiTypes.OBJECT, **ERRORS})
    @action(detail=True, methods=["post"], url_path="bulk-undo")
    def bulk_undo(self, request, pk=None):
        """Undo a bulk accept as one step: the given images' reviews that are still that single
        acceptance (not changed since) are removed."""
        run = self.get_object()
        images = _body(request).get("images")
        if not isinstance(images, list) or len(images) > 1_000_000 or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in images):
            raise BadInput("images must be a list of image ids")
        undone = 0
        for start in range(0, len(images), 500):
            chunk = images[start:start + 500]
            ids = [r.pk for r in Review.objects.filter(run=run, image_id__in=chunk, state="accepted")
                   if len(r.history) == 1 and r.history[0]["state"] is None]
            undone += Review.objects.filter(pk__in=ids).delete()[0]
        return Response({"undone": undone})


class ReviewViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin,
                    mixins.CreateModelMixin, mixins.UpdateModelMixin, viewsets.GenericViewSet):
    """POST creates or replaces the review of (run, image); the previous version goes to history."""

    serializer_class = ReviewSerializer

    def get_queryset(self):
        qs = owned(Review.objects.all(), self.request.user, "run__project__owner")
        qs = id_filters(qs, self.request.query_params, ("run", "image"))
        if self.request.query_params.get("state"):
            qs = qs.filter(state=self.request.query_params["state"])
        return qs.order_by("-updated")

    def create(self, request, *args, **kwargs):
        ser = self.get_serializer(data=request.data)
        ser.is_valid(raise_exception=True)
        d = ser.validated_data
        with transaction.atomic():
            review = Review.objects.select_for_update().filter(run=d["run"], image=d["image"]).first()
            if review is None:
                try:
                    review = Review.objects.create(run=d["run"], image=d["image"], state=d["state"],
                                                   instances=d.get("instances"), user=request.user,
                                                   history=[{"state": None, "instances": None, "at": timezone.now().isoformat()}])
                except IntegrityError:
                    raise Conflict("a review of this image was saved at the same moment; reload and retry") from None
                return Response(self.get_serializer(review).data, status=status.HTTP_201_CREATED)
            self._push(review, d["state"], d.get("instances"), request.user)
        return Response(self.get_serializer(review).data)

    def perform_update(self, serializer):
        r = serializer.instance
        d = serializer.validated_data
        self._push(r, d.get("state", r.state), d.get("instances", r.instances), self.request.user)

    @staticmethod
    def _push(review, state, instances, user):
        review.history = review.history + [{"state": review.state, "instances": review.instances,
                                            "at": timezone.now().isoformat()}]
        review.state, review.instances, review.user = state, instances, user
        review.save()

    @extend_schema(request=None, responses={200: ReviewSerializer, 204: None, **ERRORS})
    @action(detail=True, methods=["post"])
    def undo(self, request, pk=None):
        """Back to the previous version; undoing the first version removes the review."""
        review = self.get_object()
        if not review.history or review.history[-1]["state"] is None:
            review.delete()
            return Response(status=status.HTTP_204_NO_CONTENT)
        prev = review.history[-1]
        review.state, review.instances, review.history = prev["state"], prev["instances"], review.history[:-1]
        review.save()
        return Response(self.get_serializer(review).data)


class PseudoLabelSetViewSet(mixins.CreateModelMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin,
                            mixins.DestroyModelMixin, viewsets.GenericViewSet):
    serializer_class = PseudoLabelSetSerializer

    def get_queryset(self):
        qs = owned(PseudoLabelSet.objects.select_related("job"), self.request.user)
        qs = id_filters(qs, self.request.query_params, ("project",))
        return qs

    def perform_create(self, serializer):
        run = serializer.validated_data["run"]
        job = _new_job(self.request, run.project, "pseudo_labels")
        pls = serializer.save(project=run.project, job=job)
        _launch(job, pls)

    def perform_destroy(self, instance):
        if instance.training_runs.exists():
            raise Conflict("training runs used this set; it is kept as their record")
        job = instance.job
        instance.delete()
        job.delete()

    @extend_schema(responses={(200, "application/json"): OpenApiTypes.BINARY, 409: MESSAGE, 404: MESSAGE})
    @action(detail=True)
    def export(self, request, pk=None):
        """The pseudo-labels as COCO JSON, with scores."""
        pls = self.get_object()
        if pls.job.state != Job.SUCCEEDED:
            raise Conflict(f"the set is {pls.job.state}")
        return FileResponse(open(pls.path, "rb"), as_attachment=True, filename=f"pseudo_labels_{pls.pk}.json",
                            content_type="application/json")


class TrainingRunViewSet(JobControl, mixins.CreateModelMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin,
                         viewsets.GenericViewSet):
    serializer_class = TrainingRunSerializer

    def get_queryset(self):
        qs = owned(TrainingRun.objects.select_related("job"), self.request.user)
        qs = id_filters(qs, self.request.query_params, ("project",))
        if self.request.query_params.get("role"):
            qs = qs.filter(role=self.request.query_params["role"])
        mark_stale_jobs(Job.objects.filter(training_run__in=qs))
        return qs

    def create(self, request, *args, **kwargs):
        """Launch training. A repeated request_key returns the run it already started (no second run)."""
        body = _body(request)
        key = body.get("request_key") or ""
        project = body.get("project")
        if key and isinstance(key, str) and (isinstance(project, (int, str)) and not isinstance(project, bool)):
            try:
                project = parse_id(project, "project")
            except ValueError:
                project = None
            existing = project is not None and self.get_queryset().filter(request_key=key, project=project).first()
            if existing:
                return Response(self.get_serializer(existing).data, status=status.HTTP_200_OK)
        return super().create(request, *args, **kwargs)

    def perform_create(self, serializer):
        project = serializer.validated_data["project"]
        with transaction.atomic():
            job = _new_job(self.request, project, "train")
            try:
                with transaction.atomic():
                    run = serializer.save(job=job)
            except IntegrityError:
                raise Conflict("a run with this request_key was just started") from None
        _launch(job, run)

    @extend_schema(request=None, responses={200: JobSerializer, 409: MESSAGE})
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        return self._cancel(self.get_object())

    @extend_schema(request=None, responses={202: JobSerializer, 409: MESSAGE})
    @action(detail=True, methods=["post"])
    def retry(self, request, pk=None):
        """Continue from the last saved checkpoint."""
        run = self.get_object()
        return self._retry(run)


class EvaluationViewSet(mixins.CreateModelMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = EvaluationSerializer

    def get_queryset(self):
        qs = owned(Evaluation.objects.select_related("job", "checkpoint"), self.request.user)
        return id_filters(qs, self.request.query_params, ("project", "checkpoint", "dataset"))

    def perform_create(self, serializer):
        ckpt = serializer.validated_data["checkpoint"]
        job = _new_job(self.request, ckpt.project, "evaluate")
        ev = serializer.save(project=ckpt.project, job=job)
        _launch(job, ev)


class JobViewSet(viewsets.ReadOnlyModelViewSet):
    serializer_class = JobSerializer

    def get_queryset(self):
        qs = Job.objects.filter(owner=self.request.user) if self.request.user.is_authenticated else Job.objects.none()
        mark_stale_jobs(qs)
        return qs

    @extend_schema(request=None, responses={200: JobSerializer, 409: MESSAGE})
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        return cancel_job(self.get_object())

    @extend_schema(request=None, responses={202: JobSerializer})
    @action(detail=False, methods=["post"])
    def ping(self, request):
        """Send a no-op job through the broker to a worker: shows the workers are alive."""
        job = Job.objects.create(owner=request.user, kind="ping")
        _launch(job)
        return Response(JobSerializer(job).data, status=status.HTTP_202_ACCEPTED)
