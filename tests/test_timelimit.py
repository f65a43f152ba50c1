"""The time limit on SymPy calls: a call that runs long is cut short, one that does not is untouched; and the
hard deadline on a whole compilation, inside and outside those calls."""
from __future__ import annotations

import signal
import threading
import time

import pytest
import sympy as sp

from sdelang.compiler.timelimit import Budget, call_with_time_limit, with_deadline


def spin(seconds):
    """Busy CPU work for about ``seconds`` of CPU time (the limit counts CPU time, not sleep)."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    return "done"


def test_a_quick_call_returns_its_value():
    assert call_with_time_limit(1.0, lambda a, b: a + b, 2, b=3) == (True, 5)


def test_a_long_call_is_cut_short():
    start = time.process_time()
    ok, value = call_with_time_limit(0.2, spin, 30.0)
    assert (ok, value) == (False, None)
    assert time.process_time() - start < 5.0


def test_a_long_sympy_call_is_cut_short():
    """SymPy's own exception handlers must not swallow the limit."""
    x = sp.Symbol("x")
    ok, _ = call_with_time_limit(0.3, sp.integrate, sp.exp(sp.sin(x) ** 3 + sp.tan(x) ** 5) / (1 + x**7), x)
    assert not ok


def test_exceptions_of_the_call_propagate():
    def fail():
        raise ValueError("boom")
    try:
        call_with_time_limit(1.0, fail)
    except ValueError as exc:
        assert str(exc) == "boom"
    else:
        raise AssertionError("the exception was swallowed")


def test_budget_caps_the_total():
    with Budget(0.5) as budget:
        results = [call_with_time_limit(10.0, spin, 30.0) for _ in range(3)]
    assert [ok for ok, _ in results] == [False, False, False]
    assert budget.exhausted == 3 and budget.left <= 0.01


def test_budget_counts_only_what_calls_use():
    with Budget(5.0) as budget:
        assert call_with_time_limit(1.0, spin, 0.05) == (True, "done")
    assert budget.exhausted == 0 and 4.0 < budget.left < 4.96


def test_off_the_main_thread_the_call_runs_in_a_child_process():
    box = {}

    def worker():
        box["quick"] = call_with_time_limit(5.0, lambda: 42)
        box["slow"] = call_with_time_limit(0.3, spin, 30.0)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(60)
    assert box == {"quick": (True, 42), "slow": (False, None)}


def test_a_limit_swallowed_once_still_stops_the_call():
    """The first TimeLimitExceeded lands where it is ignored (here a bare except, like some library
    code): the timer fires again, so the call still ends."""
    def stubborn():
        try:
            spin(30.0)
        except BaseException:
            pass
        return spin(30.0)

    start = time.process_time()
    assert call_with_time_limit(0.2, stubborn) == (False, None)
    assert time.process_time() - start < 5.0


def test_no_timer_is_left_running():
    import signal

    call_with_time_limit(0.1, spin, 30.0)
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)
    assert spin(0.3) == "done"  # would raise if a repeat were still armed


# --- the hard bound on a whole block (a compilation) -------------------------------------------------

def test_a_deadline_stops_plain_python_code():
    """Outside any bounded call, in sdelang's own code, the deadline still holds."""
    start = time.process_time()
    assert with_deadline(0.3, spin, 30.0) == (False, None)
    assert time.process_time() - start < 5.0
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)


def test_a_deadline_returns_the_value_and_leaves_no_timer():
    assert with_deadline(5.0, lambda a: a * 2, 21) == (True, 42)
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)
    assert spin(0.3) == "done"  # nothing fires later


def test_a_bounded_call_inside_a_deadline_gets_only_what_is_left():
    """A bounded call with a long limit cannot outlive the deadline around it, and the deadline holds again
    after the call returns."""
    def block():
        ok, _ = call_with_time_limit(30.0, spin, 30.0)
        return ok

    start = time.process_time()
    assert with_deadline(0.3, block) == (False, None)
    assert time.process_time() - start < 5.0

    def after_a_quick_call():
        assert call_with_time_limit(5.0, lambda: 1) == (True, 1)
        spin(30.0)

    start = time.process_time()
    assert with_deadline(0.3, after_a_quick_call) == (False, None)
    assert time.process_time() - start < 5.0


def test_an_expired_deadline_is_not_swallowed_by_sympy_or_except_exception():
    x = sp.Symbol("x")

    def stubborn():
        while True:
            try:
                sp.integrate(sp.exp(sp.sin(x) ** 3 + sp.tan(x) ** 5) / (1 + x**7), x)
            except Exception:  # noqa: BLE001 - what careless code does
                pass

    start = time.process_time()
    assert with_deadline(0.5, stubborn) == (False, None)
    assert time.process_time() - start < 5.0


