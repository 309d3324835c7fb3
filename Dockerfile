# What the image runs is the wheel, installed outside any checkout (CI installs the same wheel into a fresh venv
# and starts a worker from it: tests/integration/test_packaged_install.py).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY streamproc ./streamproc
RUN pip wheel --no-cache-dir --no-deps -w /dist .

FROM python:3.11-slim
COPY --from=build /dist /dist
# the compiled domain core (Cython, streamproc/compiled.py) is built against the installed package; the compiler is
# removed afterwards
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && pip install --no-cache-dir /dist/*.whl cython==3.3.1 \
 && cd / && python -m streamproc.compiled build && pip uninstall -y cython \
 && apt-get purge -y gcc libc6-dev && apt-get autoremove -y && rm -rf /var/lib/apt/lists/* /dist
ENV STREAMPROC_STATE_DIR=/var/lib/streamproc
WORKDIR /var/lib/streamproc
CMD ["streamproc", "worker"]
