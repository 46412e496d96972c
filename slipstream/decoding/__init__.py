"""Pluggable decoders, registered by name. Importing this package registers all of them."""

from slipstream.decoding import standard  # noqa: F401  (registers "standard")
from slipstream.decoding.base import Decoder, DecoderContext, StepInputs, StepResult
from slipstream.decoding.registry import DECODERS, create_decoder, decoder_options

__all__ = [
    "DECODERS",
    "Decoder",
    "DecoderContext",
    "StepInputs",
    "StepResult",
    "create_decoder",
    "decoder_options",
]
