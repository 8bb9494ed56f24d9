"""
sample.py: one-step SDXL images from a DI* generator (diffusers' SDXL pipeline, LCM scheduler, one
step at t=399, as DMD2 and DI*; an SD1.x/2.x one: its pipeline, at its run's --conditioning_t, 999
by default), their PickScore and CLIP score, two generators side by side. An
SD3/SD3.5 pipeline (its model_index.json says so) samples one Euler step from noise instead, with
its own scheduler: StableDiffusion3Pipeline(num_inference_steps=1, guidance_scale=0).

$ python sample.py --pretrained=XDG-XHS/distar_long_1step --variant=fp16 --prompt="a shiba inu"
$ python sample.py --generator=tianweiy/DMD2/dmd2_sdxl_1step_unet_fp16.bin --prompt="a shiba inu"
$ python sample.py --generator=out/checkpoint-000500/generator \\
    --compare=out/checkpoint-002000/generator --prompts=parti.txt --score --out_dir=compare
$ python sample.py --generator=out/checkpoint-000500/generator   # a LoRA one: its base + the LoRA
$ python sample.py --generator=out_toy/checkpoint-001000/generator   # a toy checkpoint: a scatter
$ python sample.py --generator=out_tiny   # a run folder: its newest complete checkpoint
"""

import json
import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch

import distar

SDXL_BASE = distar.Config.pretrained  # --pretrained when nothing else names one
HEADER, GAP = 20, 8  # px: the A/B labels (6 px a letter) above a compare grid; between A and B
# CLIP cosine -> PickScore as the paper prints it (~0.22), CLIP score as torchmetrics has it (~33)
SCALE = dict(pickscore=lambda cos: cos, clip_score=lambda cos: 100 * cos.clamp(min=0))
TAGS = {"": "", "a": "A ", "b": "B ", "b_minus_a": "B-A "}  # a metric's line, per generator


@dataclass
class SampleConfig:
    pretrained: str = ""  # VAE, text encoders, scheduler; empty: the generator's run's, or SDXL
    generator: str = ""  # UNet/pipeline folder, state-dict file, distar checkpoint or run folder
    lora: str = ""  # a diffusers SDXL LoRA (folder or hub id) put on top of --generator
    variant: str = ""  # weight-file variant of --pretrained and generator folders, e.g. fp16
    prompt: str = ""  # one prompt
    prompts: str = ""  # text file, one prompt per line; neither: distar's built-in prompts
    images_per_prompt: int = 1  # images of each prompt
    batch_size: int = 4  # images per pipeline call
    seed: int = 0  # batch i uses seed + i; the bootstrap uses it too
    resolution: int = 1024  # image side in pixels, a multiple of 8
    dtype: str = "fp16"  # fp16 (the releases') | bf16 | fp32 on a GPU; always fp32 on the CPU
    t5: bool = True  # SD3: its T5 text encoder; false: zeros (a --t5=false run's default)
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


def on_hub(path, files=False):
    """Whether path names the hub: owner/name folders, and with files, owner/name/path/to/file.bin
    state dicts (--generator, --compare)."""
    n = path.count("/")
    file = files and path.endswith(distar.STATE_DICTS) and n >= 2
    return not path.startswith((".", "/", "~")) and (n == 1 or file)


def check_paths(cfg):
    """Before anything loads: a local path that is not there is named as typed (else the default
    --pretrained loads first, and fails on an unreachable hub)."""
    flags = ("pretrained", "generator", "compare", "lora") + (
        "reward_model", "reward_processor", "clip_model") * cfg.score
    for flag in flags:
        path = getattr(cfg, flag)
        if path and not on_hub(path, flag in ("generator", "compare")) and not os.path.exists(path):
            raise distar.LoadError(f"cannot load --{flag}={path}: no such file or folder")
    if os.path.isdir(cfg.pretrained) and not os.path.isfile(os.path.join(cfg.pretrained,
                                                                         "model_index.json")):
        raise distar.LoadError(f"cannot load --pretrained={cfg.pretrained}: not a diffusers "
                               "pipeline folder (no model_index.json)")


