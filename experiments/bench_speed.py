"""How fast does kcifar train on this CPU, in float32 and bfloat16, beside PyTorch?

For each zoo family it times `model.fit` as `kcifar.train` runs it (the
recipe's model, optimizer, schedule and augmentation, built and compiled by
the run library, fed by kcifar's own input pipeline from the real training
split) against a plain PyTorch loop over the same architecture (a
`torch_twin.TorchTwin` of the Keras model: same layers and shapes, checked by
parameter count) with the recipe's optimizer on in-memory tensors, in
PyTorch's fast CPU path (channels_last; bfloat16 = CPU autocast). kcifar runs
with augmentation on, PyTorch without: the harder comparison for kcifar.

Each (framework, precision) is one long-lived worker process per model; the
workers take turns in blocks of `--seconds` (A B C D A B C D ..., `--rounds`
blocks each), so the drift of a shared machine's speed touches all alike;
each figure is the median over rounds, and the ratio is taken per round.
In the same run it measures the chip's peaks (matmul 4096^3, 3x3 convolution
128->128 on 64x32x32, forward) in the precisions asked and both frameworks.
Achieved GFLOPS count a training step as 3x the forward FLOPs
(`kcifar.models.registry.FLOPS_COUNTED`). `--compare KEY=VALUE` adds a kcifar
worker with that recipe override taking its turns beside the default one, so
what a setting gives on this CPU is measured in the same run: e.g.
`--compare train.conv_grad=native` (`--compare-conv-grad`: TensorFlow's own
kernel gradient in every convolution), `--compare optimizer.fused=false` (Keras'
element-wise optimizer update).

    KCIFAR_DATA_DIR=../shared/datasets python experiments/bench_speed.py \
        --out experiments/results/speed_<cpu>.md

PyTorch is a benchmark-only dependency (`pip install -e ".[bench]"`; on a
CPU-only machine install PyTorch's CPU build first); kcifar never imports it.
"""

if __name__ == "__main__":
    from kcifar.cli import start_command

    start_command()  # kcifar's TensorFlow defaults (oneDNN on), before TensorFlow loads

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import keras
from common import EpochClock, publish

from kcifar.cli import run_worker

MODELS = {  # model: (recipe, batch size); the recipe's augmentation, optimizer and schedule
    "s3_tutorial": (None, 64),  # the default recipe (Adam-amsgrad), batch as in issue 13's table
    "s0_model3": ("experiments/recipes/s0_model3.toml", 128),
    "s1_step10": ("experiments/recipes/s1_step10.toml", 32),
    "s2_gap": ("experiments/recipes/s2_gap.toml", 64),
    "resnet20": ("experiments/recipes/resnet20_onecycle_15ep.toml", 128),
    "vgg11": ("experiments/recipes/s4_vgg11_20ep.toml", 64),
    "vgg16": ("experiments/recipes/s4_vgg16_final.toml", 64),
    "airbench94": ("experiments/recipes/fast94.toml", 1024),  # with its EMA and BN-bias scale; PyTorch without
}
PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16"}  # name here: kcifar's train.precision
REPOSITORY = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------ what both workers share


def bench_recipe(model: str, precision: str, *overrides: str) -> dict:
    """The model's recipe on CIFAR-10 (CIFAR-100 recipes too: only the head's width differs)."""
    from kcifar import recipe as krecipe

    path, batch = MODELS[model]
    return krecipe.resolve(REPOSITORY / path if path else None,
                           [f"model={model!r}", "dataset='cifar10'", f"train.batch_size={batch}",
                            f"train.precision={PRECISIONS[precision]!r}", *overrides])


def serve(step_block, note: str = ""):
    """The worker side of the protocol: 'READY note'; 'RUN seconds' -> 'RESULT images seconds'; 'QUIT'."""
    print(f"READY {note}", flush=True)
    for line in sys.stdin:
        if line.startswith("QUIT"):
            return
        images, seconds = step_block(float(line.split()[1]))
        print(f"RESULT {images} {seconds}", flush=True)


def steps_for(seconds: float, rate_steps_per_s: float, multiple: int = 1) -> int:
    """Steps for about ``seconds``, a whole number of ``multiple`` (Keras' steps per execution)."""
    return max(1, int(seconds * rate_steps_per_s / multiple)) * multiple


# ------------------------------------------------------------ kcifar: model.fit as kcifar.train runs it


