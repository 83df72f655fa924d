"""Answer extraction and checking: the reward of RLVR.

Two tasks share one batch API (`verify_batch`, used by train.py and eval.py):

* ``countdown`` (the embedded toy task, toy.py): a response is a chain of steps such as
  ``5*3=15,15+7=22``. We check every step exactly with fractions, the number-use rules and the final
  target, and return a *canonical solution key* so that the number of genuinely different correct
  solutions can be counted (the quantity mode collapse destroys).
* ``math``: math-verify (Kydlíček et al., huggingface/Math-Verify) extracts the final answer from the
  whole response and compares it with the gold answer.

How a math answer is extracted: the ``mode`` parameter of `verify_batch` / `verify` / `verify_math` /
`extract_answer` (``MATH_MODES``):

* ``"math-verify"`` (the default): math-verify's own extraction, boxes first
  (``LatexExtractionConfig(boxed_match_priority=0)`` and ``ExprExtractionConfig()``), then "final
  answer is" / "Answer:" phrases, then any LaTeX or number, the rightmost match first. Boxes that sit
  together (``\\boxed{1}, \\boxed{2}`` or ``\\boxed{-2} and \\boxed{1}``) are read as one set answer, a
  box far before the last one (an intermediate result) is ignored, and a response with no box and no
  anchor at all is still graded. It is the default because grading only the last box, as this module
  used to, agreed with the verdicts of math-verify's labelled test cases 42.6% of the time (sets
  written as several boxes graded wrong, unanchored answers "unparseable"); this mode agrees 92.8%
  of the time, and the rest are cases whose test uses non-default math-verify settings or a newer
  math-verify (scripts/verifier_agreement.py measures it). A side effect worth knowing: hedging by
  boxing two different candidates next to each other yields a set, wrong against a single gold.
* ``"strict"``: for RL rewards that must not pay for an answer the policy never committed to. The
  response must contain a final-answer anchor, a ``\\boxed{...}`` (or ``\\fbox``), a line starting
  with "Answer:" / "Final Answer:", or GSM8K's ``####``, else it is "unparseable" without further
  work; and math-verify may then only extract from anchored places (``try_extract_without_anchor=
  False``), so a stray number in the reasoning is never graded. The anchor check runs in the caller's
  process and is linear in the length of the response.

In both modes ``\\fbox`` is read as ``\\boxed`` and ``####`` as "Answer:" (math-verify knows neither).

Why the math path looks the way it does:

* **Gold first.** ``math_verify.verify(gold, pred)`` is deliberately asymmetric: the gold's form
  decides how the prediction is read. With gold ``1``, a prediction that is an equation is reduced to
  its last right-hand side (``2x+z=1`` counts as ``1``), but with gold ``2x+z=1`` the prediction ``1``
  is wrong; gold ``1<x<2`` accepts the interval ``(1,2)``, not the other way round. Swapping the
  arguments silently changes the reward, so every call below passes the gold first. Only
  `answers_equivalent`, which compares two *predictions* (maj@k voting, SENT's semantic clusters), has
  no gold; it uses the symmetric closure ``verify(a, b) or verify(b, a)``.
* **Processes, not signals.** Parsing LaTeX into SymPy and simplifying can run for ever on inputs a
  policy happily produces (``\\boxed{9^{9^{9^{9}}}}``, ``(10^{10})!``, ten thousand nested braces), and
  math-verify's extraction is itself quadratic on some texts (100,000 boxes take half a minute).
  math-verify's own timeout is ``signal.alarm``, which only works in the main thread of the main
  interpreter, and cannot interrupt C code that holds the GIL (SymPy's big-integer arithmetic does).
  So we switch it off (``parsing_timeout=None``, ``timeout_seconds=None``) and run all of math-verify,
  extraction included, in a small pool of worker processes; the parent enforces a wall-clock bound per
  item and kills (SIGKILL) and replaces a worker that exceeds it. This works from any thread, and a
  verifier hang can never stall training: the worst case is reward 0 with status "timeout".
* **Workers die with the trainer.** A worker stuck in such a computation ignores everything but
  SIGKILL, so if the trainer itself is SIGKILLed (OOM killer, a scheduler) nobody would kill it. On
  Linux each worker asks the kernel for SIGKILL when its parent goes (``PR_SET_PDEATHSIG``).
* **Never raise.** A reward function that raises on a weird sample kills a run hours in. Every failure
  (no answer, parse failure, timeout, crashed worker, a malformed example) is reward 0 with a status
  saying why (and for "error", a `VerifyResult.detail`). Only a caller's bug raises ValueError: an
  unknown task or mode, or lists of different lengths.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from multiprocessing.connection import Connection, wait

# ----------------------------------------------------------------------------------------------------
# Countdown (toy task)
# ----------------------------------------------------------------------------------------------------
# Rules (toy.py generates prompts that follow them):
#   * steps are separated by ",", each step is "<a><op><b>=<c>" with op in + - * /, a, b, c integers;
#   * an operand is either one of the prompt's numbers (each used at most once) or the result of an
#     earlier step (each result reusable once);
#   * every step must be exact: c == a op b in rational arithmetic; results must be integers
#     (the usual Countdown convention: 7/2=3 is wrong, and non-integer results cannot be written);
#   * the last step's result must equal the target.
# The canonical key is the expression tree of the final result, written fully parenthesised, with the
# two operands of + and * sorted (as strings): solutions equal up to commutativity share a key, while
# different associations, e.g. (a+b)+c and a+(b+c), stay different.

MAX_COUNTDOWN_STEPS = 16  # a bound so that adversarial inputs cannot make the checker slow
_STEP_RE = re.compile(r"^\s*(-?\d{1,9})\s*([-+*/])\s*(-?\d{1,9})\s*=\s*(-?\d{1,12})\s*$")
_OPS = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
}


@dataclass(frozen=True)
class CountdownCheck:
    correct: bool
    key: str | None  # canonical solution key when correct, else None
    value: int | None  # the value the chain ends on (None if it does not parse)
    error: str | None  # why it is wrong (for debugging and tests)


def countdown_key(op: str, left: str, right: str) -> str:
    """Canonical string of the tree (left op right): commutative operands sorted."""
    if op in "+*" and right < left:
        left, right = right, left
    return f"({left}{op}{right})"


def _countdown_problem(numbers, target) -> str | None:
    """Why (numbers, target) is not a Countdown problem we can check, or None if it is one.

    Examples come from files and other people's code, and a reward function must not crash a run on
    one bad row: a missing field arrives here as None, a JSON file may hold "5" or 5.0. We accept a
    list/tuple of integral numbers and an integral target (floats only when whole, never bools or
    strings) of bounded size (str() of a huge int raises in Python >= 3.11)."""

    def integral(x) -> bool:
        try:
            return not isinstance(x, (bool, str, bytes)) and int(x) == x and abs(int(x)) < 10**15
        except (TypeError, ValueError, OverflowError):
            return False

    if not isinstance(numbers, (list, tuple)):
        return f"numbers must be a list of integers, not {type(numbers).__name__}"
    if not all(integral(n) for n in numbers):
        return "numbers must be integers"
    if not integral(target):
        return f"target must be an integer, not {target!r:.40}"
    return None


def check_countdown(response: str, numbers: list[int], target: int) -> CountdownCheck:
    """Check a Countdown step chain exactly. Never raises (a malformed problem is an `error`)."""
    problem = _countdown_problem(numbers, target)
    if problem is not None:
        return CountdownCheck(False, None, None, f"invalid example: {problem}")
    if not isinstance(response, str):
        return CountdownCheck(False, None, None, "response is not a string")
    target = int(target)
    text = response.strip()
    if not text:
        return CountdownCheck(False, None, None, "empty")
    steps = text.split(",")
    if len(steps) > MAX_COUNTDOWN_STEPS:
        return CountdownCheck(False, None, None, "too many steps")
    # available operands: value -> list of canonical subtree strings (a multiset)
    pool: dict[int, list[str]] = {}
    for n in numbers:
        pool.setdefault(int(n), []).append(str(int(n)))
    last_value, last_key = None, None
    for step in steps:
        m = _STEP_RE.match(step)
        if m is None:
            return CountdownCheck(False, None, last_value, f"cannot parse step {step[:40]!r}")
        a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        trees = []
        for operand in (a, b):
            if not pool.get(operand):
                return CountdownCheck(False, None, last_value, f"{operand} is not available")
            trees.append(pool[operand].pop(0))
        if op == "/" and b == 0:
            return CountdownCheck(False, None, last_value, "division by zero")
        exact = _OPS[op](Fraction(a), Fraction(b))
        if exact != c:
            return CountdownCheck(False, None, last_value, f"{a}{op}{b} is not {c}")
        last_value, last_key = c, countdown_key(op, trees[0], trees[1])
        pool.setdefault(c, []).append(last_key)
    if last_value != target:
        return CountdownCheck(False, None, last_value, f"ends on {last_value}, target {target}")
    return CountdownCheck(True, last_key, last_value, None)


# ----------------------------------------------------------------------------------------------------
# Result type
# ----------------------------------------------------------------------------------------------------

STATUSES = ("correct", "wrong", "unparseable", "timeout", "error")


@dataclass(frozen=True)
class VerifyResult:
    reward: float  # 1.0 if correct else 0.0
    correct: bool
    answer: str | None  # extracted final answer (countdown: str of the chain's final value); None if none
    key: str | None  # canonical solution key (countdown, when correct), else None
    status: str  # "correct" | "wrong" | "unparseable" | "timeout" | "error"
    detail: str | None = None  # for "error": what went wrong (a malformed example, a crashed worker, ...)


def _result(status: str, answer: str | None, key: str | None = None,
            detail: str | None = None) -> VerifyResult:
    correct = status == "correct"
    return VerifyResult(1.0 if correct else 0.0, correct, answer, key, status, detail)


def _countdown_result(response: str, example: dict) -> VerifyResult:
    # A malformed example is not the response's fault: "error" (reward 0), with the reason.
    problem = _countdown_problem(example.get("numbers"), example.get("target"))
    if problem is not None:
        return _result("error", None, detail=f"invalid countdown example: {problem}")
    check = check_countdown(response, example["numbers"], example["target"])
    answer = None if check.value is None else str(check.value)
    if check.correct:
        return _result("correct", answer, check.key)
    # "unparseable": not even the first step has the step syntax; anything else is a wrong attempt.
    first_step = response.strip().split(",", 1)[0]
    unparseable = check.value is None and _STEP_RE.match(first_step) is None
    return _result("unparseable" if unparseable else "wrong", answer)


# ----------------------------------------------------------------------------------------------------
# Math: extraction modes and the anchor check (parent side)
# ----------------------------------------------------------------------------------------------------
# The extraction itself is math-verify's and runs in the workers (below). What runs in the caller's
# process must stay linear in the length of a response: a response cut at the length limit can be
# megabytes of braces or newlines, and this is the trainer's own process. So the anchor check is plain
# substring tests plus one regex without nested quantifiers or a leading \s* (which, retried at every
# line start, is quadratic on a million newlines).

MATH_MODES = ("math-verify", "strict")
DEFAULT_MATH_MODE = "math-verify"

_ANSWER_LINE_RE = re.compile(r"^[ \t]*(?:final[ \t]+)?answer[ \t]*:", re.IGNORECASE | re.MULTILINE)


def has_final_answer_anchor(text: str) -> bool:
    """Whether a response commits to a final answer the way "strict" mode requires: a ``\\boxed`` or
    ``\\fbox``, a line that starts with "Answer:" or "Final Answer:" (any case), or GSM8K's ``####``."""
    return ("\\boxed" in text or "\\fbox" in text or "####" in text
            or _ANSWER_LINE_RE.search(text) is not None)


