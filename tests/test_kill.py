"""kill -9 is survivable: a training process SIGKILLed between checkpoints, halfway through writing one, or
between its two renames leaves a readable checkpoint, and `--resume` then ends on exactly the prompt of a run
that was never interrupted (the same bits: data order, RNG, optimizer and schedule all resume exactly)."""

import json
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.kit import small_recipe

# Runs `qprompt train` in this process after arming one way to die; MODE "none" arms nothing.
WRAPPER = r'''
import io, os, signal, sys
import torch
import qprompt.train as qtrain
from qprompt.cli import main

# One thread: with two, PyTorch's CPU kernels can differ in the last bits between any two processes (two
# uninterrupted runs included), and this test compares prompts bit for bit.
torch.set_num_threads(1)
mode, at = sys.argv[1], int(sys.argv[2])
calls = {"n": 0}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def nth_call():
    calls["n"] += 1
    return calls["n"] == at

if mode in ("step", "term"):  # grad_accum is 1: the at-th micro-batch starts optimizer step `at`
    real_logprobs = qtrain.target_logprobs
    def logprobs(model, batch):
        if nth_call():
            die() if mode == "step" else os.kill(os.getpid(), signal.SIGTERM)  # what `kill PID` sends
        return real_logprobs(model, batch)
    qtrain.target_logprobs = logprobs
elif mode == "save":  # the at-th state.pt: half its bytes reach the disk, then the kill
    real_save = torch.save
    def save(obj, path, *args, **kwargs):
        if nth_call():
            buffer = io.BytesIO()
            real_save(obj, buffer)
            with open(path, "wb") as f:
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            die()
        return real_save(obj, path, *args, **kwargs)
    torch.save = save
elif mode == "rename":  # the at-th checkpoint: the old one is moved aside, the new one not yet in place
    real_replace = os.replace
    def replace(src, dst):
        if str(src).endswith("checkpoint.partial") and nth_call():
            die()
        return real_replace(src, dst)
    os.replace = replace

main(sys.argv[3:], prog_name="qprompt")
'''


@pytest.fixture
def job(tiny_model_dir, sentiment_files, tmp_path):
    """The wrapper, a 6-step recipe with a checkpoint every 2 steps, and a run that was never interrupted."""
    recipe = small_recipe(tiny_model_dir, train__max_steps=6, train__eval_every=2, train__log_every=1,
                          train__warmup_steps=1)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict()))
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    job = {"folder": tmp_path, "data": [str(sentiment_files["train"]), str(sentiment_files["validation"])]}
    # Through the wrapper too, so that it runs with the same single thread as the killed runs.
    straight = _train(job, tmp_path / "straight", "none")
    assert straight.returncode == 0, straight.stderr[-2000:]
    return job


def _args(job, output, resume=False):
    train_file, eval_file = job["data"]
    return ["train", "--config", str(job["folder"] / "recipe.yaml"), "--data", train_file, "--eval-data", eval_file,
            "--device", "cpu", "--output", str(output)] + (["--resume"] if resume else [])


def _train(job, output, mode, at=0, resume=False):
    command = [sys.executable, str(job["folder"] / "wrapper.py"), mode, str(at), *_args(job, output, resume)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def _load_state(path):
    from qprompt.artifact import read_checkpoint_state

    return read_checkpoint_state(path)  # what --resume reads: weights_only, a clear error if damaged


def _logged(output):
    lines = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("eval")) for r in lines]


# Each kill in turn, every one of them resumed by the next run: (how it dies, at which call, what it leaves:
# checkpoint folder -> the step its state.pt holds, None for a state.pt cut in half).
KILLS = [
    ("step", 3, {"checkpoint": 2}),  # a fresh run, at optimizer step 3: between the step-2 and step-4 checkpoints
    ("save", 1, {"checkpoint": 2, "checkpoint.partial": None}),  # resumed, halfway through step 4's state.pt
    ("rename", 1, {"checkpoint.old": 2, "checkpoint.partial": 4}),  # resumed: step 2's set aside, 4's not in place
]


def test_sigterm_saves_a_checkpoint_like_ctrl_c_and_resumes_to_the_uninterrupted_prompt(job, tmp_path):
    """`kill PID` (SIGTERM: what job schedulers, `docker stop` and systemd send) ends a run the way Ctrl-C does."""
    out = tmp_path / "run"
    killed = _train(job, out, "term", 3)
    assert killed.returncode == 2, killed.stderr[-2000:]
    assert killed.stderr.strip().splitlines()[-1].startswith("error: interrupted at step 2; checkpoint saved")
    assert _load_state(out / "checkpoint" / "state.pt")["step"] == 2
    resumed = _train(job, out, "none", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    x, y = (load_file(o / "adapter_model.safetensors") for o in (tmp_path / "straight", out))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert _logged(out) == _logged(tmp_path / "straight")


def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_prompt(job, tmp_path):
    from qprompt.train import _checkpoint_dir

    out = tmp_path / "run"
    for n, (mode, at, left) in enumerate(KILLS):
        killed = _train(job, out, mode, at, resume=n > 0)
        assert killed.returncode == -signal.SIGKILL, (mode, killed.stderr[-2000:])
        found = {p.name: p for p in out.iterdir() if p.name.startswith("checkpoint")}
        assert set(found) == set(left), mode
        for name, step in left.items():
            state_file = found[name] / "state.pt"
            if step is None:  # really killed mid-write: a state.pt cut short, which no loader accepts
                assert state_file.stat().st_size > 0
                with pytest.raises((RuntimeError, OSError)):  # which one depends on where the cut falls
                    torch.load(state_file, weights_only=True)
            else:
                assert _load_state(state_file)["step"] == step, (mode, name)
        # What --resume reads is complete, and every name the run made was claimed before it was written.
        assert _load_state(_checkpoint_dir(out) / "state.pt")["step"] == 2
        assert set(left) | {"metrics.jsonl"} <= set((out / ".qprompt-files").read_text().split())

    resumed = _train(job, out, "none", resume=True)  # a plain run: nothing patched
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]

    straight = tmp_path / "straight"
    a, b = (_load_state(o / "checkpoint" / "state.pt") for o in (straight, out))
    assert a["step"] == b["step"] == 6 and all(a[k] == b[k] for k in ("best_step", "best", "kept_step", "kept"))
    for key in a["prompt_encoder"]:
        assert torch.equal(a["prompt_encoder"][key], b["prompt_encoder"][key]), key
    for folder in ("", "checkpoint"):  # the artifact's best prompt, and the last one
        x, y = (load_file(o / folder / "adapter_model.safetensors") for o in (straight, out))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), folder
    assert _logged(out) == _logged(straight)  # every step logged once, with the same loss; the same evaluations
