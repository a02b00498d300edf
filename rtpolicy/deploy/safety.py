"""Last line before the robot: ``SafetyLayer.filter`` runs on every command of every control tick.

Order: e-stop latched, invalid observation (its own kind, see ``OBS_HOLDS``), stale observation, empty
queue (command None), non-finite command values -> hold; otherwise clamp to [lower, upper], then the
per-step velocity limit, then the acceleration limit. Each hold kind has its own counter in ``counts``.

The e-stop latch is an ``EstopLatch`` the layer is given, not part of the layer: the ROS node keeps one
for its whole life (and optionally in a state file), so building a new layer (reconfiguring) or a new
process never clears it; only ``EstopLatch.clear`` does.

"Hold" keeps the last safe command on absolute dims (joint or gripper positions) and commands no
motion (0) on delta dims (relative, velocity-like commands such as Meta-World's end-effector
displacement); holding is always allowed and leaves the per-step velocity at 0.

Velocities are per control step: v = cmd - last on an absolute dim, v = cmd on a delta dim;
|v| <= max_velocity * dt and |v - v_last| <= max_acceleration * dt^2. An absolute dim also never moves
faster than it can still brake to a stop at its bound under the acceleration limit, so the position,
velocity and acceleration limits all hold together on every command that is not a hold.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger("rtpolicy.deploy.safety")
# observation faults (rtpolicy.deploy.observation.Sample.kind) -> what the hold means
OBS_HOLDS = {
    "obs_missing_joint": "a configured joint is missing from the latest JointState",
    "obs_duplicate_joint": "the latest JointState names a joint twice",
    "obs_wrong_length": "a JointState field or an array has the wrong number of values",
    "obs_non_finite": "NaN or +-inf in an observation (after the float32 cast: 1e39 is inf)",
    "obs_out_of_range": "a value outside the bundle's training range plus the margin",
    "obs_bad_image": "an image that cannot be decoded or fitted to the policy's size",
    "obs_bad_stamp": "stale_by=stamp: a header stamp unset or further in the future than the clock-skew bound",
    "obs_no_task": "a multi-task policy and no task chosen yet",
    "obs_no_instruction": "a language-conditioned policy and no instruction yet",
}
HOLDS = ("estop", *OBS_HOLDS, "stale_obs", "empty_queue", "non_finite")
CLIPS = ("clamp", "velocity", "acceleration")
Vec = Sequence[float] | np.ndarray | float


@dataclass
class SafetyLimits:
    """Limits for a Da-dim command; max_velocity / max_acceleration may be scalars (every dim)."""

    lower: Vec  # (Da,) lowest command per dim, may be -inf
    upper: Vec  # (Da,) highest command per dim, may be +inf
    max_velocity: Vec = math.inf  # (Da,) units/s
    max_acceleration: Vec = math.inf  # (Da,) units/s^2
    stale_obs_s: float = 0.5  # observations older than this (seconds) hold the robot
    delta_dims: Sequence[int] = ()  # relative/velocity-like dims; the others are absolute

    def __post_init__(self):
        self.lower = self._vec("lower", self.lower, None)
        da = self.dim
        self.upper = self._vec("upper", self.upper, da)
        self.max_velocity = self._vec("max_velocity", self.max_velocity, da)
        self.max_acceleration = self._vec("max_acceleration", self.max_acceleration, da)
        if (bad := np.flatnonzero(self.lower > self.upper)).size:
            raise ValueError(f"SafetyLimits: lower > upper at dims {bad.tolist()}")
        for name in ("max_velocity", "max_acceleration"):
            if (bad := np.flatnonzero(getattr(self, name) <= 0)).size:
                raise ValueError(f"SafetyLimits.{name} must be > 0 (inf for no limit); dims {bad.tolist()} are not")
        if not self.stale_obs_s > 0:
            raise ValueError(f"SafetyLimits.stale_obs_s must be > 0 seconds, got {self.stale_obs_s}")
        dims = [int(d) for d in self.delta_dims]
        if len(set(dims)) != len(dims) or any(not 0 <= d < da for d in dims):
            raise ValueError(f"SafetyLimits.delta_dims must be distinct indices in [0, {da}), got {list(self.delta_dims)}")
        if bad := [d for d in dims if not self.lower[d] <= 0 <= self.upper[d]]:
            raise ValueError(f"SafetyLimits: delta dims {bad} hold at 0, so 0 must lie in [lower, upper] there")
        self.delta_dims = tuple(dims)

    @staticmethod
    def _vec(name: str, x: Vec, da: int | None) -> np.ndarray:
        a = np.asarray(x, dtype=np.float64)
        if a.ndim == 0 and da is not None:
            a = np.full(da, float(a))
        if a.ndim != 1 or a.size == 0 or (da is not None and a.size != da):
            want = f"{da} entries (one per action dim)" if da is not None else "one entry per action dim"
            raise ValueError(f"SafetyLimits.{name} must be 1-D with {want}, got shape {a.shape}")
        if np.isnan(a).any():
            raise ValueError(f"SafetyLimits.{name} has NaN at dims {np.flatnonzero(np.isnan(a)).tolist()}")
        return a

    @property
    def dim(self) -> int:
        return len(self.lower)


class EstopLatch:
    """The latched e-stop: ``latch(reason)`` sets it, only ``clear()`` clears it.

    With ``path`` the state is also kept in that small JSON file (written atomically on every change,
    read on construction), so a new process started on the same file begins latched. A file that
    exists but cannot be read as this JSON latches too (fail safe), with the reason naming the file.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.latched, self.reason, self.path = False, "", None
        self.attach(path)

    def attach(self, path: str | os.PathLike | None) -> None:
        """Keep the state in ``path`` from now on (None: memory only): a latch in the file latches here,
        a latch here is written to the file."""
        self.path = Path(path) if path else None
        if self.path is None:
            return
        if self.path.exists():
            try:
                doc = json.loads(self.path.read_text())
                latched, reason = doc["estopped"], str(doc.get("reason", ""))
                if not isinstance(latched, bool):
                    raise TypeError(f"estopped is {latched!r}, not true/false")
            except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
                latched, reason = True, f"e-stop state file {self.path} unreadable ({type(e).__name__}: {e}): latched to be safe"
            if latched and not self.latched:
                self.latched, self.reason = True, reason
                log.warning("safety e-stop latched from %s: %s", self.path, reason)
        self._write()

    def latch(self, reason: str = "requested") -> None:
        if not self.latched:
            self.latched, self.reason = True, reason
            log.warning("safety e-stop latched: %s", reason)
            self._write()

    def clear(self) -> None:
        if self.latched:
            self.latched, self.reason = False, ""
            log.warning("safety e-stop cleared")
            self._write()

    def _write(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"estopped": self.latched, "reason": self.reason, "time": time.time()}))
            os.replace(tmp, self.path)
        except OSError as e:  # the latch in memory still holds; a restart would not see it
            log.error("cannot write the e-stop state file %s: %s", self.path, e)


