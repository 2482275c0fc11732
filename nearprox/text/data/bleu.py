"""Translation quality of a whole split: corpus BLEU and chrF from ``sacrebleu``.

Both are computed on detokenized output against the raw reference sentences, with
sacrebleu's defaults (BLEU: the ``13a`` tokenizer, exponential smoothing, mixed case; chrF:
character 6-grams, β = 2), which is how papers on Multi30k's test_2016_flickr report BLEU.
Scores are on sacrebleu's 0–100 scale.

References:
  Papineni, Roukos, Ward & Zhu, "BLEU: a Method for Automatic Evaluation of Machine
  Translation", ACL 2002.
  Popović, "chrF: character n-gram F-score for automatic MT evaluation", WMT 2015.
  Post, "A Call for Clarity in Reporting BLEU Scores", WMT 2018, arXiv 1804.08771 (sacrebleu).
"""

from __future__ import annotations

from collections.abc import Sequence

TRANSLATION_METRICS = ("bleu", "chrf")


def translation_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """{"bleu": corpus BLEU, "chrf": corpus chrF} of ``hypotheses`` against one reference each.

  ValueError if the two lists differ in length or are empty.
  """
  try:
    import sacrebleu
  except ImportError as error:  # the "train" extra installs it
    raise ImportError(
        "BLEU/chrF need sacrebleu: pip install 'nearprox[train]' (or sacrebleu)"
    ) from error
  if len(hypotheses) != len(references):
    raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
  if not references:
    raise ValueError("no sentences to score")
  hypotheses, references = list(hypotheses), [list(references)]
  return {
      "bleu": float(sacrebleu.corpus_bleu(hypotheses, references).score),
      "chrf": float(sacrebleu.corpus_chrf(hypotheses, references).score),
  }
