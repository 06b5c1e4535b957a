"""Logging in: the API token route and the login form, both refusing to guess passwords forever.

Failed logins are counted in Django's cache per (client address, username) and per client address;
past the limit, every login from there is refused (even with the right password) until the window
has passed: 429 with a JSON `message` and Retry-After for the API, a message on the form. A
successful login clears the (address, username) count. With several web processes, point the cache
at Redis (DISTILL_CACHE_URL) so that they share the counts.
"""
from __future__ import annotations

import hashlib
import time

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.core.cache import cache
from rest_framework import serializers
from rest_framework.authtoken.models import Token
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.exceptions import Throttled
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.response import Response

from .validation import SafeJSONParser


def _client(request) -> str:
    # Behind a proxy every client has the proxy's address; the proxy then has to limit logins
    # itself (or set DISTILL_LOGIN_FAILURES higher). X-Forwarded-For is not trusted: clients set it.
    return request.META.get("REMOTE_ADDR") or "unknown"


def _keys(request, username: str) -> list[tuple[str, int]]:
    ip = _client(request)
    user = hashlib.sha256(username.strip().lower().encode("utf-8", "replace")).hexdigest()[:32]
    return [(f"distill:login-fail:{ip}:{user}", settings.DISTILL_LOGIN_FAILURES),
            (f"distill:login-fail:{ip}", settings.DISTILL_LOGIN_FAILURES_PER_ADDRESS)]


def retry_after(request, username: str) -> int | None:
    """Seconds until logins from this client for this username are taken again, or None."""
    now = time.time()
    for key, limit in _keys(request, username):
        entry = cache.get(key)
        if entry and entry["n"] >= limit and entry["until"] > now:
            return max(1, int(entry["until"] - now))
    return None


def record_failure(request, username: str):
    now, window = time.time(), settings.DISTILL_LOGIN_WINDOW_SECONDS
    for key, _ in _keys(request, username):
        entry = cache.get(key)
        if not entry or entry["until"] <= now:
            entry = {"n": 0, "until": now + window}
        entry["n"] += 1
        cache.set(key, entry, timeout=int(entry["until"] - now) + 1)


def record_success(request, username: str):
    cache.delete(_keys(request, username)[0][0])


def locked_message(wait: int) -> str:
    return f"too many failed logins; try again in {wait} s"


class ObtainTokenView(ObtainAuthToken):
    """POST username and password, get the API token. Wrong passwords are counted (see above)."""

    parser_classes = [SafeJSONParser, FormParser, MultiPartParser]

    def post(self, request, *args, **kwargs):
        raw = request.data.get("username", "") if hasattr(request.data, "get") else ""
        username = raw if isinstance(raw, str) else ""
        wait = retry_after(request, username)
        if wait:
            raise Throttled(wait, detail=locked_message(wait))
        ser = self.get_serializer(data=request.data if hasattr(request.data, "get") else {})
        if not ser.is_valid():
            record_failure(request, username)
            raise serializers.ValidationError(ser.errors)
        record_success(request, username)
        token, _ = Token.objects.get_or_create(user=ser.validated_data["user"])
        return Response({"token": token.key})


class LoginView(auth_views.LoginView):
    template_name = "distill/login.html"

    def post(self, request, *args, **kwargs):
        username = request.POST.get("username", "")
        wait = retry_after(request, username)
        if wait:
            form = self.get_form()
            return self.render_to_response(self.get_context_data(form=form, locked_message=locked_message(wait)),
                                           status=429)
        return super().post(request, *args, **kwargs)

    def form_invalid(self, form):
        record_failure(self.request, self.request.POST.get("username", ""))
        return super().form_invalid(form)

    def form_valid(self, form):
        record_success(self.request, self.request.POST.get("username", ""))
        return super().form_valid(form)
