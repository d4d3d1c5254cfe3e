"""A training run in three phases, each read top to bottom: setup, loop, finish.

Every rank runs every phase and writes its share of each checkpoint; only rank 0 prints and
writes the other files. The collectives, which every rank must reach in the same order, are
all visible here (and numbered in `setup`'s docstring); the step's own collectives are inside
`optimizer.apply` and, at dist.zero=2, in the backward pass (step.py, zero.py).
"""

import contextlib
import dataclasses
import datetime
import json
import math
import os
import shutil
import time

import numpy as np
import tensorflow as tf

from hvd_llama import checkpoint, data, distributed as dist, export, hardware, plan, preemption
from hvd_llama import replicas
from hvd_llama import config as config_lib, step as step_lib
from hvd_llama.atomic import atomic_path, refused_as_user_error, write_bytes
from hvd_llama.errors import UserError
from hvd_llama.layout import Layout
from hvd_llama.shards import Prepared


def run(c):
    """Train Config c; the Run (its exit_status is non-zero when a signal stopped it early,
    with a checkpoint of the step it stopped after)."""
    # Elastic: a worker that joins later reaches no collective before the state's sync.
    with dist.local_collectives() if c.dist.elastic else contextlib.nullcontext():
        r = setup(c)
    if r.start >= c.train.steps:
        return r
    try:
        finish(c, r, _elastic(c, r) if c.dist.elastic else loop(c, r))
    except tf.errors.OpError as e:  # a collective failed: one line, not a traceback per rank
        raise dist.lost_ranks(e) or e
    return r


def _elastic(c, r):
    """The loop under Horovod's elastic mode (distributed.elastic_run): the weights, the
    optimizer state, the step and the data position are committed every dist.commit_every
    steps. After a rank's death every process rolls back to the last commit; after a change
    of hosts every process stops at its next one; then the loop starts again over the new
    processes, from rank 0's state, with the layout of the new size (the same global batch,
    so the same rows at every step). Steps rolled back are trained again (and logged again)."""
    state = dist.ElasticState(r.model, r.optimizer, step=r.start, rows=r.rows)

    def train(state):
        r.start, r.rows = state.step, state.rows
        r.layout = Layout.of(c, dist.size(), replicas.count(), dist.rank())
        hosts = dist.world()["hosts"]
        waiting = dist.size() - r.layout.processes
        if dist.is_chief():
            print(f"elastic: {dist.size()} process(es) on {', '.join(hosts)} from step "
                  f"{r.start + 1}; {r.layout.describe()}" + (
                      f"; {waiting} wait{'s' * (waiting == 1)} (gradients weighed 0): "
                      f"{dist.size()} cannot split it" if waiting else ""), flush=True)

        def commit(step):
            state.step, state.rows = step, r.rows
            state.commit()  # also where a change of hosts stops every process alike
        return loop(c, r, commit)
    return dist.elastic_run(train, state)


@dataclasses.dataclass
class Run:
    """What setup hands the loop and finish."""
    layout: Layout
    dataset: Prepared
    model: object
    optimizer: object
    jit: bool
    start: int  # the last step already done (0: a fresh run)
    rows: int  # global rows consumed by the steps done
    peak: float  # the devices' peak TFLOP/s per process, for MFU (0: unknown)
    stopped_by: int = 0  # the signal the ranks stopped early on (preemption.py); 0: none

    @property
    def exit_status(self):
        """The process's: 0, or the preemption's status for the signal that stopped it."""
        return preemption.exit_status(self.stopped_by) if self.stopped_by else 0


