"""Stopping at SIGTERM / SIGINT (the notice a preempted or maintained TPU VM gets about 30 s before
it stops; Ctrl-C): the handlers only note the signal, the training loop acts on it.

The loop reads the note at a fixed cadence (`kan_vit.training.loop`): every replica contributes
its note to one gather there, so all replicas stop after the same update, write `last.pth` and
exit with status 128 + the signal (143 for SIGTERM, 130 for SIGINT), which schedulers tell from a
failure (1) or a bad config (2).

A signal can reach a process twice at once (a terminal's Ctrl-C or a VM shutdown signals every
process, and the launcher also forwards it to its replica processes): copies within
`REPEAT_WINDOW_S` of the first count as that one. A signal after that window stops the process
at once (the default action), without a checkpoint.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
import signal
import threading
import time

SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW_S = 1.0

_first = {"signum": 0, "at": 0.0}  # the first signal this process got; written by the handler only
_exit_hook = {"registered": False}


class Preempted(Exception):
    """Raised by the training loop after it stopped at a signal and wrote last.pth."""

    def __init__(self, signum: int, step: int):
        super().__init__(signum, step)  # both in args: the exception crosses process pools pickled
        self.signum, self.step = signum, step

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def requested() -> int:
    """The signal this process was asked to stop by, 0 while none."""
    return _first["signum"]


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _note(signum: int) -> bool:
    """Record the first signal; True when this one is a later, second request."""
    now = time.monotonic()
    if not _first["signum"]:
        _first["signum"], _first["at"] = signum, now
        return False
    return now - _first["at"] > REPEAT_WINDOW_S


def _stop_at_once(signum: int) -> None:
    for s in SIGNALS:
        signal.signal(s, signal.SIG_DFL)
    signal.raise_signal(signum)


def _on_signal(signum: int, frame) -> None:
    if _note(signum):
        _stop_at_once(signum)


def _forward(signum: int, frame) -> None:
    """The launcher's handler: its replica processes act on the signal."""
    second = _note(signum)
    for child in multiprocessing.active_children():
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:  # ended since it was listed
            pass
    if second:
        _stop_at_once(signum)


def install() -> None:
    """In a process that trains (its main thread): note SIGTERM / SIGINT instead of dying."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _on_signal)


def install_forwarding() -> None:
    """In a launcher whose replicas are child processes: pass each signal on to them."""
    for s in SIGNALS:
        signal.signal(s, _forward)


def ignore_in_loader_worker(worker_id: int) -> None:
    """A data loader worker's `worker_init_fn`: a signal to the whole process group (Ctrl-C, a VM
    shutdown) must not end the workers before the trainer's last update and checkpoint; the
    workers end with their trainer (`end_loader_workers_at_exit`)."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _kill_daemonic_children() -> None:
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def end_loader_workers_at_exit() -> None:
    """In a process that starts loader workers: at its exit multiprocessing ends daemonic children
    (loader workers) with SIGTERM, which they ignore, and waits for them; a finalizer that runs
    before that ends them with SIGKILL (they hold no state)."""
    if not _exit_hook["registered"]:
        multiprocessing.util.Finalize(None, _kill_daemonic_children, exitpriority=100)
        _exit_hook["registered"] = True


class InstallInWorker:
    """Travels with the function xmp.spawn sends to its worker processes: it is unpickled there in
    the worker's main thread (the replicas themselves run in other threads, where Python cannot
    set signal handlers), and unpickling it installs the handlers of `install` (it becomes None)."""

    def __reduce__(self):
        return (install, ())
