"""Structural promises of the library, checked statically: no import cycle, small attack modules,
no function shadowing a submodule, no protected-access use of another splitjax module."""

import ast
import importlib
import pathlib
import pkgutil

import pytest

import splitjax

ROOT = pathlib.Path(splitjax.__file__).resolve().parent
MAX_ATTACK_MODULE_LINES = 500


def _modules():
  """{module name: path} of every module of the splitjax package."""
  out = {}
  for path in sorted(ROOT.rglob('*.py')):
    rel = path.relative_to(ROOT.parent).with_suffix('')
    parts = list(rel.parts)
    if parts[-1] == '__init__':
      parts = parts[:-1]
    out['.'.join(parts)] = path
  return out


def _imports(name: str, path: pathlib.Path) -> set[str]:
  """splitjax modules `name` imports at module level (`from pkg import mod` counts as pkg.mod)."""
  known = _modules()
  found = set()
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name in known)
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('splitjax'):
      for a in node.names:
        full = f'{node.module}.{a.name}'
        found.add(full if full in known else node.module)
  found.discard(name)
  return found


def test_no_import_cycle():
  mods = _modules()
  graph = {m: _imports(m, p) for m, p in mods.items()}
  # A package importing its own submodules (re-exports) is not a cycle through the package:
  # drop edges from a submodule to one of its parent packages' __init__.
  for m in graph:
    graph[m] = {t for t in graph[m] if not m.startswith(t + '.')}
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for t in sorted(graph.get(m, ())):
      if state.get(t) == 1:
        cycle = stack[stack.index(t) :] + [t]
        raise AssertionError('import cycle: ' + ' -> '.join(cycle))
      if t not in state:
        visit(t)
    stack.pop()
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m)


def test_attack_modules_stay_small():
  sizes = {p.name: len(p.read_text().splitlines()) for p in sorted((ROOT / 'attacks').glob('*.py'))}
  big = {k: v for k, v in sizes.items() if v > MAX_ATTACK_MODULE_LINES}
  assert not big, f'modules of splitjax/attacks over {MAX_ATTACK_MODULE_LINES} lines: {big}'


@pytest.mark.parametrize(
  'package',
  [
    'splitjax',
    'splitjax.attacks',
    'splitjax.data',
    'splitjax.evaluation',
    'splitjax.privacy',
    'splitjax.training',
  ],
)
def test_no_function_shadows_a_submodule(package):
  pkg = importlib.import_module(package)
  names = [m.name for m in pkgutil.iter_modules(pkg.__path__)]
  assert names, package
  for name in names:
    module = importlib.import_module(f'{package}.{name}')
    value = getattr(pkg, name)
    assert value is module, f'{package}.{name} is {value!r}, not the submodule'
  # The attack functions keep their public names.
  if package == 'splitjax.attacks':
    for fn in ('exact', 'exact_user', 'optimize', 'hybrid', 'exact_activations'):
      assert callable(getattr(pkg, fn)) and fn not in names, fn


def test_no_protected_access_across_modules():
  """`module._name` of another splitjax module is a private coupling: share it publicly."""
  bad = []
  for name, path in _modules().items():
    tree = ast.parse(path.read_text())
    aliases = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('splitjax'):
        aliases.update(a.asname or a.name for a in node.names)
      elif isinstance(node, ast.Import):
        aliases.update(
          (a.asname or a.name).split('.')[0] for a in node.names if a.name.startswith('splitjax')
        )
    for node in ast.walk(tree):
      if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in aliases
        and node.attr.startswith('_')
        and not node.attr.startswith('__')
      ):
        bad.append(f'{name}:{node.lineno}: {node.value.id}.{node.attr}')
  assert not bad, bad


def _cached_functions(path: pathlib.Path) -> list[str]:
  """Names of the functions of `path` decorated with functools.cache or an unbounded lru_cache."""
  out = []
  for node in ast.walk(ast.parse(path.read_text())):
    if not isinstance(node, ast.FunctionDef):
      continue
    for dec in node.decorator_list:
      call = dec.func if isinstance(dec, ast.Call) else dec
      name = ast.unparse(call)
      unbounded = not isinstance(dec, ast.Call) or any(
        k.arg == 'maxsize' and isinstance(k.value, ast.Constant) and k.value.value is None
        for k in dec.keywords
      )
      if name in ('functools.cache', 'cache') or (name.endswith('lru_cache') and unbounded):
        out.append(node.name)
  return out


def test_jit_is_the_only_cache_of_training_and_protocol():
  """The steps are module-level jitted functions over a state with static fields: no unbounded
  cache of built functions stands in for jit's own (issue 18)."""
  paths = [ROOT / 'protocol.py', *sorted((ROOT / 'training').glob('*.py'))]
  found = {p.name: names for p in paths if (names := _cached_functions(p))}
  assert not found, f'unbounded function caches: {found}'
