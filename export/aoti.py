"""A denoiser compiled ahead of time by AOTInductor (`torch.export` + `torch._inductor.aoti_compile_and_package`),
loaded from its `.pt2` package in milliseconds: the compiled model a later process does not compile again.
`fastdiff.engine.candidates.Aoti` builds the package into the planner's cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from fastdiff.export.runtime import GraphDenoiser


def load_package(path: Path) -> Callable[..., torch.Tensor]:
    """The packaged model as `fn(x, t, **cond)`.

    Through the C++ package loader (`torch._C._aoti.AOTIModelPackageLoader`, 8 ms): the public
    `torch._inductor.aoti_load_package` first imports torch._inductor, 2.5 s in a fresh process, which was most of
    what a cached package cost a `fastdiff sample` command. A torch whose loader differs, or a package whose inputs
    are not (x, t, keyword tensors), gets the public one.
    """
    try:
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        in_spec, out_spec = (pytree.treespec_loads(s) for s in loader.get_call_spec())
        keys = list(in_spec.child(1).context)  # the keyword inputs, in the package's order
        # (x, t) and one tensor per keyword, checked once here: a call then lists its inputs in that order
        plain = pytree.tree_flatten(((0, 0), dict.fromkeys(keys, 0)))[1] == in_spec
    except (AttributeError, TypeError, ValueError, IndexError, RuntimeError):
        plain = False
    if not plain:
        from torch import _inductor

        return _inductor.aoti_load_package(str(path))
    expected = sorted(keys)

    def run(x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        if sorted(cond) != expected:
            raise TypeError(f"this package takes the keyword inputs {expected}, got {sorted(cond)}")
        return pytree.tree_unflatten(loader.run([x, t, *(cond[k] for k in keys)]), out_spec)

    return run


class AotiDenoiser(GraphDenoiser):
    """A model compiled ahead of time by AOTInductor (`load_package`), called as
    `denoiser(x, t, **cond)`; it holds a copy of the weights, so `source` is watched as for the other exported
    denoisers (`GraphDenoiser`), and its null condition is the source's."""

    _stale_fix = (
        "compile it again from the new weights (SamplingEngine(..., backend='auto') does so by itself)"
    )

    def __init__(self, path: Path, source: torch.nn.Module) -> None:
        self.path = Path(path)
        self.inputs = []
        self.null_label = None
        self._source = source
        self._fn = load_package(self.path)
        self._bind_source(source, None)

    @property
    def null_cond(self):
        """The source model's `null_cond` (AttributeError when it has none)."""
        return self._source.null_cond

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        self._check_call()
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        return self._fn(x, t.contiguous(), **cond)
