"""What the ROS node needs from the runtime: worker reset between episodes, bounded latency samples,
the scheduler's last delay and lean stats, the safety layer's hold and side-effect-free preview (no ROS)."""

import logging
import threading

import numpy as np
import pytest

from rtpolicy.deploy.safety import SafetyLayer, SafetyLimits
from rtpolicy.deploy.scheduler import ActionScheduler, InferenceWorker


def test_worker_reset_discards_the_chunk_in_flight_and_the_pending_observation():
    s = ActionScheduler(2)
    started, release = threading.Event(), threading.Event()

    def predict(obs):
        started.set()
        assert release.wait(10)
        return np.full((4, 2), float(obs))

    with InferenceWorker(predict, s, step_fn=lambda: 0) as w:
        w.submit(1, obs_step=0)
        assert started.wait(10)
        w.submit(2, obs_step=0)  # pending behind the running one
        w.reset()  # new episode: both belong to the old one
        release.set()
        assert w.wait_idle(10)
        assert len(s) == 0 and w.discarded == 2 and w.errors == 0
        started.clear()
        w.submit(3, obs_step=0)  # the new episode's observation goes through
        assert w.wait_idle(10)
        assert len(s) == 4 and float(s.pop(0)[0]) == 3.0 and w.calls == 2


def test_worker_keeps_only_the_latest_latency_samples():
    s = ActionScheduler(1)
    with InferenceWorker(lambda obs: np.zeros((1, 1)), s, step_fn=lambda: 0, warmup=0, max_latency_samples=3) as w:
        for _ in range(5):
            w.submit(0, obs_step=0)
            assert w.wait_idle(10)
        assert w.calls == 5 and len(w.latency_ms()) == 3


def test_scheduler_last_delay_and_stats_without_delays():
    s = ActionScheduler(1)
    assert s.last_delay == 0
    s.add_chunk(np.zeros((4, 1)), obs_step=2, current_step=5)
    assert s.last_delay == 3
    st = s.stats(delays=False)
    assert "delays" not in st and st["chunks"] == 1 and st["dropped_actions"] == 3 and st["mean_delay"] == 3.0
    assert s.stats()["delays"] == [3]


def test_safety_hold_and_preview_leave_the_layer_untouched(caplog):
    lim = SafetyLimits(lower=[-1, -1], upper=[1, 1], max_velocity=1.0, stale_obs_s=0.5, delta_dims=[0])
    s = SafetyLayer(lim, 0.1, [0.0, 0.5])
    assert s.hold().tolist() == [0.0, 0.5]
    s.filter([0.05, 0.55], now=1.0, obs_stamp=1.0)
    counts, last = dict(s.counts), s.last.copy()
    with caplog.at_level(logging.WARNING, logger="rtpolicy.deploy.safety"):
        plan = s.preview([[1.0, 1.0], [1.0, 1.0], [np.nan, 0.0]], now=1.0, obs_stamp=1.0)
    # velocity-limited like filter() would do, one step after another; the NaN row holds
    assert plan == pytest.approx(np.array([[0.1, 0.65], [0.1, 0.75], [0.0, 0.75]]), abs=1e-12)
    assert s.counts == counts and np.array_equal(s.last, last) and not caplog.records
    assert s.preview([], now=1.0, obs_stamp=1.0).shape == (0, 2)
    assert s.hold().tolist() == [0.0, 0.55]
