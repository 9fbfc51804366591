"""The configuration schema: every key of `python -m seq2seq.train`, typed, with its default, what it allows and a
one-line doc, in one place.

Defaults live here and nowhere else: the YAML files under configs/ hold only what a config group changes (a data
preset's corpus, a model family's optimisation recipe), never a copy of a default (configs/README.md).

The dataclasses below are registered in Hydra's ConfigStore: `base_train` under configs/train.yaml types every
group, and each model file names its family's schema first (`defaults: [base_transformer, _self_]`), so a misspelt
key or a value of the wrong type fails while the config is composed (importing this module registers them, which
every module that builds models or data does; a script that composes configs/train.yaml needs it imported). The
YAML files under configs/ hold the recipes: the values chosen for a corpus or a model, and why. A model file
without a schema line (a test's tiny model) still composes and is checked by `check_config`.
`python -m seq2seq.train --cfg job` prints every key as composed.

Types are checked by OmegaConf while composing; `check_config` then checks what a type cannot say (ranges, names
from a closed list, rules between keys, what this machine can run), reports every problem at once, and returns the
typed objects (`RunConfig`) that the code reads from then on: nothing below the command line sees a DictConfig.
A key's `metadata` holds its doc and what it allows (`setting`); the cross-key rules are each dataclass's `rules`.

Checkpoints store the config as plain containers; `saved_config` lays one over these defaults as the same typed
objects, so a checkpoint written before a key existed still loads (and one written with a key since renamed).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from seq2seq.errors import UsageError
from seq2seq.runtime import DEVICES, PRECISIONS, RuntimeSettingError, resolve_device, resolve_precision

# Allowed names of the keys that pick an implementation; the modules that implement them import these.
DATA_FORMATS = ("tsv", "json", "csv", "parquet", "hub")
TOKENIZER_TYPES = ("unigram", "bpe")
SCHEDULES = ("inverse_sqrt", "cosine", "constant")
CELLS = ("gru", "lstm")
CONTEXTS = ("final", "mean", "max")
POSITIONALS = ("sinusoidal", "learned")
NORMALIZATION_FORMS = ("NFC", "NFD", "NFKC", "NFKD")
RESUME_RESETS = ("schedule", "optimizer", "sampler", "runtime")

# Decoding defaults of every entry point (trainer, inference library, translate, evaluate, inspect).
BEAM_SIZE = 5
LENGTH_PENALTY = 1.0
MAX_LEN_A = 1.5
MAX_LEN_B = 10


class ConfigError(UsageError, ValueError):
    """A configuration that cannot work; reported as one line per problem, exit status 2."""


def setting(
    default: Any,
    doc: str,
    *,
    choices: tuple[str, ...] = (),
    at_least: float | None = None,
    above: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
) -> Any:
    """A dataclass field with its one-line doc and what it allows beyond its type (checked by `check_config`)."""
    allowed = {"doc": doc, "choices": choices, "at_least": at_least, "above": above, "below": below, "at_most": at_most}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=allowed)
    return field(default=default, metadata=allowed)


# ----------------------------------------------------------------------------- data and tokenizer


@dataclass
class SplitConfig:
    valid_size: Optional[int] = setting(None, "validation pairs carved from training if none are given", at_least=1)
    test_size: Optional[int] = setting(None, "test pairs carved from training when the corpus has none", at_least=1)
    seed: int = setting(1234, "seed of the grouped split")


@dataclass
class CleanConfig:
    src_normalization: Optional[str] = setting(
        "NFKC", "Unicode form of sources (training and translate input); null keeps them as written",
        choices=NORMALIZATION_FORMS,
    )
    tgt_normalization: Optional[str] = setting(
        None, "Unicode form of targets; null keeps them as written, so a hypothesis can equal its reference",
        choices=NORMALIZATION_FORMS,
    )
    max_chars: int = setting(300, "a pair with a side longer than this (characters) is dropped", at_least=1)
    max_length_ratio: float = setting(9.0, "longer / shorter side in words (one Chinese character = one word)", above=0)
    deduplicate: bool = setting(True, "drop exact duplicate pairs")


@dataclass
class DataConfig:
    name: str = setting(MISSING, "name of the data config; runs/<name>/ holds its runs")
    format: str = setting(MISSING, "how the corpus is stored", choices=DATA_FORMATS)
    path: Optional[str] = setting(None, "the training corpus file; null looks in mirror_path, then download_url")
    valid_path: Optional[str] = setting(None, "own validation file, kept whole (format as data.format)")
    test_path: Optional[str] = setting(None, "own test file, kept whole (format as data.format)")
    alignments_path: Optional[str] = setting(None, "X: pairs X.tsv and Pharaoh links X.align, scored for AER at "
                                             "each validation")
    mirror_path: Optional[str] = setting(None, "corpus path below $SEQ2SEQ_DATA_MIRROR or data/")
    download_url: Optional[str] = setting(None, "zip archive to download when the corpus is nowhere local")
    download_member: Optional[str] = setting(None, "the corpus file inside that archive")
    hub_name: Optional[str] = setting(None, "Hugging Face dataset name (format=hub)")
    hub_config: Optional[str] = setting(None, "Hugging Face dataset config (format=hub)")
    columns: Optional[list[str]] = setting(None, "language of each column of a TSV/CSV file, e.g. [en, zh]")
    src_lang: str = setting(MISSING, "source language code (a column name)")
    tgt_lang: str = setting(MISSING, "target language code (a column name)")
    split: SplitConfig = field(default_factory=SplitConfig, metadata={"doc": "the grouped train/valid/test split"})
    num_proc: Optional[int] = setting(None, "processes that clean and tokenize; null = every core", at_least=1)
    clean: CleanConfig = field(default_factory=CleanConfig, metadata={"doc": "cleaning of the training pairs"})

    def rules(self) -> Iterator[str]:
        if self.src_lang == self.tgt_lang:
            yield f"data.src_lang and data.tgt_lang are both {self.src_lang!r}; pick two different languages"


@dataclass
class TokenizerConfig:
    model_type: str = setting("unigram", "SentencePiece algorithm", choices=TOKENIZER_TYPES)
    src_vocab_size: int = setting(4000, "source pieces (the joint model's size with joint=true)", at_least=8)
    tgt_vocab_size: int = setting(4000, "target pieces", at_least=8)
    joint: bool = setting(False, "one shared model for both sides (vocabulary = src_vocab_size)")
    character_coverage: float = setting(0.9995, "share of characters the pieces must cover", above=0, at_most=1)
    byte_fallback: bool = setting(True, "spell unseen characters as bytes, so no input is ever unknown")
    max_sentences: int = setting(300000, "training rows sampled (seeded) to train the models", at_least=1)


# ----------------------------------------------------------------------------- models


@dataclass
class ModelConfig:
    """What every family has; each family's schema adds its own sizes."""

    name: str = setting(MISSING, "model family: rnn | bahdanau | transformer")
    encoder_layers: int = setting(2, "encoder layers", at_least=1)
    decoder_layers: int = setting(2, "decoder layers", at_least=1)
    dropout: float = setting(0.2, "dropout probability", at_least=0, below=1)
    tie_output: bool = setting(False, "tie the target embeddings and the output projection")

    def rules(self) -> Iterator[str]:
        return iter(())


