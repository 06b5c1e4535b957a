"""What a data-distillation project stores. Raw predictions are never edited: reviews live apart."""
from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.db import models, transaction
from django.db.models.signals import post_delete
from django.dispatch import receiver
from django.utils import timezone


class Project(models.Model):
    TASKS = [("detection", "Object detection"), ("keypoints", "Keypoint detection")]
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="projects")
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    task = models.CharField(max_length=16, choices=TASKS, default="detection")
    # COCO categories: [{"id", "name", "keypoints"?, "skeleton"?, "flip_map"?}]
    categories = models.JSONField(default=list, blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created"]

    def __str__(self):
        return self.name

    @property
    def folder(self) -> Path:
        return Path(settings.MEDIA_ROOT) / "projects" / str(self.pk)


class Dataset(models.Model):
    ROLES = [("labeled", "Labeled"), ("unlabeled", "Unlabeled"), ("validation", "Validation")]
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="datasets")
    name = models.CharField(max_length=200)
    role = models.CharField(max_length=16, choices=ROLES)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created"]

    @property
    def folder(self) -> Path:
        return self.project.folder / "datasets" / str(self.pk)


class Image(models.Model):
    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="images")
    file = models.CharField(max_length=500, help_text="path under MEDIA_ROOT")
    thumbnail = models.CharField(max_length=500, blank=True)
    file_name = models.CharField(max_length=500, help_text="the name it was uploaded with")
    sha256 = models.CharField(max_length=64)
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [models.UniqueConstraint(fields=["dataset", "sha256"], name="image_unique_content")]

    @property
    def path(self) -> Path:
        return Path(settings.MEDIA_ROOT) / self.file

    @property
    def original_path(self) -> Path | None:
        """The uploaded bytes, kept when ingest converted them to the 8-bit RGB working copy
        (`file`); None when `file` is the upload itself."""
        found = sorted((self.path.parent.parent / "originals").glob(f"{self.sha256[:24]}.*"))
        return found[0] if found else None

    def owned_files(self) -> list[Path]:
        paths = [self.path] + ([Path(settings.MEDIA_ROOT) / self.thumbnail] if self.thumbnail else [])
        return paths + ([self.original_path] if self.original_path else [])


@receiver(post_delete, sender=Image)
def _remove_image_files(sender, instance: Image, using, **kwargs):
    """An image's files go with its row, once the deletion is committed (unless the same content
    was uploaded again into the dataset meanwhile: it has the same paths)."""
    paths, dataset_id, digest = instance.owned_files(), instance.dataset_id, instance.sha256

    def remove():
        if Image.objects.filter(dataset_id=dataset_id, sha256=digest).exists():
            return
        for path in paths:
            path.unlink(missing_ok=True)
    transaction.on_commit(remove, using=using)


class Annotation(models.Model):
    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="annotations")
    category_id = models.IntegerField()
    bbox = models.JSONField()  # [x, y, w, h]
    keypoints = models.JSONField(null=True, blank=True)
    iscrowd = models.BooleanField(default=False)

    class Meta:
        ordering = ["id"]


class Job(models.Model):
    """One unit of background work, with its own state (saleor's JobStatus)."""

    QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
    STATES = [(s, s) for s in (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)]
    FINAL = (SUCCEEDED, FAILED, CANCELLED)
    KINDS = [(k, k) for k in ("ingest", "train", "infer", "evaluate", "pseudo_labels", "export", "ping")]
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="jobs", null=True, blank=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="jobs")
    kind = models.CharField(max_length=16, choices=KINDS)
    state = models.CharField(max_length=16, choices=STATES, default=QUEUED)
    progress = models.FloatField(default=0.0)
    message = models.CharField(max_length=500, blank=True)
    error = models.TextField(blank=True)
    result = models.JSONField(default=dict, blank=True)
    cancel_requested = models.BooleanField(default=False)
    worker = models.CharField(max_length=200, blank=True)
    heartbeat = models.DateTimeField(null=True, blank=True)
    created = models.DateTimeField(auto_now_add=True)
    started = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True)
    # Every retry is a new attempt; every message of the job carries its attempt, so the messages
    # of an earlier attempt (a cancelled chord's leftover chunks) do nothing (jobs.acquire).
    attempt = models.PositiveIntegerField(default=1)
    # Set when a fault, not the work, ended the job (jobs.FAULTS): its worker vanished, its worker
    # process died, or the broker was lost. A holder that still lives takes such a job back.
    fault = models.CharField(max_length=16, blank=True)
    # When its messages were last handed to the broker (None: not yet); the reaper re-sends
    # what the broker lost.
    dispatched = models.DateTimeField(null=True, blank=True)
    # What sending it again needs beyond the object that owns it (ingest: the zip's path).
    params = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-created"]

    @property
    def is_final(self) -> bool:
        return self.state in self.FINAL

    def beat(self, **fields):
        """Progress of this attempt; a holder whose attempt was superseded (retried) writes nothing."""
        fields["heartbeat"] = timezone.now()
        Job.objects.filter(pk=self.pk, attempt=self.attempt).update(**fields)
        for k, v in fields.items():
            setattr(self, k, v)


