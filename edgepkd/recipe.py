"""Recipes: a whole distillation run in one YAML file, loaded into these dataclasses.

The defaults of ``Recipe()`` *are* the embedded demo (scikit-learn's 8x8 digits, offline);
``recipes/digits.yaml`` spells them out and a test keeps the two identical. The shipped recipes (``recipes/*.yaml``,
carried by the wheel) can be named instead of given as a path: ``edgepkd distill mnist``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgepkd.builtins import builtin_dir
from edgepkd.config import apply_overrides, check, empty_message, from_dict, load_yaml, to_dict
from edgepkd.errors import ConfigError
from edgepkd.registry import closest


@dataclass
class SyntheticConfig:
    """Class-conditional random patterns (dataset ``synthetic``), for tests."""

    num_samples: int = 600       # total, split into train/val/test like any dataset
    num_classes: int = 4
    image_size: int = 8
    channels: int = 1
    noise: float = 0.35          # pixel noise relative to the pattern amplitude

    def __post_init__(self):
        check(self.num_samples >= 20, "num_samples", "must be at least 20")
        check(self.num_classes >= 2, "num_classes", "must be at least 2")
        check(self.image_size >= 2, "image_size", "must be at least 2")
        check(self.channels in (1, 3), "channels", "must be 1 or 3")


@dataclass
class DataConfig:
    dataset: str = "digits"            # digits | mnist | cifar10 | imagefolder:PATH | synthetic
    val_fraction: float = 0.1          # held out of the training set (accuracy for model selection)
    test_fraction: float = 0.2         # only for datasets without an official test split
    image_size: int | None = None      # resize every image to image_size x image_size; None keeps the native size
    mean: list[float] | None = None    # per channel, in [0, 1] units; None: computed on the train split
    std: list[float] | None = None
    augment: Literal["none", "crop", "crop_flip"] = "none"  # random 'crop' (pad 1/8 of the size), +horizontal flip
    train_limit: int | None = None     # use only the first N training images (quick checks)
    download: bool = True              # mnist / cifar10: try torchvision's download when files are missing
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self):
        check(0.0 <= self.val_fraction < 0.5, "val_fraction", "must be in [0, 0.5)")
        check(0.0 < self.test_fraction < 0.5, "test_fraction", "must be in (0, 0.5)")
        check(self.image_size is None or self.image_size >= 4, "image_size", "must be at least 4")
        check(self.train_limit is None or self.train_limit >= 10, "train_limit", "must be at least 10")
        for name in ("mean", "std"):
            v = getattr(self, name)
            check(v is None or len(v) in (1, 3), name, "must list 1 or 3 values (one per channel)")
        check(self.std is None or all(s > 0 for s in self.std), "std", "values must be positive")
        check((self.mean is None) == (self.std is None), "std", "give both mean and std, or neither")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.01
    momentum: float = 0.9              # sgd only
    schedule: Literal["cosine", "constant"] = "cosine"  # per step, after warmup
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float | None = 1.0      # max global grad norm; null disables
    augment: Literal["none", "crop", "crop_flip"] | None = None  # this stage's augmentation; null: data.augment

    def __post_init__(self):
        check(self.epochs >= 1, "epochs", "must be at least 1")
        check(self.batch_size >= 1, "batch_size", "must be at least 1")
        check(self.lr > 0, "lr", "must be positive")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(0 <= self.warmup_epochs < self.epochs, "warmup_epochs", "must be in [0, epochs)")
        check(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be positive or null")


@dataclass
class TeacherConfig:
    arch: str = "cnn"                         # a registered teacher: `edgepkd list teachers`
    args: dict[str, Any] = field(default_factory=lambda: {"width": 32})  # keyword arguments of the builder
    checkpoint: str | None = None             # safetensors weights to load instead of training
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, lr=3e-3, weight_decay=0.05))


@dataclass
class BaselineConfig:
    """A reference model trained from labels alone with its own budget (e.g. MLPerf Tiny's ResNet-8), reported
    and plotted beside the students for an honest comparison; never distilled, never exported."""

    arch: str = "resnet8"                     # a registered teacher architecture: `edgepkd list teachers`
    args: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class StudentSpec:
    """One Mamba student: patch embedding -> ``depth`` residual Mamba blocks -> mean pool -> head."""

    d_model: int
    depth: int = 1
    d_state: int = 8
    expand: int = 2
    d_conv: int = 4
    patch_size: int = 2
    bidirectional: bool = False
    dt_rank: int | None = None        # None: ceil(d_model / 16), as in Mamba
    stem: Literal["patch", "conv"] = "patch"  # patch: one linear map per patch (ViT); conv: a 3x3 conv-BN-ReLU
                                              # (stride 2 for an even patch_size, else 1) then the rest of the
                                              # patch as a patch conv (a hybrid, cheap local features)
    heads: int | None = None          # None: Mamba-1 (a step size and d_state decays per channel); H: Mamba-2's
                                      # scalar SSM, H groups of channels sharing one step size and one decay,
                                      # exported as the 'ssd' scan (batched matmuls, no per-position ops)

    def __post_init__(self):
        for name in ("d_model", "depth", "d_state", "expand", "d_conv", "patch_size"):
            check(getattr(self, name) >= 1, name, "must be at least 1")
        check(self.dt_rank is None or self.dt_rank >= 1, "dt_rank", "must be at least 1 or null")
        check(self.heads is None or (self.heads >= 1 and (self.expand * self.d_model) % self.heads == 0), "heads",
              f"must be null or divide expand x d_model = {self.expand * self.d_model}")


@dataclass
class ProgressionConfig:
    """Generate students: each about ``flops_ratio`` times the FLOPs of the previous one (``by: flops``), or
    about ``latency_ratio`` times its p50 latency measured on a device profile (``by: latency``: candidates are
    exported with random weights and timed in that device's runtime, cached per device in a latency table)."""

    start: StudentSpec = field(default_factory=lambda: StudentSpec(d_model=32, depth=2))
    count: int = 4
    flops_ratio: float = 0.5
    min_d_model: int = 4
    by: Literal["flops", "latency"] = "flops"
    latency_ratio: float = 0.6
    device: str | None = None          # by: latency: the device profile (edgepkd distill --device overrides it)
    patch_sizes: list[int] | None = None  # also search these patch sizes (token counts); None: start's only
    max_measured: int = 6              # by: latency: candidates timed per student, nearest in FLOPs first

    def __post_init__(self):
        check(self.count >= 1, "count", "must be at least 1")
        check(0.05 <= self.flops_ratio < 1.0, "flops_ratio", "must be in [0.05, 1)")
        check(0.05 <= self.latency_ratio < 1.0, "latency_ratio", "must be in [0.05, 1)")
        check(self.min_d_model >= 1, "min_d_model", "must be at least 1")
        check(self.max_measured >= 1, "max_measured", "must be at least 1")
        check(self.patch_sizes is None or (len(self.patch_sizes) >= 1 and all(p >= 1 for p in self.patch_sizes)),
              "patch_sizes", "must list positive patch sizes")


@dataclass
class StudentsConfig:
    """Either an explicit list of ``sizes`` (largest first) or a ``progression`` rule."""

    sizes: list[StudentSpec] | None = None
    progression: ProgressionConfig | None = None
    epochs: list[int] | None = None   # per student, largest first (overrides distill.train.epochs): small
                                      # students cost little per epoch and need more of them

    def __post_init__(self):
        check((self.sizes is None) != (self.progression is None), "sizes",
              "give exactly one of 'sizes' (a list of students) or 'progression' (a rule)")
        check(self.sizes is None or len(self.sizes) >= 1, "sizes", "must list at least one student")
        if self.epochs is not None:
            count = len(self.sizes) if self.sizes is not None else self.progression.count
            check(len(self.epochs) == count, "epochs", f"must list one value per student ({count}), "
                  f"got {len(self.epochs)}")
            check(all(e >= 1 for e in self.epochs), "epochs", "values must be at least 1")


@dataclass
class DistillConfig:
    strategies: list[Literal["chain", "ensemble"]] = field(default_factory=lambda: ["chain", "ensemble"])
    chain_source: Literal["previous", "teacher"] = "previous"  # chain: learn from the previous student or the teacher
    temperature: float = 4.0
    alpha: float = 0.3                 # weight of the label loss; 1 - alpha goes to the distillation term
    ensemble_order: Literal["ascending", "descending"] = "ascending"  # smallest first: prefixes grow in cost (anytime)
    ensemble_hard_weight: float = 0.0  # samples weigh KL(teacher || ensemble so far) ** this; 0 = uniform
    cache_teacher: bool = True         # compute teacher logits once (only when augment is 'none')
    # Issue #15's switches (benchmarks/ensemble_ablation.py measures each on MNIST):
    # 'cached': the frozen members' and the teacher's logits are a table over the clean training set, where the
    # members are nearly perfect, so the residual the next member fits does not exist on new data (prediction
    # shift). 'live': they run on every batch as the new member sees it, augmented with ensemble_augment.
    ensemble_residual: Literal["cached", "live"] = "cached"
    ensemble_augment: Literal["none", "crop", "crop_flip"] | None = None  # the members' augmentation; null: train's
    ensemble_shrinkage: float = 0.5    # prefix k = shrinkage x prefix k-1 + member k (BoostNet's 0.5); 1: plain sum
    ensemble_corrective_epochs: int = 0   # after the last member: all members fine-tuned jointly on the sum of the
    ensemble_corrective_lr: float = 3e-4  # per-prefix losses (stop-gradient on earlier prefixes); best val epoch
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=40, lr=5e-3, weight_decay=0.01))

    def __post_init__(self):
        check(len(self.strategies) >= 1, "strategies", "must name at least one of chain, ensemble")
        check(len(set(self.strategies)) == len(self.strategies), "strategies", "lists a strategy twice")
        check(self.temperature > 0, "temperature", "must be positive")
        check(0.0 <= self.alpha <= 1.0, "alpha", "must be in [0, 1]")
        check(self.ensemble_hard_weight >= 0, "ensemble_hard_weight", "must be >= 0")
        check(0.0 < self.ensemble_shrinkage <= 1.0, "ensemble_shrinkage", "must be in (0, 1]")
        check(self.ensemble_corrective_epochs >= 0, "ensemble_corrective_epochs", "must be >= 0")
        check(self.ensemble_corrective_lr > 0, "ensemble_corrective_lr", "must be positive")
        check(self.ensemble_residual != "cached" or self.ensemble_augment in (None, "none"), "ensemble_augment",
              "augmented members need live residuals (a table of clean-image logits would not match the batch): "
              "set distill.ensemble_residual to live")


