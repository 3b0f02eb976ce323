"""Code-health figures of the deepcad_jax package: import cycles, module sizes, the
longest functions and imports inside functions.

  python benchmarks/code_metrics.py [--root PATH] [--json out.json]

Cycles are found in the import graph of the package's own modules twice: with
module-level imports only, and with imports inside functions too (those hide cycles
from the interpreter but not from the reader).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys


def modules(root: str) -> dict[str, str]:
  """{dotted name: path} of every module under `root`/deepcad_jax."""
  out = {}
  base = os.path.join(root, "deepcad_jax")
  for folder, _, files in os.walk(base):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
  return out


def imports(path: str, name: str, known: set[str]) -> tuple[set[str], set[str]]:
  """(module-level, inside-function) imports of package modules by the module `name`."""
  tree = ast.parse(open(path).read())
  top, inner = set(), set()
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]

  def resolve(node) -> list[str]:
    if isinstance(node, ast.Import):
      return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
      parts = package.split(".")[:len(package.split(".")) - node.level + 1]
      base = ".".join(parts + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]

  def visit(node, in_function: bool):
    for child in ast.iter_child_nodes(node):
      inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
      if isinstance(child, (ast.Import, ast.ImportFrom)):
        for target in resolve(child):
          while target and target not in known:
            target = target.rpartition(".")[0]
          if target and target != name:
            (inner if in_function else top).add(target)
      visit(child, inside)
  visit(tree, False)
  return top, inner


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def strong(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        strong(w)
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

  sys.setrecursionlimit(10000)
  for v in graph:
    if v not in index:
      strong(v)
  return out


def functions(path: str, name: str) -> list[tuple[int, str]]:
  tree = ast.parse(open(path).read())
  out = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      out.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
  return out


def measure(root: str) -> dict:
  mods = modules(root)
  known = set(mods)
  top, both, inner_count = {}, {}, {}
  for name, path in mods.items():
    t, i = imports(path, name, known)
    top[name], both[name] = t, t | i
    inner_count[name] = sorted(i - t)
  sizes = sorted(((sum(1 for _ in open(p)), n) for n, p in mods.items()), reverse=True)
  funcs = sorted((f for n, p in mods.items() for f in functions(p, n)), reverse=True)
  return {"modules": len(mods), "lines": sum(s for s, _ in sizes),
          "cycles_module_level": cycles(top), "cycles_with_function_imports": cycles(both),
          "imports_inside_functions": {n: v for n, v in inner_count.items() if v},
          "largest_modules": [[n, s] for s, n in sizes[:10]],
          "longest_functions": [[n, s] for s, n in funcs[:10]]}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))
  ap.add_argument("--json")
  args = ap.parse_args()
  m = measure(args.root)
  print(f"{m['modules']} modules, {m['lines']} lines")
  print(f"import cycles (module level): {m['cycles_module_level'] or 'none'}")
  print(f"import cycles (with imports inside functions): "
        f"{m['cycles_with_function_imports'] or 'none'}")
  n = sum(len(v) for v in m["imports_inside_functions"].values())
  print(f"package imports inside functions: {n} in {len(m['imports_inside_functions'])} "
        "modules")
  for name, targets in sorted(m["imports_inside_functions"].items()):
    print(f"  {name}: {', '.join(targets)}")
  print("largest modules: " + ", ".join(f"{n} {s}" for n, s in m["largest_modules"]))
  print("longest functions: " + ", ".join(f"{n} {s}" for n, s in m["longest_functions"]))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(m, f, indent=1)


if __name__ == "__main__":
  main()
