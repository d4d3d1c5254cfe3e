"""Shared by the benchmarks: `python -m hvd_llama.bench ARGS` in a fresh process (alone, or
under horovodrun on this host with the given controller), its result as a dict; the
rewriting of a benchmark's table in BENCHMARKS.md; the publishing of a run's rows; and the
CPU they were measured on."""

import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def hvd_llama_bench(args, processes=1, controller=None, launch=False):
    """launch: under horovodrun even for one process (dist.strategy=hybrid needs a launcher)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")  # horovodrun may cut long stdout lines
        cmd = [sys.executable, "-m", "hvd_llama.bench", *args, "--output", result]
        if processes > 1 or launch:
            horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
            cmd = [horovodrun, "-np", str(processes), "-H", f"localhost:{processes}",
                   *([f"--{controller}"] if controller else []), *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        if out.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
        with open(result) as f:
            return json.load(f)


def replace_section(path, begin, end, lines):
    """Put `lines` between the marker lines `begin` and `end` of the Markdown file at path (if
    it has them): each run of a benchmark rewrites its own table."""
    with open(path) as f:
        text = f.read()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        with open(path, "w") as f:
            f.write(head + begin + "\n" + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1])


def cpu():
    """This CPU's model and the flags that change TensorFlow's speed, from /proc/cpuinfo."""
    info = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    flags = set(info.get("flags", "").split())
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{info.get('model name', 'unknown CPU')} ({', '.join(shown) or 'no AVX2'})"


def publish(rows, steps, name, table, results, benchmarks, begin, end):
    """Write a benchmark run's rows as results/<date>-<host>-<name>.json, its table (from
    table(result)) as .md and into `benchmarks` (BENCHMARKS.md; None: not) between `begin`
    and `end`; print it."""
    result = {"date": datetime.date.today().isoformat(), "host": socket.gethostname(),
              "cpus": os.cpu_count(), "steps": steps, "rows": rows}
    lines = table(result)
    os.makedirs(results, exist_ok=True)
    stem = os.path.join(results, f"{result['date']}-{result['host']}-{name}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    if benchmarks:
        replace_section(benchmarks, begin, end, lines)
    print("\n".join(lines))
    print(f"wrote {stem}.json, .md" + (f"; the table in {benchmarks}" if benchmarks else ""))
