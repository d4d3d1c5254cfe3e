"""The one CLI shell (hvd_llama/cli.py): every command is a console script, answers --help on
stdout with exit 0, takes --debug, and ends bad input with one `error: ...` line and exit 2."""

import configparser
import os
import sys

import pytest

from conftest import REPO, run

BIN = os.path.dirname(sys.executable)


def console_scripts():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(line.replace(" ", "").split("=") for line in lines)


def read(path):
    with open(os.path.join(REPO, path)) as f:
        return f.read()


def test_every_command_module_is_a_console_script():
    modules = {target.split(":")[0] for target in console_scripts().values()}
    commands = {f"hvd_llama.{name[:-3]}" for name in os.listdir(os.path.join(REPO, "hvd_llama"))
                if name.endswith(".py") and name != "__main__.py"
                and 'if __name__ == "__main__":' in read(os.path.join("hvd_llama", name))}
    assert modules == commands


@pytest.mark.parametrize("script", sorted(console_scripts()))
def test_help_goes_to_stdout_and_succeeds(script):
    proc = run([os.path.join(BIN, script), "--help"])
    assert proc.stdout.startswith("usage: ") and "--debug" in proc.stdout
    assert proc.stderr == ""


@pytest.mark.parametrize("args, fragment", [
    (["hvd-llama-prepare", "--input", "/no/such/corpus", "--output", "/tmp/x"],
     "/no/such/corpus"),
    (["hvd-llama-data", "inspect", "/no/such/dataset"], "/no/such/dataset"),
    (["hvd-llama-plot", "/no/such/run"], "/no/such/run"),
    (["hvd-llama-export", "/no/such/run"], "/no/such/run"),
])
def test_bad_input_is_one_line_and_debug_shows_the_traceback(args, fragment):
    proc = run([os.path.join(BIN, args[0]), *args[1:]], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and fragment in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = run([os.path.join(BIN, args[0]), "--debug", *args[1:]], check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
