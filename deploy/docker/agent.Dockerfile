# The node agent: Debian bookworm's BCC (python3-bpfcc, for its Python 3.11) and the project.
# Kernel headers are not in the image: the DaemonSet mounts the node's /lib/modules and
# /usr/src, so BCC compiles against the kernel it runs on.
#   docker build -f deploy/docker/agent.Dockerfile -t ebpf-apm-agent:dev .
FROM debian:bookworm-slim

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv python3-bpfcc ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/ebpf-apm
COPY pyproject.toml README.md ./
COPY producer producer
COPY consumers consumers
COPY schemas schemas
COPY bpf bpf

# --system-site-packages: Debian's `bcc` module lives in /usr/lib/python3/dist-packages.
# Editable install: the agent finds its BPF sources beside the package (bpf/).
RUN python3 -m venv --system-site-packages /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
    && /opt/venv/bin/pip install --no-cache-dir -e . \
    && /opt/venv/bin/python -m compileall -q producer consumers schemas \
    && /opt/venv/bin/python -c "import bcc, producer.bpf_loader"

ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# Root inside the container: Kubernetes grants the DaemonSet's added capabilities to uid 0.
USER 0
ENTRYPOINT ["ebpf-apm"]
CMD ["agent", "--help"]
