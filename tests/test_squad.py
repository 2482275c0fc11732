"""Tests of SQuAD: loader and article split, window features, post-processing, metrics."""

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from nearprox.text import data, qa
from nearprox.text.data import squad, squad_features

REPO = Path(__file__).resolve().parents[1]
SQUAD_DEV = Path(
    os.environ.get("NEARPROX_SQUAD_DEV")
    or REPO.parent / "shared" / "data" / "squad" / "dev-v1.1.json"
)
needs_dev_file = pytest.mark.skipif(not SQUAD_DEV.is_file(), reason=f"no {SQUAD_DEV}")


@pytest.fixture(scope="module")
def tokenizer():
  from nearprox.text import models

  try:
    return models.load_tokenizer(models.minilm_dir())
  except Exception as error:  # the offline MiniLM package is an optional extra
    pytest.skip(f"no MiniLM tokenizer: {error}")


# --------------------------------------------------------------------------- fixtures

LONG_CONTEXT = (
    "The river rises in the Alps and flows north through six countries. "
    "Its basin drains a large part of central Europe, and barges carry coal along it. "
    "Several old castles stand on the cliffs above the gorge near the town of Bingen. "
    "In 1815 the Congress of Vienna declared the river open to ships of every nation. "
    "Today the river ends in the North Sea after passing through the Netherlands."
)


def _answer(context, text, occurrence=0):
  start = -1
  for _ in range(occurrence + 1):
    start = context.index(text, start + 1)
  return {"text": text, "answer_start": start}


def _squad_json(articles, version="1.1"):
  return {"version": version, "data": articles}


def _article(title, paragraphs):
  return {"title": title, "paragraphs": paragraphs}


def _fixture_document():
  short = "Denver Broncos defeated the Carolina Panthers 24-10 in Super Bowl 50."
  return _squad_json(
      [
          _article(
              "Rhine",
              [
                  {
                      "context": LONG_CONTEXT,
                      "qas": [
                          {
                              "id": "q-early",
                              "question": "Where does the river rise?",
                              "answers": [_answer(LONG_CONTEXT, "the Alps")],
                          },
                          {
                              "id": "q-late",
                              "question": "   Where does the river end?",
                              "answers": [
                                  _answer(LONG_CONTEXT, "the North Sea"),
                                  _answer(LONG_CONTEXT, "North Sea"),
                              ],
                          },
                          {
                              "id": "q-middle",
                              "question": "Who declared the river open to ships of every nation?",
                              "answers": [_answer(LONG_CONTEXT, "the Congress of Vienna")],
                          },
                      ],
                  }
              ],
          ),
          _article(
              "Super_Bowl_50",
              [
                  {
                      "context": short,
                      "qas": [
                          {
                              "id": "q-winner",
                              "question": "Who won Super Bowl 50?",
                              "answers": [
                                  _answer(short, "Denver Broncos"),
                                  _answer(short, "Denver Broncos"),
                              ],
                          }
                      ],
                  }
              ],
          ),
      ]
  )


def _write(tmp_path, document, name="dev-v1.1.json"):
  path = tmp_path / name
  path.write_text(json.dumps(document), encoding="utf-8")
  return path


@pytest.fixture
def fixture_split(tmp_path):
  return squad.read_squad_json(_write(tmp_path, _fixture_document()))


# --------------------------------------------------------------------------- metrics


def test_normalization_of_the_official_script():
  assert qa.normalize_answer("  The Denver  Broncos! ") == "denver broncos"
  assert qa.normalize_answer("An apple, a pear & the... banana") == "apple pear banana"
  # Punctuation goes first: "A-team" becomes the word "ateam", not an article.
  assert qa.normalize_answer("A-team") == "ateam"
  assert qa.normalize_answer("Theatre thereafter") == "theatre thereafter"
  assert qa.normalize_answer("The") == ""


