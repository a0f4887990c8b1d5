"""The architecture, held by an `ast` walk over every module of ours (nothing is imported):
each module's stated import rules, the table below they must agree with, no import cycles,
and a top level that holds only the design card's files, packages and project files.

Every module opens with a docstring that carries its rules, in one or both of these forms
(a form may wrap over several lines; it ends at the first period):

    Must not import: fastapi, sqlalchemy, api, store.
    Of ours, imports only: utils.          ("nothing" when it imports none of ours)

A name matches itself and everything under it (`api` matches `api.deps`). The table
(`RULES`) is the source of truth per package or top-level module; a docstring may be
stricter than its row, never looser. Rules apply to the module's own import statements;
the engine (`pipeline/`, `voice_pipeline.py`) is also checked through every chain of
imports, because it must load without a web framework, an ORM or a vendor SDK.

Every import statement counts: at module level, inside functions and under
`if TYPE_CHECKING:`. Imports by string (`importlib.import_module`, uvicorn's "module:attr")
are not seen. For cycles, `import a.b` is an arrow to `a.b` only, not to the package `a`
whose `__init__` Python runs first: our package `__init__`s are docstrings, except
`emulators/` re-exporting its own modules.

Not scanned: `tests/` (tests may reach anything), `migrations/` (Alembic's scripts, loaded
by path; they import only alembic, sqlalchemy and `models`).
"""

from __future__ import annotations

import ast
import re
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

DESIGN_CARD_FILES = {
    "main.py",
    "voice_pipeline.py",
    "models.py",
    "schemas.py",
    "utils.py",
    "config.py",
}
PROJECT_FILES = {
    ".dockerignore",
    ".env.example",
    ".gitignore",
    "BENCHMARKS.md",
    "Dockerfile",
    "README.md",
    "alembic.ini",
    "docker-compose.yml",
    "pyproject.toml",
    "requirements-dev.txt",
    "requirements.txt",
    "run.sh",
    "test.sh",
}
NON_PACKAGE_DIRS = {".ci", "deploy", "docs", "migrations", "scripts", "tests"}
NOT_SCANNED = {"tests", "migrations"}

WEB = ("fastapi", "starlette", "uvicorn")
VENDOR_SDKS = ("twilio", "deepgram", "ollama", "chromadb")
SERVICE = (*WEB, "twilio", "deepgram", "ollama", "api", "voice_pipeline")
"""What the services under the API (store, knowledge, tools, post-call) must not import:
the web layer, vendor SDKs (adapters wrap them) and the live-call engine."""


@dataclass(frozen=True)
class Rule:
    forbidden: tuple[str, ...] = ()
    only_ours: tuple[str, ...] | None = None
    """When set, the only modules of ours that may be imported (prefixes)."""


ENGINE_FORBIDDEN = (
    *WEB,
    "sqlalchemy",
    *VENDOR_SDKS,
    "httpx",
    "aiohttp",
    "websockets",
    "api",
    "store",
    "adapters",
    "knowledge",
    "tools",
    "postcall",
    "models",
    "schemas",
)

