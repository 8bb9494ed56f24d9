"""
sample.py: one-step SDXL images from a DI* generator (diffusers' SDXL pipeline, LCM scheduler, one
step at t=399, as DMD2 and DI*), their PickScore and CLIP score, two generators side by side.

$ python sample.py --pretrained=XDG-XHS/distar_long_1step --variant=fp16 --prompt="a shiba inu"
$ python sample.py --generator=tianweiy/DMD2/dmd2_sdxl_1step_unet_fp16.bin --prompt="a shiba inu"
$ python sample.py --generator=out/checkpoint-000500/generator \\
    --compare=out/checkpoint-002000/generator --prompts=parti.txt --score --out_dir=compare
$ python sample.py --generator=out/checkpoint-000500/generator   # a LoRA one: its base + the LoRA
$ python sample.py --generator=out_toy/checkpoint-001000/generator   # a toy checkpoint: a scatter
"""

import json
import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch

import distar

HEADER, GAP = 20, 8  # px: the A/B labels (6 px a letter) above a compare grid; between A and B
# CLIP cosine -> PickScore as the paper prints it (~0.22), CLIP score as torchmetrics has it (~33)
SCALE = dict(pickscore=lambda cos: cos, clip_score=lambda cos: 100 * cos.clamp(min=0))
TAGS = {"": "", "a": "A ", "b": "B ", "b_minus_a": "B-A "}  # a metric's line, per generator


@dataclass
class SampleConfig:
    pretrained: str = "stabilityai/stable-diffusion-xl-base-1.0"  # VAE, text encoders, scheduler
    generator: str = ""  # UNet/pipeline folder, state-dict file or distar LoRA checkpoint folder
    lora: str = ""  # a diffusers SDXL LoRA (folder or hub id) put on top of --generator
    variant: str = ""  # weight-file variant of --pretrained and generator folders, e.g. fp16
    prompt: str = ""  # one prompt
    prompts: str = ""  # text file, one prompt per line; neither: distar's built-in prompts
    images_per_prompt: int = 1  # images of each prompt
    batch_size: int = 4  # images per pipeline call
    seed: int = 0  # batch i uses seed + i; the bootstrap uses it too
    resolution: int = 1024  # image side in pixels, a multiple of 8
    dtype: str = "fp16"  # fp16 (the releases') | bf16 | fp32 on a GPU; always fp32 on the CPU
    out_dir: str = "samples"  # 000.png, 001.png, ... (a/ and b/ with --compare)
    score: bool = False  # PickScore and CLIP score of every image; means with intervals
    reward_model: str = "yuvalkirstain/PickScore_v1"  # PickScore's CLIPModel
    reward_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore's processor
    clip_model: str = "openai/clip-vit-large-patch14"  # CLIP score's CLIPModel and processor
    bootstrap: int = 1000  # bootstrap resamples of the prompts
    ci: float = 0.95  # confidence level of the percentile interval
    compare: str = ""  # a second generator B, as --generator: same prompts and seeds, grids
    grid_rows: int = 8  # prompts per compare_*.png


def parse_args(argv):
    c = SampleConfig(**vars(distar.make_parser(SampleConfig, "sample.py").parse_args(argv)))
    distar.check_at_least(c, dict(resolution=8, batch_size=1, images_per_prompt=1, bootstrap=1,
                                  grid_rows=1))
    for ok, msg in ((c.resolution % 8 == 0, "--resolution must be a multiple of 8"),
                    (0 < c.ci < 1, f"--ci is a confidence level in (0, 1), not {c.ci}"),
                    (not (c.prompt and c.prompts), "give --prompt or --prompts, not both")):
        if not ok:
            raise distar.ConfigError(msg)
    return c


def check_paths(cfg):
    """Before anything loads: a local path that is not there is named as typed (else the default
    --pretrained loads first, and fails on an unreachable hub). On the hub are owner/name folders
    and owner/name/path/to/file.bin state dicts (--generator, --compare)."""
    flags = ("pretrained", "generator", "compare", "lora") + (
        "reward_model", "reward_processor", "clip_model") * cfg.score
    for flag in flags:
        path, n = getattr(cfg, flag), getattr(cfg, flag).count("/")
        file = flag in ("generator", "compare") and path.endswith(distar.STATE_DICTS) and n >= 2
        hub = not path.startswith((".", "/", "~")) and (n == 1 or file)
        if path and not hub and not os.path.exists(path):
            raise distar.LoadError(f"cannot load --{flag}={path}: no such file or folder")
    if os.path.isdir(cfg.pretrained) and not os.path.isfile(os.path.join(cfg.pretrained,
                                                                         "model_index.json")):
        raise distar.LoadError(f"cannot load --pretrained={cfg.pretrained}: not a diffusers "
                               "pipeline folder (no model_index.json)")


