"""Per-key affine normalization whose statistics live in the model's state_dict (so checkpoints are self-contained).

    normalize(key, x)   = (x - offset) * scale        x: (..., *shape)
    unnormalize(key, y) = y / scale + offset

Modes: "minmax" maps the fit data to [-1, 1]; "meanstd" to zero mean, unit std; "identity" leaves it.
Dims whose range (minmax) or std (meanstd) is below 1e-4 get scale 1 and are only centred.

Hygiene (every task): a dim whose fitted range is below ``min_range`` (default 1 cm / 0.01 units;
``min_range / 2`` as a minimum std) is scaled as if its range were ``min_range``, so a dim that barely
moved in the demos (a button's 1 mm travel, a block's tilt) does not turn a small change at evaluation
into a huge input; ``normalize`` clips its output to +-``clip`` (default 3 for minmax, i.e. one range
beyond the fitted one, 5 std for meanstd); and the first input of a key that lands beyond
+-``warn_at`` normalized units (before clipping; default 2 for minmax, 4 for meanstd) is reported by
a warning naming the key, the dim, the value and the fitted range. None turns a rule off.
Buffers per key, named ``stats.<key>.{scale, offset, min, max, mean, std, fitted}``; '.' and '%' in keys are
escaped as '%2E' and '%25' since module names cannot contain '.'.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

MODES = ("minmax", "meanstd", "identity")
_EPS = 1e-4
MIN_RANGE = 0.01  # default floor of a dim's range (minmax) or twice its std (meanstd), raw units
CLIP = {"minmax": 3.0, "meanstd": 5.0, "identity": None}  # default bound of normalized outputs
WARN_AT = {"minmax": 2.0, "meanstd": 4.0, "identity": None}  # default "far outside the fitted range"
_BLOCK = 1 << 22  # elements per block when computing statistics


def _fmt(lead: str, shape: tuple[int, ...]) -> str:
    return f"({', '.join([lead, *map(str, shape)])})"


def _escape(key: str) -> str:
    return key.replace("%", "%25").replace(".", "%2E")


class _Stats(nn.Module):
    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        for name in ("scale", "offset", "min", "max", "mean", "std"):
            self.register_buffer(name, torch.ones(shape) if name in ("scale", "std") else torch.zeros(shape))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))


def _moments(key: str, value, shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """(min, max, mean, std) over all leading dims of ``value`` (..., *shape), in float64, streamed in blocks."""
    x = value.detach() if isinstance(value, torch.Tensor) else np.asarray(value)
    lead = tuple(x.shape[: x.ndim - len(shape)])
    if x.ndim <= len(shape) or tuple(x.shape[len(lead) :]) != shape:
        raise ValueError(f"fit: data[{key!r}] has shape {tuple(x.shape)}, expected {_fmt('N', shape)}")
    x = x.reshape(-1, *shape)
    if len(x) == 0:
        raise ValueError(f"fit: data[{key!r}] has no rows")
    block = max(1, _BLOCK // max(1, int(np.prod(shape))))
    n, lo, hi, mean, m2 = 0, None, None, 0.0, 0.0
    for i in range(0, len(x), block):
        b = torch.as_tensor(x[i : i + block]).to("cpu", torch.float64)
        finite = torch.isfinite(b).reshape(len(b), -1).all(1)
        if not finite.all():
            row = i + int((~finite).nonzero()[0])
            where = f"row {row}" if len(lead) == 1 else f"index {tuple(int(j) for j in np.unravel_index(row, lead))}"
            raise ValueError(f"fit: data[{key!r}] has a non-finite value (NaN or inf) at {where}")
        b_mean = b.mean(0)
        b_lo, b_hi = b.amin(0), b.amax(0)
        lo = b_lo if lo is None else torch.minimum(lo, b_lo)
        hi = b_hi if hi is None else torch.maximum(hi, b_hi)
        delta, total = b_mean - mean, n + len(b)  # Chan et al. parallel mean/variance update
        m2 = m2 + ((b - b_mean) ** 2).sum(0) + delta**2 * n * len(b) / total
        mean, n = mean + delta * len(b) / total, total
    return lo, hi, mean, (m2 / n).sqrt()


class Normalizer(nn.Module):
    """Normalizer(shapes {key: feature shape}, mode, modes {key: mode} overriding ``mode`` per key).

    Built with identity parameters, so a checkpoint's state_dict loads into a fresh instance.
    ``min_range`` (raw units), ``clip`` and ``warn_at`` (normalized units, per mode when a dict) are the
    hygiene rules of the module docstring; they are settings, not statistics (not in the state_dict).
    """

    def __init__(self, shapes: dict[str, list[int]], mode: str = "minmax", modes: dict[str, str] | None = None,
                 min_range: float | None | str = "default", clip: float | dict[str, float | None] | None = None,
                 warn_at: float | dict[str, float | None] | None = None):
        super().__init__()
        if min_range == "default":  # the module defaults, read at construction (a benchmark may turn them off)
            min_range = MIN_RANGE
        for name, v in (("min_range", min_range), *((n, x) for n, d in (("clip", clip), ("warn_at", warn_at))
                                                     for x in (d.values() if isinstance(d, dict) else [d]))):
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
                raise ValueError(f"normalizer {name} must be a float > 0 or None, got {v!r}")
        self.min_range = float(min_range) if min_range is not None else None
        self._clip = dict(clip) if isinstance(clip, dict) else (dict(CLIP) if clip is None else {m: clip for m in MODES})
        self._warn_at = (dict(warn_at) if isinstance(warn_at, dict)
                         else (dict(WARN_AT) if warn_at is None else {m: warn_at for m in MODES}))
        self._warned: set[str] = set()  # keys already reported as far outside their fitted range
        modes = dict(modes or {})
        if unknown := sorted(set(modes) - set(shapes)):
            raise ValueError(f"modes has keys {unknown} that are not in shapes {sorted(shapes)}")
        self.shapes = {k: tuple(int(d) for d in s) for k, s in shapes.items()}
        self.modes = {k: modes.get(k, mode) for k in shapes}
        for key, m in self.modes.items():
            if m not in MODES:
                raise ValueError(f"normalizer mode for {key!r} is {m!r}; expected one of {MODES}")
        self.stats = nn.ModuleDict()
        for key, shape in self.shapes.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"normalizer keys must be non-empty strings, got {key!r}")
            try:
                self.stats[_escape(key)] = _Stats(shape)
            except KeyError as e:
                raise ValueError(f"normalizer key {key!r} is a reserved name ({e})") from e
        self._checked: set[str] = set()  # keys seen fitted; cleared on load_state_dict

    def _load_from_state_dict(self, *args, **kwargs):
        self._checked.clear()
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def fit(self, data: dict[str, np.ndarray | torch.Tensor]) -> Normalizer:
        """Compute the parameters of every key in ``data`` {key: (..., *shape)}; all keys are checked first."""
        for key in data:
            if key not in self.shapes:
                raise ValueError(f"fit: unknown key {key!r}; normalizer keys are {sorted(self.shapes)}")
        moments = {key: _moments(key, value, self.shapes[key]) for key, value in data.items()}
        for key, (lo, hi, mean, std) in moments.items():
            mode, one = self.modes[key], torch.ones_like(lo)
            floor = max(_EPS, self.min_range or 0.0)
            if mode == "minmax":
                rng = hi - lo
                scale, offset = torch.where(rng >= _EPS, 2 / rng.clamp_min(floor), one), (hi + lo) / 2
            elif mode == "meanstd":
                scale, offset = torch.where(std >= _EPS, 1 / std.clamp_min(max(_EPS, floor / 2)), one), mean
            else:
                scale, offset = one, torch.zeros_like(lo)
            s = self.stats[_escape(key)]
            for name, v in dict(scale=scale, offset=offset, min=lo, max=hi, mean=mean, std=std).items():
                getattr(s, name).copy_(v)
            s.fitted.fill_(True)
            self._checked.add(key)
            self._warned.discard(key)
        return self

    def _module(self, key: str) -> _Stats:
        if key not in self.shapes:
            raise KeyError(f"normalizer has no key {key!r}; keys are {sorted(self.shapes)}")
        return self.stats[_escape(key)]

    def _params(self, key: str, x: torch.Tensor) -> _Stats:
        s = self._module(key)
        if key not in self._checked:
            if not bool(s.fitted):
                raise RuntimeError(f"normalizer for {key!r} is not fitted; call fit() or load a checkpoint's state_dict")
            self._checked.add(key)
        shape = self.shapes[key]
        if x.ndim < len(shape) or tuple(x.shape[x.ndim - len(shape) :]) != shape:
            raise ValueError(f"normalizer {key!r}: input has shape {tuple(x.shape)}, expected {_fmt('...', shape)}")
        return s

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """Raw x (..., *shape) -> normalized, in x's dtype (float32 for integer input) and device; clipped
        to +-clip, with a warning the first time an input lands beyond +-warn_at."""
        s = self._params(key, x)
        x = x if x.is_floating_point() else x.float()
        y = (x - s.offset.to(x)) * s.scale.to(x)
        mode = self.modes[key]
        warn_at, clip = self._warn_at.get(mode), self._clip.get(mode)
        if warn_at is not None and key not in self._warned and y.numel():
            self._warn_far(key, x, y, s, warn_at, clip)
        return y.clamp(-clip, clip) if clip is not None else y

    def _warn_far(self, key: str, x: torch.Tensor, y: torch.Tensor, s: _Stats, warn_at: float, clip) -> None:
        flat = y.detach().abs().reshape(-1, int(np.prod(self.shapes[key])) if self.shapes[key] else 1)
        worst = flat.amax(0)
        if not bool((worst > warn_at).any()):
            return
        self._warned.add(key)
        dim = int(worst.argmax())
        row = int(flat[:, dim].argmax())
        raw = float(x.detach().reshape(flat.shape)[row, dim])
        lo, hi = float(s.min.reshape(-1)[dim]), float(s.max.reshape(-1)[dim])
        idx = tuple(int(i) for i in np.unravel_index(dim, self.shapes[key])) if self.shapes[key] else ()
        warnings.warn(f"normalizer {key!r}{list(idx)}: input {raw:.4g} is {float(worst[dim]):.1f} normalized units out "
                      f"(fitted range [{lo:.4g}, {hi:.4g}]; warn_at {warn_at}); "
                      + (f"clipped to +-{clip}" if clip is not None else "not clipped")
                      + "; reported once per key", RuntimeWarning, stacklevel=3)

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """Normalized x (..., *shape) -> raw units."""
        s = self._params(key, x)
        x = x if x.is_floating_point() else x.float()
        return x / s.scale.to(x) + s.offset.to(x)

    @torch.no_grad()
    def set_range(self, key: str, dims: list[int], low: float, high: float) -> None:
        """Fitted ``dims`` of 1-D ``key`` take the known range [low, high] instead of the data's (e.g. a unit
        quaternion's components, whichever sign the demos happened to carry): min/max become it, minmax maps it to
        [-1, 1], meanstd leaves those dims as they are (mean 0, std 1)."""
        s = self._module(key)
        if not bool(s.fitted) or len(self.shapes[key]) != 1 or not all(0 <= d < self.shapes[key][0] for d in dims):
            raise ValueError(f"set_range: {key!r} must be a fitted 1-D key and dims {dims} inside its {self.shapes[key]}")
        if not low < high:
            raise ValueError(f"set_range: need low < high, got [{low}, {high}]")
        i = torch.as_tensor(dims, dtype=torch.long)
        s.min[i], s.max[i] = low, high
        if self.modes[key] == "minmax":
            s.scale[i], s.offset[i] = 2 / (high - low), (high + low) / 2
        elif self.modes[key] == "meanstd":
            s.mean[i], s.std[i], s.scale[i], s.offset[i] = 0.0, 1.0, 1.0, 0.0

    def get_stats(self, key: str) -> dict[str, torch.Tensor]:
        """{scale, offset, min, max, mean, std} of ``key`` (copies), for inspection and export."""
        s = self._module(key)
        return {name: getattr(s, name).detach().clone() for name in ("scale", "offset", "min", "max", "mean", "std")}