def checkpoint_generator(flag, path):
    """A distar checkpoint folder as --generator or --compare: its generator/; a run folder: that
    of its newest complete checkpoint, said in a line. Another folder with no generator in it is
    one line naming what to pass (not diffusers' "no file named config.json")."""
    if not os.path.isdir(path) or any(os.path.exists(os.path.join(path, name)) for name in (
            "config.json", "model_index.json", "unet", distar.LORA_FILE, "model.safetensors")):
        return path  # not a folder, or a generator's (diffusers', a LoRA's, the toy's)
    is_ckpt = os.path.isfile(os.path.join(path, "state.json"))
    ckpts = [path] if is_ckpt else distar.list_checkpoints(path)
    if not ckpts or not os.path.isdir(os.path.join(ckpts[-1], "generator")):
        raise distar.LoadError(f"cannot load --{flag}={path}: no generator in it, and no complete "
                               "distar checkpoint: pass a checkpoint's, "
                               "checkpoint-NNNNNN/generator")
    generator = os.path.join(ckpts[-1], "generator")
    if not is_ckpt:
        print(f"--{flag}={path}: its newest complete checkpoint's generator, {generator}")
    return generator


def run_config(path):
    """The command line of the distar run whose checkpoint holds the generator at path (its
    state.json beside it), {} for any other generator."""
    state = os.path.join(os.path.dirname(os.path.normpath(path)), "state.json")  # not via a link
    if not (path and os.path.isdir(path) and os.path.isfile(state)):
        return {}
    with open(state) as f:
        return json.load(f).get("config", {})


def run_pretrained(path):
    """The --pretrained of the distar run that saved the generator at path, "" for any other
    generator: a LoRA checkpoint's from its lora_base.json, a whole UNet's from the state.json
    beside it. One inside the run's own folder (--tiny's models) is looked for where the run is
    now, so that a moved run still finds it."""
    base = distar.lora_base(path)
    if base is not None:
        return base["pretrained"]
    config = run_config(path) if os.path.isfile(os.path.join(path, "config.json")) else {}
    value, out_dir = config.get("pretrained", ""), config.get("out_dir", "")
    inside = os.path.relpath(value, out_dir) if value and out_dir else os.pardir
    moved = os.path.abspath(os.path.join(path, os.pardir, os.pardir, inside))
    return moved if not inside.startswith(os.pardir) and os.path.exists(moved) else value


def plan_models(cfg):
    """Before anything loads: the pipeline's --pretrained, and each generator's UNet (path,
    pretrained, variant) and LoRAs. --pretrained is the user's if given (also the base of a LoRA
    checkpoint on its run's --pretrained), else the run's that saved --generator (or --compare),
    else SDXL-base. A recorded base that is not here is one line naming it and what to pass."""
    gens = [("generator", cfg.generator)] + [("compare", cfg.compare)] * bool(cfg.compare)
    recorded = [run_pretrained(path) if path else "" for _, path in gens]
    pretrained = cfg.pretrained or ([r for r in recorded if r] + [SDXL_BASE])[0]
    missing = lambda v: v and not on_hub(v, files=True) and not os.path.exists(v)
    unets, loras = {}, {}
    for sub, (flag, path), rec in zip(("a", "b") if cfg.compare else ("",), gens, recorded):
        base = distar.lora_base(path) if path else None  # {pretrained, generator_init, variant}
        lora = f", or pass the base as --generator=BASE and this LoRA as --lora={path}" * bool(base)
        if missing(rec) and not cfg.pretrained:
            raise distar.LoadError(f"cannot load --{flag}={path}: the --pretrained its run "
                                   f"recorded, {rec}, is not here (moved?): name it with "
                                   f"--pretrained=PATH{lora}")
        if base and missing(base["generator_init"]):
            raise distar.LoadError(f"cannot load --{flag}={path}: the LoRA's base, its run's "
                                   f"--generator_init={base['generator_init']}, is not here: pass "
                                   f"that base as --generator=BASE and this LoRA as --lora={path}")
        own = cfg.pretrained or rec or pretrained  # a state dict's architecture, or "": its UNet
        unets[sub] = ((flag, path, own, cfg.variant) if base is None
                      else (flag, base["generator_init"], own, base["variant"]))
        loras[sub] = [(flag, path)] * (base is not None) + [("lora", cfg.lora)] * (
            bool(cfg.lora) and sub != "b")
    return pretrained, unets, loras


