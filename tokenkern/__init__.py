"""tokenkern: fused kernels that score, select and merge visual tokens.

The public ops are defined one family per module in :mod:`tokenkern.ops` and re-exported
here with :func:`prune`; each is also reachable as ``torch.ops.tokenkern.<name>`` (batched
inputs only; the functions here also accept a single sample where noted). Selection ops return
int64 indices sorted ascending, break score ties by the lower index, and return float32 scores
whatever the input dtype.

Arguments: counts, seeds and positions are Python ints (not bools, floats or tensors, 0-d
ones included) within int64 and their documented ranges; scale, temperature and tau are
finite Python numbers within float32's range; flags are bools. These functions check every
argument before dispatching, with the message ``tokenkern.<op>: <argument> must be ...``
(a wrong type raises an error that is both a TypeError and a ValueError). An empty batch
(B = 0) gives empty outputs; empty token, feature or head dimensions are refused unless an
op documents otherwise.
"""

from __future__ import annotations

from . import ops
from .ops import *  # noqa: F403  (the ops' public functions, ops.__all__)

__version__ = "0.1.0"
__all__ = [*ops.__all__, "prune"]


def prune(model, method: str = "fastv", keep: float | int | None = None, **options):
    """Make a transformers VLM prune its visual tokens; returns a handle whose remove()
    restores the model. keep None: 0.25, or prumerge+'s released adaptive count. See
    :mod:`tokenkern.integrations` for methods, options and models."""
    from .integrations import prune as _prune

    return _prune(model, method, keep, **options)
