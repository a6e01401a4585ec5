"""String key -> memory design, so ``ModelConfig.memory`` round-trips through config files."""

from __future__ import annotations

from collections.abc import Callable

from memlm.errors import ConfigError
from memlm.model.memory.base import MemoryDesign

_DESIGNS: dict[str, type[MemoryDesign]] = {"none": MemoryDesign}


def register_memory_design(name: str) -> Callable[[type[MemoryDesign]], type[MemoryDesign]]:
    def wrap(cls: type[MemoryDesign]) -> type[MemoryDesign]:
        if name in _DESIGNS and _DESIGNS[name] is not cls:
            raise ValueError(f"memory design {name!r} is already registered")
        cls.name = name
        _DESIGNS[name] = cls
        return cls

    return wrap


def get_memory_design(name: str) -> MemoryDesign:
    try:
        return _DESIGNS[name]()
    except KeyError:
        raise ConfigError(f"unknown memory design {name!r}; known: {sorted(_DESIGNS)}") from None


def list_memory_designs() -> list[str]:
    return sorted(_DESIGNS)
