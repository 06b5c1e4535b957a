import subprocess
import sys


def test_importing_ml_core_loads_neither_django_nor_celery():
    code = ("import sys, ml_core, ml_core.pipeline, ml_core.cli, ml_core.tta, ml_core.engine; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('django', 'celery', 'rest_framework', 'distill_app')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
