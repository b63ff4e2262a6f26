"""Last-arrival epilogues (tokenkern._triton.ticket): in each group of programs exactly one,
the last to arrive, sees every partial of its group and finishes it; the counters are left
at zero, so the next launch on the same counters works without a fill."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from testing import HAS_CUDA, TRITON_DEVICE

from tokenkern._triton.ticket import arrive, counters, load_partial


@triton.jit
def _group_sum_kernel(order_ptr, vals_ptr, part_ptr, cnt_ptr, out_ptr, last_ptr, PROGRAMS, BLOCK: tl.constexpr):
    """Program pid plays member order[pid] % PROGRAMS of group order[pid] // PROGRAMS: it
    writes its partial 2 * vals[slot]; the group's last program sums the group's partials
    and records which member it was."""
    slot = tl.load(order_ptr + tl.program_id(0))
    group = slot // PROGRAMS
    tl.store(part_ptr + slot, 2.0 * tl.load(vals_ptr + slot))
    if arrive(cnt_ptr + group, PROGRAMS):
        r = tl.arange(0, BLOCK)
        v = load_partial(part_ptr + group * PROGRAMS + r, mask=r < PROGRAMS, other=0.0)
        tl.store(out_ptr + group, tl.sum(v, axis=0))
        tl.atomic_add(last_ptr + group, 1)  # how many programs of the group took the last ticket
        tl.store(last_ptr + group + tl.num_programs(0), slot % PROGRAMS)


def _launch(order: torch.Tensor, vals: torch.Tensor, cnt: torch.Tensor, groups: int, programs: int):
    dev = TRITON_DEVICE
    part = torch.full((groups * programs,), float("nan"), device=dev)
    out = torch.full((groups,), float("nan"), device=dev)
    last = torch.zeros(groups + order.numel(), dtype=torch.int32, device=dev)
    _group_sum_kernel[(order.numel(),)](
        order.to(dev), vals.to(dev), part, cnt, out, last, programs, BLOCK=triton.next_power_of_2(programs)
    )
    return out.cpu(), last[:groups].cpu(), last[order.numel() :][:groups].cpu()


@pytest.mark.parametrize(("groups", "programs"), [(5, 7), (3, 1), (1, 33)])
def test_last_program_of_each_group_sees_every_partial(groups, programs, gen):
    """Programs of different groups interleaved, each group's in a random order; a second
    launch on the same counters, in another order, gives the same sums."""
    vals = torch.randint(-1000, 1000, (groups * programs,), generator=gen).float()  # sums exact in float32
    want = 2.0 * vals.view(groups, programs).sum(1)
    cnt = counters(groups, torch.device(TRITON_DEVICE))
    assert cnt.numel() >= groups and not cnt.any()
    for _ in range(2):
        order = torch.randperm(groups * programs, generator=gen).to(torch.int32)
        out, n_last, member = _launch(order, vals, cnt, groups, programs)
        assert torch.equal(out, want)
        assert torch.equal(n_last, torch.ones(groups, dtype=torch.int32))
        if not HAS_CUDA:  # the interpreter runs the programs one after another, in pid order
            pid_of_slot = torch.empty_like(order)
            pid_of_slot[order.long()] = torch.arange(order.numel(), dtype=torch.int32)
            last_slot = pid_of_slot.view(groups, programs).argmax(1)
            assert torch.equal(member, last_slot.to(torch.int32))
        assert not cnt.any(), "the counters must be back to zero after the launch"


def test_counters_are_per_stream_zeroed_once_and_grow():
    dev = torch.device(TRITON_DEVICE)
    a = counters(3, dev)
    assert a.dtype == torch.int32 and a.device.type == dev.type and a.numel() >= 64 and not a.any()
    assert counters(a.numel(), dev) is a  # reused, not refilled
    b = counters(a.numel() + 1, dev)
    assert b.numel() > a.numel() and not b.any()
    assert counters(2, dev) is b
