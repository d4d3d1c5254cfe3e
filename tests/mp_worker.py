"""Test workers: run alone or under `horovodrun -np 2`, each rank writes what it saw to OUT.

    python tests/mp_worker.py train OUT [section.key=value ...]
        trains configs/micro.yaml with the overrides; OUT/rank<r>.npz = final weights,
        OUT/rank<r>-copies.json = how many device copies each weight has, their spread and
        the bytes of the optimizer's variables and of the weights held on this rank; with
        CRASH_IN_SAVE_RANK=r set, rank r exits (status 3) in its first checkpoint save, right
        after writing its share, or with CRASH_AT=merge (rank 0) after merging the shares, or
        CRASH_AT=rename (rank 0) with everything written, before the rename; PERTURB_RANK=r:
        rank r's weights are nudged after the broadcast; STEP_SECONDS and STALL_RANK slow
        steps down (_slow_down); a signal that stopped the run (hvd_llama.preemption) gives
        its exit status and no OUT files
    python tests/mp_worker.py zero_overflow OUT
        float16 under dist.zero 1 and 2: an overflow in one rank's share only, then a finite
        step (and stage 0 on the same gradients); the float16 training step at stages 0, 2
        and 3, from an overflow, and the bfloat16 one at stages 0 and 3; float32 at stage 1: a
        NaN in one rank's share; OUT/rank<r>.json says what each rank's optimizer did,
        OUT/zero<s>-rank<r>.npz, OUT/stream<s>-rank<r>.npz and OUT/bf16-<s>-rank<r>.npz hold
        the weights after
    python tests/mp_worker.py data OUT DATASET_DIR
        this rank's first 8 training batches (batch 2, seq_len 16) of DATASET_DIR
    python tests/mp_worker.py collectives OUT
        broadcast, gradient averaging (average/sum/fp16), clipping, NaN/overflow skips,
        model.fit with the DistributedOptimizer and ten allreduces in a row (their seconds);
        OUT/rank<r>.npz holds the arrays
"""

import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MICRO = os.path.join(HERE, os.pardir, "configs", "micro.yaml")


def weights(model):
    return [v.numpy() for v in model.weights]


def train(out, overrides):
    from hvd_llama import checkpoint, config, distributed as dist, optim, preemption, replicas
    from hvd_llama import trainer
    preemption.install()
    cfg = config.load(MICRO, overrides)
    dist.init(cfg.dist, cfg.run.dir)
    replicas.setup(cfg.dist, dist.local_rank(), dist.local_size())
    _slow_down(trainer.step_lib, dist.rank())
    if os.environ.get("CRASH_IN_SAVE_RANK") == str(dist.rank()):
        _crash_in_save(checkpoint, os.environ.get("CRASH_AT", "share"))
    if os.environ.get("PERTURB_RANK") == str(dist.rank()):
        broadcast = dist.broadcast_variables

        def broadcast_then_nudge(variables, root_rank=0):  # setup's broadcast of the weights
            broadcast(variables, root_rank)
            variables[0].assign_add(np.full(variables[0].shape, 1e-3, np.float32))
        dist.broadcast_variables = broadcast_then_nudge
    r = trainer.run(cfg)
    if r.exit_status:
        sys.exit(r.exit_status)
    # dist.zero=3 holds a share of each weight: the whole ones are in the last checkpoint.
    model = checkpoint.load_latest(cfg.run.dir)[1] if cfg.dist.zero == 3 else r.model
    held = r.optimizer.shares if cfg.dist.zero == 3 else model.weights
    adamw = optim.adamw(getattr(r.optimizer, "inner", r.optimizer))  # ZeRO's, or stage 0's
    np.savez(os.path.join(out, f"rank{dist.rank()}.npz"), *weights(model))
    # Every device's copy of every weight (one copy outside mirrored/hybrid), against the first.
    copies = [replicas.strategy().experimental_local_results(v.value) for v in model.weights]
    spread = max(float(np.max(np.abs(c.numpy() - cs[0].numpy()))) for cs in copies for c in cs)
    with open(os.path.join(out, f"rank{dist.rank()}-copies.json"), "w") as f:
        json.dump({"copies": len(copies[0]), "spread": spread,
                   "optimizer_bytes": sum(int(np.prod(v.shape)) * 4 for v in adamw.variables),
                   "weight_bytes": sum(int(np.prod(v.shape)) * 4 for v in held)},
                  f)


