"""A minimal reproduction: one 3x3 convolution's training step, TensorFlow against PyTorch.

VGG16 in bfloat16 trains slower in kcifar than in PyTorch on an AMX CPU
(experiments/results/speed_*.md) while the models around the convolutions
are the same. This times the convolution alone, at a model's layer shapes on
CIFAR (`--shapes vgg16`: batch 64, channels/size 64/32 ... 512/2; `airbench94`:
batch 1024, 24->64 at 31x31 ... 256->256 at 3x3; `resnet20`: batch 128, 16/32 ...
64/8; `s2_gap`, `s1_step10`, `s0_model3`: each of their six convolutions at the recipe's
batch), forward, forward+backward
(gradients for the input and the kernel), and each backward kernel alone (the
input's gradient, "backward data"; the kernel's, "backward weights"), in each
framework's fast CPU path: TensorFlow with oneDNN on, NHWC, a `tf.function`;
PyTorch channels_last. Both call oneDNN; the numbers show which side of the
gap the kernels are on, and which kernel. The TensorFlow side also times the
kernel gradient as nine matmuls (`kcifar.models.parts.kernel_grad_by_taps`,
what `train.conv_grad` routes a layer through), so the threshold
`kcifar.machine.MATMUL_KERNEL_GRAD` can be read off per shape.

`--onednn` looks one level down instead: each framework's oneDNN (its version and threading runtime, the
implementation it picks for each kernel, and that primitive's own execution time from
`ONEDNN_VERBOSE`, without the framework around it); `--threads N` runs both on N threads.
`--processes N` measures each framework in N fresh processes, taking turns, and reports the median
of the processes (with `--onednn` also their range): a kernel's speed can differ from one process
to the next.

    python experiments/bench_conv_layers.py [--precision bfloat16] [--shapes vgg16] [--onednn] [--threads N]
        [--processes N] [--out FILE]
"""

if __name__ == "__main__":
    from kcifar.cli import start_command

    start_command()  # oneDNN on, before TensorFlow loads

import argparse
import collections
import os
import statistics
import sys
import time
from pathlib import Path

from common import publish

from kcifar.cli import run_worker
from kcifar.errors import KcifarError
from kcifar.fileio import check_writable

# name: (batch, [(input channels, output channels, height = width)]): each model's 3x3 conv sizes on CIFAR
SHAPES = {
    "vgg16": (64, [(64, 64, 32), (128, 128, 16), (256, 256, 8), (512, 512, 4), (512, 512, 2)]),
    "airbench94": (1024, [(24, 64, 31), (64, 64, 15), (64, 256, 15), (256, 256, 7), (256, 256, 3)]),
    "resnet20": (128, [(16, 16, 32), (32, 32, 16), (64, 64, 8)]),
    "s2_gap": (64, [(3, 64, 32), (64, 64, 32), (64, 128, 16), (128, 128, 16), (128, 256, 8), (256, 256, 8)]),
    "s1_step10": (32, [(3, 64, 32), (64, 64, 32), (64, 128, 16), (128, 128, 16), (128, 256, 8), (256, 256, 8)]),
    "s0_model3": (128, [(3, 32, 32), (32, 32, 32), (32, 64, 16), (64, 64, 16), (64, 128, 8), (128, 128, 8)]),
}
SECONDS = 2.0


