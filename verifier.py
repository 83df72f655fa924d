"""Answer extraction and checking: the reward of RLVR.

Two tasks share one batch API (`verify_batch`, used by train.py and eval.py):

* ``countdown`` (the embedded toy task, toy.py): a response is a chain of steps such as
  ``5*3=15,15+7=22``. We check every step exactly with fractions, the number-use rules and the final
  target, and return a *canonical solution key* so that the number of genuinely different correct
  solutions can be counted (the quantity mode collapse destroys).
* ``math``: the final answer is extracted (last ``\\boxed{...}`` first, then ``Answer:`` / ``####`` lines)
  and compared with the gold answer by math-verify (Kydlíček et al., huggingface/Math-Verify).

Why the math path looks the way it does:

* **Gold first.** ``math_verify.verify(gold, pred)`` is deliberately asymmetric: the gold's form
  decides how the prediction is read. With gold ``1``, a prediction that is an equation is reduced to
  its last right-hand side (``2x+z=1`` counts as ``1``), but with gold ``2x+z=1`` the prediction ``1``
  is wrong; gold ``1<x<2`` accepts the interval ``(1,2)``, not the other way round. Swapping the
  arguments silently changes the reward, so every call below passes the gold first. Only
  `answers_equivalent`, which compares two *predictions* (maj@k voting, SENT's semantic clusters), has
  no gold; it uses the symmetric closure ``verify(a, b) or verify(b, a)``.
* **Processes, not signals.** Parsing LaTeX into SymPy and simplifying can run for ever on inputs a
  policy happily produces (``\\boxed{9^{9^{9^{9}}}}``, ``(10^{10})!``, ten thousand nested braces).
  math-verify's own timeout is ``signal.alarm``, which only works in the main thread of the main
  interpreter, and cannot interrupt C code that holds the GIL (SymPy's big-integer arithmetic does).
  So we switch it off (``parsing_timeout=None``, ``timeout_seconds=None``) and run math-verify in a
  small pool of worker processes; the parent enforces a wall-clock bound per item and kills (SIGKILL)
  and replaces a worker that exceeds it. This works from any thread, and a verifier hang can never
  stall training: the worst case is reward 0 with status "timeout".
* **Never raise.** A reward function that raises on a weird sample kills a run hours in. Every failure
  (no answer, parse failure, timeout, crashed worker) is reward 0 with a status saying why.
"""

from __future__ import annotations

import atexit
import logging
import os
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


def check_countdown(response: str, numbers: list[int], target: int) -> CountdownCheck:
    """Check a Countdown step chain exactly. Never raises."""
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


def _result(status: str, answer: str | None, key: str | None = None) -> VerifyResult:
    correct = status == "correct"
    return VerifyResult(1.0 if correct else 0.0, correct, answer, key, status)


def _countdown_result(response: str, example: dict) -> VerifyResult:
    check = check_countdown(response, example["numbers"], example["target"])
    answer = None if check.value is None else str(check.value)
    if check.correct:
        return _result("correct", answer, check.key)
    # "unparseable": not even the first step has the step syntax; anything else is a wrong attempt.
    first_step = response.strip().split(",", 1)[0]
    unparseable = check.value is None and _STEP_RE.match(first_step) is None
    return _result("unparseable" if unparseable else "wrong", answer)


# ----------------------------------------------------------------------------------------------------
# Math: answer extraction
# ----------------------------------------------------------------------------------------------------
# Model outputs are adversarial in practice (RL finds every weakness of the reward) and can be long:
# a response cut at the length limit may hold thousands of unbalanced braces. The extractor is one
# left-to-right pass over a few kinds of tokens with a brace stack, O(len(text)), instead of the common
# "rfind the last \boxed, then scan forward" (quadratic on "\boxed{\boxed{\boxed{...") or a regex with
# nested quantifiers (catastrophic backtracking).

# A token is a box command (`\boxed`, `\fbox`, but not `\boxedfoo`), any other escape (so that `\{`,
# `\}` and `\\` never count as grouping braces), or a grouping brace. No nested quantifiers.
_BOX_TOKEN_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])|\\.|[{}]", re.DOTALL)
_SPACES_RE = re.compile(r"\s*")
_BARE_BOX_ARG_RE = re.compile(r"[^\s${}\\]+")  # the argument of `\boxed 5`: one token, no braces


