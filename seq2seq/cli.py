"""Command-line pieces shared by `seq2seq.translate` and `seq2seq.evaluate`: decoding options, loading a
checkpoint onto the device the runtime rule picks, reading input lines, and the `main` that reports a
`Seq2SeqError` in one line.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from seq2seq.allocator import bound_onednn_cache
from seq2seq.checkpoint import LoadedModel, load_model
from seq2seq.errors import Seq2SeqError, UsageError
from seq2seq.inference.ctranslate2_engine import COMPUTE_TYPES, CTranslate2Decoder
from seq2seq.inference.predict import quantize_int8
from seq2seq.runtime import DEVICES, PRECISIONS, resolve_device, resolve_precision

log = logging.getLogger("seq2seq.cli")

ENGINES = ("torch", "ctranslate2")
INVALID_UTF8_LISTED = 10  # input lines with invalid UTF-8 warned about one by one; one more warning says more follow


def decode_line(raw: bytes) -> str:
    """One input line as text: invalid UTF-8 becomes U+FFFD instead of an error, the line ending is dropped."""
    return raw.decode("utf-8", errors="replace").rstrip("\r\n")


def read_lines(stream: io.BufferedIOBase, name: str = "stdin") -> Iterator[str]:
    """Lines of a binary stream, split on b"\\n" only, a UTF-8 byte-order mark dropped from the first. A line that
    is not valid UTF-8 is still translated (its bad bytes as U+FFFD), with a warning naming `name` and the line."""
    invalid = 0
    for number, raw in enumerate(stream, start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            invalid += 1
            if invalid <= INVALID_UTF8_LISTED:
                log.warning("%s line %d is not valid UTF-8: its bad bytes are translated as U+FFFD", name, number)
            elif invalid == INVALID_UTF8_LISTED + 1:
                log.warning("%s has more lines that are not valid UTF-8 after line %d; they are not listed",
                            name, number)
        line = decode_line(raw)
        yield line.removeprefix("\ufeff") if number == 1 else line


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared with `seq2seq.evaluate`; defaults (None) fall back to the checkpoint's trainer settings."""
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint file (best.pt or last.pt of a run)")
    parser.add_argument("--beam-size", type=int,
                        help="beam width, 1 = greedy (default: trainer.test_beam_size of the checkpoint)")
    parser.add_argument("--length-penalty", type=float, help="GNMT length penalty exponent (default: as in training)")
    parser.add_argument("--max-len-a", type=float,
                        help="outputs stop at a * source length + b tokens: a (default: as in training)")
    parser.add_argument("--max-len-b", type=int,
                        help="outputs stop at a * source length + b tokens: b (default: as in training)")
    parser.add_argument("--max-tokens", type=int, default=4096,
                        help="token budget of a batch: sentences x longest source (default 4096)")
    parser.add_argument("--batch-size", type=int, help="at most this many sentences per batch (default: no limit)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto = the GPU when one is visible")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto = bf16 where the hardware has it (recent GPUs, CPUs with AMX or AVX512-BF16), "
                        "fp16 on older GPUs, else fp32")
    parser.add_argument("--int8", action="store_true",
                        help="CPU only: multiply in the Linear layers with int8 weights and activations (dynamic "
                        "quantisation): faster, slightly different outputs; the rest stays fp32. With --engine "
                        "ctranslate2: CTranslate2 computes in int8")
    parser.add_argument("--engine", choices=ENGINES, default="torch",
                        help="torch: seq2seq's own search; ctranslate2: the Transformer exported to CTranslate2 "
                        "(pip install 'seq2seq[ct2]'; the export is cached), the same outputs, faster on CPUs")
    parser.add_argument("--verbose", action="store_true", help="print speed (sentences/s, tokens/s) to stderr")


