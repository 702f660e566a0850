"""A sampling setting: the sampler, its steps and feature caching, as one value ("dpm-solver++:20:c3") that tune's
ladder, a bundle's default sampling and `tdcdiff sample` share. Imports neither torch nor diffusers."""

from __future__ import annotations

from dataclasses import dataclass

from .files import is_count
from .samplers import SAMPLERS, sampler_kind
from .settings import is_integer


def check_cache_settings(cache_interval, cache_depth) -> int | None:
    """The branch depth to cache at (None: no caching) for a sampling call's settings.

    cache_interval: a full pass every this many steps, >= 1 (1: no caching). cache_depth: the shallow branch's
    depth (DeepCacheUNet), None for 1 (the shallowest, which caches the most); only with cache_interval > 1.
    Raises ValueError for an interval below 1 or a depth given without caching (the depth is checked against each
    UNet by DeepCacheUNet).
    """
    if not is_count(cache_interval, 1):
        raise ValueError(f"cache_interval (--cache-interval) must be an integer >= 1, got {cache_interval!r}: one "
                         "full UNet pass every that many steps (1: no feature caching)")
    if cache_interval == 1:
        if cache_depth is not None:
            raise ValueError(f"cache_depth (--cache-depth) {cache_depth!r} was given without feature caching; give "
                             "cache_interval (--cache-interval) >= 2 too, or drop cache_depth")
        return None
    return 1 if cache_depth is None else cache_depth


def _whole(text: str, what: str) -> int:
    """The integer >= 1 written in ASCII digits as `text` (int() also takes a sign, '_', other scripts); ValueError."""
    text = text.strip()
    if not (text.isascii() and text.isdigit() and int(text) >= 1):
        rule = " (ASCII digits 0-9 only: no sign, no other digits)" * any(c in "+-" or not c.isascii() for c in text)
        raise ValueError(f"{what} must be an integer >= 1, got {repr(text) if text else 'nothing'}{rule}")
    return int(text)


