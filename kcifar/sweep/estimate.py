"""``--dry-run``: the runs of a study and how long they should take on this machine.

Cost of one run, in training-image equivalents: ``epochs x (train images +
validation images / 3) + 2 x test images / 3``, the image counts of the real
CIFAR (50,000 training, 10,000 test; ``data.train_subset`` if set), whatever
data the study will be given (a forward pass is about a
third of a training step; the test set is measured twice, by kcifar.train and
by the evaluation). The speed, first found wins:

1. the fastest training images/s of the runs, finished or under way, of the same
   model (``model_args``, data set), batch size and precision on this CPU (same
   ``cpu_description()``; ``"auto"`` is the precision it picks on this machine), each run
   timed by its fastest segment (one per process that trained it): the estimate is of a run
   alone, and a run that shared the CPU is slower than that;
2. else a step-time model, ``STEP_OVERHEAD_S + batch x 3 x forward FLOPs / GFLOPS``,
   with GFLOPS the highest fitted to the runs (as above) in the same precision on this CPU
   of the same model with other arguments or batch sizes, or if there are none of the
   other model nearest in forward FLOPs (only runs whose steps took at least twice the
   overhead: the others measure only it; small models at small batches reach a fraction
   of the GFLOPS of large ones, so the model's own runs, or its nearest in size, are the
   better guide); a run that recorded no precision ran in float32 (the CPU
   default before "auto" picked bfloat16);
3. else the same model at ``FALLBACK_GFLOPS``: rough, and said so in the output.

Runs are looked for (``recipe.toml`` with ``metrics.json`` or ``segments.json``
beside it) under the runs folder and ``experiments/results/``. A run under way
counts only its epochs left. EarlyStopping can end a
run sooner, so the times are upper bounds for such recipes; ImageDataGenerator
augmentation (``augment.engine = "idg"``) is CPU-bound and slower than this
model of the cost says.
"""

import functools
import json
import math
from pathlib import Path

from kcifar.rundir import read_history, read_metrics, read_recipe, segment_summaries
from kcifar.sweep.runner import to_train

# Rough: a step's fixed overhead and a 2-core CPU's sustained training GFLOPS, fitted to the first
# runs recorded in experiments/results/runs.csv (an AVX2 CPU, oneDNN off); faster CPUs beat them.
STEP_OVERHEAD_S = 0.006
FALLBACK_GFLOPS = 50.0
TEST_IMAGES = 10000
TRAIN_IMAGES = 50000


@functools.lru_cache(maxsize=None)
def forward_mflops(model: str, model_args: str, dataset: str) -> float:
    """Forward MFLOPs per image (kcifar.models' count); ``model_args`` as sorted JSON."""
    import keras

    from kcifar import models
    from kcifar.models.registry import forward_flops

    model_obj = models.build(model, num_classes=100 if dataset == "cifar100" else 10, **json.loads(model_args))
    flops = forward_flops(model_obj) / 1e6
    keras.backend.clear_session()
    return flops


def model_key(recipe: dict, precision: str) -> tuple:
    """(model, model_args as JSON, data set, batch size, precision): what a measured speed is the speed of."""
    return (recipe["model"], json.dumps(recipe.get("model_args", {}), sort_keys=True), recipe.get("dataset", "cifar10"),
            recipe.get("train", {}).get("batch_size", 32), precision)


def step_speed(key, gflops: float) -> float:
    """Training images/s of the step-time model (module docstring)."""
    batch = key[3]
    return batch / (STEP_OVERHEAD_S + batch * 3 * forward_mflops(*key[:3]) * 1e6 / (gflops * 1e9))


def fitted_gflops(key, images_per_s: float) -> float:
    """The GFLOPS at which the step-time model gives the measured speed (compute part at least 10 % of a step)."""
    batch = key[3]
    compute_s = max(batch / images_per_s - STEP_OVERHEAD_S, 0.1 * batch / images_per_s)
    return batch * 3 * forward_mflops(*key[:3]) * 1e6 / compute_s / 1e9


def measured_runs(folders, cpu: str) -> list:
    """[(model key, training images/s)] of the runs on this CPU found under ``folders``: finished ones
    and those under way (by the epochs their segments finished)."""
    found = []
    for folder in folders:
        for recipe_path in sorted(Path(folder).glob("**/recipe.toml")) if Path(folder).is_dir() else []:
            try:
                measured = run_speed(recipe_path.parent, cpu)
            except Exception:  # anything unreadable is not a measurement
                continue
            if measured:
                found.append(measured)
    return found


def run_speed(run_dir: Path, cpu: str):
    """(model key, training images/s on ``cpu``) of the run in ``run_dir``, or None when it has none."""
    recipe, metrics = read_recipe(run_dir), read_metrics(run_dir) or {}
    if metrics.get("finished"):
        speed = alone_speed(metrics, cpu)
        if speed and (metrics.get("machine") or {}).get("cpu") == cpu:
            return model_key(recipe, metrics.get("precision", "float32")), speed
        return None
    here = [seg for seg in segment_summaries(run_dir, read_history(run_dir))
            if seg.get("cpu") == cpu and seg.get("train_images_per_s")]
    fastest = max(here, key=lambda seg: seg["train_images_per_s"], default=None)
    return fastest and (model_key(recipe, fastest.get("precision", "float32")), fastest["train_images_per_s"])


