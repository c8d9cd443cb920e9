"""Reading XLA's compiled HLO text in tests."""


def ynn_fused_bodies(hlo_text: str) -> list[str]:
    """The bodies of the computations that compiled HLO hands to YNNPACK."""
    bodies, current, name = {}, [], None
    for line in hlo_text.splitlines():
        if line.startswith("%") and line.rstrip().endswith("{"):
            name, current = line.split()[0], []
        elif line.startswith("}") and name:
            bodies[name], name = "\n".join(current), None
        elif name:
            current.append(line)
    called = [line.split("calls=")[1].split(",")[0] for line in hlo_text.splitlines()
              if "__ynn_fusion" in line and "calls=" in line]
    return [bodies[c] for c in called if c in bodies]


# ----------------------------------------------------------------------------- lowered StableHLO loops

def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def stablehlo_functions(module_text: str) -> dict[str, list[str]]:
    """The lines of each `func.func` of a lowered module (`jit(f).lower(...).as_text()`), by name."""
    functions, name, lines = {}, None, []
    for line in module_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("func.func"):
            name, lines = stripped.split("@", 1)[1].split("(", 1)[0], []
        elif name and stripped == "}" and _indent(line) == 2:
            functions[name], name = lines, None
        elif name:
            lines.append(line)
    return functions


def while_loops(lines: list[str]) -> list[dict]:
    """Every `stablehlo.while` among these lines (nested ones too): its indent, cond and body lines."""
    loops = []
    for i, line in enumerate(lines):
        if "stablehlo.while" not in line:
            continue
        depth = _indent(line)
        do = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "} do {" and _indent(lines[j]) == depth)
        end = next(j for j in range(do + 1, len(lines)) if lines[j].strip() == "}" and _indent(lines[j]) == depth)
        loops.append({"indent": depth, "cond": lines[i + 2:do], "body": lines[do + 1:end]})
    return loops


def has_static_trip_count(loop: dict) -> bool:
    """Whether a while's condition is `counter < constant` and nothing else (a scan, a fori_loop with
    static bounds): the trip count XLA can know, so on GPU no iteration copies the predicate to the host."""
    ops = [line.split("=", 1)[-1].strip() for line in loop["cond"]]
    return (len(ops) == 3 and ops[0].startswith("stablehlo.constant") and ops[1].startswith("stablehlo.compare LT")
            and ops[2].startswith("stablehlo.return"))


def loops_reachable(lines: list[str], functions: dict[str, list[str]], _seen=None) -> list[dict]:
    """The while loops in these lines and in every function they call, transitively."""
    seen = set() if _seen is None else _seen
    loops = list(while_loops(lines))
    for line in lines:
        if "call @" in line:
            callee = line.split("call @", 1)[1].split("(", 1)[0]
            if callee in functions and callee not in seen:
                seen.add(callee)
                loops += loops_reachable(functions[callee], functions, seen)
    return loops
