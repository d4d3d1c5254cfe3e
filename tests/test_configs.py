"""The shipped configs, the base file, the dry-run figures and the memory refusal."""

import dataclasses
import math
import os
import re
import sys

import pytest

from conftest import REPO, run, train_cli
from hvd_llama import config, plan
from hvd_llama.errors import UserError

CONFIGS = os.path.join(REPO, "configs")


def test_base_file_is_the_defaults_and_comments_every_key():
    assert config.load(os.path.join(CONFIGS, "base.yaml")) == config.Config()
    with open(os.path.join(CONFIGS, "base.yaml")) as f:
        lines = f.read().splitlines()
    for section, values in dataclasses.asdict(config.Config()).items():
        for key in values:
            line = [x for x in lines if re.match(rf"^  {key}:", x)]
            assert len(line) == 1 and "#" in line[0], f"{section}.{key} is not documented"


@pytest.mark.parametrize("name", ["micro", "tiny", "small", "llama-7b", "llama-13b",
                                  "llama-33b", "llama-65b"])
def test_model_files_build_on_the_base(name):
    path = os.path.join(CONFIGS, f"{name}.yaml")
    with open(path) as f:
        assert "base: base.yaml" in f.read()
    config.load(path)


@pytest.mark.parametrize("name, billions", [("llama-7b", 6.7), ("llama-13b", 13.0),
                                            ("llama-33b", 32.5), ("llama-65b", 65.2)])
def test_paper_parameter_counts(name, billions):
    c = config.load(os.path.join(CONFIGS, f"{name}.yaml"))
    n = plan.param_count(c.model)
    assert math.floor(n / 1e8) / 10 == billions  # the paper truncates to 0.1B
    assert c.data.seq_len == 2048 and c.model.vocab_size == 32000
    assert c.train.global_batch * c.data.seq_len == 4 * 1024 * 1024  # 4M tokens


@pytest.mark.parametrize("name", ["micro", "tiny", "small"])
def test_param_count_is_keras_hubs_exact_count(name):
    from hvd_llama import model as model_lib
    c = config.load(os.path.join(CONFIGS, f"{name}.yaml"))
    assert plan.param_count(c.model) == model_lib.build(c.model, seed=0).count_params()


def test_gqa_and_odd_sizes_count_exactly():
    from hvd_llama import model as model_lib
    c = config.load(None, ["model.vocab_size=97", "model.num_layers=3", "model.hidden_dim=48",
                           "model.num_query_heads=6", "model.num_key_value_heads=2",
                           "model.intermediate_dim=77"])
    assert plan.param_count(c.model) == model_lib.build(c.model, seed=0).count_params()


def test_dry_run_prints_the_plan_and_builds_nothing():
    proc = run([sys.executable, "-m", "hvd_llama.train", "--config",
                os.path.join(CONFIGS, "llama-65b.yaml"), "--dry-run", "--processes", "256"])
    out = proc.stdout
    assert "parameters: 65,285,660,672" in out
    assert "2,048 sequences = 4,194,304 tokens" in out
    assert "optimizer 486.4" in out  # 8 bytes x 65.3B parameters, in GiB
    assert "333,786 steps" in out
    assert "tensorflow" not in proc.stderr.lower()


def test_dry_run_splits_the_batch_over_the_devices_of_each_process():
    proc = run([sys.executable, "-m", "hvd_llama.train", "--config",
                os.path.join(CONFIGS, "llama-7b.yaml"), "--dry-run", "--processes", "8",
                "--devices", "8"])
    # 2048 sequences over 64 devices and 8 micro-batches: 4 sequences per micro-batch.
    assert "= 8 process(es) x 8 device(s) x 8 micro-batch(es) x 4 sequences" in proc.stdout
    assert "memory per device (bfloat16, remat)" in proc.stdout


def test_a_model_too_big_for_this_host_is_refused_before_any_weight(tmp_path):
    proc = train_cli("--config", os.path.join(CONFIGS, "llama-7b.yaml"),
                     f"run.dir={tmp_path / 'r'}", check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: a 6.7B-parameter model") and "GiB free" in last
    assert not os.path.exists(tmp_path / "r")


def test_base_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: a.yaml\n")
    with pytest.raises(UserError, match="nest more than 8 deep"):
        config.load(str(tmp_path / "a.yaml"))
    (tmp_path / "b.yaml").write_text("base: [1]\n")
    with pytest.raises(UserError, match="'base' must name a YAML file"):
        config.load(str(tmp_path / "b.yaml"))
