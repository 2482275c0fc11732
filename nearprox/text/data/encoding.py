"""Tokenization of a :class:`~nearprox.text.data.Split` into fixed-shape arrays, cached on disk.

``encode(split, tokenizer, max_length)`` calls the model's Hugging Face tokenizer once
over the whole split, padded and truncated to exactly ``max_length`` tokens (static shapes
for ``jit``; pairs are truncated longest-first), and stores the int32 arrays in an
``.npz`` file whose name is a SHA-256 of everything the arrays depend on:

* the tokenizer: its full ``tokenizers`` pipeline (vocabulary, normalizer,
  pre-tokenizer, post-processor, special tokens; the per-call padding/truncation state is
  left out), its class, padding/truncation sides, and the ``transformers``/``tokenizers``
  versions;
* ``max_length``;
* every text of ``text_a`` and ``text_b`` (length-prefixed, so no two different lists of
  texts hash alike);
* a cache format number.

Change any of them and the key changes, so a stale file is never read. Labels are not
cached (they come from the split). Files are written to a temporary name and renamed, so
concurrent processes (e.g. every host of a pod) never see a partial file; an unreadable
file is recomputed and replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from nearprox.text.data.tasks import Split

CACHE_DIR_ENV = "NEARPROX_CACHE_DIR"
_CACHE_FORMAT = 1
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclasses.dataclass(frozen=True)
class Encoded:
  """A tokenized split: int32 arrays, rows aligned with the split's examples.

  Attributes:
    input_ids: [N, T] token ids, padded with the tokenizer's pad id.
    attention_mask: [N, T] 1 for real tokens, 0 for padding.
    token_type_ids: [N, T] segment ids (0 first sentence, 1 second; zeros if the tokenizer
      has none).
    labels: [N] class indices.
  """

  input_ids: np.ndarray
  attention_mask: np.ndarray
  token_type_ids: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  @property
  def max_length(self) -> int:
    return int(self.input_ids.shape[1])

  def arrays(self) -> dict[str, np.ndarray]:
    """The four arrays by name (the keys of :func:`nearprox.text.data.batches`' batches)."""
    return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


def default_cache_dir() -> Path:
  """``$NEARPROX_CACHE_DIR``, else ``~/.cache/nearprox``; tokenized files go in ``tokenized/``."""
  return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "nearprox")


def tokenizer_fingerprint(tokenizer: Any) -> str:
  """SHA-256 hex of everything about ``tokenizer`` that decides its token ids."""
  description: dict[str, Any] = {
      "class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
      "padding_side": getattr(tokenizer, "padding_side", None),
      "truncation_side": getattr(tokenizer, "truncation_side", None),
      "versions": _library_versions(),
  }
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:  # a fast tokenizer: its whole pipeline is one JSON document
    state = json.loads(backend.to_str())
    # The last call's padding/truncation settings are stored in the pipeline; they are
    # arguments of each call, not properties of the tokenizer.
    state.pop("padding", None)
    state.pop("truncation", None)
    description["pipeline"] = state
  elif hasattr(tokenizer, "get_vocab"):  # a slow (Python) tokenizer
    description["vocab"] = sorted(tokenizer.get_vocab().items())
    description["special_tokens"] = repr(getattr(tokenizer, "special_tokens_map", None))
    description["init_kwargs"] = repr(
        sorted((k, repr(v)) for k, v in getattr(tokenizer, "init_kwargs", {}).items())
    )
  else:
    raise ValueError(
        f"tokenizer: cannot fingerprint a {type(tokenizer).__name__} (no "
        f"backend_tokenizer or get_vocab); pass use_cache=False"
    )
  blob = json.dumps(description, sort_keys=True, default=repr).encode("utf-8")
  return hashlib.sha256(blob).hexdigest()


def _library_versions() -> dict[str, str]:
  versions = {}
  for name in ("transformers", "tokenizers"):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = "absent"
  return versions


