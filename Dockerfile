# The image for both the api and the worker services of docker-compose.yml.
# On Linux, PyPI's torch wheel is the CUDA build: the same image trains on an NVIDIA GPU.
FROM python:3.11-slim
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
