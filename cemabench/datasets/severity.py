"""A corruption's parameters at any severity from 0 to 5, shared by both severity tables."""


def at(table: tuple, severity: float, zero, inverse: bool = False):
    """A corruption's parameters at ``severity``: the table's entry at an integer severity 1 to 5, and between two
    integer severities the linear interpolation of their entries (CCC's finer severities), severity 0 standing for
    ``zero``, parameters that leave an image (nearly) as it is; ``inverse`` interpolates reciprocals (shot noise's
    photon count, infinite at severity 0)."""
    if severity == int(severity):
        return table[int(severity) - 1]
    low, w = int(severity), severity - int(severity)
    a, b = (zero if low == 0 else table[low - 1]), table[low]

    def mix(u, v):
        return 1 / ((1 - w) / u + w / v) if inverse else (1 - w) * u + w * v

    return tuple(map(mix, a, b)) if isinstance(b, tuple) else mix(a, b)
