"""Tests for verifier.py: Countdown checking, math answer extraction, the math-verify worker pool
(timeouts, threads, crashes), equivalence and clustering.

The math tests start real worker processes; nasty cases use a 2 s timeout so the file stays ~30 s.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import verifier
from verifier import (
    STATUSES,
    VerifyResult,
    answers_equivalent,
    check_countdown,
    cluster_answers,
    count_statuses,
    extract_answer,
    verify,
    verify_batch,
    verify_math,
)

NASTY_TIMEOUT = 2.0
MARGIN = 2.0  # seconds allowed on top of the timeout: killing a worker, scheduling on a busy machine


@pytest.fixture(scope="module", autouse=True)
def warm_pool():
    """A pool of 2 workers whatever the CPU count (so that while one killed worker is replaced, the
    other serves the next item), started once so that wall-time assertions exclude the SymPy import."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VERIFIER_WORKERS", "2")
    verifier.shutdown_pool()
    assert verify_math(r"\boxed{1}", "1").correct
    assert verifier._pool().n_workers == 2
    yield
    verifier.shutdown_pool()
    mp.undo()


def cd(numbers, target):
    return {"task": "countdown", "numbers": numbers, "target": target}


# ----------------------------------------------------------------------------------------------------
# Countdown
# ----------------------------------------------------------------------------------------------------


def test_countdown_correct_chain():
    r = verify("5*3=15,15+7=22", cd([5, 3, 7], 22))
    assert r == VerifyResult(1.0, True, "22", "((3*5)+7)", "correct")


def test_countdown_commutative_variants_share_key():
    a = verify("5*3=15,15+7=22", cd([5, 3, 7], 22))
    b = verify("3*5=15,7+15=22", cd([5, 3, 7], 22))
    assert a.correct and b.correct and a.key == b.key


def test_countdown_association_variants_differ():
    a = verify("1+2=3,3+3=6", cd([1, 2, 3], 6))  # (1+2)+3
    b = verify("2+3=5,1+5=6", cd([1, 2, 3], 6))  # 1+(2+3)
    assert a.correct and b.correct and a.key != b.key


def test_countdown_number_reuse_rejected():
    r = verify("5+5=10,10+7=17", cd([5, 3, 7], 17))
    assert (r.correct, r.status, r.key) == (False, "wrong", None)
    assert "not available" in check_countdown("5+5=10,10+7=17", [5, 3, 7], 17).error


def test_countdown_intermediate_reused_twice_rejected():
    r = verify("2+3=5,5+5=10", cd([2, 3, 4], 10))
    assert not r.correct and r.status == "wrong"
    assert r.answer == "5"  # the chain parsed up to the value 5


def test_countdown_intermediate_and_equal_number_both_usable():
    # a result equal to an unused prompt number: both copies are available, once each
    assert verify("1+2=3,3+3=6", cd([1, 2, 3], 6)).correct


def test_countdown_wrong_arithmetic():
    r = verify("5*3=16,16+7=23", cd([5, 3, 7], 23))
    assert (r.correct, r.status, r.answer) == (False, "wrong", None)


def test_countdown_division_exactness():
    assert verify("8/2=4,4+3=7", cd([8, 2, 3], 7)).correct
    r = verify("7/2=3,3+3=6", cd([7, 2, 3], 6))
    assert not r.correct and r.status == "wrong"


def test_countdown_division_by_zero():
    r = verify("3-3=0,5/0=5", cd([3, 3, 5], 5))
    assert not r.correct and r.status == "wrong" and r.answer == "0"
    assert check_countdown("3-3=0,5/0=5", [3, 3, 5], 5).error == "division by zero"


def test_countdown_wrong_target():
    r = verify("5*3=15", cd([5, 3, 7], 22))
    assert (r.correct, r.status, r.answer, r.key) == (False, "wrong", "15", None)