RULES: dict[str, Rule] = {
    # the engine: contracts and parts; it knows the contracts, never the app or a vendor
    "pipeline": Rule(forbidden=(*ENGINE_FORBIDDEN, "voice_pipeline")),
    "voice_pipeline": Rule(forbidden=ENGINE_FORBIDDEN),
    # vendors: the pipeline's contracts and settings, nothing of the app around them
    "adapters": Rule(
        forbidden=(
            *WEB,
            "sqlalchemy",
            "chromadb",
            "api",
            "store",
            "knowledge",
            "tools",
            "postcall",
            "voice_pipeline",
            "models",
        )
    ),
    # services under the API
    "store": Rule(forbidden=(*SERVICE, "chromadb")),
    "knowledge": Rule(forbidden=SERVICE),
    "tools": Rule(forbidden=(*SERVICE, "chromadb")),
    "postcall": Rule(forbidden=(*SERVICE, "chromadb")),
    "campaigns": Rule(forbidden=(*SERVICE, "chromadb")),
    # the web layer: vendor SDKs only through adapters
    "api": Rule(forbidden=VENDOR_SDKS),
    # the console: pages over the API's dependencies and the stored rows, and a second
    # media transport; no vendor (not even through adapters), no engine part but its
    # contracts, and imports point one way: console -> api
    "console": Rule(
        forbidden=(*VENDOR_SDKS, "adapters", "voice_pipeline", "runtime"),
        only_ours=(
            "api",
            "config",
            "console",
            "models",
            "schemas",
            "utils",
            "postcall",
            "pipeline.contracts",
        ),
    ),
    # composition
    "runtime": Rule(),
    "main": Rule(forbidden=("sqlalchemy", *VENDOR_SDKS)),
    # the design card's leaf modules
    "models": Rule(forbidden=WEB, only_ours=("utils",)),
    "schemas": Rule(forbidden=(*WEB, "sqlalchemy"), only_ours=("utils",)),
    "utils": Rule(only_ours=()),
    "config": Rule(only_ours=()),
    # around the product
    "emulators": Rule(only_ours=("emulators", "utils")),
    "scripts": Rule(only_ours=("emulators",)),
    "bench": Rule(forbidden=("fastapi", "sqlalchemy", "store", "tools", "postcall")),
}

# Each form ends at the first period followed by a space or the end (names may be dotted).
_FORBIDDEN_LINE = re.compile(r"Must not import:\s*(.*?)\.(?:\s|$)")
_ONLY_LINE = re.compile(r"Of ours, imports only:\s*(.*?)\.(?:\s|$)")


# --- scanning ----------------------------------------------------------------------------


@dataclass
class Import:
    target: str
    """Absolute dotted name: a module of ours when it is one, else what was written."""
    line: int


@dataclass
class Module:
    name: str
    rel: str
    """Path from the root, for messages."""
    docstring: str | None
    imports: list[Import] = field(default_factory=list)

    @property
    def key(self) -> str:
        """Its package, or itself for a top-level module: its row in RULES."""
        return self.name.split(".")[0]


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def scan(root: Path) -> dict[str, Module]:
    """Every module of ours under `root`, with its docstring and its imports resolved."""
    paths = [p for p in root.glob("*.py")]
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name.startswith(".") or folder.name in NOT_SCANNED:
            continue
        if (folder / "__init__.py").exists() or folder.name in NON_PACKAGE_DIRS:
            paths += [p for p in folder.rglob("*.py") if "__pycache__" not in p.parts]
    trees = {module_name(root, p): (p, ast.parse(p.read_text(), str(p))) for p in paths}
    modules: dict[str, Module] = {}
    for name, (path, tree) in trees.items():
        module = Module(name, path.relative_to(root).as_posix(), ast.get_docstring(tree))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _targets(node, name, is_package, trees.keys()):
                    module.imports.append(Import(target, node.lineno))
        module.imports.sort(key=lambda imp: imp.line)
        modules[name] = module
    return modules


def _targets(
    node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, ours: Iterable[str]
) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.module == "__future__":
        return []
    base = node.module or ""
    if node.level:
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    known = set(ours)
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def matches(target: str, name: str) -> bool:
    return target == name or target.startswith(name + ".")


def is_ours(target: str, modules: Mapping[str, Module]) -> bool:
    return target.split(".")[0] in {m.split(".")[0] for m in modules}


# --- the rules ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Stated:
    forbidden: tuple[str, ...] | None
    only_ours: tuple[str, ...] | None


def stated_rules(docstring: str | None) -> Stated:
    text = " ".join((docstring or "").split())
    forbidden, only = _FORBIDDEN_LINE.search(text), _ONLY_LINE.search(text)
    return Stated(
        forbidden=_names(forbidden.group(1)) if forbidden else None,
        only_ours=_names(only.group(1)) if only else None,
    )


def _names(listed: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in listed.split(",") if n.strip())
    return () if names == ("nothing",) else names


