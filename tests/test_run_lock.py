"""The run-folder lock with real processes: a second writer is refused, a killed holder's lock is taken over,
racing writers never overlap, non-zero ranks take no lock."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from peftcli.errors import UserError
from peftcli import run_lock
from peftcli.run_lock import acquire, hold_run_lock, lock_path

REPO = Path(__file__).resolve().parents[1]

# Takes the lock, says "held", keeps it until the test closes its stdin.
HOLDER = """
import sys
from peftcli.run_lock import acquire
lock = acquire(sys.argv[1], sys.argv[2])
print("held", flush=True)
sys.stdin.read()
lock.release()
"""

# Locks the file with flock but records nothing: a holder whose details cannot be read.
SILENT_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""

# Waits for the start file, then takes and releases the lock `rounds` times, logging enter/exit while holding it.
RACER = """
import os, sys, time
from peftcli.errors import UserError
from peftcli.run_lock import acquire
run_dir, log, start, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
while not os.path.exists(start):
    time.sleep(0.002)
refused = 0
for _ in range(rounds):
    while True:
        try:
            lock = acquire(run_dir, "racer")
            break
        except UserError:
            refused += 1
            time.sleep(0.001)
    with open(log, "a") as f:
        f.write(f"enter {os.getpid()}\\n")
    time.sleep(0.001)
    with open(log, "a") as f:
        f.write(f"exit {os.getpid()}\\n")
    lock.release()
print(refused)
"""


@pytest.fixture(autouse=True)
def single_process_job(monkeypatch):
    """No launcher variables, here and in the child processes (they inherit os.environ)."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def _python(script: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)


@contextmanager
def holding(script: str, *args):
    """A child process that holds the lock for the block."""
    proc = _python(script, *args)
    try:
        assert proc.stdout.readline() == "held\n", "the holder process failed to take the lock"
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)


def test_second_writer_in_another_process_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "runs" / "quickstart"
    with holding(HOLDER, run, "peft train recipes/x.yaml") as proc:
        with pytest.raises(UserError) as err:
            acquire(run, "peft train recipes/x.yaml --resume")
    message = str(err.value)
    assert f"held by PID {proc.pid} on {socket.gethostname()} since " in message
    assert "(peft train recipes/x.yaml)" in message
    assert message.startswith(f"{run}: ") and message.endswith("wait for it to finish or use another --output-dir")
    assert "\n" not in message
    with hold_run_lock(run, "peft train recipes/x.yaml"):  # the holder finished: free again
        pass


def test_same_process_taking_it_twice_is_refused(tmp_path):
    run = tmp_path / "runs" / "quickstart"
    with hold_run_lock(run, "peft train a.yaml"):
        with pytest.raises(UserError, match=rf"held by PID {os.getpid()} .*\(peft train a\.yaml\)"):
            acquire(f"{run}/", "peft export")  # a trailing slash names the same folder


def test_unreadable_holder_details_still_give_one_clear_line(tmp_path):
    run = tmp_path / "run"
    with holding(SILENT_HOLDER, lock_path(run)):
        with pytest.raises(UserError) as err:
            acquire(run, "peft eval")
    assert str(err.value) == (f"{run}: held by another writer (holder details in {lock_path(run)} unreadable); "
                              "wait for it to finish or use another --output-dir")


def test_lock_of_a_sigkilled_holder_is_taken_over(tmp_path):
    run = tmp_path / "run"
    proc = _python(HOLDER, run, "peft train x.yaml")
    assert proc.stdout.readline() == "held\n"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert json.loads(lock_path(run).read_text())["pid"] == proc.pid  # left behind, but no longer locked
    with hold_run_lock(run, "peft train x.yaml --resume"):
        assert json.loads(lock_path(run).read_text())["pid"] == os.getpid()


