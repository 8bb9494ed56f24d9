"""
sample.py: one-step images from a DI* generator; PickScore and CLIP score with confidence
intervals; side-by-side comparison of two generators.

The generator is an SDXL UNet read once at timestep 399 (as in DMD2 and DI*); diffusers' own
StableDiffusionXLPipeline does the rest with an LCM scheduler and a single step:
num_inference_steps=1, timesteps=[399], guidance_scale=0. Batch i uses seed + i.

The released DI* model, one GPU:
$ python sample.py --pretrained=XDG-XHS/distar_long_1step --variant=fp16 --prompt="a shiba inu wearing a red scarf"

A training checkpoint's generator, SDXL base for the VAE and text encoders:
$ python sample.py --generator=out/checkpoint-000500/generator --out_dir=samples

Evaluate on the Parti prompts: a text file, one prompt per line, which you supply, e.g. the first
column of PartiPrompts.tsv (github.com/google-research/parti) without its header line:
$ tail -n +2 PartiPrompts.tsv | cut -f1 > parti.txt
$ python sample.py --generator=out/checkpoint-000500/generator --prompts=parti.txt --score
PickScore (raw cosine, ~0.22) and CLIP score (100 max(cos, 0), ~33) of every image go to
{out_dir}/scores.jsonl; their means with 95% bootstrap intervals (prompts resampled) are printed
and written to {out_dir}/scores.json.

Compare two generators on the same prompts and seeds (A: --generator, B: --compare):
$ python sample.py --generator=out/checkpoint-000500/generator --compare=out/checkpoint-002000/generator \
    --prompts=parti.txt --score --out_dir=compare
writes a/000.png ..., b/000.png ..., side-by-side grids compare_000.png ... (a row per prompt, A
left, B right) and, with --score, the paired difference B - A with its interval.

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
    seed: int = 0  # batch i uses seed + i; the bootstrap uses it too
    resolution: int = 1024
    dtype: str = "fp16"  # fp16 | bf16 | fp32 on CUDA; always fp32 on CPU
    variant: str = ""  # weight-file variant of --pretrained, e.g. fp16 (*.fp16.safetensors only; the DI* release)
    out_dir: str = "samples"  # 000.png, 001.png, ... (a/ and b/ with --compare)
    score: bool = False  # PickScore and CLIP score of every image, means with bootstrap intervals
    reward_model: str = "yuvalkirstain/PickScore_v1"  # PickScore's CLIPModel
    reward_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # and its processor
    clip_model: str = "openai/clip-vit-large-patch14"  # CLIP score's CLIPModel and processor
    bootstrap: int = 1000  # resamples of the prompts
    ci: float = 0.95  # confidence level of the percentile interval
    compare: str = ""  # a second generator B (UNet folder): same prompts and seeds, side-by-side grids
    grid_rows: int = 8  # prompts per compare_*.png


DTYPES = dict(fp16=torch.float16, bf16=torch.bfloat16, fp32=torch.float32)


def parse_args(argv):
    cfg = SampleConfig(**distar.parse_overrides(argv, SampleConfig))
    if cfg.dtype not in DTYPES:
        raise distar.ConfigError(f"--dtype must be one of {'|'.join(DTYPES)}, not {cfg.dtype!r}")
    if cfg.resolution % 8 or cfg.resolution < 8:
        raise distar.ConfigError(f"--resolution must be a multiple of 8, got {cfg.resolution}")
    if min(cfg.batch_size, cfg.images_per_prompt, cfg.bootstrap, cfg.grid_rows) < 1:
        raise distar.ConfigError("--batch_size, --images_per_prompt, --bootstrap and --grid_rows must be >= 1")
    if not 0 < cfg.ci < 1:
        raise distar.ConfigError(f"--ci is a confidence level in (0, 1), got {cfg.ci}")
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

    if cfg.score or cfg.compare:
        raise distar.ConfigError("--score and --compare are for SDXL generators, not a toy checkpoint")
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


def load_unet(flag, path, dtype):
    """A UNet folder, or a pipeline folder holding unet/."""
    sub = "unet" if os.path.isdir(os.path.join(path, "unet")) else None
    return distar.load(flag, path, distar.load_unet, path, subfolder=sub, dtype=dtype)


def load_pipeline(cfg, device, dtype):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    if cfg.generator:
        unet = load_unet("generator", cfg.generator, dtype)
    else:
        unet = distar.load("pretrained", cfg.pretrained, distar.load_unet, cfg.pretrained, subfolder="unet", dtype=dtype,
                           variant=cfg.variant or None)
    pipe = distar.load("pretrained", cfg.pretrained, StableDiffusionXLPipeline.from_pretrained, cfg.pretrained,
                       unet=unet, dtype=dtype, variant=cfg.variant or None)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_scorers(cfg, device):
    """name -> (CLIP cosine, its scale). PickScore as the paper's tables print it: the raw cosine
    (~0.22), not the x100 logit. CLIP score as Hessel et al. and torchmetrics define it:
    100 max(cos, 0) (~33 in the paper)."""
    pick = distar.ClipReward(cfg.reward_model, cfg.reward_processor)
    try:
        clip = distar.ClipReward(cfg.clip_model, cfg.clip_model)
    except distar.LoadError as e:  # ClipReward names its own flags (--reward_*); name ours
        raise distar.LoadError(f"cannot load --clip_model={cfg.clip_model}: {str(e).split(': ', 1)[-1]}") from None
    return dict(pickscore=(pick.to(device), lambda cos: cos),
                clip_score=(clip.to(device), lambda cos: 100 * cos.clamp(min=0)))


def to_tensor(images):
    """PIL images -> (B, 3, H, W) in [0, 1]: exactly what the PNGs hold."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2) / 255


