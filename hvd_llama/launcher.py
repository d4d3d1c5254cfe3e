"""What started this process: a Horovod/MPI launcher, or a plain shell. Imports nothing heavy."""

import os

# Set by the launchers: horovodrun --gloo (HOROVOD_RANK), OpenMPI's mpirun, which horovodrun
# --mpi uses (OMPI_COMM_WORLD_RANK), MPICH/Intel MPI (PMI_RANK), srun --mpi=pmix (PMIX_RANK).
RANK_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def launched():
    """True when a Horovod or MPI launcher started this process."""
    return any(v in os.environ for v in RANK_VARS)


def plain_env():
    """This process's environment without what launchers set, for a child that must run as
    one plain process (not as a second copy of this rank)."""
    prefixes = ("HOROVOD_", "OMPI_", "PMIX_", "PMI_", "OPAL_", "PRTE_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
