# AI SDR service image: CPU-only, non-root, health-checked.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    DATA_DIR=/data \
    DATABASE_URL=sqlite+aiosqlite:////data/ai_sdr.db \
    CHROMA_PATH=/data/chroma

WORKDIR /app
COPY requirements.txt .
# torch from the CPU index first: the default index would pull several GB of CUDA wheels
RUN pip install "$(grep -E '^torch==' requirements.txt)" --index-url https://download.pytorch.org/whl/cpu \
 && pip install -r requirements.txt

COPY . .
RUN useradd --create-home --uid 10001 aisdr && mkdir -p /data && chown aisdr /data
USER aisdr
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"

CMD ["uvicorn", "main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", "--loop", "uvloop", "--http", "api.http_protocol:HeadTimeoutProtocol", "--ws", "api.media_ws:MediaStreamProtocol", "--ws-per-message-deflate", "false", "--ws-max-size", "262144"]
