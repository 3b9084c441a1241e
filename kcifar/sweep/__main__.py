"""``python -m kcifar.sweep STUDY.toml``: run (or continue) a study, then write its summary."""

if __name__ == "__main__":  # before TensorFlow loads, which reads its oneDNN switch once
    from kcifar.cli import start_command

    start_command()

import shlex
import sys

from kcifar import cli as kcli, fileio
from kcifar.sweep import estimate, runner, summary
from kcifar.sweep.study import load_study


def parse_args(argv=None):
    parser = kcli.parser(
        "sweep", "Run every unfinished cell x seed of a study (finished runs are skipped, an interrupted one "
                 "resumes), then write <study>.md, .csv and figures. See kcifar/sweep/study.py for the file format. "
                 "Exits 1, naming them, when runs failed (the others are trained and summarised).",
        shared=("runs_dir", "data_dir", "log"), log_default="quiet")
    parser.add_argument("study", help="study file, e.g. experiments/sweeps/s0_study1.toml")
    parser.add_argument("--out", help="where the summary goes (default: RUNS_DIR/<study>); another folder, e.g. "
                                      "experiments/results/<study>, also gets each run's small files")
    parser.add_argument("--budget-min", type=float, help="start no new run after this many minutes")
    parser.add_argument("--dry-run", action="store_true", help="list the cells with a time estimate; train nothing")
    parser.add_argument("--summarize", action="store_true", help="only write the summary of the runs finished so far")
    return parser.parse_args(argv)


@kcli.command
def main(argv=None):
    args = parse_args(argv)
    command = "python -m kcifar.sweep " + shlex.join(sys.argv[1:] if argv is None else argv)
    study = load_study(args.study)
    if args.dry_run:
        print(estimate.describe(study, estimate.estimate(study, args.runs_dir), args.runs_dir))
        return
    for folder in {args.runs_dir, args.out or args.runs_dir}:
        fileio.check_writable(folder)
    progress = None
    if not args.summarize:
        progress = runner.run_study(study, args.runs_dir, args.data_dir, args.budget_min, command,
                                    verbose=0 if args.log == "quiet" else 2)
    for path in summary.write_summary(study, args.runs_dir, args.out, command):
        print(f"wrote {path}")
    if progress and progress.failed:
        for name, error in progress.failed:
            print(f"error: run {name} failed: {error}", file=sys.stderr)
        print(f"error: {len(progress.failed)} run(s) of {study.name} failed; the same command tries them again",
              file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