def test_exact_match_and_f1_on_hand_made_cases():
  assert qa.exact_match_score("the Denver Broncos.", "Denver Broncos") == 1.0
  assert qa.exact_match_score("Broncos, Denver", "Denver Broncos") == 0.0
  assert qa.f1_score("Broncos, Denver", "Denver Broncos") == 1.0
  # {denver, team} vs {denver, broncos}: precision 1/2, recall 1/2.
  assert qa.f1_score("the Denver team", "Denver Broncos") == pytest.approx(0.5)
  # Repeated tokens count as a multiset: {a a b} vs {a b}: overlap 2, P 2/3, R 1.
  assert qa.f1_score("x x y", "x y") == pytest.approx(2 * (2 / 3) / (2 / 3 + 1))
  assert qa.f1_score("", "Denver") == 0.0
  assert qa.exact_match_score("", "Denver") == 0.0
  # A gold answer that normalizes to nothing ("." appears in SQuAD v1.1 dev): v1.1 gives
  # F1 0 even for an empty prediction; v2.0 gives 1.
  assert qa.exact_match_score("", ".") == 1.0
  assert qa.f1_score("", ".") == 0.0
  assert qa.f1_score("", ".", with_negative=True) == 1.0
  assert qa.f1_score("Denver", "", with_negative=True) == 0.0


def test_squad_metrics_take_the_best_gold_answer_and_average_over_questions():
  references = {
      "a": ["Carolina Panthers", "Broncos"],  # best gold for "Denver Broncos": "Broncos"
      "b": ["1815"],
      "c": ["the North Sea"],  # no prediction: scores 0
      "d": ["Denver"],
  }
  predictions = {"a": "Denver Broncos", "b": "in 1815.", "d": "", "extra": "ignored"}
  f1_a = 2 * (1 / 2) * 1 / (1 / 2 + 1)
  f1_b = 2 * (1 / 2) * 1 / (1 / 2 + 1)  # {in, 1815} vs {1815}
  scores = qa.squad_metrics(predictions, references)
  assert scores["exact_match"] == pytest.approx(0.0)
  assert scores["f1"] == pytest.approx((f1_a + f1_b) / 4)
  perfect = qa.squad_metrics(
      {"a": "broncos", "b": "1815", "c": "North Sea", "d": "Denver"}, references
  )
  assert perfect == {"exact_match": 1.0, "f1": 1.0}
  with pytest.raises(ValueError, match="question b"):
    qa.squad_metrics({}, {"b": []})


# --------------------------------------------------------------------------- loading


def test_read_fixture(fixture_split):
  assert len(fixture_split) == 4
  assert fixture_split.titles == ["Rhine", "Super_Bowl_50"]
  late = fixture_split.examples[1]
  assert late.id == "q-late" and late.answers == ("the North Sea", "North Sea")
  assert late.context[late.answer_starts[1] :].startswith("North Sea")
  assert fixture_split.references()["q-late"] == ["the North Sea", "North Sea"]
  assert not fixture_split.with_negative
  assert fixture_split.select([3, 0]).ids == ["q-winner", "q-early"]


def _broken(tmp_path, mutate):
  document = _fixture_document()
  mutate(document)
  return _write(tmp_path, document, "broken.json")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda d: d["data"][0]["paragraphs"][0]["qas"][1].pop("answers"),
            r"question q-late: missing field 'answers'",
        ),
        (
            lambda d: d["data"][0]["paragraphs"][0]["qas"][2]["answers"][0].update(answer_start=5),
            r"question q-middle: answer 0: text 'the Congress of Vienna' does not match",
        ),
        (
            lambda d: d["data"][1]["paragraphs"][0]["qas"][0]["answers"][1].update(
                answer_start="0"
            ),
            r"question q-winner: answer 1: field 'answer_start' must be an integer, got str",
        ),
        (
            lambda d: d["data"][0]["paragraphs"][0]["qas"][0].update(question=None),
            r"question q-early: field 'question' must be a string",
        ),
        (
            lambda d: d["data"][0]["paragraphs"][0]["qas"][1].pop("id"),
            r"data\[0\]\.paragraphs\[0\]\.qas\[1\] \(article 'Rhine'\): missing field 'id'",
        ),
        (
            lambda d: d["data"][1]["paragraphs"][0]["qas"][0].update(id="q-early"),
            r"question q-early: id repeated",
        ),
        (
            lambda d: d["data"][1].pop("title"),
            r"data\[1\]: missing field 'title'",
        ),
        (
            lambda d: d["data"][0]["paragraphs"][0]["qas"][0].update(is_impossible=True),
            r"question q-early: is_impossible is true but it has 1 answers",
        ),
        (
            lambda d: d["data"][0]["paragraphs"][0]["qas"][0].update(answers=[]),
            r"question q-early: no answers",
        ),
    ],
)
def test_malformed_input_names_the_file_and_question(tmp_path, mutate, message):
  path = _broken(tmp_path, mutate)
  with pytest.raises(data.DataError, match=message) as error:
    squad.read_squad_json(path)
  assert str(error.value).startswith(f"{path}:")


