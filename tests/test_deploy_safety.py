"""Safety layer: every intervention kind, hold semantics, the latched e-stop, limits under random commands."""

import json
import logging

import numpy as np
import pytest

from rtpolicy.deploy.safety import SafetyLayer, SafetyLimits

DT = 0.1
START = np.array([0.0, 0.3, -0.2, 0.5])  # dim 0 is a delta (end-effector displacement), 1..3 absolute


def limits(**kw):
    base = dict(lower=[-1, -1, -1, 0], upper=[1, 1, 1, 1], max_velocity=np.inf, max_acceleration=np.inf,
                stale_obs_s=0.5, delta_dims=[0])
    return SafetyLimits(**base | kw)


def layer(**kw):
    return SafetyLayer(limits(**kw), DT, START)


CASES = {  # kind -> (limits overrides, command, obs age or None, expected output)
    "stale_obs": ({}, [0.1, 0.4, 0, 0.6], 0.6, [0, 0.3, -0.2, 0.5]),
    "empty_queue": ({}, None, 0.0, [0, 0.3, -0.2, 0.5]),
    "non_finite": ({}, [0.1, np.nan, 0, np.inf], 0.0, [0, 0.3, -0.2, 0.5]),
    "clamp": ({}, [2.0, 0.4, -3.0, 0.6], 0.0, [1.0, 0.4, -1.0, 0.6]),
    "velocity": ({"max_velocity": 1.0}, [0.5, 0.6, -0.25, 0.5], 0.0, [0.1, 0.4, -0.25, 0.5]),
    "acceleration": ({"max_acceleration": 2.0}, [0.5, 0.6, -0.2, 0.5], 0.0, [0.02, 0.32, -0.2, 0.5]),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_each_intervention_triggers_is_counted_and_logged(kind, caplog):
    over, cmd, age, want = CASES[kind]
    s = layer(**over)
    with caplog.at_level(logging.WARNING, logger="rtpolicy.deploy.safety"):
        out = s.filter(cmd, now=10.0, obs_stamp=10.0 - age)
    assert out == pytest.approx(want, abs=1e-12)
    assert s.last_interventions == (kind,)
    assert s.counts[kind] == 1 and sum(s.counts.values()) == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "rtpolicy.deploy.safety"]
    assert len(lines) == 1 and lines[0].startswith(f"safety {kind}:")


def test_missing_observation_is_stale_and_a_clean_command_passes_untouched():
    s = layer()
    assert s.filter([0.1, 0.4, 0, 0.6], now=1.0, obs_stamp=None).tolist() == [0, 0.3, -0.2, 0.5]
    assert s.last_interventions == ("stale_obs",)
    cmd = [0.1, 0.4, 0.0, 0.6]
    assert s.filter(cmd, now=1.0, obs_stamp=0.9).tolist() == cmd and s.last_interventions == ()


def test_hold_keeps_absolute_dims_and_stops_delta_dims():
    s = layer()
    moved = s.filter([0.3, 0.7, 0.1, 0.9], 0.0, 0.0)
    held = s.filter(None, 0.0, 0.0)
    assert held[1:].tolist() == moved[1:].tolist() == [0.7, 0.1, 0.9]  # last safe command, never 0 or a mean
    assert held[0] == 0.0  # a delta dim holds by commanding no motion
    s.reset([0.0, -0.5, 0.5, 0.2])
    assert s.filter(None, 0.0, 0.0).tolist() == [0.0, -0.5, 0.5, 0.2]


def test_estop_stays_latched_until_reset_estop(caplog):
    s = layer()
    with caplog.at_level(logging.WARNING, logger="rtpolicy.deploy.safety"):
        s.estop("operator")
        outs = [s.filter([0.1, 0.4 + 0.01 * i, 0, 0.6], float(i), float(i)) for i in range(5)]
    assert all(o.tolist() == [0, 0.3, -0.2, 0.5] for o in outs) and s.counts["estop"] == 5
    assert any("e-stop latched: operator" in r.getMessage() for r in caplog.records)
    s.reset([0.0, 0.2, 0.0, 0.5])  # re-seeding does not clear the latch
    assert s.filter([0.1, 0.4, 0, 0.6], 0.0, 0.0).tolist() == [0, 0.2, 0.0, 0.5]
    s.reset_estop()
    assert s.filter([0.1, 0.4, 0, 0.6], 0.0, 0.0).tolist() == [0.1, 0.4, 0, 0.6] and s.last_interventions == ()


def test_repeated_interventions_are_rate_limited_in_the_log(caplog):
    s = SafetyLayer(limits(), DT, START, log_every=3)
    with caplog.at_level(logging.WARNING, logger="rtpolicy.deploy.safety"):
        for _ in range(7):
            s.filter(None, 0.0, 0.0)
    assert s.counts["empty_queue"] == 7
    assert len([r for r in caplog.records if "empty_queue" in r.getMessage()]) == 3  # 1st, 3rd, 6th


