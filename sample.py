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

import csv
import json
import os
import re
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import reduce
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

import distar

SDXL_BASE = distar.Config.pretrained  # --pretrained when nothing else names one
HEADER, GAP = 20, 8  # px: the A/B labels (6 px a letter) above a compare grid; between A and B
# CLIP cosine -> PickScore as the paper prints it (~0.22), CLIP score as torchmetrics has it (~33)
SCALE = dict(pickscore=lambda cos: cos, clip_score=lambda cos: 100 * cos.clamp(min=0))
TAGS = {"a": "A ", "b": "B ", "b_minus_a": "B-A "}  # a metric's line, per generator

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
    score: bool = False  # PickScore and CLIP score of every image (see --metrics); intervals
    reward_model: str = "yuvalkirstain/PickScore_v1"  # PickScore's CLIPModel
    reward_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore's processor
    clip_model: str = "openai/clip-vit-large-patch14"  # CLIP score's CLIPModel and processor
    metrics: str = ""  # comma-separated: pickscore,clip_score,image_reward,aesthetic,hps,fid
    fid_ref: str = ""  # FID's real images: a folder (COCO val2014), or its saved fid_ref_*.npz
    eval_res: int = 256  # FID: centre square resized to this (256 as SiD-LSG, 512 as DMD2 SDXL)
    inception: str = ""  # FID's inception-2015-12-05.pt; empty: torch's cache, fetched once
    bootstrap: int = 1000  # bootstrap resamples of the prompts
    ci: float = 0.95  # confidence level of the percentile interval
    compare: str = ""  # a second generator B, as --generator: same prompts and seeds, grids
    grid_rows: int = 8  # prompts per compare_*.png
    image_reward_model: str = "THUDM/ImageReward/ImageReward.pt"  # ImageReward's weights
    image_reward_config: str = "THUDM/ImageReward/med_config.json"  # ImageReward's BERT config
    image_reward_tokenizer: str = "bert-base-uncased"  # ImageReward's tokenizer (+ [DEC], [ENC])
    aesthetic_head: str = "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"  # LAION's head
    hps_model: str = "xswu/HPSv2/HPS_v2.1_compressed.pt"  # HPSv2.1; tokens: --reward_processor's
    dry_run: bool = False  # print each scorer's parameters and memory (built on meta), then stop

def parse_args(argv):
    c = SampleConfig(**vars(distar.make_parser(SampleConfig, "sample.py").parse_args(argv)))
    distar.check_at_least(c, dict(resolution=8, batch_size=1, images_per_prompt=1, bootstrap=1,
                                  grid_rows=1, eval_res=1))
    known = [*SCALE, *PAPER_METRICS, "fid"]
    bad = [m for m in metric_names(c) if m not in known] + [None]
    for ok, msg in ((c.resolution % 8 == 0, "--resolution must be a multiple of 8"),
                    (not bad[0], f"--metrics: no metric {bad[0]}; choose from {','.join(known)}"),
                    ("fid" not in metric_names(c) or c.fid_ref, "--metrics=fid needs --fid_ref: "
                     "a folder of real images (COCO-2014 val2014) or its saved statistics"),
                    (0 < c.ci < 1, f"--ci is a confidence level in (0, 1), not {c.ci}"),
                    (not (c.prompt and c.prompts), "give --prompt or --prompts, not both")):
        if not ok:
            raise distar.ConfigError(msg)
    return c

def metric_names(cfg):
    """--metrics as a list, in the order given; --score adds PickScore and CLIP score."""
    names = ["pickscore", "clip_score"] * cfg.score + cfg.metrics.replace(" ", "").split(",")
    return list(dict.fromkeys(m for m in names if m))

def on_hub(path, files=False):
    """Whether path names the hub: owner/name folders, and with files, owner/name/path/to/file.bin
    state dicts (--generator, --compare)."""
    n = path.count("/")
    file = files and path.endswith(distar.STATE_DICTS) and n >= 2
    return not path.startswith((".", "/", "~")) and (n == 1 or file)

