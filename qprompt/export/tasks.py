"""One graph, many tasks: the checks before several prompts share a graph, and adding or removing a task in place.

A task graph holds every task's prefix in constant tables and picks each row's by a `task_ids` input.
Adding or removing a task rewrites only those tables: the graph's operations and the base's weights stay
as they were, so every other task's outputs stay bit-identical (checked on a probe before anything is
replaced), and an edge box can take the updated folder as a whole or by rsync.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import numpy as np

from .. import owned
from ..deploy.manifest import EXPORT_MANIFEST, ExportManifest, TaskEntry
from ..deploy.runtime import ExportedModel
from ..errors import ExportError, QPromptError
from .folder import install_export, portable_base
from .parity import PARITY_REL, PARITY_REL_FUSED, parity, passed
from .prefix import TaskSource, load_task


def check_same_base(sources: list[TaskSource]) -> None:
    """One graph holds one base: every artifact must have been trained on the same one (and quantized alike)."""
    first = sources[0]
    for s in sources[1:]:
        a, b = first.artifact["base"], s.artifact["base"]
        if a.get("fingerprint") != b.get("fingerprint") or a.get("quant") != b.get("quant"):
            raise QPromptError(f"{s.name} was trained on {b.get('name')} ({b.get('quant')}) and {first.name} on "
                               f"{a.get('name')} ({a.get('quant')}); one graph holds one base: export them apart")
    seen = set()
    for s in sources:
        if s.name in seen:
            raise QPromptError(f"two tasks are named {s.name!r}: give each artifact its own --name")
        seen.add(s.name)


def check_slots(sources: list[TaskSource], slots: int) -> None:
    for s in sources:
        if s.artifact["virtual_tokens"] > slots:
            raise QPromptError(f"{s.name} has {s.artifact['virtual_tokens']} virtual tokens, more than the graph's "
                               f"{slots} prefix slots per task: export again with --prefix-slots "
                               f"{s.artifact['virtual_tokens']} or more")


def add_task(artifact: str | Path, folder: str | Path, name: str | None = None,
             parity_tokens: int = 8, ensemble: str | None = None) -> ExportManifest:
    """Add an artifact's prompt to a task graph in `folder` as one more task, without re-exporting anything: only
    the prefix tables grow, so every earlier task's outputs stay bit-identical (checked before anything is
    replaced). The base must be the one the graph was made from. `ensemble`: the new task also joins (or starts)
    that ensemble."""
    folder = Path(folder)
    manifest = ExportManifest.read(folder)
    if not manifest.task_ids_input:
        raise QPromptError(f"{folder} is a single-task export (its graph has no task table): export it again with "
                           "--multi-task (and --prefix-slots N for room), then add tasks to it")
    weights = manifest.fp32_weights.removeprefix("dequantized ")  # the weights the graph was made from
    weights = "none" if weights == "full precision" else weights
    source = load_task(artifact, weights, name)
    if portable_base(source.artifact["base"]).get("fingerprint") != manifest.base.get("fingerprint") or \
            source.artifact["base"].get("quant") != manifest.base.get("quant"):
        raise QPromptError(f"{artifact} was trained on {source.artifact['base'].get('name')} "
                           f"({source.artifact['base'].get('quant')}), not on this export's base "
                           f"{manifest.base.get('name')} ({manifest.base.get('quant')}): export it on its own")
    if source.name in manifest.task_names:
        raise QPromptError(f"{folder} already has a task named {source.name!r}: pass --name for another name, or "
                           "--remove it first")
    check_slots([source], manifest.prefix_slots)
    entry = source.entry()
    if ensemble is not None:
        manifest.tasks.append(entry)  # checked as it will be written
        manifest.ensembles = {**manifest.ensembles, ensemble: [*manifest.ensembles.get(ensemble, []), entry.name]}
        try:
            manifest.check_ensembles(f"add {artifact} without --ensemble, or to another ensemble")
        except ExportError as exc:
            raise QPromptError(str(exc)) from None
        finally:
            manifest.tasks.pop()

    def grow(path: Path, tables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        new_rows = _task_rows(path, manifest, source)
        return {n: np.concatenate([tables[n], new_rows[n]]) for n in tables}

    return _rewrite_tables(folder, manifest, grow, [*manifest.tasks, entry],
                           check=lambda runtime: _check_new_task(source, entry, runtime, parity_tokens))


def remove_task(folder: str | Path, name: str) -> ExportManifest:
    """Remove task `name` from the task graph in `folder`; the others keep their outputs, bit for bit (their ids
    after it move down by one: route by name)."""
    folder = Path(folder)
    manifest = ExportManifest.read(folder)
    index = manifest.task_id(name)
    if not manifest.task_ids_input:
        raise QPromptError(f"{folder} is a single-task export: there is no task table to remove {name!r} from")
    if len(manifest.tasks) == 1:
        raise QPromptError(f"{name!r} is the last task of {folder}: a graph needs one; delete the folder instead")

    def shrink(path: Path, tables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {n: np.delete(tables[n], index, axis=0) for n in tables}

    # The task leaves its ensembles; an ensemble left with no member goes too.
    kept = {e: [m for m in members if m != name] for e, members in manifest.ensembles.items()}
    manifest.ensembles = {e: members for e, members in kept.items() if members}

    return _rewrite_tables(folder, manifest, shrink, [t for t in manifest.tasks if t.name != name])


def _task_rows(path: Path, manifest: ExportManifest, source: TaskSource) -> dict[str, np.ndarray]:
    """One task's table rows, in the form the graph at `path` holds them."""
    prefix = [(k.numpy(), v.numpy()) for k, v in source.prefix]
    if manifest.graph == "fused":
        from . import fused

        layers = fused.attention_layers(fused.load_proto(path).graph, manifest.num_layers, manifest.head_dim)
        cos, sin = fused.rotary_tables(path)
        return fused.prompt_tables([prefix], layers, cos, sin, manifest.prefix_slots)
    from .written import prefix_tables

    return prefix_tables([source.prefix], manifest.prefix_slots, manifest.num_layers,
                         (manifest.num_kv_heads, manifest.head_dim))


