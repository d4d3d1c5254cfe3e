"""Peers benchmark (make bench-peers): one model configuration and global batch, on this machine,
in one invocation, through what a user could run instead:

  hvd_llama           1 process (also with XLA), and N processes under horovodrun
                      (python -m hvd_llama.bench)
  keras-hub fit       LlamaCausalLM.fit, 1 process, no Horovod       (bench/peer_keras.py)
  tf.distribute       MultiWorkerMirroredStrategy, N workers          (bench/peer_keras.py --mwms)
  PyTorch             transformers' LlamaForCausalLM, eager, 1 process, and
                      DistributedDataParallel (Gloo) with N processes (bench/peer_torch.py)

Each multi-process system is also measured as 1 process on a rank's share of the host's
threads: its scaling efficiency is tokens/s of N processes over N times that. PyTorch and
transformers run from their own virtualenv (bench/.peers-venv, made here on first use), never
the project's. The figures are checked against this project's targets (targets() below). Writes
bench/results/<date>-<host>.json, .md (the table, targets last) and .png (tokens/s and scaling
efficiency per system), and replaces the table in BENCHMARKS.md.

    .venv/bin/python bench/peers.py [--config configs/small.yaml] [--processes 2] [--steps 3]
"""

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys

from steps import REPO, hvd_llama_bench, replace_section

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS_VENV = os.path.join(HERE, ".peers-venv")
PEER_PINS = ["torch==2.13.0+cpu", "transformers==5.17.0"]  # the CPU build: torch's own index
BEGIN, END = "<!-- peers:begin -->", "<!-- peers:end -->"


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "small.yaml"))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--torch-python", help="a Python with torch and transformers "
                        "(default: bench/.peers-venv, created with the pins above)")
    parser.add_argument("--allreduce-max-bytes", type=int, default=256 << 20)
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--benchmarks", default=os.path.join(REPO, "BENCHMARKS.md"),
                        help="the Markdown file whose peers table is replaced")
    args = parser.parse_args()
    from hvd_llama import config
    c = config.load(args.config)
    m = c.model
    spec = {"vocab_size": m.vocab_size, "num_layers": m.num_layers,
            "num_query_heads": m.num_query_heads, "num_key_value_heads": m.num_key_value_heads,
            "hidden_dim": m.hidden_dim, "intermediate_dim": m.intermediate_dim,
            "seq_len": c.data.seq_len, "global_batch": c.train.global_batch,
            "learning_rate": c.train.learning_rate}
    n, cpus = args.processes, os.cpu_count()
    share = max(1, cpus // n)  # threads per process when n share the host
    torch_python = args.torch_python or peers_venv()
    rows = []

    def add(system, processes, threads, tokens_per_s, **extra):
        rows.append({"system": system, "processes": processes, "threads": threads,
                     "tokens_per_s": tokens_per_s, **extra})
        print(f"{system}, {processes} x {threads} threads: {tokens_per_s:,.0f} tokens/s",
              flush=True)

    step_args = ["--config", args.config, "--steps", str(args.steps)]
    one = hvd_llama_bench(step_args)
    add("hvd_llama", 1, one["threads_per_process"], one["tokens_per_s"], mfu=one["mfu"])
    xla = hvd_llama_bench(step_args + ["train.jit_compile=true"])
    add("hvd_llama, XLA", 1, xla["threads_per_process"], xla["tokens_per_s"], mfu=xla["mfu"])
    many = hvd_llama_bench(step_args + ["--measure-single"], processes=n)
    add("hvd_llama", 1, share, many["single_tokens_per_s"])
    add("hvd_llama (horovodrun)", n, share, many["tokens_per_s"],
        scaling_efficiency=many["scaling_efficiency"], mfu=many["mfu"])

    keras = [sys.executable, os.path.join(HERE, "peer_keras.py"), "--spec", json.dumps(spec),
             "--steps", str(args.steps)]
    add("keras-hub fit", 1, cpus, peer(keras))
    mwms_one = peer(keras + ["--threads", str(share), "--mwms", "--workers", "1",
                             "--port", "23456"])
    add("tf.distribute MWMS", 1, share, mwms_one)
    mwms = peer_group([keras + ["--threads", str(share), "--mwms", "--workers", str(n),
                                "--index", str(i), "--port", "23466"] for i in range(n)])
    add("tf.distribute MWMS", n, share, mwms, scaling_efficiency=mwms / (n * mwms_one))

    torch = [torch_python, os.path.join(HERE, "peer_torch.py"), "--spec", json.dumps(spec),
             "--steps", str(args.steps)]
    add("PyTorch eager", 1, cpus, peer(torch))
    torch_one = peer(torch + ["--threads", str(share)])
    add("PyTorch eager", 1, share, torch_one)
    ddp = peer([torch_python, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
                *torch[1:], "--threads", str(share)])
    add("PyTorch DDP (Gloo)", n, share, ddp, scaling_efficiency=ddp / (n * torch_one))

    allreduce = {controller: hvd_llama_bench(
        ["allreduce", "--max-bytes", str(args.allreduce_max_bytes)], n, controller)
                 for controller in ("gloo", "mpi")}
    result = {"date": datetime.date.today().isoformat(), "host": socket.gethostname(),
              "cpus": cpus, "config": os.path.relpath(args.config, REPO), "spec": spec,
              "steps": args.steps, "processes": n, "rows": rows, "allreduce": allreduce,
              "targets": targets(rows, one, many, n, allreduce)}
    write(result, args)


def peers_venv():
    """bench/.peers-venv's Python, with torch and transformers installed on first use."""
    python = os.path.join(PEERS_VENV, "bin", "python")
    stamp = os.path.join(PEERS_VENV, ".installed-" + "-".join(PEER_PINS).replace("/", "_"))
    if not os.path.exists(stamp):
        print(f"creating {PEERS_VENV} ({', '.join(PEER_PINS)})", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", PEERS_VENV], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", *PEER_PINS], check=True)
        open(stamp, "w").close()
    return python


