# The image for both the api and the worker services of docker-compose.yml.
# On Linux, PyPI's torch wheel is the CUDA build: the same image trains on an NVIDIA GPU.

# Build the wheel from what it ships and no more (tests/test_package.py builds it from the
# same four paths, installs it into a fresh venv and runs it).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY migrations ./migrations
RUN pip wheel --no-cache-dir --no-deps -w /wheels .

FROM python:3.11-slim
# A C compiler: workers compile the native training loop, API nodes the row-wise forward
# pass that micro-batching relies on (both fall back to PyTorch without one, slower).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY constraints.txt ./
COPY --from=build /wheels /wheels
# The built wheel, not the source: the image runs what a user's `pip install` gets, with
# the Alembic scripts inside the package (trainserve.migrations).
RUN pip install --no-cache-dir -c constraints.txt "$(echo /wheels/trainserve-*.whl)[redis,postgres,s3]" \
    && rm -rf /wheels
ENV TRAINSERVE_DATA_DIR=/var/lib/trainserve
RUN mkdir -p /var/lib/trainserve/models_store
EXPOSE 8000
CMD ["trainserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
