"""python -m hvd_llama.train --config PATH [section.key=value ...] [--dry-run] [--debug]

The same command runs as one plain process, under horovodrun (Gloo or MPI) and under mpirun:

    python -m hvd_llama.train --config configs/tiny.yaml
    horovodrun -np 2 -H localhost:2 python -m hvd_llama.train --config configs/tiny.yaml
    mpirun -np 2 python -m hvd_llama.train --config configs/tiny.yaml run.dir=runs/x
"""

import argparse
import sys

from hvd_llama import cli


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m hvd_llama.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: built-in defaults)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print parameters, FLOPs, batch, memory and tokens; build nothing")
    parser.add_argument("--processes", type=int, default=1,
                        help="with --dry-run: the process count to plan for")
    parser.add_argument("--devices", type=int, default=1,
                        help="with --dry-run: devices per process (dist.strategy mirrored, "
                             "hybrid)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return cli.main(parser, _train, argv)


def _train(args):
    from hvd_llama import config, plan
    from hvd_llama.layout import Layout
    cfg = config.load(args.config, args.overrides)
    if args.dry_run:
        print("\n".join(plan.describe(cfg, Layout.of(cfg, args.processes, args.devices))))
        return
    # Only now TensorFlow: `--help`, `--dry-run` and config errors answer without it.
    cli.import_tensorflow()
    from hvd_llama import distributed, replicas, trainer
    distributed.init(cfg.dist, cfg.run.dir)  # Horovod (under a launcher), CPU threads
    replicas.setup(cfg.dist, distributed.local_rank(), distributed.local_size())  # devices
    trainer.run(cfg)


if __name__ == "__main__":
    sys.exit(main())
