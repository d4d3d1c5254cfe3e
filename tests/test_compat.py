"""The upstream behaviour behind each hook in hvd_llama/compat.py: every test here fails when
TensorFlow, Keras or keras-hub changes what its hook relies on (or fixes what it works around).
Tiny models, one process; the 2-replica checks share one subprocess (logical CPUs must be
configured before TensorFlow starts its runtime)."""

import inspect
import json
import os
import sys

import numpy as np
import pytest

from conftest import run
from hvd_llama import compat

# The smallest Llama: vocab 64, 1 layer, hidden 16, 2 query heads of 8, 1 key/value head.
TINY = {"vocabulary_size": 64, "num_layers": 1, "num_query_heads": 2,
        "num_key_value_heads": 1, "hidden_dim": 16, "intermediate_dim": 24}
TOKENS = np.array([[1, 5, 9, 2, 7], [1, 3, 3, 8, 0]], np.int32)


def tiny_lm(**kwargs):
    import keras_hub
    backbone = keras_hub.models.LlamaBackbone(**TINY, **kwargs)
    return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)


@pytest.fixture(scope="module")
def lm():
    """A tiny LlamaCausalLM for the tests that leave it as it is."""
    return tiny_lm()


def test_adam_moments_are_per_variable_in_build_order():
    """adam_moments: AdamW's first and second moments, one pair per variable it was built
    with, in that order (the checkpoint names them after the variables)."""
    import keras
    a, b = keras.Variable([1.0, 1.0, 1.0]), keras.Variable([[1.0], [1.0]])
    opt = keras.optimizers.AdamW(0.1, beta_1=0.5, beta_2=0.5)
    opt.build([a, b])
    opt.apply([keras.ops.convert_to_tensor([2.0, 2.0, 2.0]), keras.ops.zeros([2, 1])], [a, b])
    moments = compat.adam_moments(opt)
    assert [(m.shape, v.shape) for m, v in moments] == [((3,), (3,)), ((2, 1), (2, 1))]
    np.testing.assert_allclose(moments[0][0].numpy(), 1.0)  # (1 - beta_1) x 2
    np.testing.assert_allclose(moments[0][1].numpy(), 2.0)  # (1 - beta_2) x 2 ** 2
    assert not moments[1][0].numpy().any()


@pytest.mark.parametrize("scaled", [False, True])
def test_global_norm_clipping_can_be_given_its_norm(scaled):
    """update_in_turn: Keras clips (after unscaling, under a loss scale) in
    _clip_gradients, and with the norm given it clips as Keras would with that norm: a gradient
    of norm 1 clipped at 0.5 as if its norm were 4, so SGD(1) moves it by 1/8 of itself."""
    import keras
    var = keras.Variable([0.0, 0.0])
    sgd = keras.optimizers.SGD(1.0, global_clipnorm=0.5)
    opt = keras.optimizers.LossScaleOptimizer(sgd, initial_scale=8.0) if scaled else sgd
    compat.update_in_turn(sgd, lambda: keras.ops.convert_to_tensor(4.0))
    grad = keras.ops.convert_to_tensor([0.6, 0.8]) * (8.0 if scaled else 1.0)
    opt.apply([grad], [var])
    np.testing.assert_allclose(var.numpy(), [-0.075, -0.1], rtol=1e-6)


def _adamw_and_weights():
    import keras
    weights = [keras.Variable(np.full((64, 32), 0.5, np.float32) + i) for i in range(3)]
    opt = keras.optimizers.AdamW(0.1, weight_decay=0.3, global_clipnorm=1.0)
    opt.exclude_from_weight_decay(var_list=[weights[1]])
    return opt, weights


