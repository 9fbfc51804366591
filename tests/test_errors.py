"""One error base: every exception seq2seq defines derives from Seq2SeqError with the exit status of its kind, so an
entry point catches one type; the analysis layer does not reach up into the command-line module for it."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import seq2seq
from seq2seq.errors import Seq2SeqError, UsageError

PACKAGE = Path(seq2seq.__file__).parent

# The kinds: what the user can fix exits 2, a run that failed on its way exits 1, an interruption 128 + the signal.
FAILURES = {"TrainingError", "CollectiveError", "TrainingInterrupted"}


def defined_exceptions() -> dict[str, type[BaseException]]:
    classes = {}
    for module_info in pkgutil.walk_packages([str(PACKAGE)], prefix="seq2seq."):
        module = importlib.import_module(module_info.name)
        for name, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, BaseException) and value.__module__ == module.__name__:
                classes[f"{module.__name__}.{name}"] = value
    return classes


def test_every_exception_derives_from_the_base_with_its_exit_status():
    classes = defined_exceptions()
    assert len(classes) >= 13  # the base and the twelve that existed before it (UsageError now among its kinds)
    for qualified, cls in classes.items():
        assert issubclass(cls, Seq2SeqError), f"{qualified} does not derive from seq2seq.errors.Seq2SeqError"
        if cls.__name__ in FAILURES:
            assert not issubclass(cls, UsageError), qualified
        elif cls is not Seq2SeqError:
            assert issubclass(cls, UsageError) and cls.exit_code == 2, qualified


def test_an_interruption_exits_with_its_signal_status(tmp_path):
    from seq2seq.training.lifecycle import TrainingInterrupted

    stop = TrainingInterrupted("SIGTERM stopped training at step 3", tmp_path / "last.pt", 143)
    assert isinstance(stop, Seq2SeqError) and stop.exit_code == 143


def test_nothing_below_the_entry_points_imports_the_command_line_module():
    for path in PACKAGE.rglob("*.py"):
        if path.parent == PACKAGE:
            continue  # the entry points (translate, evaluate, inspect, train) may share cli.py
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "seq2seq.cli", f"{path.relative_to(PACKAGE)} imports seq2seq.cli"
