"""Packaging: what `pip install jaxgru` brings, the extras, the version, and what `import jaxgru` loads.

Fast (no wheel is built here; .ci/run builds, checks and installs the wheel).
"""

import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import jaxgru
from jaxgru import _extras, _version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
EXTRAS = PROJECT["optional-dependencies"]

# Optional dependencies by their top-level import name, as jaxgru's modules import them.
OPTIONAL = ("flax", "optax", "orbax", "absl", "equinox", "gymnax")
# Never needed by jaxgru at all (the parity tests read committed fixtures).
FOREIGN = ("torch", "keras", "tensorflow")
# The distribution that provides each import name.
DISTRIBUTION = {
    "flax": "flax",
    "equinox": "equinox",
    "optax": "optax",
    "orbax": "orbax-checkpoint",
    "absl": "absl-py",
    "matplotlib": "matplotlib",
    "gymnax": "gymnax",
}

_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?\s*(.*)$")


def _name(req):
    return _REQ.match(req).group(1).lower().replace("_", "-")


def _resolve(extra, seen=()):
    """Distribution names an extra installs, following jaxgru[...] self-references."""
    names = set()
    for req in EXTRAS[extra]:
        m = _REQ.match(req)
        if _name(req) == "jaxgru":
            for sub in m.group(2).split(","):
                sub = sub.strip()
                assert sub in EXTRAS, f"extra {extra!r} refers to jaxgru[{sub}], which does not exist"
                if sub not in seen:
                    names |= _resolve(sub, seen + (extra,))
        else:
            names.add(_name(req))
    return names


def test_core_dependencies_are_jax_and_numpy_only():
    assert sorted(_name(r) for r in PROJECT["dependencies"]) == ["jax", "numpy"]


def test_runtime_dependencies_have_lower_bounds_and_no_caps():
    # .ci/run pins each of these to its lower bound on Python 3.11, so every one needs a >= bound;
    # an upper cap would refuse the JAX a user already has.
    reqs = list(PROJECT["dependencies"])
    for extra in ("flax", "equinox", "train", "bench", "rl"):
        reqs += [r for r in EXTRAS[extra] if _name(r) != "jaxgru"]
    for req in reqs:
        spec = _REQ.match(req).group(3)
        assert re.search(r">=\s*\d", spec), f"{req!r} has no lower bound"
        assert not re.search(r"<|~=|==", spec), f"{req!r} caps the version"


def test_requires_python_is_what_ci_tests():
    assert PROJECT["requires-python"] == ">=3.11"
    for minor in (11, 12, 13):
        assert f"Programming Language :: Python :: 3.{minor}" in PROJECT["classifiers"]


@pytest.mark.parametrize("module, extra", sorted(_extras.EXTRAS.items()))
def test_each_extra_named_by_the_helper_exists_and_installs_the_module(module, extra):
    assert extra in EXTRAS, f"_extras.EXTRAS names jaxgru[{extra}], which pyproject.toml lacks"
    assert DISTRIBUTION[module] in _resolve(extra)


def test_extras_by_need():
    assert _resolve("flax") == {"flax"}
    assert _resolve("equinox") == {"equinox"}
    assert _resolve("train") >= {"flax", "optax", "orbax-checkpoint", "absl-py"}
    assert _resolve("bench") >= _resolve("train") | {"matplotlib"}
    assert _resolve("docs") >= {"mkdocs", "mkdocstrings"}
    assert _resolve("rl") >= _resolve("train") | {"gymnax", "six"}  # gymnax 1.0.1 imports six undeclared
    dev = _resolve("dev")
    assert dev >= _resolve("train") | _resolve("flax") | _resolve("equinox") | _resolve("docs")
    # gymnax caps jax below 0.12: in dev it would hold every dev install below the newest JAX.
    assert "gymnax" not in dev
    assert dev >= {"pytest", "build", "twine"}
    assert not dev & {"torch", "keras", "tensorflow"}
    assert "python" in next(r for r in EXTRAS["docs"] if _name(r) == "mkdocstrings")


