"""The errors seq2seq reports to a user, and the exit status each kind maps to.

Every error a command can end with derives from `Seq2SeqError`, so an entry point (`train`, `translate`, `evaluate`,
`inspect`) catches one type, prints its one-line message and exits with its `exit_code`:

- `UsageError`, exit status 2: something the user can fix before running again: a command-line option or config
  key, a corpus, a checkpoint, a run folder, an output file (`ConfigError`, `CorpusError`, `CheckpointError`, ...
  derive from it in the modules that raise them);
- `Seq2SeqError` itself, exit status 1: a run that failed on its way (`TrainingError`, here: a loss that stayed
  non-finite, a batch too large; `CollectiveError`: a collective that timed out);
- an interruption carries its own status, 128 + the signal (`TrainingInterrupted`).

A message is one line that says what is wrong and what to do; it never quotes a library's advice verbatim.
"""

from __future__ import annotations


class Seq2SeqError(Exception):
    """An error a seq2seq command reports in one line; the process exits with `exit_code`."""

    exit_code: int = 1


class TrainingError(Seq2SeqError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says why and what to try."""


class UsageError(Seq2SeqError):
    """A problem the user can fix (an option, a config value, an input file, a checkpoint); exit status 2."""

    exit_code = 2
