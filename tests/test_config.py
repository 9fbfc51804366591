"""The training config composes for every data and model config, and bad values fail fast and readably."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from seq2seq.checkpoint import load_model
from seq2seq.cli import add_decoding_arguments, decoding_options
import seq2seq.train  # noqa: F401  registers the resolvers that hydra.run.dir in configs/train.yaml calls
from seq2seq.config import (
    BEAM_SIZE, MAX_LEN_B, MODEL_CONFIGS as MODEL_CONFIGS_SCHEMA, ConfigError, DataConfig, OptimConfig, RNNConfig,
    TokenizerConfig, TrainerConfig, check_config, composition_error_message, model_config,
)
from seq2seq.paths import CONFIG_DIR, PROJECT_ROOT
from seq2seq.training.lifecycle import data_source, newest_run, run_folder
from seq2seq.training.resume import flat_settings
from seq2seq.runtime import cpu_has_native_bf16

DATA_CONFIGS = sorted(path.stem for path in (CONFIG_DIR / "data").glob("*.yaml"))
MODEL_CONFIGS = sorted(path.stem for path in (CONFIG_DIR / "model").glob("*.yaml"))


def composed(*overrides: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def train_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "seq2seq.train", *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


def test_the_three_data_configs_and_three_models_exist():
    assert DATA_CONFIGS == ["opus100_zh_en", "tatoeba_zh_en", "wmt19_zh_en"]
    assert MODEL_CONFIGS == ["bahdanau", "rnn", "transformer"]


@pytest.mark.parametrize("data", DATA_CONFIGS)
@pytest.mark.parametrize("model", MODEL_CONFIGS)
def test_every_data_and_model_config_composes_and_validates(data, model):
    cfg = composed(f"data={data}", f"model={model}")
    assert cfg.data.name == data and cfg.model.name == model
    check_config(cfg)


def test_a_model_brings_its_recipe_and_the_command_line_still_wins():
    transformer, bahdanau = composed("model=transformer"), composed("model=bahdanau")
    assert transformer.optim.lr == composed().optim.lr and transformer.trainer.max_tokens == 1500
    assert bahdanau.optim.lr > transformer.optim.lr and bahdanau.trainer.max_tokens < transformer.trainer.max_tokens
    overridden = composed("model=bahdanau", "optim.lr=1e-4", "trainer.max_tokens=777")
    assert overridden.optim.lr == 1e-4 and overridden.trainer.max_tokens == 777
    assert set(bahdanau) == set(transformer)  # the recipe overrides values, it adds no top-level keys


def test_experiment_compare_composes():
    cfg = composed("experiment=compare", "model=rnn")
    assert cfg.trainer.max_steps == 2000 and cfg.trainer.eval_every == 500
    check_config(cfg)


@pytest.mark.parametrize("data", DATA_CONFIGS)
def test_cli_prints_the_job_config_for_every_data_config(data):
    result = train_cli("--cfg", "job", "--resolve", f"data={data}")  # data.name interpolates the direction
    assert result.returncode == 0, result.stderr
    assert f"name: {data}" in result.stdout
    assert "max_steps:" in result.stdout and "attention_examples:" in result.stdout


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("model.name=lstm_attention", "unknown model.name='lstm_attention'"),
        ("trainer.max_steps=-5", "trainer.max_steps=-5 must be a positive integer"),
        ("trainer.max_steps=0", "trainer.max_steps=0 must be a positive integer"),
        ("trainer.eval_every=0", "trainer.eval_every=0"),
        ("trainer.accumulate=0", "trainer.accumulate=0"),
        ("trainer.label_smoothing=1.5", "trainer.label_smoothing=1.5"),
        ("optim.schedule=linear", "optim.schedule='linear' is not one of inverse_sqrt, cosine, constant"),
        ("optim.lr=-1", "optim.lr=-1"),
        ("trainer.precision=fp8", "trainer.precision='fp8'"),
        ("trainer.device=tpu", "trainer.device='tpu'"),
        ("model.dropout=1.5", "model.dropout=1.5"),
    ],
)
def test_bad_values_are_named(override, fragment):
    with pytest.raises(ConfigError, match="invalid configuration") as error:
        check_config(composed(override))
    assert fragment in str(error.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as error:
        check_config(composed("trainer.max_steps=-1", "optim.schedule=step"))
    assert "trainer.max_steps" in str(error.value) and "optim.schedule" in str(error.value)


def test_a_run_needs_some_limit_and_any_limit_gives_cosine_its_length():
    with pytest.raises(ConfigError, match="training never ends"):
        check_config(composed("trainer.max_steps=null", "trainer.time_limit_minutes=null", "optim.schedule=cosine"))
    check_config(composed("trainer.max_steps=null", "trainer.time_limit_minutes=30", "optim.schedule=cosine"))
    check_config(composed("trainer.max_steps=null", "trainer.max_epochs=3", "optim.schedule=cosine"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: fp16 and cuda are valid here")
def test_precisions_and_devices_this_cpu_cannot_do():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        check_config(composed("trainer.precision=fp16"))
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        check_config(composed("trainer.device=cuda"))
    if cpu_has_native_bf16():
        check_config(composed("trainer.precision=bf16"))
    else:
        with pytest.raises(ConfigError, match="no native bfloat16"):
            check_config(composed("trainer.precision=bf16"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: fp16 is valid here")
@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("model.name=transformer_xl", "unknown model.name"),
        ("trainer.max_steps=-100", "trainer.max_steps=-100"),
        ("trainer.precision=fp16", "fp16 needs a CUDA GPU"),
    ],
)
def test_cli_fails_fast_without_a_traceback(override, fragment, tmp_path):
    result = train_cli(override, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_keys_are_rejected_by_hydra():
    result = train_cli("trainer.max_stepz=10", "--cfg", "job")
    assert result.returncode != 0
    assert "max_stepz" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["trainer.max_stpes=10"], "error: trainer.max_stpes is not a key of trainer; did you mean trainer.max_steps?"),
        (["trainer.label_smoothing=1.5"],
         "error: invalid configuration: trainer.label_smoothing=1.5 must be a number in [0, 1)"),
    ],
)
def test_config_mistakes_on_the_command_line_are_one_line_and_exit_2(overrides, line, tmp_path):
    """A typo gets the closest key, not Hydra's advice to add it with `+` (caught while composing); a value out of
    range names what the key allows (caught by check_config); both before any data is read."""
    result = train_cli(*overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip().startswith(line), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "+trainer" not in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["trainer.max_steps=abc"], "trainer.max_steps=abc must be a positive integer or null"),
        (["trainer.compile=maybe"], "trainer.compile=maybe must be true or false"),
        (["model=rnn", "model.hiden_size=8"],
         "model.hiden_size is not a key of model=rnn; did you mean model.hidden_size?"),
        (["model.hidden_size=8"], "model.hidden_size is not a key of model=transformer; its keys are name,"),
        (["model=lstm"], "model=lstm: there is no configs/model/lstm.yaml; choose one of bahdanau, rnn, transformer"),
    ],
)
def test_composition_errors_become_one_line_naming_the_key_and_what_it_allows(overrides, line):
    with pytest.raises(Exception) as error:
        composed(*overrides)
    message = composition_error_message(error.value)
    assert message.startswith(line) and "\n" not in message, message


def test_an_added_model_option_the_family_does_not_have_is_one_problem():
    with pytest.raises(ConfigError) as error:
        check_config(composed("model=rnn", "+model.ff_dim=8"))
    assert str(error.value).startswith("invalid configuration: model.ff_dim is not a key of model=rnn; its keys are")
    assert "\n" not in str(error.value)


def test_the_schema_documents_and_types_every_key():
    """Every key the YAML files set has a field with a doc in seq2seq/config.py, and --cfg job lists the keys the
    YAML leaves to the schema (the decoding defaults)."""
    for model in MODEL_CONFIGS:
        cfg = composed(f"model={model}")
        assert OmegaConf.get_type(cfg.model) is MODEL_CONFIGS_SCHEMA[model]
        schemas = (("trainer", TrainerConfig), ("optim", OptimConfig), ("model", MODEL_CONFIGS_SCHEMA[model]))
        for group, schema in schemas:
            for spec in dataclasses.fields(schema):
                assert spec.metadata.get("doc"), f"{group}.{spec.name} has no doc"
    assert composed().trainer.test_beam_size == BEAM_SIZE


def test_model_options_come_from_the_schema_with_its_defaults():
    assert model_config({"name": "rnn"}) == RNNConfig()
    with pytest.raises(ConfigError, match=r"model.hiden_size is not a key of model=rnn; did you mean model.hidden_s"):
        model_config({"name": "rnn", "hiden_size": 8})
    with pytest.raises(ConfigError, match=r"model.tie_output='yes' must be true or false"):
        model_config({"name": "transformer", "tie_output": "yes"})


@pytest.mark.corpus
def test_a_checkpoint_written_before_newer_keys_still_loads_with_their_defaults(checkpoints, tmp_path):
    """Checkpoints hold the config as plain containers: keys added since take the schema's defaults."""
    payload = torch.load(checkpoints["rnn"], weights_only=False)
    for group, key in (("model", "context"), ("trainer", "test_beam_size"), ("trainer", "max_len_b"),
                       ("trainer", "pad_multiple"), ("data", "alignments_path")):
        payload["config"][group].pop(key, None)
    payload["config"]["trainer"]["length_penalty"] = 0.6  # what the file does say wins over the default
    torch.save(payload, tmp_path / "old.pt")
    loaded = load_model(tmp_path / "old.pt")
    assert loaded.config.model.context == "final" and loaded.config.data.alignments_path is None
    parser = argparse.ArgumentParser()
    add_decoding_arguments(parser)
    arguments = parser.parse_args(["--checkpoint", str(tmp_path / "old.pt"), "--precision", "fp32"])
    options = decoding_options(arguments, loaded, torch.device("cpu"))
    assert (options["beam_size"], options["max_len_b"]) == (BEAM_SIZE, MAX_LEN_B)
    assert options["length_penalty"] == 0.6


