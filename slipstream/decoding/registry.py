"""The decoder registry, the factory that validates options, and decoder composition.

A name "a+b" builds one decoder from several registered ones (e.g.
"token_recycling+sparse_attention": tree verification over sparse KV). Each exclusive hook
(lookahead slots, attention backend, inputs, select) comes from the one part that overrides
it; two parts overriding the same hook is an error. Notifications (on_fork, on_finish) go
to every part, and step/cumulative stats are merged. Options of a composite are nested by
part name: {"token_recycling": {...}, "sparse_attention": {"method": "block_topk"}}.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from slipstream.config import DecoderSpec
from slipstream.utils.registry import Registry

if TYPE_CHECKING:
    from slipstream.decoding.base import Decoder, DecoderContext

DECODERS: Registry[type[Decoder]] = Registry("decoder")

SEPARATOR = "+"
# Hooks only one part of a composite may override.
EXCLUSIVE_HOOKS = ("num_lookahead_slots", "attention_backend", "build_inputs", "select")


def part_names(name: str) -> list[str]:
    """The registered decoders a (possibly composite) name is made of."""
    parts = name.split(SEPARATOR)
    for part in parts:
        if part not in DECODERS:
            raise ValueError(
                f"unknown decoder {part!r}; valid decoders: {', '.join(DECODERS.names())}"
                f" (combine with {SEPARATOR!r}, e.g. token_recycling+sparse_attention)"
            )
    if len(set(parts)) != len(parts):
        raise ValueError(f"decoder {name!r} names a part twice")
    return parts


def hook_owners(classes: list[type[Decoder]]) -> dict[str, type[Decoder] | None]:
    """For each exclusive hook, the one class that overrides it (None = the default)."""
    from slipstream.decoding.base import Decoder

    owners: dict[str, type[Decoder] | None] = {}
    for hook in EXCLUSIVE_HOOKS:
        found = [c for c in classes if getattr(c, hook) is not getattr(Decoder, hook)]
        if len(found) > 1:
            names = " and ".join(repr(c.name) for c in found)
            raise ValueError(f"decoders {names} both override {hook}; they cannot be combined")
        owners[hook] = found[0] if found else None
    return owners


def _plain_options(name: str, options: dict[str, Any]) -> object:
    """Validate options against one decoder's Options dataclass (unknown keys are errors)."""
    cls = DECODERS[name]
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(options) - fields)
    if unknown:
        valid = ", ".join(sorted(fields)) or "none"
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for decoder {name!r}; valid: {valid}"
        )
    hints = typing.get_type_hints(cls.Options)
    for key, value in options.items():
        _check_type(name, key, value, hints.get(key))
    try:
        return cls.Options(**options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad option for decoder {name!r}: {exc}") from exc


# JSON value checks for the option types the Options dataclasses use. A bool is not an int
# here (true is not a count), an int is a float, NaN is no number (infinity is: cautious'
# gate_entropy Infinity turns its gate off).
_TYPE_CHECKS: dict[object, Callable[[object], bool]] = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v),
    str: lambda v: isinstance(v, str),
    type(None): lambda v: v is None,
}


def _check_type(decoder: str, key: str, value: object, annotation: object) -> None:
    """ValueError unless value is of the option's type (an `int | None` takes either):
    without this, "false" read as true, 2.5 slots failed inside a step, and a number where
    text belongs failed at the first request."""
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    allowed = allowed or (annotation,)
    checks = [_TYPE_CHECKS.get(t) for t in allowed]
    if any(check is None for check in checks):
        return  # a type these checks do not know: the dataclass checks it, if at all
    if not any(check(value) for check in checks if check is not None):
        names = " or ".join(
            "null" if t is type(None) else getattr(t, "__name__", str(t)) for t in allowed
        )
        raise ValueError(f"option {key!r} of decoder {decoder!r} must be {names}, got {value!r}")


def decoder_options(spec: DecoderSpec) -> object:
    """Validate spec.options; a composite's are {part name: that part's options}."""
    parts = part_names(spec.name)
    if len(parts) == 1:
        return _plain_options(parts[0], spec.options)
    hook_owners([DECODERS[p] for p in parts])
    unknown = sorted(set(spec.options) - set(parts))
    if unknown:
        raise ValueError(
            f"decoder {spec.name!r} takes options keyed by part ({', '.join(parts)});"
            f" got {', '.join(unknown)}"
        )
    nested: dict[str, object] = {}
    for part in parts:
        sub = spec.options.get(part, {})
        if not isinstance(sub, dict):
            raise ValueError(f"options for part {part!r} must be a JSON object")
        nested[part] = _plain_options(part, sub)
    return nested


def create_decoder(spec: DecoderSpec, ctx: DecoderContext) -> Decoder:
    """Instantiate the decoder `spec` names (a composite for "a+b")."""
    options = decoder_options(spec)
    parts = part_names(spec.name)
    if len(parts) == 1:
        return DECODERS[parts[0]](options, ctx)
    from slipstream.decoding.composite import composite_class

    assert isinstance(options, dict)
    decoders = [DECODERS[p](options[p], ctx) for p in parts]
    return composite_class(spec.name, decoders)(options, ctx, decoders)