@dataclass(frozen=True)
class SamplingSetting:
    """How a model is sampled: the sampler (a name of SAMPLERS), its number of steps, and feature caching (a full
    pass every `cache_interval` steps, the shallow branch of depth `cache_depth` in between; see
    feature_cache.py). Written as text "sampler:steps", with ":cN" (cache interval N) and ":dD" (depth D) when
    caching: "ddim:50", "dpm-solver++:20:c3", "unipc:10:c2:d2".

    Raises ValueError (from the constructor) for an unknown sampler, steps below 1, or cache settings that
    check_cache_settings refuses; `check(T)` also checks the steps against a schedule's T.
    """

    sampler: str
    steps: int
    cache_interval: int = 1
    cache_depth: int | None = None

    def __post_init__(self):
        sampler_kind(self.sampler)
        if not is_count(self.steps, 1):
            raise ValueError(f"sampling steps must be an integer >= 1, got {self.steps!r}")
        check_cache_settings(self.cache_interval, self.cache_depth)

    @classmethod
    def parse(cls, text: str, option: str = "a sampling setting") -> SamplingSetting:
        """The setting written as `text` ("sampler:steps[:cN[:dD]]"). Raises ValueError naming `option` and the
        part of the text that is wrong, in the text's own terms (":d2"), not the sampling flags'."""
        parts = str(text).strip().split(":")
        form = "sampler:steps, with :cN for feature caching every N steps and :dD for its depth"
        try:
            letters = [p[:1] for p in parts[2:]]
            if len(parts) < 2 or not set(letters) <= {"c", "d"} or len(set(letters)) != len(letters):
                raise ValueError(f"takes {form}")
            steps = _whole(parts[1], "sampling steps")
            cache = {p[0]: _whole(p[1:], f"the number after ':{p[0]}'") for p in parts[2:]}
            if "d" in cache and cache.get("c", 1) == 1:
                raise ValueError(f":d{cache['d']} (cache_depth) was given without feature caching; add :cN with "
                                 f"N >= 2 (cache_interval), e.g. {parts[0]}:{steps}:c2:d{cache['d']}, or drop it")
            return cls(parts[0], steps, cache.get("c", 1), cache.get("d"))
        except ValueError as err:
            raise ValueError(f"{option} {text!r}: {err} (e.g. ddim:50, dpm-solver++:20:c3; samplers: "
                             f"{', '.join(SAMPLERS)})") from None

    def __str__(self) -> str:
        cache = f":c{self.cache_interval}" if self.cache_interval > 1 else ""
        depth = f":d{self.cache_depth}" if self.cache_depth is not None else ""
        return f"{self.sampler}:{self.steps}{cache}{depth}"

    def check(self, num_train_timesteps: int, key: str | None = None) -> SamplingSetting:
        """self, after checking its steps against a schedule of T = num_train_timesteps. key: the argument that gave
        the setting (e.g. save_bundle's "sampling"), named in the message with the steps it may take. Raises
        ValueError."""
        if self.steps > num_train_timesteps:
            fix = f"; give {key} 1..{num_train_timesteps} steps" if key else ""
            raise ValueError(f"{self} takes {self.steps} steps, more than the schedule's T={num_train_timesteps}{fix}")
        return self

    @classmethod
    def of(cls, value: object, key: str) -> SamplingSetting:
        """A setting given in code: a SamplingSetting, its text ("ddim:50", parse) or its dict in to_dict's form
        (from_dict, as a bundle's manifest holds it). Raises ValueError naming `key` for anything else."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls.parse(value, key)
        if isinstance(value, dict):
            return cls.from_dict(value, key)
        raise ValueError(f"{key} must be a SamplingSetting, its text (sampler:steps[:cN[:dD]], e.g. 'ddim:50') or a "
                         f"dict {{\"sampler\", \"steps\"[, \"cache_interval\", \"cache_depth\"]}}, got a "
                         f"{type(value).__name__} ({str(value)[:80]})")

    def caching_with(self, cache_interval, cache_depth) -> tuple[object, object]:
        """(cache_interval, cache_depth) of a sampling call that gives either, both or neither (None: not given) over
        this default setting, item by item as the sampler and steps are: a depth given alone takes this setting's
        interval, an interval given alone its depth (none where that interval is 1: nothing is cached). The values
        are checked by the sampling call (check_cache_settings there refuses a given depth with interval 1)."""
        interval = self.cache_interval if cache_interval is None else cache_interval
        if cache_depth is None and (cache_interval is None or is_integer(cache_interval) and cache_interval != 1):
            cache_depth = self.cache_depth
        return interval, cache_depth

    def to_dict(self) -> dict:
        return {"sampler": self.sampler, "steps": self.steps, "cache_interval": self.cache_interval,
                "cache_depth": self.cache_depth}

    @classmethod
    def from_dict(cls, data: object, key: str) -> SamplingSetting:
        """The setting stored under `key` in a file (untrusted), e.g. a bundle manifest's "sampling". Raises
        ValueError naming the file's keys ('sampling.cache_depth'), not the command-line flags."""
        keys = ("sampler", "steps", "cache_interval", "cache_depth")
        if not isinstance(data, dict) or not set(data) <= set(keys) or not {"sampler", "steps"} <= set(data):
            raise ValueError(f"'{key}' must be {{\"sampler\", \"steps\"[, \"cache_interval\", \"cache_depth\"]}}, "
                             f"got {str(data)[:120]}")
        given = {name: data[name] for name in ("steps", "cache_interval", "cache_depth")
                 if name in data and not (name == "cache_depth" and data[name] is None)}
        for name, value in given.items():
            if not is_count(value, 1):
                raise ValueError(f"'{key}.{name}' must be an integer >= 1, got {value!r}")
        if "cache_depth" in given and given.get("cache_interval", 1) == 1:
            raise ValueError(f"'{key}.cache_depth' is {given['cache_depth']} but '{key}.cache_interval' is 1 (no "
                             "feature caching); set cache_interval >= 2 or remove cache_depth")
        try:
            return cls(**data)
        except ValueError as err:
            raise ValueError(f"'{key}': {err}") from None
