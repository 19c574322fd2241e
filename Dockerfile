# One image for every pipeline service: migrate, worker, beat, flower, metrics.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md CHANGELOG.md ./
COPY pipeline ./pipeline
RUN pip install --no-cache-dir . && useradd --create-home pipeline
USER pipeline
CMD ["pipeline", "--help"]
