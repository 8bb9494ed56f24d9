"""
distar: a minimal, single-file reference implementation of Diff-Instruct* (DI*).

DI* trains a one-step generator g_theta to maximise a reward r(x_0, c) while a score-based
divergence (eq. 3.2) keeps it close to a reference diffusion model. The divergence's gradient
comes from the tractable loss of Theorem 3.1 (eq. 3.4), in which an assistant diffusion model
s_psi, trained by denoising score matching on the generator's samples (eq. 2.2), stands in for
the generator's score. Classifier-free guidance enters as an implicit reward (Theorem 3.2,
"choice 1", --cfg=out) or through a CFG-enhanced reference ("choice 2", --cfg=in).
Paper: Luo et al., "Diff-Instruct*: Towards Human-Preferred One-step Text-to-image Generative
Models". --help lists every option, and the defaults each mode replaces, after these commands.

The toy 2-D Gaussian world on any laptop (the gradient check, then Algorithm 1):
$ python distar.py --toy
$ torchrun --standalone --nproc_per_node=2 distar.py --toy

SDXL (defaults: SDXL-base reference, DMD2 one-step init, PickScore reward, bf16, 1024 px):
$ python distar.py --prompts=prompts.txt                                # one 141 GB GPU
$ python distar.py --prompts=prompts.txt --lora_rank=64 --batch_size=1  # LoRA: 48 GB (planned)
$ torchrun --standalone --nproc_per_node=8 distar.py --prompts=prompts.txt --fsdp
$ GLOO_SOCKET_IFNAME=eth0 torchrun --nnodes=8 --nproc_per_node=8 --node_rank=$NODE_RANK \\
    --master_addr=$MASTER_ADDR --master_port=29500 distar.py --prompts=prompts.txt --fsdp
  (on every node: --out_dir on a shared filesystem, GLOO_SOCKET_IFNAME the nodes' interface)
Continue a stopped run: the same command with --resume (a scheduler's requeue: --resume_if_any).
SD3/SD3.5 (flow matching; SD3.5-medium, one Euler step from noise): --model=sd3 on any of these;
SD1.5/SD2.1 (512/768 px, eps or v-prediction; one 48 GB GPU, planned): --model=sd.

Extras: tiny random SDXL-shaped models on CPU, the real code path (--tiny); the real
architectures with random weights, nothing downloaded: the memory plan and FLOPs per step, and
on GPUs seconds/step, images/s, peak memory and MFU (--dry_run); the cost of a step per
divergence (--bench); the paper's Table 2 in the toy (--toy --ablation):
$ torchrun --standalone --nproc_per_node=2 distar.py --tiny --max_steps=4
$ python distar.py --dry_run --world_size_plan=8 --fsdp
$ torchrun --standalone --nproc_per_node=8 distar.py --dry_run --fsdp
$ python distar.py --tiny --bench        (full size on one GPU: --dry_run --bench)
$ python distar.py --toy --ablation
"""

import argparse
import contextlib
import copy
import datetime
import difflib
import glob
import inspect
import json
import math
import os
import re
import shutil
import signal
import statistics
import sys
import textwrap
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

# -----------------------------------------------------------------------------
# config: every field is a --flag and its comment the --help line (the command line: parse_args,
# after the banner)

@dataclass
class Config:
    toy: bool = False  # the 2-D Gaussian world: CPU, seconds, exact reference scores
    tiny: bool = False  # tiny random SDXL-shaped models in {out_dir}/tiny: the SDXL path on CPU
    dry_run: bool = False  # the real SDXL architectures, random weights, nothing downloaded
    ablation: bool = False  # with --toy: one generator per row of the paper's Table 2
    bench: bool = False  # time a step per divergence instead of training: {out_dir}/bench.json
    allow_cpu: bool = False  # train SDXL without a GPU (downloads tens of GB; very slow)
    model: str = "sdxl"  # sdxl | sd3: SD3/SD3.5 (flow) | sd: SD1.x/2.x; --toy: their checks too
    t5: bool = True  # sd3: the T5-XXL text encoder (4.76 B frozen); false: zeros in its place
    # models: hub ids or local folders
    pretrained: str = "stabilityai/stable-diffusion-xl-base-1.0"  # s_ref, s_psi's init, VAE, text
    generator_init: str = "tianweiy/DMD2/dmd2_sdxl_1step_unet_fp16.bin"  # UNet folder or state dict
    variant: str = ""  # weight-file variant of --generator_init, e.g. fp16
    reward_model: str = "yuvalkirstain/PickScore_v1"  # any transformers CLIPModel
    reward_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # its tokenizer, size, mean/std
    prompts: str = ""  # text file, one prompt per line; empty: a few built-in prompts
    resolution: int = 1024  # image side in pixels (latents are 1/8 of it)
    conditioning_t: int = 399  # the one-step generator's conditioning timestep (DMD2, DI*)
    # the DI* objective (Algorithm 1)
    alpha_rew: float = 100.0  # scale of the explicit reward r(x_0, c) (the raw PickScore cosine)
    alpha_cfg: float = 7.5  # guidance strength; CFG scale omega = 1 + alpha_cfg
    cfg: str = "in"  # in: choice 2, CFG-enhanced reference; out: choice 1, Theorem 3.2
    divergence: str = "pseudo_huber"  # pseudo_huber | l2 (eq. 3.4) | kl (Diff-Instruct, DI++)
    huber_c: float = 0.1  # pseudo-Huber c per element on the eps scale: c = huber_c sqrt(D)
    t_min: int = 20  # t ~ U{t_min..t_max} of the 1000-step schedule
    t_max: int = 980  # (both inclusive; DMD2 draws in [20, 980])
    assistant_steps: int = 5  # K_TA: assistant (DSM) updates per generator update
    # optimisation: AdamW, as DMD2
    batch_size: int = 2  # samples per rank per update
    max_steps: int = 1000  # generator updates
    lr_g: float = 5e-7  # generator learning rate
    lr_psi: float = 5e-7  # assistant learning rate
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.999  # AdamW beta2
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 10.0  # max gradient norm of each net
    max_skips: int = 20  # stop after this many updates of a net in a row with a NaN/Inf
    seed: int = 0  # rank r uses seed * world_size + r
    # precision and memory
    precision: str = "bf16"  # bf16: autocast, fp32 masters, frozen UNet and CLIP in bf16 | fp32
    grad_checkpointing: bool = True  # recompute activations in backward (1024 px needs it)
    fsdp: bool = False  # torchrun: shard the UNets' weights, gradients, AdamW states (FSDP2)
    # LoRA: frozen bases, trained adapters in the generator and the assistant (0: whole UNets)
    lora_rank: int = 0  # adapter rank; DMD2's SDXL LoRA: 64 (alpha 8, lr 5e-5)
    lora_alpha: float = 8.0  # adapter output scale alpha / rank
    lora_targets: str = "all"  # all: DMD2's and LCM-LoRA's 14 layer kinds | attn_ff | attn
    compile: bool = False  # torch.compile the UNets' transformer blocks; opt-in: not yet timed
    fast_backends: bool = False  # TF32 matmuls, cudnn.benchmark, cuDNN attention; not yet timed
    # output
    out_dir: str = "out"  # metrics.jsonl, samples-*.png, checkpoint-*/
    log_interval: int = 10  # steps between metrics lines
    ckpt_interval: int = 500  # steps between checkpoints (and one at the end)
    sample_interval: int = 500  # steps between sample grids (SDXL)
    keep_checkpoints: int = 2  # newest checkpoints kept (an SDXL one is ~60 GB)
    resume: bool = False  # continue from the newest complete checkpoint in out_dir (none: an error)
    resume_if_any: bool = False  # --resume where out_dir holds a checkpoint, else start at step 0
    overwrite: bool = False  # start over in an out_dir that holds another run (deletes it)
    # extras
    world_size_plan: int = 0  # --dry_run: GPUs to plan memory for; 0: this run's world size
    peak_tflops: float = 0.0  # --dry_run: the GPU's dense bf16 peak for MFU; 0: by its name
    bench_reps: int = 20  # --bench: timed repetitions per variant (medians are reported)
    bench_warmup: int = 5  # --bench: untimed repetitions first

# each world's problem size replaces the defaults; flags on the command line still win
TOY_DEFAULTS = dict(batch_size=256, max_steps=500, lr_g=1e-3, lr_psi=3e-3, assistant_steps=4,
                    weight_decay=0.0, log_interval=100, ckpt_interval=1000, out_dir="out_toy")
ABLATION_DEFAULTS = dict(max_steps=500)  # twelve toy runs in under a minute on 2 CPU cores
TINY_DEFAULTS = dict(resolution=64, max_steps=4, lr_g=1e-4, lr_psi=1e-4, assistant_steps=2,
                     precision="fp32", grad_checkpointing=False, log_interval=1, ckpt_interval=2,
                     sample_interval=2, out_dir="out_tiny")
DRY_RUN_DEFAULTS = dict(max_steps=4, log_interval=1, out_dir="out_dry_run")  # step 1: warm-up
LORA_DEFAULTS = dict(lr_g=5e-5, lr_psi=5e-5)  # DMD2's SDXL LoRA run; a mode's defaults win

# -----------------------------------------------------------------------------
# the loss math, in score space (score = grad_x log density)
# Batch is dim 0. Norms and inner products are per sample over all other dims, so the same
# functions serve (B, 2) toy points and (B, 4, 128, 128) SDXL latents; each returns (B,).
# The generator loss is the mean of these over the batch.

def _dot(u, v):
    return (u * v).flatten(1).sum(1)  # per-sample inner product, (B,)

def distance_grad(y, distance="pseudo_huber", c=1.0):
    """d'(y) of the distance d in eq. 3.2; c is a float or one per sample, (B,)."""
    if distance == "l2":  # d(y) = ||y||^2
        return 2 * y
    if distance == "pseudo_huber":  # d(y) = sqrt(||y||^2 + c^2) - c, eq. 3.8
        norm = torch.sqrt(_dot(y, y) + c**2)  # (B,)
        return y / norm.view(-1, *([1] * (y.ndim - 1)))
    raise ValueError(f"unknown distance {distance!r}")

def score_divergence_loss(x_t, score_x0, s_psi, s_ref, distance="pseudo_huber", c=1.0,
                          weight=1.0):
    """Eq. 3.4 (Theorem 3.1; its term in 3.5): -d'(y_t) . (s_psi(x_t) - score_x0), with
    y_t = s_psi(x_t) - s_ref(x_t), score_x0 = grad log p_t(x_t | x_0); s_psi, s_ref: functions of
    x_t. Only the nets' parameters are frozen (sg[theta]): the theta-gradient flows through x_t
    into d' (both nets) and the second s_psi. Detaching x_t anywhere: a wrong gradient."""
    s_psi_x = s_psi(x_t)  # s_psi(x_t) ~ s_{p_sg[theta],t}(x_t)
    y_t = s_psi_x - s_ref(x_t)
    return -weight * _dot(distance_grad(y_t, distance, c), s_psi_x - score_x0)

def kl_loss(x_t, s_psi, s_ref, weight=1.0):
    """Diff-Instruct / DI++ baseline: (s_psi(sg[x_t]) - s_ref(sg[x_t])) . x_t, whose theta-gradient
    is that of KL(p_theta,t || q_t). No back-propagation through either net."""
    with torch.no_grad():  # sg[x_t]
        y_t = s_psi(x_t.detach()) - s_ref(x_t.detach())
    return weight * _dot(y_t, x_t)

def cfg_reward_loss(x_t, s_c, s_u, weight=1.0):
    """Theorem 3.2, choice 1 (DI*-Out): -(s_ref(sg[x_t]|c) - s_ref(sg[x_t]|empty)) . x_t, whose
    gradient is MINUS that of the implicit reward (3.7). The + printed in (3.5), (3.6) holds for
    eps-predictions (s = -eps / sigma_t flips the sign); the gradient check prints both."""
    with torch.no_grad():  # sg[x_t]
        grad_r = s_c(x_t.detach()) - s_u(x_t.detach())  # grad_x of (3.7)'s log q_t(x|c) / q_t(x)
    return -weight * _dot(grad_r, x_t)

def cfg_score(s_c, s_u, scale):
    """Choice 2 (DI*-In): the CFG-enhanced reference s_u + scale (s_c - s_u), i.e. the score of
    p(x|c)^scale p(x)^(1-scale). The paper prints s_c + alpha s_u, which is not CFG."""
    return s_u + scale * (s_c - s_u)

def dsm_loss(s_psi_x, score_x0, weight=1.0):
    """Denoising score matching, eq. 2.2: weight * ||s_psi(x_t) - grad log p_t(x_t|x_0)||^2."""
    d = s_psi_x - score_x0
    return weight * _dot(d, d)

# -----------------------------------------------------------------------------
# the toy world: 2-D data, K prompts (classes), each a mixture of isotropic Gaussians
# Diffusion is SDXL's VP schedule (1000 scaled-linear betas 0.00085 -> 0.012),
# x_t = a_t x_0 + sigma_t eps, so a mode N(m, std^2 I) diffuses to N(a_t m, (a_t^2 std^2 +
# sigma_t^2) I) and every reference score is exact. The unconditional reference is the mixture of
# all classes, so CFG has an exact meaning too.

SDXL_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

def sdxl_alphas_cumprod():
    """alphabar_t as diffusers' schedulers compute SDXL_BETAS (tested equal), written out: importing
    diffusers would be a tenth of the toy's run."""
    start, end = SDXL_BETAS["beta_start"] ** 0.5, SDXL_BETAS["beta_end"] ** 0.5  # scaled_linear
    betas = torch.linspace(start, end, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1 - betas, 0)  # alphabar_t

class VPProcess:
    """The toy's and SDXL's x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t in 0..999. A world's
    process is its noise draw and (a_t, sigma_t): diffuse and the losses serve any (SD3World)."""

    def sample_t(self, n, device):  # t ~ U{t_min..t_max}
        return torch.randint(self.cfg.t_min, self.cfg.t_max + 1, (n,), device=device)

    def coefficients(self, t):  # (a_t, sigma_t), each (B,)
        ab = self.alphas_cumprod.to(t.device)[t]
        return ab.sqrt(), (1 - ab).sqrt()

def flow_coefficients(t):
    """Rectified flow (SD3): x_s = (1 - s) x_0 + s eps, s = t / 1000; nets predict eps - x_0."""
    return 1 - t / 1000, t / 1000

def eps_from_velocity(x_s, v, s):
    """A flow net's v = eps - x_0 as the eps the losses take (x_0 = x_s - s v); score -eps / s."""
    return x_s + (1 - s) * v

def eps_from_v(x_t, v, a, s):
    """A VP v-prediction net's v = a_t eps - sigma_t x_0 (SD2.1) as eps (x_0 = a_t x_t - s v)."""
    return s * x_t + a * v

class ToyNet(nn.Module):
    """MLP f(x, c[, t]): the generator g_theta(z, c) (no t) or the assistant eps_psi(x_t, t, c)."""

    def __init__(self, n_classes, use_t, width=64):
        super().__init__()
        self.use_t = use_t
        self.emb = nn.Embedding(n_classes, 16)
        d_in = 2 + 16 + (16 if use_t else 0)
        # two hidden layers of 64: 128 units or a third layer cost 1.4x the time, fit no better
        self.net = nn.Sequential(nn.Linear(d_in, width), nn.SiLU(), nn.Linear(width, width),
                                 nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x, c, t=None):
        h = [x, self.emb(c)]
        if self.use_t:  # Fourier features of t / 1000
            f = torch.arange(1, 9, device=x.device, dtype=x.dtype) * math.pi * t[:, None] / 1000
            h += [torch.sin(f), torch.cos(f)]
        return self.net(torch.cat(h, 1))

class ToyWorld(VPProcess):
    """K classes; class k is an equal-weight mixture of isotropic Gaussians means[k] (M, 2), std.
    Explicit reward r(x, c) = reward_scale x[0]: it favours the right-hand mode of each class."""

    def __init__(self, means, std=0.3, reward_scale=0.001, device="cpu", dtype=torch.float32):
        self.means = torch.as_tensor(means, dtype=dtype, device=device)  # (K, M, 2)
        self.K = self.means.shape[0]
        self.std, self.reward_scale = std, reward_scale
        self.alphas_cumprod = sdxl_alphas_cumprod().to(device, dtype)
        self.generator = self.assistant = None  # set by make_toy_world

    def _diffused(self, x, a, s, c):
        """x - a_t m for the modes m of q_0(. | c), (B, M, 2), their variance at t, (B, 1, 1), and
        responsibilities (B, M, 1). c: (B,) class ids, one class id, or None (all classes)."""
        m = self.means.reshape(1, -1, 2) if c is None else self.means[c]
        a, s = a.view(-1, 1, 1), s.view(-1, 1, 1)  # a_t, sigma_t: (B,) or one t for all
        diff, var = x[:, None] - a * m, a**2 * self.std**2 + s**2
        return diff, var, torch.softmax(-(diff**2).sum(-1, keepdim=True) / (2 * var), 1)  # resp

    def log_prob(self, x, a, s, c):
        """log q_t(x | c) = log mean_m N(x; a_t m, var I), x (B, 2)."""
        diff, var, _ = self._diffused(x, a, s, c)
        comp = -(diff**2).sum(-1, keepdim=True) / (2 * var) - torch.log(2 * math.pi * var)
        return torch.logsumexp(comp[..., 0], 1) - math.log(diff.shape[1])

    def score(self, x, a, s, c):
        """grad_x log q_t(x | c): responsibility-weighted Gaussian scores."""
        diff, var, resp = self._diffused(x, a, s, c)
        return -(resp * diff / var).sum(1)

    def velocity(self, x, a, s, c):
        """E[eps - x_0 | x_t = x] under q(. | c), from each mode's posterior mean: not the score."""
        diff, var, resp = self._diffused(x, a, s, c)
        a, s = a.view(-1, 1, 1), s.view(-1, 1, 1)
        x0 = (x[:, None] - diff) / a + a * self.std**2 / var * diff  # E[x_0 | x_t, mode]
        return (resp * (s / var * diff - x0)).sum(1)  # E[eps | x_t, mode] = s diff / var

    def sample_ref(self, n):
        """n samples of q_0(x | c) for every class c, (K, n, 2)."""
        M, dev = self.means.shape[1], self.means.device
        return torch.stack([self.means[c, torch.randint(M, (n,), device=dev)]
                            + self.std * torch.randn(n, 2, device=dev) for c in range(self.K)])

    # what Algorithm 1 asks of a world (SDXLWorld has the same methods)
    def sample_cond(self, n):
        return torch.randint(self.K, (n,), device=self.means.device)  # prompts c

    def generate(self, g_theta, cond):
        z = torch.randn(len(cond), 2, device=self.means.device, dtype=self.means.dtype)  # z ~ p_z
        return g_theta(z, cond)  # x_0 = g_theta(z, c), (B, 2)

    def eps_psi(self, s_psi, x_t, t, cond):
        return s_psi(x_t, cond, t.float())  # eps_psi(x_t, t, c)

    def eps_ref(self, x_t, t, cond):
        """The reference's eps-prediction -sigma_t s_ref(x_t|c); cond None: unconditional."""
        a, s = self.coefficients(t)
        return -s[:, None] * self.score(x_t, a, s, cond)

    def eps_ref_both(self, x_t, t, cond):  # (c, empty); SDXLWorld batches them into one call
        return self.eps_ref(x_t, t, cond), self.eps_ref(x_t, t, None)

    def reward(self, x0, cond):
        return self.reward_scale * x0[:, 0]  # r(x_0, c), (B,)

class FlowToyWorld(ToyWorld):
    """The toy under SD3's process (--toy --model=sd3): x_s = (1 - s) x_0 + s eps, s = t / 1000,
    t ~ U{t_min..t_max}; the reference read as a flow net, its exact velocity through
    eps_from_velocity. The assistant MLP still predicts eps (a choice: it only has to be exact)."""

    def coefficients(self, t):
        return flow_coefficients(t.to(self.means.dtype))

    def eps_ref(self, x_t, t, cond):
        a, s = self.coefficients(t)
        return eps_from_velocity(x_t, self.velocity(x_t, a, s, cond), s[:, None])

def make_toy_world(device="cpu", process="vp"):
    # three classes on a circle of radius 2, two modes each (std 0.3), 1.2 apart horizontally
    centres = [(2 * math.cos(p), 2 * math.sin(p)) for p in (math.pi / 2, 7 * math.pi / 6,
                                                            11 * math.pi / 6)]
    world = (FlowToyWorld if process == "flow" else ToyWorld)(
        [[(x - 0.6, y), (x + 0.6, y)] for x, y in centres], std=0.3, device=device)
    world.generator = ToyNet(world.K, use_t=False).to(device)
    world.assistant = ToyNet(world.K, use_t=True).to(device)
    return world

# -----------------------------------------------------------------------------
# the gradient check: each tractable loss, and generator_backward itself, against what it stands for
# An affine Gaussian generator x_0 = mu + A z has the exact diffused score
# s_theta,t(x) = -(a^2 A A^T + s^2 I)^{-1} (x - a mu), so the intractable objectives can be
# differentiated directly: (3.3) by autograd through this score with pi_t frozen, the KL in closed
# form, minus the implicit reward (3.7) and the reward by autograd through reparameterised samples.
# Reference: a Gaussian per class, their mixture unconditional, float64, one t. First each loss
# alone, weight 1; then generator_backward itself, the assistant exact, against the objective with
# generator_loss's w(t) and c written out again. A wrong row swaps one weight in that objective: the
# gap a generator_loss with that weight shows. A row passes when its mean gradient over n_batches
# batches is within 4 standard errors of the exact one. process "flow": SD3's (1 - s, s) (sigma_t
# 0.3), the reference read as from a flow net, its exact velocity through eps_from_velocity.
# --toy runs it first (gradient_check and its table are below the banner).

# -----------------------------------------------------------------------------
# the SDXL world: the toy's interface with SDXL's UNets, VAE and CLIP text encoders and a CLIP
# reward. Nets predict eps; scores are s = -eps_hat / sigma_t (the loop converts).

