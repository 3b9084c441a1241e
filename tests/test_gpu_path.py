"""The GPU configuration, exercised on the CPU (no machine here has a GPU).

On a machine with NVIDIA GPUs kcifar's "auto" settings (kcifar.machine) pick mixed float16 with
Keras' loss scaling, XLA on one GPU, and MirroredStrategy without XLA over several. The workers
below play such a machine (``_is_gpu_machine`` answers yes): one GPU is one CPU device, several
are two logical CPU devices. Every zoo family trains a few steps through ``kcifar.train`` under
both, and a tiny fine-tune too; then the loss is finite, the saved model loads and scores as the
run did, and the custom pieces keep their dtypes (the fused batch norm: float32 variables, float16
compute and output; the optimizer's variables, its EMA and Muon momentums float32 inside the
loss-scale optimizer; float32 logits, TTA included; the matmul kernel-gradient route in float16).
What several replicas cannot run (XLA, Keras' EMA overwrite) is refused in one line. The several-GPU
worker trains six models in one process, as a sweep does (one MirroredStrategy per process).

Logical devices must be set before TensorFlow starts, so the workers are processes: this file run
as a script. Tiny synthetic data (100 training, 20 test images); networks narrowed where their
builder has the option (airbench94, the S0-S2 baselines, ResNet by depth), VGG11 and
EfficientNet-Lite0 at full width. Float16 is emulated on a CPU and XLA compiles slowly there:
VGG11 and EfficientNet-Lite0 under XLA take minutes, so they are marked slow (``pytest -m slow``).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import own_stderr_lines, write_cifar10

REPOSITORY = Path(__file__).resolve().parent.parent
TINY = ["train.epochs=1", "train.batch_size=16", "train.precision='auto'", "train.jit='auto'", "data.val_size=0",
        "early_stopping.enabled=false"]  # 100 images: 7 steps, of 8 a replica under MirroredStrategy
AIRBENCH = ["model_args.widths=[8, 16, 16]", "whitening.images=50"]
RUNS = {  # family: (recipe file, overrides)
    "airbench_ema": ("experiments/recipes/fast94.toml", AIRBENCH),  # SGD with EMA, BN-bias scale, TTA
    "airbench_muon": ("experiments/recipes/fast94_muon.toml", AIRBENCH),
    "baselines": (None, ["model='s1_step12'", "model_args.blocks=[[8, 8], [16, 16]]", "model_args.dense_units=[16]",
                         "model_args.head_batch_norm=true"]),  # residual, dropout, BN on a Dense
    "resnet": (None, ["model='resnet20'", "model_args.depth=8", "train.conv_grad='matmul'"]),  # Adam
    "vgg": (None, ["model='vgg11'", "data.val_size=20", "early_stopping.enabled=true"]),  # with validation
    "efficientnet_lite": (None, ["model='efficientnet_lite0'"]),
}
REFUSED = {  # what several replicas refuse: (recipe file, overrides)
    "refused_jit": (None, ["train.jit='on'"]),
    "refused_ema": ("experiments/recipes/fast94.toml", AIRBENCH),  # Keras' EMA overwrite in a cond
}
STRATEGY = {"one_gpu": "default", "several_gpus": "mirrored"}  # train.strategy as "auto" picks it there
WORKERS = {  # worker: (configuration, runs), all started at once; each family trains in one of them at least
    "one_gpu": ("one_gpu", ["airbench_ema", "baselines", "finetune"]),
    "several_gpus": ("several_gpus", [*(run for run in RUNS if run not in ("airbench_ema", "efficientnet_lite")),
                                      "finetune", *REFUSED]),
}
SLOW_WORKERS = {  # the rest of the grid (pytest -m slow): XLA compiles vgg and efficientnet_lite for minutes
    "one_gpu_xla_minutes": ("one_gpu", ["vgg", "efficientnet_lite"]),
    "one_gpu_more": ("one_gpu", ["airbench_muon", "resnet"]),
    "several_gpus_lite": ("several_gpus", ["efficientnet_lite"]),
}
DEADLINE_S = 1200


# ------------------------------------------------------------ the worker (this file run as a script)


def worker(config: str, data_dir: str, folder: str, *runs: str):
    """Train ``runs`` under ``config`` on two logical CPU devices, as on a GPU machine, into ``folder``;
    one JSON line of facts each."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from kcifar import machine

    machine._is_gpu_machine = lambda: True  # kcifar's "auto" settings as on a machine with NVIDIA GPUs
    folder, data_dir = Path(folder), Path(data_dir)
    overrides = [*TINY, f"train.strategy='{STRATEGY[config]}'"]
    for name in runs:
        started = time.time()
        if name == "finetune":
            facts = finetune_facts(folder, data_dir, overrides)
        elif name in REFUSED:
            path, extra = REFUSED[name]
            facts = refusal_facts(folder, data_dir, path, [*overrides, *extra, f"name='{name}'"])
        else:
            path, extra = RUNS[name]
            facts = train_facts(folder, data_dir, path, [*overrides, *extra, f"name='{name}'"])
        print("RESULT " + json.dumps({"config": config, "run": name, "seconds": round(time.time() - started), **facts}),
              flush=True)


