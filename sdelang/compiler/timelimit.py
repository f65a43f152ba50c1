"""Run SymPy calls under a time limit, so that no derivation can hang.

On the main thread of a POSIX process the limit is on the CPU time of this
process (an ITIMER_PROF timer, SIGPROF), which costs nothing when the call
finishes in time and, unlike a wall-clock limit, does not shrink when other
programs load the machine: the same source compiles to the same code on a busy
machine as on an idle one. Elsewhere (a worker thread, Windows) the call runs in
a forked child process under a wall-clock limit when fork is available, and
without a limit otherwise.
"""
from __future__ import annotations

import multiprocessing
import signal
import threading
import time
from typing import Any, Callable


class TimeLimitExceeded(BaseException):
    """Raised inside a call that ran out of time.

    A BaseException, so that SymPy's own ``except Exception`` handlers do not
    swallow it.
    """


# Once a call is over time the timer keeps firing at this interval (CPU seconds) until the call
# has stopped: an exception raised where Python ignores it (a __del__, a weakref callback, a bare
# except in the library) would otherwise leave the call running with no limit at all.
REPEAT = 0.05
_running = [False]  # a call is under the limit: the handler raises only then


def _on_timer(signum, frame):
    if _running[0]:
        raise TimeLimitExceeded()


class Budget:
    """A total allowance of seconds shared by the bounded calls of one compilation.

    Each call gets at most what is left, so a compilation ends in bounded time
    however many SymPy calls run out of time on the way.
    """

    def __init__(self, seconds: float):
        self.left = seconds
        self.exhausted = 0  # calls cut short or skipped

    def __enter__(self):
        _budgets.append(self)
        return self

    def __exit__(self, *exc):
        _budgets.pop()


_budgets: list[Budget] = []


def call_with_time_limit(seconds: float, fn: Callable[..., Any], *args, **kwargs) -> tuple[bool, Any]:
    """Return ``(True, fn(*args, **kwargs))``, or ``(False, None)`` if it took over ``seconds``.

    Inside ``with Budget(total):`` the limit is also capped by what is left of the total.
    """
    budget = _budgets[-1] if _budgets else None
    if budget is None:
        return _call(seconds, fn, args, kwargs)
    limit = min(seconds, budget.left)
    if limit <= 0.01:
        budget.exhausted += 1
        return False, None
    start = time.process_time()
    ok, value = _call(limit, fn, args, kwargs)
    budget.left -= time.process_time() - start
    if not ok:
        budget.exhausted += 1
    return ok, value


def _call(seconds, fn, args, kwargs):
    if hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGPROF, _on_timer)
        _running[0] = True
        signal.setitimer(signal.ITIMER_PROF, seconds, REPEAT)
        try:
            try:
                return True, fn(*args, **kwargs)
            except TimeLimitExceeded:
                return False, None
            finally:
                _running[0] = False
                signal.setitimer(signal.ITIMER_PROF, 0)
        except TimeLimitExceeded:  # a repeat that fired before the lines above ran
            _running[0] = False
            signal.setitimer(signal.ITIMER_PROF, 0)
            return False, None
        finally:
            signal.signal(signal.SIGPROF, previous)
    if "fork" in multiprocessing.get_all_start_methods():
        return _call_in_child(seconds, fn, args, kwargs)
    return True, fn(*args, **kwargs)


def _child(conn, fn, args, kwargs):
    conn.send(fn(*args, **kwargs))
    conn.close()


def _call_in_child(seconds, fn, args, kwargs):
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args, kwargs), daemon=True)
    proc.start()
    child.close()
    try:
        if parent.poll(seconds):
            return True, parent.recv()
        return False, None
    finally:
        proc.kill()
        proc.join()
        parent.close()