@pytest.mark.parametrize("text", ["", "hello world", "the answer is 22", "5*3", ",,,", "=" * 1000])
def test_countdown_garbage_is_unparseable(text):
    r = verify(text, cd([5, 3, 7], 22))
    assert (r.reward, r.correct, r.answer, r.status) == (0.0, False, None, "unparseable")


def test_countdown_too_many_steps_is_wrong_not_unparseable():
    chain = ",".join(["1+1=2", "2-1=1"] * 9)
    r = verify(chain, cd([1, 1], 1))
    assert not r.correct and r.status == "wrong"


# ----------------------------------------------------------------------------------------------------
# Math: extraction
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{1/2}", "1/2"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
    (r"first \boxed{2}, finally \boxed{3}", "3"),  # the last box wins
    (r"\boxed{\boxed{3}}", "3"),
    (r"\fbox{7}", "7"),
    (r"so \boxed 5.", "5"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces are not grouping braces
    ("\\boxed\n{8}", "8"),
    (r"\boxed{3} then \boxed{4", "3"),  # a box never closed (truncation) does not count
    (r"\boxed{5} \boxed{ }", "5"),  # an empty box is skipped
    ("work\nAnswer: 42", "42"),
    ("answer:  $\\frac12$.", r"\frac12"),
    ("x = 6*7\n#### 42\n", "42"),
    ("Answer: 1\nmore thoughts\nANSWER: 2\n", "2"),
    ("Answer: 1\nAnswer:\n", "1"),  # an empty Answer line is skipped
    (r"\boxed{6} Answer: 7", "6"),  # a box beats an Answer line
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text", ["", "no answer here", r"\boxed{}", r"\boxed{1", r"\boxedfoo{3}", "{" * 10000,
                                  "The answer: 4", "\\\\boxed{3}"])
def test_extract_answer_none(text):
    assert extract_answer(text) is None


@pytest.mark.parametrize("text", [
    "a" * 1_000_000,
    "{" * 1_000_000,
    "\\boxed{" * 150_000,  # quadratic for "rfind the box, scan forward" extractors
    "\\boxed{" * 100_000 + "1" + "}" * 100_000,
    "\\boxed{1}" * 100_000,
    ("\\boxed" + " " * 1000) * 1000,
    "\n" * 1_000_000,
    "\\" * 1_000_000,
])
def test_extract_answer_is_fast_on_1mb(text):
    t0 = time.perf_counter()
    extract_answer(text)
    assert time.perf_counter() - t0 < 1.0


_NO_BACKSLASH = st.characters(blacklist_categories=("Cs",), blacklist_characters="\\")
_PLAIN = st.characters(blacklist_categories=("Cs",), blacklist_characters="\\{}$")


@settings(max_examples=200, deadline=None)
@given(noise=st.text(_NO_BACKSLASH, max_size=50), inner=st.text(_PLAIN, min_size=1, max_size=30),
       tail=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\\"), max_size=30))
def test_property_last_box_is_extracted(noise, inner, tail):
    """Whatever comes before (unbalanced braces, Answer lines) and after (no further box), the last
    complete box's content is the answer."""
    expected = verifier._clean_answer(inner)
    if not expected:
        return
    text = noise + r"\boxed{" + inner + "}" + tail
    assert extract_answer(text) == expected


# ----------------------------------------------------------------------------------------------------
# Math: verification
# ----------------------------------------------------------------------------------------------------


def test_math_decimal_vs_fraction():
    r = verify_math(r"so the answer is \boxed{1/2}", "0.5")
    assert r == VerifyResult(1.0, True, "1/2", None, "correct")


def test_math_latex_fraction_vs_slash():
    assert verify_math(r"\boxed{\frac{1}{2}}", "1/2").correct


def test_math_wrong_answer():
    r = verify_math(r"\boxed{3}", "2")
    assert (r.reward, r.correct, r.answer, r.status) == (0.0, False, "3", "wrong")


def test_math_last_boxed_wins():
    text = r"maybe \boxed{2}? no: \boxed{3}"
    assert verify_math(text, "3").correct
    assert not verify_math(text, "2").correct


def test_math_nested_braces():
    r = verify_math(r"\boxed{\frac{1}{2}}", "0.5")
    assert r.correct and r.answer == r"\frac{1}{2}"


def test_math_answer_line_and_gsm8k_marker():
    assert verify_math("6*7 = 42\nAnswer: 42", "42").correct
    assert verify_math("6*7 = 42\n#### 42", "42").correct
    assert verify_math("Answer: 42.", "42").correct  # the full stop is not part of the answer


def test_math_no_answer_is_unparseable():
    r = verify_math("I think it is forty-two", "42")
    assert r == VerifyResult(0.0, False, None, None, "unparseable")


def test_math_gold_with_box_and_dollars():
    assert verify_math(r"\boxed{4}", r"$\boxed{4}$").correct


def test_math_gold_is_passed_first():
    """math_verify.verify is asymmetric: with gold 1 an equation prediction is read as its right-hand
    side, but gold 2x+z=1 does not accept the prediction 1. Swapping the arguments flips both."""
    assert verify_math(r"\boxed{2x+z=1}", "1").correct
    assert not verify_math(r"\boxed{1}", "2x+z=1").correct
    assert verify_math(r"\boxed{(1,2)}", "1<x<2").correct
    assert not verify_math(r"\boxed{1<x<2}", "(1,2)").correct


def test_verify_default_task_is_math():
    assert verify(r"\boxed{7}", {"answer": "7"}).correct
    assert verify(r"\boxed{7}", {"answer": "7"}) == verify(r"\boxed{7}", {"task": "math", "answer": "7"})


def test_verify_batch_keeps_order_with_mixed_tasks():
    responses = [r"\boxed{2}", "5*3=15,15+7=22", "nothing", r"\boxed{3}", "garbage", r"\boxed{\frac{4}{2}}"]
    examples = [{"answer": "2"}, cd([5, 3, 7], 22), {"answer": "1"}, {"task": "math", "answer": "2"},
                cd([1, 2], 3), {"answer": "2"}]
    rs = verify_batch(responses, examples)
    assert [r.status for r in rs] == ["correct", "correct", "unparseable", "wrong", "unparseable", "correct"]
    assert [r.answer for r in rs] == ["2", "22", None, "3", None, r"\frac{4}{2}"]
    assert [r.reward for r in rs] == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]


def test_verify_batch_sends_all_math_items_at_once_gold_first(monkeypatch):
    calls = []

    def fake_run_jobs(jobs, timeout):
        calls.append(list(jobs))
        return [("correct", None)] * len(jobs)

    monkeypatch.setattr(verifier, "_run_jobs", fake_run_jobs)
    verify_batch([r"\boxed{a}", "1+2=3", r"\boxed{b}", "none", r"\boxed{c}"],
                 [{"answer": "A"}, cd([1, 2], 3), {"answer": "B"}, {"answer": "X"}, {"answer": "C"}])
    assert calls == [[("verify", r"\boxed{A}", r"\boxed{a}"), ("verify", r"\boxed{B}", r"\boxed{b}"),
                      ("verify", r"\boxed{C}", r"\boxed{c}")]]


def test_verify_batch_runs_items_concurrently():
    """Two hanging items with a 3 s timeout on 2 workers: done in ~3 s, where one by one takes >= 6 s."""
    t0 = time.perf_counter()
    rs = verify_batch([r"\boxed{9^{9^{9^{9}}}}", r"\boxed{10^{10^{10}}}"], [{"answer": "1"}] * 2, timeout=3.0)
    elapsed = time.perf_counter() - t0
    assert [r.status for r in rs] == ["timeout", "timeout"]
    assert elapsed < 5.0, elapsed


def test_verify_batch_rejects_bad_calls():
    with pytest.raises(ValueError):
        verify_batch(["x"], [{"task": "chess"}])
    with pytest.raises(ValueError):
        verify_batch(["x", "y"], [{"answer": "1"}])


def test_missing_gold_is_an_error_not_an_exception():
    r = verify(r"\boxed{1}", {"task": "math"})
    assert r.status == "error" and r.reward == 0.0
    rs = verify_batch([None, None], [{"answer": "1"}, cd([1, 2], 3)])  # e.g. a failed generation
    assert [r.status for r in rs] == ["error", "error"]


# ----------------------------------------------------------------------------------------------------
# Robustness: never raise, always return within the timeout
# ----------------------------------------------------------------------------------------------------

NASTY = [
    # (name, response, expected status or None for "any status")
    ("empty", "", "unparseable"),
    ("1MB of text", "a" * 1_000_000, "unparseable"),
    ("1MB inside a box", r"\boxed{" + "x" * 1_000_000 + "}", "timeout"),
    ("10000 open braces", "{" * 10_000, "unparseable"),
    ("10000 nested braces in a box", r"\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}", "timeout"),
    ("tower 9^9^9^9", r"\boxed{9^9^9^9}", None),  # math-verify reads it left-associatively: fast
    ("tower 9^{9^{9^{9}}}", r"\boxed{9^{9^{9^{9}}}}", "timeout"),
    ("huge factorial", r"\boxed{(10^{10})!}", "timeout"),
    ("big factorial", r"\boxed{100000!}", "wrong"),
    ("lone surrogate", "\ud800", "unparseable"),
    ("lone surrogate in a box", "\\boxed{\udfff\ud800}", None),
    ("lone surrogate after a box", "\\boxed{1}\ud800", "correct"),
    ("NUL before a box", "\x00\\boxed{1}", "correct"),
    ("NUL in a box", "\\boxed{1\x00}", None),
    ("a long sum", r"\boxed{" + "1+" * 100_000 + "1}", None),
]


@pytest.mark.parametrize("name, response, expected", NASTY, ids=[n for n, _, _ in NASTY])
def test_nasty_inputs_never_raise_and_are_bounded(name, response, expected):
    t0 = time.perf_counter()
    r = verify_math(response, "1", timeout=NASTY_TIMEOUT)
    elapsed = time.perf_counter() - t0
    assert isinstance(r, VerifyResult) and r.status in STATUSES
    assert r.reward == (1.0 if r.status == "correct" else 0.0)
    assert elapsed < NASTY_TIMEOUT + MARGIN, elapsed
    if expected is not None:
        assert r.status == expected


def test_pool_recovers_after_timeouts():
    assert verify_math(r"\boxed{9^{9^{9^{9}}}}", "1", timeout=1.0).status == "timeout"
    assert verify_math(r"\boxed{\frac{6}{3}}", "2").correct


def test_pool_recovers_from_killed_workers():
    assert verify_math(r"\boxed{1}", "1").correct
    pool = verifier._pool()
    assert pool.workers
    for w in pool.workers:  # simulate crashes of idle workers (OOM killer, segfault)
        os.kill(w.proc.pid, signal.SIGKILL)
        w.proc.wait()
    assert verify_math(r"\boxed{2}", "2").correct


_NASTY_PIECES = st.sampled_from([r"\boxed{", r"\fbox{", "{", "}", r"\frac", "^", "!", "1", "9", "/", "x", "=",
                                 "Answer:", "####", "\n", " ", "\\", "$", ".", "\x00"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=200),
                 st.lists(st.one_of(_NASTY_PIECES, st.text(max_size=5)), max_size=40).map("".join)))
