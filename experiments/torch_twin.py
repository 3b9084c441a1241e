"""A PyTorch twin of a kcifar Keras model, for speed comparisons only (experiments/bench_speed.py).

`TorchTwin(keras_model)` walks the Keras functional graph and builds the same
layers with the same shapes in PyTorch (NCHW modules, run channels_last), so
a plain PyTorch training loop can be timed against `model.fit` on the same
architecture. Weights are not copied (speed does not depend on them); the
input scaling is one multiply-add whatever normalisation the Keras model has.
A layer kind without a twin raises NotImplementedError.
"""
import torch
from torch import nn
import torch.nn.functional as F

ACTIVATIONS = {"linear": None, "relu": F.relu, "gelu": F.gelu, "softmax": None}


class TorchTwin(nn.Module):
    """Runs a Keras functional model's graph with torch layers of the same sizes (weights not copied)."""

    def __init__(self, keras_model):
        super().__init__()
        self.plan, self.mods = [], nn.ModuleDict()
        self.input_id = id(keras_model.inputs[0])
        for layer in keras_model.layers:
            node = layer._inbound_nodes[0]
            ins = [id(t) for t in node.input_tensors]
            out = id(node.output_tensors[0])
            kind = type(layer).__name__
            if kind == "InputLayer":
                continue
            fn = self._translate(layer, kind, node.input_tensors[0].shape)
            self.plan.append((layer.name, fn, ins, out))
        self.output_id = id(keras_model.outputs[0])

    def _translate(self, layer, kind, in_shape):
        c = layer.get_config()
        if kind in ("Normalization", "Identity") or (kind == "Rescaling" and layer.name == "normalize"):
            return lambda x: x * (1 / 127.5) - 1.0
        if kind == "Rescaling":
            return lambda x: x * c["scale"] + c["offset"]
        if kind == "PatchWhitening":  # airbench94's 2x2 conv: kernel frozen, bias trained
            self.mods[layer.name] = nn.Conv2d(in_shape[-1], c["filters"], 2, bias=True)
            self.mods[layer.name].weight.requires_grad_(False)
            return self.mods[layer.name]
        if kind == "Conv2D":
            k, s = c["kernel_size"][0], c["strides"][0]
            pad = k // 2 if c["padding"] == "same" else 0
            self.mods[layer.name] = nn.Conv2d(in_shape[-1], c["filters"], k, s, pad, bias=c["use_bias"])
            return self._with_activation(self.mods[layer.name], c["activation"])
        if kind == "Dense":
            self.mods[layer.name] = nn.Linear(in_shape[-1], c["units"], bias=c["use_bias"])
            return self._with_activation(self.mods[layer.name], c["activation"])
        if kind in ("BatchNormalization", "FusedBatchNorm"):
            cls = nn.BatchNorm2d if len(in_shape) == 4 else nn.BatchNorm1d
            bn = cls(in_shape[-1], eps=c["epsilon"], momentum=1 - c["momentum"], affine=c["scale"] or c["center"])
            if bn.affine and not c["scale"]:  # airbench94's BN: a bias, no scale
                bn.weight.requires_grad_(False)
            if bn.affine and not c["center"]:
                bn.bias.requires_grad_(False)
            self.mods[layer.name] = bn
            return bn
        if kind == "Activation":
            if isinstance(c["activation"], dict) and c["activation"].get("config") == "kcifar>gelu_tanh":
                return lambda x: F.gelu(x, approximate="tanh")
            return ACTIVATIONS[c["activation"]]
        if kind == "MaxPooling2D":
            k, s = c["pool_size"][0], c["strides"][0]
            return nn.MaxPool2d(k, s, padding=k // 2 if c["padding"] == "same" else 0)
        if kind == "Dropout":
            self.mods[layer.name] = nn.Dropout(c["rate"])
            return self.mods[layer.name]
        if kind == "Flatten":
            return lambda x: torch.flatten(x, 1)
        if kind == "GlobalAveragePooling2D":
            return lambda x: x.mean((2, 3))
        if kind == "Add":
            return lambda *xs: sum(xs)
        raise NotImplementedError(f"no PyTorch twin for Keras layer {kind} ({layer.name})")

    @staticmethod
    def _with_activation(module, activation):
        act = ACTIVATIONS[activation]
        return module if act is None else (lambda x: act(module(x)))

    def forward(self, x):
        values = {self.input_id: x}
        for _, fn, ins, out in self.plan:
            values[out] = fn(*[values[i] for i in ins])
        return values[self.output_id]