@torch.no_grad()
def score(scorers, images, prompts, device):
    x = to_tensor(images).to(device)  # (B, 3, H, W): the pixels as saved
    return {name: scale(clip(x, clip.text_features(prompts))).tolist() for name, (clip, scale) in scorers.items()}


def cluster_bootstrap(scores, n_boot=1000, ci=0.95, seed=0):
    """Mean of scores (P prompts, k images each) and its percentile interval. The images of one
    prompt are correlated (same text, a model good or bad at it), so the unit resampled is the
    prompt: draw P prompts with replacement, take the mean of their images, n_boot times.
    Returns (mean, lo, hi); with one prompt there is nothing to resample: lo = hi = None."""
    per_prompt = np.asarray(scores, dtype=np.float64).mean(1)  # (P,); equal k, so their mean is the image mean
    mean = float(per_prompt.mean())
    if len(per_prompt) < 2:
        return mean, None, None
    idx = np.random.default_rng(seed).integers(len(per_prompt), size=(n_boot, len(per_prompt)))  # (n_boot, P)
    lo, hi = np.quantile(per_prompt[idx].mean(1), [(1 - ci) / 2, (1 + ci) / 2])
    return mean, float(lo), float(hi)


HEADER, CAPTION, GAP = 20, 14, 8  # px: the A/B labels, the prompt above each row, between A and B


def fit(draw, text, width, keep_end=False):
    """text cut to width pixels, with '...' where it was cut (at the front for paths)."""
    while draw.textlength(text) > width and len(text) > 3:
        text = "..." + text[4:] if keep_end else text[:-4] + "..."
    return text


def compare_grid(images_a, images_b, prompts, labels):
    """A row per prompt: its k images from A, a gap, its k images from B; cells at most 512 px."""
    from PIL import Image, ImageDraw

    k, cell = len(images_a) // len(prompts), min(images_a[0].width, 512)
    half = k * cell
    grid = Image.new("RGB", (2 * half + GAP, HEADER + len(prompts) * (CAPTION + cell)), "white")
    draw = ImageDraw.Draw(grid)
    for x, tag, label in ((0, "A: ", labels[0]), (half + GAP, "B: ", labels[1])):
        draw.text((x + 4, 4), tag + fit(draw, label, half - 8 - draw.textlength(tag), keep_end=True), fill="black")
    for r, prompt in enumerate(prompts):
        y = HEADER + r * (CAPTION + cell)
        draw.text((4, y + 1), fit(draw, prompt, 2 * half + GAP - 8), fill=(90, 90, 90))
        for j in range(k):
            for x, ims in ((0, images_a), (half + GAP, images_b)):
                grid.paste(ims[r * k + j].resize((cell, cell), Image.LANCZOS), (x + j * cell, y + CAPTION))
    return grid