def family(pipe):
    """sdxl, sd3 or sd: a pipeline's (or a pipeline folder's / hub id's model_index.json) class."""
    from diffusers import DiffusionPipeline

    name = type(pipe).__name__ if not isinstance(pipe, str) else distar.load(
        "pretrained", pipe, DiffusionPipeline.load_config, pipe).get("_class_name")
    return next((m for m, p in distar.PIPELINES.items() if p == name), "sdxl")


def conditioning_t(path, model):
    """The timestep a generator reads its noise at: its distar run's (state.json), else distar's
    default for the family (SDXL 399, as DMD2's; SD 999, as DMD2's and SwiftBrush's)."""
    return run_config(path).get("conditioning_t",
                                distar.parse_args([f"--model={model}"]).conditioning_t)


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


def load_models(cfg, plan, device, dtype):
    """The pipeline first, without a UNet (an unreachable hub fails there at once, not after the
    UNet's download retries), then the generators (A; B with --compare), then the scorers. A
    distar LoRA checkpoint's generator is its recorded base plus the LoRA, and --lora goes on
    A, each put on by diffusers' own load_lora_weights (plan: plan_models')."""
    import diffusers
    from diffusers import LCMScheduler
    from transformers import AutoProcessor, CLIPModel
    pretrained, plan, loras = plan
    model = family(pretrained)
    net = distar.NETS[model][1]  # unet | transformer
    no_t5 = {} if model == "sdxl" or cfg.t5 else dict(text_encoder_3=None, tokenizer_3=None)
    pipe = distar.load("pretrained", pretrained,
                       getattr(diffusers, distar.PIPELINES[model]).from_pretrained, pretrained,
                       **{net: None}, **no_t5, **(distar.NO_CHECKER if model == "sd" else {}),
                       dtype=dtype, variant=cfg.variant or None)
    unets = {sub: distar.load_generator(path, own, variant or None, dtype, flag, model)
             for sub, (flag, path, own, variant) in plan.items()}
    for sub, unet in unets.items():  # load_lora_weights puts a LoRA on pipe.unet
        pipe.register_modules(**{net: unet})
        for i, (flag, path) in enumerate(loras[sub]):
            with warnings.catch_warnings():  # peft's on a second adapter: wanted here
                warnings.simplefilter("ignore", UserWarning)
                distar.load(flag, path, pipe.load_lora_weights, path, adapter_name=f"lora{i}")
        if len(loras[sub]) > 1:  # a LoRA loaded after another is the only one active
            unet.set_adapters([f"lora{i}" for i in range(len(loras[sub]))])
    pipe.register_modules(**{net: next(iter(unets.values()))})
    if model != "sd3":  # SD3 keeps its own: one Euler step from noise
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
    plan = plan_models(cfg)  # the recorded bases are here, before anything loads
    pipe, unets, scorers = load_models(cfg, plan, device, dtype)  # before anything is written
    for b, i in enumerate(range(0, len(jobs), cfg.batch_size)):
        batch = jobs[i:i + cfg.batch_size]
        texts = [text for _, text in batch]
        for sub, unet in unets.items():  # the same prompts and seed for every generator
            tag = {"generator": sub} if sub else {}
            pipe.register_modules(**{distar.NETS[family(pipe)][1]: unet})
            lcm = {} if family(pipe) == "sd3" else dict(timesteps=[conditioning_t(  # SD3: its own
                cfg.compare if sub == "b" else cfg.generator, family(pipe))])  # LCM: x_0 at t
            images = pipe(prompt=texts, num_inference_steps=1, **lcm, guidance_scale=0.0,
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
    labels = ["A: " + short(cfg.generator or plan[0]) + " + LoRA" * bool(cfg.lora),
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
                   seed=cfg.seed, generator=cfg.generator or plan[0], lora=cfg.lora,
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
        cfg.generator = checkpoint_generator("generator", cfg.generator)  # a run's folder: its
        cfg.compare = checkpoint_generator("compare", cfg.compare)  # newest checkpoint's
        if run_config(cfg.generator).get("t5") is False and not any(
                a.split("=")[0] == "--t5" for a in argv):  # SD3 without T5: as its run trained
            cfg.t5 = False
            print(f"--t5=false: {cfg.generator}'s run trained without T5")
        toy = os.path.isfile(os.path.join(cfg.generator, "model.safetensors"))  # diffusers' differ
        sample_toy(cfg) if toy else sample(cfg)
    except (distar.ConfigError, distar.LoadError) as e:
        print(f"sample: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
