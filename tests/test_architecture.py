"""The design rules, checked on the source itself: imports only go downward (no module imports one that imports it
back, directly, through others, or lazily inside a function), no module reaches into another's private names, every
module says what it owns in a docstring, and lines stay within 120 characters."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

SOURCE_FOLDERS = (".", "inference", "data", "data/sft", "data/classify", "benchmarks", "runs")


def project_files() -> dict[str, Path]:
    """module name -> file, for every project module outside tests/."""
    files = {}
    for folder in SOURCE_FOLDERS:
        for path in sorted((ROOT / folder).glob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            files[name] = path
    return files


FILES = project_files()


def imported_modules(path: Path) -> set[str]:
    """Project modules a file imports anywhere in it (top level or inside functions), packages' modules resolved."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in FILES}
    return found


GRAPH = {name: imported_modules(path) - {name} for name, path in FILES.items()}


def find_cycle() -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else path + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for start in sorted(GRAPH):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_imports_only_go_downward():
    cycle = find_cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_model_layer_imports_nothing_above_it():
    """The layers below the checkpoint loader never reach up to it, to the trainers or to inference/."""
    below = {"cli", "atomic_file", "readers", "prompts", "metrics", "devices", "transformer_components", "lora",
             "byte_level_bpe", "token_cache", "data_loader", "decoding", "gpt_model", "model_heads", "quantization",
             "verifiers", "loss_labels", "reward_scoring", "calculator", "prefix_cache", "speculative"}
    for name in below:
        assert GRAPH[name] <= below, f"{name} imports {sorted(GRAPH[name] - below)}"


def test_the_model_module_loads_only_its_building_blocks():
    """``import gpt_model`` in a fresh interpreter loads no project module but its building blocks: no decode engine,
    data pipeline or CLI policy underneath the model (nanoGPT's model.py layout)."""
    top_level = sorted(name for name in FILES if "." not in name)
    code = f"import sys, gpt_model; print(sorted(m for m in sys.modules if m in {top_level!r}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(["gpt_model", "transformer_components"])


def test_each_public_function_name_has_one_definition():
    """Two top-level functions of one name in the library modules (outside scripts' ``main`` and friends) are two
    copies of one mechanism, or two mechanisms under one name: either way a reader calls the wrong one."""
    script_names = {"main", "build_parser", "parse_args"}
    owners: dict[str, list[str]] = {}
    for name, path in FILES.items():
        if name.startswith(("benchmarks", "data")):
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_") and node.name not in script_names:
                owners.setdefault(node.name, []).append(name)
    twice = {fn: where for fn, where in owners.items() if len(where) > 1}
    assert not twice, twice


def test_no_module_uses_another_modules_private_names():
    offences = []
    for name, path in FILES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in FILES and not node.level:
                offences += [f"{name}: from {node.module} import {a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
            elif isinstance(node, ast.Import):
                aliases.update({(a.asname or a.name): a.name for a in node.names if a.name in FILES})
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                offences.append(f"{name}: {node.value.id}.{node.attr}")
    assert not offences, offences


@pytest.mark.parametrize("name", sorted(FILES))
def test_every_module_says_what_it_owns(name):
    tree = ast.parse(FILES[name].read_text(encoding="utf-8"))
    docstring = ast.get_docstring(tree)
    assert docstring and len(docstring) > 40, f"{FILES[name]} has no module docstring saying what it owns"


def test_lines_stay_within_120_characters():
    long = [f"{path.relative_to(ROOT)}:{n}" for path in [*FILES.values(), *sorted((ROOT / "tests").glob("*.py"))]
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if len(line) > 120]
    assert not long, long


def test_functions_stay_short():
    """No function over 60 lines (docstring included): a longer one is split by what its parts do."""
    long = []
    for name, path in FILES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, long


ARCHITECTURE_MD = ROOT / "docs" / "architecture.md"


def module_table() -> list[tuple[int, str, set[str]]]:
    """(level, module, listed imports) for each row of docs/architecture.md's "The modules, bottom to top" table."""
    section = ARCHITECTURE_MD.read_text(encoding="utf-8").split("## The modules, bottom to top", 1)[1]
    section = section.split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or not cells[0].isdigit():
            continue  # prose, the header or the |---| line
        level, module, imports = int(cells[0]), cells[1].strip("`").removesuffix(".py"), cells[-1]
        rows.append((level, module, set() if imports == "-" else {name.strip() for name in imports.split(",")}))
    return rows


def test_the_architecture_tables_imports_match_the_code():
    """Every root module has one row, its imports column lists exactly the project modules it imports, and its
    level is above each of theirs (level 0: no project import), rows bottom to top: the table is the code's."""
    rows = module_table()
    root_modules = {name for name, path in FILES.items() if path.parent == ROOT}
    listed = [module for _, module, _ in rows]
    assert sorted(listed) == sorted(set(listed)), f"listed twice: {sorted(m for m in listed if listed.count(m) > 1)}"
    assert set(listed) == root_modules, (f"missing rows: {sorted(root_modules - set(listed))}, "
                                         f"rows for no module: {sorted(set(listed) - root_modules)}")
    levels = {module: level for level, module, _ in rows}
    for level, module, imports in rows:
        actual = GRAPH[module] & root_modules
        assert imports == actual, (f"{module}: the table lists {sorted(imports)}, the code imports {sorted(actual)} "
                                   f"(missing {sorted(actual - imports)}, extra {sorted(imports - actual)})")
        assert (level == 0) == (not actual), f"{module}: level {level} with imports {sorted(actual)}"
        below = {name: levels[name] for name in actual if levels[name] >= level}
        assert not below, f"{module} (level {level}) imports modules at its level or above: {below}"
    assert [level for level, _, _ in rows] == sorted(level for level, _, _ in rows), "rows are not bottom to top"


def test_the_architecture_page_names_only_files_that_exist():
    """Every ``name.py`` docs/architecture.md mentions (the table and the paragraphs on inference/, data/,
    benchmarks/) is a project file."""
    mentioned = set(re.findall(r"`?([A-Za-z_][\w/]*\.py)\b", ARCHITECTURE_MD.read_text(encoding="utf-8")))
    paths = [*FILES.values(), *(ROOT / "tests").glob("*.py")]
    names = {path.name for path in paths} | {path.relative_to(ROOT).as_posix() for path in paths}
    assert mentioned - names == set(), sorted(mentioned - names)