def _crash_in_save(checkpoint, point):
    """Make this process die (os._exit: no cleanup runs) at `point` of its first save."""
    def then_die(fn, unless=lambda *args: False):
        def call(*args, **kwargs):
            if unless(*args):
                return fn(*args, **kwargs)
            if point != "rename":
                fn(*args, **kwargs)
            os._exit(3)
        return call
    if point == "share":  # the others wait in the barrier
        checkpoint._write = then_die(checkpoint._write)
    elif point == "merge":
        checkpoint.tf.raw_ops.MergeV2Checkpoints = then_die(
            checkpoint.tf.raw_ops.MergeV2Checkpoints)
    else:  # "rename": the checkpoint's atomic_path exiting without an error renames it
        checkpoint.atomic_path.__exit__ = then_die(
            checkpoint.atomic_path.__exit__,
            unless=lambda self, error, *_: error or "checkpoints" not in self.final)


def _slow_down(step_lib, rank):
    """STEP_SECONDS=S: every step sleeps S seconds first (time for a test to signal a rank
    mid-run). STALL_RANK=r: rank r sleeps 600 s before its step 3, Horovod's thread running."""
    make = step_lib.make_train_step

    def make_slow(*args, **kwargs):
        step, calls = make(*args, **kwargs), [0]

        def slow(batch):
            calls[0] += 1
            time.sleep(float(os.environ.get("STEP_SECONDS", 0)))
            if os.environ.get("STALL_RANK") == str(rank) and calls[0] == 3:
                time.sleep(600)
            return step(batch)
        return slow
    step_lib.make_train_step = make_slow


def data(out, path):
    from hvd_llama import data as data_lib, distributed as dist, replicas, shards
    from hvd_llama.layout import Layout
    dist.init()
    replicas.setup(None, dist.local_rank(), dist.local_size())
    seqs = shards.Prepared(path).sequences("train", 16)
    batches = data_lib.dataset(seqs, Layout(dist.size(), 1, dist.rank(), 1, 2, 16), seed=5,
                               first_row=0, steps=8)
    np.save(os.path.join(out, f"rank{dist.rank()}.npy"), np.stack([b[0] for b in batches]))


