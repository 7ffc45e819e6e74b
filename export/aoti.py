"""A denoiser compiled ahead of time by AOTInductor (`torch.export` + `torch._inductor.aoti_compile_and_package`),
loaded from its `.pt2` package in milliseconds: the compiled model a later process does not compile again.
`fastdiff.engine.candidates.Aoti` builds the package into the planner's cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastdiff.export.runtime import GraphDenoiser


class AotiDenoiser(GraphDenoiser):
    """A model compiled ahead of time by AOTInductor (`torch._inductor.aoti_load_package`), called as
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
        self._fn = torch._inductor.aoti_load_package(str(self.path))
        self._bind_source(source, None)

    @property
    def null_cond(self):
        """The source model's `null_cond` (AttributeError when it has none)."""
        return self._source.null_cond

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        self._check_call()
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        return self._fn(x, t.contiguous(), **cond)
