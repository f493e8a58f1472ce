"""Small models of the three families the engine must handle, and vertices for them."""

import torch
import torch.nn.functional as F
from torch import nn


def mlp(seed=0, widths=(64, 32, 24, 10)):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )


class TinyTransformer(nn.Module):
    """Token and position embeddings, one pre-LN block (attention from Linear layers and
    scaled_dot_product_attention, feed-forward), mean pooling, a linear classifier."""

    def __init__(self, vocab=13, length=6, width=16, heads=2, classes=5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.heads = heads
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(length, width)
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.ff1 = nn.Linear(width, 2 * width)
        self.ff2 = nn.Linear(2 * width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens):
        N, T = tokens.shape
        h = self.tok(tokens) + self.pos(torch.arange(T, device=tokens.device))
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        split = lambda t: t.reshape(N, T, self.heads, -1).transpose(1, 2)
        a = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(N, T, -1))
        h = h + self.ff2(torch.relu(self.ff1(self.ln2(h))))
        return self.head(h.mean(1))


def randomise_bn(model, seed):
    """Distinct running statistics per vertex, so that interpolating them is visible."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def bigram_lm(seed=0, vocab=256, width=16, hidden=32):
    """A language model that ``expand`` can grow: token ids (N, T) to next-token logits
    (N, T, vocab), each position from its own token alone (a bigram model)."""
    from collections import OrderedDict

    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(emb=nn.Embedding(vocab, width), fc1=nn.Linear(width, hidden), act=nn.ReLU(),
                                     out=nn.Linear(hidden, vocab)))