class SafetyLayer:
    """Filters commands (Da,) at a fixed control period ``dt`` (s), starting from ``initial_command``.

    ``counts`` counts interventions by kind, ``last_interventions`` lists those applied to the latest
    command. Each intervention logs a warning; a kind repeated on consecutive commands logs again only
    every ``log_every``-th time. ``estop``: the latch to obey (default: a new one of its own).
    """

    def __init__(self, limits: SafetyLimits, dt: float, initial_command: Vec, log_every: int = 100,
                 estop: EstopLatch | None = None):
        if not dt > 0 or log_every < 1:
            raise ValueError(f"SafetyLayer: need dt > 0 seconds and log_every >= 1, got dt={dt}, log_every={log_every}")
        self.limits, self.dt, self.log_every = limits, float(dt), log_every
        self.delta = np.zeros(limits.dim, dtype=bool)
        self.delta[list(limits.delta_dims)] = True
        self.vmax = limits.max_velocity * self.dt  # (Da,) per step
        self.amax = limits.max_acceleration * self.dt**2  # (Da,) change of per-step velocity
        self.counts = dict.fromkeys(HOLDS + CLIPS, 0)
        self.last_interventions: tuple[str, ...] = ()
        self._kinds: list[str] = []  # interventions of the command being filtered
        self.estop_latch = estop if estop is not None else EstopLatch()
        self._quiet = False  # True on the copies preview() filters with: they do not log
        self.reset(initial_command)

    def reset(self, command: Vec) -> None:
        """Re-seed the last safe command (e.g. the robot's state on activate); delta dims restart at 0."""
        c = self._check_shape(command)
        lim = self.limits
        if (bad := np.flatnonzero(~np.isfinite(c) | (c < lim.lower) | (c > lim.upper))).size:
            raise ValueError(f"SafetyLayer: command {c.tolist()} is non-finite or outside [lower, upper] "
                             f"at dims {bad.tolist()}")
        self.last = np.where(self.delta, 0.0, c)
        self.vel = np.zeros(lim.dim)

    def hold(self) -> np.ndarray:
        """The hold command (Da,): the last safe command on absolute dims, 0 on delta dims; counts nothing."""
        return np.where(self.delta, 0.0, self.last)

    @property
    def estopped(self) -> bool:
        return self.estop_latch.latched

    def estop(self, reason: str = "requested") -> None:
        self.estop_latch.latch(reason)

    def reset_estop(self) -> None:
        self.estop_latch.clear()

    def observation_hold(self, now: float, obs_stamp: float | None, obs_fault: tuple[str, str] | None = None
                         ) -> tuple[str, str] | None:
        """(kind, message) of the hold the observation causes, or None when it may drive the robot:
        ``obs_fault`` (an ``OBS_HOLDS`` kind and its reason) first, then staleness of ``obs_stamp``."""
        if obs_fault is not None:
            kind, reason = obs_fault
            return (kind if kind in OBS_HOLDS else "stale_obs"), f"{reason}, holding"
        if obs_stamp is None or now - obs_stamp > self.limits.stale_obs_s:
            age = "no observation" if obs_stamp is None else f"observation {now - obs_stamp:.3f} s old"
            return "stale_obs", f"{age} > {self.limits.stale_obs_s} s, holding"
        return None

    def _check_shape(self, command: Any) -> np.ndarray:
        c = np.asarray(command, dtype=np.float64)
        if c.shape != (self.limits.dim,):
            raise ValueError(f"SafetyLayer: command must have shape ({self.limits.dim},), got {c.shape}")
        return c

    def _note(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        if not self._quiet and (kind not in self.last_interventions or self.counts[kind] % self.log_every == 0):
            log.warning("safety %s: %s (%d so far)", kind, detail, self.counts[kind])
        self._kinds.append(kind)

    def _clip(self, kind: str, x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        y = np.clip(x, lo, hi)
        if (dims := np.flatnonzero(y != x)).size:
            self._note(kind, f"limited dims {dims.tolist()}")
        return y

    def filter(self, command: Vec | None, now: float, obs_stamp: float | None,
               obs_fault: tuple[str, str] | None = None) -> np.ndarray:
        """command (Da,) or None, the time now and the observation's stamp (same clock, s) -> safe command (Da,).

        ``obs_fault``: (kind, reason) when the observation is invalid (see ``observation_hold``)."""
        self._kinds: list[str] = []
        c = None if command is None else self._check_shape(command)
        if self.estopped:
            self._note("estop", "e-stop latched, holding")
        elif (obs := self.observation_hold(now, obs_stamp, obs_fault)) is not None:
            self._note(*obs)
        elif c is None:
            self._note("empty_queue", "no action queued for this step, holding")
        elif (bad := np.flatnonzero(~np.isfinite(c))).size:
            self._note("non_finite", f"non-finite values at dims {bad.tolist()}, holding")
        if self._kinds:
            out, self.vel = np.where(self.delta, 0.0, self.last), np.zeros(self.limits.dim)
        else:
            out = self._limit(c)
        self.last, self.last_interventions = out, tuple(self._kinds)
        return out.copy()

    def preview(self, commands: Sequence[Vec], now: float, obs_stamp: float | None) -> np.ndarray:
        """(n, Da): what ``filter`` would output for these future commands in a row, on a copy: this layer's
        state, counts and log are untouched (e.g. to publish a planned trajectory that obeys the limits)."""
        shadow = copy.copy(self)  # shares the limits and the e-stop latch; state arrays are replaced, not mutated
        shadow.counts, shadow._quiet = dict(self.counts), True
        return np.stack([shadow.filter(c, now, obs_stamp) for c in commands]) if len(commands) else np.empty((0, self.limits.dim))

    def _limit(self, cmd: np.ndarray) -> np.ndarray:
        """Clamp, then velocity, then acceleration; the braking cap (largest v with v + v^2/(2 amax) <= room
        to the bound) counts as acceleration. The velocity, acceleration and braking intervals pairwise
        share a point (the last velocity, 0, last velocity -+ amax), so in 1-D all three intersect."""
        lim, last = self.limits, self.last
        c = self._clip("clamp", cmd, lim.lower, lim.upper)
        v = np.where(self.delta, c, c - last)
        with np.errstate(invalid="ignore"):  # inf room -> inf cap
            room_up, room_down = lim.upper - last, last - lim.lower
            brake_up = np.where(np.isinf(room_up), np.inf, 2 * room_up / (1 + np.sqrt(1 + 2 * room_up / self.amax)))
            brake_down = np.where(np.isinf(room_down), np.inf, 2 * room_down / (1 + np.sqrt(1 + 2 * room_down / self.amax)))
        lo = np.maximum(-self.vmax, np.where(self.delta, lim.lower, -np.inf))
        hi = np.minimum(self.vmax, np.where(self.delta, lim.upper, np.inf))
        v1 = self._clip("velocity", v, lo, hi)
        a_lo = np.maximum(self.vel - self.amax, np.where(self.delta, -np.inf, -brake_down))
        a_hi = np.minimum(self.vel + self.amax, np.where(self.delta, np.inf, brake_up))
        v2 = np.clip(self._clip("acceleration", v1, a_lo, a_hi), lo, hi)
        self.vel = v2
        out = np.where(self.delta, v2, np.where(v2 == v, c, last + v2))
        return np.clip(out, lim.lower, lim.upper)  # guards rounding in last + v2 only
