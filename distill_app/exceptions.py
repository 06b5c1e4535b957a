"""API errors: every error is a JSON body with a `message` (and DRF's field details where useful)."""
from __future__ import annotations

from django.conf import settings
from django.core.exceptions import (BadRequest, PermissionDenied, RequestDataTooBig, SuspiciousOperation,
                                    TooManyFieldsSent, TooManyFilesSent)
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import ProtectedError, RestrictedError
from django.http import Http404, JsonResponse
from django.views import defaults
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


class Unavailable(APIException):
    """A service the request needs (the job queue) is down: nothing was done; try again later."""
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "a service this needs is unavailable; try again in a moment"
    default_code = "unavailable"


class TooLarge(APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "the request is too large"
    default_code = "too_large"


def request_limit_message(exc) -> str:
    """What a client should hear when Django refuses a request before any view sees it."""
    if isinstance(exc, TooManyFilesSent):
        return (f"too many files in one upload: at most {settings.DATA_UPLOAD_MAX_NUMBER_FILES:,} "
                "(DISTILL_MAX_FILES_PER_UPLOAD); send them in several requests")
    if isinstance(exc, TooManyFieldsSent):
        return f"too many form fields: at most {settings.DATA_UPLOAD_MAX_NUMBER_FIELDS:,}"
    if isinstance(exc, RequestDataTooBig):
        return (f"the request body is above the limit of {settings.DATA_UPLOAD_MAX_MEMORY_SIZE:,} bytes "
                "(files sent as multipart fields are not counted)")
    return "bad request"


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
    if isinstance(exc, RequestDataTooBig):
        exc = TooLarge(request_limit_message(exc))
    elif isinstance(exc, (SuspiciousOperation, BadRequest)):
        exc = BadInput(request_limit_message(exc))
    elif isinstance(exc, (ProtectedError, RestrictedError)):
        users = exc.protected_objects if isinstance(exc, ProtectedError) else exc.restricted_objects
        kinds = sorted({str(o._meta.verbose_name_plural) for o in users})
        exc = Conflict(f"other objects still use this ({', '.join(kinds)}); delete them first")
    elif isinstance(exc, (OverflowError, RecursionError)):
        # Backstops: every id and JSON value is checked where it is taken (validation.py); these
        # keep anything missed a 400.
        exc = BadInput("a number is out of range" if isinstance(exc, OverflowError) else "input nested too deeply")
    elif isinstance(exc, (IngestError, CocoFormatError)):
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


# --- Django-level errors (before or outside DRF's views): JSON under /api/, Django's pages elsewhere.

def _is_api(request) -> bool:
    return request.path.startswith("/api/")


def bad_request(request, exception=None, template_name="400.html"):
    if _is_api(request):
        code = 413 if isinstance(exception, RequestDataTooBig) else 400
        return JsonResponse({"message": request_limit_message(exception)}, status=code)
    return defaults.bad_request(request, exception, template_name)


def permission_denied(request, exception=None, template_name="403.html"):
    if _is_api(request):
        return JsonResponse({"message": "you do not have permission to do this"}, status=403)
    return defaults.permission_denied(request, exception, template_name)


def page_not_found(request, exception=None, template_name="404.html"):
    if _is_api(request):
        return JsonResponse({"message": f"no such route: {request.path[:200]}"}, status=404)
    return defaults.page_not_found(request, exception, template_name)


def server_error(request, template_name="500.html"):
    if _is_api(request):
        return JsonResponse({"message": "internal server error; the server log has the details"}, status=500)
    return defaults.server_error(request, template_name)