def test_version_in_one_place():
    assert PROJECT["dynamic"] == ["version"] and "version" not in PROJECT
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "jaxgru._version.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", _version.__version__)
    assert jaxgru.__version__ == _version.__version__
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{_version.__version__}]" in changelog, "CHANGELOG.md has no entry for this version"


def test_ships_py_typed():
    assert (ROOT / "jaxgru" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["jaxgru"]


def test_require_returns_the_module():
    import json

    assert _extras.require("json", "train") is json


def test_require_names_the_extra_for_a_missing_module():
    with pytest.raises(ImportError, match=re.escape("pip install 'jaxgru[train]'")) as e:
        _extras.require("jaxgru_no_such_module_x", "train")
    assert str(e.value) == f"{__name__} needs jaxgru_no_such_module_x: pip install 'jaxgru[train]'"
    assert e.value.name == "jaxgru_no_such_module_x"
    with pytest.raises(ImportError, match=r"^jaxgru\.linen needs .*'jaxgru\[flax\]'$"):
        _extras.require("jaxgru_no_such_module_x", "flax", user="jaxgru.linen")


def test_require_looks_up_the_extra_by_top_level_name():
    # flax.<missing> is missing whether or not flax is installed: the extra comes from EXTRAS
    with pytest.raises(ImportError, match=re.escape("needs flax.no_such_submodule_x: pip install 'jaxgru[flax]'")):
        _extras.require("flax.no_such_submodule_x")
    with pytest.raises(KeyError):
        _extras.require("jaxgru_no_such_module_x")  # no extra known for it: a caller's mistake


def test_require_passes_other_import_errors_through(tmp_path, monkeypatch):
    # An installed package that fails to import for its own reasons is not "install the extra".
    (tmp_path / "jaxgru_broken_pkg_x").mkdir()
    (tmp_path / "jaxgru_broken_pkg_x" / "__init__.py").write_text("import jaxgru_missing_inner_x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as e:
        _extras.require("jaxgru_broken_pkg_x", "train")
    assert e.value.name == "jaxgru_missing_inner_x"
    assert "jaxgru[" not in str(e.value)


def _python(code):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_import_jaxgru_loads_no_optional_dependency():
    # As `pip install jaxgru` leaves it: the optional ones are blocked, and none may be loaded anyway.
    r = _python(f"""
        import sys
        for name in {OPTIONAL!r}:
            sys.modules[name] = None   # `import name` now raises ModuleNotFoundError
        import jaxgru
        loaded = sorted({{m.split('.')[0] for m in sys.modules if sys.modules[m] is not None}}
                        & set({OPTIONAL + FOREIGN!r}))
        print('loaded:', loaded)
    """)
    assert r.returncode == 0, r.stderr
    assert "loaded: []" in r.stdout


def test_every_module_imports_or_names_its_extra_without_optional_dependencies():
    # With flax, optax, orbax, absl and equinox absent, each jaxgru module either imports or raises
    # the ImportError that names the extra to install -- never a bare ModuleNotFoundError.
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "jaxgru").rglob("*.py")
    )
    r = _python(f"""
        import importlib, sys
        for name in {OPTIONAL!r}:
            sys.modules[name] = None
        for module in {modules!r}:
            try:
                importlib.import_module(module)
                print(module, 'ok')
            except ImportError as e:
                print(module, 'ImportError', str(e).replace(chr(10), ' '))
    """)
    assert r.returncode == 0, r.stderr
    bad = [line for line in r.stdout.splitlines() if " ok" not in line and "pip install 'jaxgru[" not in line]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module, extra", [("jaxgru.linen", "flax"), ("jaxgru.nnx", "flax"), ("jaxgru.equinox", "equinox")])
def test_framework_module_names_its_extra(module, extra):
    if not (ROOT / (module.replace(".", "/") + ".py")).is_file():
        pytest.skip(f"{module} is not in this tree")
    r = _python(f"""
        import sys
        for name in {OPTIONAL!r}:
            sys.modules[name] = None
        try:
            import {module}
        except ImportError as e:
            print('ImportError:', e)
    """)
    assert r.returncode == 0, r.stderr
    assert f"pip install 'jaxgru[{extra}]'" in r.stdout, r.stdout
