"""End to end on a tiny parallel corpus: ``train_and_evaluate`` with task multi30k (a tiny
encoder–decoder, a few steps) for AdamW (under jit, and under pmap with the same numbers), for
proximal SGD with factored per-example gradients, the global Gram and iEF weights under
shard_map, and for AdamW with FGM on the source embeddings scored on dev alone (a tuning run's
splits); then the translate command on the exported model and on a stopped training's latest
checkpoint. Also: the multi30k config resolves and its data folder has the expected files;
bad settings (a classification config among them) fail before any loading."""

import json
import logging
import shutil

import jax
import numpy as np
import pytest

from experiments.configs import default, multi30k
from nearprox.text import data
from nearprox.training import task_io, train, translate, translation_io
from tests.test_translation import DE, EN, _corpus


def _config(tmp_path, **optimizer):
  config = multi30k.get_config()
  config.data_dir = str(_corpus(tmp_path / "mt", EN * 4, DE * 4))
  config.vocab_size = 280
  config.max_length = 12
  config.length_buckets = (8, 12)
  config.batch_size = 8
  config.eval_batch_size = 8
  config.beam_size = 2
  config.model.num_encoder_layers = 1
  config.model.num_decoder_layers = 1
  config.model.hidden_size = 16
  config.model.num_heads = 2
  config.model.intermediate_size = 32
  config.num_train_steps = 3
  config.log_every = 1
  config.eval_every = 2
  config.checkpoint_every = 100
  config.progress = False
  config.optimizer.warmup_fraction = 0.0
  for key, value in optimizer.items():
    config.optimizer[key] = value
  return config


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("adamw")
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("NEARPROX_CACHE_DIR", str(tmp_path / "cache"))
    config = _config(tmp_path, name="adamw", learning_rate=1e-2)
    config.parallel = "jit"
    report = train.train_and_evaluate(config, tmp_path / "work")
    yield tmp_path / "work", report, config


def test_adamw_trains_evaluates_bleu_and_exports(adamw_run):
  workdir, report, _ = adamw_run
  assert report["steps"] == 3 and not report["preempted"]
  for split in ("dev", "test"):
    assert set(report[split]) == {"bleu", "chrf"}
    assert 0 <= report[split]["bleu"] <= 100
  assert json.loads((workdir / "report.json").read_text())["test"] == report["test"]
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert any("dev/bleu" in row for row in logged if row.get("step") == 2)
  # The last step is also decoded greedily (the in-training decoder; the final scores are
  # beam search, beam_size = 2): the curve ends with the decoder it began with.
  greedy = [row["step"] for row in logged if "dev/bleu_greedy" in row]
  assert greedy == [3] and not any("test/bleu_greedy" in row for row in logged)
  model, params, tokenizer = translation_io.load_model(workdir)
  assert model.config.hidden_size == 16 and tokenizer.get_vocab_size() <= 280
  assert (workdir / translation_io.MODEL_DIRNAME / translation_io.TRAIN_CONFIG_FILENAME).is_file()


def test_translate_command_writes_one_line_per_input(adamw_run, tmp_path, capsys):
  workdir, _, _ = adamw_run
  source = tmp_path / "in.en"
  source.write_text("A man rides a bike.\n\nTwo dogs play.\n", encoding="utf-8")
  result = translate.main(
      [
          "--workdir",
          str(workdir),
          "--input",
          str(source),
          "--output",
          str(tmp_path / "out.de"),
          "--beam_size",
          "2",
          "--batch_size",
          "2",
          "--reference",
          str(source),
      ]
  )
  lines = (tmp_path / "out.de").read_text(encoding="utf-8").split("\n")
  assert len(lines) == 4 and lines[1] == "" and lines[3] == ""
  assert set(result) == {"sentences", "cut", "output", "bleu", "chrf"}
  assert result["sentences"] == 3 and result["cut"] == 2  # both over the tiny 11 subwords
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
  with pytest.raises(FileNotFoundError, match="no trained translation model"):
    translation_io.load_model(tmp_path)


