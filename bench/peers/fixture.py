"""The one edit every tool makes: the same file, the same prompt, the same model output.

The fake provider answers spark and codex with PATCH (Codex's apply_patch grammar) and aider
with its SEARCH/REPLACE form, derived from PATCH by the fake itself. A run counts only if the
file then reads exactly AFTER.
"""

FILE = "stats.py"

PROMPT = "In stats.py, make mean() return 0.0 for an empty list instead of raising ZeroDivisionError."

BEFORE = '''"""Small statistics helpers for the report generator."""

from collections import Counter
from math import sqrt

__all__ = ["mean", "median", "mode", "variance", "stdev", "percentile", "summary"]


def mean(values):
    """Arithmetic mean of a sequence of numbers."""
    return sum(values) / len(values)


def median(values):
    """Middle value; the average of the two middle values for even lengths."""
    ordered = sorted(values)
    n = len(ordered)
    mid = n // 2
    if n % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2


def mode(values):
    """Most common value; the smallest one on ties."""
    counts = Counter(values)
    best = max(counts.values())
    return min(v for v, c in counts.items() if c == best)


def variance(values):
    """Population variance."""
    m = mean(values)
    return sum((v - m) ** 2 for v in values) / len(values)


def stdev(values):
    """Population standard deviation."""
    return sqrt(variance(values))


def percentile(values, p):
    """Nearest-rank percentile, p in [0, 100]."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile out of range: {p}")
    ordered = sorted(values)
    rank = max(1, round(p / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values):
    """The figures the report prints for one series."""
    return {
        "n": len(values),
        "mean": mean(values),
        "median": median(values),
        "stdev": stdev(values),
        "p90": percentile(values, 90),
        "max": max(values),
    }
'''

PATCH = '''*** Begin Patch
*** Update File: stats.py
@@ def mean(values):
     """Arithmetic mean of a sequence of numbers."""
-    return sum(values) / len(values)
+    if not values:
+        return 0.0
+    return sum(values) / len(values)
*** End Patch
'''

AFTER = BEFORE.replace(
    '    """Arithmetic mean of a sequence of numbers."""\n    return sum(values) / len(values)\n',
    '    """Arithmetic mean of a sequence of numbers."""\n    if not values:\n        return 0.0\n    return sum(values) / len(values)\n',
    1,
)

assert AFTER != BEFORE
assert len(BEFORE.splitlines()) == 60, len(BEFORE.splitlines())
