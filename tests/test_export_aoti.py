"""fastdiff.export.aoti.load_package: the C++ package loader, with the public loader as its fallback."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from fastdiff.export import aoti


class _TwoConds(nn.Module):
    """A denoiser with two keyword conditions, so that their order in the package matters."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.emb = nn.Embedding(4, 3)

    def forward(self, x, t, *, labels, scale):
        return self.lin(x) * t[:, None] + self.emb(labels) * scale


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    torch.manual_seed(0)
    model = _TwoConds().eval()
    path = tmp_path_factory.mktemp("aoti") / "model.pt2"
    batch = torch.export.Dim("batch", min=1, max=64)
    args = (torch.randn(2, 3), torch.rand(2))
    conds = {"scale": torch.rand(2, 1), "labels": torch.tensor([1, 2])}
    dynamic = {"x": {0: batch}, "t": {0: batch}, "labels": {0: batch}, "scale": {0: batch}}
    with torch.no_grad():
        program = torch.export.export(model, args, conds, dynamic_shapes=dynamic)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return model, path


def _inputs(batch=5):
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(batch, 3, generator=g), torch.rand(batch, generator=g)
    return (
        x,
        t,
        {"labels": torch.randint(0, 4, (batch,), generator=g), "scale": torch.rand(batch, 1, generator=g)},
    )


def test_the_cpp_loader_runs_the_package_as_the_public_one(package):
    """Keyword conditions in any order, another batch size: equal to the public loader and to eager (1e-6);
    a missing or extra condition is a TypeError naming the package's inputs."""
    model, path = package
    fn = aoti.load_package(path)
    assert (
        not hasattr(fn, "loader") or fn.__module__ == aoti.__name__
    )  # the C++ loader, not the public wrapper
    x, t, cond = _inputs()
    out = fn(x, t, scale=cond["scale"], labels=cond["labels"])
    public = torch._inductor.aoti_load_package(str(path))
    torch.testing.assert_close(out, public(x, t, **cond), atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x, t, **cond), atol=1e-6, rtol=0)
    with pytest.raises(TypeError, match=r"keyword inputs \['labels', 'scale'\]"):
        fn(x, t, labels=cond["labels"])


def test_a_torch_whose_loader_differs_gets_the_public_one(package, monkeypatch):
    """A call spec this module cannot read (as a torch that changed its format would give) falls back to
    torch._inductor.aoti_load_package."""
    model, path = package

    def unreadable(spec):
        raise ValueError("unknown treespec format")

    monkeypatch.setattr(aoti, "pytree", types.SimpleNamespace(treespec_loads=unreadable))
    fn = aoti.load_package(path)
    assert fn.__module__ != aoti.__name__
    x, t, cond = _inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(fn(x, t, **cond), model(x, t, **cond), atol=1e-6, rtol=0)
