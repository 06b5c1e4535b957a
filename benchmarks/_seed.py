"""Seeded inference runs for the benchmarks: N images x K ensembled instances, straight into the
database of a throwaway data directory (no model involved; only the storage and the UI are
measured)."""
from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pct(xs, q):
    """The q-th percentile of xs (nearest rank)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def django_setup(data_dir: Path, database_url: str | None = None):
    """Django on a throwaway data folder (SQLite there, or database_url), migrated."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if database_url:
        os.environ["DATABASE_URL"] = database_url
    os.environ["DISTILL_DATA_DIR"] = str(data_dir)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "distill_app.settings")
    os.environ.setdefault("DISTILL_TASKS_EAGER", "1")
    import django
    django.setup()
    from django.core.management import call_command
    call_command("migrate", verbosity=0)


CATEGORIES = [{"id": 1, "name": "disc"}, {"id": 2, "name": "block"}, {"id": 3, "name": "triangle"}]


def _bench_project(username: str, n_images: int, per_image: int):
    """The user, project, an unlabeled dataset, and a labeled image with per_image annotations
    (what the automatic threshold needs); rel is the one image file every seeded row points at."""
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from PIL import Image as PILImage

    from distill_app.models import Annotation, Dataset, Image, Project
    User = get_user_model()
    user, _ = User.objects.get_or_create(username=username)
    user.set_password("bench-password")
    user.save()
    project = Project.objects.create(owner=user, name=f"bench {n_images}x{per_image}", categories=CATEGORIES)
    lab = Dataset.objects.create(project=project, name="labeled", role="labeled")
    unl = Dataset.objects.create(project=project, name="unlabeled", role="unlabeled")
    thumb = Path(settings.MEDIA_ROOT) / "bench" / "thumb.jpg"
    thumb.parent.mkdir(parents=True, exist_ok=True)
    PILImage.new("RGB", (256, 192), (90, 120, 160)).save(thumb)
    rel = str(thumb.relative_to(settings.MEDIA_ROOT))
    limg = Image.objects.create(dataset=lab, file=rel, thumbnail=rel, file_name="l.jpg", sha256="l" * 64, width=640, height=480)
    Annotation.objects.bulk_create([Annotation(image=limg, category_id=1 + i % 3, bbox=[10 * i, 10, 40, 40]) for i in range(per_image)])
    return user, project, unl, rel


