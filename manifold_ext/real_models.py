"""Networks people grow, built from configs with random weights (nothing is downloaded).

Small Hugging Face GPT-2 and LLaMA language models and torchvision ResNets, for tests, benchmarks
and examples. They bring what the zoo of :mod:`manifold_ext.models` does not: tied parameters,
non-persistent buffers, ``ModelOutput`` results, ``Conv1D`` layers that store ``(in, out)``,
RMSNorm and grouped-query attention. ``transformers`` and ``torchvision`` are optional
dependencies (``pip install 'manifold_ext[models]'``), imported only when a builder runs.
"""

from __future__ import annotations

import torch
from torch import nn


def _need(package: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise ImportError(f"this model needs {package}: pip install 'manifold_ext[models]' "
                          f"(or pip install {package})") from err


def gpt2(*, vocab: int = 101, positions: int = 64, width: int = 32, layers: int = 2, heads: int = 4,
         inner: int | None = None, seed: int | None = 0) -> nn.Module:
    """A ``transformers.GPT2LMHeadModel`` (``lm_head.weight`` tied to ``transformer.wte.weight``)
    with random weights drawn under ``seed`` (None: from the global RNG, as ``nn.Module``
    constructors draw), in eval mode with dropout off."""
    tf = _need("transformers")
    config = tf.GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=width, n_layer=layers,
                           n_head=heads, n_inner=inner, resid_pdrop=0.0, embd_pdrop=0.0,
                           attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    if seed is None:
        return tf.GPT2LMHeadModel(config).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return tf.GPT2LMHeadModel(config).eval()


def llama(*, vocab: int = 101, positions: int = 64, width: int = 32, layers: int = 2, heads: int = 4,
          kv_heads: int = 2, inner: int = 48, tie: bool = False, seed: int = 0) -> nn.Module:
    """A ``transformers.LlamaForCausalLM`` (RMSNorm, SwiGLU, grouped-query attention with
    ``kv_heads`` key-value heads, rotary embeddings whose ``inv_freq`` is a non-persistent
    buffer), optionally with tied input and output embeddings, random weights drawn under
    ``seed``, in eval mode."""
    tf = _need("transformers")
    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=inner,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            num_key_value_heads=kv_heads, max_position_embeddings=positions,
                            tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0,
                            pad_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return tf.LlamaForCausalLM(config).eval()


def resnet18(*, classes: int = 10, seed: int = 0, randomize_bn: bool = True) -> nn.Module:
    """A torchvision ``resnet18`` with ``classes`` outputs and random weights drawn under
    ``seed``; with ``randomize_bn``, its BatchNorm affine parameters and running statistics are
    random too (fresh ones are 1 and 0, which hide normalisation bugs). In eval mode."""
    tv = _need("torchvision")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tv.models.resnet18(num_classes=classes)
        if randomize_bn:
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    with torch.no_grad():
                        m.weight.uniform_(0.5, 1.5)
                        m.bias.normal_(0, 0.1)
                        m.running_mean.normal_(0, 0.1)
                        m.running_var.uniform_(0.5, 1.5)
    return model.eval()
