"""How often verifier.py agrees with the labelled cases of math-verify's own test suite.

    python scripts/verifier_agreement.py PATH [--modes math-verify strict] [--show 10] [--by-function]

PATH is a checkout of huggingface/Math-Verify, or its tests/ folder. Its test files hold hundreds of
(gold, prediction, expected verdict) triples, most of them taken from real model outputs: multi-box
answers, intermediate boxes, "Final Answer: ..." lines, answers with no anchor at all. We read them as
*data*: each file is parsed with `ast` and the literal argument lists of `@pytest.mark.parametrize`
decorators whose argument names include `gold`, `pred` and `expected` (or `result`) are collected.
Nothing of Math-Verify is imported or run, so a checkout of any version works and its test helpers
cannot change what is measured. Cases whose values are not literals (e.g. f-strings) are skipped and
counted.

Each case is graded by `verifier.verify_batch(pred, {"task": "math", "answer": gold})` in each mode,
and agreement means (status == "correct") == bool(expected). Note that some of those tests call
math-verify with non-default settings (a float precision, expression-only extraction, set/relation
comparison); we always grade with the verifier's own settings, because that is what a reward sees, so
100% is not reachable by design. `--verifier FILE` loads another verifier.py (e.g. an older commit,
`git show REV:verifier.py > /tmp/old/verifier.py`) to compare versions; one without a `mode`
parameter is run once, as "default".
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

LABEL_NAMES = ("expected", "result")  # the verdict's name differs between Math-Verify's test files


@dataclass
class Case:
    file: str
    line: int
    function: str
    gold: str
    pred: str
    label: bool
    extra: dict = field(default_factory=dict)  # the test's other parameters (precision, ...), for display


def _dotted(node: ast.AST) -> str:
    """`pytest.mark.parametrize` for the decorator's function node ('' for anything else)."""
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _arg_names(node: ast.AST) -> list[str] | None:
    try:
        names = ast.literal_eval(node)
    except (ValueError, TypeError):  # not a literal
        return None
    if isinstance(names, str):
        names = names.split(",")
    return [str(n).strip() for n in names] if isinstance(names, (list, tuple)) else None


def _row(node: ast.AST) -> list[ast.AST] | None:
    """The argument nodes of one parametrize row: a tuple, or pytest.param(...)'s positional args."""
    if isinstance(node, ast.Tuple):
        return list(node.elts)
    if isinstance(node, ast.Call) and _dotted(node.func).endswith("param"):
        return list(node.args)
    return None