def test_property_verify_math_never_raises(text):
    t0 = time.perf_counter()
    r = verify_math(text, "1", timeout=NASTY_TIMEOUT)
    assert r.status in STATUSES
    assert r.correct == (r.status == "correct") and r.reward == float(r.correct)
    assert time.perf_counter() - t0 < NASTY_TIMEOUT + MARGIN


# ----------------------------------------------------------------------------------------------------
# Threads: no signal-based timeout anywhere
# ----------------------------------------------------------------------------------------------------


def _in_thread(fn):
    out, errors = [], []

    def target():
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=target)
    t.start()
    t.join(60)
    assert not errors, errors
    return out[0]


def test_verify_math_from_a_thread():
    # math_verify with its default (signal.alarm) timeouts raises ValueError outside the main thread
    r = _in_thread(lambda: verify_math(r"\boxed{\frac{2}{4}}", "1/2"))
    assert r.correct and r.status == "correct"
    assert not _in_thread(lambda: verify_math(r"\boxed{3}", "1/2")).correct


def test_timeout_from_a_thread():
    t0 = time.perf_counter()
    r = _in_thread(lambda: verify_math(r"\boxed{9^{9^{9^{9}}}}", "1", timeout=1.0))
    assert r.status == "timeout" and time.perf_counter() - t0 < 1.0 + MARGIN


