"""The machine a run is on: devices and precision, and how a result records where it ran.

Strategy (``tf.distribute``), the precision ``auto`` picks from the CPU's flags, XLA,
and the provenance every result file carries: the CPU (model name, AVX-512 and AMX
flags), whether oneDNN really runs, the versions, the commit and the command as typed.
"""

import datetime
import functools
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

from kcifar import __version__
from kcifar.errors import KcifarError



# ------------------------------------------------------------ devices and precision


def _is_gpu_machine():
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def make_strategy(name: str):
    """auto: MirroredStrategy over all GPUs when there are several, else the default;
    multiworker: MultiWorkerMirroredStrategy over the cluster of ``TF_CONFIG`` (kcifar.multiworker)."""
    import tensorflow as tf

    if name == "multiworker":
        from kcifar import multiworker  # its private Keras module only where used

        return multiworker.make_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return _mirrored_strategy(tuple(d.name for d in (gpus or tf.config.list_logical_devices("CPU"))))


@functools.cache
def _mirrored_strategy(devices: tuple):
    """One MirroredStrategy per process (and devices): a second one numbers its all-reduces from
    the start again, and TensorFlow takes them for the first one's (InvalidArgumentError "Shape
    mismatch in the collective instance" at the first step of another model in the same process,
    as a sweep trains)."""
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(devices=list(devices))


# CPU flags of native bfloat16 arithmetic: AMX tiles (Intel Xeon since Sapphire Rapids) or
# AVX512_BF16 (Intel Cooper Lake, AMD Zen 4). Without them bfloat16 is emulated and slower.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def auto_precision() -> str:
    """mixed_float16 on a GPU; on a CPU mixed_bfloat16 where it has native bfloat16, else float32.

    bfloat16 is emulated, and slower, on CPUs without those flags (measured:
    experiments/results/speed_*.md).
    """
    if _is_gpu_machine():
        return "mixed_float16"
    return "mixed_bfloat16" if cpu_flags() & set(BF16_CPU_FLAGS) else "float32"


def set_precision(precision: str):
    """Keras' global dtype policy; 'auto' is ``auto_precision()``."""
    import keras

    if precision == "auto":
        precision = auto_precision()
    keras.mixed_precision.set_global_policy(precision)
    return precision


# Which 3x3 convolutions take their kernel gradient as matmuls (kcifar.models.parts.
# conv3x3_matmul_kernel_grad), by CPU flag and precision where the matmuls were measured faster
# than TensorFlow's kernel (experiments/results/conv_grad_layers_*.md): (largest input, height x
# width; fewest input channels). Elsewhere TensorFlow's own kernel, until measured there.
MATMUL_KERNEL_GRAD = {("avx512_bf16", "mixed_bfloat16"): (64, 128)}


def matmul_kernel_grad_rule(conv_grad: str) -> tuple[int, int]:
    """``train.conv_grad`` as (largest input positions, fewest input channels) of the convolutions
    to route: "native" none, "matmul" every eligible one, "auto" the rule measured for this CPU
    and precision policy (none on a GPU, on AMX CPUs and on CPUs without native bfloat16)."""
    import keras

    if conv_grad != "auto":
        return (0, 0) if conv_grad == "native" else (sys.maxsize, 0)
    flags, policy = cpu_flags(), keras.mixed_precision.global_policy().name
    if _is_gpu_machine() or "amx_bf16" in flags:
        return 0, 0
    return next((rule for (flag, precision), rule in MATMUL_KERNEL_GRAD.items()
                 if flag in flags and precision == policy), (0, 0))


def jit_enabled(jit: str) -> bool:
    """Whether the training step is compiled by XLA under the ``tf.distribute`` strategy in scope:
    "auto" on a GPU with one replica (XLA was measured slower on our CPUs). Keras 3 compiles the
    step of all replicas as one XLA function, which cannot reach the variables of the other devices
    (InvalidArgumentError "Trying to access resource ... located in device"; Keras' own
    ``jit_compile="auto"`` is off under ``tf.distribute`` too): several replicas train without XLA,
    and "on" there is refused."""
    import tensorflow as tf

    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if jit == "on" and replicas > 1:
        raise KcifarError(f"train.jit='on' cannot train over the {replicas} replicas of this strategy (Keras 3 "
                          "compiles their step as one XLA function, which cannot reach the other devices' "
                          "variables); use train.jit='auto' or 'off', or train.strategy='default' (one device)")
    return jit == "on" or (jit == "auto" and replicas == 1 and _is_gpu_machine())



# ------------------------------------------------------------ recording


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags() -> set:
    """The CPU's feature flags (``avx512_bf16``, ``amx_bf16``, ...) from /proc/cpuinfo; empty elsewhere."""
    return set(next((line.split(":", 1)[1].split() for line in _cpuinfo().splitlines()
                     if line.startswith("flags")), []))


def cpu_description() -> str:
    """The CPU's model name and its AVX-512 and AMX flags (speed figures depend on them), from /proc/cpuinfo."""
    info = _cpuinfo()
    if not info:
        return f"{platform.processor() or 'unknown'}; AVX-512: unknown"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = cpu_flags()
    avx512 = sorted(flag for flag in flags if flag.startswith("avx512"))
    amx = sorted(flag for flag in flags if flag.startswith("amx"))
    return f"{model}; AVX-512: {' '.join(avx512) or 'none'}" + (f"; AMX: {' '.join(amx)}" if amx else "")


