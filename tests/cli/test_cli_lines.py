"""argparse's own errors (unknown flag, missing argument, bad choice, bad number) look like every
other error: exactly one line `adamix: error: ...` on stderr, exit status 2, no usage block
(adamix.cli.Parser). argparse exits by SystemExit(2) before main's own error handling runs.

The text after the argument's name is argparse's, and its wording of choices differs between Python
versions, so those parts are matched by pattern; the argument named and the value refused are exact.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import adamix
from adamix.cli import main

SRC = str(Path(adamix.__file__).parents[1])
COMPRESS = ["compress", "base", "ft", "-o", "out"]  # argparse checks no path: nothing needs to exist


def argparse_error(capsys, argv: list[str]) -> str:
    """Run main(argv), expecting argparse to refuse it; returns the one line on stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2, (argv, e.value.code, err)
    assert out == "", out
    assert err.count("\n") == 1 and err.endswith("\n"), err      # exactly one line
    assert err.startswith("adamix: error: "), err
    assert "usage:" not in err and "Traceback" not in err, err   # no usage block
    return err


@pytest.mark.parametrize("argv, line", [
    # the top-level parser
    ([], r"the following arguments are required: command"),
    (["nope"], r"argument command: invalid choice: 'nope' \(choose from .*'?compress'?.*\)"),
    (["--nope"], r"the following arguments are required: command|unrecognized arguments: --nope"),
    # compress
    ([*COMPRESS, "--nope"], r"unrecognized arguments: --nope"),
    (["compress", "base", "ft"], r"the following arguments are required: -o/--out"),
    (["compress", "base"], r"the following arguments are required: finetuned, -o/--out"),
    (["compress", "-o"], r"argument -o/--out: expected one argument"),
    ([*COMPRESS, "--method", "nope"], r"argument --method: invalid choice: 'nope' \(choose from .*'?adamix'?.*\)"),
    ([*COMPRESS, "--samples", "x"], r"argument --samples: invalid int value: 'x'"),
    ([*COMPRESS, "--seqlen", "1.5"], r"argument --seqlen: invalid int value: '1.5'"),
    ([*COMPRESS, "--budget-scope", "x"], r"argument --budget-scope: invalid choice: 'x' \(choose from .*'?tensor'?.*\)"),
    ([*COMPRESS, "--grid", "x"], r"argument --grid: invalid choice: 'x' \(choose from .*'?uniform'?.*\)"),
    # merge, export-peft, inspect, demo
    (["merge", "base", "delta"], r"the following arguments are required: -o/--out"),
    (["merge", "base"], r"the following arguments are required: delta, -o/--out"),
    (["merge", "base", "delta", "-o", "out", "--ratio", "1/8"], r"unrecognized arguments: --ratio 1/8"),
    (["export-peft", "base", "delta", "-o", "out", "--dtype", "int8"],
     r"argument --dtype: invalid choice: 'int8' \(choose from .*'?float32'?.*\)"),
    (["export-peft", "base", "delta"], r"the following arguments are required: -o/--out"),
    (["inspect"], r"the following arguments are required: delta"),
    (["inspect", "delta", "--bogus"], r"unrecognized arguments: --bogus"),
    (["demo", "--ratio"], r"argument --ratio: expected one argument"),
])
def test_argparse_errors_are_one_line(capsys, argv, line):
    err = argparse_error(capsys, argv)
    assert re.fullmatch(f"adamix: error: (?:{line})\n", err), err


def test_the_whole_process_exits_2_with_one_line():
    """The same through `python -m adamix.cli` in a child process: status 2, one line, nothing else."""
    env = {**os.environ, "PYTHONPATH": SRC}
    r = subprocess.run([sys.executable, "-m", "adamix.cli", *COMPRESS, "--method", "nope"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and "usage:" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("adamix: error: argument --method: invalid choice: 'nope'"), r.stderr


@pytest.mark.parametrize("argv", [["--help"], ["compress", "--help"], ["merge", "-h"]])
def test_help_still_prints_usage(capsys, argv):
    """Only errors lose the usage block: --help prints it on stdout and exits 0."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 0 and out.startswith("usage:") and err == ""
