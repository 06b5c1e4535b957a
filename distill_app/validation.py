"""Checks shared by every path that takes input from a client: JSON that cannot crash the parser,
ids that fit the database, thresholds, categories. Each raises ValueError (the API answers 400)
with a message that names the offending field."""
from __future__ import annotations

import json
import math

from rest_framework import serializers as drf_serializers
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from ml_core.schema import KeypointSchema

# The largest id the database stores (a signed 64-bit integer).
MAX_ID = 2 ** 63 - 1
# JSON nested deeper than this is refused: no COCO document or option needs more than a handful.
MAX_JSON_DEPTH = 64


class InputError(ValueError):
    """Bad client input; the message names the field."""


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number (NaN and Infinity are not allowed)")


def _check_depth(value, limit: int = MAX_JSON_DEPTH):
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                raise InputError(f"JSON nested deeper than {limit} levels")
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))


def _check_finite(value):
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            raise InputError("a number is too large (JSON numbers must be finite)")
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def check_json_value(value, what: str = "JSON"):
    """Refuse what the standard parser lets through but nothing downstream should see: nesting
    deeper than MAX_JSON_DEPTH and numbers that overflow to infinity (1e999)."""
    try:
        _check_depth(value)
        _check_finite(value)
    except InputError as e:
        raise InputError(f"{what}: {e}") from None
    return value


def loads(raw: bytes | str, what: str = "JSON"):
    """json.loads that answers every bad document with InputError (never RecursionError, never NaN)."""
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise InputError(f"{what} is nested too deeply") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{what} is not valid UTF-8 ({e})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{what} is not valid JSON ({e})") from None
    except ValueError as e:
        raise InputError(f"{what} is not valid JSON ({e})") from None
    return check_json_value(value, what)


def is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ID


def parse_id(value, field: str) -> int:
    """An object id from a query parameter or a form field: a non-negative integer that fits 64 bits."""
    if isinstance(value, bool):
        raise InputError(f"{field} must be an integer id")
    if isinstance(value, str):
        s = value.strip()
        if not (s.isascii() and s.isdigit()) or len(s) > 19:
            raise InputError(f"{field} must be an integer id, got {value[:40]!r}")
        value = int(s)
    if not is_id(value):
        raise InputError(f"{field} must be an integer id between 0 and {MAX_ID}")
    return value


def id_filters(qs, params, fields):
    """Filter a queryset by the integer-id query parameters present in `params`."""
    for f in fields:
        if params.get(f):
            qs = qs.filter(**{f: parse_id(params[f], f)})
    return qs


def _threshold(v, what: str) -> float:
    if isinstance(v, bool) or v is None or not isinstance(v, (int, float, str)):
        raise InputError(f"{what} must be a number in [0, 1], got {json.dumps(v)[:40]}")
    try:
        t = float(v)
    except (ValueError, OverflowError):
        raise InputError(f"{what} must be a number in [0, 1], got {str(v)[:40]!r}") from None
    if not 0.0 <= t <= 1.0:  # also refuses NaN
        raise InputError(f"{what} must lie in [0, 1], got {str(v)[:40]}")
    return t


_ABSENT = object()


def parse_thresholds(thresholds=None, *, default=_ABSENT, field: str = "thresholds",
                     default_field: str = "threshold", fallback: float = 0.5) -> dict:
    """Per-class thresholds from any client: a number, a JSON object, or that object as a JSON
    string (form fields, query parameters), plus an optional global threshold `default` that wins
    over the object's own "default"; `fallback` when neither gives one.

    Returns {'default': t, '<category id>': t}; raises InputError naming the field."""
    if isinstance(thresholds, str):
        thresholds = loads(thresholds, field) if thresholds.strip() else None
    if thresholds is None:
        thresholds = {}
    elif isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool):
        thresholds = {"default": thresholds}
    if not isinstance(thresholds, dict):
        raise InputError(f'{field} must be a JSON object like {{"default": 0.5, "1": 0.7}}')
    checked = {"default": fallback}
    for k, v in thresholds.items():
        if k != "default":
            ks = str(k).strip()
            if not (ks.isascii() and ks.isdigit() and len(ks) <= 19):
                raise InputError(f"{field}: key {str(k)[:40]!r} is not a category id")
            k = str(int(ks))
        checked[k] = _threshold(v, f"{field}[{k!r}]")
    if default is not _ABSENT:
        checked["default"] = _threshold(default, default_field)
    from .selection_apply import thresholds_by_category  # imports the models: not at parser-loading time
    try:
        return thresholds_by_category(checked)
    except (ValueError, TypeError) as e:
        raise InputError(f"{field}: {e}") from None