def _clean_answer(s: str) -> str:
    """Strip whitespace, a trailing full stop ("Answer: 42.") and surrounding `$`."""
    return s.strip().rstrip(".").strip().strip("$").strip()


def _last_boxed(text: str) -> str | None:
    if "\\boxed" not in text and "\\fbox" not in text:  # the common fast path
        return None
    candidates: list[tuple[int, int, int]] = []  # (position of the command, content start, content end)
    stack: list[tuple[int, int]] = []  # open braces: (position, position of its box command or -1)
    box_brace, box_cmd = -1, -1  # where the brace opening the latest box command's argument must be
    for m in _BOX_TOKEN_RE.finditer(text):  # from 0, so that escapes like \\\\ pair up correctly
        tok, pos = m.group(), m.start()
        if tok == "{":
            stack.append((pos, box_cmd if pos == box_brace else -1))
        elif tok == "}":
            if stack:  # an unmatched "}" is ignored
                open_pos, cmd = stack.pop()
                if cmd >= 0:
                    candidates.append((cmd, open_pos + 1, pos))
        elif tok[1:] in ("boxed", "fbox"):
            arg = _SPACES_RE.match(text, m.end()).end()
            if arg < len(text) and text[arg] == "{":
                box_brace, box_cmd = arg, pos
            elif arg > m.end():  # `\boxed 5`: one space-separated token
                bare = _BARE_BOX_ARG_RE.match(text, arg)
                if bare:
                    candidates.append((pos, bare.start(), bare.end()))
    # The box that *starts* last wins, as in MATH's reference `last_boxed_only_string` (which rfinds
    # "\boxed"); a box never closed (a truncated response) does not count, an empty box is skipped.
    # Only (start, end) pairs were stored: slicing every nested box would be quadratic.
    for _, a, b in sorted(candidates, reverse=True):
        content = _clean_answer(text[a:b])
        if content:
            return content
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a math response, or None.

    In order: the content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces; also
    ``\\boxed 5``); else the last line that starts with "Answer:" (any case) or contains "####" (GSM8K
    style: the text after it). Whitespace, a trailing "." and surrounding "$" are stripped.
    Time is linear in len(text).
    """
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    for line in reversed(text.splitlines()):
        line = line.strip()
        if "####" in line:
            answer = _clean_answer(line.rsplit("####", 1)[1])
        elif line[:7].lower() == "answer:":
            answer = _clean_answer(line[7:])
        else:
            continue
        if answer:
            return answer
    return None


def _normalise(answer: str) -> str:
    """Fast-path key for equality: surrounding whitespace and `$` removed. (Not inner whitespace:
    `\\pi r` and `\\pir` are different LaTeX.)"""
    return answer.strip().strip("$").strip()


def _boxed(s: str) -> str:
    """What we hand to math_verify.parse: the answer inside \\boxed{}, so that its boxed extractor,
    the one with the highest priority, reads the whole answer (not e.g. the first number in it)."""
    s = s.strip().strip("$")
    return s if "\\boxed" in s else "\\boxed{" + s + "}"


# ----------------------------------------------------------------------------------------------------
# Math: the work done inside a worker process
# ----------------------------------------------------------------------------------------------------
# A job is (kind, x, y) with plain strings; the reply is (status, detail). Only strings cross the
# socket, never SymPy objects (pickling those can itself be slow or fail).
#   ("verify", gold, pred) -> "correct" | "wrong" | "unparseable" (pred has no maths) | "error"
#   ("equiv",  a,    b)    -> "correct" (equivalent) | "wrong"

WORKER_MEMORY_BYTES = 2 << 30  # address space a worker may add on top of its start (Linux): 2 GiB


@lru_cache(maxsize=4096)  # a GRPO group shares its gold, and identical answers are common
def _parse(s: str) -> tuple:
    import math_verify

    return tuple(math_verify.parse(s, parsing_timeout=None))  # our parent enforces the time bound


def _mv_verify(gold: tuple, pred: tuple) -> bool:
    import math_verify

    return bool(math_verify.verify(list(gold), list(pred), timeout_seconds=None))


def _run_job(job: tuple) -> tuple[str, str | None]:
    kind, x, y = job
    if kind == "verify":
        gold, pred = _parse(x), _parse(y)
        if not gold:
            return "error", "gold answer does not parse"
        if not pred:
            return "unparseable", None
        return ("correct" if _mv_verify(gold, pred) else "wrong"), None  # gold first, always
    if kind == "equiv":
        a, b = _parse(x), _parse(y)
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


def _exit_with_parent(parent_pid: int) -> None:
    """Best effort: if the parent dies without shutting us down (SIGKILL, OOM killer), exit too rather
    than keep computing. (A thread cannot preempt C code that holds the GIL, hence "best effort".)"""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _worker_main(fd: int, parent_pid: int, memory_bytes: int) -> None:
    """Entry point of a worker process (see _Worker): serve jobs from the socket `fd` until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business; it kills us
    _limit_memory(memory_bytes)
    _exit_with_parent(parent_pid)
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