class SDXLWorld(VPProcess):
    """Algorithm 1 on SDXL. Trained, with fp32 master weights: the generator g_theta (a UNet read at
    conditioning timestep 399) and the assistant s_psi (a UNet, initialised from the reference),
    or with --lora_rank a LoRA adapter on each, their bases frozen. Frozen, in bf16 with
    --precision=bf16: the reference UNet s_ref and the reward CLIP. The VAE (fp32 weights, bf16
    autocast: fp16 overflows in it) and the text encoders (as in DMD2) are fp32."""

    def __init__(self, cfg, device, rank=0, world_size=1, parts=None):
        """parts: components in memory (dry_run_parts), not cfg's paths; nets on device or meta."""
        self.cfg, self.device = cfg, device
        frozen = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        self.autocast = autocast_args(cfg, device)  # bf16 autocast with --precision=bf16
        prompts = read_prompts(cfg.prompts)
        self.prompts = prompts[rank::world_size] or prompts  # this rank's shard
        parts = parts or load_parts(cfg, device, frozen)
        self.pipe = parts["pipe"].to(device)  # text encoders, VAE and scheduler, fp32 as loaded
        self.vae = self.pipe.vae
        self.alphas_cumprod = getattr(self.pipe.scheduler, "alphas_cumprod", None)  # VP: alphabar_t
        self.s_ref = parts["s_ref"].to(frozen).eval().requires_grad_(False)
        for net in [m for m in self.pipe.components.values() if isinstance(m, nn.Module)]:
            net.requires_grad_(False)  # text encoders, VAE
        # trained nets in fp32; with --lora_rank frozen bases in `frozen`, fp32 adapters (add_lora)
        self.generator, self.assistant = (
            add_lora(parts[k].to(frozen), cfg, k) if cfg.lora_rank
            else parts[k].to(torch.float32) for k in ("generator", "assistant"))
        self.reward_fn = parts["reward_fn"].to(device)
        self.reward_fn.model.to(frozen)  # its mean/std buffers stay fp32
        self.set_grad_checkpointing(cfg.grad_checkpointing)
        r, lat = cfg.resolution, cfg.resolution // 8
        self.latent_shape = (self.generator.config.in_channels, lat, lat)
        self.time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32, device=device)

    def set_grad_checkpointing(self, on):
        """Recompute activations in backward, in the frozen nets too: they are on the generator's
        gradient path (diffusers checkpoints whenever grad is enabled, eval mode included)."""
        for m in (self.generator, self.assistant, self.s_ref, self.vae):
            m.enable_gradient_checkpointing() if on else m.disable_gradient_checkpointing()

    def sample_cond(self, n):
        idx = torch.randint(len(self.prompts), (n,)).tolist()  # global RNG: reproducible on resume
        return self.encode([self.prompts[i] for i in idx])

    @torch.no_grad()
    def encode(self, prompts):
        """SDXL's own encode_prompt: the penultimate hidden states of both text encoders,
        concatenated (B, 77, 2048), and the pooled projection of encoder 2 (B, 1280)."""
        emb, _, pooled, _ = self.pipe.encode_prompt(prompts, device=self.device,
                                                    do_classifier_free_guidance=False)
        return dict(prompts=prompts, embeds=emb.float(), pooled=pooled.float())

    def uncond(self, B):
        """SDXL's unconditional input, all zeros (force_zeros_for_empty_prompt)."""
        te, te2 = self.pipe.text_encoder.config, self.pipe.text_encoder_2.config
        return dict(embeds=torch.zeros(B, 77, te.hidden_size + te2.hidden_size, device=self.device),
                    pooled=torch.zeros(B, te2.projection_dim, device=self.device))

    def unet(self, net, x, t, cond):
        """eps_hat = net(x_t, t, c); cond None: the unconditional input."""
        B = len(x)
        cond = self.uncond(B) if cond is None else cond
        t = torch.as_tensor(t, device=x.device).expand(B)
        added = {"text_embeds": cond["pooled"], "time_ids": self.time_ids.expand(B, 6)}
        with torch.autocast(**self.autocast):
            eps = net(x, t, encoder_hidden_states=cond["embeds"], added_cond_kwargs=added).sample
        return eps.float()

    def generate(self, g_theta, cond, z=None):
        """The one-step generator as DMD2 and DI* read it, at t = 399: x_0 = (z - s eps_hat) / a."""
        if z is None:  # (B, 4, R/8, R/8)
            z = torch.randn(len(cond["prompts"]), *self.latent_shape, device=self.device)
        ab = self.alphas_cumprod[self.cfg.conditioning_t]
        eps_hat = self.unet(g_theta, z, self.cfg.conditioning_t, cond)
        return (z - (1 - ab).sqrt() * eps_hat) / ab.sqrt()  # x_0 = g_theta(z, c)

    def eps_psi(self, s_psi, x_t, t, cond):
        return self.unet(s_psi, x_t, t, cond)

    def eps_ref(self, x_t, t, cond):
        return self.unet(self.s_ref, x_t, t, cond)

    def eps_ref_both(self, x_t, t, cond):
        """(eps_c, eps_u), one call on [x_t; x_t], [c; empty]: larger matmuls, half the launches."""
        empty = self.uncond(len(x_t))
        both = {k: torch.cat([cond[k], empty[k]]) for k in empty}  # embeds[, pooled]
        t = torch.as_tensor(t, device=x_t.device).expand(len(x_t))
        return self.unet(self.s_ref, torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)

    def decode(self, x0):
        with torch.autocast(**self.autocast):  # weights fp32; bf16 has fp32's range, fp16 not
            img = self.vae.decode(x0 / self.vae.config.scaling_factor).sample
        return (img.float() / 2 + 0.5).clamp(0, 1)  # (B, 3, R, R) in [0, 1]

    def reward(self, x0, cond):
        # the reward's text pass runs here, so only the generator phase pays for it
        return self.reward_fn(self.decode(x0), self.reward_fn.text_features(cond["prompts"]))

    @torch.no_grad()
    def save_samples(self, path, n=4):
        """Fixed prompts and noise, so that grids from different steps compare. path None: the
        forward only (a rank whose generator shards rank 0 needs, --fsdp)."""
        from diffusers.utils import make_image_grid, numpy_to_pil

        z = torch.randn(n, *self.latent_shape, generator=torch.Generator().manual_seed(1234))
        cond = self.encode([BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)] for i in range(n)])
        img = self.decode(self.generate(self.generator, cond, z.to(self.device)))  # (n, 3, R, R)
        if path:
            images = numpy_to_pil(img.permute(0, 2, 3, 1).cpu().numpy())
            make_image_grid(images, rows=1, cols=n).save(path)

# The other worlds (below the banner, WORLDS maps --model to them) keep this interface and
# override only what differs. SD3World (--model=sd3, a flow transformer): sample_t (logit-normal,
# shifted), coefficients (flow_coefficients), encode and uncond (three text encoders; the empty
# prompt encoded), unet (its velocity as eps: eps_from_velocity), generate (one Euler step from
# noise), decode (latents shifted). SDWorld (--model=sd, SD1.x/2.x): encode and uncond (one CLIP,
# the empty prompt encoded), unet (a v-net's output as eps: eps_from_v), generate (a v-net's
# a_t z - sigma_t v).

# -----------------------------------------------------------------------------
# Algorithm 1: the alternating loop, written once and given a world
# A world holds .generator and .assistant (the trained nets), its process (sample_t(n, device),
# coefficients(t) = (a_t, sigma_t)), and sample_cond(n), generate(g_theta, cond),
# eps_psi(s_psi, x_t, t, cond), eps_ref(x_t, t, cond or None), eps_ref_both, reward(x_0, cond);
# s = -eps / sigma_t.
#
# Algorithm 1's pi(t), w(t), lambda(t) and c, which the paper leaves open. pi(t): the world's
# sample_t (VP: t ~ U{t_min..t_max}; SD3: logit-normal). The distance is on the eps scale,
# d_t(y) = d(sigma_t y), a distance at every t (so Theorem 3.1 holds), and per element: D elements
# a sample, |.|^2 summed over them, Delta = eps_psi - eps_ref, s = -eps / sigma_t. The weight is
# w(t) for the generator's terms (eq. 3.4: pseudo-Huber d of eq. 3.8, l2), lambda(t) for DSM:
#  loss         | weight, score scale   | c, score scale            | the same loss on the eps scale
#  pseudo-Huber | sigma_t / sqrt(D)     | huber_c sqrt(D) / sigma_t | sqrt(|Delta|^2/D + huber_c^2)
#               |                       |                           |   - huber_c
#  l2           | sigma_t^2 / D         |                           | |Delta|^2 / D
#  KL           | sigma_t / D           |                           | (eps_ref - eps_psi) . x_t / D
#  CFG (3.6)    | alpha_cfg sigma_t / D |                           | alpha_cfg (eps_c-eps_u).x_t/D
#  DSM (2.2)    | sigma_t^2 / D         |                           | |eps_psi - eps|^2 / D
# Why 1/sqrt(D) for pseudo-Huber: its d' has norm <= 1, so 1/D would shrink its x_0-gradient by a
# further sqrt(D) (~180x from the toy to SDXL at 1024 px); 1/sqrt(D) scales it with D as l2's and
# KL's weights do, so alpha_rew's balance carries over.

def diffuse(world, x0):
    """t from the world's process, eps ~ N(0, I), x_t = a_t x_0 + sigma_t eps ((B, 1, ...) each)."""
    t = world.sample_t(len(x0), x0.device)
    a_t, sigma_t = (c.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype) for c in world.coefficients(t))
    eps = torch.randn_like(x0)
    return t, a_t * x0 + sigma_t * eps, eps, sigma_t

def assistant_loss(world, s_psi, cond):
    """Algorithm 1, assistant phase: DSM (eq. 2.2) on the frozen generator's samples."""
    with torch.no_grad():
        x0 = world.generate(world.generator, cond)  # theta frozen
    t, x_t, eps, sigma_t = diffuse(world, x0)
    D = x0[0].numel()
    score_psi = -world.eps_psi(s_psi, x_t, t, cond) / sigma_t  # s_psi(x_t, t, c)
    return dsm_loss(score_psi, -eps / sigma_t, weight=sigma_t.flatten() ** 2 / D).mean()

def generator_loss(world, g_theta, cond):
    """Algorithm 1, generator phase, eq. 3.5: -alpha_rew r + the divergence term of eq. 3.4 (or KL)
    + alpha_cfg times the CFG term of eq. 3.6 (choice 1), or eq. 3.4 against cfg_score (choice 2).
    Returns the loss and its terms; terms["x0"] is x_0 = g_theta(z, c), where the terms meet."""
    cfg = world.cfg
    x0 = world.generate(g_theta, cond)  # x_0 = g_theta(z, c)
    t, x_t, eps, sigma_t = diffuse(world, x0)  # x_t carries the theta-gradient
    D, sigma_t = x0[0].numel(), sigma_t.flatten()  # sigma_t per sample, (B,)
    score = lambda eps_hat: -eps_hat / sigma_t.view(-1, *([1] * (x0.ndim - 1)))
    s_psi = lambda x: score(world.eps_psi(world.assistant, x, t, cond))  # unwrapped: no DDP
    reuse = {}  # s_ref(x_t | t, c) as the divergence computed it: choice 1's CFG term reuses it

    def s_c(x):  # s_ref(x_t | t, c)
        reuse["s_c"] = score(world.eps_ref(x, t, cond))
        return reuse["s_c"]
    s_u = lambda x: score(world.eps_ref(x, t, None))  # s_ref(x_t | t, empty)
    s_ref = s_c
    if cfg.cfg == "in" and cfg.alpha_cfg != 0:  # choice 2: CFG-enhanced reference, one call
        s_ref = lambda x: cfg_score(*map(score, world.eps_ref_both(x, t, cond)), 1 + cfg.alpha_cfg)
    score_x0 = score(eps)  # grad log p_t(x_t | x_0)
    if cfg.divergence == "kl":
        loss_div = kl_loss(x_t, s_psi, s_ref, weight=sigma_t / D)
    elif cfg.divergence == "pseudo_huber":  # w(t) = sigma_t / sqrt(D): the table above
        c = cfg.huber_c * math.sqrt(D) / sigma_t  # on the score scale: eps-scale c / sigma_t
        loss_div = score_divergence_loss(x_t, score_x0, s_psi, s_ref, "pseudo_huber", c=c,
                                         weight=sigma_t / math.sqrt(D))
    else:
        loss_div = score_divergence_loss(x_t, score_x0, s_psi, s_ref, "l2", weight=sigma_t**2 / D)
    loss_cfg = torch.zeros_like(loss_div)
    if cfg.cfg == "out" and cfg.alpha_cfg != 0:  # choice 1: implicit CFG reward (Thm 3.2)
        s_c_again = lambda x: reuse["s_c"]  # no second reference call
        loss_cfg = cfg.alpha_cfg * cfg_reward_loss(x_t, s_c_again, s_u, weight=sigma_t / D)
    with torch.set_grad_enabled(cfg.alpha_rew != 0):  # no reward backward when it has no weight
        reward = world.reward(x0, cond)  # r(x_0, c), (B,)
    loss_rew = -cfg.alpha_rew * reward
    loss = (loss_rew + loss_div + loss_cfg).mean()
    return loss, dict(loss_rew=loss_rew.mean(), loss_div=loss_div.mean(), loss_cfg=loss_cfg.mean(),
                      reward=reward.mean().detach(), x0=x0)

def generator_backward(world, g_theta, cond):
    """The generator phase's loss and backward, psi's parameters frozen (not its input). Each
    term's x_0-gradient is taken on its own and their sum goes back through g_theta: the work of
    one backward, and the norms log the balance of reward, divergence and CFG."""
    psi = trained(world.assistant)  # not requires_grad_(True) after: it unfreezes a LoRA's base
    for p in psi:
        p.requires_grad_(False)
    try:
        loss, terms = generator_loss(world, g_theta, cond)
        x0, grad = terms.pop("x0"), {}
        # each term's graph is freed once its gradient is taken; the CFG term's only after the
        # divergence's, as the two share x_t
        for k in ("rew", "cfg", "div"):
            term = terms[f"loss_{k}"]
            grad[k] = (torch.autograd.grad(term, x0, retain_graph=k == "cfg")[0]
                       if term.requires_grad else torch.zeros_like(x0))  # (B, C, H, W)
            terms[f"x0grad_{k}"] = grad[k].norm()
        x0.backward(grad["rew"] + grad["div"] + grad["cfg"])
    finally:
        for p in psi:
            p.requires_grad_(True)
    return loss.detach(), {k: v.detach() for k, v in terms.items()}  # the graphs go here

def trained(net):
    """The weights an optimizer holds: all of a net's, or with --lora_rank its adapter's."""
    return [p for p in net.parameters() if p.requires_grad]

def make_optimizer(cfg, params, lr):
    """Fused AdamW: one kernel per step, no whole-net scratch such as foreach's sqrt(v). Under
    --fsdp the parameters are this rank's shards (DTensors), and so are the Adam states."""
    return torch.optim.AdamW(params, lr=lr, betas=(cfg.beta1, cfg.beta2),
                             weight_decay=cfg.weight_decay, fused=True)

class NonFiniteError(RuntimeError):
    pass

def clip_and_step(opt, net, loss, grad_clip, world_size):
    """Clip the gradient norm and step, unless the loss or the norm is NaN/Inf on any rank (bf16
    overflow, a bad batch): then skip the update on every rank, so the ranks stay identical and
    the weights finite. Returns (grad norm, skipped)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # --fsdp: the whole net's norm, but as a DTensor,
        grad_norm = grad_norm.full_tensor()  # which isfinite and the all-reduce below refuse
    bad = (~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm)).float()  # on the device
    if world_size > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    skip = bool(bad.item())
    if not skip:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm, skip

def train(world, opt_g, opt_psi, dist_info, steps, on_step=None):
    """Algorithm 1: per step, K_TA assistant updates (DSM, eq. 2.2) with theta frozen, then one
    generator update with psi's parameters frozen. Every log_interval steps the metrics are
    all-reduced and returned; on_step(step, metrics or None) is the caller's: log, sample, save."""
    cfg = world.cfg
    rank, world_size, device = dist_info
    g_theta, s_psi = world.generator, world.assistant  # fp32 master weights
    # DDP broadcasts rank 0's weights when it wraps them: the seeds differ per rank
    g_ddp, s_psi_ddp = (data_parallel(m, world_size) for m in (g_theta, s_psi))  # DDP or FSDP's own
    bar = Progress(steps, rank, device, log=on_step is not None)  # a bar, seconds, peak memory
    history, skipped, in_a_row = [], 0, dict(g=0, psi=0)  # skips since the last log; streaks

    def update(opt, net, loss, name):
        nonlocal skipped
        grad_norm, skip = clip_and_step(opt, net, loss, cfg.grad_clip, world_size)
        skipped, in_a_row[name] = skipped + skip, (in_a_row[name] + 1) * skip
        if in_a_row[name] >= cfg.max_skips:  # weights still finite: no checkpoint holds bad ones
            raise NonFiniteError(f"{in_a_row[name]} {name} updates in a row had a non-finite loss"
                                 f" or gradient (step {step + 1}); stopping. Try lower learning"
                                 " rates")
        return grad_norm

    for step in bar:
        loss_psi = torch.zeros((), device=device)
        for _ in range(cfg.assistant_steps):  # assistant phase: theta frozen inside assistant_loss
            loss_psi = assistant_loss(world, s_psi_ddp, world.sample_cond(cfg.batch_size))
            loss_psi.backward()
            update(opt_psi, s_psi, loss_psi, "psi")  # frees psi's grads before the generator phase
        bar.lap("assistant")
        loss_g, terms = generator_backward(world, g_ddp, world.sample_cond(cfg.batch_size))
        grad_norm = update(opt_g, g_theta, loss_g, "g")
        bar.lap("generator")
        metrics = None
        if (step + 1) % cfg.log_interval == 0 or step + 1 == steps.stop:
            metrics = all_reduce_mean(dict(loss_g=loss_g, **terms, loss_psi=loss_psi.detach(),
                                           grad_norm=grad_norm), world_size, device)
            metrics.update(step=step + 1, skipped=skipped, **bar.laps())
            skipped = 0
            history.append(metrics)
            bar.show(metrics)
        if on_step:
            on_step(step + 1, metrics)
    for net in (g_theta, s_psi):
        assert_ranks_in_sync(net, world_size)
    return history

# -----------------------------------------------------------------------------
# DDP: one process per GPU, identical copies of the trained nets

