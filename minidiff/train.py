"""Train minidiff's bundled default model: a toy Stable Diffusion for the shapes world, from scratch.

    python -m minidiff.train --out runs/shapes            # ~25 min on 2 CPU cores
    python -m minidiff.train --out runs/shapes --resume   # carry on after an interruption

It is Stable Diffusion in miniature, built from minidiff's own classes (see minidiff/shapes.py for
the data: "a red circle on a white background", 64x64):
  1. the tokenizer: CLIP's BPE restricted to the words of the grammar (the real merges, so the
     words split exactly as CLIP splits them), plus the 512 byte symbols so any text tokenizes;
  2. stage "vae": an AutoencoderKL (64x64x3 <-> 16x16x4) trained to reconstruct images, with
     the small KL term of latent diffusion; its scaling_factor is then set to 1 / std(latents);
  3. stage "unet": a UNet2DConditionModel learns to predict the noise added to the latents
     (the DDPM objective, SD's scaled-linear schedule) given the hidden states of a
     CLIPTextModel trained with it; 10% of captions are dropped to "" so classifier-free
     guidance works. An exponential moving average (EMA) of both is what gets shipped.
The result is a diffusers-layout folder (`--out`/pipeline) that minidiff and diffusers both load.

Randomness is a function of (seed, stage, step), so a resumed run draws exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from weights_conversion.clip_vocab import vocab_and_merges  # OpenAI's BPE file format lives there

from . import shapes
from .autoencoder_kl import AutoencoderKL
from .clip_text import CLIPTextModel
from .pipelines import StableDiffusionPipeline
from .schedulers import DDPMScheduler, DPMSolverMultistepScheduler
from .tokenizer import _DEFAULT_VOCAB, BOS_TOKEN, EOS_TOKEN, CLIPTokenizer
from .unet_2d_condition import UNet2DConditionModel


@dataclass
class TrainConfig:
    seed: int = 0
    vae_steps: int = 2500
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6  # as in latent diffusion: a nearly deterministic, gently regularised latent
    unet_steps: int = 5000
    unet_batch: int = 32
    unet_lr: float = 5e-4
    warmup: int = 200
    caption_dropout: float = 0.1  # "" instead of the caption, for classifier-free guidance
    ema_decay: float = 0.999
    checkpoint_every: int = 250


# -- the models -------------------------------------------------------------------------------------


def toy_tokenizer() -> CLIPTokenizer:
    """CLIP's tokenizer cut down to the grammar's words: the same tokens, a 0.5k vocabulary."""
    full_vocab, merges = vocab_and_merges(_DEFAULT_VOCAB)
    rank = {m: i for i, m in enumerate(merges)}
    used: set[tuple[str, str]] = set()
    for word in {"a", "on", "background", *shapes.COLORS, *shapes.SHAPES}:
        # BPE as CLIP does it: merge the best-ranked adjacent pair until none is left; a merge
        # subset holding exactly the merges used here splits these words the same way
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = [(rank.get(p, len(rank)), i, p) for i, p in enumerate(zip(symbols, symbols[1:]))]
            best, i, pair = min(pairs)
            if best == len(rank):
                break
            used.add(pair)
            symbols[i : i + 2] = ["".join(pair)]
    kept = [m for m in merges if m in used]  # in CLIP's rank order
    base = list(full_vocab)[:512]  # the 256 byte symbols and their end-of-word forms
    tokens = base + ["".join(m) for m in kept] + [BOS_TOKEN, EOS_TOKEN]
    return CLIPTokenizer({t: i for i, t in enumerate(tokens)}, kept, model_max_length=16)


def build_models(tokenizer: CLIPTokenizer) -> tuple[AutoencoderKL, CLIPTextModel, UNet2DConditionModel]:
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        sample_size=shapes.SIZE,
        scaling_factor=1.0,  # set from the latents after stage "vae"
    )
    text_encoder = CLIPTextModel(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    unet = UNet2DConditionModel(
        sample_size=shapes.SIZE // 4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=16,
        # attention only at 8x8 and below: at 16x16 it costs more than the rest of a training step
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=2,
    )
    return vae, text_encoder, unet


def noise_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# -- training ---------------------------------------------------------------------------------------


def step_rng(cfg: TrainConfig, stage: str, step: int) -> tuple[random.Random, torch.Generator]:
    """The randomness of one step, a function of (seed, stage, step): resuming redraws it exactly."""
    n = cfg.seed * 1_000_003 + {"vae": 0, "unet": 1, "latents": 2}[stage] * 10_000_019 + step
    return random.Random(n), torch.Generator().manual_seed(n)


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(t * math.pi)))


class Paused(Exception):
    """Raised when --stop-after steps are done; the checkpoint is saved."""


class Trainer:
    def __init__(self, cfg: TrainConfig, out: Path) -> None:
        self.cfg, self.out = cfg, out
        self.tokenizer = toy_tokenizer()
        torch.manual_seed(cfg.seed)  # the initial weights
        self.vae, self.text_encoder, self.unet = build_models(self.tokenizer)
        self.denoiser = nn.ModuleDict({"unet": self.unet, "text_encoder": self.text_encoder})
        self.ema = copy.deepcopy(self.denoiser).requires_grad_(False)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        self.unet_opt = torch.optim.AdamW(self.denoiser.parameters(), lr=cfg.unet_lr, weight_decay=0.01)
        self.stage, self.step, self.scaling_factor = "vae", 0, 1.0
        self.steps_left: int | None = None  # stop (with a checkpoint) after this many more steps

    # checkpoints: everything needed to continue exactly where we stopped
    def save_checkpoint(self) -> None:
        state = {
            "stage": self.stage,
            "step": self.step,
            "scaling_factor": self.scaling_factor,
            "config": dataclasses.asdict(self.cfg),
            "vae": self.vae.state_dict(),
            "denoiser": self.denoiser.state_dict(),
            "ema": self.ema.state_dict(),
            "vae_opt": self.vae_opt.state_dict(),
            "unet_opt": self.unet_opt.state_dict(),
        }
        tmp = self.out / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.out / "checkpoint.pt")  # atomic: an interrupted save never corrupts the last one

    def load_checkpoint(self) -> None:
        state = torch.load(self.out / "checkpoint.pt", weights_only=True)
        if state["config"] != dataclasses.asdict(self.cfg):
            raise ValueError(
                f"{self.out}/checkpoint.pt was trained with {state['config']}, not {dataclasses.asdict(self.cfg)}"
            )
        self.vae.load_state_dict(state["vae"])
        self.denoiser.load_state_dict(state["denoiser"])
        self.ema.load_state_dict(state["ema"])
        self.vae_opt.load_state_dict(state["vae_opt"])
        self.unet_opt.load_state_dict(state["unet_opt"])
        self.stage, self.step, self.scaling_factor = state["stage"], state["step"], state["scaling_factor"]

    def run(self) -> Path:
        if self.stage == "vae":
            self.train_vae()
            self.scaling_factor = self.measure_scaling_factor()
            self.stage, self.step = "unet", 0
            self.save_checkpoint()
        if self.stage == "unet":
            self.train_unet()
            self.stage = "done"
            self.save_checkpoint()
        return self.export(self.out / "pipeline")

    def _loop(self, total: int, desc: str, step_fn, optimizer, peak_lr: float, warmup: int, after_step=None) -> None:
        bar = tqdm(range(self.step, total), initial=self.step, total=total, desc=desc)
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, peak_lr, warmup, total)
            loss = step_fn(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(step)
            self.step = step + 1
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if self.steps_left is not None:
                self.steps_left -= 1
                if self.steps_left == 0 and self.step < total:
                    self.save_checkpoint()
                    raise Paused(f"stopped at {desc} step {self.step}/{total}; --resume continues")
            if self.step % self.cfg.checkpoint_every == 0 and self.step < total:
                self.save_checkpoint()

    # stage 1: the autoencoder
    def train_vae(self) -> None:
        self.vae.train()

        def vae_step(step: int) -> torch.Tensor:
            rng, gen = step_rng(self.cfg, "vae", step)
            images, _ = shapes.sample_batch(self.cfg.vae_batch, rng)
            posterior = self.vae.encode(images).latent_dist
            recon = self.vae.decode(posterior.sample(gen)).sample
            kl = 0.5 * (posterior.mean**2 + posterior.var - 1 - posterior.logvar).sum(dim=(1, 2, 3)).mean()
            # L1 keeps edges sharp (MSE alone leaves blur and specks that blur the shape's outline)
            return F.l1_loss(recon, images) + F.mse_loss(recon, images) + self.cfg.kl_weight * kl

        self._loop(self.cfg.vae_steps, "vae", vae_step, self.vae_opt, self.cfg.vae_lr, 100)
        self.vae.eval().requires_grad_(False)

    @torch.no_grad()
    def measure_scaling_factor(self) -> float:
        """1 / std of the latents, so the diffusion model sees unit-variance inputs (SD's 0.18215)."""
        rng, gen = step_rng(self.cfg, "latents", 0)
        images, _ = shapes.sample_batch(512, rng)
        return 1.0 / self.vae.encode(images).latent_dist.sample(gen).std().item()

    # stage 2: the text encoder and the UNet, together
    def train_unet(self) -> None:
        self.vae.eval().requires_grad_(False)
        self.denoiser.train()
        scheduler = noise_scheduler()

        def unet_step(step: int) -> torch.Tensor:
            rng, gen = step_rng(self.cfg, "unet", step)
            images, captions = shapes.sample_batch(self.cfg.unet_batch, rng)
            captions = ["" if rng.random() < self.cfg.caption_dropout else c for c in captions]
            with torch.no_grad():
                latents = self.vae.encode(images).latent_dist.sample(gen) * self.scaling_factor
            noise = torch.randn(latents.shape, generator=gen)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(images),), generator=gen)
            ids = self.tokenizer(
                captions,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            context = self.text_encoder(ids)[0]
            pred = self.unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=context).sample
            return F.mse_loss(pred, noise)

        self._loop(
            self.cfg.unet_steps,
            "unet",
            unet_step,
            self.unet_opt,
            self.cfg.unet_lr,
            self.cfg.warmup,
            after_step=self.update_ema,
        )
        self.denoiser.eval()

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        decay = min(self.cfg.ema_decay, (1 + step) / (10 + step))  # short memory early on
        for e, p in zip(self.ema.parameters(), self.denoiser.parameters()):
            e.lerp_(p, 1 - decay)

    def export(self, folder: Path) -> Path:
        """The EMA weights as a diffusers-layout pipeline folder."""
        vae, text_encoder, unet = build_models(self.tokenizer)
        vae.config = dataclasses.replace(vae.config, scaling_factor=round(self.scaling_factor, 5))
        vae.load_state_dict(self.vae.state_dict())
        text_encoder.load_state_dict(self.ema["text_encoder"].state_dict())
        unet.load_state_dict(self.ema["unet"].state_dict())
        scheduler = DPMSolverMultistepScheduler.from_config(noise_scheduler().config, steps_offset=1)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder.eval(), tokenizer=self.tokenizer, unet=unet.eval(), scheduler=scheduler
        )
        pipe.save_pretrained(folder)
        return folder