def check_paths(cfg):
    """Before anything loads: a local path that is not there is named as typed (else the default
    --pretrained loads first, and fails on an unreachable hub)."""
    names = metric_names(cfg)
    flags = ("pretrained", "generator", "compare", "lora") + (
        "reward_model", "reward_processor") * ("pickscore" in names) + ("clip_model",) * bool(
        {"clip_score", "aesthetic"} & set(names)) + ("fid_ref", "inception") * ("fid" in names)
    for flag in flags:  # FID's files are never on the hub
        path, local = getattr(cfg, flag), flag in ("fid_ref", "inception")
        if path and (local or not on_hub(path, flag in ("generator", "compare"))) and \
                not os.path.exists(path):
            raise distar.LoadError(f"cannot load --{flag}={path}: no such file or folder")
    if os.path.isdir(cfg.pretrained) and not os.path.isfile(f"{cfg.pretrained}/model_index.json"):
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
    return json.loads(Path(state).read_text()).get("config", {})

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
    if metric_names(cfg) or cfg.compare:
        raise distar.ConfigError("--metrics and --compare are for SDXL generators, not a toy one")
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
        for i, (flag, path) in enumerate(loras[sub]):  # peft's warning on a second adapter:
            with warnings.catch_warnings(action="ignore", category=UserWarning):  # wanted here
                distar.load(flag, path, pipe.load_lora_weights, path, adapter_name=f"lora{i}")
        if len(loras[sub]) > 1:  # a LoRA loaded after another is the only one active
            unet.set_adapters([f"lora{i}" for i in range(len(loras[sub]))])
    pipe.register_modules(**{net: next(iter(unets.values()))})
    if model != "sd3":  # SD3 keeps its own: one Euler step from noise
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)  # a bar for a one-step call says nothing
    names = metric_names(cfg)  # each scorer loaded once; the aesthetic head reuses CLIP score's
    clip = [distar.load("clip_model", cfg.clip_model, cls.from_pretrained, cfg.clip_model)
            for cls in (CLIPModel, AutoProcessor) if {"clip_score", "aesthetic"} & set(names)]
    scorers = {m: clip_scorer(m, cfg.reward_model, cfg.reward_processor, device) if m == "pickscore"
               else clip_scorer(m, *clip, device) if m == "clip_score"
               else PAPER_METRICS[m](cfg, device, clip=tuple(clip) or None)
               for m in names if m != "fid"}
    return pipe.to(device), {sub: u.to(device) for sub, u in unets.items()}, scorers

def clip_scorer(metric, model, processor, device):
    """PickScore or CLIP score as scorer(images, prompts) -> (B,): ClipReward on PIL images."""
    r = distar.ClipReward(model, processor).to(device)
    return lambda images, prompts: SCALE[metric](r(torch.from_numpy(np.stack(images)).permute(
        0, 3, 1, 2).to(device) / 255, r.text_features(prompts)))

def read_prompt_set(path):
    """--prompts: (prompts, each one's category or None): Parti's PartiPrompts.tsv as it is (Prompt
    and Category columns, quotes as written), HPSv2's benchmark (a folder of {style}.json files, or
    one: lists of prompts), or a text file of one prompt per line (COCO captions)."""
    folder = os.path.isdir(path)
    if not (folder or path.endswith((".tsv", ".json"))):
        return distar.read_prompts(path), None
    rows = []
    for file in sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.endswith(".json")) if folder else [path]:
        try:
            with open(file, encoding="utf-8") as f:
                if file.endswith(".tsv"):
                    rows += [(r["Prompt"], r.get("Category") or "") for r in
                             csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
                    continue
                data = json.load(f)  # a style's prompts, as hpsv2's evaluation reads them
            if not (isinstance(data, list) and all(isinstance(p, str) for p in data)):
                raise TypeError("not a list of strings")
            rows += [(p, os.path.basename(file)[:-5]) for p in data]
        except (OSError, ValueError, KeyError, TypeError) as e:
            e = distar.first_line(e)
            raise distar.LoadError(f"--prompts={file}: not Parti's TSV (a Prompt column) nor "
                                   f"HPSv2's JSON (a list of prompts): {e}") from None
    if not rows:
        raise distar.LoadError(f"--prompts={path}: no prompts in it")
    return [p for p, _ in rows], [c for _, c in rows] if any(c for _, c in rows) else None

# ---- FID as SiD-LSG and DMD2 score COCO-30K: GigaGAN's evaluation (clean-fid, "clean" mode, with
# NVIDIA's Inception torchscript), each generator's images against --fid_ref's real ones
INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                 "inception-2015-12-05.pt")  # clean-fid's and StyleGAN's download
IMAGE_FILES = (".bmp", ".jpg", ".jpeg", ".png", ".ppm", ".tif", ".tiff", ".webp")  # clean-fid's
FID_BATCH = 50  # images through Inception at a time