def peer(cmd):
    """Tokens/s a peer printed as its last line."""
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if out.returncode:
        sys.exit(f"{' '.join(cmd[:3])} ... failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]


def peer_group(cmds):
    """Start N worker processes together; worker 0's tokens/s."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=REPO, env=env) for cmd in cmds]
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            sys.exit(f"a worker failed:\n{err[-3000:]}")
    return json.loads(outs[0][0].strip().splitlines()[-1])["tokens_per_s"]


def targets(rows, one, many, n, allreduce):
    """The targets set for this model on a CPU (configs/small.yaml, float32), checked against
    the figures of this run; BENCHMARKS.md says why each is met or missed. `one` and `many`:
    python -m hvd_llama.bench with 1 and n processes; allreduce: its allreduce figures per
    controller (no bandwidth target where 64 MiB was not measured)."""
    def tokens(system, processes, threads=None):
        return next(r["tokens_per_s"] for r in rows if r["system"] == system
                    and r["processes"] == processes and threads in (None, r["threads"]))
    ours = tokens("hvd_llama (horovodrun)", n)
    checks = [
        ("hvd_llama 1 process over PyTorch eager 1 process",
         one["tokens_per_s"] / tokens("PyTorch eager", 1, one["threads_per_process"]), 1.2),
        ("hvd_llama 1 process: MFU against the measured matmul peak", one["mfu"], 0.60),
        (f"hvd_llama {n} processes: scaling efficiency", many["scaling_efficiency"], 0.95),
        (f"hvd_llama {n} processes over MWMS {n} workers",
         ours / tokens("tf.distribute MWMS", n), 1.0),
        (f"hvd_llama {n} processes over DDP {n} processes",
         ours / tokens("PyTorch DDP (Gloo)", n), 1.0),
    ]
    for controller, r in allreduce.items():
        checks += [(f"{controller}: bus bandwidth at 64 MiB over the copy bound",
                    row["busbw_over_copy"], 0.80) for row in r["rows"]
                   if row["bytes"] == 64 << 20 and row["compression"] == "none"]
    return [{"what": what, "value": value, "at_least": at_least, "met": value >= at_least}
            for what, value, at_least in checks]


def table(result):
    lines = [f"`{result['config']}` (global batch {result['spec']['global_batch']} x "
             f"{result['spec']['seq_len']} tokens, float32), {result['steps']} timed steps, "
             f"{result['cpus']} CPUs, {result['host']}, {result['date']}:", "",
             "| system | processes x threads | tokens/s | x hvd_llama 1 process | "
             "scaling efficiency | MFU |", "|---|---|---:|---:|---:|---:|"]
    base = result["rows"][0]["tokens_per_s"]
    for r in result["rows"]:
        eff = r.get("scaling_efficiency")
        mfu = r.get("mfu")
        lines.append(f"| {r['system']} | {r['processes']} x {r['threads']} | "
                     f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f} | "
                     f"{'' if eff is None else f'{100 * eff:.1f}%'} | "
                     f"{'' if mfu is None else f'{100 * mfu:.1f}%'} |")
    lines += ["", f"Horovod allreduce, {result['processes']} processes, float32, no compression "
              "(`python -m hvd_llama.bench allreduce` has fp16 too), bus bandwidth GB/s:", "",
              "| bytes | " + " | ".join(result["allreduce"]) + " |",
              "|---:|" + "---:|" * len(result["allreduce"])]
    runs = list(result["allreduce"].values())
    for i, row in enumerate(runs[0]["rows"]):
        if row["compression"] == "none" and row["bytes"] >= 1 << 20:
            lines.append(f"| {row['bytes'] >> 20} MiB | " + " | ".join(
                f"{r['rows'][i]['busbw_gbps']:.2f}" for r in runs) + " |")
    lines.append("| copy bound | " + " | ".join(f"{r['copy_gbps']:.2f}" for r in runs) + " |")
    lines += ["", "| target | measured | at least | |", "|---|---:|---:|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['what']} | {t['value']:.2f} | {t['at_least']:.2f} | "
                     f"{'met' if t['met'] else 'MISSED'} |")
    return lines


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    labels = [f"{r['system']}\n{r['processes']}x{r['threads']}" for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), width_ratios=[3, 1.3])
    ax1.bar(range(len(rows)), [r["tokens_per_s"] for r in rows], color="tab:blue")
    ax1.set_xticks(range(len(rows)), labels, fontsize=7)
    ax1.set_ylabel("tokens/s")
    ax1.set_title(f"{result['config']}, {result['cpus']} CPUs ({result['host']})")
    scaled = [r for r in rows if "scaling_efficiency" in r]
    ax2.bar(range(len(scaled)), [100 * r["scaling_efficiency"] for r in scaled],
            color="tab:green")
    ax2.set_xticks(range(len(scaled)), [r["system"] for r in scaled], fontsize=7,
                   rotation=15)
    ax2.set_ylabel(f"scaling efficiency, % ({result['processes']} processes)")
    ax2.axhline(95, color="gray", linestyle="--", linewidth=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(result, args):
    os.makedirs(args.results, exist_ok=True)
    stem = os.path.join(args.results, f"{result['date']}-{result['host']}")
    lines = table(result)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(result, stem + ".png")
    replace_section(args.benchmarks, BEGIN, END, lines)
    print("\n".join(lines))
    print(f"wrote {stem}.json, .md, .png; the table in {args.benchmarks}")


if __name__ == "__main__":
    sys.exit(main())
