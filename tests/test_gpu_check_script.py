"""bench/gpu_check.sh is run once per GPU session, on a machine this one cannot reach, with minutes
of device time: a mistyped flag there costs a session. Every benchmark command line in it is
parsed here by the script's own argument parser (the run stops right after parsing), and every
pytest command names test files and markers that exist."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")

# run a bench script as __main__ with argparse stopping the run once the arguments are parsed
_PARSE_ONLY = """
import argparse, runpy, sys
_parse = argparse.ArgumentParser.parse_args
def parse_then_stop(self, *args, **kwargs):
    _parse(self, *args, **kwargs)
    print("ARGUMENTS PARSED")
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = parse_then_stop
sys.argv = sys.argv[1:]
sys.path.insert(0, "bench")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _steps() -> list[list[str]]:
    """The command of every ``step NAME LIMIT COMMAND...`` line (continuations joined), as words."""
    with open(SCRIPT, encoding="utf-8") as fh:
        text = fh.read().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("step "):
            continue
        words = shlex.split(line)
        commands.append(words[3:])  # drop `step`, its name and its limit
    return commands


def _python_commands(kind: str) -> list[list[str]]:
    out = []
    for words in _steps():
        while words and (words[0] == "env" or "=" in words[0]):  # env VAR=... python ...
            words = words[1:]
        if words[:1] != ["python"]:
            continue
        args = words[1:]
        if kind == "bench" and args and args[0].startswith("bench/"):
            out.append(args)
        if kind == "pytest" and args[:2] == ["-m", "pytest"]:
            out.append(args[2:])
    return out


def test_the_script_lists_the_benchmarks_and_test_runs():
    benches = {args[0] for args in _python_commands("bench")}
    assert {"bench/inference.py", "bench/throughput.py", "bench/inner_loop.py", "bench/lora_kernels.py",
            "bench/linear_ce.py"} <= benches, benches
    assert len(_python_commands("pytest")) >= 3


@pytest.mark.parametrize("args", _python_commands("bench"), ids=lambda a: os.path.basename(a[0]))
def test_every_benchmark_command_line_parses(args, tmp_path):
    argv = [str(tmp_path) if a == "$OUT" else a for a in args]
    assert os.path.exists(os.path.join(ROOT, argv[0])), argv[0]
    proc = subprocess.run([sys.executable, "-c", _PARSE_ONLY, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "ARGUMENTS PARSED" in proc.stdout, \
        f"{' '.join(args)}\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}"


def test_every_pytest_run_names_files_and_markers_that_exist():
    with open(os.path.join(ROOT, "tests", "conftest.py"), encoding="utf-8") as fh:
        markers = set(re.findall(r'addinivalue_line\("markers", "(\w+)', fh.read()))
    for args in _python_commands("pytest"):
        for i, word in enumerate(args):
            if word.startswith("tests"):
                path = word.split("=", 1)[-1]
                assert os.path.exists(os.path.join(ROOT, path)), f"{' '.join(args)}: no {path}"
            if word == "-m":
                assert args[i + 1] in markers, f"{' '.join(args)}: marker {args[i + 1]!r} is not registered"
