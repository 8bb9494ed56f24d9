"""
distar: a minimal, single-file reference implementation of Diff-Instruct* (DI*).

DI* trains a one-step generator g_theta to maximise a reward r(x_0, c) while a score-based
divergence (eq. 3.2) keeps it close to a reference diffusion model. The divergence's gradient
comes from the tractable loss of Theorem 3.1 (eq. 3.4); an assistant diffusion model s_psi,
trained by denoising score matching on the generator's samples (eq. 2.2), stands in for the
generator's score. Classifier-free guidance enters as an implicit reward (Theorem 3.2, "choice
1", --cfg=out) or through a CFG-enhanced reference ("choice 2", --cfg=in). Paper: Luo et al.,
"Diff-Instruct*: Towards Human-Preferred One-step Text-to-image Generative Models".

Toy 2-D Gaussian world, any laptop, no download (gradient check first, then Algorithm 1):
$ python distar.py --toy
$ torchrun --standalone --nproc_per_node=2 distar.py --toy

The paper's Table 2 in the toy, one generator per row, one table and one picture (~1.5 min):
$ python distar.py --toy --ablation

Tiny random SDXL-shaped models on CPU (the real code path, a smoke test):
$ torchrun --standalone --nproc_per_node=2 distar.py --tiny --max_steps=4

Full size with nothing downloaded: the real SDXL and PickScore architectures, random weights.
Without a GPU: memory per GPU and FLOPs per step; on GPUs also seconds/step, images/s, MFU:
$ python distar.py --dry_run --world_size_plan=8 --zero
$ torchrun --standalone --nproc_per_node=8 distar.py --dry_run --zero --grad_checkpointing

The cost of a generator step per divergence and of an assistant step, checkpointing off and on,
as ratios to the KL step (tiny on CPU; full size on one GPU):
$ python distar.py --tiny --bench
$ python distar.py --dry_run --bench

The real SDXL and PickScore architectures with random weights, no download: without a GPU the
memory plan per GPU and the FLOPs per step; on GPUs also seconds/step, images/s, peak memory, MFU:
$ python distar.py --dry_run --world_size_plan=8 --zero
$ torchrun --standalone --nproc_per_node=8 distar.py --dry_run --zero --grad_checkpointing

SDXL (defaults: SDXL-base reference, DMD2 one-step init, PickScore reward, bf16):
one GPU (needs ~85 GiB before activations, so a 141 GB card; see README):
$ python distar.py --prompts=prompts.txt --grad_checkpointing
one node of 8 GPUs:
$ torchrun --standalone --nproc_per_node=8 distar.py --prompts=prompts.txt --zero --grad_checkpointing
8 nodes of 8 GPUs (run on every node, with the first node's address):
$ torchrun --nnodes=8 --nproc_per_node=8 --node_rank=$NODE_RANK --master_addr=$MASTER_ADDR \
    --master_port=29500 distar.py --prompts=prompts.txt --zero --grad_checkpointing
continue an interrupted run: the same command with --resume

Read it top to bottom: config, the loss math (one function per equation), the toy world and
its gradient check, the SDXL world, the alternating loop (written once, given a world),
distributed setup and checkpoints, main. Every option is a field of Config below and is
overridden as --key=value.
"""

import datetime
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

# -----------------------------------------------------------------------------
# config: defaults below, overridden by --key=value (a bare --flag means True)


@dataclass
class Config:
    toy: bool = False  # the 2-D Gaussian world: CPU, seconds, exact reference scores
    tiny: bool = False  # write tiny random SDXL-shaped models to {out_dir}/tiny and train on them
    ablation: bool = False  # with --toy: train one generator per row of the paper's Table 2, compare
    dry_run: bool = False  # the real SDXL architectures, random weights, no download: time a few steps on
    # a GPU (seconds/step, images/s, peak memory, MFU), or without one print the planned memory per device
    world_size_plan: int = 0  # --dry_run: the number of GPUs to plan memory for; 0 = this run's world size
    peak_tflops: float = 0.0  # --dry_run: the GPU's dense bf16 peak for MFU; 0 = look it up by device name
    # models: hub ids or local folders (SDXL mode)
    pretrained: str = "stabilityai/stable-diffusion-xl-base-1.0"  # s_ref, s_psi's init, VAE, text encoders
    generator_init: str = "tianweiy/DMD2/dmd2_sdxl_1step_unet_fp16.bin"  # state-dict file or UNet folder; "" = pretrained
    variant: str = ""  # weight-file variant of a --generator_init folder, e.g. fp16
    reward_model: str = "yuvalkirstain/PickScore_v1"  # any transformers CLIPModel
    reward_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # its tokenizer and image size/mean/std
    prompts: str = ""  # text file, one prompt per line; "" = a few built-in prompts
    resolution: int = 1024
    conditioning_t: int = 399  # the one-step generator's conditioning timestep (DMD2, DI*)
    # the DI* objective (Algorithm 1); paper defaults: alpha_rew 100, alpha_cfg 7.5, cfg in
    alpha_rew: float = 100.0  # alpha_rew: scale of the explicit reward r(x_0, c)
    alpha_cfg: float = 7.5  # alpha_cfg: guidance strength; CFG scale omega = 1 + alpha_cfg
    cfg: str = "in"  # "in": choice 2 (CFG-enhanced reference), "out": choice 1 (Theorem 3.2)
    divergence: str = "pseudo_huber"  # pseudo_huber | l2 (eq. 3.4) | kl (Diff-Instruct/DI++)
    huber_c: float = 0.1  # pseudo-Huber c on the eps scale, per sqrt(dim): c = huber_c sqrt(D)
    t_min: int = 20  # t ~ U{t_min..t_max} of the 1000-step SDXL schedule
    t_max: int = 980
    assistant_steps: int = 5  # K_TA: assistant (DSM) updates per generator update
    # optimisation (AdamW, as DMD2)
    batch_size: int = 2  # samples per rank per update
    max_steps: int = 1000  # generator updates
    lr_g: float = 5e-7  # generator learning rate
    lr_psi: float = 5e-7  # assistant learning rate
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.01
    grad_clip: float = 10.0  # max grad norm of each net
    max_skips: int = 20  # stop after this many updates in a row with a non-finite loss or gradient
    seed: int = 0  # rank r uses seed * world_size + r
    # precision and memory
    precision: str = "bf16"  # bf16: autocast, fp32 master weights, frozen nets in bf16 | fp32
    grad_checkpointing: bool = False  # UNets and VAE recompute activations in backward
    zero: bool = False  # shard optimizer states across ranks (ZeroRedundancyOptimizer)
    # output
    out_dir: str = "out"
    log_interval: int = 10  # steps between metrics lines
    ckpt_interval: int = 500  # steps between checkpoints (and one at the end)
    sample_interval: int = 500  # steps between sample grids
    keep_checkpoints: int = 2  # newest complete checkpoints kept (an SDXL one is ~60 GB)
    resume: bool = False  # continue from the newest complete checkpoint in out_dir
    # start over in an out_dir that holds an earlier run: its checkpoints, metrics and samples are deleted
    overwrite: bool = False
    # the cost table (--bench): time the steps instead of training, write {out_dir}/bench.json
    bench: bool = False
    bench_reps: int = 20  # timed repetitions of every variant (medians are reported)
    bench_warmup: int = 5  # untimed repetitions first


# the toy is a different problem size: these replace the defaults, and --key=value still wins
TOY_DEFAULTS = dict(batch_size=256, max_steps=1000, lr_g=1e-3, lr_psi=3e-3, assistant_steps=4,
                    weight_decay=0.0, log_interval=100, ckpt_interval=1000, out_dir="out_toy")
# twelve toy runs in under 2 minutes on 2 CPU cores
ABLATION_DEFAULTS = dict(max_steps=500)
# tiny random models on CPU: a smoke-test size; --key=value still wins
TINY_DEFAULTS = dict(resolution=64, batch_size=2, max_steps=4, lr_g=1e-4, lr_psi=1e-4, assistant_steps=2,
                     precision="fp32", log_interval=1, ckpt_interval=2, sample_interval=2, out_dir="out_tiny")
# the dry run: a few steps at the real size (the first is warm-up), nothing written
DRY_RUN_DEFAULTS = dict(max_steps=4, out_dir="out_dry_run")
CHOICES = dict(cfg=("in", "out"), divergence=("pseudo_huber", "l2", "kl"), precision=("bf16", "fp32"))


class ConfigError(ValueError):
    pass


def parse_overrides(argv, cls):
    """--key=value overrides of a config dataclass, type-checked; unknown keys and bad values are
    errors. A bare --flag means True."""
    types = {f.name: f.type for f in fields(cls)}
    overrides = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options look like --key=value")
        key, eq, val = arg[2:].partition("=")
        if key not in types:
            raise ConfigError(f"unknown option --{key}")
        typ = types[key]
        if typ is bool:
            if eq and val.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"--{key} takes true or false, not {val!r}")
            overrides[key] = (not eq) or val.lower() in ("true", "1")
            continue
        if not eq:
            raise ConfigError(f"--{key} needs a value: --{key}=<{typ.__name__}>")
        try:
            overrides[key] = typ(val)
        except ValueError:
            raise ConfigError(f"--{key} expects {typ.__name__}, got {val!r}") from None
        if key in CHOICES and val not in CHOICES[key]:
            raise ConfigError(f"--{key} must be one of {'|'.join(CHOICES[key])}, not {val!r}")
    return overrides


def parse_args(argv):
    overrides = parse_overrides(argv, Config)
    defaults = (TOY_DEFAULTS if overrides.get("toy") else TINY_DEFAULTS if overrides.get("tiny")
                else DRY_RUN_DEFAULTS if overrides.get("dry_run") else {})
    if overrides.get("ablation"):
        defaults = {**defaults, **ABLATION_DEFAULTS}
    cfg = Config(**{**defaults, **overrides})
    if cfg.toy + cfg.tiny + cfg.dry_run > 1:
        raise ConfigError("--toy, --tiny and --dry_run are different worlds: choose one")
    if cfg.ablation and not cfg.toy:
        raise ConfigError("--ablation is a toy experiment: use --toy --ablation")
    if cfg.ablation and (set(overrides) & set(ROW_FLAGS) or cfg.resume):
        raise ConfigError(f"--ablation sets --{', --'.join(ROW_FLAGS)} per row and always starts afresh; "
                          f"drop {' '.join('--' + k for k in overrides if k in (*ROW_FLAGS, 'resume'))}")
    if cfg.keep_checkpoints < 1:
        raise ConfigError(f"--keep_checkpoints must be >= 1, got {cfg.keep_checkpoints}")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume continues the run in out_dir, --overwrite deletes it: choose one")
    if cfg.dry_run and cfg.resume:
        raise ConfigError("--dry_run writes no checkpoints, so there is nothing to --resume")
    if cfg.world_size_plan < 0 or cfg.peak_tflops < 0:
        raise ConfigError("--world_size_plan and --peak_tflops must be >= 0")
    if cfg.dry_run and cfg.max_steps < 2:
        raise ConfigError("--dry_run needs --max_steps >= 2: the first step is warm-up and is not timed")
    if cfg.resolution % 8 or cfg.resolution < 8:
        raise ConfigError(f"--resolution must be a multiple of 8, got {cfg.resolution}")
    if not 0 <= cfg.t_min <= cfg.t_max <= 999:
        raise ConfigError(f"need 0 <= t_min <= t_max <= 999, got {cfg.t_min} and {cfg.t_max}")
    if cfg.max_skips < 1:
        raise ConfigError(f"--max_skips must be >= 1, got {cfg.max_skips}")
    if cfg.batch_size < 1 or cfg.max_steps < 0 or cfg.assistant_steps < 0:
        raise ConfigError("batch_size must be >= 1, max_steps and assistant_steps >= 0")
    if cfg.bench and (cfg.toy or cfg.bench_reps < 1 or cfg.bench_warmup < 0):
        raise ConfigError("--bench times the SDXL world (not --toy) and needs bench_reps >= 1, bench_warmup >= 0")
    return cfg


# -----------------------------------------------------------------------------
# the loss math, in score space (score = grad_x log density)
# Batch is dim 0. Norms and inner products are per sample over all other dims, so the same
# functions serve (B, 2) toy points and (B, 4, 128, 128) SDXL latents; each returns (B,).
# The generator loss is the mean of these over the batch.


