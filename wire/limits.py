"""The bounds a decoded message must respect (``decode(data, limits)``)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Bounds a decoded message must respect. The defaults fit OLMoE-class
    models (L=16, E=64) with thousands of samples per message."""

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_str_len: int = 256
    max_samples: int = 8192
    max_layers: int = 1024
    max_experts: int = 4096
    max_top_k: int = 256
    max_map_entries: int = 256
    max_count_groups: int = 64  # groups of the all-token counts split by row group (Routing.group_tokens_GLE)
    # Mean routing weights are float32 means of float32 distributions.
    prob_sum_tol: float = 1e-3
    prob_range_tol: float = 1e-5
    unit_tol: float = 1e-4  # entropy ratio in [0, 1], cosine in [-1, 1]


DEFAULT_LIMITS = Limits()