def setup(c):
    """Everything before the first step. The collectives, in this order on every rank:
      1. broadcast  rank 0's verdict on run.dir: start fresh, resume (from which checkpoint),
                    or refuse (the error then stops every rank alike)
      2. barrier    local rank 0 of each host has prepared the built-in dataset
      3. allgather  whether every rank read its part of the checkpoint (checkpoint.restore:
                    the weights, and its optimizer state or ZeRO share)
      4. broadcast  rank 0's weights (restored, or freshly initialised); not at dist.zero=3,
                    where each process holds only its share
      5. barrier    then allreduce: the CPU peak, measured by all processes at once
      6. allgather  the hosts' names, for the banner
    """
    layout = Layout.of(c, dist.size(), replicas.count(), dist.rank())
    # Refuse instead of running out: the host's memory, or a known GPU's.
    plan.check_fits(c, layout, dist.local_size() * layout.devices, hardware.gpu_name())
    verdict = _on_chief(checkpoint.resume_point, c)
    if c.dist.elastic and not dist.is_chief():  # no broadcast to hear rank 0's verdict from
        # (run()): a run already done is done here too; else rank 0's state comes by the sync.
        done = _attempt(checkpoint.resume_point, c, False)
        verdict = done if isinstance(done, dict) and done["step"] >= c.train.steps else None
    resume = dist.broadcast_object(verdict)  # 1
    if isinstance(resume, UserError):
        raise resume
    if resume and resume["step"] >= c.train.steps:
        if dist.is_chief():  # nothing to train, so nothing is written
            print(f"{resume['path']}: already at step {resume['step']}, train.steps is "
                  f"{c.train.steps}: nothing to do (raise train.steps to train on; python -m "
                  f"hvd_llama.export {c.run.dir} exports it)", flush=True)
        return Run(layout, None, None, None, False, resume["step"], resume["rows"], 0.0)

    # Elastic: no barrier to wait at, so every process prepares it if it is missing (the
    # first to finish wins, builtin_dir).
    path = data.builtin_dir(c.data.cache_dir, c.model.vocab_size,
                            0 if c.dist.elastic else dist.local_rank()) \
        if c.data.path == "builtin" else c.data.path
    dist.barrier()  # 2
    # Sizes are checked on every rank; the sha256 pass reads every shard, so once per host.
    dataset = Prepared(path, c.model.vocab_size, verify=c.data.verify and dist.local_rank() == 0)
    model, optimizer, jit = step_lib.build(c, layout)
    # Every rank reads its part; a failure on any stops all of them alike.
    failed = dist.allgather_object(_attempt(checkpoint.restore, resume, model, optimizer))  # 3
    for rank, error in enumerate(failed):
        if error:
            raise UserError(f"rank {rank}: {error}" if len(failed) > 1 else str(error))
    if dist.is_chief():  # once the data and the checkpoint have been found good
        os.makedirs(c.run.dir, exist_ok=True)
        write_bytes(os.path.join(c.run.dir, "config.yaml"), config_lib.to_yaml(c).encode())
    if layout.zero < 3:
        dist.broadcast_variables(model.variables)  # 4
    if layout.zero:
        optimizer.take_weights()  # the shares AdamW updates follow the weights
    dist.barrier()  # 5: every process measures a CPU's peak at once, each on its share
    peak, peak_source = hardware.peak_tflops(c.train.precision, c.train.peak_tflops,
                                             replicas.count())
    peak = float(dist.allreduce_mean(peak))  # 5
    world = dist.world()  # 6
    r = Run(layout, dataset, model, optimizer, jit, start=resume["step"] if resume else 0,
            rows=resume["rows"] if resume else 0, peak=peak)
    if dist.is_chief():
        print("\n".join(_banner(c, r, world, peak_source)), flush=True)
    return r


def _on_chief(fn, *args):
    """fn(*args) on rank 0, or the UserError it raised (to broadcast); None elsewhere."""
    return _attempt(fn, *args) if dist.is_chief() else None


def _attempt(fn, *args):
    """fn(*args), or the UserError it raised: to share with the other ranks."""
    try:
        return fn(*args)
    except UserError as e:
        return e


def _banner(c, r, world, peak_source):
    train = r.dataset.sequences("train", c.data.seq_len)
    evaluates = c.train.eval_every and r.dataset.sequences("val", c.data.seq_len).n
    return [
        f"hvd_llama: {world['size']} process(es) on {len(world['hosts'])} host(s) "
        f"({', '.join(world['hosts'])}), controller {world['controller']}, tensor ops "
        f"{world['tensor_ops']}; dist.strategy={c.dist.strategy}: {replicas.describe()}",
        *plan.describe(c, r.layout),
        f"compute: {c.train.precision}, XLA {'on' if r.jit else 'off'}, remat "
        f"{'on' if c.train.remat else 'off'}; peak {r.peak:.3g} TFLOP/s per process "
        f"({peak_source})",
        f"data: {r.dataset.path}: {train.n:,} sequences "
        f"({c.train.steps * r.layout.global_batch / max(train.n, 1):.2f} epochs), "
        f"{c.train.eval_batches if evaluates else 0} validation batch(es) of "
        f"{r.layout.global_batch}; this run: steps {r.start + 1}..{c.train.steps}",
        *([f"note: train.warmup_steps={c.train.warmup_steps} exceeds train.steps="
           f"{c.train.steps}: the learning rate never reaches train.learning_rate"]
          if c.train.warmup_steps > c.train.steps else [])]