def fid_pixels(image, eval_res):
    """A PIL image -> (3, 299, 299) float32 in [0, 255], Inception's input as GigaGAN and clean-fid
    make it: the centre square (torchvision's center_crop rounding), PIL Lanczos to eval_res in
    uint8, then clean-fid's "clean" resize: each channel in float32, PIL bicubic, clipped."""
    image = image.convert("RGB")
    (w, h), s = image.size, min(image.size)
    left, top = int(round((w - s) / 2)), int(round((h - s) / 2))
    x = np.asarray(image.crop((left, top, left + s, top + s)).resize((eval_res, eval_res),
                                                                    Image.LANCZOS))
    return np.stack([np.asarray(Image.fromarray(x[..., c].astype(np.float32)).resize(
        (299, 299), Image.BICUBIC)).clip(0, 255) for c in range(3)])

class FidStats:
    """The Inception features of a stream of images as float64 sums (count, sum, sum of outer
    products): 30K images in d + d^2 numbers. net: (B, 3, 299, 299) in [0, 255] -> (B, d)."""

    def __init__(self, net, eval_res, device):
        self.net, self.res, self.device = net, eval_res, device
        self.n, self.sum, self.outer = 0, 0, 0

    @torch.no_grad()
    def add(self, images):
        with ThreadPoolExecutor() as pool:  # PIL resizes without the GIL
            x = np.stack(list(pool.map(fid_pixels, images, [self.res] * len(images))))
        f = self.net(torch.from_numpy(x).to(self.device)).double().cpu().numpy()  # (B, d)
        self.n, self.sum, self.outer = self.n + len(f), self.sum + f.sum(0), self.outer + f.T @ f

    def mean_cov(self):
        mu = self.sum / self.n
        return mu, (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)  # (d,), (d, d)

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64. S1 S2 has the spectrum of the
    symmetric S1^(1/2) S2 S1^(1/2), so its root's trace is a sum of square roots of eigh's
    eigenvalues (clean-fid: scipy's sqrtm of S1 S2)."""
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(w.clip(min=0))) @ v.T  # S1^(1/2)
    tr = np.sqrt(np.linalg.eigvalsh(root @ sigma2 @ root).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr)

def load_fid(cfg, device, n_images):
    """(net, (mu, sigma, n) of --fid_ref). net: NVIDIA's Inception as clean-fid runs it, its layers
    on (x - 128) / 128, from --inception or torch's cache (fetched there once). --fid_ref: saved
    statistics, or a folder's images (subfolders too, as clean-fid) read once and saved as
    {out_dir}/fid_ref_{eval_res}.npz. Each side needs more images than features (a full-rank
    covariance)."""
    path = cfg.inception or os.path.join(torch.hub.get_dir(), "checkpoints",
                                         os.path.basename(INCEPTION_URL))
    if not os.path.isfile(path) and not cfg.inception:
        try:  # to a temporary file, renamed when complete
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(INCEPTION_URL, path)
        except Exception as e:  # offline: URLError
            raise distar.LoadError(f"cannot load FID's Inception: {path} is not there and cannot "
                                   f"be fetched ({distar.first_line(e)}): download "
                                   f"{INCEPTION_URL} there, or pass --inception=PATH") from None
    base = distar.load("inception", path, torch.jit.load, path, map_location=device).eval()
    net = lambda x: base.layers((x - 128) / 128).flatten(1)  # (B, 2048)
    dim = distar.load("inception", path, lambda: net(torch.zeros(1, 3, 299, 299, device=device))
                      .shape[1])  # another torchscript: no layers
    stats = os.path.isfile(cfg.fid_ref)  # else a folder
    files = [] if stats else sorted(os.path.join(r, f) for r, _, fs in os.walk(cfg.fid_ref)
                                    for f in fs if f.lower().endswith(IMAGE_FILES))
    if not (stats or files):
        raise distar.LoadError(f"--fid_ref={cfg.fid_ref}: no images in it")
    for n, what in [(n_images, "each generator")] + [(len(files), cfg.fid_ref)] * bool(files):
        if n <= dim:
            raise distar.ConfigError(f"FID needs more images than its {dim} features, for a "
                                     f"full-rank covariance: {what} has {n}")
    if stats:  # np.load: arrays only, no pickles
        z = distar.load("fid_ref", cfg.fid_ref, lambda: dict(np.load(cfg.fid_ref)))
        if sorted(z) != ["eval_res", "mu", "n", "sigma"] or z["eval_res"] != cfg.eval_res \
                or z["mu"].shape != (dim,):
            raise distar.LoadError(f"--fid_ref={cfg.fid_ref}: not the FID statistics that "
                                   f"sample.py saves, at --eval_res={cfg.eval_res}, {dim} features")
        return net, (z["mu"], z["sigma"], int(z["n"]))
    ref = FidStats(net, cfg.eval_res, device)
    for i in range(0, len(files), FID_BATCH):
        ref.add([distar.load("fid_ref", f, lambda f=f: Image.open(f).convert("RGB"))
                 for f in files[i:i + FID_BATCH]])
    mu, sigma = ref.mean_cov()
    os.makedirs(cfg.out_dir, exist_ok=True)
    saved = os.path.join(cfg.out_dir, f"fid_ref_{cfg.eval_res}.npz")
    np.savez(saved, mu=mu, sigma=sigma, n=ref.n, eval_res=cfg.eval_res)
    print(f"wrote {saved}, the statistics of {ref.n} images in {cfg.fid_ref}: pass it as --fid_ref")
    return net, (mu, sigma, ref.n)

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

