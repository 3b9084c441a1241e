"""Recipes: one TOML file says everything about a training run.

``DEFAULTS`` is the schema: every key a recipe may set, its type and its
default. A recipe file overrides the defaults, and ``key=value`` overrides
(``--set optimizer.learning_rate=0.01``) override the file. The resolved recipe
is written into the run directory, so a run can always be repeated.

The defaults are the S3 improvement (the tutorial network with Adam + amsgrad,
61 % documented): small enough to finish on a laptop CPU in minutes.
"""

import copy
import json
import math
import operator
import re
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from kcifar.errors import KcifarError

DEFAULTS = {
    "name": "",  # run directory name; default: the recipe file's name, else the model's
    "model": "s3_tutorial",
    "dataset": "cifar10",
    "seed": 0,
    "model_args": {},  # free-form keyword overrides for kcifar.models.build
    "data": {"val_size": 5000, "label_mode": "fine", "normalization": "minus1_1",
             "train_subset": 0, "offline_aug": ""},
    "train": {"epochs": 10, "batch_size": 32, "strategy": "auto", "precision": "auto",
              "jit": "auto", "deterministic": False, "tensorboard": False,
              "conv_grad": "auto",  # 3x3 conv kernel gradients: TF's ("native"), as matmuls, or by CPU
              "tta": "none"},  # test-time augmentation of the one test measurement (kcifar.evaluate)
    "optimizer": {"name": "adam", "learning_rate": 0.001, "momentum": 0.9, "nesterov": False,
                  "amsgrad": True, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7,
                  "rho": 0.9,  # rmsprop's average of squared gradients (Keras' 0.9; PyTorch's alpha is 0.99)
                  "weight_decay": 0.0, "weight_decay_mode": "l2",
                  "bn_bias_lr_scale": 1.0,  # BN biases learn this many times faster (sgd; a gradient scale)
                  "fused": True,  # adam, adamw: TensorFlow's fused update kernels (not under XLA)
                  # Keras' weight EMA (0 = off): every ema_overwrite_frequency steps the weights become
                  # their average (must divide the steps per epoch); ema_ramp_power > 0 ramps the momentum up
                  "ema_momentum": 0.0, "ema_overwrite_frequency": 0, "ema_ramp_power": 0.0,
                  # sgd_muon: the convolution kernels' peak rate (it follows the schedule) and momentum
                  "muon_learning_rate": 0.24, "muon_momentum": 0.6},
    "schedule": {"name": "constant", "step_size": 30, "gamma": 0.1, "milestones": [],
                 "t_max": 0, "eta_min": 0.0, "warmup_epochs": 0, "factor": 0.1,
                 "patience": 5, "min_lr": 0.0, "pct_start": 0.3, "div_factor": 25.0,
                 "final_div_factor": 10000.0,
                 "per_epoch": False},  # the rate changes once per epoch (a PyTorch scheduler), not every step
    "loss": {"label_smoothing": 0.0},
    "augment": {"preset": "none", "engine": "tf", "cutout": 0, "mixup": 0.0, "cutmix": 0.0,
                "alternate_flip": False},
    # models with a PatchWhitening layer (airbench94): its kernel is set from the 2x2 patches of the
    # first `images` training images; its bias trains for `bias_epochs` epochs, then is frozen (0 = never)
    "whitening": {"images": 5000, "epsilon": 5e-4, "bias_epochs": 0},
    "early_stopping": {"enabled": True, "monitor": "val_accuracy", "patience": 10},
    # the figure the documents report, if any, and its data set ("" = the recipe's own)
    "documented": {"accuracy": 0.0, "source": "", "dataset": ""},
}

CHOICES = {
    "dataset": ["cifar10", "cifar100"],
    "data.label_mode": ["fine", "coarse"],
    "data.normalization": ["meanstd", "minus1_1", "unit", "none"],
    "train.strategy": ["auto", "default", "mirrored", "multiworker"],
    "train.precision": ["auto", "float32", "mixed_float16", "mixed_bfloat16"],
    "train.jit": ["auto", "on", "off"],
    "train.conv_grad": ["auto", "native", "matmul"],
    "train.tta": ["none", "flip", "flip_translate"],
    "optimizer.name": ["sgd", "sgd_muon", "adam", "adamw", "rmsprop"],
    "optimizer.weight_decay_mode": ["l2", "decoupled"],
    "schedule.name": ["constant", "step", "multistep", "exponential", "cosine", "plateau",
                      "warmup_cosine", "onecycle", "triangular"],
    "augment.engine": ["tf", "idg"],
    "early_stopping.monitor": ["val_accuracy", "val_loss"],
    "documented.dataset": ["", "cifar10", "cifar100"],
}
FREE_FORM = {"model_args"}

