# One image for the sweep's workers and for the MLflow tracking server of docker-compose.yml.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY lstm_sweep ./lstm_sweep
# EXTRAS="[ray]" builds the image of a Ray cluster's nodes (KubeRay's probes call wget)
ARG EXTRAS=""
# torch from the CPU index: the default wheel drags in gigabytes of CUDA libraries
RUN if [ -n "$EXTRAS" ]; then apt-get update && apt-get install -y --no-install-recommends wget \
        && rm -rf /var/lib/apt/lists/*; fi \
    && pip install --extra-index-url https://download.pytorch.org/whl/cpu ".$EXTRAS"
COPY sweeps ./sweeps

# never run as root; the sweep writes its local report files under /app/mlruns
RUN useradd --create-home --uid 1000 sweeper && mkdir -p /app/mlruns /mlartifacts \
    && chown sweeper /app/mlruns /mlartifacts
USER sweeper

ENTRYPOINT ["python", "-m", "lstm_sweep.run"]
CMD ["--help"]