def _dot(u, v):
    return (u * v).flatten(1).sum(1)  # per-sample inner product, (B,)


def _per_sample(v, like):
    """A float or a (B,) tensor, shaped to broadcast against `like` (B, ...)."""
    if torch.is_tensor(v) and v.ndim == 1:
        return v.view(-1, *([1] * (like.ndim - 1)))
    return v


def distance_grad(y, distance="pseudo_huber", c=1.0):
    """d'(y) of the distance d in eq. 3.2."""
    if distance == "l2":  # d(y) = ||y||^2
        return 2 * y
    if distance == "pseudo_huber":  # d(y) = sqrt(||y||^2 + c^2) - c, eq. 3.8
        c = _per_sample(c, y)
        return y / torch.sqrt(_dot(y, y).view(-1, *([1] * (y.ndim - 1))) + c**2)
    raise ValueError(f"unknown distance {distance!r}")


def score_divergence_loss(x_t, cond_score, fake_score_fn, ref_score_fn, distance="pseudo_huber",
                          c=1.0, weight=1.0):
    """The divergence term of eq. 3.4 / 3.5 (Theorem 3.1): -d'(y_t) . (s_fake(x_t) - cond_score),
    y_t = s_fake(x_t) - s_ref(x_t). Both score nets see x_t as passed: the theta-gradient flows
    through x_t into d' (both nets) and into the second s_fake. Only the nets' parameters are
    frozen (sg[theta]). Detaching x_t anywhere here is a different, wrong gradient (math.md)."""
    s_fake = fake_score_fn(x_t)  # s_psi(x_t) ~ s_{p_sg[theta],t}(x_t)
    y_t = s_fake - ref_score_fn(x_t)  # y_t = s_fake - s_ref
    return -weight * _dot(distance_grad(y_t, distance, c), s_fake - cond_score)


def kl_loss(x_t, fake_score_fn, ref_score_fn, weight=1.0):
    """Diff-Instruct / DI++ baseline: (s_fake(sg[x_t]) - s_ref(sg[x_t])) . x_t, whose theta-gradient
    is that of KL(p_theta,t || q_t). No back-propagation through either net."""
    with torch.no_grad():
        x = x_t.detach()
        g = fake_score_fn(x) - ref_score_fn(x)
    return weight * _dot(g, x_t)


def cfg_reward_loss(x_t, cond_score_fn, uncond_score_fn, weight=1.0):
    """Theorem 3.2, choice 1 (DI*-Out): -(s_ref(sg[x_t]|c) - s_ref(sg[x_t]|empty)) . x_t.
    Its gradient is that of MINUS the implicit reward (3.7). The paper prints a + in (3.5) and
    (3.6): in score space that is the opposite gradient (it holds for eps-predictions,
    s = -eps/sigma_t, which flip the sign). The gradient check prints both."""
    with torch.no_grad():
        x = x_t.detach()
        g = cond_score_fn(x) - uncond_score_fn(x)
    return -weight * _dot(g, x_t)


def cfg_score(cond_score, uncond_score, scale):
    """Choice 2 (DI*-In): the CFG-enhanced reference s_u + scale (s_c - s_u), i.e. the score of
    p(x|c)^scale p(x)^(1-scale). The paper prints s_c + alpha s_u, which is not CFG."""
    return uncond_score + scale * (cond_score - uncond_score)


def dsm_loss(score_pred, cond_score, weight=1.0):
    """Denoising score matching, eq. 2.2: weight * ||s_psi(x_t) - grad log p_t(x_t|x_0)||^2."""
    d = score_pred - cond_score
    return weight * _dot(d, d)


# -----------------------------------------------------------------------------
# the toy world: 2-D data, K prompts (classes), each a mixture of isotropic Gaussians
# Diffusion is the same VP schedule as SDXL (1000 scaled-linear betas 0.00085 -> 0.012),
# x_t = a_t x_0 + sigma_t eps, so a mode N(m, std^2 I) diffuses to N(a_t m, (a_t^2 std^2 +
# sigma_t^2) I) and every reference score is exact. The unconditional reference is the
# mixture of all classes, so CFG has an exact meaning too.


def sdxl_alphas_cumprod():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                          beta_start=0.00085, beta_end=0.012)
    return sched.alphas_cumprod  # alphabar_t, (1000,)


class ToyNet(nn.Module):
    """MLP f(x, c[, t]): the generator g_theta(z, c) (no t) or the assistant eps_psi(x_t, t, c)."""

    def __init__(self, n_classes, use_t, width=128):
        super().__init__()
        self.use_t = use_t
        self.emb = nn.Embedding(n_classes, 16)
        d_in = 2 + 16 + (16 if use_t else 0)
        self.net = nn.Sequential(nn.Linear(d_in, width), nn.SiLU(), nn.Linear(width, width),
                                 nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x, c, t=None):
        h = [x, self.emb(c)]
        if self.use_t:  # Fourier features of t / 1000
            freqs = torch.arange(1, 9, device=x.device, dtype=x.dtype) * math.pi
            h += [torch.sin(freqs * t[:, None] / 1000), torch.cos(freqs * t[:, None] / 1000)]
        return self.net(torch.cat(h, 1))


class ToyWorld:
    """K classes; class k is an equal-weight mixture of isotropic Gaussians means[k] (M, 2), std.
    Explicit reward r(x, c) = reward_scale * x[0]: it favours the right-hand mode of each class,
    and its gradient is the constant (reward_scale, 0)."""

    def __init__(self, means, std=0.3, reward_scale=0.001, device="cpu", dtype=torch.float32):
        self.means = torch.as_tensor(means, dtype=dtype, device=device)  # (K, M, 2)
        self.K = self.means.shape[0]
        self.std, self.reward_scale = std, reward_scale
        self.alphas_cumprod = sdxl_alphas_cumprod().to(device, dtype)
        self.generator = self.assistant = None  # set by make_toy_world

    # exact reference densities and scores; c: (B,) class ids, or None for the unconditional
    def _modes(self, x, c):
        return self.means[c] if c is not None else self.means.reshape(1, -1, 2).expand(len(x), -1, -1)

    def log_prob(self, x, a, s, c):
        """log q_t(x | c) for x (B, 2), a = a_t and s = sigma_t (B,)."""
        m = self._modes(x, c)  # (B, M, 2) component means at t=0
        var = (a**2 * self.std**2 + s**2)[:, None]  # (B, 1) component variance at t
        sq = ((x[:, None] - a[:, None, None] * m) ** 2).sum(-1)  # (B, M)
        comp = -sq / (2 * var) - torch.log(2 * math.pi * var)
        return torch.logsumexp(comp, 1) - math.log(m.shape[1])

    def score(self, x, a, s, c):
        """grad_x log q_t(x | c): responsibility-weighted Gaussian scores."""
        m = self._modes(x, c)
        var = (a**2 * self.std**2 + s**2)[:, None, None]  # (B, 1, 1)
        diff = x[:, None] - a[:, None, None] * m  # (B, M, 2)
        resp = torch.softmax(-(diff**2).sum(-1, keepdim=True) / (2 * var), 1)  # (B, M, 1)
        return -(resp * diff / var).sum(1)

    def sample_ref(self, c, n):
        """n samples of q_0(x | c) for one class c, (n, 2)."""
        m = self.means[c:c + 1]  # (1, M, 2)
        return sample_mixture(m, torch.ones(m.shape[:2], device=m.device), self.std, n)[0]

    # the interface the alternating loop uses (the SDXL world has the same methods)
    def sample_cond(self, n):
        return torch.randint(self.K, (n,), device=self.means.device)  # prompts c

    def generate(self, g, cond):
        z = torch.randn(len(cond), 2, device=self.means.device)  # z ~ p_z
        return g(z, cond)  # x_0 = g_theta(z, c), (B, 2)

    def eps_fake(self, s_psi, x_t, t, cond):
        return s_psi(x_t, cond, t.float())  # eps_psi(x_t, t, c)

    def eps_ref(self, x_t, t, cond):
        """The reference's eps-prediction -sigma_t s_ref(x_t|c); cond None: unconditional."""
        a, s = self.alphas_cumprod[t].sqrt(), (1 - self.alphas_cumprod[t]).sqrt()
        return -s[:, None] * self.score(x_t, a, s, cond)

    def reward(self, x0, cond):
        return self.reward_scale * x0[:, 0]  # r(x_0, c), (B,)


