"""The registries: one dict per entry-point group, filled once, the same door for everyone.

graphopt's own passes, backends and models register through the entry-point groups
``graphopt.passes``, ``graphopt.backends`` and ``graphopt.models`` declared in
``pyproject.toml``, exactly as a third-party plugin does; the core never imports one by
name. A plugin that fails to load (any exception, even ``SystemExit``), that duplicates a
name, or that is not what its group needs is recorded as *broken*: listing shows it, runs
that do not use it go on, and a run that names it stops with a ``PluginError``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata
import logging
from typing import Any, Callable, Generic, TypeVar

from graphopt.errors import PluginError
from graphopt.pass_base import Pass, adapt_pass

__all__ = ["Registry", "BrokenEntry", "passes", "backends", "models", "reload"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class BrokenEntry:
    """An entry point that could not be loaded, and why."""

    name: str
    distribution: str
    version: str
    value: str
    error: str


class Registry(Generic[T]):
    """Name → object for one entry-point group, loaded on first use."""

    def __init__(self, group: str, what: str, check: Callable[[str, Any], T]) -> None:
        self.group, self.what, self._check = group, what, check
        self._entries: dict[str, T] | None = None
        self.broken: dict[str, BrokenEntry] = {}

    def _load(self) -> dict[str, T]:
        if self._entries is not None:
            return self._entries
        by_name: dict[str, list[importlib.metadata.EntryPoint]] = {}
        for ep in importlib.metadata.entry_points(group=self.group):
            candidates = by_name.setdefault(ep.name, [])
            if all(ep.value != seen.value for seen in candidates):  # one dist seen twice on sys.path
                candidates.append(ep)
        entries: dict[str, T] = {}
        for name, candidates in sorted(by_name.items()):
            # graphopt's own entry keeps its name; a plugin claiming it is the broken one.
            candidates.sort(key=lambda e: (_dist(e)[0] != "graphopt", e.value))
            chosen, rivals = candidates[0], candidates[1:]
            if rivals and _dist(chosen)[0] != "graphopt":
                for ep in candidates:
                    self._mark_broken(ep, f"duplicate {self.what} name {name!r}, also registered by "
                                      f"{', '.join(_dist(o)[0] for o in candidates if o is not ep)}")
                continue
            for ep in rivals:
                self._mark_broken(ep, f"duplicate {self.what} name {name!r}: graphopt's own {chosen.value} keeps it")
            try:
                entries[name] = self._check(name, chosen.load())
            except BaseException as error:  # noqa: BLE001 - a plugin may raise anything, SystemExit included
                if isinstance(error, KeyboardInterrupt):
                    raise
                last_line = (str(error).strip().splitlines() or [""])[-1]
                self._mark_broken(chosen, f"{type(error).__name__}: {last_line}")
        self._entries = entries
        return entries

    def _mark_broken(self, ep: importlib.metadata.EntryPoint, error: str) -> None:
        dist, version = _dist(ep)
        logger.warning("%s %r from %s %s (%s) is broken: %s", self.what, ep.name, dist, version, ep.value, error)
        self.broken.setdefault(ep.name, BrokenEntry(ep.name, dist, version, ep.value, error))

    def names(self) -> list[str]:
        return sorted(self._load())

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._load().items())

    def __contains__(self, name: str) -> bool:
        return name in self._load()

    def get(self, name: str) -> T:
        """The object registered as ``name``; ``PluginError`` naming the nearest valid name."""
        entries = self._load()
        if name in entries:
            return entries[name]
        if name in self.broken:
            b = self.broken[name]
            raise PluginError(f"{self.what} {name!r} from {b.distribution} {b.version} ({b.value}) "
                              f"failed to load: {b.error}. Fix or uninstall that plugin.")
        near = difflib.get_close_matches(name, list(entries), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else f"; known: {', '.join(sorted(entries))}"
        raise PluginError(f"unknown {self.what} {name!r}{hint}")

    def reload(self) -> None:
        """Forgets what was loaded, so entry points added to ``sys.path`` since are seen."""
        self._entries, self.broken = None, {}


def _dist(ep: importlib.metadata.EntryPoint) -> tuple[str, str]:
    return (ep.dist.name, ep.dist.version) if ep.dist else ("?", "?")


def _check_backend(name: str, obj: Any) -> Any:
    from graphopt.backend import Backend

    if not (isinstance(obj, type) and issubclass(obj, Backend)):
        raise TypeError(f"{obj!r} is not a graphopt Backend class")
    return obj


def _check_model(name: str, obj: Any) -> Any:
    if not callable(obj):
        raise TypeError(f"{obj!r} is not callable; a model entry point returns a ModelBundle")
    return obj


passes: Registry[type[Pass]] = Registry("graphopt.passes", "pass", adapt_pass)
backends: Registry[Any] = Registry("graphopt.backends", "backend", _check_backend)
models: Registry[Callable[[], Any]] = Registry("graphopt.models", "model", _check_model)


def reload() -> None:
    """Reloads every registry (tests use it after putting a plugin on ``sys.path``)."""
    for registry in (passes, backends, models):
        registry.reload()