def test_concurrent_callers_from_threads():
    results = {}

    def worker(k):
        results[k] = verify_math(rf"\boxed{{{k}/2}}", str(k / 2))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [1, 2, 3, 4] and all(r.correct for r in results.values())


# ----------------------------------------------------------------------------------------------------
# Equivalence, clustering, counting
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("a, b, expected", [
    ("1/2", "0.5", True),
    (r"\frac{1}{2}", "1/2", True),
    ("2", "3", False),
    (r"\{1,2\}", r"\{2,1\}", True),
    ("x", "y", False),
    ("1 / 2", r"\frac{1}{2}", True),
])
def test_answers_equivalent_math(a, b, expected):
    assert answers_equivalent(a, b, "math") is expected
    assert answers_equivalent(b, a, "math") is expected


def test_answers_equivalent_is_the_symmetric_closure():
    # verify(gold=1, pred=2x+z=1) is True but verify(gold=2x+z=1, pred=1) is False: either order counts
    assert answers_equivalent("2x+z=1", "1", "math")
    assert answers_equivalent("1", "2x+z=1", "math")


def test_answers_equivalent_fast_path_needs_no_worker(monkeypatch):
    def no_pool(jobs, timeout):
        raise AssertionError("the pool must not be used for equal strings")

    monkeypatch.setattr(verifier, "_run_jobs", no_pool)
    assert answers_equivalent(" $\\frac{1}{2}$ ", r"\frac{1}{2}", "math")
    assert answers_equivalent("$$7$$", " 7", "math")


