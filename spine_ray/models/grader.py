"""Stage 2: severity grader on 2.5D crop stacks (the first-place design, with switches).

Each sample holds T targets (e.g. the five conditions at one level, or one condition at five
levels), each a stack of S crops (slice ± k) of C channels. Per target: a timm encoder embeds
every slice → a bidirectional LSTM runs across the slices → attention pools the slices → a
3-class head. The attention logits double as an auxiliary head that finds the annotated slice
(`spine_ray.stages.losses.slice_loss`; first place: CV 0.262 → 0.252).

Switches (GraderConfig): a learned level embedding, a condition embedding and a view embedding
(for samples that mix sagittal and axial crops of one level) added to every slice feature; and a
mixer across the T targets of a sample (transformer or GRU, fifth place) before the head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from spine_ray.core.schema import CONDITIONS, LEVELS
from spine_ray.models.backbone import BackboneConfig, build_encoder


@dataclass(frozen=True)
class GraderConfig(BackboneConfig):
    """Stage-2 network settings: the encoder's (`BackboneConfig`), then the slice model's."""

    n_classes: int = 3
    dim: int = 256  # slice feature width fed to the LSTM
    lstm_hidden: int = 128  # per direction; pooled features are 2× this
    lstm_layers: int = 1
    dropout: float = 0.1
    drop_path_rate: float = 0.0
    level_embedding: bool = False
    condition_embedding: bool = False
    n_views: int = 1  # > 1: a view embedding (e.g. 0 sagittal T2, 1 sagittal T1, 2 axial T2)
    target_mixer: Literal["none", "transformer", "gru"] = "none"
    mixer_layers: int = 1
    mixer_heads: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.n_classes, self.dim, self.lstm_hidden, self.lstm_layers, self.n_views) < 1:
            raise ValueError("n_classes, dim, lstm_hidden, lstm_layers and n_views must be positive")
        if self.target_mixer == "transformer" and (2 * self.lstm_hidden) % self.mixer_heads:
            raise ValueError(f"2·lstm_hidden ({2 * self.lstm_hidden}) must divide by mixer_heads ({self.mixer_heads})")


class _GRUMixer(nn.Module):
    """Residual bidirectional GRU over the targets of a sample; padded targets enter as zeros."""

    def __init__(self, dim: int, layers: int) -> None:
        super().__init__()
        self.gru = nn.GRU(dim, dim // 2, num_layers=layers, batch_first=True, bidirectional=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:  # [B, T, D]
        inp = x if mask is None else x * mask[..., None].to(x.dtype)
        return self.norm(x + self.gru(inp)[0])


class _TransformerMixer(nn.Module):
    """Transformer encoder over the targets of a sample; padded targets are masked out."""

    def __init__(self, dim: int, layers: int, heads: int, dropout: float) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:  # [B, T, D]
        return self.encoder(x, src_key_padding_mask=None if mask is None else ~mask)


class Grader(nn.Module):
    """Crop stacks [B, T, S, C, H, W] → {'logits' [B, T, 3], 'slice_logits'/'slice_attention' [B, T, S]}.

    img_size: the crop side (the stage's out_px); transformer families are built for it, and a
    backbone that cannot take it fails here with a ValueError.
    """

    def __init__(self, cfg: GraderConfig, img_size: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder, mean, std = build_encoder(cfg, img_size, maps=False, drop_path_rate=cfg.drop_path_rate)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.proj = nn.Sequential(nn.Linear(self.encoder.num_features, cfg.dim), nn.LayerNorm(cfg.dim))
        self.level = nn.Embedding(len(LEVELS), cfg.dim) if cfg.level_embedding else None
        self.condition = nn.Embedding(len(CONDITIONS), cfg.dim) if cfg.condition_embedding else None
        self.view = nn.Embedding(cfg.n_views, cfg.dim) if cfg.n_views > 1 else None
        self.lstm = nn.LSTM(
            cfg.dim, cfg.lstm_hidden, num_layers=cfg.lstm_layers, batch_first=True, bidirectional=True,
            dropout=cfg.dropout if cfg.lstm_layers > 1 else 0.0,
        )
        width = 2 * cfg.lstm_hidden
        self.attention = nn.Sequential(nn.Linear(width, width // 2), nn.Tanh(), nn.Linear(width // 2, 1))
        match cfg.target_mixer:
            case "transformer":
                self.mixer = _TransformerMixer(width, cfg.mixer_layers, cfg.mixer_heads, cfg.dropout)
            case "gru":
                self.mixer = _GRUMixer(width, cfg.mixer_layers)
            case _:
                self.mixer = None
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(width, cfg.n_classes)

    def _embed(self, table: nn.Embedding | None, ids: Tensor | None, name: str) -> Tensor | int:
        if table is None:
            return 0
        if ids is None:
            raise ValueError(f"this GraderConfig uses a {name} embedding: pass `{name}` [B, T]")
        return table(ids.long())[:, :, None]  # [B, T, 1, dim]

    def forward(
        self,
        x: Tensor,
        level: Tensor | None = None,
        condition: Tensor | None = None,
        view: Tensor | None = None,
        target_mask: Tensor | None = None,
        slice_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """x [B, T, S, C, H, W]; level/condition/view [B, T] long (indices into LEVELS, CONDITIONS,
        views), needed when their embedding is on; target_mask [B, T] bool, False for padding;
        slice_mask [B, T, S] bool, False for slices beyond the volume (no attention goes there)."""
        if x.ndim != 6:
            raise ValueError(f"expected [B, T, S, C, H, W], got {tuple(x.shape)}")
        b, t, s = x.shape[:3]
        x = x.flatten(0, 2)  # [B·T·S, C, H, W]
        if self.cfg.normalise_input:
            x = (x - self.mean) / self.std
        f = self.encoder(x)  # [B·T·S, F]
        f = self.proj(f).view(b, t, s, -1)  # [B, T, S, dim]
        f = (
            f
            + self._embed(self.level, level, "level")
            + self._embed(self.condition, condition, "condition")
            + self._embed(self.view, view, "view")
        )
        seq = self.lstm(self.dropout(f).flatten(0, 1))[0]  # [B·T, S, 2h]
        slice_logits = self.attention(seq).squeeze(-1)  # [B·T, S]
        if slice_mask is not None:
            # Large but finite, so a CE target on a masked slice stays finite.
            slice_logits = slice_logits.masked_fill(~slice_mask.bool().flatten(0, 1), -1e4)
        attn = slice_logits.softmax(-1)
        pooled = (attn[..., None] * seq).sum(1).view(b, t, -1)  # [B, T, 2h]
        if self.mixer is not None:
            pooled = self.mixer(pooled, None if target_mask is None else target_mask.bool())
        logits = self.head(self.dropout(pooled))  # [B, T, n_classes]
        return {
            "logits": logits,
            "slice_logits": slice_logits.view(b, t, s),
            "slice_attention": attn.view(b, t, s),
        }


__all__ = ["Grader", "GraderConfig"]
