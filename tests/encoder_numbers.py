"""How many numbers a BERT classifier's factored gradients hold (docs/method.md §2.8)."""


def encoder_gathered_numbers(
    num_layers: int,
    hidden: int,
    ffn: int,
    length: int,
    num_labels: int,
    sketch_features: int | None = None,
) -> int:
  """Numbers per example that ``gram="global"`` gathers for a BERT sequence classifier: the
  formula of docs/method.md §2.8. ``sketch_features``: with ``sketch_dim``, the k₁·k₂
  features of each attention and FFN kernel, gathered instead of those kernels' factors when
  all of them are sketched (docs/method.md §2.9)."""
  h, f, t = hidden, ffn, length
  kernels = t * (4 * 2 * h + 2 * (h + f)) if sketch_features is None else 6 * sketch_features
  return (
      num_layers * kernels
      + t * 3 * (h + 1)
      + num_layers * (5 * h + f + 4 * h)
      + 3 * h
      + (h + 2 * num_labels)
      + 2 * h
  )
