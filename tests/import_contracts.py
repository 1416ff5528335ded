"""A custom import-linter contract: no import cycle among the modules of the root packages.

The built-in contracts check layers and sibling packages; this one checks single modules, so a
cycle hidden inside one layer (a stage importing its runner that imports it) is found too.
Loaded by ``lint-imports`` through ``contract_types`` in pyproject.toml.
"""

from __future__ import annotations

from grimp import ImportGraph
from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


def _find_cycles(graph: ImportGraph, modules: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & modules) for m in modules}
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(edges[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return cycles


class AcyclicModulesContract(Contract):
    """No module of ``packages`` reaches itself through imports (package ``__init__`` modules excluded:
    a package re-exporting its children is not a cycle)."""

    type_name = "acyclic_modules"
    packages = fields.ListField(subfield=fields.StringField())

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        modules = set()
        for package in self.packages:  # type: ignore[attr-defined]
            modules |= {m for m in graph.find_descendants(package) if not graph.find_children(m)}
        cycles = _find_cycles(graph, modules)
        return ContractCheck(kept=not cycles, warnings=[], metadata={"cycles": cycles})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for cycle in check.metadata["cycles"]:
            output.print_error(f"import cycle among {len(cycle)} modules: {', '.join(cycle)}", bold=False)
            output.new_line()
