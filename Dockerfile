# The image for both the api and the worker services of docker-compose.yml.
# On Linux, PyPI's torch wheel is the CUDA build: the same image trains on an NVIDIA GPU.
FROM python:3.11-slim
# A C compiler: workers compile the native training loop, API nodes the row-wise forward
# pass that micro-batching relies on (both fall back to PyTorch without one, slower).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml constraints.txt README.md alembic.ini ./
COPY service ./service
COPY migrations ./migrations
# Editable, so that the migrations folder beside the package is where the code looks for it.
RUN pip install --no-cache-dir -c constraints.txt -e '.[redis,postgres,s3]'
ENV TRAINSERVE_DATA_DIR=/var/lib/trainserve
RUN mkdir -p /var/lib/trainserve/models_store
EXPOSE 8000
CMD ["trainserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