def test_updating_in_turn_is_keras_adamw_with_its_decay_and_clipping():
    """update_in_turn moves AdamW's weight decay and clipping into each variable's update:
    in a traced step, given the gradients' own global norm, the weights come out as Keras's
    AdamW leaves them (a decayed, an undecayed and a clipped variable)."""
    import tensorflow as tf
    grads = [tf.constant(np.linspace(-2, 3, 64 * 32, dtype=np.float32).reshape(64, 32) * (i + 1))
             for i in range(3)]
    results = []
    for in_turn in (False, True):
        opt, weights = _adamw_and_weights()
        if in_turn:
            compat.update_in_turn(opt, lambda: tf.linalg.global_norm(grads))
        opt.build(weights)
        step = tf.function(lambda: opt.apply(grads, weights))
        step()
        step()
        results.append([w.numpy() for w in weights])
    for keras_own, in_turn in zip(*results):
        np.testing.assert_allclose(in_turn, keras_own, rtol=1e-6)
    assert not np.allclose(results[0][0], results[0][1] - 1.0)  # the decay made a difference


def update_peaks_mib():
    """MiB over its inputs at the peak of each of 5 in-turn AdamW updates of 40 variables of
    1 MiB, whose gradients are reads of variables (as ZeRO's accumulators are)."""
    import keras
    import tensorflow as tf
    shape, count = (256, 1024), 40
    weights = [keras.Variable(np.zeros(shape, np.float32)) for _ in range(count)]
    grads = [tf.Variable(np.ones(shape, np.float32)) for _ in range(count)]
    opt = keras.optimizers.AdamW(0.1, weight_decay=0.1, global_clipnorm=1.0)
    compat.update_in_turn(opt, lambda: tf.constant(2.0))
    opt.build(weights)
    step = tf.function(lambda: opt.apply([g.read_value() for g in grads], weights))
    step()
    peaks = []
    for _ in range(5):
        base = tf.config.experimental.get_memory_info("CPU:0")["current"]
        tf.config.experimental.reset_memory_stats("CPU:0")
        step()
        peaks.append(tf.config.experimental.get_memory_info("CPU:0")["peak"] - base)
    return [p / 2 ** 20 for p in peaks]


def test_updating_in_turn_holds_one_variables_temporaries():
    """update_in_turn: with gradients read from variables (ZeRO's accumulators), clipping all
    of them before the updates would make a second copy of them all, as TensorFlow sometimes
    scheduled it; in turn, the update's temporaries are a few of one variable's. Measured in a
    child with oneDNN on, under which alone TensorFlow's CPU allocator keeps its count."""
    proc = run([sys.executable, "-c", "import test_compat; print(*test_compat.update_peaks_mib())"],
               env={"TF_ENABLE_ONEDNN_OPTS": "1", "PYTHONPATH": os.path.dirname(__file__)})
    peaks = [float(p) for p in proc.stdout.split()]
    assert len(peaks) == 5 and max(peaks) <= 6, peaks


def test_optimizer_class_swap_keeps_settings_and_every_gradient_enters_apply():
    """subclass_in_place: assigning __class__ works on Keras optimizers, keeps their settings,
    and apply_gradients (so model.fit) hands every gradient over through `apply`."""
    import keras
    calls = []

    class Spy:
        def apply(self, grads, trainable_variables=None):
            calls.append(len(grads))
            return super(Spy, self).apply(grads, trainable_variables)

    decayed, kept = keras.Variable([1.0]), keras.Variable([1.0])
    opt = keras.optimizers.AdamW(0.1, weight_decay=0.5)
    opt.exclude_from_weight_decay(var_list=[kept])
    config = opt.get_config()
    assert compat.subclass_in_place(opt, Spy, "Spy") is opt
    assert type(opt).__name__ == "SpyAdamW" and isinstance(opt, keras.optimizers.AdamW)
    assert opt.get_config() == config
    zero = keras.ops.zeros([1])
    opt.apply_gradients([(zero, decayed), (zero, kept)])  # a zero gradient: decay alone moves
    assert float(decayed.numpy()[0]) < 1.0 and float(kept.numpy()[0]) == 1.0

    scaled = compat.subclass_in_place(
        keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)), Spy, "Spy")
    scaled.apply_gradients([(keras.ops.ones([1]), keras.Variable([1.0]))])

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=compat.subclass_in_place(keras.optimizers.SGD(0.1), Spy, "Spy"),
                  loss="mse", run_eagerly=True)
    model.fit(np.ones((2, 2)), np.ones((2, 1)), batch_size=2, epochs=1, verbose=0)
    assert calls == [2, 1, 2]  # AdamW, the loss-scaled SGD, model.fit's step (kernel, bias)