def setup_distributed(cuda=True):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; nccl on GPUs, gloo on CPU (or cuda=False)."""
    cuda = cuda and torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    check_gpus_per_node(cuda)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    # ten minutes for training's collectives: a rank that stopped is found out in minutes
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=10),
                            device_id=device if cuda else None)
    start_slow_group()  # an hour for loading and for rank 0's checkpoint writes
    return dist.get_rank(), dist.get_world_size(), device

def data_parallel(net, world_size):
    """DDP on a trained net, gradients as views into its buckets (no second copy); frozen nets are
    never wrapped. A net --fsdp sharded (shard_nets) is its own wrapper: it reduce-scatters."""
    return net if world_size == 1 or is_sharded(net) else DDP(net, gradient_as_bucket_view=True)

def all_reduce_mean(metrics, world_size, device):
    """Scalars averaged over ranks, on the device: NCCL takes only CUDA tensors."""
    vals = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device)
                        for v in metrics.values()])
    if world_size > 1:
        dist.all_reduce(vals)
        vals /= world_size
    return dict(zip(metrics, vals.tolist()))

# -----------------------------------------------------------------------------
# main: the toy and SDXL share fit (optimizers, resume, metrics, samples, checkpoints)

def fit(cfg, world, dist_info, save_samples=None):
    """Train world from step 0 or from the newest checkpoint, writing to cfg.out_dir."""
    rank = dist_info[0]
    start_out_dir(cfg, dist_info)
    opt_g = make_optimizer(cfg, trained(world.generator), cfg.lr_g)
    opt_psi = make_optimizer(cfg, trained(world.assistant), cfg.lr_psi)
    start = load_checkpoint(cfg, world, opt_g, opt_psi, dist_info) if cfg.resume else 0
    if start and start >= cfg.max_steps:  # a checkpoint was loaded
        if rank == 0:
            print(f"resume: the checkpoint is at step {start}, --max_steps={cfg.max_steps}: "
                  "nothing to train (a larger --max_steps continues the run)")
        return []

    with outputs(cfg, world, opt_g, opt_psi, dist_info, save_samples, start) as on_step:
        return train(world, opt_g, opt_psi, dist_info, range(start, cfg.max_steps), on_step)

def run_toy(cfg, dist_info):
    rank, world_size, device = dist_info
    ok = torch.ones(1, device=device)  # on the device: NCCL takes only CUDA tensors
    if rank == 0:  # float64 Monte Carlo, ~2 s; the other ranks wait at the broadcast
        print_gradient_check(results := gradient_check())
        if cfg.model == "sd3":  # on request: the same check under SD3's flow process
            print_gradient_check(flow := gradient_check(process="flow"), "flow")
            results += flow
        if cfg.model == "sd":  # on request: the reference read through v-prediction (SD2.1)
            print_gradient_check(v := gradient_check(process="v"), "v")
            results += v
        ok[0] = all(r["ok"] for r in results)
    if world_size > 1:
        dist.broadcast(ok, 0)
    if not ok.item():
        raise SystemExit("gradient check FAILED: a tractable loss is off beyond Monte-Carlo noise")
    world = make_toy_world(device, "flow" if cfg.model == "sd3" else "vp")
    world.cfg = cfg
    fit(cfg, world, dist_info)
    if rank == 0:
        evaluate_toy(world, cfg.out_dir)

def run_sdxl(cfg, dist_info):
    rank, world_size, device = dist_info
    cfg = prepare_sdxl_run(cfg, dist_info)  # before anything loads; --tiny: builds its models
    with all_ok(dist_info):  # one rank's error (a file, a hub, memory) stops every rank (all_ok)
        world = maybe_compile(WORLDS[cfg.model](cfg, device, rank, world_size))  # --compile
    world = shard_nets(world, dist_info)  # --fsdp
    if cfg.bench:  # the cost table instead of training
        return bench(world, dist_info)
    fit(cfg, world, dist_info, world.save_samples)

def main(argv):
    """A run from the command line; returns the exit code (exits: one line per error, not a
    traceback; 2: bad input, 1: a failed run, 130: Ctrl-C, 0: done)."""
    with exits() as run:
        cfg = run.cfg = parse_args(argv)
        if not cfg.toy:  # the toy loads no library's models: it does without their imports
            quiet_libraries()
        # the toy's nets are so small that a GPU only adds launch latency: it runs on the CPU,
        # with one intra-op thread (threads competing for cores slow it down 10x)
        rank, world_size, _ = dist_info = setup_distributed(cuda=not cfg.toy)
        run.rank = rank  # the error lines name it
        cfg = resolve_resume(cfg, rank)  # --resume with no checkpoint stops; --resume_if_any
        check_resume(cfg, rank)  # the checkpoint's mode and objective, before anything is written
        torch.manual_seed(cfg.seed * world_size + rank)
        if cfg.toy:
            torch.set_num_threads(1)
        run_mode = (run_ablation if cfg.ablation else run_toy if cfg.toy
                    else run_dry_run if cfg.dry_run else run_sdxl)
        with fast_backends(cfg.fast_backends):  # off: changes nothing
            run_mode(cfg, dist_info)
    return run.code

###############################################################################
# EXTRAS. Tooling around the DI* path above: the command line, checkpoints, the checks before
# anything loads and the out_dir's rules, loading models with one-line errors, LoRA adapters, SDXL
# models from configs (tiny ones, and the full size with random weights), speed options, the dry
# run and the cost table, the toy pictures, and Table 2 in the toy.
###############################################################################

# -----------------------------------------------------------------------------
# the DI* path's operations: main's exit codes, train's progress bar, seconds and peak memory,
# fit's outputs, the checks and messages before SDXL loads, the ranks' sync check, autocast's
# device rules, the gradient check (what it proves: its comment above the banner) and its table,
# and the CLIP reward model

@contextlib.contextmanager
def exits():
    """main's block, its errors turned into one line and run.code (main's docstring lists the
    codes); at the end the ranks leave together."""
    first_on_node = int(os.environ.get("LOCAL_RANK", 0)) == 0  # one error line in each node's log
    run = argparse.Namespace(cfg=None, code=0, rank=int(os.environ.get("RANK", 0)))
    try:
        yield run
    except (LoadError, ConfigError, NonFiniteError, RankFailed) as e:  # every rank stops here
        if reports(e, run.rank, first_on_node):  # one line in each node's log
            print(f"distar: error: {e}", file=sys.stderr)
        if dist.is_initialized():  # every rank leaves (all_ok): nothing is left to wait for
            dist.destroy_process_group()
        run.code = 2 if isinstance(e, (LoadError, ConfigError)) else 1
    except torch.cuda.OutOfMemoryError:  # from the rank that ran out; torchrun stops the others
        print(f"distar: error: rank {run.rank} ran out of GPU memory: try a smaller --batch_size, "
              "more GPUs with --fsdp, or --grad_checkpointing if it is off", file=sys.stderr)
        run.code = 1
    except KeyboardInterrupt as e:  # Ctrl-C: stopped on purpose. torchrun forwards it to every rank
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second one (forwarded) must not cut exit
        if run.rank == 0:  # one line per run
            print(f"distar: {interrupted(run.cfg, getattr(e, 'step', None))}", file=sys.stderr,
                  flush=True)
        run.code = 130  # 128 + SIGINT, as a shell reports it
    if run.code == 0 and dist.is_initialized():  # done, under torchrun (even one process)
        dist.barrier()  # rank 0 has written its files; leave together
        dist.destroy_process_group()

class Progress:
    """train's steps: a tqdm bar on rank 0's terminal, each phase's seconds and peak memory (GPU:
    since the phase began), and with log a metrics line where there is no bar (a log file)."""

    def __init__(self, steps, rank, device, log):
        self.bar = tqdm(steps, initial=steps.start, total=steps.stop,
                        disable=None if rank == 0 else True, dynamic_ncols=True)
        self.rank, self.device, self.log, self.stop = rank, device, log, steps.stop

    def __iter__(self):
        for step in self.bar:
            self.sec, self.mem = {}, {}
            peak_memory_gb(self.device, reset=True)
            self.t = clock(self.device)  # clock, peak_memory_gb: with the dry run; --bench's
            yield step  # PartTimer reads each clock() call as a phase's start

    def lap(self, phase):
        self.mem[phase] = peak_memory_gb(self.device, reset=True)
        t = clock(self.device)
        self.sec[phase], self.t = t - self.t, t

    def laps(self):
        return dict(**{f"sec_{k}": v for k, v in self.sec.items()},
                    **{f"mem_{k}_gb": v for k, v in self.mem.items()})

    def show(self, metrics):
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k != "step"},
                             refresh=False)
        if self.log and self.rank == 0 and (self.bar.disable or not sys.stdout.isatty()):
            print(log_line(metrics, self.stop), flush=True)  # a log file: no bar there

@contextlib.contextmanager
def outputs(cfg, world, opt_g, opt_psi, dist_info, save_samples, start):
    """fit's on_step(step, metrics): metrics.jsonl, sample grids, checkpoints; the last step done
    goes with a Ctrl-C (main's line), and rank 0 says where the run is at the end."""
    rank, world_size, _ = dist_info
    reached = [start]

    def on_step(step, metrics):
        reached[0] = step
        if metrics and rank == 0:
            with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(metrics) + "\n")
        last = step == cfg.max_steps
        if save_samples and (step % cfg.sample_interval == 0 or last):
            with all_ok(dist_info):  # rank 0's error (memory, disk) stops every rank (all_ok)
                if rank == 0 or cfg.fsdp:  # --fsdp: every rank's shards run the generator
                    save_samples(os.path.join(cfg.out_dir, f"samples-{step:06d}.png")
                                 if rank == 0 else None)
        if step % cfg.ckpt_interval == 0 or last:
            save_checkpoint(cfg, step, world, opt_g, opt_psi, dist_info)

    t0 = time.perf_counter()
    try:
        yield on_step
    except KeyboardInterrupt as e:
        e.step = reached[0]
        raise
    if rank == 0:
        in_sync = ("" if world_size == 1 else ", weights sharded over the ranks" if cfg.fsdp
                   else ", parameters identical on all ranks")
        print(f"trained to step {cfg.max_steps} in {time.perf_counter() - t0:.1f} s on "
              f"{world_size} process(es){in_sync}; in {cfg.out_dir}")

def prepare_sdxl_run(cfg, dist_info):
    """Before the world loads: the user's files and a GPU (check_sdxl_run), --tiny's models built,
    the start line, the hub reached once or offline, a hub pipeline's family. Returns cfg."""
    rank, world_size, device = dist_info
    with all_ok(dist_info):  # one rank's error (a file, a hub, memory) stops every rank (all_ok)
        check_sdxl_run(cfg, device)  # the prompts, the out_dir, a GPU: before anything loads
    if cfg.tiny:
        cfg = tiny_config(cfg, dist_info)
    elif rank == 0 and not cfg.bench:
        prompts = cfg.prompts or f"the {len(BUILTIN_PROMPTS)} built-in ones (no --prompts)"
        print(f"distar: {cfg.model.upper()} on {world_size} x {device.type}: loading "
              f"{cfg.pretrained}, {cfg.generator_init or 'its ' + NETS[cfg.model][1]} and "
              f"{cfg.reward_model}; prompts: {prompts}", flush=True)
    with all_ok(dist_info):
        if not cfg.tiny:  # a hub id: reached once, quickly, or offline (a local index: checked)
            offline_unless_reachable(cfg.pretrained, cfg.generator_init, cfg.reward_model,
                                     cfg.reward_processor)
            if not os.path.isdir(cfg.pretrained):
                check_pipeline(cfg)
    return cfg

def check_gpus_per_node(cuda):
    if cuda and int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > torch.cuda.device_count():
        raise ConfigError(f"--nproc_per_node={os.environ['LOCAL_WORLD_SIZE']} but this node has "
                          f"{torch.cuda.device_count()} GPU(s): one process per GPU")

def autocast_args(cfg, device):
    """torch.autocast's arguments: bf16 with --precision=bf16; meta tensors (the dry run's plan)
    have no autocast, and FLOP counts do not depend on it."""
    return dict(device_type="cpu" if device.type == "meta" else device.type,
                dtype=torch.bfloat16, enabled=cfg.precision == "bf16" and device.type != "meta")

def assert_ranks_in_sync(net, world_size):
    """DDP must keep every rank's copy identical: compare per-tensor fingerprints with rank 0's.
    A sharded net (--fsdp) has one copy of each weight, split over the ranks: nothing to drift."""
    if world_size == 1 or is_sharded(net):
        return
    fp = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                      for p in net.parameters()])  # (n_tensors, 2); equal copies, equal sums
    ref = fp.clone()
    dist.broadcast(ref, 0)
    diff = (fp - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if diff > 0:
        raise RuntimeError(f"ranks out of sync: parameter fingerprints differ by {diff.item():.3g}")

def gradient_check(n=2**17, n_batches=16, t=300, c_huber=0.5, alpha_cfg=7.5, seed=0, process="vp"):
    from torch.distributions import MultivariateNormal, kl_divergence

    gen, dt = torch.Generator().manual_seed(seed), torch.float64
    world = (FlowToyWorld if process == "flow" else ToyWorld)(
        [[(0.0, 1.0)], [(-1.0, -0.5)], [(1.0, -0.5)]], std=0.6, reward_scale=0.003, dtype=dt)
    t = torch.tensor(t, dtype=dt if process == "flow" else torch.long)
    a, s = world.coefficients(t)
    mu = torch.tensor([0.4, 0.2], dtype=dt, requires_grad=True)  # theta = (mu, A), class 0
    A = torch.tensor([[0.9, 0.3], [-0.2, 0.5]], dtype=dt, requires_grad=True)
    cov = lambda A: a**2 * A @ A.T + s**2 * torch.eye(2, dtype=dt)  # of p_theta,t

    def gen_score(x, mu, A):  # exact score of p_theta,t at these parameters
        return -torch.linalg.solve(cov(A), (x - a * mu).T).T

    ref_score = lambda x, c, to_eps=eps_from_velocity: (  # s_ref(x | c); c None: empty
        world.score(x, a, s, c) if process == "vp"
        else -to_eps(x, world.velocity(x, a, s, c), s) / s)
    if process == "v":  # VP read as from a v-net (SD2.1): v = a eps - s x_0 = (eps - s x) / a
        a, s = world.coefficients(t)  # by Tweedie (eps = -s score), back to eps by eps_from_v
        ref_score = lambda x, c, to_eps=eps_from_v: -to_eps(
            x, (-s * world.score(x, a, s, c) - s * x) / a, a, s) / s

    omega = 1 + alpha_cfg
    s_c = lambda x: ref_score(x, 0)  # s_ref(x | c = 0)
    s_u = lambda x: ref_score(x, None)  # s_ref(x | empty)
    s_sg = lambda x: gen_score(x, mu.detach(), A.detach())  # s_{p_sg[theta],t}

    def s_cfg_exact(x):  # grad_x [omega log q_t(x|c) + (1 - omega) log q_t(x)], by autograd
        x = x.detach().requires_grad_(True)
        logp = omega * world.log_prob(x, a, s, 0) + (1 - omega) * world.log_prob(x, a, s, None)
        return torch.autograd.grad(logp.sum(), x)[0]

    def div(x_t, ref, distance, c=c_huber):  # divergence (3.3): d(s_theta - s_ref), pi_t frozen
        x = x_t.detach()
        y = gen_score(x, mu, A) - batch[ref]  # s_ref(x): the batch's, computed once
        return _dot(y, y) if distance == "l2" else torch.sqrt(_dot(y, y) + c**2) - c

    def detached(x_t, cond, where):  # eq 3.4 pseudo-Huber with x_t detached in one place: wrong
        x_1, x_2 = (x_t.detach(), x_t) if where == "d'" else (x_t, x_t.detach())
        d_prime = distance_grad(s_sg(x_1) - s_c(x_1), "pseudo_huber", c_huber)
        return -_dot(d_prime, s_sg(x_2) - cond)

    def kl_exact(x_t):  # KL(p_theta,t || q_t(. | c = 0)) between two Gaussians, no samples
        v = a**2 * world.std**2 + s**2  # q_t's variance
        q_t = MultivariateNormal(a * world.means[0, 0], v * torch.eye(2, dtype=dt))
        return kl_divergence(MultivariateNormal(a * mu, cov(A)), q_t).expand(len(x_t))

    # generator_backward on this world: x_0 = mu + A z with the batch's z and eps (the first draw
    # after its seed), the check's t, the assistant's eps exact: -sigma_t s_{p_sg[theta],t}
    batch, D, huber_c = {}, 2, 5.0  # c near ||y_t|| (~10 with CFG): c's scale shows
    world.generate = lambda g, cond: mu + batch["z"] @ A.T
    world.sample_t = lambda n, device: t.expand(n)
    world.assistant, world.eps_psi = nn.Module(), lambda s_psi, x, t, cond: -s * s_sg(x)

    pieces = {  # exact per-sample objectives of x_t; of x_0, the reward r(x_0, c) = scale x_0[0]
        "huber": lambda x: div(x, "ref_c", "pseudo_huber"), "l2": lambda x: div(x, "ref_c", "l2"),
        "huber cfg": lambda x: div(x, "ref_cfg", "pseudo_huber"), "kl": kl_exact,
        "-r cfg": lambda x: world.log_prob(x, a, s, None) - world.log_prob(x, a, s, 0),  # -(3.7)
        "r": lambda x: world.reward(batch["x0"], 0),
        "huber cfg c": lambda x: div(x, "ref_cfg", "pseudo_huber", huber_c * D**0.5 / s),
        "huber cfg c_eps": lambda x: div(x, "ref_cfg", "pseudo_huber", huber_c * D**0.5)}
    huber = dict(distance="pseudo_huber", c=c_huber)
    # generator_loss's weights on the score scale (the table before diffuse); reward 100
    w_huber, w_l2, w_kl, w_cfg = s / D**0.5, s**2 / D, s / D, alpha_cfg * s / D
    in_rew = dict(divergence="pseudo_huber", huber_c=huber_c, alpha_rew=100.0, cfg="in",
                  alpha_cfg=alpha_cfg)
    l2_out = dict(divergence="l2", alpha_rew=0.0, cfg="out", alpha_cfg=alpha_cfg)
    kl_rew = dict(divergence="kl", alpha_rew=100.0, alpha_cfg=0.0)
    rows = [  # (name, tractable loss of (x_t, cond score) or generator_backward's objective,
              #  exact objective {piece: weight}, should match)
        ("eq 3.4 pseudo-Huber (Thm 3.1)",
         lambda x, e: score_divergence_loss(x, e, s_sg, s_c, **huber), {"huber": 1}, True),
        ("eq 3.4 l2 (Thm 3.1)", lambda x, e: score_divergence_loss(x, e, s_sg, s_c, distance="l2"),
         {"l2": 1}, True),
        ("  wrong: x_t detached inside d'", lambda x, e: detached(x, e, "d'"), {"huber": 1}, False),
        ("  wrong: x_t detached in 2nd s_psi", lambda x, e: detached(x, e, "2nd"), {"huber": 1},
         False),
        ("kl_loss vs closed-form KL", lambda x, e: kl_loss(x, s_sg, s_c), {"kl": 1}, True),
        ("cfg_reward_loss (Thm 3.2, sign -)", lambda x, e: cfg_reward_loss(x, s_c, s_u),
         {"-r cfg": 1}, True),
        ("  printed sign + (eqs 3.5, 3.6)", lambda x, e: -cfg_reward_loss(x, s_c, s_u),
         {"-r cfg": 1}, False),
        ("choice 2: cfg_score reference", lambda x, e: score_divergence_loss(
            x, e, s_sg, lambda y: cfg_score(s_c(y), s_u(y), omega), **huber), {"huber cfg": 1},
         True),
        ("  printed choice 2: s_c + a s_u", lambda x, e: score_divergence_loss(
            x, e, s_sg, lambda y: s_c(y) + alpha_cfg * s_u(y), **huber), {"huber cfg": 1}, False),
    ] + [("  wrong: v to eps as x_s + s v", lambda x, e: score_divergence_loss(
        x, e, s_sg, lambda y: ref_score(y, 0, lambda x_s, v, s: x_s + s * v), **huber),
        {"huber": 1}, False)] * (process == "flow") + [
        ("  wrong: v to eps as x_0, a x_t - s v", lambda x, e: score_divergence_loss(
            x, e, s_sg, lambda y: ref_score(y, 0, lambda x_t, v, a, s: a * x_t - s * v), **huber),
         {"huber": 1}, False)] * (process == "v") + [
        ("generator_backward: ph, cfg in, reward", in_rew, {"r": -100, "huber cfg c": w_huber},
         True),
        ("  wrong: ph weight sigma_t / D", in_rew, {"r": -100, "huber cfg c": w_kl}, False),
        ("  wrong: ph c = huber_c sqrt(D)", in_rew, {"r": -100, "huber cfg c_eps": w_huber}, False),
        ("generator_backward: l2, cfg out", l2_out, {"l2": w_l2, "-r cfg": w_cfg}, True),
        ("  wrong: l2 weight sigma_t / D", l2_out, {"l2": w_kl, "-r cfg": w_cfg}, False),
        ("  wrong: cfg weight a sigma_t^2 / D", l2_out, {"l2": w_l2, "-r cfg": w_cfg * s}, False),
        ("generator_backward: KL, reward", kl_rew, {"r": -100, "kl": w_kl}, True),
        ("  wrong: KL weight sigma_t^2 / D", kl_rew, {"r": -100, "kl": w_l2}, False)]
    flat = lambda grads: torch.cat([v.flatten() for v in grads])  # (6,): 2 for mu, 4 for A
    diffs, exacts = [[] for _ in rows], [[] for _ in rows]
    with torch.random.fork_rng(devices=[]):  # generator_backward's draws leave training's stream
        for b in range(n_batches):  # every row sees the same samples: each gradient once a batch
            z = batch["z"] = torch.randn(n // n_batches, 2, dtype=dt, generator=gen)
            batch["seed"] = torch.randint(2**62, (), generator=gen).item()
            torch.manual_seed(batch["seed"])
            eps, x0 = torch.randn_like(z), mu + z @ A.T  # eps: diffuse's draw
            x_t, batch["x0"] = a * x0 + s * eps, x0  # reparameterised: carry the theta-gradient
            # the exact objectives' references: q_t(. | c)'s score, the CFG-enhanced one's
            batch.update(ref_c=world.score(x_t.detach(), a, s, 0), ref_cfg=s_cfg_exact(x_t))
            done = {}

            def theta_grad(key, loss):  # its theta-gradient, once a batch
                if key not in done and isinstance(loss, dict):  # generator_backward's, in (mu, A)
                    world.cfg, mu.grad, A.grad = replace(Config(), **loss), None, None
                    torch.manual_seed(batch["seed"])
                    generator_backward(world, None, 0)
                    done[key] = flat((mu.grad, A.grad))
                elif key not in done:
                    done[key] = flat(torch.autograd.grad(loss().mean(), (mu, A), retain_graph=True))
                return done[key]
            for i, (name, tractable, exact, _) in enumerate(rows):
                grad_ex = sum(w * theta_grad(k, lambda: pieces[k](x_t)) for k, w in exact.items())
                grad_tr = (theta_grad(str(tractable), tractable) if isinstance(tractable, dict) else
                        theta_grad(name, lambda: tractable(x_t, -eps / s)))
                diffs[i].append(grad_tr - grad_ex)
                exacts[i].append(grad_ex)
    results = []
    for (name, _, _, should_match), diff, exact in zip(rows, diffs, exacts):
        err, grad_ex = torch.stack(diff).mean(0), torch.stack(exact).mean(0)
        se = torch.stack(diff).std(0) / math.sqrt(n_batches)  # standard error of err
        tol = max(float(4 * se.norm() / grad_ex.norm()), 1e-9)  # 1e-9: rounding
        rel = {k: (err[i].norm() / grad_ex[i].norm()).item()
               for k, i in (("all", slice(None)), ("mu", slice(0, 2)), ("A", slice(2, 6)))}
        ok = (rel["all"] <= tol) == should_match
        results.append(dict(name=name, rel=rel, tol=tol, should_match=should_match, ok=ok))
    return results

def print_gradient_check(results, process="vp"):
    print("gradient check: relative error of each loss's theta-gradient vs the exact one (2-D "
          f"Gaussians, float64{', the flow process (1 - s, s): SD3' * (process == 'flow')}"
          f"{', the reference read through v-prediction: SD2.1' * (process == 'v')})")
    print(f"{'loss':38s} {'mu':>8s} {'A':>8s} {'all':>8s} {'MC tol':>8s}  verdict")
    for r in results:
        verdict = "matches" if r["should_match"] else "differs, as it should"
        print(f"{r['name']:38s} {r['rel']['mu']:8.4f} {r['rel']['A']:8.4f} {r['rel']['all']:8.4f} "
              f"{r['tol']:8.4f}  {verdict if r['ok'] else 'FAILED'}")

BUILTIN_PROMPTS = ["a photo of a cat sitting on a windowsill", "the skyline of New York at dusk",
                   "a shiba inu wearing a red scarf", "a volcano exploding next to a marina",
                   "a bowl of ramen, studio lighting", "an astronaut riding a horse on the moon",
                   "a watercolor painting of a lighthouse", "a cozy cabin in a snowy forest"]

class ClipReward(nn.Module):
    """r(x, c) = cos(CLIP_image(x), CLIP_text(c)): PickScore with PickScore_v1, CLIP score with
    any other CLIPModel. alpha_rew multiplies this raw cosine (~0.22 for PickScore), not the x100
    logit. model, processor: paths, or a CLIPModel and a CLIPProcessor."""

    def __init__(self, model, processor, dtype=torch.float32):
        super().__init__()
        from transformers import AutoProcessor, CLIPModel

        if isinstance(processor, str):
            processor = load("reward_processor", processor, AutoProcessor.from_pretrained,
                             processor)
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
        # no attention mask, as in SDXL's encode_prompt: CLIP's text attention is causal and the
        # features are read at the end token, so the padding after it changes nothing
        ids = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=77,
                             return_tensors="pt").input_ids.to(self.mean.device)
        f = self.model.get_text_features(input_ids=ids).pooler_output.float()
        return F.normalize(f, dim=-1)  # (B, P)

    def forward(self, images, text_features):
        """images (B, 3, H, W) in [0, 1] -> cosine similarity (B,), differentiable: the processor's
        resize of the short side (bicubic), centre crop and mean/std, in torch."""
        h, w = images.shape[-2:]
        s = self.size / min(h, w)
        x = F.interpolate(images, size=(round(h * s), round(w * s)), mode="bicubic", antialias=True)
        top, left = (x.shape[-2] - self.crop[0]) // 2, (x.shape[-1] - self.crop[1]) // 2
        x = x[..., top:top + self.crop[0], left:left + self.crop[1]]
        x = ((x - self.mean) / self.std).to(self.model.dtype)
        f = self.model.get_image_features(pixel_values=x).pooler_output.float()
        return (F.normalize(f, dim=-1) * text_features).sum(-1)


# -----------------------------------------------------------------------------
# the command line: argparse built from Config; a bad value is one line naming its flag

CHOICES = dict(model=("sdxl", "sd3", "sd"), cfg=("in", "out"),
               divergence=("pseudo_huber", "l2", "kl"),
               precision=("bf16", "fp32"), dtype=("fp16", "bf16", "fp32"),  # dtype: sample.py
               lora_targets=("all", "attn_ff", "attn"))
AT_LEAST = dict(batch_size=1, max_steps=0, assistant_steps=0, lr_g=0, lr_psi=0, beta1=0, beta2=0,
                weight_decay=0, grad_clip=0, max_skips=1, log_interval=1, ckpt_interval=1,
                sample_interval=1, keep_checkpoints=1, world_size_plan=0, peak_tflops=0,
                bench_reps=1, bench_warmup=0, t_min=0, resolution=8, lora_rank=0)

class ConfigError(ValueError):
    """A bad command line: main prints it as one line and exits 2."""

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line naming the flag: no usage dump, no traceback
        raise ConfigError(message.replace("argument ", "") + self.did_you_mean(message))

    def did_you_mean(self, message):
        """For a misspelled flag (--max_step=4), the closest real ones, by difflib on the names."""
        if not message.startswith("unrecognized arguments: "):
            return ""
        names = [o[2:] for o in self._option_string_actions if o.startswith("--")]
        typed = [a[2:].split("=")[0].replace("-", "_") for a in message.split(": ", 1)[1].split()
                 if a.startswith("--")]
        close = [f"--{m}" for t in typed for m in difflib.get_close_matches(t, names, n=1)]
        return f"; did you mean {', '.join(dict.fromkeys(close))}?" if close else ""

def to_bool(v):
    if v.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"takes true or false, not {v!r}")
    return v.lower() in ("true", "1")

