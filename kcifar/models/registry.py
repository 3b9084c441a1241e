"""The one place where model names meet their builders.

A builder is ``builder(x, num_classes, **options) -> logits``: it gets the
already normalised input tensor and returns the logits tensor; ``build``
adds the input and ``normalize`` layers and wraps the graph in a functional
``keras.Model``. Register a builder with the decorator::

    @register("my_net", source="paper or S0..S4", description="one line")
    def my_net(x, num_classes, width=64):
        ...

or, for a table entry, ``register(name, source, description)(functools.partial(builder, **preset))``.
The builder's keyword parameters (after ``x`` and ``num_classes``) are the
overrides ``build`` accepts.
"""

import dataclasses
import inspect
import math
import numbers
from pathlib import Path
from typing import Callable

import keras

from kcifar.errors import KcifarError
from kcifar.models import parts


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """Weights a model can be built with (``build(name, weights=...)``): ``load(model, weights)``
    loads "imagenet" or a file, and ``normalization`` is the input scaling they were
    trained with (``build``'s ``normalization``, ``mean``, ``std``)."""

    load: Callable
    normalization: dict


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """A registered model: its name, where it comes from, one line, its builder and,
    if any, its pretrained weights."""

    name: str
    source: str
    description: str
    builder: Callable
    pretrained: Pretrained | None = None

    def options(self) -> dict:
        """The overrides this model accepts, with their defaults."""
        parameters = list(inspect.signature(self.builder).parameters.values())[2:]
        return {p.name: p.default for p in parameters}


_REGISTRY: dict[str, ModelEntry] = {}


def register(name: str, source: str, description: str):
    """Decorator registering ``builder(x, num_classes, **options)`` under ``name``."""

    def decorator(builder):
        if name in _REGISTRY:
            raise KcifarError(f"model {name!r} is registered twice; pick another name")
        _REGISTRY[name] = ModelEntry(name, source, description, builder)
        return builder

    return decorator


def add_pretrained(name: str, pretrained: Pretrained):
    """Give the registered model ``name`` its pretrained weights."""
    _REGISTRY[name] = dataclasses.replace(entry(name), pretrained=pretrained)


def names() -> list[str]:
    """Every registered model name, sorted."""
    return sorted(_REGISTRY)


def entry(name: str) -> ModelEntry:
    """The registry entry of ``name`` (source, description, builder, options())."""
    if name not in _REGISTRY:
        raise KcifarError(f"unknown model {name!r}; valid models: {', '.join(names())}")
    return _REGISTRY[name]


def build(name, num_classes=10, input_shape=(32, 32, 3), normalization="meanstd", mean=None, std=None,
          weights=None, init="keras", **overrides) -> keras.Model:
    """Build model ``name``: raw 0..255 images in, ``num_classes`` logits out.

    ``normalization``: ``meanstd`` (``mean``/``std`` on the 0..255 scale,
    default CIFAR-10 train statistics), ``minus1_1``, ``unit`` or ``none``.
    ``weights``: None (random), "imagenet" or a weights file, for models that have
    pretrained weights; they bring their own input scaling, and a head of another
    size than theirs starts random. ``init``: the random start, ``keras`` (the builders'
    initialisers) or ``torch`` (``parts.torch_default_init``: PyTorch's, for a PyTorch
    write-up). ``overrides`` are the builder's own options (see ``entry(name).options()``).
    """
    model_entry = entry(name)
    if weights is not None:
        if model_entry.pretrained is None:
            with_weights = [n for n in names() if _REGISTRY[n].pretrained]
            raise KcifarError(f"model {name!r} has no pretrained weights; leave weights unset or use one of: "
                              f"{', '.join(with_weights)}")
        normalization, mean, std = (model_entry.pretrained.normalization[k] for k in ("normalization", "mean", "std"))
    unknown = sorted(set(overrides) - set(model_entry.options()))
    if unknown:
        valid = ", ".join(model_entry.options()) or "none"
        raise KcifarError(f"model {name!r} has no option {', '.join(unknown)}; valid options: {valid}")
    if not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise KcifarError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    inputs = keras.Input(tuple(input_shape), name="image")
    x = parts.normalize(inputs, normalization, mean, std)
    outputs = model_entry.builder(x, int(num_classes), **overrides)
    model = keras.Model(inputs, outputs, name=name)
    parts.check_choice("init", init, parts.INITS)
    if init == "torch":
        parts.torch_default_init(model)
    if weights is not None:
        model_entry.pretrained.load(model, weights)
    return model


KERNELS = ("kernel", "depthwise_kernel", "pointwise_kernel")
FLOPS_COUNTED = ("forward FLOPs per image = 2 x multiply-accumulates of every Conv/Dense kernel "
                 "(incl. depthwise/pointwise); normalisation, BN, activations, pooling and adds not counted")


def trainable_params(model) -> int:
    """The number of trainable scalars (BN moving statistics excluded)."""
    return sum(math.prod(weight.shape) for weight in model.trainable_weights)


def forward_flops(model) -> int:
    """Forward FLOPs for one image, counted as ``FLOPS_COUNTED`` says: each kernel
    is applied once per output position (1 for Dense on a vector)."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += forward_flops(layer)
            continue
        kernels = [getattr(layer, k) for k in KERNELS if hasattr(layer, k)]
        if kernels:
            positions = math.prod(layer.output.shape[1:-1])
            total += sum(2 * math.prod(kernel.shape) * positions for kernel in kernels)
    return total


def table(num_classes=10) -> list[dict]:
    """One row per registered model: name, source, trainable params, forward MFLOPs, description."""
    rows = []
    for name in names():
        model, model_entry = build(name, num_classes), entry(name)
        rows.append({"name": name, "source": model_entry.source, "params": trainable_params(model),
                     "mflops": forward_flops(model) / 1e6, "description": model_entry.description})
        keras.backend.clear_session()
    return rows


def load(path):
    """A model saved by Keras 3 (a ``.keras`` file, ``best.keras`` of a run), without its optimizer;
    kcifar's own layers are known, since importing ``kcifar.models`` registers them. A missing,
    foreign or damaged file is one line saying what to pass instead."""
    path = Path(path)
    if not path.is_file():
        raise KcifarError(f"{path} does not exist; pass a run directory (runs/NAME) or a .keras model file")
    if path.suffix != ".keras":
        raise KcifarError(f"{path} is not a .keras file; pass a model saved by Keras 3 (model.save('x.keras'))")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as error:  # Keras raises many types for a damaged or foreign file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise KcifarError(f"{path} is not a loadable Keras model ({reason[:200]}); save it again") from None
