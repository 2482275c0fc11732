"""A tiny GLUE-layout SST-2 and the tiny training config on it, for the tests."""

from pathlib import Path

import numpy as np

from experiments.configs import tiny


def write_sst2(root: Path, n_train=96, n_dev=37, seed=0) -> Path:
  """A GLUE-layout SST-2 whose label is decided by one sentiment word per sentence."""
  rng = np.random.default_rng(seed)
  words = {
      1: ["good", "great", "wonderful", "excellent", "superb"],
      0: ["bad", "awful", "terrible", "boring", "dreadful"],
  }
  filler = ["the", "movie", "was", "quite", "a", "film", "story", "plot", "really", "and"]
  folder = root / "SST-2"
  folder.mkdir(parents=True, exist_ok=True)
  for name, size in (("train", n_train), ("dev", n_dev)):
    rows = ["sentence\tlabel"]
    for _ in range(size):
      label = int(rng.integers(2))
      sentence = list(rng.choice(filler, 5))
      sentence.insert(int(rng.integers(6)), str(rng.choice(words[label])))
      rows.append(" ".join(sentence) + f"\t{label}")
    (folder / f"{name}.tsv").write_text("\n".join(rows) + "\n")
  return root


def tiny_config(glue_dir, **overrides):
  """experiments/configs/tiny.py on the SST-2 files in ``glue_dir``; dotted-key overrides."""
  config = tiny.get_config()
  config.lock()  # a misspelt override is an error, not a new field
  config.update_from_flattened_dict({"task": "sst2", "data_dir": str(glue_dir), **overrides})
  return config


def write_mrpc(root: Path, n_train=64, n_dev=24, seed=0) -> Path:
  """A GLUE-layout MRPC whose pairs are paraphrases (label 1) when both sentences name the
  same animal."""
  rng = np.random.default_rng(seed)
  animals = ["cat", "dog", "horse", "bird", "fish", "goat"]
  filler = ["the", "a", "saw", "near", "house", "river", "quietly", "old"]
  folder = root / "MRPC"
  folder.mkdir(parents=True, exist_ok=True)
  for name, size in (("train", n_train), ("dev", n_dev)):
    rows = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
    for i in range(size):
      label = int(rng.integers(2))
      first = str(rng.choice(animals))
      second = first if label else str(rng.choice([a for a in animals if a != first]))
      a = " ".join([*rng.choice(filler, 3), first])
      b = " ".join([second, *rng.choice(filler, 3)])
      rows.append(f"{label}\t{2 * i}\t{2 * i + 1}\t{a}\t{b}")
    (folder / f"{name}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
  return root
