"""The compile helper: BCC compiles in another process, the programs and maps arrive here as
descriptors, and work through the bpf system call and perf events alone."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from ebpf_apm.producer.bpf_compiler import attach_named_programs, compile_in_helper
from ebpf_apm.producer.bpf_fds import possible_cpus
from ebpf_apm.producer.errors import KernelSupportError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF needs root")

SOURCE = """
BPF_HASH(pairs, u32, u64, 64);
BPF_PERCPU_ARRAY(hits, u64, 2);

TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    u32 slot = 1;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u64 *want = pairs.lookup(&tgid);
    if (want)
        hits.increment(slot, *want);
    return 0;
}
"""


def test_maps_and_tracepoints_work_by_descriptor(tmp_path: Path) -> None:
    source = tmp_path / "handoff.bpf.c"
    source.write_text(SOURCE)
    obj = compile_in_helper([source], [], ["pairs", "hits"])
    try:
        assert set(obj.programs) == {"tracepoint__syscalls__sys_enter_getppid"}
        pairs, hits = obj.maps["pairs"], obj.maps["hits"]
        me = os.getpid().to_bytes(4, "little")
        for key in (7, 11, 23):
            pairs.update(key.to_bytes(4, "little"), (key * 2).to_bytes(8, "little"))
        pairs.update(me, (3).to_bytes(8, "little"))
        assert sorted(pairs.all_keys()) == sorted(
            [k.to_bytes(4, "little") for k in (7, 11, 23)] + [me]
        )
        assert pairs.lookup((11).to_bytes(4, "little")) == (22).to_bytes(8, "little")
        assert pairs.delete((7).to_bytes(4, "little")) is True
        assert pairs.delete((7).to_bytes(4, "little")) is False
        assert pairs.lookup((7).to_bytes(4, "little")) is None

        attach_named_programs(obj)  # nothing ran before: the helper attached nothing
        for _ in range(23):
            os.getppid()
        per_cpu = hits.lookup((1).to_bytes(4, "little"))
        assert per_cpu is not None and len(per_cpu) == 8 * possible_cpus()
        assert int(np.frombuffer(per_cpu, dtype="<u8").sum()) == 23 * 3
    finally:
        obj.close()


def test_a_compile_error_names_the_compiler_message(tmp_path: Path) -> None:
    source = tmp_path / "broken.bpf.c"
    source.write_text("int broken(struct pt_regs *ctx) { return undefined_name; }\n")
    with pytest.raises(KernelSupportError, match="undefined_name"):
        compile_in_helper([source], [], [])


def test_a_missing_map_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "handoff.bpf.c"
    source.write_text(SOURCE)
    with pytest.raises(KernelSupportError, match="no map nosuchmap"):
        compile_in_helper([source], [], ["pairs", "nosuchmap"])
