import gc
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "distill_app.settings")
application = get_wsgi_application()

# Load the URLconf (the API, and PyTorch with it) while the web process boots: otherwise the
# first request each process serves waits seconds for those imports, and every request queued
# behind it with it.
from django.urls import get_resolver  # noqa: E402

get_resolver().check()  # imports the URLconf (url_patterns) and checks it

# Then set what was loaded aside from the garbage collector: PyTorch and Django leave ~400,000
# long-lived objects, and every full collection walked them all in the middle of a request
# (~200 ms, measured: the web server's slowest requests under load). Requests still collect
# their own garbage as usual.
gc.collect()
gc.freeze()