def train_facts(folder: Path, data_dir: Path, path, overrides) -> dict:
    import keras

    from kcifar import evaluate, models, recipe as krecipe, rundir
    from kcifar.train import train

    recipe = krecipe.resolve(REPOSITORY / path if path else None, overrides)
    result = train(recipe, folder, data_dir, verbose=0)
    model, optimizer = result.model, result.model.optimizer
    test = result.data.test
    logits = evaluate.predict_logits(model, test.x, tta=recipe["train"]["tta"])
    reloaded = evaluate.predict_logits(models.load(result.run_dir / "best.keras"), test.x, tta=recipe["train"]["tta"])
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return {"policy": keras.mixed_precision.global_policy().name, "jit": bool(model.jit_compile),
            "replicas": model.distribute_strategy.num_replicas_in_sync,
            "optimizer": type(optimizer).__name__, "inner": type(inner).__name__,
            "loss_scale": float(optimizer.dynamic_scale.numpy()) if hasattr(optimizer, "dynamic_scale") else None,
            "losses": rundir.read_history(result.run_dir)["loss"].tolist(), "test": result.metrics["test"],
            "evaluation_top1": result.evaluation["all"]["top1"], "tta": result.metrics["tta"],
            "logits_dtype": str(logits.dtype), "output_dtype": str(model.predict(test.x[:2], verbose=0).dtype),
            "reloaded_gap": float(np.abs(reloaded - logits).max()),
            "reloaded_top1": float(np.mean(reloaded.argmax(1) == test.y)),
            "routed": result.metrics["conv_grad_matmul_layers"],
            **batch_norm_dtypes(model), **optimizer_dtypes(inner)}


def batch_norm_dtypes(model) -> dict:
    """The dtypes of the fused batch norm layers' variables and computation, and of one's output (training
    fuses every BatchNormalization: ``parts.use_fused_batch_norm``)."""
    import keras

    from kcifar.models.parts import fused_batch_norm_call

    layers = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)
              and getattr(layer.call, "__func__", None) is fused_batch_norm_call]
    probe = keras.Model(model.inputs, layers[0].output)
    output = probe(np.zeros((2, *model.input_shape[1:]), "float32"), training=True)
    return {"bn_variables": sorted({str(v.dtype) for layer in layers for v in layer.weights}),
            "bn_compute": sorted({layer.compute_dtype for layer in layers}),
            "bn_output": keras.backend.standardize_dtype(output.dtype)}


def optimizer_dtypes(inner) -> dict:
    """The dtypes of the optimizer's own variables, its weight averages (EMA) and Muon momentums."""
    averages = getattr(inner, "_model_variables_moving_average", None) if inner.use_ema else None
    muon = [m for m in getattr(inner, "muon_momentums", []) if m is not None]
    return {"optimizer_variables": sorted({str(v.dtype) for v in inner.variables}),
            "ema": sorted({str(v.dtype) for v in averages}) if averages else None,
            "muon": sorted({str(v.dtype) for v in muon}) if muon else None}


