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
