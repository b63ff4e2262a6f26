"""Plain-text tables and a PNG plot of a ``PlanResult``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .planning import Candidate, PlanResult


def format_flops(x: float) -> str:
    """``1.23e12`` -> ``'1.23 TF'`` (decimal prefixes)."""
    for scale, unit in ((1e15, "PF"), (1e12, "TF"), (1e9, "GF"), (1e6, "MF")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} F"


def format_bytes(x: float) -> str:
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.0f} B"


_HEADER = ("", "model", "LLM params", "V", "FLOPs", "vision", "prefill", "decode", "KV cache", "weights", "pred. error")


def _row(c: Candidate, optimum: Candidate | None) -> tuple[str, ...]:
    mark = "*" if c is optimum else ("" if c.within_budget else "over")
    return (
        mark,
        c.name,
        f"{c.n_params / 1e9:.2f} B",
        str(c.visual_tokens),
        format_flops(c.total_flops),
        format_flops(c.flops.vision + c.flops.projector),
        format_flops(c.flops.prefill),
        format_flops(c.flops.decode),
        format_bytes(c.memory.kv_cache),
        format_bytes(c.memory.weights),
        f"{c.error:.4f}",
    )


def format_table(result: PlanResult, rows: str = "frontier") -> str:
    """The frontier (``rows="frontier"``) or every candidate (``"all"``) as an aligned text
    table, with a header stating the budget, request shape and law. ``*`` marks the optimum,
    ``over`` the candidates over budget."""
    if rows not in {"frontier", "all"}:
        raise ValueError(f"rows must be 'frontier' or 'all', got {rows!r}")
    chosen: Sequence[Candidate] = result.frontier if rows == "frontier" else result.candidates
    table = [_HEADER, *(_row(c, result.optimum) for c in chosen)]
    widths = [max(len(r[i]) for r in table) for i in range(len(_HEADER))]
    left = {0, 1}
    lines = []
    for k, r in enumerate(table):
        cells = [
            cell.ljust(w) if i in left else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    s = result.settings
    head = [
        f"budget {format_flops(result.budget_flops)} per request "
        f"(text {s['text_tokens']} tokens, {s['decode_tokens']} decode steps, batch {s['batch']}, "
        f"LM head on {s['lm_head']} positions, {'with' if s['include_vision'] else 'without'} vision tower)",
        f"law: {result.law}",
        f"{'Pareto frontier' if rows == 'frontier' else 'all candidates'}: "
        f"{len(chosen)} of {len(result.candidates)} candidates",
    ]
    if result.optimum is None:
        foot = "optimum: nothing fits the budget"
    else:
        o = result.optimum
        foot = (
            f"optimum: {o.name} with {o.visual_tokens} visual tokens, "
            f"{format_flops(o.total_flops)}, predicted error {o.error:.4f}"
        )
    return "\n".join([*head, "", *lines, "", foot])


def plot_png(result: PlanResult, path: str | Path, title: str | None = None) -> Path:
    """Predicted error against FLOPs: one curve per model over its visual token counts, the
    Pareto frontier, the budget and the optimum. Writes a PNG (matplotlib, Agg backend)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(8, 5.5), dpi=120)
    FigureCanvasAgg(fig)  # Agg canvas: no pyplot, no GUI backend, no global state
    ax = fig.add_subplot()
    names = list(dict.fromkeys(c.name for c in result.candidates))
    cmap = matplotlib.colormaps["viridis"]
    for k, name in enumerate(names):
        pts = sorted((c for c in result.candidates if c.name == name), key=lambda c: c.visual_tokens)
        color = cmap(k / max(1, len(names) - 1))
        ax.plot([c.total_flops for c in pts], [c.error for c in pts], "-o", color=color, ms=3, lw=1.2, label=name)
        for c in (pts[0], pts[-1]):
            ax.annotate(
                f"V={c.visual_tokens}",
                (c.total_flops, c.error),
                fontsize=6,
                color=color,
                xytext=(3, 2),
                textcoords="offset points",
            )
    ax.plot(
        [c.total_flops for c in result.frontier],
        [c.error for c in result.frontier],
        "k--",
        lw=1.5,
        label="Pareto frontier",
    )
    ax.axvline(result.budget_flops, color="tab:red", lw=1, ls=":", label=f"budget {result.budget_flops:.3g}")
    if result.optimum is not None:
        o = result.optimum
        ax.plot(
            [o.total_flops], [o.error], "*", color="tab:red", ms=14, label=f"optimum: {o.name}, V={o.visual_tokens}"
        )
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs per request")
    ax.set_ylabel("predicted error")
    ax.set_title(title or "inference-optimal (LLM, visual tokens)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
