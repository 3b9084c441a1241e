"""Tables for people and for spreadsheets: a markdown table's lines, a CSV file's text.
One writer of each, so every report and study summary formats its tables alike."""

import csv
import io


def markdown(header, rows) -> list:
    """The lines of a markdown table: ``header``, the rule, then one line per row of cells
    (strings; a ``|`` inside a cell is escaped so the table keeps its columns)."""
    def line(cells):
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]


def csv_text(rows, columns) -> str:
    """CSV text of ``rows`` (dicts) with ``columns`` in order; None is an empty cell."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return out.getvalue()