def decoding_options(args: argparse.Namespace, loaded: LoadedModel, device: torch.device) -> dict:
    """Keyword arguments for translate_sentences, from the command line or the checkpoint's trainer config."""
    trainer = loaded.config.trainer  # a checkpoint older than a key has the schema's default for it

    def pick(given, saved):
        return given if given is not None else saved

    options = {
        "beam_size": pick(args.beam_size, trainer.test_beam_size),
        "length_penalty": pick(args.length_penalty, trainer.length_penalty),
        "max_len_a": pick(args.max_len_a, trainer.max_len_a),
        "max_len_b": pick(args.max_len_b, trainer.max_len_b),
        "max_tokens": args.max_tokens,
        "max_sentences": args.batch_size,
        "device": device,
        "precision": "fp32" if args.int8 or args.engine == "ctranslate2"
        else resolve_precision(args.precision, device, setting="--precision"),
    }
    if args.int8 and args.precision not in ("auto", "fp32"):
        raise UsageError(f"--int8 computes in int8 and fp32, not {args.precision}; drop --precision {args.precision}.")
    for name in ("beam_size", "max_tokens"):
        if options[name] < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {options[name]}.")
    if options["max_sentences"] is not None and options["max_sentences"] < 1:
        raise UsageError(f"--batch-size must be at least 1, got {options['max_sentences']}.")
    if args.engine == "ctranslate2":
        options["decoder"] = ctranslate2_decoder(args, loaded, device)
    return options


def load(args: argparse.Namespace) -> tuple[LoadedModel, torch.device]:
    device = resolve_device(args.device, setting="--device")
    loaded = load_model(args.checkpoint, device=device)
    if args.int8 and args.engine == "torch":
        if device.type != "cpu":
            raise UsageError(f"--int8 quantises for CPU inference, but the model would run on {device}; "
                             "add --device cpu.")
        loaded.model = quantize_int8(loaded.model)
    log.info("loaded %s model from %s (step %s)", loaded.config.model.name, args.checkpoint,
             loaded.checkpoint.get("step", "?"))
    return loaded, device


def ctranslate2_decoder(args: argparse.Namespace, loaded: LoadedModel, device: torch.device) -> CTranslate2Decoder:
    """The CTranslate2 engine for a Transformer checkpoint: its float32 export (cached), run in int8 with --int8,
    else float32 on the CPU (outputs as ours) or the --precision of the GPU."""
    from seq2seq.export import cached_export, import_ctranslate2, transformer_of

    transformer_of(loaded, args.checkpoint)
    ctranslate2 = import_ctranslate2()
    if args.int8:
        precision = "int8"
    elif device.type == "cpu" and args.precision == "auto":
        precision = "fp32"
    else:
        precision = resolve_precision(args.precision, device, setting="--precision")
    compute_type = COMPUTE_TYPES[precision]
    if compute_type not in ctranslate2.get_supported_compute_types(device.type):
        raise UsageError(f"CTranslate2 cannot compute in {compute_type} on this {device.type}; "
                         "use --precision fp32 (or --int8).")
    folder = cached_export(loaded, args.checkpoint, "float32")
    log.info("CTranslate2 model %s, computing in %s", folder, compute_type)
    return CTranslate2Decoder(folder, loaded.src_tokenizer, loaded.tgt_tokenizer, device, compute_type,
                              torch.get_num_threads())


def read_file_lines(path: Path) -> Iterator[str]:
    with open(path, "rb") as handle:
        yield from read_lines(handle, str(path))


def run_command(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], None],
                argv: list[str] | None) -> int:
    """The `main` of translate and evaluate: parse `argv`, log to stderr (INFO with --verbose), `run`. A Seq2SeqError
    is one line and its exit status (2 for a problem the user can fix), Ctrl-C exit 130, and a reader that went away
    (`| head`) a quiet stop."""
    args = parser.parse_args(argv)
    bound_onednn_cache()  # before the first primitive: decoding's shrinking batches build many
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s",
                        stream=sys.stderr)
    try:
        run(args)
    except Seq2SeqError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # and keep Python from complaining at exit
        return 0
    except KeyboardInterrupt:
        return 130
    return 0