def test_release_removes_the_lock_file_and_it_can_be_taken_again(tmp_path):
    run = tmp_path / "run"
    for command in ("peft train x.yaml", "peft merge-export x"):
        with hold_run_lock(run, command) as lock:
            info = json.loads(lock_path(run).read_text())
            assert info["command"] == command and info["pid"] == os.getpid() and info["host"] == socket.gethostname()
            assert info["started"].endswith("+00:00")
        assert not lock_path(run).exists()
        lock.release()  # twice is harmless


def test_file_unlinked_by_a_releasing_holder_is_never_held(tmp_path, monkeypatch):
    """The unlink race, made to happen every time: between our open() and our flock() the holder releases (unlinks,
    unlocks) and a newcomer locks a new file at the path. Locking the orphan would let both hold; we must be refused."""
    run, real_flock = tmp_path / "run", fcntl.flock
    first, newcomer = acquire(run, "peft train first.yaml"), []

    def holder_releases_before_our_flock(fd, operation):
        monkeypatch.setattr(run_lock.fcntl, "flock", real_flock)
        first.release()
        newcomer.append(acquire(run, "peft train newcomer.yaml"))
        return real_flock(fd, operation)  # succeeds: nobody holds the unlinked file any more

    monkeypatch.setattr(run_lock.fcntl, "flock", holder_releases_before_our_flock)
    with pytest.raises(UserError, match=r"\(peft train newcomer\.yaml\)"):
        acquire(run, "peft train late.yaml")
    newcomer[0].release()
    with hold_run_lock(run, "peft train late.yaml"):  # once free, taken normally
        pass


def test_lock_file_sits_beside_the_folder(tmp_path):
    run = tmp_path / "runs" / "quickstart"
    run.mkdir(parents=True)
    (run / "adapter_config.json").write_text("{}")
    with hold_run_lock(run, "peft train x.yaml"):
        assert lock_path(run) == tmp_path / "runs" / ".quickstart.peft-lock" and lock_path(run).is_file()
        assert os.listdir(run) == ["adapter_config.json"]

    missing = tmp_path / "new" / "deeper" / "run"  # neither the folder nor its parent exists yet
    with hold_run_lock(missing, "peft train x.yaml"):
        assert lock_path(missing).is_file() and not missing.exists()


def test_forked_child_does_not_release_its_parents_lock(tmp_path):
    run = tmp_path / "run"
    with hold_run_lock(run, "peft train x.yaml") as lock:
        if (pid := os.fork()) == 0:  # like a dataloader worker that runs the parent's cleanup
            lock.release()
            os._exit(0)
        os.waitpid(pid, 0)
        assert lock_path(run).exists()
        with pytest.raises(UserError):
            acquire(run, "peft export")


def test_racing_processes_never_hold_it_together(tmp_path):
    run, log, start = tmp_path / "run", tmp_path / "log", tmp_path / "start"
    racers = [_python(RACER, run, log, start, 12) for _ in range(8)]
    start.touch()
    refused = [int(p.communicate(timeout=60)[0]) for p in racers]
    assert all(p.returncode == 0 for p in racers)
    lines = log.read_text().splitlines()
    assert len(lines) == 2 * 8 * 12
    for enter, exit_ in zip(lines[::2], lines[1::2]):  # strictly enter/exit pairs of one pid: no overlap
        assert enter.startswith("enter ") and exit_ == "exit " + enter.split()[1], lines
    assert sum(refused) > 0  # they did contend
    assert not lock_path(run).exists()


@pytest.mark.parametrize("variable", ["RANK", "LOCAL_RANK"])
def test_non_zero_rank_takes_no_lock(tmp_path, monkeypatch, variable):
    run = tmp_path / "run"
    monkeypatch.setenv(variable, "1")
    with hold_run_lock(run, "peft train x.yaml"), hold_run_lock(run, "peft train x.yaml"):
        assert not lock_path(run).exists() and not tmp_path.joinpath("run").exists()
    monkeypatch.setenv(variable, "0")
    with hold_run_lock(run, "peft train x.yaml"):
        assert lock_path(run).exists()