def disagreements(module: Module, rules: Mapping[str, Rule]) -> list[str]:
    """How the module's docstring falls short of its row in the table."""
    where = module.rel
    if module.key not in rules:
        return [f"{where}: no row for {module.key!r} in RULES: add one (what may it import?)"]
    if not module.docstring:
        return [f"{where}: no module docstring (its role and what it must not import)"]
    rule, stated = rules[module.key], stated_rules(module.docstring)
    problems = []
    if stated.forbidden is None and stated.only_ours is None:
        problems.append(f"{where}: the docstring has no 'Must not import: ...' line")
    missing = [n for n in rule.forbidden if n not in (stated.forbidden or ())]
    if missing:
        problems.append(f"{where}: 'Must not import:' lacks {', '.join(missing)} (RULES)")
    if rule.only_ours is not None:
        if stated.only_ours is None:
            allowed = ", ".join(rule.only_ours) or "nothing"
            problems.append(f"{where}: needs 'Of ours, imports only: {allowed}.' (RULES)")
        elif extra := [n for n in stated.only_ours if n not in rule.only_ours]:
            problems.append(f"{where}: 'Of ours, imports only:' allows {extra}, RULES does not")
    return problems


def violations(modules: Mapping[str, Module]) -> list[str]:
    """Imports that break what a module's docstring states."""
    found = []
    for module in modules.values():
        stated = stated_rules(module.docstring)
        for imp in module.imports:
            hit = next((n for n in stated.forbidden or () if matches(imp.target, n)), None)
            if hit is not None:
                found.append(f"{module.rel}:{imp.line} imports {imp.target} (forbids {hit})")
            elif (
                stated.only_ours is not None
                and is_ours(imp.target, modules)
                and not any(matches(imp.target, n) for n in stated.only_ours)
            ):
                allowed = ", ".join(stated.only_ours) or "nothing"
                found.append(
                    f"{module.rel}:{imp.line} imports {imp.target} (of ours, only {allowed})"
                )
    return found


def graph(modules: Mapping[str, Module]) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (a name that is not a module, such as a
    package attribute, is charged to its nearest module)."""
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for module in modules.values():
        for imp in module.imports:
            target = imp.target
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != module.name:
                edges[module.name].add(target)
    return edges


def cycles(edges: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def package_edges(edges: Mapping[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for source, targets in edges.items():
        top = source.split(".")[0]
        packages.setdefault(top, set()).update(
            t.split(".")[0] for t in targets if t.split(".")[0] != top
        )
    return packages


def reach_chain(edges: Mapping[str, set[str]], start: str, goal: set[str]) -> list[str] | None:
    """The shortest chain of imports from `start` to a module in `goal`, if any."""
    parents: dict[str, str | None] = {start: None}
    queue = [start]
    for node in queue:
        if node in goal:
            chain = [node]
            while (parent := parents[chain[-1]]) is not None:
                chain.append(parent)
            return chain[::-1]
        for nxt in sorted(edges.get(node, ())):
            if nxt not in parents:
                parents[nxt] = node
                queue.append(nxt)
    return None


# --- the tests ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return scan(ROOT)


def test_the_scan_finds_the_packages_and_the_design_cards_modules(
    modules: dict[str, Module],
) -> None:
    keys = {m.key for m in modules.values()}
    assert {"pipeline", "adapters", "api", "store", "emulators", "bench", "main"} <= keys
    assert "voice_pipeline" in modules and "pipeline.text" in modules
    assert not any(m.key in NOT_SCANNED for m in modules.values())


def test_every_module_states_its_import_rules_and_agrees_with_the_table(
    modules: dict[str, Module],
) -> None:
    problems = [p for m in modules.values() for p in disagreements(m, RULES)]
    assert not problems, "\n".join(problems)


def test_no_module_imports_what_its_docstring_forbids(modules: dict[str, Module]) -> None:
    found = violations(modules)
    assert not found, "\n".join(found)


def test_nothing_imports_main_and_only_main_imports_runtime(
    modules: dict[str, Module],
) -> None:
    found = [
        f"{m.rel}:{imp.line} imports {imp.target}"
        for m in modules.values()
        for imp in m.imports
        if (matches(imp.target, "main") and m.name != "main")
        or (matches(imp.target, "runtime") and m.key not in ("main", "runtime"))
    ]
    assert not found, "\n".join(found)


def test_the_engine_loads_without_web_orm_or_vendor_code(modules: dict[str, Module]) -> None:
    """Through any chain of our imports, not only its own statements."""
    edges = graph(modules)
    banned = (*WEB, "sqlalchemy", *VENDOR_SDKS, "httpx", "aiohttp", "websockets")
    dirty = {
        m.name: imp.target
        for m in modules.values()
        for imp in m.imports
        if any(matches(imp.target, b) for b in banned)
    }
    engine = [m for m in modules if m == "voice_pipeline" or matches(m, "pipeline")]
    chains = [chain for m in engine if (chain := reach_chain(edges, m, set(dirty))) is not None]
    assert not chains, "\n".join(" -> ".join([*c, dirty[c[-1]]]) for c in chains)


def test_no_import_cycles_between_modules(modules: dict[str, Module]) -> None:
    found = cycles(graph(modules))
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_import_cycles_between_packages(modules: dict[str, Module]) -> None:
    """Packages and top-level modules as nodes: imports point one way between them too."""
    found = cycles(package_edges(graph(modules)))
    assert not found, "package cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def top_level_entries(root: Path) -> set[str]:
    """What the checkout holds at the top, as git sees it (ignored files left out)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return {entry.split("/")[0] for entry in listed if (root / entry).exists()}