def _demo_students() -> StudentsConfig:
    return StudentsConfig(sizes=[
        StudentSpec(d_model=32, depth=1, d_state=8, stem="conv", heads=4),
        StudentSpec(d_model=24, depth=1, d_state=8, heads=4),
        StudentSpec(d_model=16, depth=1, d_state=4, heads=4),
        StudentSpec(d_model=8, depth=1, d_state=4, heads=4),
    ])


@dataclass
class Recipe:
    name: str = "digits"
    seed: int = 0
    scan_backend: Literal["auto", "torch", "chunked", "cpp", "closed", "ssd", "mamba_ssm"] = "auto"  # training scan
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    baselines: list[BaselineConfig] = field(default_factory=list)
    students: StudentsConfig = field(default_factory=_demo_students)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self):
        check(bool(self.name) and "/" not in self.name and not self.name.startswith("."), "name",
              "must be a plain directory name (no '/', not starting with '.')")
        d = self.distill
        augment = next(a for a in (d.ensemble_augment, d.train.augment, self.data.augment) if a is not None)
        check(d.ensemble_residual != "live" or augment != "none", "distill.ensemble_residual",
              "'live' differs from the cache only on augmented batches: set distill.ensemble_augment to crop "
              "(or crop_flip), or use 'cached'")


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Load ``path`` (or the embedded demo when None), apply ``--set`` overrides, validate everything."""
    raw = load_yaml(path) if path is not None else to_dict(Recipe())
    source = str(path) if path is not None else "<demo recipe>"
    if overrides:
        if not isinstance(raw, dict):
            raw = {}
        raw = apply_overrides(raw, list(overrides), source)
        source += " (with --set)"
    return from_dict(Recipe, raw, source=source)


def builtin_recipes() -> dict[str, Path]:
    """The shipped recipes by name (``recipes/*.yaml`` of the checkout, or the wheel's copy)."""
    folder = builtin_dir("recipes")
    found = {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}
    if not found:
        raise ConfigError(empty_message("recipes", folder, [], "give a recipe file's path"))
    return found


def resolve_recipe(arg: str) -> Path:
    """``edgepkd distill RECIPE``: a recipe file's path, else the name of a shipped recipe ('mnist')."""
    path = Path(arg)
    if path.is_file():
        return path
    if path.exists():
        raise ConfigError(f"{arg}: not a recipe file (give a YAML file, or a shipped recipe's name)")
    shipped = builtin_recipes()
    if arg in shipped:
        return shipped[arg]
    stem = path.stem if path.suffix in (".yaml", ".yml") else arg
    if stem in shipped:
        hint = f"; the shipped recipe is named without a folder or suffix: edgepkd distill {stem}"
    else:
        hint = f"{closest(stem, shipped)} (nor a shipped recipe: {', '.join(shipped)}; edgepkd list recipes)"
    raise ConfigError(f"{arg}: no such file{hint}")