def cases_from_source(source: str, filename: str) -> tuple[list[Case], int]:
    """All labelled (gold, pred, expected) cases of one test file, and how many rows were skipped."""
    cases, skipped = [], 0
    for fn in ast.walk(ast.parse(source, filename)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for dec in fn.decorator_list:
            if not (isinstance(dec, ast.Call) and _dotted(dec.func).endswith("parametrize")
                    and len(dec.args) >= 2):
                continue
            names = _arg_names(dec.args[0])
            label = next((n for n in LABEL_NAMES if names and n in names), None)
            if not names or "gold" not in names or "pred" not in names or label is None:
                continue
            if not isinstance(dec.args[1], (ast.List, ast.Tuple)):
                skipped += 1  # a computed list: not data we can read without running the module
                continue
            for row_node in dec.args[1].elts:
                row = _row(row_node)
                try:
                    if row is None or len(row) != len(names):
                        raise ValueError("not a row of literals")
                    values = dict(zip(names, (ast.literal_eval(v) for v in row)))
                except (ValueError, TypeError):  # not a literal, e.g. an f-string
                    skipped += 1
                    continue
                gold, pred = values.pop("gold"), values.pop("pred")
                verdict = values.pop(label)
                if not isinstance(gold, str) or not isinstance(pred, str):
                    skipped += 1
                    continue
                cases.append(Case(os.path.basename(filename), row_node.lineno, fn.name, gold, pred,
                                  bool(verdict), values))
    return cases, skipped


def collect_cases(path: str) -> tuple[list[Case], int, list[str]]:
    tests = os.path.join(path, "tests") if os.path.isdir(os.path.join(path, "tests")) else path
    files = sorted(os.path.join(tests, f) for f in os.listdir(tests)
                   if f.startswith("test") and f.endswith(".py"))
    cases, skipped, used = [], 0, []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            source = fh.read()
        try:
            found, skip = cases_from_source(source, f)
        except SyntaxError as e:  # e.g. a file for a newer Python: say so, measure the rest
            print(f"skipping {os.path.basename(f)}: {e}", file=sys.stderr)
            continue
        cases += found
        skipped += skip
        if found:
            used.append(os.path.basename(f))
    return cases, skipped, used


def load_verifier(path: str | None):
    if path is None:  # this repository's verifier.py
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import verifier

        return verifier
    # Its worker processes import the module by name from the file's folder (see verifier._Worker).
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    spec = importlib.util.spec_from_file_location("verifier", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["verifier"] = module
    spec.loader.exec_module(module)
    return module


def _short(s: str | None, n: int) -> str:
    if s is None:
        return "None"
    s = " ".join(s.split())
    return repr(s if len(s) <= n else s[: n // 2 - 2] + " .. " + s[-(n // 2 - 2):])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="checkout of huggingface/Math-Verify, or its tests/ folder")
    ap.add_argument("--modes", nargs="+", default=None, help="verifier modes (default: all it has)")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per case (verify_batch timeout)")
    ap.add_argument("--show", type=int, default=10, help="disagreements to list per mode")
    ap.add_argument("--by-function", action="store_true", help="agreement per test function")
    ap.add_argument("--verifier", default=None, help="path of another verifier.py to measure")
    args = ap.parse_args(argv)

    cases, skipped, files = collect_cases(args.path)
    if not cases:
        sys.exit(f"no labelled cases found under {args.path}")
    verifier = load_verifier(args.verifier)
    has_mode = "mode" in inspect.signature(verifier.verify_batch).parameters
    modes = args.modes or (list(getattr(verifier, "MATH_MODES", ("math-verify", "strict"))) if has_mode
                           else ["default"])
    print(f"{len(cases)} labelled cases from {', '.join(files)} ({skipped} skipped: not literal data); "
          f"{sum(c.label for c in cases)} labelled correct, {sum(not c.label for c in cases)} wrong")
    examples = [{"task": "math", "answer": c.gold} for c in cases]
    has_anchor = getattr(verifier, "has_final_answer_anchor", None)
    anchored = [has_anchor(c.pred) for c in cases] if has_anchor else None
    try:
        for mode in modes:
            kwargs = {"mode": mode} if has_mode else {}
            results = verifier.verify_batch([c.pred for c in cases], examples, timeout=args.timeout, **kwargs)
            agree = [(r.status == "correct") == c.label for c, r in zip(cases, results)]
            n = sum(agree)
            statuses = Counter(r.status for r in results)
            print(f"\nmode={mode}: agreement {n}/{len(cases)} ({100 * n / len(cases):.1f}%); statuses "
                  + ", ".join(f"{s}={statuses[s]}" for s in sorted(statuses)))
            if anchored is not None:  # strict mode calls every other case "unparseable" by design
                k = sum(a for a, has in zip(agree, anchored) if has)
                print(f"  on the {sum(anchored)} cases whose prediction has a final-answer anchor: "
                      f"{k}/{sum(anchored)} ({100 * k / max(1, sum(anchored)):.1f}%)")
            if args.by_function:
                per: dict[str, list[bool]] = {}
                for c, a in zip(cases, agree):
                    per.setdefault(f"{c.file}::{c.function}", []).append(a)
                for name, xs in per.items():
                    print(f"  {sum(xs):3d}/{len(xs):<3d} {name}")
            wrong = [(c, r) for c, r, a in zip(cases, results, agree) if not a]
            if wrong and args.show:
                print(f"  disagreements ({min(args.show, len(wrong))} of {len(wrong)}):")
            for c, r in wrong[: args.show]:
                extra = f" {c.extra}" if c.extra else ""
                print(f"  {c.file}:{c.line} {c.function}{extra}: label={int(c.label)} got={r.status} "
                      f"answer={_short(r.answer, 40)}\n      gold={_short(c.gold, 60)}\n"
                      f"      pred={_short(c.pred, 110)}")
    finally:
        verifier.shutdown_pool()


if __name__ == "__main__":
    main()
