"""The diversity ops on CPU against the torch loops a user writes from each method's released
rule (benchmarks/bench_diversity.py: torch_divprune, torch_cdpruner, torch_mmr, torch_dart).

Both sides compute the similarities in float32 by one matmul (16-bit inputs read as float32);
the ops run the greedy loop in C++, the loops run it step by step in torch ops (DivPrune and
DART sample by sample, as their released code; CDPruner and MMR batched). The check compares
the indices (bench_diversity.same_indices: a mismatch passes only on a float64 near-tie).
"""

from __future__ import annotations

import pytest
from bench_diversity import greedy_case, pivot_case
from cpu_harness import DTYPES, dtype_id, shapes

# (B, N, D, k): LLaVA-1.5 after the projector (576 tokens, D = 4096, k = 64 / 128) and LLaVA-NeXT
# (2880 tokens, k = 320)
GREEDY = shapes(full=[(1, 576, 4096, 64), (8, 576, 4096, 128), (1, 2880, 4096, 320)], smoke=[(2, 64, 32, 8)])
# (B, L, D, P, per_pivot, image start, image tokens): DART on LLaVA-1.5's 650-token prompt
PIVOT = shapes(full=[(1, 650, 4096, 8, 16, 35, 576), (8, 650, 4096, 8, 16, 35, 576)], smoke=[(2, 80, 32, 4, 4, 5, 64)])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", GREEDY, ids=lambda s: "B{}-N{}-D{}-k{}".format(*s))
@pytest.mark.parametrize("op", ["maxmin_select", "dpp_select", "mmr_select"])
def test_greedy_select(compare, op, shape, dtype):
    b, n, d, k = shape
    _, fns, check = greedy_case(op, b, n, d, k, dtype)
    compare(fns, check, group=f"{op} B={b} N={n} D={d} k={k} {dtype_id(dtype)}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", PIVOT, ids=lambda s: "B{}-L{}-D{}-P{}-per{}".format(*s))
def test_pivot_select(compare, shape, dtype):
    b, length, d, n_piv, per_pivot, start, n_img = shape
    _, fns, check = pivot_case(b, length, d, n_piv, per_pivot, start, n_img, dtype)
    compare(fns, check, group=f"pivot_select B={b} L={length} D={d} P={n_piv} per_pivot={per_pivot} {dtype_id(dtype)}")