@dataclass
class RecurrentConfig(ModelConfig):
    """What the two recurrent families share."""

    cell: str = setting("gru", "recurrent cell", choices=CELLS)
    embed_dim: int = setting(256, "embedding size", at_least=1)
    hidden_size: int = setting(256, "recurrent state size (per direction in a bidirectional encoder)", at_least=1)


@dataclass
class RNNConfig(RecurrentConfig):
    name: str = setting("rnn", "model family")
    bidirectional: bool = setting(True, "the context joins the final forward and backward states")
    context: str = setting("final", "the source in one vector: final states, or states pooled over positions",
                           choices=CONTEXTS)


@dataclass
class BahdanauConfig(RecurrentConfig):
    name: str = setting("bahdanau", "model family")
    encoder_layers: int = setting(1, "encoder layers", at_least=1)
    decoder_layers: int = setting(1, "decoder layers", at_least=1)
    attention_dim: int = setting(256, "size of the space where v . tanh(W_s s + W_h h) is scored", at_least=1)


@dataclass
class TransformerConfig(ModelConfig):
    name: str = setting("transformer", "model family")
    d_model: int = setting(256, "model width", at_least=1)
    num_heads: int = setting(4, "attention heads (must divide d_model)", at_least=1)
    encoder_layers: int = setting(3, "encoder layers", at_least=1)
    decoder_layers: int = setting(3, "decoder layers", at_least=1)
    ff_dim: int = setting(1024, "feed-forward inner size", at_least=1)
    dropout: float = setting(0.1, "dropout on embeddings and on each sub-layer output", at_least=0, below=1)
    attention_dropout: float = setting(0.0, "dropout on attention weights (> 0 leaves the fused kernel)",
                                       at_least=0, below=1)
    norm_first: bool = setting(True, "pre-norm (true) or post-norm (false)")
    positional: str = setting("sinusoidal", "position encoding", choices=POSITIONALS)
    max_positions: int = setting(512, "longest source or target (BOS included) the model accepts", at_least=1)
    tie_output: bool = setting(True, "tie the target embeddings and the output projection")
    share_embeddings: bool = setting(False, "one embedding for both sides (needs tokenizer.joint=true)")

    def rules(self) -> Iterator[str]:
        if self.d_model % self.num_heads:
            yield (f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}; "
                   "pick sizes that divide")


