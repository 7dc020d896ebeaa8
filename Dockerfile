# The sluice gateway image: `sluice serve` on 0.0.0.0:8000, CPU torch (the engine runs on
# the CPU here; on a GPU host build FROM a CUDA base and install torch's CUDA wheel).
FROM python:3.12-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# The CPU wheel of the pinned torch first, so `pip install .` finds it satisfied
# instead of pulling the multi-GB CUDA build.
RUN python -m venv /opt/sluice \
 && /opt/sluice/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY sluice ./sluice
RUN /opt/sluice/bin/pip install .

FROM python:3.12-slim
COPY --from=build /opt/sluice /opt/sluice
ENV PATH=/opt/sluice/bin:$PATH PYTHONUNBUFFERED=1 SLUICE_SPOOL_DIR=/var/lib/sluice/spool
RUN useradd --system --uid 10001 --home-dir /var/lib/sluice --create-home sluice
# State lives in a volume: the usage/audit spool (must survive restarts: it holds usage
# written while the database was down) and, without SLUICE_ADMIN_JWT_SECRET, the
# generated admin JWT secret under .sluice/.
WORKDIR /var/lib/sluice
USER sluice
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["sluice", "serve", "--host", "0.0.0.0", "--port", "8000"]
