# depthflow images: `runtime` (the default, last stage: slim Python, non-root, dependencies in
# their own cached layer) and `test` (the same install plus the dev dependencies, the tests and
# the servers the fault and browser tests start themselves).
FROM python:3.12.8-slim-bookworm AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Numba's on-disk cache must be writable by the non-root user.
    NUMBA_CACHE_DIR=/tmp/numba-cache

WORKDIR /app

# Dependencies first, read from pyproject.toml: this layer is rebuilt only when it changes.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY src ./src
COPY alembic ./alembic
COPY alembic.ini ./
RUN pip install --no-deps . && rm -rf build

RUN useradd --create-home --uid 10001 depthflow \
    && mkdir -p /recordings && chown depthflow /recordings


FROM base AS test
# PostgreSQL and Redis binaries for the tests' private servers (fault tests stop and start their
# own), Chromium for the dashboard and docs browser tests.
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql redis-server chromium \
    && rm -rf /var/lib/apt/lists/*
RUN pip install '.[dev]'
COPY tests ./tests
COPY bench ./bench
COPY monitoring ./monitoring
COPY compose.yaml ./
RUN chown -R depthflow /app
USER depthflow
CMD ["python", "-m", "pytest", "-q"]


FROM base AS runtime
USER depthflow
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/live', timeout=2)"]

# compose runs `depthflow migrate` as its own one-shot service before this starts.
CMD ["depthflow", "serve", "--host", "0.0.0.0", "--port", "8000"]