def make_toy_world(device="cpu"):
    # three classes on a circle of radius 2, two modes each (std 0.3), 1.2 apart horizontally
    centres = [(2 * math.cos(p), 2 * math.sin(p)) for p in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
    means = [[(x - 0.6, y), (x + 0.6, y)] for x, y in centres]
    world = ToyWorld(means, std=0.3, device=device)
    world.generator = ToyNet(world.K, use_t=False).to(device)
    world.assistant = ToyNet(world.K, use_t=True).to(device)
    return world


def energy_distance(x, y):
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (U-statistics; 0 iff same distribution)."""
    n, m = len(x), len(y)
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).sum() / (n * (n - 1))
            - torch.cdist(y, y).sum() / (m * (m - 1))).item()


def tilt_temperature(world):
    """beta, the temperature of the toy's KL term. generator_loss weights KL(p_t || q_t) by
    sigma_t / D, so the KL objective is J(p) = -alpha E_p[r] + E_t[sigma_t KL(p_t || q_t)] / D.
    For one mode q = N(m, s^2 I), a linear reward r = scale x[0] and p = q shifted by delta along
    x[0], KL(p_t || q_t) = a_t^2 delta^2 / (2 (a_t^2 s^2 + sigma_t^2)); J is minimised at
    delta = alpha scale s^2 / beta, which is exactly the tilt q exp(alpha r / beta), with
    beta = E_t[sigma_t a_t^2 s^2 / (a_t^2 s^2 + sigma_t^2)] / D, t ~ U{t_min..t_max}."""
    ab = world.alphas_cumprod[world.cfg.t_min:world.cfg.t_max + 1].double()  # a_t^2
    s2 = world.std**2
    return ((1 - ab).sqrt() * ab * s2 / (ab * s2 + 1 - ab)).mean().item() / world.means.shape[-1]


def tilted_reference(world, alpha_rew):
    """The reward-tilted reference q(x|c) exp(alpha_rew r(x) / beta) / Z, the optimum of KL-regularised
    RLHF, in closed form: with r = scale x[0] and lam = alpha_rew scale / beta, each mode N(m, s^2 I)
    becomes N(m + lam s^2 e_0, s^2 I), and its weight is multiplied by exp(lam m[0])."""
    lam = alpha_rew * world.reward_scale / tilt_temperature(world)
    means = world.means.clone()  # (K, M, 2)
    means[..., 0] += lam * world.std**2
    return means, torch.softmax(lam * world.means[..., 0].double(), -1).to(means.dtype)  # (K, M, 2), (K, M)


def sample_mixture(means, weights, std, n):
    """n samples of each class's Gaussian mixture: means (K, M, 2), weights (K, M) -> (K, n, 2)."""
    k = torch.multinomial(weights, n, replacement=True)  # (K, n) mode of each sample
    eps = torch.randn(len(means), n, 2, device=means.device, dtype=means.dtype)
    return torch.gather(means, 1, k[..., None].expand(-1, -1, 2)) + std * eps


def mode_shares(world, x):
    """Where each class's samples x (K, N, 2) sit among its reference modes, two views, (K, M)
    each: the share nearest to each mode, and the share nearest to it and within 3 std of it
    (samples pushed off the reference's support count for no mode)."""
    d = torch.cdist(x, world.means.to(x))  # (K, N, M)
    nearest = F.one_hot(d.argmin(-1), world.means.shape[1]).float()  # (K, N, M)
    on_support = (d.min(-1, keepdim=True).values <= 3 * world.std).float()  # (K, N, 1)
    return nearest.mean(1), (nearest * on_support).mean(1)


# -----------------------------------------------------------------------------
# the gradient check: each tractable loss against the quantity it stands for
# An affine Gaussian generator x_0 = mu + A z has the exact diffused score
# s_theta,t(x) = -(a^2 A A^T + s^2 I)^{-1} (x - a mu), so the intractable objectives can be
# differentiated directly: (3.3) by autograd through this score with pi_t frozen, the KL in
# closed form, minus the implicit reward (3.7) by autograd through reparameterised samples.
# Reference: a Gaussian per class (one mode), float64, one t. Monte-Carlo tolerance: the
# gradients are estimated on `n_batches` independent batches, and a loss passes when its mean
# gradient differs from the exact one by less than 4 standard errors.


def gradient_check(n=2**17, n_batches=16, t=300, c_huber=0.5, alpha_cfg=7.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dt = torch.float64
    world = ToyWorld([[(0.0, 1.0)], [(-1.0, -0.5)], [(1.0, -0.5)]], std=0.6, dtype=dt)
    ab = world.alphas_cumprod[t]
    a, s = ab.sqrt(), (1 - ab).sqrt()
    mu = torch.tensor([0.4, 0.2], dtype=dt, requires_grad=True)  # theta = (mu, A), class 0
    A = torch.tensor([[0.9, 0.3], [-0.2, 0.5]], dtype=dt, requires_grad=True)
    m0, v0 = world.means[0, 0], world.std**2

    def gen_score(x, mu, A):  # exact score of p_theta,t at these parameters
        cov = a**2 * A @ A.T + s**2 * torch.eye(2, dtype=dt)
        return -torch.linalg.solve(cov, (x - a * mu).T).T

    def log_q(x, c):
        b = len(x)
        return world.log_prob(x, a.expand(b), s.expand(b), c)

    def q_score(x, c):
        b = len(x)
        return world.score(x, a.expand(b), s.expand(b), c)

    def autograd_score(logp):  # exact score from a log density, by autograd
        def f(x):
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                return torch.autograd.grad(logp(x).sum(), x)[0]
        return f

    omega = 1 + alpha_cfg
    cls0 = lambda x: torch.zeros(len(x), dtype=torch.long)
    s_c = lambda x: q_score(x, cls0(x))
    s_u = lambda x: q_score(x, None)
    s_cfg_exact = autograd_score(lambda x: omega * log_q(x, cls0(x)) + (1 - omega) * log_q(x, None))
    s_sg = lambda x: gen_score(x, mu.detach(), A.detach())  # s_{p_sg[theta],t}

    def d(y, distance):
        sq = _dot(y, y)
        return sq if distance == "l2" else torch.sqrt(sq + c_huber**2) - c_huber

    def div_33(x_t, ref, distance):  # (3.3): d(s_theta - s_ref) at frozen samples x ~ pi_t
        x = x_t.detach()
        return d(gen_score(x, mu, A) - ref(x), distance)

    def wrong_dprime_detached(x_t, cond, ref):
        x = x_t.detach()
        return -_dot(distance_grad(s_sg(x) - ref(x), "pseudo_huber", c_huber), s_sg(x_t) - cond)

    def wrong_second_detached(x_t, cond, ref):
        return -_dot(distance_grad(s_sg(x_t) - ref(x_t), "pseudo_huber", c_huber), s_sg(x_t.detach()) - cond)

    def kl_exact(x_t):  # KL(N(a mu, S) || N(a m0, v I)) in closed form (no samples needed)
        S = a**2 * A @ A.T + s**2 * torch.eye(2, dtype=dt)
        v = a**2 * v0 + s**2
        dm = a * (mu - m0)
        kl = 0.5 * (torch.trace(S) / v + dm @ dm / v - 2 + 2 * torch.log(v) - torch.logdet(S))
        return kl.expand(len(x_t))

    def neg_implicit_reward(x_t):  # -(3.7): -log q_t(x_t|c) / q_t(x_t), through x_t
        return -(log_q(x_t, cls0(x_t)) - log_q(x_t, None))

    ph = dict(distance="pseudo_huber", c=c_huber)
    rows = [  # (name, tractable loss, exact objective, should match)
        ("eq 3.4 pseudo-Huber (Thm 3.1)", lambda x, e: score_divergence_loss(x, e, s_sg, s_c, **ph),
         lambda x: div_33(x, s_c, "pseudo_huber"), True),
        ("eq 3.4 l2 (Thm 3.1)", lambda x, e: score_divergence_loss(x, e, s_sg, s_c, distance="l2"),
         lambda x: div_33(x, s_c, "l2"), True),
        ("  wrong: x_t detached inside d'", lambda x, e: wrong_dprime_detached(x, e, s_c),
         lambda x: div_33(x, s_c, "pseudo_huber"), False),
        ("  wrong: x_t detached in 2nd s_fake", lambda x, e: wrong_second_detached(x, e, s_c),
         lambda x: div_33(x, s_c, "pseudo_huber"), False),
        ("kl_loss vs closed-form KL", lambda x, e: kl_loss(x, s_sg, s_c), kl_exact, True),
        ("cfg_reward_loss (Thm 3.2, sign -)", lambda x, e: cfg_reward_loss(x, s_c, s_u),
         neg_implicit_reward, True),
        ("  printed sign + (eqs 3.5, 3.6)", lambda x, e: -cfg_reward_loss(x, s_c, s_u),
         neg_implicit_reward, False),
        ("choice 2: cfg_score reference", lambda x, e: score_divergence_loss(
            x, e, s_sg, lambda y: cfg_score(s_c(y), s_u(y), omega), **ph),
         lambda x: div_33(x, s_cfg_exact, "pseudo_huber"), True),
        ("  printed choice 2: s_c + a s_u", lambda x, e: score_divergence_loss(
            x, e, s_sg, lambda y: s_c(y) + alpha_cfg * s_u(y), **ph),
         lambda x: div_33(x, s_cfg_exact, "pseudo_huber"), False),
    ]
    results = []
    for name, tractable, exact, should_match in rows:
        diffs, exacts = [], []
        for _ in range(n_batches):
            z = torch.randn(n // n_batches, 2, dtype=dt, generator=gen)
            eps = torch.randn(n // n_batches, 2, dtype=dt, generator=gen)
            x_t = a * (mu + z @ A.T) + s * eps  # reparameterised: carries the theta-gradient
            g_tr = torch.autograd.grad(tractable(x_t, -eps / s).mean(), (mu, A))
            x_t = a * (mu + z @ A.T) + s * eps
            g_ex = torch.autograd.grad(exact(x_t).mean(), (mu, A))
            diffs.append(torch.cat([(u - v).flatten() for u, v in zip(g_tr, g_ex)]))
            exacts.append(torch.cat([v.flatten() for v in g_ex]))
        diffs, exacts = torch.stack(diffs), torch.stack(exacts)
        g_norm = exacts.mean(0).norm()
        err = diffs.mean(0)  # (6,): 2 for mu, 4 for A
        tol = max(4 * (diffs.std(0) / math.sqrt(n_batches)).norm() / g_norm, 1e-9)  # floor: rounding
        rel = dict(all=(err.norm() / g_norm).item(), mu=(err[:2].norm() / exacts.mean(0)[:2].norm()).item(),
                   A=(err[2:].norm() / exacts.mean(0)[2:].norm()).item())
        ok = (rel["all"] <= float(tol)) == should_match
        results.append(dict(name=name, rel=rel, tol=float(tol), should_match=should_match, ok=ok))
    return results


def print_gradient_check(results):
    print("gradient check: relative error of each loss's theta-gradient vs the exact one "
          "(2-D Gaussians, float64)")
    print(f"{'loss':38s} {'mu':>8s} {'A':>8s} {'all':>8s} {'MC tol':>8s}  verdict")
    for r in results:
        verdict = ("matches" if r["should_match"] else "differs, as it should") if r["ok"] else "FAILED"
        print(f"{r['name']:38s} {r['rel']['mu']:8.4f} {r['rel']['A']:8.4f} {r['rel']['all']:8.4f} "
              f"{r['tol']:8.4f}  {verdict}")


# -----------------------------------------------------------------------------
# the SDXL world: the same interface as the toy, with SDXL's UNets, VAE, CLIP text encoders and
# a CLIP reward. Nets predict eps; scores are s = -eps_hat / sigma_t (the loop converts).

BUILTIN_PROMPTS = ["a photo of a cat sitting on a windowsill", "the skyline of New York City at dusk",
                   "a shiba inu wearing a red scarf", "a volcano exploding next to a marina",
                   "a bowl of ramen, studio lighting", "an astronaut riding a horse on the moon",
                   "a watercolor painting of a lighthouse", "a cozy cabin in a snowy forest"]


class LoadError(RuntimeError):
    pass


def hub_unreachable(e):
    """Whether e, or an error that caused it, says the hub could not be reached (or offline mode
    is on) and the files were not in the local cache. By class name, since the HTTP library under
    huggingface_hub changes (requests, httpx, httpx2): their connection errors are named so."""
    while e is not None:  # diffusers wraps the hub's error in an OSError of its own
        names = {c.__name__ for c in type(e).__mro__}
        if names & {"LocalEntryNotFoundError", "ConnectionError", "TimeoutError", "TransportError"}:
            return True
        e = e.__cause__ or e.__context__
    return False


def load(flag, value, fn, *args, **kwargs):
    """Run a from_pretrained-style loader; a failure becomes one line naming the flag."""
    try:
        return fn(*args, **kwargs)
    except LoadError:  # from a nested load, which named its own flag
        raise
    except Exception as e:  # OSError, ValueError, HFValidationError, ...: report, do not trace
        if hub_unreachable(e):
            local = "/path/to/sdxl" if flag == "pretrained" else "/path/to/unet"
            first = ("no such local path, the Hugging Face hub could not be reached and the model is "
                     f"not in the local cache; pass a local folder (--{flag}={local})")
        else:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoadError(f"cannot load --{flag}={value}: {first}") from None


def load_unet(path, **kw):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(path, subfolder=kw.pop("subfolder", None), **kw)


def load_generator(path, pretrained, variant=None, dtype=None, flag="generator_init"):
    """A one-step generator's UNet, in any form one is published in:
    "": the UNet of `pretrained`; a diffusers UNet folder, or a pipeline folder holding unet/
    (both with `variant`, e.g. fp16); a state-dict file (.bin/.pt/.pth/.safetensors), local or
    on the hub as owner/repo/path/in/repo (DMD2's tianweiy/DMD2/dmd2_sdxl_1step_unet_fp16.bin).
    A state dict's architecture is the config.json beside it if there is one (a release's unet/
    folder), else `pretrained`'s unet/config.json. Returned in `dtype` (default fp32)."""
    from diffusers import UNet2DConditionModel

    dtype = dtype or torch.float32
    if not path:
        return load("pretrained", pretrained, load_unet, pretrained, subfolder="unet",
                    variant=variant, dtype=dtype)
    if not path.endswith((".bin", ".pt", ".pth", ".safetensors")):
        sub = "unet" if os.path.isdir(os.path.join(path, "unet")) else None
        return load(flag, path, load_unet, path, subfolder=sub, variant=variant, dtype=dtype)

    def from_state_dict():
        from accelerate import init_empty_weights
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
        from safetensors.torch import load_file

        file, config = path, os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
        if not os.path.exists(path):  # owner/repo/path/in/repo
            parts = path.split("/")
            repo = "/".join(parts[:2])
            file = hf_hub_download(repo, "/".join(parts[2:]))
            try:
                config = hf_hub_download(repo, "/".join(parts[2:-1] + ["config.json"]))
            except EntryNotFoundError:  # none beside it (or offline and not cached)
                config = ""
        if os.path.isfile(config):
            config = UNet2DConditionModel.load_config(config)
        else:
            config = load("pretrained", pretrained, UNet2DConditionModel.load_config, pretrained,
                          subfolder="unet")
        if file.endswith(".safetensors"):
            sd = load_file(file)
        else:
            sd = torch.load(file, map_location="cpu", weights_only=True)
        with init_empty_weights():  # parameters on meta: no random init of weights about to go
            unet = UNet2DConditionModel.from_config(config)
        unet.load_state_dict(sd, strict=True, assign=True)  # the file's tensors become parameters
        return unet.to(dtype)

    return load(flag, path, from_state_dict)


class ClipReward(nn.Module):
    """r(x, c) = cos(CLIP_image(x), CLIP_text(c)): PickScore with PickScore_v1's CLIPModel, CLIP score
    with any other. alpha_rew multiplies this raw cosine (about 0.22 for PickScore), not the x100
    logit. The image path is differentiable: bicubic antialiased resize of the short side to the
    CLIP size, centre crop, CLIP mean/std; the text side runs under no_grad.
    model and processor: paths (hub ids or folders), or a CLIPModel and a CLIPProcessor in memory."""

    def __init__(self, model, processor, dtype=torch.float32):
        super().__init__()
        from transformers import AutoProcessor, CLIPModel

        if isinstance(processor, str):
            processor = load("reward_processor", processor, AutoProcessor.from_pretrained, processor)
        if isinstance(model, str):
            model = load("reward_model", model, CLIPModel.from_pretrained, model, dtype=dtype)
        self.tokenizer, ip = processor.tokenizer, processor.image_processor
        self.model = model.to(dtype).requires_grad_(False).eval()
        self.size = ip.size.get("shortest_edge", ip.size.get("height"))
        self.crop = (ip.crop_size["height"], ip.crop_size["width"])
        self.register_buffer("mean", torch.tensor(ip.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(ip.image_std).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def text_features(self, prompts):
        dev = self.mean.device
        # no attention mask, as in SDXL's encode_prompt: CLIP's text attention is causal and the
        # features are read at the end token, so the padding after it changes nothing
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        f = self.model.get_text_features(input_ids=tok.input_ids.to(dev))
        return F.normalize(f.pooler_output.float(), dim=-1)  # (B, P)

    def forward(self, images, text_features):
        """images (B, 3, H, W) in [0, 1], differentiable -> cosine similarity (B,)."""
        h, w = images.shape[-2:]
        scale = self.size / min(h, w)
        x = F.interpolate(images, size=(max(self.crop[0], round(h * scale)), max(self.crop[1], round(w * scale))),
                          mode="bicubic", antialias=True, align_corners=False)
        top, left = (x.shape[-2] - self.crop[0]) // 2, (x.shape[-1] - self.crop[1]) // 2
        x = x[..., top:top + self.crop[0], left:left + self.crop[1]]
        x = ((x - self.mean) / self.std).to(self.model.dtype)
        f = self.model.get_image_features(pixel_values=x).pooler_output.float()
        return (F.normalize(f, dim=-1) * text_features).sum(-1)


class SDXLWorld:
    """Algorithm 1 on SDXL. Trained in fp32 (master weights): the generator g_theta (a UNet read at
    conditioning timestep 399) and the assistant s_psi (a UNet, initialised from the reference).
    Frozen, in bf16 with --precision=bf16: the reference UNet s_ref and the reward CLIP. The VAE
    (which overflows in half precision) and the text encoders (1.6 GB, as in DMD2) stay fp32."""

    def __init__(self, cfg, device, rank=0, world_size=1, parts=None):
        """parts: the components in memory (dry_run_parts) instead of loading cfg's paths."""
        self.cfg, self.device = cfg, device
        frozen = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        # meta tensors (the dry run's plan) have no autocast; FLOP counts do not depend on precision
        self.autocast = dict(device_type="cpu" if device.type == "meta" else device.type, dtype=torch.bfloat16,
                             enabled=cfg.precision == "bf16" and device.type != "meta")
        prompts = read_prompts(cfg.prompts)
        self.prompts = prompts[rank::world_size] or prompts  # this rank's shard
        parts = parts or load_sdxl_parts(cfg, device, frozen)
        # text encoders and tokenizers through the SDXL pipeline (its encode_prompt is SDXL's
        # conditioning: penultimate hidden states of both encoders concatenated, pooled output of 2)
        self.pipe = parts["pipe"].to(device, torch.float32)  # text encoders in fp32, as DMD2
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.text_encoder.requires_grad_(False)
        self.pipe.text_encoder_2.requires_grad_(False)
        self.alphas_cumprod = parts["alphas_cumprod"].to(device)  # alphabar_t, (1000,)
        self.vae = parts["vae"].to(device, torch.float32).requires_grad_(False)
        self.s_ref = parts["s_ref"].to(device, frozen).requires_grad_(False).eval()
        self.assistant = parts["assistant"].to(device, torch.float32)
        self.generator = parts["generator"].to(device, torch.float32)
        self.reward_fn = parts["reward_fn"].to(device)
        self.reward_fn.model.to(frozen)  # its mean/std buffers stay fp32
        self.set_grad_checkpointing(cfg.grad_checkpointing)
        r, lat = cfg.resolution, cfg.resolution // 8
        self.latent_shape = (self.generator.config.in_channels, lat, lat)
        self.time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32, device=device)  # (1, 6)

    def set_grad_checkpointing(self, on):
        """Recompute activations in backward, in the frozen nets too: they sit on the generator's
        gradient path. diffusers 0.42 checkpoints whenever grad is enabled (not only in train
        mode), so the frozen s_ref in eval mode recomputes as well. --bench toggles it live."""
        for m in (self.generator, self.assistant, self.s_ref, self.vae):
            m.enable_gradient_checkpointing() if on else m.disable_gradient_checkpointing()

    def sample_cond(self, n):
        idx = torch.randint(len(self.prompts), (n,)).tolist()  # global RNG: reproducible on resume
        return self.encode([self.prompts[i] for i in idx])

    @torch.no_grad()
    def encode(self, prompts):
        emb, _, pooled, _ = self.pipe.encode_prompt(prompts, device=self.device, do_classifier_free_guidance=False)
        return dict(prompts=prompts, embeds=emb.float(), pooled=pooled.float())  # (B, 77, 2048), (B, 1280)

    def unet(self, net, x, t, cond):
        """eps_hat = net(x_t, t, c); cond None: SDXL's unconditional input, all zeros."""
        B = len(x)
        if cond is None:  # force_zeros_for_empty_prompt
            emb = torch.zeros(B, 77, self.pipe.text_encoder.config.hidden_size + self.pipe.text_encoder_2.config.hidden_size, device=x.device)
            pooled = torch.zeros(B, self.pipe.text_encoder_2.config.projection_dim, device=x.device)
        else:
            emb, pooled = cond["embeds"], cond["pooled"]
        t = torch.as_tensor(t, device=x.device).expand(B)
        with torch.autocast(**self.autocast):
            eps = net(x, t, encoder_hidden_states=emb,
                      added_cond_kwargs={"text_embeds": pooled, "time_ids": self.time_ids.expand(B, 6)}).sample
        return eps.float()

    def generate(self, g, cond, z=None):
        """The one-step generator as DMD2 and DI* read it: x_0 = (z - sigma eps_hat) / a at t = 399."""
        if z is None:
            z = torch.randn(len(cond["prompts"]), *self.latent_shape, device=self.device)  # (B, 4, R/8, R/8)
        ab = self.alphas_cumprod[self.cfg.conditioning_t]
        eps_hat = self.unet(g, z, self.cfg.conditioning_t, cond)
        return (z - (1 - ab).sqrt() * eps_hat) / ab.sqrt()  # x_0 = g_theta(z, c)

    def eps_fake(self, s_psi, x_t, t, cond):
        return self.unet(s_psi, x_t, t, cond)

    def eps_ref(self, x_t, t, cond):
        return self.unet(self.s_ref, x_t, t, cond)

    def decode(self, x0):
        with torch.autocast(self.autocast["device_type"], enabled=False):  # the VAE in fp32
            img = self.vae.decode(x0.float() / self.vae.config.scaling_factor).sample
        return (img / 2 + 0.5).clamp(0, 1)  # (B, 3, R, R) in [0, 1]

    def reward(self, x0, cond):
        # the reward's text pass runs here, so only the generator phase pays for it
        return self.reward_fn(self.decode(x0), self.reward_fn.text_features(cond["prompts"]))


def load_sdxl_parts(cfg, device, frozen):
    """SDXLWorld's components from cfg's paths, each moved to `device` as soon as it is loaded (so
    a node's CPU memory holds one net at a time per rank); frozen nets in dtype `frozen`."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline

    pipe = load("pretrained", cfg.pretrained, StableDiffusionXLPipeline.from_pretrained, cfg.pretrained,
                unet=None, vae=None, dtype=torch.float32).to(device)
    sched = load("pretrained", cfg.pretrained, DDPMScheduler.from_pretrained, cfg.pretrained, subfolder="scheduler")
    vae = load("pretrained", cfg.pretrained, AutoencoderKL.from_pretrained, cfg.pretrained, subfolder="vae").to(device)
    s_ref = load("pretrained", cfg.pretrained, load_unet, cfg.pretrained, subfolder="unet", dtype=frozen).to(device)
    assistant = load("pretrained", cfg.pretrained, load_unet, cfg.pretrained, subfolder="unet").to(device)
    generator = load_generator(cfg.generator_init, cfg.pretrained, cfg.variant or None).to(device)
    reward_fn = ClipReward(cfg.reward_model, cfg.reward_processor, frozen).to(device)
    return dict(pipe=pipe, alphas_cumprod=sched.alphas_cumprod, vae=vae, s_ref=s_ref, assistant=assistant,
                generator=generator, reward_fn=reward_fn)


def read_prompts(path):
    if not path:
        return BUILTIN_PROMPTS
    if not os.path.isfile(path):
        raise LoadError(f"--prompts={path}: no such file")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise LoadError(f"--prompts={path}: the file has no prompts (one per line)")
    return prompts


def build_tiny(root, resolution=64):
    """Tiny random SDXL-architecture components, written as the real ones are laid out:
    {root}/sdxl (a StableDiffusionXLPipeline folder) and {root}/reward (a CLIPModel + processor)."""
    with torch.random.fork_rng():  # the same tiny models every time; the caller's RNG untouched
        torch.manual_seed(0)
        return _build_tiny(root, resolution)


def offline_tokenizer():
    """A CLIP BPE tokenizer over single letters (no download): real token ids are not needed to
    build or time the models, since prompts are always padded to 77 tokens."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz,.!":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    vocab["ab</w>"] = len(vocab)  # one merge, so the BPE model is well formed
    return CLIPTokenizer(vocab=vocab, merges=[("a", "b</w>")], model_max_length=77)


def _build_tiny(root, resolution):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig,
                              CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig)

    tok = offline_tokenizer()
    text = lambda proj: CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, projection_dim=proj,
                                       max_position_embeddings=77, bos_token_id=0, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id)
    unet = UNet2DConditionModel(sample_size=resolution // 8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                cross_attention_dim=64, norm_num_groups=8, use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=32 + 6 * 8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=8, sample_size=resolution, scaling_factor=0.13025)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(text(32)), tokenizer=tok,
                                     text_encoder_2=CLIPTextModelWithProjection(text(32)), tokenizer_2=tok,
                                     unet=unet, scheduler=sched)
    pipe.save_pretrained(os.path.join(root, "sdxl"))
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    clip = CLIPModel(CLIPConfig(text_config=text(16).to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    clip.save_pretrained(os.path.join(root, "reward"))
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    proc.save_pretrained(os.path.join(root, "reward"))
    return os.path.join(root, "sdxl"), os.path.join(root, "reward")


# -----------------------------------------------------------------------------
# the full-size dry run: the real architectures with random weights, nothing downloaded
# The configs are those of stabilityai/stable-diffusion-xl-base-1.0 (unet/, vae/, text_encoder/,
# text_encoder_2/config.json, less the fields that equal the library defaults) and of
# yuvalkirstain/PickScore_v1 (a CLIP ViT-H/14); a test checks the parameter counts against the
# published ones. On a GPU the dry run times a few real steps of `train`; anywhere, it builds the
# same world on the meta device (shapes and dtypes, no memory) to plan memory per device and to
# count the model FLOPs of a step.

SDXL_UNET = dict(  # 2,567,463,684 parameters
    sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)  # 2816 = 1280 pooled + 6 time ids x 256
SDXL_VAE = dict(  # 83,653,863
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=1024,
    scaling_factor=0.13025)
SDXL_TEXT_ENCODER = dict(  # CLIP ViT-L/14 text tower: 123,060,480
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    projection_dim=768, hidden_act="quick_gelu")
SDXL_TEXT_ENCODER_2 = dict(  # OpenCLIP ViT-bigG/14 text tower with its projection: 694,659,840
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    projection_dim=1280, hidden_act="gelu")
PICKSCORE = dict(  # CLIP ViT-H/14: 986,109,441
    text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, hidden_act="gelu"),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="gelu"),
    projection_dim=1024)
# dense bf16 tensor-core peak per GPU, TFLOPS (NVIDIA data sheets), the denominator of MFU;
# the first name contained in torch.cuda.get_device_name() wins; --peak_tflops overrides
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


def dry_run_parts(device):
    """SDXLWorld's components with the real architectures and random weights, built on `device`
    directly: no download, no CPU initialisation (minutes at this size), nothing at all on meta.
    The three UNets start equal, as with --generator_init="". Frozen nets are cast by SDXLWorld."""
    import copy

    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig,
                              CLIPTextModel, CLIPTextModelWithProjection)

    tok = offline_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET)
        text_encoders = dict(text_encoder=CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER, **ids)),
                             text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2, **ids)))
        clip = CLIPModel(CLIPConfig(**{**PICKSCORE, "text_config": {**PICKSCORE["text_config"], **ids}}))
        parts = dict(vae=AutoencoderKL(**SDXL_VAE), s_ref=unet, assistant=copy.deepcopy(unet),
                     generator=copy.deepcopy(unet))
    pipe = StableDiffusionXLPipeline(vae=None, unet=None, scheduler=None, tokenizer=tok, tokenizer_2=tok,
                                     **text_encoders)
    # CLIPImageProcessor's defaults are CLIP-H's preprocessing: 224 px, OpenAI CLIP mean and std
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tok)
    return dict(parts, pipe=pipe, alphas_cumprod=sdxl_alphas_cumprod(), reward_fn=ClipReward(clip, proc))


