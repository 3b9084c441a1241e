"""Studies: a grid of recipes x seeds, run seed by seed, resumable, and summarised.

    python -m kcifar.sweep experiments/sweeps/<study>.toml [--budget-min N] [--dry-run] [--summarize]

``study`` reads a study file into cells and their recipes; ``runner`` trains
the unfinished runs through ``kcifar.train.train``; ``summary`` writes the
table and figures (and records the small files into ``experiments/results``);
``estimate`` says how long the rest will take here.
"""
