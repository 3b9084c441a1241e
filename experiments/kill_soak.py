"""The long kill soak (issue 18): ``kcifar.train``, ``kcifar.finetune`` and ``kcifar.sweep``
killed with SIGKILL many times at seeded random moments, the same command started again after
each kill, and the end compared with the same command never stopped.

    python experiments/kill_soak.py --seed 0 --random 9 --out experiments/results/kill_soak.md

The commands, data and comparison are tests/test_kill_soak.py's (tests/soak.py): a synthetic
CIFAR-10 of 1,000 training images, ``--deterministic``. The kills: each
command's named moments, in the order a run reaches them (a file the process writes shows
each: a best-model save, a backup write, the first figure, ...), with kills at seeded random
delays after the process opened its run directory put among them at seeded places;
``soak.phase`` tells afterwards what each kill hit. A command that ends before its kill
(its moment never came) simply finishes; the next kill starts it again only if it is unfinished.
"""

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import soak  # noqa: E402
from conftest import tiny_backbone, write_cifar10  # noqa: E402
from test_kill_soak import EPOCHS, STUDY, TRAIN  # noqa: E402


def opened_after(run_dirs, since, delay):
    """A condition: ``delay`` seconds after a recipe.toml of ``run_dirs()`` was written after ``since``."""
    seen = []

    def condition():
        if not seen and any((d / "recipe.toml").exists() and (d / "recipe.toml").stat().st_mtime > since
                            for d in run_dirs()):
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] >= delay

    return condition


def commands(work: Path):
    """(name, module, args, env, run directories, the one being trained, epochs, feature folder, named moments)."""
    data = {"KCIFAR_DATA_DIR": str(work / "data")}
    train_dir = work / "killed" / "train" / "r"
    ft_dir, features = work / "killed" / "finetune" / "f", work / "keras_killed" / "kcifar" / "features"
    ft_args = ["--backbone", tiny_backbone(work / "backbone"), "--quiet",
               *(f"--set={s}" for s in ("name=f", "data.val_size=100", "train.batch_size=50", "train.deterministic=true",
                                        "early_stopping.enabled=false", "finetune.unfreeze_blocks=1",
                                        "finetune.stage1_epochs=3", "finetune.stage2_epochs=2"))]
    (work / "soak.toml").write_text(STUDY)
    from kcifar.sweep.study import load_study

    cells = [work / "killed" / "sweep" / "soak" / r["name"] for _, _, r in load_study(work / "soak.toml").runs()]

    def training():
        return next((c for c in cells if not (c / "metrics.json").exists()), cells[-1])

    def pngs(d):
        return lambda: d.exists() and any(n.endswith(".png") for n in os.listdir(d))

    def backup(d):
        return lambda: lambda: soak.backup_epoch(d) is not None and soak.backup_writing(d)

    def common(d):  # in the order a run reaches them; the backup write recurs
        return {"best-model save": lambda: lambda: soak.writing(d, "best"),
                "history row before its backup": lambda: lambda: len(soak.history_rows(d)) > (soak.backup_epoch(d) or 0),
                "backup write": backup(d), "mid-epoch": lambda: soak.mid_epoch(d), "backup write again": backup(d),
                "figure writing": lambda: pngs(d)}

    return [
        ("train", "kcifar.train", [*TRAIN, "--runs-dir", train_dir.parent], data, lambda: [train_dir],
         lambda: train_dir, EPOCHS, None,
         {**{k: v for k, v in common(train_dir).items() if k != "figure writing"},
          "final test scoring": lambda: lambda: soak.backup_epoch(train_dir) == EPOCHS, "figure writing": lambda: pngs(train_dir)}),
        ("finetune", "kcifar.finetune", [*ft_args, "--runs-dir", ft_dir.parent],
         {**data, "KERAS_HOME": str(features.parents[1])}, lambda: [ft_dir], lambda: ft_dir, 5, features,
         {"feature cache": lambda: lambda: any(features.glob("*/val.npy.sha256")),
          "stage 1 best-model save": lambda: lambda: soak.writing(ft_dir, "stage1"),
          "stage 1 backup write": backup(ft_dir),
          "stage 2 best-model save": lambda: lambda: soak.writing(ft_dir, "stage2"),
          "stage 2 backup write": lambda: lambda: soak.stages(ft_dir) == ["1"] and soak.backup_epoch(ft_dir) == 3
          and soak.backup_writing(ft_dir),
          "after both stages": lambda: lambda: soak.stages(ft_dir) == ["1", "2"],
          "figure writing": lambda: pngs(ft_dir)}),
        ("sweep", "kcifar.sweep", [work / "soak.toml", "--runs-dir", work / "killed" / "sweep"], data, lambda: cells,
         training, 3, None,
         {f"cell {i + 1} {k}": v for i, c in enumerate(cells) for k, v in common(c).items()
          if k in ("best-model save", "backup write", "figure writing")}),
    ]


