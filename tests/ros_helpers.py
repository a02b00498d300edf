"""ROS test plumbing that holds on a busy machine: a ROS domain of its own for every test, and
subprocesses in their own process group that are always gone after the test (SIGINT, a grace period,
then SIGKILL to the whole group), so no orphan keeps publishing into the next test."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "rtpolicy.deploy.cli"]
_rng = random.SystemRandom()


def new_domain() -> int:
    """A ROS domain id for one test (FastDDS: 0-232; 0 and the low ids are left to whatever else runs)."""
    return _rng.randint(20, 230)


class Processes:
    """Subprocesses of one test, on its ROS domain; ``stop_all()`` leaves none running."""

    def __init__(self, domain: int):
        self.domain = domain
        self.procs: list[subprocess.Popen] = []

    def env(self, **extra: str) -> dict[str, str]:
        return dict(os.environ, PYTHONUNBUFFERED="1", ROS_DOMAIN_ID=str(self.domain),
                    ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", **extra)

    def start(self, args: list[str], **kw) -> subprocess.Popen:
        proc = subprocess.Popen(args, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def run(self, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        """Run to completion in its own group; killed (the whole group) if it overruns."""
        proc = self.start(args)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc, grace=0)
            raise
        return subprocess.CompletedProcess(args, proc.returncode, out, "")

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGINT, grace: float = 10.0) -> str:
        """Signal the process group, wait ``grace`` s, then SIGKILL it; returns the output."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        try:
            out, _ = proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            out = ""
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group: anything the process started, too
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            out += proc.communicate(timeout=10)[0] or ""
        return out or ""

    def stop_all(self) -> None:
        for proc in self.procs[::-1]:
            self.stop(proc, grace=5.0)
