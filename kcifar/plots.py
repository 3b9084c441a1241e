"""Figures of an evaluation, drawn with matplotlib's object API (Agg canvas, no pyplot state).

Every function draws one PNG of a fixed pixel size (``size_*`` functions,
at ``DPI``), writes it atomically and returns its path. Layout choices:
confusion matrices are normalised per true class on a square-root colour
scale so that small confusions stay visible beside the diagonal; with 100
classes they are ordered by the given groups (CIFAR-100 super-classes).
"""

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kcifar.fileio import atomic_path

DPI = 100
WRONG = "#d62728"
RIGHT = "#2a7f2a"
ANNOTATE_UP_TO = 20  # classes; beyond that the cells are too small for numbers


def size_learning_curves():
    return (15.0, 4.8)


def size_confusion(num_classes):
    if num_classes <= ANNOTATE_UP_TO:
        return (9.5, 8.0)
    side = 4.0 + 0.16 * num_classes
    return (side + 4.0, side)  # room for group names on the right and the colour bar


def size_per_class(num_classes):
    return (9.0, max(4.0, 1.6 + 0.2 * num_classes))


def size_grid(num_images, columns=8):
    rows = max(1, -(-num_images // columns))
    return (13.0, 0.8 + 1.9 * rows)


def _save(fig, path):
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    return path


def learning_curves(history, path, best_index=None, monitor="val_accuracy", title="Learning curves"):
    """Loss, accuracy and learning rate per epoch (train vs validation), best epoch marked.

    ``history`` maps CSVLogger columns to arrays; ``epoch`` is 0-based there
    and shown 1-based here.
    """
    fig = Figure(figsize=size_learning_curves(), layout="constrained")
    epochs = np.asarray(history["epoch"]) + 1
    panels = [("loss", "Loss", "cross-entropy", ["loss", "val_loss"]),
              ("accuracy", "Accuracy", "accuracy (fraction of images)", ["accuracy", "val_accuracy", "val_top5"]),
              ("learning rate", "Learning rate", "learning rate", ["learning_rate"])]
    names = {"loss": "train", "val_loss": "validation", "accuracy": "train top-1", "val_accuracy": "validation top-1",
             "val_top5": "validation top-5", "learning_rate": "learning rate"}
    for ax, (what, panel_title, ylabel, columns) in zip(fig.subplots(1, 3), panels):
        shown = [c for c in columns if c in history and not np.all(np.isnan(history[c]))]
        for column in shown:
            ax.plot(epochs, history[column], marker="o" if len(epochs) <= 30 else None, markersize=3,
                    linestyle="--" if column == "val_top5" else "-", label=names[column])
        if not shown:
            ax.text(0.5, 0.5, f"no {what} logged", ha="center", va="center", transform=ax.transAxes)
        if what == "learning rate" and shown and np.nanmin(history[shown[0]]) > 0:
            ax.set_yscale("log")
        if best_index is not None:
            best_value = history[monitor][best_index]
            ax.axvline(epochs[best_index], color="black", linestyle=":", linewidth=1.2,
                       label=f"best epoch {int(epochs[best_index])} ({monitor} {best_value:.4g})")
        ax.set_title(panel_title)
        _epoch_axes(ax, ylabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=9)
    fig.suptitle(title)
    return _save(fig, path)


def _epoch_axes(ax, ylabel):
    """Whole epochs along x, ``ylabel`` up, a light grid."""
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def confusion(counts, class_names, path, groups=None, title="Confusion matrix"):
    """Rows = true class, columns = predicted; colour = fraction of the true class.

    ``groups`` [(name, [class indices])] orders the classes and draws the
    group boundaries and names (used for CIFAR-100 super-classes).
    """
    counts = np.asarray(counts)
    n = len(class_names)
    order = [i for _, members in groups for i in members] if groups else list(range(n))
    counts = counts[np.ix_(order, order)]
    labels = [class_names[i] for i in order]
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.nan_to_num(counts / counts.sum(axis=1, keepdims=True))
    fig = Figure(figsize=size_confusion(n), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(fraction, cmap="Blues", norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class (square-root colour scale)")
    font = 10 if n <= ANNOTATE_UP_TO else 6.5
    ax.set_xticks(range(n), labels, rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= ANNOTATE_UP_TO:
        for (i, j), count in np.ndenumerate(counts):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=8 if n <= 10 else 6,
                        color="white" if fraction[i, j] > 0.45 else "black")
    if groups:
        _mark_groups(ax, groups)
    ax.set_title(title)
    return _save(fig, path)


def _mark_groups(ax, groups):
    """Lines between groups, and the group names on a top axis."""
    edges = np.cumsum([len(members) for _, members in groups])
    for edge in edges[:-1]:
        ax.axhline(edge - 0.5, color="gray", linewidth=0.6)
        ax.axvline(edge - 0.5, color="gray", linewidth=0.6)
    centres = edges - np.array([len(members) for _, members in groups]) / 2 - 0.5
    names = [name.replace("_", " ") for name, _ in groups]
    top, right = ax.secondary_xaxis("top"), ax.secondary_yaxis("right")
    top.set_xticks(centres, names, rotation=90, fontsize=8)
    right.set_yticks(centres, names, fontsize=8)
    top.tick_params(length=0)
    right.tick_params(length=0)


def per_class_accuracy(counts, class_names, path, title="Accuracy per class"):
    """Horizontal bars, best class on top, the overall accuracy as a line."""
    counts = np.asarray(counts)
    totals = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.diag(counts) / totals
    order = np.argsort(np.nan_to_num(accuracy, nan=-1.0), kind="stable")  # bottom to top
    n = len(class_names)
    fig = Figure(figsize=size_per_class(n), layout="constrained")
    ax = fig.subplots()
    ax.barh(range(n), np.nan_to_num(accuracy[order]) * 100, color="#4c72b0")
    ax.set_yticks(range(n), [f"{class_names[i]} (n={totals[i]})" for i in order],
                  fontsize=10 if n <= ANNOTATE_UP_TO else 7)
    ax.set_ylim(-0.6, n - 0.4)
    overall = np.trace(counts) / max(counts.sum(), 1) * 100
    ax.axvline(overall, color="black", linestyle=":", label=f"overall {overall:.2f} %")
    if n <= ANNOTATE_UP_TO:
        for row, i in enumerate(order):
            if totals[i]:
                inside = accuracy[i] > 0.15
                ax.text(accuracy[i] * 100 + (-1 if inside else 1), row, f"{accuracy[i] * 100:.1f} %",
                        va="center", ha="right" if inside else "left", fontsize=9,
                        color="white" if inside else "black")
    ax.set_xlim(0, 108)
    ax.set_xlabel("top-1 accuracy (%)")
    ax.set_ylabel("true class (number of images)")
    ax.legend(loc="lower right")
    ax.set_title(title)
    return _save(fig, path)


def prediction_grid(images, true, probabilities, class_names, path, title="Predictions", columns=8):
    """Images with predicted class and probability over the true class; wrong ones framed red."""
    images, true, probabilities = np.asarray(images), np.asarray(true), np.asarray(probabilities)
    count = len(images)
    rows = max(1, -(-count // columns))
    fig = Figure(figsize=size_grid(count, columns), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for i, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= count:
            ax.set_axis_off()
            continue
        predicted = int(probabilities[i].argmax())
        wrong = predicted != int(true[i])
        ax.imshow(images[i], interpolation="nearest")
        ax.set_title(f"{'WRONG ' if wrong else ''}{class_names[predicted]} {probabilities[i, predicted]:.0%}\n"
                     f"true: {class_names[int(true[i])]}", fontsize=8, color=WRONG if wrong else RIGHT)
        for spine in ax.spines.values():
            spine.set_color(WRONG if wrong else "lightgray")
            spine.set_linewidth(3 if wrong else 0.5)
    wrong_count = int(np.sum(probabilities.argmax(axis=1) != true)) if count else 0
    fig.suptitle(f"{title}\ntop line: predicted class and its probability; bottom line: true class; "
                 f"{wrong_count} of {count} wrong (framed red)")
    return _save(fig, path)


def size_sweep():
    return (11.0, 5.5)


def sweep_accuracy(x_labels, series, path, xlabel, title="Test top-1 per cell", connect=True):
    """Mean ± std of each x (error bars) with every seed as a dot; one line per series.

    ``series`` maps a label to one list of values (percent, one per seed) per x label;
    the series are shifted a little sideways so that their bars do not hide each other.
    ``connect=False`` draws no line between the x labels (cells that are not a scale).
    """
    fig = Figure(figsize=size_sweep(), layout="constrained")
    ax = fig.subplots()
    positions = np.arange(len(x_labels), dtype=float)
    width = 0.3 / max(1, len(series) - 1) if len(series) > 1 else 0.0
    for i, (label, values) in enumerate(series.items()):
        shift = positions + (i - (len(series) - 1) / 2) * width
        means = np.array([np.mean(v) if v else np.nan for v in values])
        stds = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values])
        line = ax.errorbar(shift, means, yerr=stds, marker="o", capsize=4, label=label,
                           linestyle="-" if connect else "none")
        for x, v in zip(shift, values):
            ax.scatter([x] * len(v), v, s=12, color=line[0].get_color(), alpha=0.45)
    ax.set_xticks(positions, x_labels, rotation=30 if max(map(len, x_labels), default=0) > 8 else 0, ha="right"
                  if max(map(len, x_labels), default=0) > 8 else "center")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    ax.set_title(title)
    return _save(fig, path)


def overlaid_curves(cells, path, title="Learning curves", with_training=False):
    """Validation top-1 and validation loss per epoch of every run, one colour per cell.

    ``cells`` is [(cell name, [history dicts of its runs])], histories as in
    ``learning_curves``; runs without a validation split (their ``val_`` columns
    missing or all NaN) show their training curves, and the axes say so.
    ``with_training``: the training curves too, dashed in the cell's colour, beside
    the validation ones (overfitting is the gap between them; S2 and S4 show it so).
    """
    fig = Figure(figsize=size_learning_curves(), layout="constrained")
    axes = fig.subplots(1, 2)
    palette = colormaps["tab10" if len(cells) <= 10 else "tab20"].colors
    kinds, dashed = set(), False
    for i, (name, histories) in enumerate(cells):
        colour = palette[i % len(palette)]
        for run, history in enumerate(histories):
            epochs = np.asarray(history["epoch"]) + 1
            style = dict(color=colour, alpha=0.8, markersize=3, marker="o" if len(epochs) <= 30 else None)
            for ax, column in zip(axes, ("accuracy", "loss")):
                shown = f"val_{column}" if _has_values(history, f"val_{column}") else column
                if _has_values(history, shown):
                    kinds.add("validation" if shown.startswith("val_") else "training")
                    ax.plot(epochs, history[shown], linewidth=1.2, label=name if run == 0 else None, **style)
                if with_training and shown != column and _has_values(history, column):
                    dashed = True
                    ax.plot(epochs, history[column], linewidth=0.9, linestyle="--", **style)
    split = " or ".join(sorted(kinds, reverse=True)) or "validation"
    split += " (solid), training (dashed)" if dashed else ""
    for ax, ylabel in zip(axes, (f"{split} top-1 (fraction of images)", f"{split} loss (cross-entropy)")):
        _epoch_axes(ax, ylabel)
    axes[0].legend(fontsize=8, ncol=2 if len(cells) > 8 else 1)
    fig.suptitle(title + " (one line per run, one colour per cell)")
    return _save(fig, path)


def _has_values(history, column) -> bool:
    """Whether ``history`` has ``column`` with a finite value (a run without validation writes NA)."""
    return column in history and bool(np.isfinite(np.asarray(history[column], dtype=float)).any())


def progression(steps, documented, ours, path, title, documented_label, ours_label):
    """The documented figure of each step (left) and ours (right), each on its own axis: the two may
    be on different data sets, whose figures do not compare, so only the shapes are set side by side.

    ``documented`` holds a fraction or None per step, ``ours`` a (mean, std) in percent or
    None per step; each line joins the steps that have a value, and a step without one has no marker.
    """
    fig = Figure(figsize=(15.0, 5.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    x = np.arange(len(steps), dtype=float)
    shown = [i for i, d in enumerate(documented) if d is not None]
    left.plot(x[shown], [100 * documented[i] for i in shown], marker="s", linestyle="--", color="C0")
    shown = [i for i, o in enumerate(ours) if o]
    right.errorbar(x[shown], [ours[i][0] for i in shown], yerr=[ours[i][1] or 0.0 for i in shown],
                   marker="o", capsize=4, color="C1")
    for ax, label in ((left, documented_label), (right, ours_label)):
        ax.set_xticks(x, steps)
        ax.set_xlabel("step")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.set_title(label, fontsize=10)
    fig.suptitle(title)
    return _save(fig, path)
