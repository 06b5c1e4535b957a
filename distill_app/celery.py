"""The Celery application. Queues: gpu (training, multi-transform inference, evaluation) and cpu
(ingest, statistics, pseudo-label sets, export)."""
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "distill_app.settings")

app = Celery("distill")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["distill_app"])

# Signal handlers: every worker announces itself and looks for lost work (distill_app.workers).
from . import workers  # noqa: E402,F401
