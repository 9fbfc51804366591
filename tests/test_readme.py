"""Every command in the README is run or checked here, so none can rot: translate, evaluate and inspect run on tiny
checkpoints (or, for a server, their arguments are parsed), training commands compose with Hydra and pass the
schema's checks, torchrun, TensorBoard and scripts accept their options, set-up and test commands are the ones
`.ci/run` runs, and the quick trial trains for real (slow tier). A README command no rule covers fails the first
test: a new command needs its check here before it lands."""

from __future__ import annotations

import io
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from seq2seq import evaluate as evaluate_cli, inspect as inspect_cli, translate as translate_cli
from seq2seq.paths import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI = (ROOT / ".ci" / "run").read_text()
README_MAX_LINES = 250


def readme_commands() -> list[list[str]]:
    """The commands of the README's bash blocks as argument lists: continued lines joined, comments dropped,
    `a && b` split in two."""
    commands: list[list[str]] = []
    in_block, pending = False, ""
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_block = not in_block and line.strip() == "```bash"
            continue
        if not in_block:
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        words, pending = shlex.split(pending + line, comments=True), ""
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            commands.append(words[:cut])
            words = words[cut + 1:]
    return commands


COMMANDS = readme_commands()
CLIS = {"seq2seq.translate": translate_cli, "seq2seq.evaluate": evaluate_cli, "seq2seq.inspect": inspect_cli}
SETUP = (["python3", "-m", "venv"], ["."], ["pip", "install"], ["sudo", "apt-get"], ["apt-get"])


def starts(command: list[str], *prefixes: list[str]) -> bool:
    return any(command[: len(prefix)] == prefix for prefix in prefixes)


def select(rule) -> list:
    return [pytest.param(command, id=" ".join(command)) for command in COMMANDS if rule(command)]


def is_training(command: list[str]) -> bool:
    return starts(command, ["python", "-m", "seq2seq.train"], ["torchrun"])


def is_cli(command: list[str]) -> bool:
    return command[:2] == ["python", "-m"] and command[2] in CLIS


def is_script(command: list[str]) -> bool:
    return command[0] == "python" and command[1].startswith("scripts/")


RULES = {
    "set-up (as .ci/run)": lambda command: starts(command, *SETUP),
    "test tier (as .ci/run)": lambda command: starts(command, ["python", "-m", "pytest"]),
    "training (composed)": is_training,
    "translate/evaluate/inspect (run)": is_cli,
    "script (--help)": is_script,
    "tensorboard (--help)": lambda command: command[0] == "tensorboard",
}


def test_the_readme_is_short_and_every_command_in_it_is_checked():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= README_MAX_LINES
    assert len(COMMANDS) >= 20
    for command in COMMANDS:
        assert any(rule(command) for rule in RULES.values()), f"no test runs or checks: {shlex.join(command)}"
    for name in ("seq2seq.translate", "seq2seq.evaluate", "seq2seq.inspect", "seq2seq.train"):
        assert any(name in command for command in COMMANDS), f"the README shows no {name} command"


@pytest.mark.parametrize("command", select(RULES["set-up (as .ci/run)"]))
def test_set_up_commands_are_what_ci_runs(command):
    for word in command:
        if word != "sudo":  # CI runs as root
            assert word in CI, f"{shlex.join(command)}: .ci/run has no {word!r}"


@pytest.mark.parametrize("command", select(RULES["test tier (as .ci/run)"]))
def test_test_commands_are_the_tiers_ci_runs(command):
    assert 'python -m pytest -q "$@"' in CI
    assert any(line.split("#")[0].split() == ["tier", *command[3:]] for line in CI.splitlines()), shlex.join(command)