def kcifar_worker(model_name: str, precision: str, *overrides: str):
    from kcifar import machine, run, train
    from kcifar.augment import AugmentConfig, train_dataset

    recipe = bench_recipe(model_name, precision, *overrides)
    strategy = run.set_up(recipe)
    data, split = run.load_data(recipe)
    batch = recipe["train"]["batch_size"]
    with strategy.scope():
        model = train.build_model(recipe, data, split)
        steps_per_epoch = -(-len(split) // batch)
        run.check_weight_averaging(recipe, steps_per_epoch)
        routed = run.prepare_model(model, recipe)
        run.compile_model(model, recipe, steps_per_epoch, machine.jit_enabled(recipe["train"]["jit"]))
    batches = train_dataset(split.x, split.y, data.num_classes, batch, AugmentConfig(**recipe["augment"]),
                            seed=0, first_epoch=0)

    clock = EpochClock()

    def fit(steps):
        model.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False, callbacks=[clock])
        return clock.seconds

    chunk = model.steps_per_execution
    fit(chunk)  # tracing
    rate = 4 * chunk / fit(4 * chunk)
    serve(lambda seconds: _timed(fit, steps_for(seconds, rate, chunk), batch), note=str(routed))


def _timed(fit, steps, batch):
    return steps * batch, fit(steps)


# ------------------------------------------------------------ PyTorch: a plain loop, its fast CPU path


def torch_optimizer(spec: dict, params):
    import torch

    kind = spec["name"]
    lr, decay = spec["learning_rate"], spec["weight_decay"]
    if kind == "sgd":
        return torch.optim.SGD(params, lr, momentum=spec["momentum"], nesterov=spec["nesterov"], weight_decay=decay)
    if kind == "rmsprop":
        return torch.optim.RMSprop(params, lr, weight_decay=decay)
    adam = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    return adam(params, lr, betas=(spec["beta_1"], spec["beta_2"]), weight_decay=decay, amsgrad=spec["amsgrad"])


def torch_worker(model_name: str, precision: str):
    import torch
    from torch_twin import TorchTwin

    from kcifar import models, run
    from kcifar.models.registry import trainable_params

    torch.set_num_threads(os.cpu_count())
    recipe = bench_recipe(model_name, "float32")
    keras_model = models.build(model_name, num_classes=10, **recipe["model_args"])
    net = TorchTwin(keras_model).to(memory_format=torch.channels_last)
    twin_params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    if twin_params != trainable_params(keras_model):
        raise SystemExit(f"{model_name}: the PyTorch twin has {twin_params} parameters, Keras "
                         f"{trainable_params(keras_model)}: not the same network")
    opt = torch_optimizer(recipe["optimizer"], net.parameters())
    split = run.load_data(recipe)[1]
    x = torch.from_numpy(split.x).permute(0, 3, 1, 2).float().contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(split.y.astype("int64"))
    batch, order, position = recipe["train"]["batch_size"], torch.randperm(len(y)), [0]
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        if position[0] + batch > len(y):
            order.copy_(torch.randperm(len(y)))
            position[0] = 0
        index = order[position[0]:position[0] + batch]
        position[0] += batch
        images = x[index].contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            loss = loss_fn(net(images), y[index])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def block(steps):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return time.perf_counter() - start

    net.train()
    block(3)
    rate = 10 / block(10)
    serve(lambda seconds: _timed(block, steps_for(seconds, rate), batch))


# ------------------------------------------------------------ the chip's peaks


def peaks_worker(framework: str, precisions: str = ",".join(PRECISIONS)):
    """GFLOPS of a 4096^3 matmul and a 3x3 conv 128->128 on 64x32x32 (forward), in each of ``precisions``
    (only those asked: bfloat16 emulated on a CPU without it takes minutes a matmul)."""
    results = {}
    for precision in precisions.split(","):
        ops = _tf_ops(precision) if framework == "tf" else _torch_ops(precision)
        for name, (fn, flops) in ops.items():
            for _ in range(3):
                fn()
            reps, start = 0, time.perf_counter()
            while time.perf_counter() - start < 2.0:
                fn()
                reps += 1
            results[f"{name} {precision}"] = flops * reps / (time.perf_counter() - start) / 1e9
    print("PEAKS " + json.dumps(results), flush=True)


MATMUL_FLOPS, CONV_FLOPS = 2 * 4096**3, 2 * 64 * 32 * 32 * 128 * 128 * 9


def _tf_ops(precision):
    import tensorflow as tf

    dtype = tf.bfloat16 if precision == "bfloat16" else tf.float32
    a, b = tf.random.normal((4096, 4096), dtype=dtype), tf.random.normal((4096, 4096), dtype=dtype)
    x, w = tf.random.normal((64, 32, 32, 128), dtype=dtype), tf.random.normal((3, 3, 128, 128), dtype=dtype)
    matmul = tf.function(lambda: tf.linalg.matmul(a, b))
    conv = tf.function(lambda: tf.nn.conv2d(x, w, 1, "SAME"))
    return {"matmul": (lambda: matmul().numpy(), MATMUL_FLOPS), "conv3x3": (lambda: conv().numpy(), CONV_FLOPS)}