def tf_step(batch, cin, cout, size, precision):
    import tensorflow as tf

    dtype = tf.bfloat16 if precision == "bfloat16" else tf.float32
    x = tf.random.normal((batch, size, size, cin), dtype=dtype)
    kernel = tf.Variable(tf.random.normal((3, 3, cin, cout), dtype=dtype))
    dy = tf.random.normal((batch, size, size, cout), dtype=dtype)

    @tf.function
    def forward():
        return tf.nn.conv2d(x, kernel, 1, "SAME")

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.nn.conv2d(x, kernel, 1, "SAME"))
        return tape.gradient(loss, [x, kernel])

    backward_data = tf.function(lambda: tf.nn.conv2d_transpose(dy, kernel, tf.shape(x), 1, "SAME"))
    backward_weights = tf.function(
        lambda: tf.compat.v1.nn.conv2d_backprop_filter(x, tf.shape(kernel), dy, [1, 1, 1, 1], "SAME"))
    from kcifar.models.parts import kernel_grad_by_taps

    weights_by_taps = tf.function(lambda: kernel_grad_by_taps(x, dy, kernel.shape))
    return (lambda: forward().numpy()), (lambda: [g.numpy() for g in forward_backward()]), \
        (lambda: backward_data().numpy()), (lambda: backward_weights().numpy()), (lambda: weights_by_taps().numpy())


def torch_step(batch, cin, cout, size, precision):
    import torch

    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    x = torch.randn(batch, cin, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    conv = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False).to(dtype).to(memory_format=torch.channels_last)
    dy = torch.randn(batch, cout, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)

    def forward():
        with torch.no_grad():
            conv(x)

    def forward_backward():
        x.grad, conv.weight.grad = None, None
        conv(x).sum().backward()

    def backward(mask):  # ATen's convolution backward, only the gradients asked for
        return lambda: torch.ops.aten.convolution_backward(dy, x.detach(), conv.weight.detach(), None, [1, 1], [1, 1],
                                                           [1, 1], False, [0, 0], 1, mask)

    return forward, forward_backward, backward([True, False, False]), backward([False, True, False]), None


def gflops(fn, flops):
    for _ in range(3):
        fn()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < SECONDS:
        fn()
        reps += 1
    return flops * reps / (time.perf_counter() - start) / 1e9


def use_threads(framework, threads):
    """The framework on ``threads`` threads (None: every core), before its first operation."""
    if framework == "torch":
        import torch

        torch.set_num_threads(threads or os.cpu_count())
    elif threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)


def worker(framework, precision, shapes, onednn=False, threads=None):
    """One framework in its own process: GFLOPS per shape of forward, forward+backward, backward
    data, backward weights and (TensorFlow) backward weights as matmuls; with ``onednn`` (the
    process runs with ONEDNN_VERBOSE=1), each native kernel called ONEDNN_CALLS times after a
    marker line naming the shape instead."""
    make = tf_step if framework == "tf" else torch_step
    use_threads(framework, threads)
    print(VERSION, framework_version(framework), flush=True)
    batch, sizes = SHAPES[shapes]
    for cin, cout, size in sizes:
        if onednn:
            forward, _, data, weights, _ = make(batch, cin, cout, size, precision)
            for kernel in (forward, data, weights):
                kernel()  # the primitive is created and cached
                print(f"{MARKER} {cin} {cout} {size}", flush=True)
                for _ in range(ONEDNN_CALLS):
                    kernel()
            continue
        flops = 2 * batch * size * size * cin * cout * 9
        forward, forward_backward, data, weights, by_taps = make(batch, cin, cout, size, precision)
        rates = [gflops(forward, flops), gflops(forward_backward, 3 * flops), gflops(data, flops), gflops(weights, flops)]
        rates += [gflops(by_taps, flops)] if by_taps else []
        print(cin, cout, size, *(f"{rate:.0f}" for rate in rates), flush=True)


