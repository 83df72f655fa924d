"""Tests for verifier.py: Countdown checking (and malformed examples), math answer extraction in both
modes, verification, the math-verify worker pool (timeouts, threads, crashes, a killed parent),
equivalence and clustering.

The math tests start real worker processes; nasty cases use a 2 s timeout so the file stays ~1 min.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import verifier
from verifier import (
    MATH_MODES,
    STATUSES,
    VerifyResult,
    answers_equivalent,
    check_countdown,
    cluster_answers,
    count_statuses,
    extract_answer,
    has_final_answer_anchor,
    verify,
    verify_batch,
    verify_math,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where verifier.py lives
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


@pytest.mark.parametrize("example, why", [
    ({"task": "countdown", "numbers": [1, 2]}, "target"),  # a missing field
    ({"task": "countdown", "target": 3}, "numbers"),
    ({"task": "countdown", "numbers": "12", "target": 3}, "numbers"),  # a string is not a list
    ({"task": "countdown", "numbers": [1, "2"], "target": 3}, "numbers"),
    ({"task": "countdown", "numbers": [1, 2.5], "target": 3}, "numbers"),
    ({"task": "countdown", "numbers": [1, True], "target": 2}, "numbers"),
    ({"task": "countdown", "numbers": None, "target": 3}, "numbers"),
    ({"task": "countdown", "numbers": [1, 2], "target": "3"}, "target"),
    ({"task": "countdown", "numbers": [1, 2], "target": 10**4000}, "target"),  # str() of it raises
])
def test_countdown_malformed_example_is_an_error_not_an_exception(example, why):
    r = verify("1+2=3", example)
    assert (r.reward, r.correct, r.answer, r.status) == (0.0, False, None, "error")
    assert why in r.detail
    check = check_countdown("1+2=3", example.get("numbers"), example.get("target"))
    assert not check.correct and check.error.startswith("invalid example")


def test_countdown_whole_floats_are_accepted():
    # e.g. a JSON file written by a tool that stores every number as a float
    assert verify("1+2=3", {"task": "countdown", "numbers": [1.0, 2], "target": 3.0}).correct


def test_non_dict_example_is_an_error():
    rs = verify_batch(["1+2=3", r"\boxed{1}"], [None, ["answer", "1"]])
    assert [(r.status, r.reward) for r in rs] == [("error", 0.0), ("error", 0.0)]


_ANY = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4),
                 st.lists(st.one_of(st.integers(), st.floats(), st.text(max_size=3), st.none()), max_size=4))


@settings(max_examples=200, deadline=None)
@given(example=st.fixed_dictionaries({"task": st.just("countdown")},
                                     optional={"numbers": _ANY, "target": _ANY}),
       response=st.text(max_size=30))
def test_property_malformed_countdown_examples_never_raise(example, response):
    r = verify(response, example)
    assert r.status in STATUSES and r.reward == float(r.correct)


# ----------------------------------------------------------------------------------------------------
# Math: extraction (math-verify's) and the strict mode's anchor check
# ----------------------------------------------------------------------------------------------------

INTERMEDIATE = (r"First try: \boxed{2}. That is wrong, because the area grows with the square of the side. "
                r"So the area is \boxed{3}.")


@pytest.mark.parametrize("text, default, strict", [
    # several boxes side by side are one set answer (math-verify's rule), in both modes
    (r"so $\boxed{1},\boxed{2},\boxed{3}$", "1,2,3", "1,2,3"),
    (r"The integers are \boxed{-2} and \boxed{1}.", "-2,1", "-2,1"),
    (r"\[ \boxed{-2} \quad \text{and} \quad \boxed{1}. \]", "-2,1", "-2,1"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}", r"\{1,2\}"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", r"\frac{1}{2}"),
    (INTERMEDIATE, "3", "3"),  # a box far before the last one is an intermediate result
    (r"\boxed{3} then \boxed{4", "3", "3"),  # a box never closed (truncation) does not count
    (r"\fbox{7}", "7", "7"),
    (r"\boxed{6} Answer: 7", "6", "6"),  # a box beats an Answer line
    # unanchored answers: graded by default, not in strict mode
    ("the result is 42", "42", None),
    ("The answer is 42", "42", None),  # an anchor must start a line
    (r"\boxed{} so it is 42", "42", None),  # an empty box does not let a stray number through
    # Answer: / Final Answer: lines and GSM8K's ####
    ("6*7 = 42\nAnswer: 42", "42", "42"),
    ("Answer: 42.", "42", "42"),
    ("answer:  $\\frac12$.", r"\frac{1}{2}", r"\frac{1}{2}"),
    ("Answer: 1\nmore thoughts\nANSWER: 2\n", "2", "2"),
    ("Final Answer: The final answer is $28$. I hope it is correct.", "28", "28"),
    ("x = 6*7\n#### 42\nthat took 3 steps", "42", "42"),  # #### is an anchor: not the later 3
    # nothing to extract
    ("I think it is forty-two", None, None),
    ("", None, None),
])
def test_extract_answer(text, default, strict):
    assert extract_answer(text) == default
    assert extract_answer(text, mode="strict") == strict


@pytest.mark.parametrize("text, anchored", [
    (r"so \boxed{1}", True),
    (r"\fbox{1}", True),
    ("work\nAnswer: 4", True),
    ("  answer :4", True),
    ("Final Answer: The final answer is $4$.", True),
    ("x\n#### 4", True),
    ("The answer: 4", False),
    ("the answer is 4", False),
    ("4", False),
    ("", False),
])
def test_has_final_answer_anchor(text, anchored):
    assert has_final_answer_anchor(text) is anchored


@pytest.mark.parametrize("text", [
    "a" * 1_000_000,
    "\n" * 1_000_000,  # a leading \s* in the Answer-line regex would be quadratic here
    "\n " * 500_000,
    "Answer" * 150_000,
    "{" * 1_000_000,
    "\\" * 1_000_000,
])
def test_anchor_check_is_fast_on_1mb(text):
    """The anchor check runs in the caller's (the trainer's) process, with no timeout around it."""
    t0 = time.perf_counter()
    has_final_answer_anchor(text)
    assert time.perf_counter() - t0 < 1.0


def test_strict_mode_needs_no_worker_for_unanchored_responses(monkeypatch):
    def no_pool(jobs, timeout):
        if jobs:
            raise AssertionError("an unanchored response must not reach the pool in strict mode")
        return []

    monkeypatch.setattr(verifier, "_run_jobs", no_pool)
    r = verify_math("the result is " + "9" * 100_000, "1", mode="strict")
    assert r == VerifyResult(0.0, False, None, None, "unparseable")
    assert extract_answer("the result is 42", mode="strict") is None


def test_unknown_mode_is_a_callers_bug():
    for call in (lambda: verify_math(r"\boxed{1}", "1", mode="lenient"),
                 lambda: verify_batch([], [], mode="boxed"), lambda: extract_answer("1", mode="")):
        with pytest.raises(ValueError):
            call()
    assert MATH_MODES == ("math-verify", "strict") and verifier.DEFAULT_MATH_MODE == "math-verify"


_NOISE = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\\{}$"), max_size=60)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(noise=_NOISE, n=st.integers(-10**6, 10**6), mode=st.sampled_from(MATH_MODES))
def test_property_a_final_box_is_graded(noise, n, mode):
    """Whatever prose comes first (Answer lines and numbers included), a box at the end is the answer."""
    assert verify_math(noise + "\n\n" + rf"\boxed{{{n}}}", str(n), mode=mode).correct


# ----------------------------------------------------------------------------------------------------
# Math: verification
# ----------------------------------------------------------------------------------------------------


def test_math_decimal_vs_fraction():
    r = verify_math(r"so the answer is \boxed{1/2}", "0.5")
    assert r == VerifyResult(1.0, True, r"\frac{1}{2}", None, "correct")  # the answer as math-verify read it


def test_math_latex_fraction_vs_slash():
    assert verify_math(r"\boxed{\frac{1}{2}}", "1/2").correct


def test_math_wrong_answer():
    r = verify_math(r"\boxed{3}", "2")
    assert (r.reward, r.correct, r.answer, r.status) == (0.0, False, "3", "wrong")


@pytest.mark.parametrize("mode", MATH_MODES)
@pytest.mark.parametrize("gold", ["{1,2,3}", r"\{1,2,3\}", "1,2,3", r"\{3, 2, 1\}"])
def test_math_multiple_boxes_against_a_set_gold(gold, mode):
    """The last-box-only extractor graded these wrong: it saw only "3"."""
    text = r"The solutions are \boxed{1}, \boxed{2}, \boxed{3}."
    r = verify_math(text, gold, mode=mode)
    assert (r.status, r.answer) == ("correct", "1,2,3")
    assert not verify_math(text, "3", mode=mode).correct


@pytest.mark.parametrize("mode", MATH_MODES)
def test_math_boxes_joined_by_words(mode):
    text = r"Thus the integers are \[ \boxed{-2} \quad \text{and} \quad \boxed{1}. \]"
    assert verify_math(text, "1,-2", mode=mode).correct
    assert not verify_math(text, "-2", mode=mode).correct


@pytest.mark.parametrize("mode", MATH_MODES)
def test_math_intermediate_box_before_the_final_answer(mode):
    assert verify_math(INTERMEDIATE, "3", mode=mode).correct
    assert not verify_math(INTERMEDIATE, "2", mode=mode).correct


@pytest.mark.parametrize("mode", MATH_MODES)
def test_math_intermediate_boxes_then_a_final_answer_line(mode):
    """Boxed partial results, then the final answer in a sentence: the last-box extractor graded 255."""
    text = (r"Interest after six months: \boxed{200}. In the second account it earns \boxed{255}, so the "
            "balance is 10,455 dollars.\nFinal Answer: The final answer is $10,455$. I hope it is correct.")
    r = verify_math(text, "10455", mode=mode)
    assert (r.status, r.answer) == ("correct", "10,455")
    assert not verify_math(text, "255", mode=mode).correct


def test_math_hedging_with_adjacent_boxes_is_wrong():
    """Two candidates boxed side by side are a set, so hedging earns nothing against either gold."""
    text = r"maybe \boxed{2}? no: \boxed{3}"
    assert verify_math(text, "3").status == "wrong"
    assert verify_math(text, "2").status == "wrong"


def test_math_unanchored_answer_graded_by_default_unparseable_when_strict():
    text = "Six times seven is 42"
    assert verify_math(text, "42") == VerifyResult(1.0, True, "42", None, "correct")
    assert verify_math(text, "42", mode="strict") == VerifyResult(0.0, False, None, None, "unparseable")
    assert verify_math(text, "41").status == "wrong"


@pytest.mark.parametrize("mode", MATH_MODES)
def test_math_answer_line_and_gsm8k_marker(mode):
    assert verify_math("6*7 = 42\nAnswer: 42", "42", mode=mode).correct
    assert verify_math("6*7 = 42\n#### 42", "42", mode=mode).correct
    assert verify_math("#### 42\nThat took 3 steps.", "42", mode=mode).correct
    assert verify_math("Answer: 42.", "42", mode=mode).correct  # the full stop is not part of the answer
    assert not verify_math("Answer: 41", "42", mode=mode).correct


@pytest.mark.parametrize("mode", MATH_MODES)
def test_math_no_answer_is_unparseable(mode):
    r = verify_math("I think it is forty-two", "42", mode=mode)
    assert r == VerifyResult(0.0, False, None, None, "unparseable")


def test_math_gold_with_box_and_dollars():
    assert verify_math(r"\boxed{4}", r"$\boxed{4}$").correct


@pytest.mark.parametrize("mode", MATH_MODES)
def test_math_gold_is_passed_first(mode):
    """math_verify.verify is asymmetric: with gold 1 an equation prediction is read as its right-hand
    side, but gold 2x+z=1 does not accept the prediction 1. Swapping the arguments flips both."""
    assert verify_math(r"\boxed{2x+z=1}", "1", mode=mode).correct
    assert not verify_math(r"\boxed{1}", "2x+z=1", mode=mode).correct
    assert verify_math(r"\boxed{(1,2)}", "1<x<2", mode=mode).correct
    assert not verify_math(r"\boxed{1<x<2}", "(1,2)", mode=mode).correct


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


@pytest.mark.parametrize("mode", MATH_MODES)
def test_verify_batch_sends_all_math_items_at_once_gold_first(monkeypatch, mode):
    calls = []

    def fake_run_jobs(jobs, timeout):
        calls.append(list(jobs))
        return [("correct", "x")] * len(jobs)

    monkeypatch.setattr(verifier, "_run_jobs", fake_run_jobs)
    rs = verify_batch([r"\boxed{a}", "1+2=3", r"\boxed{b}", "none", r"\boxed{c}"],
                      [{"answer": "A"}, cd([1, 2], 3), {"answer": "B"}, {"answer": "X"}, {"answer": "C"}],
                      mode=mode)
    expected = [("verify", r"\boxed{A}", r"\boxed{a}", mode), ("verify", r"\boxed{B}", r"\boxed{b}", mode),
                ("verify", r"\boxed{C}", r"\boxed{c}", mode)]
    if mode == "math-verify":  # math-verify decides whether "none" holds an answer; strict needs no worker
        expected.insert(2, ("verify", r"\boxed{X}", "none", mode))
    assert calls == [expected]
    none_status = "correct" if mode == "math-verify" else "unparseable"  # the fake pool says "correct"
    assert [r.status for r in rs] == ["correct", "correct", "correct", none_status, "correct"]


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
    assert r.status == "error" and r.reward == 0.0 and "gold" in r.detail
    rs = verify_batch([None, None], [{"answer": "1"}, cd([1, 2], 3)])  # e.g. a failed generation
    assert [r.status for r in rs] == ["error", "error"]


# ----------------------------------------------------------------------------------------------------
# Robustness: never raise, always return within the timeout
# ----------------------------------------------------------------------------------------------------

NASTY = [
    # (name, response, expected status(es) or None for "any status"). math-verify reads the whole
    # response in a worker, so a huge text may also end as "timeout" on a busy machine.
    ("empty", "", "unparseable"),
    ("1MB of text", "a" * 1_000_000, {"unparseable", "timeout"}),
    ("1MB inside a box", r"\boxed{" + "x" * 1_000_000 + "}", "timeout"),
    ("10000 open braces", "{" * 10_000, "unparseable"),
    ("10000 nested braces in a box", r"\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}", None),
    ("100000 boxes", r"\boxed{1}" * 100_000, None),  # math-verify's box scan is quadratic: 30 s alone
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
        assert r.status in ({expected} if isinstance(expected, str) else expected)


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
                 st.lists(st.one_of(_NASTY_PIECES, st.text(max_size=5)), max_size=40).map("".join)),
       st.sampled_from(MATH_MODES))
def test_property_verify_math_never_raises(text, mode):
    t0 = time.perf_counter()
    r = verify_math(text, "1", timeout=NASTY_TIMEOUT, mode=mode)
    assert r.status in STATUSES
    assert r.correct == (r.status == "correct") and r.reward == float(r.correct)
    assert time.perf_counter() - t0 < NASTY_TIMEOUT + MARGIN


# ----------------------------------------------------------------------------------------------------
# Process lifetime: workers die with the process that started them, and only then
# ----------------------------------------------------------------------------------------------------

# A trainer stand-in: starts one worker, reports its pid, then blocks in a computation that holds the
# GIL for minutes (the timeout is far away), until the test SIGKILLs it.
_PARENT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import verifier
assert verifier.verify_math(r"\boxed{1}", "1").correct
print(verifier._pool().workers[0].proc.pid, flush=True)
verifier.verify_math(r"\boxed{9^{9^{9^{9}}}}", "1", timeout=600.0)
"""


