"""qprompt-export.json: what an export folder holds, as typed dataclasses (written by export, read by the runtime).

One graph serves one task or several: every task is a `TaskEntry` (its template, labels and where its
prompt came from). A graph of several tasks takes a `task_ids` input and holds every task's prefix in a
constant table of `prefix_slots` slots per task. `graph` says how a runtime drives it: "fused" (the KV
cache is one buffer per layer bound as past and present, the prompt in its first slots; right-padded
batches) or "written" (the cache holds real tokens only and grows each call; left-padded batches).
The format is versioned: a folder written by a newer qprompt is refused with a message saying so;
format 2 (before fused graphs) still reads, as a written-out graph. Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

from ..errors import ExportError
from ..templates import Template

EXPORT_MANIFEST = "qprompt-export.json"
FORMAT_NAME = "qprompt-export"
FORMAT_VERSION = 3
READABLE_VERSIONS = ("2", "3")  # 2: written-out graphs only, no `graph` or `weights` keys
EXPORT_FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
GRAPH_KINDS = ("fused", "written")


def read_json(path: Path, fix: str):
    """The JSON in a file qprompt wrote; not UTF-8 or not JSON is an ExportError naming the file and `fix`."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ExportError(f"{path} is not UTF-8 text, so not a file qprompt wrote; {fix}") from None
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}); {fix}") from None


@dataclass
class TaskEntry:
    """One task the graph serves."""

    name: str  # what callers route by (`--task NAME`, the server's "task" field)
    kind: str  # "classification" or "generation"
    template: Template
    label_field: str  # the rows' label column (for `qprompt eval EXPORT`)
    label_targets: dict[str, str]  # label -> the text scored after the prompt; empty for generation
    virtual_tokens: int  # the prompt's length in the table (a multi-task table pads shorter ones, masked)
    source: dict = field(default_factory=dict)  # artifact folder name, method, base name and fingerprint
    parity: dict | None = None  # the export's check against PyTorch for this task
    # The recipe's rule for an over-long prompt (data.on_long: truncate): {"max_length": tokens of virtual tokens +
    # prompt + target, "tail_tokens": the prompt's closing tokens always kept}; None: over-long inputs are refused.
    truncation: dict | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "template": self.template.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> TaskEntry:
        return cls(**{**data, "template": Template.from_dict(data["template"])})


