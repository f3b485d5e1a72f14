# The node agent: Debian bookworm's BCC (python3-bpfcc, for its Python 3.11) and the project,
# installed from its wheel. Two stages: the first builds the wheel from the source tree (the
# BPF C sources and the .avsc contracts go in as package data, read through
# importlib.resources), the second installs only that wheel, so no source tree is in the image.
# Kernel headers are not in the image: the DaemonSet mounts the node's /lib/modules and
# /usr/src, so BCC compiles against the kernel it runs on.
#   docker build -f deploy/docker/agent.Dockerfile -t ebpf-apm-agent:dev .

# The wheel is pure Python (py3-none-any): any Python 3.11 builds the one the agent installs.
FROM python:3.11-slim-bookworm AS builder

WORKDIR /src
COPY pyproject.toml README.md ./
# ebpf_apm/producer, consumers, schemas and bpf are symlinks to the top-level folders: all
# five are needed for the links to resolve.
COPY ebpf_apm ebpf_apm
COPY producer producer
COPY consumers consumers
COPY schemas schemas
COPY bpf bpf
RUN pip wheel --no-cache-dir --no-deps -w /wheels .

FROM debian:bookworm-slim

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv python3-bpfcc ca-certificates \
    && rm -rf /var/lib/apt/lists/*

COPY --from=builder /wheels /wheels

# --system-site-packages: Debian's `bcc` module lives in /usr/lib/python3/dist-packages.
# pip compiles the installed modules to bytecode (the root filesystem is read-only at run).
RUN python3 -m venv --system-site-packages /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
    && /opt/venv/bin/pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels \
    && /opt/venv/bin/python -c "import bcc, ebpf_apm.producer.bpf_loader" \
    && /opt/venv/bin/ebpf-apm --help >/dev/null

ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# Root inside the container: Kubernetes grants the DaemonSet's added capabilities to uid 0.
USER 0
ENTRYPOINT ["ebpf-apm"]
CMD ["agent", "--help"]
