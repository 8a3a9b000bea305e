"""The exclusive lock that every writer of a run folder (train, resume, export, eval reports) holds while it writes."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from peftcli.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock; O_EXCL creation plus a liveness check of the recorded pid stands in.
    fcntl = None

_TRIES = 20  # bounds the retry loops: each retry means another writer released or died just then
_KEYS = ("pid", "host", "started", "command")


def lock_path(run_dir: Path | str) -> Path:
    """`runs/x` -> `runs/.x.peft-lock`, beside the folder (see `acquire`)."""
    run = Path(os.path.abspath(run_dir))  # abspath: "runs/x/" and "." still name the folder
    return run.parent / f".{run.name}.peft-lock"


class RunLock:
    """A held run lock; `path` None is the no-op holder of a non-zero rank. `release()` may be called twice."""

    def __init__(self, path: Path | None, fd: int | None = None):
        self.path, self._fd, self._owner = path, fd, os.getpid()

    def release(self) -> None:
        if self.path is None or self._owner != os.getpid():
            return  # no-op holder, or a forked child (dataloader worker) that must not drop its parent's lock
        path, self.path = self.path, None
        path.unlink(missing_ok=True)  # before unlocking: a waiter that opened this file sees it gone and retries
        if self._fd is not None:
            os.close(self._fd)


def acquire(run_dir: Path | str, command: str, option: str = "--output-dir") -> RunLock:
    """Take the lock of `run_dir` at once, or raise UserError naming the holder (pid, host, start, command) and
    `option`, the command-line option through which the refused writer can write elsewhere.

    The lock file sits beside the folder (`runs/.x.peft-lock`): the folder may not exist yet, --overwrite may delete
    it, and "is it empty" checks must not see the lock. The kernel drops the lock when its process dies (even
    SIGKILL), so the next writer takes a dead one's lock. Multi-process jobs (torchrun / accelerate set RANK,
    LOCAL_RANK): only rank 0 writes the run folder, so only it locks (RANK, or LOCAL_RANK when RANK is unset, is 0
    or unset); the other ranks get a no-op holder.
    """
    if (os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "0").strip() != "0":
        return RunLock(None)
    path = lock_path(run_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(_TRIES):
            if lock := (_try_flock if fcntl else _try_exclusive)(path, run_dir, command, option):
                return lock
    except OSError as e:
        raise UserError(f"{run_dir}: cannot lock the run folder ({path}: {e.strerror or e})") from e
    raise UserError(f"{run_dir}: could not take the run lock {path} in {_TRIES} tries; other writers keep taking it")


@contextlib.contextmanager
def hold_run_lock(run_dir: Path | str, command: str, option: str = "--output-dir"):
    """`with hold_run_lock(out, "peft train x.yaml"):` holds the lock for the block (see `acquire`)."""
    lock = acquire(run_dir, command, option)
    try:
        yield lock
    finally:
        lock.release()


def _try_flock(path: Path, run_dir, command: str, option: str) -> RunLock | None:
    fd, lock = os.open(path, os.O_RDWR | os.O_CREAT, 0o644), None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(_held_message(run_dir, path, lambda: os.pread(fd, 65536, 0), option)) from None
        # A releasing holder unlinks, then unlocks: if we locked that file, a newcomer can lock a new file at the
        # same path and both would hold. Only a lock on the file the path names now counts; else retry.
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                _write_holder(fd, command)
                lock = RunLock(path, fd)
    finally:
        if lock is None:
            os.close(fd)
    return lock


def _try_exclusive(path: Path, run_dir, command: str, option: str) -> RunLock | None:
    # Best effort (two writers clearing one stale file at once can race); Linux has flock above.
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        info = _parse(path.read_bytes)
        if info and info["host"] == socket.gethostname() and not _alive(info["pid"]):
            path.unlink(missing_ok=True)  # its writer died without releasing
        elif path.exists():
            raise UserError(_held_message(run_dir, path, path.read_bytes, option)) from None
        return None
    try:
        _write_holder(fd, command)
    finally:
        os.close(fd)
    return RunLock(path)


def _write_holder(fd: int, command: str) -> None:
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(dict(zip(_KEYS, (os.getpid(), socket.gethostname(), started, command)))).encode())
    os.fsync(fd)  # whole content for a reader on another host (shared filesystem) or after a crash


def _parse(read) -> dict | None:
    for _ in range(5):  # the holder writes just after locking: a reader that came in between waits a moment
        with contextlib.suppress(OSError, ValueError):
            if isinstance(info := json.loads(read()), dict) and set(_KEYS) <= info.keys():
                return info
        time.sleep(0.02)
    return None


def _held_message(run_dir, path: Path, read, option: str) -> str:
    if (info := _parse(read)) is None:
        who = f"held by another writer (holder details in {path} unreadable)"
    else:  # one line even if a recorded field holds newlines
        pid, host, started, command = (" ".join(str(info[k]).split()) for k in _KEYS)
        who = f"held by PID {pid} on {host} since {started} ({command})"
    return f"{run_dir}: {who}; wait for it to finish or use another {option}"


def _alive(pid) -> bool:
    if os.name == "nt":  # there os.kill(pid, 0) sends CTRL_C_EVENT (= 0) instead of probing: ask the kernel
        import ctypes

        k32, code = ctypes.windll.kernel32, ctypes.c_ulong()
        if not (handle := k32.OpenProcess(0x1000, False, int(pid))):  # PROCESS_QUERY_LIMITED_INFORMATION
            return k32.GetLastError() == 5  # access denied: it exists
        k32.GetExitCodeProcess(handle, ctypes.byref(code)), k32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (OSError, TypeError, ValueError):
        pass  # EPERM: someone else's live process; an unreadable pid: do not take it over
    return True