def test_an_inner_deadline_ends_with_the_outer_one():
    def inner():
        return with_deadline(30.0, spin, 30.0)

    start = time.process_time()
    assert with_deadline(0.3, inner) == (False, None)
    assert time.process_time() - start < 5.0


def test_a_recursion_error_in_a_bounded_call_is_a_call_that_did_not_finish():
    def deep(n):
        return deep(n + 1)

    assert call_with_time_limit(5.0, deep, 0) == (False, None)


# --- a limit that falls due inside a garbage collection --------------------------------------------

class _SlowCollections:
    """A gc callback that spends ``seconds`` of CPU time in every collection, as a library's callback may
    (Hypothesis installs one); an exception raised inside it is printed and dropped by Python."""

    def __init__(self, seconds):
        self.seconds, self.calls = seconds, 0

    def __call__(self, phase, info):
        if phase == "start":
            self.calls += 1
            spin(self.seconds)

    def __enter__(self):
        import gc
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        import gc
        gc.callbacks.remove(self)


def _collecting(seconds_between):
    """Collect garbage over and over, with about ``seconds_between`` of CPU time of plain code in between."""
    import gc
    while True:
        gc.collect(0)
        spin(seconds_between)


def _unraisable_during(fn):
    """fn's result and the exceptions Python dropped while it ran (sys.unraisablehook)."""
    import sys
    dropped, previous = [], sys.unraisablehook
    sys.unraisablehook = lambda report: dropped.append(report.exc_type)
    try:
        return fn(), dropped
    finally:
        sys.unraisablehook = previous


def test_a_limit_due_during_a_collection_waits_for_it_to_end():
    """The timer falls due while a gc callback runs (most of the time is spent in one here): raising there
    would be printed and dropped (pytest reports such an exception as an error of whatever test is running).
    The limit waits for the collection to end and stops the call in plain code."""
    start = time.process_time()
    with _SlowCollections(0.02) as slow:
        result, dropped = _unraisable_during(lambda: call_with_time_limit(0.3, _collecting, 0.002))
    assert result == (False, None)
    assert slow.calls > 5  # the timer had collections to fall into
    assert dropped == []
    assert time.process_time() - start < 5.0


def test_a_deadline_due_during_a_collection_waits_for_it_to_end():
    start = time.process_time()
    with _SlowCollections(0.02) as slow:
        result, dropped = _unraisable_during(lambda: with_deadline(0.3, _collecting, 0.002))
    assert result == (False, None)
    assert slow.calls > 5
    assert dropped == []
    assert time.process_time() - start < 5.0


def test_a_call_that_is_almost_always_collecting_is_still_stopped():
    """A call that spends nine tenths of its time in collections: the ticks that land in plain code stop it."""
    start = time.process_time()
    with _SlowCollections(0.01):
        assert call_with_time_limit(0.2, _collecting, 0.001) == (False, None)
    assert time.process_time() - start < 10.0


def test_waiting_for_collections_is_bounded():
    """Should the collection flag stay set, the wait ends after MAX_DEFERRED ticks and the limit raises."""
    from sdelang.compiler import timelimit
    timelimit._collecting[0] = True
    try:
        start = time.process_time()
        # The collection flag is set again at every bracketing; hold it set as a stuck flag would be.
        ok, _ = call_with_time_limit(0.1, lambda: [timelimit._collecting.__setitem__(0, True), spin(30.0)])
        assert not ok
        assert time.process_time() - start < 0.1 + (timelimit.MAX_DEFERRED + 5) * timelimit.REPEAT + 1.0
    finally:
        timelimit._collecting[0] = False


def test_the_deadline_is_raised_once_per_deadline(monkeypatch):
    """The timer repeats until stopped: a second tick in with_deadline's clean-up after the first escaped it (a
    DeadlineExceeded traceback where the compile should have given its located error). The handler raises once for
    a given deadline and lets later ticks pass; a new deadline raises again."""
    import time as _time

    from sdelang.compiler import timelimit

    monkeypatch.setattr(timelimit, "_deadline", [_time.process_time() - 1.0])
    monkeypatch.setattr(timelimit, "_fired", [None])
    monkeypatch.setattr(timelimit, "_running", [False])
    monkeypatch.setattr(timelimit, "_collecting", [False])
    with pytest.raises(timelimit.DeadlineExceeded):
        timelimit._on_timer(None, None)
    assert timelimit._on_timer(None, None) is None   # the same deadline: once
    timelimit._deadline[0] -= 1.0
    with pytest.raises(timelimit.DeadlineExceeded):
        timelimit._on_timer(None, None)
