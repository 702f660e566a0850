"""Tiny denoisers written the way other projects write them: the example models of "bring your own model", for
bench/byom_kinds.py and for the tests of pruning any architecture (pytest puts bench/ on the path:
pyproject.toml's `pythonpath`). They live here, not in tests/, because bench scripts import only the library and
each other; and not in the library, because they are examples, not part of the method.

- AdmUNet: an ADM/IDDPM-style UNet (`input_blocks` / `middle_block` / `output_blocks`) with its own GroupNorm
  subclass computed in float32, its own multi-head QKV attention (one qkv conv1d, a QKVAttention holding
  n_heads), scale-shift norm from the time embedding, dropout, a class embedding added to the time embedding
  and learned variance (2C output channels).
- TinyDiT: a DiT-style transformer: patchify conv, blocks of multi-head attention (one qkv linear) + MLP with
  adaLN-zero modulation from the time + class embedding, unpatchify.
- class_conditional_unet(): a diffusers UNet2DModel with attention and `num_class_embeds`.
- diffusers_dit(): a diffusers DiTTransformer2DModel with class labels and a learned variance.
- ddpm_pipeline(dir), latent_pipeline(dir): pipeline directories written with save_pretrained (the latter with a
  tiny AutoencoderKL: latent diffusion).

Every class sets `tdcdiff_init_kwargs`, so tdcdiff.serialization can save and rebuild it.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (N,) -> (N, dim), as in ADM and DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """ADM's GroupNorm: computed in float32 whatever the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class ResBlock(nn.Module):
    """ADM ResBlock: norm -> SiLU -> conv, then scale-shift norm from the embedding, dropout, conv; skip."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(8, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_norm = GroupNorm32(8, out_channels)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb)[..., None, None].chunk(2, dim=1)
        h = self.out_layers(self.out_norm(h) * (1 + scale) + shift)
        return self.skip(x) + h


class QKVAttention(nn.Module):
    """ADM's attention kernel on a fused qkv (N, 3 * heads * ch, T) laid out as [q | k | v], heads inside each."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.chunk(3, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum(
            "bct,bcs->bts", (q * scale).reshape(bs * self.n_heads, ch, length),
            (k * scale).reshape(bs * self.n_heads, ch, length),
        ).softmax(dim=-1)
        out = torch.einsum("bts,bcs->bct", weight, v.reshape(bs * self.n_heads, ch, length))
        return out.reshape(bs, -1, length)