def _alive(proc) -> bool:
    import psutil

    try:  # is_running() also guards against the pid having been reused
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_worker_dies_when_its_parent_is_sigkilled(tmp_path):
    psutil = pytest.importorskip("psutil")
    script = tmp_path / "trainer.py"
    script.write_text(_PARENT)
    parent = subprocess.Popen([sys.executable, str(script), ROOT], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "VERIFIER_WORKERS": "1"})
    worker = None
    try:
        ready, _, _ = select.select([parent.stdout], [], [], 120.0)  # a loaded machine imports slowly
        assert ready, "the parent did not start its worker"
        worker = psutil.Process(int(parent.stdout.readline()))
        start, deadline = worker.cpu_times().user, time.monotonic() + 60.0
        while worker.cpu_times().user - start < 0.5:  # it is now inside the slow SymPy computation
            assert time.monotonic() < deadline, "the worker never got busy"
            time.sleep(0.1)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5.0
        while _alive(worker):
            assert time.monotonic() < deadline, "the worker outlived its SIGKILLed parent"
            time.sleep(0.1)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if worker is not None and _alive(worker):  # never leave an orphan burning a core
            worker.kill()


def test_worker_exits_at_once_if_its_parent_is_already_gone():
    """A parent that died before the worker's prctl call sends no signal: the worker must notice that
    it has been re-parented (its parent pid is not the one it was given) and exit by itself."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import verifier; "
            "verifier._die_with_parent(int(sys.argv[2])); print('alive')")

    def run(parent_pid: int) -> str:
        return subprocess.run([sys.executable, "-c", code, ROOT, str(parent_pid)], capture_output=True,
                              text=True, timeout=60).stdout.strip()

    assert run(os.getpid()) == "alive"  # we are its parent
    assert run(-1) == ""  # "its parent was -1": that one is gone


def test_workers_started_from_a_short_lived_thread_outlive_it():
    """The parent-death signal follows the thread that started a worker; ours must not fire when a
    caller's thread that happened to (re)start the pool ends."""
    verifier.shutdown_pool()
    assert _in_thread(lambda: verify_math(r"\boxed{1}", "1")).correct  # the pool's workers start here
    workers = list(verifier._pool().workers)
    time.sleep(0.5)  # the thread has ended; a parent-death signal would have arrived by now
    assert [w.proc.poll() for w in workers] == [None] * len(workers)
    assert verify_math(r"\boxed{2}", "2").correct
    assert verifier._pool().workers == workers  # served by the same processes, none replaced


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


