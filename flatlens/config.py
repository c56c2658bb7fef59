"""Run configuration: dataclasses, TOML files and typed ``--set section.key=value`` overrides.

A run is described by one :class:`Config` (sections ``data``, ``model``, ``optim``, ``train``,
``quant``). It is resolved once (defaults <- TOML file <- ``--set`` overrides), validated, and then
saved verbatim in the run directory (``config.toml``), in every checkpoint and in the first
``results.jsonl`` record, so that a checkpoint alone rebuilds the same model and data.

Unknown sections or keys are errors that list the valid ones; values are type-checked against the
dataclass annotations (an int is accepted where a float is expected, nothing else is coerced).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flatlens.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


@dataclass
class DataConfig:
    """Which domains, how they are split, and how batches are read."""

    dataset: str = "rotated_digits"
    """rotated_digits | colored_digits (embedded) | PACS | VLCS | OfficeHome | TerraIncognita |
    DomainNet | folders (any ``<root>/<domain>/<class>/<image>`` tree)."""
    root: str = ""
    """Folder datasets: the directory that contains the dataset folder (e.g. ``PACS/``); for
    ``folders`` the dataset folder itself. Unused by the embedded digits datasets."""
    data_seed: int = 0
    """Seeds the construction of the synthetic digits domains (which images go to which domain,
    label noise, colours). Independent of every training seed, so all runs see identical domains."""
    image_size: int = 16
    """Side of the (square) input images: 16 or 28 for digits, 224 for the DomainBed datasets."""
    test_envs: list[int] = field(default_factory=lambda: [0])
    """Indices of the held-out (target) domains; training uses every other domain."""
    holdout_fraction: float = 0.2
    """Fraction of every domain held out as its ``out`` split (validation), DomainBed's 20%."""
    augment: bool = True
    """Folder datasets: DomainBed's training augmentation on training batches (never on evaluation)."""
    eval_batch_size: int = 256
    """Batch size for evaluation passes (does not change results beyond float summation order)."""
    num_workers: int = 0
    """DataLoader worker processes for folder datasets (digits live in memory and need none)."""


@dataclass
class ModelConfig:
    """The network: a featurizer followed by a linear classifier."""

    arch: str = "bn_cnn"
    """bn_cnn (small CNN with BatchNorm) | mnist_cnn (DomainBed's, GroupNorm) | mlp |
    resnet18 | resnet50."""
    pretrained: str = ""
    """ResNets only: path of a local torchvision ImageNet state_dict; never downloaded. Empty means
    random initialisation."""
    freeze_bn: bool = False
    """Keep every BatchNorm layer in eval mode during training (running statistics frozen)."""
    dropout: float = 0.0
    """Dropout before the classifier."""
    width: int = 32
    """bn_cnn: channels of the first conv (doubled in each of the next two blocks)."""
    hidden: list[int] = field(default_factory=lambda: [128])
    """mlp: hidden layer widths."""


@dataclass
class OptimConfig:
    """The base optimizer and learning-rate schedule."""

    name: str = "adam"
    """adam | adamw | sgd."""
    lr: float = 1e-3
    """Base learning rate (DomainBed: 1e-3 for MNIST-sized inputs, 5e-5 for ResNets)."""
    weight_decay: float = 0.0
    """L2 weight decay of the weight group (never applied to quantizer step sizes)."""
    momentum: float = 0.9
    """sgd only."""
    scheduler: str = "constant"
    """constant | cosine (to zero over train.steps) | step (x0.1 at 1/2 and 3/4 of train.steps)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many steps (any scheduler)."""


@dataclass
class TrainConfig:
    """The training loop, seeds and model selection."""

    algorithm: str = "erm"
    """Training algorithm (``erm``)."""
    steps: int = 600
    """Number of updates; one minibatch per training domain per update."""
    batch_size: int = 32
    """Images per training domain per update (DomainBed semantics); the global batch under DDP."""
    eval_every: int = 100
    """Evaluate every domain's in/out split, append a results.jsonl record and checkpoint every N steps."""
    seed: int = 0
    """Seeds model initialisation, minibatch sampling, augmentation and dropout."""
    trial_seed: int = 0
    """Seeds the in/out split of every domain (DomainBed's trial seed)."""
    selection: str = "training_domain_val"
    """Which checkpoint becomes model.pt: training_domain_val (best mean accuracy on the training
    domains' out splits) | test_domain_val (best target out accuracy, an oracle) | last."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N. auto picks cuda when available."""
    deterministic: bool = True
    """torch.use_deterministic_algorithms; with it, CPU runs and resumes are bitwise reproducible."""
    keep_checkpoints: bool = False
    """Also keep the weights of every evaluation step as checkpoints/step_NNNNNN.pt (trajectories)."""
    name: str = ""
    """Label of this run in `flatlens collect` tables (default: derived from algorithm and quant)."""