def test_a_keras_variable_is_backed_by_a_tf_variable():
    """tf_variables: keras.Variable.value is a tf.Variable sharing its storage."""
    import keras
    import tensorflow as tf
    v = keras.Variable([1.0, 2.0])
    (backing,) = compat.tf_variables([v])
    assert isinstance(backing, tf.Variable) and backing is v.value
    backing.assign([3.0, 4.0])
    np.testing.assert_array_equal(v.numpy(), [3.0, 4.0])
    plain = tf.Variable([0.0])
    assert compat.tf_variables([plain])[0] is plain


def held_by_a_variable_of_rows():
    """Bytes TensorFlow's CPU allocator still holds once only a variable of 256 rows of a
    [1024, 1024] float32 tensor remains: (made, assigned) x (a TensorFlow slice, compat.rows)."""
    import gc
    import keras
    import tensorflow as tf

    def held(make, assign):
        gc.collect()
        before = tf.config.experimental.get_memory_info("CPU:0")["current"]
        whole = tf.random.normal([1024, 1024])  # 4 MiB
        if assign:
            variable = keras.Variable(tf.zeros([256, 1024]))  # 1 MiB
            variable.assign(make(whole))
        else:
            variable = keras.Variable(make(whole))
        del whole
        gc.collect()
        return tf.config.experimental.get_memory_info("CPU:0")["current"] - before, variable

    return [held(make, assign)[0] for assign in (False, True)
            for make in (lambda t: t[256:512], lambda t: compat.rows(t, 256, 512))]


def test_a_variable_made_from_a_slice_keeps_the_whole_tensor_and_rows_does_not():
    """rows: a variable made or assigned from rows of a tensor, as TensorFlow slices them,
    holds the tensor's whole buffer (TensorFlow's allocator counts it); from compat.rows, only
    the rows'. Measured in a child with oneDNN on, under which alone the allocator counts
    (TensorFlow turns it on by default only on some CPUs)."""
    import tensorflow as tf
    proc = run([sys.executable, "-c",
                "import test_compat; print(*test_compat.held_by_a_variable_of_rows())"],
               env={"TF_ENABLE_ONEDNN_OPTS": "1", "PYTHONPATH": os.path.dirname(__file__)})
    made_sliced, made_rows, assigned_sliced, assigned_rows = map(int, proc.stdout.split())
    for sliced, copied in ((made_sliced, made_rows), (assigned_sliced, assigned_rows)):
        assert sliced >= 4 << 20 and copied == 1 << 20, (sliced, copied)
    for start, stop in ((0, 1), (3, 3)):
        part = compat.rows(tf.reshape(tf.range(6.0), [3, 2]), start, stop).numpy()
        np.testing.assert_array_equal(part, np.arange(6.0).reshape(3, 2)[start:stop])


def test_decoder_blocks_take_the_arguments_the_remat_wrapper_names(lm):
    """recompute_in_backward: its wrapper names the sequence, decoder_padding_mask and
    training, and forwards the rest (the cache arguments) as they come."""
    block = lm.backbone.transformer_layers[0]
    params = list(inspect.signature(type(block).call).parameters)
    assert params[:3] == ["self", "decoder_sequence", "decoder_padding_mask"]
    assert "training" in params
    assert set(params) - {"self", "decoder_sequence", "decoder_padding_mask", "training"} == \
        {"decoder_attention_mask", "self_attention_cache", "self_attention_cache_update_index"}