def _fake_run(base: Path, stamp: str, mtime: float, with_checkpoint: bool = True, corpus: str = "a.tsv") -> Path:
    run = base / stamp
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(f"data:\n  format: tsv\n  path: {corpus}\n")
    if with_checkpoint:
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "last.pt").write_bytes(b"x")
        os.utime(run / "checkpoints" / "last.pt", (mtime, mtime))
    return run


def test_resume_auto_continues_the_newest_run_with_a_last_checkpoint(tmp_path):
    base = tmp_path / "runs" / "tatoeba_zh_en" / "transformer"
    older = _fake_run(base, "2024-01-01_10-00-00", 1_000)
    newer = _fake_run(base, "2024-01-02_10-00-00", 2_000)
    _fake_run(base, "2024-01-03_10-00-00", 3_000, with_checkpoint=False)  # crashed before its first validation
    other_corpus = _fake_run(base, "2024-01-04_10-00-00", 4_000, corpus="b.tsv")
    root = str(tmp_path / "runs")
    fresh = base / f"NOW_{os.getpid()}"
    a_tsv, c_tsv = (data_source(DataConfig(format="tsv", path=name)) for name in ("a.tsv", "c.tsv"))
    assert newest_run(base) == other_corpus
    assert newest_run(base, a_tsv) == newer  # resume=auto continues a run of the same corpus only
    assert run_folder(root, "tatoeba_zh_en/transformer", "NOW", "auto", a_tsv) == newer
    assert run_folder(root, "tatoeba_zh_en/transformer", "NOW", "auto", c_tsv) == fresh
    assert run_folder(root, "tatoeba_zh_en/transformer", "NOW", None) == fresh
    assert run_folder(root, "tatoeba_zh_en/rnn", "NOW", "auto") == Path(root) / f"tatoeba_zh_en/rnn/NOW_{os.getpid()}"
    # resume=PATH inside a run folder continues that run; a checkpoint elsewhere starts a new folder
    assert run_folder(root, "tatoeba_zh_en/transformer", "NOW", str(older / "checkpoints" / "last.pt")) == older
    assert run_folder(root, "tatoeba_zh_en/transformer", "NOW", str(tmp_path / "copy.pt")) == fresh