def sample(cfg):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[cfg.dtype] if device == "cuda" else torch.float32
    prompts = [cfg.prompt] if cfg.prompt else distar.read_prompts(cfg.prompts)
    k = cfg.images_per_prompt
    jobs = [(p, text) for p, text in enumerate(prompts) for _ in range(k)]
    # everything is loaded before the first file is written, so a bad path leaves no trace
    scorers = load_scorers(cfg, device) if cfg.score else {}  # fp32
    pipe = load_pipeline(cfg, device, dtype)
    unets = {"": pipe.unet}  # sub-folder of out_dir -> UNet
    if cfg.compare:  # the pipeline (VAE, text encoders) is shared; only B's UNet is extra
        unets = {"a": pipe.unet, "b": load_unet("compare", cfg.compare, dtype).to(device)}
    for sub in unets:
        os.makedirs(os.path.join(cfg.out_dir, sub), exist_ok=True)
    labels = (cfg.generator or f"{cfg.pretrained} unet", cfg.compare)
    records, pending, n_grids = [], {sub: [] for sub in unets}, 0  # pending: images not yet in a grid
    for b, i in enumerate(range(0, len(jobs), cfg.batch_size)):
        batch = jobs[i:i + cfg.batch_size]
        texts = [text for _, text in batch]
        for sub, unet in unets.items():
            pipe.unet = unet  # the same prompts and seed for every generator
            images = pipe(prompt=texts, num_inference_steps=1, timesteps=[399], guidance_scale=0.0,
                          height=cfg.resolution, width=cfg.resolution,
                          generator=torch.Generator(device).manual_seed(cfg.seed + b)).images
            scores = score(scorers, images, texts, device)
            for j, (im, (p, text)) in enumerate(zip(images, batch)):
                name = os.path.join(sub, f"{i + j:03d}.png")
                im.save(os.path.join(cfg.out_dir, name))
                records.append(dict(image=name, **({"generator": sub} if sub else {}), prompt_index=p, prompt=text,
                                    seed=cfg.seed + b, **{m: s[j] for m, s in scores.items()}))
            if cfg.compare:
                pending[sub] += images
        # a grid as soon as its grid_rows prompts are done, the rest at the end
        last = i + len(batch) == len(jobs)
        while cfg.compare and pending["a"] and (len(pending["a"]) >= cfg.grid_rows * k or last):
            n = min(len(pending["a"]), cfg.grid_rows * k)
            rows = prompts[n_grids * cfg.grid_rows:][:n // k]
            compare_grid(pending["a"][:n], pending["b"][:n], rows, labels).save(
                os.path.join(cfg.out_dir, f"compare_{n_grids:03d}.png"))
            pending = {sub: ims[n:] for sub, ims in pending.items()}
            n_grids += 1
    where = ", ".join(os.path.join(cfg.out_dir, sub, "000.png") + " ..." for sub in unets)
    print(f"wrote {len(jobs)} images per generator: {where}" + (f", {n_grids} compare_*.png" if n_grids else ""))
    if cfg.score:
        summarize(cfg, records, len(prompts), k, list(unets))


def show(s, sign=""):
    if s["lo"] is None:
        return f"{s['mean']:{sign}.4g} [one prompt: no interval]"
    return f"{s['mean']:{sign}.4g} [{s['lo']:{sign}.4g}, {s['hi']:{sign}.4g}]"


def summarize(cfg, records, n_prompts, k, subs):
    """One line per metric: mean [lo, hi]; with --compare: A, B and the paired difference B - A,
    whose interval resamples prompts jointly for A and B (their images share prompt and seed)."""
    with open(os.path.join(cfg.out_dir, "scores.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    summary = dict(n_prompts=n_prompts, images_per_prompt=k, ci=cfg.ci, bootstrap=cfg.bootstrap, seed=cfg.seed,
                   generator=cfg.generator or cfg.pretrained, **({"compare": cfg.compare} if cfg.compare else {}))
    models = dict(pickscore=f"raw cosine, {cfg.reward_model}", clip_score=f"100 max(cos, 0), {cfg.clip_model}")
    for metric, model in models.items():
        S = {sub: np.array([r[metric] for r in records if r.get("generator", "") == sub]).reshape(n_prompts, k)
             for sub in subs}  # (P, k): a row per prompt
        if cfg.compare:
            S["b_minus_a"] = S["b"] - S["a"]  # per image pair, so the bootstrap keeps the pairs together
        stats = {sub: dict(zip(("mean", "lo", "hi"), cluster_bootstrap(s, cfg.bootstrap, cfg.ci, cfg.seed)))
                 for sub, s in S.items()}
        summary[metric] = stats if cfg.compare else stats[""]
        line = (f"A {show(stats['a'])}  B {show(stats['b'])}  B-A {show(stats['b_minus_a'], '+')}" if cfg.compare
                else show(stats[""]))
        print(f"{metric:<10s} {line}  {100 * cfg.ci:g}% CI, {n_prompts} prompts, {n_prompts * k} images"
              + (" each" if cfg.compare else "") + f" ({model})")
    with open(os.path.join(cfg.out_dir, "scores.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {cfg.out_dir}/scores.jsonl (every image) and {cfg.out_dir}/scores.json (the intervals)")


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
