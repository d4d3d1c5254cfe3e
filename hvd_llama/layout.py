"""Who reads which rows: the batch arithmetic of a run, in one frozen object.

A run has P processes of d replicas (devices) each: P*d replicas in all. An optimizer step is
k micro-batches (train.grad_accum); in each, every replica runs b sequences. So

    global batch G = P x d x k x b sequences (train.global_batch), G x seq_len tokens a step.

The rows of the data stream (data.py turns a row into a sequence) are dealt out in that order:
step s reads rows [first + s*G, first + (s+1)*G); its micro-batch m the next P*d*b of them;
process p of those the d*b rows from p*d*b; and its replica r the b rows from r*b. So the
sequences of a step are the same whatever P, d and k are, and a run's loss curve does not
depend on how it is laid out. Data, trainer, plan and bench all take a Layout rather than
recompute any of this.
"""

import dataclasses

from hvd_llama.errors import UserError


@dataclasses.dataclass(frozen=True)
class Layout:
    processes: int  # P: Horovod processes (1 without a launcher)
    devices: int  # d: replicas in each process (1 under dist.strategy=horovod)
    rank: int  # this process, 0..P-1
    grad_accum: int  # k: micro-batches per optimizer step
    micro: int  # b: sequences per replica per micro-batch
    seq_len: int  # tokens per sequence (each row holds seq_len + 1: inputs, then targets)
    zero: int = 0  # dist.zero: 0 every process holds all optimizer state; 1, 2 its share

    @classmethod
    def of(cls, c, processes=1, devices=1, rank=0):
        """The layout of Config c over `processes` x `devices`; a UserError naming
        train.global_batch if it does not split evenly (the same verdict on every rank).

        Under dist.elastic the number of processes changes during the run and the global
        batch does not: the micro-batch count k is the smallest from train.grad_accum on that
        makes it split, so a micro-batch is never larger than train.grad_accum gives at the
        smallest size (plan memory with --processes at horovodrun's --min-np)."""
        replicas, global_batch, k = processes * devices, c.train.global_batch, c.train.grad_accum
        if c.dist.elastic:
            k = next((k for k in range(k, global_batch // replicas + 1)
                      if global_batch % (replicas * k) == 0), k)
        if global_batch % (replicas * k):
            elastic = (f"; dist.elastic: {processes} processes cannot split it, give horovodrun "
                       "slot counts (and --max-np) whose totals divide it"
                       if c.dist.elastic else "")
            raise UserError(f"'train.global_batch' {global_batch} does not divide into "
                            f"{replicas} replica(s) x train.grad_accum {k}{elastic}")
        return cls(processes, devices, rank, k, global_batch // (replicas * k), c.data.seq_len,
                   c.dist.zero)

    @property
    def replicas(self):
        return self.processes * self.devices

    @property
    def process_batch(self):
        """Rows this process reads per micro-batch: its replicas' b each, in replica order."""
        return self.devices * self.micro

    @property
    def global_batch(self):
        return self.replicas * self.grad_accum * self.micro

    @property
    def tokens_per_step(self):
        return self.global_batch * self.seq_len

    def rows(self, first_row, step, m):
        """This process's rows (d*b of them) at micro-batch m of step `step` (both counted from
        `first_row`). Works on ints and on int64 tensors alike."""
        import numpy as np
        per_micro = self.replicas * self.micro
        start = first_row + (step * self.grad_accum + m) * per_micro \
            + self.rank * self.process_batch
        return start + np.arange(self.process_batch)

    def position(self, first_row, steps):
        """The first row after `steps` optimizer steps from `first_row` (a checkpoint's)."""
        return first_row + steps * self.global_batch

    def share(self, dim0):
        """(start, stop): the rows of a [dim0, ...] tensor that this process owns under ZeRO
        (and writes into a checkpoint). Horovod's reduce-scatter splits the same way: the
        first dim0 % processes ranks get one row more."""
        base, extra = divmod(dim0, self.processes)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def replica_rows(self, batch, replica):
        """Replica `replica`'s [k, b, ...] of this process's [k, d*b, ...] micro-batches."""
        import tensorflow as tf
        shape = tf.shape(batch)
        per_replica = tf.reshape(batch, tf.concat([[shape[0], self.devices, self.micro],
                                                   shape[2:]], axis=0))
        return per_replica[:, replica]

    def describe(self):
        """The startup banner's (and the dry run's) batch line."""
        per_process = f" x {self.devices} device(s)" if self.devices > 1 else ""
        return (f"global batch: {self.global_batch:,} sequences = {self.tokens_per_step:,} "
                f"tokens = {self.processes} process(es){per_process} x {self.grad_accum} "
                f"micro-batch(es) x {self.micro} sequences")
