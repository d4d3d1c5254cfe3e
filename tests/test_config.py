import pytest

from hvd_llama import config
from hvd_llama.errors import UserError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_then_yaml_then_cli(tmp_path):
    path = write(tmp_path, "train:\n  steps: 7\n  global_batch: 3\nmodel:\n  num_layers: 2\n")
    c = config.load(path, ["train.steps=9", "run.dir=x"])
    assert c.train.steps == 9  # CLI beats YAML
    assert c.train.global_batch == 3  # YAML beats default
    assert c.model.num_layers == 2
    assert c.train.seed == config.TrainConfig().seed  # default where neither says
    assert c.run.dir == "x"


def test_int_accepted_for_float_and_round_trip(tmp_path):
    c = config.load(None, ["train.learning_rate=1", "train.resume=true"])
    assert c.train.learning_rate == 1.0 and isinstance(c.train.learning_rate, float)
    assert config.load(write(tmp_path, config.to_yaml(c))) == c


def test_frozen():
    with pytest.raises(Exception):
        config.load().train.steps = 3


@pytest.mark.parametrize("overrides, fragment", [
    (["train.stepz=3"], "train.stepz"),
    (["trian.steps=3"], "trian"),
    (["train.steps=abc"], "train.steps"),
    (["train.steps=true"], "train.steps"),  # a bool is not an int here
    (["train.resume=1"], "train.resume"),
    (["train.steps=0"], "train.steps"),
    (["train.global_batch=-1"], "train.global_batch"),
    (["train.weight_decay=-0.1"], "train.weight_decay"),
    (["model.num_query_heads=6", "model.num_key_value_heads=4"], "model.num_query_heads"),
    (["dist.compression=int8"], "dist.compression"),
    (["dist.strategy=parameter_server"], "dist.strategy"),
    (["dist.zero=4"], "'dist.zero' must be 0, 1, 2 or 3"),
    (["dist.zero=3", "dist.strategy=hybrid"], "'dist.zero'=3"),
    (["dist.zero=3", "train.jit_compile=true"], "'train.jit_compile'=true"),
    (["dist.zero=1", "dist.strategy=mirrored"], "'dist.zero' shards across Horovod"),
    (["dist.devices=GPU:0"], "dist.devices"),  # horovod: one device per process
    (["dist.logical_cpus=2"], "dist.logical_cpus"),
    (["dist.strategy=mirrored", "dist.logical_cpus=-1"], "dist.logical_cpus"),
    (["data.path=/no/such/dir"], "/no/such/dir"),
    (["run.dir="], "run.dir"),
    (["steps=3"], "steps=3"),
])
def test_bad_override_names_the_key(overrides, fragment):
    with pytest.raises(UserError) as e:
        config.load(None, overrides)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(UserError, match="config file not found: /no/such.yaml"):
        config.load("/no/such.yaml")
    with pytest.raises(UserError, match="unknown config key 'train.nope'"):
        config.load(write(tmp_path, "train:\n  nope: 1\n"))
    with pytest.raises(UserError, match="not valid YAML"):
        config.load(write(tmp_path, "train: [\n"))
    with pytest.raises(UserError, match="section 'train' must be a mapping"):
        config.load(write(tmp_path, "train: 3\n"))


def test_elastic_keeps_the_global_batch_by_raising_the_micro_batch_count():
    """dist.elastic: the micro-batch count grows from train.grad_accum to the smallest that
    splits the global batch over the processes; of 5 processes, which cannot split it, 4 read
    data (weighing 5/4 in the averages over 5) and the fifth copies rank 0's rows, weighing 0."""
    from hvd_llama.layout import Layout
    c = config.load(None, ["train.global_batch=24", "train.grad_accum=2", "dist.elastic=true"])
    for processes, k, micro in ((1, 2, 12), (4, 2, 3), (8, 3, 1), (6, 2, 2)):
        layout = Layout.of(c, processes)
        assert (layout.grad_accum, layout.micro, layout.global_batch, layout.weight) == \
            (k, micro, 24, 1.0)
    readers = [Layout.of(c, 5, rank=r) for r in range(5)]
    assert {(x.processes, x.grad_accum, x.micro) for x in readers} == {(4, 2, 3)}
    assert [(x.rank, x.weight) for x in readers] == [(0, 1.25), (1, 1.25), (2, 1.25), (3, 1.25),
                                                     (0, 0.0)]
    with pytest.raises(UserError, match="does not divide"):  # without dist.elastic, as set
        Layout.of(config.load(None, ["train.global_batch=24", "train.grad_accum=2"]), 8)