def make_parser(cls, prog, defaults=None, add_help=True, epilog=None):
    """argparse from a config dataclass: --key=value, a bare --flag is True, comments are help."""
    # the class's lines cut from its module's text: inspect.getsource(cls) parses the whole file
    body = re.search(rf"^class {cls.__name__}\b.*?(?=^\S)", inspect.getsource(sys.modules[
        cls.__module__]), re.M | re.S).group()
    helps = dict(re.findall(r"^ +(\w+): \w+ = .*?# (.*)$", body, re.M))
    p = Parser(prog=prog, allow_abbrev=False, description=sys.modules[cls.__module__].__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter, add_help=add_help,
               epilog=epilog)
    for f in fields(cls):
        default = (defaults or {}).get(f.name, f.default)
        kw = dict(nargs="?", const=True, type=to_bool) if f.type is bool else dict(type=f.type)
        p.add_argument(f"--{f.name}", default=default, choices=CHOICES.get(f.name),
                       metavar="true|false" if f.type is bool else f.type.__name__.upper(),
                       help=f"{helps.get(f.name, '')} (default: {default!r})", **kw)
    return p

def check_at_least(cfg, bounds):
    for key, low in bounds.items():
        if getattr(cfg, key) < low:
            raise ConfigError(f"--{key} must be >= {low}, got {getattr(cfg, key)}")

def modes_help():
    """--help's last lines: the defaults each mode replaces (each flag's line shows SDXL's unless
    the command line names a mode)."""
    modes = {"toy": TOY_DEFAULTS, "tiny": TINY_DEFAULTS, "dry_run": DRY_RUN_DEFAULTS,
             "ablation": ABLATION_DEFAULTS, "lora_rank": LORA_DEFAULTS, "model=sd3": SD3_DEFAULTS,
             "model=sd": SD_DEFAULTS}
    lines = [textwrap.fill(" ".join(f"--{k}={v}" for k, v in d.items()), 100,
                           initial_indent=f"  {'--' + m:13s}", subsequent_indent=" " * 15)
             for m, d in modes.items()]
    return "\n".join(["each mode replaces these defaults (the command line still wins):", *lines])

def parse_args(argv):
    mode = make_parser(Config, "distar.py", add_help=False).parse_known_args(argv)[0]
    defaults = (TOY_DEFAULTS if mode.toy else TINY_DEFAULTS if mode.tiny
                else DRY_RUN_DEFAULTS if mode.dry_run else {})
    model = {} if mode.toy else dict(sd3=SD3_DEFAULTS, sd=SD_DEFAULTS).get(mode.model, {})
    defaults = {**(LORA_DEFAULTS if mode.lora_rank else {}), **model,  # the toy keeps its own
                **defaults, **(ABLATION_DEFAULTS if mode.ablation else {})}
    parser = make_parser(Config, "distar.py", defaults, epilog=modes_help())
    cfg = Config(**vars(parser.parse_args(argv)))
    check_at_least(cfg, AT_LEAST)
    given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    checks = [
        (cfg.toy + cfg.tiny + cfg.dry_run > 1, "--toy, --tiny and --dry_run are different worlds"),
        (cfg.ablation and not cfg.toy, "--ablation is a toy experiment: use --toy --ablation"),
        (cfg.ablation and bool(given & {*ROW_FLAGS, "resume", "resume_if_any"}),
         f"--ablation sets --{', --'.join(ROW_FLAGS)} per row and always starts afresh"),
        (cfg.bench and cfg.toy, "--bench times the SDXL world, not --toy"),
        (cfg.compile and cfg.toy, "--compile is for the SDXL world: the toy's nets are tiny MLPs"),
        (cfg.dry_run and (cfg.resume or cfg.resume_if_any),
         "--dry_run writes no checkpoints: nothing to --resume"),
        (cfg.dry_run and cfg.max_steps < 2, "--dry_run needs --max_steps >= 2 (1 is warm-up)"),
        (cfg.resolution % 8 != 0, f"--resolution must be a multiple of 8, got {cfg.resolution}"),
        (not cfg.t_min <= cfg.t_max <= 999, f"need --t_min <= --t_max <= 999, got {cfg.t_min}"
         f" and {cfg.t_max}"),
        (not (cfg.beta1 < 1 and cfg.beta2 < 1), "--beta1 and --beta2 must be < 1"),
        (cfg.huber_c <= 0, f"--huber_c must be > 0, got {cfg.huber_c}"),
        (cfg.lora_rank and cfg.toy, "--lora_rank adapts SDXL UNets; the toy trains whole MLPs"),
        (not cfg.t5 and cfg.model != "sd3", "--t5 is SD3's text encoder: use it with --model=sd3"),
        (cfg.fsdp and cfg.toy, "--fsdp shards SDXL's UNets; the toy's MLPs run under DDP"),
        (cfg.fsdp and "RANK" not in os.environ and not cfg.dry_run,  # a plan needs no ranks
         "--fsdp shards the UNets over torchrun's processes: launch it with torchrun "
         "(--nproc_per_node=1 works too)"),
        (cfg.lora_alpha <= 0, f"--lora_alpha must be > 0, got {cfg.lora_alpha}"),
        ((cfg.resume or cfg.resume_if_any) and cfg.overwrite,
         "--resume continues a run, --overwrite deletes it: choose"),
        ((cfg.bench or cfg.ablation) and int(os.environ.get("WORLD_SIZE", 1)) > 1,
         "--bench and --ablation run in one process: use python, not torchrun"),
    ]
    for bad, message in checks:
        if bad:
            raise ConfigError(message)
    return cfg

# -----------------------------------------------------------------------------
# checkpoints, written whole or not at all. {out_dir}/checkpoint-{step:06d}/ holds generator/ and
# assistant/ (diffusers UNet folders; with --lora_rank the adapters, see save_lora; the toy's nets
# as model.safetensors), state.pt (optimizer and RNG states; under --fsdp RNG states only, the
# AdamW states in optimizer/, each rank's shards, sharded_optimizers) and state.json (step,
# config), written last. Rank 0 writes into a hidden folder and renames it into place, so a crash
# never leaves a checkpoint that looks complete nor harms an earlier one.

CKPT_RE = r"checkpoint-\d{6}"

def list_checkpoints(out_dir):
    names = sorted(d for d in (os.listdir(out_dir) if os.path.isdir(out_dir) else [])
                   if re.fullmatch(CKPT_RE, d)
                   and os.path.isfile(os.path.join(out_dir, d, "state.json")))  # complete
    return [os.path.join(out_dir, d) for d in names]

def save_net(net, path, sd=None):
    """sd: a sharded net's weights, gathered (gather_state_dict): rank 0 saves them instead."""
    if getattr(net, "peft_config", None):  # --lora_rank: the adapter alone (save_lora)
        save_lora(net, path, sd)
    elif hasattr(net, "save_pretrained"):  # diffusers UNet: config.json + safetensors shards
        (net if sd is None else unsharded(net, sd)).save_pretrained(path)
    else:  # toy MLP
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()},
                  os.path.join(path, "model.safetensors"))

def load_net(net, path):
    """A saved net's weights into net, on one process (a sharded net: restore_checkpoint)."""
    load_state_dict(net, read_net(net, path), strict=not getattr(net, "peft_config", None))

def read_net(net, path):
    """save_net's folder as net's own state dict on the CPU (a LoRA: its adapter, under peft's
    names), checked against net's names and shapes: a misfit is a LoadError on the rank that reads,
    not a failure inside the collective that loads a sharded net."""
    from safetensors.torch import load_file

    if lora := getattr(net, "peft_config", None):
        file = os.path.join(path, LORA_FILE)
        if not os.path.isfile(file):
            raise LoadError(f"--resume: {path} holds no {LORA_FILE} (the run was not a LoRA run)")
        # the file's keys are diffusers' (prefix unet. or transformer.); peft's name the adapter
        # after lora_A / lora_B: ...to_q.lora_A.weight is ...to_q.lora_A.default.weight
        prefix = lora_prefix(net)[0] + "."
        sd = {re.sub(r"\.(lora_[AB])\.", r".\1.default.", k.removeprefix(prefix)): v
              for k, v in load_file(file).items()}
        want = {k: p.shape for k, p in net.named_parameters() if ".lora_" in k}
    else:
        sd = {k: v for name in sorted(os.listdir(path)) if name.endswith(".safetensors")
              for k, v in load_file(os.path.join(path, name)).items()}
        want = {k: v.shape for k, v in net.state_dict().items()}
    if {k: v.shape for k, v in sd.items()} != want:
        what = "--lora_targets (another layer set) or --lora_rank" if lora else "this run's net"
        raise LoadError(f"--resume: {path} does not fit {what}")
    return sd

def save_checkpoint(cfg, step, world, opt_g, opt_psi, dist_info):
    rank, world_size, device = dist_info
    nets = dict(generator=world.generator, assistant=world.assistant)
    opts = dict(opt_g=(world.generator, opt_g), opt_psi=(world.assistant, opt_psi))
    sharded = is_sharded(world.generator)  # --fsdp
    rng = dict(cpu=torch.get_rng_state(), **(
        dict(cuda=torch.cuda.get_rng_state(device)) if device.type == "cuda" else {}))
    rngs = [rng] * world_size
    if world_size > 1:
        dist.all_gather_object(rngs, rng)
    tmp = os.path.join(cfg.out_dir, f".tmp-checkpoint-{step:06d}")
    # all_ok in place of barriers: a write that fails (a full disk) stops every rank at once
    with all_ok(dist_info):  # an empty folder; a crashed save's or prune's leftovers go
        if rank == 0:
            for left in glob.glob(os.path.join(cfg.out_dir, ".tmp-checkpoint-" + "[0-9]" * 6)):
                shutil.rmtree(left, ignore_errors=True)
            os.makedirs(tmp)
    # --fsdp: every rank writes its own AdamW shards (DCP: a collective, so outside all_ok; it
    # reports one rank's failure on every rank), and takes part in gathering the weights
    if sharded:
        sharded_optimizers(opts, os.path.join(tmp, "optimizer"))
    gathered = {k: gather_state_dict(net) if sharded else None for k, net in nets.items()}
    with all_ok(dist_info):  # every file is written
        if rank == 0:
            for k, net in nets.items():
                save_net(net, os.path.join(tmp, k), gathered[k])
            state = {} if sharded else {k: opt.state_dict() for k, (_, opt) in opts.items()}
            torch.save(dict(state, rng=rngs), os.path.join(tmp, "state.pt"))
    del gathered
    with all_ok(dist_info):  # rank 0 saves, then everyone goes on
        if rank == 0:
            final = os.path.join(cfg.out_dir, f"checkpoint-{step:06d}")
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump(dict(step=step, world_size=world_size, fsdp=sharded, config=asdict(cfg)),
                          f, indent=1)
            fsync_tree(tmp)  # on disk before it looks complete: durable after a power cut too
            if os.path.exists(final):  # the same step saved again: swap, then drop the old copy
                os.rename(final, tmp + ".old")
            os.rename(tmp, final)  # atomic: the checkpoint appears complete or not at all
            fsync(cfg.out_dir)  # the rename itself
            shutil.rmtree(tmp + ".old", ignore_errors=True)
            for old in list_checkpoints(cfg.out_dir)[:-cfg.keep_checkpoints]:
                # renamed out of the complete ones first: a delete cut short leaves no half of one
                gone = os.path.join(cfg.out_dir, ".tmp-" + os.path.basename(old))
                os.rename(old, gone)
                shutil.rmtree(gone)

def load_checkpoint(cfg, world, opt_g, opt_psi, dist_info):
    """Restore the newest complete checkpoint in out_dir (there is one: resolve_resume) that loads
    (one whose weights do not, truncated by a crash, is said and the one before it tried); returns
    the step to go on from."""
    world_size = dist_info[1]
    chosen = [list_checkpoints(cfg.out_dir)]
    if world_size > 1:  # rank 0's list, so that every rank continues the same checkpoint
        dist.broadcast_object_list(chosen, 0)
    paths = chosen[0]
    for i in reversed(range(len(paths))):
        try:
            with all_ok(dist_info):  # all ranks go on from one checkpoint, or all go back one
                return restore_checkpoint(cfg, world, opt_g, opt_psi, dist_info, paths[i])
        except Exception as e:  # here, or on another rank (RankFailed): the same on every rank
            if i > 0:
                if getattr(e, "first_to_fail", False):  # the rank that knows why says it
                    print(f"resume: {os.path.basename(paths[i])} does not load ({first_line(e)});"
                          f" using {os.path.basename(paths[i - 1])}", flush=True)
                continue
            if isinstance(e, (LoadError, RankFailed)):  # one line already
                raise
            err = LoadError(f"--resume: {paths[0]} does not load ({first_line(e)})")
            err.first_to_fail = e.first_to_fail
            raise err from None
    return 0  # none left: deleted since resolve_resume looked, so start at step 0