def test_answers_equivalent_countdown_and_none():
    assert answers_equivalent("22", " 22", "countdown")
    assert answers_equivalent("22", "022", "countdown")
    assert not answers_equivalent("22", "23", "countdown")
    assert not answers_equivalent(None, "1", "math")
    assert not answers_equivalent(None, None, "countdown")


def test_cluster_answers_math():
    answers = ["1/2", "0.5", None, "2", r"\frac{1}{2}", None, "2.0", "x"]
    assert cluster_answers(answers, "math") == [0, 0, 1, 2, 0, 1, 2, 3]


def test_cluster_answers_is_greedy_first_match():
    # "1" is equivalent to both equations, which are not equivalent to each other: it joins the first
    assert cluster_answers(["2x+z=1", "x+y=1", "1"], "math") == [0, 1, 0]
    assert cluster_answers(["x+y=1", "2x+z=1", "1", "2x+z=1"], "math") == [0, 1, 0, 1]


def test_cluster_answers_countdown_and_edge_cases():
    assert cluster_answers(["22", "21", "22", None, "022", None], "countdown") == [0, 1, 0, 2, 0, 2]
    assert cluster_answers([], "math") == []
    assert cluster_answers([None, None], "math") == [0, 0]


def test_count_statuses():
    rs = [VerifyResult(1.0, True, "1", None, "correct"), VerifyResult(0.0, False, None, None, "timeout"),
          VerifyResult(0.0, False, "2", None, "wrong"), VerifyResult(0.0, False, "3", None, "wrong")]
    assert count_statuses(rs) == {"correct": 1, "wrong": 2, "unparseable": 0, "timeout": 1, "error": 0}
    assert count_statuses([]) == dict.fromkeys(STATUSES, 0)
