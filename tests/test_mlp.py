import pytest
import torch

from fastdiff.models import MLPDenoiser


def test_output_shape_and_dim():
    model = MLPDenoiser(dim=3, hidden=16, num_layers=2, time_embed_dim=8)
    out = model(torch.randn(5, 3), torch.arange(5))
    assert out.shape == (5, 3)
    assert torch.isfinite(out).all()


def test_timestep_broadcast_and_dependence():
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=32, num_layers=2).eval()
    x = torch.randn(4, 2)
    with torch.no_grad():
        one = model(x, torch.tensor(12.0).expand(4))  # one timestep for the batch: embedded once
        for t in (12, 12.0, torch.tensor(12), torch.tensor([12])):
            assert torch.equal(model(x, t), one), t
        torch.testing.assert_close(model(x, torch.full((4,), 12)), one, atol=1e-6, rtol=0)  # embedded per row
        assert not torch.allclose(model(x, 500), one)


def test_rows_are_independent():
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=32, num_layers=2).eval()
    x, t = torch.randn(4, 2), torch.tensor([1, 10, 100, 999])
    with torch.no_grad():
        batched = model(x, t)
        for i in range(4):
            torch.testing.assert_close(
                batched[i : i + 1], model(x[i : i + 1], t[i : i + 1]), atol=1e-6, rtol=0
            )


def test_timestep_table_rows_replace_the_time_path():
    """`timestep_table(ts)[i]` given as `time_row` gives forward(x, ts[i]) (1e-6: one batched matmul against a
    one-row one); a row per sample too; a row of the wrong shape is refused by name."""
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=32, num_layers=3, time_embed_dim=16).eval()
    x, ts = torch.randn(4, 2), torch.tensor([999.0, 500.0, 20.0, 0.0])
    with torch.no_grad():
        table = model.timestep_table(ts)
        assert table.shape == (4, 3, 32)
        for i in range(4):
            torch.testing.assert_close(
                model(x, ts[i], time_row=table[i : i + 1]), model(x, ts[i]), atol=1e-6, rtol=0
            )
        torch.testing.assert_close(model(x, ts, time_row=table), model(x, ts), atol=1e-6, rtol=0)
        with pytest.raises(ValueError, match="time_row must have shape"):
            model(x, ts, time_row=table[:, :2])


def test_trains_on_a_fixed_batch():
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=32, num_layers=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, t, target = torch.randn(64, 2), torch.randint(0, 1000, (64,)), torch.randn(64, 2)
    losses = []
    for _ in range(50):
        loss = (model(x, t) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bad_input():
    model = MLPDenoiser(hidden=16, num_layers=1)
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(4, 3), 1)
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(4), 1)
    with pytest.raises(TypeError, match="x must be"):
        model(torch.zeros(4, 2, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="t must have shape"):
        model(torch.randn(4, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="hidden"):
        MLPDenoiser(hidden=0)
    with pytest.raises(ValueError, match="num_layers"):
        MLPDenoiser(num_layers=True)
