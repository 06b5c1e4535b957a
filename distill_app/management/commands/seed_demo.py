"""Create the demo project from synthetic data (once per first user).

Sized for a first try on a laptop: 96 px images, 60 labeled / 120 unlabeled / 60 validation (the
images of `benchmarks/distillation_gain.py --preset cpu`, another seed, fewer unlabeled). With the
UI's defaults a 2-core CPU trains the teacher, runs inference and trains the student within about
20 minutes (`benchmarks/demo_workflow.py` measures it in the browser; with 200 unlabeled images it
took 22.4, the student's schedule growing with its data).
"""
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from ml_core.synth import SynthConfig, generate

from ...ingest import import_coco, ingest_bytes
from ...models import Dataset, Project

DEMO_NAME = "Demo: synthetic shapes"


class Command(BaseCommand):
    help = "Create a demo detection project from seeded synthetic images (labeled, unlabeled, validation)."

    def add_arguments(self, parser):
        parser.add_argument("--user", default=None, help="owner (default: the first superuser)")
        parser.add_argument("--size", type=int, default=96)

    def handle(self, *args, user=None, size=96, **kw):
        User = get_user_model()
        owner = User.objects.filter(username=user).first() if user else User.objects.order_by("id").first()
        if owner is None:
            self.stdout.write("no user yet: create one first")
            return
        if Project.objects.filter(owner=owner, name=DEMO_NAME).exists():
            return
        folder = Path(settings.DATA_DIR) / "demo-data"
        paths = generate(folder, SynthConfig(kind="detection", image_size=size, labeled=60, unlabeled=120, val=60, seed=7))
        project = Project.objects.create(owner=owner, name=DEMO_NAME, task="detection",
                                         description="Discs, blocks and triangles on textured backgrounds, made by "
                                                     "`distill synth`. Train a teacher, run inference, review, distill.")
        import json
        for split, role in (("labeled", "labeled"), ("unlabeled", "unlabeled"), ("val", "validation")):
            ds = Dataset.objects.create(project=project, name=f"demo {split}", role=role)
            doc = json.loads(Path(paths[split]).read_text())
            for im in doc["images"]:
                ingest_bytes(ds, im["file_name"], (folder / split / im["file_name"]).read_bytes())
            if role != "unlabeled":
                import_coco(ds, doc)
        self.stdout.write(f"[distill] demo project created: {DEMO_NAME}")
