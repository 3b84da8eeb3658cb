"""Small models with example inputs, for the demo, the CLI, the tests and the benchmarks.

The HF models are built from configs with random weights (no hub access); they need ``transformers``.
Every factory returns an :class:`Example`: ``(model, args, kwargs)``; the CLI accepts them as
``fxpeft.zoo:tiny_llama``.

Example:
    >>> from fxpeft.zoo import cnn
    >>> model, args, kwargs = cnn()
    >>> model(*args).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Example", "tiny_llama", "tiny_gpt2", "tiny_bert", "cnn", "FunctionalLM", "functional_lm"]


class Example(NamedTuple):
    model: nn.Module
    args: tuple
    kwargs: dict


def tiny_llama(layers: int = 2, hidden: int = 64, vocab: int = 256, batch: int = 2, seq: int = 16,
               seed: int = 0) -> Example:
    """A random tiny ``LlamaForCausalLM`` (4 heads, 2 KV heads) and ``input_ids``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return Example(LlamaForCausalLM(cfg).eval(), (), {"input_ids": torch.randint(0, vocab, (batch, seq)),
                                                      "use_cache": False})


def tiny_gpt2(layers: int = 2, hidden: int = 64, vocab: int = 256, seed: int = 0) -> Example:
    """A random tiny ``GPT2LMHeadModel`` (``Conv1D`` projections, ``wte``/``lm_head`` tied)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128,
                     bos_token_id=0, eos_token_id=0)
    return Example(GPT2LMHeadModel(cfg).eval(), (), {"input_ids": torch.randint(0, vocab, (2, 16)), "use_cache": False})


def tiny_bert(layers: int = 2, hidden: int = 64, vocab: int = 256, seed: int = 0) -> Example:
    """A random tiny ``BertModel`` with an attention mask."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=2 * hidden, max_position_embeddings=128)
    ids = torch.randint(0, vocab, (2, 16))
    return Example(BertModel(cfg).eval(), (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})


class SmallCNN(nn.Module):
    """Conv → BN → ReLU → Conv (padding="same", dilation 2) → Conv1x1 → pool → Linear."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=2, dilation=2)
        self.conv3 = nn.Conv2d(32, 32, 1)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        x = x.mean(dim=(2, 3))  # [N, 32, H, W] -> [N, 32]
        return self.fc(self.drop(x))


def cnn(seed: int = 0) -> Example:
    """A small CNN (conv LoRA sites, batch norm, dropout) and a ``[2, 3, 16, 16]`` image batch."""
    torch.manual_seed(seed)
    model = SmallCNN().eval()
    with torch.no_grad():  # non-trivial running stats, so a frozen BN is visible in outputs
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 1.5)
    return Example(model, (torch.randn(2, 3, 16, 16),), {})


class FunctionalLM(nn.Module):
    """A model that uses its own parameters directly: ``F.embedding``, ``F.linear``, ``@`` and ``@ W.t()``.

    Sites: ``emb`` (F.embedding on ``emb``), ``blocks.0.w_in`` (F.linear), ``blocks.0.w_out`` (``x @ W``, a
    ``[in, out]`` weight), ``head.weight``'s owner ``head`` (``x @ W.t()``).
    """

    def __init__(self, vocab: int = 64, dim: int = 32, layers: int = 2):
        super().__init__()
        self.emb = nn.Parameter(torch.randn(vocab, dim) * 0.1)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            blk = nn.Module()
            blk.w_in = nn.Parameter(torch.randn(4 * dim, dim) * dim ** -0.5)   # [out, in]
            blk.b_in = nn.Parameter(torch.zeros(4 * dim))
            blk.w_out = nn.Parameter(torch.randn(4 * dim, dim) * (4 * dim) ** -0.5)  # [in, out]
            self.blocks.append(blk)
        self.head = nn.Module()
        self.head.weight = nn.Parameter(torch.randn(vocab, dim) * dim ** -0.5)

    def forward(self, idx):
        x = F.embedding(idx, self.emb)
        for blk in self.blocks:
            h = F.gelu(F.linear(x, blk.w_in, blk.b_in))
            x = x + h @ blk.w_out
        return x @ self.head.weight.t()


def functional_lm(seed: int = 0) -> Example:
    """:class:`FunctionalLM` and a ``[2, 12]`` index batch."""
    torch.manual_seed(seed)
    return Example(FunctionalLM().eval(), (torch.randint(0, 64, (2, 12)),), {})
