"""Shared by the benchmarks: `python -m hvd_llama.bench ARGS` in a fresh process (alone, or
under horovodrun on this host with the given controller), its result as a dict."""

import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def hvd_llama_bench(args, processes=1, controller=None):
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")  # horovodrun may cut long stdout lines
        cmd = [sys.executable, "-m", "hvd_llama.bench", *args, "--output", result]
        if processes > 1:
            horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
            cmd = [horovodrun, "-np", str(processes), "-H", f"localhost:{processes}",
                   *([f"--{controller}"] if controller else []), *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        if out.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
        with open(result) as f:
            return json.load(f)
