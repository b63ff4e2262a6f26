"""Last-arrival epilogues: a reduction over the programs of a launch without a second launch.

Each program of a group (the programs of one sample, say) writes its partial result, then
takes a ticket from the group's arrival counter; the program that draws the last ticket sees
every partial and finishes the group (sums them in a fixed order, so the result does not
depend on which program arrives last). That program also resets the counter to zero, so the
counters need no fill before a launch: they are zeroed once, when first allocated, and every
launch leaves them as it found them.

    tl.store(partial slot, ...)
    if arrive(counter_ptr + group, programs_in_group):
        ... read every partial of the group with load_partial, write the group's result

A later phase of the same launch can also wait for a group (``signal`` / ``wait_for``): its
programs come after the group's in the grid and spin on a flag that the group's last program
raises when it is done (and that the phase's own last program lowers again).

The counters are a per-(device, stream) workspace (``counters``): two launches that use them
at the same time must be on different streams, and launches on one stream run one after
another. A launch that dies mid-way (a CUDA error) leaves the context unusable anyway.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_COUNTERS: dict[tuple[str, int | None, int], torch.Tensor] = {}


def stream_key(device: torch.device) -> tuple[str, int | None, int]:
    """(device type, index, current stream) of device: what per-stream workspaces are keyed by."""
    if device.type == "cuda":
        return device.type, device.index, torch.cuda.current_stream(device).cuda_stream
    return device.type, device.index, 0


def counters(n: int, device: torch.device) -> torch.Tensor:
    """n int32 arrival counters, all zero, for one launch on the current stream of device.
    Allocated (and zeroed) only when a launch needs more than any before it on this stream."""
    key = stream_key(device)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 64), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


@triton.jit
def arrive(counter_ptr, programs):
    """Take this program's ticket of a group of ``programs``; True in the program that
    arrives last (it then resets the counter). Every thread's stores made before the call
    are visible to the last program; call it from every program of the group exactly once."""
    tl.debug_barrier()  # every thread's stores precede the release below
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = ticket == programs - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
    tl.debug_barrier()  # the acquire precedes every thread's loads of the partials
    return last


@triton.jit
def signal(flag_ptr):
    """Raise a flag (0 -> 1) once every thread's stores of this program are made: programs
    that ``wait_for`` it see them."""
    tl.debug_barrier()
    tl.atomic_xchg(flag_ptr, 1, sem="release", scope="gpu")


@triton.jit
def wait_for(flag_ptr):
    """Wait until another program raises the flag, then see every store it (and the programs
    whose tickets it drew) made before. The raising program must precede this one in the
    grid: a GPU dispatches the programs of a launch in order, so it is running or done (the
    interpreter runs them one after another), and the wait cannot deadlock."""
    flag = tl.load(flag_ptr, volatile=True)
    while flag == 0:
        flag = tl.load(flag_ptr, volatile=True)
    tl.atomic_add(flag_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def load_partial(ptr, mask=None, other=None):
    """Load what other programs wrote before their ``arrive`` (from L2, not a stale L1 line)."""
    return tl.load(ptr, mask=mask, other=other, cache_modifier=".cg")
