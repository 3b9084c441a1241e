"""A minimal reproduction: one 3x3 convolution's training step, TensorFlow against PyTorch.

VGG16 in bfloat16 trains slower in kcifar than in PyTorch on an AMX CPU
(experiments/results/speed_*.md) while the models around the convolutions
are the same. This times the convolution alone, at VGG16's layer shapes on
CIFAR (batch 64, channels/size 64/32 ... 512/2), forward and forward+backward
(gradients for the input and the kernel), in each framework's fast CPU path:
TensorFlow with oneDNN on, NHWC, a `tf.function`; PyTorch channels_last. Both
call oneDNN; the numbers show which side of the gap the kernels are on.

    python experiments/bench_conv_layers.py [--precision bfloat16] [--out FILE]
"""

if __name__ == "__main__":
    from kcifar.errors import start_command

    start_command()  # oneDNN on, before TensorFlow loads

import argparse
import datetime
import os
import subprocess
import sys
import time

SHAPES = [(64, 32), (128, 16), (256, 8), (512, 4), (512, 2)]  # (channels, height = width): VGG16's conv sizes
BATCH, SECONDS = 64, 2.0


def tf_step(channels, size, precision):
    import tensorflow as tf

    dtype = tf.bfloat16 if precision == "bfloat16" else tf.float32
    x = tf.random.normal((BATCH, size, size, channels), dtype=dtype)
    kernel = tf.Variable(tf.random.normal((3, 3, channels, channels), dtype=dtype))

    @tf.function
    def forward():
        return tf.nn.conv2d(x, kernel, 1, "SAME")

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.nn.conv2d(x, kernel, 1, "SAME"))
        return tape.gradient(loss, [x, kernel])

    return (lambda: forward().numpy()), (lambda: [g.numpy() for g in forward_backward()])


def torch_step(channels, size, precision):
    import torch

    torch.set_num_threads(os.cpu_count())
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    x = torch.randn(BATCH, channels, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(dtype).to(memory_format=torch.channels_last)

    def forward():
        with torch.no_grad():
            conv(x)

    def forward_backward():
        x.grad, conv.weight.grad = None, None
        conv(x).sum().backward()

    return forward, forward_backward


def gflops(fn, flops):
    for _ in range(3):
        fn()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < SECONDS:
        fn()
        reps += 1
    return flops * reps / (time.perf_counter() - start) / 1e9


def worker(framework, precision):
    """One framework in its own process: GFLOPS per shape, forward and forward+backward."""
    make = tf_step if framework == "tf" else torch_step
    for channels, size in SHAPES:
        flops = 2 * BATCH * size * size * channels * channels * 9
        forward, forward_backward = make(channels, size, precision)
        print(f"{channels} {size} {gflops(forward, flops):.0f} {gflops(forward_backward, 3 * flops):.0f}", flush=True)


def measure(framework, precision) -> dict:
    output = subprocess.run([sys.executable, __file__, "--worker", framework, "--precision", precision],
                            capture_output=True, text=True, check=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}).stdout
    return {(int(c), int(s)): (float(f), float(fb)) for c, s, f, fb in (line.split() for line in output.splitlines())}


def report(precision, results) -> str:
    from kcifar import run

    lines = ["# One 3x3 convolution's training step: TensorFlow against PyTorch", "",
             f"- command: `{run.command_line()}`", f"- CPU: {run.cpu_description()}; {os.cpu_count()} cores",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} (UTC); commit: {run.code_version()}",
             f"- {precision}, batch {BATCH}, 'same' padding, no bias; GFLOPS (forward = 2 x MACs; "
             "forward+backward = 3x that)", "",
             "| channels | size | TF forward | PyTorch forward | TF fwd+bwd | PyTorch fwd+bwd | TF / PyTorch, fwd+bwd |",
             "|---|---|---|---|---|---|---|"]
    for shape in SHAPES:
        (tf_f, tf_fb), (pt_f, pt_fb) = results["tf"][shape], results["torch"][shape]
        lines.append(f"| {shape[0]} | {shape[1]}x{shape[1]} | {tf_f:,.0f} | {pt_f:,.0f} | {tf_fb:,.0f} | "
                     f"{pt_fb:,.0f} | {tf_fb / pt_fb:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--out", help="markdown file to write (default: print)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.precision)
    text = report(args.precision, {fw: measure(fw, args.precision) for fw in ("tf", "torch")})
    if args.out:
        from kcifar.fileio import write_text

        write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