def restore_checkpoint(cfg, world, opt_g, opt_psi, dist_info, path):
    rank, world_size, device = dist_info
    with open(os.path.join(path, "state.json")) as f:
        saved = json.load(f)
    step, opts = saved["step"], dict(opt_g=(world.generator, opt_g),
                                     opt_psi=(world.assistant, opt_psi))
    if not os.path.isfile(os.path.join(path, "state.pt")):
        raise LoadError(f"--resume: {path} has no state.pt, so it cannot be resumed")
    nets, full = dict(generator=world.generator, assistant=world.assistant), {}
    sharded = is_sharded(world.generator)  # --fsdp
    with all_ok(dist_info):  # each rank's own reads: the collectives below only if all succeeded
        for k, net in nets.items():
            if not sharded:
                load_net(net, os.path.join(path, k))
            elif rank == 0:  # --fsdp: one read off the filesystem, not one per rank
                full[k] = read_net(net, os.path.join(path, k))
        # on the CPU and memory-mapped: a page is read only when its tensor is copied. AdamW's
        # load_state_dict puts every state on its parameter's device, fused AdamW's step too
        state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True,
                           mmap=True)
    if sharded:  # rank 0's weights, broadcast, each rank keeping its shards; then its AdamW shards
        for k, net in nets.items():
            load_state_dict(net, full.pop(k, {}), strict=not getattr(net, "peft_config", None),
                            from_rank0=True)
        sharded_optimizers(opts, os.path.join(path, "optimizer"), load=True)  # resharded if need be
    for name, (_, opt) in opts.items():
        if name in state:
            opt.load_state_dict(state[name])
    for opt, lr in ((opt_g, cfg.lr_g), (opt_psi, cfg.lr_psi)):
        for group in opt.param_groups:  # the command line wins over the saved hyperparameters
            group.update(lr=lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    if saved["world_size"] == world_size:  # each rank continues its own random stream
        torch.set_rng_state(state["rng"][rank]["cpu"])
        if device.type == "cuda" and "cuda" in state["rng"][rank]:
            torch.cuda.set_rng_state(state["rng"][rank]["cuda"], device)
    elif rank == 0:
        print(f"resume: saved with {saved['world_size']} ranks, now {world_size}: new RNG streams")
    if rank == 0:
        trim_metrics(cfg.out_dir, step)
        print(f"resumed from {path} (step {step})")
    return step

# -----------------------------------------------------------------------------
# before anything loads: SDXL needs a GPU, and a checkpoint resumes in its own mode. The out_dir
# holds one run (--resume continues it; a fresh run refuses another run's checkpoints or starts it
# over), and all ranks see one folder

RUN_OUTPUTS = (CKPT_RE, r"\.tmp-checkpoint-\d{6}(\.old)?", r"metrics\.jsonl", r"samples-\d{6}\.png",
               r"toy\.png", r"toy_samples\.safetensors")  # {out_dir}/tiny, a cache, stays

def check_sdxl_run(cfg, device):
    """Before anything loads (tens of GB on a first run): the user's own files first (prompts, an
    out_dir this run may write to, a local --pretrained), free to fix, then a GPU unless asked for
    the CPU. A hub id's pipeline is checked after the start line says what loads (run_sdxl)."""
    read_prompts(cfg.prompts)
    # a fresh run must not prune or later resume another run's checkpoints (GPU hours each)
    ckpts = [] if cfg.bench else list_checkpoints(cfg.out_dir)  # --bench writes no checkpoints
    if ckpts and not (cfg.resume or cfg.overwrite or cfg.tiny):
        raise LoadError(f"{cfg.out_dir} holds checkpoints of another run (newest {ckpts[-1]}): "
                        "pass --resume to continue it, or --overwrite to start over")
    if not cfg.tiny and os.path.isdir(cfg.pretrained):  # --tiny builds its own
        check_pipeline(cfg)
    if device.type != "cuda" and not (cfg.tiny or cfg.allow_cpu):
        name = cfg.model.upper()
        raise ConfigError(f"training {name} needs a GPU and none is visible: try --toy (2-D, "
                          f"seconds), --tiny (tiny random {name}-shaped models) or --dry_run (the "
                          "memory plan); --allow_cpu runs it here anyway")

# what a checkpoint must share with the run that resumes it (another world's weights do not fit;
# --tiny would build its models inside another run's out_dir), and what it may change but is told
MODE_KEYS = ("toy", "tiny", "model",  # another family's weights do not fit
             "lora_rank", "lora_targets",  # a LoRA of another shape does not fit
             "lora_alpha",  # alpha scales the saved adapter: another one is another generator
             "fsdp")  # --fsdp's AdamW states are DCP shards, DDP's one state.pt
OBJECTIVE_KEYS = ("divergence", "cfg", "alpha_rew", "alpha_cfg", "huber_c", "t_min", "t_max",
                  "assistant_steps", "resolution", "batch_size", "conditioning_t", "t5")

def check_resume(cfg, rank):
    """--resume, before anything loads or is written: the newest checkpoint's state.json must be of
    this run's mode; a changed objective (a new --divergence, say) is allowed but said, once."""
    ckpts = list_checkpoints(cfg.out_dir)
    if not (cfg.resume and ckpts):
        return
    with open(os.path.join(ckpts[-1], "state.json")) as f:
        saved = {**asdict(Config()), **json.load(f)["config"]}  # a key added since: its default
    now = asdict(cfg)
    lora = saved["lora_rank"] and now["lora_rank"]  # an adapter's shape, if both have one
    differ = [k for k in MODE_KEYS
              if saved[k] != now[k] and (lora or k not in ("lora_targets", "lora_alpha"))]
    flags = lambda c: " ".join(f"--{k}={c[k]}" for k in differ)
    if differ:
        raise LoadError(f"--resume: {ckpts[-1]} was saved by a run with {flags(saved)}, not "
                        f"{flags(now)}: resume it with those, or give this run another --out_dir")
    changed = [f"--{k} {saved[k]} -> {now[k]}" for k in OBJECTIVE_KEYS if saved[k] != now[k]]
    if changed and rank == 0:
        print(f"resume: the objective differs from {ckpts[-1]}'s: {', '.join(changed)}", flush=True)

def resolve_resume(cfg, rank):
    """cfg with resume set to what this run does. --resume needs a checkpoint: without one, a typo
    in --out_dir would start a fresh run, hours of GPU time unnoticed. --resume_if_any (a
    scheduler's requeue: the same command each time) resumes where there is one, else starts."""
    ckpts = list_checkpoints(cfg.out_dir)
    if cfg.resume_if_any:
        if not ckpts and rank == 0:
            print(f"resume: no complete checkpoint in {cfg.out_dir}; starting at step 0",
                  flush=True)
        return replace(cfg, resume=bool(ckpts))
    if cfg.resume and not ckpts:
        what = "holds no complete checkpoint" if os.path.isdir(cfg.out_dir) else "does not exist"
        raise ConfigError(f"--resume: --out_dir={cfg.out_dir} {what}: check the folder, or pass "
                          "--resume_if_any to start at step 0 where there is no checkpoint")
    return cfg

def start_out_dir(cfg, dist_info):
    """Once the models have loaded: unless this run continues a checkpoint, remove what an
    earlier run wrote (check_sdxl_run allowed it). Rank 0 removes, the others wait. Then, under
    torchrun, check that every rank sees the same out_dir (shared_out_dir)."""
    rank, world_size, _ = dist_info
    if rank == 0:
        os.makedirs(cfg.out_dir, exist_ok=True)
        if not (cfg.resume and list_checkpoints(cfg.out_dir)):
            old = [n for n in sorted(os.listdir(cfg.out_dir))
                   if any(re.fullmatch(p, n) for p in RUN_OUTPUTS)]
            for name in old:
                path = os.path.join(cfg.out_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            if old:
                print(f"starting over in {cfg.out_dir}: removed {', '.join(old)} of an earlier run"
                      " (--resume continues a run)")
    barrier(world_size)
    shared_out_dir(cfg.out_dir, dist_info)

def shared_out_dir(out_dir, dist_info):
    """Every rank reads a checkpoint on --resume (and writes its AdamW shards under --fsdp), so on
    several nodes out_dir must be on a filesystem they share: found out now, not at the first
    checkpoint hours later. Rank 0 leaves a file there that every rank must see."""
    rank, world_size, device = dist_info
    if world_size == 1:
        return
    token = [os.urandom(8).hex()]
    dist.broadcast_object_list(token, 0)
    probe = os.path.join(out_dir, f".probe-{token[0]}")
    if rank == 0:
        open(probe, "w").close()
    barrier(world_size)
    missing = torch.tensor(float(not os.path.isfile(probe)), device=device)
    dist.all_reduce(missing, op=dist.ReduceOp.MAX)  # after every rank has looked
    if rank == 0:
        os.remove(probe)
    if missing.item():
        raise ConfigError(f"--out_dir={out_dir} is not the same folder on every node: put it on a "
                          "filesystem that all of them share")

def interrupted(cfg, step):
    """main's line on Ctrl-C: how far the run got, and how to continue it."""
    if cfg is None or cfg.dry_run or cfg.bench or cfg.ablation:  # nothing to resume
        return "stopped (Ctrl-C)"
    done = f"stopped after step {step} of {cfg.max_steps}" if step is not None else "stopped"
    ckpts = list_checkpoints(cfg.out_dir)
    if not ckpts:
        return (f"{done} (Ctrl-C); no complete checkpoint in {cfg.out_dir} yet, so nothing to "
                "resume: run the command again to start over")
    return (f"{done} (Ctrl-C); newest complete checkpoint {ckpts[-1]}: the same command with "
            "--resume continues from it")

def trim_metrics(out_dir, step):
    """On resume: drop the metrics lines logged after the checkpoint, as those steps run again."""
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if os.path.isfile(metrics):
        with open(metrics) as f:
            lines = [line for line in f if logged_step(line) <= step]
        with open(metrics + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(metrics + ".tmp", metrics)

def logged_step(line):
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):  # an empty line, or one cut short by a kill
        return math.inf

def log_line(m, max_steps):
    """metrics as one plain line, for logs where no progress bar is shown (SLURM, nohup)."""
    keys = ("loss_g", "loss_rew", "loss_div", "loss_cfg", "loss_psi", "reward", "grad_norm")
    return (f"step {m['step']}/{max_steps} " + " ".join(f"{k} {m[k]:.4g}" for k in keys)
            + f" skipped {m['skipped']} sec/step {m['sec_assistant'] + m['sec_generator']:.3g}")

# -----------------------------------------------------------------------------
# several ranks: an error on some ranks only (a file missing on one node, a hub or disk error,
# memory on rank 0 while it saves) stops every rank at once, as one line, instead of leaving the
# others waiting in their next collective; the waits for loading and for rank 0's writes have a
# long timeout of their own, training's collectives a short one. And checkpoints on disk.

SLOW_GROUP = None  # setup_distributed's group for long waits: barrier, all_ok
SLOW_TIMEOUT = datetime.timedelta(hours=1)  # rank 0 writes a ~60 GB checkpoint; first downloads

def start_slow_group():
    """gloo, on the CPU: a barrier there waits for rank 0's writes without a GPU in it (as
    torch.distributed.checkpoint's own planning group does)."""
    global SLOW_GROUP
    SLOW_GROUP = dist.new_group(backend="gloo", timeout=SLOW_TIMEOUT)

def barrier(world_size):
    if world_size > 1:  # in the slow group: rank 0 may be writing a checkpoint (start_slow_group)
        dist.barrier(group=SLOW_GROUP)

class RankFailed(RuntimeError):
    def __init__(self, rank):
        super().__init__(f"rank {rank} failed: its error is in its node's log")
        self.rank = rank

@contextlib.contextmanager
def all_ok(dist_info):
    """Run the block on every rank, then agree (one all-reduce, in the slow group): a rank whose
    block raised raises its error again, marked first_to_fail on the lowest such rank (main reports
    it), every other rank RankFailed naming it. The block itself must not wait for other ranks."""
    (rank, world_size, _), error = dist_info, None
    try:
        yield
    except Exception as e:
        error = e
    # a nested all_ok's RankFailed is that rank's failure, not this one's
    lowest = torch.tensor([error.rank if isinstance(error, RankFailed) else rank if error
                           else world_size])
    if world_size > 1:
        dist.all_reduce(lowest, op=dist.ReduceOp.MIN, group=SLOW_GROUP)
    if error is not None:
        error.first_to_fail = lowest.item() == rank
        raise error
    if lowest.item() < world_size:
        raise RankFailed(lowest.item())

def reports(e, rank, first_on_node):
    """Whether main prints e: the first rank on each node does, and the lowest rank that failed
    where only some did (all_ok), so each node's log holds one line. RankFailed is left out on
    the failed rank's own node (torchrun's ranks are numbered node by node)."""
    if isinstance(e, RankFailed):
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        return first_on_node and e.rank // per_node != rank // per_node
    return first_on_node or getattr(e, "first_to_fail", False)

def first_line(e):
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__

def fsync(path):
    """A file's contents, or a folder's entries, on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

def fsync_tree(path):
    """Every file and folder under path, path too: a rename is atomic, but after a power cut the
    renamed folder may hold truncated files without this."""
    for root, _, names in os.walk(path, topdown=False):
        for name in names:
            fsync(os.path.join(root, name))
        fsync(root)

# -----------------------------------------------------------------------------
# loading models and prompts: local folders, hub ids and state-dict files; a failure is one line
# naming its flag

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

def offline_unless_reachable(*paths, timeout=5):
    """Before anything loads from the hub (paths that are not local; none: nothing to do): one
    quick request (HF_ENDPOINT, proxies: the hub client's own) says whether the hub answers. If
    not, huggingface_hub goes offline, as HF_HUB_OFFLINE=1 would: every load then reads the local
    cache or fails at once in one line (load), instead of retrying each request for ~25 s."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    hub = [p for p in paths if p and not os.path.isabs(p) and not os.path.exists(p)]
    if not hub or constants.HF_HUB_OFFLINE:
        return
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)  # any answer will do
    except Exception:  # no DNS, refused, timed out, a proxy that fails: not reachable
        constants.HF_HUB_OFFLINE = True

def load(flag, value, fn, *args, **kwargs):
    """Run a from_pretrained-style loader; a failure becomes one line naming the flag."""
    try:
        return fn(*args, **kwargs)
    except LoadError:  # from a nested load, which named its own flag
        raise
    except Exception as e:  # OSError, ValueError, HFValidationError, ...: report, do not trace
        first = first_line(e)
        if hub_unreachable(e):  # the hint names what the user asked for, as a local path
            local = "/path/to/" + os.path.basename(value.rstrip("/"))
            first = ("no such local path, the Hugging Face hub could not be reached and the model "
                     f"is not in the local cache; pass a local folder (--{flag}={local})")
        raise LoadError(f"cannot load --{flag}={value}: {first}") from None

def load_parts(cfg, device, frozen):
    """SDXLWorld's (SD3World's) components from cfg's paths, each moved to `device` as soon as it is
    loaded (a node's CPU memory holds one UNet at a time per rank); frozen nets in dtype `frozen`,
    SD3's T5 (unless --t5=false) too, as it loads. --fsdp: the three nets on meta (load_unet)."""
    import diffusers

    pipe = getattr(diffusers, PIPELINES[cfg.model])
    no_t5 = {} if cfg.t5 else dict(text_encoder_3=None, tokenizer_3=None)
    pipe_kw = (dict(unet=None, **(NO_CHECKER if cfg.model == "sd" else {}), dtype=torch.float32)
               if cfg.model != "sd3" else dict(
        transformer=None, **no_t5, dtype=dict(default=torch.float32, text_encoder_3=frozen)))
    return dict(pipe=load("pretrained", cfg.pretrained, pipe.from_pretrained, cfg.pretrained,
                          **pipe_kw).to(device),
                **{k: load_unet(cfg, k, frozen, torch.device("meta") if cfg.fsdp else device)
                   for k in ("s_ref", "assistant", "generator")},
                reward_fn=ClipReward(cfg.reward_model, cfg.reward_processor, frozen).to(device))

def load_unet(cfg, role, frozen, device):
    """The reference, assistant (`pretrained`'s) or generator (--generator_init) as load_parts loads
    it: the reference and LoRA bases in `frozen`, else fp32, on `device`; on meta built from its
    config, no weights read (--fsdp: load_into_shards reads them on rank 0)."""
    path, variant = (cfg.generator_init, cfg.variant or None) if role == "generator" else ("", None)
    dtype = frozen if role == "s_ref" or cfg.lora_rank else torch.float32
    meta = torch.device(device).type == "meta"  # buffers stay real: meta_net computes them
    net = load_generator(path, cfg.pretrained, variant, dtype, model=cfg.model, meta=meta)
    return net if meta else net.to(device)

STATE_DICTS = (".bin", ".pt", ".pth", ".safetensors")  # a UNet's weights as one file
NETS = dict(sdxl=("UNet2DConditionModel", "unet"), sd3=("SD3Transformer2DModel", "transformer"),
            sd=("UNet2DConditionModel", "unet"))

def load_generator(path, pretrained, variant=None, dtype=torch.float32, flag="generator_init",
                   model="sdxl", meta=False):
    """A one-step generator's UNet (--model=sd3: transformer) in `dtype` (default fp32), in any form
    one is published in: "": the UNet of `pretrained`; a diffusers UNet folder, or a pipeline
    folder holding unet/ (both with `variant`, e.g. fp16); a state-dict (unet_from_state_dict).
    meta: built on the meta device from its config, its weights not read."""
    import diffusers

    cls, sub = getattr(diffusers, NETS[model][0]), NETS[model][1]
    unet = lambda folder, sub: (meta_net(cls, cls.load_config(folder, subfolder=sub)).to(dtype)
                                if meta else cls.from_pretrained(folder, subfolder=sub,
                                                                 variant=variant, dtype=dtype))
    if not path:
        return load("pretrained", pretrained, unet, pretrained, sub)
    if path.endswith(STATE_DICTS):
        return load(flag, path, unet_from_state_dict, path, pretrained, cls, sub, meta).to(dtype)
    sub = sub if os.path.isdir(os.path.join(path, sub)) else None  # a pipeline folder
    return load(flag, path, unet, path, sub)

def unet_from_state_dict(path, pretrained, cls, sub, meta=False):
    """A UNet (cls, --model=sd3's transformer) from a .bin/.pt/.pth/.safetensors file, local or on
    the hub as owner/repo/path/in/repo (DMD2's tianweiy/DMD2/dmd2_sdxl_1step_unet_fp16.bin); its
    config: the config.json beside it if any (a release's unet/ folder), else pretrained's sub's."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    from safetensors.torch import load_file

    file, config = path, os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if not os.path.exists(path):  # owner/repo/path/in/repo
        if os.path.isabs(path):
            raise FileNotFoundError("no such file")
        parts = path.split("/")
        repo = "/".join(parts[:2])
        file = path if meta else hf_hub_download(repo, "/".join(parts[2:]))
        try:
            config = hf_hub_download(repo, "/".join(parts[2:-1] + ["config.json"]))
        except EntryNotFoundError:  # none beside it (or offline and not cached)
            config = ""
    config = (cls.load_config(config) if os.path.isfile(config)
              else load("pretrained", pretrained, cls.load_config, pretrained, subfolder=sub))
    unet = meta_net(cls, config)  # no random init of weights about to go
    if not meta:  # the file's tensors become its parameters
        unet.load_state_dict(load_file(file) if file.endswith(".safetensors") else torch.load(
            file, map_location="cpu", weights_only=True), strict=True, assign=True)
    return unet

def meta_net(cls, config):
    """A diffusers net from its config, its parameters on meta (no memory, no init); its buffers
    real (accelerate's default), as the net's constructor computes them."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return cls.from_config(config)

def read_prompts(path):
    if not path:
        return BUILTIN_PROMPTS
    if not os.path.isfile(path):
        raise LoadError(f"--prompts={path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:  # unreadable here (permissions), or not text
        raise LoadError(f"--prompts={path}: cannot read it: {first_line(e)}") from None
    if not prompts:
        raise LoadError(f"--prompts={path}: the file has no prompts (one per line)")
    return prompts

def quiet_libraries():
    """The libraries' warnings and error logs off (a failed load raises, and is reported as one
    line), and their own bars ("Loading weights", "Loading pipeline components"), but not
    huggingface_hub's download bars: a first run shows its tens of GB arriving."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    # diffusers still passes an argument huggingface_hub deprecated: a warning per hub UNet load
    warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated")
    hub_bars = not are_progress_bars_disabled()  # HF_HUB_DISABLE_PROGRESS_BARS=1 still wins
    hub_logging.set_verbosity_error()  # its "Retrying in 8s" lines: a failure is one line
    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity(lib.CRITICAL)
        lib.disable_progress_bar()  # transformers' also turns off the hub's bars
    if hub_bars:
        enable_progress_bars()

# -----------------------------------------------------------------------------
# Scorers' official files (sample.py's ImageReward, aesthetic and HPSv2.1): read strictly into
# transformers' classes, each key renamed, none left over or missing but the listed unused.

# key renames in order: ImageReward.pt's BLIP ViT (timm's names) -> BlipForImageTextRetrieval, as
# transformers' convert_blip_original_pytorch_to_hf.py; open_clip / OpenAI CLIP -> CLIPModel
IR_TO_HF = [(r"^blip\.visual_encoder\.", "blip.vision_model.encoder."), (r"\.blocks\.", ".layers."),
            (r"\.attn\.qkv\.", ".self_attn.qkv."), (r"\.attn\.proj\.", ".self_attn.projection."),
            (r"\.norm1\.", ".layer_norm1."), (r"\.norm2\.", ".layer_norm2."),
            (r"encoder\.norm\.", "post_layernorm."), (r"encoder\.cls_token", "embeddings.class_"
             "embedding"), (r"encoder\.patch_embed\.proj\.", "embeddings.patch_embedding."),
            (r"encoder\.pos_embed", "embeddings.position_embedding")]
OPEN_CLIP_TO_HF = [
    (r"^visual\.transformer\.resblocks\.", "vision_model.encoder.layers."),
    (r"^transformer\.resblocks\.", "text_model.encoder.layers."), (r"\.ln_1\.", ".layer_norm1."),
    (r"\.ln_2\.", ".layer_norm2."), (r"\.attn\.out_proj\.", ".self_attn.out_proj."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."), (r"\.mlp\.c_proj\.", ".mlp.fc2."),
    (r"^visual\.conv1\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual\.class_embedding", "vision_model.embeddings.class_embedding"),
    (r"^visual\.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    (r"^visual\.ln_pre\.", "vision_model.pre_layrnorm."), (r"^visual\.proj$", "visual_projection"),
    (r"^visual\.ln_post\.", "vision_model.post_layernorm."), (r"^ln_final\.", "text_model.final_"
     "layer_norm."), (r"^token_embedding\.", "text_model.embeddings.token_embedding."),
    (r"^positional_embedding", "text_model.embeddings.position_embedding.weight")]

def open_clip_to_hf(sd):
    """An open_clip (OpenAI CLIP) state dict in CLIPModel's names: each fused in_proj split into q,
    k, v; the projections (x @ P there) transposed to Linear weights. Unknown keys keep theirs."""
    out = {}
    for k, v in sd.items():
        for old, new in OPEN_CLIP_TO_HF:
            k = re.sub(old, new, k)
        for i, part in enumerate(v.chunk(3) if ".attn.in_proj_" in k else [v]):  # q, k, v stacked
            key = k.replace("attn.in_proj_", f"self_attn.{'qkv'[i]}_proj.")
            proj = key.endswith("projection")  # (width, dim) there, a Linear's (dim, width) here
            out[key + ".weight" * proj] = part.T if proj else part
    return out

def load_file(flag, path, reader=lambda f: torch.load(f, map_location="cpu", weights_only=True)):
    """reader(file) of a local file or of owner/repo/path/in/repo on the hub (fetched into its
    cache): a state dict, or a dict. Any failure is one line naming the flag."""
    def get():
        if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") < 2:
            out = reader(path)
        else:
            from huggingface_hub import hf_hub_download
            owner, repo, file = path.split("/", 2)
            out = reader(hf_hub_download(f"{owner}/{repo}", file))
        if not isinstance(out, dict):
            raise ValueError("not a state dict")
        return out
    return load(flag, path, get)

def strict_load(flag, path, kind, model, sd, unused=r"$^"):
    """sd's tensors become model's (built on meta), in fp32, every key matched both ways but those
    `unused` matches: else one line naming the first key out of place (a file of another kind)."""
    own = model.state_dict()
    for what, keys in (("unexpected key", [k for k in sd if k not in own]),
                       ("missing key", [k for k in own if k not in sd]),
                       ("wrong shape", [f"{k} {tuple(sd[k].shape)}, not {tuple(own[k].shape)}"
                                        for k in sd if k in own and sd[k].shape != own[k].shape])):
        keys = [k for k in keys if not re.match(unused, k)]
        if keys:
            raise LoadError(f"cannot load --{flag}={path}: not {kind}: {what} {keys[0]}"
                            + f" (and {len(keys) - 1} more)" * (len(keys) > 1))
    model.load_state_dict({k: v.float() for k, v in sd.items() if k in own}, strict=False,
                          assign=True)
    return model.eval().requires_grad_(False)

def mlp_head(sd, prefix=""):
    """ImageReward's MLP and LAION's aesthetic head alike: Linear layers at 0, 2, 4, 6, 7 with
    dropouts between, no activation; 768-1024-128-64-16-1, or the file's widths."""
    ws = [sd.get(f"{prefix}layers.{i}.weight") for i in (0, 2, 4, 6, 7)]
    ok = all(isinstance(w, torch.Tensor) and w.dim() == 2 for w in ws)
    dims = [ws[0].shape[1]] + [w.shape[0] for w in ws] if ok else [768, 1024, 128, 64, 16, 1]
    lin = [nn.Linear(a, b) for a, b in zip(dims, dims[1:])]
    head = nn.Module()
    head.layers = nn.Sequential(*[m for x in lin[:3] for m in (x, nn.Dropout())], *lin[3:])
    return head

# -----------------------------------------------------------------------------
# LoRA (--lora_rank): diffusers' peft integration. Each trained net is its own frozen base plus an
# adapter; the reference keeps a base of its own too, since toggling an adapter on a shared base
# breaks activation checkpointing (backward recomputes a block with the adapter state of then).
# A checkpoint's generator/ is what diffusers' load_lora_weights reads, plus lora_base.json.

_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
_FF = ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
_CONV = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
         "time_emb_proj")
LORA_TARGETS = dict(attn=_ATTN, attn_ff=_ATTN + _FF, all=_ATTN + _FF + _CONV)  # all: DMD2's list
# SD3: diffusers' SD3 LoRA example's eight attention projections (image and text streams, here in
# both attention modules of SD3.5's dual-attention blocks) and both streams' feed-forward layers;
# a transformer has no convolutions, so all is attn_ff
_SD3_ATTN = _ATTN + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_SD3_FF = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
SD3_LORA_TARGETS = dict(attn=_SD3_ATTN, attn_ff=_SD3_ATTN + _SD3_FF, all=_SD3_ATTN + _SD3_FF)
LORA_FILE, LORA_BASE = "pytorch_lora_weights.safetensors", "lora_base.json"

def add_lora(unet, cfg, role):
    """Freeze unet, add a trainable adapter (zero at first: lora_B starts at 0, so the generator
    and assistant start as their bases), its weights fp32 masters also on a bf16 base. role
    (generator or assistant) names the base that lora_base.json records."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    if not getattr(unet, "peft_config", None):  # the dry run builds two worlds of the same parts
        unet.requires_grad_(False)
        targets = (SD3_LORA_TARGETS if cfg.model == "sd3" else LORA_TARGETS)[cfg.lora_targets]
        unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                    target_modules=list(targets)))
    cast_training_params(unet, torch.float32)  # add_adapter makes them in the base's dtype
    local = lambda p: os.path.abspath(p) if p and os.path.exists(p) else p  # hub ids stay
    gen = role == "generator"
    unet.lora_base = dict(pretrained=local(cfg.pretrained), variant=cfg.variant if gen else "",
                          generator_init=local(cfg.generator_init) if gen else "")
    return unet

def save_lora(unet, path, sd=None):
    """The adapter as diffusers saves LoRAs, with its config (without it the loader takes alpha =
    rank); peft's keys unconverted: convert_state_dict_to_diffusers renames only the attention keys,
    and the loader, seeing lora_A first, drops them. sd: a sharded unet's gathered weights."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    prefix, pipe = lora_prefix(unet)
    getattr(diffusers, pipe).save_lora_weights(path, **{
        f"{prefix}_lora_layers": get_peft_model_state_dict(unet, state_dict=sd),
        f"{prefix}_lora_adapter_metadata": unet.peft_config["default"].to_dict()})
    # a local base inside the run's folder (--tiny's models) relative to generator/, so that it
    # moves with the run; other local bases absolute, hub ids as they are
    here = os.path.abspath(path)  # {out_dir}/.tmp-checkpoint-N/generator, renamed at the same depth
    run = os.path.dirname(os.path.dirname(here))
    inside = lambda p: os.path.isabs(p) and os.path.commonpath([p, run]) == run
    with open(os.path.join(path, LORA_BASE), "w") as f:
        json.dump({k: os.path.relpath(v, here) if inside(v) else v
                   for k, v in unet.lora_base.items()}, f, indent=1)

def lora_prefix(net):
    """The LoRA file's key prefix for net and the pipeline class that saves and loads it."""
    sd3 = hasattr(net.config, "joint_attention_dim")  # an SD3Transformer2DModel
    return ("transformer", PIPELINES["sd3"]) if sd3 else ("unet", PIPELINES["sdxl"])

def lora_base(path):
    """The base a LoRA checkpoint's adapter was trained on (its lora_base.json; local paths
    absolute), or None where path holds no LoRA (a UNet folder, a state-dict file, a hub id)."""
    if not os.path.isfile(os.path.join(path, LORA_FILE)):
        return None
    if not os.path.isfile(os.path.join(path, LORA_BASE)):
        raise LoadError(f"{path} holds a LoRA but no {LORA_BASE}, so its base is unknown: pass "
                        "the base as --generator and the LoRA as --lora")
    with open(os.path.join(path, LORA_BASE)) as f:
        base = json.load(f)
    return {k: os.path.abspath(os.path.join(path, v)) if v.startswith("..") else v
            for k, v in base.items()}

# -----------------------------------------------------------------------------
# FSDP (--fsdp): torch's FSDP2 shards the generator, the assistant and the reference (1/n of every
# weight, gradient and AdamW state per rank). The text encoders, the VAE and the reward stay whole:
# ~5 GiB that run once per update on a small batch, and the plan fits without sharding them.

FSDP_UNITS = ("BasicTransformerBlock", "ResnetBlock2D", "JointTransformerBlock")  # last: SD3's

def is_sharded(net):
    from torch.distributed.fsdp import FSDPModule

    return isinstance(net, FSDPModule)

def shard_nets(world, dist_info):
    """--fsdp (else the world as it was): fully_shard each UNet as torchtitan does, one unit per
    transformer and resnet block, then the root (embeddings, conv_in/out, norms), over the ranks
    or, on several nodes, over each node's (mesh_shape). After activation checkpointing and
    --compile are set up, before the optimizers exist (they hold the shards); load_into_shards."""
    if not world.cfg.fsdp:
        return world
    if not dist.is_initialized():
        raise ConfigError("--fsdp shards the UNets over torchrun's processes: launch it with "
                          "torchrun (--nproc_per_node=1 works too)")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    shape = mesh_shape(dist_info[1])
    mesh = init_device_mesh(dist_info[2].type, shape,
                            mesh_dim_names=("replicate", "shard") if len(shape) == 2 else None)
    # --precision=bf16: the fp32 masters are gathered as bf16 (half the traffic), so autocast has
    # no fp32 weight to cast and cache per forward (~4.8 GiB at SDXL size, whatever the GPU
    # count); gradients are reduce-scattered in fp32 into the fp32 masters. The inputs stay as the
    # world makes them (SD3's float timestep, fp32 latents): autocast picks each op's dtype as
    # without --fsdp. torch issue 186998 (fixed after 2.13): a net whose first forward runs with
    # all its weights frozen keeps no fp32 gradient type, and its first update fails. train's
    # assistant phase comes first; with --assistant_steps=0 the assistant's first forward is the
    # generator phase's, frozen, but it is then never trained.
    bf16 = dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    mp = MixedPrecisionPolicy(**bf16 if world.cfg.precision == "bf16" else {})
    for role in ("generator", "assistant", "s_ref"):
        net = getattr(world, role)
        for block in net.modules():
            if type(block).__name__ in FSDP_UNITS:
                fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(net, mesh=mesh, mp_policy=mp)
        net.register_forward_hook(reshard_unless_backward)  # after FSDP's own post-forward hook
        if next(net.parameters()).is_meta:
            load_into_shards(world, role, dist_info)
    return world

def load_into_shards(world, role, dist_info):
    """A sharded net built on meta (load_parts) gets its shards' memory, 1/N per rank (no GPU holds
    it whole), then its weights: rank 0 alone reads it whole on the CPU as load_parts would, one net
    at a time (a node holds one copy, not one per rank), with --lora_rank add_lora's adapter (rank
    0's init for all, lora_B zero), and broadcasts it. A failed read: one line on every rank."""
    net, sd, cfg = getattr(world, role), {}, world.cfg
    buffers = dict(net.named_buffers())  # real (meta_net); to_empty leaves them uninitialised
    net.to_empty(device=world.device)
    for k, b in net.named_buffers():  # those not in the state dict keep their computed values
        b.copy_(buffers[k])
    with all_ok(dist_info):
        if dist_info[0] == 0:
            whole = load_unet(cfg, role, world.s_ref.dtype, "cpu")  # s_ref's: the frozen dtype
            sd = (add_lora(whole, cfg, role) if cfg.lora_rank and role != "s_ref" else whole
                  ).state_dict()
    load_state_dict(net, sd, from_rank0=True)

def mesh_shape(world_size):
    """FSDP's device mesh. One node: (world_size,). Several nodes of per_node GPUs: HSDP as
    torchtitan, (nodes, per_node): each node holds a whole copy of each net sharded over its GPUs,
    so the all-gathers stay on the node's links and only gradients cross the network (all-reduced
    between the nodes' shards). torchrun numbers ranks node by node: a row of the mesh is a node.
    per_node: torchrun's, else (the memory plan's) nodes of 8 (--world_size_plan=64: 8x8)."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or min(world_size, 8)
    if 1 < per_node < world_size and world_size % per_node == 0:
        return (world_size // per_node, per_node)
    return (world_size,)

def reshard_unless_backward(net, args, out):
    """FSDP2 keeps a root's weights (conv_in/out, embeddings, proj_in/out) gathered after its
    forward, for the backward that follows; the blocks are resharded. Where none follows (the
    generator's samples for the assistant phase, KL's and choice 1's no_grad scores, the sample
    grid), they would stay gathered until the net's next backward, and FSDP copies requires_grad
    into gathered weights only when it gathers: the assistant, frozen for the generator phase,
    would then run its next update with its root frozen, no gradient for 42 of its 212 tensors
    (tiny UNet). Reshard them now; the next forward gathers them anew."""
    from torch.utils._pytree import tree_leaves

    if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(out)):
        net.reshard()

def gather_state_dict(net):
    """A sharded net's trained weights (the whole UNet, or with --lora_rank its adapter) on rank
    0's CPU; the other ranks get {}. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(net, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))

def unsharded(net, sd):
    """A plain copy of a sharded diffusers net with the weights sd, for save_pretrained, which
    cannot save a sharded one. Built on meta: sd's tensors become its parameters."""
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(net).__mro__ if not issubclass(c, FSDPModule))  # the net's own
    copy = meta_net(cls, net.config)
    copy.load_state_dict(sd, assign=True)
    return copy

def load_state_dict(net, sd, strict=True, from_rank0=False):
    """A whole state dict into net; a sharded net's ranks each keep their own shards of it.
    from_rank0: rank 0's sd, broadcast (a collective: every rank calls it, the others with {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not is_sharded(net):
        return net.load_state_dict(sd, strict=strict)
    return set_model_state_dict(net, sd, options=StateDictOptions(
        full_state_dict=True, strict=strict, broadcast_from_rank0=from_rank0))

def sharded_optimizers(opts, path, load=False):
    """--fsdp: the AdamW states saved (load: loaded) with torch.distributed.checkpoint, each rank
    writing (reading) its own shards; nothing is gathered: one SDXL UNet's whole AdamW state is
    ~19 GiB. DCP reshards, so another number of ranks resumes too. opts: {name: (net, opt)}."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    state = {k: get_optimizer_state_dict(net, opt) for k, (net, opt) in opts.items()}
    # its plans and the wait for the slowest rank's write go through the hour-long gloo group:
    # tens of GB on a shared filesystem may take longer than training's 10-minute collectives
    (dcp.load if load else dcp.save)(state, checkpoint_id=path, process_group=SLOW_GROUP)
    if load:  # dcp.load filled state in place, shard by shard: now into the optimizers
        for k, (net, opt) in opts.items():
            set_optimizer_state_dict(net, opt, state[k])

# -----------------------------------------------------------------------------
# SDXL-architecture models from configs: tiny (--tiny, the tests) and full size (--dry_run,
# stabilityai/stable-diffusion-xl-base-1.0 and yuvalkirstain/PickScore_v1 less their defaults)

_UNET_BLOCKS = dict(down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    use_linear_projection=True, addition_embed_type="text_time")
_VAE_BLOCKS = dict(down_block_types=("DownEncoderBlock2D",) * 4, latent_channels=4,
                   up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025)
_TINY_TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, projection_dim=32, max_position_embeddings=77)
TINY = dict(
    unet=dict(_UNET_BLOCKS, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=64,
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
              addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8),
    vae=dict(_VAE_BLOCKS, block_out_channels=(8, 16, 32, 32), layers_per_block=1,
             norm_num_groups=8),
    text_encoder=_TINY_TEXT, text_encoder_2=_TINY_TEXT,
    clip=dict(text_config=dict(_TINY_TEXT, projection_dim=16), projection_dim=16,
              vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, image_size=32, patch_size=8)),
    image=dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))
