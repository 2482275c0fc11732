"""``BertConfig``: BERT's hyper-parameters under the field names of ``transformers.BertConfig``
(read from and written to an HF ``config.json``), the activations they name, and a tiny
config for tests."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

# Hugging Face activation names -> functions. "gelu" is the exact (erf) GELU, as in HF.
ACTIVATIONS: Mapping[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """BERT hyper-parameters, with the field names of ``transformers.BertConfig``.

  ``num_labels`` is used only by the heads (``BertForSequenceClassification``: logits
  ``[B, num_labels]``; ``num_labels=1`` is regression, as in HF).
  """

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  position_embedding_type: str = "absolute"
  classifier_dropout: float | None = None
  num_labels: int = 2

  def __post_init__(self):
    for name in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "type_vocab_size",
        "num_labels",
    ):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"BertConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"BertConfig.hidden_size ({self.hidden_size}) must be a multiple of "
          f"num_attention_heads ({self.num_attention_heads})"
      )
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(
          f"BertConfig.hidden_act={self.hidden_act!r} is not supported; "
          f"choose one of {sorted(ACTIVATIONS)}"
      )
    if self.position_embedding_type != "absolute":
      raise ValueError(
          "BertConfig.position_embedding_type must be 'absolute', got "
          f"{self.position_embedding_type!r} (relative positions are not "
          "implemented)"
      )

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> BertConfig:
    """Builds a config from an HF ``config.json`` dict; unknown keys are ignored.

    ``num_labels`` falls back to ``len(id2label)`` and then to 2, as in HF.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in config.items() if k in fields}
    if "num_labels" not in kwargs and config.get("id2label"):
      kwargs["num_labels"] = len(config["id2label"])
    return cls(**kwargs)

  @classmethod
  def from_json_file(cls, path) -> BertConfig:
    return cls.from_dict(read_json_object(path))

  def to_dict(self) -> dict[str, Any]:
    """The HF ``config.json`` fields (``model_type="bert"`` included)."""
    return {"model_type": "bert", **dataclasses.asdict(self)}


def read_json_object(path) -> dict[str, Any]:
  """The JSON object in the file ``path``; ValueError naming the file when it holds none."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f"{path} is not valid JSON: {error}") from error
  if not isinstance(value, dict):
    raise ValueError(f"{path} must hold a JSON object, got a {type(value).__name__}")
  return value


def tiny_config(**overrides) -> BertConfig:
  """A small BertConfig for tests: vocab 100, hidden 32, 2 layers, 4 heads, max length 32."""
  base = BertConfig(
      vocab_size=100,
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=64,
      max_position_embeddings=32,
  )
  return dataclasses.replace(base, **overrides)
