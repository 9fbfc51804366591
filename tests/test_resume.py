"""Resume exact or refused: settings that would make a resumed run differ from an uninterrupted one are refused in
one line naming the key, unless trainer.resume_reset asks for that part to start afresh; optim.lr and max_steps
apply as the user expects (the new peak rate; a cosine schedule that goes on from its current rate)."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from hydra import compose, initialize_config_dir

import seq2seq.train  # noqa: F401  (registers the config schema and resolvers)
from seq2seq.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from seq2seq.config import ConfigError, RunConfig, check_config
from seq2seq.paths import CONFIG_DIR
from seq2seq.training.optim import lr_multiplier, refit_scheduler
from seq2seq.training.resume import check_resumable as check_on


def composed(*overrides: str) -> RunConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return check_config(compose(config_name="train", overrides=list(overrides)))


CPU = torch.device("cpu")
TRAINING_STATE = {"optimizer": {}, "scheduler": {}, "rng": [], "train_state": {}}  # what the check asks is there


def check_resumable(path, cfg: RunConfig, device: torch.device = CPU, precision: str = "fp32") -> None:
    check_on(path, cfg, device, precision)


def write_checkpoint(path, config: dict, **extra) -> None:
    save_checkpoint(path, {"config": config, "model": {}, "src_tokenizer": b"x", "tgt_tokenizer": b"x",
                           **TRAINING_STATE, **extra})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint file whose config is the shipped default, written on the CPU in fp32."""
    path = tmp_path_factory.mktemp("resume") / "last.pt"
    write_checkpoint(path, asdict(composed()), runtime={"device": "cpu", "precision": "fp32"})
    return path


@pytest.mark.parametrize(
    "override, reset, message",
    [
        ("trainer.max_tokens=700", "sampler",
         "trainer.max_tokens differs (checkpoint: 1500, this run: 700) and the saved batch position points into"),
        ("trainer.accumulate=2", "sampler", "trainer.accumulate differs (checkpoint: 1, this run: 2)"),
        ("data.clean.max_chars=200", "sampler", "data.clean.max_chars differs (checkpoint: 300, this run: 200)"),
        ("data.path=/elsewhere/corpus.tsv", "sampler", "data source differs"),
        ("optim.warmup_steps=100", "schedule", "optim.warmup_steps differs (checkpoint: 400, this run: 100)"),
        ("optim.schedule=inverse_sqrt", "schedule", "optim.schedule differs (checkpoint: cosine"),
    ],
)
def test_inexact_changes_are_refused_unless_reset(saved, override, reset, message):
    with pytest.raises(CheckpointError) as error:
        check_resumable(saved, composed(override))
    text = str(error.value)
    assert text.startswith(f"cannot resume from {saved}: {message}") and "\n" not in text
    assert f"add trainer.resume_reset=[{reset}]" in text
    check_resumable(saved, composed(override, f"trainer.resume_reset={reset}"))  # asked for: accepted
    check_resumable(saved, composed(override, f"trainer.resume_reset=[optimizer,{reset}]"))


@pytest.mark.parametrize(
    "override, setting",
    [("model.d_model=128", "model.d_model"), ("model=rnn", "model.name"),
     ("tokenizer.tgt_vocab_size=8000", "tokenizer.tgt_vocab_size"), ("data.src_lang=en", "data.src_lang")],
)
def test_model_tokenizer_and_direction_changes_are_always_refused(saved, override, setting):
    with pytest.raises(CheckpointError, match=f"{setting} differs .*start a new run without trainer.resume"):
        check_resumable(saved, composed(override, "data.tgt_lang=zh" if "src_lang" in override else "trainer.seed=1234",
                                        "trainer.resume_reset=[schedule,optimizer,sampler]"))


def test_lr_max_steps_and_other_settings_apply_without_refusal(saved):
    check_resumable(saved, composed("optim.lr=5e-3", "trainer.max_steps=40000", "trainer.eval_every=100",
                                    "trainer.time_limit_minutes=60", "optim.weight_decay=0.01"))


def test_adding_alignment_pairs_to_a_resumed_run_is_allowed(saved, tmp_path):
    """data.alignments_path only adds AER to the validations: the run trains on the same batches."""
    check_resumable(saved, composed(f"data.alignments_path={tmp_path / 'gold'}"))


@pytest.mark.parametrize(
    "device, precision, message",
    [(CPU, "bf16", "trainer.precision differs (checkpoint: fp32, this run: bf16)"),
     (torch.device("cuda"), "fp32", "trainer.device differs (checkpoint: cpu, this run: cuda)")],
)
def test_another_device_or_precision_is_refused_unless_reset(saved, device, precision, message):
    """What the run really used is compared (auto resolves to it): another device draws other dropout masks from
    the saved random states, another precision has another loss scale and arithmetic."""
    with pytest.raises(CheckpointError) as error:
        check_resumable(saved, composed(), device, precision)
    assert str(error.value).startswith(f"cannot resume from {saved}: {message}")
    assert "add trainer.resume_reset=[runtime]" in str(error.value)
    check_resumable(saved, composed("trainer.resume_reset=runtime"), device, precision)


