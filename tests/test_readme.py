"""The README's commands run as written, in order, on a fresh copy of the repository (issue 24).

The commands are the lines of the README's ```bash blocks and the `$ ` lines of its ```console blocks, run in the
README's order by bash in a temporary copy of the repository (no `runs/`, as on a fresh clone), with
OMP_NUM_THREADS=1; its ```python blocks are run there too, by this interpreter. Of a line's parts joined by `&&`,
the ones that set up the environment are skipped, because CI's .ci/run did them before it ran pytest:
`python3 -m venv .venv`, `. .venv/bin/activate` and `pip install ...`. The README's test command
(`python -m pytest ...`) is skipped as well: it is the command that runs this test. Every other part must be a
`tdcdiff` or `python` command (optionally after VAR=value settings), and each must exit 0.

What the README shows as printed (the output lines of a ```console block, or a ```text block right after a
```bash block) is held to what the commands print: every path under `runs/` it names must have been printed by
that block's commands and must exist afterwards.

The Results section's commands (inline code, from half an hour to hours each) are not run here. Slow: the quick
start trains the default digits run, about 20 minutes with one thread on a busy 2-core machine.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SETUP = (re.compile(r"python3? -m venv \S+"), re.compile(r"\. \S*/bin/activate"), re.compile(r"pip install .*"))
TEST_COMMAND = re.compile(r"(\w+=\S+ )*python3? -m pytest\b.*")
RUNNABLE = re.compile(r"(\w+=\S+ )*(tdcdiff|python3?)( .*)?")
SHOWN_PATH = re.compile(r"(?<![\w/.])runs/[\w./-]*[\w/]")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)


def blocks(text: str) -> list[dict]:
    """The README's fenced blocks in order: {"lang", "body", "after_bash"} (after_bash: nothing but blank lines
    between it and a ```bash block before it)."""
    found, previous_end, previous_lang = [], None, None
    for match in FENCE.finditer(text):
        between = text[previous_end:match.start()] if previous_end is not None else "x"
        found.append({"lang": match.group(1), "body": match.group(2),
                      "after_bash": previous_lang == "bash" and not between.strip()})
        previous_end, previous_lang = match.end(), match.group(1)
    return found


def logical_lines(body: str) -> list[str]:
    """Lines with their backslash continuations joined."""
    lines, current = [], ""
    for line in body.splitlines():
        current += line.strip()
        if current.endswith("\\"):
            current = current[:-1].rstrip() + " "
            continue
        lines.append(current)
        current = ""
    return [line for line in lines if line]


def command(line: str) -> str | None:
    """The part of a README command line this test runs: its `&&` parts less the setup that CI did and the test
    command; None when nothing is left."""
    parts = [p.strip() for p in line.split(" && ")]
    kept = [p for p in parts if not any(s.fullmatch(p) for s in SETUP) and not TEST_COMMAND.fullmatch(p)]
    for part in kept:
        assert RUNNABLE.fullmatch(part), f"README command {part!r} is neither tdcdiff nor python: teach this test"
    return " && ".join(kept) or None


def console(body: str) -> tuple[list[str], list[str]]:
    """A ```console block's commands (its `$ ` lines with their continuations) and its output lines."""
    commands, shown, continued = [], [], False
    for line in body.splitlines():
        if line.startswith("$ ") or continued:
            commands.append(line[2:] if line.startswith("$ ") else line)
            continued = line.endswith("\\")
        else:
            shown.append(line)
    return logical_lines("\n".join(commands)), shown


def steps(text: str) -> list[dict]:
    """What to run, in order: {"run": bash command or None, "python": code or None, "shown": the README's output
    lines for it}."""
    found = []
    for block in blocks(text):
        if block["lang"] == "bash":
            found.append({"run": [command(line) for line in logical_lines(block["body"])], "shown": []})
        elif block["lang"] == "console":
            commands, shown = console(block["body"])
            found.append({"run": [command(line) for line in commands], "shown": shown})
        elif block["lang"] == "text" and block["after_bash"]:
            found[-1]["shown"] += block["body"].splitlines()
        elif block["lang"] == "python":
            found.append({"python": block["body"], "shown": []})
    return found


def test_the_readme_has_the_commands_this_test_runs():
    found = steps(README.read_text())
    runs = [c for s in found for c in s.get("run", []) if c]
    assert "OMP_NUM_THREADS=1 tdcdiff run" in runs  # the quick start, one thread
    assert any(c.startswith("tdcdiff train-base") and "examples/tiny.yaml" in c for c in runs)
    assert any(SHOWN_PATH.search(line) for s in found for line in s["shown"])
    assert (ROOT / "examples" / "tiny.yaml").is_file()


@pytest.mark.slow
def test_every_readme_command_runs_in_order_on_a_fresh_copy(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "*.egg-info",
                                                              ".pytest_cache", "build", "dist"))
    # the copy's code, and this interpreter's tdcdiff and python first on PATH (CI's venv)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TDCDIFF_CACHE": str(tmp_path / "cache"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo / "src"), os.environ.get("PYTHONPATH")]))}
    for step in steps(README.read_text()):
        printed = ""
        if "python" in step:
            done = subprocess.run([sys.executable, "-c", step["python"]], cwd=repo, env=env, capture_output=True,
                                  text=True)
            assert done.returncode == 0, f"README python block failed:\n{step['python']}\n{done.stderr[-3000:]}"
            continue
        for cmd in filter(None, step["run"]):
            done = subprocess.run(["bash", "-c", cmd], cwd=repo, env=env, capture_output=True, text=True)
            assert done.returncode == 0, f"README command failed: {cmd}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
            printed += done.stdout
        for line in step["shown"]:
            for path in SHOWN_PATH.findall(line):
                assert path in printed, f"the README shows {path!r} printed, but its commands printed:\n{printed}"
                assert (repo / path).exists(), f"the README shows {path!r}, which does not exist after its commands"
