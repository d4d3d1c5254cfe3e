"""Generation in the graph (cached and not, against keras-hub's own generate), the versioned
SavedModel export and its signatures in a process without hvd_llama, and the generate CLI."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ENV, MICRO, run, train_cli
from hvd_llama import config, generate

PROMPTS = np.array([[1, 45, 30, 22, 9], [1, 77, 5, 0, 0]], np.int32)
LENGTHS = np.array([5, 3], np.int32)
NEW = 9


@pytest.fixture(scope="module")
def small_model():
    """A random-init model: its greedy continuations are varied, unlike a barely trained one."""
    from hvd_llama import model as model_lib
    c = config.load(None, ["model.vocab_size=97", "model.num_layers=2", "model.hidden_dim=48",
                           "model.intermediate_dim=77", "model.num_query_heads=6",
                           "model.num_key_value_heads=2", "model.max_position_embeddings=32",
                           "data.seq_len=32"])
    return c, model_lib.build(c.model, seed=3)


def generated(model, context, use_cache=True, temperature=0.0, top_p=1.0, seed=0, new=NEW):
    import tensorflow as tf
    out = generate.make_generate(model, context, use_cache)(
        tf.constant(PROMPTS), tf.constant(LENGTHS), tf.constant(new), tf.constant(temperature),
        tf.constant(top_p), tf.constant(seed, tf.int64))
    return out["token_ids"].numpy(), out["lengths"].numpy()


def test_greedy_with_cache_equals_without_and_keras_hub(small_model):
    c, model = small_model
    cached, _ = generated(model, 32)
    assert np.array_equal(cached, generated(model, 32, use_cache=False)[0])
    assert np.array_equal(cached[:, :5] * (np.arange(5) < LENGTHS[:, None]), PROMPTS)
    assert len(set(cached[0, 5:].tolist())) > 1  # a real continuation, not one token repeated
    total = PROMPTS.shape[1] + NEW
    model.compile(sampler="greedy")
    mask = np.arange(total)[None] < LENGTHS[:, None]
    ref = model.generate({"token_ids": np.pad(PROMPTS, [[0, 0], [0, NEW]]) * mask,
                          "padding_mask": mask}, stop_token_ids=None)
    assert np.array_equal(cached, ref["token_ids"])


def test_sampling_is_seeded_and_top_p_narrows_to_greedy(small_model):
    _, model = small_model
    a, _ = generated(model, 32, temperature=1.0, seed=5)
    assert np.array_equal(a, generated(model, 32, temperature=1.0, seed=5)[0])
    assert not np.array_equal(a, generated(model, 32, temperature=1.0, seed=6)[0])
    # top_p this small keeps only the most likely token: sampling becomes greedy.
    assert np.array_equal(generated(model, 32, temperature=1.0, top_p=1e-6)[0],
                          generated(model, 32)[0])


def test_generation_past_the_context_is_refused(small_model):
    import tensorflow as tf
    _, model = small_model
    with pytest.raises(tf.errors.InvalidArgumentError, match="exceed the model context of 32"):
        generated(model, 32, new=28)  # 5 + 28 > 32


@pytest.fixture(scope="module")
def exported(tmp_path_factory, short):
    """A micro run (built-in corpus and tokenizer), exported by the trainer as version 1."""
    run_dir = str(tmp_path_factory.mktemp("gen") / "run")
    train_cli(f"run.dir={run_dir}", *short, "train.steps=2", config=MICRO)
    return run_dir


SERVE = """
import sys, numpy as np, tensorflow as tf, tensorflow_text
m = tf.saved_model.load(sys.argv[1])
ids = tf.constant(np.load(sys.argv[2]))
logits = m.signatures["serving_default"](token_ids=ids, padding_mask=tf.ones_like(ids))["logits"]
args = dict(max_new_tokens=tf.constant(6), temperature=tf.constant(0.0), top_p=tf.constant(1.0),
            seed=tf.constant(0, tf.int64))
gen = m.signatures["generate"](token_ids=ids, lengths=tf.constant([ids.shape[1]] * 2), **args)
text = m.signatures["generate_text"](prompts=tf.constant(["def f(x):", "The"]), **args)["text"]
assert text.dtype == tf.string and text.shape == (2,)
assert not [k for k in sys.modules if k.startswith("hvd_llama")]
np.save(sys.argv[3], logits.numpy())
np.save(sys.argv[4], gen["token_ids"].numpy())
"""


def test_saved_model_serves_logits_and_generation_without_hvd_llama(exported, tmp_path):
    import tensorflow as tf
    from hvd_llama import checkpoint
    version = os.path.join(exported, "saved_model_text", "1")
    assert os.path.isfile(os.path.join(exported, "saved_model", "1", "saved_model.pb"))
    tokens = np.random.default_rng(0).integers(3, 8000, (2, 7)).astype(np.int32)
    tokens[:, 0] = 1
    np.save(tmp_path / "ids.npy", tokens)
    subprocess.run([sys.executable, "-c", SERVE, version, str(tmp_path / "ids.npy"),
                    str(tmp_path / "logits.npy"), str(tmp_path / "gen.npy")], check=True,
                   cwd=str(tmp_path), env={**ENV, "PYTHONPATH": ""})  # hvd_llama not importable
    cfg, model, _ = checkpoint.load_latest(exported)
    ours = model({"token_ids": tokens, "padding_mask": np.ones_like(tokens)}).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), ours, atol=1e-4)
    mine = generate.make_generate(model, cfg.model.max_position_embeddings)(
        tf.constant(tokens), tf.constant([7, 7]), tf.constant(6), tf.constant(0.0),
        tf.constant(1.0), tf.constant(0, tf.int64))["token_ids"].numpy()
    assert np.array_equal(np.load(tmp_path / "gen.npy"), mine)


def test_saved_model_cli_shows_and_runs_it(exported):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    version = os.path.join(exported, "saved_model", "1")
    shown = run([cli, "show", "--all", "--dir", version]).stdout
    for name in ("serving_default", "generate"):
        assert f"signature_def['{name}']" in shown, name
    ran = run([cli, "run", "--dir", version, "--tag_set", "serve", "--signature_def",
               "generate", "--input_exprs", "token_ids=[[1,45,30]];lengths=[3];"
               "max_new_tokens=4;temperature=0.0;top_p=1.0;seed=0"])
    assert "token_ids" in ran.stdout and "lengths" in ran.stdout


def test_export_versions_and_refuses_an_existing_one(exported):
    export = [sys.executable, "-m", "hvd_llama.export", exported]
    out = run(export).stdout  # one past the trainer's version 1
    assert "saved_model/2" in out and "saved_model_text/2" in out
    proc = run(export + ["--version", "1"], check=False)
    assert proc.returncode == 2 and "already exists (pass --overwrite" in proc.stderr
    run(export + ["--version", "1", "--overwrite"])
    for name in ("saved_model", "saved_model_text"):
        assert sorted(os.listdir(os.path.join(exported, name))) == ["1", "2"]


@pytest.mark.parametrize("where", ["run", "saved_model_text"])
def test_generate_cli_writes_text_and_refuses_an_overlong_prompt(exported, where):
    source = exported if where == "run" else os.path.join(exported, "saved_model_text", "1")
    cli = [sys.executable, "-m", "hvd_llama.generate", source]
    out = run(cli + ["--prompt", "def main():", "--max-new-tokens", "8"]).stdout
    assert out.strip()
    proc = run(cli + ["--prompt", "x " * 300, "--max-new-tokens", "1900"], check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "context" in last
