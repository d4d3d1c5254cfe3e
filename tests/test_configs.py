"""The shipped configs, the base file, the dry-run figures (memory, fit, traffic, step time per
ZeRO stage) and the memory refusals."""

import dataclasses
import math
import os
import re
import sys

import pytest

from conftest import REPO, TINY, assert_one_line_error, run, train_cli
from hvd_llama import config, hardware, plan, traffic
from hvd_llama.errors import UserError
from hvd_llama.layout import Layout

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


def test_dry_run_prints_the_plan_and_imports_no_tensorflow():
    argv = ["--config", os.path.join(CONFIGS, "llama-65b.yaml"), "--dry-run", "--processes",
            "256", "--gpu", "h100"]
    proc = run([sys.executable, "-c", "import sys; from hvd_llama import train; "
                f"train.main({argv!r}); assert 'tensorflow' not in sys.modules, 'imported'"])
    out = proc.stdout
    assert "parameters: 65,285,660,672" in out
    assert "2,048 sequences = 4,194,304 tokens" in out
    # 4, 8 (a micro-batch's and the accumulator, then the allreduce's output) and 8 bytes x
    # 65.3B parameters, in GiB; and Horovod's 128 MiB fusion buffer
    assert re.search(r"dist.zero=0 +243.21 +486.54 +486.42 ", out)
    assert "333,786 steps" in out
    assert "step time, assuming --mfu 0.4 of 989 TFLOP/s per process (H100 datasheet" in out


def test_dry_run_compares_the_zero_stages_and_states_its_assumptions():
    out = train_cli("--dry-run", "--processes", "16",
                    config=os.path.join(CONFIGS, "llama-7b.yaml")).stdout
    for zero in plan.STAGES:
        assert len(re.findall(rf"^  dist.zero={zero} ", out, re.M)) == 3  # memory, sent, time
    assert re.search(r"dist.zero=0 .*<- this run", out)
    assert "--mfu 0.4 and --bus-gbps 25 (GB/s bus bandwidth)" in out
    assert "compute unknown without --gpu or train.peak_tflops" in out
    assert "fit: unknown without --gpu or --device-memory" in out
    assert "  dist.zero=2  8 reduce-scatters 202 + all-gather 25.3 = 227" in out
    out = train_cli("--dry-run", "--processes", "16", "--gpu", "H100", "--mfu", "0.5",
                    config=os.path.join(CONFIGS, "llama-7b.yaml")).stdout
    assert "fit in 80 GiB per device (H100): dist.zero=2 fits (63.6 GiB)" in out
    # 42.87 GFLOP x 262,144 tokens / (0.5 x 989 TFLOP/s) = 22.7 s; 50.54 GB / 25 GB/s = 2.02 s
    assert "dist.zero=0  compute 22.7 s + comm 2.02 s: no overlap 24.7 s, full overlap 22.7 s" \
        in out


def test_dry_run_splits_the_batch_over_the_devices_of_each_process():
    proc = run([sys.executable, "-m", "hvd_llama.train", "--config",
                os.path.join(CONFIGS, "llama-7b.yaml"), "--dry-run", "--processes", "8",
                "--devices", "8"])
    # 2048 sequences over 64 devices and 8 micro-batches: 4 sequences per micro-batch.
    assert "= 8 process(es) x 8 device(s) x 8 micro-batch(es) x 4 sequences" in proc.stdout
    assert "memory per device, GiB (bfloat16, remat)" in proc.stdout


def _llama(name, *overrides):
    return config.load(os.path.join(CONFIGS, f"{name}.yaml"), list(overrides))


def _memory(c, processes, zero):
    return plan.memory_per_replica(c, dataclasses.replace(Layout.of(c, processes), zero=zero))