SDXL = dict(  # parameters: UNet 2,567,463,684, VAE 83,653,863, text 123,060,480 + 694,659,840
    unet=dict(_UNET_BLOCKS, layers_per_block=2, block_out_channels=(320, 640, 1280),
              transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
              cross_attention_dim=2048, addition_time_embed_dim=256,
              projection_class_embeddings_input_dim=2816),  # 1280 pooled + 6 time ids x 256
    vae=dict(_VAE_BLOCKS, block_out_channels=(128, 256, 512, 512), layers_per_block=2),
    text_encoder=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,  # CLIP ViT-L
                      num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
                      hidden_act="quick_gelu"),
    text_encoder_2=dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120,  # bigG
                        num_hidden_layers=32, num_attention_heads=20, projection_dim=1280),
    clip=dict(projection_dim=1024,  # PickScore: CLIP ViT-H/14, 986,109,441 parameters
              text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                               num_hidden_layers=24, num_attention_heads=16),
              vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                 num_attention_heads=16, image_size=224, patch_size=14)),
    image=dict())  # CLIPImageProcessor's defaults are CLIP-H's: 224 px, OpenAI mean and std

def offline_tokenizer():
    """A CLIP BPE tokenizer over single letters, no download (prompts are padded to 77 tokens,
    so token ids change no cost), and its special tokens' ids for the text encoders' configs."""
    from transformers import CLIPTokenizer

    letters = [ch + end for ch in "abcdefghijklmnopqrstuvwxyz,.!" for end in ("", "</w>")]
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, "ab</w>"]  # "ab": BPE needs a merge
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[("a", "b</w>")],
                        model_max_length=77)
    return tok, {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}

def random_parts(sizes, device="cpu"):
    """Random-weight SDXL from config dicts, built on `device` directly: a StableDiffusionXLPipeline
    (SDXL's scheduler), or for sizes without a text_encoder_2 (SD1.x/2.x) a StableDiffusionPipeline
    with SD1.5's scheduler (PNDM, epsilon) or SD2.1's (DDIM, v_prediction) and no safety checker;
    and the reward's CLIPModel and CLIPProcessor."""
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler,
                           StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok, ids = offline_tokenizer()
    with torch.device(device):
        unet, vae = UNet2DConditionModel(**sizes["unet"]), AutoencoderKL(**sizes["vae"])
        te = CLIPTextModel(CLIPTextConfig(**sizes["text_encoder"], **ids))
        te2 = (CLIPTextModelWithProjection(CLIPTextConfig(**sizes["text_encoder_2"], **ids))
               if "text_encoder_2" in sizes else None)
    if te2 is not None:
        sched = EulerDiscreteScheduler(**SDXL_BETAS, steps_offset=1, timestep_spacing="leading")
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2,
                                         tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=sched)
    else:
        kw = dict(SDXL_BETAS, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
        sched = (DDIMScheduler(**kw, prediction_type="v_prediction")
                 if sizes["prediction_type"] == "v_prediction"
                 else PNDMScheduler.from_config(dict(kw, skip_prk_steps=True)))  # no clip_sample
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                       scheduler=sched, feature_extractor=None, **NO_CHECKER)
    return (pipe, *random_reward(sizes, device))

def random_reward(sizes, device="cpu"):
    """The reward's random CLIPModel and its CLIPProcessor (letter tokenizer), from sizes."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok, ids = offline_tokenizer()
    clip_sizes = dict(sizes["clip"], text_config={**sizes["clip"]["text_config"], **ids})
    with torch.device(device):
        clip = CLIPModel(CLIPConfig(**clip_sizes))
    return clip, CLIPProcessor(CLIPImageProcessor(**sizes["image"]), tokenizer=tok)

def tiny_paths(root, model="sdxl", t5=True, v=False):
    """Where build_tiny puts a family's pipeline and reward: each its own reward, drawn after its
    pipeline from the same seed, so that building one family never changes another's numbers."""
    name = dict(sdxl="sdxl", sd="sd_v" if v else "sd", sd3="sd3" if t5 else "sd3_no_t5")[model]
    return os.path.join(root, name), os.path.join(root, "reward" if name == "sdxl" else
                                                  "reward_" + name)

def build_tiny(root, model="sdxl", t5=True, v=False):
    """Tiny random models laid out as the real ones, the same ones every time: a family's pipeline
    folder (v: SD2.1-shaped, else SD1.5-shaped for model sd) and its reward, a CLIPModel with its
    processor, where tiny_paths says."""
    with torch.random.fork_rng():  # the caller's RNG untouched
        torch.manual_seed(0)
        sizes = TINY if model == "sdxl" else TINY_SD_V if v else TINY_SD
        pipe, clip, processor = (random_sd3_parts(TINY_SD3, t5=t5) if model == "sd3"
                                 else random_parts(sizes))
    path, reward = tiny_paths(root, model, t5, v)
    pipe.save_pretrained(path)
    clip.save_pretrained(reward)
    processor.save_pretrained(reward)
    return path, reward

def tiny_config(cfg, dist_info):
    """--tiny: cfg's models become tiny random ones in {out_dir}/tiny, built once by rank 0 and
    then loaded through the same from_pretrained code as the real ones."""
    root = os.path.join(cfg.out_dir, "tiny")
    pretrained, reward = tiny_paths(root, cfg.model, cfg.t5)
    if dist_info[0] == 0 and not all(os.path.isfile(os.path.join(p, f)) for p, f in
                                     ((pretrained, "model_index.json"), (reward, "config.json"))):
        build_tiny(root, cfg.model, cfg.t5)
    barrier(dist_info[1])
    return replace(cfg, pretrained=pretrained, generator_init="", reward_model=reward,
                   reward_processor=reward)

def dry_run_parts(device, cfg=None):
    """SDXLWorld's components at full size with random weights: no download, no CPU init, and
    nothing at all on meta. The three UNets start equal, as with --generator_init="". cfg with
    --model=sd3: SD3World's, at SD3.5-medium's size; --model=sd: SDWorld's, SD1.5's or SD2.1's
    (--pretrained names which)."""
    model = "sdxl" if cfg is None else cfg.model
    sizes = dict(sdxl=SDXL, sd3=SD35_MEDIUM).get(model) or SD_DRY_RUN.get(cfg.pretrained)
    if sizes is None:
        raise ConfigError(f"--dry_run --model=sd builds SD1.5 or SD2.1 from their configs: "
                          f"--pretrained={' or '.join(SD_DRY_RUN)}, not {cfg.pretrained}")
    sd3 = model == "sd3"
    pipe, clip, processor = (random_sd3_parts(sizes, device, cfg.t5) if sd3
                             else random_parts(sizes, device))
    net = pipe.transformer if sd3 else pipe.unet
    return dict(pipe=pipe, s_ref=net, assistant=copy.deepcopy(net), generator=copy.deepcopy(net),
                reward_fn=ClipReward(clip, processor),
                name=sizes.get("name", "SD3.5-medium transformer" if sd3 else "SDXL-base UNet"))

# -----------------------------------------------------------------------------
# SD3/SD3.5 (--model=sd3): a flow-matching transformer in the same loop. The world's process is
# rectified flow, x_s = (1 - s) x_0 + s eps at timestep t = 1000 s, and its nets' velocities reach
# the losses as eps (eps_from_velocity); everything else is SDXLWorld's. Then the pipeline check,
# the loader, and the models from configs: tiny (--tiny) and SD3.5-medium (--dry_run).

PIPELINES = dict(sdxl="StableDiffusionXLPipeline", sd3="StableDiffusion3Pipeline",
                 sd="StableDiffusionPipeline")
SD3_DEFAULTS = dict(pretrained="stabilityai/stable-diffusion-3.5-medium", generator_init="",
                    conditioning_t=1000,  # the generator reads pure noise: s = 1
                    alpha_cfg=3.5)  # omega = 4.5, SD3.5-medium's guidance scale (its model card)

class SD3World(SDXLWorld):
    """Algorithm 1 on SD3/SD3.5 (SD3Transformer2DModels), SDXLWorld's interface and precisions. The
    generator is one Euler step from pure noise, x_0 = z - v_theta(z, 1000, c): diffusers' own
    one-step sample (set_timesteps(1) gives sigmas [1, 0]), as StableDiffusion3Pipeline(
    num_inference_steps=1, guidance_scale=0) draws it. Text: CLIP-L, CLIP-G and T5-XXL (frozen,
    in bf16 with --precision=bf16: 9.5 GB, not 19; --t5=false: zeros, as the pipeline without
    text_encoder_3). Unconditional: the empty prompt encoded (SD3's negative ""), not zeros."""

    def __init__(self, cfg, device, rank=0, world_size=1, parts=None):
        super().__init__(cfg, device, rank, world_size, parts)
        if self.pipe.text_encoder_3 is not None:
            self.pipe.text_encoder_3.to(self.s_ref.dtype)  # the frozen dtype
        self.pipe.register_modules(transformer=self.s_ref)  # encode_prompt reads its config
        self.empty = self.encode([""])

    def sample_t(self, n, device):
        """t = 1000 s, s drawn as SD3 was trained (and diffusers' SD3 examples draw): logit-normal,
        sigmoid of N(0, 1), shifted as the scheduler shifts, s' = shift s / (1 + (shift - 1) s)
        (3.0: SD3.5 at 1024 px), kept in [t_min, t_max]: away from s = 0, where the score -eps / s
        blows up (the clamp moves 0.3% of the draws, all near s = 1)."""
        u = torch.sigmoid(torch.randn(n, device=device))
        shift = self.pipe.scheduler.config.shift
        return (1000 * shift * u / (1 + (shift - 1) * u)).clamp(self.cfg.t_min, self.cfg.t_max)

    coefficients = staticmethod(flow_coefficients)

    def uncond(self, B):
        return {k: self.empty[k].expand(B, *self.empty[k].shape[1:]) for k in ("embeds", "pooled")}

    @torch.no_grad()
    def encode(self, prompts):
        """SD3's own encode_prompt: CLIP-L and CLIP-G hidden states (padded to T5's width) then T5's
        tokens, (B, 77 + 256, 4096), and both CLIPs' pooled projections, (B, 2048)."""
        emb, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, device=self.device,
                                                    do_classifier_free_guidance=False)
        return dict(prompts=prompts, embeds=emb.float(), pooled=pooled.float())

    def velocity(self, net, x, t, cond):
        """v = net(x_s, t = 1000 s, c); cond None: the empty prompt's."""
        cond = self.uncond(len(x)) if cond is None else cond
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).expand(len(x))
        with torch.autocast(**self.autocast):
            v = net(hidden_states=x, encoder_hidden_states=cond["embeds"],
                    pooled_projections=cond["pooled"], timestep=t).sample
        return v.float()

    def unet(self, net, x, t, cond):  # eps_hat, as SDXL's nets give it
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).expand(len(x))
        s = self.coefficients(t)[1].view(-1, *([1] * (x.ndim - 1)))
        return eps_from_velocity(x, self.velocity(net, x, t, cond), s)

    def generate(self, g, cond, z=None):
        """One Euler step from pure noise at s = conditioning_t / 1000 = 1: x_0 = z - s v."""
        if z is None:  # (B, 16, R/8, R/8)
            z = torch.randn(len(cond["prompts"]), *self.latent_shape, device=self.device)
        s = self.cfg.conditioning_t / 1000
        return z - s * self.velocity(g, z, self.cfg.conditioning_t, cond)

    def decode(self, x0):
        with torch.autocast(**self.autocast):  # SD3's latents are shifted as well as scaled
            img = self.vae.decode(x0 / self.vae.config.scaling_factor
                                  + self.vae.config.shift_factor).sample
        return (img.float() / 2 + 0.5).clamp(0, 1)


def check_pipeline(cfg):
    """Before any weights load: --pretrained's model_index.json (a few hundred bytes) names the
    family --model trains, and for --model=sd3 with --t5 a T5 text encoder. A pipeline whose index
    cannot be read here is left to the loader, which says why in one line."""
    from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DConditionModel

    try:
        index = DiffusionPipeline.load_config(cfg.pretrained)
    except Exception:
        return
    name, want = index.get("_class_name", "unknown"), PIPELINES[cfg.model]
    if name != want:
        other = next((m for m, p in PIPELINES.items() if p == name), None)
        hint = (f"pass --model={other}" if other else f"--model={cfg.model} trains a {want}")
        raise LoadError(f"--pretrained={cfg.pretrained} is a {name}, not a {want}: {hint}")
    if cfg.model == "sd3" and cfg.t5 and not (index.get("text_encoder_3") or [None])[-1]:
        raise LoadError(f"--pretrained={cfg.pretrained} has no T5 text encoder (text_encoder_3):"
                        " pass --t5=false (zeros in its place, as the pipeline does)")
    if cfg.model != "sd":
        return
    # diffusers' converter makes SD2.x at 768 px (UNet sample_size 96, cross-attention 1024) a
    # v-prediction model: a folder with that UNet whose scheduler says otherwise (an older config,
    # without the key) would train its v as eps. Configs only, before any weights load.
    try:
        unet = UNet2DConditionModel.load_config(cfg.pretrained, subfolder="unet")
        sched = DDPMScheduler.load_config(cfg.pretrained, subfolder="scheduler")
    except Exception:  # left to the loader, which says why in one line
        return
    said = sched.get("prediction_type", "epsilon")
    if (unet.get("sample_size"), unet.get("cross_attention_dim")) == (96, 1024) and (
            said != "v_prediction"):
        raise LoadError(f"--pretrained={cfg.pretrained} has SD2.x's 768 px UNet, a v-prediction "
                        f"net, but its scheduler says prediction_type={said}: set \"prediction_"
                        "type\": \"v_prediction\" in its scheduler/scheduler_config.json")

