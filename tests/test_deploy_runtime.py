"""Deployment runtime: action queue blending and delays, the inference thread, the steady ticker."""

import logging
import math
import threading

import numpy as np
import pytest
import torch

from rtpolicy.deploy.scheduler import ActionScheduler, InferenceWorker, SteadyTicker


def chunk(start, ha=8, da=2):
    """(ha, da) chunk whose row i is start + i in every dim, so values show which row a step got."""
    return np.repeat(np.arange(start, start + ha, dtype=float)[:, None], da, axis=1)


def queued(s, steps):
    return [None if (a := s.pop(k)) is None else float(a[0]) for k in steps]


def test_late_chunk_drops_due_steps_and_records_delay():
    s = ActionScheduler(2)
    assert s.add_chunk(chunk(0), obs_step=10, current_step=13) == 5  # rows 0..2 were due at 10..12
    assert s.pop(12) is None and len(s) == 5
    assert queued(s, range(13, 19)) == [3, 4, 5, 6, 7, None]
    st = s.stats()
    assert st["delays"] == [3] and st["dropped_actions"] == 3 and st["chunks"] == 1 and st["late_chunks"] == 0
    assert st["empty_pops"] == 2


def test_whole_late_chunk_is_dropped_and_counted():
    s = ActionScheduler(2)
    assert s.add_chunk(chunk(0, ha=4), obs_step=0, current_step=4) == 0
    assert len(s) == 0 and s.pop(4) is None
    assert s.stats() | {"delays": None} == {"chunks": 1, "late_chunks": 1, "dropped_actions": 4, "empty_pops": 1,
                                             "queued": 0, "delays": None, "mean_delay": 4.0}


def test_pop_returns_none_on_empty_and_forgets_past_steps():
    s = ActionScheduler(2)
    assert s.pop(0) is None
    s.add_chunk(chunk(0, ha=4), 0, 0)
    assert float(s.pop(2)[0]) == 2  # steps 0 and 1 are skipped and forgotten
    assert queued(s, [1, 2, 3, 4]) == [None, None, 3, None]


def test_latest_replaces_overlap():
    s = ActionScheduler(2, blend="latest")
    s.add_chunk(chunk(0), 0, 0)
    s.pop(0), s.pop(1)
    s.add_chunk(chunk(100), obs_step=1, current_step=2)
    assert queued(s, range(2, 10)) == [101, 102, 103, 104, 105, 106, 107, None]  # step 1 + i -> 100 + i


def test_ensemble_uses_act_weights_oldest_first():
    k = 0.5
    s = ActionScheduler(1, blend="ensemble", ensemble_k=k)
    s.add_chunk(chunk(0, ha=4, da=1), 0, 0)  # steps 0..3 -> 0, 1, 2, 3
    assert queued(s, [0, 1]) == [0, 1]
    s.add_chunk(chunk(10, ha=4, da=1), obs_step=2, current_step=2)  # steps 2..5 -> 10, 11, 12, 13
    w0, w1 = 1.0, math.exp(-k)  # oldest prediction weighs exp(0)
    got = queued(s, range(2, 7))
    want = [(2 * w0 + 10 * w1) / (w0 + w1), (3 * w0 + 11 * w1) / (w0 + w1), 12, 13, None]
    assert got == pytest.approx(want, abs=1e-12)
    # a third prediction for step 4: weights 1, e^-k, e^-2k in arrival order
    s2 = ActionScheduler(1, blend="ensemble", ensemble_k=k)
    for start, obs in [(0, 0), (10, 2), (20, 3)]:
        s2.add_chunk(chunk(start, ha=6, da=1), obs_step=obs, current_step=obs)
    w = np.exp(-k * np.arange(3))
    assert float(s2.pop(4)[0]) == pytest.approx((4 * w[0] + 12 * w[1] + 21 * w[2]) / w.sum(), abs=1e-12)


def test_rtc_keeps_committed_prefix_then_crossfades_then_new_chunk():
    s = ActionScheduler(1, blend="rtc", rtc_overlap=2)
    s.add_chunk(chunk(0, da=1), obs_step=0, current_step=2)  # delay 2; steps 2..7 -> 2..7
    s.pop(2), s.pop(3)
    assert s.committed_prefix(4, 3)[:, 0].tolist() == [4, 5, 6]
    assert s.committed_prefix(6, 5).shape == (2, 1)  # only steps 6, 7 are queued
    assert s.committed_prefix(9, 2).shape == (0, 1)
    new = chunk(100, da=1)  # observed at 3, arrives at 4: row i is for step 3 + i
    s.add_chunk(new, obs_step=3, current_step=4)
    got = queued(s, range(4, 12))
    b = lambda step: 100 + step - 3  # noqa: E731  new chunk's value for a step
    want = [4, 5,  # committed: d = previous chunk's delay = 2 steps kept exactly
            2 / 3 * 6 + 1 / 3 * b(6), 1 / 3 * 7 + 2 / 3 * b(7),  # crossfade over rtc_overlap = 2 steps
            b(8), b(9), b(10), None]
    assert got[:2] == [4, 5] and got == pytest.approx(want, abs=1e-12)