def _torch_ops(precision):
    import torch

    torch.set_num_threads(os.cpu_count())
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    a, b = torch.randn(4096, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
    x = torch.randn(64, 128, 32, 32, dtype=dtype).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(128, 128, 3, padding=1, bias=False).to(dtype).to(memory_format=torch.channels_last)

    def run_conv():
        with torch.no_grad():
            conv(x)

    return {"matmul": (lambda: a @ b, MATMUL_FLOPS), "conv3x3": (run_conv, CONV_FLOPS)}


# ------------------------------------------------------------ the conductor


class Worker:
    """One worker process: started, warmed up, then asked for blocks of training in turns."""

    def __init__(self, *args):
        self.process = subprocess.Popen([sys.executable, __file__, "--worker", *args], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        self.note = self._expect("READY").split(maxsplit=1)[1:]  # what the worker says about itself

    def run(self, seconds: float) -> float:
        self.process.stdin.write(f"RUN {seconds}\n")
        self.process.stdin.flush()
        images, elapsed = self._expect("RESULT").split()[1:]
        return int(images) / float(elapsed)

    def close(self):
        self.process.stdin.write("QUIT\n")
        self.process.stdin.close()
        self.process.wait()

    def _expect(self, word: str) -> str:
        for line in self.process.stdout:
            if line.startswith(word):
                return line
        raise SystemExit(f"a benchmark worker ({' '.join(self.process.args[3:])}) ended without {word}; see its stderr")


def chip_peaks(frameworks, precisions) -> dict:
    peaks = {}
    for framework in frameworks:
        output = run_worker([sys.executable, __file__, "--worker", "peaks", framework, ",".join(precisions)],
                            {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, f"{framework}'s chip peaks")
        peaks[framework] = json.loads(output.split("PEAKS ", 1)[1])
    return peaks


def take_turns(workers: dict, rounds: int, seconds: float) -> dict:
    """{key: [images/s per round]} of started workers, each running ``seconds`` in turn; then closed."""
    speeds = {key: [] for key in workers}
    for _ in range(rounds):
        for key, worker in workers.items():
            speeds[key].append(worker.run(seconds))
    for worker in workers.values():
        worker.close()
    return speeds


def measure_model(model: str, frameworks: dict, precisions, rounds: int, seconds: float) -> tuple[dict, dict, str]:
    """{(framework, precision): [images/s per round]}, the workers taking turns;
    {precision: convolutions with matmul kernel gradients} of kcifar's default worker; and the share
    of the cores' time the hypervisor gave to other machines during the rounds ("-" where unknown).
    ``frameworks``: {name: (worker kind, recipe overrides...)}."""
    from kcifar.machine import cpu_steal_seconds

    workers = {(fw, p): Worker(kind, model, p, *extra) for fw, (kind, *extra) in frameworks.items() for p in precisions}
    routed = {p: w.note[0].strip() for (fw, p), w in workers.items() if fw == "kcifar"}
    stolen_before, started = cpu_steal_seconds(), time.monotonic()
    speeds = take_turns(workers, rounds, seconds)
    stolen_after, elapsed = cpu_steal_seconds(), time.monotonic() - started
    stolen = ("-" if stolen_before is None or stolen_after is None
              else f"{100 * (stolen_after - stolen_before) / (elapsed * os.cpu_count()):.1f} %")
    return speeds, routed, stolen


# ------------------------------------------------------------ the report


def forward_flops(model: str) -> int:
    from kcifar import models
    from kcifar.models.registry import forward_flops as count

    flops = count(models.build(model, num_classes=10))
    keras.backend.clear_session()
    return flops


def table_rows(results: dict, routed: dict, stolen: dict, peaks: dict, compare: str | None) -> list[str]:
    rows = ["| model | batch | recipe (augmentation) | precision | kcifar img/s | PyTorch img/s | kcifar / PyTorch "
            "(median of rounds) | kcifar GFLOPS | % of conv peak | kcifar bf16 / fp32 | convs with matmul kernel "
            f"gradients | kcifar / kcifar with `{compare or '-'}` | CPU stolen by the VM's neighbours |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, speeds in results.items():
        recipe = bench_recipe(model, "float32")
        flops = 3 * forward_flops(model)
        for precision in PRECISIONS:
            ours = speeds.get(("kcifar", precision))
            if not ours:
                continue
            theirs = speeds.get(("torch", precision))
            ratio = f"{statistics.median(a / b for a, b in zip(ours, theirs)):.2f}" if theirs else "-"
            peak = max(p[f"conv3x3 {precision}"] for p in peaks.values())
            achieved = statistics.median(ours) * flops / 1e9
            bf16 = speeds.get(("kcifar", "bfloat16"))
            gain = (f"{statistics.median(a / b for a, b in zip(bf16, speeds[('kcifar', 'float32')])):.2f}"
                    if precision == "bfloat16" and bf16 and ("kcifar", "float32") in speeds else "")
            other = speeds.get(("kcifar_compare", precision))
            gain_over_other = f"{statistics.median(a / b for a, b in zip(ours, other)):.2f}" if other else "-"
            rows.append(f"| {model} | {recipe['train']['batch_size']} | {MODELS[model][0] or 'default'} "
                        f"({recipe['augment']['preset']}) | {precision} | {_spread(ours)} | "
                        f"{_spread(theirs) if theirs else '-'} | {ratio} | {achieved:.0f} | "
                        f"{100 * achieved / peak:.0f} % | {gain} | {routed[model][precision]} | {gain_over_other} | "
                        f"{stolen[model]} |")
    return rows


def _spread(values) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def report(results: dict, routed: dict, stolen: dict, peaks: dict, args, head: list) -> str:
    versions = _versions()
    lines = ["# Training speed on this CPU: kcifar beside PyTorch, float32 and bfloat16", "",
             *head,
             f"- versions: {versions}",
             f"- settings: {args.rounds} rounds of {args.seconds:g} s per worker, workers taking turns", "",
             "## The chip's peaks (GFLOPS, forward)", "",
             "| op | " + " | ".join(peaks) + " |", "|---|" + "---|" * len(peaks)]
    for key in next(iter(peaks.values())):
        lines.append(f"| {key} | " + " | ".join(f"{p[key]:,.0f}" for p in peaks.values()) + " |")
    lines += ["", "## model.fit (kcifar, augmentation on) against a plain PyTorch loop", "",
              "images/s: median (lowest-highest) of the rounds. GFLOPS = 3 x forward FLOPs x images/s; "
              "% of the best conv3x3 peak above in that precision. CPU stolen: the share of the cores' time "
              "the hypervisor gave to other machines during the model's rounds (/proc/stat's steal): where it is "
              "not near 0, the figures of that row are lower than the chip's own.", ""]
    return "\n".join(lines + table_rows(results, routed, stolen, peaks, args.compare)) + "\n"


def _versions() -> str:
    import tensorflow as tf

    from kcifar import machine

    parts = [f"TensorFlow {tf.__version__} (oneDNN {'on' if machine.onednn_enabled() else 'off'})",
             f"Keras {keras.__version__}"]
    try:
        import torch

        parts.append(f"PyTorch {torch.__version__}")
    except ImportError:
        parts.append("PyTorch not installed")
    return ", ".join(parts)


# ------------------------------------------------------------ command line


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo models (default: all)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="float32,bfloat16")
    parser.add_argument("--no-torch", action="store_true", help="kcifar alone")
    parser.add_argument("--compare", metavar="KEY=VALUE",
                        help="also kcifar with this recipe override, taking turns with the others")
    parser.add_argument("--compare-conv-grad", dest="compare", action="store_const", const="train.conv_grad='native'",
                        help="--compare train.conv_grad='native'")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of one timed block")
    parser.add_argument("--out", help="markdown file to write (default: print)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        return {"kcifar": kcifar_worker, "torch": torch_worker, "peaks": peaks_worker}[kind](*rest)
    if args.out:  # refused before the benchmark's minutes, not after
        from kcifar.fileio import check_writable

        check_writable(Path(args.out).parent, "--out")
    if args.compare:  # a bad override is refused now, not in a worker minutes later
        bench_recipe(args.models.split(",")[0], "float32", args.compare)
    from kcifar import machine

    head = machine.provenance()  # the code that runs
    frameworks = {"kcifar": ("kcifar",)}  # name: (worker kind, recipe overrides...)
    if args.compare:
        frameworks["kcifar_compare"] = ("kcifar", args.compare)
    if not args.no_torch:
        frameworks["torch"] = ("torch",)
    peaks = chip_peaks(["tf"] + ([] if args.no_torch else ["torch"]), args.precisions.split(","))
    results, routed, stolen = {}, {}, {}
    for model in args.models.split(","):
        results[model], routed[model], stolen[model] = measure_model(model, frameworks, args.precisions.split(","),
                                                                     args.rounds, args.seconds)
        print(f"{model}: " + ", ".join(f"{fw} {p} {statistics.median(v):,.0f} img/s"
                                       for (fw, p), v in results[model].items()), file=sys.stderr, flush=True)
    text = report(results, routed, stolen, peaks, args, head)
    publish(text, args.out)


if __name__ == "__main__":  # a bad input is one line, not a traceback
    from kcifar.cli import command

    command(main)()
