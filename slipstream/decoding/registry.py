"""The decoder registry and the factory that validates options."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from slipstream.config import DecoderSpec
from slipstream.utils.registry import Registry

if TYPE_CHECKING:
    from slipstream.decoding.base import Decoder, DecoderContext

DECODERS: Registry[type[Decoder]] = Registry("decoder")


def decoder_options(spec: DecoderSpec) -> object:
    """Validate spec.options against the decoder's Options dataclass (unknown keys are errors)."""
    cls = DECODERS[spec.name]
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(spec.options) - fields)
    if unknown:
        valid = ", ".join(sorted(fields)) or "none"
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for decoder {spec.name!r}; valid: {valid}"
        )
    try:
        return cls.Options(**spec.options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad option for decoder {spec.name!r}: {exc}") from exc


def create_decoder(spec: DecoderSpec, ctx: DecoderContext) -> Decoder:
    """Instantiate the decoder `spec` names."""
    return DECODERS[spec.name](decoder_options(spec), ctx)
