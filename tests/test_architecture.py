"""The layout rules of ARCHITECTURE.md, checked on the source: function and module sizes, and
which room may import which (no cycles)."""
import ast
import glob
import os.path as osp

from conftest import REPO

PACKAGE = osp.join(REPO, 'effbackbones')
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 600
#: room -> rooms of ours it must not import (ARCHITECTURE.md, "The rooms")
FORBIDDEN = {
    'checkpoint': {'models', 'engine', 'deploy', 'datasets', 'utils'},
    'models': {'engine', 'deploy', 'datasets', 'utils'},
    'engine': {'deploy', 'models'},
    'datasets': {'models', 'engine', 'deploy', 'checkpoint'},
}


def _modules():
    for path in sorted(glob.glob(osp.join(PACKAGE, '**', '*.py'), recursive=True)):
        rel = osp.relpath(path, REPO)[:-3].replace(osp.sep, '.')
        name = rel[:-len('.__init__')] if rel.endswith('.__init__') else rel
        yield name, path, ast.parse(open(path, encoding='utf-8').read())


def _imports(name, path, tree):
    """The ``effbackbones.*`` modules ``tree`` imports (relative imports resolved), at any depth
    (function-level imports count: they are dependencies too)."""
    package = name if path.endswith('__init__.py') else name.rsplit('.', 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith('effbackbones')}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')
                base = base[:len(base) - node.level + 1]
                target = '.'.join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ''
            if target.startswith('effbackbones'):
                found.add(target)
    return found


def _room(module):
    parts = module.split('.')
    return parts[1] if len(parts) > 1 else ''


def test_no_function_over_80_lines_and_no_module_over_600():
    long_functions, long_modules = [], []
    for name, path, tree in _modules():
        lines = len(open(path, encoding='utf-8').read().splitlines())
        if lines > MAX_MODULE_LINES:
            long_modules.append(f'{name} ({lines})')
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f'{name}.{node.name} ({n} lines)')
    assert not long_functions, long_functions
    assert not long_modules, long_modules


def test_rooms_import_only_what_the_map_allows():
    bad = []
    for name, path, tree in _modules():
        room = _room(name)
        for target in _imports(name, path, tree):
            if _room(target) in FORBIDDEN.get(room, ()):
                bad.append(f'{name} imports {target}')
    assert not bad, bad


def test_no_import_cycles_between_modules():
    graph = {}
    for name, path, tree in _modules():
        graph[name] = {t for t in _imports(name, path, tree) if t != name}
    names = set(graph)

    def resolve(target):     # 'effbackbones.checkpoint.files' or a name imported from a package
        while target and target not in names:
            target = target.rsplit('.', 1)[0] if '.' in target else ''
        return target

    edges = {n: {resolve(t) for t in ts} - {'', n} for n, ts in graph.items()}
    # a package's __init__ re-exporting its own modules is not a cycle between rooms
    edges = {n: {t for t in ts if not n.startswith(t + '.')} for n, ts in edges.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = 'open'
        for nxt in edges.get(node, ()):
            if state.get(nxt) == 'open':
                cycles.append(' -> '.join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 'done'

    for n in sorted(edges):
        if n not in state:
            visit(n, [n])
    assert not cycles, cycles