@pytest.mark.parametrize("processes", [2, 16])
def test_zero_shards_the_optimizer_state_and_the_accumulated_gradients(processes):
    c = _llama("llama-7b")  # train.grad_accum 8
    n = plan.param_count(c.model)
    share = -(-n // processes)
    mem = [_memory(c, processes, zero) for zero in plan.STAGES]
    assert mem[0]["optimizer"] == 8 * n
    assert mem[1]["optimizer"] == mem[2]["optimizer"] == 8 * share
    assert mem[1]["optimizer"] == pytest.approx(mem[0]["optimizer"] / processes)
    fusion = 128 << 20  # Horovod's buffer, dist.fusion_threshold_mb
    assert mem[0]["weights"] == 4 * n
    # + the updated share, + one all-gather group: 128 MiB, or the largest tensor alone
    group = 4 * 32000 * 4096
    assert mem[1]["weights"] == mem[2]["weights"] == 4 * n + 4 * share + group
    # jit_compile "auto" (compiled on GPUs): a micro-batch's whole gradient, and the accumulator
    assert mem[0]["gradients"] == mem[1]["gradients"] == 8 * n + fusion
    # Uncompiled, two layers' in flight: here two blocks, each larger than an embedding matrix.
    block = (n - 2 * 32000 * 4096 - 4096) // 32
    assert block > 32000 * 4096
    assert mem[2]["gradients"] == 4 * share + 2 * 4 * block + fusion  # stage 2: the share, too
    eager = _llama("llama-7b", "train.jit_compile=false")
    # the accumulator and two layers', then the accumulator and the allreduce's output
    assert _memory(eager, processes, 0)["gradients"] == 8 * n + fusion
    assert _memory(eager, processes, 1)["gradients"] == \
        4 * n + max(2 * 4 * block, 4 * share) + fusion  # the reduce-scatter's output
    # hybrid: the in-process mean over devices holds a micro-batch's whole gradient
    hybrid = plan.memory_per_replica(eager, dataclasses.replace(
        Layout.of(eager, processes, 2), zero=2))
    assert hybrid["gradients"] == 4 * share + 4 * n + fusion
    assert len({m["activations"] for m in mem}) == 1
    one = _memory(_llama("llama-7b", "train.grad_accum=1"), processes, 0)
    assert one["gradients"] == 8 * n + fusion  # nothing to accumulate; the allreduce's output
    compiled = _memory(_llama("llama-7b", "train.jit_compile=true"), processes, 2)
    assert compiled["gradients"] == 4 * share + 4 * n + fusion  # XLA's whole gradient
    alone = _memory(_llama("llama-7b", "train.grad_accum=1"), 1, 0)
    assert alone["gradients"] == 4 * n  # one process: no collective, no buffer


def test_stage_2_in_flight_is_a_block_and_an_embedding_where_the_embedding_is_larger():
    c = config.load(TINY, ["train.jit_compile=false", "train.grad_accum=2"])  # vocab 8000 x 256
    n, block, embedding = plan.param_count(c.model), 725_504, 8000 * 256
    assert plan.block_params(c.model) == block < embedding
    share = -(-n // 2)
    fusion = 128 << 20
    assert _memory(c, 2, 2)["gradients"] == 4 * share + 4 * (block + embedding) + fusion
    assert _memory(c, 2, 1)["gradients"] == 4 * n + 4 * share + fusion  # > in flight


def test_bytes_sent_per_step_are_the_ring_collectives():
    c = _llama("llama-7b")  # k = 8 micro-batches; 4n = 26,953,662,464 bytes
    assert plan.param_count(c.model) == 6_738_415_616

    def sent(c, processes, zero):
        return [b for _, b in traffic.sent(c, Layout.of(c, processes), zero)]
    # N = 2: (N-1)/N = 1/2
    assert sent(c, 2, 0) == [26_953_662_464]  # allreduce: 2 x 1/2 x 4n
    assert sent(c, 2, 1) == [13_476_831_232, 13_476_831_232]  # reduce-scatter, all-gather
    assert sent(c, 2, 2) == [8 * 13_476_831_232, 13_476_831_232]  # one a micro-batch
    # stage 3 with remat, per micro-batch: the forward gathers every weight, the recomputation
    # the 32 blocks' (202,383,360 parameters each) again; each gradient is scattered once
    assert sent(c, 2, 3) == [8 * 2 * (6_738_415_616 + 32 * 202_383_360), 8 * 13_476_831_232]
    # a tied embedding (131,072,000 parameters fewer) is gathered and scattered by both its
    # calls: as much as the untied model sends
    tied = _llama("llama-7b", "model.tie_word_embeddings=true", "train.remat=false")
    assert plan.param_count(tied.model) == 6_738_415_616 - 131_072_000
    assert sent(tied, 2, 3) == [8 * 13_476_831_232, 8 * 13_476_831_232]
    # N = 16: (N-1)/N = 15/16; 4n / 16 = 1,684,603,904
    assert sent(c, 16, 0) == [2 * 25_269_058_560]
    assert sent(c, 16, 1) == [25_269_058_560, 25_269_058_560]
    assert sent(c, 16, 2) == [202_152_468_480, 25_269_058_560]
    # fp16 compression halves the gradient collectives, not the all-gather of the weights
    fp16 = _llama("llama-7b", "dist.compression=fp16")
    assert sent(fp16, 2, 0) == [13_476_831_232]
    assert sent(fp16, 16, 1) == [12_634_529_280, 25_269_058_560]
    assert sent(c, 1, 0) == [0]
    # a parameter server: each worker sends G, receives 4n; the server N times that
    assert traffic.parameter_server(c, Layout.of(c, 16)) == \
        (26_953_662_464, 26_953_662_464, 431_258_599_424, 431_258_599_424)
    assert traffic.comm_seconds(c, Layout.of(c, 16), 0, 25.0) == pytest.approx(2.0215, abs=1e-4)


def test_the_fit_search_picks_the_lowest_stage_then_a_smaller_micro_batch():
    gib = plan.GIB
    c = _llama("llama-7b")
    at16 = Layout.of(c, 16)  # micro-batch 16
    found, words = plan.what_fits(c, at16, 80 * gib)
    assert (found.zero, found.micro, found.processes) == (2, 16, 16)
    assert words == "dist.zero=2 fits"
    found, words = plan.what_fits(c, at16, 141 * gib)
    assert (found.zero, found.micro) == (1, 16) and words == "dist.zero=1 fits"
    found, words = plan.what_fits(c, at16, 200 * gib)
    assert found == at16 and words == "dist.zero=0 fits"
    # 13b on 80 GiB: stage 2 at micro-batch 8 needs ~83 GiB, at 4 ~74 GiB
    c = _llama("llama-13b")
    found, words = plan.what_fits(c, Layout.of(c, 16), 80 * gib)
    assert (found.zero, found.grad_accum, found.micro, found.processes) == (2, 32, 4, 16)
    assert words == "no stage fits at micro-batch 16; dist.zero=2 with train.grad_accum=32 " \
                    "(micro-batch 4) does"
    # 33b: on 16 H200s only at stage 3, whose shares of the weights make it fit 80 GiB too
    c = _llama("llama-33b")
    found, words = plan.what_fits(c, Layout.of(c, 16), 141 * gib)
    assert (found.processes, found.zero, found.micro) == (16, 3, 16)
    found, words = plan.what_fits(c, Layout.of(c, 32), 80 * gib)
    assert (found.processes, found.zero, found.micro) == (32, 3, 8)
    assert words == "dist.zero=3 fits"
    # 65b: on 64 x 80 GiB at stage 3, half the micro-batch on 32
    c = _llama("llama-65b")
    found, words = plan.what_fits(c, Layout.of(c, 64), 80 * gib)
    assert (found.processes, found.zero, found.micro) == (64, 3, 4)
    found, words = plan.what_fits(c, Layout.of(c, 32), 80 * gib)
    assert words == "no stage fits at micro-batch 8; dist.zero=3 with train.grad_accum=16 " \
                    "(micro-batch 4) does"
    # Under hybrid (no stage 3) the whole float32 weights of each process cannot fit
    c = _llama("llama-33b", "dist.strategy=hybrid")
    found, words = plan.what_fits(c, Layout.of(c, 16), 80 * gib)
    assert found is None and "the float32 weights alone are 121.2 GiB" in words
    # dist.strategy=mirrored has no ZeRO and one process: only the micro-batch may change
    c = _llama("llama-7b", "dist.strategy=mirrored")
    found, _ = plan.what_fits(c, Layout.of(c, 1, 8), 130 * gib)
    assert found.zero == 0 and found.processes == 1 and found.micro < 32


def test_a_run_too_big_for_its_gpu_stops_naming_what_fits():
    c = _llama("llama-7b")
    with pytest.raises(UserError) as e:
        plan.check_fits(c, Layout.of(c, 16), 1, "NVIDIA H100 80GB HBM3")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("a 6.7B-parameter model at dist.zero=0, micro-batch 16, ")
    assert "needs about 155.7 GiB per GPU, but H100 GPUs have 80 GiB: dist.zero=2 fits" in message
    c13 = _llama("llama-13b", "dist.zero=2")
    with pytest.raises(UserError, match=r"dist.zero=2, micro-batch 16, .*: no stage fits at "
                                        r"micro-batch 16; dist.zero=2 with train.grad_accum=32 "
                                        r"\(micro-batch 4\) does \(see --dry-run\)$"):
        plan.check_fits(c13, Layout.of(c13, 16), 1, "NVIDIA H100 80GB HBM3")
    c2 = _llama("llama-7b", "dist.zero=2")
    plan.check_fits(c2, Layout.of(c2, 16), 1, "NVIDIA H100 80GB HBM3")  # 63.9 GiB fits
    plan.check_fits(c, Layout.of(c, 16), 1, "Tesla T4")  # not in the table: not checked


def test_gpu_names_resolve_to_the_table():
    assert hardware.gpu_model("NVIDIA A100-SXM4-40GB") == "A100"  # not the A10
    assert hardware.gpu_model("NVIDIA A10") == "A10"
    assert hardware.gpu_model("h200") == "H200"
    assert hardware.gpu_model("Tesla T4") is None
    assert hardware.stated_peak("bfloat16", 0.0, "H100", 8) == \
        (8 * 989.0, "H100 datasheet, bfloat16")
    assert hardware.stated_peak("bfloat16", 0.0, "V100")[0] == 0.0  # no bfloat16 peak
    assert hardware.stated_peak("bfloat16", 123.0, "H100") == (123.0, "train.peak_tflops")


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


@pytest.mark.parametrize("flag, value", [("--mfu", "1.5"), ("--bus-gbps", "0"),
                                         ("--device-memory", "-1")])
def test_a_bad_planning_flag_is_named(flag, value):
    assert_one_line_error(train_cli("--dry-run", flag, value, check=False), flag, value)