def sample_toy(cfg):
    """A toy checkpoint's generator: samples of every class over the reference, in one PNG."""
    if cfg.score or cfg.compare:
        raise distar.ConfigError("--score and --compare are for SDXL generators, not a toy one")
    torch.manual_seed(cfg.seed)
    world = distar.make_toy_world()
    distar.load("generator", cfg.generator, distar.load_net, world.generator, cfg.generator)
    gen, ref = distar.toy_samples(world, 4000)
    os.makedirs(cfg.out_dir, exist_ok=True)
    distar.save_toy_png(os.path.join(cfg.out_dir, "toy_samples.png"), ref, gen)
    print(f"wrote {cfg.out_dir}/toy_samples.png: samples of each class (colour), reference (grey)")


def load_models(cfg, device, dtype):
    """The pipeline first, without a UNet (an unreachable hub fails there at once, not after the
    UNet's download retries), then the generators (A; B with --compare), then the scorers. A
    distar LoRA checkpoint's generator is its recorded base plus the LoRA, and --lora goes on
    A, each put on by diffusers' own load_lora_weights."""
    from diffusers import LCMScheduler, StableDiffusionXLPipeline
    from transformers import AutoProcessor, CLIPModel
    pipe = distar.load("pretrained", cfg.pretrained, StableDiffusionXLPipeline.from_pretrained,
                       cfg.pretrained, unet=None, dtype=dtype, variant=cfg.variant or None)
    gens = [("generator", cfg.generator)] + [("compare", cfg.compare)] * bool(cfg.compare)
    unets, loras = {}, {}
    for sub, (flag, path) in zip(("a", "b") if cfg.compare else ("",), gens):
        base = distar.lora_base(path) if path else None  # {pretrained, generator_init, variant}
        unets[sub] = (distar.load_generator(path, cfg.pretrained, cfg.variant or None, dtype, flag)
                      if base is None else distar.load_generator(
                          base["generator_init"], base["pretrained"], base["variant"] or None,
                          dtype, flag))
        loras[sub] = [(flag, path)] * (base is not None) + [("lora", cfg.lora)] * (
            bool(cfg.lora) and sub != "b")
    for sub, unet in unets.items():  # load_lora_weights puts a LoRA on pipe.unet
        pipe.register_modules(unet=unet)
        for i, (flag, path) in enumerate(loras[sub]):
            with warnings.catch_warnings():  # peft's on a second adapter: wanted here
                warnings.simplefilter("ignore", UserWarning)
                distar.load(flag, path, pipe.load_lora_weights, path, adapter_name=f"lora{i}")
        if len(loras[sub]) > 1:  # a LoRA loaded after another is the only one active
            unet.set_adapters([f"lora{i}" for i in range(len(loras[sub]))])
    pipe.register_modules(unet=next(iter(unets.values())))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)  # a bar for a one-step call says nothing
    clip = [distar.load("clip_model", cfg.clip_model, cls.from_pretrained, cfg.clip_model)
            for cls in (CLIPModel, AutoProcessor) if cfg.score]
    scorers = dict(pickscore=distar.ClipReward(cfg.reward_model, cfg.reward_processor).to(device),
                   clip_score=distar.ClipReward(*clip).to(device)) if cfg.score else {}
    return pipe.to(device), {sub: u.to(device) for sub, u in unets.items()}, scorers


def cluster_bootstrap(scores, n_boot=1000, ci=0.95, seed=0):
    """Mean of scores (P prompts, k images each) and its percentile interval. A prompt's images
    are correlated (a model is good or bad at it), so prompts are resampled, n_boot times, not
    images. Returns (mean, lo, hi); one prompt has nothing to resample: lo = hi = None."""
    per_prompt = np.asarray(scores, dtype=np.float64).mean(1)  # (P,); equal k: the image mean
    mean = float(per_prompt.mean())
    if len(per_prompt) < 2:
        return mean, None, None
    idx = np.random.default_rng(seed).integers(len(per_prompt), size=(n_boot, len(per_prompt)))
    lo, hi = np.quantile(per_prompt[idx].mean(1), [(1 - ci) / 2, (1 + ci) / 2])
    return mean, float(lo), float(hi)


