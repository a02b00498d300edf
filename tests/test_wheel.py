"""The installed package works outside the checkout: build the wheel, install it in a fresh virtual
environment, and run the console scripts from a folder that is not the repository.

The fresh venv reuses this interpreter's already installed dependencies (a path line in a ``.pth``
file; the checkout's own editable finder is a ``.pth`` file of its own there and is not processed), so
only ``rtpolicy`` itself comes from the wheel. The test asserts that it is imported from the new venv.
"""

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what a source distribution would not carry either
IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "runs", "data", "outputs", "bundles", "build", "*.egg-info",
                                "__pycache__", ".pytest_cache", ".ruff_cache", ".site", ".whl", ".calvin_old", "tests",
                                "benchmarks", "docs")


def _run(cmd, cwd, env, timeout=300):
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out


@pytest.mark.slow
def test_wheel_installs_and_its_console_scripts_run_outside_the_checkout(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    rc, out = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
                    str(src)], cwd=tmp_path, env=env)
    assert rc == 0, out[-3000:]
    (wheel,) = (tmp_path / "dist").glob("rtpolicy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for member in ("rtpolicy/conf/train.yaml", "rtpolicy/conf/eval.yaml", "rtpolicy/conf/task/reach.yaml",
                   "rtpolicy/conf/deploy/metaworld.yaml", "rtpolicy/deploy/launch/policy.launch.py"):
        assert member in names, f"{member} missing from the wheel"
    assert not any(n.startswith(("conf/", "tests/", "benchmarks/")) for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (site,) = (venv / "lib").glob("python3*/site-packages")
    (site / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    rc, out = _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                    "--no-index", str(wheel)], cwd=tmp_path, env=env)
    assert rc == 0, out[-3000:]

    work = tmp_path / "user"  # a user's folder: no conf/, no checkout
    work.mkdir()
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    env.pop("MUJOCO_GL", None)  # chosen by rtpolicy.envs.gl (osmesa on this headless machine without a GPU)
    rc, out = _run([str(venv / "bin" / "python"), "-c", "import rtpolicy, rtpolicy.factory as f; "
                    "print(rtpolicy.__file__); print(f.CONF_DIR)"], cwd=work, env=env)
    assert rc == 0, out
    assert out.splitlines()[0].startswith(str(site)) and str(ROOT) not in out, out
    for cmd in (["rtpolicy-train", "--help"], ["rtpolicy-eval", "--help"], ["rtpolicy", "deploy", "--help"],
                ["rtpolicy", "sim", "--help"], ["rtpolicy-convert", "--help"], ["rtpolicy-export", "--help"]):
        rc, out = _run(cmd, cwd=work, env=env)
        assert rc == 0, f"{' '.join(cmd)}:\n{out[-3000:]}"
        if cmd[1:] == ["deploy", "--help"]:
            assert "bundle" in out, out

    rc, out = _run(["rtpolicy-train", "task=reach", "task.collect=true", "task.demos=2", "train.steps=2",
                    "eval.episodes=0", "denoiser.down_dims=[16,32]", "policy.cond_dim=16", "train.batch_size=8",
                    "run_dir=run"], cwd=work, env=env, timeout=600)
    assert rc == 0, out[-4000:]
    assert "checkpoint:" in out and (work / "data" / "metaworld" / "reach-v3.zarr").is_dir()
    assert (work / "run" / "config.yaml").is_file(), sorted((work / "run").rglob("*"))  # every run saves its resolved config
