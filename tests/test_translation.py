"""Tests of the translation data path (parallel-file loader, subword vocabulary and its cache,
id arrays), BLEU/chrF, the translation loss and its iEF weights, and the adversarial
objectives on a tiny encoder–decoder. Corpora are written to tmp_path; nothing here reads
the real Multi30k files."""

import gzip
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nearprox.text import data, losses, objectives
from nearprox.text.data import subwords
from nearprox.text.models import seq2seq

EN = [
    "A man rides a bike.",
    "Two dogs play in the snow.",
    "A woman is reading a book.",
    "Children are playing football in a park.",
    "A man in a red shirt sings.",
    "The dog runs on the beach.",
]
DE = [
    "Ein Mann fährt Fahrrad.",
    "Zwei Hunde spielen im Schnee.",
    "Eine Frau liest ein Buch.",
    "Kinder spielen Fußball in einem Park.",
    "Ein Mann in einem roten Hemd singt.",
    "Der Hund läuft am Strand.",
]
VOCAB = 300  # 4 special tokens + 256 bytes + a few merges


def _write(path, lines, gz=False):
  text = "".join(line + "\n" for line in lines)
  if gz:
    with gzip.open(path, "wt", encoding="utf-8") as file:
      file.write(text)
  else:
    path.write_text(text, encoding="utf-8")


def _corpus(folder, en=EN, de=DE):
  """train (gzip), val and test_2016_flickr (plain) of the tiny corpus in ``folder``."""
  folder.mkdir(parents=True, exist_ok=True)
  _write(folder / "train.en.gz", en, gz=True)
  _write(folder / "train.de.gz", de, gz=True)
  for stem in ("val", "test_2016_flickr"):
    _write(folder / f"{stem}.en", en[:3])
    _write(folder / f"{stem}.de", de[:3])
  return folder


# ------------------------------------------------------------------------------ loader


def test_loader_reads_gzip_and_plain_in_both_directions(tmp_path):
  folder = _corpus(tmp_path / "mt")
  train = data.load_translation("train", folder)
  assert train.sources == EN and train.targets == DE and train.dropped == 0
  reverse = data.load_translation("validation", folder, direction="de-en")
  assert reverse.name == "dev" and reverse.sources == DE[:3] and reverse.targets == EN[:3]
  test = data.load_task("multi30k", "test", folder)
  assert test.targets == DE[:3]


def test_loader_names_both_files_and_counts_on_mismatch(tmp_path):
  folder = _corpus(tmp_path / "mt")
  _write(folder / "val.de", DE[:2])
  with pytest.raises(data.DataError, match=r"val\.en has 3 lines.*val\.de has 2"):
    data.load_translation("dev", folder)


def test_loader_drops_and_counts_empty_pairs(tmp_path, caplog):
  folder = _corpus(tmp_path / "mt", EN + ["  ", "Something."], DE + ["Etwas.", "\t"])
  with caplog.at_level(logging.WARNING):
    train = data.load_translation("train", folder)
  assert train.dropped == 2 and len(train) == len(EN)
  assert "dropped 2 of 8 pairs" in caplog.text and "lines 7, 8" in caplog.text


@pytest.mark.parametrize(
    "split, direction, message",
    [
        ("train", "en-fr", r"no train\.fr or train\.fr\.gz"),
        ("train", "english", "direction must be 'source-target'"),
        ("holdout", "en-de", "unknown translation split"),
    ],
)
def test_loader_errors(tmp_path, split, direction, message):
  folder = _corpus(tmp_path / "mt")
  with pytest.raises(data.DataError, match=message):
    data.load_translation(split, folder, direction)


def test_loader_missing_folder_and_unset_environment(tmp_path, monkeypatch):
  with pytest.raises(data.DataError, match="folder not found"):
    data.load_translation("train", tmp_path / "absent")
  monkeypatch.delenv(data.MULTI30K_DIR_ENV, raising=False)
  with pytest.raises(data.DataError, match=data.MULTI30K_DIR_ENV):
    data.load_translation("train")


# ------------------------------------------------------------------------------ subwords


def test_subword_cache_is_reused_and_keyed_by_inputs(tmp_path, monkeypatch):
  train = data.load_translation("train", _corpus(tmp_path / "mt"))
  calls = []
  real_train = subwords.train_subwords
  monkeypatch.setattr(
      subwords, "train_subwords", lambda *a, **k: calls.append(1) or real_train(*a, **k)
  )
  first = data.subword_tokenizer(train, VOCAB, cache_dir=tmp_path / "cache")
  second = data.subword_tokenizer(train, VOCAB, cache_dir=tmp_path / "cache")
  assert len(calls) == 1 and first.to_str() == second.to_str()
  assert len(list((tmp_path / "cache" / "subwords").glob("*.json"))) == 1
  data.subword_tokenizer(train, VOCAB + 10, cache_dir=tmp_path / "cache")  # other size
  changed = train.select(range(len(train) - 1))  # other texts
  data.subword_tokenizer(changed, VOCAB, cache_dir=tmp_path / "cache")
  assert len(calls) == 3
  assert len(list((tmp_path / "cache" / "subwords").glob("*.json"))) == 3
  (tmp_path / "cache" / "subwords").joinpath(
      subwords.subword_cache_key(train.sources + train.targets, VOCAB, 2) + ".json"
  ).write_text("{broken")
  again = data.subword_tokenizer(train, VOCAB, cache_dir=tmp_path / "cache")  # retrained
  assert len(calls) == 4 and again.to_str() == first.to_str()


