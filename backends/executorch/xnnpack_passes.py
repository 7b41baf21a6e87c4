"""XNNPACK's delegate passes, run only where they can act: the same ``.pte``, byte for byte, lowered faster.

``XnnpackBackend.preprocess`` runs every pass of ``XNNPACKPassManager`` on every partition, and each pass
re-traces the partition under fake tensors with the symbolic sequence length. Half of that time goes to passes
whose target ops a decoder-only LM never has: bilinear upsampling, batch norm, 1-D convolution, PReLU, and the
decomposed-softmax SDPA pattern (our attention is ExecuTorch's ``custom_sdpa``, outside the delegate). Each of
those passes rewrites only nodes of its trigger ops, so on a partition without them it returns the graph it
was given: skipping it there changes nothing but the time. SmolLM2's first 2 layers (8da4w-attn): lowering
33.9 → 24.2 s with an identical ``.pte`` (sha256); the test in ``tests/backends/test_executorch.py`` checks the
same on a tiny model. A partition that holds any trigger op runs the pass as before.

ExecuTorch (1.x) offers no option for this: preprocess honours only a compile spec that restricts the list to the
linear conversion. So the pass manager's default list is filtered for the duration of one lowering, and a
version of ExecuTorch without the names below leaves lowering as it was (nothing is filtered).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

# pass class name → substrings of the op names (edge dialect, lower case) it can act on. Conv1dUnsqueezePass
# also runs after batch norm, which DecomposeBatchNorm turns into a convolution.
PASS_TRIGGERS: dict[str, tuple[str, ...]] = {
    "ConvertToUpsampleBilinear2d": ("upsample", "index"),
    "ConvertToSDPAPass": ("softmax",),
    "FuseBatchNormPass": ("batch_norm",),
    "DecomposeBatchNorm": ("batch_norm",),
    "Conv1dUnsqueezePass": ("convolution", "batch_norm"),
    "PReLUReshapePass": ("prelu",),
}


def op_names(exported_program) -> set[str]:
    """Lower-case names of the call_function targets of a program's graph."""
    return {getattr(n.target, "__name__", str(n.target)).lower()
            for n in exported_program.graph.nodes if n.op == "call_function"}


def needed(pass_name: str, ops: set[str]) -> bool:
    """Whether ``pass_name`` can act on a graph with ``ops`` (passes not in :data:`PASS_TRIGGERS`: always)."""
    triggers = PASS_TRIGGERS.get(pass_name)
    return triggers is None or any(t in op for op in ops for t in triggers)


@contextlib.contextmanager
def only_passes_that_can_act() -> Iterator[None]:
    """While active, XNNPACK's default pass list skips passes none of whose trigger ops a partition has."""
    try:
        from executorch.backends.xnnpack._passes import XNNPACKPassManager
    except ImportError:  # a layout this was not written for: lower as ExecuTorch does
        yield
        return
    original = XNNPACKPassManager.__init__

    def __init__(self, exported_program, passes=None) -> None:
        original(self, exported_program, passes)
        if not passes:  # the default list (an explicit one is the caller's choice)
            ops = op_names(exported_program)
            self.passes = [p for p in self.passes if needed(p.__name__, ops)]

    XNNPACKPassManager.__init__ = __init__
    try:
        yield
    finally:
        XNNPACKPassManager.__init__ = original