MODEL_CONFIGS: dict[str, type[ModelConfig]] = {
    "rnn": RNNConfig, "bahdanau": BahdanauConfig, "transformer": TransformerConfig,
}


# ----------------------------------------------------------------------------- optimisation and training


@dataclass
class OptimConfig:
    lr: float = setting(2.0e-3, "peak learning rate", above=0)
    betas: list[float] = setting([0.9, 0.98], "AdamW betas: two numbers in [0, 1)")
    eps: float = setting(1.0e-9, "AdamW epsilon", above=0)
    weight_decay: float = setting(1.0e-4, "AdamW weight decay (weight matrices only)", at_least=0)
    schedule: str = setting("inverse_sqrt", "learning-rate schedule after the warmup (cosine: down to min_lr_ratio "
                            "at the run's end, the step budget or, sooner, where the time limit stops it)",
                            choices=SCHEDULES)
    warmup_steps: int = setting(400, "linear warmup updates", at_least=0)
    min_lr_ratio: float = setting(0.05, "cosine floor as a fraction of lr", at_least=0, at_most=1)

    def rules(self) -> Iterator[str]:
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            yield f"optim.betas={list(self.betas)!r} must be two numbers in [0, 1), e.g. [0.9, 0.98]"


@dataclass
class TrainerConfig:
    max_steps: Optional[int] = setting(20000, "optimizer updates; the first of the three limits wins", at_least=1)
    max_epochs: Optional[int] = setting(None, "passes over the training data", at_least=1)
    time_limit_minutes: Optional[float] = setting(24, "wall-clock training budget", above=0)
    eval_every: int = setting(400, "updates between validations", at_least=1)
    log_every: int = setting(50, "updates between log lines", at_least=1)
    max_tokens: int = setting(1500, "token budget of a batch (source or target side, padding included)", at_least=1)
    pad_multiple: int = setting(8, "padded lengths rounded up to a multiple of this (few distinct shapes)", at_least=1)
    accumulate: int = setting(1, "batches whose gradients make one update", at_least=1)
    grad_clip: Optional[float] = setting(1.0, "gradient norm clip; 0 or null: no clipping", at_least=0)
    label_smoothing: float = setting(0.1, "label smoothing of the loss", at_least=0, below=1)
    device: str = setting("auto", "auto = the GPU when one is visible", choices=DEVICES)
    precision: str = setting("auto", "auto = bf16 where the hardware has it, fp16 on older GPUs, else fp32",
                             choices=PRECISIONS)
    compile: bool = setting(False, "torch.compile the training forward")
    num_threads: Optional[int] = setting(None, "CPU threads per process (null: OMP_NUM_THREADS or cores / processes)",
                                         at_least=1)
    seed: int = setting(1234, "seed of initialisation, batching and dropout")
    resume: Optional[str] = setting(None, "a checkpoint to continue from, or auto (the newest run of this data/model)")
    resume_reset: Any = setting(
        [], "on resume, accept a change instead of refusing it; these start afresh: schedule, optimizer, sampler, "
        "runtime (another device or precision) (one or a list)"
    )
    patience: Optional[int] = setting(
        None, "stop after this many validations without a better BLEU (or, at equal BLEU, loss)", at_least=1
    )
    max_nonfinite_steps: int = setting(20, "consecutive non-finite losses tolerated before stopping", at_least=1)
    max_oom_steps: int = setting(10, "consecutive updates skipped for out of memory before stopping", at_least=1)
    collective_timeout_minutes: float = setting(30, "torchrun: how long a rank waits for the others", above=0)
    average_last: int = setting(5, "average the weights of the last N validations (0: off)", at_least=0)
    valid_beam_size: int = setting(1, "beam width during validation (1 = greedy)", at_least=1)
    test_beam_size: int = setting(BEAM_SIZE, "beam width of the test and of translate/evaluate", at_least=1)
    length_penalty: float = setting(LENGTH_PENALTY, "GNMT length penalty exponent", at_least=0)
    max_len_a: float = setting(MAX_LEN_A, "outputs stop at max_len_a * source length + max_len_b tokens", at_least=0)
    max_len_b: int = setting(MAX_LEN_B, "see max_len_a", at_least=1)
    valid_max_sentences: Optional[int] = setting(
        None, "decode a seeded sample of this many validation sentences, spread over the split", at_least=1
    )
    test_max_sentences: Optional[int] = setting(
        None, "the final test on a seeded sample of this many pairs (quick trials; not comparable)", at_least=1
    )
    num_attention_samples: int = setting(3, "validation pairs drawn as heatmaps", at_least=0)
    num_text_samples: int = setting(5, "validation translations shown in TensorBoard", at_least=0)
    save_every_minutes: Optional[float] = setting(None, "also write last.pt this often between validations", above=0)

    @property
    def resets(self) -> frozenset[str]:
        """trainer.resume_reset as a set (one name or a list on the command line)."""
        value = self.resume_reset or []
        return frozenset([value] if isinstance(value, str) else value)

    def rules(self) -> Iterator[str]:
        if not (self.max_steps or self.max_epochs or self.time_limit_minutes):
            yield ("set at least one of trainer.max_steps, trainer.max_epochs or trainer.time_limit_minutes, "
                   "or training never ends")
        for name in sorted(self.resets - set(RESUME_RESETS)):
            yield (f"trainer.resume_reset={self.resume_reset}: {name!r} is not one of {', '.join(RESUME_RESETS)}; "
                   "e.g. trainer.resume_reset=[sampler]")
        try:
            resolve_precision(self.precision, resolve_device(self.device))
        except RuntimeSettingError as error:
            yield str(error)


