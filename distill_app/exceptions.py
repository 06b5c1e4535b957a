"""API errors: every error is a JSON body with a `message` (and DRF's field details where useful)."""
from __future__ import annotations

from django.core.exceptions import PermissionDenied, ValidationError as DjangoValidationError
from django.http import Http404
from rest_framework import status
from rest_framework.exceptions import APIException
from rest_framework.response import Response
from rest_framework.views import exception_handler

from ml_core.data import CocoFormatError

from .ingest import IngestError


class Conflict(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "the object is not in a state that allows this"
    default_code = "conflict"


class BadInput(APIException):
    status_code = status.HTTP_400_BAD_REQUEST
    default_detail = "bad input"
    default_code = "bad_input"


def _message(detail) -> str:
    if isinstance(detail, dict):
        parts = []
        for k, v in detail.items():
            text = _message(v)
            parts.append(text if k in ("detail", "non_field_errors") else f"{k}: {text}")
        return "; ".join(parts)
    if isinstance(detail, list):
        return "; ".join(_message(v) for v in detail)
    return str(detail)


def handler(exc, context):
    # ml_core and ingestion raise ValueError for bad options and inputs: a 400 with their message.
    if isinstance(exc, (IngestError, CocoFormatError)):
        exc = BadInput(str(exc))
    elif isinstance(exc, DjangoValidationError):
        exc = BadInput("; ".join(exc.messages))
    elif isinstance(exc, ValueError) and not isinstance(exc, (Http404, PermissionDenied)):
        exc = BadInput(str(exc))
    response = exception_handler(exc, context)
    if response is None:
        return None
    data = response.data
    body = {"message": _message(data)}
    if isinstance(data, dict) and set(data) - {"detail"}:
        body["errors"] = data
    response.data = body
    return response


def error(message: str, code: int = 400) -> Response:
    return Response({"message": message}, status=code)
