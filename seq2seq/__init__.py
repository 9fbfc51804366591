"""seq2seq: train, compare and inspect neural machine translation models."""

__version__ = "0.1.0"
