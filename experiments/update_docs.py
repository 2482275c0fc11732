"""Splices generated Markdown files into README.md and docs/benchmarks.md between markers.

    <!-- BEGIN GENERATED: experiments/results/bench_step.md -->
    ... replaced by that file's content ...
    <!-- END GENERATED: experiments/results/bench_step.md -->

Run ``python -m experiments.update_docs`` after ``python -m experiments.reproduce`` (README's
results table: ``experiments/results/full/verdict.md``) or a benchmark
(``experiments.bench_step``, ``experiments.bench_optimizers``); generated tables are never
edited by hand. docs/results.md is written by ``reproduce`` itself.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATTERN = re.compile(
    r"(<!-- BEGIN GENERATED: (?P<path>\S+) -->\n)(?P<body>.*?)"
    r"(<!-- END GENERATED: (?P=path) -->)",
    re.DOTALL,
)


def splice(readme: str, root: Path = ROOT) -> str:
  def replace(match: re.Match) -> str:
    source = root / match.group("path")
    if not source.is_file():
      raise FileNotFoundError(f"README marker names {source}, which does not exist")
    body = source.read_text().rstrip("\n") + "\n"
    return match.group(1) + body + match.group(4)

  return PATTERN.sub(replace, readme)


DOCS = ("README.md", "docs/benchmarks.md")


def main() -> int:
  for name in DOCS:
    path = ROOT / name
    old = path.read_text()
    new = splice(old)
    path.write_text(new)
    print(f"{name} updated" if new != old else f"{name} already up to date")
  return 0


if __name__ == "__main__":
  sys.exit(main())