def collectives(out):
    import keras
    import tensorflow as tf
    from hvd_llama import config, distributed as dist, model as model_lib, replicas
    dist.init()
    replicas.setup(None, dist.local_rank(), dist.local_size())
    r = dist.rank()
    cfg = config.load(None, ["model.vocab_size=64", "model.num_layers=1", "model.hidden_dim=16",
                             "model.intermediate_dim=24", "model.num_query_heads=2",
                             "model.num_key_value_heads=1"])
    res = {}
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def batch(seed, n=2):  # rank- and call-specific data, [n, 9]
        return np.random.default_rng(seed).integers(0, 64, (n, 9)).astype("int32")

    def grads_of(model, tokens):
        with tf.GradientTape() as tape:
            x, y = tokens[:, :-1], tokens[:, 1:]
            loss = loss_fn(y, model({"token_ids": x, "padding_mask": np.ones_like(x)}))
        # The embedding's gradient is IndexedSlices: densify it, as Horovod's allreduce does.
        return [tf.convert_to_tensor(g).numpy()
                for g in tape.gradient(loss, model.trainable_variables)]

    # Broadcast: ranks start from different weights (seed = rank) and end with rank 0's.
    model = model_lib.build(cfg.model, seed=r)
    res["init"] = np.concatenate([w.ravel() for w in weights(model)])
    dist.broadcast_variables(model.variables)
    res["after_broadcast"] = np.concatenate([w.ravel() for w in weights(model)])

    # Gradients: SGD(lr=1) moves each weight by exactly minus the reduced gradient.
    for name, kwargs in [("average", {}), ("sum", {"op": "sum"}),
                         ("fp16", {"compression": "fp16"})]:
        opt = dist.DistributedOptimizer(keras.optimizers.SGD(1.0), **kwargs)
        opt.build(model.trainable_variables)
        before = [v.numpy() for v in model.trainable_variables]
        g = grads_of(model, batch(100 * r))
        opt.apply([tf.constant(x) for x in g], model.trainable_variables)
        res[f"{name}_local"] = np.concatenate([x.ravel() for x in g])
        res[f"{name}_delta"] = np.concatenate(
            [(b - v.numpy()).ravel() for v, b in zip(model.trainable_variables, before)])

    # Clipping acts on the average: rank 0 brings (4, 0), rank 1 (0, 0); their mean (2, 0)
    # clips to (1, 0). Clipping each rank's own gradient first would give (0.5, 0).
    def step(opt, grad, var):
        if not opt.built:
            opt.build([var])
        before = var.numpy()
        norm = opt.apply([tf.constant(grad, "float32")], [var])
        return before - var.numpy(), float(norm)

    res["clip_delta"], _ = step(dist.DistributedOptimizer(
        keras.optimizers.SGD(1.0, global_clipnorm=1.0)), [4.0 - 4.0 * r, 0.0],
        keras.Variable([0.0, 0.0]))

    # A NaN on rank 1 alone: every rank skips the step. Then an ordinary step still works.
    opt, var = dist.DistributedOptimizer(keras.optimizers.SGD(1.0)), keras.Variable([0.0, 0.0])
    res["nan_delta"], res["nan_norm"] = step(opt, [1.0, np.nan if r else 1.0], var)
    res["after_nan_delta"], _ = step(opt, [1.0, 2.0], var)

    # float16 loss scaling: rank 1's scaled gradient overflows, so every rank skips the step
    # and halves the scale; the next step's gradients are unscaled by the new scale.
    opt = dist.DistributedOptimizer(keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(1.0), initial_scale=1024.0))
    var = keras.Variable([0.0, 0.0])
    res["overflow_delta"], _ = step(opt, [1024.0, np.inf if r else 1024.0], var)
    res["overflow_scale"] = float(opt.dynamic_scale.numpy())
    res["after_overflow_delta"], _ = step(opt, [512.0, 1024.0], var)

    # model.fit with the DistributedOptimizer, 3 steps on this rank's half of each global batch.
    fit_model = model_lib.build(cfg.model, seed=7)
    opt = dist.DistributedOptimizer(keras.optimizers.AdamW(1e-2))
    fit_model.compile(optimizer=opt, loss=loss_fn)
    opt.build(fit_model.trainable_variables)
    dist.broadcast_variables(fit_model.variables + opt.variables)
    tokens = np.concatenate([batch(1000 + s, n=4) for s in range(3)])  # 3 global batches of 4
    per = 4 // dist.size()
    mine = np.concatenate([tokens[4 * s + r * per: 4 * s + (r + 1) * per] for s in range(3)])
    x = {"token_ids": mine[:, :-1], "padding_mask": np.ones_like(mine[:, :-1])}
    fit_model.fit(x, mine[:, 1:], batch_size=per, epochs=1, shuffle=False, verbose=0)
    res["fit"] = np.concatenate([w.ravel() for w in weights(fit_model)])

    # Our build's HOROVOD_CYCLE_WAKE (the test sets it, with a long cycle): a collective starts
    # a cycle when it is enqueued, so ten in a row take far less than ten cycles.
    x, start = tf.constant([1.0]), time.perf_counter()
    for _ in range(10):
        x = dist.allreduce_sum(x)
    res["ten_allreduces_s"] = time.perf_counter() - start
    np.savez(os.path.join(out, f"rank{r}.npz"), **res)


