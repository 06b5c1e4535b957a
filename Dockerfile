# One image for web, CPU worker and GPU worker. PyPI's Linux torch wheels carry CUDA, so the same
# image runs on the GPU when the container is given one (docker-compose's gpu-worker).
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 DISTILL_DATA_DIR=/data
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY ml_core ml_core
COPY distill_app distill_app
COPY frontend frontend
COPY manage.py ./
RUN pip install '.[prod]'
RUN DISTILL_SECRET_KEY=build python manage.py collectstatic --noinput
EXPOSE 8000
CMD ["gunicorn", "distill_app.wsgi", "--bind", "0.0.0.0:8000", "--workers", "3", "--timeout", "120"]