def finetune_facts(folder: Path, data_dir: Path, overrides) -> dict:
    """A fine-tune (cached features, one frozen and one unfrozen stage) of a backbone trained on a GPU."""
    import keras
    from conftest import tiny_backbone

    from kcifar import finetune, models, rundir

    keras.mixed_precision.set_global_policy("mixed_float16")  # the backbone's layers are saved so
    backbone = tiny_backbone(folder.parent / f"{folder.name}_backbone")
    recipe = finetune.resolve_recipe(None, [*overrides, "name='finetune'", "data.val_size=20",
                                            "early_stopping.enabled=true", {"finetune": {
                                                "backbone": str(backbone), "unfreeze_blocks": 1,
                                                "stage1_epochs": 1, "stage2_epochs": 1}}])
    run_dir, metrics, _ = finetune.finetune(recipe, folder, data_dir, verbose=0)
    model = models.load(run_dir / "best.keras")
    return {"policy": metrics["precision"], "stage_epochs": metrics["stage_epochs"], "test": metrics["test"],
            "losses": rundir.read_history(run_dir)["loss"].tolist(),
            "compute": sorted({layer.compute_dtype for layer in model._flatten_layers() if layer.weights}),
            "output_dtype": str(model.predict(np.zeros((2, 32, 32, 3), "float32"), verbose=0).dtype)}


def refusal_facts(folder: Path, data_dir: Path, path, overrides) -> dict:
    """A recipe that two replicas refuse: the error, and whether a run directory was made."""
    from kcifar import recipe as krecipe
    from kcifar.errors import KcifarError
    from kcifar.train import train

    try:
        recipe = krecipe.resolve(REPOSITORY / path if path else None, overrides)
        train(recipe, folder, data_dir, verbose=0)
        error = None
    except KcifarError as refused:
        error = str(refused)
    return {"error": error, "run_dir": (folder / recipe["name"]).exists()}


# ------------------------------------------------------------ the tests