def measure(framework, precision, shapes, threads=None, onednn=False):
    """One worker process's (framework version, oneDNN version or None, results): GFLOPS by shape,
    or with ``onednn`` each kernel's (implementation, median ms) as ``onednn_calls`` reads them."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **({"ONEDNN_VERBOSE": "1"} if onednn else {})}
    output = run_worker([sys.executable, __file__, "--worker", framework, "--precision", precision,
                         "--shapes", shapes] + (["--onednn"] if onednn else [])
                        + (["--threads", str(threads)] if threads else []), env, f"the {framework} worker")
    version = next(line.split(maxsplit=1)[1] for line in output.splitlines() if line.startswith(VERSION))
    if onednn:
        return (version, *onednn_calls(output))
    rows = (line.split() for line in output.splitlines() if not line.startswith(VERSION))
    return version, None, {tuple(map(int, row[:3])): tuple(map(float, row[3:])) for row in rows}


def measure_in_turns(precision, shapes, threads, onednn, processes):
    """{framework: (framework version, oneDNN version, results)} over ``processes`` processes per
    framework, taking turns: GFLOPS the median of the processes; with ``onednn`` each kernel's
    (implementation, [ms of each process])."""
    answers = {"tf": [], "torch": []}
    for _ in range(processes):
        for framework, runs in answers.items():
            runs.append(measure(framework, precision, shapes, threads, onednn))
    return {framework: (*runs[0][:2], combine([results for *_, results in runs], onednn))
            for framework, runs in answers.items()}


def combine(results: list, onednn: bool) -> dict:
    """Several processes' results as one: each kernel's implementation and its times (``onednn``),
    or the median of each GFLOPS figure."""
    if onednn:
        return {key: (implementation, [result[key][1] for result in results if key in result])
                for key, (implementation, _) in results[0].items()}
    return {shape: tuple(map(statistics.median, zip(*(result[shape] for result in results)))) for shape in results[0]}


MARKER, VERSION = "SHAPE", "VERSION"
ONEDNN_CALLS = 20


def framework_version(framework) -> str:
    if framework == "torch":
        import torch

        return f"PyTorch {torch.__version__}"
    import tensorflow as tf

    return f"TensorFlow {tf.__version__}"


def onednn_calls(log: str):
    """(oneDNN's version and threading runtime, {(shape, propagation): (implementation, median ms of its
    execute calls)}) from a worker's verbose log: the convolution calls after each marker line."""
    version, runtime, shape, times = "?", "?", None, collections.defaultdict(list)
    for line in log.splitlines():
        fields = line.split(",")
        if line.startswith(MARKER):
            shape = tuple(map(int, line.split()[1:]))
        elif line.startswith("onednn_verbose") and ",info,oneDNN v" in line:
            version = line.split("oneDNN v")[1].split()[0]
        elif line.startswith("onednn_verbose") and ",info,cpu,runtime:" in line:
            runtime = line.split("runtime:")[1].split(",")[0]
        elif line.startswith("onednn_verbose") and ",exec,cpu,convolution," in line and shape:
            at = fields.index("exec")
            propagation = "forward" if fields[at + 4].startswith("forward") else fields[at + 4]
            times[(shape, propagation, fields[at + 3])].append(float(fields[-1]))
    return f"{version} ({runtime} runtime)", {(shape, propagation): (implementation, statistics.median(ms))
                                              for (shape, propagation, implementation), ms in times.items()}


def header(title, args, provenance, measured, setting) -> list[str]:
    """The lines both reports open with: what ran (``provenance``: command, CPU, date, commit; the
    framework versions) and on what."""
    return [f"# {title}", "", *provenance,
            f"- versions: {measured['tf'][0]}, {measured['torch'][0]}",
            f"- {args.shapes}'s conv shapes, {args.precision}, batch {SHAPES[args.shapes][0]}, 'same' padding, "
            f"no bias, {args.threads or os.cpu_count()} thread(s); {setting}"]


