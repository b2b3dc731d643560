"""The layout rules of the repository (README "Where things live"), checked on the source.

  * the library (aim_jax/, data_pipelines/) never imports configs/, benchmarks/ or projects/;
  * no module imports a command-line module (train, evaluate, predict, convert.cli,
    data_pipelines.prepare), except the thin `__main__` that runs it;
  * the import graph of the library has no cycles (module-level imports);
  * no function in the library is longer than about 100 lines.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = ('aim_jax', 'data_pipelines')
OUTSIDE = ('configs', 'benchmarks', 'projects')
COMMANDS = {'aim_jax.train', 'aim_jax.evaluate', 'aim_jax.predict', 'aim_jax.convert.cli',
            'data_pipelines.prepare'}
MAX_FUNCTION_LINES = 105


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts = parts[:-1]
  return '.'.join(parts)


def _sources(*tops):
  for top in tops:
    yield from sorted((ROOT / top).rglob('*.py'))


def _imports(path: pathlib.Path, module_level_only: bool = False):
  """(imported module, line) for every import; 'from a import b' yields a.b and a."""
  tree = ast.parse(path.read_text())
  nodes = tree.body if module_level_only else ast.walk(tree)
  for node in nodes:
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, node.lineno
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      yield node.module, node.lineno
      for alias in node.names:
        yield f'{node.module}.{alias.name}', node.lineno


def test_the_library_never_imports_configs_benchmarks_or_projects():
  bad = [f'{p.relative_to(ROOT)}:{line} imports {name}'
         for p in _sources(*LIBRARY) for name, line in _imports(p)
         if name.split('.')[0] in OUTSIDE]
  assert not bad, bad


def test_no_module_imports_a_command_line_module():
  bad = []
  for p in _sources(*LIBRARY, *OUTSIDE):
    me = _module_name(p)
    if p.name == '__main__.py':
      continue
    for name, line in _imports(p):
      if name in COMMANDS and name != me:
        bad.append(f'{p.relative_to(ROOT)}:{line} imports the command {name}')
  assert not bad, bad


def _edges(path: pathlib.Path, modules) -> set:
  """Module-level imports among `modules`; `from pkg import sub` is an edge to pkg.sub only."""
  out = set()
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name in modules}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        sub = f'{node.module}.{alias.name}'
        if sub in modules:
          out.add(sub)
        elif node.module in modules:
          out.add(node.module)
  return out


def test_the_library_import_graph_has_no_cycles():
  modules = {_module_name(p): p for p in _sources(*LIBRARY)}
  graph = {m: _edges(p, modules) - {m} for m, p in modules.items()}
  state: dict[str, int] = {}

  def visit(m, stack):
    state[m] = 1
    for n in graph[m]:
      if state.get(n) == 1:
        pytest.fail('import cycle: ' + ' -> '.join(stack[stack.index(n):] + [n]))
      if n not in state:
        visit(n, stack + [n])
    state[m] = 2

  for m in graph:
    if m not in state:
      visit(m, [m])


def test_no_library_function_is_longer_than_about_100_lines():
  long = []
  for p in _sources(*LIBRARY):
    for node in ast.walk(ast.parse(p.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        if n > MAX_FUNCTION_LINES:
          long.append(f'{p.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)')
  assert not long, long


def test_every_command_in_the_readme_exists():
  import importlib.util
  import re
  readme = (ROOT / 'README.md').read_text()
  commands = set(re.findall(r'python -m ([a-z][\w.]*\w)', readme))
  assert {'aim_jax.train', 'aim_jax.evaluate', 'aim_jax.predict', 'aim_jax.convert'} <= commands
  missing = [c for c in sorted(commands) if importlib.util.find_spec(c) is None]
  assert not missing, missing
