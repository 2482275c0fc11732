"""Tests for nearprox.text.models: the Flax BERT against transformers' PyTorch BERT (the oracle)."""

import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from nearprox.text import models

ATOL = 1e-4  # float32 parity with PyTorch
BF16_ATOL = 0.1  # bf16 vs float32 (MiniLM: hidden states up to ~6, measured error 0.045)
TINY = dataclasses.asdict(models.tiny_config())  # HF BertConfig's field names
SENTENCES = (["The movie was great!", "Awful."], ["I liked it a lot.", "Never again."])


def _torch():
  return pytest.importorskip("torch"), pytest.importorskip("transformers")


def _tiny_tokenizer():
  from transformers import BertTokenizer

  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "was", "great", "!"]
  vocab = words + [f"w{i}" for i in range(TINY["vocab_size"] - len(words))]
  return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def _tiny_batch(seed=0, batch=3, length=10):
  """Random ids with padding (lengths 10, 7, 4) and two segments."""
  rng = np.random.default_rng(seed)
  input_ids = rng.integers(5, TINY["vocab_size"], size=(batch, length)).astype(np.int32)
  lengths = np.array([length, 7, 4][:batch])
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  types = ((np.arange(length)[None] >= lengths[:, None] // 2) * mask).astype(np.int32)
  return input_ids * mask, mask, types


def _apply(model, params, ids, mask=None, types=None, **kw):
  return model.apply(
      {"params": params},
      jnp.asarray(ids),
      attention_mask=None if mask is None else jnp.asarray(mask),
      token_type_ids=None if types is None else jnp.asarray(types),
      **kw,
  )


def _torch_forward(torch_model, ids, mask, types):
  torch, _ = _torch()
  with torch.no_grad():
    return torch_model(
        input_ids=torch.tensor(ids, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
        token_type_ids=torch.tensor(types, dtype=torch.long),
    )


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
  """A randomly initialized PyTorch BertModel (all weights perturbed) saved in HF layout."""
  torch, transformers = _torch()
  torch.manual_seed(0)
  torch_model = transformers.BertModel(transformers.BertConfig(**TINY)).eval()
  with torch.no_grad():  # nonzero biases and LayerNorm params, so a wrong mapping shows
    for p in torch_model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("tiny_bert")
  torch_model.save_pretrained(path)
  _tiny_tokenizer().save_pretrained(str(path))
  return path, torch_model


@pytest.fixture(scope="module")
def minilm():
  return models.load_pretrained("minilm")


def _copy_dir(src, dst):
  shutil.copytree(src, dst)
  return dst


# ---------------------------------------------------------------- parity


def test_tiny_parity_with_pytorch_padding_and_token_types(tiny_hf):
  path, torch_model = tiny_hf
  model, params, tokenizer = models.load_pretrained(path)
  assert isinstance(model, models.BertModel) and tokenizer.is_fast
  ids, mask, types = _tiny_batch()
  ours = _apply(model, params, ids, mask, types)
  ref = _torch_forward(torch_model, ids, mask, types)
  keep = mask.astype(bool)
  np.testing.assert_allclose(
      np.asarray(ours.last_hidden_state)[keep], ref.last_hidden_state.numpy()[keep], atol=ATOL
  )
  np.testing.assert_allclose(ours.pooler_output, ref.pooler_output.numpy(), atol=ATOL)


def test_minilm_parity_with_pytorch(minilm):
  _, transformers = _torch()
  model, params, tokenizer = minilm
  assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
  batch = tokenizer(*SENTENCES, padding=True, return_tensors="np")
  assert batch["input_ids"].shape[1] <= 16 and batch["attention_mask"].min() == 0
  ours = _apply(model, params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  torch_model = transformers.BertModel.from_pretrained(str(models.minilm_dir())).eval()
  ref = _torch_forward(
      torch_model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
  )
  keep = batch["attention_mask"].astype(bool)
  np.testing.assert_allclose(
      np.asarray(ours.last_hidden_state)[keep], ref.last_hidden_state.numpy()[keep], atol=ATOL
  )
  np.testing.assert_allclose(ours.pooler_output, ref.pooler_output.numpy(), atol=ATOL)


@pytest.mark.parametrize("kind", ["base", "regression", "classification", "qa"])
def test_round_trip_flax_to_hf_to_pytorch(tiny_hf, tmp_path, caplog, kind):
  torch, transformers = _torch()
  src, _ = tiny_hf
  num_labels, head, torch_cls = {
      "base": (None, None, transformers.BertModel),
      "regression": (1, None, transformers.BertForSequenceClassification),
      "classification": (3, None, transformers.BertForSequenceClassification),
      "qa": (None, "question_answering", transformers.BertForQuestionAnswering),
  }[kind]
  with caplog.at_level(logging.WARNING, logger="nearprox.text.models.hf_checkpoints"):
    model, params, tokenizer = models.load_pretrained(
        src, num_labels, head=head, rng=jax.random.PRNGKey(1)
    )
  head_key = {"regression": "classifier", "classification": "classifier", "qa": "qa_outputs"}.get(
      kind
  )
  if head_key:  # the fresh head is reported, and initialized as documented
    assert f"{head_key}.weight" in caplog.text and f"{head_key}.bias" in caplog.text
    assert np.all(np.asarray(params[head_key]["bias"]) == 0)
    kernel = np.asarray(params[head_key]["kernel"])
    assert 0 < kernel.std() < 0.04 and np.abs(kernel).max() <= 2 * 0.02 + 1e-6
    # from `rng`: the same values a full init of the model with that key gives (to rounding:
    # the two programs may evaluate the truncated normal's polynomials differently)
    reference = models.init_params(model, jax.random.PRNGKey(1))[head_key]
    same = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-9)
    jax.tree.map(same, params[head_key], reference)
  if kind == "qa":  # QA has no pooler, so the checkpoint's pooler is reported unused
    assert "pooler.dense.weight" in caplog.text
  out_dir = models.save_pretrained(model, params, tokenizer, tmp_path / "saved")
  torch_model = torch_cls.from_pretrained(str(out_dir)).eval()
  ids, mask, types = _tiny_batch(seed=1)
  ours = _apply(model, params, ids, mask, types)
  ref = _torch_forward(torch_model, ids, mask, types)
  if kind == "base":
    np.testing.assert_allclose(ours.pooler_output, ref.pooler_output.numpy(), atol=ATOL)
  elif kind == "qa":
    np.testing.assert_allclose(ours.start_logits, ref.start_logits.numpy(), atol=ATOL)
    np.testing.assert_allclose(ours.end_logits, ref.end_logits.numpy(), atol=ATOL)
  else:
    assert ours.logits.shape == (3, num_labels)
    np.testing.assert_allclose(ours.logits, ref.logits.numpy(), atol=ATOL)
  # And back into Flax: same params exactly, nothing newly initialized.
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="nearprox.text.models.hf_checkpoints"):
    _, reloaded, _ = models.load_pretrained(out_dir, num_labels, head=head)
  assert "newly initialized" not in caplog.text
  jax.tree.map(np.testing.assert_array_equal, reloaded, params)


# ---------------------------------------------------------------- dtypes, dropout, batch


def test_bf16_forward_close_to_float32(minilm):
  model, params, tokenizer = minilm
  batch = tokenizer(*SENTENCES, padding=True, return_tensors="np")
  model16 = models.BertModel(model.config, dtype=jnp.bfloat16)
  ref = _apply(model, params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  out = _apply(
      model16, params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
  )
  assert out.last_hidden_state.dtype == jnp.bfloat16
  keep = batch["attention_mask"].astype(bool)
  hidden16 = np.asarray(out.last_hidden_state.astype(jnp.float32))[keep]
  assert np.all(np.isfinite(hidden16))
  np.testing.assert_allclose(hidden16, np.asarray(ref.last_hidden_state)[keep], atol=BF16_ATOL)
  # bf16 parameters too: storage and computation both bf16.
  model_p16 = models.BertModel(model.config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  out = _apply(model_p16, p16, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  np.testing.assert_allclose(
      np.asarray(out.pooler_output.astype(jnp.float32)), ref.pooler_output, atol=BF16_ATOL
  )


def test_dropout_only_when_not_deterministic():
  model = models.BertForSequenceClassification(models.tiny_config())
  params = models.init_params(model, jax.random.PRNGKey(0))
  ids, mask, types = _tiny_batch()
  keys = lambda seed: jax.random.split(jax.random.key(seed), len(ids))
  default = _apply(model, params, ids, mask, types).logits
  det = _apply(model, params, ids, mask, types, deterministic=True, dropout_keys=keys(5)).logits
  np.testing.assert_array_equal(default, det)
  drop = lambda seed: _apply(
      model, params, ids, mask, types, deterministic=False, dropout_keys=keys(seed)
  ).logits
  assert not np.allclose(drop(1), det, atol=1e-4)
  assert not np.allclose(drop(1), drop(2), atol=1e-4)
  np.testing.assert_array_equal(drop(1), drop(1))
  without_dropout = models.BertForSequenceClassification(
      models.tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  )
  np.testing.assert_allclose(
      _apply(
          without_dropout, params, ids, mask, types, deterministic=False, dropout_keys=keys(1)
      ).logits,
      det,
      atol=1e-6,
  )
  with pytest.raises(ValueError, match="dropout_keys"):
    _apply(model, params, ids, mask, types, deterministic=False)
  with pytest.raises(ValueError, match="one key per example"):
    _apply(model, params, ids, mask, types, deterministic=False, dropout_keys=keys(1)[:2])


def test_examples_are_independent_and_padding_is_ignored():
  model = models.BertModel(models.tiny_config())
  params = models.init_params(model, jax.random.PRNGKey(0))
  ids, mask, types = _tiny_batch()
  full = _apply(model, params, ids, mask, types)
  other = ids.copy()
  other[1:] = (other[1:] + 7) % 100  # change the other examples only
  changed = _apply(model, params, other, mask, types)
  np.testing.assert_allclose(changed.last_hidden_state[0], full.last_hidden_state[0], atol=1e-6)
  alone = _apply(model, params, ids[2:], mask[2:], types[2:])
  np.testing.assert_allclose(alone.pooler_output[0], full.pooler_output[2], atol=1e-5)
  padded = ids.copy()
  padded[2, 4:] = 42  # different ids under the padding mask change nothing
  np.testing.assert_allclose(
      _apply(model, params, padded, mask, types).pooler_output, full.pooler_output, atol=1e-6
  )


def test_word_embeddings_delta_is_added_to_the_word_lookup():
  model = models.BertForSequenceClassification(models.tiny_config())
  params = models.init_params(model, jax.random.PRNGKey(0))
  ids, mask, types = _tiny_batch()
  table = params["bert"]["embeddings"]["word_embeddings"]["embedding"]
  swapped = ids.copy()
  swapped[0, 1] = 9
  delta = np.zeros(ids.shape + (32,), np.float32)
  delta[0, 1] = table[9] - table[ids[0, 1]]  # moving token 1 of example 0 onto word 9
  with_delta = _apply(
      model, params, ids, mask, types, word_embeddings_delta=jnp.asarray(delta)
  ).logits
  np.testing.assert_allclose(
      with_delta, _apply(model, params, swapped, mask, types).logits, atol=1e-5
  )
  np.testing.assert_allclose(
      with_delta[1:], _apply(model, params, ids, mask, types).logits[1:], atol=1e-6
  )
  with pytest.raises(ValueError, match="word_embeddings_delta"):
    _apply(model, params, ids, word_embeddings_delta=jnp.zeros(ids.shape + (8,)))


def test_params_only_in_standard_layers_called_per_example():
  """Every param belongs to an nn.Dense/nn.Embed/nn.LayerNorm that is called with the
  batch axis first (what the factored per-example-gradient path intercepts)."""
  ids, mask, types = _tiny_batch()
  for model in (
      models.BertForQuestionAnswering(models.tiny_config()),
      models.BertForSequenceClassification(models.tiny_config()),
  ):
    _check_layers_called_per_example(model, ids, mask, types)


def _check_layers_called_per_example(model, ids, mask, types):
  params = models.init_params(model, jax.random.PRNGKey(0))
  called = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(
        module, (nn.Dense, nn.DenseGeneral, nn.Embed, nn.LayerNorm)
    ):
      called[module.path] = (type(module), args[0].shape)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    _apply(model, params, ids, mask, types)
  param_modules = {path[:-1] for path in traverse_util.flatten_dict(params)}
  assert param_modules == set(called)
  assert all(shape[0] == ids.shape[0] for _, shape in called.values())
  assert {cls for cls, _ in called.values()} == {nn.Dense, nn.Embed, nn.LayerNorm}
  assert ("bert", "encoder", "layer_1", "attention", "self", "query") in called


def test_config_round_trip_and_validation(tmp_path):
  config = models.tiny_config(num_labels=5, hidden_act="gelu_new")
  assert config.vocab_size == 100 and config.max_position_embeddings == 32
  (tmp_path / "config.json").write_text(json.dumps({**config.to_dict(), "extra": 1}))
  assert models.BertConfig.from_json_file(tmp_path / "config.json") == config
  assert models.BertConfig.from_dict({"id2label": {"0": "a", "1": "b", "2": "c"}}).num_labels == 3
  with pytest.raises(ValueError, match="num_attention_heads"):
    models.tiny_config(num_attention_heads=5)
  with pytest.raises(ValueError, match="hidden_act"):
    models.tiny_config(hidden_act="mish")
  with pytest.raises(ValueError, match="position_embedding_type"):
    models.tiny_config(position_embedding_type="relative_key")


# ---------------------------------------------------------------- bad inputs


def test_sequence_longer_than_max_positions_fails_at_trace_time():
  model = models.BertModel(models.tiny_config())
  params = models.init_params(model, jax.random.PRNGKey(0))
  forward = jax.jit(lambda p, ids: model.apply({"params": p}, ids))
  forward(params, jnp.zeros((1, 32), jnp.int32))  # exactly max_position_embeddings is fine
  with pytest.raises(ValueError, match="max_position_embeddings=32"):
    forward(params, jnp.zeros((1, 33), jnp.int32))
  with pytest.raises(ValueError, match="attention_mask"):
    model.apply(
        {"params": params}, jnp.zeros((2, 8), jnp.int32), attention_mask=jnp.ones((2, 7), jnp.int32)
    )
  with pytest.raises(ValueError, match="input_ids"):
    model.apply({"params": params}, jnp.zeros((2, 8), jnp.float32))


def test_non_bert_or_incomplete_directories_are_rejected(tiny_hf, tmp_path):
  src, _ = tiny_hf
  with pytest.raises(FileNotFoundError, match="config.json"):
    models.load_pretrained(tmp_path)
  other = _copy_dir(src, tmp_path / "roberta")
  config = json.loads((other / "config.json").read_text())
  (other / "config.json").write_text(json.dumps({**config, "model_type": "roberta"}))
  with pytest.raises(ValueError, match="model_type='roberta'"):
    models.load_pretrained(other)
  no_weights = _copy_dir(src, tmp_path / "no_weights")
  (no_weights / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="no weights"):
    models.load_pretrained(no_weights)
  no_tokenizer = _copy_dir(src, tmp_path / "no_tokenizer")
  (no_tokenizer / "tokenizer.json").unlink()
  with pytest.raises(FileNotFoundError, match="no tokenizer"):
    models.load_pretrained(no_tokenizer)
  with pytest.raises(FileNotFoundError, match="Hugging Face cache"):
    models.load_pretrained("nearprox-test/not-cached", cache_dir=tmp_path / "cache")
  with pytest.raises(ValueError, match="num_labels"):
    models.load_pretrained(src, num_labels=0)


@pytest.mark.parametrize(
    "content", [b'{"model_type": "bert",', b"[1, 2]", b"\xff\xfe not utf-8", b""]
)
def test_corrupt_json_files_name_their_path(tmp_path, content):
  config_file = tmp_path / "config.json"
  config_file.write_bytes(content)
  for load in (models.load_pretrained, models.load_config):
    with pytest.raises(ValueError, match=re.escape(str(config_file))):
      load(tmp_path)
  with pytest.raises(ValueError, match=re.escape(str(config_file))):
    models.BertConfig.from_json_file(config_file)
  index = tmp_path / "model.safetensors.index.json"
  index.write_bytes(content)
  with pytest.raises(ValueError, match=re.escape(str(index))):
    models.read_state_dict(tmp_path)
  index.write_text(json.dumps({"metadata": {}}))
  with pytest.raises(ValueError, match="weight_map"):
    models.read_state_dict(tmp_path)


def test_missing_mismatched_and_unexpected_weights_are_reported(tiny_hf, tmp_path, caplog):
  from safetensors.numpy import load_file, save_file

  src, _ = tiny_hf
  weights = load_file(src / "model.safetensors")

  def variant(name, state, config_update=None):
    path = _copy_dir(src, tmp_path / name)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    if config_update:
      config = json.loads((path / "config.json").read_text())
      (path / "config.json").write_text(json.dumps({**config, **config_update}))
    return path

  missing = {k: v for k, v in weights.items() if "layer.1.attention.self.key" not in k}
  with pytest.raises(ValueError, match=r"missing: encoder\.layer\.1\.attention\.self\.key\.weight"):
    models.load_pretrained(variant("missing", missing))
  with pytest.raises(ValueError, match=r"shape mismatch: encoder\.layer\.0\.intermediate"):
    models.load_pretrained(variant("mismatched", weights, {"intermediate_size": 48}))
  extra = {**weights, "cls.predictions.bias": np.zeros(100, np.float32)}
  no_pooler = {k: v for k, v in extra.items() if not k.startswith("pooler")}
  with caplog.at_level(logging.WARNING, logger="nearprox.text.models.hf_checkpoints"):
    _, params, _ = models.load_pretrained(variant("extra", no_pooler))
  assert "not used: cls.predictions.bias" in caplog.text
  assert "newly initialized" in caplog.text and "pooler.dense.weight" in caplog.text
  assert params["pooler"]["dense"]["kernel"].shape == (32, 32)


def test_pytorch_bin_loaded_with_weights_only(tiny_hf, tmp_path, monkeypatch):
  torch, _ = _torch()
  src, torch_model = tiny_hf
  path = _copy_dir(src, tmp_path / "bin")
  (path / "model.safetensors").unlink()
  torch.save(torch_model.state_dict(), path / "pytorch_model.bin")
  calls = []
  real_load = torch.load
  monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
  model, params, _ = models.load_pretrained(path)
  assert calls and all(kw.get("weights_only") is True for kw in calls)
  ids, mask, types = _tiny_batch()
  np.testing.assert_allclose(
      _apply(model, params, ids, mask, types).pooler_output,
      _torch_forward(torch_model, ids, mask, types).pooler_output,
      atol=ATOL,
  )
  # A pickle that would run code on load is refused, and the code never runs.
  marker = tmp_path / "pwned"
  (path / "pytorch_model.bin").unlink()
  torch.save({"x": _RunsCodeOnLoad(str(marker))}, path / "pytorch_model.bin")
  with pytest.raises(ValueError, match="refusing to unpickle"):
    models.load_pretrained(path)
  assert not marker.exists()


class _RunsCodeOnLoad:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def test_hub_name_resolved_from_local_cache(tiny_hf, tmp_path):
  src, _ = tiny_hf
  repo = tmp_path / "cache" / "models--nearprox-test--tiny-bert"
  _copy_dir(src, repo / "snapshots" / "0123abcd")
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text("0123abcd")
  model, params, _ = models.load_pretrained("nearprox-test/tiny-bert", cache_dir=tmp_path / "cache")
  _, reference, _ = models.load_pretrained(src)
  jax.tree.map(np.testing.assert_array_equal, params, reference)


def test_safetensors_loading_never_needs_torch(tiny_hf):
  src, _ = tiny_hf
  script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now fails
        import jax.numpy as jnp
        from nearprox.text import models
        model, params, tok = models.load_pretrained({str(src)!r}, num_labels=2)
        ids = jnp.asarray(tok(["the movie was great !"], return_tensors="np")["input_ids"])
        assert model.apply({{"params": params}}, ids).logits.shape == (1, 2)
        print("ok")
    """)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
      [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
  )
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_transformers_note_about_missing_pytorch_is_silenced():
  """The library needs no torch, so transformers' import-time advice is dropped (only it)."""
  models.load_tokenizer(models.minilm_dir())
  logger = logging.getLogger("transformers")

  def record(message):
    return logging.LogRecord("transformers", logging.WARNING, __file__, 1, message, None, None)

  assert not logger.filter(record("PyTorch was not found. Models won't be available."))
  assert logger.filter(record("Some other transformers warning"))


def test_question_answering_head_has_two_outputs_whatever_the_source_labels(tiny_hf, tmp_path):
  """A source checkpoint with 3 labels: the QA model and its export still say 2 (start, end)."""
  path = _copy_dir(tiny_hf[0], tmp_path / "three_labels")
  config = json.loads((path / "config.json").read_text())
  config["id2label"] = {str(i): f"L{i}" for i in range(3)}
  config["label2id"] = {f"L{i}": i for i in range(3)}
  (path / "config.json").write_text(json.dumps(config))
  model, params, tokenizer = models.load_pretrained(path, head="question_answering")
  assert model.config.num_labels == 2
  exported = models.save_pretrained(model, params, tokenizer, tmp_path / "export")
  assert len(json.loads((exported / "config.json").read_text())["id2label"]) == 2
