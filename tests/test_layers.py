"""The code's layout rules, read from the source with ``ast`` (nothing is imported).

Floors, lowest first; a module imports only from its own floor or the floors below it::

    base          ldm/errors.py, messages.py, config.py, regular_files.py, host_memory.py
    checkpoints   reading files safely (ldm/checkpoints/)
    models        UNet, VAE, attention, token merging, int8 layers, safety checker (ldm/models/)
    components    conditioning, samplers, memory, loading, ControlNet, backends
                  (ldm/conditioning|samplers|memory|loading|control|backends/)
    pipeline      the generation stages (ldm/pipeline/), passes made of stages: hires fix, only masked (ldm/passes/)
    ledger        the VRAM ledger, which runs the stages on ``meta`` (ldm/ledger/)
    command line  what only the scripts need (optimizedSD/, the server in optimizedSD/server/)
    scripts       optimizedSD/optimized_*.py, scripts/*.py

Besides: no import circle between modules (function-local imports included: one of those hides a circle, it
does not remove it); a function-local import of a project module only with a comment saying why (an
optional dependency, start-up time), at most three of them; no ``_private`` name imported from another file;
an exception class that several other modules import lives in its package's ``errors.py``; no file over 450
lines; at most 8 modules directly in ``ldm/`` and 15 in any package (the entry scripts apart); module loggers
are named ``log``.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FLOORS = (
    ("base", ("ldm", "ldm.errors", "ldm.messages", "ldm.config", "ldm.regular_files", "ldm.host_memory")),
    ("checkpoints", ("ldm.checkpoints",)),
    ("models", ("ldm.models",)),
    ("components", ("ldm.conditioning", "ldm.samplers", "ldm.memory", "ldm.loading", "ldm.control", "ldm.backends")),
    ("pipeline", ("ldm.pipeline", "ldm.passes")),
    ("ledger", ("ldm.ledger",)),
    ("command line", ("optimizedSD",)),
    ("scripts", ("optimizedSD.optimized_", "scripts")),
)
MAX_LOCAL_IMPORTS = 3
MAX_LINES = 450
MAX_TOP_LEVEL_MODULES = 8
MAX_PACKAGE_MODULES = 15


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported project module
    names: tuple[str, ...]
    line: int
    local: bool  # inside a function
    commented: bool


def module_files() -> dict[str, Path]:
    files = {}
    for path in [*REPO.glob("ldm/**/*.py"), *REPO.glob("optimizedSD/**/*.py"), *REPO.glob("scripts/*.py")]:
        parts = path.relative_to(REPO).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def floor(module: str) -> int:
    """The floor of ``module``: the last floor with a matching prefix (the scripts' prefix is the most specific)."""
    found = None
    for index, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + ".") or (prefix.endswith("_") and module.startswith(prefix)):
                found = index
    assert found is not None, f"{module} is on no floor: add it to FLOORS"
    return found


def project_imports(modules: dict[str, Path]) -> list[Import]:
    found = []
    for name, path in modules.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]

        def visit(node: ast.AST, local: bool) -> None:
            for child in ast.iter_child_nodes(node):
                inside = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                if isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                        base = ".".join(parts + ([base] if base else []))
                    # "from pkg import module" imports the module; "from module import name" the module
                    targets = {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else resolve(base, modules)
                               for alias in child.names}
                    names = tuple(alias.name for alias in child.names)
                elif isinstance(child, ast.Import):
                    targets, names = {resolve(alias.name, modules) for alias in child.names}, ()
                else:
                    visit(child, inside)
                    continue
                text = lines[child.lineno - 1] + (lines[child.lineno - 2] if child.lineno > 1 else "")
                for target in sorted(targets - {None, name}):
                    found.append(Import(name, target, names, child.lineno, inside, "#" in text))

        visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def resolve(dotted: str, modules: dict[str, Path]) -> str | None:
    while dotted and dotted not in modules:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


MODULES = module_files()
IMPORTS = project_imports(MODULES)


def test_imports_go_down_the_floors():
    upward = [f"{i.source}:{i.line} imports {i.target} ({FLOORS[floor(i.target)][0]} is above {FLOORS[floor(i.source)][0]})"
              for i in IMPORTS if floor(i.target) > floor(i.source)]
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    edges: dict[str, set[str]] = {}
    for i in IMPORTS:
        edges.setdefault(i.source, set()).add(i.target)
    circles, state = [], {}

    def walk(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges.get(module, ())):
            if state.get(target) == "open":
                circles.append(" -> ".join(path[path.index(target):] + [module, target]) if target in path else f"{module} -> {target}")
            elif target not in state:
                walk(target, path + [module])
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            walk(module, [])
    assert not circles, "\n".join(circles)


def test_function_local_imports_are_few_and_say_why():
    local = [i for i in IMPORTS if i.local and not i.source.startswith("scripts.")]
    uncommented = [f"{i.source}:{i.line} imports {i.target}" for i in local if not i.commented]
    assert not uncommented, "function-local imports without a comment saying why:\n" + "\n".join(uncommented)
    assert len({(i.source, i.line) for i in local}) <= MAX_LOCAL_IMPORTS, "\n".join(f"{i.source}:{i.line}" for i in local)


def test_no_private_name_is_imported_from_another_file():
    private = [f"{i.source}:{i.line} imports {name} from {i.target}" for i in IMPORTS for name in i.names
               if name.startswith("_") and not name.startswith("__")]
    assert not private, "\n".join(private)


def exception_classes() -> dict[str, str]:
    """Exception classes defined in the project: class name -> defining module (bases named ...Error/Exception)."""
    found = {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and any(
                re.search(r"(Error|Exception|Refused|Stopped)$", ast.unparse(base)) for base in node.bases
            ):
                found[node.name] = name
    return found


def test_shared_error_classes_live_in_errors_modules():
    defined = exception_classes()
    users: dict[str, set[str]] = {}
    for i in IMPORTS:
        for name in i.names:
            if defined.get(name) == i.target:
                users.setdefault(name, set()).add(i.source)
    misplaced = [f"{name} (in {defined[name]}) is imported by {', '.join(sorted(sources))}"
                 for name, sources in users.items() if len(sources) > 1 and not defined[name].endswith("errors")]
    assert not misplaced, "\n".join(misplaced)


def test_files_are_small_and_packages_few():
    long = [f"{p.relative_to(REPO)} ({n} lines)" for p in MODULES.values()
            if not p.parts[-2] == "scripts" and (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not long, "files over 450 lines: " + ", ".join(long)
    assert len(list((REPO / "ldm").glob("*.py"))) <= MAX_TOP_LEVEL_MODULES
    for package in [p for p in (REPO / "ldm").iterdir() if (p / "__init__.py").exists()] + [
            p for p in [REPO / "optimizedSD", *(REPO / "optimizedSD").iterdir()] if (p / "__init__.py").exists()]:
        count = len([p for p in package.glob("*.py") if not p.name.startswith("optimized_")])  # not the scripts
        assert count <= MAX_PACKAGE_MODULES, f"{package.relative_to(REPO)} holds {count} modules"


def test_module_loggers_are_named_log():
    other = [f"{p.relative_to(REPO)}: {m.group(0)}" for p in MODULES.values()
             for m in re.finditer(r"^(\w+) = logging\.getLogger\(.*$", p.read_text(encoding="utf-8"), flags=re.M)
             if m.group(1) != "log"]
    assert not other, "\n".join(other)