def cpu_steal_seconds(stat=Path("/proc/stat")):
    """CPU time the hypervisor gave to other machines since boot, all cores summed, in seconds (the
    ``steal`` field of /proc/stat's ``cpu`` line); None where there is none (not Linux). A benchmark
    on a shared VM takes it before and after, to say how much of the CPU it did not have."""
    try:
        fields = Path(stat).read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if fields[:1] == ["cpu"] and len(fields) > 8 else None


CPU_DESCRIPTION = re.compile(r"([^;]+); AVX-512: ([^;]*)(?:; AMX: ([^;]*))?")


def _precision_flag(avx512: str, amx: str) -> str:
    flags = set(f"{avx512} {amx}".split())
    if "amx_bf16" in flags:
        return "AMX-BF16"
    if "avx512_bf16" in flags:
        return "AVX512_BF16"
    return {"none": "no AVX-512", "unknown": "flags unknown"}.get(avx512.strip(), "AVX-512 (no bf16)")


def short_cpu(description: str) -> str:
    """One or more ``cpu_description()`` strings (joined by "; ") as "vendor family, the flag that
    decides kcifar's precision": "AMD EPYC, AVX512_BF16", "Intel Xeon, AMX-BF16", "Intel Xeon,
    AVX-512 (no bf16)", "AMD EPYC, no AVX-512"; several CPUs joined by " / "."""
    names = [" ".join(re.sub(r"\((R|TM)\)", "", model).split()[:2]) + ", " + _precision_flag(avx512, amx)
             for model, avx512, amx in CPU_DESCRIPTION.findall(description or "")]
    return " / ".join(dict.fromkeys(names)) or "not recorded"


def onednn_enabled() -> bool:
    """Whether this TensorFlow process really runs oneDNN kernels (not only what the variable asks)."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def environment() -> dict:
    import keras
    import tensorflow as tf

    return {
        "versions": {"kcifar": __version__, "python": platform.python_version(), "tensorflow": tf.__version__,
                     "keras": keras.__version__, "numpy": np.__version__},
        "machine": {"arch": platform.machine(), "cpus": os.cpu_count(),
                    "cpu": cpu_description(),
                    "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
                    "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
                    "TF_NUM_INTRAOP_THREADS": os.environ.get("TF_NUM_INTRAOP_THREADS"),
                    "TF_NUM_INTEROP_THREADS": os.environ.get("TF_NUM_INTEROP_THREADS"),
                    "onednn": onednn_enabled()},
        "precision": keras.mixed_precision.global_policy().name,
    }


REPOSITORY = Path(__file__).resolve().parent.parent


def command_line(argv=None) -> str:
    """This process's command as typed from the repository root, without the interpreter's
    path: ``python -m kcifar.report ...`` or ``python experiments/x.py ...``; ``argv``
    (default ``sys.argv[1:]``) quoted for a POSIX shell, so the line runs again as written."""
    import __main__

    spec = getattr(__main__, "__spec__", None)
    program = f"-m {spec.name}" if spec else os.path.relpath(Path(sys.argv[0]).resolve(), REPOSITORY)
    return " ".join(["python", program, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])


ABSOLUTE_PATH = re.compile(r"(?<![\w.~])/(?:[^\s/'\"]+/)+([^\s/'\",]+)")


def scrub_paths(text: str) -> str:
    """Absolute paths of this machine -> ``…/<last part>`` (recorded files name no local folder)."""
    return ABSOLUTE_PATH.sub(r"…/\1", text)


def load() -> str:
    """The machine's load as ``uptime`` prints it, for a benchmark's header (what else ran)."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def provenance(cpu_note: str = "") -> list[str]:
    """The lines a result file opens with: the command as typed from the repository root (absolute
    paths scrubbed), the CPU and its cores (``cpu_note`` after them), the date and the commit.
    Call it when the measurement starts: the commit is then the code that ran."""
    return [f"- command: `{scrub_paths(command_line())}`",
            f"- CPU: {cpu_description()}; {os.cpu_count()} cores" + (f"; {cpu_note}" if cpu_note else ""),
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} (UTC); commit: {code_version()}"]


# Written by the commands themselves (results, the report): a change there is not a change of code.
RECORDED_OUTPUT = ("experiments/results", "experiments/REPORT.md", "experiments/REPORT_s1_progression.png")


def code_version() -> str:
    """The commit of the checkout kcifar runs from (``plus uncommitted changes`` when a tracked
    file other than the recorded results differs from it)."""
    root = REPOSITORY
    status = ["status", "--porcelain", "-uno", "--", ".", *(f":(exclude){path}" for path in RECORDED_OUTPUT)]
    try:
        commit, dirty = (subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                        check=True).stdout.strip()
                         for args in (["rev-parse", "--short", "HEAD"], status))
    except (OSError, subprocess.CalledProcessError):
        return "not recorded (not a git checkout)"
    return commit + (" plus uncommitted changes" if dirty else "")