def test_encode_decode_round_trip_and_layout(tmp_path):
  train = data.load_translation("train", _corpus(tmp_path / "mt"))
  tokenizer = data.subword_tokenizer(train, VOCAB, use_cache=False)
  assert [tokenizer.token_to_id(t) for t in subwords.SPECIAL_TOKENS] == [0, 1, 2, 3]
  arrays, cut = data.encode_pairs(tokenizer, train, 40)
  assert cut == 0
  assert {k: v.shape for k, v in arrays.items()} == {k: (6, 40) for k in subwords.ARRAY_KEYS}
  source, target_in, target_out = (arrays[k] for k in subwords.ARRAY_KEYS)
  lengths = (target_out != 0).sum(1)
  rows = np.arange(6)
  assert np.all(target_in[:, 0] == subwords.BOS_ID)
  assert np.all(target_out[rows, lengths - 1] == subwords.EOS_ID)
  np.testing.assert_array_equal(target_in[:, 1:], np.where(target_out == 2, 0, target_out)[:, :-1])
  assert np.all(source[rows, (source != 0).sum(1) - 1] == subwords.EOS_ID)
  assert data.decode_ids(tokenizer, target_out) == DE
  assert data.decode_ids(tokenizer, source) == EN
  unseen = ["Ein Zebra frißt Æpfel 日本."]  # characters never seen in training
  ids, cut = data.encode_sources(tokenizer, unseen, 60)
  assert data.decode_ids(tokenizer, ids) == unseen and cut == 0


def test_long_pairs_are_cut_counted_and_logged(tmp_path, caplog):
  train = data.load_translation("train", _corpus(tmp_path / "mt"))
  tokenizer = data.subword_tokenizer(train, VOCAB, use_cache=False)
  with caplog.at_level(logging.WARNING):
    arrays, cut = data.encode_pairs(tokenizer, train, 6)
  full = [len(tokenizer.encode(s, add_special_tokens=False).ids) for s in EN + DE]
  assert cut == sum(max(a, b) > 5 for a, b in zip(full[:6], full[6:])) > 0
  assert f"cut {cut} of 6 pairs" in caplog.text
  assert np.all(arrays["source_ids"][:, -1] != 0)  # cut rows end in eos at the last column
  with pytest.raises(ValueError, match="max_length"):
    data.encode_pairs(tokenizer, train, 1)


def test_saved_tokenizer_loads(tmp_path):
  train = data.load_translation("train", _corpus(tmp_path / "mt"))
  tokenizer = data.subword_tokenizer(train, VOCAB, use_cache=False)
  path = data.save_tokenizer(tokenizer, tmp_path)
  assert path.name == "tokenizer.json"
  assert data.load_tokenizer(tmp_path).to_str() == tokenizer.to_str()
  with pytest.raises(FileNotFoundError):
    data.load_tokenizer(tmp_path / "nothing")


# ------------------------------------------------------------------------------ metrics


def test_bleu_and_chrf_match_sacrebleu():
  sacrebleu = pytest.importorskip("sacrebleu")
  hypotheses = ["The cat sat on the mat.", "A dog runs in the park", "Hello there, world!"]
  references = ["The cat sat on a mat.", "A dog is running in the park.", "Hello world!"]
  scores = data.translation_scores(hypotheses, references)
  assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score)
  assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, [references]).score)
  assert 0 < scores["bleu"] < 100 and 0 < scores["chrf"] < 100
  perfect = data.translation_scores(references, references)
  assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
  with pytest.raises(ValueError, match="2 hypotheses but 3 references"):
    data.translation_scores(hypotheses[:2], references)


# ------------------------------------------------------------------------------ loss


def _logits_and_targets(seed=0, b=3, t=5, v=7):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(b, t, v)).astype(np.float32) * 2
  targets = rng.integers(1, v, size=(b, t)).astype(np.int32)
  targets[0, 3:] = 0  # padding
  targets[2, 1:] = 0
  return logits, targets


