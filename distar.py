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

Read it top to bottom: config, the loss math (one function per equation), the toy world and
its gradient check, the alternating loop (written once, given a world), distributed setup,
main. Every option is a field of Config below and is overridden as --key=value.
"""

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields

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
    seed: int = 0  # rank r uses seed * world_size + r
    out_dir: str = "out"
    log_interval: int = 10  # steps between metrics lines


# the toy is a different problem size: these replace the defaults, and --key=value still wins
TOY_DEFAULTS = dict(batch_size=256, max_steps=1000, lr_g=1e-3, lr_psi=3e-3, assistant_steps=4,
                    weight_decay=0.0, log_interval=100, out_dir="out_toy")
CHOICES = dict(cfg=("in", "out"), divergence=("pseudo_huber", "l2", "kl"))


class ConfigError(ValueError):
    pass


def parse_args(argv):
    """--key=value overrides of Config, type-checked; unknown keys and bad values are errors."""
    types = {f.name: f.type for f in fields(Config)}
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
    defaults = TOY_DEFAULTS if overrides.get("toy") else {}
    cfg = Config(**{**defaults, **overrides})
    if not 0 <= cfg.t_min <= cfg.t_max <= 999:
        raise ConfigError(f"need 0 <= t_min <= t_max <= 999, got {cfg.t_min} and {cfg.t_max}")
    if cfg.batch_size < 1 or cfg.max_steps < 0 or cfg.assistant_steps < 0:
        raise ConfigError("batch_size must be >= 1, max_steps and assistant_steps >= 0")
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
        """n samples of q_0(x | c) for one class c."""
        k = torch.randint(self.means.shape[1], (n,), device=self.means.device)
        return self.means[c, k] + self.std * torch.randn(n, 2, device=self.means.device, dtype=self.means.dtype)

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
# the alternating loop (Algorithm 1), written once and given a world
# A world holds .generator and .assistant (the trained nets), .alphas_cumprod, and
# sample_cond(n), generate(g, cond), eps_fake(s_psi, x_t, t, cond), eps_ref(x_t, t, cond or
# None), reward(x_0, cond). Nets predict eps; scores are s = -eps / sigma_t.
#
# w(t) and c, which the paper leaves open: we put the distance on the eps scale,
# d_t(y) = d(sigma_t y), which is a proper distance at every t, so Theorem 3.1 still holds,
# and take w(t) = 1 / D (D = elements per sample). Then every t contributes on the same eps
# scale (scores blow up as 1/sigma_t at small t), the loss is a per-element mean, so the balance
# with alpha_rew does not depend on resolution, and pseudo-Huber's c means the same in the toy
# and in SDXL: c = huber_c sqrt(D) on the eps scale, i.e. c / sigma_t on the score scale.
# In score space d_t'(y) = sigma_t d'(y; c/sigma_t) (pseudo-Huber) or sigma_t^2 d'(y) (l2).
# KL and the CFG reward take the same eps-scale weight sigma_t / D, so their gradient per element
# is a_t (eps_ref - eps_psi) / D; the assistant's DSM weight lambda(t) = sigma_t^2 / D is the
# usual eps-prediction MSE.


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
    """Algorithm 1, generator phase: -alpha_rew r + eq. 3.4 (or KL) + the CFG term (eq. 3.5)."""
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
    elif cfg.divergence == "pseudo_huber":
        loss_div = score_divergence_loss(x_t, -eps / sigma_t, s_fake, s_ref, "pseudo_huber",
                                         c=cfg.huber_c * math.sqrt(D) / sig, weight=sig / D)
    else:
        loss_div = score_divergence_loss(x_t, -eps / sigma_t, s_fake, s_ref, "l2", weight=sig**2 / D)
    loss_cfg = torch.zeros_like(loss_div)
    if cfg.cfg == "out" and cfg.alpha_cfg != 0:  # choice 1: implicit CFG reward (Thm 3.2)
        loss_cfg = cfg.alpha_cfg * cfg_reward_loss(x_t, s_c, s_u, weight=sig / D)
    reward = world.reward(x0, cond)  # r(x_0, c), (B,)
    loss = (-cfg.alpha_rew * reward + loss_div + loss_cfg).mean()
    return loss, dict(loss_div=loss_div.mean(), loss_cfg=loss_cfg.mean(), reward=reward.mean())


def train(world, dist_info, start_step=0):
    """Alternate K_TA assistant updates and one generator update (Algorithm 1)."""
    cfg = world.cfg
    rank, world_size, device = dist_info
    g, s_psi = world.generator, world.assistant  # fp32 master weights
    wrap = (lambda m: DDP(m)) if world_size > 1 else (lambda m: m)
    g_ddp, s_psi_ddp = wrap(g), wrap(s_psi)  # DDP only on the two trained nets
    adamw = lambda params, lr: torch.optim.AdamW(params, lr=lr, betas=(cfg.beta1, cfg.beta2),
                                                 weight_decay=cfg.weight_decay)
    opt_g, opt_psi = adamw(g.parameters(), cfg.lr_g), adamw(s_psi.parameters(), cfg.lr_psi)
    bar = tqdm(range(start_step, cfg.max_steps), disable=None if rank == 0 else True, dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        # assistant phase: freeze theta, K_TA DSM updates of psi
        for _ in range(cfg.assistant_steps):
            loss_psi = assistant_loss(world, s_psi_ddp, world.sample_cond(cfg.batch_size))
            opt_psi.zero_grad(set_to_none=True)
            loss_psi.backward()
            torch.nn.utils.clip_grad_norm_(s_psi.parameters(), cfg.grad_clip)
            opt_psi.step()
        # generator phase: freeze psi (its parameters, not its input), one update of theta
        s_psi.requires_grad_(False)
        loss_g, terms = generator_loss(world, g_ddp, world.sample_cond(cfg.batch_size))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        s_psi.requires_grad_(True)
        grad_norm = torch.nn.utils.clip_grad_norm_(g.parameters(), cfg.grad_clip)
        opt_g.step()
        metrics = dict(loss_g=loss_g.detach(), **{k: v.detach() for k, v in terms.items()},
                       grad_norm=grad_norm, loss_psi=loss_psi.detach() if cfg.assistant_steps else torch.zeros(()))
        if (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.max_steps:
            metrics = all_reduce_mean(metrics, world_size)
            bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items()}, refresh=False)
        world.last_step_time = time.perf_counter() - t0
    for net in (g, s_psi):
        assert_ranks_in_sync(net, world_size)
    return cfg.max_steps


# -----------------------------------------------------------------------------
# distributed setup


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; nccl on GPUs, gloo on CPU."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if cuda else "cpu")


def assert_ranks_in_sync(net, world_size):
    """DDP must keep every rank's copy identical: compare each rank's parameters with rank 0's."""
    if world_size == 1:
        return
    flat = torch.cat([p.detach().float().flatten() for p in net.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if diff > 0:
        raise RuntimeError(f"ranks out of sync: max |param - rank 0's| = {diff.item():.3g}")


def all_reduce_mean(metrics, world_size):
    vals = torch.stack([torch.as_tensor(v, dtype=torch.float32).cpu() for v in metrics.values()])
    if world_size > 1:
        dist.all_reduce(vals)
        vals /= world_size
    return dict(zip(metrics, vals.tolist()))


# -----------------------------------------------------------------------------
# toy mode: gradient check, Algorithm 1, evaluation and a picture


def save_toy_png(path, ref, gen, K):
    """One panel per class: reference samples in grey, generator samples in colour."""
    from PIL import Image, ImageDraw

    size, lim = 320, 3.2
    img = Image.new("RGB", (size * K, size + 24), "white")
    draw = ImageDraw.Draw(img)
    colours = [(214, 39, 40), (31, 119, 180), (44, 160, 44)]
    for k in range(K):
        for pts, col in ((ref[k], (170, 170, 170)), (gen[k], colours[k % 3])):
            for x, y in pts[:1500].tolist():
                px, py = k * size + (x + lim) / (2 * lim) * size, (lim - y) / (2 * lim) * size + 24
                draw.ellipse([px - 1.5, py - 1.5, px + 1.5, py + 1.5], fill=col)
        draw.rectangle([k * size, 24, (k + 1) * size - 1, size + 23], outline=(0, 0, 0))
        draw.text((k * size + 6, 6), f"class {k}: reference (grey), generator (colour); reward grows ->",
                  fill=(0, 0, 0))
    img.save(path)


def run_toy(cfg, dist_info):
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
    t0 = time.perf_counter()
    train(world, dist_info)
    train_time = time.perf_counter() - t0
    if rank != 0:
        return
    n = 4000
    with torch.no_grad():
        gen = torch.stack([world.generate(world.generator, torch.full((n,), k, device=device))
                           for k in range(world.K)]).cpu()  # (K, N, 2)
    ref = torch.stack([world.sample_ref(k, n) for k in range(world.K)]).cpu()
    normal = torch.randn(n, 2)
    os.makedirs(cfg.out_dir, exist_ok=True)
    torch.save({"generator": gen, "reference": ref}, os.path.join(cfg.out_dir, "toy_samples.pt"))
    save_toy_png(os.path.join(cfg.out_dir, "toy.png"), ref, gen, world.K)
    print(f"trained {cfg.max_steps} steps in {train_time:.1f} s on {world_size} process(es)"
          + (", parameters identical on all ranks" if world_size > 1 else ""))
    print(f"{'class':>5s} {'energy dist':>12s} {'/ N(0,I)':>9s} {'reward gen':>11s} {'reward ref':>11s}")
    for k in range(world.K):
        ed, ed0 = energy_distance(gen[k], ref[k]), energy_distance(normal, ref[k])
        r_gen, r_ref = world.reward(gen[k], None).mean().item(), world.reward(ref[k], None).mean().item()
        print(f"{k:5d} {ed:12.4f} {ed / ed0:9.2%} {r_gen:11.4f} {r_ref:11.4f}")
    print(f"wrote {cfg.out_dir}/toy.png and {cfg.out_dir}/toy_samples.pt")


# -----------------------------------------------------------------------------
# main


def main(argv):
    try:
        cfg = parse_args(argv)
    except ConfigError as e:
        print(f"distar: error: {e}", file=sys.stderr)
        return 2
    if not cfg.toy:
        print("distar: error: only --toy is implemented so far", file=sys.stderr)
        return 2
    dist_info = setup_distributed()
    rank, world_size, _ = dist_info
    torch.manual_seed(cfg.seed * world_size + rank)
    run_toy(cfg, dist_info)
    if world_size > 1:
        dist.barrier()  # rank 0 has written its files; leave together
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