def loop(c, r, commit=None):
    """The optimizer steps from r.start + 1 to train.steps; {"step", "loss"} of the last log.
    Collectives: the step's allreduce (or ZeRO's); at each logged step the mean loss (and the
    validation loss when evaluating); after each step but the last, the max of the signals
    received (preemption.py); at each checkpoint the allgather of the weights' checksums and
    the save's barriers; under dist.elastic, commit(step) every dist.commit_every steps."""
    layout, optimizer = r.layout, r.optimizer
    batches = data.dataset(r.dataset.sequences("train", c.data.seq_len), layout, c.train.seed,
                           first_row=r.rows, steps=c.train.steps - r.start)
    val = data.validation_batches(r.dataset.sequences("val", c.data.seq_len), layout,
                                  c.train.eval_batches) if c.train.eval_every else []
    train_step = step_lib.make_train_step(r.model, optimizer, layout, r.jit)
    eval_step = step_lib.make_eval_step(r.model)
    metrics = _Metrics(c.run.dir, c.train.steps, r.start)
    flops_per_step = plan.flops_per_token(c.model, c.data.seq_len) * layout.tokens_per_step
    last, skipped = {"step": r.start, "loss": None}, 0
    t_log, steps_since_log = time.perf_counter(), 0
    try:
        for step, batch in enumerate(batches, start=r.start + 1):
            loss, grad_norm, learning_rate = train_step(batch)
            r.rows = layout.position(r.rows, 1)
            steps_since_log += 1
            grad_norm = float(grad_norm)  # of the allreduced gradients: the same on every rank
            if not math.isfinite(grad_norm):
                skipped += 1
                _nonfinite(c, optimizer, step, skipped)
            last_step = step == c.train.steps
            val_loss = None
            if val and (step % c.train.eval_every == 0 or last_step):
                t_eval = time.perf_counter()  # every rank evaluates its part of the same batches
                val_loss = float(dist.allreduce_mean(
                    np.mean([eval_step(b) for b in val]) * layout.weight))
                t_log += time.perf_counter() - t_eval  # tokens/s counts training time only
            if step % c.train.log_every == 0 or last_step or val_loss is not None:
                now = time.perf_counter()
                seconds_per_step = (now - t_log) / steps_since_log
                record = _record(c, step, float(dist.allreduce_mean(loss * layout.weight)),
                                 learning_rate,
                                 grad_norm, skipped, seconds_per_step, layout.tokens_per_step,
                                 flops_per_step / (r.peak * 1e12 * dist.size()) if r.peak else 0.0)
                if c.train.precision == "float16":
                    record["loss_scale"] = float(optimizer.dynamic_scale.numpy())
                if val_loss is not None:
                    record.update(val_loss=val_loss, val_perplexity=_perplexity(val_loss))
                metrics.write(record)
                last = {"step": step, "loss": record["loss"]}
                t_log, steps_since_log = now, 0
            # A signal on any rank stops every rank after this step, with a checkpoint of it
            # (after the last step the run simply ends, export included).
            r.stopped_by = 0 if last_step else dist.allreduce_max(preemption.received())
            if step % c.train.checkpoint_every == 0 or last_step or r.stopped_by:
                checkpoint.save(c, layout, step, r.rows, r.model, optimizer)  # every rank
            if r.stopped_by:
                last["step"] = step
                break
            if commit and step % c.dist.commit_every == 0 and not last_step:
                commit(step)
    finally:  # an elastic reset enters the loop again
        metrics.close()
    return last


def _record(c, step, loss, learning_rate, grad_norm, skipped, seconds_per_step, tokens,
            flops_over_peak):
    return {"step": step, "loss": loss, "perplexity": _perplexity(loss),
            "learning_rate": float(learning_rate), "grad_norm": grad_norm,
            "tokens_per_sec": tokens / seconds_per_step,
            "mfu": flops_over_peak / seconds_per_step,
            "eta_sec": (c.train.steps - step) * seconds_per_step, "skipped_steps": skipped}


