"""The suite's own hygiene (conftest's `no_leftovers`): which processes count as left behind by a test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from .conftest import _alive, _leftovers

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]
pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")


def test_a_job_or_an_orphan_is_left_behind_and_a_plain_child_is_not():
    job = subprocess.Popen(SLEEP, start_new_session=True)  # a launcher in a session of its own
    child = subprocess.Popen(SLEEP)  # like a data worker of the test process
    # A process whose parent has exited: a rank of a launch that ended without it.
    orphan = int(subprocess.run(["bash", "-c", f"{' '.join(SLEEP[:2])} '{SLEEP[2]}' >/dev/null 2>&1 & echo $!"],
                                capture_output=True, text=True, check=True).stdout)
    try:
        found = _leftovers()
        assert job.pid in found and orphan in found and child.pid not in found, (found, job.pid, orphan)
    finally:
        for proc in (job, child):
            proc.kill()
            proc.wait()
        os.kill(orphan, signal.SIGKILL)
    assert not _alive(job.pid) and job.pid not in _leftovers()
