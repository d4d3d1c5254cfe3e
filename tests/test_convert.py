"""Weights in and out: random-init transformers LLaMA checkpoints -> hvd_llama and back, keras-hub
presets both ways, and bad input. transformers runs in its own processes (tests/hf_side.py)."""

import json
import os
import shutil
import sys

import numpy as np
import pytest

from conftest import REPO, horovodrun, run

HF_SIDE = os.path.join(REPO, "tests", "hf_side.py")
SHAPES = {
    # grouped-query attention, a non-default RoPE theta, an odd intermediate size
    "gqa": {"vocab_size": 97, "hidden_size": 48, "intermediate_size": 77,
            "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
            "rope_theta": 50000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 128},
    # plain multi-head attention with the output layer tied to the input embedding
    "tied": {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 40,
             "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
             "tie_word_embeddings": True, "max_position_embeddings": 64},
}


def convert(*args, check=True):
    return run([sys.executable, "-m", "hvd_llama.convert", *map(str, args)], check=check)


def make_hf(hf_dir, spec):
    run([sys.executable, HF_SIDE, "make", str(hf_dir), json.dumps(spec)])
    return str(hf_dir)


def hf_logits(hf_dir, tokens, tmp_path):
    np.save(tmp_path / "tokens.npy", tokens)
    run([sys.executable, HF_SIDE, "logits", str(hf_dir), str(tmp_path / "tokens.npy"),
         str(tmp_path / "hf_logits.npy")])
    return np.load(tmp_path / "hf_logits.npy")


def our_logits(run_dir, tokens):
    from hvd_llama import checkpoint
    _, model, _ = checkpoint.load_latest(str(run_dir))
    return model({"token_ids": tokens, "padding_mask": np.ones_like(tokens)}).numpy()


def weights(run_dir):
    from hvd_llama import checkpoint
    _, model, _ = checkpoint.load_latest(str(run_dir))
    return {v.path: v.numpy() for v in model.weights}


def tokens_for(vocab):
    return np.random.default_rng(1).integers(0, vocab, (2, 13)).astype("int32")


@pytest.fixture(scope="module", params=sorted(SHAPES))
def imported(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"hf-{request.param}")
    hf_dir = make_hf(tmp / "hf", SHAPES[request.param])
    convert("import-hf", hf_dir, tmp / "run")
    return request.param, hf_dir, tmp / "run"


def test_imported_logits_equal_transformers(imported, tmp_path):
    name, hf_dir, run_dir = imported
    tokens = tokens_for(SHAPES[name]["vocab_size"])
    diff = np.abs(our_logits(run_dir, tokens) - hf_logits(hf_dir, tokens, tmp_path)).max()
    assert diff <= 1e-4, diff


def test_export_hf_then_import_is_exact(imported, tmp_path):
    _, _, run_dir = imported
    convert("export-hf", run_dir, tmp_path / "hf")
    convert("import-hf", tmp_path / "hf", tmp_path / "again")
    a, b = weights(run_dir), weights(tmp_path / "again")
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def test_keras_hub_preset_round_trip(imported, tmp_path, cache_dir):
    """Weights and the tokenizer go out to a preset that keras-hub loads, and come back."""
    import keras_hub
    import sentencepiece
    from hvd_llama import data
    name, _, imported_dir = imported
    run_dir = tmp_path / "run"
    shutil.copytree(imported_dir, run_dir)
    tokenizer = os.path.join(data.builtin_dir(cache_dir, 8000), "tokenizer.model")
    shutil.copyfile(tokenizer, run_dir / "tokenizer.model")
    convert("export-keras-hub", run_dir, tmp_path / "preset")
    text = "The quick brown fox jumps over the lazy dog."
    theirs = keras_hub.models.LlamaTokenizer.from_preset(str(tmp_path / "preset"))
    ours = sentencepiece.SentencePieceProcessor(model_file=tokenizer)
    assert np.asarray(theirs(text)).tolist() == ours.encode(text)
    backbone = keras_hub.models.LlamaBackbone.from_preset(str(tmp_path / "preset"))
    tokens = tokens_for(SHAPES[name]["vocab_size"])
    from hvd_llama import checkpoint
    _, model, _ = checkpoint.load_latest(str(run_dir))
    x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}
    assert np.array_equal(backbone(x).numpy(), model.backbone(x).numpy())
    convert("import-keras-hub", tmp_path / "preset", tmp_path / "again")
    a, b = weights(run_dir), weights(tmp_path / "again")
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    with open(tokenizer, "rb") as f, open(tmp_path / "again" / "tokenizer.model", "rb") as g:
        assert f.read() == g.read()


