"""The verdict of ``make mutate``: run in the folder where ``mutmut run`` ran, it prints the
counts of mutmut's results and every surviving mutant as ``function | mutated line``, and
exits 1 if any survivor is not listed in ``mutation_equivalent.txt`` (beside this file) as
equivalent to the original, with the reason.

A listed entry is ``<module>.<function> | <the line as the mutant has it> | <why no test can
tell it from the original>``; it matches any mutant of that function with that line, so
entries survive renumbering when other code in the function changes.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

EQUIVALENT = Path(__file__).with_name("mutation_equivalent.txt")
MUTMUT = [sys.executable, "-m", "mutmut"]


def results() -> dict[str, str]:
    """Every mutant's status (``killed``, ``survived``, ``timeout``, ...) by name."""
    out = subprocess.run([*MUTMUT, "results", "--all", "true"], capture_output=True, text=True)
    found = re.findall(r"^\s*(\S+): (.+)$", out.stdout, flags=re.MULTILINE)
    return {name: status.strip() for name, status in found}


def function_of(name: str) -> str:
    """``ezmia.stats.scores.x_ez_score__mutmut_53`` -> ``ezmia.stats.scores.ez_score`` (methods as
    ``Class.method``)."""
    module, _, mangled = re.match(r"(.*?)\.(x_|xǁ)(.*)$", name).groups()
    function = re.sub(r"__mutmut_\d+$", "", mangled).replace("ǁ", ".")
    return f"{module}.{function}"


def signature(name: str) -> str:
    """``function | mutated line(s)``: what the mutant changed, without its number."""
    diff = subprocess.run([*MUTMUT, "show", name], capture_output=True, text=True).stdout
    lines = [line for line in diff.splitlines() if not line.startswith(("+++", "---"))]
    added = [line[1:].strip() for line in lines if line.startswith("+")]
    removed = [line[1:].strip() for line in lines if line.startswith("-")]
    change = " / ".join(added) if added else "removed: " + " / ".join(removed)
    return f"{function_of(name)} | {change}"


def equivalents() -> dict[str, str]:
    """Listed equivalent mutants: signature -> reason."""
    listed = {}
    for line in EQUIVALENT.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, reason = line.rpartition(" | ")
            listed[key.strip()] = reason.strip()
    return listed


def main() -> int:
    statuses = results()
    if not statuses:
        print("mutmut reported no mutants: run `mutmut run` here first")
        return 1
    counts = Counter(statuses.values())
    print("mutants: " + ", ".join(f"{n} {status}" for status, n in counts.most_common()))
    listed = equivalents()
    alive = sorted(n for n, s in statuses.items() if s in ("survived", "no tests"))
    unexplained = []
    for name in alive:
        key = signature(name)
        if key in listed:
            print(f"  equivalent  {key}  ({listed[key]})")
        else:
            unexplained.append(f"{name}: {key}")
    for entry in unexplained:
        print(f"  SURVIVED    {entry}")
    print(
        f"{len(alive)} surviving mutants: {len(alive) - len(unexplained)} listed as equivalent "
        f"in {EQUIVALENT.name}, {len(unexplained)} not (kill them with a test, or list them "
        "with the reason they cannot be killed)"
    )
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
