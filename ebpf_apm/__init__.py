"""ebpf-apm: latency percentiles for Go services in Kubernetes pods, from eBPF.

One import namespace over the project's folders:

    ebpf_apm.cli        the `ebpf-apm` command (imports only the chosen subcommand)
    ebpf_apm.errors     the error base every package's exceptions derive from
    ebpf_apm.runner     the signal-driven event loop every long-running command runs in
    ebpf_apm.kafka      the Kafka edge both sides use and neither owns
    ebpf_apm.producer   the node agent (producer/)       } never import each other
    ebpf_apm.consumers  the consumer services (consumers/) }
    ebpf_apm.schemas    topic formats and codecs (schemas/)
    ebpf_apm.bpf        BPF C sources, package data (bpf/)

The public surface is the CLI and the contracts in `ebpf_apm.schemas`.
"""

__version__ = "0.1.0"