def param_bytes(*nets):
    return sum(p.numel() * p.element_size() for net in nets for p in net.parameters())


def memory_plan(world, n_gpus, zero):
    """Memory per GPU before activations, from the world's parameter counts and dtypes, for
    `train` on n_gpus ranks: [(item, bytes)]. AdamW keeps two states per trained weight in its
    dtype (fp32), 1/n_gpus of them per rank with --zero (ZeroRedundancyOptimizer splits whole
    tensors, so ranks differ by up to a tensor). Gradients: alone, one trained net's at a time
    (train frees them after each update); under DDP both nets' gradient buckets persist (the
    gradients are views into them). Fused AdamW needs no whole-net scratch. Activations are not in
    it: the GPU run measures them."""
    g, psi, te = world.generator, world.assistant, (world.pipe.text_encoder, world.pipe.text_encoder_2)
    shard = n_gpus if zero and n_gpus > 1 else 1
    one_net = max(param_bytes(g), param_bytes(psi))
    dt = lambda net: str(next(net.parameters()).dtype).removeprefix("torch.")
    return [
        (f"generator + assistant weights ({dt(g)} masters)", param_bytes(g, psi)),
        ("AdamW states of both, 2 per weight" + (f", 1/{shard} with --zero" if shard > 1 else ""),
         2 * param_bytes(g, psi) // shard),
        ("gradients: DDP buckets of both nets" if n_gpus > 1 else "gradients of one net at a time",
         param_bytes(g, psi) if n_gpus > 1 else one_net),
        (f"reference UNet ({dt(world.s_ref)})", param_bytes(world.s_ref)),
        (f"text encoders ({dt(te[0])})", param_bytes(*te)),
        (f"reward CLIP ({dt(world.reward_fn.model)})", param_bytes(world.reward_fn.model)),
        (f"VAE ({dt(world.vae)})", param_bytes(world.vae)),
    ]


def step_flops(world, batch_size):
    """Model FLOPs of one assistant update and of one generator update (prompt encoding, forward
    and backward; not the optimizer), as torch's FlopCounterMode counts them (matmuls and
    convolutions). On a meta world this costs no memory at any size, only time: every op is
    dispatched in Python, about half a minute of CPU at full size. Attention is forced to the math
    kernel, whose two matmuls the counter sees on every device (it has no formula for the CPU flash
    kernel). Counted with --grad_checkpointing, recompute is included."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    def count(step):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            step()
        return counter.get_total_flops()

    flops = dict(assistant=count(lambda: assistant_loss(world, world.assistant, world.sample_cond(batch_size)).backward()),
                 generator=count(lambda: generator_backward(world, world.generator, world.sample_cond(batch_size))))
    for net in (world.generator, world.assistant):
        net.zero_grad(set_to_none=True)
    return flops


def peak_tflops(cfg, device):
    if cfg.peak_tflops:
        return cfg.peak_tflops
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)


def dry_run_figures(history, flops_per_step, batch_size, peak):
    """train's per-step metrics -> seconds per step (median; step 1, the warm-up, left out),
    images per second per GPU, peak memory (GiB, all steps) and MFU (None without a peak)."""
    sec = statistics.median(r["sec_assistant"] + r["sec_generator"] for r in history[1:])
    return dict(sec_per_step=sec, images_per_s=batch_size / sec,
                peak_mem_gib=max(max(r["mem_assistant_gb"], r["mem_generator_gb"]) for r in history),
                tflops_per_s=flops_per_step / sec / 1e12, mfu=flops_per_step / sec / (peak * 1e12) if peak else None)


def run_dry_run(cfg, dist_info):
    rank, world_size, device = dist_info
    cfg = replace(cfg, log_interval=1)  # every step is timed
    per_step = 0
    if rank == 0:  # the plan and the FLOPs on meta: shapes and dtypes only
        n_gpus = cfg.world_size_plan or world_size
        # no checkpointing on meta (the worlds share parts): recompute is not model FLOPs
        meta_cfg = replace(cfg, grad_checkpointing=False)
        parts = dry_run_parts("meta")
        meta = SDXLWorld(meta_cfg, torch.device("meta"), parts=parts)
        plan = memory_plan(meta, n_gpus, cfg.zero)
        n = lambda net: f"{sum(p.numel() for p in net.parameters()):,}"
        print(f"dry run: SDXL-base UNet {n(meta.s_ref)} parameters (x3: generator, assistant, reference), "
              f"VAE {n(meta.vae)}, text encoders {n(meta.pipe.text_encoder)} + {n(meta.pipe.text_encoder_2)}, "
              f"reward CLIP-H {n(meta.reward_fn.model)}; random weights, nothing downloaded")
        print(f"memory per GPU before activations, {n_gpus} GPU(s), --precision={cfg.precision}"
              + (", --zero" if cfg.zero and n_gpus > 1 else "") + " (GiB = 2^30 bytes):")
        for item, b in plan:
            print(f"  {item:62s} {b / 2**30:7.2f}")
        print(f"  {'total':62s} {sum(b for _, b in plan) / 2**30:7.2f}")
        # FLOPs in fp32: meta has no autocast, and precision does not change them
        meta = SDXLWorld(replace(meta_cfg, precision="fp32"), torch.device("meta"), parts=parts)
        flops = step_flops(meta, cfg.batch_size)
        per_step = cfg.assistant_steps * flops["assistant"] + flops["generator"]
        print(f"model FLOPs per GPU, batch {cfg.batch_size}, {cfg.resolution}x{cfg.resolution}: assistant update "
              f"{flops['assistant'] / 1e12:.1f} TFLOP, generator update {flops['generator'] / 1e12:.1f} TFLOP, "
              f"step ({cfg.assistant_steps} + 1 updates) {per_step / 1e12:.1f} TFLOP")
        del parts, meta
        if device.type != "cuda":
            print("no GPU here, so no seconds per step, images per second, peak memory, MFU"
                  + (" or cost table" if cfg.bench else "") + "; on GPUs, e.g.:\n"
                  "  torchrun --standalone --nproc_per_node=8 distar.py --dry_run --zero --grad_checkpointing")
    if device.type != "cuda":
        return
    world = SDXLWorld(cfg, device, rank, world_size, parts=dry_run_parts(device))
    if cfg.bench:  # the full-size cost table instead of the step timing
        return bench(world, device)
    measure_steps(world, dist_info, per_step)


def measure_steps(world, dist_info, flops_per_step):
    """The dry run's measurement: train (with cfg.dry_run it writes nothing), then rank 0 prints
    and returns the figures. Any device; MFU needs a known peak (a GPU, or --peak_tflops)."""
    cfg = world.cfg
    rank, world_size, device = dist_info
    try:
        history = train(world, dist_info)
    except torch.cuda.OutOfMemoryError:
        raise SystemExit(f"dry run: out of GPU memory (peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
                         f" of {torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB); try "
                         "--grad_checkpointing, a smaller --batch_size, or more GPUs with --zero") from None
    if rank != 0:
        return None
    peak = peak_tflops(cfg, device)
    fig = dry_run_figures(history, flops_per_step, cfg.batch_size, peak)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    mfu = f"{fig['mfu']:.1%} of {peak:.0f} TFLOPS" if fig["mfu"] is not None else "unknown peak: pass --peak_tflops"
    print(f"measured on {world_size} x {name}, --precision={cfg.precision}"
          + (", --grad_checkpointing" if cfg.grad_checkpointing else "") + (", --zero" if cfg.zero else "")
          + f", batch {cfg.batch_size} per GPU, median of steps 2-{cfg.max_steps}:")
    print(f"  seconds per step {fig['sec_per_step']:.3g}, images per second per GPU {fig['images_per_s']:.3g}, "
          f"peak memory {fig['peak_mem_gib']:.1f} GiB, {fig['tflops_per_s']:.3g} TFLOPS, MFU {mfu}")
    return fig


# -----------------------------------------------------------------------------
# the alternating loop (Algorithm 1), written once and given a world
# A world holds .generator and .assistant (the trained nets), .alphas_cumprod, and
# sample_cond(n), generate(g, cond), eps_fake(s_psi, x_t, t, cond), eps_ref(x_t, t, cond or
# None), reward(x_0, cond). Nets predict eps; scores are s = -eps / sigma_t.
#
# w(t) and c, which the paper leaves open: we put the distance on the eps scale,
# d_t(y) = d(sigma_t y), which is a proper distance at every t, so Theorem 3.1 still holds, and
# choose w so that every divergence reads per element, whatever the resolution. With
# Delta = eps_psi - eps_ref (D elements per sample):
#   l2:           ||Delta||^2 / D                                  (per-element MSE), w = 1 / D
#   pseudo-Huber: (sqrt(||Delta||^2 + c^2) - c) / sqrt(D)
#                 = sqrt(||Delta||^2 / D + huber_c^2) - huber_c    (per-element RMS), w = 1/sqrt(D)
# with c = huber_c sqrt(D). d' of pseudo-Huber has norm <= 1, so 1/D would shrink it by a further
# sqrt(D) (about 180x from the toy to SDXL at 1024^2); 1/sqrt(D) keeps its x_0-gradient scaling
# with D as l2's and KL's do, so alpha_rew's balance carries from the toy to SDXL.
# In score space d_t'(y) = sigma_t d'(y; c/sigma_t) (pseudo-Huber) or sigma_t^2 d'(y) (l2).
# KL and the CFG reward take the eps-scale weight sigma_t / D, so their gradient per element is
# a_t (eps_ref - eps_psi) / D; the assistant's DSM weight lambda(t) = sigma_t^2 / D is the usual
# eps-prediction MSE.


def diffuse(world, x0):
    """t ~ U{t_min..t_max}, eps ~ N(0, I), x_t = a_t x_0 + sigma_t eps (shapes (B, 1, ...))."""
    cfg = world.cfg
    t = torch.randint(cfg.t_min, cfg.t_max + 1, (len(x0),), device=x0.device)
    ab = world.alphas_cumprod[t].view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    a_t, sigma_t = ab.sqrt(), (1 - ab).sqrt()
    eps = torch.randn_like(x0)
    return t, a_t * x0 + sigma_t * eps, eps, sigma_t


def assistant_loss(world, s_psi, cond):
    """Algorithm 1, assistant phase: DSM (eq. 2.2) on the frozen generator's samples."""
    with torch.no_grad():
        x0 = world.generate(world.generator, cond)  # theta frozen
    t, x_t, eps, sigma_t = diffuse(world, x0)
    D = x0[0].numel()
    score_psi = -world.eps_fake(s_psi, x_t, t, cond) / sigma_t  # s_psi(x_t, t, c)
    return dsm_loss(score_psi, -eps / sigma_t, weight=sigma_t.flatten() ** 2 / D).mean()


def generator_loss(world, g, cond):
    """Algorithm 1, generator phase: -alpha_rew r + eq. 3.4 (or KL) + the CFG term (eq. 3.5).
    Returns the loss and its terms; terms["x0"] is x_0 = g_theta(z, c), where the terms meet."""
    cfg = world.cfg
    x0 = world.generate(g, cond)  # x_0 = g_theta(z, c)
    t, x_t, eps, sigma_t = diffuse(world, x0)  # x_t carries the theta-gradient
    D, sig = x0[0].numel(), sigma_t.flatten()
    score = lambda eps_hat: -eps_hat / sigma_t
    s_fake = lambda x: score(world.eps_fake(world.assistant, x, t, cond))  # s_psi, unwrapped
    s_c = lambda x: score(world.eps_ref(x, t, cond))  # s_ref(x_t | t, c)
    s_u = lambda x: score(world.eps_ref(x, t, None))  # s_ref(x_t | t, empty)
    s_ref = s_c
    if cfg.cfg == "in" and cfg.alpha_cfg != 0:  # choice 2: CFG-enhanced reference
        s_ref = lambda x: cfg_score(s_c(x), s_u(x), 1 + cfg.alpha_cfg)
    if cfg.divergence == "kl":
        loss_div = kl_loss(x_t, s_fake, s_ref, weight=sig / D)
    elif cfg.divergence == "pseudo_huber":  # w = sigma_t / sqrt(D): see the comment above diffuse
        loss_div = score_divergence_loss(x_t, -eps / sigma_t, s_fake, s_ref, "pseudo_huber",
                                         c=cfg.huber_c * math.sqrt(D) / sig, weight=sig / math.sqrt(D))
    else:
        loss_div = score_divergence_loss(x_t, -eps / sigma_t, s_fake, s_ref, "l2", weight=sig**2 / D)
    loss_cfg = torch.zeros_like(loss_div)
    if cfg.cfg == "out" and cfg.alpha_cfg != 0:  # choice 1: implicit CFG reward (Thm 3.2)
        loss_cfg = cfg.alpha_cfg * cfg_reward_loss(x_t, s_c, s_u, weight=sig / D)
    with torch.set_grad_enabled(cfg.alpha_rew != 0):  # no reward backward when it has no weight
        reward = world.reward(x0, cond)  # r(x_0, c), (B,)
    loss_rew = -cfg.alpha_rew * reward
    loss = (loss_rew + loss_div + loss_cfg).mean()
    return loss, dict(loss_rew=loss_rew.mean(), loss_div=loss_div.mean(), loss_cfg=loss_cfg.mean(),
                      reward=reward.mean().detach(), x0=x0)


def generator_backward(world, g, cond):
    """The generator phase's loss and backward: psi's parameters frozen (no gradient), its input
    not (the loss back-propagates through it). Each term's gradient on x_0 is taken on its own,
    then their sum goes back through g_theta: the same work as one backward, and the norms are
    the balance of reward, divergence and CFG that alpha_rew sets."""
    world.assistant.requires_grad_(False)
    try:
        loss, terms = generator_loss(world, g, cond)
        x0 = terms.pop("x0")
        grad_x0 = torch.zeros_like(x0)
        for k in ("rew", "div", "cfg"):
            term = terms[f"loss_{k}"]
            g_k = (torch.autograd.grad(term, x0, retain_graph=True)[0] if term.requires_grad
                   else torch.zeros_like(x0))  # (B, C, H, W)
            terms[f"x0grad_{k}"] = g_k.norm()
            grad_x0 += g_k
        x0.backward(grad_x0)
    finally:
        world.assistant.requires_grad_(True)
    return loss.detach(), {k: v.detach() for k, v in terms.items()}  # the graphs go here


def make_optimizer(cfg, params, lr):
    # fused: one kernel per step, no whole-net scratch such as foreach's sqrt(v)
    adamw = dict(lr=lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, fused=True)
    if cfg.zero and dist.is_initialized():  # each rank keeps 1/world_size of the Adam states
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, **adamw)
    return torch.optim.AdamW(params, **adamw)


