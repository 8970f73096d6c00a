# dicom-node container. CPU by default; `docker build --build-arg GPU=1 .` builds on a CUDA base
# with onnxruntime-gpu (the node falls back to the CPU provider when no GPU is visible).
ARG GPU=0
ARG CPU_BASE=python:3.11-slim-bookworm
ARG GPU_BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

FROM ${CPU_BASE} AS base-0
FROM ${GPU_BASE} AS base-1
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/* && ln -sf /usr/bin/python3.11 /usr/local/bin/python3

FROM base-${GPU} AS node
ARG GPU=0
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    DICOM_NODE_STORAGE=/data DICOM_NODE_RULES=/app/rules DICOM_NODE_MODELS=/app/models
WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY dicom_node ./dicom_node
COPY training ./training
RUN pip install --no-cache-dir . \
    && if [ "$GPU" = "1" ]; then pip uninstall -y onnxruntime && pip install --no-cache-dir onnxruntime-gpu; fi
COPY rules ./rules
COPY models ./models
# rules and models stay writable by the node's user: physicists edit rules and developers move
# aliases on a running node (mount your own over /app/rules and /app/models to keep them)
RUN useradd --system --uid 10001 --home /app dicomnode && mkdir -p /data \
    && chown -R dicomnode /data /app/rules /app/models
USER dicomnode
VOLUME ["/data", "/app/rules", "/app/models"]
EXPOSE 11112 9100
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD python3 -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=4).status == 200 else 1)"
ENTRYPOINT ["dicom-node"]
CMD ["serve"]