def test_a_file_written_before_the_runtime_was_recorded_compares_what_was_asked(tmp_path):
    old, config = tmp_path / "old.pt", asdict(composed())
    config["trainer"]["precision"] = "bf16"
    write_checkpoint(old, config)
    check_resumable(old, composed(), CPU, "fp32")  # auto here: what it resolves to was not recorded then
    with pytest.raises(CheckpointError, match="trainer.precision differs .checkpoint: bf16, this run: fp32."):
        check_resumable(old, composed("trainer.precision=fp32"), CPU, "fp32")


def test_one_corpus_by_a_relative_and_an_absolute_path_is_one_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.tsv").write_text("Hi.\t嗨。\n", encoding="utf-8")
    (tmp_path / "other.tsv").write_text("Hi.\t嗨。\n", encoding="utf-8")
    path = tmp_path / "last.pt"
    write_checkpoint(path, asdict(composed("data.path=corpus.tsv")))
    check_resumable(path, composed(f"data.path={tmp_path / 'corpus.tsv'}"))
    check_resumable(path, composed("data.path=./corpus.tsv"))
    with pytest.raises(CheckpointError, match="data source differs"):
        check_resumable(path, composed(f"data.path={tmp_path / 'other.tsv'}"))


def test_a_checkpoint_without_training_state_is_refused_before_anything_is_built(tmp_path):
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"config": asdict(composed()), "model": {}, "src_tokenizer": b"x", "tgt_tokenizer": b"x"})
    with pytest.raises(CheckpointError, match="holds no training state .optimizer is missing.: it can translate"):
        check_resumable(path, composed())


def test_an_unknown_reset_is_one_clear_error():
    with pytest.raises(ConfigError, match="'schedules' is not one of schedule, optimizer, sampler"):
        composed("trainer.resume_reset=schedules")


def _adamw(lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def test_a_changed_lr_is_the_new_peak_of_the_restored_schedule():
    """LambdaLR's state restores the old peak: optim.lr=5e-3 on resume used to run on at the 2e-3 schedule."""
    multiplier = lr_multiplier("inverse_sqrt", 40)
    old = _adamw(2e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(old, multiplier)
    for _ in range(80):
        old.step()
        scheduler.step()
    new = _adamw(5e-3)
    restored = torch.optim.lr_scheduler.LambdaLR(new, multiplier)
    new.load_state_dict(old.state_dict())
    restored.load_state_dict(scheduler.state_dict())
    assert new.param_groups[0]["lr"] == pytest.approx(2e-3 * multiplier(80))  # what a plain restore gives
    refit_scheduler(restored, new, 5e-3, multiplier)
    assert new.param_groups[0]["lr"] == pytest.approx(5e-3 * multiplier(80))
    new.step()
    restored.step()
    assert new.param_groups[0]["lr"] == pytest.approx(5e-3 * multiplier(81))


def test_a_longer_cosine_goes_on_from_the_current_rate():
    """The rule: at a resume that changes the cosine's length, it decays from the rate it had reached to its
    floor at the new end. Fitting the whole cosine to the new length instead would raise the rate at once."""
    floor, warmup, step = 0.05, 10, 60
    before = lr_multiplier("cosine", warmup, 100, floor)
    anchor = (step + 1, before(step))
    after = lr_multiplier("cosine", warmup, 200, floor, anchor)
    assert after(step) == pytest.approx(before(step))
    assert lr_multiplier("cosine", warmup, 200, floor)(step) > before(step) + 0.2  # the jump it avoids
    rates = [after(s) for s in range(step, 200)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert rates[-1] == pytest.approx(floor) and after(250) == pytest.approx(floor)


# ----------------------------------------------------------------------------- end to end

RUN_ARGS = ["model=tiny_transformer", "trainer.eval_every=10", "trainer.num_attention_samples=0",
            "attention_examples=[]", "trainer.test_beam_size=1", "trainer.average_last=0", "optim.schedule=cosine",
            "optim.warmup_steps=4"]


@pytest.mark.slow
@pytest.mark.corpus
def test_resumes_with_a_new_lr_and_length_and_refuses_new_batches(ws, tmp_path):
    run = tmp_path / "run"
    result = ws.train(*RUN_ARGS, "trainer.max_steps=10", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    last = run / "checkpoints" / "last.pt"

    refused = ws.train(*RUN_ARGS, "trainer.max_steps=20", "trainer.max_tokens=700", f"trainer.resume={last}",
                       f"hydra.run.dir={run}")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith(
        f"error: cannot resume from {last}: trainer.max_tokens differs (checkpoint: 1024, this run: 700)"
    )

    resumed = ws.train(*RUN_ARGS, "trainer.max_steps=20", "optim.lr=5e-3", f"trainer.resume={last}",
                       f"hydra.run.dir={run}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert "optim.lr 0.002 -> 0.005: the schedule goes on at step 10 with the new peak" in output
    assert "cosine schedule: 10 -> 20 steps" in output
    payload = load_checkpoint(last)
    anchor_update, anchor_factor = payload["train_state"]["schedule_anchor"]
    expected = lr_multiplier("cosine", 4, 20, 0.05, (anchor_update, anchor_factor))(20)
    assert payload["step"] == 20 and anchor_update == 11
    assert payload["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-3 * expected)
