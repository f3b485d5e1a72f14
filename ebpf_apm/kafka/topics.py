"""Every topic the pipeline uses, named once (the product's contract lists them).

agent --> SPAN_EVENTS, NET_EVENTS --> join --> SPANS (outside subscribers, export)
                                          --> SPAN_BATCHES --> aggregate --> LATENCY --> alert
                                                                                 --> ALERTS
any consumer --> DEADLETTER (input it could not read, unchanged, with a reason header)
"""

from __future__ import annotations

SPAN_EVENTS = "apm.uprobe.events"  # the agent's span batches (schemas/uprobe_events.md)
NET_EVENTS = "apm.kprobe.events"  # the agent's socket I/O batches (schemas/kprobe_events.md)
SPANS = "apm.spans"  # joined spans, Avro (schemas/span.avsc)
# The same spans, ~1,000 per message, keyed by workload (consumers/span_batch.py)
SPAN_BATCHES = "apm.span.batches"
LATENCY = "apm.latency"  # closed windows, Avro (schemas/latency.avsc)
ALERTS = "apm.alerts"  # alert transitions, Avro (schemas/alert.avsc)
DEADLETTER = "apm.deadletter"  # rejected input, original bytes + `reason`/`source` headers

# Both event topics get the same count: the join reads them partition by partition.
EVENT_PARTITIONS = 6
LATENCY_PARTITIONS = 6
ALERT_PARTITIONS = 1
DEADLETTER_PARTITIONS = 1
