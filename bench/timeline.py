"""Stage 3's prefetch in a Horovod timeline (make bench-timeline): the thin model of
bench/zero.py at dist.zero=3 on 2 processes (horovodrun, Gloo), with dist.prefetch on and off,
each run writing Horovod's timeline (dist.timeline). From rank 0's timeline, the all-gathers
grouped by layer (those whose negotiation began within 2 ms of a group's first, in time
order): how many groups were issued before the group before them had arrived, and the gap
from one group's arrival to the next one's issue. Rank 0 is Horovod's coordinator: a
negotiation starts when the first rank asks for the collective. Without prefetch a layer's
all-gather is issued once the layer before it has computed, so each gap is that layer's
compute, with nothing on the wire; with prefetch it is issued as the layer before starts,
and the gaps close.

Writes bench/results/<date>-<host>-timeline.json and .md (the timelines themselves, a few MB
each, stay in a temporary directory) and prints the table.

    .venv/bin/python bench/timeline.py [--steps N]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

from steps import REPO, hvd_llama_bench, publish
from zero import PROCESSES, THIN

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = os.path.join(REPO, "configs", "small.yaml")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each run")
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for prefetch in (True, False):
            timeline = os.path.join(tmp, f"prefetch-{prefetch}.json")
            b = hvd_llama_bench(["--config", SMALL, "--steps", str(args.steps), *THIN,
                                 "train.jit_compile=false", "dist.zero=3",
                                 f"dist.prefetch={str(prefetch).lower()}",
                                 f"dist.timeline={timeline}"], PROCESSES, "gloo")
            rows.append({"prefetch": prefetch, "tokens_per_s": b["tokens_per_s"],
                         "step_s": b["step_s"], **gather_gaps(timeline)})
            print(json.dumps(rows[-1]), flush=True)
    publish(rows, args.steps, "timeline", table, args.results, None, None, None)


def gather_gaps(path):
    """The all-gather groups of a Horovod timeline (Chrome trace events: each tensor a "pid",
    its negotiation and its collective "B"/"E" pairs) and the gaps between them, in ms."""
    with open(path) as f:
        text = f.read().rstrip().rstrip(",")
    events = json.loads(text if text.endswith("]") else text + "]")  # still being written
    open_, spans = {}, []
    for e in events:
        if e.get("ph") == "B":
            open_.setdefault(e["pid"], []).append((e["name"], e["ts"]))
        elif e.get("ph") == "E" and open_.get(e["pid"]):
            name, start = open_[e["pid"]].pop()
            spans.append((name, e["pid"], start, e["ts"]))
    arrived = {}
    for name, pid, start, end in spans:
        if name == "ALLGATHER":
            arrived.setdefault(pid, []).append((start, end))
    groups = []  # [issued, arrived] of each layer's all-gathers, in ts (microseconds)
    for name, pid, start, _ in sorted(spans, key=lambda s: s[2]):
        if name != "NEGOTIATE_ALLGATHER":
            continue
        end = min((e for s, e in arrived.get(pid, []) if s >= start), default=None)
        if end is None:
            continue
        if groups and start - groups[-1][0] < 2000:
            groups[-1][1] = max(groups[-1][1], end)
        else:
            groups.append([start, end])
    gaps = [(b[0] - a[1]) / 1000 for a, b in zip(groups, groups[1:])]
    if not gaps:
        sys.exit(f"{path}: fewer than two all-gather groups in Horovod's timeline")
    return {"groups": len(groups),
            "issued_before_the_previous_arrived": sum(g < 0 for g in gaps),
            "gap_median_ms": statistics.median(gaps), "gap_mean_ms": statistics.mean(gaps)}


def table(result):
    lines = [f"thin model (bench/zero.py), dist.zero=3, train.remat, {PROCESSES} processes "
             f"(Gloo), {result['steps']} timed steps, {result['cpus']} CPUs, {result['host']}, "
             f"{result['date']}; all-gather groups of rank 0's Horovod timeline "
             "(every step of the run, untimed ones too):", "",
             "| dist.prefetch | tokens/s | step s | all-gather groups | issued before the "
             "previous group arrived | gap from one group's arrival to the next one's issue, "
             "ms: median (mean) |", "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {str(r['prefetch']).lower()} | {r['tokens_per_s']:.1f} | "
                     f"{r['step_s']:.2f} | {r['groups']} | "
                     f"{r['issued_before_the_previous_arrived']} | "
                     f"{r['gap_median_ms']:.1f} ({r['gap_mean_ms']:.1f}) |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