class NonFiniteError(RuntimeError):
    pass


def clip_and_step(opt, net, loss, grad_clip, world_size):
    """Clip the gradient norm and step, unless the loss or the norm is NaN/Inf on any rank (bf16
    overflow, a bad batch): then skip the update on every rank, so the ranks stay identical and
    the weights finite. Returns (grad norm, skipped)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    bad = (~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm)).float()  # on the device
    if world_size > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    skip = bool(bad.item())
    if not skip:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm, skip


def clock(device):
    """Seconds, after the GPU has finished what was queued (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # CPU: the process's peak resident set (KiB on Linux)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def train(world, dist_info):
    """Alternate K_TA assistant updates and one generator update (Algorithm 1)."""
    cfg = world.cfg
    rank, world_size, device = dist_info
    g, s_psi = world.generator, world.assistant  # fp32 master weights
    # gradients as views into DDP's buckets: without it DDP keeps a second fp32 copy of them
    wrap = (lambda m: DDP(m, gradient_as_bucket_view=True)) if world_size > 1 else (lambda m: m)
    g_ddp, s_psi_ddp = wrap(g), wrap(s_psi)  # DDP only on the two trained nets
    opt_g, opt_psi = make_optimizer(cfg, g.parameters(), cfg.lr_g), make_optimizer(cfg, s_psi.parameters(), cfg.lr_psi)
    start = load_checkpoint(cfg, world, opt_g, opt_psi, dist_info) if cfg.resume else 0
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps,
               disable=None if rank == 0 else True, dynamic_ncols=True)
    writes = not cfg.dry_run  # a dry run times steps and writes nothing
    history = []  # the logged metrics, returned
    skipped, in_a_row = 0, dict(g=0, psi=0)  # skips since the last log line; each net's streak

    def update(opt, net, loss, name):
        nonlocal skipped
        grad_norm, skip = clip_and_step(opt, net, loss, cfg.grad_clip, world_size)
        skipped, in_a_row[name] = skipped + skip, (in_a_row[name] + 1) * skip
        if in_a_row[name] >= cfg.max_skips:  # weights still finite: no checkpoint holds bad ones
            raise NonFiniteError(f"{in_a_row[name]} {name} updates in a row had a non-finite loss or "
                                 f"gradient (step {step + 1}); stopping. Try lower learning rates")
        return grad_norm

    for step in bar:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # assistant phase: freeze theta, K_TA DSM updates of psi (eq. 2.2)
        t0 = clock(device)
        loss_psi = torch.zeros((), device=device)
        for _ in range(cfg.assistant_steps):
            loss_psi = assistant_loss(world, s_psi_ddp, world.sample_cond(cfg.batch_size))
            loss_psi.backward()
            update(opt_psi, s_psi, loss_psi, "psi")  # also frees psi's grads before the generator phase
        mem_psi, t1 = peak_memory_gb(device), clock(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # generator phase: freeze psi (its parameters, not its input), one update of theta
        loss_g, terms = generator_backward(world, g_ddp, world.sample_cond(cfg.batch_size))
        grad_norm = update(opt_g, g, loss_g, "g")
        t2 = clock(device)
        if (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.max_steps:
            metrics = all_reduce_mean(dict(loss_g=loss_g, **terms, loss_psi=loss_psi.detach(),
                                           grad_norm=grad_norm), world_size, device)
            metrics.update(step=step + 1, skipped=skipped, sec_assistant=(t1 - t0),
                           sec_generator=(t2 - t1), mem_assistant_gb=mem_psi,
                           mem_generator_gb=peak_memory_gb(device))
            skipped = 0
            bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k != "step"}, refresh=False)
            history.append(metrics)
            if rank == 0 and not cfg.toy and writes:
                with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(metrics) + "\n")
        if not cfg.toy and writes and ((step + 1) % cfg.sample_interval == 0 or step + 1 == cfg.max_steps) and rank == 0:
            save_sample_grid(world, os.path.join(cfg.out_dir, f"samples-{step + 1:06d}.png"))
        if writes and ((step + 1) % cfg.ckpt_interval == 0 or step + 1 == cfg.max_steps):
            save_checkpoint(cfg, step + 1, world, opt_g, opt_psi, dist_info)
    for net in (g, s_psi):
        assert_ranks_in_sync(net, world_size)
    return history