def _check_mode(mode: str) -> None:
    if mode not in MATH_MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MATH_MODES}")


def _normalise(answer: str) -> str:
    """Fast-path key for equality: surrounding whitespace and `$` removed. (Not inner whitespace:
    `\\pi r` and `\\pir` are different LaTeX.)"""
    return answer.strip().strip("$").strip()


def _boxed(s: str) -> str:
    """How we hand a gold answer (or an already extracted answer) to math_verify.parse: inside
    \\boxed{}, so that the boxed extractor, which has the highest priority, reads the whole answer
    (not e.g. the first number in it)."""
    s = s.strip().strip("$")
    return s if "\\boxed" in s else "\\boxed{" + s + "}"


# ----------------------------------------------------------------------------------------------------
# Math: the work done inside a worker process
# ----------------------------------------------------------------------------------------------------
# A job is a tuple of plain strings; the reply is (status, payload). Only strings cross the socket,
# never SymPy objects (pickling those can itself be slow or fail).
#   ("verify",  gold, response, mode) -> ("correct" | "wrong", answer) | ("unparseable", None)
#                                        | ("error", why)  (the gold does not parse, a SymPy bug, ...)
#   ("extract", response, mode)       -> ("ok", answer) | ("unparseable", None)
#   ("equiv",   a, b)                 -> ("correct" (equivalent) | "wrong", None); a, b are answers
# `answer` is the text math-verify extracted (its own "fallback" string, e.g. "1,2,3" for three boxes
# side by side), so that answers_equivalent can parse it again.

