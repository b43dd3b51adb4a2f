"""The guard between a worker and its Dagster child: every process of a task dies with the worker.

``python -I -S guard.py WORKER_PID -- ARGV...`` runs ARGV (the ``dagster api`` child) and stays
its parent. The worker starts it as the leader of a new session and process group; the child and
whatever it starts (the multiprocess executor's step processes, multiprocessing helpers) stay in
that group. The guard:

- is a child subreaper, so a descendant whose parent dies is re-parented to it, not to init;
- on SIGHUP SIGKILLs every descendant and every member of its session, then itself (so the
  worker sees ``-9``): it gets SIGHUP when the worker dies, even by SIGKILL (parent-death
  signal), and from the worker when a stop escalates after grace. A parent-death signal on the
  Dagster child alone would not reach the processes that child starts, and a SIGKILL of the
  process group misses descendants that started a session of their own;
- forwards SIGTERM and SIGINT to the Dagster child only: that is Dagster's interrupt, and the run
  process forwards it to its step processes itself;
- when the child exits, kills what is left and exits as the child did: the same exit code, or
  the same signal, so the worker sees ``-N`` for a child killed by signal N;
- gives the child a parent-death signal (SIGKILL) of its own, so that a guard killed alone does
  not leave the run process behind.

It imports only the standard library and is started with ``-I -S``: a few milliseconds and a
few MiB, and nothing of Dagster or of this package (whose ``__init__`` imports Dagster).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
KILL_ALL = signal.SIGHUP  # the worker died, or a stop escalates: kill every process of the task
FORWARDED = (signal.SIGTERM, signal.SIGINT)
# As subprocess's restore_signals: Python ignores these, and the child must not inherit that.
_RESTORED = (signal.SIGPIPE, signal.SIGXFSZ)
_KILL_SECONDS = 5.0


def _prctl(option: int, value: int) -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}): {os.strerror(errno)}")


def _left() -> set[int]:
    """Live processes below the guard, and any other live member of its session or group."""
    me, group = os.getpid(), os.getpgid(0)
    children: dict[int, list[int]] = {}
    members = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if fields[0] == b"Z":  # dead already; re-parented to the guard and reaped by it
            continue
        pid, ppid, pgrp, session = int(entry), int(fields[1]), int(fields[2]), int(fields[3])
        children.setdefault(ppid, []).append(pid)
        if pid != me and (pgrp == group or session == me):
            members.add(pid)
    below, stack = set(), [me]
    while stack:
        for pid in children.get(stack.pop(), ()):
            if pid not in below:
                below.add(pid)
                stack.append(pid)
    return below | members


def _reap() -> None:
    """Collect the exit status of every child that has ended, so none stays a zombie."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_all() -> None:
    """SIGKILL everything left, scanning again until nothing is (a process may fork meanwhile)."""
    deadline = time.monotonic() + _KILL_SECONDS
    while time.monotonic() < deadline:
        pids = _left()
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _reap()


def _start(command: list[str]) -> int:
    """Fork and exec ``command``; the child dies with the guard and gets default signals."""
    guard = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    try:
        for signum in _RESTORED:
            signal.signal(signum, signal.SIG_DFL)
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == guard:  # else the guard died before the signal was armed
            os.execvp(command[0], command)
    except BaseException as exc:
        print(f"guard: cannot run {command[0]}: {exc}", file=sys.stderr)
    os._exit(127)


def _exit_as(status: int) -> None:
    """End the guard as the child ended: its exit code, or death by the same signal."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        os._exit(code)
    with contextlib.suppress(OSError):  # SIGKILL and SIGSTOP have no handler to reset
        signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
    os._exit(128 - code)  # a signal whose default action is not to terminate


def main(argv: list[str]) -> None:
    if len(argv) < 4 or argv[2] != "--":
        sys.exit("usage: guard.py WORKER_PID -- COMMAND [ARG...]")
    worker, command = int(argv[1]), argv[3:]
    child: int | None = None
    pending: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if child is None:
            pending.append(signum)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    def kill_everything(_signum: int, _frame: object) -> None:
        kill_all()
        os.kill(os.getpid(), signal.SIGKILL)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    signal.signal(KILL_ALL, kill_everything)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    _prctl(_PR_SET_PDEATHSIG, KILL_ALL)
    if os.getppid() != worker:  # the worker died before the parent-death signal was armed
        kill_everything(KILL_ALL, None)
    child = _start(command)
    for signum in pending:
        forward(signum, None)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            break
    kill_all()
    _exit_as(status)


if __name__ == "__main__":
    main(sys.argv)
