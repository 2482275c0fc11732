"""The L1 prox (nearprox.soft_threshold_l1) against NumPy's ISTA, and in the training chains."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nearprox
from experiments.configs import default
from nearprox import l1_prox
from nearprox.training import optimizers


def soft_threshold_np(x, tau):
  return np.sign(x) * np.maximum(np.abs(x) - tau, 0.0)


def ista_step_np(theta, grad, eta, l1_weight):
  """θ⁺ = S_{ηλ₁}(θ − η∇L) (Beck & Teboulle 2009, ISTA)."""
  return soft_threshold_np(theta - eta * grad, eta * l1_weight)


PARAMS = {
    "dense": {"kernel": jnp.linspace(-0.3, 0.3, 12).reshape(4, 3), "bias": jnp.full(3, 0.01)},
    "embedding": jnp.linspace(-0.02, 0.05, 6),
}


def random_tree(seed, tree=PARAMS, scale=0.1, leading=()):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten(
      [scale * jax.random.normal(k, leading + x.shape) for k, x in zip(keys, leaves)]
  )


def applied(tx, grads_per_step, params=PARAMS, jit=False):
  """params after one tx update per entry of ``grads_per_step``, and the final state."""
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params)
  for grads in grads_per_step:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_soft_threshold_is_numpy_soft_thresholding():
  x = np.linspace(-2.0, 2.0, 41, dtype=np.float32)
  for tau in (0.0, 0.3, 5.0):
    np.testing.assert_array_equal(
        l1_prox.soft_threshold(jnp.asarray(x), tau), soft_threshold_np(x, tau)
    )


@pytest.mark.parametrize("jit", [False, True])
def test_after_sgd_it_is_a_numpy_ista_step_with_exact_zeros(jit):
  eta, l1_weight = 0.1, 0.8
  grads = random_tree(0, scale=0.5)
  tx = optax.chain(optax.sgd(eta), nearprox.soft_threshold_l1(eta, l1_weight))
  got, _ = applied(tx, [grads], jit=jit)
  for p, g, q in zip(jax.tree.leaves(PARAMS), jax.tree.leaves(grads), jax.tree.leaves(got)):
    want = ista_step_np(np.asarray(p), np.asarray(g), eta, l1_weight)
    np.testing.assert_allclose(q, want, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(q) == 0, want == 0)  # the zeros are exact
  assert sum(int(jnp.sum(q == 0)) for q in jax.tree.leaves(got)) > 0


@pytest.mark.parametrize("mask_kind", ["pytree", "callable"])
def test_mask_thresholds_only_the_selected_leaves(mask_kind):
  eta, l1_weight = 0.1, 2.0
  grads = random_tree(1)
  mask = optimizers.kernel_mask if mask_kind == "callable" else optimizers.kernel_mask(PARAMS)
  tx = optax.chain(optax.sgd(eta), nearprox.soft_threshold_l1(eta, l1_weight, mask))
  got, _ = applied(tx, [grads])
  plain, _ = applied(optax.sgd(eta), [grads])
  kernel = ista_step_np(np.asarray(PARAMS["dense"]["kernel"]), grads["dense"]["kernel"], eta, 2.0)
  np.testing.assert_allclose(got["dense"]["kernel"], kernel, atol=1e-7)
  np.testing.assert_array_equal(got["dense"]["bias"], plain["dense"]["bias"])
  np.testing.assert_array_equal(got["embedding"], plain["embedding"])


def test_schedule_thresholds_at_each_steps_learning_rate():
  schedule = optax.linear_schedule(0.2, 0.05, 3)
  l1_weight = 0.5
  steps = [random_tree(seed) for seed in range(4)]
  tx = optax.chain(optax.sgd(schedule), nearprox.soft_threshold_l1(schedule, l1_weight))
  got, state = applied(tx, steps, jit=True)
  want = jax.tree.map(np.asarray, PARAMS)
  for t, grads in enumerate(steps):
    eta = float(schedule(t))
    want = jax.tree.map(lambda p, g: ista_step_np(p, np.asarray(g), eta, l1_weight), want, grads)
  for q, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(q, w, atol=1e-6)
  assert int(state[1].count) == len(steps)  # its own count, in step with sgd's schedule


def test_after_adamw_it_thresholds_adamws_point():
  schedule = optax.linear_schedule(1e-2, 1e-3, 5)
  l1_weight = 1.0
  adamw = optax.adamw(schedule, weight_decay=0.01, mask=optimizers.kernel_mask)
  tx = optax.chain(adamw, nearprox.soft_threshold_l1(schedule, l1_weight, optimizers.kernel_mask))
  states = tx.init(PARAMS), adamw.init(PARAMS)
  params = PARAMS
  for t in range(3):
    grads = random_tree(10 + t)
    updates, state = tx.update(grads, states[0], params)
    plain_updates, plain_state = adamw.update(grads, states[1], params)
    states = state, plain_state
    new_params = optax.apply_updates(params, updates)
    plain_point = optax.apply_updates(params, plain_updates)
    tau = float(schedule(t)) * l1_weight
    kernel = soft_threshold_np(np.asarray(plain_point["dense"]["kernel"]), tau)
    np.testing.assert_allclose(new_params["dense"]["kernel"], kernel, atol=1e-7)
    np.testing.assert_array_equal(new_params["dense"]["bias"], plain_point["dense"]["bias"])
    params = new_params
  assert int(jnp.sum(params["dense"]["kernel"] == 0)) > 0


@pytest.mark.parametrize("chain_kind", ["proximal_sgd", "scale_by_proximal"])
def test_after_the_proximal_filter_it_thresholds_the_filtered_step(chain_kind):
  eta, l1_weight, damping = 0.05, 1.0, 0.1
  if chain_kind == "proximal_sgd":
    inner = nearprox.proximal_sgd(eta, damping)
  else:
    inner = optax.chain(nearprox.scale_by_proximal(damping), optax.sgd(eta, momentum=0.9))
  tx = optax.chain(inner, nearprox.soft_threshold_l1(eta, l1_weight, optimizers.kernel_mask))
  per_example = random_tree(20, leading=(4,))
  mask = jnp.array([1.0, 1.0, 1.0, 0.0])
  updates, state = tx.update(per_example, tx.init(PARAMS), PARAMS, mask=mask)
  plain, _ = inner.update(per_example, inner.init(PARAMS), PARAMS, mask=mask)
  point = optax.apply_updates(PARAMS, plain)
  got = optax.apply_updates(PARAMS, updates)
  kernel = soft_threshold_np(np.asarray(point["dense"]["kernel"]), eta * l1_weight)
  np.testing.assert_allclose(got["dense"]["kernel"], kernel, atol=1e-6)
  np.testing.assert_array_equal(got["embedding"], point["embedding"])
  assert optax.tree_utils.tree_get(state, "ScaleByProximalState") is not None


def test_ista_solves_a_diagonal_lasso_and_the_subgradient_never_reaches_zero():
  # min_θ Σ_i ½ a_i (θ_i − b_i)² + λ‖θ‖₁ has the closed form θ*_i = S_{λ/a_i}(b_i).
  a = np.array([1.0, 2.0, 0.5, 4.0, 1.5, 3.0], np.float32)
  b = np.array([0.9, -0.1, 0.2, -1.2, 0.05, 0.4], np.float32)
  l1_weight, eta = 0.3, 0.2  # η < 1/max a: ISTA converges
  solution = soft_threshold_np(b, l1_weight / a)
  assert 0 < np.sum(solution == 0) < len(b)
  grad_fn = jax.grad(lambda theta: jnp.sum(0.5 * a * (theta - b) ** 2))
  penalized_grad_fn = jax.grad(
      lambda t: jnp.sum(0.5 * a * (t - b) ** 2) + l1_weight * jnp.sum(jnp.abs(t))
  )

  def run(tx, grad_fn, steps=400):
    def step(_, carry):
      theta, state = carry
      updates, state = tx.update(grad_fn(theta), state, theta)
      return optax.apply_updates(theta, updates), state

    theta = jnp.ones_like(b)
    return np.asarray(jax.lax.fori_loop(0, steps, step, (theta, tx.init(theta)))[0])

  ista = run(optax.chain(optax.sgd(eta), nearprox.soft_threshold_l1(eta, l1_weight)), grad_fn)
  np.testing.assert_allclose(ista, solution, atol=1e-6)
  np.testing.assert_array_equal(ista == 0, solution == 0)
  subgradient = run(optax.sgd(eta), penalized_grad_fn)
  assert not np.any(subgradient == 0)  # it hovers around 0 where the solution is 0
  np.testing.assert_allclose(subgradient, solution, atol=eta * l1_weight / np.min(a) * 1.01)


@pytest.mark.parametrize(
    "learning_rate,l1_weight,match",
    [(0.1, -1.0, "l1_weight"), (0.1, float("nan"), "l1_weight"), (-0.1, 1.0, "learning_rate")],
)
def test_bad_arguments_are_clear_errors(learning_rate, l1_weight, match):
  with pytest.raises(ValueError, match=match):
    nearprox.soft_threshold_l1(learning_rate, l1_weight)


def test_update_without_params_is_a_clear_error():
  tx = nearprox.soft_threshold_l1(0.1, 0.1)
  with pytest.raises(ValueError, match="params"):
    tx.update(PARAMS, tx.init(PARAMS))


def test_zero_fractions_per_layer_and_overall():
  params = {
      "bert": {
          "encoder": {
              "layer_0": {"dense": {"kernel": jnp.array([[0.0, 1.0], [0.0, 0.0]])}},
              "layer_1": {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}},
          },
          "pooler": {"dense": {"kernel": jnp.array([0.0, 2.0])}},
      },
      "classifier": {"kernel": jnp.zeros((2, 1))},
  }
  got = {k: float(v) for k, v in optimizers.kernel_zero_fractions(params).items()}
  assert got == {
      "bert/encoder/layer_0": 0.75,
      "bert/encoder/layer_1": 0.0,
      "bert/pooler/dense": 0.5,
      "classifier": 1.0,
      "all": 6 / 12,
  }


# ------------------------------------------------------------------------------ training


def l1_config(name: str, l1_weight: float, learning_rate: float = 0.05):
  config = default.get_config()
  config.optimizer.name = name
  config.optimizer.learning_rate = learning_rate
  config.optimizer.l1_weight = l1_weight
  return config


TRAINABLE = [n for n in optimizers.OPTIMIZERS if n != "schedule_free_adamw"]


@pytest.mark.parametrize("name", TRAINABLE)
def test_every_optimizer_ends_with_the_prox_on_kernels(name):
  num_steps, l1_weight = 10, 3.0
  with_l1, per_example = optimizers.create_optimizer(l1_config(name, l1_weight), num_steps, None)
  without, _ = optimizers.create_optimizer(l1_config(name, 0.0), num_steps, None)
  grads = random_tree(30, leading=(4,) if per_example else ())
  schedule = optimizers.warmup_linear_decay(0.05, 1, num_steps)
  states = with_l1.init(PARAMS), without.init(PARAMS)
  params = PARAMS
  for t in range(2):
    updates, state = jax.jit(with_l1.update)(grads, states[0], params)
    plain, plain_state = without.update(grads, states[1], params)
    states = state, plain_state
    point = optax.apply_updates(params, plain)
    new = optax.apply_updates(params, updates)
    kernel = soft_threshold_np(np.asarray(point["dense"]["kernel"]), float(schedule(t)) * l1_weight)
    np.testing.assert_allclose(new["dense"]["kernel"], kernel, atol=1e-6)
    np.testing.assert_allclose(new["dense"]["bias"], point["dense"]["bias"], atol=1e-7)
    params = new
  assert int(jnp.sum(params["dense"]["kernel"] == 0)) > 0


def test_lr_and_l1_weight_trials_share_one_compiled_step():
  def lowered(learning_rate, l1_weight):
    tx, _ = optimizers.create_optimizer(l1_config("adamw", l1_weight, learning_rate), 20, None)
    return jax.jit(tx.update).lower(PARAMS, tx.init(PARAMS), PARAMS).as_text()

  assert lowered(1e-3, 0.1) == lowered(3e-2, 1.0)


@pytest.mark.parametrize(
    "name,l1_weight,match",
    [
        ("adamw", -0.1, "l1_weight"),
        ("sgd", float("inf"), "l1_weight"),
        ("schedule_free_adamw", 0.1, "schedule_free"),
    ],
)
def test_impossible_l1_configs_are_clear_errors(name, l1_weight, match):
  with pytest.raises(ValueError, match=match):
    optimizers.create_optimizer(l1_config(name, l1_weight), 10, None)


def test_l1_weight_zero_keeps_the_chain_and_its_state():
  tx, _ = optimizers.create_optimizer(l1_config("adamw", 0.0), 10, None)
  config = default.get_config()
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 0.05
  del config.optimizer["l1_weight"]  # a config written before the field
  old, _ = optimizers.create_optimizer(config, 10, None)
  assert jax.tree.structure(tx.init(PARAMS)) == jax.tree.structure(old.init(PARAMS))


def test_training_logs_the_zeros_the_prox_makes(tmp_path):
  from nearprox.training import metrics_writer, train
  from tests.tiny_sst2 import tiny_config, write_sst2

  overrides = {"num_train_steps": 2, "log_every": 1, "eval_every": 2, "max_eval_examples": 16}
  config = tiny_config(
      write_sst2(tmp_path / "glue", n_train=32, n_dev=16),
      **overrides,
      **{"optimizer.name": "adamw", "optimizer.learning_rate": 1e-2, "optimizer.l1_weight": 2.0},
  )
  report = train.train_and_evaluate(config, tmp_path / "run")
  rows = metrics_writer.read_jsonl(tmp_path / "run" / "metrics.jsonl")
  last = [r for r in rows if "train/zeros/all" in r][-1]
  final = optimizers.kernel_zero_fractions(report["params"])
  assert last["step"] == 2 and 0 < last["train/zeros/all"] == pytest.approx(float(final["all"]))
  assert {"train/zeros/bert/encoder/layer_0", "train/zeros/classifier"} <= last.keys()


# ------------------------------------------------------------------------------ the study


def test_l1_study_tables_accuracy_against_the_zero_fraction_of_the_run_records(tmp_path):
  from experiments import tuning
  from experiments.configs import full
  from experiments.studies import REGISTRY, core

  study_module = REGISTRY["l1"]
  plan = full.get_plan()
  accuracy = {("adamw", 0.0): (0.90, 0.92), ("adamw", 1.0): (0.85, 0.87)}
  accuracy |= {("proximal_adamw", 0.0): (0.91,), ("proximal_adamw", 3.0): (0.5, 0.5)}
  zeros = {1.0: (0.3, 0.5), 3.0: (0.9, 0.95)}

  def record(variant, l1_weight, seed):
    history = [{"step": 300, "train/loss": 0.4}]
    if l1_weight:
      history += [{"step": 600, "train/zeros/all": zeros[l1_weight][seed], "train/loss": 0.3}]
    return {
        "config": {
            "task": "sst2",
            "num_train_steps": 600,
            "optimizer": {"name": variant, "damping": 1.0},
        },
        "report": {
            "dev": {"accuracy": accuracy[variant, l1_weight][seed]},
            "predicted_classes": {"dev": [0, 872] if l1_weight == 3.0 else [400, 472]},
        },
        "history": history,
        "machine": {"device_kind": "cpu"},
    }

  asked = []

  class Stored(tuning.Context):

    def resolve(self, name):
      return "proximal_adamw" if name == "best_proximal" else name

    def group(self, label, task, name, extra=None):
      variant, l1_weight = self.resolve(name), (extra or {}).get("optimizer.l1_weight", 0.0)
      asked.append((label, task, variant, l1_weight))
      if (variant, l1_weight) not in accuracy:
        return None  # not stored yet
      found = [record(variant, l1_weight, s) for s in range(len(accuracy[variant, l1_weight]))]
      return tuning.Group(variant, variant, {"optimizer.learning_rate": 1e-4}, found)

  store = type("Store", (), {"requested": [], "missing": {}})()
  study = core.run_study("l1", study_module, Stored(plan, store))
  weights = (0.0, *plan.l1_weights)
  assert asked == [
      ("optimizers" if w == 0 else "l1", "sst2", v, w)
      for v in ("adamw", "proximal_adamw")
      for w in weights
  ]
  rows = {(r["optimizer"], r["l1_weight"]): r for r in study["tables"]["l1"]}
  assert rows.keys() == accuracy.keys()
  assert rows["adamw", 1.0]["dev_accuracy"] == pytest.approx(0.86)
  assert rows["adamw", 1.0]["zero_fraction"] == pytest.approx(0.4)
  assert rows["adamw", 1.0]["zero_fraction_std"] == pytest.approx(np.std([0.3, 0.5], ddof=1))
  assert np.isnan(rows["adamw", 0.0]["zero_fraction"])  # no prox: not logged
  assert rows["proximal_adamw", 3.0]["collapsed_seeds"] == 2
  # summary.json: per row its accuracy and its zero fraction, the λ₁ as the condition.
  records = {(r["optimizer"], r["condition"], r["metric"]): r for r in study["tables"]["summary"]}
  assert len(records) == 2 * len(rows) and {r["study"] for r in records.values()} == {"l1"}
  zeros = records["adamw", "λ₁=1", "fraction of zero kernel weights"]
  assert (zeros["mean"], zeros["split"]) == (pytest.approx(0.4), None)
  assert zeros["std"] == pytest.approx(np.std([0.3, 0.5], ddof=1))
  assert records["adamw", "λ₁=0", "fraction of zero kernel weights"]["mean"] is None
  assert records["proximal_adamw", "λ₁=3", "accuracy"]["mean"] == pytest.approx(0.5)
  text = study_module.markdown(study)
  assert "| adamw | 0.0001 | 1 | 2 | 86.0 ± 1.4 | 40.0 ± 14.1 | 0 |" in text
  assert "| adamw | 0.0001 | 0 | 2 | 91.0 ± 1.4 | — | 0 |" in text
  assert study_module.plots(study, tmp_path) == [tmp_path / "l1.png"]
  assert (tmp_path / "l1.png").stat().st_size > 0
