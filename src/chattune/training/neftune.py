"""NEFTune: uniform noise on the input embeddings while training (Jain et al. 2023, Algorithm 1).

Each embedding vector gets noise drawn from U(-1, 1) * alpha / sqrt(L * d), d the
embedding width and L the length of the sequence it belongs to; only in training mode,
so validation losses and every decoded answer see clean embeddings.

Written here rather than reusing ``transformers.integrations.neftune_post_forward_hook``:
that hook takes L from the tensor (``output.size(1)``), the padded row. In a packed flat
row (``collate(flat=True)``: one row holding a whole micro-batch) that L is the sum of
every conversation's length, so the noise would shrink with the batch size; in padded
batches a conversation's noise would depend on its longest neighbour. Here L is each
conversation's own token count, read from the batch the model is called with (position
ids restart at 0 for every packed conversation; the 2D attention mask counts a padded
row's real tokens), so the noise a conversation gets does not depend on how it was batched.
"""

from __future__ import annotations

import torch


class NEFTune:
    """The two hooks: one on the model that reads the batch's layout, one on the embedding that adds noise."""

    def __init__(self, model: torch.nn.Module, alpha: float):
        self.alpha = alpha
        self.lengths: torch.Tensor | None = None  # (B, T): the length of the sequence each token belongs to
        self.handles = [
            model.register_forward_pre_hook(self._read_batch, with_kwargs=True),
            model.get_input_embeddings().register_forward_hook(self._add_noise),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _read_batch(self, module, args, kwargs) -> None:
        self.lengths = sequence_lengths(kwargs.get("position_ids"), kwargs.get("attention_mask"))

    def _add_noise(self, module, args, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        lengths = self.lengths
        if lengths is None or lengths.shape != output.shape[:2]:  # called without our batch: whole rows
            lengths = torch.full(output.shape[:2], output.shape[1], device=output.device)
        scale = self.alpha / torch.sqrt(lengths.to(output.device, torch.float32) * output.shape[-1])  # (B, T)
        noise = torch.empty_like(output).uniform_(-1, 1) * scale[..., None].to(output.dtype)  # (B, T, d)
        return output + noise


def sequence_lengths(position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) length of the conversation each token belongs to, or None when the batch does not say.

    Packed rows: a conversation starts wherever the position id is 0 (padding after the
    last one counts as one more sequence; it carries no loss). Padded rows: the real tokens
    of the 2D mask.
    """
    if position_ids is not None:
        starts = position_ids == 0  # (B, T)
        starts[:, 0] = True
        segment = starts.long().cumsum(-1) - 1  # (B, T): index of the conversation within its row
        segment = segment + torch.arange(segment.shape[0], device=segment.device)[:, None] * segment.shape[1]
        return torch.bincount(segment.flatten())[segment]  # (B, T)
    if attention_mask is not None and attention_mask.dim() == 2:
        return attention_mask.sum(-1, keepdim=True).clamp(min=1).expand_as(attention_mask)
    return None


def add_neftune(model: torch.nn.Module, alpha: float) -> NEFTune | None:
    """Register NEFTune on ``model`` (PEFT wrappers included); None and nothing done when ``alpha`` is 0."""
    return NEFTune(model, alpha) if alpha > 0 else None