WORKER_MEMORY_BYTES = 2 << 30  # address space a worker may add on top of its start (Linux): 2 GiB
_CACHE_MAX_CHARS = 2000  # only short strings (golds, extracted answers) go through the parse cache


@lru_cache(maxsize=None)  # built once per worker; the configs are frozen dataclasses
def _extraction_config(mode: str) -> tuple:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    # Boxes first: priority 0 ties a box with "The final answer is ... I hope" and the rightmost wins;
    # math-verify's default, 50, lets any "final answer ... is X" phrase outrank a box. Both agree
    # equally often with math-verify's labelled cases (207/223); 0 suits prompts that ask for a box.
    # In strict mode only anchored patterns (boxes, "final answer is", "answer") may match at all.
    anywhere = mode != "strict"
    return (LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=anywhere),
            ExprExtractionConfig(try_extract_without_anchor=anywhere))


def _parse_uncached(s: str, mode: str) -> tuple:
    import math_verify

    # our parent enforces the time bound (see the module docstring)
    return tuple(math_verify.parse(s, extraction_config=_extraction_config(mode), parsing_timeout=None))


@lru_cache(maxsize=4096)  # a GRPO group shares its gold, and identical answers are common
def _parse_cached(s: str, mode: str) -> tuple:
    return _parse_uncached(s, mode)


