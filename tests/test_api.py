"""kcifar.api, the Python API: the example notebook runs end to end, a caller's callback is called,
recipes resolve from keywords, and importing the API makes the commands' oneDNN setting."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import pytest

from kcifar import api, run as run_lib
from kcifar.errors import KcifarError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "kcifar_api.ipynb"
TINY = dict(epochs=1, val_size=20, batch_size=16)


def notebook_code(path: Path, parameters: str) -> str:
    """The notebook's code cells in order, its ``parameters`` cell (papermill's tag) replaced."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    sources = [parameters if "parameters" in cell["metadata"].get("tags", []) else "".join(cell["source"])
               for cell in cells if cell["cell_type"] == "code"]
    assert parameters in sources, "the notebook has no cell tagged 'parameters'"
    return "\n\n".join(sources)


def test_example_notebook_runs_end_to_end(tiny_cifar10, tmp_path):
    code = notebook_code(NOTEBOOK, f"runs_dir = {str(tmp_path / 'runs')!r}\nbudget = {TINY!r}")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batch hooks, loss" in result.stdout and "validation top-1" in result.stdout
    assert "finished: True epochs: 1" in result.stdout
    assert (tmp_path / "runs" / "notebook_tutorial" / "evaluation_val.json").is_file()


def test_a_callers_callback_sees_every_batch_and_the_run_is_kcifars(tiny_cifar10, tmp_path):
    class Count(keras.callbacks.Callback):
        batches = epochs = 0

        def on_train_batch_end(self, batch, logs=None):
            Count.batches += 1

        def on_epoch_end(self, epoch, logs=None):
            Count.epochs += 1

    recipe = api.resolve_recipe(name="cb", overrides={"data.val_size": 20}, epochs=2, batch_size=16)
    result = api.train(recipe, runs_dir=tmp_path / "runs", callbacks=[Count()], verbose=0)
    steps = -(-80 // 16)  # 100 training images, 20 held out
    assert Count.epochs == 2 and Count.batches == 2 * steps // run_lib.steps_per_execution(steps)  # Keras' batch hooks
    run = api.load_run(result.run_dir)
    assert run.metrics["finished"] and len(run.history["loss"]) == 2 and len(run.class_names) == 10
    assert run.model().output_shape == (None, 10)
    top = api.predict(result.run_dir, result.data.test.x[:3], top_k=2)
    assert len(top) == 3 and all(len(row) == 2 and row[0][1] >= row[1][1] for row in top)


def test_recipe_keywords_are_the_train_commands_flags():
    recipe = api.resolve_recipe(None, ["optimizer.weight_decay=5e-4"], model="resnet20", lr=0.05, augment="crop_flip")
    assert (recipe["model"], recipe["optimizer"]["learning_rate"], recipe["augment"]["preset"]) == ("resnet20", 0.05,
                                                                                                     "crop_flip")
    assert recipe["optimizer"]["weight_decay"] == 5e-4
    with pytest.raises(KcifarError, match="unknown recipe flag learning_rate; use one of model, "):
        api.resolve_recipe(learning_rate=0.1)
    with pytest.raises(KcifarError, match="unknown recipe key 'train.epoch'"):
        api.resolve_recipe(overrides={"train.epoch": 3})
    with pytest.raises(KcifarError, match="not a run directory"):
        api.load_run(ROOT / "experiments")


def test_importing_the_api_turns_on_onednn_as_the_commands_do():
    probe = textwrap.dedent("""
        import os, sys
        import kcifar
        assert "TF_ENABLE_ONEDNN_OPTS" not in os.environ and "tensorflow" not in sys.modules  # import kcifar: nothing
        import kcifar.api
        from kcifar import machine
        print(os.environ["TF_ENABLE_ONEDNN_OPTS"], machine.onednn_enabled())
    """)
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["1", "True"]
