"""Runtime between a policy and a control loop: action queue, inference thread, steady ticker.

Control steps are integers counted by the control loop: step k happens at t0 + k*dt on a steady clock.
A chunk (Ha, Da) computed from the observation of step ``obs_step`` holds in row i the action for step
``obs_step + i``. It reaches the queue at ``current_step``; rows for steps < current_step are past due
and dropped, so ``current_step - obs_step`` is the chunk's delay in control steps:

    step         obs_step ... current_step-1 | current_step ... obs_step+Ha-1
    chunk row    0        ... delay-1        | delay        ... Ha-1
                 dropped (inference time)    | queued, blended with what is already queued

None of this needs ROS: the rclpy node, the simulator runner and the tests drive the same classes.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable

import numpy as np

log = logging.getLogger("rtpolicy.deploy")
BLENDS = ("latest", "ensemble", "rtc")


class ActionScheduler:
    """Thread-safe queue of actions keyed by control step; every public method holds one lock.

    blend, for steps that a queued chunk and the new chunk both cover:
      latest    the new chunk's action replaces the queued one.
      ensemble  ACT temporal ensembling: every prediction for a step is kept; the output is their mean
                weighted by exp(-ensemble_k * i), i = 0 for the oldest prediction.
      rtc       real-time chunking: queued steps in [current_step, current_step + d) are committed and
                kept exactly (d: measured delay of the previous chunk, at least 1); the next
                ``rtc_overlap`` steps crossfade, step j of them being (1 - w) old + w new with
                w = (j + 1) / (rtc_overlap + 1); later steps take the new chunk.
    """

    def __init__(self, action_dim: int, blend: str = "latest", ensemble_k: float = 0.01, rtc_overlap: int = 4):
        if action_dim < 1:
            raise ValueError(f"action_dim must be >= 1, got {action_dim}")
        if blend not in BLENDS:
            raise ValueError(f"blend must be one of {list(BLENDS)}, got {blend!r}")
        if rtc_overlap < 0:
            raise ValueError(f"rtc_overlap must be >= 0, got {rtc_overlap}")
        self.action_dim, self.blend, self.ensemble_k, self.rtc_overlap = action_dim, blend, ensemble_k, rtc_overlap
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Empty the queue and clear the statistics (a new episode)."""
        with self._lock:
            self._queue: dict[int, list[np.ndarray]] = {}  # step -> predictions (Da,), oldest first
            self._last_delay = 0
            self.chunks = self.late_chunks = self.dropped_actions = self.empty_pops = 0
            self.delays: list[int] = []

    def _as_chunk(self, actions: Any) -> np.ndarray:
        if hasattr(actions, "detach"):  # torch tensor
            actions = actions.detach().float().cpu().numpy()
        a = np.asarray(actions, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != self.action_dim or a.shape[0] < 1:
            hint = " (take [0] of a batched (1, Ha, Da) chunk)" if a.ndim == 3 else ""
            raise ValueError(f"action chunk must have shape (Ha, {self.action_dim}) with Ha >= 1, got {a.shape}{hint}")
        return a

    def add_chunk(self, actions: Any, obs_step: int, current_step: int) -> int:
        """Queue actions (Ha, Da) predicted from the observation of ``obs_step``; returns how many were queued."""
        a = self._as_chunk(actions)
        if obs_step > current_step:
            raise ValueError(f"chunk observed at step {obs_step} arrived at earlier step {current_step}: "
                             "obs_step and current_step must come from the same control-step counter")
        delay = current_step - obs_step
        with self._lock:
            self.chunks += 1
            self.delays.append(delay)
            for s in [s for s in self._queue if s < current_step]:  # past steps nobody popped
                del self._queue[s]
            prev_delay, self._last_delay = self._last_delay, delay
            if delay >= len(a):
                self.late_chunks += 1
                self.dropped_actions += len(a)
                log.warning("dropped a whole chunk: %d steps late for a %d-step chunk", delay, len(a))
                return 0
            self.dropped_actions += delay
            d = max(prev_delay, 1)
            for i, act in enumerate(a[delay:]):
                s = current_step + i
                old = self._queue.get(s)
                if self.blend == "ensemble":
                    self._queue.setdefault(s, []).append(act)
                elif self.blend == "latest" or old is None or i >= d + self.rtc_overlap:
                    self._queue[s] = [act]
                elif i >= d:  # rtc crossfade; i < d is the committed prefix and stays as queued
                    w = (i - d + 1) / (self.rtc_overlap + 1)
                    self._queue[s] = [(1 - w) * old[0] + w * act]
            return len(a) - delay

    def _value(self, step: int) -> np.ndarray:
        preds = self._queue[step]
        if len(preds) == 1:
            return preds[0].copy()
        w = np.exp(-self.ensemble_k * np.arange(len(preds)))
        return (w[:, None] * np.stack(preds)).sum(0) / w.sum()

    def committed_prefix(self, current_step: int, n: int) -> np.ndarray:
        """(n', Da), n' <= n: queued actions for steps current_step .. current_step+n-1, up to the first gap.

        These run before a chunk started now can arrive (n: its expected delay); inpainting heads
        condition on them."""
        with self._lock:
            rows = []
            for s in range(current_step, current_step + n):
                if s not in self._queue:
                    break
                rows.append(self._value(s))
            return np.stack(rows) if rows else np.empty((0, self.action_dim))

    def pop(self, step: int) -> np.ndarray | None:
        """The action (Da,) for control step ``step``, or None if none is queued; forgets steps <= step."""
        with self._lock:
            out = self._value(step) if step in self._queue else None
            for s in [s for s in self._queue if s <= step]:
                del self._queue[s]
            self.empty_pops += out is None
            return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._queue)

    @property
    def last_delay(self) -> int:
        """Delay (control steps) of the latest chunk; 0 before the first."""
        with self._lock:
            return self._last_delay

    def stats(self, delays: bool = True) -> dict[str, Any]:
        """Counters since the last reset; ``delays=False`` leaves out the per-chunk list (long-running loops)."""
        with self._lock:
            out = {"chunks": self.chunks, "late_chunks": self.late_chunks, "dropped_actions": self.dropped_actions,
                   "empty_pops": self.empty_pops, "queued": len(self._queue),
                   "mean_delay": float(np.mean(self.delays)) if self.delays else float("nan")}
            if delays:
                out["delays"] = list(self.delays)
            return out