def test_keras_calls_a_blocks_instance_call_with_the_mask_by_keyword():
    """recompute_in_backward: Keras runs a `call` set on the layer instance; training passes
    the sequence alone by position and only decoder_padding_mask and training by keyword
    (another one would turn recomputation off), the cached step self_attention_cache*."""
    model = tiny_lm()
    block = model.backbone.transformer_layers[0]
    call, seen = block.call, []

    def spy(*args, **kwargs):
        seen.append((len(args), sorted(k for k, v in kwargs.items() if v is not None)))
        return call(*args, **kwargs)

    block.call = spy
    model({"token_ids": TOKENS, "padding_mask": np.ones_like(TOKENS)}, training=True)
    compat.build_cache(model, TOKENS)
    assert seen == [(1, ["decoder_padding_mask", "training"]),
                    (1, ["self_attention_cache", "self_attention_cache_update_index"])]


def test_recompute_grad_takes_no_keyword_arguments_in_graph_mode():
    """recompute_in_backward binds the mask by position, and keras.RematScope (which passes
    keywords through tf.recompute_grad) fails in graph mode: custom_gradient's graph mode
    refuses keyword arguments."""
    import tensorflow as tf
    double = tf.recompute_grad(lambda x, mask=None: x * 2.0)

    @tf.function
    def positional(x):
        return double(x, x)

    @tf.function
    def keyword(x):
        return double(x, mask=x)

    np.testing.assert_array_equal(positional(tf.ones([2])), [2.0, 2.0])
    with pytest.raises(ValueError, match="eager execution"):
        keyword(tf.ones([2]))


def test_keras_hub_prefill_returns_hidden_states_and_a_cache_to_continue_from(lm):
    """build_cache: LlamaCausalLM._build_cache(tokens) -> (hidden [b, len, hidden],
    cache [b, layers, 2, len, kv heads, head dim]), from which call_with_cache at the last
    position gives the full model's logits there."""
    hidden, cache = compat.build_cache(lm, TOKENS)
    assert tuple(hidden.shape) == (2, 5, 16)
    assert tuple(cache.shape) == (2, 1, 2, 5, 1, 8)
    full = lm({"token_ids": TOKENS, "padding_mask": np.ones_like(TOKENS)})  # [2, 5, 64]
    logits, _, _ = lm.call_with_cache(TOKENS[:, 4:5], cache, 4)
    np.testing.assert_allclose(np.asarray(logits)[:, 0], np.asarray(full)[:, 4],
                               rtol=1e-5, atol=1e-6)


def test_the_raw_index_shuffle_permutes_with_a_seed_per_index():
    """index_shuffle: with one [3] seed per index, the indices under one seed map to a
    permutation of [0, max_index], element by element as with that seed alone."""
    import tensorflow as tf
    n = 16
    index = tf.tile(tf.range(n, dtype=tf.int64), [2])
    epoch = tf.repeat(tf.constant([0, 1], tf.int64), n)
    seeds = tf.stack([tf.fill([2 * n], tf.constant(7, tf.int64)), epoch,
                      tf.zeros_like(epoch)], axis=-1)  # [2n, 3]: (seed, epoch, 0)
    out = compat.index_shuffle(index, seeds, tf.constant(n - 1, tf.int64)).numpy()
    assert sorted(out[:n]) == list(range(n)) and sorted(out[n:]) == list(range(n))
    assert not np.array_equal(out[:n], out[n:])  # each row's seed counts
    alone = [int(compat.index_shuffle(tf.constant(i, tf.int64), tf.constant([7, 1, 0], tf.int64),
                                      tf.constant(n - 1, tf.int64))) for i in range(n)]
    assert alone == out[n:].tolist()


