"""The training loop, top to bottom: data, model, optimizer, restore, steps, checkpoints, export.

Distributed touchpoints, each visible here: the optimizer is wrapped so gradients are averaged
by Horovod allreduce (inside `optimizer.apply`); rank 0's weights and optimizer state are
broadcast before the first step (`checkpoint.restore`); the logged loss is averaged over all
processes; only rank 0 prints and writes files.
"""

import json
import os
import shutil
import time

import keras
import numpy as np
import tensorflow as tf

from hvd_llama import checkpoint, data, distributed as dist, export, model as model_lib, optim
from hvd_llama import plan
from hvd_llama import config as config_lib
from hvd_llama.atomic import atomic_path, write_bytes


def make_train_step(model, optimizer):
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step(batch):  # int32 [b, seq_len + 1]
        inputs, targets = batch[:, :-1], batch[:, 1:]  # [b, seq_len] each, targets shifted by one
        with tf.GradientTape() as tape:
            logits = model({"token_ids": inputs, "padding_mask": tf.ones_like(inputs)},
                           training=True)  # [b, seq_len, vocab]
            loss = loss_fn(targets, logits)  # mean over this process's b * seq_len tokens
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)  # allreduce-averaged, then applied
        return loss

    return train_step


def make_eval_step(model):
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def eval_step(batch):  # int32 [b, seq_len + 1]
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model({"token_ids": inputs, "padding_mask": tf.ones_like(inputs)},
                       training=False)
        return loss_fn(targets, logits)

    return eval_step


def run(config):
    """Train as configured; returns the trained model and {"step", "loss"} of the last log."""
    c, run_dir = config, config.run.dir
    if not tf.config.list_physical_devices("GPU"):
        plan.check_fits(c, dist.local_size())  # a clear refusal instead of running out of memory
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
    val = data.validation_batches(dataset.sequences("val", c.data.seq_len), c.train.batch_size,
                                  c.train.eval_batches, dist.rank(), dist.size())
    model = model_lib.build(c.model, seed=c.train.seed)
    schedule = optim.schedule(c.train)
    optimizer = dist.DistributedOptimizer(optim.build(c.train, schedule),
                                          compression=c.dist.compression)
    optimizer.build(model.trainable_variables)  # create its variables so they can be restored
    checkpoint.restore(resume_meta, model, optimizer)  # then broadcast from rank 0
    start = resume_meta["step"] if resume_meta else 0
    rows = resume_meta["rows"] if resume_meta else 0  # global sequences consumed so far

    global_batch = c.train.batch_size * dist.size()
    tokens_per_step = global_batch * c.data.seq_len
    if dist.is_chief():
        print(f"hvd_llama: {dist.size()} process(es), controller {dist.controller()}",
              flush=True)
        for line in plan.describe(c, dist.size()):
            print(line, flush=True)
        print(f"data: {path}: {train_seqs.n:,} sequences "
              f"({c.train.steps * global_batch / max(train_seqs.n, 1):.2f} epochs), "
              f"{len(val)} validation batches; this run: steps {start + 1}..{c.train.steps}",
              flush=True)

    batches = data.dataset(train_seqs, c.train.batch_size, c.train.seed, first_row=rows,
                           steps=c.train.steps - start, rank=dist.rank(), size=dist.size())
    train_step, eval_step = make_train_step(model, optimizer), make_eval_step(model)
    metrics = _Metrics(run_dir, append=resume_meta is not None)
    last = {"step": start, "loss": None}
    t_log, steps_since_log = time.perf_counter(), 0
    for step, batch in enumerate(batches, start=start + 1):
        loss = train_step(batch)
        rows += global_batch
        steps_since_log += 1
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
            record = {"step": step, "loss": loss,
                      "tokens_per_sec": steps_since_log * tokens_per_step / (now - t_log),
                      "learning_rate": float(schedule(step - 1))}  # the rate this step used
            if val_loss is not None:
                record["val_loss"] = val_loss
            metrics.write(record)
            last = {"step": step, "loss": loss}
            t_log, steps_since_log = now, 0
        if step % c.train.checkpoint_every == 0 or last_step:
            checkpoint.save(c, step, rows, model, optimizer)

    if dist.is_chief():
        path = export.export(model, os.path.join(run_dir, "saved_model"))
        with atomic_path(os.path.join(run_dir, "tokenizer.model")) as tmp:
            shutil.copyfile(dataset.tokenizer_path, tmp)
        print(f"done: step {last['step']}, loss {last['loss']}; exported {path}", flush=True)
    metrics.close()
    return model, last


class _Metrics:
    """Rank 0's metrics.jsonl (one JSON object per logged step), TensorBoard and console."""

    def __init__(self, run_dir, append):
        self.on = dist.is_chief()
        if self.on:
            self.file = open(os.path.join(run_dir, "metrics.jsonl"), "a" if append else "w")
            self.tb = tf.summary.create_file_writer(os.path.join(run_dir, "tensorboard"))

    def write(self, record):
        if not self.on:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        with self.tb.as_default(step=record["step"]):
            for key, value in record.items():
                if key != "step":
                    tf.summary.scalar(key, value)
        val = f"  val_loss {record['val_loss']:.4f}" if "val_loss" in record else ""
        print(f"step {record['step']:6d}  loss {record['loss']:.4f}{val}  "
              f"lr {record['learning_rate']:.2e}  {record['tokens_per_sec']:,.0f} tokens/s",
              flush=True)

    def close(self):
        if self.on:
            self.file.close()
            self.tb.close()