def test_rtc_commits_at_least_one_step_and_skips_missing_old_steps():
    s = ActionScheduler(1, blend="rtc", rtc_overlap=0)
    s.add_chunk(chunk(0, ha=3, da=1), 0, 0)  # delay 0 -> d = 1
    s.add_chunk(chunk(50, ha=4, da=1), 0, 0)
    assert queued(s, range(0, 5)) == [0, 51, 52, 53, None]


def test_accepts_torch_and_rejects_wrong_shapes():
    s = ActionScheduler(3)
    assert s.add_chunk(torch.zeros(4, 3), 0, 0) == 4
    for bad, msg in [(np.zeros((4, 2)), r"shape \(Ha, 3\).*got \(4, 2\)"), (np.zeros(3), r"got \(3,\)"),
                     (np.zeros((1, 4, 3)), r"take \[0\] of a batched"), (np.zeros((0, 3)), "Ha >= 1")]:
        with pytest.raises(ValueError, match=msg):
            s.add_chunk(bad, 0, 0)
    with pytest.raises(ValueError, match="arrived at earlier step"):
        s.add_chunk(np.zeros((4, 3)), obs_step=5, current_step=2)
    with pytest.raises(ValueError, match="blend must be one of"):
        ActionScheduler(3, blend="mean")


class FakeClock:
    def __init__(self, t=0.0):
        self.t = t

    def __call__(self):
        return self.t

    def sleep(self, dt):
        self.t += dt


def test_worker_runs_off_thread_replaces_stale_snapshots_and_measures_latency():
    step, seen, idents = [0], [], []
    started, release = threading.Event(), threading.Event()
    fake = FakeClock()

    def predict(obs):
        idents.append(threading.get_ident())
        seen.append(obs)
        started.set()
        assert release.wait(10)
        with lock:
            fake.t += 0.004  # this call "took" 4 ms on the injected clock
        return chunk(obs * 10, ha=4)

    lock = threading.Lock()
    s = ActionScheduler(2)
    with InferenceWorker(predict, s, step_fn=lambda: step[0], warmup=1, clock=fake) as w:
        w.submit(1, obs_step=0)
        assert started.wait(10)  # the worker holds snapshot 1 inside predict
        w.submit(2, obs_step=1)
        w.submit(3, obs_step=2)  # replaces 2, which was never processed
        step[0] = 3
        release.set()
        assert w.wait_idle(10)
        assert seen == [1, 3] and w.replaced == 1 and w.calls == 2
        assert w.thread_ident != threading.get_ident() and set(idents) == {w.thread_ident}
        assert w.latency_ms() == pytest.approx([4.0])  # the first call is warm-up
        assert s.stats()["delays"] == [3, 1]  # both chunks arrived at step 3
        assert float(s.pop(3)[0]) == 31
    assert not w._thread.is_alive()


def test_worker_survives_and_reports_predict_exceptions(caplog):
    def predict(obs):
        if obs == "bad":
            raise RuntimeError("camera frame missing")
        return np.ones((4, 2))

    s = ActionScheduler(2)
    with caplog.at_level(logging.ERROR, logger="rtpolicy.deploy"), InferenceWorker(predict, s, step_fn=lambda: 0, warmup=0) as w:
        for obs in ["bad", "ok"]:
            w.submit(obs, obs_step=0)
            assert w.wait_idle(10)
        assert w.errors == 1 and isinstance(w.last_error, RuntimeError) and w.calls == 2
        assert len(w.latency_ms()) == 1 and len(s) == 4  # the thread kept serving after the failure
    assert any("step 0 failed" in r.getMessage() and r.exc_info for r in caplog.records)
    with pytest.raises(RuntimeError, match="after close"):
        w.submit("ok", 1)


def test_steady_ticker_counts_misses_and_jitter_on_a_fake_clock():
    clock = FakeClock(100.0)
    oversleep = [0.0]
    t = SteadyTicker(10.0, clock=clock, sleep=lambda dt: clock.sleep(dt + oversleep[0]))
    assert t.wait() == 0  # due at construction
    clock.t += 0.02  # work inside the tick
    assert t.wait() == 1 and clock.t == pytest.approx(100.1)  # slept to the absolute schedule
    oversleep[0] = 0.003
    assert t.wait() == 2 and clock.t == pytest.approx(100.203)
    oversleep[0] = 0.0
    assert t.wait() == 3 and clock.t == pytest.approx(100.3)  # no drift from the late tick
    clock.t += 0.35  # a stall: now 100.65; ticks 4 (100.4) and 5 (100.5) are missed
    assert t.wait() == 6 and t.misses == 2
    clock.t += 0.14  # 100.79: tick 7 (100.7) is 90 ms late, less than a period: run it, no miss
    assert t.wait() == 7 and t.misses == 2
    assert t.jitter_ms == pytest.approx([0, 0, 3, 0, 50, 90])
    with pytest.raises(ValueError, match="rate_hz must be > 0"):
        SteadyTicker(0)
