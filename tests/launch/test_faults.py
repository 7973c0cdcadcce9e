"""Launcher-level fault tests: a rank that dies mid-training ends the job with an error."""
import os
import shutil
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
pytest.importorskip("horovod.torch")


@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun-gloo"])
def test_dead_rank_ends_the_job_with_an_error(launcher):
    script = os.path.join(HERE, "dying_rank.py")
    if launcher == "mpirun":
        if not shutil.which("mpirun"):
            pytest.skip("mpirun not installed")
        cmd = ["mpirun", "-np", "2", sys.executable, script]
    else:
        cmd = ["horovodrun", "--gloo", "-np", "2", "-H", "localhost:2", sys.executable, script]
    env = dict(os.environ, HOROVOD_STALL_SHUTDOWN_TIME_SECONDS="30")
    start = time.monotonic()
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=240)
    took = time.monotonic() - start
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "finished without noticing" not in proc.stdout
    print(f"{launcher}: job ended with exit code {proc.returncode} after {took:.1f}s")
