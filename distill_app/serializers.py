"""API representations. Options are validated by ml_core's own classes, so the API accepts
exactly what the engine accepts and reports its messages."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from django.conf import settings
from django.db import models as db_models
from rest_framework import serializers

from ml_core.engine import TrainConfig
from ml_core.ensemble import heatmap_views
from ml_core.models import ARCHITECTURES
from ml_core.transforms import TransformSet
from ml_core.tta import EnsembleOptions

from .models import (Annotation, Dataset, Evaluation, Image, InferenceRun, Job, ModelCheckpoint, Project,
                     PseudoLabelSet, Review, TrainingRun)
from . import permissions
from .validation import MAX_ID, SafeJSONField, check_categories, is_id, parse_thresholds


def _option_value_ok(value, default) -> bool:
    """Whether a client's value has the type of the option's default (ints for ints, finite numbers
    for floats, lists of those for sequences)."""
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_ID
    if isinstance(default, float):
        return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and abs(value) <= 1e15)
    if isinstance(default, str):
        return isinstance(value, str) and len(value) <= 200
    if isinstance(default, (list, tuple)):
        return isinstance(value, list) and len(value) <= 1000 and all(
            _option_value_ok(v, default[0] if default else None) for v in value)
    return True


def _ml_option(cls, value, what):
    """An ml_core options dataclass from a client's JSON object: each value must have its
    option's type; then the class checks ranges and reports its own messages."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise serializers.ValidationError({what: f"{what} must be a JSON object"})
    for f in dataclasses.fields(cls):
        if f.name not in value:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if not _option_value_ok(value[f.name], default):
            kind = type(default).__name__ if not isinstance(default, (list, tuple)) else \
                f"list of {type(default[0]).__name__ if default else 'value'}"
            raise serializers.ValidationError({what: f"{what}.{f.name} must be a {kind}"})
    try:
        return cls.from_dict(value)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as e:
        raise serializers.ValidationError({what: f"bad {what}: {e}"}) from None


class OwnedRelatedField(permissions.OwnedRelatedField):
    """An id of one of the user's objects; anything that is not an integer id, or one beyond what
    the database holds, is refused like an id that does not exist (never an overflow)."""

    def to_internal_value(self, data):
        if isinstance(data, str) and data.strip().isascii() and data.strip().isdigit() and len(data.strip()) <= 19:
            data = int(data.strip())
        if isinstance(data, int) and not isinstance(data, bool) and not is_id(data):
            self.fail("does_not_exist", pk_value=data)
        if not is_id(data):
            self.fail("incorrect_type", data_type=type(data).__name__)
        return super().to_internal_value(data)


class ModelSerializer(serializers.ModelSerializer):
    """JSON model fields parse and check their input like request bodies (validation.SafeJSONField)."""

    serializer_field_mapping = {**serializers.ModelSerializer.serializer_field_mapping,
                                db_models.JSONField: SafeJSONField}


class JobSerializer(ModelSerializer):
    class Meta:
        model = Job
        fields = ["id", "kind", "state", "progress", "message", "error", "result", "cancel_requested", "created",
                  "started", "finished", "heartbeat", "attempt", "fault"]
        read_only_fields = fields


class ProjectSerializer(ModelSerializer):
    owner = serializers.CharField(source="owner.username", read_only=True)

    class Meta:
        model = Project
        fields = ["id", "name", "description", "task", "categories", "owner", "created"]
        read_only_fields = ["owner", "created"]

    def validate_categories(self, value):
        try:
            return check_categories(value)
        except ValueError as e:
            raise serializers.ValidationError(str(e)) from None

    def validate(self, attrs):
        if self.instance and "categories" in attrs and attrs["categories"] != self.instance.categories:
            if Annotation.objects.filter(image__dataset__project=self.instance).exists():
                raise serializers.ValidationError("categories cannot change once annotations refer to them")
        return attrs


class DatasetSerializer(ModelSerializer):
    project = OwnedRelatedField(queryset=Project.objects.all(), owner_path="owner")
    image_count = serializers.IntegerField(read_only=True)
    annotation_count = serializers.IntegerField(read_only=True)

    class Meta:
        model = Dataset
        fields = ["id", "project", "name", "role", "image_count", "annotation_count", "created"]
        read_only_fields = ["created"]


