"""Run SymPy calls under a time limit, so that no derivation can hang.

On the main thread of a POSIX process the limit is on the CPU time of this
process (an ITIMER_PROF timer, SIGPROF), which costs nothing when the call
finishes in time and, unlike a wall-clock limit, does not shrink when other
programs load the machine: the same source compiles to the same code on a busy
machine as on an idle one. Elsewhere (a worker thread, Windows) the call runs in
a forked child process under a wall-clock limit when fork is available, and
without a limit otherwise.

A bounded call limits one SymPy call; :func:`with_deadline` bounds a whole block (a compilation): every
SymPy call, numeric evaluation, simplification and line of sdelang's own code in it, on the same timer.
Bounded calls inside it get at most what is left of the deadline, and re-arm it when they return.
"""
from __future__ import annotations

import gc
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


class DeadlineExceeded(BaseException):
    """Raised anywhere in a :func:`with_deadline` block that ran out of time; caught by with_deadline."""


# Once a call is over time the timer keeps firing at this interval (CPU seconds) until the call
# has stopped: an exception raised where Python ignores it (a __del__, a weakref callback, a bare
# except in the library) would otherwise leave the call running with no limit at all.
REPEAT = 0.05
_running = [False]  # a call is under the limit: the handler raises only then
_deadline: list[float | None] = [None]  # process_time() at which the enclosing with_deadline block ends
_fired: list[float | None] = [None]  # the deadline the handler last raised DeadlineExceeded for: once per deadline
SLACK = 0.01  # the timer and process_time() read the same clock, rounded differently


# A tick that falls due during a garbage collection (its callbacks, finalizers) waits for the next tick (REPEAT
# later): an exception raised there is printed and dropped by Python, so it would not stop the call anyway, and
# test runners report the dropped exception as an error of whatever runs. Ticks in plain code raise as always.
# After this many waits in one call every tick raises again, wherever it lands: a safeguard should the flag
# below ever stay set.
MAX_DEFERRED = 40
_collecting = [False]  # between the first and the last gc callback of a collection
_deferred = [0]


def _gc_enter(phase, info):
    if phase == "start":
        _collecting[0] = True


def _gc_leave(phase, info):
    if phase == "stop":
        _collecting[0] = False


def _bracket_collections() -> None:
    """Put _gc_enter first and _gc_leave last among the gc callbacks, so that the flag covers every other one
    (callbacks added since the last bracketing included); reset the count of waiting ticks."""
    for callback in (_gc_enter, _gc_leave):
        while callback in gc.callbacks:
            gc.callbacks.remove(callback)
    gc.callbacks.insert(0, _gc_enter)
    gc.callbacks.append(_gc_leave)
    _deferred[0] = 0


def _on_timer(signum, frame):
    if not _running[0] and not (_deadline[0] is not None and time.process_time() >= _deadline[0] - SLACK):
        return
    if _collecting[0] and _deferred[0] < MAX_DEFERRED:
        _deferred[0] += 1
        return
    if _running[0]:
        raise TimeLimitExceeded()
    # Once per deadline: the timer repeats until stopped, and a second tick in the clean-up after the first (in
    # with_deadline's finally) escaped it, a DeadlineExceeded traceback instead of the located error.
    if _fired[0] == _deadline[0]:
        return
    _fired[0] = _deadline[0]
    raise DeadlineExceeded()


def _deadline_passed() -> bool:
    return _deadline[0] is not None and time.process_time() >= _deadline[0] - SLACK


def _rearm() -> None:
    """Point the timer at the enclosing deadline (or stop it); raise DeadlineExceeded if that has passed."""
    if _deadline[0] is None:
        signal.setitimer(signal.ITIMER_PROF, 0)
        return
    left = _deadline[0] - time.process_time()
    if left <= SLACK:
        raise DeadlineExceeded()
    signal.setitimer(signal.ITIMER_PROF, left, REPEAT)


def _signals_usable() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def with_deadline(seconds: float, fn: Callable[..., Any], *args, **kwargs) -> tuple[bool, Any]:
    """``(True, fn(*args, **kwargs))``, or ``(False, None)`` once the block has used ``seconds`` of CPU time.

    Unlike a bounded call, the limit holds inside and outside SymPy alike. On a worker thread or without
    POSIX timers, fn runs without one. A deadline inside another ends no later than the outer one.
    """
    if not _signals_usable():
        return True, fn(*args, **kwargs)
    outer = _deadline[0]
    mine = time.process_time() + seconds
    previous = signal.signal(signal.SIGPROF, _on_timer)
    _bracket_collections()
    try:
        try:
            try:
                _deadline[0] = mine if outer is None else min(mine, outer)
                _rearm()
                return True, fn(*args, **kwargs)
            except DeadlineExceeded:
                if outer is not None and time.process_time() >= outer - SLACK:
                    raise  # the outer block's deadline: its with_deadline answers
                return False, None
            finally:
                _close(outer)
        except DeadlineExceeded:
            # The tick came in the clean-up above (fn had returned at its deadline): over time all the same.
            if outer is not None and time.process_time() >= outer - SLACK:
                raise
            _close(outer)
            return False, None
    finally:
        signal.signal(signal.SIGPROF, previous)


def _close(outer: float | None) -> None:
    """Restore the outer deadline. The timer may still fire while this runs (it repeats until stopped):
    each try sets the deadline first, in one step, so the next one gets further."""
    while True:
        try:
            _deadline[0] = outer
            if outer is None:
                signal.setitimer(signal.ITIMER_PROF, 0)
            else:
                _rearm()
            return
        except DeadlineExceeded:
            if outer is not None:
                raise


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
    by_deadline = False
    if _deadline[0] is not None and _deadline[0] - time.process_time() <= seconds:
        seconds, by_deadline = max(_deadline[0] - time.process_time(), 0.0), True
    budget = _budgets[-1] if _budgets else None
    if budget is None:
        ok, value = _call(seconds, fn, args, kwargs)
    else:
        limit = min(seconds, budget.left)
        by_deadline = by_deadline and limit == seconds
        if limit <= 0.01 and not by_deadline:
            budget.exhausted += 1
            return False, None
        start = time.process_time()
        ok, value = _call(limit, fn, args, kwargs)
        budget.left -= time.process_time() - start
        if not ok:
            budget.exhausted += 1
    if not ok and by_deadline:
        raise DeadlineExceeded()  # stopped by the enclosing deadline (the timer may fire a tick early)
    return ok, value


def _call(seconds, fn, args, kwargs):
    if _signals_usable():
        if seconds <= 0:
            _rearm()  # raises DeadlineExceeded: the enclosing deadline has passed
            return False, None
        previous = signal.signal(signal.SIGPROF, _on_timer)
        _bracket_collections()
        _running[0] = True
        signal.setitimer(signal.ITIMER_PROF, seconds, REPEAT)
        try:
            try:
                return True, fn(*args, **kwargs)
            except TimeLimitExceeded:
                return False, None
            except RecursionError:  # an expression too deep for this SymPy routine: it did not finish
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
            _rearm()  # the enclosing deadline, if any; raises DeadlineExceeded if it has passed
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
