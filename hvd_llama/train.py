"""python -m hvd_llama.train --config PATH [section.key=value ...] [--debug]

The same command runs as one plain process, under horovodrun (Gloo or MPI) and under mpirun:

    python -m hvd_llama.train --config configs/tiny.yaml
    horovodrun -np 2 -H localhost:2 python -m hvd_llama.train --config configs/tiny.yaml
    mpirun -np 2 python -m hvd_llama.train --config configs/tiny.yaml run.dir=runs/x
"""

import argparse
import os
import sys

from hvd_llama.errors import UserError


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m hvd_llama.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: built-in defaults)")
    parser.add_argument("--debug", action="store_true", help="full tracebacks on bad input")
    parser.add_argument("--dry-run", action="store_true",
                        help="print parameters, FLOPs, batch, memory and tokens; build nothing")
    parser.add_argument("--processes", type=int, default=1,
                        help="with --dry-run: the process count to plan for")
    parser.add_argument("--devices", type=int, default=1,
                        help="with --dry-run: devices per process (dist.strategy mirrored, "
                             "hybrid)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
    try:
        from hvd_llama import config
        cfg = config.load(args.config, args.overrides)
        if args.dry_run:
            from hvd_llama import plan
            print("\n".join(plan.describe(cfg, args.processes, args.devices)))
            return 0
        # Imported only now, so that `--help` and config errors answer without TensorFlow.
        from hvd_llama import distributed, trainer
        distributed.init(cfg.dist, cfg.run.dir)
        trainer.run(cfg)
    except UserError as e:
        if args.debug:
            raise
        # Config errors come before Horovod starts and read the same on every rank; later ones
        # may be one rank's own, so they name it.
        dist = sys.modules.get("hvd_llama.distributed")
        where = f" (rank {dist.rank()})" if dist and dist.size() > 1 else ""
        print(f"error{where}: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