@torch.no_grad()
def evaluate(folder: str | Path, seed: int = 0, **pipe_kwargs) -> float:
    """The share of all 90 scenes of the grammar that come out right, as graded by shapes.judge."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    scenes = [shapes.Scene(s, c, b) for s in shapes.SHAPES for c in shapes.COLORS for b in shapes.COLORS if c != b]
    right = 0
    for i in range(0, len(scenes), 10):
        batch = scenes[i : i + 10]
        images = pipe(
            [s.caption for s in batch],
            generator=torch.Generator().manual_seed(seed + i),
            output_type="pt",
            **pipe_kwargs,
        ).images
        judged = [shapes.judge((im * 255).round().to(torch.uint8)) for im in images]
        right += sum(j == s for j, s in zip(judged, batch))
    return right / len(scenes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minidiff.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="run folder: checkpoint.pt, then pipeline/")
    parser.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    parser.add_argument("--evaluate", metavar="FOLDER", help="only grade a trained pipeline folder on all 90 scenes")
    parser.add_argument("--stop-after", type=int, default=None, help="save a checkpoint and stop after N steps")
    for f in dataclasses.fields(TrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    if args.evaluate:
        print(f"{args.evaluate}: {evaluate(args.evaluate):.1%} of the 90 scenes right")
        return 0
    if not args.out:
        parser.error("--out is required to train")
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    out = Path(args.out)
    if (out / "checkpoint.pt").exists() and not args.resume:
        raise SystemExit(f"{out}/checkpoint.pt exists: pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, out)
    if args.resume:
        trainer.load_checkpoint()
    trainer.steps_left = args.stop_after
    start = time.time()
    try:
        folder = trainer.run()
    except Paused as e:
        print(f"{e} ({(time.time() - start) / 60:.1f} min)")
        return 0
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    print(f"{folder} ({(time.time() - start) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
