"""The package's shape: a folder per stage, and imports that run one way between the stages (:data:`STAGES`, top
to bottom); so the library never imports an application (``csgd_ext.apps``), there is no import cycle anywhere
(imports inside functions included), and no module imports another module's private names.

The walk reads every module's source (``ast``), so it sees imports hidden inside functions too; it is checked on
small synthetic packages that break each rule, so a break in ``csgd_ext`` cannot go unseen."""

import ast
import os
import shutil
import textwrap

import pytest

import csgd_ext

PKG_DIR = os.path.dirname(csgd_ext.__file__)
APPS = "csgd_ext.apps"

#: The stages, each a folder of ``csgd_ext``, and their rank: a module may import a module of its own stage or
#: of a stage ranked lower, never one of its rank or above in another folder. ``planning`` and ``training``
#: share a rank: neither imports the other.
STAGES = {"apps": 6, "planning": 5, "training": 5, "merging": 4, "plan": 3, "measure": 3, "kinds": 2,
          "optim": 1, "models": 1}
#: The package's own top-level modules and where they stand: the public API imports every stage; the version
#: and the compiled kernels are imported by anyone.
TOP = {"csgd_ext": 7, "csgd_ext.__main__": 7, "csgd_ext.version": 0, "csgd_ext._C": 0}


def package_modules(pkg_dir: str, pkg: str):
    """``{module name: path}`` of every ``.py`` file under ``pkg_dir`` (package ``pkg``)."""
    mods = {}
    for root, _, files in os.walk(pkg_dir):
        rel = os.path.relpath(root, pkg_dir)
        parts = [pkg] + ([] if rel == "." else rel.split(os.sep))
        for f in files:
            if f.endswith(".py"):
                name = ".".join(parts if f == "__init__.py" else parts + [f[:-3]])
                mods[name] = os.path.join(root, f)
    return mods


def _is_module(mods, pkg_dir: str, pkg: str, name: str) -> bool:
    """A module of the package (a ``.py`` file, a folder, or a compiled extension such as ``_C``)."""
    if name in mods:
        return True
    rel = name.split(".")[1:]
    if not rel:
        return False
    base = os.path.join(pkg_dir, *rel)
    parent = os.path.dirname(base)
    return os.path.isdir(base) or (os.path.isdir(parent) and any(
        f.startswith(rel[-1] + ".") and f.endswith((".so", ".pyd")) for f in os.listdir(parent)))


def import_edges(pkg_dir: str, pkg: str):
    """``(edges, private)``: ``edges[m]`` = package modules ``m`` imports anywhere in its source; ``private`` =
    ``(m, imported module, name)`` for each private (``_x``, not a module) name ``m`` imports from another."""
    mods = package_modules(pkg_dir, pkg)
    edges = {m: set() for m in mods}
    private = []
    for m, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    here = m.split(".") if is_pkg else m.split(".")[:-1]
                    base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [(base, a.name) for a in node.names]
            else:
                continue
            for base, name in targets:
                if base != pkg and not base.startswith(pkg + "."):
                    continue
                sub = f"{base}.{name}" if name else None
                if sub and _is_module(mods, pkg_dir, pkg, sub):
                    target = sub  # "from . import x" imports the submodule x
                else:
                    target = base
                    if name and name.startswith("_") and not name.startswith("__") and target != m:
                        private.append((m, target, name))
                while target not in mods and "." in target and not _is_module(mods, pkg_dir, pkg, target):
                    target = target.rsplit(".", 1)[0]  # an attribute of a module: that module
                if target != m:
                    edges[m].add(target)
    return edges, private


def library_to_app(edges, pkg: str):
    """``(library module, app module)`` pairs; ``pkg.__main__`` (``python -m pkg``) is the apps' entry point."""
    apps = f"{pkg}.apps"

    def is_app(name):
        return name in (apps, f"{pkg}.__main__") or name.startswith(apps + ".")

    return sorted((m, t) for m, ts in edges.items() for t in ts if not is_app(m) and is_app(t))


