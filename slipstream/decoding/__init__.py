"""Pluggable decoders, registered by name. Importing this package registers all of them."""

from slipstream.decoding import standard  # noqa: F401  (registers "standard")
from slipstream.decoding import ngram  # noqa: F401  (registers "ngram")
from slipstream.decoding import token_recycling  # noqa: F401  (registers "token_recycling")
from slipstream.decoding import cautious  # noqa: F401  (registers "cautious")
from slipstream.decoding import sparse_attention  # noqa: F401  (registers "sparse_attention")
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
