"""Translates a text file with a model trained by ``nearprox.training.train`` (task multi30k).

    python -m nearprox.training.translate --workdir runs/mt --input test.en --output hyp.de \
        [--beam_size 4] [--length_penalty 0.6] [--batch_size 64] [--reference test.de]

One sentence a line in, one translation a line out (an empty input line gives an empty output
line). The model config and the subword tokenizer come from ``workdir/translation_model``
(written when the training starts), the params from there too once the training has ended,
else from the workdir's latest readable orbax checkpoint (a training stopped, or still
running: a warning names the step), so nothing else is needed.
``--reference``: also print corpus BLEU and chrF (sacrebleu's defaults) against that file,
which is how to score the model on another test set. An input line longer than the model's
``max_length`` − 1 subwords is cut to them, as in training; the lines cut are counted,
logged and printed (``"cut"``). Beam 1 is greedy decoding.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import jax
import numpy as np
from absl import flags

from nearprox.text import data
from nearprox.text.data import subwords
from nearprox.training import translation_io


def translate(
    model,
    params,
    tokenizer,
    sentences: list[str],
    *,
    beam_size: int = 4,
    length_penalty: float = 0.6,
    batch_size: int = 64,
    stats: dict | None = None,
) -> list[str]:
  """Detokenized translations of ``sentences`` (empty or whitespace-only: ""). Sentences
  longer than the model's ``max_length`` − 1 subwords are cut to them: counted, logged, and
  with ``stats`` (a dict) stored as ``stats["cut"]``."""
  from nearprox.text import decoding

  if beam_size < 1 or batch_size < 1:
    raise ValueError(f"beam_size and batch_size must be >= 1, got {beam_size}, {batch_size}")
  max_length = model.config.max_length
  if beam_size == 1:
    decode = functools.partial(decoding.greedy_decode, model, max_length=max_length)
  else:
    decode = functools.partial(
        decoding.beam_search,
        model,
        beam_size=beam_size,
        length_penalty=length_penalty,
        max_length=max_length,
    )
  decode = jax.jit(decode)
  rows = [i for i, s in enumerate(sentences) if s.strip()]
  out = [""] * len(sentences)
  texts = [sentences[i].strip() for i in rows]
  source_ids, cut = data.encode_sources(tokenizer, texts, max_length)
  if stats is not None:
    stats["cut"] = cut
  if cut:
    logging.warning(
        "cut %d of %d input sentences to the model's max_length = %d subwords (with eos); "
        "their translations cover the first %d subwords only",
        cut,
        len(rows),
        max_length,
        max_length - 1,
    )
  if not rows:
    return out
  for start in range(0, len(rows), batch_size):
    block = source_ids[start : start + batch_size]
    real = len(block)
    if real < batch_size:  # one shape for jit: fill with copies of the first row
      block = np.concatenate([block, np.repeat(block[:1], batch_size - real, axis=0)])
    ids = np.asarray(decode(params, block))[:real]
    for i, text in zip(rows[start : start + real], subwords.decode_ids(tokenizer, ids)):
      out[i] = text
  return out


def parse_flags(argv: list[str]) -> flags.FlagValues:
  """The command's flags, parsed from ``argv`` (without the program name) into a FlagValues
  of their own: absl, as every other command here, without defining them globally, where
  their names (``--workdir``, ``--batch_size``) would clash with another command's imported
  in the same process."""
  values = flags.FlagValues()
  own = {"flag_values": values}
  flags.DEFINE_string("workdir", None, "training workdir (or its model folder)", **own)
  flags.DEFINE_string("input", None, "UTF-8 text (or .gz), one sentence a line", **own)
  flags.DEFINE_string("output", None, "where to write one translation a line", **own)
  flags.DEFINE_integer("beam_size", 4, "beam width (1: greedy)", **own)
  flags.DEFINE_float("length_penalty", 0.6, "beam search's length penalty alpha", **own)
  flags.DEFINE_integer("batch_size", 64, "sentences decoded at once", **own)
  flags.DEFINE_string("reference", None, "reference translations: also print BLEU and chrF", **own)
  usage = " ".join(__doc__.splitlines()[2].split())
  if {"--help", "-h", "--helpshort"} & set(argv):
    print(f"usage: {usage}\n\n{values.get_help()}")
    raise SystemExit(0)
  flags.mark_flags_as_required(["workdir", "input", "output"], flag_values=values)
  try:
    values(["translate", *argv])
  except flags.Error as error:
    raise SystemExit(f"translate: {error}\nusage: {usage}") from None
  return values


def main(argv: list[str]) -> dict:
  args = parse_flags(argv)
  model, params, tokenizer = translation_io.load_model(args.workdir)
  sentences = data.translation.read_lines(args.input)
  stats = {}
  hypotheses = translate(
      model,
      params,
      tokenizer,
      sentences,
      beam_size=args.beam_size,
      length_penalty=args.length_penalty,
      batch_size=args.batch_size,
      stats=stats,
  )
  Path(args.output).write_text("".join(h + "\n" for h in hypotheses), encoding="utf-8")
  result = {"sentences": len(sentences), "cut": stats["cut"], "output": args.output}
  if args.reference:
    references = data.translation.read_lines(args.reference)
    if len(references) != len(sentences):
      raise SystemExit(
          f"{args.reference} has {len(references)} lines, {args.input} has {len(sentences)}"
      )
    result.update(data.translation_scores(hypotheses, references))
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  from nearprox.training.train import configure_logging

  configure_logging()
  main(sys.argv[1:])
