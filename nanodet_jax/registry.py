"""Name -> implementation tables for everything a config selects by ``name``.

Each family keeps its own table beside its implementations (``models/backbones``,
``models/necks``, ``models/heads``, ``models/detectors``, ``assigners``, ``losses``,
``training/optim.py``, ``training/schedules.py``, ``evaluation``, ``training/ema.py``),
so adding an implementation is a file plus one entry; an unknown name fails with the
list of what exists.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from nanodet_jax.errors import ConfigError

T = TypeVar("T")


class UnknownNameError(ConfigError):
    """A config names an implementation that is not registered."""


class Registry(Generic[T]):
    """``kind`` names the config field in messages (e.g. ``"model.arch.backbone"``)."""

    def __init__(self, kind: str, entries: Mapping[str, T] | None = None):
        self.kind = kind
        self._entries: dict[str, T] = dict(entries or {})

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: Any) -> T:
        if name not in self._entries:
            raise UnknownNameError(
                f"unknown {self.kind} name {name!r}; available: {', '.join(self.names())}"
            )
        return self._entries[name]

    def register(self, name: str, value: T | None = None) -> Any:
        """``registry.register("Name", obj)``, or ``@registry.register("Name")``."""

        def add(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return add if value is None else add(value)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    @contextlib.contextmanager
    def registered(self, name: str, value: T) -> Iterator[T]:
        """Register ``value`` for the duration of a ``with`` block (tests, experiments)."""
        self.register(name, value)
        try:
            yield value
        finally:
            self.unregister(name)

    def build(self, cfg: Mapping[str, Any], *args: Any, drop: tuple[str, ...] = (), **kwargs: Any):
        """Call the entry ``cfg["name"]`` with the other keys of ``cfg`` (less ``drop``)."""
        options = dict(cfg)
        factory: Callable[..., Any] = self.get(options.pop("name", None))  # type: ignore[assignment]
        for key in drop:
            options.pop(key, None)
        return factory(*args, **options, **kwargs)
