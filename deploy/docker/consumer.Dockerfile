# The consumers (join, aggregate, alert, query, tail): plain Python, no BCC, not root.
#   docker build -f deploy/docker/consumer.Dockerfile -t ebpf-apm-consumer:dev .
FROM python:3.11-slim-bookworm

WORKDIR /opt/ebpf-apm
COPY pyproject.toml README.md ./
COPY producer producer
COPY consumers consumers
COPY schemas schemas

RUN pip install --no-cache-dir --upgrade pip \
    && pip install --no-cache-dir . \
    && useradd --system --uid 10001 --user-group --no-create-home ebpf-apm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
ENTRYPOINT ["ebpf-apm"]
CMD ["--help"]