def test_translate_reads_a_stopped_trainings_latest_checkpoint(adamw_run, tmp_path, caplog):
  """A training that stops before its end has the model folder written at its start (model
  config, tokenizer, training config) and orbax checkpoints, no params: the translate
  command restores the latest checkpoint. An input line longer than max_length is cut,
  counted and logged."""
  workdir, _, _ = adamw_run
  stopped = tmp_path / "stopped"
  shutil.copytree(workdir, stopped)
  model, exported, tokenizer = translation_io.load_model(workdir)
  # What the start of a (resumed) training writes: no params, an earlier export's removed.
  translation_io.export_model(model, None, tokenizer, stopped / translation_io.MODEL_DIRNAME)
  assert not (stopped / translation_io.MODEL_DIRNAME / translation_io.PARAMS_FILENAME).exists()
  with caplog.at_level(logging.WARNING):
    _, restored, _ = translation_io.load_model(stopped)
  assert "using its checkpoint at step 3" in caplog.text
  # The checkpoint saved after the last step holds the params that were exported.
  assert jax.tree.structure(restored) == jax.tree.structure(exported)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(exported), strict=True):
    np.testing.assert_array_equal(np.asarray(got), want)

  source = tmp_path / "in.en"
  long = "A man in a red shirt rides a bike past two dogs that play in the water."
  source.write_text(f"A man.\n{long}\n", encoding="utf-8")  # 4 subwords, and over 11
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    argv = ["--workdir", str(stopped), "--input", str(source), "--output", str(tmp_path / "o")]
    result = translate.main(argv + ["--beam_size", "1", "--batch_size", "2"])
  assert result["sentences"] == 2 and result["cut"] == 1
  assert "cut 1 of 2 input sentences to the model's max_length = 12" in caplog.text
  assert len((tmp_path / "o").read_text(encoding="utf-8").splitlines()) == 2

  shutil.rmtree(stopped / "checkpoints")
  with pytest.raises(FileNotFoundError, match="neither exported params .* nor a readable orbax"):
    translation_io.load_model(stopped)


def test_pmap_trains_the_same_numbers_as_jit(adamw_run, tmp_path, monkeypatch):
  """Each example's randomness depends on its index only: AdamW under pmap over the 8 host
  devices of tests/conftest.py (one pair per device) logs jit's losses."""
  monkeypatch.setenv("NEARPROX_CACHE_DIR", str(adamw_run[0].parent / "cache"))
  config = _config(tmp_path, name="adamw", learning_rate=1e-2)
  config.parallel = "pmap"
  report = train.train_and_evaluate(config, tmp_path / "work")
  assert report["steps"] == 3 and set(report["test"]) == {"bleu", "chrf"}
  losses = _losses(tmp_path / "work")
  assert len(losses) == 3
  np.testing.assert_allclose(losses, _losses(adamw_run[0]), rtol=1e-5)


def test_fgm_trains_and_a_dev_only_run_decodes_no_test(adamw_run, tmp_path, monkeypatch):
  """FGM on the source embeddings: the first step's loss (the same params as the clean run's)
  adds the perturbed pairs' loss (adv_weight 1), about twice the clean loss. Scored on dev
  alone (``eval_splits``, what a tuning run on dev sets) with the test files gone: no test."""
  monkeypatch.setenv("NEARPROX_CACHE_DIR", str(adamw_run[0].parent / "cache"))
  config = _config(tmp_path, name="adamw", learning_rate=1e-2)
  config.parallel = "jit"
  config.objective.kind = "fgm"
  config.eval_splits = ("dev",)
  for path in tmp_path.joinpath("mt").glob("test_2016_flickr.*"):
    path.unlink()
  report = train.train_and_evaluate(config, tmp_path / "work")
  assert report["steps"] == 3 and set(report["dev"]) == {"bleu", "chrf"} and "test" not in report
  losses, clean = _losses(tmp_path / "work"), _losses(adamw_run[0])
  assert len(losses) == 3 and all(np.isfinite(losses))
  assert losses[0] > 1.5 * clean[0]


def _losses(workdir) -> list[float]:
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
  return [row["train/loss"] for row in logged if "train/loss" in row]


def test_proximal_factored_ief_under_shard_map(tmp_path, monkeypatch):
  monkeypatch.setenv("NEARPROX_CACHE_DIR", str(tmp_path / "cache"))
  config = _config(
      tmp_path,
      name="proximal_sgd",
      learning_rate=0.1,
      per_example="factored",
      weighting="ief",
      gram="global",
  )
  config.parallel = "shard_map"  # over the 8 host devices of tests/conftest.py
  config.dev_beam_size = 2  # = beam_size: one decoder for every evaluation
  report = train.train_and_evaluate(config, tmp_path / "work")
  assert report["steps"] == 3 and set(report["test"]) == {"bleu", "chrf"}
  logged = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").open()]
  losses = [row["train/loss"] for row in logged if "train/loss" in row]
  assert len(losses) == 3 and all(loss > 0 for loss in losses)
  assert any("train/gram/gram_trace" in row for row in logged)


def test_multi30k_config_points_at_the_corpus(monkeypatch, tmp_path):
  monkeypatch.setenv(data.MULTI30K_DIR_ENV, str(tmp_path))
  config = multi30k.get_config()
  assert config.task == "multi30k" and config.data_dir == str(tmp_path)
  assert data.get_task(config.task).kind == "translation"