def _numpy_translation(logits, targets, eps):
  """(per-pair loss, ‖∂loss/∂logits‖² per pair) in float64."""
  z = logits.astype(np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  v = z.shape[-1]
  soft = (1 - eps) * np.eye(v)[targets] + eps / v
  mask = (targets != 0).astype(np.float64)
  n = mask.sum(-1)
  ce = -(soft * np.log(p)).sum(-1)
  loss = (ce * mask).sum(-1) / n
  grad_sq = (((p - soft) ** 2).sum(-1) * mask).sum(-1) / n**2
  return loss, grad_sq


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_translation_loss_and_ief_weight_against_numpy_and_grad(eps):
  logits, targets = _logits_and_targets()
  batch = {"target_output_ids": jnp.asarray(targets)}
  loss, grad_sq = _numpy_translation(logits, targets, eps)
  got = losses.task_loss("translation", jnp.asarray(logits), batch, label_smoothing=eps)
  np.testing.assert_allclose(got, loss, rtol=1e-5)
  weights = losses.ief_weights("translation", jnp.asarray(logits), batch, label_smoothing=eps)
  np.testing.assert_allclose(weights, grad_sq, rtol=1e-5)
  total = lambda z: jnp.sum(losses.translation_loss(z, batch["target_output_ids"], eps))
  grads = jax.grad(total)(jnp.asarray(logits))  # row i: ∂ℓ_i/∂z_i (ℓ_i reads row i only)
  np.testing.assert_allclose(jnp.sum(jnp.square(grads), axis=(1, 2)), grad_sq, rtol=1e-5)
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.task_loss("classification", logits[:, 0], {"labels": targets[:, 0]}, label_smoothing=0.1)


def test_translation_smoothness_divergence_masks_padding():
  logits, targets = _logits_and_targets()
  batch = {"target_output_ids": jnp.asarray(targets)}
  other = logits.copy()
  other[0, 4] += 5.0  # a padded position of pair 0: no change
  np.testing.assert_allclose(losses.smoothness_divergence("translation", logits, other, batch), 0)
  other[1, 0] += 1.0
  divergence = losses.smoothness_divergence("translation", logits, other, batch)
  per_token = losses.symmetric_kl(jnp.asarray(logits[1, 0]), jnp.asarray(other[1, 0]))
  np.testing.assert_allclose(divergence, [0, per_token / 5, 0], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ objectives

TINY = seq2seq.Seq2SeqConfig(
    vocab_size=50,
    num_encoder_layers=1,
    num_decoder_layers=1,
    hidden_size=16,
    num_heads=2,
    intermediate_size=32,
    dropout_rate=0.1,
    max_length=8,
)


@pytest.fixture(scope="module")
def tiny_model():
  model = seq2seq.Seq2SeqTransformer(TINY)
  params = jax.jit(seq2seq.init_seq2seq, static_argnums=0)(TINY, jax.random.key(0))
  rng = np.random.default_rng(0)
  source = rng.integers(4, 50, (3, 6)).astype(np.int32)
  source[0, 4:] = [2, 0]
  source[1, 5] = 2
  target_out = rng.integers(4, 50, (3, 5)).astype(np.int32)
  target_out[0, 3:] = [2, 0]
  target_out[2, 2:] = [2, 0, 0]
  target_in = np.concatenate([np.ones((3, 1), np.int32), target_out[:, :-1]], axis=1)
  target_in[target_in == 2] = 0
  batch = {
      "source_ids": jnp.asarray(source),
      "target_input_ids": jnp.asarray(target_in),
      "target_output_ids": jnp.asarray(target_out),
  }
  return model, params, batch


@pytest.mark.parametrize("kind", ["fgm", "smart"])
def test_adversarial_objective_perturbs_source_embeddings_per_example(tiny_model, kind):
  model, params, batch = tiny_model
  logits_fn = seq2seq.seq2seq_logits_fn(model, deterministic=True)
  config = objectives.ObjectiveConfig(
      kind=kind, epsilon=0.5, step_size=0.5, noise_std=0.1, label_smoothing=0.1
  )
  keys = jax.random.split(jax.random.key(3), 3)
  perturbation = jax.jit(
      lambda p, b, k: objectives.adversarial_perturbation(
          logits_fn, config, p, b, k, task="translation", hidden_size=16
      )
  )
  delta = perturbation(params, batch, keys)
  assert delta.shape == (3, 6, 16)
  assert np.all(np.asarray(delta)[np.asarray(batch["source_ids"]) == 0] == 0)
  assert np.linalg.norm(np.asarray(delta)) > 0
  loss_fn = jax.jit(
      objectives.make_loss_at_perturbation(
          logits_fn, config, task="translation", with_ief_weights=True
      )
  )
  values, weights = loss_fn(params, batch, keys, delta)
  for i in range(3 if kind == "fgm" else 0):  # example i's loss depends on example i alone
    row = jax.tree.map(lambda x: x[i : i + 1], (batch, keys, delta))
    value, weight = loss_fn(params, *row)
    np.testing.assert_allclose(value, values[i : i + 1], rtol=1e-5)
    np.testing.assert_allclose(weight, weights[i : i + 1], rtol=1e-5)
  clean = losses.ief_weights(
      "translation", jax.jit(logits_fn)(params, batch), batch, label_smoothing=0.1
  )
  np.testing.assert_allclose(weights, clean, rtol=1e-5)


def test_label_smoothing_only_for_translation():
  config = objectives.ObjectiveConfig(label_smoothing=0.1)
  with pytest.raises(ValueError, match="label_smoothing is for task 'translation'"):
    objectives.make_per_example_loss(lambda *a: None, config, task="classification")
  with pytest.raises(ValueError, match="must lie in"):
    objectives.ObjectiveConfig(label_smoothing=1.0)
