"""The one exception of the wire contract."""

from __future__ import annotations

# Every reason decode() can give. The collector exports rejections labelled by
# these, so they are part of the contract: add, never rename.
REASONS = (
    "too_large",  # over Limits.max_message_bytes
    "malformed",  # not a msgpack map, or structurally broken
    "version",  # unknown protocol version
    "kind",  # unknown message kind
    "missing_field",
    "field_type",  # a field of the wrong type
    "string_length",  # a string over Limits.max_str_len
    "too_many",  # too many samples / layers / experts / map entries
    "shape",  # array shapes inconsistent within the message
    "dtype",  # an array of the wrong dtype
    "non_finite",  # NaN or infinity
    "probability_range",  # a mean routing weight outside [0, 1]
    "probability_sum",  # a mean routing distribution not summing to 1
    "counts_exceed",  # top-k counts above tokens x top_k
    "value_range",  # any other out-of-range value
)


class WireError(ValueError):
    """An invalid message. ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
