"""Scoring a model during and after training (rank 0 only): validation loss and perplexity, BLEU/chrF of the
decoded validation split with samples and attention heatmaps in TensorBoard, and the final beam-search test.

Decoding goes through `predict.translate_sentences`, the path `seq2seq.translate` uses, so validation BLEU is
what a user of the checkpoint gets.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import torch

from seq2seq.analysis.alignment import HELD_OUT, AlignmentError, read_alignment_set, score_alignments
from seq2seq.config import RunConfig
from seq2seq.training import board
from seq2seq.data.batching import make_loader
from seq2seq.data.prepare import PreparedData
from seq2seq.data.tokenizer import Tokenizer
from seq2seq.data.split import spread_sample
from seq2seq.metrics import bleu_by_length, corpus_scores
from seq2seq.models.base import Seq2SeqModel, eval_mode
from seq2seq.inference.predict import translate_sentences, with_progress
from seq2seq.runtime import autocast
from seq2seq.training.update import token_loss

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger("seq2seq.train")


class Evaluator:
    def __init__(self, cfg: RunConfig, data: PreparedData, device: torch.device, precision: str,
                 writer: SummaryWriter) -> None:
        self.cfg = cfg
        self.tcfg = cfg.trainer
        self.data = data
        self.device = device
        self.precision = precision
        self.writer = writer
        valid = data.splits["valid"]
        self.attention_sources = board.attention_sources(
            valid["src"], valid["src_ids"], self.tcfg.num_attention_samples, cfg.attention_examples
        )
        self.alignment = None
        if cfg.data.alignments_path:
            self.alignment = AlignmentValidation(cfg, data.src_tokenizer, data.tgt_tokenizer, device)

    @torch.inference_mode()
    def loss(self, model: Seq2SeqModel, split: str = "valid") -> tuple[float, float]:
        """Per-token negative log-likelihood (no label smoothing) over a whole split, and its perplexity."""
        loader = make_loader(
            self.data.splits[split], self.tcfg.max_tokens, shuffle=False, pad_multiple=self.tcfg.pad_multiple
        )
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        tokens = 0
        with eval_mode(model):
            for batch in loader:
                tokens += batch.num_tgt_tokens
                batch = batch.to(self.device, non_blocking=True)
                with autocast(self.device, self.precision):
                    logits = model(batch.src, batch.src_mask, batch.tgt_in).logits
                total += token_loss(logits, batch.tgt_out)
        loss = total.item() / max(tokens, 1)
        return loss, math.exp(min(loss, 50.0))

    def translate(
        self, model: Seq2SeqModel, sources: list[str], beam_size: int, what: str = "validating"
    ) -> list[str]:
        """Detokenized translations through the same path as `seq2seq.translate`, with a progress bar on a terminal."""
        translations = translate_sentences(
            model, self.data.src_tokenizer, self.data.tgt_tokenizer, sources, beam_size=beam_size,
            length_penalty=self.tcfg.length_penalty, max_len_a=self.tcfg.max_len_a,
            max_len_b=self.tcfg.max_len_b, max_tokens=self.tcfg.max_tokens, device=self.device,
            precision=self.precision,
        )
        return [translation.text for translation in with_progress(translations, len(sources), what)]

    def validate(self, model: Seq2SeqModel, step: int, prefix: str = "valid", illustrate: bool = True) -> dict:
        """Loss, perplexity, BLEU and chrF on the validation split, logged under `prefix`; with `illustrate`,
        also the sample table and the attention heatmaps."""
        loss, ppl = self.loss(model)
        valid = self.data.splits["valid"]
        limit = self.tcfg.valid_max_sentences
        sample = valid.select(spread_sample(len(valid), limit, self.tcfg.seed))
        sources, references, count = list(sample["src"]), list(sample["tgt"]), len(sample)
        hypotheses = self.translate(model, sources, self.tcfg.valid_beam_size)
        scores = corpus_scores(hypotheses, references, self.cfg.data.tgt_lang)
        metrics = {"loss": loss, "ppl": ppl, "bleu": scores["bleu"], "chrf": scores["chrf"],
                   "bleu_signature": scores["bleu_signature"], "sentences": count}
        for name in ("loss", "ppl", "bleu", "chrf"):
            self.writer.add_scalar(f"{prefix}/{name}", metrics[name], step)
        if illustrate:
            board.log_samples(self.writer, sources, references, hypotheses, step, self.tcfg.num_text_samples)
            board.log_attention(
                self.writer, model, self.cfg.model.name, self.data.src_tokenizer, self.data.tgt_tokenizer,
                self.attention_sources, self.device, self.tcfg.max_len_a, self.tcfg.max_len_b, step,
            )
            if self.alignment is not None and model.has_attention:
                aer = self.alignment.log(model, self.writer, step)
                if aer is not None:
                    metrics["alignment_aer"] = aer
        return metrics

    def test(self, model: Seq2SeqModel, step: int, description: str) -> dict[str, Any]:
        """Beam search over the test split; scores overall and by source length, for results.json."""
        test_split = self.data.splits["test"]
        if not len(test_split):
            log.warning("data=%s has no test split: skipping the test evaluation", self.cfg.data.name)
            return {"test_bleu": None, "test_chrf": None, "test_bleu_by_length": []}
        limit = self.tcfg.test_max_sentences
        if limit is not None and limit < len(test_split):
            log.info("test on a seeded sample of %d of the %d test pairs (trainer.test_max_sentences): not comparable "
                     "with scores on the whole split", limit, len(test_split))
            test_split = test_split.select(spread_sample(len(test_split), limit, self.tcfg.seed))
        beam = self.tcfg.test_beam_size
        hypotheses = self.translate(model, list(test_split["src"]), beam, "testing")
        references = list(test_split["tgt"])
        tgt_lang = self.cfg.data.tgt_lang
        scores = corpus_scores(hypotheses, references, tgt_lang)
        buckets = bleu_by_length([len(ids) for ids in test_split["src_ids"]], hypotheses, references, tgt_lang)
        board.log_test(self.writer, scores, buckets, step)
        log.info(
            "test (%s, beam %d): BLEU %.2f | chrF %.2f | %s",
            description, beam, scores["bleu"], scores["chrf"], scores["bleu_signature"],
        )
        log.info("test BLEU by source length: %s", ", ".join(f"{b['bucket']}: {b['bleu']:.1f} ({b['count']})" for b in buckets))
        return {
            "test_bleu": scores["bleu"], "test_chrf": scores["chrf"], "test_sentences": len(hypotheses),
            "test_beam_size": beam, "length_penalty": self.tcfg.length_penalty,
            "bleu_signature": scores["bleu_signature"], "chrf_signature": scores["chrf_signature"],
            "test_bleu_by_length": buckets,
        }


class AlignmentValidation:
    """AER of the attention on the data.alignments_path pairs at every validation: each extraction's map is
    chosen on the first half of the pairs and its AER on the second half is the figure logged."""

    def __init__(self, cfg: RunConfig, src_tok: Tokenizer, tgt_tok: Tokenizer, device: torch.device) -> None:
        from seq2seq.data.corpus import CorpusError

        try:
            self.selection, self.held_out = read_alignment_set(cfg.data.alignments_path, cfg.data).halves()
        except (AlignmentError, CorpusError) as error:
            raise CorpusError(f"data.alignments_path: {error}") from error
        self.cfg = cfg
        self.src_tok, self.tgt_tok = src_tok, tgt_tok
        self.device = device
        log.info("attention AER at every validation: maps chosen on %s, reported on %s", self.selection.name,
                 self.held_out.name)

    def log(self, model: Seq2SeqModel, writer: SummaryWriter, step: int) -> float | None:
        """Score the model, log to TensorBoard and return the held-out AER of the overall choice; None, with a
        warning, when the pairs cannot be scored (the run goes on)."""
        trainer = self.cfg.trainer
        try:
            report = score_alignments(
                model, self.src_tok, self.tgt_tok, self.selection, self.held_out,
                self.cfg.data.src_lang, self.cfg.data.tgt_lang, self.device, trainer.max_len_a, trainer.max_len_b,
            ).as_dict()
        except AlignmentError as error:
            log.warning("no alignment AER at step %d: %s", step, error)
            return None
        board.log_alignment(writer, report, step)
        best = report["best"]
        log.info("alignment: held-out AER %.1f %% (%s, %s, %s; chosen on %d pairs, reported on %d)",
                 100 * best[HELD_OUT]["aer"], best["explanation"], best["map"], best["extraction"],
                 report["pairs"]["selection"], report["pairs"][HELD_OUT])
        return best[HELD_OUT]["aer"]
