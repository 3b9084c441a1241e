"""Where a recipe's training step spends its time in oneDNN: ONEDNN_VERBOSE's timings, summed.

Builds and compiles the recipe's model as `kcifar.train` does, feeds it kcifar's
own input pipeline, runs `--warmup` steps, then `--steps` steps with oneDNN's
verbose mode on (each primitive's execution time, in ms), and sums those times
by primitive, implementation and propagation kind (forward, backward data,
backward weights), and by layer shape. Operations that oneDNN does not run
(TensorFlow's own element-wise kernels, casts, the optimizer's update) do not
appear: the wall time of the profiled steps is printed beside the sum, and since
TensorFlow may run independent primitives at the same time, the sum can exceed it.

    KCIFAR_DATA_DIR=../shared/datasets python experiments/profile_onednn.py \\
        experiments/recipes/fast94.toml --out experiments/results/profile_<model>_<cpu>.md
"""

if __name__ == "__main__":
    from kcifar.cli import start_command

    start_command()

import argparse
import collections
import os
import sys
import time

from kcifar.cli import run_worker


def worker(recipe_path, sets, warmup, steps):
    """Runs in a child process whose stdout is oneDNN's verbose log; prints the wall time last."""
    from kcifar import machine, recipe as krecipe, run, train
    from kcifar.augment import AugmentConfig, train_dataset

    recipe = krecipe.resolve(recipe_path, sets)
    run.set_up(recipe)
    data, split = run.load_data(recipe)
    batch = recipe["train"]["batch_size"]
    steps_per_epoch = -(-len(split) // batch)
    model = train.build_model(recipe, data, split)
    run.check_weight_averaging(recipe, steps_per_epoch)
    run.prepare_model(model, recipe)
    run.compile_model(model, recipe, steps_per_epoch, machine.jit_enabled(recipe["train"]["jit"]))
    batches = train_dataset(split.x, split.y, data.num_classes, batch, AugmentConfig(**recipe["augment"]),
                            seed=0, first_epoch=0)
    model.fit(batches, steps_per_epoch=warmup, epochs=1, verbose=0)
    print(MARKER, flush=True)  # oneDNN flushes each verbose line: what follows is the profiled steps
    start = time.perf_counter()
    model.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0)
    print(f"WALL {time.perf_counter() - start} {steps}", flush=True)


MARKER = "PROFILED STEPS FROM HERE"


def summarize(log: str, top: int):
    """({(primitive, implementation, propagation): ms}, {(primitive, implementation, propagation, shape): (ms, calls)})."""
    by_kind, by_shape = collections.Counter(), collections.Counter()
    calls = collections.Counter()
    for line in log.split(MARKER, 1)[-1].splitlines():
        if not line.startswith("onednn_verbose") or ",exec," not in line:
            continue
        fields = line.split(",")
        try:
            ms = float(fields[-1])
        except ValueError:
            continue
        at = fields.index("exec")
        kind = (fields[at + 2], fields[at + 3], fields[at + 4])
        by_kind[kind] += ms
        by_shape[kind + (fields[-2],)] += ms
        calls[kind + (fields[-2],)] += 1
    return by_kind, [(key, ms, calls[key]) for key, ms in by_shape.most_common(top)]


def report(args, by_kind, by_shape, wall, steps, head) -> str:
    total = sum(by_kind.values())
    lines = [f"# Where the training step spends its time in oneDNN: {args.recipe}", "",
             *head,
             f"- TF_NUM_INTEROP_THREADS={os.environ.get('TF_NUM_INTEROP_THREADS')} (unset or 0: TensorFlow's "
             "default, independent operations side by side)",
             f"- {steps} steps profiled after {args.warmup} unprofiled; their wall time {wall:.1f} s "
             f"({wall / steps * 1000:.0f} ms a step, with verbose logging); oneDNN's execution times add up to "
             f"{total / 1000:.1f} s (more than the wall time where TensorFlow ran primitives side by side)", "",
             "| primitive | implementation | propagation | ms | share of oneDNN's time |", "|---|---|---|---|---|"]
    for (primitive, impl, prop), ms in by_kind.most_common():
        lines.append(f"| {primitive} | {impl} | {prop} | {ms:,.0f} | {100 * ms / total:.1f} % |")
    lines += ["", "## The largest entries by shape", "", "| primitive | implementation | propagation | shape | calls "
              "| ms a call |", "|---|---|---|---|---|---|"]
    for (primitive, impl, prop, shape), ms, count in by_shape:
        lines.append(f"| {primitive} | {impl} | {prop} | `{shape}` | {count} | {ms / count:,.1f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe", help="recipe file, e.g. experiments/recipes/fast94.toml")
    parser.add_argument("--set", action="append", default=[], help="recipe override KEY=VALUE, as kcifar.train")
    parser.add_argument("--warmup", type=int, default=7, help="unprofiled steps first (tracing)")
    parser.add_argument("--steps", type=int, default=14, help="profiled steps")
    parser.add_argument("--top", type=int, default=15, help="rows of the by-shape table")
    parser.add_argument("--out", help="markdown file to write (default: print)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.recipe, args.set, args.warmup, args.steps)
    from common import publish

    from kcifar import machine

    head = machine.provenance()  # the code that runs
    command = [sys.executable, __file__, args.recipe, "--worker", "--warmup", str(args.warmup),
               "--steps", str(args.steps)] + [f"--set={value}" for value in args.set]
    log = run_worker(command, {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "ONEDNN_VERBOSE": "1"},
                     f"the profiled training of {args.recipe}")
    wall_line = next(line for line in log.splitlines() if line.startswith("WALL "))
    wall, steps = float(wall_line.split()[1]), int(wall_line.split()[2])
    by_kind, by_shape = summarize(log, args.top)
    if not by_kind:
        raise SystemExit("oneDNN logged no primitive: is TensorFlow's oneDNN on (TF_ENABLE_ONEDNN_OPTS=1)?")
    text = report(args, by_kind, by_shape, wall, steps, head)
    publish(text, args.out)


if __name__ == "__main__":  # a bad input is one line, not a traceback
    from kcifar.cli import command

    command(main)()