class AttentionBlock(nn.Module):
    """ADM AttentionBlock: norm -> qkv conv1d -> QKVAttention -> proj_out, added to the input."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm32(8, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.attention = QKVAttention(num_heads)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        h = self.attention(self.qkv(self.norm(x).reshape(b, c, -1)))
        return x + self.proj_out(h).reshape(b, c, *spatial)


class TimestepSequential(nn.Sequential):
    """Passes the embedding to the layers that take one (ADM's TimestepEmbedSequential)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class AdmUNet(nn.Module):
    """A two-level ADM-style UNet called as model(x, t, class_labels=y); output (N, 2C, H, W) (eps, variance)."""

    def __init__(self, in_channels: int = 1, width: int = 32, num_heads: int = 4, num_classes: int = 10,
                 dropout: float = 0.1):
        super().__init__()
        self.tdcdiff_init_kwargs = {"in_channels": in_channels, "width": width, "num_heads": num_heads,
                                    "num_classes": num_classes, "dropout": dropout}
        self.width, self.num_classes = width, num_classes
        emb = 4 * width
        self.time_embed = nn.Sequential(nn.Linear(width, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Embedding(num_classes, emb)
        w2 = 2 * width
        self.input_blocks = nn.ModuleList([
            TimestepSequential(nn.Conv2d(in_channels, width, 3, padding=1)),
            TimestepSequential(ResBlock(width, emb, width, dropout)),
            TimestepSequential(nn.Conv2d(width, width, 3, stride=2, padding=1)),
            TimestepSequential(ResBlock(width, emb, w2, dropout), AttentionBlock(w2, num_heads)),
        ])
        self.middle_block = TimestepSequential(
            ResBlock(w2, emb, w2, dropout), AttentionBlock(w2, num_heads), ResBlock(w2, emb, w2, dropout)
        )
        self.output_blocks = nn.ModuleList([
            TimestepSequential(ResBlock(w2 + w2, emb, w2, dropout), AttentionBlock(w2, num_heads)),
            TimestepSequential(ResBlock(w2 + width, emb, w2, dropout), nn.Upsample(scale_factor=2),
                               nn.Conv2d(w2, w2, 3, padding=1)),
            TimestepSequential(ResBlock(w2 + width, emb, width, dropout)),
            TimestepSequential(ResBlock(width + width, emb, width, dropout)),
        ])
        self.out = nn.Sequential(GroupNorm32(8, width), nn.SiLU(), nn.Conv2d(width, 2 * in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.width))
        if class_labels is not None:
            emb = emb + self.label_emb(class_labels)
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


class DiTAttention(nn.Module):
    """Multi-head self-attention with one fused qkv linear laid out as [q | k | v] (as in timm / DiT)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class DiTBlock(nn.Module):
    """LayerNorm (no affine) -> modulate -> attention / MLP, gated; shift, scale and gate from adaLN-zero."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = DiTAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class TinyDiT(nn.Module):
    """A DiT called as model(x, t, class_labels=y) on (N, C, H, W) images, patch size `patch`."""

    def __init__(self, in_channels: int = 1, image_size: int = 8, patch: int = 2, dim: int = 64, depth: int = 2,
                 num_heads: int = 8, num_classes: int = 10):
        super().__init__()
        self.tdcdiff_init_kwargs = {"in_channels": in_channels, "image_size": image_size, "patch": patch, "dim": dim,
                                    "depth": depth, "num_heads": num_heads, "num_classes": num_classes}
        self.in_channels, self.patch, self.dim, self.num_classes = in_channels, patch, dim, num_classes
        self.x_embedder = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2, dim) * 0.02)
        self.t_embedder = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embedder = nn.Embedding(num_classes, dim)
        self.blocks = nn.ModuleList([DiTBlock(dim, num_heads) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.final_linear = nn.Linear(dim, patch * patch * in_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        cond = self.t_embedder(timestep_embedding(t, self.dim))
        if class_labels is not None:
            cond = cond + self.y_embedder(class_labels)
        for block in self.blocks:
            tokens = block(tokens, cond)
        shift, scale = self.final_modulation(cond)[:, None].chunk(2, dim=-1)
        out = self.final_linear(self.final_norm(tokens) * (1 + scale) + shift)
        p, gh, gw = self.patch, h // self.patch, w // self.patch
        out = out.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, c, h, w)


def class_conditional_unet(num_classes: int = 10):
    """A diffusers UNet2DModel for 1x8x8 images with attention in the low-resolution blocks and class labels."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, num_class_embeds=num_classes,
    )


def diffusers_dit(num_classes: int = 10):
    """A diffusers DiTTransformer2DModel for 1x8x8 images: 2 blocks of 4 heads of dimension 16, class labels,
    learned variance (2 output channels)."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=1, out_channels=2, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=num_classes, norm_num_groups=1,
    )


def ddpm_pipeline(directory):
    """Write a diffusers pipeline directory with save_pretrained: a UNet2DModel with a learned variance (2 output
    channels for 1) + DDPMScheduler (v-prediction, cosine, T=500). Returns the directory."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=2, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, add_attention=False)
    scheduler = DDPMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2",
                              prediction_type="v_prediction",
                              variance_type="learned_range")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(directory)
    return directory


def latent_pipeline(directory):
    """Write a latent diffusion pipeline directory with save_pretrained: a tiny AutoencoderKL (1-channel 8x8
    images <-> 2-channel 8x8 latents, scaling_factor 0.5), a class-conditional UNet2DModel with attention on its
    latents and a DDPMScheduler, named in model_index.json. Returns the directory."""
    import json
    from pathlib import Path

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel

    directory = Path(directory)
    torch.manual_seed(0)
    AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8,), latent_channels=2, layers_per_block=1,
                  norm_num_groups=4, sample_size=8, scaling_factor=0.5).save_pretrained(directory / "vae")
    UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(16, 32), layers_per_block=1,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                norm_num_groups=8, attention_head_dim=8, num_class_embeds=10).save_pretrained(directory / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(directory / "scheduler")
    (directory / "model_index.json").write_text(json.dumps({
        "_class_name": "DiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"],
        "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}))
    return directory