def finish(c, r, last):
    """Rank 0 exports the trained model as the next SavedModel version, with its tokenizer
    (unless train.export is false). After a signal stopped the run early, rank 0 says so
    instead, and every rank waits for it (a barrier): mpirun stops the ranks still running
    as soon as one exits with the preemption's status."""
    if r.stopped_by:
        if dist.is_chief():
            print(f"stopped after step {last['step']} on {preemption.name(r.stopped_by)}: "
                  f"checkpoint {checkpoint.latest(c.run.dir)} written; train.resume=auto "
                  f"continues it (exit status {preemption.exit_status(r.stopped_by)})",
                  flush=True)
        dist.barrier()
        return
    if not dist.is_chief():
        return
    if not c.train.export:
        print(f"done: step {last['step']}, loss {last['loss']}; checkpoint "
              f"{checkpoint.latest(c.run.dir)} (train.export=false)", flush=True)
        return
    exports = os.path.join(c.run.dir, "saved_model")  # TF Serving's <dir>/<version>/
    # dist.zero=3: this process holds a share of the weights; the last step's checkpoint, all.
    model = checkpoint.load_latest(c.run.dir)[1] if r.layout.zero == 3 else r.model
    path = export.export(model, exports, export.next_version(exports),
                         c.model.max_position_embeddings, r.dataset.tokenizer_path)[0]
    with atomic_path(os.path.join(c.run.dir, "tokenizer.model")) as tmp:
        shutil.copyfile(r.dataset.tokenizer_path, tmp)
    print(f"done: step {last['step']}, loss {last['loss']}; exported {path}", flush=True)


def _nonfinite(c, optimizer, step, skipped):
    """A step whose averaged gradients hold a NaN/Inf was not applied, on any rank (see
    distributed.DistributedOptimizer and zero.ShardedOptimizer). Stop, or go on, the same way
    on every rank."""
    if c.train.precision == "float16" and float(optimizer.dynamic_scale.numpy()) >= 1.0:
        return  # an overflow of the scaled loss: the halved scale is the cure
    if c.train.on_nonfinite == "stop":
        raise UserError(f"step {step}: the loss or its gradients are NaN/Inf; stopped before "
                        f"applying it (the last checkpoint is intact; train.on_nonfinite=skip "
                        f"skips such steps instead)")
    if dist.is_chief():
        print(f"step {step}: NaN/Inf gradients, step skipped ({skipped} so far)", flush=True)


def _perplexity(loss):
    return math.exp(min(loss, 700.0))  # exp overflows a float past ~709


def _step_of(line):
    """The step of a metrics.jsonl line; past every step for one a crash cut short."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):
        return math.inf


class _Metrics:
    """Rank 0's metrics.jsonl (one JSON object per logged step), TensorBoard and console."""

    def __init__(self, run_dir, steps, start):
        self.on, self.steps = dist.is_chief(), steps
        if self.on:
            self.path = path = os.path.join(run_dir, "metrics.jsonl")
            if start and os.path.exists(path):
                # A run that died after its last checkpoint logged steps that are now redone.
                with open(path) as f:
                    kept = [line for line in f if _step_of(line) <= start]
                write_bytes(path, "".join(kept).encode())
            self.file = open(path, "a" if start else "w")
            self.tb = tf.summary.create_file_writer(os.path.join(run_dir, "tensorboard"))

    def write(self, r):
        if not self.on:
            return
        with refused_as_user_error(self.path):  # a full disk: the lines before stay whole
            self.file.write(json.dumps(r) + "\n")
            self.file.flush()
        with self.tb.as_default(step=r["step"]):
            for key, value in r.items():
                if key != "step":
                    tf.summary.scalar(key, value)
        val = (f" | val_loss {r['val_loss']:.4f} ppl {r['val_perplexity']:,.1f}"
               if "val_loss" in r else "")
        skipped = f" | skipped {r['skipped_steps']}" if r["skipped_steps"] else ""
        eta = datetime.timedelta(seconds=round(r["eta_sec"]))
        print(f"step {r['step']}/{self.steps} | loss {r['loss']:.4f} | ppl {r['perplexity']:,.1f}"
              f" | lr {r['learning_rate']:.2e} | gnorm {r['grad_norm']:.3f} | "
              f"{r['tokens_per_sec']:,.0f} tok/s | MFU {100 * r['mfu']:.1f}% | ETA {eta}"
              f"{skipped}{val}", flush=True)

    def close(self):
        if self.on:
            self.file.close()
            self.tb.close()
