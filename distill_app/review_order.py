"""The review grid's orderings of a finished run, kept as arrays of prediction ids.

Without them a page deep into a big run, in agreement or score order, is an OFFSET walk over an
index that grows with the run (the database steps over every row before the page). `build` runs
once when the run finishes and writes each ordering's ids beside the run (order.npz); from then on
any page of the unfiltered grid is a slice of an array plus a primary-key lookup of its rows. The
rows it orders never change after that: reviews live in their own table. Filtered pages still ask
the database.
"""
from __future__ import annotations

import functools
import os

import numpy as np

from .models import InferenceRun, Prediction

# the same orderings as the predictions endpoint's, ties broken by id as there
COLUMNS = ("image_id", "agreement", "max_score")
KEYS = {"image": "image_id", "agreement": "agreement", "max_score": "max_score"}


def _path(run: InferenceRun):
    return run.folder / "order.npz"


def build(run: InferenceRun) -> int:
    """Sort the run's (unlabeled-set) predictions in every ordering; returns how many there are."""
    rows = Prediction.objects.filter(run=run, validation=False).values_list("id", *COLUMNS)
    table = np.array(list(rows.iterator(chunk_size=20_000)), dtype=np.float64).reshape(-1, 1 + len(COLUMNS))
    ids = table[:, 0].astype(np.int64)
    order = {name: ids[np.lexsort((ids, table[:, 1 + j]))] for j, name in enumerate(COLUMNS)}
    path = _path(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(str(path) + ".tmp.npz", **order)
    os.replace(str(path) + ".tmp.npz", path)
    return len(ids)


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime: float) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


class OrderedIds:
    """What the paginator pages through: a run's ids in one ordering; any slice costs the page."""

    def __init__(self, ids: np.ndarray):
        self.ids = ids

    def count(self) -> int:
        return len(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k):
        return self.ids[k].tolist()


def ordered_ids(run: InferenceRun, ordering: str) -> OrderedIds | None:
    """The run's ids in `ordering` ("agreement", "-max_score", ...), or None before `build` ran."""
    path = _path(run)
    try:
        arrays = _load(str(path), os.path.getmtime(path))
    except FileNotFoundError:
        return None
    ids = arrays[KEYS[ordering.lstrip("-")]]
    return OrderedIds(ids[::-1] if ordering.startswith("-") else ids)
