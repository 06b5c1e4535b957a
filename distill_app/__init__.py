"""Distill's web application: Django + DRF for storage and the API, Celery for the heavy work.

All ML is done by ml_core; this package stores what it produces and runs it on workers.
"""