class ImageSerializer(ModelSerializer):
    url = serializers.SerializerMethodField()
    thumbnail_url = serializers.SerializerMethodField()
    annotations = serializers.SerializerMethodField()

    class Meta:
        model = Image
        fields = ["id", "dataset", "file_name", "width", "height", "sha256", "url", "thumbnail_url", "annotations",
                  "created"]
        read_only_fields = fields

    def get_url(self, obj) -> str:
        return f"/api/images/{obj.pk}/file/"

    def get_thumbnail_url(self, obj) -> str:
        return f"/api/images/{obj.pk}/thumbnail/"

    def get_annotations(self, obj) -> list[dict]:
        return [{"id": a.id, "category_id": a.category_id, "bbox": a.bbox, "keypoints": a.keypoints}
                for a in obj.annotations.all()]


class ModelCheckpointSerializer(ModelSerializer):
    project = OwnedRelatedField(queryset=Project.objects.all(), owner_path="owner")
    metrics = serializers.SerializerMethodField()

    class Meta:
        model = ModelCheckpoint
        fields = ["id", "project", "name", "role", "arch", "meta", "training_run", "metrics", "created"]
        read_only_fields = ["arch", "meta", "training_run", "created"]

    def get_metrics(self, obj) -> list[dict]:
        return [{"evaluation": e.id, "dataset": e.dataset_id, "stats": e.stats}
                for e in obj.evaluations.filter(job__state=Job.SUCCEEDED)]


class InferenceRunSerializer(ModelSerializer):
    project = OwnedRelatedField(queryset=Project.objects.all(), owner_path="owner")
    checkpoint = OwnedRelatedField(queryset=ModelCheckpoint.objects.all())
    ensemble_with = OwnedRelatedField(queryset=ModelCheckpoint.objects.all(), required=False, allow_null=True)
    dataset = OwnedRelatedField(queryset=Dataset.objects.all())
    validation = OwnedRelatedField(queryset=Dataset.objects.all(), required=False, allow_null=True)
    job = JobSerializer(read_only=True)
    transforms = SafeJSONField(required=False)
    options = SafeJSONField(required=False)

    class Meta:
        model = InferenceRun
        fields = ["id", "project", "checkpoint", "ensemble_with", "dataset", "validation", "transforms", "options",
                  "chunk_size",
                  "chunks_total", "view_names", "auto_threshold", "labeled_per_image", "job", "created"]
        read_only_fields = ["chunks_total", "view_names", "auto_threshold", "labeled_per_image", "created"]

    def validate(self, attrs):
        project = attrs["project"]
        for key, role in (("dataset", "unlabeled"), ("validation", "validation")):
            ds = attrs.get(key)
            if ds is not None and (ds.project_id != project.pk or ds.role != role):
                raise serializers.ValidationError({key: f"must be a {role} dataset of this project"})
        if attrs["checkpoint"].project_id != project.pk:
            raise serializers.ValidationError({"checkpoint": "must belong to this project"})
        other = attrs.get("ensemble_with")
        if other is not None:
            if other.project_id != project.pk:
                raise serializers.ValidationError({"ensemble_with": "must belong to this project"})
            if other.pk == attrs["checkpoint"].pk:
                raise serializers.ValidationError({"ensemble_with": "is the checkpoint itself; choose another model"})
            if other.arch != attrs["checkpoint"].arch:
                raise serializers.ValidationError(
                    {"ensemble_with": f"a {other.arch} cannot join a {attrs['checkpoint'].arch}'s ensemble: "
                                      "the models must share their architecture"})
        if not attrs["dataset"].images.exists():
            raise serializers.ValidationError({"dataset": "the unlabeled set has no images"})
        attrs["transforms"] = _ml_option(TransformSet, attrs.get("transforms"), "transforms").to_dict()
        attrs["options"] = {k: v for k, v in vars(_ml_option(EnsembleOptions, attrs.get("options"), "options")).items()}
        try:
            heatmap_views(attrs["options"]["keypoint_scales"], attrs["transforms"]["scales"], 1)
        except ValueError as e:
            raise serializers.ValidationError({"options": f"bad options: {e}"}) from None
        attrs.setdefault("chunk_size", settings.DISTILL_INFERENCE_CHUNK)
        if not 1 <= attrs["chunk_size"] <= 10000:
            raise serializers.ValidationError({"chunk_size": "must lie between 1 and 10000"})
        return attrs


