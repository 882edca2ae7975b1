"""Name tables: a converter's renaming declared once, as ``(official, ours)`` pattern pairs.

A pattern is a parameter name in which ``{field}`` stands for one dotted segment or part of one
(``layers.{i}``, ``bn{j}``) and ``{field+}`` for one or more segments (``{leaf+}`` =
``out_proj.weight``). Both sides of a row hold the same fields, so a row reads in either
direction: :meth:`NameTable.to_ours` renames a released name (the converters), and
:meth:`NameTable.to_official` gives the released name of one of ours (the tests build released
state dicts from our models with it). In each direction the first row that matches wins; rows
whose ``ours`` is None name released keys that are dropped.
"""

import re
from typing import Dict, Iterable, List, Optional, Pattern, Sequence, Tuple

from torch import Tensor

Row = Tuple[str, Optional[str]]

_FIELD = re.compile(r"\{(\w+)(\+?)\}")


def _compile(pattern: str) -> Tuple[Pattern[str], List[str]]:
    """The regex of ``pattern`` (fields as named groups) and its field names."""
    parts, fields, end = [], [], 0
    for m in _FIELD.finditer(pattern):
        parts += [
            re.escape(pattern[end : m.start()]),
            f"(?P<{m.group(1)}>{'.+' if m.group(2) else '[^.]+'})",
        ]
        fields.append(m.group(1))
        end = m.end()
    parts.append(re.escape(pattern[end:]))
    return re.compile("".join(parts)), fields


def _fill(pattern: str, values: Dict[str, str]) -> str:
    return _FIELD.sub(lambda m: values[m.group(1)], pattern)


class NameTable:
    """An ordered table of ``(official, ours)`` name patterns (see the module docstring).

    Args:
        rows: the pairs; ``ours`` None marks released keys that are dropped.
    """

    def __init__(self, rows: Iterable[Row]):
        self.rows: Tuple[Row, ...] = tuple(rows)
        self._forward: List[Tuple[Pattern[str], Optional[str]]] = []
        self._inverse: List[Tuple[Pattern[str], str]] = []
        for official, ours in self.rows:
            regex, fields = _compile(official)
            if ours is not None and sorted(fields) != sorted(_compile(ours)[1]):
                raise ValueError(f"row ({official!r}, {ours!r}) has different fields on its sides")
            self._forward.append((regex, ours))
            if ours is not None:
                self._inverse.append((_compile(ours)[0], official))

    def prefixed(self, official: str, ours: str) -> "NameTable":
        """The table with ``official`` / ``ours`` put before the names of each side."""
        return NameTable((official + o, None if u is None else ours + u) for o, u in self.rows)

    def lookup(self, name: str) -> Tuple[bool, Optional[str]]:
        """``(known, our name)`` of a released name; a known name without ours is dropped."""
        for regex, ours in self._forward:
            m = regex.fullmatch(name)
            if m:
                return True, None if ours is None else _fill(ours, m.groupdict())
        return False, None

    def to_ours(self, name: str) -> Optional[str]:
        """Our name of a released name; None if no row renames it."""
        return self.lookup(name)[1]

    def to_official(self, name: str) -> Optional[str]:
        """The released name of one of ours (the first row that gives it); None if none does."""
        for regex, official in self._inverse:
            m = regex.fullmatch(name)
            if m:
                return _fill(official, m.groupdict())
        return None


def rename(state_dict: Dict[str, Tensor], table: NameTable, what: str) -> Dict[str, Tensor]:
    """A released state dict with our names: every key through ``table``, dropped keys left out;
    keys no row knows are a ``KeyError`` naming them (``what``: the release, for the message)."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        known, ours = table.lookup(key)
        if ours is not None:
            out[ours] = value
        elif not known:
            unknown.append(key)
    raise_unknown(unknown, what)
    return out


def rename_back(state_dict: Dict[str, Tensor], table: NameTable) -> Dict[str, Tensor]:
    """The inverse of :func:`rename`: our state dict with the released names ``table`` gives
    them; a name no row gives is a ``KeyError``."""
    out = {}
    for key, value in state_dict.items():
        official = table.to_official(key)
        if official is None:
            raise KeyError(f"no released name for {key}")
        out[official] = value
    return out


def raise_unknown(keys: Sequence[str], what: str) -> None:
    if keys:
        raise KeyError(
            f"{len(keys)} {what} keys not understood: {', '.join(sorted(keys)[:8])}"
            + (" ..." if len(keys) > 8 else "")
        )


def module_rows(official: str, ours: str, modules: Dict[str, str]) -> List[Row]:
    """Rows renaming the modules of layer stacks: ``{official}.{i}.{module}.*`` →
    ``{ours}.{i}.{modules[module]}.*``, e.g. ``module_rows("transformer.encoder.layers",
    "encoder.layers", {"norm1": "norm"})``."""
    return [
        (f"{official}.{{i}}.{module}.{{leaf+}}", f"{ours}.{{i}}.{target}.{{leaf+}}")
        for module, target in modules.items()
    ]


# FrozenBatchNorm has no ``num_batches_tracked``
BATCHNORM_COUNTERS: List[Row] = [("{module+}.num_batches_tracked", None)]


def same(*prefixes: str) -> List[Row]:
    """Rows keeping the names under each of ``prefixes`` (``"bbox_embed"`` → ``bbox_embed.*``)."""
    return [(f"{p}.{{leaf+}}", f"{p}.{{leaf+}}") for p in prefixes]
