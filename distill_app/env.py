"""Typed readers of environment variables that fail with one clear line on a bad value."""
from __future__ import annotations

import os
from urllib.parse import unquote, urlparse

from django.core.exceptions import ImproperlyConfigured

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


def envstr(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def envbool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    v = raw.strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean; use 1/0, true/false, yes/no or on/off")


def envint(name: str, default: int, minimum: int | None = None, maximum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from None
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        raise ImproperlyConfigured(f"{name}={v} must lie between {minimum} and {maximum}")
    return v


def envlist(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [p.strip() for p in raw.split(",") if p.strip()]


# WAL lets the web server read while a worker writes; the timeout rides out short write locks;
# IMMEDIATE transactions take the write lock up front, so two writers queue instead of deadlocking
# (a deferred transaction that upgrades to writing gets "database is locked" at once), and
# distill_app.sqlite_backend makes them queue in line rather than on SQLite's polling back-off.
SQLITE_ENGINE = "distill_app.sqlite_backend"
SQLITE_OPTIONS = {"timeout": 30, "transaction_mode": "IMMEDIATE",
                  "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"}


def database_from_url(url: str) -> dict:
    """postgres://user:pass@host:port/name or sqlite:///path -> a Django DATABASES entry."""
    u = urlparse(url)
    if u.scheme in ("postgres", "postgresql", "pgsql"):
        if not u.path.strip("/"):
            raise ImproperlyConfigured(f"DATABASE_URL {url!r} names no database")
        return {"ENGINE": "django.db.backends.postgresql", "NAME": u.path.lstrip("/"), "USER": unquote(u.username or ""),
                "PASSWORD": unquote(u.password or ""), "HOST": u.hostname or "", "PORT": str(u.port or ""),
                "CONN_MAX_AGE": 60}
    if u.scheme == "sqlite":
        return {"ENGINE": SQLITE_ENGINE, "NAME": u.path or ":memory:", "OPTIONS": SQLITE_OPTIONS}
    raise ImproperlyConfigured(f"DATABASE_URL scheme {u.scheme!r} is not supported; use postgres:// or sqlite://")
