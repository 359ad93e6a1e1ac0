"""What the config dataclasses share: reading them back from a stored dict, and refusing settings they ignore."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Iterable

from cmtl.errors import InvalidParameterError, bad_param

#: Seeds are integers in [0, SEED_LIMIT): what torch's and numpy's generators both take, with room for the
#: offsets some seeds get (a version number, a sample count) before they reach one.
SEED_LIMIT = 2**62


def known_keys(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``d`` that are fields of the dataclass ``cls``: a record written by a newer cmtl
    may hold keys this one does not know (the manifest check reports those, see cmtl.registry.manifest)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def is_seed(value: Any) -> bool:
    """Whether ``value`` is an integer in [0, SEED_LIMIT) (a bool is not)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < SEED_LIMIT


def check_seed(value: Any, owner: str) -> None:
    """Refuse a seed that is not an integer in [0, SEED_LIMIT): ``None`` would seed Python's ``random`` from
    the clock (a different sample every run, silently) and torch refuses floats, strings and bools only once
    training has started."""
    if not is_seed(value):
        raise InvalidParameterError(bad_param("seed", owner, "be an integer in [0, 2**62)", value))


def plain_numbers(config: Any) -> None:
    """Replace numpy scalars among the fields of the dataclass ``config`` (and inside its tuples and lists)
    by the Python numbers they hold. A numpy integer fails ``isinstance(x, int)``, so checks refused it as
    no integer; a numpy float passed them, trained, and then could not be written to JSON."""
    for f in fields(config):
        value = getattr(config, f.name)
        plain = _plain(value)
        if plain is not value:
            object.__setattr__(config, f.name, plain)  # frozen dataclasses too


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        items = [_plain(v) for v in value]
        return value if all(a is b for a, b in zip(items, value)) else type(value)(items)
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:  # np.int64, np.float32, np.bool_
        return value.item()
    return value


def set_fields(config: Any, names: Iterable[str]) -> list[str]:
    """The fields among ``names`` (in their order) that the dataclass ``config`` holds away from their default."""
    defaults = {f.name: f.default for f in fields(config)}
    return [k for k in names if getattr(config, k) != defaults[k]]


def refuse_unread(config: Any, choice: str, reads: dict[str, tuple[str, ...]]) -> None:
    """Refuse fields of ``config`` set away from their default that its field ``choice`` (a mode such as a
    schedule or a penalty) never reads under the value chosen: they would train as if unset, silently.
    ``reads``: field -> the values of ``choice`` that read it."""
    chosen = getattr(config, choice)
    ignored = [k for k in set_fields(config, reads) if chosen not in reads[k]]
    if ignored:
        used = sorted(k for k, users in reads.items() if chosen in users)
        applies = "; ".join(f"{k} to {', '.join(repr(u) for u in users)}" for k, users in reads.items())
        them = "them" if len(ignored) > 1 else "it"
        raise ValueError(f"{ignored} set, but {choice}={chosen!r} does not read {them}: it would be ignored. "
                         + (f"This {choice} reads {used}. " if used else "")
                         + f"What applies where: {applies}. Leave the others out or pick the {choice} they belong to.")
