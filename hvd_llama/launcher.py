"""What started this process: a Horovod/MPI launcher, or a plain shell. Imports nothing heavy."""

import os

# Set by the launchers: horovodrun --gloo (HOROVOD_RANK), OpenMPI's mpirun, which horovodrun
# --mpi uses (OMPI_COMM_WORLD_RANK), MPICH/Intel MPI (PMI_RANK), srun --mpi=pmix (PMIX_RANK).
RANK_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
# The process count the same launchers announce (srun's PMIx has none of its own: Slurm's).
SIZE_VARS = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")


def launched():
    """True when a Horovod or MPI launcher started this process."""
    return any(v in os.environ for v in RANK_VARS)


def launched_size():
    """How many processes the launcher started (1 without a launcher), before Horovod starts."""
    if not launched():
        return 1
    return next((int(os.environ[v]) for v in SIZE_VARS if os.environ.get(v, "").isdigit()), 1)


def plain_env():
    """This process's environment without what launchers set, for a child that must run as
    one plain process (not as a second copy of this rank)."""
    prefixes = ("HOROVOD_", "OMPI_", "PMIX_", "PMI_", "OPAL_", "PRTE_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
