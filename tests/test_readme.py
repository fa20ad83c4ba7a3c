"""The README runs as written: every command it shows is run here (with fewer steps), or named below with
the test that runs it; a command added to the README without either fails this test.

Commands run in a scratch folder holding a copy of configs/, in README order, so later commands find what
earlier ones made (`runs/tiny`, `data/mine`). Training commands get a few extra `--set`s that only make
them shorter (steps, evaluation, the test corpus); `$ keel ...` lines followed by `keel: error: ...` must
fail with exactly that line.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"

# Commands the suite runs elsewhere, in the form they need (a cluster, a job id, a GPU); the README's
# placeholders (JOB, HOST) make them unrunnable as written.
ELSEWHERE = {
    "keel submit": "tests/test_launcher_jobs.py",
    "keel status": "tests/test_launcher_jobs.py",
    "keel chaos": "tests/test_launcher_jobs.py",
    "keel bench attention": "tests/kernels/test_bench.py",
    "keel bench step": "tests/kernels/test_bench.py",
    # A ladder trains for minutes; the pipeline test runs the rest on runs written from a known law.
    "keel scale run": "tests/test_scaling_ladder.py",
    "keel scale fit": "tests/test_scaling_pipeline.py",
    "keel scale predict": "tests/test_scaling_pipeline.py",
    "keel scale report": "tests/test_scaling_pipeline.py",
    "keel scale check": "tests/test_scaling_pipeline.py",
    "keel train configs/tiny.yaml --forecast": "tests/test_scaling_pipeline.py",
}
# Only makes a run shorter (these come last, so they win over the README's own train.steps).
SHORTER = ["train.steps=4", "train.eval_every=0", "train.eval_batches=1", "logging.progress=false",
           "logging.wandb.mode=disabled", "checkpoint.interval=2"]


def readme_commands() -> list[tuple[str, str | None]]:
    """(command, expected error line or None) for every command in the README's code blocks."""
    found, block, lines = [], False, README.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("```"):
            block = not block
            continue
        if not block:
            continue
        text = line[2:] if line.startswith("$ ") else line
        if not re.match(r"(keel|python -m keel)\s", text):  # not `keel: error: ...`, the output
            continue
        command = text.split("  #")[0].strip()
        error = lines[i + 1].strip() if line.startswith("$ ") and lines[i + 1].startswith("keel: error:") else None
        for part in command.split("; "):  # `keel status JOB; keel logs JOB --follow; ...`
            found.append((part.strip(), error))
    return found


def test_the_readme_shows_commands_and_each_is_run_here_or_by_a_named_test():
    commands = readme_commands()
    assert len(commands) >= 15
    for name, test in ELSEWHERE.items():
        assert (ROOT / test).is_file()
        assert name.split()[1] in (ROOT / test).read_text()


def expand(command: str, cwd: Path) -> list[str]:
    """The README's optional parts (`[--tokenizer bpe ...]`) left out, training commands made shorter, and
    the step of the checkpoint the README exports (its run's last) the last of the shorter run."""
    args = shlex.split(re.sub(r"\[[^\]]*\]", "", command))
    args = [sys.executable, "-m", "keel.launcher.cli", *args[1:]] if args[0] == "keel" else [sys.executable, *args[1:]]
    if "train" in args or "keel.training" in args:
        args += [a for s in SHORTER for a in ("--set", s)]
    last = sorted((cwd / "runs" / "tiny" / "checkpoints").glob("step_*"))
    return [a.replace("step_0000300", last[-1].name) if "step_0000300" in a and last else a for a in args]


def test_every_runnable_readme_command_works_as_written(tmp_path):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    (tmp_path / "my_texts").mkdir()
    for i in range(30):
        (tmp_path / "my_texts" / f"doc{i}.txt").write_text(f"text number {i}\n" * 200)
    (tmp_path / "corpus.jsonl").write_text("".join(f'{{"text": "line {i} of a jsonl corpus"}}\n' for i in range(200)))
    env = {**os.environ, "WANDB_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    ran = []
    for command, error in readme_commands():
        if any(command.startswith(name) for name in ELSEWHERE):
            continue
        if re.search(r"\b(JOB|HOST)\b", command) or command in ("keel list",):
            continue  # a placeholder or a cluster: tests/test_launcher_jobs.py runs logs, stop and list
        result = subprocess.run(expand(command, tmp_path), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        ran.append(command)
        if error:
            assert result.returncode == 2 and error in result.stderr, (command, result.stderr[-2000:])
        else:
            assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-3000:])
    assert len(ran) >= 12
