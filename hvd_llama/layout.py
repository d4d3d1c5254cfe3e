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
    processes: int  # P: Horovod processes that read data (1 without a launcher; see weight)
    devices: int  # d: replicas in each process (1 under dist.strategy=horovod)
    rank: int  # this process, 0..P-1 (one of weight 0: the reader whose rows it copies)
    grad_accum: int  # k: micro-batches per optimizer step
    micro: int  # b: sequences per replica per micro-batch
    seq_len: int  # tokens per sequence (each row holds seq_len + 1: inputs, then targets)
    zero: int = 0  # dist.zero: 0 every process holds all optimizer state; 1, 2 its share
    # This process's weight in the averages of gradients and losses over Horovod's processes:
    # 1, except under dist.elastic with more processes than can split the global batch. Then
    # `processes` of them read data, weighing size/processes each, and the others weigh 0:
    # they compute on a reader's rows only to take part in every collective.
    weight: float = 1.0

    @classmethod
    def of(cls, c, processes=1, devices=1, rank=0):
        """The layout of Config c over `processes` x `devices`; a UserError naming
        train.global_batch if it does not split evenly (the same verdict on every rank)."""
        if c.dist.elastic:
            return cls._elastic(c, processes, devices, rank)
        parts = processes * devices * c.train.grad_accum
        if c.train.global_batch % parts:
            raise UserError(f"'train.global_batch' {c.train.global_batch} does not divide into "
                            f"{processes * devices} replica(s) x train.grad_accum "
                            f"{c.train.grad_accum}")
        return cls(processes, devices, rank, c.train.grad_accum,
                   c.train.global_batch // parts, c.data.seq_len, c.dist.zero)

    @classmethod
    def _elastic(cls, c, size, devices, rank):
        """Under dist.elastic the number of processes changes during the run and the global
        batch does not. The most processes that can split it read data (all of them when
        they can), in the fewest micro-batches from train.grad_accum on that split it evenly,
        so a micro-batch is never larger than train.grad_accum gives at the smallest size
        (plan memory with --dry-run --processes at horovodrun's --min-np)."""
        global_batch, first = c.train.global_batch, c.train.grad_accum
        for readers in range(size, 0, -1):
            parts = readers * devices
            k = next((k for k in range(first, global_batch // parts + 1)
                      if global_batch % (parts * k) == 0), None)
            if k:
                return cls(readers, devices, rank % readers, k, global_batch // (parts * k),
                           c.data.seq_len, c.dist.zero, size / readers if rank < readers else 0.0)
        raise UserError(f"'train.global_batch' {global_batch} does not divide into {devices} "
                        f"replica(s) x train.grad_accum {first}")

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