# Tables of one command's recipes only, in a recipe when its command resolves it with
# ``resolve(..., tables=(name,))``: kcifar.finetune's [finetune].
COMMAND_TABLES = {
    "finetune": {
        "backbone": "efficientnet_lite0",
        "weights": "",  # "" = the backbone's default ImageNet weights; else a local file
        "resolution": 224,  # the image is upscaled to this inside the model
        "head_dropout": 0.2,
        "cache_features": True,  # fast path: the frozen part runs once per image
        "flip": True,  # fast path: also cache mirrored training images (the only augmentation there)
        "unfreeze_blocks": 0,  # stage 2 trains this many top blocks (0 = no stage 2)
        "stage1_epochs": 30, "stage1_lr": 1e-3,
        "stage2_epochs": 10, "stage2_lr": 1e-4,
    },
}

# Numeric keys' ranges: (comparison, bound), checked on the resolved recipe (a later layer may
# mend an earlier one's value).
BOUNDS = {
    "finetune.resolution": (">=", 32), "finetune.stage1_epochs": (">=", 1), "finetune.unfreeze_blocks": (">=", 0),
    "finetune.stage1_lr": (">", 0), "finetune.stage2_lr": (">", 0),
}
COMPARISONS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def check(recipe, defaults=DEFAULTS, prefix=""):
    """Raise a KcifarError for a key, type or choice of ``recipe`` that ``defaults`` does not allow."""
    for key, value in recipe.items():
        path = prefix + key
        if key not in defaults:
            raise KcifarError(f"unknown recipe key '{path}'; valid keys here: {', '.join(defaults)}")
        expected = defaults[key]
        if isinstance(expected, dict):
            if not isinstance(value, dict):
                raise KcifarError(f"recipe key '{path}' must be a table, got {value!r}")
            if path not in FREE_FORM:
                check(value, expected, path + ".")
            continue
        if not _same_type(value, expected):
            raise KcifarError(f"recipe key '{path}' must be {type(expected).__name__}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise KcifarError(f"recipe key '{path}' must be a finite number, got {value!r}")
        if path in CHOICES and value not in CHOICES[path]:
            raise KcifarError(f"recipe key '{path}' = {value!r}; choose one of: {', '.join(CHOICES[path])}")


def _same_type(value, expected):
    if isinstance(expected, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(expected, bool)
    if isinstance(expected, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(expected))


def _merge(base, update):
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _parse_value(text):
    """A TOML value (``0.1``, ``true``, ``[30, 60]``, ``"x"``), or the bare text as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_override(assignment: str) -> dict:
    """``"optimizer.learning_rate=0.01"`` -> ``{"optimizer": {"learning_rate": 0.01}}``."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise KcifarError(f"override '{assignment}' is not key=value, e.g. optimizer.learning_rate=0.01")
    return nested(key.strip(), _parse_value(text.strip()))


def nested(key: str, value) -> dict:
    """``("optimizer.learning_rate", 0.01)`` -> ``{"optimizer": {"learning_rate": 0.01}}``."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def read_toml(path) -> dict:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KcifarError(f"recipe file {path} not found; see experiments/recipes/ for examples") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise KcifarError(f"recipe file {path} is not valid TOML: {error}") from None


def resolve(path=None, overrides=(), tables=()) -> dict:
    """Defaults, then the recipe file, then overrides (``"key=value"`` strings or nested dicts); validated.
    ``tables``: the names of the ``COMMAND_TABLES`` the caller's command adds to the schema."""
    defaults = {**DEFAULTS, **{name: COMMAND_TABLES[name] for name in tables}}
    recipe = copy.deepcopy(defaults)
    layers = ([read_toml(path)] if path else []) + [parse_override(o) if isinstance(o, str) else o for o in overrides]
    for layer in layers:
        check(layer, defaults)
        _merge(recipe, layer)
    if not recipe["name"]:
        recipe["name"] = Path(path).stem if path else recipe["model"]
    _check_consistency(recipe)
    return recipe


def default_of(key: str):
    """The default of a dotted recipe key (``"train.epochs"`` -> 10)."""
    value = DEFAULTS
    for part in key.split("."):
        value = value[part]
    return value


def with_defaults(saved: dict) -> dict:
    """A recipe as a run directory saved it, with every key added to ``DEFAULTS`` since
    then at its default: an interrupted run of older code resumes under newer code."""
    return _merge(copy.deepcopy(DEFAULTS), saved)


def check_bounds(recipe):
    """Raise a KcifarError for a value of ``recipe`` outside its ``BOUNDS``."""
    flat = flatten(recipe)
    for path, (comparison, bound) in BOUNDS.items():
        if path in flat and not COMPARISONS[comparison](flat[path], bound):
            raise KcifarError(f"recipe key '{path}' must be {comparison} {bound}, got {flat[path]!r}")


def _check_consistency(recipe):
    check_bounds(recipe)
    for key in ("epochs", "batch_size"):
        if recipe["train"][key] < 1:
            raise KcifarError(f"train.{key} must be at least 1, got {recipe['train'][key]}")
    if recipe["optimizer"]["learning_rate"] <= 0:
        raise KcifarError("optimizer.learning_rate must be positive")
    if recipe["early_stopping"]["enabled"] and recipe["data"]["val_size"] == 0:
        raise KcifarError("early stopping needs a validation split: set data.val_size > 0 "
                          "or early_stopping.enabled=false")
    _check_extras(recipe)
    if "/" in recipe["name"] or recipe["name"] in (".", ".."):
        raise KcifarError(f"run name '{recipe['name']}' must be a plain folder name")


def _check_extras(recipe):
    opt, whitening = recipe["optimizer"], recipe["whitening"]
    if not 0 <= opt["ema_momentum"] < 1:
        raise KcifarError(f"optimizer.ema_momentum must be in [0, 1) (0 = no EMA), got {opt['ema_momentum']}")
    if opt["ema_momentum"] and opt["ema_overwrite_frequency"] < 1:
        raise KcifarError("optimizer.ema_momentum needs optimizer.ema_overwrite_frequency >= 1 (steps between "
                          "setting the weights to their average), so that each epoch ends on averaged weights")
    if opt["ema_ramp_power"] < 0 or opt["ema_overwrite_frequency"] < 0:
        raise KcifarError("optimizer.ema_ramp_power and optimizer.ema_overwrite_frequency must be >= 0")
    if opt["bn_bias_lr_scale"] <= 0:
        raise KcifarError(f"optimizer.bn_bias_lr_scale must be positive, got {opt['bn_bias_lr_scale']}")
    if opt["bn_bias_lr_scale"] != 1 and opt["name"] not in ("sgd", "sgd_muon"):
        raise KcifarError(f"optimizer.bn_bias_lr_scale scales gradients, which {opt['name']} normalises away; "
                          "use optimizer.name='sgd' or leave the scale at 1")
    if opt["muon_learning_rate"] <= 0 or not 0 <= opt["muon_momentum"] < 1:
        raise KcifarError("optimizer.muon_learning_rate must be > 0 and optimizer.muon_momentum in [0, 1), got "
                          f"{opt['muon_learning_rate']} and {opt['muon_momentum']}")
    if whitening["images"] < 0 or whitening["bias_epochs"] < 0 or whitening["epsilon"] <= 0:
        raise KcifarError("whitening.images and whitening.bias_epochs must be >= 0 and whitening.epsilon > 0")


# ------------------------------------------------------------ names from settings


def flatten(table: dict, prefix="") -> dict:
    """``{"train": {"epochs": 3}}`` and ``{"train.epochs": 3}`` both -> ``{"train.epochs": 3}``."""
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def format_value(value) -> str:
    """A value as a file-name part: ``[16, 32]`` -> ``16x32``, ``0.0003`` -> ``0.0003``, ``True`` -> ``true``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "x".join(format_value(v) for v in value)
    return str(value)


def settings_name(settings: dict, keys: list) -> str:
    """A readable, file-system-safe name from the values of ``keys`` in ``settings`` (dotted key -> value):
    ``blocks-16x32_batch_size-64`` (a study's cell, a run named by its command-line settings)."""
    short = [key.rsplit(".", 1)[-1] for key in keys]
    labels = [s if short.count(s) == 1 else key for s, key in zip(short, keys)]
    parts = [f"{label}-{format_value(settings[key])}" for label, key in zip(labels, keys) if key in settings]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts)) or "base"


# ------------------------------------------------------------ writing TOML


def _toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(recipe: dict) -> str:
    """The recipe as TOML text (scalars first, then one table per section)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in recipe.items() if not isinstance(v, dict)]
    for section, table in recipe.items():
        if isinstance(table, dict):
            lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"
