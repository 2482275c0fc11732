"""The train config's optimizers: hyperparameters are inputs of the compiled step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import default
from nearprox.training import optimizers


def optimizer_config(name: str, learning_rate: float, damping: float):
  config = default.get_config()
  config.optimizer.name = name
  config.optimizer.learning_rate = learning_rate
  config.optimizer.damping = damping
  return config


PARAMS = {"dense": {"kernel": jnp.ones((5, 3)), "bias": jnp.zeros(3)}}
BATCH = 4


def compiled_update(name: str, learning_rate: float, damping: float):
  """(HLO text of the jitted update, the update it computes after 3 steps)."""
  tx, per_example = optimizers.create_optimizer(
      optimizer_config(name, learning_rate, damping), num_steps=20, axis_name=None
  )
  leading = (BATCH,) if per_example else ()
  grads = jax.tree.map(
      lambda x: jax.random.normal(jax.random.key(x.size), leading + x.shape), PARAMS
  )
  update = jax.jit(tx.update)
  state = tx.init(PARAMS)
  for _ in range(3):
    updates, state = update(grads, state, PARAMS)
  return update.lower(grads, state, PARAMS).as_text(), updates


@pytest.mark.parametrize("name", optimizers.OPTIMIZERS)
def test_trials_of_a_grid_share_one_compiled_step(name):
  # A tuning grid varies the peak learning rate and the damping: were they constants of the
  # program, every trial would compile its own train step (minutes on a GPU).
  text, updates = compiled_update(name, 1e-3, 0.1)
  other_text, other_updates = compiled_update(name, 3e-2, 1.0)
  assert text == other_text
  # ...and they still take effect.
  assert not np.allclose(jax.tree.leaves(updates)[0], jax.tree.leaves(other_updates)[0])


def test_warmup_linear_decay():
  schedule = optimizers.warmup_linear_decay(0.5, warmup_steps=2, num_steps=6)
  np.testing.assert_allclose(
      [schedule(t) for t in range(7)], [0.0, 0.25, 0.5, 0.375, 0.25, 0.125, 0.0]
  )


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_baselines_are_optax_sgd_and_adamw(name):
  config = optimizer_config(name, 3e-2, 0.1)
  opt = config.optimizer
  schedule = optimizers.warmup_linear_decay(opt.learning_rate, 2, 20)
  if name == "sgd":
    reference = optax.sgd(schedule, momentum=opt.momentum, nesterov=opt.nesterov)
  else:
    reference = optax.adamw(schedule, weight_decay=opt.weight_decay, mask=optimizers.kernel_mask)
  reference = optax.chain(optimizers.l2_regularization(config.objective.l2_weight), reference)
  tx, _ = optimizers.create_optimizer(config, num_steps=20, axis_name=None)
  assert round(opt.warmup_fraction * 20) == 2
  states = tx.init(PARAMS), reference.init(PARAMS)
  for step in range(5):
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(step), x.shape), PARAMS)
    got, state = tx.update(grads, states[0], PARAMS)
    want, reference_state = reference.update(grads, states[1], PARAMS)
    states = state, reference_state
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("learning_rate", [-1.0, 0.0, float("nan"), float("inf")])
def test_bad_learning_rates_are_rejected(learning_rate):
  config = default.get_config()
  config.optimizer.learning_rate = learning_rate
  with pytest.raises(ValueError, match="config.optimizer.learning_rate"):
    optimizers.create_optimizer(config, num_steps=20, axis_name=None)
