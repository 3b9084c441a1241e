"""The shape of the house: no import circle, one owner of the run directory's file names,
and the commands that only read results never load TensorFlow."""

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kcifar"
RUN_FILES = {"recipe.toml", "classes.txt", "history.csv", "best.keras", "backup", "stages.json", "segments.json",
             "metrics.json", "evaluation.json", "provenance.json"}


def modules() -> dict:
    """{dotted name: parsed module} of every module of the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        found[name] = ast.parse(path.read_text(encoding="utf-8"))
    return found


def imports(tree, known) -> set:
    """The package's modules ``tree`` imports anywhere (function-level imports too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                      for alias in node.names}
    return {name for name in found if name in known}


def test_no_module_of_the_package_imports_itself_back():
    trees = modules()
    graph = {name: {d for d in imports(tree, trees) if d != name and not name.startswith(d + ".")}
             for name, tree in trees.items()}  # a module importing its own package's __init__ is not a circle
    circles = []

    def visit(name, path):
        for dependency in graph[name]:
            if dependency in path:
                circles.append(path[path.index(dependency):] + [dependency])
            elif dependency not in done:
                visit(dependency, path + [dependency])
        done.add(name)

    done = set()
    for name in sorted(graph):
        visit(name, [name])
    assert not circles, f"import circles: {circles[:5]}"


def test_only_rundir_names_the_files_of_a_run_directory():
    named_elsewhere = [(name, node.value) for name, tree in modules().items() if name != "kcifar.rundir"
                       for node in ast.walk(tree)
                       if isinstance(node, ast.Constant) and node.value in RUN_FILES]
    assert not named_elsewhere, f"ask kcifar.rundir for these names: {named_elsewhere}"


def test_the_reading_commands_never_load_tensorflow(tmp_path):
    run = tmp_path / "runs" / "done"
    run.mkdir(parents=True)
    (run / "recipe.toml").write_text('name = "done"\nmodel = "s3_tutorial"\n')
    (run / "metrics.json").write_text(json.dumps({"run": "done", "finished": True, "test": {"top1": 0.6}}))
    script = (f"import sys\nfrom kcifar import report\nimport kcifar.sweep.summary, kcifar.sweep.estimate, kcifar.rundir\n"
              f"report.main([{str(run)!r}, '--out', {str(tmp_path / 'table')!r}])\n"
              f"report.main(['--documented', '--out', {str(tmp_path / 'REPORT.md')!r}])\n"
              "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False,
                         cwd=PACKAGE.parent, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "[]"
    assert (tmp_path / "table.md").is_file() and (tmp_path / "REPORT.md").is_file()


def test_the_tour_lists_each_module_after_everything_it_imports():
    """docs/CODE.md's table is in import order: a module imports only from its own row and the rows before."""
    import re

    rows = [line for line in (PACKAGE.parent / "docs" / "CODE.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("| `kcifar")]
    rank = {path.replace("/", ".").removesuffix(".py"): number for number, row in enumerate(rows)
            for path in re.findall(r"`(kcifar/[a-z_/]+?(?:\.py|/))`", row.split("|")[1])}

    def row_of(module):
        return max((number for prefix, number in rank.items()
                    if module == prefix.rstrip(".") or module.startswith(prefix.rstrip(".") + ".")), default=None)

    trees = modules()
    late = [(name, imported) for name, tree in trees.items() for imported in imports(tree, trees)
            if row_of(name) is not None and row_of(imported) is not None and row_of(imported) > row_of(name)]
    assert not late, f"imports of a later row of docs/CODE.md's tour: {late}"