class JobLease(models.Model):
    """Who runs a part of a job now ("" the whole job, "chunk-3", "finalize"): one holder at a
    time, renewed by the holder's heartbeat; another copy of the message stops at once while the
    holder lives (jobs.acquire). The row stays after release as the record of the last holder."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="leases")
    part = models.CharField(max_length=32, blank=True)
    attempt = models.PositiveIntegerField()
    owner = models.CharField(max_length=64, help_text="one execution of one message")
    worker = models.CharField(max_length=200, help_text="host:pid of the process that runs it")
    host = models.CharField(max_length=200)  # machine and PID namespace (jobs.SPACE): where pid means it
    pid = models.IntegerField()
    node = models.CharField(max_length=200, blank=True, help_text="WorkerHeartbeat.name of its worker")
    expires = models.DateTimeField()
    released = models.BooleanField(default=False)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["job", "part"], name="one_lease_per_job_part")]


class WorkerHeartbeat(models.Model):
    """A Celery worker announcing itself (a thread of its main process, distill_app.workers):
    alive until `expires`, and whether it reaches the broker."""

    name = models.CharField(max_length=200, unique=True, help_text="node name:main pid")
    node = models.CharField(max_length=200)
    host = models.CharField(max_length=200)
    pid = models.IntegerField()
    queues = models.CharField(max_length=100, blank=True)
    started = models.DateTimeField()
    seen = models.DateTimeField()
    expires = models.DateTimeField()
    broker_ok = models.BooleanField(default=True)
    broker_down_since = models.DateTimeField(null=True, blank=True)
    broker_error = models.CharField(max_length=300, blank=True)

    class Meta:
        ordering = ["name"]


class ModelCheckpoint(models.Model):
    ROLES = [("teacher", "Teacher"), ("student", "Student")]
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="checkpoints")
    name = models.CharField(max_length=200)
    role = models.CharField(max_length=16, choices=ROLES)
    arch = models.CharField(max_length=64)
    file = models.CharField(max_length=500, help_text="path under MEDIA_ROOT")
    meta = models.JSONField(default=dict, blank=True)
    training_run = models.ForeignKey("TrainingRun", on_delete=models.SET_NULL, null=True, blank=True,
                                     related_name="checkpoints")
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created"]

    @property
    def path(self) -> Path:
        return Path(settings.MEDIA_ROOT) / self.file


class InferenceRun(models.Model):
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="inference_runs")
    checkpoint = models.ForeignKey(ModelCheckpoint, on_delete=models.PROTECT, related_name="inference_runs")
    # model ensembling: a second model whose views join the same ensemble (a round's student with
    # the model that taught it, as ml_core.pipeline's rounds can)
    ensemble_with = models.ForeignKey(ModelCheckpoint, on_delete=models.PROTECT, null=True, blank=True,
                                      related_name="ensembled_in")
    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="inference_runs")
    validation = models.ForeignKey(Dataset, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    transforms = models.JSONField(default=dict)  # ml_core TransformSet.to_dict()
    options = models.JSONField(default=dict, blank=True)  # ml_core EnsembleOptions
    job = models.OneToOneField(Job, on_delete=models.PROTECT, related_name="inference_run")
    chunks_total = models.PositiveIntegerField(default=0)
    chunk_size = models.PositiveIntegerField(default=64)
    view_names = models.JSONField(default=list, blank=True)
    auto_threshold = models.FloatField(null=True, blank=True)
    labeled_per_image = models.FloatField(null=True, blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created"]

    @property
    def folder(self) -> Path:
        return self.project.folder / "inference" / str(self.pk)


class Prediction(models.Model):
    """The predictions of one run on one image: ensembled and every single view.

    One row per image (not per instance) keeps a 100,000-image run at 100,000 rows; the columns
    the review screen sorts and filters by are real, indexed columns.
    """

    run = models.ForeignKey(InferenceRun, on_delete=models.CASCADE, related_name="predictions")
    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="predictions")
    chunk = models.PositiveIntegerField()
    validation = models.BooleanField(default=False, help_text="an image of the validation set (statistics only)")
    agreement = models.FloatField()
    max_score = models.FloatField()
    num_instances = models.PositiveIntegerField()
    class_mask = models.BigIntegerField(default=0, help_text="bit i set: some instance of the i-th category")
    ensembled = models.JSONField(default=list)  # [{"bbox", "score", "category_id", "keypoints"?}]
    views = models.JSONField(default=dict)  # {"s400": [...], "s400-flip": [...]}
    error = models.CharField(max_length=500, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["run", "image"], name="one_prediction_per_image")]
        # the review screen's orderings, without a join to Image; id is the orderings' tie-break, so
        # PostgreSQL pages by an index-only walk instead of sorting the whole run (SQLite has it as rowid)
        indexes = [models.Index(fields=["run", "validation", "agreement", "id"]), models.Index(fields=["run", "chunk"]),
                   models.Index(fields=["run", "validation", "max_score", "id"]),
                   models.Index(fields=["run", "validation", "image"])]


class Review(models.Model):
    """A reviewer's verdict on one image of a run. `instances` replaces the ensembled list when
    the state is 'edited'; `history` keeps every earlier version so each change can be undone."""

    STATES = [("accepted", "accepted"), ("rejected", "rejected"), ("edited", "edited")]
    run = models.ForeignKey(InferenceRun, on_delete=models.CASCADE, related_name="reviews")
    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="reviews")
    state = models.CharField(max_length=16, choices=STATES)
    instances = models.JSONField(null=True, blank=True)
    history = models.JSONField(default=list, blank=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["run", "image"], name="one_review_per_image")]


class PseudoLabelSet(models.Model):
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="pseudo_label_sets")
    run = models.ForeignKey(InferenceRun, on_delete=models.PROTECT, related_name="pseudo_label_sets")
    thresholds = models.JSONField()  # {"default": t, "<category_id>": t, ...}
    apply_reviews = models.BooleanField(default=True)
    include_unreviewed = models.BooleanField(default=True)
    # keypoints scored below it are left unlabeled: "auto" (as many per instance as the labeled set
    # annotates), null (keep every keypoint) or a heatmap score
    keypoint_threshold = models.JSONField(null=True, blank=True, default="auto")
    file = models.CharField(max_length=500, blank=True)
    counts = models.JSONField(default=dict, blank=True)
    job = models.OneToOneField(Job, on_delete=models.PROTECT, related_name="pseudo_label_set")
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created"]

    @property
    def path(self) -> Path:
        return Path(settings.MEDIA_ROOT) / self.file


class TrainingRun(models.Model):
    ROLES = ModelCheckpoint.ROLES
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="training_runs")
    role = models.CharField(max_length=16, choices=ROLES)
    arch = models.CharField(max_length=64)
    config = models.JSONField(default=dict)  # ml_core TrainConfig
    labeled = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="+")
    validation = models.ForeignKey(Dataset, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    pseudo_label_set = models.ForeignKey(PseudoLabelSet, on_delete=models.PROTECT, null=True, blank=True,
                                         related_name="training_runs")
    teacher = models.ForeignKey(ModelCheckpoint, on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    init = models.CharField(max_length=16, default="retrain")
    min_size = models.PositiveIntegerField(null=True, blank=True)
    history = models.JSONField(default=list, blank=True)
    job = models.OneToOneField(Job, on_delete=models.PROTECT, related_name="training_run")
    request_key = models.CharField(max_length=64, blank=True, help_text="client key that makes a launch idempotent")
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created"]
        constraints = [models.UniqueConstraint(fields=["project", "request_key"], condition=~models.Q(request_key=""),
                                               name="one_run_per_request_key")]

    @property
    def folder(self) -> Path:
        return self.project.folder / "training" / str(self.pk)


class Evaluation(models.Model):
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="evaluations")
    checkpoint = models.ForeignKey(ModelCheckpoint, on_delete=models.CASCADE, related_name="evaluations")
    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="evaluations")
    stats = models.JSONField(default=dict, blank=True)  # {"bbox": {...}, "keypoints": {...}}
    job = models.OneToOneField(Job, on_delete=models.PROTECT, related_name="evaluation")
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created"]