@torch.no_grad()
def save_sample_grid(world, path, n=4):
    """Fixed prompts and fixed noise, so grids from different steps are comparable."""
    from PIL import Image

    gen = torch.Generator().manual_seed(1234)
    z = torch.randn(n, *world.latent_shape, generator=gen).to(world.device)
    cond = world.encode([BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)] for i in range(n)])
    img = world.decode(world.generate(world.generator, cond, z))  # (n, 3, R, R)
    grid = (img.permute(0, 2, 3, 1).reshape(-1, img.shape[-1], 3) * 255).round().byte()  # stacked vertically
    grid = grid.view(n, img.shape[-2], img.shape[-1], 3).permute(1, 0, 2, 3).reshape(img.shape[-2], -1, 3)
    Image.fromarray(grid.cpu().numpy()).save(path)  # one row of n images


# -----------------------------------------------------------------------------
# the cost table (--bench): what one generator step costs with each divergence, and what one
# assistant step costs, with and without gradient checkpointing, as ratios to the KL generator
# step. A step here is the loss and its backward, exactly as train runs them (psi frozen in the
# generator step); gradient clipping and the AdamW update are left out: they cost the same for
# every divergence and would change the weights. The world is built once and its own nets are
# timed; checkpointing is toggled on them in place, and the weights are never updated.


def bench(world, device):
    """Time every variant, interleaved (each repetition runs all of them, in an order rotated by
    one, so drift and position hit all alike), warm-up repetitions dropped, medians. A variant
    that runs out of GPU memory is reported as such and the others go on. Prints the table and
    writes {out_dir}/bench.json; returns its rows."""
    cfg = world.cfg
    g, s_psi, cuda = world.generator, world.assistant, device.type == "cuda"
    variants = [(div, ckpt) for ckpt in (False, True) for div in ("pseudo_huber", "l2", "kl", None)]  # None: assistant
    times, peaks, oom = {v: [] for v in variants}, dict.fromkeys(variants, 0.0), set()
    for rep in range(cfg.bench_warmup + cfg.bench_reps):
        k = rep % len(variants)
        for v in [v for v in variants[k:] + variants[:k] if v not in oom]:
            div, ckpt = v
            world.cfg = replace(cfg, divergence=div or cfg.divergence)
            world.set_grad_checkpointing(ckpt)
            cond = world.sample_cond(cfg.batch_size)  # prompt encoding is not part of the step
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            try:
                t0 = time.perf_counter()
                if div:  # the generator step of train
                    generator_backward(world, g, cond)
                else:  # the assistant step of train (one DSM update)
                    assistant_loss(world, s_psi, cond).backward()
                if cuda:
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t0
            except torch.cuda.OutOfMemoryError:
                oom.add(v)
            finally:
                g.zero_grad(set_to_none=True)
                s_psi.zero_grad(set_to_none=True)
            if rep >= cfg.bench_warmup and v not in oom:
                times[v].append(dt * 1000)
                peaks[v] = max(peaks[v], peak_memory_gb(device))
    world.cfg = cfg
    world.set_grad_checkpointing(cfg.grad_checkpointing)
    med = {v: None if v in oom else statistics.median(times[v]) for v in variants}
    base = med[("kl", False)]
    rows = [dict(step="generator" if v[0] else "assistant", divergence=v[0], grad_checkpointing=v[1], ms=med[v],
                 ratio=med[v] / base if med[v] and base else None, peak_gb=peaks[v] if cuda and med[v] else None,
                 ms_reps=times[v]) for v in variants]
    name = torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"cost of one step on {name}, {cfg.precision}, {cfg.resolution}x{cfg.resolution}, batch {cfg.batch_size}, "
          f"--cfg={cfg.cfg}: median of {cfg.bench_reps} after {cfg.bench_warmup} warm-up, interleaved")
    print(f"{'step':10s} {'divergence':12s} {'checkpointing':>13s} {'ms':>9s} {'/ KL gen':>9s}"
          + (f" {'peak GB':>8s}" if cuda else ""))
    for r in rows:
        ms, ratio = (f"{r['ms']:.1f}", f"{r['ratio']:.2f}x") if r["ms"] else ("out of memory", "-")
        print(f"{r['step']:10s} {r['divergence'] or '-':12s} {'on' if r['grad_checkpointing'] else 'off':>13s} "
              f"{ms:>9s} {ratio if base else '-':>9s}" + (f" {r['peak_gb']:8.2f}" if r["peak_gb"] else ""))
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "bench.json"), "w") as f:
        json.dump(dict(device=name, config=asdict(cfg), rows=rows), f, indent=1)
    print(f"wrote {cfg.out_dir}/bench.json")
    return rows


# -----------------------------------------------------------------------------
# distributed setup

DIST_TIMEOUT = datetime.timedelta(hours=1)


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; nccl on GPUs, gloo on CPU. The timeout covers
    rank 0 writing a ~60 GB SDXL checkpoint while the others wait at a barrier (NCCL's default,
    10 minutes, does not)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=DIST_TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), device


