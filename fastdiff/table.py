"""The sampler table (v2): its column schema, `StepTable`, and the row math in plain PyTorch (`apply_row`).

Every sampler is, per model call, a linear combination with per-row scalar coefficients of a fixed set of buffers
(ARCHITECTURE.md "Table v2"). With x the state, m the model output after classifier-free guidance,
v the model's variance channels (learned variance only), h1..h3 the history (newest first), xs the corrected state
of the previous step (UniPC) and z fresh noise, row i computes

    x0      = a*x + b*m                         (then clipped, or dynamically thresholded)
    eps     = p*x + q*m
    xc      = xc_x*x + xc_s*xs + xc_0*x0 + xc_1*h1 + xc_2*h2 + xc_3*h3      (the corrector; x without xs)
    sigma_v = exp(0.5*(lv0 + lv1*v))            ("learned_range"; "learned" uses log(v) for v; 1 without)
    x_prev  = c*x0 + d*eps + e*xc + f1*h1 + f2*h2 + f3*h3 + s*sigma_v*z

then rotates the history (h3 <- h2 <- h1 <- x0 or eps of this row) and sets xs <- xc. The model sees k_in*x.
`apply_row` is that math, the reference every other implementation (the fused kernel, the engine) is tested against.
This module imports nothing from the kernels; the kernel imports the schema and the reference from here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

TABLE_COLUMNS = (
    "k_in",
    "a",
    "b",
    "p",
    "q",
    "xc_x",
    "xc_s",
    "xc_0",
    "xc_1",
    "xc_2",
    "xc_3",
    "c",
    "d",
    "e",
    "s",
    "f1",
    "f2",
    "f3",
    "lv0",
    "lv1",
)
COLUMN = {name: i for i, name in enumerate(TABLE_COLUMNS)}
# Missing columns of `StepTable.from_columns` take these values (every other column: 0).
IDENTITY = {"k_in": 1.0, "xc_x": 1.0}
HISTORY_KINDS = ("x0", "eps")
LEARNED_VARIANCES = ("learned", "learned_range")
MAX_HISTORY_SLOTS = 3

_HISTORY_COLUMNS = (("f1", "xc_1"), ("f2", "xc_2"), ("f3", "xc_3"))


@dataclass(frozen=True)
class StepTable:
    """One float64 row of TABLE_COLUMNS per model call, the timestep of each row, and the table-level constants.

    - `clip`: clamp x0 to [-clip, clip] (None: no clipping).
    - `threshold`: (ratio, max) of dynamic thresholding (diffusers' `_threshold_sample`), or None.
    - `history`: what the history buffers hold ("x0", "eps", or None), `history_slots` how many (0..3).
    - `uses_xs`: whether the corrector reads and writes xs (UniPC).
    - `learned_variance`: None, "learned" or "learned_range" (the model returns 2C channels).
    - `init_sigma`: x_T = init_sigma * standard normal (diffusers' `init_noise_sigma`).
    Columns a buffer the table does not have may not be used: the constructor checks that they hold their identity
    values, so every implementation may skip them.
    """

    coeffs: torch.Tensor
    timesteps: torch.Tensor
    clip: float | None = None
    kind: str = "custom"
    threshold: tuple[float, float] | None = None
    history: str | None = None
    history_slots: int = 0
    uses_xs: bool = False
    learned_variance: str | None = None
    init_sigma: float = 1.0
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)
    # Computed once: a traced step (torch.compile, torch.while_loop) reads it as a constant, not a tensor test.
    _scales_input: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = self.timesteps.numel() if isinstance(self.timesteps, torch.Tensor) else -1
        if not isinstance(self.timesteps, torch.Tensor) or self.timesteps.dim() != 1 or n < 1:
            raise ValueError("timesteps must be a non-empty 1-d tensor")
        if not isinstance(self.coeffs, torch.Tensor) or self.coeffs.dtype != torch.float64:
            raise ValueError("coeffs must be a float64 tensor")
        if self.coeffs.shape != (n, len(TABLE_COLUMNS)):
            raise ValueError(
                f"coeffs must have shape (num_steps, {len(TABLE_COLUMNS)}) = ({n}, {len(TABLE_COLUMNS)}), "
                f"got {tuple(self.coeffs.shape)}"
            )
        if not torch.isfinite(self.coeffs).all():
            raise ValueError("coeffs must be finite")
        if self.clip is not None and not (isinstance(self.clip, (int, float)) and self.clip > 0):
            raise ValueError(f"clip must be None or a positive number, got {self.clip!r}")
        if self.threshold is not None:
            ratio, top = self.threshold
            if not 0 <= ratio <= 1 or not top > 0:
                raise ValueError(f"threshold must be (ratio in [0, 1], max > 0), got {self.threshold!r}")
            if self.clip is not None:
                raise ValueError("a table either clips x0 or thresholds it dynamically, not both")
        if self.history not in (None, *HISTORY_KINDS):
            raise ValueError(f"history must be None or one of {HISTORY_KINDS}, got {self.history!r}")
        slots = self.history_slots
        if isinstance(slots, bool) or not isinstance(slots, int) or not 0 <= slots <= MAX_HISTORY_SLOTS:
            raise ValueError(f"history_slots must be an int in [0, {MAX_HISTORY_SLOTS}], got {slots!r}")
        if (self.history is None) != (slots == 0):
            raise ValueError("history (x0 or eps) and history_slots > 0 go together")
        if self.learned_variance not in (None, *LEARNED_VARIANCES):
            raise ValueError(
                f"learned_variance must be None or one of {LEARNED_VARIANCES}, got {self.learned_variance!r}"
            )
        sigma = self.init_sigma
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"init_sigma must be a positive finite number, got {self.init_sigma!r}")
        unused = [name for name, _ in _HISTORY_COLUMNS[slots:]] + [xc for _, xc in _HISTORY_COLUMNS[slots:]]
        if not self.uses_xs:
            unused += ["xc_s", "xc_0", "xc_1", "xc_2", "xc_3"]
        if self.learned_variance is None:
            unused += ["lv0", "lv1"]
        for name in dict.fromkeys(unused):
            expected = IDENTITY.get(name, 0.0)
            if not bool((self.column(name) == expected).all()):
                raise ValueError(
                    f"column {name!r} must be {expected:g} in every row of this table (history_slots={slots}, "
                    f"uses_xs={self.uses_xs}, learned_variance={self.learned_variance!r})"
                )
        if not self.uses_xs and not bool((self.column("xc_x") == 1).all()):
            raise ValueError(
                "column 'xc_x' must be 1 in every row of a table without xs (the corrector is off)"
            )
        object.__setattr__(self, "_scales_input", not bool((self.column("k_in") == 1).all()))

    @classmethod
    def from_columns(
        cls,
        timesteps: torch.Tensor | Sequence[float],
        *,
        kind: str = "custom",
        clip: float | None = None,
        threshold: tuple[float, float] | None = None,
        history: str | None = None,
        history_slots: int = 0,
        uses_xs: bool = False,
        learned_variance: str | None = None,
        init_sigma: float = 1.0,
        **columns: torch.Tensor | Sequence[float] | float,
    ) -> StepTable:
        """A table from named columns (arrays of one value per row, or one number for every row); missing columns
        take their identity values (k_in = 1, xc_x = 1, all others 0)."""
        ts = timesteps if isinstance(timesteps, torch.Tensor) else torch.as_tensor(timesteps)
        n = ts.numel()
        unknown = sorted(set(columns) - set(TABLE_COLUMNS))
        if unknown:
            raise ValueError(f"unknown table columns {unknown}; the columns are {TABLE_COLUMNS}")
        coeffs = torch.zeros(n, len(TABLE_COLUMNS), dtype=torch.float64)
        for name, i in COLUMN.items():
            value = columns.get(name, IDENTITY.get(name, 0.0))
            col = torch.as_tensor(value, dtype=torch.float64).flatten()
            if col.numel() not in (1, n):
                raise ValueError(f"column {name!r} has {col.numel()} values for {n} rows")
            coeffs[:, i] = col
        return cls(
            coeffs,
            ts,
            None if clip is None else float(clip),
            kind,
            None if threshold is None else (float(threshold[0]), float(threshold[1])),
            history,
            history_slots,
            bool(uses_xs),
            learned_variance,
            float(init_sigma),
        )

    def __len__(self) -> int:
        return self.timesteps.numel()

    def on(self, device: torch.device | str) -> torch.Tensor:
        """The float32 coefficient table on `device` (copied once per device, then cached)."""
        device = torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = self.coeffs.to(device=device, dtype=torch.float32)
        return self._on_device[device]

    def column(self, name: str) -> torch.Tensor:
        """One coefficient column by name (float64, one value per row)."""
        if name not in COLUMN:
            raise ValueError(f"unknown column {name!r}; the columns are {TABLE_COLUMNS}")
        return self.coeffs[:, COLUMN[name]]

    def noisy_steps(self) -> list[int]:
        """Indices of the rows that draw noise (s != 0), in the order the loop draws it."""
        return torch.nonzero(self.column("s")).flatten().tolist()

    @property
    def scales_input(self) -> bool:
        """Whether some row's model input is not x itself (k_in != 1)."""
        return self._scales_input

    @property
    def multistep(self) -> bool:
        """Whether rows read state carried from earlier rows besides x (history or xs)."""
        return self.history_slots > 0 or self.uses_xs

    def new_state(
        self,
        shape: Sequence[int],
        device: torch.device | str,
        dtype: torch.dtype,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Zeroed (history, xs) buffers for one sampling run (None where the table has no such buffer), each sample
        buffer in `memory_format` (the state's layout, so that a fused step updates them in place)."""
        shape = tuple(shape)
        history = xs = None
        if self.history_slots:
            flat = (self.history_slots * shape[0], *shape[1:])
            history = torch.empty(flat, device=device, dtype=dtype, memory_format=memory_format).zero_()
            history = history.view(self.history_slots, *shape)
        if self.uses_xs:
            xs = torch.empty(shape, device=device, dtype=dtype, memory_format=memory_format).zero_()
        return history, xs


def sampler_table(sampler: Any) -> StepTable:
    """The StepTable of a fastdiff sampler (TypeError for anything else)."""
    table = getattr(sampler, "table", None)
    if not isinstance(table, StepTable):
        raise TypeError(
            f"sampler must be a fastdiff Sampler (e.g. a DDIMSampler), got {type(sampler).__name__}"
        )
    return table


def threshold_scale(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding's per-sample scale s = clamp(quantile(|x0|, ratio), 1, max_value), shape (batch,).

    The quantile is taken over all elements of each sample in float32 (float64 input stays float64), as diffusers'
    `_threshold_sample` does.
    """
    flat = x0.reshape(x0.shape[0], -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1)
    return s.clamp(min=1.0, max=max_value)


def limit_x0(
    x0: torch.Tensor,
    clip: float | None = None,
    threshold: tuple[float, float] | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x0 clipped to [-clip, clip], or dynamically thresholded (`threshold` = (ratio, max), or its per-sample
    `scale` precomputed by `threshold_scale`): clamp(x0, -s, s) / s per sample."""
    if threshold is not None or scale is not None:
        s = threshold_scale(x0, *threshold) if scale is None else scale
        s = s.to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
        return torch.minimum(torch.maximum(x0, -s), s) / s
    return x0 if clip is None else x0.clamp(-clip, clip)


def apply_row(
    row: torch.Tensor,
    x: torch.Tensor,
    m: torch.Tensor,
    *,
    m_uncond: torch.Tensor | None = None,
    guidance_scale: float | torch.Tensor = 1.0,
    noise: torch.Tensor | None = None,
    variance: torch.Tensor | None = None,
    learned_variance: str | None = None,
    history: torch.Tensor | None = None,
    history_kind: str | None = None,
    xs: torch.Tensor | None = None,
    clip: float | None = None,
    threshold: tuple[float, float] | None = None,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One row of the table in plain PyTorch: (x_prev, new history, new xs); the inputs are not modified.

    `row` holds TABLE_COLUMNS (k_in is not used here: the caller scales the model input). `m` is the model output
    (its first C channels), `m_uncond` the unconditional one for classifier-free guidance `u + w*(m - u)`.
    `variance` is the model's variance channels (needs `learned_variance`); `history` a (slots, *x.shape) buffer,
    newest first, holding `history_kind` ("x0" or "eps"); `xs` the corrected state of the previous row. Columns
    of buffers that are not given are not read. `threshold` is (ratio, max) of dynamic thresholding; `scale` may
    give its per-sample scale precomputed (`threshold_scale`). The
    results have x's dtype (history and xs: their own). Math in float32 whatever the storage dtype, as in the kernel.
    """
    col = row.float().unbind()
    k = COLUMN
    xf = x.float()
    mf = m.to(xf.dtype)
    if m_uncond is not None:
        u = m_uncond.to(xf.dtype)
        mf = u + guidance_scale * (mf - u)
    x0 = limit_x0(col[k["a"]] * xf + col[k["b"]] * mf, clip, threshold, scale)
    eps = col[k["p"]] * xf + col[k["q"]] * mf
    slots = 0 if history is None else history.shape[0]
    hs = [history[j].to(xf.dtype) for j in range(slots)]
    if xs is None:
        xc = xf
    else:
        xc = col[k["xc_x"]] * xf + col[k["xc_s"]] * xs.to(xf.dtype) + col[k["xc_0"]] * x0
        for j in range(slots):
            xc = xc + col[k[f"xc_{j + 1}"]] * hs[j]
    out = col[k["c"]] * x0 + col[k["d"]] * eps + col[k["e"]] * xc
    for j in range(slots):
        out = out + col[k[f"f{j + 1}"]] * hs[j]
    if noise is not None:
        z = col[k["s"]] * noise.to(xf.dtype)
        if variance is not None:
            v = variance.to(xf.dtype)
            if learned_variance == "learned":
                v = v.log()
            elif learned_variance != "learned_range":
                raise ValueError(
                    f"learned_variance must be one of {LEARNED_VARIANCES} with variance=, got {learned_variance!r}"
                )
            z = torch.exp(0.5 * (col[k["lv0"]] + col[k["lv1"]] * v)) * z
        out = out + z
    new_history = None
    if history is not None:
        if history_kind not in HISTORY_KINDS:
            raise ValueError(f"history_kind must be one of {HISTORY_KINDS}, got {history_kind!r}")
        push = (x0 if history_kind == "x0" else eps).to(history.dtype)
        new_history = torch.cat([push.unsqueeze(0), history[: slots - 1]])
    new_xs = None if xs is None else xc.to(xs.dtype)
    return out.to(x.dtype), new_history, new_xs


def table_row_kwargs(table: StepTable) -> dict[str, Any]:
    """The keyword arguments of `apply_row` (and `sampler_step`) that come from the table's constants."""
    return {
        "clip": table.clip,
        "threshold": table.threshold,
        "history_kind": table.history,
        "learned_variance": table.learned_variance,
    }