def test_fine_tune_an_import_under_horovodrun_and_give_it_back(tmp_path, cache_dir):
    """HF -> import -> 2 steps on 2 processes -> export-hf -> transformers gives our logits.
    The HF directory carries the built-in corpus's tokenizer, which travels along."""
    from hvd_llama import data
    tokenizer = os.path.join(data.builtin_dir(cache_dir, 8000), "tokenizer.model")
    hf_dir = make_hf(tmp_path / "hf", {
        "vocab_size": 8000, "hidden_size": 64, "intermediate_size": 100,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256})
    shutil.copyfile(tokenizer, os.path.join(hf_dir, "tokenizer.model"))
    run_dir = tmp_path / "run"
    convert("import-hf", hf_dir, run_dir)
    before = weights(run_dir)
    horovodrun("gloo", ["-m", "hvd_llama.train", "--config", str(run_dir / "config.yaml"),
                        "train.resume=true", "train.steps=2", "train.global_batch=4",
                        f"data.cache_dir={cache_dir}", "train.eval_every=0",
                        "train.export=false"])
    with open(run_dir / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
    after = weights(run_dir)
    assert any(not np.array_equal(before[k], after[k]) for k in before)  # it trained
    convert("export-hf", run_dir, tmp_path / "out")
    for name in ("config.json", "tokenizer.model"):
        assert os.path.isfile(tmp_path / "out" / name), name
    tokens = tokens_for(8000)
    diff = np.abs(our_logits(run_dir, tokens) - hf_logits(tmp_path / "out", tokens, tmp_path))
    assert diff.max() <= 1e-4, diff.max()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf(tmp_path_factory.mktemp("hf-bad") / "hf", SHAPES["gqa"])


def broken_copy(hf_dir, tmp_path):
    dest = tmp_path / "broken"
    shutil.copytree(hf_dir, dest)
    return dest


def edit_config(path, **changes):
    with open(path / "config.json") as f:
        c = json.load(f)
    c.update(changes)
    with open(path / "config.json", "w") as f:
        json.dump(c, f)


def shards(path):
    return sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))


@pytest.mark.parametrize("damage, message", [
    (lambda p: edit_config(p, model_type="mistral"), "model_type is 'mistral', not 'llama'"),
    (lambda p: os.remove(p / shards(p)[1]), "is missing"),
    (lambda p: os.truncate(p / shards(p)[0], os.path.getsize(p / shards(p)[0]) - 100),
     "truncated"),
    (lambda p: edit_config(p, intermediate_size=78), "config.json implies"),
])
def test_bad_hf_input_is_one_line_and_writes_nothing(hf_dir, tmp_path, damage, message):
    broken = broken_copy(hf_dir, tmp_path)
    damage(broken)
    proc = convert("import-hf", broken, tmp_path / "run", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "run")
    assert not [n for n in os.listdir(tmp_path) if ".partial" in n]


def test_an_existing_target_is_refused_unless_overwrite(hf_dir, tmp_path):
    convert("import-hf", hf_dir, tmp_path / "run")
    convert("export-hf", tmp_path / "run", tmp_path / "out")
    stamp = (tmp_path / "out" / "config.json").read_bytes()
    for args in (("import-hf", hf_dir, tmp_path / "run"),
                 ("export-hf", tmp_path / "run", tmp_path / "out")):
        proc = convert(*args, check=False)
        assert proc.returncode == 2 and "already exists (pass --overwrite" in proc.stderr
    assert (tmp_path / "out" / "config.json").read_bytes() == stamp
    convert("export-hf", tmp_path / "run", tmp_path / "out", "--overwrite")
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")