_T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
_SD3_VAE = dict(_VAE_BLOCKS, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                use_quant_conv=False, use_post_quant_conv=False)
TINY_SD3 = dict(  # flow.md's sizes that ran: 2 layers, one of them dual-attention
    transformer=dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                     attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                     caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16,
                     dual_attention_layers=(0,), qk_norm="rms_norm"),
    vae=dict(_SD3_VAE, block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8),
    text_encoder=dict(_TINY_TEXT, hidden_size=16), text_encoder_2=dict(_TINY_TEXT, hidden_size=16),
    clip=TINY["clip"], image=TINY["image"],  # the CLIPs' 16 + 16 fill T5's 32 (SD3.5: 2048, 4096)
    t5=dict(vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu", relative_attention_num_buckets=8))
SD35_MEDIUM = dict(  # its published configs; transformer 2,243,171,520, T5 4,762,310,656
    transformer=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                     attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                     caption_projection_dim=1536, pooled_projection_dim=2048,
                     pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                     qk_norm="rms_norm"),
    vae=dict(_SD3_VAE, block_out_channels=(128, 256, 512, 512), layers_per_block=2),
    text_encoder=SDXL["text_encoder"], text_encoder_2=SDXL["text_encoder_2"], t5=_T5_XXL,
    clip=SDXL["clip"], image=SDXL["image"])

def offline_t5_tokenizer():
    """A T5 tokenizer over single letters, no download: a Unigram model with T5's Metaspace
    pre-tokenizer (prompts are padded to 256 tokens, so token ids change no cost)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    symbols = ["<pad>", "</s>", "<unk>", "\u2581", *"abcdefghijklmnopqrstuvwxyz,.!"]
    tok = Tokenizer(models.Unigram([(t, 0.0 if i < 3 else -1.0) for i, t in enumerate(symbols)],
                                   unk_id=2))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                           unk_token="<unk>", extra_ids=0)

def random_sd3_parts(sizes, device="cpu", t5=True):
    """Random-weight SD3 from config dicts, built on `device`: a StableDiffusion3Pipeline (shift
    3.0, SD3.5's scheduler) holding the transformer, and the reward's CLIPModel and processor."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    (tok, ids), t5_tok = offline_tokenizer(), offline_t5_tokenizer()
    with torch.device(device):
        transformer = SD3Transformer2DModel(**sizes["transformer"])
        vae = AutoencoderKL(**sizes["vae"])
        te, te2 = (CLIPTextModelWithProjection(CLIPTextConfig(**sizes[k], **ids))
                   for k in ("text_encoder", "text_encoder_2"))
        te3 = (T5EncoderModel(T5Config(**sizes["t5"], pad_token_id=0, eos_token_id=1)) if t5
               else None)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok, text_encoder_3=te3,
        tokenizer_3=t5_tok if t5 else None)
    return (pipe, *random_reward(sizes, device))

# -----------------------------------------------------------------------------
# SD1.x/2.x (--model=sd): a UNet on one CLIP text encoder, SDXL's VP schedule. SD2.1 (768 px)
# predicts v = a_t eps - sigma_t x_0 (its scheduler says v_prediction), handed to the losses as eps
# (eps_from_v); SD1.5, SD2.1-base: eps. Models from configs: tiny (tests), full size (--dry_run).

SD_DEFAULTS = dict(pretrained="stable-diffusion-v1-5/stable-diffusion-v1-5", generator_init="",
                   conditioning_t=999,  # pure noise but 0.5%, as DMD2's and SwiftBrush's SD ones
                   resolution=512, batch_size=4)  # 4: what the plan fits on a 48 GB card (README)
NO_CHECKER = dict(safety_checker=None, requires_safety_checker=False)  # it blacks images out

class SDWorld(SDXLWorld):
    """Algorithm 1 on Stable Diffusion 1.x/2.x, SDXLWorld's interface and precisions: one CLIP
    text encoder, its last hidden state (B, 77, 768 | 1024), no pooled embedding or time ids;
    unconditional: the empty prompt encoded, as the SD pipelines' negative "" (not zeros). The
    assistant's DSM on a v-net stays the eps MSE, a_t^2 times SD2.1's v MSE: the losses read the
    assistant only as eps, so its DSM weighs the errors they see (the loss code stays one)."""

    def __init__(self, cfg, device, rank=0, world_size=1, parts=None):
        super().__init__(cfg, device, rank, world_size, parts)
        self.v = self.pipe.scheduler.config.prediction_type == "v_prediction"
        self.empty = self.encode([""])

    @torch.no_grad()
    def encode(self, prompts):
        """The SD pipelines' own encode_prompt: the text encoder's last hidden state."""
        emb, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return dict(prompts=prompts, embeds=emb.float())

    def uncond(self, B):
        return dict(embeds=self.empty["embeds"].expand(B, -1, -1))

    def output(self, net, x, t, cond):
        """The net's own prediction, eps or v, at (x_t, t, c); cond None: the empty prompt's."""
        cond = self.uncond(len(x)) if cond is None else cond
        t = torch.as_tensor(t, device=x.device).expand(len(x))
        with torch.autocast(**self.autocast):
            return net(x, t, encoder_hidden_states=cond["embeds"]).sample.float()

    def unet(self, net, x, t, cond):  # eps_hat, as SDXL's nets give it
        out, t = self.output(net, x, t, cond), torch.as_tensor(t, device=x.device).expand(len(x))
        a, s = (c.view(-1, *([1] * (x.ndim - 1))) for c in self.coefficients(t))
        return eps_from_v(x, out, a, s) if self.v else out

    def generate(self, g, cond, z=None):
        """x_0 = g_theta(z, c) at conditioning_t: (z - s eps_hat) / a (SDXLWorld's), and a v-net's
        a z - s v, directly: through eps, dividing by a_999 = 0.068 would amplify rounding 15x."""
        if not self.v:
            return super().generate(g, cond, z)
        if z is None:  # (B, 4, R/8, R/8)
            z = torch.randn(len(cond["prompts"]), *self.latent_shape, device=self.device)
        a, s = self.coefficients(torch.tensor([self.cfg.conditioning_t], device=z.device))
        return a * z - s * self.output(g, z, self.cfg.conditioning_t, cond)

WORLDS = dict(sdxl=SDXLWorld, sd3=SD3World, sd=SDWorld)

