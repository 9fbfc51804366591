"""Export a trained Transformer to CTranslate2: `python -m seq2seq.export` (console script `seq2seq-export`).

    python -m seq2seq.export runs/.../best.pt exported/ --quantization int8

The folder is a CTranslate2 model (`ctranslate2.Translator(folder)`) built with `ctranslate2.specs.TransformerSpec`
from our weights, plus the two SentencePiece models (source.spm, target.spm) so it is complete on its own. Feed it
SentencePiece pieces of the normalised text (CTranslate2 appends the "</s>" our encoder was trained with) and
decode its output pieces with target.spm; `seq2seq-translate --engine ctranslate2` does all of this for you.

What the mapping has to get right, because our model is our own and not one a CTranslate2 converter knows:
  - pre-norm or post-norm (model.norm_first), and the final LayerNorm of each stack that only pre-norm has;
  - self-attention takes our fused q/k/v projection as it is, cross-attention our query and fused k/v projections;
  - embeddings are multiplied by sqrt(d_model); the position table is written out explicitly (CTranslate2's own
    sinusoids put sin and cos in halves and start at position 1, ours interleave them and start at 0);
  - vocabularies are our SentencePiece pieces in id order (<pad> 0, <unk> 1, <s> 2, </s> 3), so ids line up;
  - the LayerNorm epsilon is ours (PyTorch's 1e-5), the activation ReLU, the output projection has no bias.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from seq2seq.checkpoint import LoadedModel, load_model
from seq2seq.cli import run_command
from seq2seq.data.tokenizer import BOS_ID, EOS_ID, UNK_ID, Tokenizer
from seq2seq.errors import UsageError
from seq2seq.models.transformer import TransformerSeq2Seq
from seq2seq.paths import cache_dir

QUANTIZATIONS = ("float32", "int8_float32", "int8", "bfloat16")
EXPORT_FORMAT = 1  # bump when the exported layout changes, so cached exports are rebuilt
MANIFEST = "seq2seq.json"  # what the folder was exported from, beside CTranslate2's own files


def import_ctranslate2():
    """The `ctranslate2` module, or a UsageError saying how to install it (it is an optional dependency)."""
    try:
        import ctranslate2
    except ImportError as error:
        raise UsageError("CTranslate2 is not installed: pip install 'seq2seq[ct2]' (or pip install ctranslate2).") \
            from error
    return ctranslate2


def transformer_of(loaded: LoadedModel, source: str | Path) -> TransformerSeq2Seq:
    """The checkpoint's model if it is a Transformer; any other family is refused in one line."""
    if not isinstance(loaded.model, TransformerSeq2Seq):
        raise UsageError(
            f"CTranslate2 export is for the Transformer; {source} holds a {loaded.config.model.name} model. "
            "Translate it with seq2seq's own search (no --engine ctranslate2)."
        )
    return loaded.model


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy().copy()


def _linear(spec, linear: torch.nn.Linear) -> None:
    spec.weight = _array(linear.weight)
    if linear.bias is not None:
        spec.bias = _array(linear.bias)


def _layer_norm(spec, norm: torch.nn.LayerNorm) -> None:
    spec.gamma = _array(norm.weight)
    spec.beta = _array(norm.bias)


def _attention(spec, attention, norm: torch.nn.LayerNorm) -> None:
    """CTranslate2 self-attention: linear[0] fused q/k/v, linear[1] output; cross-attention: linear[0] query,
    linear[1] fused k/v, linear[2] output. Our fused projections are laid out the same way (q, k, v blocks, each
    split into heads in order)."""
    projections = ([attention.qkv_projection] if hasattr(attention, "qkv_projection")
                   else [attention.q_projection, attention.kv_projection])
    for linear_spec, linear in zip(spec.linear, [*projections, attention.out_projection], strict=True):
        _linear(linear_spec, linear)
    _layer_norm(spec.layer_norm, norm)


def _feed_forward(spec, layer) -> None:
    _linear(spec.linear_0, layer.feed_forward.up)
    _linear(spec.linear_1, layer.feed_forward.down)
    _layer_norm(spec.layer_norm, layer.ff_norm)


def _positions(model: TransformerSeq2Seq) -> np.ndarray:
    table = model.learned_positions.weight if model.learned_positions is not None else model.position_table
    return _array(table)


