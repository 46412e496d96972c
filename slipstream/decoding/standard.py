"""Plain autoregressive decoding: one token per sequence per step. The reference decoder."""

from __future__ import annotations

from slipstream.decoding.base import Decoder
from slipstream.decoding.registry import DECODERS


@DECODERS.register("standard")
class StandardDecoder(Decoder):
    """Every hook at its default: feed the uncomputed tokens, sample the last position."""

    name = "standard"