def zero_overflow(out):
    import tensorflow as tf
    from hvd_llama import (config, distributed as dist, model as model_lib, optim, plan,
                           replicas, step as step_lib, zero)
    from hvd_llama.layout import Layout
    dist.init()
    replicas.setup(None, dist.local_rank(), dist.local_size())
    r, res = dist.rank(), {}
    # An odd vocabulary: the embeddings' 97 rows split 49 + 48 between the ranks.
    cfg = config.load(MICRO, ["train.precision=float16", "model.vocab_size=97"])

    def weights_after(opt, model, steps):
        apply = tf.function(lambda grads: opt.apply(grads, model.trainable_variables))
        before, seen = weights(model), []
        for grads in steps:
            norm = apply([tf.constant(g) for g in grads])
            seen.append({"changed": any(not np.array_equal(a, b)
                                        for a, b in zip(before, weights(model))),
                         "norm": float(norm)})
            before = weights(model)
        return seen

    for stage in (1, 2):
        model = model_lib.build(cfg.model, seed=0, precision="float16")
        variables = model.trainable_variables
        layout = Layout(dist.size(), 1, r, 1, 1, 8, zero=stage)
        opt = zero.ShardedOptimizer(cfg.train, variables, layout, 128 << 20)
        # Stage 1 is handed whole gradients, stage 2 this rank's shares: 1000 (clipped after
        # unscaling by 2 ** 15). An Inf in row 0 of the first tensor of rank 0's gradient
        # lands in rank 0's share in both: rank 1's share is finite.
        rows = [layout.share(v.shape[0]) if stage == 2 else (0, v.shape[0]) for v in variables]
        finite = [np.full([b - a, *v.shape[1:]], 1000.0, np.float32)
                  for v, (a, b) in zip(variables, rows)]
        overflow = [g.copy() for g in finite]
        if r == 0:
            overflow[0][0] = np.inf
        scale = float(opt.dynamic_scale.numpy())
        seen = weights_after(opt, model, [overflow])
        res[f"zero{stage}"] = {"changed": seen[0]["changed"],
                               "scale": [scale, float(opt.dynamic_scale.numpy())],
                               "iterations": int(opt.inner.iterations.numpy())}
        seen = weights_after(opt, model, [finite])
        res[f"zero{stage}"]["then_changed"] = seen[0]["changed"]
        np.savez(os.path.join(out, f"zero{stage}-rank{r}.npz"), *weights(model))
        if stage == 1:  # stage 0 on the same gradients, for the same weights
            model0 = model_lib.build(cfg.model, seed=0, precision="float16")
            opt0 = dist.DistributedOptimizer(optim.build(
                cfg.train, optim.schedule(cfg.train), model0.trainable_variables))
            opt0.build(model0.trainable_variables)
            weights_after(opt0, model0, [overflow, finite])
            np.savez(os.path.join(out, f"zero0-rank{r}.npz"), *weights(model0))

    # The training step in float16 at stages 2 (the backward pass reduce-scatters each layer's
    # gradients as it goes: zero.stream_gradients) and 3 (the weights gathered layer by layer)
    # against stage 0's, 2 micro-batches of this rank's own tokens: a loss scale of 2^40
    # overflows in the backward pass (step skipped, scale halved), then 2 steps from a scale of
    # 1024 apply; each tensor all-gathered on its own after the update (no fusion). Then
    # bfloat16, 2 steps at stages 0 and 3 with remat (and prefetch) on one query head: the
    # attention output kernel's one row leaves rank 1 a share of none.
    tokens = tf.constant(np.random.default_rng(r).integers(0, 97, (2, 2, 33)), tf.int32)
    for precision, stages, more in (
            ("float16", (0, 2, 3), ["dist.fusion_threshold_mb=0"]),
            ("bfloat16", (0, 3), ["train.remat=true", "model.num_query_heads=1",
                                  "model.num_key_value_heads=1"])):
        for stage in stages:
            cfg = config.load(MICRO, [f"train.precision={precision}", "model.vocab_size=97",
                                      "train.grad_accum=2", f"dist.zero={stage}", *more])
            layout = Layout.of(cfg, dist.size(), 1, r)
            model, opt, jit = step_lib.build(cfg, layout)
            assert plan.streams(layout, jit) == (stage >= 2)
            train_step = step_lib.make_train_step(model, opt, layout, jit)
            seen = []
            for scale in (2.0 ** 40, 1024.0, None) if precision == "float16" else (None, None):
                if scale:
                    opt.dynamic_scale.assign(scale)
                loss, norm, _ = train_step(tokens)
                seen.append([float(loss), float(norm)] + (
                    [float(opt.dynamic_scale.numpy())] if precision == "float16" else []))
            name = f"{'stream' if precision == 'float16' else 'bf16-'}{stage}"
            res[name] = seen
            whole = [w.numpy() for w in dist.allgather_shares(opt.shares)] if stage == 3 \
                else weights(model)
            np.savez(os.path.join(out, f"{name}-rank{r}.npz"), *whole)

    # float32: a NaN in rank 0's share alone; both ranks skip the step, both see a NaN norm.
    cfg = config.load(MICRO, ["model.vocab_size=97"])
    model = model_lib.build(cfg.model, seed=0)
    layout = Layout(dist.size(), 1, r, 1, 1, 8, zero=1)
    opt = zero.ShardedOptimizer(cfg.train, model.trainable_variables, layout, 128 << 20)
    grads = [np.ones(v.shape, np.float32) for v in model.trainable_variables]
    if r == 0:
        grads[0][0] = np.nan
    res["nan"] = weights_after(opt, model, [grads])[0]
    res["nan"]["norm"] = str(res["nan"]["norm"])  # JSON has no NaN
    with open(os.path.join(out, f"rank{r}.json"), "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    what, out, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    os.makedirs(out, exist_ok=True)
    {"train": lambda: train(out, rest), "data": lambda: data(out, rest[0]),
     "collectives": lambda: collectives(out), "zero_overflow": lambda: zero_overflow(out)}[what]()