def assert_ranks_in_sync(net, world_size):
    """DDP must keep every rank's copy identical: compare per-tensor fingerprints with rank 0's."""
    if world_size == 1:
        return
    fp = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                      for p in net.parameters()])  # (n_tensors, 2); exact copies give exact equality
    ref = fp.clone()
    dist.broadcast(ref, 0)
    diff = (fp - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if diff > 0:
        raise RuntimeError(f"ranks out of sync: parameter fingerprints differ by {diff.item():.3g}")


def all_reduce_mean(metrics, world_size, device):
    """Scalars averaged over ranks. The tensor lives on the device: NCCL takes only CUDA tensors."""
    vals = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in metrics.values()])
    if world_size > 1:
        dist.all_reduce(vals)
        vals /= world_size
    return dict(zip(metrics, vals.tolist()))


# -----------------------------------------------------------------------------
# checkpoints: {out_dir}/checkpoint-{step:06d}/ with generator/ and assistant/ (diffusers UNet
# folders, safetensors), optimizers.pt, rng.safetensors and state.json (step, config).
# Rank 0 writes everything into a hidden temporary folder and renames it into place: a crash or
# SIGKILL mid-save leaves only the temporary folder, which resume ignores, and never touches an
# earlier checkpoint. optimizers.pt is torch.save of the two optimizers' state dicts, read back
# with weights_only=True: tensors and plain containers only, never code.
# An out_dir holds one run: --resume continues it; a fresh run refuses it (SDXL, unless --overwrite)
# or starts it over (the demos): check_out_dir, start_out_dir.

CKPT_RE = r"checkpoint-\d{6}"
# what a run writes into out_dir, and so what starting over removes; {out_dir}/tiny is a cache of
# the tiny random models (deterministic), shared by every run there, and stays
RUN_OUTPUTS = {"checkpoint": CKPT_RE, "unfinished checkpoint": r"\.tmp-checkpoint-\d{6}(\.old)?",
               "metrics.jsonl": r"metrics\.jsonl", "sample grid": r"samples-\d{6}\.png",
               "toy.png": r"toy\.png", "toy_samples.safetensors": r"toy_samples\.safetensors"}


def save_net(net, path):
    if hasattr(net, "save_pretrained"):  # diffusers UNet: config.json + safetensors shards
        net.save_pretrained(path, safe_serialization=True)
    else:  # toy MLP
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, os.path.join(path, "model.safetensors"))


def load_net(net, path):
    from safetensors.torch import load_file

    sd = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            sd.update(load_file(os.path.join(path, name)))
    net.load_state_dict(sd)


