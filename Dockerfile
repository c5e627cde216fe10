# One image for the API and the workers of a taskserve service; compose.yaml runs both.
#   docker build -t my-service .
# Put your service's code next to this file (it is copied to /app) and name its class in
# TASKSERVE_SERVICE. For GPU workers, the CUDA libraries come with the model's wheels (torch
# bundles them); the host needs the NVIDIA driver and the NVIDIA Container Toolkit.
FROM python:3.12-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TASKSERVE_BROKER=redis://redis:6379/0 \
    TASKSERVE_LOG_FORMAT=json

WORKDIR /app

# Dependencies first, so that a code change does not reinstall them.
COPY pyproject.toml README.md ./
COPY taskserve ./taskserve
RUN pip install ".[redis,image,numpy,cli]"
# Your service's own requirements, if it has a requirements.txt.
COPY . .
RUN if [ -f requirements.txt ]; then pip install -r requirements.txt; fi \
    && useradd --create-home --uid 10001 taskserve
USER taskserve

# The service to serve, as MODULE:Class (override it in compose or with -e).
ENV TASKSERVE_SERVICE=examples.embeddings:Embeddings
EXPOSE 3000

# The API process answers /healthz while it runs (no curl in the slim image: Python asks).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/healthz', timeout=2)"

# exec: taskserve replaces the shell, so SIGTERM reaches it and it drains.
CMD ["sh", "-c", "exec taskserve serve \"$TASKSERVE_SERVICE\" --host 0.0.0.0 --port 3000 --workers 0"]