class ReviewSerializer(ModelSerializer):
    run = OwnedRelatedField(queryset=InferenceRun.objects.all())
    # Another user's image is "does not exist", word for word like an id nobody has.
    image = OwnedRelatedField(queryset=Image.objects.all(), owner_path="dataset__project__owner")
    user = serializers.CharField(source="user.username", read_only=True, default=None)

    class Meta:
        model = Review
        fields = ["id", "run", "image", "state", "instances", "history", "user", "updated"]
        read_only_fields = ["history", "user", "updated"]
        validators = []  # POST replaces the review of (run, image): uniqueness is handled by the view

    def validate(self, attrs):
        run, image = attrs.get("run") or self.instance.run, attrs.get("image") or self.instance.image
        if image.dataset_id != run.dataset_id:
            raise serializers.ValidationError({"image": "is not an image of this run's unlabeled set"})
        state = attrs.get("state") or self.instance.state
        inst = attrs.get("instances")
        if state == "edited":
            if not isinstance(inst, list):
                raise serializers.ValidationError({"instances": "an edited review needs the list of instances"})
            cats = {c["id"]: c for c in run.project.categories}
            for i, d in enumerate(inst):
                b = d.get("bbox") if isinstance(d, dict) else None
                if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b)
                        and b[2] > 0 and b[3] > 0):
                    raise serializers.ValidationError({"instances": f"instances[{i}]: bbox must be [x, y, w, h] with w, h > 0"})
                if not is_id(d.get("category_id")) or d["category_id"] not in cats:
                    raise serializers.ValidationError({"instances": f"instances[{i}]: unknown category {d.get('category_id')!r:.40}"})
                k = len(cats[d["category_id"]].get("keypoints") or [])
                kp = d.get("keypoints")
                if k and (not isinstance(kp, list) or len(kp) != 3 * k or not all(
                        isinstance(v, (int, float)) and not isinstance(v, bool) for v in kp)):
                    raise serializers.ValidationError({"instances": f"instances[{i}]: needs {3 * k} keypoint numbers"})
        elif inst is not None:
            attrs["instances"] = None
        return attrs


class PseudoLabelSetSerializer(ModelSerializer):
    run = OwnedRelatedField(queryset=InferenceRun.objects.all())
    job = JobSerializer(read_only=True)
    thresholds = SafeJSONField(help_text='{"default": 0.5, "<category id>": 0.7}')

    class Meta:
        model = PseudoLabelSet
        fields = ["id", "project", "run", "thresholds", "apply_reviews", "include_unreviewed", "keypoint_threshold",
                  "counts", "job", "created"]
        read_only_fields = ["project", "counts", "created"]

    def validate_thresholds(self, value):
        try:
            return parse_thresholds(value)
        except ValueError as e:
            raise serializers.ValidationError(str(e)) from None

    def validate_keypoint_threshold(self, value):
        if value is None or value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise serializers.ValidationError('must be "auto", null (keep every keypoint) or a number')
        return float(value)

    def validate_run(self, run):
        if run.job.state != Job.SUCCEEDED:
            raise serializers.ValidationError("the inference run has not finished")
        return run