def _parse(s: str, mode: str = DEFAULT_MATH_MODE) -> tuple:
    # Whole responses are not cached: 4096 of them could hold gigabytes, and they rarely repeat.
    return _parse_cached(s, mode) if len(s) <= _CACHE_MAX_CHARS else _parse_uncached(s, mode)


def _prepare_response(text: str) -> str:
    """Aliases math-verify does not know: \\fbox is a box (its normaliser strips both, but only
    \\boxed{ starts a match), and GSM8K's "####" means "the answer is" (as "Answer:" it is anchored
    and outranks a number written after it)."""
    return text.replace("\\fbox", "\\boxed").replace("####", "Answer:")


def _extracted_text(parsed: tuple) -> str | None:
    """The answer as text: math-verify appends the extracted string after the parsed object."""
    strings = [p for p in parsed if isinstance(p, str)]
    if strings:
        return strings[-1]
    return str(parsed[0]) if parsed else None


def _mv_verify(gold: tuple, pred: tuple) -> bool:
    import math_verify

    return bool(math_verify.verify(list(gold), list(pred), timeout_seconds=None))


def _run_job(job: tuple) -> tuple[str, str | None]:
    kind = job[0]
    if kind == "verify":
        _, gold_text, response, mode = job
        gold = _parse(gold_text)
        if not gold:
            return "error", "gold answer does not parse"
        pred = _parse(_prepare_response(response), mode)
        if not pred:
            return "unparseable", None
        # gold first, always
        return ("correct" if _mv_verify(gold, pred) else "wrong"), _extracted_text(pred)
    if kind == "extract":
        _, response, mode = job
        answer = _extracted_text(_parse(_prepare_response(response), mode))
        return ("ok", answer) if answer is not None else ("unparseable", None)
    if kind == "equiv":
        a, b = _parse(job[1]), _parse(job[2])
        if not a or not b:
            return "wrong", None
        return ("correct" if _mv_verify(a, b) or _mv_verify(b, a) else "wrong"), None
    return "error", f"unknown job {kind!r}"