def seed_run(n_images: int, per_image: int, seed: int = 0, username: str = "bench", with_views: bool = False):
    """Create user, project, datasets, a checkpoint row, a finished run and its predictions."""

    from distill_app import review_order, threshold_stats
    from distill_app.models import (Image, InferenceRun, Job, ModelCheckpoint, Prediction)
    user, project, unl, rel = _bench_project(username, n_images, per_image)
    t = time.perf_counter()
    rows = [Image(dataset=unl, file=rel, thumbnail=rel, file_name=f"img_{i:06d}.jpg", sha256=f"{i:064d}", width=640,
                  height=480) for i in range(n_images)]
    Image.objects.bulk_create(rows, batch_size=5000)
    ids = list(Image.objects.filter(dataset=unl).order_by("id").values_list("id", flat=True))
    job = Job.objects.create(project=project, owner=user, kind="infer", state=Job.SUCCEEDED, progress=1)
    ckpt = ModelCheckpoint.objects.create(project=project, name="teacher", role="teacher", arch="fasterrcnn_tiny", file="none")
    run = InferenceRun.objects.create(project=project, checkpoint=ckpt, dataset=unl, job=job, chunks_total=1,
                                      transforms={"scales": [400, 600], "flip": True, "max_size": 4000},
                                      view_names=["s400", "s400-flip", "s600", "s600-flip"])
    rng = random.Random(seed)
    batch = []
    for image_id in ids:
        ens = []
        for _ in range(per_image):
            x, y, w, h = rng.uniform(0, 560), rng.uniform(0, 400), rng.uniform(10, 80), rng.uniform(10, 80)
            ens.append({"bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)], "score": round(rng.betavariate(1.2, 2.5), 5),
                        "category_id": rng.randint(1, 3)})
        views = {v: ens[: per_image // 2] for v in run.view_names} if with_views else {}
        mask = 0
        for d in ens:
            mask |= 1 << (d["category_id"] - 1)
        batch.append(Prediction(run=run, image_id=image_id, chunk=0, agreement=rng.random(), validation=False,
                                max_score=max(d["score"] for d in ens), num_instances=len(ens), class_mask=mask,
                                ensembled=ens, views=views))
        if len(batch) == 5000:
            Prediction.objects.bulk_create(batch)
            batch = []
    Prediction.objects.bulk_create(batch)
    seeded = time.perf_counter() - t
    t = time.perf_counter()
    threshold_stats.build(run)
    review_order.build(run)
    built = time.perf_counter() - t
    run.refresh_from_db()
    return user, run, {"seed_seconds": round(seeded, 1), "stats_build_seconds": round(built, 2)}


def _bulk_insert(model, columns: list[str], rows_iter, batch: int = 20000):
    """Insert many rows fast: COPY on PostgreSQL, executemany of one prepared statement in big
    transactions on SQLite. rows_iter yields tuples in `columns` order; JSON columns as text."""
    from django.db import connection, transaction
    table = model._meta.db_table
    cols = ", ".join(connection.ops.quote_name(c) for c in columns)
    if connection.vendor == "postgresql":
        def esc(v):
            if v is None:
                return "\\N"
            if isinstance(v, bool):
                return "t" if v else "f"
            s = str(v)
            if "\\" in s or "\t" in s or "\n" in s or "\r" in s:
                s = s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
            return s
        with transaction.atomic(), connection.cursor() as cur:
            with cur.cursor.copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
                buf = []
                for row in rows_iter:
                    buf.append("\t".join(esc(v) for v in row))
                    if len(buf) >= batch:
                        copy.write("\n".join(buf) + "\n")
                        buf = []
                if buf:
                    copy.write("\n".join(buf) + "\n")
        return
    connection.ensure_connection()
    raw = connection.connection  # sqlite3.Connection
    sql = f"INSERT INTO {table} ({cols}) VALUES ({', '.join('?' * len(columns))})"
    with transaction.atomic():
        buf = []
        for row in rows_iter:
            buf.append(row)
            if len(buf) >= batch:
                raw.executemany(sql, buf)
                buf = []
        if buf:
            raw.executemany(sql, buf)


def seed_run_bulk(n_images: int, per_image: int, seed: int = 0, username: str = "bench", progress=None):
    """As seed_run (same distributions, no per-view predictions), fast enough for 500,000 images x 20:
    rows generated with numpy and written with COPY (PostgreSQL) or prepared executemany (SQLite).
    Returns (user, run, info) with the seconds spent seeding and building the run's statistics."""
    import numpy as np
    from django.db import connection
    from django.utils import timezone

    from distill_app import review_order, threshold_stats
    from distill_app.models import (Image, InferenceRun, Job, ModelCheckpoint, Prediction)
    user, project, unl, rel = _bench_project(username, n_images, per_image)
    t0 = time.perf_counter()
    now = timezone.now()
    if connection.vendor == "sqlite":
        now = now.isoformat(sep=" ")
    _bulk_insert(Image, ["dataset_id", "file", "thumbnail", "file_name", "sha256", "width", "height", "created"],
                 ((unl.pk, rel, rel, f"img_{i:07d}.jpg", f"{i:064d}", 640, 480, now) for i in range(n_images)))
    ids = list(Image.objects.filter(dataset=unl).order_by("id").values_list("id", flat=True))
    t_images = time.perf_counter() - t0
    job = Job.objects.create(project=project, owner=user, kind="infer", state=Job.SUCCEEDED, progress=1)
    ckpt = ModelCheckpoint.objects.create(project=project, name="teacher", role="teacher", arch="fasterrcnn_tiny", file="none")
    run = InferenceRun.objects.create(project=project, checkpoint=ckpt, dataset=unl, job=job, chunks_total=1,
                                      transforms={"scales": [400, 600], "flip": True, "max_size": 4000},
                                      view_names=["s400", "s400-flip", "s600", "s600-flip"])
    rng = np.random.default_rng(seed)
    false = False if connection.vendor == "postgresql" else 0

    def rows():
        step = 5000
        for start in range(0, len(ids), step):
            chunk = ids[start:start + step]
            n = len(chunk) * per_image
            xy = np.round(rng.uniform(0, [560, 400], (n, 2)), 2)
            wh = np.round(rng.uniform(10, 80, (n, 2)), 2)
            sc = np.round(rng.beta(1.2, 2.5, n), 5)
            cat = rng.integers(1, 4, n)
            agreement = rng.random(len(chunk))
            xs, ys, ws, hs = xy[:, 0].tolist(), xy[:, 1].tolist(), wh[:, 0].tolist(), wh[:, 1].tolist()
            scl, catl = sc.tolist(), cat.tolist()
            inst = [f'{{"bbox": [{xs[k]}, {ys[k]}, {ws[k]}, {hs[k]}], "score": {scl[k]}, "category_id": {catl[k]}}}'
                    for k in range(n)]
            maxes = sc.reshape(-1, per_image).max(1).tolist()
            masks = np.bitwise_or.reduce(1 << (cat.reshape(-1, per_image) - 1), axis=1).tolist()
            for j, image_id in enumerate(chunk):
                yield (run.pk, image_id, 0, false, agreement[j], maxes[j], per_image, masks[j],
                       "[" + ", ".join(inst[j * per_image:(j + 1) * per_image]) + "]", "{}", "")
            if progress:
                progress(start + len(chunk))
    _bulk_insert(Prediction, ["run_id", "image_id", "chunk", "validation", "agreement", "max_score", "num_instances",
                              "class_mask", "ensembled", "views", "error"], rows())
    if connection.vendor == "postgresql":
        # what autovacuum does after a bulk insert (statistics, and the visibility map that lets the
        # page query walk its index without reading the table)
        with connection.cursor() as cur:
            cur.execute(f"VACUUM ANALYZE {Prediction._meta.db_table}")
            cur.execute(f"VACUUM ANALYZE {Image._meta.db_table}")
    else:
        with connection.cursor() as cur:
            cur.execute("ANALYZE")
    seeded = time.perf_counter() - t0
    t = time.perf_counter()
    threshold_stats.build(run)
    review_order.build(run)
    built = time.perf_counter() - t
    run.refresh_from_db()
    return user, run, {"seed_seconds": round(seeded, 1), "seed_images_seconds": round(t_images, 1),
                       "stats_build_seconds": round(built, 2)}
