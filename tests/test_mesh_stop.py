"""A process that holds a mesh open and is sent SIGTERM (a `timeout`, a job scheduler) stops the mesh's services.

They run in process sessions of their own, so the signal never reaches them: without the mesh's handler they
would outlive the process that started them, holding their ports and GPU memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HOLDER = """
import sys, time
from services.mesh import Mesh

class Sleepers(Mesh):  # the mesh's own start and stop, with a process that only sleeps for each service
    def services(self):
        return ["text_parser", "llm"]

    def command(self, service):
        return [sys.executable, "-c", "import time; time.sleep(120)"]

    def wait_ready(self, *args, **kwargs):
        pass

with Sleepers() as mesh:
    print(" ".join(str(p.pid) for p in mesh.processes.values()), flush=True)
    time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_to_the_process_holding_a_mesh_stops_its_services():
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'gen' / 'python'}")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        pids = [int(p) for p in holder.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
        holder.send_signal(signal.SIGTERM)
        holder.wait(timeout=60)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in pids), "a service outlived the process that held the mesh"
    finally:
        holder.kill()
        holder.stdout.close()
        for pid in filter(alive, pids):
            os.kill(pid, signal.SIGKILL)