def test_the_top_level_holds_only_the_design_cards_files_packages_and_project_files() -> None:
    entries = top_level_entries(ROOT)
    unexpected = []
    for name in sorted(entries):
        path = ROOT / name
        if path.is_dir():
            if not (path / "__init__.py").exists() and name not in NON_PACKAGE_DIRS:
                unexpected.append(f"{name}/ (neither a package nor {sorted(NON_PACKAGE_DIRS)})")
        elif name.endswith(".py"):
            if name not in DESIGN_CARD_FILES:
                unexpected.append(f"{name} (a module: put it in the package it belongs to)")
        elif name not in PROJECT_FILES:
            unexpected.append(f"{name} (not a project file listed in this test)")
    assert not unexpected, "\n".join(unexpected)
    assert entries >= DESIGN_CARD_FILES


MAX_LINES = 500
OVER_THE_LIMIT = {
    "voice_pipeline.py": "CallSession orchestration after the carving (held under 800 lines)",
    "knowledge/documents.py": "being reworked for security",
    "emulators/deepgram.py": "to split: listen session, speak socket, the emulator",
    "emulators/twilio_caller.py": "to split: the scripted timeline, the caller",
    "emulators/twilio_rest.py": "to split: the REST resources, Twilio's webhook side",
}
"""Modules still over MAX_LINES, each with what is to be done about it."""


def test_no_module_is_over_500_lines(modules: dict[str, Module]) -> None:
    sizes = {m.rel: len((ROOT / m.rel).read_text().splitlines()) for m in modules.values()}
    over = [
        f"{rel}: {n} lines (split it along a real seam)"
        for rel, n in sorted(sizes.items())
        if n > MAX_LINES and rel not in OVER_THE_LIMIT
    ]
    done = [
        f"{rel}: {sizes.get(rel, 0)} lines now: take it off OVER_THE_LIMIT"
        for rel in OVER_THE_LIMIT
        if sizes.get(rel, 0) <= MAX_LINES
    ]
    assert not over + done, "\n".join(over + done)


PRIVATE_INTERNALS = {
    "api/media_ws.py": {"uvicorn": "0.54.0", "websockets": "17.4"},
    "adapters/http.py": {"httpx": "0.28.1", "httpx-aiohttp": "0.1.12"},
    "adapters/deepgram.py": {"deepgram-sdk": "7.17.0", "websockets": "17.4"},
}
"""The labelled places that reach into a library's private internals for measured CPU
savings, and the versions each was checked against (docs/ARCHITECTURE.md lists them)."""