# ---- the paper's per-image metrics: ImageReward, LAION's aesthetic score and HPSv2.1 from their
# official files in transformers' classes, preprocessed as their official code does (PIL's and
# torch's resizes differ by up to 0.14 in normalised units). load_<name>(cfg, device, clip) -> a
# scorer: (PIL images, prompts) -> (B,) on the paper's scale. Tests: the official code's outputs
# on tiny models (.ci/eval_golden).
CLIP_MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)  # BLIP and HPS too
CLIP_STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)
IR_MEAN, IR_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward's reward normalisation
IR_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, image_size=224,
                 num_attention_heads=16, patch_size=16, layer_norm_eps=1e-6)  # BLIP's ViT-L/16
BERT_BASE = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072,  # med_config.json's
                 num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512)
tower = lambda w, n, h, act: dict(hidden_size=w, intermediate_size=4 * w, num_hidden_layers=n,
                                  num_attention_heads=h, hidden_act=act, layer_norm_eps=1e-5)
HPS_CLIP = dict(projection_dim=1024, vision_config=dict(tower(1280, 32, 16, "gelu"), patch_size=14),
                text_config=tower(1024, 24, 16, "gelu"))  # open_clip's ViT-H-14 (exact GELU)
CLIP_L = dict(projection_dim=768, vision_config=dict(tower(1024, 24, 16, "quick_gelu"),
              patch_size=14), text_config=tower(768, 12, 12, "quick_gelu"))  # --dry_run's
def pixels(images, size, long_side=False):
    """PIL images -> (B, 3, size, size), CLIP mean/std. As CLIP's and BLIP's transforms: bicubic
    resize of the short side in PIL, on uint8 (the long side truncated, as torchvision), centre
    crop. long_side, as HPSv2's: [0, 1] first, the long side resized in torch (bicubic,
    antialiased), then zeros around it to a square."""
    out = []
    for im in (im.convert("RGB") for im in images):
        w, h = im.size
        new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        if not long_side:
            im = im.resize(new, Image.BICUBIC) if new != (w, h) else im
            top, left = int(round((new[1] - size) / 2)), int(round((new[0] - size) / 2))
            im = im.crop((left, top, left + size, top + size))
        x = torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255  # (3, h, w)
        if long_side and max(h, w) != size:
            s = size / max(h, w)
            x = F.interpolate(x[None], size=(round(h * s), round(w * s)), mode="bicubic",
                              antialias=True)[0]
        ph, pw = size - x.shape[1], size - x.shape[2]
        out.append(F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)))
    return (torch.stack(out) - CLIP_MEAN) / CLIP_STD