@torch.no_grad()
def sample(cfg):
    from diffusers.utils import make_image_grid
    from PIL import Image, ImageDraw
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dict(fp16="float16", bf16="bfloat16", fp32="float32")[cfg.dtype])
    dtype = dtype if device == "cuda" else torch.float32  # half precision is for GPUs
    prompts = [cfg.prompt] if cfg.prompt else distar.read_prompts(cfg.prompts)
    k, records = cfg.images_per_prompt, []
    jobs = [(p, text) for p, text in enumerate(prompts) for _ in range(k)]
    pipe, unets, scorers = load_models(cfg, device, dtype)  # all loaded before anything is written
    for b, i in enumerate(range(0, len(jobs), cfg.batch_size)):
        batch = jobs[i:i + cfg.batch_size]
        texts = [text for _, text in batch]
        for sub, unet in unets.items():  # the same prompts and seed for every generator
            pipe.unet, tag = unet, ({"generator": sub} if sub else {})
            images = pipe(prompt=texts, num_inference_steps=1, timesteps=[399], guidance_scale=0.0,
                          height=cfg.resolution, width=cfg.resolution,
                          generator=torch.Generator(device).manual_seed(cfg.seed + b)).images
            x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(device) / 255
            vals = {m: SCALE[m](c(x, c.text_features(texts))).tolist() for m, c in scorers.items()}
            os.makedirs(os.path.join(cfg.out_dir, sub), exist_ok=True)
            for j, (im, (p, text)) in enumerate(zip(images, batch)):
                name = os.path.join(sub, f"{i + j:03d}.png")
                im.save(os.path.join(cfg.out_dir, name))
                records.append(dict(image=name, prompt_index=p, prompt=text, seed=cfg.seed + b,
                                    **tag, **{m: v[j] for m, v in vals.items()}))
    # the grids read the PNGs back, one grid at a time: thousands of images do not fit in memory
    n_grids, rows = (-(-len(prompts) // cfg.grid_rows) if cfg.compare else 0), cfg.grid_rows
    short = lambda path: "/".join(os.path.normpath(path).split(os.sep)[-2:])  # checkpoint-*/...
    labels = ["A: " + short(cfg.generator or cfg.pretrained) + " + LoRA" * bool(cfg.lora),
              "B: " + short(cfg.compare)]
    for g in range(n_grids):  # a row per prompt: its images from A, a gap, its images from B
        names = [f"{n:03d}.png" for n in range(g * rows * k, min((g + 1) * rows * k, len(jobs)))]
        halves = [make_image_grid([Image.open(os.path.join(cfg.out_dir, s, n)) for n in names],
                                  len(names) // k, k, min(cfg.resolution, 512)) for s in "ab"]
        grid = Image.new("RGB", (2 * halves[0].width + GAP, HEADER + halves[0].height), "white")
        for x, half, label in zip((0, halves[0].width + GAP), halves, labels):
            grid.paste(half, (x, HEADER))
            ImageDraw.Draw(grid).text((x + 4, 4), label[:half.width // 6 - 1], fill="black")
        grid.save(os.path.join(cfg.out_dir, f"compare_{g:03d}.png"))
    print(f"wrote {len(jobs)} image{'s' * (len(jobs) > 1)}{' per generator' * bool(cfg.compare)} "
          f"to {cfg.out_dir}" + (f", and {n_grids} compare_*.png" if n_grids else ""))
    if not cfg.score:
        return
    with open(os.path.join(cfg.out_dir, "scores.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    summary = dict(n_prompts=len(prompts), images_per_prompt=k, ci=cfg.ci, bootstrap=cfg.bootstrap,
                   seed=cfg.seed, generator=cfg.generator or cfg.pretrained, lora=cfg.lora,
                   compare=cfg.compare)
    fmt = lambda m, lo, hi: f"{m:.4g}" + (f" [{lo:.4g}, {hi:.4g}]" if lo is not None else "")
    for metric in SCALE:  # mean [lo, hi]; with --compare: A, B and the paired difference B - A
        S = {sub: np.reshape([r[metric] for r in records if r.get("generator", "") == sub], (-1, k))
             for sub in unets}  # (P, k): a row per prompt
        if cfg.compare:  # per image pair (same prompt and seed): the bootstrap keeps the pairs
            S["b_minus_a"] = S["b"] - S["a"]
        stats = {sub: cluster_bootstrap(s, cfg.bootstrap, cfg.ci, cfg.seed) for sub, s in S.items()}
        print(f"{metric:<10s} {'  '.join(TAGS[sub] + fmt(*v) for sub, v in stats.items())}  "
              f"{100 * cfg.ci:g}% CI, {len(prompts)} prompts, {len(jobs)} images"
              + " per generator" * bool(cfg.compare) + f" ({k} per prompt)")
        stats = {sub: dict(zip(("mean", "lo", "hi"), v)) for sub, v in stats.items()}
        summary[metric] = stats if cfg.compare else stats[""]
    with open(os.path.join(cfg.out_dir, "scores.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {cfg.out_dir}/scores.jsonl (every image) and scores.json (the intervals)")


def main(argv):
    try:
        cfg = parse_args(argv)
        check_paths(cfg)
        distar.quiet_libraries()
        toy = os.path.isfile(os.path.join(cfg.generator, "model.safetensors"))  # diffusers' differ
        sample_toy(cfg) if toy else sample(cfg)
    except (distar.ConfigError, distar.LoadError) as e:
        print(f"sample: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