@dataclass
class ExportManifest:
    """The export folder's description: the graph's shapes and files, and the tasks it serves."""

    model_file: str  # the graph the runtime loads (the quantized one after --quantize)
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int  # real tokens any request may hold: the base's positions minus the prefix slots
    pad_token_id: int | None
    eos_token_ids: list[int]
    bos_token_id: int | None
    opset: int
    quantization: str
    tasks: list[TaskEntry]
    task_ids_input: bool  # the graph takes task_ids (B,): each row reads its own task's prefix
    prefix_slots: int  # prefix slots per task in the graph
    base: dict  # the base model: name (never a path on the exporting machine), fingerprint, quantization
    files: dict = field(default_factory=dict)  # graph file -> quantization, size, agreement with fp32
    fp32_weights: str = "full precision"
    graph: str = "written"  # "fused" (shared KV buffer, prompt in its first slots) or "written" (see above)
    weights: dict = field(default_factory=dict)  # the graph's quantization: kind, int4 scheme, accuracy level
    # Ensemble name -> its member tasks: a row is classified by the mean of the members' label probabilities.
    ensembles: dict = field(default_factory=dict)
    seconds: float = 0.0
    qprompt_version: str = ""
    format: str = EXPORT_FORMAT

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str | None = None) -> TaskEntry:
        """The task called `name`; None picks the only one (an error for a graph of several). An ensemble's entry is
        its first member's with the ensemble's name and the longest member prompt (so one cut fits them all)."""
        if name in self.ensembles:
            members = [self.task(m) for m in self.ensembles[name]]
            return replace(members[0], name=name, virtual_tokens=max(m.virtual_tokens for m in members),
                           source={"ensemble": list(self.ensembles[name])}, parity=None)
        if name is None:
            if len(self.tasks) == 1:
                return self.tasks[0]
            raise ExportError(f"this export serves {len(self.tasks)} tasks ({', '.join(self.task_names)}): "
                              "name one (--task NAME, or \"task\" in a request)")
        for task in self.tasks:
            if task.name == name:
                return task
        raise ExportError(f"this export has no task {name!r}; its tasks: {', '.join(self.task_names)}")

    def task_id(self, name: str | None = None) -> int:
        if name in self.ensembles:
            raise ExportError(f"{name!r} is an ensemble of {', '.join(self.ensembles[name])}: it classifies (run "
                              "--classify, eval, /v1/classify); to generate, name one of its members")
        return self.tasks.index(self.task(name))

    def check_ensembles(self, fix: str) -> None:
        """Each ensemble names classification tasks of this graph (two or more when exported; --remove may leave
        one) with one template and one label set, and no task has its name."""
        for name, members in self.ensembles.items():
            if not isinstance(name, str) or not isinstance(members, list) or not members or \
                    not all(isinstance(m, str) and m in self.task_names for m in members):
                raise ExportError(f"ensemble {name!r} must list tasks of this graph (its tasks: "
                                  f"{', '.join(self.task_names)}); {fix}")
            if name in self.task_names:
                raise ExportError(f"ensemble {name!r} has the name of a task; {fix}")
            entries = [self.task(m) for m in members]
            first = entries[0]
            for e in entries:
                if e.kind != "classification":
                    raise ExportError(f"ensemble {name!r}: task {e.name!r} comes from a generation recipe; an "
                                      f"ensemble votes on labels; {fix}")
                if e.label_targets != first.label_targets or e.template.to_dict() != first.template.to_dict():
                    raise ExportError(f"ensemble {name!r}: tasks {first.name!r} and {e.name!r} differ in their "
                                      f"template or labels; an ensemble's prompts must share both; {fix}")

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "tasks"}
        return {"format": self.format, **data, "tasks": [t.to_dict() for t in self.tasks]}

    def write(self, folder: str | Path) -> None:
        path = Path(folder) / EXPORT_MANIFEST
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def read(cls, folder: str | Path) -> ExportManifest:
        folder = Path(folder)
        path = folder / EXPORT_MANIFEST
        if not path.is_file():
            raise ExportError(f"{folder} has no {EXPORT_MANIFEST}, so it is not a qprompt export; run `qprompt export`")
        fix = "export again with this qprompt"
        data = read_json(path, fix)
        if not isinstance(data, dict) or not str(data.get("format", "")).startswith(FORMAT_NAME + "/"):
            raise ExportError(f"{path} is not a {FORMAT_NAME} manifest; {fix}")
        version = str(data["format"]).split("/", 1)[1]
        if version not in READABLE_VERSIONS:
            newer = version.isdigit() and int(version) > FORMAT_VERSION
            raise ExportError(f"{path} is format {version}, written by {'a newer' if newer else 'an older'} qprompt "
                              f"(this one reads formats {READABLE_VERSIONS[0]} to {FORMAT_VERSION}): "
                              + ("upgrade qprompt" if newer else "export the artifact again with this qprompt"))
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in data]
        tasks = data.get("tasks")
        if not missing and (not isinstance(tasks, list) or not tasks):
            missing = ["tasks"]
        for i, task in enumerate(tasks if not missing else []):
            needed = ["name", "kind", "template", "label_field", "label_targets", "virtual_tokens"]
            missing += [f"tasks[{i}].{k}" for k in needed if not isinstance(task, dict) or k not in task]
            template = task.get("template") if isinstance(task, dict) else None
            if not missing and not (isinstance(template, dict) and isinstance(template.get("prompt"), str)):
                missing.append(f"tasks[{i}].template.prompt")
            if not missing and not isinstance(task["label_targets"], dict):
                raise ExportError(f"{path}: tasks[{i}].label_targets must be an object; {fix}")
        if missing:
            raise ExportError(f"{path} lacks the key {missing[0]!r}; {fix}")
        from ..owned import plain

        for name in [data["model_file"], *(data.get("files") or {})]:
            if not isinstance(name, str) or not plain(name):
                raise ExportError(f"{path} names the graph file {name!r}, which is not a file name in the export "
                                  f"folder; {fix}")
        if data.get("graph", "written") not in GRAPH_KINDS:
            raise ExportError(f"{path}: graph must be {' or '.join(GRAPH_KINDS)}, not {data.get('graph')!r}; {fix}")
        try:
            known = {f.name for f in fields(cls)}
            manifest = cls(**{k: v for k, v in data.items() if k in known and k not in ("tasks", "format")},
                           tasks=[TaskEntry.from_dict(t) for t in tasks])
        except (KeyError, TypeError, AttributeError) as exc:
            raise ExportError(f"{path} has a key of the wrong shape ({exc}); {fix}") from None
        if not isinstance(manifest.ensembles, dict):
            raise ExportError(f"{path}: ensembles must be an object of name -> task names; {fix}")
        manifest.check_ensembles(f"{path}: {fix}")
        return manifest