def _bad_cat(i, msg):
    raise InputError(f"categories[{i}]: {msg}")


def check_categories(categories, field: str = "categories") -> list[dict]:
    """The one check of a category list, wherever categories come from (the project form, a COCO
    file, a COCO body, a zip): a list of {id: int, name: non-empty string}, unique ids, and for
    keypoint categories a valid keypoint schema."""
    if not isinstance(categories, list):
        raise InputError(f"{field} must be a list of {{id, name}}")
    seen = set()
    for i, c in enumerate(categories):
        if not isinstance(c, dict):
            _bad_cat(i, "must be an object with an id and a name")
        if not is_id(c.get("id")) or c["id"] > 2 ** 31 - 1:
            _bad_cat(i, f"id must be a non-negative integer, got {json.dumps(c.get('id'))[:40]}")
        if not isinstance(c.get("name"), str) or not c["name"].strip():
            _bad_cat(i, "needs a non-empty string name")
        if c["id"] in seen:
            _bad_cat(i, f"duplicate id {c['id']}")
        seen.add(c["id"])
        kps = c.get("keypoints")
        if kps is None or kps == []:
            continue
        if not isinstance(kps, list) or not all(isinstance(n, str) and n for n in kps):
            _bad_cat(i, "keypoints must be a list of keypoint names")
        sk = c.get("skeleton", [])
        if not isinstance(sk, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(is_id(j) and 1 <= j <= len(kps) for j in p) for p in sk):
            _bad_cat(i, f"skeleton must be a list of [a, b] keypoint pairs numbered 1..{len(kps)}")
        fm = c.get("flip_map")
        if fm is not None and (not isinstance(fm, list) or not all(is_id(j) for j in fm)):
            _bad_cat(i, "flip_map must be a list of keypoint indices")
        sg = c.get("sigmas")
        if sg is not None and (not isinstance(sg, list) or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0 for s in sg)):
            _bad_cat(i, "sigmas must be a list of positive numbers")
        try:
            KeypointSchema.from_coco_category(c)
        except (ValueError, TypeError) as e:
            _bad_cat(i, str(e))
    return categories


class SafeJSONParser(JSONParser):
    """DRF's JSON parser, answering 400 (not 500) for nesting that overflows the parser's stack
    and refusing nesting deeper than MAX_JSON_DEPTH and numbers that overflow to infinity."""

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - the body is nested too deeply") from None
        try:
            return check_json_value(data, "JSON body")
        except InputError as e:
            raise ParseError(str(e)) from None


class SafeJSONField(drf_serializers.JSONField):
    """A JSON field whose form-field strings go through `loads` and whose values are checked
    like request bodies."""

    def to_internal_value(self, data):
        if getattr(data, "is_json_string", False) or self.binary:
            if isinstance(data, bytes):
                data = data.decode(errors="replace")
            try:
                return loads(data, self.field_name or "JSON")
            except InputError as e:
                raise drf_serializers.ValidationError(str(e)) from None
        data = super().to_internal_value(data)
        try:
            return check_json_value(data, self.field_name or "JSON")
        except InputError as e:
            raise drf_serializers.ValidationError(str(e)) from None