_SD_TINY_UNET = dict(sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
                     norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_SD = dict(unet=_SD_TINY_UNET, vae=dict(TINY["vae"], scaling_factor=0.18215),
               text_encoder=dict(_TINY_TEXT, hidden_act="quick_gelu"), clip=TINY["clip"],
               image=TINY["image"], prediction_type="epsilon")
TINY_SD_V = dict(TINY_SD, unet=dict(_SD_TINY_UNET, attention_head_dim=(2, 4), upcast_attention=True,
                                    use_linear_projection=True),
                 text_encoder=dict(_TINY_TEXT, hidden_act="gelu"), prediction_type="v_prediction")
SD15 = dict(  # parameters: UNet 859,520,964, text 123,060,480 (CLIP ViT-L, SDXL's first)
    name="SD1.5 UNet", unet=dict(sample_size=64, cross_attention_dim=768),  # else the defaults
    vae=dict(SDXL["vae"], scaling_factor=0.18215), text_encoder=SDXL["text_encoder"],
    clip=SDXL["clip"], image=SDXL["image"], prediction_type="epsilon")
SD21 = dict(SD15, name="SD2.1 UNet", prediction_type="v_prediction",  # UNet 865,910,724
            unet=dict(sample_size=96, cross_attention_dim=1024, use_linear_projection=True,
                      attention_head_dim=(5, 10, 20, 20), upcast_attention=True),
            text_encoder=dict(  # OpenCLIP ViT-H's first 23 layers: 340,387,840
                vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                num_attention_heads=16, projection_dim=512, hidden_act="gelu"))
SD_DRY_RUN = {"stable-diffusion-v1-5/stable-diffusion-v1-5": SD15,
              "stabilityai/stable-diffusion-2-1": SD21}

# -----------------------------------------------------------------------------
# speed options, opt-in until timed on a GPU: --compile and --fast_backends

def maybe_compile(world, **kw):
    """--compile: torch.compile each UNet's transformer blocks in place (regional compilation: an
    SDXL UNet's 70 blocks share a few graphs: seconds, not a whole UNet's minutes), so state dicts
    keep their keys and checkpointing and DDP wrap as before. kw: torch.compile's (the tests pass
    backend="aot_eager": inductor's C++ builds take minutes on a CPU)."""
    if world.cfg.compile:
        # all blocks of a class share one cache of graphs: 2 widths at full size, times batch B or
        # 2B, grad on or off, weights trained or frozen; past dynamo's 8, blocks would run eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for net in (world.generator, world.assistant, world.s_ref):
            net.compile_repeated_blocks(**kw)
    return world

def fast_backends(on):
    """--fast_backends: TF32 for fp32 matmuls (10 mantissa bits, not 23: the text encoders, the
    loss math, --precision=fp32; fp32 convolutions use TF32 already, PyTorch's default),
    cudnn.benchmark (every step has the same shapes), and cuDNN attention first in SDPA (NVIDIA's
    fastest on Hopper). A context manager: on exit, all as before; off, it changes nothing."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    stack, matmul, cudnn = contextlib.ExitStack(), torch.backends.cuda.matmul, torch.backends.cudnn
    if on:
        # through allow_tf32: set through fp32_precision alone, TF32 makes the legacy readers
        # (allow_tf32, get_float32_matmul_precision; inductor's autotuning reads them) raise
        saved = matmul.allow_tf32, cudnn.benchmark
        stack.callback(lambda: (setattr(matmul, "allow_tf32", saved[0]),
                                setattr(cudnn, "benchmark", saved[1])))
        matmul.allow_tf32, cudnn.benchmark = True, True
        stack.enter_context(sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                         SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
                                        set_priority=True))
    return stack

# -----------------------------------------------------------------------------
# the dry run and the cost table. Without a GPU, the world is built on the meta device (shapes
# and dtypes, no memory) to plan memory per GPU and count FLOPs; on GPUs, train's own per-step
# timings and peak memory give seconds per step, images/s and MFU, and --bench the cost table.
# Dense bf16 tensor-core peak per GPU in TFLOPS (data sheets); the first name contained in the
# device name wins; --peak_tflops overrides.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}

def clock(device):
    """Seconds, after the GPU has finished what was queued (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()

def peak_memory_gb(device, reserved=False, reset=False):
    """Since the last reset: what tensors held, or with reserved what the caching allocator held
    (what nvidia-smi shows and what runs out; never less). reset: a new peak starts after it."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_reserved if reserved else torch.cuda.max_memory_allocated
        peak = peak(device) / 2**30
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return peak
    import resource  # CPU: the process's peak resident set (KiB on Linux)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

# What the plan's tensors leave out: the CUDA context, outside PyTorch's allocator (~0.5 GiB per
# process), and NCCL's buffers, 544-688 MB per communicator measured on 4 A100s (NVIDIA/nccl#964),
# more with NVLS on NVSwitch machines. Fragmentation: a GPU dry run prints memory_reserved too.
CUDA_CONTEXT_GIB, NCCL_GIB = 0.5, 0.7

def memory_plan(world, n_gpus, fsdp):
    """Memory per GPU before activations, [(item, bytes)], for train on n_gpus ranks. AdamW keeps
    two fp32 states per trained weight (fused: no scratch). Gradients: one net's at a time (train
    frees them); under DDP both nets' buckets. --lora_rank: the adapters train, the bases are
    frozen. --fsdp divides the three UNets' weights, gradients and AdamW states by the GPUs of a
    node (mesh_shape) and adds the units it gathers: the three roots' own weights (a root's
    forward spans its net's), two blocks (running and prefetched) and a root's and a block's
    gradients before the reduce-scatter."""
    size = lambda params: sum(p.numel() * p.element_size() for p in params)
    dt = lambda params: str(params[0].dtype).removeprefix("torch.")
    frozen = lambda *nets: [p for n in nets for p in n.parameters() if not p.requires_grad]
    g, psi = world.generator, world.assistant
    both, bases = trained(g) + trained(psi), frozen(g, psi)  # bases: only with --lora_rank
    n = mesh_shape(n_gpus)[-1] if fsdp else 1  # ranks a tensor spans
    ddp, each = n_gpus > 1 and not fsdp, f", 1/{n} each" if n > 1 else ""
    rows = [(f"generator + assistant {'adapters' if bases else 'weights'} ({dt(both)} masters"
             f"{each})", size(both) // n),
            (f"AdamW states of both, 2 per weight{each}", 2 * size(both) // n),
            ("gradients: DDP buckets of both nets" if ddp else f"gradients of one net at a time"
             f"{each}", size(both) if ddp else max(size(trained(g)), size(trained(psi))) // n)]
    if bases:
        rows.append((f"generator + assistant bases, frozen ({dt(bases)}{each})", size(bases) // n))
    rows.append((f"reference {'transformer' if world.cfg.model == 'sd3' else 'UNet'} "
                 f"({dt(frozen(world.s_ref))}{each})", size(frozen(world.s_ref)) // n))
    t5 = getattr(world.pipe, "text_encoder_3", None)  # SD3's, unless --t5=false
    clips = [e for e in (world.pipe.text_encoder, getattr(world.pipe, "text_encoder_2", None))
             if e is not None]  # SD1.x/2.x: one
    others = (("CLIP text encoders" if t5 is not None else "text encoders" if clips[1:]
               else "text encoder", clips),
              *((("T5-XXL text encoder", [t5]),) if t5 is not None else ()),
              ("reward CLIP", [world.reward_fn.model]), ("VAE", [world.vae]))
    rows += [(f"{name} ({dt(frozen(*nets))})", size(frozen(*nets))) for name, nets in others]
    if n > 1:
        # gathered as the forward sees them: bf16 under --precision=bf16 (shard_nets' policy);
        # a unit's gradients in that dtype, and in fp32 for its reduce-scatter
        bf16 = world.cfg.precision == "bf16"
        seen = lambda ps: sum(p.numel() * (2 if bf16 else p.element_size()) for p in ps)
        grad = lambda ps: sum(p.numel() * (6 if bf16 else 4) for p in ps if p.requires_grad)

        def units(net):  # (the root's own weights, the largest block's)
            blocks = [m for m in net.modules() if type(m).__name__ in FSDP_UNITS]
            inside = {id(p) for b in blocks for p in b.parameters()}
            return ([p for p in net.parameters() if id(p) not in inside],
                    max((list(b.parameters()) for b in blocks), key=size))
        nets = [units(net) for net in (g, psi, world.s_ref)]
        # the generator phase holds the three roots at once (a backward follows each forward),
        # runs one block and prefetches the next; the generator's root and block gradients
        rows.append(("FSDP: 3 roots and 2 blocks gathered, 2 units' gradients",
                     sum(seen(root) for root, _ in nets) + 2 * max(seen(b) for _, b in nets)
                     + max(grad(root + b) for root, b in nets)))
    return rows

def gpu_overhead(n_gpus):
    """The plan's last row, in bytes: the CUDA context, and with several GPUs NCCL's buffers."""
    return int((CUDA_CONTEXT_GIB + (NCCL_GIB if n_gpus > 1 else 0)) * 2**30)

def step_flops(world, batch_size):
    """Model FLOPs of one assistant and one generator update (forward and backward, prompts
    included, not the optimizer), counted by FlopCounterMode. On meta this costs no memory, only
    time. Attention runs the math kernel, whose matmuls the counter sees on every device."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    def count(update):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            update(world.sample_cond(batch_size))
        return counter.get_total_flops()

    flops = dict(assistant=count(lambda c: assistant_loss(world, world.assistant, c).backward()),
                 generator=count(lambda c: generator_backward(world, world.generator, c)))
    for net in (world.generator, world.assistant):
        net.zero_grad(set_to_none=True)
    return flops

def run_dry_run(cfg, dist_info):
    rank, world_size, device = dist_info
    per_step, sd3 = 0, f" --model={cfg.model}" * (cfg.model != "sdxl")
    if rank == 0:  # the plan and the FLOPs on meta; no checkpointing: recompute is not model FLOPs
        parts = dry_run_parts("meta", cfg)
        World = WORLDS[cfg.model]
        meta = World(replace(cfg, grad_checkpointing=False), torch.device("meta"), parts=parts)
        n_gpus = cfg.world_size_plan or world_size
        n = lambda net: f"{sum(p.numel() for p in net.parameters()):,}"
        t5 = getattr(meta.pipe, "text_encoder_3", None)
        te2 = getattr(meta.pipe, "text_encoder_2", None)  # SD1.x/2.x: one
        print(f"dry run: {parts['name']} {n(meta.s_ref)} parameters (x3: generator, assistant, "
              f"reference), VAE {n(meta.vae)}, text encoder{'s' * bool(te2)} "
              f"{n(meta.pipe.text_encoder)}" + (f" + {n(te2)}" if te2 else "")
              + (f" + T5-XXL {n(t5)}" if t5 is not None else "")
              + f", reward CLIP-H {n(meta.reward_fn.model)}"
              + (f", LoRA adapters {sum(p.numel() for p in trained(meta.generator)):,} "
                 f"parameters each (rank {cfg.lora_rank})" if cfg.lora_rank else "")
              + f"; random weights, nothing downloaded\nmemory per GPU before activations, "
              f"{n_gpus} GPU(s), --precision={cfg.precision}"
              + (f", --fsdp over mesh {mesh_shape(n_gpus)}" if cfg.fsdp else "")
              + " (GiB = 2^30 bytes):")
        plan = memory_plan(meta, n_gpus, cfg.fsdp)
        total, extra = sum(b for _, b in plan), gpu_overhead(n_gpus)
        overhead = "CUDA context" + (", NCCL buffers" if n_gpus > 1 else "") + " (estimate)"
        for item, b in plan + [("total", total), (overhead, extra), ("total on the card",
                                                                     total + extra)]:
            print(f"  {item:64s} {b / 2**30:7.2f}")
        # FLOPs in fp32: meta has no autocast, and precision does not change them
        meta = World(replace(cfg, grad_checkpointing=False, precision="fp32"),
                     torch.device("meta"), parts=parts)
        flops = step_flops(meta, cfg.batch_size)
        per_step = cfg.assistant_steps * flops["assistant"] + flops["generator"]
        print(f"model FLOPs per GPU, batch {cfg.batch_size}, {cfg.resolution}x{cfg.resolution}: "
              f"assistant update {flops['assistant'] / 1e12:.1f} TFLOP, generator update "
              f"{flops['generator'] / 1e12:.1f} TFLOP, step ({cfg.assistant_steps} + 1 updates) "
              f"{per_step / 1e12:.1f} TFLOP")
    if device.type == "cuda":
        world = WORLDS[cfg.model](cfg, device, rank, world_size, parts=dry_run_parts(device, cfg))
        world = shard_nets(maybe_compile(world), dist_info)  # --compile, --fsdp
        bench(world, dist_info) if cfg.bench else measure_steps(world, dist_info, per_step)
    elif rank == 0 and cfg.lora_rank and not cfg.fsdp:  # one GPU's plan: what to run on it next
        print(f"no GPU here, so no seconds per step, images per second, peak memory or MFU; on "
              f"one GPU, e.g.:\n  python distar.py{sd3} --prompts=prompts.txt "
              f"--lora_rank={cfg.lora_rank}" + " --batch_size=1" * (cfg.model != "sd"))
    elif rank == 0:
        print("no GPU here, so no seconds per step, images per second, peak memory, MFU or cost "
              f"table; on GPUs, e.g.:\n  torchrun --standalone --nproc_per_node=8 distar.py{sd3} "
              "--dry_run --fsdp" + (f" --lora_rank={cfg.lora_rank}" if cfg.lora_rank else ""))

def device_name(device):
    return (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{device.type}, {torch.get_num_threads()} threads")

def measure_steps(world, dist_info, flops_per_step):
    """train's own timings, nothing written: seconds per step (median; step 1 is warm-up),
    images/s per GPU, peak memory over all steps, MFU (needs a known peak). Rank 0's figures."""
    cfg, (rank, world_size, device) = world.cfg, dist_info
    opts = [make_optimizer(cfg, trained(n), lr) for n, lr in ((world.generator, cfg.lr_g),
                                                                   (world.assistant, cfg.lr_psi))]
    world.cfg = replace(cfg, log_interval=1)  # train's timings for every step, whatever is logged
    try:
        history = train(world, *opts, dist_info, range(cfg.max_steps))
    finally:
        world.cfg = cfg
    # train resets the peaks at each update; the allocator keeps what it reserved (nothing here
    # empties its cache), so the last update's reserved peak is the run's
    reserved = peak_memory_gb(device, reserved=True)
    if rank != 0:
        return None
    name = device_name(device)
    peak = cfg.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)
    sec = statistics.median(r["sec_assistant"] + r["sec_generator"] for r in history[1:])
    fig = dict(sec_per_step=sec, images_per_s=cfg.batch_size / sec,
               peak_mem_gib=max(max(r["mem_assistant_gb"], r["mem_generator_gb"]) for r in history),
               peak_reserved_gib=reserved, tflops_per_s=flops_per_step / sec / 1e12,
               mfu=flops_per_step / sec / (peak * 1e12) if peak else None)
    mfu = f"{fig['mfu']:.1%}" if peak else "unknown peak: pass --peak_tflops"
    print(f"measured on {world_size} x {name}, --precision={cfg.precision}"
          + (", --grad_checkpointing" if cfg.grad_checkpointing else "")
          + (", --fsdp" if cfg.fsdp else "") + f", batch {cfg.batch_size} per GPU, median of "
          f"steps 2-{cfg.max_steps}:\n  seconds per step {fig['sec_per_step']:.3g}, images per "
          f"second per GPU {fig['images_per_s']:.3g}, peak memory {fig['peak_mem_gib']:.1f} GiB "
          f"allocated, {fig['peak_reserved_gib']:.1f} GiB reserved, "
          f"{fig['tflops_per_s']:.3g} TFLOPS, MFU {mfu}")
    return fig

class PartTimer:
    """Splits train's update times into parts, for --bench. Wrapped world methods (install) switch
    the current part on entry and back on exit; hooks on their outputs' and inputs' gradients where
    their backward starts and ends (the generator's, and psi's in DSM, end at clip_and_step). Each
    switch reads the clock (device synchronised); the time since the last goes to the part current
    until then. Patched, train's clock() starts a phase: its assistant, then generator update."""

    def __init__(self, device):
        self.device, self.clock = device, clock  # the unpatched clock
        self.reset()

    def reset(self):
        self.phases, self.stack, self.t = [], ["other"], None  # phases: [{part: seconds}]

    def _switch(self, stack):
        now = self.clock(self.device)
        if self.phases:
            part = self.stack[-1]
            self.phases[-1][part] = self.phases[-1].get(part, 0.0) + now - self.t
        self.stack, self.t = stack, now
        return now

    def phase(self, device):  # train's clock: a phase starts, the last one ends
        now = self._switch(self.stack)
        self.phases.append({})
        return now

    def enter(self, part):  # a backward part at the bottom of the stack ends at the next entry
        self._switch((["other"] if len(self.stack) == 1 else self.stack) + [part])

    def wrap(self, fn, part, backward_part=None):
        def on_grad(part):
            def hook(grad):  # a backward starts (part) or ends ("other")
                self._switch(self.stack[:-1] + [part])
            return hook

        def timed(*args, **kwargs):
            if torch.is_grad_enabled():  # a view per call: its gradient is this call's own
                args = [a.view_as(a) if torch.is_tensor(a) and a.requires_grad else a for a in args]
                for a in args:
                    if torch.is_tensor(a) and a.requires_grad:
                        a.register_hook(on_grad("other"))  # this call's backward has ended
            self.enter(part)
            try:
                out = fn(*args, **kwargs)
            finally:
                self._switch(self.stack[:-1])
            outs = out if isinstance(out, tuple) else (out,)
            for o in outs:  # on the output itself: a gradient taken at the returned view (the
                if torch.is_tensor(o) and o.requires_grad:  # per-term x0grad) does not fire it
                    o.register_hook(on_grad(backward_part or part))
            views = tuple(o.view_as(o) if torch.is_tensor(o) else o for o in outs)
            return views if isinstance(out, tuple) else views[0]
        return timed

    def install(self, world):
        """The world's methods and train's clip_and_step and clock, wrapped until exit."""
        stack, module = contextlib.ExitStack(), sys.modules[__name__]
        for name, part, backward_part in BENCH_PARTS:
            owner = module if name in ("clip_and_step", "clock") else world
            new = (self.phase if name == "clock"
                   else self.wrap(getattr(owner, name), part, backward_part))
            stack.enter_context(mock.patch.object(owner, name, new))
        return stack

# (what is wrapped, its part, the part of its backward if another)
BENCH_PARTS = [("sample_cond", "text", None), ("generate", "g fwd", "g bwd"),
               ("eps_psi", "psi", None), ("eps_ref", "ref", None), ("eps_ref_both", "ref", None),
               ("reward", "reward", None), ("decode", "vae", None),
               ("clip_and_step", "optim", None), ("clock", None, None)]
PART_NAMES = ["text", "g fwd", "g bwd", "psi", "ref", "vae", "reward", "optim", "other"]

def unet_baseline_update(world, opt, batch_size):
    """The cost table's yardstick: a plain SDXL UNet training update on the assistant's UNet, at
    DI*'s batch, resolution, precision and checkpointing: prompts, the eps-MSE on latents (random
    here, a data set's in fine-tuning), backward, clipping and AdamW."""
    cond = world.sample_cond(batch_size)
    t, x_t, eps, _ = diffuse(world, torch.randn(batch_size, *world.latent_shape,
                                                device=world.device))
    loss = F.mse_loss(world.eps_psi(world.assistant, x_t, t, cond), eps)
    loss.backward()
    return clip_and_step(opt, world.assistant, loss, world.cfg.grad_clip, 1)

def bench(world, dist_info):
    """The cost table, printed and in {out_dir}/bench.json: train's own timings of one step (an
    assistant and a generator update, prompts, clipping and AdamW included) per divergence, and of
    unet_baseline_update, checkpointing off and on, as ratios to the KL generator update and to the
    baseline with the same checkpointing; their parts (PartTimer) and peak memory. Variants
    interleave (each repetition runs all, rotated by one): drift hits all alike. lr 0: no change."""
    cfg, device = world.cfg, dist_info[2]
    opts = [make_optimizer(cfg, trained(n), 0.0) for n in (world.generator, world.assistant)]
    variants = [(div, ckpt) for ckpt in (False, True)
                for div in ("pseudo_huber", "l2", "kl", "unet_baseline")]
    # timed steps per row: the assistant update does not depend on the divergence
    runs = ({("generator", div, ckpt): [] for div, ckpt in variants if div != "unet_baseline"}
            | {(s, None, c): [] for s in ("assistant", "unet_baseline") for c in (False, True)})
    oom, timer = set(), PartTimer(device)
    with mock.patch.dict(os.environ, TQDM_DISABLE="1"), timer.install(world):
        for rep in range(cfg.bench_warmup + cfg.bench_reps):
            n = rep % len(variants)
            for div, ckpt in [v for v in variants[n:] + variants[:n] if v not in oom]:
                world.cfg = replace(cfg, assistant_steps=1,
                                    divergence=cfg.divergence if div == "unet_baseline" else div)
                world.set_grad_checkpointing(ckpt)
                timer.reset()
                try:
                    if div == "unet_baseline":
                        peak_memory_gb(device, reset=True)
                        t0 = clock(device)  # PartTimer.phase
                        unet_baseline_update(world, opts[1], cfg.batch_size)
                        m = dict(sec_unet_baseline=clock(device) - t0,
                                 mem_unet_baseline_gb=peak_memory_gb(device))
                    else:
                        (m,) = train(world, *opts, dist_info, range(1))
                except torch.cuda.OutOfMemoryError:
                    oom.add((div, ckpt))
                    for o in opts:
                        o.zero_grad(set_to_none=True)
                    continue
                if rep >= cfg.bench_warmup:
                    steps = [div] if div == "unet_baseline" else ["assistant", "generator"]
                    for step, parts in zip(steps, timer.phases):
                        key = (step, div if step == "generator" else None, ckpt)
                        runs[key].append(dict(m, parts=parts))
    world.cfg = cfg
    world.set_grad_checkpointing(cfg.grad_checkpointing)
    rows = []
    for (step, div, ckpt), timed in runs.items():
        ms = [m[f"sec_{step}"] * 1000 for m in timed]
        parts = [{p: m["parts"].get(p, 0.0) * 1000 for p in PART_NAMES} for m in timed]
        rows.append(dict(step=step, divergence=div, grad_checkpointing=ckpt, ms_reps=ms,
                         ms=statistics.median(ms) if ms else None, parts_ms_reps=parts,
                         parts_ms={p: statistics.median(r[p] for r in parts) for p in PART_NAMES}
                         if parts else None,
                         peak_gb=max((m[f"mem_{step}_gb"] for m in timed), default=None)))
    # the units: the KL generator update, checkpointing off (on where off ran out of memory); the
    # baseline with the row's checkpointing
    kl = {r["grad_checkpointing"]: r for r in rows if r["divergence"] == "kl"}
    base = kl[False] if kl[False]["ms"] or not kl[True]["ms"] else kl[True]
    unit = f"the KL generator update with checkpointing {'on' if base is kl[True] else 'off'}"
    unet = {r["grad_checkpointing"]: r["ms"] for r in rows if r["step"] == "unet_baseline"}
    name = device_name(device)
    print(f"cost of one update on {name}, {cfg.precision}, {cfg.resolution}x{cfg.resolution}, "
          f"batch {cfg.batch_size}, --cfg={cfg.cfg}: median of {cfg.bench_reps} after "
          f"{cfg.bench_warmup} warm-up, interleaved; / KL gen: over {unit}; / UNet: over "
          f"unet_baseline (a plain SDXL UNet training update) with the same checkpointing\n"
          f"{'step':13s} {'divergence':12s} {'checkpointing':>13s} {'ms':>9s} {'/ KL gen':>9s} "
          f"{'/ UNet':>7s} {'peak GiB':>8s}")
    for r in rows:
        r["ratio"] = r["ms"] / base["ms"] if r["ms"] and base["ms"] else None
        u = unet[r["grad_checkpointing"]]
        r["ratio_unet_baseline"] = r["ms"] / u if r["ms"] and u else None
        ms = f"{r['ms']:.1f}" if r["ms"] else "out of memory"
        ratio, ratio_u = (f"{x:.2f}x" if x else "-" for x in (r["ratio"], r["ratio_unet_baseline"]))
        ckpt = "on" if r["grad_checkpointing"] else "off"
        print(f"{r['step']:13s} {r['divergence'] or '-':12s} {ckpt:>13s} {ms:>9s} {ratio:>9s} "
              f"{ratio_u:>7s} {r['peak_gb'] or 0:8.2f}")
    print("its parts, ms (median of each): text: prompts; g: the generator; psi: the assistant (in "
          "unet_baseline: the UNet trained); ref: the reference; vae: VAE decode; reward: the "
          "reward less its decode; optim: clipping and AdamW; other: the loss math, noise, "
          "Python; the device syncs at each switch of part are in the times\n"
          f"{'step':13s} {'divergence':12s} {'ckpt':>4s} "
          + " ".join(f"{p:>7s}" for p in PART_NAMES))
    for r in rows:
        parts = (" ".join(f"{r['parts_ms'][p]:7.1f}" for p in PART_NAMES) if r["parts_ms"]
                 else "out of memory")
        print(f"{r['step']:13s} {r['divergence'] or '-':12s} "
              f"{'on' if r['grad_checkpointing'] else 'off':>4s} {parts}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "bench.json"), "w") as f:
        json.dump(dict(device=name, config=asdict(cfg), ratios_over=unit,
                       ratios_unet_baseline_over="unet_baseline with the same checkpointing",
                       parts=PART_NAMES, rows=rows), f, indent=1)
    print(f"wrote {cfg.out_dir}/bench.json")
    return rows

# -----------------------------------------------------------------------------
# the toy's evaluation and pictures (PIL scatter plots: reference in grey, generator in colour)

TOY_COLOURS = [(214, 39, 40), (31, 119, 180), (44, 160, 44)]  # class 0, 1, 2

def energy_distance(x, y):
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (U-statistics; 0 iff same distribution)."""
    n, m = len(x), len(y)
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).sum() / (n * (n - 1))
            - torch.cdist(y, y).sum() / (m * (m - 1))).item()

def evaluate_toy(world, out_dir, n=2000):
    """Per class: energy distance to the reference (and N(0, I)'s, for scale), mean reward. n as
    the ablation's: two draws of the reference are within 0.0012 of each other (std 0.0005)."""
    from safetensors.torch import save_file

    gen, ref = toy_samples(world, n)  # (K, n, 2) each
    save_file({"generator": gen, "reference": ref},
              os.path.join(out_dir, "toy_samples.safetensors"))
    save_toy_png(os.path.join(out_dir, "toy.png"), ref, gen)
    normal = torch.randn(n, 2)
    print(f"{'class':>5s} {'energy dist':>12s} {'/ N(0,I)':>9s} {'reward gen':>11s} "
          f"{'reward ref':>11s}")
    for k in range(world.K):
        ed, ed0 = energy_distance(gen[k], ref[k]), energy_distance(normal, ref[k])
        r_gen, r_ref = world.reward(gen[k], None).mean(), world.reward(ref[k], None).mean()
        print(f"{k:5d} {ed:12.4f} {ed / ed0:9.2%} {r_gen:11.4f} {r_ref:11.4f}")
    print(f"wrote {out_dir}/toy.png and {out_dir}/toy_samples.safetensors")

@torch.no_grad()
def toy_samples(world, n):
    """n generator and n reference samples of every class: two (K, n, 2) tensors on the CPU."""
    c = lambda k: torch.full((n,), k, device=world.means.device)
    gen = torch.stack([world.generate(world.generator, c(k)) for k in range(world.K)])
    return gen.cpu(), world.sample_ref(n).cpu()

def save_panels(path, panels, cols, size, lim):
    """panels: [(title, subtitle, [(points (N, 2), colour), ...])], each a square of
    [-lim, lim]^2 with its first 1500 points of each set, cols per row."""
    from PIL import Image, ImageDraw

    rows, band = -(-len(panels) // cols), 32
    img = Image.new("RGB", (cols * size, rows * (size + band)), "white")
    draw = ImageDraw.Draw(img)
    for i, (title, sub, layers) in enumerate(panels):
        left, top = (i % cols) * size, (i // cols) * (size + band) + band
        for pts, colour in layers:
            for x, y in pts[:1500].tolist():
                if abs(x) <= lim and abs(y) <= lim:
                    px, py = left + (x + lim) / (2 * lim) * size, top + (lim - y) / (2 * lim) * size
                    draw.ellipse([px - 1.5, py - 1.5, px + 1.5, py + 1.5], fill=colour)
        draw.rectangle([left, top, left + size - 1, top + size - 1], outline=(0, 0, 0))
        draw.text((left + 6, top - band + 4), title, fill=(0, 0, 0))
        draw.text((left + 6, top - band + 17), sub, fill=(90, 90, 90))
    img.save(path)

def save_toy_png(path, ref, gen):
    """One panel per class: reference samples (K, N, 2) in grey, the generator's in colour."""
    save_panels(path, [(f"class {k}: reference (grey), generator", "reward grows to the right",
                        [(ref[k], (170, 170, 170)), (gen[k], TOY_COLOURS[k])])
                       for k in range(len(ref))], cols=len(ref), size=320, lim=3.2)

# -----------------------------------------------------------------------------
# the paper's Table 2 in the toy (--toy --ablation): one generator per row, the same seed, steps
# and nets for all. KL rows put CFG in the reference (with KL, --cfg=in and out give the same
# gradient). The [extra] rows, reward without CFG, tell the reward's effect from guidance's.

TABLE2 = [  # (row, its --divergence --alpha_rew --alpha_cfg --cfg: ROW_FLAGS)
    ("KL, no reward, no CFG", "kl 0 0 in"),
    ("KL, reward, no CFG [extra]", "kl 100 0 in"),
    ("Diff-Instruct (KL, CFG)", "kl 0 7.5 in"),
    ("DI++ (KL, reward, CFG)", "kl 100 7.5 in"),
    ("DI*-Out (choice 1)", "pseudo_huber 100 7.5 out"),
    ("DI*, no reward, no CFG", "pseudo_huber 0 0 in"),
    ("DI*, reward, no CFG [extra]", "pseudo_huber 100 0 in"),
    ("SIM (score div., CFG)", "pseudo_huber 0 7.5 in"),
    ("DI*-In, alpha_rew 1", "pseudo_huber 1 7.5 in"),
    ("DI*-In, alpha_rew 10", "pseudo_huber 10 7.5 in"),
    ("DI*-In, alpha_cfg 4.5", "pseudo_huber 100 4.5 in"),
    ("DI*-In (choice 2)", "pseudo_huber 100 7.5 in"),
]
ROW_FLAGS = ("divergence", "alpha_rew", "alpha_cfg", "cfg")  # what a row sets
COVERED = 0.05  # a mode is covered by >= 5% of its class's samples (the reference: 49%)

def row_flags(values):
    """A TABLE2 row's values as its command-line flags: "--divergence=kl --alpha_rew=0 ..."."""
    return " ".join(f"--{k}={v}" for k, v in zip(ROW_FLAGS, values.split()))

def row_config(cfg, values):
    row = vars(make_parser(Config, "row").parse_args(row_flags(values).split()))
    return replace(cfg, **{k: row[k] for k in ROW_FLAGS})

def tilt_temperature(world):
    """beta, the temperature of the toy's KL term: generator_loss minimises J(p) = -alpha E_p[r] +
    E_t[sigma_t KL(p_t || q_t)] / D. For q = N(m, s^2 I), r = scale x[0] and p = q shifted by delta
    along x[0], KL(p_t || q_t) = a_t^2 delta^2 / (2 (a_t^2 s^2 + sigma_t^2)): J is minimised at
    delta = alpha scale s^2 / beta, the tilt q exp(alpha r / beta), with
    beta = E_t[sigma_t a_t^2 s^2 / (a_t^2 s^2 + sigma_t^2)] / D, t ~ U{t_min..t_max}."""
    ab = world.alphas_cumprod[world.cfg.t_min:world.cfg.t_max + 1].double()  # a_t^2
    s2 = world.std**2
    return ((1 - ab).sqrt() * ab * s2 / (ab * s2 + 1 - ab)).mean().item() / world.means.shape[-1]

def tilted_reference(world, alpha_rew):
    """q(x|c) exp(alpha_rew r(x) / beta) / Z, KL-regularised RLHF's optimum, in closed form: with
    lam = alpha_rew scale / beta, each mode N(m, s^2 I) moves to N(m + lam s^2 e_0, s^2 I), its
    weight times exp(lam m[0]). Returns means (K, M, 2) and weights (K, M)."""
    lam = alpha_rew * world.reward_scale / tilt_temperature(world)
    means = world.means.clone()
    means[..., 0] += lam * world.std**2
    return means, torch.softmax(lam * world.means[..., 0].double(), -1).to(means.dtype)

def sample_mixture(means, weights, std, n):
    """n samples of each class's Gaussian mixture: means (K, M, 2), weights (K, M) -> (K, n, 2)."""
    k = torch.multinomial(weights, n, replacement=True)  # (K, n) mode of each sample
    eps = torch.randn(len(means), n, 2, device=means.device, dtype=means.dtype)
    return torch.gather(means, 1, k[..., None].expand(-1, -1, 2)) + std * eps

def toy_metrics(world, x, ref, alpha_rew):
    """Table 2's columns for samples x (K, N, 2) of a generator trained with alpha_rew. A sample
    counts for its nearest reference mode (right_share) and, within 3 std of it, for the mode's
    coverage (samples pushed off the support count for no mode); ED: mean energy distance."""
    d = torch.cdist(x, world.means.to(x))  # (K, N, M)
    nearest = F.one_hot(d.argmin(-1), world.means.shape[1]).float()  # (K, N, M)
    near = (nearest * (d.min(-1, keepdim=True).values <= 3 * world.std)).mean(1)  # (K, M)
    right = world.means[..., 0].argmax(-1).cpu()  # (K,) each class's high-reward mode
    tilted = sample_mixture(*tilted_reference(world, alpha_rew), world.std, x.shape[1]).cpu()
    ed = lambda y: sum(energy_distance(x[k], y[k]) for k in range(len(x))) / len(x)
    return dict(reward=world.reward(x.reshape(-1, 2), None).mean().item(), ed_ref=ed(ref),
                coverage=(near >= COVERED).float().mean().item(),
                right_share=nearest.mean(1).gather(1, right[:, None]).mean().item(),
                ed_tilted=ed(tilted), mode_shares=near.tolist())

def run_ablation(cfg, dist_info, n=2000):
    """Train every TABLE2 row from the same start, then score them all, and two reference rows
    (a second draw of q: the noise floor; the tilt at alpha_rew 100), against the same q."""
    trained = []
    for i, (name, values) in enumerate(TABLE2):
        flags = row_flags(values)
        row_cfg = replace(row_config(cfg, values), out_dir=os.path.join(cfg.out_dir, "ablation",
                                                                        f"row{i + 1:02d}"))
        print(f"row {i + 1}/{len(TABLE2)}: {name}: {flags}", flush=True)
        torch.manual_seed(cfg.seed)  # every row starts from the same nets and draws the same noise
        world = make_toy_world(dist_info[2])
        world.cfg = row_cfg
        t0 = time.perf_counter()
        fit(row_cfg, world, (0, 1, dist_info[2]))
        trained.append(dict(name=name, flags=flags, short=values, alpha_rew=row_cfg.alpha_rew,
                            seconds=time.perf_counter() - t0, x=toy_samples(world, n)[0]))
    world.cfg = cfg
    beta = tilt_temperature(world)
    torch.manual_seed(cfg.seed)  # q: the reference, a second draw, the tilt
    ref = world.sample_ref(n).cpu()  # (K, n, 2)
    rows = [dict(name="reference q (a second draw)", short="the noise floor", alpha_rew=0.0,
                 x=world.sample_ref(n).cpu()),
            dict(name="tilted reference, alpha_rew 100", alpha_rew=100.0,
                 short=f"q exp(alpha_rew r / beta), beta {beta:.4f}",
                 x=sample_mixture(*tilted_reference(world, 100.0), world.std, n).cpu())] + trained
    torch.manual_seed(cfg.seed + 1)  # the tilted samples inside the metrics
    for row in rows:
        row.update(toy_metrics(world, row["x"], ref, row["alpha_rew"]))
    print(f"\nTable 2 in the toy: {cfg.max_steps} steps per row, {n} samples per class, r = "
          f"{world.reward_scale:g} x[0]; modes: share covered (>= {COVERED:.0%} of a class's "
          "samples nearest them, within 3 std); right: share nearest the high-reward mode")
    print(f"{'row':32s} {'div':>12s} {'a_rew':>5s} {'a_cfg':>5s} {'cfg':>3s} {'r x1e3':>7s} "
          f"{'ED(q)':>7s} {'modes':>6s} {'right':>6s} {'ED(tilt)':>8s}")
    for row in rows:
        div, a_rew, a_cfg, mode = row["short"].split() if "flags" in row else ["-"] * 4
        print(f"{row['name']:32s} {div:>12s} {a_rew:>5s} {a_cfg:>5s} {mode:>3s} "
              f"{row['reward'] * 1e3:7.3f} {row['ed_ref']:7.4f} {row['coverage']:6.0%} "
              f"{row['right_share']:6.1%} {row['ed_tilted']:8.4f}")
    grey = [(r, (170, 170, 170)) for r in ref]
    save_panels(os.path.join(cfg.out_dir, "ablation.png"), [
        (r["name"], r["short"], grey + [(g, TOY_COLOURS[k]) for k, g in enumerate(r["x"])])
        for r in rows], cols=5, size=260, lim=4.0)  # wide: guidance pushes samples far out
    saved = [{k: v for k, v in r.items() if k not in ("short", "x")} for r in rows]
    with open(os.path.join(cfg.out_dir, "ablation.json"), "w") as f:
        json.dump(dict(steps=cfg.max_steps, samples_per_class=n, covered_threshold=COVERED,
                       beta=beta, rows=saved), f, indent=1)
    print(f"wrote {cfg.out_dir}/ablation.png, ablation.json and each row's checkpoint in "
          f"{cfg.out_dir}/ablation/")

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
