"""The run configuration: a tree of frozen dataclasses.

Precedence: the defaults below < the YAML file (after the file its `base:` key names, if any)
< `section.key=value` on the command line. configs/base.yaml documents every key.
An unknown key, a value of the wrong type or out of range is a UserError naming the key.
"""

import dataclasses
import os
from dataclasses import dataclass, field

import yaml

from hvd_llama.errors import UserError
from hvd_llama.layout import Layout


@dataclass(frozen=True)
class RunConfig:
    # The run directory: config.yaml, metrics.jsonl, checkpoints/, saved_model/, tensorboard/.
    dir: str = "runs/default"


@dataclass(frozen=True)
class ModelConfig:
    # The keras-hub LlamaBackbone arguments (names follow keras-hub).
    vocab_size: int = 8000  # also the sentencepiece vocabulary size
    num_layers: int = 4
    num_query_heads: int = 8
    num_key_value_heads: int = 4  # < num_query_heads: grouped-query attention
    hidden_dim: int = 256
    intermediate_dim: int = 688  # SwiGLU inner size
    rope_max_wavelength: float = 10000.0  # RoPE base (theta)
    layer_norm_epsilon: float = 1e-6  # RMSNorm epsilon
    tie_word_embeddings: bool = False  # one matrix for the input and output embeddings
    max_position_embeddings: int = 2048  # context length: longest sequence trained or generated


@dataclass(frozen=True)
class DataConfig:
    # A directory made by `python -m hvd_llama.prepare`, or "builtin": the standard
    # library's docstrings, prepared on first use into cache_dir.
    path: str = "builtin"
    cache_dir: str = "~/.cache/hvd_llama"  # where the built-in dataset is prepared
    seq_len: int = 256  # tokens per training sequence
    verify: bool = True  # check every shard's sha256 against the manifest at start, once a host


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100  # optimizer steps in the whole run (a resumed run stops here too)
    # Sequences per optimizer step over all processes and micro-batches. Each process runs
    # grad_accum micro-batches of global_batch / (processes x grad_accum) sequences per step.
    global_batch: int = 8
    grad_accum: int = 1
    learning_rate: float = 1e-3  # peak, for the global batch; never rescaled by process count
    warmup_steps: int = 10  # linear warmup, then cosine decay to 10% of the peak
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    decay_norms_and_embeddings: bool = False  # False: decay only the dense kernels
    clip_norm: float = 1.0  # global-norm clipping of the averaged gradients; 0 disables
    precision: str = "float32"  # "float32" | "bfloat16" | "float16": compute dtype; weights fp32
    remat: bool = False  # recompute each decoder block's activations in the backward pass
    jit_compile: str = "auto"  # "auto" (XLA on GPU only) | "true" | "false"
    on_nonfinite: str = "stop"  # a NaN/Inf gradient: "stop" the run or "skip" the step
    peak_tflops: float = 0.0  # the device's peak per process, for MFU; 0 = look up / measure
    log_every: int = 1  # print and record metrics every N steps (1 = every step)
    checkpoint_every: int = 50  # checkpoint every N steps (and always at the end)
    eval_every: int = 50  # validation loss every N steps (and at the end); 0 = never
    # Global batches (global_batch sequences each, read in grad_accum micro-batches as in
    # training) of the validation split per evaluation.
    eval_batches: int = 4
    seed: int = 0  # weight init and data order
    export: bool = True  # the trained model as the next SavedModel version at the end
    # "false": start fresh (refused over another run's checkpoints); "true": continue from the
    # newest checkpoint in run.dir (refused if there is none); "auto": continue if there is
    # one, else start fresh (a requeued or preempted job, see README "Failures").
    resume: str = "false"