def transformer_spec(model: TransformerSeq2Seq, src_tokenizer: Tokenizer, tgt_tokenizer: Tokenizer):
    """A `ctranslate2.specs.TransformerSpec` holding `model`'s weights and both vocabularies."""
    import_ctranslate2()
    from ctranslate2.specs import common_spec, transformer_spec as specs

    norm_first = model.encoder_layers[0].norm_first
    num_heads = model.encoder_layers[0].self_attention.num_heads
    spec = specs.TransformerSpec.from_config(
        (len(model.encoder_layers), len(model.decoder_layers)), num_heads, pre_norm=norm_first,
        activation=common_spec.Activation.RELU,
    )
    spec.config.layer_norm_epsilon = float(model.encoder_layers[0].self_norm.eps)
    spec.config.add_source_eos = True
    for name, token_id in (("unk_token", UNK_ID), ("bos_token", BOS_ID), ("eos_token", EOS_ID),
                           ("decoder_start_token", BOS_ID)):
        setattr(spec.config, name, tgt_tokenizer.pieces([token_id])[0])

    for stack, embedding in ((spec.encoder, model.src_embed), (spec.decoder, model.tgt_embed)):
        embeddings = stack.embeddings[0] if isinstance(stack.embeddings, list) else stack.embeddings
        embeddings.weight = _array(embedding.weight)
        stack.scale_embeddings = True  # multiply by sqrt(d_model), as `_embed` does
        stack.position_encodings.encodings = _positions(model)
    if norm_first:
        _layer_norm(spec.encoder.layer_norm, model.encoder_norm)
        _layer_norm(spec.decoder.layer_norm, model.decoder_norm)
    for layer_spec, layer in zip(spec.encoder.layer, model.encoder_layers, strict=True):
        _attention(layer_spec.self_attention, layer.self_attention, layer.self_norm)
        _feed_forward(layer_spec.ffn, layer)
    for layer_spec, layer in zip(spec.decoder.layer, model.decoder_layers, strict=True):
        _attention(layer_spec.self_attention, layer.self_attention, layer.self_norm)
        _attention(layer_spec.attention, layer.cross_attention, layer.cross_norm)
        _feed_forward(layer_spec.ffn, layer)
    _linear(spec.decoder.projection, model.output_projection)

    spec.register_source_vocabulary(src_tokenizer.pieces(range(src_tokenizer.vocab_size)))
    spec.register_target_vocabulary(tgt_tokenizer.pieces(range(tgt_tokenizer.vocab_size)))
    return spec


def export(loaded: LoadedModel, source: str | Path, output_dir: Path, quantization: str = "float32") -> Path:
    """Write the CTranslate2 model of a loaded Transformer checkpoint to `output_dir` (replaced when it exists,
    and only once complete: the folder is built beside it and renamed into place)."""
    if quantization not in QUANTIZATIONS:
        raise UsageError(f"--quantization {quantization} is not one of {', '.join(QUANTIZATIONS)}.")
    model = transformer_of(loaded, source)
    spec = transformer_spec(model, loaded.src_tokenizer, loaded.tgt_tokenizer)
    spec.validate()
    spec.optimize(quantization=quantization)
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        spec.save(str(staging))
        (staging / "source.spm").write_bytes(loaded.src_tokenizer.proto)
        (staging / "target.spm").write_bytes(loaded.tgt_tokenizer.proto)
        manifest = {"format": EXPORT_FORMAT, "checkpoint": str(source), "step": loaded.checkpoint.get("step"),
                    "quantization": quantization, "src_normalization": loaded.src_tokenizer.normalization,
                    "tgt_normalization": loaded.tgt_tokenizer.normalization}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def cached_export(loaded: LoadedModel, checkpoint: Path, quantization: str) -> Path:
    """The export of `checkpoint` in `quantization`, under cache_dir()/ctranslate2/ keyed by the checkpoint's
    bytes: made on first use, reused while the checkpoint is unchanged."""
    digest = hashlib.sha256(f"{EXPORT_FORMAT}:{quantization}:".encode())
    with open(checkpoint, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    folder = cache_dir() / "ctranslate2" / f"{digest.hexdigest()[:32]}-{quantization}"
    if not (folder / MANIFEST).is_file():
        export(loaded, checkpoint, folder, quantization)
    return folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seq2seq-export",
        description="Convert a trained seq2seq Transformer checkpoint into a CTranslate2 model folder.",
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint file (best.pt or last.pt of a run)")
    parser.add_argument("output_dir", type=Path, help="folder to write (replaced if it exists)")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="float32",
                        help="weight type of the export (default float32: outputs as seq2seq's own search)")
    parser.add_argument("--verbose", action="store_true", help="log progress to stderr")
    return parser


def run(args: argparse.Namespace) -> None:
    folder = export(load_model(args.checkpoint), args.checkpoint, args.output_dir, args.quantization)
    print(f"wrote CTranslate2 model ({args.quantization}) to {folder}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