def test_the_public_index_shuffle_still_mangles_a_batch_of_seeds():
    """index_shuffle: tf.random.experimental.index_shuffle pads one [2] seed to the raw op's
    (498247692, seed) but a batch of seeds along the batch axis. When this fails, the public
    function takes a batch of seeds; its seeds still differ from data.sequence_ids' (so would
    its permutations, and with them the data order)."""
    import tensorflow as tf
    pad, top = 498247692, tf.constant(15, tf.int64)
    one = tf.random.experimental.index_shuffle(tf.constant(3, tf.int64),
                                               tf.constant([7, 1], tf.int64), top)
    assert int(one) == int(compat.index_shuffle(tf.constant(3, tf.int64),
                                                tf.constant([pad, 7, 1], tf.int64), top))
    index = tf.constant([3, 3, 5, 5], tf.int64)
    seeds = tf.constant([[7, 0], [7, 1], [7, 2], [7, 3]], tf.int64)
    padded = tf.concat([tf.fill([4, 1], tf.constant(pad, tf.int64)), seeds], axis=1)
    wanted = compat.index_shuffle(index, padded, tf.fill([4], top)).numpy()
    try:
        got = tf.random.experimental.index_shuffle(index, seeds, tf.fill([4], top)).numpy()
    except (tf.errors.OpError, ValueError):  # today: the seed shape is refused
        got = None
    assert got is None or not np.array_equal(got, wanted), \
        "index_shuffle now takes a batch of seeds (compat.index_shuffle's comment is stale)"


def test_keras_hub_still_leaves_tie_word_embeddings_out_of_a_preset(tmp_path):
    """tie_embeddings_in_preset: a tied backbone's preset config.json keeps the backbone's
    arguments under "config" without tie_word_embeddings; with it added, from_preset gives the
    tied model back. When this fails, keras-hub writes it and the patch can go."""
    import keras_hub
    backbone = keras_hub.models.LlamaBackbone(**TINY, tie_word_embeddings=True)
    backbone.save_to_preset(str(tmp_path))
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)
    assert saved["config"]["vocabulary_size"] == 64
    assert "tie_word_embeddings" not in saved["config"]
    assert "tie_word_embeddings" not in backbone.get_config()  # hence compat.tied_embeddings
    assert compat.tied_embeddings(backbone)
    compat.tie_embeddings_in_preset(str(tmp_path))
    loaded = keras_hub.models.LlamaBackbone.from_preset(str(tmp_path))
    assert loaded.tie_word_embeddings
    np.testing.assert_array_equal(loaded.token_embedding.embeddings.numpy(),
                                  backbone.token_embedding.embeddings.numpy())


def test_keras_hubs_llama_declares_an_int32_padding_mask(lm):
    """step.token_loss's int32 mask is the dtype keras-hub's Llama declares for its input (a
    bool mask breaks under MirroredStrategy: AddN on bool; not reproduced here)."""
    assert lm.backbone.input["padding_mask"].dtype == "int32"