def report(args, provenance, measured) -> str:
    lines = header("One 3x3 convolution's training step: TensorFlow against PyTorch", args, provenance,
                   measured, "GFLOPS (forward, backward data and backward weights = 2 x MACs each; "
                   "forward+backward = 3x that)")
    lines += ["", "| in -> out | size | TF fwd | PyTorch fwd | TF fwd+bwd | PyTorch fwd+bwd | TF / PyTorch, fwd+bwd "
              "| TF bwd data | PyTorch bwd data | TF bwd weights | PyTorch bwd weights | TF bwd weights as matmuls "
              "(kcifar) | matmuls / TF's kernel |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for shape in SHAPES[args.shapes][1]:
        tf_f, tf_fb, tf_d, tf_w, tf_m = measured["tf"][2][shape]
        pt_f, pt_fb, pt_d, pt_w = measured["torch"][2][shape]
        lines.append(f"| {shape[0]} -> {shape[1]} | {shape[2]}x{shape[2]} | {tf_f:,.0f} | {pt_f:,.0f} | {tf_fb:,.0f} | "
                     f"{pt_fb:,.0f} | {tf_fb / pt_fb:.2f} | {tf_d:,.0f} | {pt_d:,.0f} | {tf_w:,.0f} | {pt_w:,.0f} | "
                     f"{tf_m:,.0f} | {tf_m / tf_w:.2f} |")
    return "\n".join(lines) + "\n"


def onednn_report(args, provenance, measured) -> str:
    (_, tf_onednn, tf_calls), (_, pt_onednn, pt_calls) = measured["tf"], measured["torch"]
    lines = header("One 3x3 convolution's oneDNN kernels: TensorFlow's oneDNN against PyTorch's", args, provenance,
                   measured, f"oneDNN {tf_onednn} in TensorFlow, {pt_onednn} in PyTorch")
    lines += [f"- ms a call: the median of {ONEDNN_CALLS} calls of the primitive as `ONEDNN_VERBOSE` times it "
              "(oneDNN's execution alone, not the framework around it)"
              + (f"; the median of {args.processes} processes per framework, taking turns (lowest-highest process)"
                 if args.processes > 1 else ""), "",
              "| in -> out | size | kernel | TF implementation | TF ms | PyTorch implementation | PyTorch ms | TF / PyTorch, time |",
              "|---|---|---|---|---|---|---|---|"]
    for shape in SHAPES[args.shapes][1]:
        for propagation in ("forward", "backward_data", "backward_weights"):
            if (shape, propagation) not in tf_calls or (shape, propagation) not in pt_calls:
                continue
            (tf_impl, tf_ms), (pt_impl, pt_ms) = tf_calls[shape, propagation], pt_calls[shape, propagation]
            lines.append(f"| {shape[0]} -> {shape[1]} | {shape[2]}x{shape[2]} | {propagation} | `{tf_impl}` | "
                         f"{spread(tf_ms)} | `{pt_impl}` | {spread(pt_ms)} | "
                         f"{statistics.median(tf_ms) / statistics.median(pt_ms):.2f} |")
    return "\n".join(lines) + "\n"


def spread(ms: list) -> str:
    """The median of the processes' times, with their range when there are several."""
    median = f"{statistics.median(ms):.2f}"
    return median if len(ms) == 1 else f"{median} ({min(ms):.2f}-{max(ms):.2f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--shapes", default="vgg16", choices=list(SHAPES), help="whose conv shapes and batch")
    parser.add_argument("--onednn", action="store_true",
                        help="each framework's oneDNN version, implementations and primitive times instead")
    parser.add_argument("--threads", type=int, help="threads for both frameworks (default: every core)")
    parser.add_argument("--processes", type=int, default=1,
                        help="measure each framework in this many processes, taking turns (default 1)")
    parser.add_argument("--out", help="markdown file to write (default: print)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None and args.threads < 1:
        raise KcifarError(f"--threads {args.threads}: give 1 or more")
    if args.processes < 1:
        raise KcifarError(f"--processes {args.processes}: give 1 or more")
    if args.out:  # refused before the benchmark's minutes, not after
        check_writable(Path(args.out).parent, "--out")
    if args.worker:
        return worker(args.worker, args.precision, args.shapes, args.onednn, args.threads)
    from kcifar import machine

    provenance = machine.provenance()  # the code that runs
    measured = measure_in_turns(args.precision, args.shapes, args.threads, args.onednn, args.processes)
    text = (onednn_report if args.onednn else report)(args, provenance, measured)
    publish(text, args.out)


if __name__ == "__main__":  # a bad input is one line, not a traceback
    from kcifar.cli import command

    command(main)()
