"""python -m hvd_llama.train --config PATH [section.key=value ...] [--dry-run] [--debug]

The same command runs as one plain process, under horovodrun (Gloo or MPI) and under mpirun:

    python -m hvd_llama.train --config configs/tiny.yaml
    horovodrun -np 2 -H localhost:2 python -m hvd_llama.train --config configs/tiny.yaml
    mpirun -np 2 python -m hvd_llama.train --config configs/tiny.yaml run.dir=runs/x
"""

import argparse
import sys

from hvd_llama import cli, hardware, preemption


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m hvd_llama.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: built-in defaults)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print parameters, FLOPs, batch, tokens, and per ZeRO stage the "
                             "memory, bytes sent and step time; build nothing")
    parser.add_argument("--processes", type=cli.at_least(1), default=1,
                        help="with --dry-run: the process count to plan for")
    parser.add_argument("--devices", type=cli.at_least(1), default=1,
                        help="with --dry-run: devices per process (dist.strategy mirrored, "
                             "hybrid)")
    parser.add_argument("--gpu", type=str.upper, choices=hardware.GPUS, default="",
                        help="with --dry-run: the GPU to plan for (its datasheet peak and memory)")
    parser.add_argument("--device-memory", type=float, default=0.0, metavar="GIB",
                        help="with --dry-run: memory per device to fit in (default: the --gpu's)")
    parser.add_argument("--mfu", type=float, default=0.4,
                        help="with --dry-run: the model FLOPs utilisation assumed for step time")
    parser.add_argument("--bus-gbps", type=float, default=25.0,
                        help="with --dry-run: bus bandwidth between processes in GB/s (NCCL's "
                             "busbw) assumed for step time; 25 = one 200 Gb/s HDR InfiniBand "
                             "link")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return cli.main(parser, _train, argv)


def _train(args):
    from hvd_llama import config
    cfg = config.load(args.config, args.overrides)
    if args.config and not any(o.startswith("run.dir=") for o in args.overrides):
        config.check_own_run(args.config, cfg.run.dir)
    if args.dry_run:
        print("\n".join(_plan(cfg, args)))
        return
    preemption.install()  # from here a signal stops the run after a step, with a checkpoint
    # Only now TensorFlow: `--help`, `--dry-run` and config errors answer without it.
    cli.import_tensorflow()
    from hvd_llama import distributed, replicas, trainer
    distributed.init(cfg.dist, cfg.run.dir)  # Horovod (under a launcher), CPU threads
    replicas.setup(cfg.dist, distributed.local_rank(), distributed.local_size())  # devices
    return trainer.run(cfg).exit_status


def _plan(cfg, args):
    """The dry run: the run over --processes x --devices, its memory at each ZeRO stage and what
    fits, the bytes each stage sends and the step time they imply."""
    from hvd_llama import plan, traffic
    from hvd_llama.errors import UserError
    from hvd_llama.layout import Layout
    for flag, value, valid, rule in (("--mfu", args.mfu, 0 < args.mfu <= 1, "in (0, 1]"),
                                     ("--bus-gbps", args.bus_gbps, args.bus_gbps > 0, "> 0"),
                                     ("--device-memory", args.device_memory,
                                      args.device_memory >= 0, ">= 0")):
        if not valid:
            raise UserError(f"{flag} must be {rule}, got {value:g}")
    layout = Layout.of(cfg, args.processes, args.devices)
    peak, source = hardware.stated_peak(cfg.train.precision, cfg.train.peak_tflops, args.gpu,
                                        layout.devices)
    return [*plan.describe(cfg, layout), plan.fit_line(cfg, layout, args.gpu, args.device_memory),
            *traffic.describe(cfg, layout, peak, source, args.mfu, args.bus_gbps)]


if __name__ == "__main__":
    sys.exit(main())