def cycles(edges):
    """Every strongly connected component of more than one module (Tarjan), as sorted lists."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def stage_of(name: str, pkg: str = "csgd_ext") -> tuple:
    """``(stage, rank)`` of a module of ``pkg``: its folder under the package, or its own name at the top."""
    if name in {k.replace("csgd_ext", pkg, 1) for k in TOP}:
        return name, TOP[name.replace(pkg, "csgd_ext", 1)]
    folder = name.split(".")[1]
    return folder, STAGES.get(folder)


def stage_breaks(edges, pkg: str = "csgd_ext"):
    """``(module, imported module)`` pairs that import against the stage order, and modules outside any stage."""
    bad = []
    for m, ts in edges.items():
        sm, rm = stage_of(m, pkg)
        if rm is None:
            bad.append((m, "in no stage"))
            continue
        for t in ts:
            st, rt = stage_of(t, pkg)
            if st != sm and (rt is None or rt >= rm):
                bad.append((m, t))
    return sorted(bad)


# -- the package ---------------------------------------------------------------------------------------
def test_imports_run_one_way_between_the_stages():
    edges, _ = import_edges(PKG_DIR, "csgd_ext")
    assert {stage_of(m)[0] for m in edges} >= set(STAGES)  # every stage is a folder with modules
    assert stage_breaks(edges) == []


def test_the_top_level_is_the_stage_folders_and_a_few_files():
    entries = [e for e in os.listdir(PKG_DIR) if not e.startswith(("__pycache__", "_C.", "."))]
    folders = sorted(e for e in entries if os.path.isdir(os.path.join(PKG_DIR, e)))
    files = sorted(e for e in entries if e.endswith(".py"))
    assert folders == sorted(STAGES)
    assert len(files) <= 6, files


def test_library_never_imports_an_app():
    edges, _ = import_edges(PKG_DIR, "csgd_ext")
    assert any(t.startswith(APPS) for ts in edges.values() for t in ts)  # the walk does see the apps
    assert library_to_app(edges, "csgd_ext") == []


def test_no_import_cycle():
    edges, _ = import_edges(PKG_DIR, "csgd_ext")
    assert len(edges) > 30 and sum(map(len, edges.values())) > 50
    assert cycles(edges) == []


def test_no_module_imports_another_modules_private_names():
    _, private = import_edges(PKG_DIR, "csgd_ext")
    assert private == []


def test_apps_hold_the_applications():
    edges, _ = import_edges(PKG_DIR, "csgd_ext")
    for name in ("cli", "prune", "demo", "compare", "squeeze", "info", "plots", "data", "recipes"):
        assert f"{APPS}.{name}" in edges, name
    flat = [m for m in edges if m.count(".") == 1]
    assert not any(m.split(".")[1] in ("cli", "prune_cli", "demo", "compare", "squeeze", "plots", "data")
                   for m in flat)


# -- the checker breaks when the layering breaks -----------------------------------------------------
def test_checker_fails_on_this_package_with_one_library_import_of_an_app(tmp_path):
    copy = tmp_path / "csgd_ext"
    shutil.copytree(PKG_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "merging" / "merge.py", "a", encoding="utf-8") as f:
        f.write("\n\ndef _report_with_the_cli():\n    from ..apps import cli  # noqa: F401\n")
    edges, _ = import_edges(str(copy), "csgd_ext")
    assert library_to_app(edges, "csgd_ext") == [("csgd_ext.merging.merge", "csgd_ext.apps.cli")]
    assert any({"csgd_ext.merging.merge", "csgd_ext.apps.cli"} <= set(c) for c in cycles(edges))
    assert ("csgd_ext.merging.merge", "csgd_ext.apps.cli") in stage_breaks(edges)


@pytest.mark.parametrize("where, line, broken", [
    # the merge asking the planner (a stage above it), hidden in a function
    ("merging/merge.py", "def _f():\n    from csgd_ext.planning import planner  # noqa: F401\n",
     ("csgd_ext.merging.merge", "csgd_ext.planning.planner")),
    # the plan format knowing a planning rule
    ("plan/plan_file.py", "from ..planning.budget import round_widths  # noqa: F401\n",
     ("csgd_ext.plan.plan_file", "csgd_ext.planning.budget")),
    # training reaching sideways into planning (same rank)
    ("training/loop.py", "import csgd_ext.planning.numeric_check  # noqa: F401\n",
     ("csgd_ext.training.loop", "csgd_ext.planning.numeric_check")),
    # the optimizer importing a layer kind
    ("optim/csgd.py", "from csgd_ext.kinds.layer_kinds import KINDS  # noqa: F401\n",
     ("csgd_ext.optim.csgd", "csgd_ext.kinds.layer_kinds")),
])
def test_stage_checker_fails_on_this_package_with_one_import_against_the_order(tmp_path, where, line, broken):
    copy = tmp_path / "csgd_ext"
    shutil.copytree(PKG_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / where, "a", encoding="utf-8") as f:
        f.write("\n\n" + line)
    edges, _ = import_edges(str(copy), "csgd_ext")
    assert stage_breaks(edges) == [broken]



def _write_pkg(root, files):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return str(root / "pkg")


GOOD = {"pkg/__init__.py": "from .core import f\n", "pkg/core.py": "def f():\n    return 1\n",
        "pkg/apps/__init__.py": "", "pkg/apps/cli.py": "from ..core import f\nfrom . import extra\n",
        "pkg/apps/extra.py": "import pkg.core\n"}


def test_checker_accepts_a_clean_package(tmp_path):
    edges, private = import_edges(_write_pkg(tmp_path, GOOD), "pkg")
    assert edges["pkg.apps.cli"] == {"pkg.core", "pkg.apps.extra"} and edges["pkg.apps.extra"] == {"pkg.core"}
    assert library_to_app(edges, "pkg") == [] and cycles(edges) == [] and private == []


@pytest.mark.parametrize("core", ["from .apps.cli import main\n",
                                  "def f():\n    from .apps import cli  # hidden in a function\n",
                                  "import pkg.apps.extra\n"])
def test_checker_fails_on_a_library_module_importing_an_app(tmp_path, core):
    edges, _ = import_edges(_write_pkg(tmp_path, {**GOOD, "pkg/core.py": core}), "pkg")
    assert library_to_app(edges, "pkg")


def test_checker_fails_on_a_cycle_hidden_in_a_function(tmp_path):
    files = {**GOOD, "pkg/a.py": "def g():\n    from .b import h\n", "pkg/b.py": "from .a import g\n"}
    edges, _ = import_edges(_write_pkg(tmp_path, files), "pkg")
    assert cycles(edges) == [["pkg.a", "pkg.b"]]


def test_checker_fails_on_a_private_name_import(tmp_path):
    files = {**GOOD, "pkg/a.py": "from .core import _secret\nfrom . import _mod\n", "pkg/_mod.py": ""}
    _, private = import_edges(_write_pkg(tmp_path, files), "pkg")
    assert private == [("pkg.a", "pkg.core", "_secret")]


def test_only_the_layers_module_knows_layer_types_and_widths():
    """Graph analysis, planning, merge and reorder ask ``csgd_ext.kinds.layer_kinds`` what a layer kind carries and how wide it
    is; none of them tests a layer type or reads a width attribute itself."""
    tokens = ("PReLU", "_ConvNd", "_BatchNorm", "_NormBase", "_InstanceNorm", "num_features", "num_parameters",
              "out_channels", "in_channels", "out_features", "in_features")
    for name in ("planning/channel_graph", "planning/planner", "plan/records", "plan/plan_file", "merging/merge",
                 "planning/contiguous"):
        with open(os.path.join(PKG_DIR, f"{name}.py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())  # names and attributes in code, not words in docstrings
        used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        used |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        assert not used & set(tokens), (name, sorted(used & set(tokens)))
    with open(os.path.join(PKG_DIR, "kinds", "layer_kinds.py"), encoding="utf-8") as f:
        layers_src = f.read()
    assert all(t in layers_src for t in tokens)


def kind_literals(src: str, kinds) -> list:
    """``[(line, kind)]`` of every string constant in ``src`` that is a layer kind's name, docstrings excepted."""
    tree = ast.parse(src)
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in kinds and id(n) not in docs]


def test_no_layer_kind_is_named_outside_the_layers_module():
    """Every other module asks ``csgd_ext.kinds.layer_kinds`` about kinds through its named kind groups (BLOCKED_KINDS,
    WEIGHTED_KINDS, ...), never by writing a kind's name."""
    from csgd_ext.kinds.layer_kinds import KINDS

    found = []
    for root, _, names in os.walk(PKG_DIR):
        for n in names:
            path = os.path.join(root, n)
            if n.endswith(".py") and path != os.path.join(PKG_DIR, "kinds", "layer_kinds.py"):
                with open(path, encoding="utf-8") as f:
                    found += [(os.path.relpath(path, PKG_DIR), line, k) for line, k in kind_literals(f.read(), KINDS)]
    assert found == []
    assert kind_literals('x = "grouped"\ndef f():\n    "conv"\n    return "norm"\n', KINDS) == [(1, "grouped"),
                                                                                              (4, "norm")]
