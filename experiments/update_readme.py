"""Splices generated Markdown files into README.md between marker comments.

    <!-- BEGIN GENERATED: experiments/results/bench_step.md -->
    ... replaced by that file's content ...
    <!-- END GENERATED: experiments/results/bench_step.md -->

Run ``python -m experiments.update_readme`` after ``python -m experiments.bench_step`` or
``python -m experiments.reproduce``; the README's tables are never edited by hand.
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


def main() -> int:
  path = ROOT / "README.md"
  old = path.read_text()
  new = splice(old)
  path.write_text(new)
  print("README.md updated" if new != old else "README.md already up to date")
  return 0


if __name__ == "__main__":
  sys.exit(main())