def whole_args(args, name):
    """The same command into the uninterrupted run's folders."""
    return [str(a).replace(f"{os.sep}killed{os.sep}", f"{os.sep}whole{os.sep}") for a in args]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random", type=int, default=9, help="kills at random delays, shared among the three "
                                                               "commands, besides each command's named moments")
    parser.add_argument("--out", help="markdown file for the results (default: print only)")
    args = parser.parse_args()
    from common import publish

    from kcifar.machine import provenance

    rng, began = random.Random(args.seed), time.monotonic()
    head = provenance()  # the code that runs
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_cifar10(work / "data", per_batch=200, n_test=200)
        verdicts, table = [], []
        for index, (name, module, cmd, env, run_dirs, training, epochs, features, named) in enumerate(commands(work)):
            log = work / f"{name}.log"
            whole_env = {k: v.replace("keras_killed", "keras_whole") for k, v in env.items()}
            whole = soak.start(module, whole_args(cmd, name), whole_env, work / f"{name}_whole.log")
            kills = []
            schedule = list(named.items())  # in the order the command reaches them
            for _ in range(args.random // 3 + (index < args.random % 3)):
                delay = round(rng.uniform(0, 4), 2)
                schedule.insert(rng.randrange(1, len(schedule) + 1), (  # after the first: it may come once
                    f"random: {delay} s after the run directory was opened",
                    lambda d=delay: opened_after(run_dirs, time.time(), d)))
            for moment, make in schedule:
                if all((d / "metrics.json").exists() for d in run_dirs()):
                    break
                process = soak.start(module, cmd, env, log)
                if soak.kill_when(process, make()):
                    killed = training()
                    kills.append({"label": moment, "phase": soak.phase(killed, epochs, features), "run_dir": killed,
                                  "rows": soak.history_rows(killed)[:soak.backup_epoch(killed) or 0]})
                else:
                    kills.append({"label": moment, "phase": f"not killed: the process ended (exit {process.returncode})",
                                  "run_dir": training(), "rows": []})
            problems = []
            if not all((d / "metrics.json").exists() for d in run_dirs()):
                final = soak.start(module, cmd, env, log)
                problems += [f"the last rerun exited {final.wait()}"] if final.wait() else []
            problems += [f"the uninterrupted run exited {whole.wait()}"] if whole.wait() else []
            for d in run_dirs():
                problems += [f"{d.name}: {p}" for p in soak.differences(Path(whole_args([d], name)[0]), d)]
            problems += [f"epochs trained again after: {k}" for k in soak.kept_rows_lost(kills)]
            problems += [f"temporaries left: {t}" for t in soak.temporaries(work / "killed" / name)]
            verdicts.append((name, sum(not k["phase"].startswith("not killed") for k in kills), problems))
            table += [f"| {name} | {i} | {k['label']} | {k['phase']} |" for i, k in enumerate(kills, 1)]
            print(f"{name}: {len(kills)} moments, {'equal' if not problems else problems}", flush=True)
    minutes = (time.monotonic() - began) / 60
    lines = [
        "# Kill soak: train, finetune and sweep killed (SIGKILL) at seeded random moments",
        "", *head,
        f"- Wall time: {minutes:.1f} min (one TensorFlow start-up per process)",
        "- The commands, the data (a synthetic CIFAR-10 of 1,000 training and 200 test images) and the comparison "
        "are those of `tests/test_kill_soak.py` (`tests/soak.py`): after the last kill the same command runs to its "
        "end; it is compared with the same command never stopped, run beside it: best.keras weights exactly, "
        "history.csv but its timing columns, metrics.json's scores, evaluation.json; no epoch a backup held trained "
        "again, no temporary file left.", "",
        "| command | kills | verdict |", "|---|---|---|",
        *(f"| {name} | {n} | {'equal to the uninterrupted run' if not p else '; '.join(p)} |" for name, n, p in verdicts),
        "", "Each moment (a named one is shown by the files the process writes; the phase is what the files "
        "it left show, `soak.phase`):", "",
        "| command | # | moment aimed at | phase hit |", "|---|---|---|---|", *table, ""]
    text = "\n".join(lines)
    publish(text, args.out)
    return 0 if all(not p for _, _, p in verdicts) else 1


if __name__ == "__main__":  # a bad input is one line, not a traceback
    from kcifar.cli import command

    sys.exit(command(main)())
