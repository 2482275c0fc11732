"""The documents a user reads: README's size and quickstart, the generated blocks current,
links that resolve, and docs/studies.md's example study working as written (one module plus
one registry entry)."""

import re
import sys
from pathlib import Path

import pytest

from experiments import report, studies, update_docs
from experiments.reproduce import plan_with_defaults, run_studies
from tests.test_tuning import FakeStore

REPO = Path(__file__).resolve().parents[1]


def code_blocks(path: Path, language: str) -> list[str]:
  return re.findall(rf"```{language}\n(.*?)```", path.read_text(), re.DOTALL)


def test_the_readme_is_a_front_door():
  text = (REPO / "README.md").read_text()
  assert len(text.splitlines()) <= 200
  assert 'pip install -e ".[train]"' in text
  assert "bash run.sh" in text and "bash test.sh" in text


def test_the_readme_quickstart_runs():
  (quickstart,) = code_blocks(REPO / "README.md", "python")
  namespace = {}
  exec(compile(quickstart, "README quickstart", "exec"), namespace)
  leaves = namespace["jax"].tree.leaves(namespace["params"])
  assert all(bool(namespace["jnp"].all(namespace["jnp"].isfinite(x))) for x in leaves)
  assert float(abs(namespace["params"]["w"]).sum()) > 0  # it took a step


def test_generated_blocks_are_current_and_links_resolve():
  for name in update_docs.DOCS:
    path = REPO / name
    text = path.read_text()
    assert update_docs.splice(text) == text, f"{name}: run python -m experiments.update_docs"
    for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
      if "://" not in link:
        assert (path.parent / link).exists(), f"{name} links to {link}, which does not exist"


def test_a_splice_marker_naming_a_missing_file_is_an_error(tmp_path):
  readme = "<!-- BEGIN GENERATED: nowhere.md -->\nold\n<!-- END GENERATED: nowhere.md -->\n"
  with pytest.raises(FileNotFoundError, match="nowhere.md"):
    update_docs.splice(readme, tmp_path)


def test_the_example_study_of_docs_studies_md_is_one_module_and_one_registry_line(
    tmp_path, monkeypatch
):
  """The code block of docs/studies.md, saved as a module and registered: its PLAN fills the
  plan, a pass asks for the runs it needs, and with them its table, comparison and section
  come out."""
  (source,) = [b for b in code_blocks(REPO / "docs" / "studies.md", "python") if "TITLE" in b]
  (tmp_path / "warmup_example.py").write_text(source)
  monkeypatch.syspath_prepend(str(tmp_path))
  import warmup_example

  monkeypatch.setitem(studies.REGISTRY, "warmup", warmup_example)
  from experiments.configs import quick

  plan = plan_with_defaults(quick.get_plan())
  assert tuple(plan.warmup_fractions) == (0.0, 0.1)
  plan.studies = ("warmup",)
  warmup = lambda overrides: overrides.get("optimizer.warmup_fraction", 0.1)
  store = FakeStore(lambda o: 0.8 + 0.05 * (o["optimizer.learning_rate"] > 1e-4) - warmup(o))
  store.requested, store.out = [], tmp_path  # what run_study reads of a run store
  study = run_studies(plan, store, ["warmup"])["warmup"]
  rows = study["tables"]["warmup"]
  assert [r["variant"] for r in rows] == ["AdamW, warmup 0", "AdamW, warmup 0.1"]
  (record,) = study["comparisons"]
  assert record["condition"] == "SST-2 dev acc." and record["difference"] == pytest.approx(0.1)
  records = study["tables"]["summary"]  # its summary.json records, one per row
  assert [(r["study"], r["condition"]) for r in records] == [
      ("warmup", "warmup fraction 0"),
      ("warmup", "warmup fraction 0.1"),
  ]
  assert [r["mean"] for r in records] == [r["dev_accuracy"] for r in rows]
  section = warmup_example.markdown(study)
  assert "AdamW, warmup 0.1" in section and report.verdict_table([record]).count("\n") == 2
  del sys.modules["warmup_example"]