def save_checkpoint(cfg, step, world, opt_g, opt_psi, dist_info):
    from safetensors.torch import save_file

    rank, world_size, device = dist_info
    opt_states = {}
    for name, opt in (("opt_g", opt_g), ("opt_psi", opt_psi)):
        if hasattr(opt, "consolidate_state_dict"):  # ZeRO: gather the shards on rank 0
            opt.consolidate_state_dict(to=0)
        if rank == 0:
            opt_states[name] = opt.state_dict()
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    rngs = [rng]
    if world_size > 1:
        rngs = [None] * world_size
        dist.all_gather_object(rngs, rng)
    if rank == 0:
        final = os.path.join(cfg.out_dir, f"checkpoint-{step:06d}")
        tmp = os.path.join(cfg.out_dir, f".tmp-checkpoint-{step:06d}")
        shutil.rmtree(tmp, ignore_errors=True)
        save_net(world.generator, os.path.join(tmp, "generator"))
        save_net(world.assistant, os.path.join(tmp, "assistant"))
        torch.save(opt_states, os.path.join(tmp, "optimizers.pt"))
        save_file({f"{kind}/{r}": s.cpu() for r, st in enumerate(rngs) for kind, s in st.items()},
                  os.path.join(tmp, "rng.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w") as f:  # written last
            json.dump(dict(step=step, world_size=world_size, config=asdict(cfg)), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):  # the same step saved again: swap, then drop the old copy
            os.rename(final, tmp + ".old")
        os.rename(tmp, final)  # atomic: the checkpoint appears complete or not at all
        shutil.rmtree(tmp + ".old", ignore_errors=True)
        for old in list_checkpoints(cfg.out_dir)[:-cfg.keep_checkpoints]:
            shutil.rmtree(old)
    del opt_states
    for opt in (opt_g, opt_psi):  # ZeRO keeps the gathered states of all ranks on rank 0's CPU
        if hasattr(opt, "_all_state_dicts"):  # until the next save (~40 GB at full size): drop them
            opt._all_state_dicts = []
    if world_size > 1:
        dist.barrier()  # rank 0 saves, then everyone goes on


def list_checkpoints(out_dir):
    import re

    if not os.path.isdir(out_dir):
        return []
    names = sorted(d for d in os.listdir(out_dir) if re.fullmatch(CKPT_RE, d)
                   and os.path.isfile(os.path.join(out_dir, d, "state.json")))
    return [os.path.join(out_dir, d) for d in names]


def check_out_dir(cfg):
    """A fresh SDXL run refuses an out_dir that holds another run's checkpoints, before it loads
    or writes anything: each checkpoint stands for GPU hours, a fresh run there would prune them
    (or its own, which have lower steps), and a later --resume would continue the wrong run."""
    ckpts = list_checkpoints(cfg.out_dir)
    if ckpts and not (cfg.resume or cfg.overwrite or cfg.toy or cfg.tiny):
        raise LoadError(f"{cfg.out_dir} holds checkpoints of another run (newest {ckpts[-1]}): "
                        "pass --resume to continue it, or --overwrite to start over")


def start_out_dir(cfg, dist_info):
    """Make out_dir hold this run only. A run that does not continue a checkpoint there (a fresh
    one, or --resume with none to continue) removes what an earlier run wrote: the demos (--toy,
    --tiny) always, SDXL with --overwrite (check_out_dir refused otherwise) or when the earlier
    run left no complete checkpoint. Rank 0 removes, the others wait."""
    import re

    rank, world_size, _ = dist_info
    if rank == 0:
        os.makedirs(cfg.out_dir, exist_ok=True)
        if not (cfg.resume and list_checkpoints(cfg.out_dir)):
            removed = {}
            for name in sorted(os.listdir(cfg.out_dir)):
                kind = next((k for k, pat in RUN_OUTPUTS.items() if re.fullmatch(pat, name)), None)
                if kind is None:
                    continue
                path = os.path.join(cfg.out_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
                removed[kind] = removed.get(kind, 0) + 1
            if removed:
                what = [k if "." in k else f"{n} {k}{'s' * (n > 1)}" for k, n in removed.items()]
                what = ", ".join(what[:-1]) + " and " + what[-1] if len(what) > 1 else what[0]
                print(f"starting over in {cfg.out_dir}: removed {what} of an earlier run "
                      "(--resume continues a run)")
    if world_size > 1:
        dist.barrier()


def _logged_step(line):
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):  # an empty line, or one cut short by a kill
        return math.inf


def load_checkpoint(cfg, world, opt_g, opt_psi, dist_info):
    """Restore the newest complete checkpoint in out_dir; returns the step to continue from."""
    from safetensors.torch import load_file

    rank, world_size, device = dist_info
    ckpts = list_checkpoints(cfg.out_dir)
    if not ckpts:
        if rank == 0:
            print(f"resume: no complete checkpoint in {cfg.out_dir}; starting at step 0")
        return 0
    path = ckpts[-1]
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    load_net(world.generator, os.path.join(path, "generator"))
    load_net(world.assistant, os.path.join(path, "assistant"))
    # On the CPU and memory-mapped: a page of the file is read only when its tensor is copied.
    # AdamW copies every state to its parameter's device (its step counter stays on the CPU);
    # under --zero each rank copies only the states of the parameters it owns, so no GPU ever
    # holds more than its shard.
    opt_file = os.path.join(path, "optimizers.pt")
    opt_states = torch.load(opt_file, map_location="cpu", weights_only=True, mmap=True)
    for name, opt, lr in (("opt_g", opt_g, cfg.lr_g), ("opt_psi", opt_psi, cfg.lr_psi)):
        opt.load_state_dict(opt_states[name])
        if hasattr(opt, "consolidate_state_dict"):  # ZeRO's load also casts the rank's shard into
            opt.state.clear()  # the wrapper's own .state, a second copy that step never reads
        for group in opt.param_groups:  # the command line wins over the saved hyperparameters
            group.update(lr=lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    rng = load_file(os.path.join(path, "rng.safetensors"))
    if state["world_size"] == world_size:  # each rank continues its own random stream
        torch.set_rng_state(rng[f"cpu/{rank}"])
        if device.type == "cuda" and f"cuda/{rank}" in rng:
            torch.cuda.set_rng_state(rng[f"cuda/{rank}"], device)
    elif rank == 0:
        print(f"resume: saved with {state['world_size']} ranks, running {world_size}: fresh random streams")
    metrics = os.path.join(cfg.out_dir, "metrics.jsonl")
    if rank == 0 and os.path.isfile(metrics):  # drop the lines logged after the checkpoint: they
        with open(metrics) as f:  # are logged again, so each step has one line
            lines = [line for line in f if _logged_step(line) <= state["step"]]
        with open(metrics + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(metrics + ".tmp", metrics)
    if rank == 0:
        print(f"resumed from {path} (step {state['step']})")
    return state["step"]


# -----------------------------------------------------------------------------
# toy mode: gradient check, Algorithm 1, evaluation and a picture


TOY_COLOURS = [(214, 39, 40), (31, 119, 180), (44, 160, 44)]  # class 0, 1, 2


def _scatter(draw, left, top, size, layers, lim):
    """Draw point sets [(points (N, 2), colour), ...] in order into the square panel of the plane
    [-lim, lim]^2 whose top-left pixel is (left, top)."""
    for pts, colour in layers:
        for x, y in pts[:1500].tolist():
            if abs(x) > lim or abs(y) > lim:  # off the panel
                continue
            px, py = left + (x + lim) / (2 * lim) * size, top + (lim - y) / (2 * lim) * size
            draw.ellipse([px - 1.5, py - 1.5, px + 1.5, py + 1.5], fill=colour)
    draw.rectangle([left, top, left + size - 1, top + size - 1], outline=(0, 0, 0))


def save_toy_png(path, ref, gen, K):
    """One panel per class: reference samples in grey, generator samples in colour."""
    from PIL import Image, ImageDraw

    size = 320
    img = Image.new("RGB", (size * K, size + 24), "white")
    draw = ImageDraw.Draw(img)
    for k in range(K):
        _scatter(draw, k * size, 24, size, [(ref[k], (170, 170, 170)), (gen[k], TOY_COLOURS[k % 3])], lim=3.2)
        draw.text((k * size + 6, 6), f"class {k}: reference (grey), generator (colour); reward grows ->",
                  fill=(0, 0, 0))
    img.save(path)


@torch.no_grad()
def toy_samples(world, n):
    """n generator samples and n reference samples of every class -> two (K, n, 2) tensors on the CPU."""
    dev = world.means.device
    gen = torch.stack([world.generate(world.generator, torch.full((n,), k, device=dev)) for k in range(world.K)])
    ref = torch.stack([world.sample_ref(k, n) for k in range(world.K)])
    return gen.cpu(), ref.cpu()


def run_toy(cfg, dist_info):
    from safetensors.torch import save_file

    rank, world_size, device = dist_info
    ok = torch.ones(1)
    if rank == 0:  # float64 Monte Carlo, ~2 s; the other ranks wait at the broadcast
        results = gradient_check()
        print_gradient_check(results)
        ok[0] = all(r["ok"] for r in results)
    if world_size > 1:
        dist.broadcast(ok, 0)
    if not ok.item():
        raise SystemExit("gradient check FAILED: a tractable loss is off beyond Monte-Carlo tolerance")
    world = make_toy_world(device)
    world.cfg = cfg
    start_out_dir(cfg, dist_info)
    t0 = time.perf_counter()
    train(world, dist_info)
    train_time = time.perf_counter() - t0
    if rank != 0:
        return
    n = 4000
    gen, ref = toy_samples(world, n)  # (K, N, 2) each
    normal = torch.randn(n, 2)
    save_file({"generator": gen, "reference": ref}, os.path.join(cfg.out_dir, "toy_samples.safetensors"))
    save_toy_png(os.path.join(cfg.out_dir, "toy.png"), ref, gen, world.K)
    print(f"trained {cfg.max_steps} steps in {train_time:.1f} s on {world_size} process(es)"
          + (", parameters identical on all ranks" if world_size > 1 else ""))
    print(f"{'class':>5s} {'energy dist':>12s} {'/ N(0,I)':>9s} {'reward gen':>11s} {'reward ref':>11s}")
    for k in range(world.K):
        ed, ed0 = energy_distance(gen[k], ref[k]), energy_distance(normal, ref[k])
        r_gen, r_ref = world.reward(gen[k], None).mean().item(), world.reward(ref[k], None).mean().item()
        print(f"{k:5d} {ed:12.4f} {ed / ed0:9.2%} {r_gen:11.4f} {r_ref:11.4f}")
    print(f"wrote {cfg.out_dir}/toy.png and {cfg.out_dir}/toy_samples.safetensors")


# -----------------------------------------------------------------------------
# the paper's Table 2 in the toy (--toy --ablation): one generator per row, the same seed, steps
# and nets for all; a row is the paper's model and the four flags that make it. KL rows put CFG
# in the reference: with KL, --cfg=in and --cfg=out give the same gradient (a test checks it).
# The two [extra] rows are not in the paper: reward without CFG, to tell the reward's effect on
# diversity from guidance's.

TABLE2 = [
    ("KL, no reward, no CFG", "--divergence=kl --alpha_rew=0 --alpha_cfg=0 --cfg=in"),
    ("KL, reward, no CFG [extra]", "--divergence=kl --alpha_rew=100 --alpha_cfg=0 --cfg=in"),
    ("Diff-Instruct (KL, CFG)", "--divergence=kl --alpha_rew=0 --alpha_cfg=7.5 --cfg=in"),
    ("DI++ (KL, reward, CFG)", "--divergence=kl --alpha_rew=100 --alpha_cfg=7.5 --cfg=in"),
    ("DI*-Out (choice 1)", "--divergence=pseudo_huber --alpha_rew=100 --alpha_cfg=7.5 --cfg=out"),
    ("DI*, no reward, no CFG", "--divergence=pseudo_huber --alpha_rew=0 --alpha_cfg=0 --cfg=in"),
    ("DI*, reward, no CFG [extra]", "--divergence=pseudo_huber --alpha_rew=100 --alpha_cfg=0 --cfg=in"),
    ("SIM (score div., CFG)", "--divergence=pseudo_huber --alpha_rew=0 --alpha_cfg=7.5 --cfg=in"),
    ("DI*-In, alpha_rew 1", "--divergence=pseudo_huber --alpha_rew=1 --alpha_cfg=7.5 --cfg=in"),
    ("DI*-In, alpha_rew 10", "--divergence=pseudo_huber --alpha_rew=10 --alpha_cfg=7.5 --cfg=in"),
    ("DI*-In, alpha_cfg 4.5", "--divergence=pseudo_huber --alpha_rew=100 --alpha_cfg=4.5 --cfg=in"),
    ("DI*-In (choice 2)", "--divergence=pseudo_huber --alpha_rew=100 --alpha_cfg=7.5 --cfg=in"),
]
ROW_FLAGS = ("divergence", "alpha_rew", "alpha_cfg", "cfg")  # what a row sets; the rest is shared
COVERED = 0.05  # a mode is covered when >= 5% of its class's samples are nearest it and within 3 std (the reference: 49%)


def row_config(cfg, flags):
    return replace(cfg, **parse_overrides(flags.split(), Config))


def toy_metrics(world, x, ref, alpha_rew):
    """Table 2's columns for samples x (K, N, 2) of a generator trained with alpha_rew."""
    K, n = x.shape[:2]
    nearest, near = mode_shares(world, x)  # (K, M) each
    right = world.means[..., 0].argmax(-1)  # (K,) each class's high-reward mode
    tilted = sample_mixture(*tilted_reference(world, alpha_rew), world.std, n).cpu()  # (K, N, 2)
    return dict(reward=world.reward(x.reshape(-1, 2), None).mean().item(),
                ed_ref=sum(energy_distance(x[k], ref[k]) for k in range(K)) / K,
                coverage=(near >= COVERED).float().mean().item(),
                right_share=nearest.gather(1, right[:, None].cpu()).mean().item(),
                ed_tilted=sum(energy_distance(x[k], tilted[k]) for k in range(K)) / K,
                mode_shares=near.tolist())  # (K, M): where the coverage comes from


def save_ablation_png(path, rows, cols=5, size=260, band=32):
    """One panel per row, every class in it: the reference in grey, the generator in class colours."""
    from PIL import Image, ImageDraw

    n_rows = -(-len(rows) // cols)
    img = Image.new("RGB", (cols * size, n_rows * (size + band)), "white")
    draw = ImageDraw.Draw(img)
    for i, row in enumerate(rows):
        left, top = (i % cols) * size, (i // cols) * (size + band) + band
        layers = [(r, (170, 170, 170)) for r in row["ref"]] + [(g, TOY_COLOURS[k % 3]) for k, g in enumerate(row["x"])]
        _scatter(draw, left, top, size, layers, lim=4.0)  # wide: guidance can push samples far out
        draw.text((left + 6, top - band + 4), row["name"], fill=(0, 0, 0))
        draw.text((left + 6, top - band + 17), row["short"], fill=(90, 90, 90))
    img.save(path)


def run_ablation(cfg, device, n=2000):
    """Train every TABLE2 row from the same start, then score them all (and two reference rows:
    a second draw of q, the noise floor, and the tilt at alpha_rew 100) against the same q."""
    world = make_toy_world(device)
    world.cfg = cfg
    torch.manual_seed(cfg.seed)
    ref = torch.stack([world.sample_ref(k, n) for k in range(world.K)]).cpu()  # (K, N, 2), the reference q
    tilt_best = sample_mixture(*tilted_reference(world, 100.0), world.std, n).cpu()
    rows = [dict(name="reference q (a second draw)", short="the noise floor", alpha_rew=0.0,
                 x=torch.stack([world.sample_ref(k, n) for k in range(world.K)]).cpu()),
            dict(name="tilted reference, alpha_rew 100", short=f"q exp(alpha_rew r / beta), beta {tilt_temperature(world):.4f}",
                 alpha_rew=100.0, x=tilt_best)]
    for i, (name, flags) in enumerate(TABLE2):
        row_cfg = replace(row_config(cfg, flags), out_dir=os.path.join(cfg.out_dir, "ablation", f"row{i + 1:02d}"))
        print(f"row {i + 1}/{len(TABLE2)}: {name}: {flags}", flush=True)
        torch.manual_seed(cfg.seed)  # every row starts from the same nets and draws the same noise
        world = make_toy_world(device)
        world.cfg = row_cfg
        os.makedirs(row_cfg.out_dir, exist_ok=True)
        t0 = time.perf_counter()
        train(world, (0, 1, device))
        short = " ".join(f.split("=")[1] for f in flags.split())
        rows.append(dict(name=name, flags=flags, short=short, alpha_rew=row_cfg.alpha_rew,
                         seconds=time.perf_counter() - t0, x=toy_samples(world, n)[0]))
    torch.manual_seed(cfg.seed + 1)  # the tilted samples inside the metrics
    for row in rows:
        row.update(toy_metrics(world, row["x"], ref, row["alpha_rew"]), ref=ref)
    print(f"\nTable 2 in the toy: {cfg.max_steps} steps per row, {n} samples per class, r = "
          f"{world.reward_scale:g} x[0]; modes: share covered (>= {COVERED:.0%} of a class's samples nearest them, within 3 std); "
          f"right: share nearest the high-reward mode")
    print(f"{'row':32s} {'div':>12s} {'a_rew':>5s} {'a_cfg':>5s} {'cfg':>3s} {'r x1e3':>7s} {'ED(q)':>7s} "
          f"{'modes':>6s} {'right':>6s} {'ED(tilt)':>8s}")
    for row in rows:
        div, a_rew, a_cfg, mode = (row["short"].split() if "flags" in row else ["-"] * 4)
        print(f"{row['name']:32s} {div:>12s} {a_rew:>5s} {a_cfg:>5s} {mode:>3s} {row['reward'] * 1e3:7.3f} "
              f"{row['ed_ref']:7.4f} {row['coverage']:6.0%} {row['right_share']:6.1%} {row['ed_tilted']:8.4f}")
    save_ablation_png(os.path.join(cfg.out_dir, "ablation.png"), rows)
    keep = ("name", "flags", "alpha_rew", "seconds", "reward", "ed_ref", "coverage", "right_share", "ed_tilted",
            "mode_shares")
    with open(os.path.join(cfg.out_dir, "ablation.json"), "w") as f:
        json.dump(dict(steps=cfg.max_steps, samples_per_class=n, covered_threshold=COVERED,
                       beta=tilt_temperature(world), rows=[{k: r[k] for k in keep if k in r} for r in rows]), f, indent=1)
    print(f"wrote {cfg.out_dir}/ablation.png, {cfg.out_dir}/ablation.json and each row's checkpoint in "
          f"{cfg.out_dir}/ablation/")


# -----------------------------------------------------------------------------
# SDXL mode and main


def run_sdxl(cfg, dist_info):
    rank, world_size, device = dist_info
    read_prompts(cfg.prompts)  # fail on a bad prompt file before writing anything
    if not cfg.bench:  # and on an out_dir with another run's checkpoints, before loading models
        check_out_dir(cfg)
    if cfg.tiny:  # tiny random models, saved and then loaded through the same from_pretrained code
        root = os.path.join(cfg.out_dir, "tiny")
        if rank == 0 and not os.path.isfile(os.path.join(root, "reward", "config.json")):
            build_tiny(root, cfg.resolution)
        if world_size > 1:
            dist.barrier()
        cfg.pretrained, cfg.generator_init = os.path.join(root, "sdxl"), ""
        cfg.reward_model = cfg.reward_processor = os.path.join(root, "reward")
    world = SDXLWorld(cfg, device, rank, world_size)
    world.cfg = cfg
    if cfg.bench:  # the cost table instead of training
        return bench(world, device)
    start_out_dir(cfg, dist_info)  # only now, so that a model that fails to load deletes nothing
    t0 = time.perf_counter()
    train(world, dist_info)
    if rank == 0:
        print(f"trained to step {cfg.max_steps} in {time.perf_counter() - t0:.1f} s on {world_size} process(es)"
              + (", parameters identical on all ranks" if world_size > 1 else "") + f"; outputs in {cfg.out_dir}")


def quiet_libraries():
    """Warnings off, and the libraries' own bars ("Loading weights", "Loading pipeline components"),
    but not huggingface_hub's download bars: a first run shows its tens of GB arriving."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    hub_bars = not are_progress_bars_disabled()  # HF_HUB_DISABLE_PROGRESS_BARS=1 still wins
    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()  # transformers' also turns off the hub's bars
    if hub_bars:
        enable_progress_bars()


def main(argv):
    try:
        cfg = parse_args(argv)
    except ConfigError as e:
        print(f"distar: error: {e}", file=sys.stderr)
        return 2
    if cfg.bench and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        print("distar: error: --bench times one process: run it with python, not torchrun", file=sys.stderr)
        return 2
    quiet_libraries()
    dist_info = setup_distributed()
    rank, world_size, _ = dist_info
    torch.manual_seed(cfg.seed * world_size + rank)
    if cfg.toy:  # MLPs this small gain nothing from intra-op threads, and threads that compete for
        torch.set_num_threads(1)  # cores (torchrun ranks, other jobs) slow them down 10x or more
    if cfg.ablation and world_size > 1:
        if rank == 0:
            print("distar: error: --ablation runs in one process: use python, not torchrun", file=sys.stderr)
        return 2
    try:
        if cfg.ablation:
            run_ablation(cfg, dist_info[2])
        elif cfg.toy:
            run_toy(cfg, dist_info)
        else:
            run_dry_run(cfg, dist_info) if cfg.dry_run else run_sdxl(cfg, dist_info)
    except LoadError as e:  # bad model path or prompt file: one line, before anything is written
        if rank == 0:
            print(f"distar: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:  # every rank raises it at the same update
        if rank == 0:
            print(f"distar: error: {e}", file=sys.stderr)
        return 1
    if world_size > 1:
        dist.barrier()  # rank 0 has written its files; leave together
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