def sweep(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The jobs of a command line: one, or under -m one per value of each comma-separated override."""
    jobs = [[]]
    for override in overrides:
        key, _, value = override.partition("=")
        values = value.split(",") if multirun and "," in value and not value.startswith("[") else [value]
        jobs = [job + [f"{key}={each}"] for job in jobs for each in values]
    return jobs


@pytest.mark.parametrize("command", select(is_training))
def test_training_commands_compose_and_pass_the_schema(command):
    from hydra import compose, initialize_config_dir

    from seq2seq.config import check_config

    if command[0] == "torchrun":
        launcher, train = command[: command.index("-m")], command[command.index("-m") + 1:]
        usage = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--help"], capture_output=True,
                               text=True, check=True).stdout
        for option in launcher[1:]:
            assert option.split("=")[0] in usage, f"torchrun has no {option}"
        command = ["python", "-m", *train]
    arguments = command[3:]
    if "--cfg" in arguments:  # the cheap form: run it
        result = subprocess.run([sys.executable, "-m", "seq2seq.train", *arguments], capture_output=True, text=True,
                                cwd=ROOT, timeout=120)
        assert result.returncode == 0 and "trainer:" in result.stdout, result.stderr[-2000:]
        return
    multirun = arguments[0] in ("-m", "--multirun")
    for job in sweep(arguments[1:] if multirun else arguments, multirun):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            check_config(compose(config_name="train", overrides=job))


def write_inputs(folder: Path) -> None:
    """The files the README's commands read, in the corpus layout (English, Chinese)."""
    (folder / "zh.txt").write_text("我是一个学生。\n他昨天去了北京。\n", encoding="utf-8")
    (folder / "pairs.tsv").write_text("I am a student.\t我是一个学生。\nThank you.\t谢谢你。\n", encoding="utf-8")
    (folder / "test.zh").write_text("我是一个学生。\n谢谢你。\n", encoding="utf-8")
    (folder / "test.en").write_text("I am a student.\nThank you.\n", encoding="utf-8")


OUTPUT_OPTIONS = ("--output", "--out", "--json", "--html", "--attention-plot")
CHECKPOINT_FAMILIES = {"best.pt": "transformer", "rnn.pt": "rnn", "bahdanau.pt": "bahdanau",
                       "transformer.pt": "transformer"}
NEEDS_THE_CORPUS = ("--split",)  # the test split of the checkpoint's corpus: prepared from the whole corpus


def cli_params() -> list:
    params = []
    for param in select(is_cli):
        (command,) = param.values
        arguments = command[3:]
        slow = command[2] == "seq2seq.evaluate" and not {"--tsv", "--src"} & set(arguments)
        params.append(pytest.param(command, id=param.id, marks=[pytest.mark.slow] if slow else []))
    return params


@pytest.mark.corpus
@pytest.mark.parametrize("command", cli_params())
def test_translate_evaluate_and_inspect_commands_run(command, checkpoints, tmp_path, monkeypatch, capsysbinary):
    module = CLIS[command[2]]
    arguments = [str(checkpoints[CHECKPOINT_FAMILIES[word]]) if word in CHECKPOINT_FAMILIES else word
                 for word in command[3:]]
    if "--serve" in arguments:  # serves until stopped: the server itself is tests/test_page.py's
        module.build_parser().parse_args(arguments)
        return
    monkeypatch.chdir(tmp_path)
    write_inputs(tmp_path)
    if "--interactive" in arguments:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("我是一个学生。\n".encode()), encoding="utf-8"))
    code = module.main(arguments)
    captured = capsysbinary.readouterr()
    assert code == 0, captured.err.decode(errors="replace")[-2000:]
    for option, value in zip(arguments, arguments[1:]):
        if option in OUTPUT_OPTIONS:
            assert (tmp_path / value).stat().st_size > 0, f"{option} {value} was not written"


@pytest.mark.parametrize("command", select(is_script))
def test_script_commands_exist_and_take_their_options(command):
    result = subprocess.run([sys.executable, command[1], "--help"], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for option in command[2:]:
        if option.startswith("--"):
            assert option.split("=")[0] in result.stdout, f"{command[1]} has no {option}"


@pytest.mark.parametrize("command", select(RULES["tensorboard (--help)"]))
def test_tensorboard_command_takes_its_options(command):
    executable = Path(sys.executable).with_name("tensorboard")
    result = subprocess.run([str(executable), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for option in command[1:]:
        if option.startswith("--"):
            assert option in result.stdout, f"tensorboard has no {option}"


QUICK_TRIAL = ["python", "-m", "seq2seq.train", "trainer.max_steps=50", "trainer.valid_max_sentences=100",
               "trainer.test_max_sentences=100"]


@pytest.mark.slow
@pytest.mark.corpus
def test_the_quick_trial_trains_validates_and_tests(corpus_path, tmp_path):
    import json

    assert QUICK_TRIAL in COMMANDS, "the README's quick trial changed: change it here too"
    result = subprocess.run([sys.executable, *QUICK_TRIAL[1:]], capture_output=True, text=True, cwd=tmp_path,
                            timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    (results,) = (tmp_path / "runs").glob("tatoeba_zh_en/transformer/*/results.json")
    summary = json.loads(results.read_text())
    assert summary["steps"] == 50 and summary["test_sentences"] == 100 and summary["test_bleu"] is not None
    assert (results.parent / "checkpoints" / "best.pt").is_file()
