# What the image runs is the wheel, installed outside any checkout (CI installs the same wheel into a fresh venv
# and starts a worker from it: tests/integration/test_packaged_install.py).
FROM python:3.11-slim AS build
# the wheel carries the compiled domain core (setup.py: Cython ext_modules, with the .py sources beside them):
# the compiler is needed here only
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY streamproc ./streamproc
RUN pip wheel --no-cache-dir --no-deps -w /dist .

FROM python:3.11-slim
COPY --from=build /dist /dist
RUN pip install --no-cache-dir /dist/*.whl && rm -rf /dist
ENV STREAMPROC_STATE_DIR=/var/lib/streamproc
WORKDIR /var/lib/streamproc
CMD ["streamproc", "worker"]