def load_weights(cfg, flag, kind, build, convert=dict, unused=r"$^"):
    """build(sd)'s net, parameters on meta (buffers, as BERT's position_ids, made as usual), with
    convert(sd), --flag's state dict in its names: strictly but `unused` (distar.strict_load)."""
    from accelerate import init_empty_weights
    sd = distar.load_file(flag, getattr(cfg, flag))
    with init_empty_weights():
        net = build(sd)
    return distar.strict_load(flag, getattr(cfg, flag), kind, net, convert(sd), unused)

def load_image_reward(cfg, device, clip=None):
    """ImageReward: BLIP's BERT over the prompt (35 tokens) cross-attending to its ViT-L/16's
    image tokens; an MLP on the [CLS] output, normalised as ImageReward.score does."""
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval
    def build(sd):  # BLIP as its med_config.json (read after ImageReward.pt) and the MLP
        med = distar.load_file("image_reward_config", cfg.image_reward_config,
                               lambda f: json.loads(Path(f).read_text()))
        bert = {k: med[k] for k in ("hidden_act", "layer_norm_eps", "pad_token_id", *BERT_BASE)
                if k in med}
        return nn.ModuleDict(dict(blip=BlipForImageTextRetrieval(BlipConfig(
            vision_config=IR_VISION, text_config=dict(bert, encoder_hidden_size=IR_VISION[
                "hidden_size"]), image_text_hidden_size=256)), mlp=distar.mlp_head(sd, "mlp.")))
    # BLIP's ITM head is not in ImageReward; its own BERT saved position_ids, an arange
    net = load_weights(cfg, "image_reward_model", "ImageReward", build, lambda sd: {reduce(
        lambda k, r: re.sub(*r, k), distar.IR_TO_HF, k): v for k, v in sd.items()},  # in turn
                       r"blip\.itm_head\.|blip\.text_encoder\.embeddings\.position_ids$")
    vision, text, head = (m.to(device) for m in (net.blip.vision_model, net.blip.text_encoder,
                                                 net.mlp))
    path = cfg.image_reward_tokenizer  # as BLIP's init_tokenizer; [CLS] stays first, as .score
    tok = distar.load("image_reward_tokenizer", path, BertTokenizer.from_pretrained, path)
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    @torch.no_grad()
    def scorer(images, prompts):
        img = vision(pixel_values=pixels(images, IR_VISION["image_size"]).to(device))[0]
        t = tok(prompts, padding="max_length", truncation=True, max_length=35,
                return_tensors="pt").to(device)
        out = text(input_ids=t.input_ids, attention_mask=t.attention_mask,
                   encoder_hidden_states=img)[0]  # (B, 35, 768); every image token attended
        return ((head.layers(out[:, 0]) - IR_MEAN) / IR_STD)[:, 0].float().cpu()
    scorer.tokenizer = tok
    return scorer

def load_aesthetic(cfg, device, clip=None):
    """LAION's aesthetic head on CLIP ViT-L/14's L2-normalised image embedding; clip: CLIP score's
    CLIPModel (or its (model, processor)), else --clip_model's."""
    from transformers import CLIPModel
    model = clip[0] if isinstance(clip, (list, tuple)) else clip
    model = (model or distar.load("clip_model", cfg.clip_model, CLIPModel.from_pretrained,
                                  cfg.clip_model)).to(device).eval()
    head = load_weights(cfg, "aesthetic_head", "an aesthetic head", distar.mlp_head).to(device)
    @torch.no_grad()
    def scorer(images, prompts):
        x = pixels(images, model.config.vision_config.image_size).to(device, model.dtype)
        f = model.get_image_features(pixel_values=x).pooler_output.float()  # (B, 768)
        return head.layers(F.normalize(f, dim=-1))[:, 0].cpu()
    return scorer