@pytest.mark.parametrize(
    "field, value, error, message",
    [
        ("direction", "en", data.DataError, "direction must be"),
        ("beam_size", 0, ValueError, "config.beam_size must be a positive integer"),
        ("model.name", "minilm", ValueError, "'seq2seq' from scratch"),
        ("label_noise", 0.1, ValueError, "label_noise"),
        ("eval_splits", ("test",), ValueError, "'dev' .* got \\('test',\\)"),
        ("eval_splits", ("dev", "val"), ValueError, "optionally others of \\('dev', 'test'\\)"),
        ("holdout_examples", 5, ValueError, "which a run with config.holdout_examples = 5"),
    ],
)
def test_bad_translation_settings_fail_before_loading(tmp_path, field, value, error, message):
  config = _config(tmp_path, name="adamw")
  config.data_dir = str(tmp_path / "absent")  # never read: the check comes first
  config.eval_splits = ("dev",)  # valid alone; rejected with holdout_examples
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(error, match=message):
    train.train_and_evaluate(config, tmp_path / "work")


def test_a_classification_config_with_task_multi30k_names_the_translation_config(tmp_path):
  config = default.get_config()
  config.task = "multi30k"
  with pytest.raises(ValueError, match="config.direction.*experiments/configs/multi30k.py"):
    train.train_and_evaluate(config, tmp_path / "work")


def test_a_run_tuned_on_dev_loads_no_test_split(tmp_path):
  """eval_splits = ("dev",): dev is scored, test_2016_flickr never read (its files absent
  here: reading them would fail)."""
  config = _config(tmp_path, name="adamw")
  config.eval_splits = ("dev",)
  train_split = data.load_translation("train", config.data_dir)
  tokenizer = data.subword_tokenizer(train_split, config.vocab_size, use_cache=False)
  for path in tmp_path.joinpath("mt").glob("test_2016_flickr.*"):
    path.unlink()
  splits = task_io.load_splits(config, tokenizer)
  assert set(splits) == {"train", "dev"}
  config.eval_splits = ()
  with pytest.raises(data.DataError, match="test_2016_flickr"):
    task_io.load_splits(config, tokenizer)


def test_tuning_holds_out_training_pairs_and_loads_no_reported_split(tmp_path):
  config = _config(tmp_path, name="adamw")
  config.holdout_examples = 5
  config.max_length = 40  # nothing cut: the held-out targets decode to the references
  train_split = data.load_translation("train", config.data_dir)
  tokenizer = data.subword_tokenizer(train_split, config.vocab_size, use_cache=False)
  splits = task_io.load_splits(config, tokenizer)
  assert set(splits) == {"train", "holdout"}
  rest, held = task_io.holdout_indices(len(train_split), 5)
  assert task_io.num_rows(splits["train"]) == len(rest) == len(train_split) - 5
  assert splits["holdout"].references == [train_split.targets[i] for i in held]
  decoded = data.decode_ids(tokenizer, splits["holdout"].arrays()["target_output_ids"])
  assert decoded == splits["holdout"].references


def test_translation_budget_reads_the_run_and_times_each_bucket(adamw_run, tmp_path):
  """experiments/translation_budget.py on the tiny run: its val BLEU curve and final scores,
  one timed step per bucket length, the expected step as their share-weighted mean."""
  from experiments import bench_optimizers, translation_budget

  workdir, report, config = adamw_run
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("NEARPROX_CACHE_DIR", str(workdir.parent / "cache"))
    run = translation_budget.measurement_run(config, workdir)
    shares = translation_budget.bucket_shares(config)
    configs = translation_budget.step_configs(config, shares)
    seconds = bench_optimizers.measure(configs, repeats=1, log=lambda _: None)
  assert run["steps"] == 3 and run["final"]["test"] == report["test"]
  assert run["curve"][0][0] == 2 and run["curve"][-1] == (3, report["dev"]["bleu"])
  assert set(shares) == {8, 12} and sum(shares.values()) == pytest.approx(1.0)
  assert {c.max_length for _, c, _ in configs.values()} == {8, 12}
  record = translation_budget.budget_record(run, shares, seconds, 1, 0.0)
  expected = sum(shares[t] * seconds[f"T={t}"] for t in shares)
  assert record["expected_step_seconds"] == pytest.approx(expected) and expected > 0
  text = translation_budget.markdown(record)
  assert "| 2 |" in text and "(beam search) |" in text and "| 12 |" in text
  assert "h of training for 3 steps" in text


def test_translate_command_names_a_missing_or_bad_flag():
  with pytest.raises(SystemExit, match="--output=None: Flag --output must have a value"):
    translate.main(["--workdir", "w", "--input", "i"])
  with pytest.raises(SystemExit, match="--beam_size=two: invalid literal"):
    translate.main(["--workdir", "w", "--input", "i", "--output", "o", "--beam_size", "two"])
  with pytest.raises(SystemExit, match="usage: python -m nearprox.training.translate"):
    translate.main(["--workdir", "w", "--input", "i", "--output", "o", "--beams=2"])
