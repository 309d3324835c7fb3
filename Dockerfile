FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY streamproc ./streamproc
COPY topics ./topics
RUN pip install --no-cache-dir .
ENV STREAMPROC_STATE_DIR=/var/lib/streamproc
CMD ["streamproc", "worker"]
