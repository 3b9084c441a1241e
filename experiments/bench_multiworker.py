"""Training speed of ``kcifar.train`` on one machine: one process, then 1 and 2 workers of
``--strategy multiworker`` (localhost ports), on the real CIFAR-10 ($KCIFAR_DATA_DIR).

The figure is ``train_images_per_s`` of the chief's metrics.json (the median of the epochs
after the first, validation excluded). On one machine the workers share its cores, so
two workers show the overhead of the all-reduce, not a speed-up.

    python experiments/bench_multiworker.py --out experiments/results/multiworker_xeon_avx512.md
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from kcifar import fileio, machine, multiworker, rundir

TIMEOUT_S = 3600


def train(workers: int, args, runs_dir: Path) -> dict:
    """metrics.json of one run: ``workers`` = 0 for one process without a strategy."""
    name = f"w{workers}"
    command = [sys.executable, "-m", "kcifar.train", "--model", args.model, "--epochs", str(args.epochs),
               "--batch-size", str(args.batch_size), "--train-subset", str(args.train_subset), "--val-size", "1000",
               "--precision", "float32", "--strategy", "multiworker" if workers else "default",
               "--name", name, "--runs-dir", str(runs_dir), "--quiet"]
    tf_configs = multiworker.local_tf_configs(workers)
    processes = []
    for index in range(max(workers, 1)):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        if workers:
            env["TF_CONFIG"] = tf_configs[index]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        for process in processes:
            _, err = process.communicate(timeout=TIMEOUT_S)
            if process.returncode:
                sys.exit(f"{name} failed:\n{err[-2000:]}")
    finally:
        for process in processes:
            process.kill()
    history = rundir.read_history(runs_dir / name)
    return {**json.loads((runs_dir / name / "metrics.json").read_text()), "epoch_time_s": history["epoch_time_s"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="s3_tutorial")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="the global batch")
    parser.add_argument("--train-subset", type=int, default=5000)
    parser.add_argument("--out", required=True)
    parser.add_argument("--note", default="", help="a line on the conditions (other jobs on the CPU?), "
                                                   "added to the CPU line")
    args = parser.parse_args()
    head = machine.provenance(cpu_note=args.note)  # the code that runs
    with tempfile.TemporaryDirectory() as folder:
        results = {workers: train(workers, args, Path(folder)) for workers in (0, 1, 2)}
    base = results[0]["train_images_per_s"]
    rows = [f"| {'one process, no strategy' if w == 0 else f'{w} worker(s), multiworker'} | {m['train_images_per_s']:,.0f} "
            f"| {m['train_images_per_s'] / base:.2f} | {', '.join(f'{t:.1f}' for t in m['epoch_time_s'])} |"
            for w, m in results.items()]
    fileio.write_text(args.out, "\n".join([
        "# `--strategy multiworker` on one machine: 1 and 2 workers against one process", "",
        *head,
        f"- versions: TensorFlow {results[0]['versions']['tensorflow']}, Keras {results[0]['versions']['keras']}",
        f"- run: {args.model}, {args.train_subset:,} CIFAR-10 training images, global batch {args.batch_size}, "
        f"{args.epochs} epochs, float32; workers on localhost ports", "",
        "images/s: training images per second of the chief (median of the epochs after the first, validation "
        "excluded). On one machine the workers share its cores: the figure is the overhead, not a speed-up.", "",
        "| setup | images/s | vs one process | epoch times (s) |", "|---|---|---|---|", *rows, ""]))
    print(Path(args.out).read_text())


if __name__ == "__main__":  # a bad input is one line, not a traceback
    from kcifar.cli import command

    command(main)()