def test_answers_equivalent_countdown_huge_numbers_are_bounded():
    """Fraction("1.0e999999999") builds a billion-digit integer in the caller's own process (no worker,
    no timeout): minutes. Run in a subprocess so that a regression cannot hang the suite."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import verifier as v; "
            "print(v.answers_equivalent('1.0e999999999', '1', 'countdown'), "
            "v.answers_equivalent('1e999999999', ' 1e999999999', 'countdown'), "
            "v.answers_equivalent('9' * 100000, '1', 'countdown'), "
            "v.answers_equivalent('2.5e1', '25', 'countdown'))")
    out = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["False", "True", "False", "True"], out.stderr


def test_answers_equivalent_accepts_non_strings():
    assert answers_equivalent(22, "22", "countdown")
    assert not answers_equivalent(21, 22.0, "countdown")


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


# ----------------------------------------------------------------------------------------------------
# scripts/verifier_agreement.py reads labelled cases as data
# ----------------------------------------------------------------------------------------------------


def test_agreement_script_reads_parametrize_rows_as_data(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("verifier_agreement",
                                                  os.path.join(ROOT, "scripts", "verifier_agreement.py"))
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "verifier_agreement", script)  # dataclasses look their module up
    spec.loader.exec_module(script)
    source = '''
import pytest
raise SystemExit("a test module is read, never run")

@pytest.mark.parametrize("gold,pred,expected", [
    ("1", r"\\boxed{1}", 1),
    pytest.param("2", "3", 0, id="wrong"),
    (f"{1}", "1", 1),  # not a literal: skipped
])
def test_a(gold, pred, expected):
    pass

@pytest.mark.parametrize("gold, pred, result, precision", [("$1$", "1.0", True, 6)])
def test_b(gold, pred, result, precision):
    pass

@pytest.mark.parametrize("x, expected", [(1, 1)])
def test_c(x, expected):
    pass
'''
    cases, skipped = script.cases_from_source(source, "test_x.py")
    assert [(c.function, c.gold, c.pred, c.label, c.extra) for c in cases] == [
        ("test_a", "1", r"\boxed{1}", True, {}), ("test_a", "2", "3", False, {}),
        ("test_b", "$1$", "1.0", True, {"precision": 6})]
    assert skipped == 1 and cases[0].line == 6