@dataclass(frozen=True)
class DistConfig:
    # How the replicas (one per device) are laid out: "horovod", one process per device;
    # "mirrored", one process over several devices (tf.distribute.MirroredStrategy, no
    # launcher); "hybrid", one process per host mirroring over its devices, Horovod between.
    strategy: str = "horovod"
    # mirrored/hybrid: this process's devices, comma-separated ("GPU:0,GPU:1"); "" = its GPUs
    # (hybrid: its share of the host's), or without GPUs its logical CPUs (below).
    devices: str = ""
    logical_cpus: int = 0  # mirrored/hybrid: split the CPU into N devices (tests, CPU hosts)
    # ZeRO (sharded data parallelism) over the Horovod processes: 0 = each holds all optimizer
    # state; 1 = each holds the AdamW moments of its 1/N share of every tensor's rows (gradients
    # reduce-scattered, updated shares all-gathered); 2 = the accumulated gradients too; 3 = the
    # weights too, each layer's gathered whole around its compute (dist.strategy=horovod, no XLA).
    zero: int = 0
    # dist.zero=3: all-gather a layer's weights when the layer before it starts, not when it ends.
    prefetch: bool = True
    # Horovod's knobs, exported as its HOROVOD_* variables before it starts (they win over
    # horovodrun's flags). Defaults are Horovod's own.
    compression: str = "none"  # "none" | "fp16": cast gradients to fp16 for the allreduce
    fusion_threshold_mb: int = 128  # tensors fused into one allreduce buffer up to this size
    cycle_time_ms: float = 0.0  # Horovod's background thread cycle; 0 = auto (distributed.py)
    timeline: str = ""  # Chrome-trace file of every collective (relative to run.dir); "" = off
    autotune: bool = False  # let Horovod tune fusion and cycle time; logs to autotune.csv
    # Horovod's stall inspector: name the ranks that have not reached a collective the others
    # wait in after this many seconds (0: never check), and end the job after that many (0:
    # never; the ranks wait on).
    stall_warning_seconds: int = 60
    stall_shutdown_seconds: int = 0
    # Horovod's elastic mode (horovodrun --gloo --min-np/--max-np --host-discovery-script):
    # ranks may die and hosts come and go; the survivors roll back to the last commit of the
    # state (weights, optimizer state, step, data position), taken every commit_every steps.
    elastic: bool = False
    commit_every: int = 10


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)


def load(path=None, overrides=()):
    """Resolve defaults < YAML at `path` < `section.key=value` overrides into a Config."""
    tree = dataclasses.asdict(Config())
    if path is not None:
        _apply_file(tree, path)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise UserError(f"override {item!r}: expected section.key=value")
        section, name = key.split(".", 1)
        _merge(tree, {section: {name: yaml.safe_load(text)}}, source="command line")
    config = Config(**{name: _section_type(name)(**values) for name, values in tree.items()})
    validate(config)
    return config


def to_yaml(config):
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def _apply_file(tree, path, depth=0):
    """Merge a YAML file into tree, after the file its `base:` key names (relative to it)."""
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise UserError(f"{path}: 'base' must name a YAML file, got {base!r}")
        if depth >= 8:
            raise UserError(f"{path}: 'base' files nest more than 8 deep (a cycle?)")
        _apply_file(tree, os.path.join(os.path.dirname(path), base), depth + 1)
    _merge(tree, data, source=path)


def check_own_run(path, run_dir):
    """For training: a run's own config.yaml (as the trainer writes it) names the directory it
    was written in, so a copied run directory's would send the run back into the original.
    Called when run.dir came from the file at `path`, not from the command line."""
    here = os.path.dirname(os.path.abspath(path))
    is_run = os.path.basename(path) == "config.yaml" and \
        os.path.isdir(os.path.join(here, "checkpoints"))
    if is_run and os.path.realpath(run_dir) != os.path.realpath(here):
        raise UserError(f"{path} is the config of the run in {here}, but its 'run.dir' is "
                        f"{run_dir}: pass run.dir={here} to continue this copy (or run.dir="
                        f"{run_dir} for the original)")


def _read_yaml(path):
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    except OSError as e:
        raise UserError(f"config file {path}: unreadable ({e.strerror})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


_BOOL_OR_STR = {"jit_compile", "resume"}
_CHOICES = {
    "train.precision": ("float32", "bfloat16", "float16"),
    "train.jit_compile": ("auto", "true", "false"),
    "train.on_nonfinite": ("stop", "skip"),
    "train.resume": ("false", "true", "auto"),
    "dist.compression": ("none", "fp16"),
    "dist.strategy": ("horovod", "mirrored", "hybrid"),
}


_POSITIVE = (
    "model.vocab_size", "model.num_layers", "model.num_query_heads",
    "model.num_key_value_heads", "model.hidden_dim", "model.intermediate_dim",
    "model.rope_max_wavelength", "model.layer_norm_epsilon", "model.max_position_embeddings",
    "data.seq_len", "train.steps", "train.global_batch", "train.grad_accum",
    "train.learning_rate", "train.log_every", "train.checkpoint_every", "dist.commit_every",
)
_NON_NEGATIVE = (
    "train.warmup_steps", "train.seed", "train.weight_decay", "train.clip_norm",
    "train.eval_every", "train.eval_batches", "train.peak_tflops", "dist.fusion_threshold_mb",
    "dist.cycle_time_ms", "dist.logical_cpus", "dist.stall_warning_seconds",
    "dist.stall_shutdown_seconds",
)


def _value(c, key):
    section, name = key.split(".")
    return getattr(getattr(c, section), name)


def _section_type(name):
    return {f.name: f.type for f in dataclasses.fields(Config)}[name]


def _merge(tree, update, source):
    for section, values in update.items():
        if section not in tree:
            raise UserError(f"{source}: unknown config section '{section}'")
        if not isinstance(values, dict):
            raise UserError(f"{source}: section '{section}' must be a mapping")
        types = {f.name: f.type for f in dataclasses.fields(_section_type(section))}
        for key, value in values.items():
            if key not in types:
                raise UserError(f"{source}: unknown config key '{section}.{key}'")
            if key in _BOOL_OR_STR and isinstance(value, bool):
                value = str(value).lower()  # YAML reads `true` as a bool
            tree[section][key] = _coerce(f"{section}.{key}", value, types[key], source)


def _coerce(key, value, typ, source):
    # YAML gives int for "3" and float for "3.0"; accept an int where a float is wanted,
    # but never a bool where a number is wanted (bool is an int subclass in Python).
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, typ) and not (typ is not bool and isinstance(value, bool)):
        return value
    raise UserError(f"{source}: '{key}' must be {typ.__name__}, got {value!r}")