# Two logical CPUs, a MirroredStrategy over them, and what the hooks see there, as JSON.
MIRRORED = r"""
import json
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from hvd_llama import compat
strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
res = {"replicas": strategy.num_replicas_in_sync}

def replica_values():  # replica r holds [r + 1] * 3 and 10 r
    r = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.float32)
    return [tf.fill([3], r + 1.0), r * 10.0]

@tf.function
def mean():
    reduced = compat.batch_mean(strategy, strategy.run(replica_values))
    return [strategy.experimental_local_results(r) for r in reduced]

res["mean"] = [[t.numpy().tolist() for t in local] for local in mean()]

y, logits = tf.constant([1, 2]), tf.constant([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])

@tf.function
def class_loss():
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return strategy.experimental_local_results(strategy.run(lambda: loss(y, logits)))

res["class_loss"] = [float(x) for x in class_loss()]
res["plain_loss"] = float(tf.reduce_mean(
    keras.ops.sparse_categorical_crossentropy(y, logits, from_logits=True)))

with strategy.scope():
    v = keras.Variable([1.0, 2.0])
(backing,) = compat.tf_variables([v])
res["backing_is_tf_variable"] = isinstance(backing, tf.Variable)
backing.assign([3.0, 4.0])
res["copies"] = [t.numpy().tolist() for t in strategy.experimental_local_results(backing)]
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def mirrored():
    """What MIRRORED saw, from its one subprocess."""
    return json.loads(run([sys.executable, "-c", MIRRORED]).stdout.strip().splitlines()[-1])


def test_batch_reduce_to_mean_averages_the_replicas_onto_every_device(mirrored):
    """batch_mean: strategy.extended.batch_reduce_to(MEAN, ...) gives every device the mean."""
    assert mirrored["replicas"] == 2
    assert mirrored["mean"] == [[[1.5] * 3, [1.5] * 3], [5.0, 5.0]]


def test_keras_loss_classes_divide_by_the_replica_count_under_a_strategy(mirrored):
    """step.token_loss is a plain mean: under 2 replicas a Keras loss class returns half of
    it (Keras expects the replicas' losses summed). When this fails, Keras stopped scaling."""
    assert mirrored["class_loss"] == pytest.approx([mirrored["plain_loss"] / 2] * 2, rel=1e-6)


def test_a_mirrored_keras_variable_is_backed_by_one_tf_variable_over_its_copies(mirrored):
    """tf_variables under dist.strategy mirrored/hybrid: the backing variable is a tf.Variable
    and assigning it (as Horovod's broadcast does) writes every device's copy."""
    assert mirrored["backing_is_tf_variable"]
    assert mirrored["copies"] == [[3.0, 4.0], [3.0, 4.0]]


def test_a_layer_hands_its_weight_gradients_to_the_sink_in_its_backward_pass():
    """reduce_in_backward: in a tf.function, a Keras layer's backward pass gives the sink each
    weight's gradient (equal to the plain one) and the tape None, and passes on the input
    gradient the sink returns; inactive, the layer runs as written and the tape gets the
    gradients."""
    import keras
    import tensorflow as tf
    layer = keras.layers.Dense(3)
    layer.build((None, 4))
    x = tf.random.stateless_normal([2, 4], seed=[1, 2])

    def gradients(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(layer(x) ** 2)
        return tape.gradient(y, [x, *layer.trainable_variables])

    plain = gradients(x)
    sunk = {id(w): tf.Variable(tf.zeros_like(w)) for w in layer.trainable_variables}

    def sink(weights, grads, dx):
        for w, g in zip(weights, grads):
            sunk[id(w)].assign_add(g)
        return 2 * dx

    active = [True]
    compat.reduce_in_backward(layer, sink, lambda: active[0])
    dx, *rest = tf.function(gradients)(x)
    assert rest == [None, None]
    np.testing.assert_allclose(dx.numpy(), 2 * plain[0].numpy(), rtol=1e-6)
    for w, g in zip(layer.trainable_variables, plain[1:]):
        np.testing.assert_allclose(sunk[id(w)].numpy(), g.numpy(), rtol=1e-6)
    active[0] = False
    for a, b in zip(tf.function(gradients)(x), plain):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_call_with_weights_maps_only_the_embedding_matrix_a_call_reads(tied):
    """An untied ReversibleEmbedding's lookup reads only `embeddings` and its output projection
    only `reverse_embeddings` (tied: `embeddings` both): call_with_weights asks for that one.
    The layer's own variables are NaN, so a read of one left unmapped would show."""
    import keras
    import tensorflow as tf
    layer = keras.layers.ReversibleEmbedding(5, 3, tie_weights=tied)
    layer.build()
    for v in layer.trainable_variables:
        v.assign(np.full(v.shape, np.nan, np.float32))
    asked = []

    def weights(x, variables):
        asked.append([v.name for v in variables])
        return x, [tf.ones(v.shape) for v in variables]

    compat.call_with_weights(layer, weights)
    np.testing.assert_array_equal(layer(tf.constant([[1, 2]])).numpy(), np.ones((1, 2, 3)))
    np.testing.assert_array_equal(layer(tf.ones([1, 3]), reverse=True).numpy(),
                                  np.full((1, 5), 3.0))
    assert asked == [["embeddings"], ["embeddings" if tied else "reverse_embeddings"]]