def test_hydra_run_dir_follows_resume_auto(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = _fake_run(tmp_path / "runs" / "tatoeba_zh_en" / "bahdanau", "2024-05-05_05-05-05", 1_000,
                    corpus="null\n  mirror_path: tatoeba-cmn-eng/cmn-eng.tsv")
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["model=bahdanau", "trainer.resume=auto"], return_hydra_config=True)
        fresh = compose("train", overrides=["model=bahdanau"], return_hydra_config=True)
    assert Path(cfg.hydra.run.dir) == Path("runs/tatoeba_zh_en/bahdanau/2024-05-05_05-05-05")
    assert (tmp_path / cfg.hydra.run.dir).resolve() == run.resolve()
    assert Path(fresh.hydra.run.dir).parent == Path("runs/tatoeba_zh_en/bahdanau")
    assert Path(fresh.hydra.run.dir).name != run.name


def test_the_yaml_files_hold_no_copy_of_a_default():
    """configs/README.md: every default lives in the schema; a value in a YAML file is a choice of that preset."""
    schema = {"data": DataConfig, "tokenizer": TokenizerConfig, "optim": OptimConfig, "trainer": TrainerConfig}
    checked = 0
    for path in sorted(CONFIG_DIR.glob("*/*.yaml")):
        group = path.parent.name
        values = OmegaConf.to_container(OmegaConf.load(path)) or {}
        values.pop("defaults", None)
        if group == "model":  # global: the family's sizes, and its recipe in optim and trainer
            sections = {"model": MODEL_CONFIGS_SCHEMA[path.stem], **schema}
        elif group in schema:
            values, sections = {group: values}, schema
        else:
            continue
        for section, keys in values.items():
            defaults = flat_settings(dataclasses.asdict(sections[section]()))
            for key, value in flat_settings(keys).items():
                assert defaults.get(key) != value, f"{path.relative_to(CONFIG_DIR)}: {section}.{key}={value!r} " \
                                                   "repeats the schema's default (seq2seq/config.py)"
                checked += 1
    assert checked > 20
