"""Saved zoo models load in plain Keras, in a process that never imports kcifar: their files hold
Keras' own layers (the fused batch norm is a training detail, not part of the model). The models
with genuinely custom layers (airbench94's whitening, S2's notebook GAP head) say, when loaded
without kcifar, whose they are, and load after ``import kcifar.models``."""

import json
import subprocess
import sys
import textwrap

import keras
import numpy as np

from kcifar import models
from kcifar.models import parts

# PatchWhitening, PartialDirac, gelu_tanh; SurplusClassLogits (S2's notebook: 256 channels as logits)
NEEDS_KCIFAR = {"airbench94", "s2_notebook_gap", "s2_notebook_dropout"}

LOADER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import keras
    results = {}
    for path in sys.argv[2:]:
        if sys.argv[1] == "with-kcifar":
            import kcifar.models  # noqa: F401  (registers kcifar's layers)
        try:
            model = keras.models.load_model(path, compile=False)
            logits = model.predict(np.zeros((2, 32, 32, 3), "float32") + 128, verbose=0)
            results[path] = ["ok", list(logits.shape)]
        except Exception as error:
            results[path] = ["error", str(error)]
    results["kcifar imported"] = any(name.split(".")[0] == "kcifar" for name in sys.modules)
    print(json.dumps(results))
""")


def load_elsewhere(paths, mode="plain") -> dict:
    result = subprocess.run([sys.executable, "-c", LOADER, mode, *map(str, paths)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def serialized_kinds(model) -> set:
    """Every (module, class, registered name) that ``model``'s saved config asks Keras to deserialize:
    layers, activations, initializers, regularizers, nested models."""
    kinds = set()

    def walk(node):
        if isinstance(node, dict):
            if "class_name" in node:
                kinds.add((node.get("module"), node["class_name"], node.get("registered_name")))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(keras.saving.serialize_keras_object(model))
    return kinds


def covering(kinds: dict) -> list:
    """Few models (greedily; the smallest first among equals) whose kinds cover every model's.
    ``kinds``: {model: (its kinds, its parameter count)}."""
    chosen, covered, wanted = [], set(), set().union(*(kind for kind, _ in kinds.values()))
    while covered != wanted:
        best = max(sorted(kinds), key=lambda name: (len(kinds[name][0] - covered), -kinds[name][1]))
        chosen.append(best)
        covered |= kinds[best][0]
    return chosen


def test_every_zoo_model_saved_loads_in_plain_keras(tmp_path):
    """Every kind of object any zoo model's file holds is loaded from a saved file: the models that
    cover every model's kinds are saved and loaded (loading all 29 takes minutes, and adds no kind)."""
    kinds, built = {}, {}
    for name in models.names():
        keras.utils.set_random_seed(0)
        built[name] = models.build(name)
        parts.use_fused_batch_norm(built[name])  # as training leaves it
        kinds[name] = (serialized_kinds(built[name]), built[name].count_params())
    plain_kinds = {name: kind for name, kind in kinds.items() if name not in NEEDS_KCIFAR}
    paths = {}
    for name in [*covering(plain_kinds), *NEEDS_KCIFAR]:
        paths[name] = tmp_path / f"{name}.keras"
        built[name].save(paths[name])
    keras.backend.clear_session()
    plain = load_elsewhere([paths[n] for n in sorted(paths) if n not in NEEDS_KCIFAR])
    assert plain.pop("kcifar imported") is False
    assert len(plain) == len(paths) - len(NEEDS_KCIFAR) >= 2
    assert {path: outcome for path, outcome in plain.items() if outcome != ["ok", [2, 10]]} == {}
    custom = load_elsewhere([paths[n] for n in sorted(NEEDS_KCIFAR)])
    assert all(outcome[0] == "error" and "kcifar>" in outcome[1] for path, outcome in custom.items()
               if path != "kcifar imported"), custom
    with_kcifar = load_elsewhere([paths[n] for n in sorted(NEEDS_KCIFAR)], "with-kcifar")
    assert all(outcome == ["ok", [2, 10]] for path, outcome in with_kcifar.items() if path != "kcifar imported")


def test_a_file_saved_with_the_old_fused_batch_norm_class_still_loads(tmp_path):
    """Runs saved before batch norm moved out of the model hold kcifar's FusedBatchNorm class."""
    inputs = keras.Input((4, 4, 3))
    model = keras.Model(inputs, parts.FusedBatchNorm(momentum=0.9, epsilon=1e-5, name="bn")(inputs))
    model.save(tmp_path / "old.keras")
    loaded = models.load(tmp_path / "old.keras")
    assert type(loaded.get_layer("bn")) is parts.FusedBatchNorm
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype("float32")
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)
