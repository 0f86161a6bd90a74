"""One graph, many tasks: a table of per-task prefixes, a task id per row, tasks added and removed in place.

Three tiny artifacts of different methods and prompt lengths go into one graph. Every row of a batch
that mixes them must give what it gives through its own task's single-task graph; adding or removing
a task must leave every other task's outputs bit for bit as they were. Both kinds of graph: the fused one
(each row's prefix gathered into the KV cache, shorter prompts followed by filler rows) and the written-out
one (masked padding slots).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from qprompt.cli import main
from qprompt.deploy.runtime import ExportedModel, Sampling
from qprompt.errors import ExportError, QPromptError
from qprompt.export import PARITY_ABS, PARITY_REL, PARITY_REL_FUSED, add_task, export, remove_task
from tests.kit import data_rows

ROWS = [r["text"] for r in data_rows("rotten_tomatoes", "test", 12)]
TASKS = {"pt": ("prompt-tuning", 4), "prefix": ("prefix-tuning", 6), "ptune": ("p-tuning", 3)}


@pytest.fixture(scope="module")
def artifacts(artifact_factory) -> dict:
    return {name: artifact_factory(name, method__name=method, method__virtual_tokens=tokens)
            for name, (method, tokens) in TASKS.items()}


@pytest.fixture(scope="module", params=["fused", "written"])
def graph_kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def singles(artifacts, graph_kind) -> dict[str, ExportedModel]:
    graphs = {}
    for name, path in artifacts.items():
        folder = path.parent / f"{name}-alone-{graph_kind}"
        export(path, folder, parity_tokens=4, graph=graph_kind)
        graphs[name] = ExportedModel(folder, providers=["CPUExecutionProvider"])
    return graphs


@pytest.fixture(scope="module")
def bank(artifacts, graph_kind):
    folder = artifacts["pt"].parent / f"bank-{graph_kind}"
    export([artifacts["pt"], artifacts["prefix"]], folder, parity_tokens=4, graph=graph_kind)
    return folder


def logits_of(model: ExportedModel, prompts: list[list[int]], tasks: list[str | None]) -> np.ndarray:
    """Next-token logits of one batch (padded as the graph takes it), each row with its task."""
    rows = model.prompt_logits(prompts, model.task_ids(tasks, len(prompts)), last=1)
    return np.stack([row[-1] for row in rows])


def test_a_mixed_batch_gives_each_row_its_single_task_graph_output(artifacts, singles, graph_kind, tmp_path):
    folder = tmp_path / "all"
    data = export(list(artifacts.values()), folder, names=list(artifacts), parity_tokens=4, graph=graph_kind)
    assert data.graph == graph_kind
    assert data.task_ids_input and data.prefix_slots == 6 and data.task_names == list(TASKS)
    assert [t.virtual_tokens for t in data.tasks] == [4, 6, 3]
    assert all(t.parity["greedy_tokens_equal"] and t.parity["max_abs_logit_diff"] < 1e-4 for t in data.tasks)
    assert not (folder / "genai_config.json").exists()  # ORT GenAI cannot feed task_ids
    graph = ExportedModel(folder, providers=["CPUExecutionProvider"])
    names = [list(TASKS)[i % 3] for i in range(len(ROWS))]  # the tasks interleaved, row by row
    prompts = [graph.prompt_ids(text, task=name) for text, name in zip(ROWS, names)]
    mixed = logits_of(graph, prompts, names)
    for name, single in singles.items():
        rows = [i for i, n in enumerate(names) if n == name]
        alone = logits_of(single, [prompts[i] for i in rows], [None] * len(rows))
        # Padding slots add exact zeros (written-out) or are never read (fused); what differs is float32 summation
        # order in differently shaped matmuls.
        rel = PARITY_REL_FUSED if graph_kind == "fused" else PARITY_REL
        tolerance = max(PARITY_ABS, rel * float(np.abs(alone).max()))
        assert np.abs(mixed[rows] - alone).max() <= tolerance, name
        assert (mixed[rows].argmax(-1) == alone.argmax(-1)).all()
    # Generation and labels per task, through the one graph and through each task's own graph.
    generated = graph.generate_ids(prompts, Sampling(max_new_tokens=5), names)
    for name, single in singles.items():
        rows = [i for i, n in enumerate(names) if n == name]
        assert [generated[i] for i in rows] == single.generate_ids([prompts[i] for i in rows],
                                                                   Sampling(max_new_tokens=5))
        assert graph.classify(ROWS, task=name) == single.classify(ROWS)


def test_adding_a_task_leaves_every_earlier_task_bit_identical(bank, artifacts, singles, tmp_path):
    folder = tmp_path / "grown"
    shutil.copytree(bank, folder)
    (folder / "README.md").write_text("how we run this bank")  # a file of the user's: it stays, untouched
    before = ExportedModel(folder, providers=["CPUExecutionProvider"])
    old = {name: logits_of(before, [before.prompt_ids(t, task=name) for t in ROWS], [name] * len(ROWS))
           for name in before.tasks}
    manifest = add_task(artifacts["ptune"], folder, parity_tokens=4)
    assert manifest.task_names == ["pt", "prefix", "ptune"] and manifest.tasks[-1].parity["greedy_tokens_equal"]
    after = ExportedModel(folder, providers=["CPUExecutionProvider"])
    for name, expected in old.items():  # every earlier task's rows, one batch per task: the same bits
        got = logits_of(after, [after.prompt_ids(t, task=name) for t in ROWS], [name] * len(ROWS))
        assert np.array_equal(got, expected), name
    assert after.classify(ROWS, task="ptune") == singles["ptune"].classify(ROWS)
    # ... and removing one leaves the others bit-identical too (their ids move down: route by name).
    remove_task(folder, "pt")
    shrunk = ExportedModel(folder, providers=["CPUExecutionProvider"])
    assert shrunk.tasks == ["prefix", "ptune"]
    got = logits_of(shrunk, [shrunk.prompt_ids(t, task="prefix") for t in ROWS], ["prefix"] * len(ROWS))
    assert np.array_equal(got, old["prefix"])
    with pytest.raises(ExportError, match="no task 'pt'"):
        shrunk.prompt_ids(ROWS[0], task="pt")
    assert (folder / "README.md").read_text() == "how we run this bank"


def test_what_a_task_graph_refuses(bank, artifacts, tmp_path):
    graph = ExportedModel(bank, providers=["CPUExecutionProvider"])
    with pytest.raises(ExportError, match=r"serves 2 tasks \(pt, prefix\): name one"):
        graph.classify(ROWS[:2])
    with pytest.raises(ExportError, match="has no task 'nope'; its tasks: pt, prefix"):
        graph.classify(ROWS[:2], task="nope")
    folder = tmp_path / "b"
    shutil.copytree(bank, folder)
    with pytest.raises(QPromptError, match="already has a task named 'pt'"):
        add_task(artifacts["pt"], folder)
    small = tmp_path / "small"
    export([artifacts["ptune"]], small, multi_task=True, parity_tokens=2)  # 3 slots per task
    with pytest.raises(QPromptError, match="more than the graph's 3 prefix slots per task: export again with "
                       "--prefix-slots 4"):
        add_task(artifacts["pt"], small)
    single = tmp_path / "single"
    export(artifacts["pt"], single, parity_tokens=2)
    with pytest.raises(QPromptError, match="single-task export"):
        add_task(artifacts["ptune"], single)
    with pytest.raises(QPromptError, match="the last task"):
        remove_task(small, "ptune")
    assert json.loads((folder / "qprompt-export.json").read_text())["tasks"][0]["name"] == "pt"  # nothing changed


def test_the_command_line_routes_by_task(bank, artifacts, sentiment_files, tmp_path):
    runner = CliRunner()
    graph = ExportedModel(bank, providers=["CPUExecutionProvider"])
    done = runner.invoke(main, ["run", str(bank), "--task", "prefix", "--prompt", ROWS[0], "--classify"])
    assert done.exit_code == 0, done.output
    assert done.output.strip() == graph.classify([ROWS[0]], task="prefix")[0]
    done = runner.invoke(main, ["run", str(bank), "--prompt", ROWS[0]])
    assert done.exit_code == 2 and "name one (--task NAME" in done.output
    report = tmp_path / "e.json"
    done = runner.invoke(main, ["eval", str(bank), "--task", "pt", "--data", str(sentiment_files["test"]), "--json",
                                str(report)])
    assert done.exit_code == 0, done.output
    rows = data_rows("rotten_tomatoes", "test", 32)
    assert json.loads(report.read_text())["predictions"] == graph.classify(rows, task="pt")
    grown = tmp_path / "grown"
    shutil.copytree(bank, grown)
    done = runner.invoke(main, ["export", "--add", str(artifacts["ptune"]), "--to", str(grown), "--name", "third",
                                "--parity-tokens", "2"])
    assert done.exit_code == 0 and "tasks pt, prefix, third" in done.output, done.output
    done = runner.invoke(main, ["export", "--remove", "prefix", "--to", str(grown)])
    assert done.exit_code == 0 and "tasks pt, third" in done.output, done.output
    done = runner.invoke(main, ["export", "--remove", "nope", "--to", str(grown)])
    assert done.exit_code == 2 and "has no task 'nope'" in done.output


def test_the_server_batches_requests_of_different_tasks(bank):
    from concurrent.futures import ThreadPoolExecutor

    from qprompt.deploy.serve import ServeOptions
    from tests.test_serve import start_server

    graph = ExportedModel(bank, providers=["CPUExecutionProvider"])
    server, thread, client = start_server(graph, ServeOptions(max_batch=8, batch_window_ms=100))
    try:
        jobs = [(ROWS[i], ["pt", "prefix"][i % 2]) for i in range(6)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda j: client.post("/v1/completions", {"prompt": j[0], "task": j[1],
                                                                                "max_tokens": 4}), jobs))
        for (text, task), (status, body) in zip(jobs, answers):
            assert status == 200, body
            assert body["choices"][0]["text"].strip() == graph.generate([text], Sampling(max_new_tokens=4),
                                                                        task=task)[0]
        assert client.request("GET", "/metrics")[1]["largest_pass_rows"] > 1  # the tasks shared forward passes
        status, body = client.post("/v1/classify", {"input": ROWS[:3], "task": "prefix"})
        assert status == 200 and [d["label"] for d in body["data"]] == graph.classify(ROWS[:3], task="prefix")
        status, body = client.post("/v1/completions", {"prompt": ROWS[0]})
        assert status == 400 and "name one" in body["error"]["message"]
        status, body = client.post("/v1/classify", {"input": ROWS[0], "task": "nope"})
        assert status == 400 and "has no task 'nope'" in body["error"]["message"]
        assert [t["name"] for t in client.request("GET", "/health")[1]["tasks"]] == ["pt", "prefix"]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_the_fused_and_the_written_out_graph_agree(artifacts, tmp_path):
    """The two kinds of graph compute the same thing: for a mixed batch of the three methods, every row's logits
    agree within float32 rounding (the fused graph's kernels reassociate more: its tolerance)."""
    graphs = {}
    for kind in ("fused", "written"):
        export(list(artifacts.values()), tmp_path / kind, names=list(artifacts), parity_tokens=2, graph=kind)
        graphs[kind] = ExportedModel(tmp_path / kind, providers=["CPUExecutionProvider"])
    names = [list(TASKS)[i % 3] for i in range(len(ROWS))]
    prompts = [graphs["fused"].prompt_ids(text, task=name) for text, name in zip(ROWS, names)]
    task_ids = graphs["fused"].task_ids(names, len(prompts))
    fused = graphs["fused"].prompt_logits(prompts, task_ids)
    written = graphs["written"].prompt_logits(prompts, task_ids)
    for a, b in zip(fused, written):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= max(PARITY_ABS, PARITY_REL_FUSED * float(np.abs(b).max()))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_an_ensemble_classifies_by_the_mean_of_its_prompts_label_probabilities(artifacts, sentiment_files, tmp_path):
    """Two prompts for one task exported with --ensemble: a row's label probabilities through the ensemble are the
    mean of its probabilities through each prompt (both in one mixed batch, so equal to float rounding); it
    classifies by them everywhere a task name goes, refuses to generate, and follows --add/--remove."""
    folder = tmp_path / "ensemble"
    done = CliRunner().invoke(main, ["export", str(artifacts["pt"]), str(artifacts["ptune"]), "--name", "a", "--name",
                                     "b", "--ensemble", "vote", "--output", str(folder), "--parity-tokens", "2",
                                     "--prefix-slots", "6"])
    assert done.exit_code == 0 and "ensemble vote: a, b" in done.output, done.output
    graph = ExportedModel(folder, providers=["CPUExecutionProvider"])
    ids = [graph.prompt_ids(r, task="vote") for r in ROWS]
    members = [softmax(graph.label_scores(ids, task=t)) for t in ("a", "b")]
    expected = (members[0] + members[1]) / 2
    np.testing.assert_allclose(np.exp(graph.label_scores(ids, task="vote")), expected, rtol=PARITY_REL_FUSED,
                               atol=1e-7)
    assert not np.allclose(members[0], members[1])  # two different prompts: the mean is not either one
    labels = list(graph.label_ids("vote"))
    assert graph.classify(ROWS, task="vote") == [labels[i] for i in expected.argmax(axis=1)]
    with pytest.raises(ExportError, match="'vote' is an ensemble of a, b: it classifies"):
        graph.generate([ROWS[0]], Sampling(max_new_tokens=2), task="vote")

    report = tmp_path / "e.json"
    done = CliRunner().invoke(main, ["eval", str(folder), "--task", "vote", "--data", str(sentiment_files["test"]),
                                     "--json", str(report)])
    assert done.exit_code == 0, done.output
    rows = data_rows("rotten_tomatoes", "test", 32)
    assert json.loads(report.read_text())["predictions"] == graph.classify(rows, task="vote")

    from qprompt.deploy.serve import ServeOptions
    from tests.test_serve import start_server

    server, thread, client = start_server(graph, ServeOptions(max_batch=8))
    try:
        status, body = client.post("/v1/classify", {"input": ROWS[:4], "task": "vote"})
        assert status == 200 and [d["label"] for d in body["data"]] == graph.classify(ROWS[:4], task="vote")
        assert [d["probabilities"] for d in body["data"]][0] == pytest.approx(dict(zip(labels, expected[0])),
                                                                              rel=1e-4)
        status, body = client.post("/v1/completions", {"prompt": ROWS[0], "task": "vote"})
        assert status == 400 and "is an ensemble" in body["error"]["message"]
        assert client.request("GET", "/health")[1]["ensembles"] == [{"name": "vote", "members": ["a", "b"]}]
    finally:
        server.should_exit = True
        thread.join(timeout=10)

    add_task(artifacts["prefix"], folder, "c", parity_tokens=2, ensemble="vote")
    assert ExportedModel(folder).ensembles == {"vote": ["a", "b", "c"]}
    remove_task(folder, "a")
    assert ExportedModel(folder).ensembles == {"vote": ["b", "c"]}

    with pytest.raises(QPromptError, match="--ensemble needs two or more artifacts"):
        export(artifacts["pt"], tmp_path / "one", ensemble="vote")
    manifest = json.loads((folder / "qprompt-export.json").read_text())
    manifest["ensembles"] = {"vote": ["b", "gone"]}
    (folder / "qprompt-export.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="ensemble 'vote' must list tasks of this graph"):
        ExportedModel(folder)
