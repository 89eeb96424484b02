# Kleis in a container: non-root, config and database in the /data volume, healthy when the
# database takes writes (GET /readyz). See README "Running in a container".
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    KLEIS_CONFIG=/data/config.toml

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt \
    && useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin kleis \
    && install -d -o kleis -g kleis -m 0700 /data
COPY *.py schema.sql config.example.toml ./
COPY migrations/ migrations/
COPY providers/ providers/
COPY static/ static/

USER 10001:10001
VOLUME ["/data"]
EXPOSE 8787
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8787/readyz', timeout=4).status != 200)"]
# First start writes /data/config.toml (mode 0600) and prints the admin token once (docker logs).
CMD ["python", "kleis.py", "serve", "--host", "0.0.0.0", "--port", "8787"]
