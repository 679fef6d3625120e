"""Auto-discovery beyond the families the reference tests check (test_agent_capture.py): more of
transformers' MoE families, each a tiny random config of its real class, one training step. What
ships must be whole — one message, no hook error, K choices per token, cosines wherever there are
two MoE layers or more — and each layer's mean must be that of the router's own scores: softmax of
its logits, or for the families whose router code scores with a sigmoid (read in transformers 5.24)
the sigmoid scores divided by their sum (METRICS.md Notation)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sink import Sink

import grokwatch.agent as gw

VOCAB, EXPERTS, TOP_K, TOKENS = 64, 4, 2, 8
# Set where a config has them; a family's own names for the same thing are all listed.
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128, pad_token_id=None, bos_token_id=None,
            eos_token_id=None, num_experts=EXPERTS, num_local_experts=EXPERTS, n_routed_experts=EXPERTS,
            num_experts_per_tok=TOP_K, moe_topk=TOP_K, top_k=TOP_K, moe_intermediate_size=16,
            expert_intermediate_size=16, shared_expert_intermediate_size=16, head_dim=8, n_group=1, topk_group=1,
            first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=8)
FAMILIES = ["afmoe", "cohere2_moe", "deepseek_v2", "ernie4_5_moe", "exaone_moe", "flex_olmo", "glm4_moe",
            "glm4_moe_lite", "granitemoe", "granitemoeshared", "jetmoe", "laguna", "minimax",
            "minimax_m2", "nemotron_h", "phimoe", "qwen3_next", "solar_open", "llama4_text",
            "jamba", "granitemoehybrid", "kimi_linear", "dots1", "lfm2_moe", "longcat_flash", "dbrx",
            "mimo_v2_flash"]
# Per-layer lists sized for the default depth, and sizes TINY does not name, made to fit two layers.
SPECIFIC = {"qwen3_next": dict(layer_types=["linear_attention", "full_attention"]),
            "llama4_text": dict(intermediate_size_mlp=16, interleave_moe_layer_step=1),
            "jamba": dict(attn_layer_offset=1, attn_layer_period=2, expert_layer_offset=0, expert_layer_period=1,
                          mamba_d_state=4, mamba_d_conv=2, mamba_expand=1, mamba_dt_rank=4, use_mamba_kernels=False),
            "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"], mamba_d_state=4,
                                     mamba_d_conv=2, mamba_expand=1, mamba_n_heads=4, mamba_d_head=8,
                                     mamba_n_groups=1, mamba_chunk_size=8, shared_intermediate_size=16),
            "kimi_linear": dict(layer_types=["linear_attention", "full_attention"], mlp_layer_types=["sparse"] * 2,
                                qk_head_dim=16, q_lora_rank=None, num_experts_per_token=TOP_K, linear_head_dim=8,
                                num_shared_experts=1),
            "dots1": dict(n_shared_experts=1, layer_types=["full_attention"] * 2, max_window_layers=2),
            "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=0),
            "mimo_v2_flash": dict(layer_types=["full_attention", "sliding_attention"], mlp_layer_types=["sparse"] * 2,
                                  num_key_value_heads=2, sliding_window=4),  # its sliding layers double the kv heads
            "longcat_flash": dict(num_layers=2, qk_head_dim=16, ffn_hidden_size=16, expert_ffn_hidden_size=16,
                                  zero_expert_num=2, moe_topk=TOP_K)}
# Sub-configs a family builds from dicts at construction (DBRX: its router and experts sizes live in
# ffn_config, top-k on the MoE block; clip_qkv and rope_theta are needed to run at all in 5.24).
NESTED = {"dbrx": dict(d_model=32, attn_config=dict(kv_n_heads=4, rope_theta=10000.0, clip_qkv=8.0),
                       ffn_config=dict(ffn_hidden_size=16, moe_num_experts=EXPERTS, moe_top_k=TOP_K))}
# LongCat-Flash also routes to zero-computation experts (the token passes unchanged): real choices,
# scored by the router beside the others.
ZERO_EXPERTS = {"longcat_flash": 2}
SIGMOID = {"afmoe", "exaone_moe", "glm4_moe", "glm4_moe_lite", "laguna", "llama4_text", "minimax_m2", "nemotron_h",
           "solar_open", "kimi_linear", "dots1", "lfm2_moe", "mimo_v2_flash"}


def tiny(family: str):
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = CONFIG_MAPPING[family](**NESTED.get(family, {}))
    for key, value in {**TINY, **SPECIFIC.get(family, {})}.items():
        if hasattr(config, key):
            setattr(config, key, value)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config).train()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_is_found_and_ships_whole_summaries(family):
    model = tiny(family)
    shape = gw.discover(model)
    logits = []
    taps = [layer.router.register_forward_hook(
        lambda m, a, out, i=layer.logits_index: logits.append(  # a tuple, or the logits alone (DBRX)
            (out[i] if isinstance(out, (tuple, list)) else out).detach().double().reshape(2, TOKENS, -1)))
        for layer in shape.layers]
    sink = Sink()
    try:
        mon = gw.attach(model, sink.endpoint, family, every_n_steps=1, max_samples_per_step=2)
        ids = torch.randint(0, VOCAB, (2, TOKENS), generator=torch.Generator().manual_seed(1))
        model(input_ids=ids, labels=ids).loss.backward()
        stats = mon.stats()
        mon.close()
        [msg] = sink.wait_routing()
    finally:
        sink.close()
        for tap in taps:
            tap.remove()
    assert stats["hook_errors"] == 0 and stats["dropped"] == {}, stats
    width = EXPERTS + ZERO_EXPERTS.get(family, 0)  # what the router scores
    assert msg.mean_probs_NLE.shape[1:] == (shape.num_layers, width) and msg.top_k == TOP_K
    assert shape.distribution == ("sigmoid" if family in SIGMOID else "softmax")
    scores = [torch.sigmoid(x) / torch.sigmoid(x).sum(-1, keepdim=True) if family in SIGMOID else torch.softmax(x, -1)
              for x in logits[:shape.num_layers]]
    expected = torch.stack([p.mean(dim=1) for p in scores], dim=1)  # [rows, layers, experts]
    np.testing.assert_allclose(msg.mean_probs_NLE, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert (msg.topk_counts_NLE.sum(-1) == TOP_K * TOKENS).all()
    # every row sampled: the all-token counts (router hooks, agent/counts.py) equal the sampled rows' top-k
    # counts (the reduction's, another path) — also where the ids come from the experts' pre-hook
    assert msg.counted_forwards == 1
    np.testing.assert_array_equal(msg.expert_tokens_LE, msg.topk_counts_NLE.sum(0, dtype=np.uint64))
    assert (msg.adj_cosine_NJ is not None) == (shape.num_layers > 1)
