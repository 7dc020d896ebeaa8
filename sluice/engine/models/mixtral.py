"""One decoder for the Mixtral family: MoE MLP (Mixtral) or dense MLP (Mistral, Llama).

Legend: N tokens in the step (all sequences flattened), D hidden, Hq/Hkv query/KV
heads, Dh head dim, I intermediate, E experts, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sluice.engine.config import ModelConfig
from sluice.engine.layers import fusion
from sluice.engine.layers.attention import Attention, AttentionMetadata
from sluice.engine.layers.linear import Linear
from sluice.engine.layers.moe import MoE
from sluice.engine.layers.norm import RMSNorm
from sluice.engine.layers.rotary import RotaryEmbedding


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.hq, self.hkv, self.dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, kv = self.hq * self.dh, self.hkv * self.dh
        self.split = (q, kv, kv)  # kept here: a quantized qkv_proj need not know it
        self.qkv_proj = Linear(cfg.hidden_size, q + 2 * kv, shard_sizes=self.split)
        self.o_proj = Linear(q, cfg.hidden_size)
        self.rotary = rotary
        self.attn = Attention(self.hq, self.hkv, self.dh)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        N = x.shape[0]
        qkv = self.qkv_proj(x)
        if fusion.use_fused(qkv) and qkv.is_contiguous() and self.attn.k_cache.dtype == qkv.dtype:
            from sluice.engine.kernels.fused_small import rope_store_kv  # rotary + KV store, one launch

            q = rope_store_kv(qkv, positions, self.rotary.cos, self.rotary.sin, self.attn.k_cache,
                              self.attn.v_cache, meta.slot_mapping, self.hq, self.hkv, self.dh)
            return self.o_proj(self.attn.attend(q, meta).reshape(N, self.hq * self.dh))
        q, k, v = qkv.split(self.split, dim=-1)
        q, k = self.rotary(positions, q.view(N, self.hq, self.dh), k.view(N, self.hkv, self.dh))
        out = self.attn(q, k, v.view(N, self.hkv, self.dh), meta)  # (N, Hq, Dh)
        return self.o_proj(out.reshape(N, self.hq * self.dh))


class DenseMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, (intermediate_size, intermediate_size))
        self.down_proj = Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (N, I) each
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = (
            MoE(cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok)
            if cfg.is_moe else DenseMLP(cfg.hidden_size, cfg.intermediate_size)
        )

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (mlp output, residual (N, D)). The output is (N, D), or a MoE's unsummed (N, K, D)
        per-expert terms (MoE.forward): the next forward_residual sums them as it adds."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm.forward_residual(x, residual)
        x = self.self_attn(x, positions, meta)
        x, residual = self.post_attention_layernorm.forward_residual(x, residual)
        return self.mlp(x), residual


class CausalLM(nn.Module):
    """MixtralForCausalLM / MistralForCausalLM / LlamaForCausalLM."""

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None, build_layers: bool = True) -> None:
        """build_layers=False leaves ``layers`` empty for the loader to append one at a
        time (``new_layer``), so a layer can be quantized before the next one exists."""
        super().__init__()
        self.config = cfg
        positions = max_positions or cfg.max_position_embeddings
        self.rotary = RotaryEmbedding(cfg.head_dim, positions, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(self.new_layer() for _ in range(cfg.num_layers if build_layers else 0))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def new_layer(self) -> DecoderLayer:
        """A decoder layer sharing this model's rotary tables (on the current default device)."""
        return DecoderLayer(self.config, self.rotary)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions (N,) -> final hidden states (N, D)."""
        x = self.embed_tokens(input_ids)  # (N, D)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, meta)
        x, _ = self.norm.forward_residual(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(S, D) -> (S, V) in fp32."""
        return self.lm_head(hidden).float()

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.layers]