def _limit_memory(extra_bytes: int) -> None:
    """Cap the worker's address space so that e.g. 9^(9^9) fails with MemoryError instead of taking
    the machine's RAM. Linux only; elsewhere the wall-clock bound alone applies."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = current + extra_bytes
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, OSError, ValueError, AttributeError):
        pass


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent(parent_pid: int) -> None:
    """Make sure this worker does not outlive the process that started it.

    If the parent is SIGKILLed (OOM killer, a scheduler) it cannot kill us, and a worker inside a slow
    SymPy call (C code holding the GIL) would keep a core busy for hours with parent pid 1. On Linux
    the kernel sends us SIGKILL when the parent goes (prctl PR_SET_PDEATHSIG), which needs no help
    from this process. Two caveats handled elsewhere: the "parent" is the *thread* that started us
    (so the pool starts workers from one long-lived thread, see _spawner), and a parent that died
    before the prctl call sends nothing (so we compare os.getppid() with the pid we were given, after
    the call). Elsewhere, a thread polls os.getppid(): best effort, as it cannot preempt such C code.
    """
    armed = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):  # no usable libc: fall back to polling
            armed = False
    if os.getppid() != parent_pid:  # the parent is already gone (we were re-parented): no signal will come
        os._exit(0)
    if armed:
        return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _worker_main(fd: int, parent_pid: int, memory_bytes: int) -> None:
    """Entry point of a worker process (see _Worker): serve jobs from the socket `fd` until EOF."""
    _die_with_parent(parent_pid)  # first: the parent may be killed while we import math-verify
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business; it kills us
    _limit_memory(memory_bytes)
    conn = Connection(fd)
    import math_verify  # noqa: F401  (imported before "ready": startup never counts against a timeout)

    # With timeouts off, math-verify warns once that we must bound time ourselves (we do), and it logs
    # every parse failure; neither is useful in a worker's stderr.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    conn.send(("ready", None))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the parent closed the socket: shut down
            return
        try:
            reply = _run_job(job)
        except BaseException as e:  # noqa: BLE001  (MemoryError, RecursionError, SymPy bugs, ...)
            reply = ("error", f"{type(e).__name__}: {str(e)[:200]}")
        conn.send(reply)


# ----------------------------------------------------------------------------------------------------
# Math: the worker pool (parent side)
# ----------------------------------------------------------------------------------------------------
# Why a hand-written pool rather than multiprocessing.Pool / concurrent.futures: neither can kill the
# one worker that is stuck on an item and carry on; a stuck task stays stuck. Here each worker has its
# own socket, the parent hands out one item at a time, waits on all sockets with a deadline per busy
# worker, and SIGKILLs + replaces any worker past its deadline.
#
# Why plain `subprocess` (fork + immediate exec of a fresh interpreter) rather than multiprocessing:
# forking a parent that has CUDA and torch's thread pools initialised is unsafe, and multiprocessing's
# safe start methods ("spawn", "forkserver") re-import the caller's __main__ in every worker, so a
# worker started from train.py would import torch (seconds, hundreds of MB), and a script without an
# `if __name__ == "__main__":` guard would run itself again. A worker here imports only this file
# (stdlib at the top) and math_verify. The price: a replacement worker pays the SymPy import (~1 s).
# POSIX only (socket passed by file descriptor); elsewhere math items come back with status "error".

WORKER_STARTUP_TIMEOUT = 120.0  # seconds for a new worker to import math-verify (a loaded machine)
_HERE = os.path.dirname(os.path.abspath(__file__))


def _default_workers() -> int:
    if "VERIFIER_WORKERS" in os.environ:
        return max(1, int(os.environ["VERIFIER_WORKERS"]))
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


class _Spawner:
    """A thread that lives as long as the process and starts every worker process.

    Why: PR_SET_PDEATHSIG (see _die_with_parent) fires when the *thread* that forked the worker exits,
    not when the process does. Workers started directly by a caller's short-lived thread (a reward
    computed in a thread pool, a pool refilled after a timeout) would be SIGKILLed as soon as that
    thread returned. This thread never returns, so workers die only with the process."""

    def __init__(self):
        self.pid = os.getpid()
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="verifier-spawner", daemon=True).start()

    def _serve(self) -> None:
        while True:
            fn, done, out = self.requests.get()
            try:
                out.append((True, fn()))
            except BaseException as e:  # noqa: BLE001  (handed back to the caller, who re-raises it)
                out.append((False, e))
            done.set()

    def call(self, fn):
        """Run fn() on the spawner thread and return its result (or raise its exception)."""
        done, out = threading.Event(), []
        self.requests.put((fn, done, out))
        done.wait()
        ok, value = out[0]
        if not ok:
            raise value
        return value


_SPAWNER: _Spawner | None = None
_SPAWNER_LOCK = threading.Lock()


def _spawner() -> _Spawner:
    global _SPAWNER
    with _SPAWNER_LOCK:
        if _SPAWNER is None or _SPAWNER.pid != os.getpid():  # threads do not survive a fork
            _SPAWNER = _Spawner()
        return _SPAWNER


class _Worker:
    """One worker process and the parent's end of its socket."""

    def __init__(self):
        mine, theirs = socket.socketpair()
        code = (f"import sys; sys.path.insert(0, {_HERE!r}); import verifier; "
                f"verifier._worker_main({theirs.fileno()}, {os.getpid()}, {WORKER_MEMORY_BYTES})")

        def start() -> subprocess.Popen:
            try:
                return subprocess.Popen([sys.executable, "-c", code], pass_fds=(theirs.fileno(),),
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            finally:
                # The child has its own copy; ours must go so that EOF means "it died". Closed here, on
                # the spawner thread, so that a caller interrupted meanwhile cannot close it under Popen.
                theirs.close()

        try:
            self.proc = _spawner().call(start)
        except BaseException:
            mine.close()  # a worker started anyway sees EOF and exits
            raise
        self.conn = Connection(mine.detach())
        self.started = time.monotonic()
        self.ready = False  # becomes True when the worker has imported math-verify
        self.job: int | None = None  # index of the item it is working on
        self.deadline = 0.0

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:  # noqa: BLE001
            pass
        self.conn.close()


class _MathPool:
    def __init__(self, n_workers: int):
        self.n_workers = n_workers
        self.workers: list[_Worker] = []
        self.pid = os.getpid()  # a forked copy of this object must not use our workers
        self.lock = threading.Lock()  # one batch at a time; callers from other threads queue here

    def run(self, jobs: list[tuple], timeout: float) -> list[tuple[str, str | None]]:
        """Run the jobs concurrently on the workers; each gets `timeout` seconds of wall clock from the
        moment a worker picks it up. Returns (status, detail) per job, in order."""
        with self.lock:
            try:
                return self._run(jobs, timeout)
            except BaseException:  # e.g. KeyboardInterrupt: workers still busy hold stale work
                for w in [w for w in self.workers if w.job is not None]:
                    self._replace(w)
                raise

    def _replace(self, w: _Worker) -> None:
        """Kill a worker and drop it; the next round of the loop starts its replacement."""
        w.kill()
        self.workers.remove(w)

    def _run(self, jobs, timeout):
        results: list[tuple[str, str | None] | None] = [None] * len(jobs)
        todo = deque(range(len(jobs)))
        failures = 0  # workers that died or hung without an item to blame (cannot start, broken pipe)
        while todo or any(w.job is not None for w in self.workers):
            if failures > 2 * self.n_workers:  # something is wrong with the environment, not the items
                while todo:
                    results[todo.popleft()] = ("error", "verifier workers fail to start")
            else:
                while len(self.workers) < self.n_workers:
                    self.workers.append(_Worker())
            now = time.monotonic()
            for w in list(self.workers):  # hand out work to idle workers
                if w.ready and w.job is None and todo:
                    i = todo.popleft()
                    try:
                        w.conn.send(jobs[i])
                        w.job, w.deadline = i, now + timeout
                    except (OSError, ValueError):  # it died while idle: not the item's fault
                        todo.appendleft(i)
                        failures += 1
                        self._replace(w)
            # Wait for a reply, a death, or the nearest deadline (startup has its own, longer one).
            waiting = [w for w in self.workers if w.job is not None or not w.ready]
            if not waiting:
                continue
            deadlines = [w.deadline if w.ready else w.started + WORKER_STARTUP_TIMEOUT for w in waiting]
            wait([w.conn for w in waiting], timeout=max(0.0, min(deadlines) - now))
            now = time.monotonic()
            for w in waiting:
                reply, dead = None, False
                try:
                    if w.conn.poll():
                        reply = w.conn.recv()
                except (EOFError, OSError):
                    dead = True
                if reply is None and not dead:
                    dead = w.proc.poll() is not None
                if reply is not None and not w.ready:  # the "ready" message
                    w.ready = True
                elif reply is not None:
                    results[w.job], w.job = reply, None
                elif dead:  # a crash on an item (e.g. C stack overflow) is that item's error
                    if w.job is not None:
                        results[w.job] = ("error", "verifier worker died")
                    else:
                        failures += 1
                    self._replace(w)
                elif w.job is not None and now >= w.deadline:
                    results[w.job] = ("timeout", None)
                    self._replace(w)
                elif not w.ready and now >= w.started + WORKER_STARTUP_TIMEOUT:
                    failures += 1
                    self._replace(w)
        return results  # type: ignore[return-value]

    def shutdown(self) -> None:
        """Kill all workers (meant for when no batch is running: at exit, or between phases)."""
        if os.getpid() == self.pid:  # in a forked child these are not our processes
            for w in self.workers:
                w.kill()
        self.workers.clear()


_POOL: _MathPool | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> _MathPool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():  # created lazily; re-created in a forked child
            _POOL = _MathPool(_default_workers())
        return _POOL


def shutdown_pool() -> None:
    """Kill the math-verify workers now (also done at exit). The next math call starts a new pool."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.shutdown()
            _POOL = None


atexit.register(shutdown_pool)


def _run_jobs(jobs: list[tuple], timeout: float) -> list[tuple[str, str | None]]:
    if not jobs:
        return []
    try:
        return _pool().run(jobs, timeout)
    except Exception as e:  # noqa: BLE001  (e.g. processes cannot be started here): reward 0, not a crash
        return [("error", f"{type(e).__name__}: {e}")] * len(jobs)


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def verify_math(response: str, gold: str, timeout: float = 5.0, mode: str = DEFAULT_MATH_MODE) -> VerifyResult:
    """Extract the final answer of `response` and check it against `gold` with math-verify (gold first).

    `mode` is "math-verify" (default) or "strict" (see the module docstring). `timeout` bounds the
    wall-clock seconds of the math-verify work for this item, extraction included (the one-off start
    of the worker pool is not counted). Never raises on a response.
    """
    return verify_batch([response], [{"task": "math", "answer": gold}], timeout, mode)[0]


def verify(response: str, example: dict, timeout: float = 5.0, mode: str = DEFAULT_MATH_MODE) -> VerifyResult:
    """Check one response against its example (see `verify_batch`)."""
    return verify_batch([response], [example], timeout, mode)[0]


def verify_batch(responses: list[str], examples: list[dict], timeout: float = 5.0,
                 mode: str = DEFAULT_MATH_MODE) -> list[VerifyResult]:
    """Check responses[i] against examples[i]; results in the same order.

    example["task"] is "countdown" (fields numbers, target) or "math" (field answer, the gold; also the
    default when "task" is missing). Countdown is checked inline (pure Python, bounded); all math items
    are sent to the worker pool at once and run concurrently, each bounded by `timeout` seconds from
    the moment a worker takes it (n items on w workers: at most about ceil(n/w)·timeout in all).
    `mode` says how math answers are extracted: "math-verify" (default: math-verify's own extraction)
    or "strict" (a final-answer anchor is required; see the module docstring). Countdown ignores it.
    Never raises on a response or a malformed example (status "error", with `detail`); an unknown task
    or mode, or lists of different lengths (a caller's bug) raise ValueError.
    """
    _check_mode(mode)
    if len(responses) != len(examples):
        raise ValueError(f"{len(responses)} responses but {len(examples)} examples")
    results: list[VerifyResult | None] = [None] * len(responses)
    jobs, where = [], []
    for i, (response, example) in enumerate(zip(responses, examples)):
        if not isinstance(example, dict):
            results[i] = _result("error", None, detail=f"example is a {type(example).__name__}, not a dict")
            continue
        task = example.get("task", "math")
        if task not in ("countdown", "math"):
            raise ValueError(f"unknown task {task!r}; expected 'countdown' or 'math'")
        gold = example.get("answer")
        if not isinstance(response, str):  # e.g. None from a failed generation
            results[i] = _result("error", None, detail="response is not a string")
        elif task == "countdown":
            results[i] = _countdown_result(response, example)
        elif gold is None or not str(gold).strip():
            results[i] = _result("error", None, detail="example has no gold answer")
        elif mode == "strict" and not has_final_answer_anchor(response):
            results[i] = _result("unparseable", None)  # no worker needed: nothing may be graded
        else:
            jobs.append(("verify", _boxed(str(gold)), response, mode))
            where.append(i)
    for i, (status, payload) in zip(where, _run_jobs(jobs, timeout)):
        if status == "error":
            results[i] = _result("error", None, detail=payload)
        else:  # the payload of a verdict is the extracted answer (None when unparseable or timed out)
            results[i] = _result(status, payload)
    return results  # type: ignore[return-value]


def extract_answer(text: str, mode: str = DEFAULT_MATH_MODE, timeout: float = 5.0) -> str | None:
    """The final answer math-verify extracts from a math response (the text `VerifyResult.answer`
    holds), or None if it finds none, the extraction times out, or (strict mode) the response has no
    final-answer anchor. Runs in the worker pool, like verification. Never raises on a text."""
    _check_mode(mode)
    if not isinstance(text, str) or (mode == "strict" and not has_final_answer_anchor(text)):
        return None
    status, answer = _run_jobs([("extract", text, mode)], timeout)[0]
    return answer if status == "ok" else None


# Countdown answers are final values of step chains, i.e. integers of at most a dozen digits. Anything
# else is compared as a string: Fraction("1e999999999") would build a billion-digit integer in the
# caller's own process (no worker, no timeout), so only short decimals with at most a two-digit
# exponent (10**99 is instant) may reach Fraction.
_COUNTDOWN_NUMBER_RE = re.compile(r"[+-]?(?:\d{1,40}(?:\.\d{0,40})?|\.\d{1,40})(?:[eE][+-]?\d{1,2})?")


def _countdown_value(s: str) -> Fraction | None:
    s = s.strip()
    if _COUNTDOWN_NUMBER_RE.fullmatch(s) is None:
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _equivalent_to_each(a: str, others: list[str], task: str, timeout: float) -> list[bool]:
    """[answers_equivalent(a, b) for b in others], with the math comparisons run concurrently."""
    if task == "countdown":  # answers are the final values of step chains: compare numbers
        va, same = _countdown_value(a), []
        for b in others:
            vb = _countdown_value(b)
            same.append(va == vb if va is not None and vb is not None else _normalise(a) == _normalise(b))
        return same
    if task != "math":
        raise ValueError(f"unknown task {task!r}; expected 'countdown' or 'math'")
    na = _normalise(a)
    same = [na == _normalise(b) for b in others]
    pending = [j for j, s in enumerate(same) if not s]
    if pending:
        replies = _run_jobs([("equiv", _boxed(na), _boxed(_normalise(others[j]))) for j in pending], timeout)
        for j, (status, _) in zip(pending, replies):
            same[j] = status == "correct"  # a timeout or error counts as "not equivalent"
    return same


def answers_equivalent(a: str | None, b: str | None, task: str, timeout: float = 5.0) -> bool:
    """Whether two *extracted answers* (not full responses) are the same answer.

    countdown: equal numeric values. math: equal after stripping surrounding whitespace and `$`, else
    math-verify's symmetric closure verify(a, b) or verify(b, a): there is no gold here, so neither side
    may decide how the other is read. None (no answer) is equivalent to nothing. Never raises on
    answers; a timeout means "not equivalent".
    """
    if a is None or b is None:
        return False
    return _equivalent_to_each(str(a), [str(b)], task, timeout)[0]  # str(): e.g. an int from a caller


def cluster_answers(answers: list[str | None], task: str, timeout: float = 5.0) -> list[int]:
    """Cluster ids for extracted answers, for maj@k and semantic entropy (SENT; Kuhn et al., 2023).

    Greedy, in order: each answer joins the first cluster whose representative (the cluster's first
    member) is `answers_equivalent` to it, else opens a new cluster. Equivalence is not transitive
    (numeric tolerance; `1` matches both `2x+z=1` and `x+y=1`), so the greedy order is part of the
    definition. All None answers share one
    cluster (the "none" cluster), which gets its id like any other, at its first appearance; callers
    that must not let missing answers vote (maj@k) drop Nones before clustering.
    Ids are 0, 1, 2, ... in order of first appearance.
    """
    ids: list[int] = []
    reps: list[str | None] = []  # representative of each cluster; None for the "none" cluster
    seen: dict[str, int] = {}  # normalised answer -> its cluster: equal strings need no second look
    for a in answers:
        if a is None:
            if None not in reps:
                reps.append(None)
            ids.append(reps.index(None))
            continue
        na = _normalise(a)
        if na not in seen:
            candidates = [c for c, r in enumerate(reps) if r is not None]
            equal = _equivalent_to_each(a, [reps[c] for c in candidates], task, timeout)
            seen[na] = next((c for c, e in zip(candidates, equal) if e), len(reps))
            if seen[na] == len(reps):
                reps.append(a)
        ids.append(seen[na])
    return ids


def count_statuses(results) -> dict[str, int]:
    """How many results have each status (all five statuses always present, for stable log columns)."""
    counts = dict.fromkeys(STATUSES, 0)
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return counts