def validate(c):
    """A UserError naming the first key whose value is out of range or inconsistent."""
    for key in _POSITIVE:
        if _value(c, key) <= 0:
            raise UserError(f"'{key}' must be > 0, got {_value(c, key)}")
    for key in _NON_NEGATIVE:
        if _value(c, key) < 0:
            raise UserError(f"'{key}' must be >= 0, got {_value(c, key)}")
    if c.model.num_query_heads % c.model.num_key_value_heads:
        raise UserError("'model.num_query_heads' must be a multiple of 'model.num_key_value_heads'"
                        f" ({c.model.num_query_heads} vs {c.model.num_key_value_heads})")
    if c.model.hidden_dim % c.model.num_query_heads:
        raise UserError("'model.hidden_dim' must be a multiple of 'model.num_query_heads'"
                        f" ({c.model.hidden_dim} vs {c.model.num_query_heads})")
    if c.data.seq_len > c.model.max_position_embeddings:
        raise UserError(f"'data.seq_len' {c.data.seq_len} exceeds the model's context, "
                        f"'model.max_position_embeddings' {c.model.max_position_embeddings}")
    if c.model.vocab_size > 65535:
        raise UserError(f"'model.vocab_size' must be <= 65535 (uint16 tokens), got "
                        f"{c.model.vocab_size}")
    for key, allowed in _CHOICES.items():
        if _value(c, key) not in allowed:
            raise UserError(f"'{key}' must be one of {', '.join(allowed)}; got {_value(c, key)!r}")
    if c.dist.strategy == "horovod":
        for key in ("devices", "logical_cpus"):
            if getattr(c.dist, key):
                raise UserError(f"'dist.{key}' is for dist.strategy=mirrored or hybrid (one "
                                "process over several devices); dist.strategy is horovod")
    if c.dist.zero not in (0, 1, 2, 3):
        raise UserError(f"'dist.zero' must be 0, 1, 2 or 3; got {c.dist.zero}")
    if c.dist.zero and c.dist.strategy == "mirrored":
        raise UserError("'dist.zero' shards across Horovod processes, and dist.strategy=mirrored "
                        "runs one: use dist.zero=0, or dist.strategy=horovod or hybrid")
    if c.dist.zero == 3 and c.dist.strategy != "horovod":
        raise UserError("'dist.zero'=3 gathers each layer's weights once per process: it needs "
                        f"dist.strategy=horovod (one device per process), not {c.dist.strategy}")
    if c.dist.zero == 3 and c.train.jit_compile == "true":
        raise UserError("'train.jit_compile'=true cannot compile dist.zero=3's forward pass, "
                        "which all-gathers each layer's weights: use auto or false")
    if c.dist.elastic and (c.dist.zero or c.dist.strategy != "horovod"):
        raise UserError("'dist.elastic' needs dist.strategy=horovod and dist.zero=0 (a state "
                        "every process holds whole, whatever their number)")
    if 0 < c.dist.stall_shutdown_seconds < c.dist.stall_warning_seconds \
            or (c.dist.stall_shutdown_seconds and not c.dist.stall_warning_seconds):
        # Horovod would ignore it with a warning: it shuts down only ranks it has reported.
        raise UserError(f"'dist.stall_shutdown_seconds' ({c.dist.stall_shutdown_seconds}) must be "
                        f"0 or >= 'dist.stall_warning_seconds' ({c.dist.stall_warning_seconds}, "
                        "which must then be > 0)")
    Layout.of(c)  # grad_accum must divide the global batch; processes are checked at start
    if c.data.path != "builtin" and not os.path.isdir(os.path.expanduser(c.data.path)):
        raise UserError(f"'data.path': no such dataset directory: {c.data.path}")
    if not c.run.dir:
        raise UserError("'run.dir' must not be empty")
    if os.path.exists(c.run.dir) and not os.path.isdir(c.run.dir):
        raise UserError(f"'run.dir': {c.run.dir} exists and is not a directory")
