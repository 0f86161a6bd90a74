"""The trials of a `qprompt tune` study as a table in docs/results.md (between this script's marks, one block per
study), read from the study's database: the figures in the page are the database's, not copied by hand.

    python bench/tune_table.py --storage sqlite:///bench/results/tune-sentiment-study.db --study sentiment

Each row: the trial's state, its settings, the validation metric it reported at each evaluation step, and (for a
finished trial) its value, the best of those; the best finished trial is marked.
Prints the table and writes it to --doc.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click
import optuna

ROOT = Path(__file__).resolve().parents[1]


def marks(study: str) -> tuple[str, str]:
    return (f"<!-- table: written by bench/tune_table.py, study {study} -->",
            f"<!-- end of bench/tune_table.py's table, study {study} -->")


def table(study: optuna.Study) -> str:
    from qprompt.tune import trial_row

    trials = study.get_trials(deepcopy=False)
    steps = sorted({s for t in trials for s in t.intermediate_values})
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value).number if complete else None
    rows = [trial_row(t) for t in trials]
    with_options = any(r["options"] for r in rows)  # method options (P-tuning's encoder): a column when searched
    head = ["trial", "state", "method", "virtual tokens", "init", *(["options"] if with_options else []), "lr",
            *[f"step {s}" for s in steps], "value", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for t, r in zip(trials, rows):
        # A pruned trial's value is only its last report: the value column is for trials that finished.
        value = f"{r['value'] * 100:.1f}" if r["state"] == "complete" else ""
        cells = [str(r["trial"]) + (" (best)" if r["trial"] == best else ""), r["state"], r["method"] or "",
                 str(r["virtual_tokens"] or ""), r["init"], *([r["options"]] if with_options else []),
                 "" if r["lr"] is None else f"{r['lr']:.3g}",
                 *[f"{t.intermediate_values[s] * 100:.1f}" if s in t.intermediate_values else "" for s in steps],
                 f"**{value}**" if r["trial"] == best else value,
                 "" if r["seconds"] is None else f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_doc(doc: Path, name: str, text: str) -> None:
    from page import put_block

    put_block(doc, *marks(name), text, f"Tune: study {name}")


@click.command()
@click.option("--storage", required=True, help="The study's database (SQLAlchemy URL, as `qprompt tune --storage`).")
@click.option("--study", "study_name", required=True, help="The study's name (`qprompt tune`: the recipe's name).")
@click.option("--doc", type=click.Path(dir_okay=False), default=str(ROOT / "docs" / "results.md"), show_default=True)
def main(storage, study_name, doc):
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    text = table(optuna.load_study(study_name=study_name, storage=storage))
    click.echo(text)
    write_doc(Path(doc), study_name, text)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
