FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY streamproc ./streamproc
COPY topics ./topics
# the compiled domain core (Cython, streamproc/compiled.py) is built against the installed package, from /
# so that the package imported is the installed one; the compiler is removed afterwards
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && pip install --no-cache-dir . cython==3.3.1 \
 && cd / && python -m streamproc.compiled build && pip uninstall -y cython \
 && apt-get purge -y gcc libc6-dev && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*
ENV STREAMPROC_STATE_DIR=/var/lib/streamproc
CMD ["streamproc", "worker"]
