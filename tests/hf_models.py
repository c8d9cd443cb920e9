"""Random-init Qwen2 models built with transformers, for parity tests."""
from pathlib import Path

import numpy as np

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6,
            max_position_embeddings=512)


def make_hf_model(tie: bool = True, seed: int = 0, **overrides):
    """A Qwen2ForCausalLM with every parameter randomised (biases and norms too, so a bug in them shows)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    fields = {**TINY, **overrides}
    config = Qwen2Config(tie_word_embeddings=tie, bos_token_id=None, eos_token_id=fields["vocab_size"] - 1,
                         pad_token_id=None, **fields)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def make_hf_checkpoint(directory, tie=True, seed=0, max_shard_size=None, **overrides) -> Path:
    model = make_hf_model(tie=tie, seed=seed, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(directory), safe_serialization=True, **kwargs)
    return Path(directory)


def hf_logits(directory_or_model, tokens: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
    import torch
    from transformers import Qwen2ForCausalLM
    model = directory_or_model
    if not hasattr(model, "forward"):
        model = Qwen2ForCausalLM.from_pretrained(str(directory_or_model), attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                    attention_mask=torch.as_tensor(mask, dtype=torch.long),
                    position_ids=torch.as_tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()


def hf_greedy(directory, prompts, max_new_tokens, stop_ids, pad_id):
    """HF generate's greedy continuations of left-padded prompts (lists of ids), the rows padded after a stop."""
    import torch
    from transformers import Qwen2ForCausalLM
    model = Qwen2ForCausalLM.from_pretrained(str(directory), attn_implementation="eager").eval()
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=list(stop_ids), pad_token_id=pad_id)
    return out[:, width:].tolist()