@dataclass
class RunConfig:
    """Everything one training run is configured with: the top of `configs/train.yaml`; a model file brings its
    family's schema (MODEL_CONFIGS)."""

    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "the corpus (configs/data/)"})
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig, metadata={"doc": "SentencePiece models"})
    model: Any = field(default=MISSING, metadata={"doc": "the model (configs/model/, schema MODEL_CONFIGS)"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"doc": "AdamW and its schedule"})
    trainer: TrainerConfig = field(default_factory=TrainerConfig, metadata={"doc": "the training loop"})
    attention_examples: list[str] = setting([], "source sentences whose attention is drawn at every validation")

    def rules(self) -> Iterator[str]:
        if getattr(self.model, "share_embeddings", False) and not self.tokenizer.joint:
            yield "model.share_embeddings=true needs tokenizer.joint=true (one vocabulary for both sides)"


def register() -> None:
    """Put the schema where configs/ can name it: `base_train` and, in the model group, `base_<family>`."""
    store = ConfigStore.instance()
    store.store(name="base_train", node=RunConfig)
    for family, schema in MODEL_CONFIGS.items():
        store.store(group="model", name=f"base_{family}", node=schema, package="model")


register()


def saved_config(saved: Mapping[str, Any]) -> RunConfig:
    """A stored config (a checkpoint's, a run's .hydra/config.yaml) as the schema's objects: a key the file predates
    takes its default, a key since removed is dropped, a key since renamed is carried over. Unchecked (the file was
    valid when it was written), so no old file fails to load."""
    values = OmegaConf.to_container(OmegaConf.create(_plain(saved)), resolve=True)
    clean = (values.get("data") or {}).get("clean") or {}
    if "normalization" in clean:  # before the per-side keys, one form for both sides
        clean.setdefault("src_normalization", clean["normalization"])
        clean.setdefault("tgt_normalization", clean["normalization"])
    model = values.get("model") or {}
    family = MODEL_CONFIGS.get(model.get("name"), ModelConfig)
    return _lenient(RunConfig, {**values, "model": _lenient(family, model)})