def alone_speed(metrics: dict, cpu: str):
    """A finished run's training images/s: its fastest segment on ``cpu`` (a run resumed after an interruption
    has one per process, and a segment that shared the CPU with other work is slower than the run alone),
    else the run's own figure."""
    segments = [seg.get("train_images_per_s") for seg in metrics.get("segments") or [] if seg.get("cpu") == cpu]
    return max(filter(None, segments), default=None) or metrics.get("train_images_per_s")


def speed_for(key, measured) -> tuple:
    """(training images/s, where the figure comes from) for the model ``key``."""
    same = [speed for k, speed in measured if k == key]
    if same:
        return max(same), f"measured: the fastest of {len(same)} run(s) of this model and batch on this CPU"
    informative = [(k, speed) for k, speed in measured if k[4] == key[4] and k[3] / speed > 2 * STEP_OVERHEAD_S]
    same_model = [(k, speed) for k, speed in informative if k[0] == key[0]]
    if informative:
        fitted = same_model or nearest_in_flops(key, informative)
        gflops = max(fitted_gflops(k, speed) for k, speed in fitted)
        which = "this model" if same_model else f"{fitted[0][0][0]}, the model nearest in FLOPs"
        return step_speed(key, gflops), (f"FLOPs at {gflops:.0f} GFLOPS fitted to {len(fitted)} {key[4]} run(s) "
                                         f"of {which} on this CPU")
    return step_speed(key, FALLBACK_GFLOPS), (f"FLOPs at an assumed {FALLBACK_GFLOPS:g} GFLOPS + "
                                              f"{STEP_OVERHEAD_S * 1e3:g} ms a step (no {key[4]} run recorded on "
                                              "this CPU)")


def nearest_in_flops(key, measured) -> list:
    """The runs in ``measured`` of the model (with its arguments and data set) whose forward FLOPs are
    nearest ``key``'s, by ratio."""
    size = forward_mflops(*key[:3])
    nearest = min({k[:3] for k, _ in measured}, key=lambda model: abs(math.log(forward_mflops(*model) / size)))
    return [(k, speed) for k, speed in measured if k[:3] == nearest]


def run_cost(recipe: dict, epochs_done: int = 0) -> float:
    """Training-image equivalents of one run, or of what is left of it after ``epochs_done``
    (see the module docstring)."""
    data = recipe["data"]
    train = data["train_subset"] or TRAIN_IMAGES - data["val_size"]
    epochs_left = max(recipe["train"]["epochs"] - epochs_done, 0)
    return epochs_left * (train + data["val_size"] / 3) + 2 * TEST_IMAGES / 3


def epochs_done(run_dir: Path) -> int:
    """The epochs a run under way has logged (0 for none)."""
    return len(read_history(run_dir).get("epoch", []))


def estimate(study, runs_dir="runs", results_dir="experiments/results") -> list:
    """One dict per cell: model, MFLOPs, images/s, seconds per run, runs left, seconds left, source."""
    from kcifar.machine import auto_precision, cpu_description


    measured = measured_runs([runs_dir, results_dir], cpu_description())
    rows = []
    for cell in study.cells:
        recipe = cell.recipes[0]
        precision = recipe["train"]["precision"]
        key = model_key(recipe, auto_precision() if precision == "auto" else precision)
        speed, source = speed_for(key, measured)
        left = [r for r in cell.recipes if to_train(Path(runs_dir), study.name, r)]
        left_s = sum(run_cost(r, epochs_done(Path(runs_dir) / study.name / r["name"])) for r in left) / speed
        rows.append({"cell": cell.name, "model": recipe["model"], "mflops": forward_mflops(*key[:3]),
                     "epochs": recipe["train"]["epochs"], "images_per_s": speed, "per_run_s": run_cost(recipe) / speed,
                     "runs_left": len(left), "left_s": left_s, "source": source,
                     "idg": recipe["augment"]["engine"] == "idg" and recipe["augment"]["preset"] != "none",
                     "early_stopping": recipe["early_stopping"]["enabled"]
                     and recipe["early_stopping"]["patience"] < recipe["train"]["epochs"]})
    return rows


def describe(study, rows, runs_dir="runs") -> str:
    """The dry-run table a person reads."""
    lines = [f"study {study.name}: {len(study.cells)} cells, {study.seeds_text()}; runs go to "
             f"{Path(runs_dir) / study.name}/<cell>-s<seed>", "",
             f"{'cell':<40} {'model':<14} {'MFLOPs':>8} {'epochs':>6} {'img/s':>7} {'min/run':>8} {'left':>4}  speed from"]
    for r in rows:
        flags = (" [EarlyStopping: at most]" if r["early_stopping"] else "") + (" [idg augmentation: slower]" if r["idg"] else "")
        lines.append(f"{r['cell']:<40} {r['model']:<14} {r['mflops']:>8.1f} {r['epochs']:>6} {r['images_per_s']:>7.0f} "
                     f"{r['per_run_s'] / 60:>8.1f} {r['runs_left']:>4}  {r['source']}{flags}")
    total = sum(r["left_s"] for r in rows)
    lines += ["", f"runs left: {sum(r['runs_left'] for r in rows)}; estimated time left: {total / 3600:.1f} h "
              f"({total / 60:.0f} min) on this machine, one run at a time"]
    return "\n".join(lines)
