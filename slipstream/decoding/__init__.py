"""Pluggable decoders, registered by name. Importing this package registers all of them."""

from slipstream.decoding import (
    cautious,  # noqa: F401  (registers "cautious")
    ngram,  # noqa: F401  (registers "ngram")
    sparse_attention,  # noqa: F401  (registers "sparse_attention")
    standard,  # noqa: F401  (registers "standard")
    token_recycling,  # noqa: F401  (registers "token_recycling")
)
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