def cache_key(split: Split, tokenizer: Any, max_length: int) -> str:
  """The SHA-256 hex naming ``split``'s cache file for this tokenizer and length."""
  digest = hashlib.sha256()
  header = {
      "format": _CACHE_FORMAT,
      "tokenizer": tokenizer_fingerprint(tokenizer),
      "max_length": int(max_length),
      "num_examples": len(split),
      "pair": split.text_b is not None,
  }
  digest.update(json.dumps(header, sort_keys=True).encode("utf-8"))
  for texts in (split.text_a, split.text_b or ()):
    digest.update(b"\x00texts")
    for text in texts:
      data = text.encode("utf-8", "surrogatepass")
      digest.update(len(data).to_bytes(8, "little"))
      digest.update(data)
  return digest.hexdigest()


def encode(
    split: Split,
    tokenizer: Any,
    max_length: int,
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    chunk_size: int = 8192,
) -> Encoded:
  """Tokenizes ``split`` to ``[N, max_length]`` int32 arrays (cached; see module docstring).

  Args:
    split: the examples.
    tokenizer: a Hugging Face tokenizer, called as
      ``tokenizer(text_a, text_b, padding="max_length", max_length=max_length,
      truncation=True, return_tensors="np")``.
    max_length: sequence length T (every row has exactly T tokens).
    cache_dir: cache root (files go in ``<cache_dir>/tokenized/``); default
      :func:`default_cache_dir`.
    use_cache: False to tokenize without reading or writing the cache.
    chunk_size: examples per tokenizer call (bounds the int64 intermediate arrays).
  """
  if not isinstance(max_length, (int, np.integer)) or max_length < 2:
    raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  path = None
  if use_cache:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / "tokenized" / f"{cache_key(split, tokenizer, max_length)}.npz"
    arrays = _load(path, len(split), int(max_length))
    if arrays is not None:
      return Encoded(**arrays, labels=split.labels)
  arrays = _tokenize(split, tokenizer, int(max_length), chunk_size)
  if path is not None:
    write_cached_arrays(path, arrays)
  return Encoded(**arrays, labels=split.labels)


def _tokenize(split: Split, tokenizer, max_length: int, chunk_size: int):
  n = len(split)
  out = {key: np.zeros((n, max_length), np.int32) for key in TOKEN_KEYS}
  for start in range(0, n, chunk_size):
    stop = min(start + chunk_size, n)
    args = [split.text_a[start:stop]]
    if split.text_b is not None:
      args.append(split.text_b[start:stop])
    tokens = tokenizer(
        *args, padding="max_length", max_length=max_length, truncation=True, return_tensors="np"
    )
    for key in TOKEN_KEYS:
      if key not in tokens:
        if key == "token_type_ids":  # tokenizers without segments (e.g. RoBERTa's)
          continue
        raise ValueError(f"tokenizer output has no {key!r}; keys: {sorted(tokens.keys())}")
      values = np.asarray(tokens[key])
      if values.shape != (stop - start, max_length):
        raise ValueError(
            f"tokenizer returned {key} of shape {values.shape}, expected "
            f"{(stop - start, max_length)}; it must pad to max_length"
        )
      out[key][start:stop] = values
  return out


def read_cached_arrays(path: Path, keys) -> dict[str, np.ndarray] | None:
  """The arrays ``keys`` of a cache file, or None if it is absent or unreadable."""
  if not path.is_file():
    return None
  try:
    with np.load(path, allow_pickle=False) as stored:
      return {key: stored[key] for key in keys}
  except (OSError, KeyError, ValueError, EOFError):
    return None


def _load(path: Path, num_examples: int, max_length: int):
  """The cached arrays, or None if absent or unusable (then recomputed and rewritten)."""
  arrays = read_cached_arrays(path, TOKEN_KEYS)
  if arrays is None:
    return None
  for values in arrays.values():
    if values.shape != (num_examples, max_length) or values.dtype != np.int32:
      return None
  return arrays


def write_cached_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
  """Writes a cache file through a temporary file and a rename, so readers never see a
  partial one; a failed write warns and leaves no file (the caller goes on without it)."""
  temporary = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=path.stem, suffix=".tmp", delete=False
    ) as file:
      temporary = Path(file.name)
      np.savez_compressed(file, **arrays)
    os.replace(temporary, path)  # atomic: readers see the old file or the whole new one
  except OSError as error:
    warnings.warn(
        f"could not write tokenization cache {path}: {error}; continuing without it",
        RuntimeWarning,
        stacklevel=3,
    )
    if temporary is not None:
      temporary.unlink(missing_ok=True)
