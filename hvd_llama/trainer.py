"""The training loop, top to bottom: data, model, optimizer, restore, steps, checkpoints, export.

Distributed touchpoints, each visible here: the model and optimizer are built under
dist.strategy's tf.distribute strategy (replicas.py: a copy per device under mirrored/hybrid),
whose replicas' gradients are averaged inside the process; the optimizer is wrapped so gradients
are averaged between processes by Horovod allreduce (inside `optimizer.apply`, once per optimizer
step, after the micro-batches are accumulated); rank 0's weights and optimizer state are
broadcast before the first step (`checkpoint.restore`); the logged loss is averaged over all
processes; only rank 0 prints and writes files.
"""

import datetime
import json
import math
import os
import shutil
import time

import keras
import numpy as np
import tensorflow as tf

from hvd_llama import checkpoint, data, distributed as dist, export, hardware
from hvd_llama import model as model_lib, optim, plan, replicas
from hvd_llama import config as config_lib
from hvd_llama.atomic import atomic_path, write_bytes
from hvd_llama.errors import UserError


def token_loss(model, tokens, training):
    """Mean next-token cross-entropy of int32 [b, seq_len + 1] tokens, in float32.

    A plain mean: Keras's loss classes divide by the replica count under a tf.distribute
    strategy, expecting their sum; replicas.mean averages instead."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # [b, seq_len] each, shifted by one
    # An int32 padding mask: keras-hub's bool mask breaks under MirroredStrategy (AddN on bool).
    logits = model({"token_ids": inputs, "padding_mask": tf.ones_like(inputs)},
                   training=training)  # [b, seq_len, vocab], in the compute dtype
    return tf.reduce_mean(keras.ops.sparse_categorical_crossentropy(
        targets, tf.cast(logits, tf.float32), from_logits=True))


def make_gradients(model, jit_compile=False):
    """(int32 [k, d*b, seq_len + 1]: this process's k micro-batches of b sequences for each of
    its d replicas, loss scale) -> (mean loss, mean gradients) over all of them. Each replica
    runs the forward and backward passes of its share, compiled with XLA when jit_compile is
    set; the replicas' results are then averaged inside the process. No communication between
    processes."""
    variables = model.trainable_variables

    def micro_step(tokens, scale):
        with tf.GradientTape() as tape:
            loss = token_loss(model, tokens, training=True)
            scaled_loss = loss * scale  # float16: lift small gradients above underflow
        # The embedding's gradient comes as IndexedSlices; the accumulator and the
        # all-reduces want it dense.
        return loss, [tf.convert_to_tensor(g) for g in tape.gradient(scaled_loss, variables)]

    @tf.function(jit_compile=jit_compile)
    def replica_gradients(micro_batches, scale):  # [k, b, seq_len + 1]: this replica's
        loss, grads = micro_step(micro_batches[0], scale)
        for j in tf.range(1, tf.shape(micro_batches)[0]):  # a graph loop, not k copies
            more_loss, more = micro_step(micro_batches[j], scale)
            loss += more_loss
            grads = [g + m for g, m in zip(grads, more)]
        k = tf.cast(tf.shape(micro_batches)[0], tf.float32)
        return loss / k, [g / k for g in grads]  # equal micro-batches: the mean of means

    def replica(micro_batches, scale):
        # Replica i of d takes sequences [i*b, (i+1)*b) of each micro-batch (data.py's rows).
        ctx = tf.distribute.get_replica_context()
        shape = tf.shape(micro_batches)
        mine = tf.reshape(micro_batches, [shape[0], ctx.num_replicas_in_sync, -1, shape[2]])
        return replica_gradients(mine[:, ctx.replica_id_in_sync_group], scale)

    @tf.function
    def gradients(micro_batches, scale):
        return replicas.mean(replicas.strategy().run(replica, args=(micro_batches, scale)))

    return gradients


def make_train_step(model, optimizer, jit_compile=False):
    """One optimizer step over int32 [k, d*b, seq_len + 1]: k micro-batches of b sequences for
    each of this process's d replicas.

    The forward and backward passes (make_gradients) run in one function per replica, compiled
    with XLA when jit_compile is set; the allreduce and the update run outside it, so Horovod's
    ops never need an XLA lowering, and outside the strategy's scope (replicas.py). Returns
    (mean loss, global norm of the averaged gradients, the learning rate this step used)."""
    variables = model.trainable_variables
    scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)  # float16
    gradients = make_gradients(model, jit_compile)

    @tf.function
    def train_step(micro_batches):
        scale = tf.convert_to_tensor(optimizer.dynamic_scale) if scaled else tf.constant(1.0)
        learning_rate = tf.convert_to_tensor(optimizer.learning_rate)
        loss, grads = gradients(micro_batches, scale)
        norm = optimizer.apply(grads, variables)  # allreduce, clip, update (or skip)
        return loss, norm / scale, learning_rate

    return train_step


def build(c):
    """(model, its DistributedOptimizer, whether the gradients run under XLA) for Config c."""
    with replicas.strategy().scope():  # mirrored/hybrid: a copy of every variable per device
        model = model_lib.build(c.model, c.train.seed, c.train.precision, c.train.remat)
        optimizer = dist.DistributedOptimizer(
            optim.build(c.train, optim.schedule(c.train), model.trainable_variables),
            compression=c.dist.compression)
        optimizer.build(model.trainable_variables)  # its variables exist before a restore
    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    jit = c.train.jit_compile == "true" or (c.train.jit_compile == "auto" and on_gpu)
    return model, optimizer, jit


def peak_tflops(c):
    """(the devices' peak TFLOP/s per process, where it comes from), the same on every rank.
    A CPU's peak is measured: with every process measuring at once, each sees its share of
    the cores (logical CPU devices share them too)."""
    dist.barrier()
    peak, source = hardware.peak_tflops(c.train.precision, c.train.peak_tflops)
    if tf.config.get_visible_devices("GPU") and not c.train.peak_tflops:
        peak *= replicas.count()  # a datasheet figure is per GPU
    return float(dist.allreduce_mean(peak)), source


def make_eval_step(model):
    """The validation loss of int32 [b, seq_len + 1], on the first replica's device."""
    return tf.function(lambda batch: token_loss(model, batch, training=False))


def run(config):
    """Train as configured; returns the trained model and {"step", "loss"} of the last log."""
    c, run_dir = config, config.run.dir
    d = replicas.count()  # replicas (devices) in this process: 1 under dist.strategy=horovod
    micro = config_lib.micro_batch(c, dist.size() * d)  # the same verdict on every rank
    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    if not on_gpu:  # refuse instead of running out
        plan.check_fits(c, dist.size() * d, dist.local_size() * d)
    resume_meta = checkpoint.check_run_dir(c)  # refuses bad run dirs before any compute
    if dist.is_chief():
        os.makedirs(run_dir, exist_ok=True)
        write_bytes(os.path.join(run_dir, "config.yaml"), config_lib.to_yaml(c).encode())

    path = data.builtin_dir(c.data.cache_dir, c.model.vocab_size) \
        if c.data.path == "builtin" else c.data.path
    # Sizes are checked on every rank; the sha256 pass reads every shard, so once per host.
    dataset = data.Prepared(path, c.model.vocab_size,
                            verify=c.data.verify and dist.local_rank() == 0)
    train_seqs = dataset.sequences("train", c.data.seq_len)
    val = data.validation_batches(dataset.sequences("val", c.data.seq_len), micro * d,
                                  c.train.eval_batches, dist.rank(), dist.size())
    model, optimizer, jit = build(c)
    checkpoint.restore(resume_meta, model, optimizer)  # then broadcast from rank 0
    start = resume_meta["step"] if resume_meta else 0
    rows = resume_meta["rows"] if resume_meta else 0  # global sequences consumed so far

    peak, peak_source = peak_tflops(c)
    world = dist.world()
    tokens_per_step = c.train.global_batch * c.data.seq_len
    flops_per_step = plan.flops_per_token(c.model, c.data.seq_len) * tokens_per_step
    if dist.is_chief():
        print(f"hvd_llama: {world['size']} process(es) on {len(world['hosts'])} host(s) "
              f"({', '.join(world['hosts'])}), controller {world['controller']}, "
              f"tensor ops {world['tensor_ops']}; dist.strategy={c.dist.strategy}: "
              f"{replicas.describe()}", flush=True)
        for line in plan.describe(c, dist.size(), d):
            print(line, flush=True)
        print(f"compute: {c.train.precision}, XLA {'on' if jit else 'off'}, remat "
              f"{'on' if c.train.remat else 'off'}; peak {peak:.3g} TFLOP/s per process "
              f"({peak_source})", flush=True)
        print(f"data: {path}: {train_seqs.n:,} sequences "
              f"({c.train.steps * c.train.global_batch / max(train_seqs.n, 1):.2f} epochs), "
              f"{len(val)} validation batches; this run: steps {start + 1}..{c.train.steps}",
              flush=True)

    batches = data.dataset(train_seqs, micro * d, c.train.seed, first_row=rows,
                           steps=c.train.steps - start, rank=dist.rank(), size=dist.size(),
                           accum=c.train.grad_accum)
    train_step, eval_step = make_train_step(model, optimizer, jit), make_eval_step(model)
    metrics = _Metrics(run_dir, c.train.steps, append=resume_meta is not None)
    last = {"step": start, "loss": None}
    skipped = 0
    t_log, steps_since_log = time.perf_counter(), 0
    for step, batch in enumerate(batches, start=start + 1):
        loss, grad_norm, learning_rate = train_step(batch)
        rows += c.train.global_batch
        steps_since_log += 1
        grad_norm = float(grad_norm)  # of the allreduced gradients: the same on every rank
        if not math.isfinite(grad_norm):
            skipped += 1
            _nonfinite(c, optimizer, step, skipped)
        last_step = step == c.train.steps
        val_loss = None
        if val and c.train.eval_every and (step % c.train.eval_every == 0 or last_step):
            # Every rank evaluates its part of the same validation batches.
            t_eval = time.perf_counter()
            val_loss = float(dist.allreduce_mean(np.mean([eval_step(b) for b in val])))
            t_log += time.perf_counter() - t_eval  # tokens/s counts training time only
        if step % c.train.log_every == 0 or last_step or val_loss is not None:
            loss = float(dist.allreduce_mean(loss))  # every rank joins; rank 0 reports
            now = time.perf_counter()
            seconds_per_step = (now - t_log) / steps_since_log
            record = {"step": step, "loss": loss, "perplexity": _perplexity(loss),
                      "learning_rate": float(learning_rate), "grad_norm": grad_norm,
                      "tokens_per_sec": tokens_per_step / seconds_per_step,
                      "mfu": flops_per_step / seconds_per_step / (peak * 1e12 * dist.size())
                      if peak else 0.0,
                      "eta_sec": (c.train.steps - step) * seconds_per_step,
                      "skipped_steps": skipped}
            if c.train.precision == "float16":
                record["loss_scale"] = float(optimizer.dynamic_scale.numpy())
            if val_loss is not None:
                record.update(val_loss=val_loss, val_perplexity=_perplexity(val_loss))
            metrics.write(record)
            last = {"step": step, "loss": loss}
            t_log, steps_since_log = now, 0
        if step % c.train.checkpoint_every == 0 or last_step:
            checkpoint.save(c, step, rows, model, optimizer)

    if dist.is_chief():
        exports = os.path.join(run_dir, "saved_model")  # TF Serving's <dir>/<version>/
        path = export.export(model, exports, export.next_version(exports),
                             c.model.max_position_embeddings, dataset.tokenizer_path)[0]
        with atomic_path(os.path.join(run_dir, "tokenizer.model")) as tmp:
            shutil.copyfile(dataset.tokenizer_path, tmp)
        print(f"done: step {last['step']}, loss {last['loss']}; exported {path}", flush=True)
    metrics.close()
    return model, last


def _nonfinite(c, optimizer, step, skipped):
    """A step whose averaged gradients hold a NaN/Inf was not applied, on any rank (see
    distributed.DistributedOptimizer). Stop, or go on, the same way on every rank."""
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


class _Metrics:
    """Rank 0's metrics.jsonl (one JSON object per logged step), TensorBoard and console."""

    def __init__(self, run_dir, steps, append):
        self.on, self.steps = dist.is_chief(), steps
        if self.on:
            self.file = open(os.path.join(run_dir, "metrics.jsonl"), "a" if append else "w")
            self.tb = tf.summary.create_file_writer(os.path.join(run_dir, "tensorboard"))

    def write(self, r):
        if not self.on:
            return
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