def run_workers(tmp: Path, workers: dict) -> dict:
    """{(configuration, run): facts} from ``workers``, started at once (each XLA compilation takes a core)."""
    write_cifar10(tmp / "data")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_HOME": str(tmp / "keras_home")}
    started = time.time()
    workers = [subprocess.Popen([sys.executable, __file__, config, str(tmp / "data"), str(tmp / name), *runs], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, (config, runs) in workers.items()]
    results = {}
    try:
        for process in workers:
            out, err = process.communicate(timeout=max(1, started + DEADLINE_S - time.time()))
            assert process.returncode == 0, "\n".join(own_stderr_lines(err)[-30:])
            for line in out.splitlines():
                if line.startswith("RESULT "):
                    record = json.loads(line.removeprefix("RESULT "))
                    results[record["config"], record["run"]] = record
    finally:
        for process in workers:
            process.kill()
    print(f"gpu path workers: {time.time() - started:.0f} s;",
          ", ".join(f"{config} {run} {got['seconds']} s" for (config, run), got in results.items()))
    return results


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    return run_workers(tmp_path_factory.mktemp("gpu_path"), WORKERS)


@pytest.fixture(scope="module")
def slow_facts(tmp_path_factory):
    return run_workers(tmp_path_factory.mktemp("gpu_path_slow"), SLOW_WORKERS)


TRAINED = [(config, run) for config, runs in WORKERS.values() for run in runs if run in RUNS]
SLOW = [(config, run) for config, runs in SLOW_WORKERS.values() for run in runs]
CASES = [*TRAINED, *(pytest.param(*pair, marks=pytest.mark.slow) for pair in SLOW)]


def facts_of(request, config, run) -> dict:
    """The facts of one run, from the slow workers for the slow cases."""
    return request.getfixturevalue("slow_facts" if (config, run) in SLOW else "facts")[config, run]


@pytest.mark.parametrize("config, run", CASES)
def test_every_family_trains_with_the_gpu_defaults_and_its_saved_model_scores(request, config, run):
    got = facts_of(request, config, run)
    assert got["policy"] == "mixed_float16" and got["optimizer"] == "LossScaleOptimizer"
    assert (got["jit"], got["replicas"]) == ((True, 1) if config == "one_gpu" else (False, 2))
    assert np.all(np.isfinite(got["losses"])) and len(got["losses"]) == 1
    assert 0 < got["loss_scale"] < np.inf  # the dynamic loss scale, halved at each overflow, still a number
    assert got["test"]["n"] == 20 and np.isfinite(got["test"]["loss"])
    assert got["reloaded_gap"] < 0.05  # the saved model's logits (with the run's TTA): float16 rounding apart
    assert got["reloaded_top1"] == pytest.approx(got["evaluation_top1"], abs=0.05 + 1e-9)  # one image may flip


@pytest.mark.parametrize("config, run", CASES)
def test_the_custom_pieces_keep_their_dtypes(request, config, run):
    got = facts_of(request, config, run)
    assert got["logits_dtype"] == got["output_dtype"] == "float32"
    assert got["optimizer_variables"] == ["float32", "int64"]  # int64: the step counter
    assert got["bn_variables"] == ["float32"] and got["bn_compute"] == ["float16"]
    assert got["bn_output"] == "float16"  # TensorFlow's fused kernel ran in float16
    expected_inner = {"airbench_ema": "SGDL2", "airbench_muon": "SGDMuon"}.get(run, "AdamL2")
    assert got["inner"] == expected_inner
    assert (got["ema"] == ["float32"]) is (run == "airbench_ema")
    assert (got["muon"] == ["float32"]) is (run == "airbench_muon")
    assert (got["routed"] > 0) is (run == "resnet")  # "auto" routes none on a GPU; the recipe asks "matmul"
    assert got["tta"] == ("flip_translate" if run.startswith("airbench") else "none")


@pytest.mark.parametrize("config", STRATEGY)
def test_a_finetune_runs_with_the_gpu_defaults(facts, config):
    got = facts[config, "finetune"]
    assert got["policy"] == "mixed_float16" and got["stage_epochs"] == [1, 1]
    assert np.all(np.isfinite(got["losses"])) and got["test"]["n"] == 20
    assert got["compute"] == ["float16", "float32"]  # float32: the new head's logits
    assert got["output_dtype"] == "float32"


@pytest.mark.parametrize("run, message", [
    ("refused_jit", "train.jit='on' cannot train over the 2 replicas of this strategy"),
    ("refused_ema", "optimizer.ema_momentum cannot train over the 2 replicas of this strategy"),
])
def test_what_several_replicas_cannot_run_is_refused_in_one_line_before_the_run_directory(facts, run, message):
    got = facts["several_gpus", run]
    assert got["error"].startswith(message) and "\n" not in got["error"] and not got["run_dir"]


def test_the_matmul_kernel_gradient_keeps_float16_under_xla():
    """The route's kernel gradient, compiled by XLA in float16, is float16 and TensorFlow's own to
    float16's resolution (the training above only shows that it runs)."""
    import tensorflow as tf

    from kcifar.models import parts

    rng = np.random.default_rng(0)
    x, kernel, weights = (tf.constant(rng.normal(size=shape), tf.float16)
                          for shape in ((4, 8, 8, 16), (3, 3, 16, 8), (4, 8, 8, 8)))

    def kernel_gradient(convolution):
        @tf.function(jit_compile=True)
        def gradient():
            with tf.GradientTape() as tape:
                tape.watch(kernel)
                loss = tf.reduce_sum(convolution(x, kernel) * weights)
            return tape.gradient(loss, kernel)

        return gradient()

    routed = kernel_gradient(parts.conv3x3_matmul_kernel_grad)
    native = np.asarray(kernel_gradient(lambda x, k: tf.nn.conv2d(x, k, 1, "SAME")), np.float64)
    assert routed.dtype == tf.float16
    assert np.abs(np.asarray(routed, np.float64) - native).max() <= 2 ** -8 * np.abs(native).max()


# ------------------------------------------------------------ the check for a GPU machine


def test_the_gpu_check_fails_in_one_line_without_a_gpu(tmp_path):
    result = subprocess.run([sys.executable, str(REPOSITORY / "experiments" / "gpu_check.py"),
                             "--out", str(tmp_path / "gpu.md")], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=300)
    lines = own_stderr_lines(result.stderr)
    assert result.returncode == 2 and result.stdout == "" and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: no GPU: TensorFlow ") and not (tmp_path / "gpu.md").exists()


if __name__ == "__main__":
    worker(*sys.argv[1:])