def load_hps(cfg, device, clip=None):
    """HPSv2.1: 100 cos(image, prompt) of an open_clip ViT-H-14, as HPSv2's evaluation prints it.
    Its tokens are open_clip's: laion's CLIP-H processor pads with "!", so transformers splits each
    "!" of a prompt out as that special token (id 0) where open_clip reads text ("!</w>", 256).
    So: a tokenizer from its vocab and merges with the default pad, and ids 0 after the end token
    (open_clip's pads, which CLIP's causal attention never reads)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPTokenizer
    model = load_weights(cfg, "hps_model", "HPSv2 (open_clip ViT-H-14)", lambda sd: CLIPModel(
        CLIPConfig(**HPS_CLIP)), lambda sd: distar.open_clip_to_hf(sd.get("state_dict", sd)))
    model.to(device)
    path = cfg.reward_processor
    bpe = json.loads(distar.load("reward_processor", path, AutoTokenizer.from_pretrained, path)
                     .backend_tokenizer.to_str())["model"]
    tok = CLIPTokenizer(vocab=bpe["vocab"], merges=[tuple(m.split(" ") if isinstance(m, str)
                                                          else m) for m in bpe["merges"]])
    def tokens(prompts):  # (B, 77); a truncated prompt keeps its end token
        ids = tok(prompts, padding="max_length", truncation=True, max_length=77,
                  return_tensors="pt").input_ids
        return ids.masked_fill(torch.arange(77) > ids.eq(tok.eos_token_id).int().argmax(
            1, keepdim=True), 0)
    @torch.no_grad()
    def scorer(images, prompts):
        x = pixels(images, model.config.vision_config.image_size, long_side=True).to(device)
        img = F.normalize(model.get_image_features(pixel_values=x).pooler_output, dim=-1)
        txt = model.get_text_features(input_ids=tokens(prompts).to(device)).pooler_output
        return 100 * (img * F.normalize(txt, dim=-1)).sum(-1).float().cpu()
    scorer.tokens = tokens
    return scorer

PAPER_METRICS = dict(image_reward=load_image_reward, aesthetic=load_aesthetic, hps=load_hps)

def scorer_sizes():
    """{metric: (its nets, parameters)} at full size, built on meta: nothing downloaded."""
    from transformers import BlipConfig, BlipForImageTextRetrieval, CLIPConfig, CLIPModel
    with torch.device("meta"):
        blip = BlipForImageTextRetrieval(BlipConfig(vision_config=IR_VISION, text_config=dict(
            BERT_BASE, encoder_hidden_size=IR_VISION["hidden_size"])))
        nets = dict(image_reward=("BLIP ViT-L/16 + BERT-base + MLP", blip.vision_model,
                                  blip.text_encoder, distar.mlp_head({})),
                    aesthetic=("CLIP ViT-L/14 (--clip_model's) + LAION head",
                               CLIPModel(CLIPConfig(**CLIP_L)), distar.mlp_head({})),
                    hps=("open_clip ViT-H-14 as CLIPModel", CLIPModel(CLIPConfig(**HPS_CLIP))))
    return {k: (what, sum(p.numel() for n in ns for p in n.parameters()))
            for k, (what, *ns) in nets.items()}

@torch.no_grad()
def sample(cfg):
    from diffusers.utils import make_image_grid
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dict(fp16="float16", bf16="bfloat16", fp32="float32")[cfg.dtype])
    dtype = dtype if device == "cuda" else torch.float32  # half precision is for GPUs
    prompts, cats = ([cfg.prompt], None) if cfg.prompt else read_prompt_set(cfg.prompts)
    k, records = cfg.images_per_prompt, []
    jobs = [(p, text) for p, text in enumerate(prompts) for _ in range(k)]
    plan = plan_models(cfg)  # the recorded bases are here, before anything loads
    gen_a = cfg.generator or plan[0]  # no --generator: the pipeline's own UNet
    distar.offline_unless_reachable(plan[0], *(u[1] for u in plan[1].values()), cfg.lora, *(
        cfg.reward_model, cfg.reward_processor, cfg.clip_model) * cfg.score)  # or fail at once
    pipe, unets, scorers = load_models(cfg, plan, device, dtype)  # before anything is written
    fid = load_fid(cfg, device, len(jobs)) if "fid" in metric_names(cfg) else None
    fids = {sub: FidStats(fid[0], cfg.eval_res, device) for sub in unets} if fid else {}
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
            vals = {m: score(images, texts).tolist() for m, score in scorers.items()}
            if fids:
                fids[sub].add(images)
            os.makedirs(os.path.join(cfg.out_dir, sub), exist_ok=True)
            for j, (im, (p, text)) in enumerate(zip(images, batch)):
                name = os.path.join(sub, f"{i + j:03d}.png")
                im.save(os.path.join(cfg.out_dir, name))
                records.append(dict(image=name, prompt_index=p, prompt=text, seed=cfg.seed + b,
                                    **tag, **({"category": cats[p]} if cats else {}),
                                    **{m: v[j] for m, v in vals.items()}))
    # the grids read the PNGs back, one grid at a time: thousands of images do not fit in memory
    n_grids, rows = (-(-len(prompts) // cfg.grid_rows) if cfg.compare else 0), cfg.grid_rows
    short = lambda path: "/".join(os.path.normpath(path).split(os.sep)[-2:])  # checkpoint-*/...
    labels = ["A: " + short(gen_a) + " + LoRA" * bool(cfg.lora), "B: " + short(cfg.compare)]
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
    if not metric_names(cfg):
        return
    Path(cfg.out_dir, "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = dict(n_prompts=len(prompts), images_per_prompt=k, ci=cfg.ci, bootstrap=cfg.bootstrap,
                   seed=cfg.seed, generator=gen_a, lora=cfg.lora, compare=cfg.compare)
    fmt = lambda mean, lo, hi: f"{mean:.4g}" + (f" [{lo:.4g}, {hi:.4g}]" if lo is not None else "")
    groups = {"": list(range(len(prompts))), **{c: [p for p, x in enumerate(cats) if x == c]
                                                 for c in dict.fromkeys(cats or [])}}
    names, table, per = [m for m in metric_names(cfg) if m != "fid"], {}, {g: {} for g in groups}
    for metric in names:  # mean [lo, hi]; with --compare: A, B and the paired difference B - A
        S = {sub: np.reshape([r[metric] for r in records if r.get("generator", "") == sub], (-1, k))
             for sub in unets}  # (P, k): a row per prompt
        if cfg.compare:  # per image pair (same prompt and seed): the bootstrap keeps the pairs
            S["b_minus_a"] = S["b"] - S["a"]
        for g, idx in groups.items():  # all prompts, then each category's (Parti) or style's
            stats = {sub: dict(zip(("mean", "lo", "hi"), cluster_bootstrap(
                s[idx], cfg.bootstrap, cfg.ci, cfg.seed))) for sub, s in S.items()}
            for sub, v in stats.items():
                table.setdefault((g, sub), {})[metric] = fmt(**v)
            per[g][metric] = stats if cfg.compare else stats[""]
    summary.update(per.pop(""), **{"categories": per} if per else {})
    row = {**TAGS, "": short(gen_a) + " "}
    lines = [[""] + names] + [[f"{row[sub] * (not g or sub != '')}{g}".strip()] + [
        cells[m] for m in names] for (g, sub), cells in table.items()]  # the paper's layout
    widths = [max(map(len, column)) for column in zip(*lines)]
    for line in lines if table else []:
        print("  ".join(f"{c:{w}}" for c, w in zip(line, widths)).rstrip())
    if table:
        print(f"{100 * cfg.ci:g}% CI, {len(prompts)} prompts, {len(jobs)} images"
              + " per generator" * bool(cfg.compare) + f" ({k} per prompt)")
    if fids:  # no per-image value: a row of its own
        mu, sigma, n_ref = fid[1]
        fid = {sub: frechet_distance(*stats.mean_cov(), mu, sigma) for sub, stats in fids.items()}
        summary["fid"] = dict(fid if cfg.compare else dict(value=fid[""]), n_images=len(jobs),
                              eval_res=cfg.eval_res, reference=cfg.fid_ref, n_reference=n_ref)
        print("FID  " + "  ".join(f"{row[sub]}{v:.4g}" for sub, v in fid.items())
              + f"  ({len(jobs)} images{' each' * bool(cfg.compare)} at {cfg.eval_res} px against "
              f"{n_ref} real ones" + "; fewer than COCO-30K's 30,000: biased upward, not comparable"
              " with 30K numbers" * (len(jobs) < 30000) + ")")
    Path(cfg.out_dir, "scores.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {cfg.out_dir}/scores.jsonl (every image) and scores.json (the intervals)")

def main(argv):
    try:
        cfg = parse_args(argv)
        if cfg.dry_run:  # weights in fp32 (GiB = 2^30 bytes)
            for name, (what, n) in scorer_sizes().items():
                print(f"{name:<13s} {what:<45s} {n:>13,d} parameters {4 * n / 2**30:6.2f} GiB")
            return 0
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
