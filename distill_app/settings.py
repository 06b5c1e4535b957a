"""Django settings. Defaults are the embedded setup (SQLite and media under DISTILL_DATA_DIR, a
local Redis, 127.0.0.1, DEBUG off); the environment gives production. See README, Configuration."""
from __future__ import annotations

import os
import secrets
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from .env import SQLITE_ENGINE, SQLITE_OPTIONS, database_from_url, envbool, envint, envlist, envstr

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(envstr("DISTILL_DATA_DIR", str(BASE_DIR / "var"))).resolve()

DEBUG = envbool("DISTILL_DEBUG", False)


def _secret_key() -> str:
    key = envstr("DISTILL_SECRET_KEY")
    if key:
        return key
    # Embedded setup: one random key per data directory, kept so sessions survive restarts.
    path = DATA_DIR / "secret_key"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_urlsafe(50))
            path.chmod(0o600)
        return path.read_text().strip()
    except OSError as e:
        raise ImproperlyConfigured(f"data directory {DATA_DIR} is not writable ({e.strerror}); "
                                   "set DISTILL_DATA_DIR to a folder you can write") from None


SECRET_KEY = _secret_key()
ALLOWED_HOSTS = envlist("DISTILL_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "testserver"])
CSRF_TRUSTED_ORIGINS = envlist("DISTILL_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "distill_app",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "distill_app.urls"
WSGI_APPLICATION = "distill_app.wsgi.application"
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "DIRS": [BASE_DIR / "frontend" / "templates"],
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]

if envstr("DATABASE_URL"):
    DATABASES = {"default": database_from_url(envstr("DATABASE_URL"))}
else:
    DATABASES = {"default": {"ENGINE": SQLITE_ENGINE, "NAME": str(DATA_DIR / "distill.sqlite3"),
                             "OPTIONS": SQLITE_OPTIONS}}
if DATABASES["default"]["ENGINE"] == SQLITE_ENGINE:
    # A file, not memory, so that the Celery worker of the integration tests sees the same data.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test.sqlite3")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [{"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"}]
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = DATA_DIR / "static"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
STATICFILES_DIRS = [BASE_DIR / "frontend" / "static"]
MEDIA_ROOT = Path(envstr("DISTILL_MEDIA_DIR", str(DATA_DIR / "media"))).resolve()
WHITENOISE_USE_FINDERS = True

# Uploads: large files stream to disk; these limits keep one request from exhausting memory.
DATA_UPLOAD_MAX_MEMORY_SIZE = 64 * 1024 * 1024
FILE_UPLOAD_MAX_MEMORY_SIZE = 8 * 1024 * 1024
DATA_UPLOAD_MAX_NUMBER_FILES = envint("DISTILL_MAX_FILES_PER_UPLOAD", 1000, 1)
DISTILL_MAX_IMAGE_PIXELS = envint("DISTILL_MAX_IMAGE_PIXELS", 40_000_000, 1)
DISTILL_MAX_IMAGE_BYTES = envint("DISTILL_MAX_IMAGE_BYTES", 50 * 1024 * 1024, 1)
DISTILL_MAX_ZIP_BYTES = envint("DISTILL_MAX_ZIP_BYTES", 4 * 1024 ** 3, 1)
DISTILL_MAX_ZIP_UNCOMPRESSED = envint("DISTILL_MAX_ZIP_UNCOMPRESSED", 20 * 1024 ** 3, 1)
DISTILL_MAX_COCO_BYTES = envint("DISTILL_MAX_COCO_BYTES", 512 * 1024 * 1024, 1)
DISTILL_INFERENCE_CHUNK = envint("DISTILL_INFERENCE_CHUNK", 64, 1)
DISTILL_DEVICE = envstr("DISTILL_DEVICE", "")  # "", cpu, cuda, cuda:1
# A job's holder renews its lease every fifth of this; a job whose worker stopped announcing itself
# for this long is failed with that reason, and lost queued work is sent again (jobs.py).
DISTILL_JOB_STALE_SECONDS = envint("DISTILL_JOB_STALE_SECONDS", 30, 5)
# Whether this process's Celery worker looks for lost work (every worker does by default).
DISTILL_WORKER_REAPER = envbool("DISTILL_WORKER_REAPER", True)

# Logins (API token and form): failed attempts per (client address, username) and per address
# within the window; past either limit the client waits out the window (HTTP 429).
DISTILL_LOGIN_FAILURES = envint("DISTILL_LOGIN_FAILURES", 10, 1)
DISTILL_LOGIN_FAILURES_PER_ADDRESS = envint("DISTILL_LOGIN_FAILURES_PER_ADDRESS", 50, 1)
DISTILL_LOGIN_WINDOW_SECONDS = envint("DISTILL_LOGIN_WINDOW_SECONDS", 900, 1)
# The failure counts live in this cache: per process by default; DISTILL_CACHE_URL=redis://... makes
# several web processes (gunicorn workers) share them.
if envstr("DISTILL_CACHE_URL"):
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                          "LOCATION": envstr("DISTILL_CACHE_URL")}}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "distill_app.pagination.Pagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "distill_app.exceptions.handler",
    # JSON nested too deeply or holding 1e999 is a 400, not a crash (validation.SafeJSONParser).
    "DEFAULT_PARSER_CLASSES": ["distill_app.validation.SafeJSONParser", "rest_framework.parsers.FormParser",
                               "rest_framework.parsers.MultiPartParser"],
    "DEFAULT_THROTTLE_RATES": {},
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Distill API",
    "DESCRIPTION": "Data distillation: datasets, teachers, multi-transform pseudo-labels, review, students.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    # Swagger UI from the drf-spectacular-sidecar package: the docs page works offline.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
}

# --- Celery -----------------------------------------------------------------------------------
REDIS_URL = envstr("REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_BROKER_URL = envstr("CELERY_BROKER_URL", REDIS_URL)
CELERY_RESULT_BACKEND = envstr("CELERY_RESULT_BACKEND", REDIS_URL)
CELERY_TASK_ALWAYS_EAGER = envbool("DISTILL_TASKS_EAGER", False)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "cpu"
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": envint("DISTILL_VISIBILITY_TIMEOUT", 3600 * 6, 60),
                                   "socket_connect_timeout": 2}
# A broker that is down fails a publish within about a second (the API answers 503), not after 20.
CELERY_BROKER_CONNECTION_TIMEOUT = 2
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_ROUTES = {
    "distill_app.tasks.train_model": {"queue": "gpu"},
    "distill_app.tasks.infer_chunk": {"queue": "gpu"},
    "distill_app.tasks.evaluate_checkpoint": {"queue": "gpu"},
    "distill_app.tasks.*": {"queue": "cpu"},
}
DISTILL_QUEUES = envlist("DISTILL_QUEUES", ["gpu", "cpu"])
if not set(DISTILL_QUEUES) <= {"gpu", "cpu"}:
    raise ImproperlyConfigured(f"DISTILL_QUEUES={','.join(DISTILL_QUEUES)!r}: queues are gpu and cpu")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("DISTILL_LOG_LEVEL", "WARNING")},
}
