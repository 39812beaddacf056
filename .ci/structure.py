#!/usr/bin/env python3
"""The crate's structure, checked: top-level modules use only modules below them (no
cycles), and a feature's `cfg` stays in the feature's own files.

    python3 .ci/structure.py          # prints the layers and the feature cfg lines

A module of `src/` is its file or folder (`ledger.rs`, `redis/`); a `_off.rs` twin belongs
to the module it stands in for. A module uses another when its code names
`crate::other` (directly, or through a name the crate root re-exports). A feature's files
are those whose path names it (`redis`, `metrics`) or, for `openai`, names `openai`,
`usage` or `json`; a line elsewhere that names a feature inside `cfg(...)` counts against
the limit. Doc comments are not code and are skipped.
"""

import os
import re
import sys
from collections import defaultdict

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MAX_FEATURE_CFG_LINES = 12
FEATURE_FILES = {
    "redis": ("redis",),
    "metrics": ("metrics",),
    "openai": ("openai", "usage", "json"),
}


def sources():
    for folder, _, files in os.walk(os.path.join(ROOT, "src")):
        for name in files:
            if name.endswith(".rs"):
                path = os.path.relpath(os.path.join(folder, name), ROOT)
                if not path.startswith(os.path.join("src", "guide")):
                    yield path


def code_lines(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.lstrip().startswith("//"):
                yield number, line


def module_of(path):
    parts = path.split(os.sep)
    return "lib" if parts[1] == "lib.rs" else parts[1].removesuffix(".rs").removesuffix("_off")


def root_names():
    """Names the crate root re-exports, by the module they come from."""
    text = "".join(line for _, line in code_lines(os.path.join("src", "lib.rs")))
    names = {}
    for use in re.finditer(r"pub use self::(\w+)[^;{]*(?:\{([^}]*)\}|::(\w+));", text):
        for name in re.findall(r"\w+", use.group(2) or use.group(3)):
            names[name] = use.group(1)
    return names


def uses():
    names = root_names()
    graph = defaultdict(set)
    for path in sources():
        module = module_of(path)
        text = "".join(line for _, line in code_lines(path))
        found = re.findall(r"crate::(\w+)", text)
        for group in re.findall(r"crate::\{([^}]*)\}", text):
            found += [item.strip().split("::")[0] for item in group.split(",") if item.strip()]
        for name in found:
            other = names.get(name, name)
            if other not in (module, "lib") and not other[0].isupper():
                graph[module].add(other)
    return graph


def layers(graph):
    """The modules in layers, each using only those of the layers before it; `None` and
    the modules left over when they use each other in a circle."""
    modules = set(graph) | {m for used in graph.values() for m in used}
    placed, order = set(), []
    while len(placed) < len(modules):
        layer = sorted(m for m in modules - placed if graph[m] <= placed)
        if not layer:
            return None, sorted(modules - placed)
        order.append(layer)
        placed.update(layer)
    return order, []


def feature_cfg_lines():
    found = []
    for path in sorted(sources()):
        for number, line in code_lines(path):
            if "cfg" not in line:
                continue
            for feature, marks in FEATURE_FILES.items():
                if f'feature = "{feature}"' in line and not any(m in path for m in marks):
                    found.append(f"{path}:{number}: {line.strip()}")
                    break
    return found


def main():
    order, circle = layers(uses())
    failed = False
    if order is None:
        print(f"modules that use each other in a circle: {', '.join(circle)}")
        failed = True
    else:
        print("top-level modules, each using only those of the lines above it:")
        for number, layer in enumerate(order):
            print(f"  {number}: {' '.join(layer)}")
    lines = feature_cfg_lines()
    print(f"\nfeature cfg lines outside the feature's files: {len(lines)} (at most "
          f"{MAX_FEATURE_CFG_LINES})")
    for line in lines:
        print(f"  {line}")
    if len(lines) > MAX_FEATURE_CFG_LINES:
        failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
