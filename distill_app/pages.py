"""Server-rendered pages. Each is a shell; its script fetches everything through the REST API."""
from django.contrib.auth.decorators import login_required
from django.db import connection
from django.http import JsonResponse
from django.shortcuts import get_object_or_404, render

from .models import InferenceRun, Project, TrainingRun


@login_required
def projects(request):
    return render(request, "distill/projects.html")


@login_required
def project(request, pk):
    p = get_object_or_404(Project, pk=pk, owner=request.user)
    return render(request, "distill/project.html", {"project": p})


@login_required
def review(request, pk):
    run = get_object_or_404(InferenceRun, pk=pk, project__owner=request.user)
    return render(request, "distill/review.html", {"run": run, "project": run.project})


@login_required
def training(request, pk):
    run = get_object_or_404(TrainingRun, pk=pk, project__owner=request.user)
    return render(request, "distill/training.html", {"run": run, "project": run.project})


def healthz(request):
    """Liveness for docker-compose: the database answers."""
    with connection.cursor() as c:
        c.execute("SELECT 1")
    return JsonResponse({"ok": True})
