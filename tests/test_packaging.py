"""The package as others install it: declared dependencies, public surface, metadata, README.

Every non-stdlib import in `splitjax/` must come from a runtime dependency, and every one in
`experiments/` from a runtime or `plots` dependency, because a fresh `pip install -e '.[plots]'`
has nothing else (chex once slipped through as a type-annotation import and crashed every binary).
"""

import ast
import importlib.metadata
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

import splitjax

REPO = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Import names whose distribution is not found by packages_distributions() in every environment.
_KNOWN_DISTRIBUTIONS = {
  "absl": "absl-py",
  "dp_accounting": "dp-accounting",
  "yaml": "pyyaml",
  "sklearn": "scikit-learn",
  "PIL": "pillow",
  "jaxlib": "jax",
}
_OWN = {"splitjax", "experiments", "benchmarks", "tests"}


def _normalise(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
  return _normalise(re.split(r"[\s<>=!~\[;(]", requirement.strip(), maxsplit=1)[0])


def declared(*extras: str) -> set[str]:
  """Normalised distribution names of the runtime dependencies plus the named extras."""
  project = PYPROJECT["project"]
  reqs = list(project["dependencies"])
  for extra in extras:
    reqs += project["optional-dependencies"][extra]
  return {_requirement_name(r) for r in reqs}


def top_level_imports(source: str) -> set[str]:
  """Top-level module names of every absolute import in `source` (function-level ones too)."""
  names = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names.update(alias.name.split(".")[0] for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names.add(node.module.split(".")[0])
  return names


def undeclared_imports(files, allowed: set[str]) -> list[str]:
  """`module (file)` of each third-party import in `files` that no distribution in `allowed` has."""
  dists_of = importlib.metadata.packages_distributions()
  bad = []
  for path in files:
    for name in sorted(top_level_imports(pathlib.Path(path).read_text())):
      if name in sys.stdlib_module_names or name in _OWN:
        continue
      candidates = {_normalise(d) for d in dists_of.get(name, [])}
      candidates.add(_normalise(_KNOWN_DISTRIBUTIONS.get(name, name)))
      if not candidates & allowed:
        path = pathlib.Path(path)
        bad.append(f"{name} ({path.relative_to(REPO) if path.is_relative_to(REPO) else path.name})")
  return bad


def _py_files(folder: str):
  return sorted((REPO / folder).rglob("*.py"))


def test_library_imports_only_runtime_dependencies():
  assert not undeclared_imports(_py_files("splitjax"), declared()), (
    "splitjax/ imports packages that a plain `pip install -e .` lacks; declare them in "
    "[project].dependencies or drop the import"
  )


def test_binaries_import_only_runtime_and_plots_dependencies():
  assert not undeclared_imports(_py_files("experiments"), declared("plots"))
  # CI runs the examples in the main-install venv.
  assert _py_files("examples") and not undeclared_imports(_py_files("examples"), declared("plots"))


def test_import_check_catches_an_undeclared_import(tmp_path):
  """The check can fail: a test-only package (chex) or an unknown one in library code is named."""
  bad = tmp_path / "probe.py"
  bad.write_text(
    "import os\nimport chex\n\ndef f():\n  from hypothesis import strategies\n  import numpy\n"
  )
  assert undeclared_imports([bad], declared()) == ["chex (probe.py)", "hypothesis (probe.py)"]
  assert "chex" not in declared() and "chex" in declared("test")


def test_dependencies_are_ranges_and_constraints_pin_them():
  """Compatible ranges in pyproject; exact pins (no URLs, hashes or -e lines) in constraints.txt."""
  project = PYPROJECT["project"]
  reqs = list(project["dependencies"]) + [
    r for extra in project["optional-dependencies"].values() for r in extra
  ]
  for req in reqs:
    assert ">=" in req and "==" not in req, req
  lines = [
    line.strip()
    for line in (REPO / "constraints.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
  ]
  pins = {}
  for line in lines:
    assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+", line), line
    name, version = line.split("==")
    pins[_normalise(name)] = version
  assert "splitjax" not in pins
  for req in reqs:  # every pinned version satisfies the declared lower bound
    name = _requirement_name(req)
    lower = re.search(r">=\s*([0-9][0-9.]*)", req).group(1)
    assert name in pins, f"{name} is not pinned in constraints.txt"
    as_tuple = lambda v: tuple(int(p) for p in re.findall(r"\d+", v)[:3])
    assert as_tuple(pins[name]) >= as_tuple(lower), (name, pins[name], lower)


def test_experiments_is_not_an_installed_package():
  assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == ["splitjax*"]
  assert "experiments" not in PYPROJECT["tool"]["setuptools"].get("package-data", {})
  assert "scripts" not in PYPROJECT["project"]
  assert PYPROJECT["tool"]["pytest"]["ini_options"]["pythonpath"] == ["."]


def test_public_surface_and_metadata():
  for name in (
    "attacks",
    "checkpointing",
    "data",
    "metrics",
    "models",
    "privacy",
    "protocol",
    "results",
    "training",
  ):
    assert hasattr(splitjax, name), name
  assert not hasattr(splitjax, "io")  # split into checkpointing and results
  assert splitjax.__version__ == PYPROJECT["project"]["version"] == "0.2.0"
  assert "Apache License" in (REPO / "LICENSE").read_text()
  citation = (REPO / "CITATION.cff").read_text()
  assert "cff-version:" in citation and "version: 0.2.0" in citation
  assert "## 0.2.0" in (REPO / "CHANGELOG.md").read_text()


def _readme_commands():
  sys.path.insert(0, str(REPO / ".ci"))
  try:
    import readme_commands  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  return readme_commands


def test_readme_commands_are_what_ci_runs():
  """CI parses the README's two command lines; they install with the constraints file."""
  commands = _readme_commands().commands((REPO / "README.md").read_text())
  main, test = commands["main"], commands["test"]
  assert main.startswith("pip install -e '.[plots]' -c constraints.txt && ")
  assert "python -m experiments.reproduce" in main
  assert test == "pip install -e '.[test]' -c constraints.txt && pytest"
  ci = (REPO / ".ci" / "run").read_text()
  assert "readme_commands.py" in ci


def test_readme_parser_refuses_a_missing_command():
  parser = _readme_commands()
  with pytest.raises(ValueError, match="test"):
    parser.commands("<!-- ci:main -->\n```\npip install -e . && python -m x\n```\n")


def test_binaries_define_no_test_only_flags():
  """The binaries' flags are splitjax's and absl's own: nothing from chex or absltest.

  One process imports all four binaries (their flags share one registry, so this is the union of
  every binary's `--helpfull`) and lists the module that defined each flag.
  """
  code = (
    "import experiments.train, experiments.reproduce\n"
    "from absl import flags\n"
    "print('TRAIN_AND_REPRODUCE_TAKE_NUM_EXAMPLES', 'num_examples' in flags.FLAGS)\n"
    "import experiments.attack, experiments.sweep\n"
    "for module, fl in flags.FLAGS.flags_by_module_dict().items():\n"
    "  print(module, ' '.join(f.name for f in fl))\n"
    "for name in ('train', 'attack', 'sweep', 'reproduce'):\n"
    "  mod = getattr(experiments, name)\n"
    "  print('KEY', name, ' '.join(sorted(f.name for f in\n"
    "                                    flags.FLAGS.get_key_flags_for_module(mod))))\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert "workdir" in out.stdout
  for marker in ("chex", "absl.testing", "test_randomize_ordering_seed", "test_srcdir"):
    assert marker not in out.stdout, marker
  # --num_examples exists only where it applies; each binary's --help lists the shared flags
  # it uses (its key flags).
  assert "TRAIN_AND_REPRODUCE_TAKE_NUM_EXAMPLES False" in out.stdout
  keys = {
    line.split()[1]: set(line.split()[2:])
    for line in out.stdout.splitlines()
    if line.startswith("KEY ")
  }
  assert {"workdir", "data_path", "schema", "dataset", "seed", "resume"} <= keys["train"]
  assert {"workdir", "num_examples", "attack", "variant"} <= keys["attack"]
  assert {"data_path", "schema", "num_examples", "seeds"} <= keys["sweep"]
  assert {"data_path", "schema", "preset", "datasets"} <= keys["reproduce"]
  assert "num_examples" not in keys["train"] | keys["reproduce"]
