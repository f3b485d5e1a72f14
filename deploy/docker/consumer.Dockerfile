# The consumers (join, aggregate, alert, query, tail): plain Python, no BCC, not root.
# Two stages: the first builds the project's wheel from the source tree, the second installs
# only that wheel, so no source tree is in the image.
#   docker build -f deploy/docker/consumer.Dockerfile -t ebpf-apm-consumer:dev .
FROM python:3.11-slim-bookworm AS builder

WORKDIR /src
COPY pyproject.toml README.md ./
# ebpf_apm/producer, consumers, schemas and bpf are symlinks to the top-level folders: all
# five are needed for the links to resolve (one wheel holds the whole `ebpf_apm` package).
COPY ebpf_apm ebpf_apm
COPY producer producer
COPY consumers consumers
COPY schemas schemas
COPY bpf bpf
RUN pip wheel --no-cache-dir --no-deps -w /wheels .

FROM python:3.11-slim-bookworm

COPY --from=builder /wheels /wheels

RUN pip install --no-cache-dir --upgrade pip \
    && pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels \
    && ebpf-apm --help >/dev/null \
    && useradd --system --uid 10001 --user-group --no-create-home ebpf-apm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
ENTRYPOINT ["ebpf-apm"]
CMD ["--help"]