class TrainingRunSerializer(ModelSerializer):
    project = OwnedRelatedField(queryset=Project.objects.all(), owner_path="owner")
    labeled = OwnedRelatedField(queryset=Dataset.objects.all())
    validation = OwnedRelatedField(queryset=Dataset.objects.all(), required=False, allow_null=True)
    pseudo_label_set = OwnedRelatedField(queryset=PseudoLabelSet.objects.all(), required=False, allow_null=True)
    teacher = OwnedRelatedField(queryset=ModelCheckpoint.objects.all(), required=False, allow_null=True)
    job = JobSerializer(read_only=True)
    config = SafeJSONField(required=False)
    arch = serializers.ChoiceField(choices=list(ARCHITECTURES))
    checkpoint = serializers.SerializerMethodField()

    class Meta:
        model = TrainingRun
        fields = ["id", "project", "role", "arch", "config", "labeled", "validation", "pseudo_label_set", "teacher",
                  "init", "min_size", "history", "job", "checkpoint", "request_key", "created"]
        read_only_fields = ["role", "history", "created"]

    def get_checkpoint(self, obj) -> int | None:
        c = obj.checkpoints.first()
        return c.pk if c else None

    def validate(self, attrs):
        project = attrs["project"]
        if attrs["labeled"].project_id != project.pk or attrs["labeled"].role != "labeled":
            raise serializers.ValidationError({"labeled": "must be a labeled dataset of this project"})
        if not Annotation.objects.filter(image__dataset=attrs["labeled"]).exists():
            raise serializers.ValidationError({"labeled": "the labeled set has no annotations; import COCO JSON first"})
        v = attrs.get("validation")
        if v is not None and (v.project_id != project.pk or v.role != "validation"):
            raise serializers.ValidationError({"validation": "must be a validation dataset of this project"})
        arch = ARCHITECTURES[attrs["arch"]]
        if arch.task != project.task:
            raise serializers.ValidationError({"arch": f"{arch.name} is a {arch.task} model; this is a {project.task} project"})
        pls, teacher = attrs.get("pseudo_label_set"), attrs.get("teacher")
        attrs["role"] = "student" if pls else "teacher"
        if pls is not None:
            if pls.project_id != project.pk:
                raise serializers.ValidationError({"pseudo_label_set": "must belong to this project"})
            if pls.job.state != Job.SUCCEEDED:
                raise serializers.ValidationError({"pseudo_label_set": f"is still {pls.job.state}; wait until it is written"})
            if not pls.counts.get("images"):
                raise serializers.ValidationError({"pseudo_label_set": "holds no pseudo-labeled image; lower the thresholds"})
            teacher = teacher or pls.run.checkpoint
            attrs["teacher"] = teacher
        if teacher is not None and teacher.project_id != project.pk:
            raise serializers.ValidationError({"teacher": "must belong to this project"})
        if attrs.get("init", "retrain") not in ("retrain", "finetune"):
            raise serializers.ValidationError({"init": "retrain or finetune"})
        if attrs.get("init") == "finetune" and teacher is not None and teacher.arch != attrs["arch"]:
            raise serializers.ValidationError({"init": "fine-tuning needs the teacher's architecture"})
        given = dict(attrs.get("config") or {}) if isinstance(attrs.get("config"), dict) else attrs.get("config")
        auto = isinstance(given, dict) and given.get("iterations", None) in (None, "auto")
        if auto:
            given.pop("iterations", None)
        config = _ml_option(TrainConfig, given, "config").to_dict()
        if auto:
            config["iterations"] = None  # 'auto': the worker sizes it from the data and its device
        attrs["config"] = config
        return attrs


class EvaluationSerializer(ModelSerializer):
    checkpoint = OwnedRelatedField(queryset=ModelCheckpoint.objects.all())
    dataset = OwnedRelatedField(queryset=Dataset.objects.all())
    job = JobSerializer(read_only=True)
    checkpoint_role = serializers.CharField(source="checkpoint.role", read_only=True)

    class Meta:
        model = Evaluation
        fields = ["id", "project", "checkpoint", "checkpoint_role", "dataset", "stats", "job", "created"]
        read_only_fields = ["project", "stats", "created"]

    def validate(self, attrs):
        if attrs["dataset"].project_id != attrs["checkpoint"].project_id:
            raise serializers.ValidationError("the checkpoint and the dataset belong to different projects")
        if attrs["dataset"].role == "unlabeled":
            raise serializers.ValidationError({"dataset": "evaluation needs a labeled or validation set"})
        return attrs


def compact_instances(per_image: list[list[dict]]) -> list[list]:
    """Instances as the review grid draws them: [x, y, w, h, score, category_id(, keypoints(,
    keypoint_scores))], boxes to 0.1 px, scores to 1e-5 (as /scores/), keypoint scores to 0.001.
    One vectorised rounding for a whole page (a page of 100 images x 20 instances is 10,000 numbers)."""
    flat = [d for ens in per_image for d in ens]
    if not flat:
        return [[] for _ in per_image]
    a = np.array([(*d["bbox"], d["score"]) for d in flat], dtype=np.float64)
    boxes, scores = np.round(a[:, :4], 1).tolist(), np.round(a[:, 4], 5).tolist()
    rows = [[*b, s, d["category_id"]] + ([np.round(d["keypoints"], 1).tolist()] if d.get("keypoints") else [])
            + ([np.round(d["keypoint_scores"], 3).tolist()] if d.get("keypoints") and d.get("keypoint_scores") else [])
            for b, s, d in zip(boxes, scores, flat)]
    out, k = [], 0
    for ens in per_image:
        out.append(rows[k:k + len(ens)])
        k += len(ens)
    return out
