"""
sample.py: one-step images from a DI* generator, optionally scored with PickScore.

The generator is an SDXL UNet read once at timestep 399 (as in DMD2 and DI*); diffusers' own
StableDiffusionXLPipeline does the rest with an LCM scheduler and a single step:
num_inference_steps=1, timesteps=[399], guidance_scale=0. Batch i uses seed + i.

The released DI* model, one GPU:
$ python sample.py --pretrained=XDG-XHS/distar_long_1step --prompt="a shiba inu wearing a red scarf"

A training checkpoint's generator, SDXL base for the VAE and text encoders:
$ python sample.py --generator=out/checkpoint-000500/generator --out_dir=samples

Score a prompt file (PickScore per image and the mean):
$ python sample.py --generator=out/checkpoint-000500/generator --prompts=prompts.txt --score

A toy checkpoint's generator (python distar.py --toy) gives {out_dir}/toy_samples.png instead.
Every option is a field of SampleConfig below, overridden as --key=value.
"""

import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

import distar


@dataclass
class SampleConfig:
    pretrained: str = "stabilityai/stable-diffusion-xl-base-1.0"  # VAE, text encoders, scheduler config
    generator: str = ""  # a UNet folder (e.g. checkpoint-*/generator), or "" = the UNet of --pretrained
    prompt: str = ""  # one prompt
    prompts: str = ""  # text file, one prompt per line; neither: distar's built-in prompts
    images_per_prompt: int = 1
    batch_size: int = 4
    seed: int = 0  # batch i uses seed + i
    resolution: int = 1024
    dtype: str = "fp16"  # fp16 | bf16 | fp32 on CUDA; always fp32 on CPU
    out_dir: str = "samples"  # 000.png, 001.png, ...
    score: bool = False  # print each image's reward and the mean
    reward_model: str = "yuvalkirstain/PickScore_v1"
    reward_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


DTYPES = dict(fp16=torch.float16, bf16=torch.bfloat16, fp32=torch.float32)


def parse_args(argv):
    cfg = SampleConfig(**distar.parse_overrides(argv, SampleConfig))
    if cfg.dtype not in DTYPES:
        raise distar.ConfigError(f"--dtype must be one of {'|'.join(DTYPES)}, not {cfg.dtype!r}")
    if cfg.resolution % 8 or cfg.resolution < 8:
        raise distar.ConfigError(f"--resolution must be a multiple of 8, got {cfg.resolution}")
    if cfg.batch_size < 1 or cfg.images_per_prompt < 1:
        raise distar.ConfigError("--batch_size and --images_per_prompt must be >= 1")
    if cfg.prompt and cfg.prompts:
        raise distar.ConfigError("give --prompt or --prompts, not both")
    return cfg


def silence():
    import diffusers.utils.logging as dl
    import transformers.utils.logging as tl

    for lib in (tl, dl):  # warnings and "Loading weights" bars; the pipeline's own bar is off below
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def is_toy(path):
    """A toy checkpoint's generator folder: model.safetensors, and {"config": {"toy": true}} in
    the checkpoint's state.json one level up."""
    state = os.path.join(os.path.dirname(os.path.abspath(path)), "state.json")
    if not (os.path.isfile(os.path.join(path, "model.safetensors")) and os.path.isfile(state)):
        return False
    try:
        with open(state) as f:
            return bool(json.load(f)["config"].get("toy"))
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return False


def sample_toy(cfg):
    from safetensors.torch import load_file

    torch.manual_seed(cfg.seed)
    world = distar.make_toy_world()
    sd = distar.load("generator", cfg.generator, load_file, os.path.join(cfg.generator, "model.safetensors"))
    distar.load("generator", cfg.generator, world.generator.load_state_dict, sd)
    n = 4000
    with torch.no_grad():
        gen = torch.stack([world.generate(world.generator, torch.full((n,), k)) for k in range(world.K)])
    ref = torch.stack([world.sample_ref(k, n) for k in range(world.K)])
    os.makedirs(cfg.out_dir, exist_ok=True)
    path = os.path.join(cfg.out_dir, "toy_samples.png")
    distar.save_toy_png(path, ref, gen, world.K)
    print(f"wrote {path}: {n} generator samples per class (colour) over the reference (grey)")


def load_pipeline(cfg, device, dtype):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    if cfg.generator:  # a UNet folder, or a pipeline folder holding unet/
        sub = "unet" if os.path.isdir(os.path.join(cfg.generator, "unet")) else None
        unet = distar.load("generator", cfg.generator, distar.load_unet, cfg.generator, subfolder=sub, dtype=dtype)
    else:
        unet = distar.load("pretrained", cfg.pretrained, distar.load_unet, cfg.pretrained, subfolder="unet", dtype=dtype)
    pipe = distar.load("pretrained", cfg.pretrained, StableDiffusionXLPipeline.from_pretrained, cfg.pretrained,
                       unet=unet, dtype=dtype)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def to_tensor(images):
    """PIL images -> (B, 3, H, W) in [0, 1]: exactly what the PNGs hold."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2) / 255


def sample(cfg):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[cfg.dtype] if device == "cuda" else torch.float32
    prompts = [cfg.prompt] if cfg.prompt else distar.read_prompts(cfg.prompts)
    jobs = [p for p in prompts for _ in range(cfg.images_per_prompt)]
    reward = None
    if cfg.score:  # fp32, loaded first so that a bad path fails before any sampling
        reward = distar.ClipReward(cfg.reward_model, cfg.reward_processor).to(device)
    pipe = load_pipeline(cfg, device, dtype)
    os.makedirs(cfg.out_dir, exist_ok=True)
    scores = []
    for b, i in enumerate(range(0, len(jobs), cfg.batch_size)):
        batch = jobs[i:i + cfg.batch_size]
        images = pipe(prompt=batch, num_inference_steps=1, timesteps=[399], guidance_scale=0.0,
                      height=cfg.resolution, width=cfg.resolution,
                      generator=torch.Generator(device).manual_seed(cfg.seed + b)).images
        for j, im in enumerate(images):
            im.save(os.path.join(cfg.out_dir, f"{i + j:03d}.png"))
        if reward is not None:
            with torch.no_grad():
                s = reward(to_tensor(images).to(device), reward.text_features(batch)).tolist()
            scores += s
            for j, (p, v) in enumerate(zip(batch, s)):
                print(f"{i + j:03d}.png {v:.4f} {p}")
    print(f"wrote {len(jobs)} images to {cfg.out_dir}/ (000.png ...)")
    if scores:
        print(f"mean score {sum(scores) / len(scores):.4f} over {len(scores)} images "
              f"(cosine similarity, --reward_model={cfg.reward_model})")


def main(argv):
    try:
        cfg = parse_args(argv)
        if cfg.generator and is_toy(cfg.generator):
            sample_toy(cfg)
            return 0
        silence()
        sample(cfg)
    except (distar.ConfigError, distar.LoadError) as e:
        print(f"sample: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
