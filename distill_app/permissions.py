"""Ownership: every object belongs to a project, and a project to its owner. Querysets are filtered
by owner, so another user's objects are simply not found (404), never listed or changed."""
from __future__ import annotations

from rest_framework import serializers


def owned(queryset, user, path: str = "project__owner"):
    if not user or not user.is_authenticated:
        return queryset.none()
    return queryset.filter(**{path: user})


class OwnedRelatedField(serializers.PrimaryKeyRelatedField):
    """A primary key that must name an object of the requesting user's own projects."""

    def __init__(self, owner_path: str = "project__owner", **kw):
        self.owner_path = owner_path
        super().__init__(**kw)

    def get_queryset(self):
        request = self.context.get("request")
        return owned(super().get_queryset(), request.user if request else None, self.owner_path)
