"""Tiny random configs of the real transformers MoE classes (no hub access)."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 64
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128, pad_token_id=None, bos_token_id=None,
            eos_token_id=None)

FAMILIES = {
    "olmoe": lambda: tf.OlmoeConfig(**BASE, num_experts=8, num_experts_per_tok=2),
    "mixtral": lambda: tf.MixtralConfig(**BASE, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(**BASE, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                           shared_expert_intermediate_size=16),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(**BASE, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16),
    "deepseek_v3": lambda: tf.DeepseekV3Config(**BASE, n_routed_experts=8, num_experts_per_tok=2,
                                               moe_intermediate_size=16, first_k_dense_replace=1, n_group=1,
                                               topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                                               qk_nope_head_dim=8, v_head_dim=8, rope_scaling=None),
    "gpt_oss": lambda: tf.GptOssConfig(**BASE, num_local_experts=8, num_experts_per_tok=2, head_dim=8),
    # Beyond the six: a router whose weight is a Linear's inside it (HunYuanMoEV1Gate.wg).
    "hunyuan_v1_moe": lambda: tf.HunYuanMoEV1Config(**BASE, num_experts=8, moe_topk=2, head_dim=8),
}


def tiny_model(family: str = "olmoe", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = FAMILIES[family]()
    for k, v in overrides.items():
        setattr(config, k, v)
    model = tf.AutoModelForCausalLM.from_config(config)
    model.train()
    return model


def tiny_lightning_module(val_metric=None):
    """A LightningModule around tiny_model("olmoe"): training_step returns the model's loss (Lightning calls it,
    not the module's forward); with ``val_metric``, validation_step logs next-token accuracy under that name."""
    import lightning.pytorch as L
    import torch

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_model("olmoe")

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def validation_step(self, batch, batch_idx):
            logits = self.model(**batch).logits
            accuracy = (logits[:, :-1].argmax(-1) == batch["labels"][:, 1:]).float().mean()
            self.log(val_metric, accuracy)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    if val_metric is None:
        del Module.validation_step  # no validation loop
    return Module()