@dataclass
class QuantConfig:
    """Quantization-aware training (LSQ fake quantization); off unless ``enabled``."""

    enabled: bool = False
    """Attach LSQ quantizers to the model (they switch on at q_step)."""
    mode: str = "qat"
    """qat | quantize_and_freeze | freeze_without_quant | uniform_noise | matched_noise."""
    bits: int = 7
    """Weight bit width (2..8)."""
    per_channel: bool = True
    """One step size per output channel (else one per tensor)."""
    signed: bool = True
    """Signed weight range [-2^(b-1), 2^(b-1)-1] (unsigned [0, 2^b-1] otherwise)."""
    narrow: bool = False
    """Symmetric range [-(2^(b-1)-1), 2^(b-1)-1] instead of [-2^(b-1), 2^(b-1)-1]."""
    grad_scale_n: str = "tensor"
    """N in LSQ's step-size gradient scale 1/sqrt(N*Q_P): tensor (whole tensor, as QT-DoG and
    PyTorch) | channel (elements per channel)."""
    quantize: list[str] = field(default_factory=lambda: ["*"])
    """Module-name patterns (fnmatch) of Conv2d/Linear layers to quantize."""
    keep_float: list[str] = field(default_factory=lambda: ["classifier"])
    """Module-name patterns kept in float; a pattern that matches nothing is an error."""
    activations: bool = False
    """Also quantize the input activations of quantized layers."""
    act_bits: int = 8
    """Activation bit width (unsigned range, one step size per tensor)."""
    q_step: int = -1
    """Step at which quantization switches on; -1 means 40% of train.steps (QT-DoG: 2000 of 5000)."""
    scale_lr: float = -1.0
    """Learning rate of the step sizes; -1 means optim.lr."""
    noise_a: float = 1e-4
    """uniform_noise mode: half-width a of the U(-a, a) weight noise."""
    select_quantized_only: bool = True
    """Model selection considers only checkpoints taken with quantization on."""


@dataclass
class Config:
    """A whole run's configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (JSON/TOML-serialisable)."""
        return dataclasses.asdict(self)

    def get(self, dotted: str) -> Any:
        section, key = _split_key(dotted)
        return getattr(getattr(self, section), key)


SECTIONS: dict[str, type] = {f.name: f.default_factory().__class__ for f in dataclasses.fields(Config)}  # type: ignore[misc]

KNOWN_DATASETS = ("rotated_digits", "colored_digits", "PACS", "VLCS", "OfficeHome", "TerraIncognita",
                  "DomainNet", "folders")
KNOWN_ARCHS = ("bn_cnn", "mnist_cnn", "mlp", "resnet18", "resnet50")
KNOWN_ALGORITHMS = ("erm",)
KNOWN_OPTIMIZERS = ("adam", "adamw", "sgd")
KNOWN_SCHEDULERS = ("constant", "cosine", "step")
KNOWN_SELECTIONS = ("training_domain_val", "test_domain_val", "last")
KNOWN_QUANT_MODES = ("qat", "quantize_and_freeze", "freeze_without_quant", "uniform_noise", "matched_noise")

_CHOICES: dict[str, tuple[str, ...]] = {
    "data.dataset": KNOWN_DATASETS,
    "model.arch": KNOWN_ARCHS,
    "train.algorithm": KNOWN_ALGORITHMS,
    "optim.name": KNOWN_OPTIMIZERS,
    "optim.scheduler": KNOWN_SCHEDULERS,
    "train.selection": KNOWN_SELECTIONS,
    "quant.mode": KNOWN_QUANT_MODES,
    "quant.grad_scale_n": ("tensor", "channel"),
}


def register_choices(dotted: str, *values: str) -> None:
    """Let a later module add allowed values for a string option (e.g. a new algorithm)."""
    _CHOICES[dotted] = tuple(dict.fromkeys(_CHOICES.get(dotted, ()) + values))


def _split_key(dotted: str) -> tuple[str, str]:
    parts = dotted.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"config key {dotted!r} must look like section.key (e.g. train.steps)")
    section, key = parts
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {section!r}; valid sections: {', '.join(SECTIONS)}")
    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if key not in names:
        raise ConfigError(f"unknown config key {dotted!r}; valid keys in [{section}]: {', '.join(names)}")
    return section, key


def _field_types(section: str) -> dict[str, Any]:
    return typing.get_type_hints(SECTIONS[section])


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"list of {typing.get_args(tp)[0].__name__}"
    return getattr(tp, "__name__", str(tp))