def _read_tables(path: Path, manifest: ExportManifest) -> dict[str, np.ndarray]:
    if manifest.graph == "fused":
        from .fused import read_prompt_tables

        return read_prompt_tables(path)
    from .written import read_tables

    return read_tables(path, manifest.num_layers)


def _write_tables(path: Path, manifest: ExportManifest, tables: dict[str, np.ndarray]) -> None:
    if manifest.graph == "fused":
        from .fused import write_prompt_tables

        write_prompt_tables(path, tables)
    else:
        from .written import set_tables

        set_tables(path, tables)


def _check_new_task(source: TaskSource, entry: TaskEntry, runtime: ExportedModel, parity_tokens: int) -> None:
    samples = source.artifact.get("samples") or []
    prompts = ([runtime.prompt_ids(row, task=entry.name) for row in samples] if samples
               else [runtime.encode("The film opens on a quiet street, and then")])
    rel = PARITY_REL_FUSED if runtime.manifest.graph == "fused" else PARITY_REL
    entry.parity = report = parity(source.model, runtime, prompts, parity_tokens, entry.name, rel)
    exact = runtime.manifest.quantization in ("none", "nf4", "fp4")
    if exact and not passed(report):
        raise QPromptError(f"the graph does not match PyTorch for {entry.name} (max logit difference "
                           f"{report['max_abs_logit_diff']:.2e}); nothing was changed")


def _export_names(folder: Path, manifest: ExportManifest) -> list[str]:
    """The files of the export in `folder`: its record's, or (written before records) the manifest's graphs."""
    names = owned.owned(folder) if owned.has_record(folder) else {EXPORT_MANIFEST, *manifest.files}
    for graph in list(manifest.files):
        names.add(graph + ".data")
    return sorted(n for n in names if owned.plain(n) and (folder / n).is_file() and n != owned.RECORD)


def _rewrite_tables(folder: Path, manifest: ExportManifest, change, tasks: list[TaskEntry], check=None):
    """Copy the export's own files beside it with every graph's tables changed by `change`, check that every task
    kept from before gives bit-identical logits on a probe, run `check`, then put the copy in place (files the user
    added to the folder are neither copied nor touched)."""
    tmp = folder.parent / f".{folder.name}.partial-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        for name in _export_names(folder, manifest):
            shutil.copy2(folder / name, tmp / name)
        for name in [n for n in manifest.files if (tmp / n).is_file()]:
            _write_tables(tmp / name, manifest, change(tmp / name, _read_tables(tmp / name, manifest)))
        before = ExportedModel(folder, providers=["CPUExecutionProvider"])
        manifest.tasks = tasks
        manifest.write(tmp)
        after = ExportedModel(tmp, providers=["CPUExecutionProvider"])
        probe = after.encode("The film opens on a quiet street, and then")
        for task in before.tasks:
            if task not in after.tasks:
                continue
            a = before.prompt_logits([probe], before.task_ids(task, 1))[0]
            b = after.prompt_logits([probe], after.task_ids(task, 1))[0]
            if not np.array_equal(a, b):
                raise QPromptError(f"task {task!r} would change its outputs; nothing was changed (report this)")
        if check:
            check(after)
        manifest.write(tmp)  # with the new task's parity
        install_export(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