def test_invalid_json_names_the_file_and_line(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text('{"version": "1.1",\n "data": [\n  {"title": "x",,}\n]}', encoding="utf-8")
  with pytest.raises(data.DataError, match=rf"^{re.escape(str(path))}:3: not valid JSON"):
    squad.read_squad_json(path)
  path.write_text('{"version": "1.1"}', encoding="utf-8")
  with pytest.raises(
      data.DataError, match=rf'^{re.escape(str(path))}: not a SQuAD file: .*"data" list'
  ):
    squad.read_squad_json(path)


def test_context_without_tokens_names_the_file_and_question(tmp_path, tokenizer):
  document = _fixture_document()
  document["version"] = "v2.0"
  document["data"][1]["paragraphs"].append(
      {
          "context": " \t \n ",
          "qas": [{"id": "q-blank", "question": "What?", "answers": [], "is_impossible": True}],
      }
  )
  path = _write(tmp_path, document, "blank.json")
  split = squad.read_squad_json(path)
  assert split.with_negative and split.examples[-1].gold_answers == [""]
  with pytest.raises(
      data.DataError, match=rf"^{re.escape(str(path))}: question q-blank: the context .* no tokens"
  ):
    squad_features.encode_squad(split, tokenizer, 64, 16, use_cache=False)


# --------------------------------------------------------------------------- splits


def test_article_split_is_disjoint_and_deterministic(fixture_split):
  titles = [f"Article_{i}" for i in range(400)]
  held = [t for t in titles if squad.article_is_held_out(t)]
  assert held == [t for t in titles if squad.article_is_held_out(t)]  # a pure function
  assert 0.18 < len(held) / len(titles) < 0.32  # ~ EVAL_FRACTION = 0.25
  assert not any(squad.article_is_held_out(t, 0.0) for t in titles)
  assert all(squad.article_is_held_out(t, 1.0) for t in titles)
  # Monotone in the fraction: a larger held-out part contains the smaller one.
  assert set(held) <= {t for t in titles if squad.article_is_held_out(t, 0.5)}
  with pytest.raises(data.DataError, match="leaves no questions for 'dev'"):
    squad.split_by_article(fixture_split, 0.0)


@needs_dev_file
def test_article_split_of_the_official_dev_file():
  train = squad.load_squad("train", SQUAD_DEV.parent)
  dev = squad.load_squad("validation", SQUAD_DEV)
  assert (len(train.titles), len(train)) == (37, 8868)
  assert (len(dev.titles), len(dev)) == (11, 1702)
  assert set(train.titles).isdisjoint(dev.titles)
  contexts = [{e.context for e in part.examples} for part in (train, dev)]
  assert contexts[0].isdisjoint(contexts[1])
  assert (len(contexts[0]), len(contexts[1])) == (1721, 346)
  assert set(train.ids).isdisjoint(dev.ids) and len(set(train.ids) | set(dev.ids)) == 10570
  assert all(squad.article_is_held_out(t) for t in dev.titles)
  assert not any(squad.article_is_held_out(t) for t in train.titles)
  assert squad.load_squad("dev", dev_file=SQUAD_DEV).ids == dev.ids  # deterministic


def test_official_pair_is_read_whole(tmp_path):
  document = _fixture_document()
  train_doc = {"version": "1.1", "data": document["data"][:1]}
  dev_doc = {"version": "1.1", "data": document["data"][1:]}
  folder = tmp_path / "squad"
  folder.mkdir()
  _write(folder, train_doc, "train-v1.1.json")
  _write(folder, dev_doc, "dev-v1.1.json")
  for kwargs in (
      dict(data_dir=folder),
      dict(train_file=folder / "train-v1.1.json", dev_file=folder / "dev-v1.1.json"),
  ):
    train = squad.load_squad("train", **kwargs)
    dev = squad.load_squad("dev", **kwargs)
    assert train.ids == ["q-early", "q-late", "q-middle"] and train.name == "train"
    assert dev.ids == ["q-winner"] and dev.name == "dev"
    assert dev.source == str(folder / "dev-v1.1.json")
  with pytest.raises(data.DataError, match="no labeled test split"):
    squad.load_squad("test", folder)
  (folder / "dev-v1.1.json").unlink()
  with pytest.raises(data.DataError, match="no dev-v1.1.json or dev-v2.0.json"):
    squad.load_squad("dev", folder)


# --------------------------------------------------------------------------- features


def _context_token_offsets(tokenizer, context):
  encoded = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
  return [tuple(pair) for pair in encoded["offset_mapping"]]


def _check_features(split, features, tokenizer, doc_stride):
  """Windows cover each context; labels decode to the answer; returns the decode rate."""
  assert features.input_ids.dtype == np.int32 and features.offsets.shape[2] == 2
  assert np.all(np.diff(features.example_index) >= 0)  # windows grouped by question, in order
  assert set(features.example_index.tolist()) == set(range(len(split)))
  context_mask = features.context_mask()
  agree = total = 0
  for e, example in enumerate(split.examples):
    rows = np.flatnonzero(features.example_index == e)
    windows = [[tuple(pair) for pair in features.offsets[row][context_mask[row]]] for row in rows]
    expected = _context_token_offsets(tokenizer, example.context)
    assert sorted(set().union(*windows)) == expected, example.id  # every token, no other
    for previous, following in zip(windows, windows[1:]):
      # Consecutive windows share doc_stride tokens and together continue the context.
      assert following[:doc_stride] == previous[-doc_stride:], example.id
    holds = 0
    for row in rows:
      start, end = features.start_positions[row], features.end_positions[row]
      assert 0 <= start <= end < features.max_length
      if start == 0:
        assert end == 0
        continue
      assert context_mask[row, start] and context_mask[row, end]
      holds += 1
      total += 1
      text = example.context[features.offsets[row, start, 0] : features.offsets[row, end, 1]]
      agree += qa.normalize_answer(text) == qa.normalize_answer(example.answers[0])
    answer_tokens = [
        pair
        for pair in expected
        if pair[1] > example.answer_starts[0]
        and pair[0] < example.answer_starts[0] + len(example.answers[0])
    ]
    if len(answer_tokens) <= doc_stride + 1:
      assert holds >= 1, example.id  # an answer this short lies whole in some window
  return agree, total


def test_windows_cover_the_context_and_labels_decode(fixture_split, tokenizer):
  features = squad_features.encode_squad(fixture_split, tokenizer, 40, 8, use_cache=False)
  counts = np.bincount(features.example_index)
  assert counts[0] >= 3 and counts[3] == 1  # the long context needs several windows
  agree, total = _check_features(fixture_split, features, tokenizer, 8)
  assert total >= 4 and agree == total
  texts = squad_features.feature_answer_texts(fixture_split, features)
  assert {text for text in texts if text is not None} == {
      "the Alps",
      "the North Sea",
      "the Congress of Vienna",
      "Denver Broncos",
  }
  # Windows not holding the answer point at [CLS] (index 0) for both ends.
  outside = np.array([text is None for text in texts])
  assert outside.any()
  assert np.all(features.start_positions[outside] == 0)
  assert np.all(features.end_positions[outside] == 0)
  assert np.all(features.input_ids[:, 0] == tokenizer.cls_token_id)
  # Non-context tokens have offsets -1; the question is in segment 0.
  question_tokens = (features.token_type_ids == 0) & (features.attention_mask == 1)
  assert np.all(features.offsets[question_tokens] == -1)
  # Fixed shapes, ready for the batcher.
  batch = next(data.batches(features.arrays(), 4, shuffle=False))
  assert set(batch) == {
      "input_ids",
      "attention_mask",
      "token_type_ids",
      "start_positions",
      "end_positions",
      "mask",
      "index",
  }
  assert batch["input_ids"].shape == (4, 40) and batch["start_positions"].shape == (4,)


def test_long_questions_are_cut(fixture_split, tokenizer):
  long = fixture_split.examples[0]
  words = " ".join(["river"] * 100)
  split = squad.SquadSplit("dev", (dataclasses.replace(long, question=words),))
  features = squad_features.encode_squad(
      split, tokenizer, 64, 8, max_question_length=10, use_cache=False
  )
  question_tokens = (features.token_type_ids[0] == 0) & (features.attention_mask[0] == 1)
  assert question_tokens.sum() == 10 + 2  # [CLS] question [SEP]
  with pytest.raises(
      ValueError, match=r"question q-early has 10 tokens, .* 51 context .* doc_stride=51"
  ):
    squad_features.encode_squad(split, tokenizer, 64, 51, max_question_length=10, use_cache=False)
  assert len(
      squad_features.encode_squad(split, tokenizer, 64, 50, max_question_length=10, use_cache=False)
  )


def test_encoding_is_cached_on_disk(fixture_split, tokenizer, tmp_path, monkeypatch):
  first = squad_features.encode_squad(fixture_split, tokenizer, 40, 8, cache_dir=tmp_path)
  files = list((tmp_path / "tokenized").glob("squad-*.npz"))
  assert len(files) == 1

  def no_tokenizing(*args, **kwargs):
    raise AssertionError("tokenized again instead of reading the cache")

  with monkeypatch.context() as patch:
    patch.setattr(squad_features, "_tokenize", no_tokenizing)
    again = squad_features.encode_squad(fixture_split, tokenizer, 40, 8, cache_dir=tmp_path)
  for key in ("input_ids", "start_positions", "end_positions", "example_index", "offsets"):
    np.testing.assert_array_equal(getattr(first, key), getattr(again, key))
  # Every input of the features changes the key.
  base = squad_features.squad_cache_key(fixture_split, tokenizer, max_length=40, doc_stride=8)
  assert base == squad_features.squad_cache_key(
      fixture_split, tokenizer, max_length=40, doc_stride=8
  )
  assert base != squad_features.squad_cache_key(
      fixture_split, tokenizer, max_length=40, doc_stride=9
  )
  assert base != squad_features.squad_cache_key(
      fixture_split.select([1, 0, 2, 3]), tokenizer, max_length=40, doc_stride=8
  )
  moved = fixture_split.examples[1]
  moved = dataclasses.replace(moved, answer_starts=(moved.answer_starts[0], 0))
  changed = dataclasses.replace(
      fixture_split, examples=(fixture_split.examples[0], moved) + fixture_split.examples[2:]
  )
  assert base != squad_features.squad_cache_key(changed, tokenizer, max_length=40, doc_stride=8)
  # A damaged file is recomputed and replaced.
  files[0].write_bytes(b"not an npz")
  repaired = squad_features.encode_squad(fixture_split, tokenizer, 40, 8, cache_dir=tmp_path)
  np.testing.assert_array_equal(repaired.offsets, first.offsets)


@needs_dev_file
def test_official_dev_gold_spans_decode_to_the_answers(tokenizer):
  train = squad.load_squad("train", dev_file=SQUAD_DEV)
  titles = train.titles[:6]
  subset = train.select([i for i, e in enumerate(train.examples) if e.title in titles])
  assert len(subset) > 1000
  # Short windows, so that many contexts need several (doc_stride = overlap).
  features = squad_features.encode_squad(subset, tokenizer, 128, 32, use_cache=False)
  assert len(features) > 1.5 * len(subset)
  agree, total = _check_features(subset, features, tokenizer, 32)
  assert total > 0.9 * len(subset)
  assert agree / total >= 0.99, (agree, total)
  # Oracle logits (the labels) post-process back to the first answer almost always.
  start = np.full(features.input_ids.shape, -5.0, np.float32)
  end = start.copy()
  rows = np.arange(len(features))
  start[rows, features.start_positions] = 5.0
  end[rows, features.end_positions] = 5.0
  predictions = qa.postprocess_predictions(subset, features, start, end)
  assert qa.evaluate_predictions(subset, predictions)["exact_match"] >= 0.98


# --------------------------------------------------------------------------- post-processing


def _reference_best_span(start, end, context, n_best, max_answer_length):
  """Hugging Face's postprocess_qa_predictions loop for one window: (score, start, end)."""
  order_s = np.argsort(start)[-1 : -n_best - 1 : -1]
  order_e = np.argsort(end)[-1 : -n_best - 1 : -1]
  best = (-np.inf, -1, -1)
  for s in order_s:
    for e in order_e:
      if not (context[s] and context[e]) or e < s or e - s + 1 > max_answer_length:
        continue
      best = max(best, (start[s] + end[e], -s, -e))
  return best[0], -best[1], -best[2]


@pytest.mark.parametrize("n_best", [5, 20, None])
def test_best_spans_match_the_reference_loop(n_best):
  rng = np.random.default_rng(0)
  num, length = 50, 48
  start = rng.normal(size=(num, length)).astype(np.float32)
  end = rng.normal(size=(num, length)).astype(np.float32)
  context = np.zeros((num, length), bool)
  for row in range(num):
    context[row, rng.integers(3, 10) : rng.integers(30, length)] = True
  context[-1] = False  # a window without context: no valid span
  starts, ends, scores = qa.best_spans(
      start, end, context, n_best_size=n_best, max_answer_length=6, chunk_size=7
  )
  for row in range(num):
    score, s, e = _reference_best_span(start[row], end[row], context[row], n_best or length, 6)
    if np.isfinite(score):
      assert (starts[row], ends[row]) == (s, e) and scores[row] == pytest.approx(score)
    else:
      assert starts[row] == ends[row] == -1 and scores[row] == -np.inf


def test_postprocess_picks_the_best_span_across_windows(fixture_split, tokenizer):
  features = squad_features.encode_squad(fixture_split, tokenizer, 40, 8, use_cache=False)
  start = np.zeros(features.input_ids.shape, np.float32)
  end = np.zeros(features.input_ids.shape, np.float32)
  context_mask = features.context_mask()
  rows = np.flatnonzero(features.example_index == 0)
  assert len(rows) >= 3

  def put(row, text, occurrence, score):
    """Logits for the span of ``text`` (its ``occurrence``-th time) in window ``row``."""
    begin = _answer(LONG_CONTEXT, text, occurrence)["answer_start"]
    offsets = features.offsets[row]
    s = int(np.flatnonzero(context_mask[row] & (offsets[:, 0] == begin))[0])
    e = int(np.flatnonzero(context_mask[row] & (offsets[:, 1] == begin + len(text)))[0])
    start[row, s] += score
    end[row, e] += score
    return s, e

  first, last = rows[0], rows[-1]
  put(first, "the Alps", 0, 4.0)
  put(last, "the North Sea", 0, 5.0)  # the best span overall, in the last window
  # Higher logits that make no valid span: on question tokens, an end before its start,
  # and a span longer than max_answer_length.
  question = np.flatnonzero(~context_mask[first] & (features.attention_mask[first] == 1))
  start[first, question[1]] = end[first, question[2]] = 50.0
  s, _ = put(last, "Netherlands", 0, 0.0)
  _, e = put(last, "Today", 0, 0.0)
  start[last, s] = end[last, e] = 9.0  # end "Today" lies before start "Netherlands"
  predictions = qa.postprocess_predictions(fixture_split, features, start, end)
  assert predictions["q-early"] == "the North Sea"
  end[last, e] = 0.0
  # A long span: "Several ... Bingen" is valid only if max_answer_length allows it.
  middle = rows[len(rows) // 2]
  s, _ = put(middle, "Several", 0, 0.0)
  _, e = put(middle, "Bingen", 0, 0.0)
  start[middle, s] = end[middle, e] = 7.0
  assert e - s + 1 > 5
  predictions = qa.postprocess_predictions(fixture_split, features, start, end, max_answer_length=5)
  assert predictions["q-early"] == "the North Sea"
  predictions = qa.postprocess_predictions(
      fixture_split, features, start, end, max_answer_length=30
  )
  assert predictions["q-early"].startswith("Several old castles") and predictions[
      "q-early"
  ].endswith("Bingen")
  with pytest.raises(ValueError, match="one row per feature"):
    qa.postprocess_predictions(fixture_split, features, start[:-1], end[:-1])


def test_postprocess_predicts_no_answer_for_v2(tmp_path, tokenizer):
  document = _fixture_document()
  document["version"] = "v2.0"
  document["data"][1]["paragraphs"][0]["qas"].append(
      {"id": "q-none", "question": "Who lost Super Bowl 49?", "answers": [], "is_impossible": True}
  )
  split = squad.read_squad_json(_write(tmp_path, document, "dev-v2.0.json"))
  features = squad_features.encode_squad(split, tokenizer, 40, 8, use_cache=False)
  rows = np.flatnonzero(features.example_index == 4)
  assert features.start_positions[rows].tolist() == [0] and features.end_positions[
      rows
  ].tolist() == [0]
  start = np.zeros(features.input_ids.shape, np.float32)
  end = np.zeros(features.input_ids.shape, np.float32)
  s = int(np.flatnonzero(features.context_mask()[rows[0]])[0])
  start[rows[0], s] = end[rows[0], s] = 1.0  # best span score 2
  start[rows[0], 0] = end[rows[0], 0] = 1.5  # null score 3
  predictions = qa.postprocess_predictions(split, features, start, end)
  assert predictions["q-none"] == ""
  predictions = qa.postprocess_predictions(
      split, features, start, end, null_score_diff_threshold=1.5
  )
  assert predictions["q-none"] == "Denver"
  scores = qa.evaluate_predictions(split.select([4]), {"q-none": ""})
  assert scores == {"exact_match": 1.0, "f1": 1.0}
