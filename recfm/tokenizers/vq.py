"""A small VQ-VAE image tokenizer: an image becomes grid x grid discrete codes, each code one
vocabulary token (`<img_0>` ... `<img_{K-1}>`), so the language backbone can generate images as token
sequences and the decoder here draws them.

The model is the original VQ-VAE (van den Oord et al. 2017): strided convs and residual blocks down
to a grid x grid map of code_dim vectors, nearest-neighbour quantization against a codebook of K
vectors, and the mirror-image decoder. The codebook is learned by exponential moving averages of the
encoder outputs assigned to each code (VQ-VAE-2), which is steadier than a codebook loss, and codes
that go unused for a few steps are re-seeded from current encoder outputs (as in Jukebox): without
that, most of a codebook dies early and the image vocabulary the backbone sees is mostly dead tokens.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .images import to_pixels, to_tensor

VERSION = 1


@dataclass
class VQConfig:
    image_size: int = 32  # 32 or 64 pixels square
    channels: int = 64  # conv width at the grid resolution (half of it above)
    codebook_size: int = 512  # K: how many image tokens join the vocabulary
    code_dim: int = 32  # small codes keep nearest-neighbour search meaningful and usage high
    grid: int = 8  # grid x grid codes per image
    commitment: float = 0.25  # beta: pulls encoder outputs towards their codes
    ema_decay: float = 0.99
    dead_after: int = 20  # training steps a code may go unused before it is re-seeded
    version: int = VERSION

    def __post_init__(self):
        factor = self.image_size // self.grid
        if self.image_size % self.grid or factor < 2 or factor & (factor - 1):
            raise ValueError(f"image_size / grid must be a power of two >= 2, got "
                             f"{self.image_size} / {self.grid}")


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class Quantizer(nn.Module):
    """Nearest-code lookup with an EMA-learned codebook and dead-code restarts."""

    def __init__(self, k: int, dim: int, decay: float, dead_after: int):
        super().__init__()
        self.decay, self.dead_after = decay, dead_after
        self.register_buffer("codebook", torch.randn(k, dim))
        # EMA statistics: how many vectors each code receives, and their sum; codebook = sum / size.
        self.register_buffer("cluster_size", torch.ones(k))
        self.register_buffer("code_sum", self.codebook.clone())
        self.register_buffer("idle_steps", torch.zeros(k, dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(False))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Code index of each row of z (N, dim). Pure: no statistics change."""
        d = z.pow(2).sum(1, keepdim=True) - 2 * z @ self.codebook.T + self.codebook.pow(2).sum(1)
        return d.argmin(1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize z (N, dim) -> (z_q with straight-through gradients, codes, commitment loss).
        In training mode also updates the codebook."""
        with torch.autocast(z.device.type, enabled=False):  # distances and EMA sums in fp32
            z = z.float()
            if self.training and not self.initialized:  # data-dependent init: seed every code
                every_code = torch.ones(len(self.codebook), dtype=torch.bool, device=z.device)
                self._restart(every_code, z.detach())
                self.initialized.fill_(True)
            codes = self.nearest(z.detach())
            if self.training:
                self._update(z.detach(), codes)
            z_q = self.codebook[codes]
            commit = F.mse_loss(z, z_q)
        return z + (z_q - z).detach(), codes, commit

    @torch.no_grad()
    def _update(self, z: torch.Tensor, codes: torch.Tensor) -> None:
        onehot = F.one_hot(codes, len(self.codebook)).type_as(z)
        counts = onehot.sum(0)
        self.cluster_size.lerp_(counts, 1 - self.decay)
        self.code_sum.lerp_(onehot.T @ z, 1 - self.decay)
        n = self.cluster_size.sum()  # Laplace smoothing keeps empty codes from dividing by ~0
        size = (self.cluster_size + 1e-5) / (n + len(self.codebook) * 1e-5) * n
        self.codebook.copy_(self.code_sum / size[:, None])
        self.idle_steps.add_(1).masked_fill_(counts > 0, 0)
        self._restart(self.idle_steps >= self.dead_after, z)

    @torch.no_grad()
    def _restart(self, dead: torch.Tensor, z: torch.Tensor) -> None:
        """Move each dead code onto a random current encoder output, so it starts out in use."""
        n = int(dead.sum())
        if n == 0:
            return
        pick = z[torch.randint(len(z), (n,), device=z.device)]
        self.codebook[dead] = pick
        self.code_sum[dead] = pick
        self.cluster_size[dead] = 1.0
        self.idle_steps[dead] = 0


class VQTokenizer(nn.Module):
    """Encoder -> quantizer -> decoder. Images are (B, 3, S, S) floats in [0, 1]."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = c = config
        n_down = int(math.log2(c.image_size // c.grid))
        # Widths per resolution, image -> grid: 3, ..., channels/2, channels.
        ch = [3] + [c.channels // 2 ** (n_down - i) for i in range(1, n_down + 1)]
        down = []
        for i in range(n_down):
            down += [nn.Conv2d(ch[i], ch[i + 1], 4, stride=2, padding=1), nn.ReLU()]
        self.encoder = nn.Sequential(
            *down, nn.Conv2d(c.channels, c.channels, 3, padding=1),
            ResBlock(c.channels), ResBlock(c.channels), nn.ReLU(), nn.Conv2d(c.channels, c.code_dim, 1))
        self.quantizer = Quantizer(c.codebook_size, c.code_dim, c.ema_decay, c.dead_after)
        up = []
        for i in range(n_down, 0, -1):
            up += [nn.ReLU(), nn.ConvTranspose2d(ch[i], ch[i - 1], 4, stride=2, padding=1)]
        self.decoder = nn.Sequential(
            nn.Conv2d(c.code_dim, c.channels, 3, padding=1), ResBlock(c.channels), ResBlock(c.channels),
            *up)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction (unclamped), codes (B, grid*grid), commitment loss)."""
        z = self.encoder(x * 2 - 1)
        b, d, h, w = z.shape
        z_q, codes, commit = self.quantizer(z.permute(0, 2, 3, 1).reshape(-1, d))
        z_q = z_q.view(b, h, w, d).permute(0, 3, 1, 2)
        return (self.decoder(z_q) + 1) / 2, codes.view(b, h * w), commit

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _as_tensor(self, images) -> torch.Tensor:
        size = self.config.image_size
        if not isinstance(images, torch.Tensor):
            images = to_tensor(list(images), size)
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images.float(), (size, size), mode="bilinear", antialias=True)
        return images.to(self.device, torch.float32)

    @torch.no_grad()
    def encode(self, images) -> torch.LongTensor:
        """Images ((B, 3, H, W) in [0, 1], or a list of anything `load_image` takes) -> codes
        (B, grid*grid), row-major. Resized to image_size first."""
        z = self.encoder(self._as_tensor(images) * 2 - 1)
        b, d, h, w = z.shape
        return self.quantizer.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h * w)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, grid*grid) -> images (B, 3, image_size, image_size) in [0, 1]."""
        g = self.config.grid
        z_q = self.quantizer.codebook[codes.to(self.device)].view(-1, g, g, self.config.code_dim)
        return ((self.decoder(z_q.permute(0, 3, 1, 2)) + 1) / 2).clamp(0, 1)

    def decode_to_pil(self, codes: torch.Tensor) -> list[Image.Image]:
        pixels = self.decode(codes).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(p) for p in pixels]

    def token_strings(self) -> list[str]:
        """The vocabulary entries for the codes, index i <-> `<img_i>`."""
        return [f"<img_{i}>" for i in range(self.config.codebook_size)]

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors (weights and codebook statistics, no pickle),
        each atomically so that a killed save never leaves a half-written file behind."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = json.dumps(asdict(self.config), indent=2).encode()
        _atomic_write(directory / "config.json", lambda p: Path(p).write_bytes(config))
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        _atomic_write(directory / "model.safetensors", lambda p: save_file(state, p))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "VQTokenizer":
        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        if config.get("version", 1) > VERSION:
            raise ValueError(f"{directory} holds a version {config['version']} VQ tokenizer; "
                             f"this recfm reads up to version {VERSION}")
        model = cls(VQConfig(**config))
        model.load_state_dict(load_file(directory / "model.safetensors"))
        return model.eval()


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------
# Training and evaluation


def _image_tensor(images, size: int) -> torch.Tensor:
    """A uint8 tensor (N, 3, size, size) from a uint8 array (N, H, W, 3) or a list of images."""
    if isinstance(images, np.ndarray):
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x.float(), (size, size), mode="bilinear", antialias=True)
        return x.round().clamp(0, 255).byte()
    return torch.stack([to_pixels(x, size) for x in images])


def train_vq(images, config: VQConfig | None = None, steps: int = 2000, batch_size: int = 64,
             lr: float = 2e-3, seed: int = 0, bf16: bool = False,
             progress: bool = True) -> tuple[VQTokenizer, dict]:
    """Train a VQTokenizer on `images` (a list of PIL images / paths / bytes, or a uint8 array
    (N, H, W, 3)) with Adam on the MSE reconstruction plus the commitment loss; the learning rate
    follows a cosine from `lr` to lr/10. Deterministic for a given seed on CPU, and the caller's
    global RNG state is left as it was. Returns the model (eval mode) and a history: per-step lists
    "loss", "mse", "commit", "perplexity" (of the batch's codes), and "train_time_s".

    bf16 autocasts the convolutions to bfloat16. Off by default, because fp32 measured better: on
    this project's 2-core CPU (PyTorch sees AVX2 only, no native bf16), a step took 6x (32 px) to
    10x (64 px) longer in bf16, for the same PSNR (17.19 dB both after 300 steps at 32 px). Worth
    trying where the CPU has AMX / AVX512-BF16.
    """
    config = config or VQConfig()
    data = _image_tensor(images, config.image_size)
    history: dict = {"loss": [], "mse": [], "commit": [], "perplexity": []}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VQTokenizer(config).train()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        start = time.perf_counter()
        for step in tqdm(range(steps), disable=not progress, desc="train vq"):
            for group in opt.param_groups:
                group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
            x = data[torch.randint(len(data), (batch_size,))].float().div(255)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                recon, codes, commit = model(x)
            mse = F.mse_loss(recon.float(), x)
            loss = mse + config.commitment * commit
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history["loss"].append(loss.item())
            history["mse"].append(mse.item())
            history["commit"].append(commit.item())
            history["perplexity"].append(_perplexity(codes, config.codebook_size))
        history["train_time_s"] = time.perf_counter() - start
    return model.eval(), history


def _perplexity(codes: torch.Tensor, k: int) -> float:
    """exp(entropy) of the code histogram: the effective number of codes in use."""
    p = torch.bincount(codes.flatten(), minlength=k).float()
    p = p[p > 0] / p.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1], (B, 3, H, W): the mean over images of
    each image's PSNR (so one near-perfect image cannot dominate as it would in a pooled MSE)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


@torch.no_grad()
def evaluate_vq(model: VQTokenizer, images, batch_size: int = 256) -> dict[str, float]:
    """Round-trip `images` through the tokenizer: PSNR at image_size, the fraction of the codebook
    these images use, and the perplexity of their codes."""
    x = _image_tensor(images, model.config.image_size).float().div(255)
    codes, scores = [], []
    for batch in x.split(batch_size):
        c = model.encode(batch)
        codes.append(c)
        scores.append(psnr(model.decode(c).cpu(), batch) * len(batch))
    codes = torch.cat(codes)
    k = model.config.codebook_size
    return {"psnr": sum(scores) / len(x), "codebook_usage": len(codes.unique()) / k,
            "perplexity": _perplexity(codes, k)}