def test_random_commands_never_break_limits_or_pass_nan():
    rng = np.random.default_rng(0)
    lim = limits(max_velocity=[0.5, 0.4, 0.3, 2.0], max_acceleration=[2.0, 1.5, 1.0, 50.0])
    s = SafetyLayer(lim, DT, START)
    vmax, amax = lim.max_velocity * DT, lim.max_acceleration * DT**2
    delta = np.array([True, False, False, False])
    last, vel, kinds = START.copy(), np.zeros(4), set()
    last[0] = 0.0
    for i in range(1000):
        if i % 25 == 0:  # a target held for 25 steps, often past a bound: pushes into the walls at speed
            target = rng.uniform(-1.5, 1.5, 4)
        cmd = rng.uniform(-1.5, 1.5, 4) if rng.random() < 0.3 else target + rng.normal(0, 0.05, 4)
        if rng.random() < 0.05:
            cmd[rng.integers(4)] = rng.choice([np.nan, np.inf, -np.inf])
        r = rng.random()
        cmd = None if r < 0.03 else cmd
        stamp = None if r > 0.98 else float(i) * DT - (0.6 if r > 0.96 else 0.05)
        out = s.filter(cmd, now=float(i) * DT, obs_stamp=stamp)
        kinds |= set(s.last_interventions)
        assert np.isfinite(out).all()
        assert (out >= lim.lower - 1e-12).all() and (out <= lim.upper + 1e-12).all()
        v = np.where(delta, out, out - last)
        assert (np.abs(v) <= vmax + 1e-12).all()
        hold = bool(set(s.last_interventions) & {"stale_obs", "empty_queue", "non_finite"})
        if hold:
            assert (v == 0).all()
        else:
            assert (np.abs(v - vel) <= amax + 1e-12).all()
        last, vel = out, v
    assert kinds == {"stale_obs", "empty_queue", "non_finite", "clamp", "velocity", "acceleration"}


def test_acceleration_limit_brakes_before_a_bound():
    s = SafetyLayer(limits(max_velocity=10.0, max_acceleration=1.0), DT, [0.0, 0.0, 0.0, 0.5])
    pos = [s.filter([0.0, 1.0, 0.0, 0.5], 0.0, 0.0)[1] for _ in range(100)]
    steps = np.diff([0.0] + pos)
    assert max(pos) <= 1.0 and pos[-1] == pytest.approx(1.0, abs=1e-3)
    assert np.abs(np.diff(np.concatenate([[0.0], steps]))).max() <= 1.0 * DT**2 + 1e-12


@pytest.mark.parametrize("over, msg", [
    ({"upper": [1, 1, 1]}, r"upper must be 1-D with 4 entries"),
    ({"lower": [[0, 0]]}, r"lower must be 1-D"),
    ({"upper": [1, 1, -2, 1]}, r"lower > upper at dims \[2\]"),
    ({"max_velocity": [1, 0, 1, 1]}, r"max_velocity must be > 0 .* dims \[1\]"),
    ({"max_acceleration": -1.0}, r"max_acceleration must be > 0"),
    ({"max_velocity": [1, np.nan, 1, 1]}, r"max_velocity has NaN at dims \[1\]"),
    ({"stale_obs_s": 0}, r"stale_obs_s must be > 0"),
    ({"delta_dims": [4]}, r"delta_dims must be distinct indices in \[0, 4\)"),
    ({"delta_dims": [0, 0]}, r"distinct"),
    ({"delta_dims": [0, 3], "lower": [-1, -1, -1, 0.2]}, r"delta dims \[3\] hold at 0, so 0 must lie in \[lower, upper\]"),
])
def test_bad_limits_raise_clear_errors(over, msg):
    with pytest.raises(ValueError, match=msg):
        limits(**over)


def test_bad_layer_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="need dt > 0 seconds"):
        SafetyLayer(limits(), 0.0, START)
    with pytest.raises(ValueError, match=r"command must have shape \(4,\), got \(3,\)"):
        SafetyLayer(limits(), DT, START[:3])
    with pytest.raises(ValueError, match=r"outside \[lower, upper\] at dims \[3\]"):
        SafetyLayer(limits(), DT, [0, 0, 0, -0.5])
    with pytest.raises(ValueError, match=r"non-finite .* at dims \[1\]"):
        SafetyLayer(limits(), DT, [0, np.nan, 0, 0.5])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        layer().filter([0.0, 0.0], 0.0, 0.0)


def test_estop_latch_outlives_the_layer_and_persists_in_its_file(tmp_path):
    from rtpolicy.deploy.safety import EstopLatch

    latch = EstopLatch()
    layer_a = SafetyLayer(limits(), DT, START, estop=latch)
    layer_a.estop("operator")
    layer_b = SafetyLayer(limits(), DT, START, estop=latch)  # reconfigured: a new layer, the same latch
    assert layer_b.estopped and layer_b.filter([0.1, 0.4, 0, 0.6], 0.0, 0.0).tolist() == [0, 0.3, -0.2, 0.5]
    path = tmp_path / "estop.json"
    latch.attach(path)  # a latch in memory goes to the file
    assert json.loads(path.read_text())["estopped"] is True
    restarted = EstopLatch(path)  # a new process on the same file
    assert restarted.latched and restarted.reason == "operator"
    restarted.clear()
    assert not EstopLatch(path).latched and not json.loads(path.read_text())["estopped"]
    path.write_text("[1, 2")
    broken = EstopLatch(path)
    assert broken.latched and "unreadable" in broken.reason and str(path) in broken.reason


def test_observation_faults_hold_under_their_own_kind_before_staleness():
    s = layer()
    out = s.filter([0.1, 0.4, 0, 0.6], now=1.0, obs_stamp=None, obs_fault=("obs_non_finite", "nan at [3]"))
    assert out.tolist() == [0, 0.3, -0.2, 0.5] and s.last_interventions == ("obs_non_finite",)
    assert s.counts["obs_non_finite"] == 1 and s.counts["stale_obs"] == 0 and s.counts["non_finite"] == 0
    assert s.observation_hold(1.0, 0.9) is None and s.observation_hold(1.0, 0.4)[0] == "stale_obs"
    s.estop("x")
    s.filter(None, 1.0, None, ("obs_missing_joint", "j"))
    assert s.last_interventions == ("estop",)  # the e-stop comes first