def _coerce(dotted: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against annotation ``tp``; accept int for float; raise a one-line ConfigError."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            value = [value]
        return [_coerce(dotted, v, item_tp) for v in value]
    ok = False
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"{dotted} must be a finite number, got {value}")
    elif tp is str:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{dotted} expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _parse_literal(text: str) -> Any:
    """Parse a ``--set`` value as a TOML literal; fall back to a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if "," in text:  # 0,1 -> [0, 1]
            return [_parse_literal(part.strip()) for part in text.split(",") if part.strip()]
        return text


def config_from_dict(data: dict[str, Any], base: Config | None = None, source: str = "config") -> Config:
    """Build a Config from a nested dict on top of ``base`` (defaults when None), checking every key."""
    cfg = base if base is not None else Config()
    cfg = dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s)) for s in SECTIONS})
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a table of sections, got {type(data).__name__}")
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{section}]; valid sections: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of key = value pairs")
        types = _field_types(section)
        for key, value in values.items():
            _split_key(f"{section}.{key}")
            setattr(getattr(cfg, section), key, _coerce(f"{section}.{key}", value, types[key]))
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings (TOML literals; bare words are strings)."""
    nested: dict[str, dict[str, Any]] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like section.key=value (e.g. train.steps=300)")
        dotted, text = item.split("=", 1)
        section, key = _split_key(dotted.strip())
        tp = _field_types(section)[key]
        value = _parse_literal(text.strip())
        if tp is str and not isinstance(value, str):
            value = text.strip()  # e.g. --set train.name=2024 stays a string
        nested.setdefault(section, {})[key] = value
    return config_from_dict(nested, cfg, source="--set")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Resolve defaults <- TOML file <- overrides and validate the result."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p} (pass an existing TOML file to --config)")
        try:
            data = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{p}: not valid TOML ({exc})") from None
        cfg = config_from_dict(data, cfg, source=str(p))
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check value ranges and choices; raise ConfigError naming the key and the allowed values."""
    for dotted, choices in _CHOICES.items():
        value = cfg.get(dotted)
        if value not in choices:
            raise ConfigError(f"{dotted} = {value!r} is not one of: {', '.join(choices)}")
    checks = [
        ("train.steps", cfg.train.steps >= 1, "must be >= 1"),
        ("train.batch_size", cfg.train.batch_size >= 1, "must be >= 1"),
        ("train.eval_every", cfg.train.eval_every >= 1, "must be >= 1"),
        ("data.holdout_fraction", 0.0 < cfg.data.holdout_fraction < 1.0, "must be in (0, 1)"),
        ("data.image_size", cfg.data.image_size >= 8, "must be >= 8"),
        ("data.eval_batch_size", cfg.data.eval_batch_size >= 1, "must be >= 1"),
        ("data.num_workers", cfg.data.num_workers >= 0, "must be >= 0"),
        ("data.test_envs", len(cfg.data.test_envs) >= 1 and all(t >= 0 for t in cfg.data.test_envs)
         and len(set(cfg.data.test_envs)) == len(cfg.data.test_envs), "must be distinct non-negative domain indices"),
        ("optim.lr", cfg.optim.lr > 0, "must be > 0"),
        ("optim.weight_decay", cfg.optim.weight_decay >= 0, "must be >= 0"),
        ("optim.warmup_steps", cfg.optim.warmup_steps >= 0, "must be >= 0"),
        ("model.dropout", 0.0 <= cfg.model.dropout < 1.0, "must be in [0, 1)"),
        ("model.width", cfg.model.width >= 1, "must be >= 1"),
        ("model.hidden", all(h >= 1 for h in cfg.model.hidden), "must be positive widths"),
        ("quant.bits", 2 <= cfg.quant.bits <= 8, "must be in 2..8"),
        ("quant.act_bits", 2 <= cfg.quant.act_bits <= 8, "must be in 2..8"),
        ("quant.q_step", cfg.quant.q_step >= -1, "must be >= 0, or -1 for 40% of train.steps"),
        ("quant.noise_a", cfg.quant.noise_a >= 0, "must be >= 0"),
    ]
    for dotted, ok, why in checks:
        if not ok:
            raise ConfigError(f"{dotted} = {cfg.get(dotted)!r} {why}")
    dev = cfg.train.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"train.device = {dev!r} is not one of: auto, cpu, cuda, cuda:N")


def diff_configs(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two config dicts (missing keys count as different)."""
    keys = []
    for section in sorted(set(a) | set(b)):
        sa, sb = a.get(section, {}), b.get(section, {})
        for key in sorted(set(sa) | set(sb)):
            if sa.get(key, object()) != sb.get(key, object()):
                keys.append(f"{section}.{key}")
    return keys


def config_to_json(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def config_to_toml(cfg: Config) -> str:
    """The resolved config as TOML that :func:`load_config` reads back to an equal Config."""
    lines = ["# resolved flatlens config (defaults + file + overrides)"]
    for section, values in cfg.to_dict().items():
        lines.append(f"\n[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
    return "\n".join(lines) + "\n"


def describe_options() -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) for every option; used by `flatlens train --help-config` and the README."""
    rows = []
    import ast
    import inspect
    import textwrap

    for section, cls in SECTIONS.items():
        docs: dict[str, str] = {}
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[union-attr]
        types = _field_types(section)
        default = cls()
        for f in dataclasses.fields(cls):
            rows.append((f"{section}.{f.name}", _type_name(types[f.name]),
                         _toml_value(getattr(default, f.name)), docs.get(f.name, "")))
    return rows


def options_markdown() -> str:
    """The config reference table of the README (kept in sync by a test)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, doc in describe_options():
        lines.append(f"| `{key}` | {tp} | `{default}` | {doc.replace('|', '/')} |")
    return "\n".join(lines)