class InferenceWorker:
    """Runs ``predict(obs) -> (Ha, Da)`` on its own daemon thread and feeds ``scheduler``.

    ``submit`` hands over the latest observation; an unprocessed older one is replaced (counted in
    ``replaced``), never queued. Chunks are added with ``current_step=step_fn()`` read when predict
    returns. Exceptions in predict or add_chunk are counted in ``errors`` and kept in ``last_error``; the
    thread keeps serving. The log gets a traceback when the error differs from the previous one, else one
    line at most every ``error_log_s`` seconds (a policy failing on every tick does not flood the log).
    Latency (ms, predict only) skips the first ``warmup`` calls;
    ``max_latency_samples`` keeps only that many of the latest (None: all); ``latency_since`` returns
    those taken since an earlier ``latency_count``.
    ``reset()`` starts a new episode: the pending observation is dropped and a chunk still being computed
    is discarded (counted in ``discarded``) instead of reaching the scheduler.
    """

    def __init__(self, predict: Callable[[Any], Any], scheduler: ActionScheduler, step_fn: Callable[[], int],
                 warmup: int = 1, clock: Callable[[], float] = time.perf_counter, max_latency_samples: int | None = None,
                 error_log_s: float = 5.0):
        self.predict, self.scheduler, self.step_fn, self.warmup, self.clock = predict, scheduler, step_fn, warmup, clock
        self.error_log_s, self._error_logged = error_log_s, (None, -float("inf"))  # (repr of the error, clock time)
        self._cond = threading.Condition()
        self._pending: tuple[Any, int] | None = None
        self._busy = self._closed = False
        self._generation = 0
        self.calls = self.replaced = self.errors = self.discarded = 0
        self.last_error: BaseException | None = None
        self._latency: collections.deque[float] = collections.deque(maxlen=max_latency_samples)
        self.latency_count = 0
        self._thread = threading.Thread(target=self._run, name="rtpolicy-inference", daemon=True)
        self._thread.start()

    @classmethod
    def from_bundle(cls, bundle_dir: str, scheduler: ActionScheduler, step_fn: Callable[[], int], backend: str = "torch",
                    threads: int = 1, spinning: bool = False, **kwargs: Any) -> InferenceWorker:
        """A worker running a bundle's policy (``backend``: ``torch`` or ``ort``, the bundle's ONNX graphs with
        ``threads`` intra-op threads, ``spinning`` worker threads); obs {key: (1, To, *shape)} -> chunk (Ha, Da).
        The policy and the bundle dict are kept as ``policy`` and ``bundle``."""
        from rtpolicy.deploy.export import load_bundle

        policy, bundle = load_bundle(bundle_dir, backend=backend, threads=threads, spinning=spinning)
        worker = cls(lambda obs: policy.predict_chunk(obs)[0], scheduler, step_fn, **kwargs)
        worker.policy, worker.bundle, worker.backend = policy, bundle, backend
        return worker

    @property
    def thread_ident(self) -> int | None:
        return self._thread.ident

    def submit(self, obs: Any, obs_step: int) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("InferenceWorker.submit after close()")
            self.replaced += self._pending is not None
            self._pending = (obs, obs_step)
            self._cond.notify_all()

    def reset(self) -> None:
        """Drop the pending observation; the result of a predict in progress is discarded, not queued."""
        with self._cond:
            self._generation += 1
            self.discarded += self._pending is not None
            self._pending = None
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no snapshot is pending or running; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending is None and not self._busy, timeout)

    def latency_ms(self) -> list[float]:
        with self._cond:
            return list(self._latency)

    def latency_since(self, count: int, limit: int | None = None) -> tuple[int, list[float]]:
        """(latency_count now, the latencies (ms) taken since the count was ``count``, at most the ``limit``
        latest and only those still kept)."""
        with self._cond:
            n = min(self.latency_count - count, len(self._latency), limit if limit is not None else len(self._latency))
            return self.latency_count, list(self._latency)[len(self._latency) - n:] if n > 0 else []

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._closed:
                    return
                (obs, obs_step), self._pending = self._pending, None
                self._busy, generation = True, self._generation
            ms, err = None, None
            try:
                t0 = self.clock()
                chunk = self.predict(obs)
                ms = (self.clock() - t0) * 1e3
                with self._cond:  # atomic with reset(): a chunk of a finished episode never reaches the queue
                    if generation == self._generation:
                        self.scheduler.add_chunk(chunk, obs_step, current_step=self.step_fn())
                    else:
                        self.discarded += 1
            except Exception as e:  # reported through errors / last_error and the log, never swallowed
                err = e
                self._log_error(e, obs_step)
            with self._cond:
                self.calls += 1
                if ms is not None and self.calls > self.warmup:
                    self._latency.append(ms)
                    self.latency_count += 1
                if err is not None:
                    self.errors, self.last_error = self.errors + 1, err
                self._busy = False
                self._cond.notify_all()

    def _log_error(self, e: Exception, obs_step: int) -> None:
        what, now = f"{type(e).__name__}: {e}"[:300], self.clock()
        last, at = self._error_logged
        if what != last:
            log.exception("inference for the observation of step %d failed", obs_step)
        elif now - at >= self.error_log_s:
            log.error("inference failed again (%d errors so far): %s", self.errors + 1, what)
        else:
            return
        self._error_logged = (what, now)

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("inference thread still inside predict %.1f s after close()", timeout)

    def __enter__(self) -> InferenceWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SteadyTicker:
    """Absolute-schedule ticker for non-ROS loops: tick k is due at t0 + k / rate_hz (t0: construction).

    ``wait()`` sleeps until the next tick and returns its index. A tick reached more than one period
    late skips to the latest due tick, counting the skipped ones in ``misses``, so step indices keep
    matching the clock. ``jitter_ms`` records actual - scheduled time of every returned tick.
    """

    def __init__(self, rate_hz: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if not rate_hz > 0:
            raise ValueError(f"rate_hz must be > 0, got {rate_hz}")
        self.period, self.clock, self.sleep = 1.0 / rate_hz, clock, sleep
        self.t0, self.next_step, self.misses = clock(), 0, 0
        self.jitter_ms: list[float] = []

    def wait(self) -> int:
        target = self.t0 + self.next_step * self.period
        now = self.clock()
        if now < target:
            self.sleep(target - now)
            now = self.clock()
        step = self.next_step
        if now - target > self.period:
            skip = int((now - target) // self.period)
            self.misses += skip
            step += skip
            target = self.t0 + step * self.period
        self.jitter_ms.append((now - target) * 1e3)
        self.next_step = step + 1
        return step
