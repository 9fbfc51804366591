"""SentencePiece subword models: trained on the training split only, cached by a hash of their data and settings.

Each side has its own Unicode normalisation (data.clean.src_normalization / tgt_normalization): cleaning applies
it to the training sentences, and the side's `Tokenizer` stores it and applies the same `normalize_text` to
whatever it is given (evaluation splits and typed input at translate time included). SentencePiece itself runs
with its `identity` rule, so it never folds characters a second, different way. Hence
`decode(encode(text)) == normalize_text(text, tokenizer.normalization)` for any text: characters never seen in
training come back through byte fallback instead of becoming <unk>. Targets are not normalised by default, so a
Chinese reference keeps its full-width punctuation (，！？：) and a perfect hypothesis can equal it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from seq2seq.atomic import atomic_write
from seq2seq.config import NORMALIZATION_FORMS, TokenizerConfig

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_IDS = {"pad_id": PAD_ID, "unk_id": UNK_ID, "bos_id": BOS_ID, "eos_id": EOS_ID}
LEGACY_NORMALIZATION = "NFKC"  # what both sides got before the form was recorded per side (checkpoints, caches)
TOKENIZER_FORMAT = 2  # bump when the training recipe changes, so cached models are not reused

# Scripts written without spaces between words (Han, kana, bopomofo, CJK radicals): each character is a word-like
# unit, for the cleaning's length ratio and for grouping attention by words.
UNSPACED_CHARACTER = re.compile(
    "[\u2e80-\u2fdf\u3040-\u30ff\u3100-\u312f\u31a0-\u31bf\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    "\U00020000-\U0003134f]"
)


def check_normalization(form: str | None, setting: str) -> str | None:
    """`form` if it is a Unicode normalisation form or null; else ValueError naming the setting."""
    if form is not None and form not in NORMALIZATION_FORMS:
        raise ValueError(f"{setting}={form!r} must be one of {', '.join(NORMALIZATION_FORMS)} or null (none).")
    return form


def normalize_text(text: str, form: str | None) -> str:
    """Unicode normalisation (`form`, or none) plus whitespace cleanup (strip, runs of any whitespace -> one space).

    The one normalisation shared by corpus cleaning and `Tokenizer.encode`, so training data and translate-time
    input of a side look alike (with NFKC: full-width ASCII, ideographic spaces and compatibility characters folded).
    """
    if form:
        text = unicodedata.normalize(form, text)
    return " ".join(text.split())


class Tokenizer:
    """A SentencePiece model with the project's special ids (PAD=0, UNK=1, BOS=2, EOS=3) and the Unicode
    normalisation of its side (None: texts are kept as written, up to whitespace runs)."""

    def __init__(self, proto: bytes, normalization: str | None) -> None:
        processor = spm.SentencePieceProcessor(model_proto=proto)
        found = {name: getattr(processor, name)() for name in SPECIAL_IDS}
        if found != SPECIAL_IDS:
            raise ValueError(f"SentencePiece model has special ids {found}; seq2seq needs {SPECIAL_IDS}.")
        self._proto = proto
        self._processor = processor
        self.normalization = check_normalization(normalization, "normalization")

    @classmethod
    def from_proto(cls, proto: bytes, normalization: str | None) -> Tokenizer:
        """Rebuild from serialized model bytes and the side's normalisation (as stored in checkpoints and the cache)."""
        return cls(proto, normalization)

    def __eq__(self, other: object) -> bool:
        """Same model and same normalisation: both encode every text alike."""
        return isinstance(other, Tokenizer) and (self._proto, self.normalization) == (other._proto, other.normalization)

    @property
    def proto(self) -> bytes:
        return self._proto

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    def normalize(self, text: str) -> str:
        """`text` as this side's training data was cleaned: what `decode(encode(text))` gives back."""
        return normalize_text(text, self.normalization)

    def encode(self, text: str) -> list[int]:
        """Normalised text -> piece ids, without BOS/EOS."""
        return self._processor.encode(self.normalize(text))

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """`encode` over many texts at once, in SentencePiece's own threads (-1: one per core)."""
        return self._processor.encode([self.normalize(text) for text in texts], num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; PAD/BOS/EOS are skipped, UNK (rare with byte fallback) renders as " ⁇ "."""
        return self._processor.decode([int(i) for i in ids if int(i) not in (PAD_ID, BOS_ID, EOS_ID)])

    def pieces(self, ids: Iterable[int]) -> list[str]:
        """Ids -> piece strings, one per id (e.g. for attention plot labels); specials show as <s>, </s>, <pad>."""
        return [self._processor.id_to_piece(int(i)) for i in ids]


def build_tokenizers(
    src: Sequence[str], tgt: Sequence[str], tok_cfg: TokenizerConfig, cache_dir: Path, normalization: tuple[str | None, str | None]
) -> tuple[Tokenizer, Tokenizer]:
    """Source and target tokenizers trained on these (already cleaned) training sentences, cached in
    `cache_dir`/tokenizers; `normalization` is the (source, target) form their cleaning applied.

    With `tok_cfg.joint` one model (of `src_vocab_size`) is trained on both sides and shared by the two tokenizers,
    each keeping its side's normalisation.
    """
    folder = Path(cache_dir) / "tokenizers"
    src_form, tgt_form = normalization
    if tok_cfg.joint:
        joint = _cached_model([*src, *tgt], tok_cfg, tok_cfg.src_vocab_size, folder)
        return Tokenizer(joint, src_form), Tokenizer(joint, tgt_form)
    return (
        Tokenizer(_cached_model(src, tok_cfg, tok_cfg.src_vocab_size, folder), src_form),
        Tokenizer(_cached_model(tgt, tok_cfg, tok_cfg.tgt_vocab_size, folder), tgt_form),
    )


def _cached_model(sentences: Sequence[str], tok_cfg: TokenizerConfig, vocab_size: int, folder: Path) -> bytes:
    """The serialized model for exactly these sentences and settings: loaded, or trained and stored atomically."""
    settings = _trainer_settings(tok_cfg, vocab_size)
    digest = hashlib.sha256(json.dumps({"format": TOKENIZER_FORMAT, **settings}, sort_keys=True).encode())
    for sentence in sentences:
        digest.update(sentence.encode("utf-8"))
        digest.update(b"\n")
    path = folder / f"{digest.hexdigest()[:32]}.model"
    if path.exists():
        try:
            proto = path.read_bytes()
            Tokenizer(proto, None)  # readable, with the project's special ids
            return proto
        except (OSError, RuntimeError, ValueError):
            pass  # an unreadable cache entry is simply retrained and overwritten
    proto = _train_sentencepiece([sentence for sentence in sentences if sentence], settings)
    with atomic_write(path) as handle:
        handle.write(proto)
    return proto


def _trainer_settings(tok_cfg: TokenizerConfig, vocab_size: int) -> dict[str, Any]:
    """SentencePiece trainer arguments. The vocabulary size is a soft limit (hard_vocab_limit=False): a small
    corpus (e.g. the Chinese side of Tatoeba) may not support as many pieces, and then gets fewer."""
    return {
        "model_type": tok_cfg.model_type,
        "vocab_size": vocab_size,
        "character_coverage": tok_cfg.character_coverage,
        "byte_fallback": tok_cfg.byte_fallback,
        "hard_vocab_limit": False,
        "normalization_rule_name": "identity",
        **SPECIAL_IDS,
    }


def _train_sentencepiece(sentences: list[str], settings: dict[str, Any]) -> bytes:
    """Train from memory and return the serialized model."""
    if not sentences:
        raise ValueError("cannot train a SentencePiece model: the training split has no sentences.")
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=writer,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
            **settings,
        )
    except RuntimeError as error:
        raise ValueError(
            f"SentencePiece training failed: {error}. With byte_fallback the vocabulary needs room for 260 "
            "special and byte pieces plus the characters kept by character_coverage: raise tokenizer.*_vocab_size."
        ) from error
    return writer.getvalue()
