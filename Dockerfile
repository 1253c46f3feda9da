# Production image: the server only (the `server` extra; a plain install is just the SDK).
# Postgres, S3 and ClickHouse are external services
# (see docker-compose.yml); the embedded stack is not installed here.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY pg_migrations ./pg_migrations
COPY clickhouse_schema ./clickhouse_schema
RUN pip install ".[server]" && groupadd --system --gid 10001 threadline \
    && useradd --system --uid 10001 --gid 10001 --no-create-home threadline
# A fixed uid: Kubernetes can check runAsNonRoot against it (deploy/k8s runs as 10001).
USER 10001:10001

ENV THREADLINE_HOST=0.0.0.0 THREADLINE_PORT=8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz')" || exit 1
CMD ["threadline", "serve"]
