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

    python experiments/bench_conv_layers.py [--precision bfloat16] [--shapes vgg16] [--out FILE]
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

    torch.set_num_threads(os.cpu_count())
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


def worker(framework, precision, shapes):
    """One framework in its own process: GFLOPS per shape of forward, forward+backward, backward
    data, backward weights and (TensorFlow) backward weights as matmuls."""
    make = tf_step if framework == "tf" else torch_step
    batch, sizes = SHAPES[shapes]
    for cin, cout, size in sizes:
        flops = 2 * batch * size * size * cin * cout * 9
        forward, forward_backward, data, weights, by_taps = make(batch, cin, cout, size, precision)
        rates = [gflops(forward, flops), gflops(forward_backward, 3 * flops), gflops(data, flops), gflops(weights, flops)]
        rates += [gflops(by_taps, flops)] if by_taps else []
        print(cin, cout, size, *(f"{rate:.0f}" for rate in rates), flush=True)


def measure(framework, precision, shapes) -> dict:
    output = subprocess.run([sys.executable, __file__, "--worker", framework, "--precision", precision,
                             "--shapes", shapes], capture_output=True, text=True, check=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}).stdout
    rows = (line.split() for line in output.splitlines())
    return {tuple(map(int, row[:3])): tuple(map(float, row[3:])) for row in rows}


def report(precision, shapes, results) -> str:
    from kcifar import machine

    batch, sizes = SHAPES[shapes]
    lines = ["# One 3x3 convolution's training step: TensorFlow against PyTorch", "",
             f"- command: `{machine.command_line()}`", f"- CPU: {machine.cpu_description()}; {os.cpu_count()} cores",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} (UTC); commit: {machine.code_version()}",
             f"- {shapes}'s conv shapes, {precision}, batch {batch}, 'same' padding, no bias; GFLOPS (forward, "
             "backward data and backward weights = 2 x MACs each; forward+backward = 3x that)", "",
             "| in -> out | size | TF fwd | PyTorch fwd | TF fwd+bwd | PyTorch fwd+bwd | TF / PyTorch, fwd+bwd "
             "| TF bwd data | PyTorch bwd data | TF bwd weights | PyTorch bwd weights | TF bwd weights as matmuls "
             "(kcifar) | matmuls / TF's kernel |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for shape in sizes:
        (tf_f, tf_fb, tf_d, tf_w, tf_m), (pt_f, pt_fb, pt_d, pt_w) = results["tf"][shape], results["torch"][shape]
        lines.append(f"| {shape[0]} -> {shape[1]} | {shape[2]}x{shape[2]} | {tf_f:,.0f} | {pt_f:,.0f} | {tf_fb:,.0f} | "
                     f"{pt_fb:,.0f} | {tf_fb / pt_fb:.2f} | {tf_d:,.0f} | {pt_d:,.0f} | {tf_w:,.0f} | {pt_w:,.0f} | "
                     f"{tf_m:,.0f} | {tf_m / tf_w:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--shapes", default="vgg16", choices=list(SHAPES), help="whose conv shapes and batch")
    parser.add_argument("--out", help="markdown file to write (default: print)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.precision, args.shapes)
    text = report(args.precision, args.shapes, {fw: measure(fw, args.precision, args.shapes) for fw in ("tf", "torch")})
    if args.out:
        from kcifar.fileio import write_text

        write_text(args.out, text)
    print(text)


if __name__ == "__main__":  # a bad input is one line, not a traceback
    from kcifar.errors import cli

    cli(main)()