def _lenient(schema: type, values: Mapping[str, Any]) -> Any:
    """`schema` from the keys of `values` it has (nested groups as their dataclasses), the rest at their defaults."""
    hints = typing.get_type_hints(schema)
    given = {}
    for spec in dataclasses.fields(schema):
        if spec.name in values:
            kind, value = _kind(hints[spec.name])[0], values[spec.name]
            given[spec.name] = _lenient(kind, value) if dataclasses.is_dataclass(kind) and isinstance(value, Mapping) \
                else value
    return schema(**given)


# ----------------------------------------------------------------------------- checking


def _kind(hint: Any) -> tuple[Any, bool]:
    """(the type, whether null is allowed) of a field's type hint."""
    arguments = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in arguments:
        return next(a for a in arguments if a is not type(None)), True
    return hint, False


def _type_name(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(kind)[0]).removeprefix('a ').removeprefix('an ')}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, str(kind))


def _has_type(value: Any, kind: Any) -> bool:
    """Strict: true/false is not a number and 1 is not true, so a plain dict is checked as tightly as Hydra does."""
    if kind is Any:
        return True
    if typing.get_origin(kind) is list:
        return isinstance(value, (list, tuple)) and all(_has_type(item, typing.get_args(kind)[0]) for item in value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def allowed_text(kind: Any, nullable: bool, meta: Mapping[str, Any]) -> str:
    """What a key allows, in words: 'a positive integer or null', 'a number in [0, 1)', 'one of a, b'."""
    if meta.get("choices"):
        text = f"one of {', '.join(meta['choices'])}"
    else:
        low, high = meta.get("at_least"), meta.get("at_most")
        above, below = meta.get("above"), meta.get("below")
        noun = "integer" if kind is int else "number"
        if kind is int and low == 1 and high is None and below is None:
            text = "a positive integer"
        elif above == 0 and high is None and below is None:
            text = f"a positive {noun}"
        elif (low is not None or above is not None) and (high is not None or below is not None):
            text = (f"{_type_name(kind)} in {'[' if low is not None else '('}{low if low is not None else above}, "
                    f"{high if high is not None else below}{']' if high is not None else ')'}")
        elif low is not None or above is not None:
            text = f"{_type_name(kind)} {'>=' if low is not None else '>'} {low if low is not None else above}"
        else:
            text = _type_name(kind)
    return f"{text} or null" if nullable else text


def _in_range(value: Any, meta: Mapping[str, Any]) -> bool:
    if meta.get("choices"):
        return value in meta["choices"]
    return not (
        (meta.get("at_least") is not None and value < meta["at_least"])
        or (meta.get("above") is not None and value <= meta["above"])
        or (meta.get("below") is not None and value >= meta["below"])
        or (meta.get("at_most") is not None and value > meta["at_most"])
        or (isinstance(value, float) and value != value)
    )


def _where(prefix: str, schema: Any) -> str:
    """How a message names a group: 'trainer', 'model=rnn' (a model's keys depend on its family), 'the config'."""
    family = next((name for name, family in MODEL_CONFIGS.items() if family is schema), None)
    return f"model={family}" if prefix == "model" and family else prefix or "the config"


def unknown_key_message(key: str, known: list[str], where: str) -> str:
    """'trainer.max_stpes is not a key of trainer; did you mean trainer.max_steps?' (difflib's closest, if any)."""
    prefix, _, name = key.rpartition(".")
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = (f"did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close
            else f"its keys are {', '.join(known)}")
    return f"{key} is not a key of {where}; {hint} (python -m seq2seq.train --cfg job lists every key)"


def _problems(values: Mapping[str, Any], schema: type, prefix: str) -> Iterator[str]:
    """Each key of `values` against its field in `schema`: unknown, unset, wrong type, or outside what it allows."""
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in values:
        if key not in fields:
            yield unknown_key_message(f"{prefix}{key}", list(fields), _where(prefix.rstrip("."), schema))
    for name, spec in fields.items():
        if name not in values:
            continue
        value, (kind, nullable) = values[name], _kind(hints[name])
        where = f"{prefix}{name}={value!r}"
        if value == "???":
            yield f"{prefix}{name} is not set; give it a value ({spec.metadata.get('doc', '')})"
        elif dataclasses.is_dataclass(kind):
            if isinstance(value, Mapping):
                yield from _problems(value, kind, f"{prefix}{name}.")
            else:
                yield f"{where} must be a group of keys ({', '.join(f.name for f in dataclasses.fields(kind))})"
        elif value is None:
            if not nullable:
                yield f"{where} must be {allowed_text(kind, False, spec.metadata)}, not null"
        elif not _has_type(value, kind):
            yield f"{where} must be {allowed_text(kind, nullable, spec.metadata)}"
        elif not _in_range(value, spec.metadata):
            verb = "is not" if spec.metadata.get("choices") else "must be"
            yield f"{where} {verb} {allowed_text(kind, nullable, spec.metadata)}"


def _model_schema(values: Mapping[str, Any]) -> type[ModelConfig]:
    name = values.get("name")
    if name not in MODEL_CONFIGS:
        raise ConfigError(
            f"unknown model.name={name!r}; choose one of {', '.join(MODEL_CONFIGS)} (e.g. model=transformer)"
        )
    return MODEL_CONFIGS[name]


def _plain(values: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(values):
        return dataclasses.asdict(values)
    if isinstance(values, DictConfig):
        return OmegaConf.to_container(values, resolve=True)
    return dict(values)


def _instance(schema: type, values: Mapping[str, Any]) -> Any:
    """`schema` built from checked plain values, nested groups as their own dataclasses."""
    hints = typing.get_type_hints(schema)
    return schema(**{
        name: _instance(hints[name], value) if dataclasses.is_dataclass(hints[name]) else value
        for name, value in values.items()
    })


def model_config(values: Mapping[str, Any]) -> ModelConfig:
    """A model section (DictConfig or dict; keys left out take the family's defaults) as its family's schema.

    Raises ConfigError naming every key that is unknown or whose value cannot work.
    """
    values = _plain(values)
    schema = _model_schema(values)
    problems = list(_problems(values, schema, "model."))
    if not problems:
        config = _instance(schema, values)
        problems = list(config.rules())
        if not problems:
            return config
    raise ConfigError(f"model={values['name']}: " + "; ".join(problems))


def check_config(cfg: DictConfig) -> RunConfig:
    """The composed training config as the schema's objects, or a ConfigError that lists every problem, one a line."""
    values = _plain(cfg)
    problems: list[str] = []
    model = values.get("model") or {}
    try:
        model_schema = _model_schema(model)
    except ConfigError as error:
        problems.append(str(error))
    else:
        problems += _problems(model, model_schema, "model.")
    problems += _problems({key: value for key, value in values.items() if key != "model"}, RunConfig, "")
    if not problems:
        config = _instance(RunConfig, {**values, "model": _instance(model_schema, model)})
        problems += [*config.data.rules(), *config.model.rules(), *config.optim.rules(), *config.trainer.rules(),
                     *config.rules()]
        if not problems:
            return config
    if len(problems) == 1:
        raise ConfigError(f"invalid configuration: {problems[0]}")
    raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _field(schema: Any, name: str) -> tuple[Any, bool, Mapping[str, Any]] | None:
    """(type, nullable, metadata) of `schema`'s field `name`, or None when `schema` is no dataclass with it."""
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        return None
    spec = next((f for f in dataclasses.fields(schema) if f.name == name), None)
    if spec is None:
        return None
    return (*_kind(typing.get_type_hints(schema)[name]), spec.metadata)


def composition_error_message(error: Exception) -> str:
    """One line for an error Hydra raises while composing: an unknown key with the closest known one, a value of
    the wrong type with what the key allows, or a config file that does not exist with the ones that do."""
    cause = error.__cause__
    options = getattr(error, "options", None)
    missing = getattr(error, "missing_cfg_file", None)
    if options and missing:
        group, _, name = str(missing).rpartition("/")
        choices = sorted(option for option in options if not option.startswith("base_"))
        return f"{group}={name}: there is no configs/{missing}.yaml; choose one of {', '.join(choices)}"
    full_key, key = getattr(cause, "full_key", None), getattr(cause, "key", None)
    owner = getattr(cause, "object_type", None)
    if full_key and key is not None and "not in" in str(getattr(cause, "msg", "")):
        known = ([f.name for f in dataclasses.fields(owner)] if dataclasses.is_dataclass(owner)
                 else [str(k) for k in (getattr(cause, "parent_node", None) or {})])
        return unknown_key_message(full_key, known, _where(full_key.rpartition(".")[0], owner))
    described = _field(owner, str(key)) if full_key else None
    if described is not None:
        given = str(error).partition("=")[2] or "?"
        return f"{full_key}={given} must be {allowed_text(*described)}"
    return " ".join(str(error).split("\n")[:1] + ([str(cause).split("\n")[0]] if cause is not None else []))
