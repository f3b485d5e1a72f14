"""RingBufReader against the kernel's ring buffer: exact counts, wrap-around, and loss
accounting, with records written by the span program's synthetic source (BPF, root)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ebpf_apm.producer.bpf_loader import AgentProbes, ProbeOptions
from ebpf_apm.producer.event_layout import EVENT_KIND_SPAN, SPAN_EVENT

pytestmark = pytest.mark.bpf

BURST = 23  # records per getppid() call: odd, so off-by-one errors show


@pytest.fixture(scope="module")
def probes() -> AgentProbes:
    # One page of ring: 73 records of 56 bytes, so a few bursts wrap around its end.
    loaded = AgentProbes(ProbeOptions(synthetic_burst=BURST, span_ring_pages=1))
    loaded.set_synthetic_pid(os.getpid())
    yield loaded
    loaded.close()


def drain_all(probes: AgentProbes) -> np.ndarray:
    return probes.span_reader.drain()


def test_every_record_arrives_once_across_many_wraps(probes: AgentProbes) -> None:
    drain_all(probes)
    before = probes.counters()
    seen = []
    for _ in range(40):  # 40 x 2 x 23 records through a 73-record ring
        os.getppid()
        os.getppid()
        seen.append(drain_all(probes))
    records = np.concatenate(seen)
    after = probes.counters()
    assert after["ring_full"] == before["ring_full"]
    assert len(records) == 40 * 2 * BURST
    assert (records["kind"] == EVENT_KIND_SPAN).all()
    assert (records["size"] == SPAN_EVENT.itemsize).all()
    assert (records["pid"] == os.getpid()).all()
    # Each burst numbers its records 0..22 in goid: order and contents survive the wraps.
    assert (records["goid"] == np.tile(np.arange(BURST), 80)).all()
    assert (records["ts_ns"] >= records["start_ns"] + 1000).all()


def test_a_full_ring_counts_what_it_loses(probes: AgentProbes) -> None:
    drain_all(probes)
    before = probes.counters()
    for _ in range(9):  # 207 records offered to a ring that holds 73
        os.getppid()
    records = drain_all(probes)
    after = probes.counters()
    emitted = after["emitted"] - before["emitted"]
    lost = after["ring_full"] - before["ring_full"]
    assert emitted == len(records)
    assert emitted + lost == 9 * BURST
    assert lost > 0
    assert probes.span_reader.pending_bytes() == 0


def test_max_records_leaves_the_rest_for_the_next_drain(probes: AgentProbes) -> None:
    drain_all(probes)
    os.getppid()
    first = probes.span_reader.drain(max_records=5)
    rest = drain_all(probes)
    assert len(first) == 5 and len(rest) == BURST - 5
    assert list(np.concatenate([first, rest])["goid"]) == list(range(BURST))