class _Worker:
    """One worker process and the parent's end of its socket."""

    def __init__(self):
        mine, theirs = socket.socketpair()
        code = (f"import sys; sys.path.insert(0, {_HERE!r}); import verifier; "
                f"verifier._worker_main({theirs.fileno()}, {os.getpid()}, {WORKER_MEMORY_BYTES})")
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(theirs.fileno(),),
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()  # the child has its own copy; ours must go so that EOF means "it died"
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


def verify_math(response: str, gold: str, timeout: float = 5.0) -> VerifyResult:
    """Extract the final answer of `response` and check it against `gold` with math-verify (gold first).

    `timeout` bounds the wall-clock seconds of the math-verify work for this item (the one-off start
    of the worker pool is not counted). Never raises.
    """
    return verify_batch([response], [{"task": "math", "answer": gold}], timeout)[0]


def verify(response: str, example: dict, timeout: float = 5.0) -> VerifyResult:
    """Check one response against its example (see `verify_batch`)."""
    return verify_batch([response], [example], timeout)[0]


def verify_batch(responses: list[str], examples: list[dict], timeout: float = 5.0) -> list[VerifyResult]:
    """Check responses[i] against examples[i]; results in the same order.

    example["task"] is "countdown" (fields numbers, target) or "math" (field answer, the gold; also the
    default when "task" is missing). Countdown is checked inline (pure Python, bounded); all math items
    are sent to the worker pool at once and run concurrently, each bounded by `timeout` seconds from
    the moment a worker takes it (n items on w workers: at most about ceil(n/w)·timeout in all).
    Never raises on a response; an unknown task name (a caller's bug) raises ValueError.
    """
    if len(responses) != len(examples):
        raise ValueError(f"{len(responses)} responses but {len(examples)} examples")
    results: list[VerifyResult | None] = [None] * len(responses)
    jobs, where, answers = [], [], []
    for i, (response, example) in enumerate(zip(responses, examples)):
        task = example.get("task", "math")
        if not isinstance(response, str):  # e.g. None from a failed generation
            results[i] = _result("error", None)
        elif task == "countdown":
            results[i] = _countdown_result(response, example)
        elif task == "math":
            answer = extract_answer(response)
            gold = example.get("answer")
            if answer is None:
                results[i] = _result("unparseable", None)
            elif gold is None or not str(gold).strip():
                results[i] = _result("error", answer)
            else:
                jobs.append(("verify", _boxed(str(gold)), _boxed(answer)))
                where.append(i)
                answers.append(answer)
        else:
            raise ValueError(f"unknown task {task!r}; expected 'countdown' or 'math'")
    for i, answer, (status, _) in zip(where, answers, _run_jobs(jobs, timeout)):
        results[i] = _result(status, answer)
    return results  # type: ignore[return-value]


def _countdown_value(s: str) -> Fraction | None:
    try:
        return Fraction(s.strip())
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
    return _equivalent_to_each(a, [b], task, timeout)[0]


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