def pinned_versions(requirements: Path) -> dict[str, str]:
    pins = {}
    for line in requirements.read_text().splitlines():
        spec = line.split("#")[0].strip()
        if "==" in spec:
            name, version = spec.split("==")
            pins[name.split("[")[0].strip().lower().replace("_", "-")] = version.strip()
    return pins


@pytest.mark.parametrize("rel", sorted(PRIVATE_INTERNALS))
def test_each_reach_into_private_internals_names_the_pinned_versions_it_was_checked_against(
    rel: str,
) -> None:
    """A version bump fails here until the module is checked again and its docstring says so."""
    docstring = " ".join((ast.get_docstring(ast.parse((ROOT / rel).read_text())) or "").split())
    pins = pinned_versions(ROOT / "requirements.txt")
    for dist, version in PRIVATE_INTERNALS[rel].items():
        assert pins.get(dist) == version, f"requirements.txt pins {dist} {pins.get(dist)}"
        assert f"{dist} {version}" in docstring, f"{rel} does not say '{dist} {version}'"
    assert "fallback" in docstring.lower(), f"{rel} does not say what the fallback is"


# --- the checker itself, on a made-up tree ---------------------------------------------------


def _tree(root: Path, files: dict[str, str]) -> dict[str, Module]:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return scan(root)


def test_the_checker_sees_imports_in_functions_and_under_type_checking(tmp_path: Path) -> None:
    modules = _tree(
        tmp_path,
        {
            "pipeline/__init__.py": '"""Must not import: fastapi, store."""\n',
            "pipeline/text.py": (
                '"""Text.\n\nMust not import: fastapi,\nstore.\n"""\n'
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from store.calls import X\n"
                "def f():\n    import fastapi.routing\n"
            ),
            "store/__init__.py": '"""Of ours, imports only: nothing."""\n',
            "store/calls.py": '"""Of ours, imports only: utils."""\nfrom pipeline import text\n',
            "utils.py": '"""Of ours, imports only: nothing."""\n',
        },
    )
    assert violations(modules) == [
        "pipeline/text.py:8 imports store.calls (forbids store)",
        "pipeline/text.py:10 imports fastapi.routing (forbids fastapi)",
        "store/calls.py:2 imports pipeline.text (of ours, only utils)",
    ]
    assert cycles(graph(modules)) == [["pipeline.text", "store.calls"]]
    assert cycles(package_edges(graph(modules))) == [["pipeline", "store"]]


def test_the_checker_resolves_relative_imports_and_package_attributes(tmp_path: Path) -> None:
    modules = _tree(
        tmp_path,
        {
            "api/__init__.py": "",
            "api/deps.py": "from . import errors\nfrom .errors import Problem\n",
            "api/errors.py": "from api import deps\n",
            "main.py": "from api.deps import thing\n",
        },
    )
    assert [i.target for i in modules["api.deps"].imports] == ["api.errors", "api.errors"]
    assert graph(modules)["main"] == {"api.deps"}
    assert cycles(graph(modules)) == [["api.deps", "api.errors"]]


def test_a_docstring_looser_than_the_table_is_refused(tmp_path: Path) -> None:
    modules = _tree(
        tmp_path,
        {
            "pipeline/__init__.py": '"""Must not import: fastapi, sqlalchemy."""\n',
            "pipeline/a.py": '"""A.\n\nMust not import: fastapi."""\n',
            "models.py": '"""Tables.\n\nOf ours, imports only: utils, pipeline."""\n',
            "newpkg/__init__.py": '"""New."""\n',
        },
    )
    rules = {
        "pipeline": Rule(forbidden=("fastapi", "sqlalchemy")),
        "models": Rule(only_ours=("utils",)),
    }
    problems = [p for m in modules.values() for p in disagreements(m, rules)]
    assert sorted(problems) == [
        "models.py: 'Of ours, imports only:' allows ['pipeline'], RULES does not",
        "newpkg/__init__.py: no row for 'newpkg' in RULES: add one (what may it import?)",
        "pipeline/a.py: 'Must not import:' lacks sqlalchemy (RULES)",
    ]
