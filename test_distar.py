"""The specification of distar.py (and sample.py), sectioned like distar.py: float64 parity with
exact answers, a toy whose gradients are known in closed form, and subprocess runs of the real
command lines (torchrun too). CPU only, no download. Run: python -m pytest -q test_distar.py"""

import builtins
import copy
import functools
import json
import math
import os
import re
import statistics
import subprocess
import sys

from dataclasses import fields, replace

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub, in-process either
# the specification runs on the CPU, also where CUDA is present (CUDA_VISIBLE_DEVICES=0 opts in)
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
import distar  # noqa: E402
import sample  # noqa: E402

# One intra-op thread, here and in every subprocess (torchrun sets the same per rank): these nets
# are tiny, and threads that compete for cores (other jobs, ranks) slow a run down 10-30x.
torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
       "OMP_NUM_THREADS": "1"}
f64 = torch.float64
LORA_ARGS = ["--lora_rank=4", "--lora_alpha=2"]  # alpha != rank: a loader that loses alpha differs
# README's test command runs two pytest-xdist workers (-n 2 --dist loadgroup): the tests that read a
# module-scoped run (trained_dir, ddp_and_fsdp, dry_parts, ...) carry @pytest.mark.xdist_group, so
# each such run is made once, on one worker. loadgroup hands out the groups with the most tests
# first and single tests last, so the long tests of a kind share a group too (compile, toy, sample
# .py's command lines, stops), and no worker ends alone with one. Plain pytest ignores the marks.


def run(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(HERE, "distar.py"), *args], cwd=HERE,
                          env=ENV, capture_output=True, text=True, timeout=timeout)


def run_here(*args):
    """run's command line in this process, through distar.main: the same exit code and output
    without the ~4 s a process spends importing torch and diffusers. For runs whose code and
    output are all a test reads; what only a process shows (the script's exit code, library logs
    on the real stderr, signals) keeps run."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = distar.main(list(args))
    return subprocess.CompletedProcess(["distar.py", *args], code, out.getvalue(), err.getvalue())


# what a rank of a tiny run imports: loaded once in multiprocessing's fork server, so that each
# rank forked from it starts in milliseconds, with none of this process's state (caches, threads)
RANK_IMPORTS = ["test_distar", "diffusers.models.unets.unet_2d_condition", "diffusers.schedulers",
                "diffusers.models.autoencoders.autoencoder_kl", "diffusers.models.transformers",
                "transformers.models.clip.modeling_clip", "transformers.models.t5.modeling_t5",
                "peft", "torch.distributed.fsdp", "torch.distributed.checkpoint"]


def _rank_main(rank, nproc, port, logs, args, timeout, setup):
    """One rank of torchrun_here: torchrun's variables, its own stdout/stderr files, setup(rank)
    if given, main's code as its exit status, and its stack in the err file if it hangs."""
    import faulthandler

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for fd, name in ((1, "out"), (2, "err")):
        os.dup2(os.open(f"{logs}/{rank}.{name}", os.O_WRONLY | os.O_CREAT), fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    faulthandler.dump_traceback_later(timeout - 5, exit=True)
    if setup:
        setup(rank)
    code = distar.main(list(args))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def torchrun_here(*args, nproc=2, timeout=600, setup=None):
    """torchrun's command line on nproc CPU ranks started by multiprocessing's fork server, which
    has imported torch and diffusers once (RANK_IMPORTS): each rank runs distar.main with the
    variables torchrun sets, without the ~5 s a rank spends on imports. For runs whose outputs a
    test reads; the launcher itself (its exit code, signals, rank start-up) keeps TORCHRUN.
    timeout: a guard against a hang, not a speed check, so far above a run's time on a busy
    machine (the longest call measured: 46 s on 2 cores at load average 15, 2.6x under 120 s)."""
    import multiprocessing
    import socket
    import tempfile

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(RANK_IMPORTS)
    with tempfile.TemporaryDirectory() as logs:
        ranks = [ctx.Process(target=_rank_main, args=(r, nproc, port, logs, args, timeout, setup))
                 for r in range(nproc)]
        for p in ranks:
            p.start()
        for p in ranks:
            p.join(timeout)
        hung = [p.kill() or p.join() or p for p in ranks if p.exitcode is None]
        out, err = ("".join(open(f).read() for r in range(nproc)
                            if os.path.exists(f := f"{logs}/{r}.{name}")) for name in ("out", "err"))
    if hung:
        raise TimeoutError(f"torchrun_here{args} ran past {timeout} s: " + err[-3000:])
    code = next((p.exitcode for p in ranks if p.exitcode), 0)  # as torchrun: one rank's failure
    done = subprocess.CompletedProcess(["torchrun", "distar.py", *args], code, out, err)
    done.rank_codes = [p.exitcode for p in ranks]
    return done


# -----------------------------------------------------------------------------
# the loss math against exact answers, in float64


def test_distance_grad_is_the_derivative_of_the_distance_over_the_whole_sample():
    torch.manual_seed(0)
    y = torch.randn(3, 4, 5, 6, dtype=f64, requires_grad=True)
    c = torch.tensor([0.5, 2.0, 7.0], dtype=f64)
    sq = (y**2).flatten(1).sum(1)
    for distance, d in (("l2", sq), ("pseudo_huber", torch.sqrt(sq + c**2) - c)):
        (grad,) = torch.autograd.grad(d.sum(), y, retain_graph=True)
        assert torch.allclose(distar.distance_grad(y, distance, c), grad, rtol=1e-12, atol=0)
    # a float c is the same as a constant per-sample tensor, and c matters
    ph = distar.distance_grad(y, "pseudo_huber", 2.0)
    per_sample = torch.full((3,), 2.0, dtype=f64)
    assert torch.allclose(ph, distar.distance_grad(y, "pseudo_huber", per_sample))
    assert not torch.allclose(ph, distar.distance_grad(y, "pseudo_huber", 0.01))


def test_losses_are_per_sample_over_all_non_batch_dims():
    """(B, C, H, W) inputs: each loss is one number per sample, equal to the loss of that sample
    alone, with per-sample weight and c."""
    torch.manual_seed(1)
    B = 4
    x_t = torch.randn(B, 4, 8, 8, dtype=f64)
    cond = torch.randn_like(x_t)
    W1, W2 = torch.randn(2, 4 * 64, 4 * 64, dtype=f64) / 16
    fake = lambda x: torch.tanh((x.flatten(1) @ W1).view_as(x))
    ref = lambda x: (x.flatten(1) @ W2).view_as(x)
    w, c = torch.rand(B, dtype=f64) + 0.5, torch.rand(B, dtype=f64) + 0.1
    losses = {
        "div_ph": lambda i: distar.score_divergence_loss(x_t[i], cond[i], fake, ref,
                                                         "pseudo_huber", c=c[i], weight=w[i]),
        "div_l2": lambda i: distar.score_divergence_loss(x_t[i], cond[i], fake, ref, "l2",
                                                         weight=w[i]),
        "kl": lambda i: distar.kl_loss(x_t[i], fake, ref, weight=w[i]),
        "cfg": lambda i: distar.cfg_reward_loss(x_t[i], fake, ref, weight=w[i]),
        "dsm": lambda i: distar.dsm_loss(fake(x_t[i]), cond[i], weight=w[i]),
    }
    for name, f in losses.items():
        whole = f(slice(None))
        assert whole.shape == (B,), name
        one_by_one = torch.cat([f(slice(i, i + 1)) for i in range(B)])
        assert torch.allclose(whole, one_by_one, rtol=1e-12), name
    # and the pseudo-Huber value written out by hand: one norm over C*H*W per sample
    y = (fake(x_t) - ref(x_t)).flatten(1)
    u = y / torch.sqrt((y**2).sum(1, keepdim=True) + c[:, None] ** 2)
    expect = -w * (u * (fake(x_t) - cond).flatten(1)).sum(1)
    assert torch.allclose(losses["div_ph"](slice(None)), expect, rtol=1e-12)


def test_kl_and_cfg_losses_do_not_backpropagate_through_the_nets():
    """kl_loss: d/dx_t = (s_fake - s_ref)(x_t); cfg_reward_loss: d/dx_t = -(s_c - s_u)(x_t)."""
    torch.manual_seed(2)
    x_t = torch.randn(5, 3, dtype=f64, requires_grad=True)
    f1, f2 = (lambda x: torch.sin(3 * x)), (lambda x: x**3)
    (g,) = torch.autograd.grad(distar.kl_loss(x_t, f1, f2, weight=2.0).sum(), x_t)
    assert torch.allclose(g, 2 * (f1(x_t) - f2(x_t)).detach(), rtol=1e-12)
    (g,) = torch.autograd.grad(distar.cfg_reward_loss(x_t, f1, f2).sum(), x_t)
    assert torch.allclose(g, -(f1(x_t) - f2(x_t)).detach(), rtol=1e-12)


def test_cfg_score_is_the_score_of_the_guided_density():
    """s_u + w (s_c - s_u) = grad log p_c^w p_u^(1-w), exactly (the printed s_c + a s_u is not)."""
    world = distar.make_toy_world()
    world.means = world.means.to(f64)
    torch.manual_seed(3)
    x = torch.randn(64, 2, dtype=f64) * 2
    a, s = torch.full((64,), 0.7, dtype=f64), torch.full((64,), 0.714, dtype=f64)
    c = torch.randint(world.K, (64,))
    for omega in (0.0, 1.0, 3.0, 8.5):
        xg = x.clone().requires_grad_(True)
        logp = omega * world.log_prob(xg, a, s, c) + (1 - omega) * world.log_prob(xg, a, s, None)
        (exact,) = torch.autograd.grad(logp.sum(), xg)
        s_c, s_u = world.score(x, a, s, c), world.score(x, a, s, None)
        assert torch.allclose(distar.cfg_score(s_c, s_u, omega), exact, atol=1e-10)
    printed = s_c + 7.5 * s_u
    assert (printed - exact).norm() > 0.1 * exact.norm()


# -----------------------------------------------------------------------------
# the toy world's exact scores, and the gradient check: Theorems 3.1 and 3.2 by Monte Carlo
# against the exact gradients, with the power to catch the wrong variants


def test_toy_scores_are_the_gradients_of_the_toy_log_densities():
    world = distar.make_toy_world()
    world.means = world.means.to(f64)
    torch.manual_seed(4)
    x = (torch.randn(100, 2, dtype=f64) * 2).requires_grad_(True)
    ab = torch.rand(100, dtype=f64)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    for c in (torch.randint(world.K, (100,)), 1, None):  # per-sample classes, one class, none
        (g,) = torch.autograd.grad(world.log_prob(x, a, s, c).sum(), x)
        assert torch.allclose(world.score(x, a, s, c), g, atol=1e-10)
    # and the log density is the diffused mixture's: mean over modes m of N(x; a_t m, var I) with
    # var = a_t^2 std^2 + sigma_t^2, written here with torch.distributions
    from torch.distributions import Normal

    def mixture(modes):  # modes (M, 2) -> log q_t(x), (B,)
        sd = (a**2 * world.std**2 + s**2).sqrt()[:, None]
        comps = [Normal(a[:, None] * m, sd).log_prob(x).sum(-1) for m in modes]
        return torch.logsumexp(torch.stack(comps), 0) - math.log(len(modes))

    assert torch.allclose(world.log_prob(x, a, s, 1), mixture(world.means[1]), atol=1e-10)
    assert torch.allclose(world.log_prob(x, a, s, None), mixture(world.means.reshape(-1, 2)),
                          atol=1e-10)


GB_ROWS = ["generator_backward: ph, cfg in, reward", "generator_backward: l2, cfg out",
           "generator_backward: KL, reward"]
GB_WRONG = ["wrong: ph weight sigma_t / D", "wrong: ph c = huber_c sqrt(D)", "wrong: l2 weight sigma_t / D",
            "wrong: cfg weight a sigma_t^2 / D", "wrong: KL weight sigma_t^2 / D"]


def test_the_toys_schedule_written_out_is_diffusers_sdxl_schedule():
    from diffusers import DDPMScheduler

    want = DDPMScheduler(num_train_timesteps=1000, **distar.SDXL_BETAS).alphas_cumprod
    assert torch.equal(distar.sdxl_alphas_cumprod(), want)


@pytest.fixture(scope="module")
def grad_check():
    return {r["name"].strip(): r for r in distar.gradient_check()}


@pytest.mark.xdist_group("grad_check")
@pytest.mark.parametrize("name", ["eq 3.4 pseudo-Huber (Thm 3.1)", "eq 3.4 l2 (Thm 3.1)",
                                  "kl_loss vs closed-form KL", "cfg_reward_loss (Thm 3.2, sign -)",
                                  "choice 2: cfg_score reference", *GB_ROWS])
def test_tractable_losses_have_the_exact_gradient(grad_check, name):
    r = grad_check[name]
    assert r["should_match"] and r["ok"], r
    # mean AND scale parameters: a wrong stop-gradient can get mu right and A wrong
    assert r["rel"]["mu"] < max(r["tol"], 1e-9) * 3 and r["rel"]["A"] < max(r["tol"], 1e-9) * 3, r
    assert r["tol"] < 0.05  # the check has the power to see a 5% error


@pytest.mark.xdist_group("grad_check")
@pytest.mark.parametrize("name", ["wrong: x_t detached inside d'", "wrong: x_t detached in 2nd s_psi",
                                  "printed sign + (eqs 3.5, 3.6)", "printed choice 2: s_c + a s_u",
                                  *GB_WRONG])
def test_wrong_gradient_variants_are_caught_with_margin(grad_check, name):
    r = grad_check[name]
    assert not r["should_match"] and r["ok"] and r["rel"]["all"] > 5 * r["tol"], r


# generator_loss with one weight (or generator_backward with one step) changed, and the row that
# must then fail: the check drives the code Algorithm 1 runs, not a copy of it
GB_MUTANTS = [
    ("generator_loss", "weight=sigma_t / math.sqrt(D)", "weight=sigma_t / D", GB_ROWS[0]),
    ("generator_loss", "c = cfg.huber_c * math.sqrt(D) / sigma_t", "c = cfg.huber_c * math.sqrt(D)",
     GB_ROWS[0]),
    ("generator_loss", "weight=sigma_t**2 / D)", "weight=sigma_t / D)", GB_ROWS[1]),
    ("generator_loss", 's_u, weight=sigma_t / D)', 's_u, weight=sigma_t**2 / D)', GB_ROWS[1]),
    ("generator_loss", "kl_loss(x_t, s_psi, s_ref, weight=sigma_t / D)",
     "kl_loss(x_t, s_psi, s_ref, weight=sigma_t**2 / D)", GB_ROWS[2]),
    ("generator_loss", 's_c_again = lambda x: reuse["s_c"]', 's_c_again = lambda x: s_u(x)',
     GB_ROWS[1]),
    ("generator_backward", 'grad["rew"] + grad["div"] + grad["cfg"]', 'grad["rew"] + grad["div"]',
     GB_ROWS[1]),
]


@pytest.mark.xdist_group("grad_check")
def test_each_weight_mutant_of_generator_loss_fails_its_generator_backward_row(monkeypatch):
    import inspect
    import textwrap

    original = {f: getattr(distar, f) for f in ("generator_loss", "generator_backward")}
    for fn, old, new, row in GB_MUTANTS:
        src = textwrap.dedent(inspect.getsource(original[fn]))
        assert src.count(old) == 1, (fn, old)
        ns = {}
        exec(src.replace(old, new), distar.__dict__, ns)
        monkeypatch.setattr(distar, fn, ns[fn])
        got = {r["name"].strip(): r for r in distar.gradient_check(n=2**14)}
        assert not got[row]["ok"] and got[row]["rel"]["all"] > 2 * got[row]["tol"], (new, got[row])
        monkeypatch.setattr(distar, fn, original[fn])


@pytest.mark.xdist_group("grad_check")
def test_theorem_3_2_printed_sign_gives_the_opposite_gradient(grad_check):
    assert abs(grad_check["printed sign + (eqs 3.5, 3.6)"]["rel"]["all"] - 2.0) < 1e-6


def test_a_failed_gradient_check_stops_the_toy_before_it_trains(tmp_path, monkeypatch, capsys):
    row = dict(name="eq 3.4 l2 (Thm 3.1)", rel=dict(mu=0.5, A=0.5, all=0.5), tol=0.01,
               should_match=True, ok=False)
    monkeypatch.setattr(distar, "gradient_check", lambda: [row])
    cfg = distar.parse_args(["--toy", f"--out_dir={tmp_path / 'out'}"])
    with pytest.raises(SystemExit, match="gradient check FAILED"):
        distar.run_toy(cfg, (0, 1, torch.device("cpu")))
    assert "FAILED" in capsys.readouterr().out and not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# the SDXL world on tiny random models, loaded by the real code: ClipReward, and generate as the
# LCM one-step pipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    distar.quiet_libraries()
    return distar.build_tiny(str(tmp_path_factory.mktemp("tiny")))


def _sdxl_world(tiny, *args):
    sdxl, reward = tiny
    cfg = distar.parse_args(["--tiny", f"--pretrained={sdxl}", "--generator_init=",
                             f"--reward_model={reward}", f"--reward_processor={reward}", *args])
    distar.quiet_libraries()
    world = distar.SDXLWorld(cfg, torch.device("cpu"))
    # a generator that differs from the reference, as after DMD2 initialisation
    with torch.no_grad():
        for p in world.generator.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return world


def test_each_rank_draws_prompts_from_its_own_shard(tiny, tmp_path):
    """Rank r of N trains on prompts r, r + N, ...; a rank past the last prompt takes them all."""
    sdxl, reward = tiny
    (tmp_path / "p.txt").write_text("".join(f"prompt {i}\n" for i in range(5)))
    cfg = distar.parse_args(["--tiny", f"--pretrained={sdxl}", "--generator_init=",
                             f"--reward_model={reward}", f"--reward_processor={reward}",
                             f"--prompts={tmp_path / 'p.txt'}"])
    drawn = {}
    for rank, world_size in ((0, 2), (1, 2), (6, 8)):
        world = distar.SDXLWorld(cfg, torch.device("cpu"), rank, world_size)
        drawn[rank] = set(world.sample_cond(40)["prompts"])
    assert drawn[0] == {"prompt 0", "prompt 2", "prompt 4"}
    assert drawn[1] == {"prompt 1", "prompt 3"}
    assert drawn[6] == {f"prompt {i}" for i in range(5)}


def test_clip_reward_preprocesses_images_as_the_reward_models_own_processor(tiny):
    """ClipReward's differentiable resize of the short side (bicubic), centre crop and mean/std
    give the pixels the transformers processor gives, on a 48 x 80 image of waves (the processor
    resizes uint8 in PIL: 0.014 apart at most, against 0.09 with a bilinear resize)."""
    from PIL import Image
    from transformers import AutoProcessor

    _, reward = tiny
    clip = distar.ClipReward(reward, reward)
    h, w = torch.arange(48.0)[:, None], torch.arange(80.0)[None]
    img = torch.stack([0.5 + 0.4 * torch.sin(h / 2.5 + k) * torch.cos(w / 3 - k) for k in range(3)])
    u8 = (img * 255).round().to(torch.uint8)  # (3, 48, 80)
    seen, real = [], clip.model.get_image_features

    def spy(pixel_values):  # the pixels ClipReward hands to CLIP's vision tower
        seen.append(pixel_values)
        return real(pixel_values=pixel_values)

    clip.model.get_image_features = spy
    clip(u8[None].float() / 255, clip.text_features(["a cat"]))
    processor = AutoProcessor.from_pretrained(reward).image_processor
    expect = processor(images=Image.fromarray(u8.permute(1, 2, 0).numpy()),
                       return_tensors="pt").pixel_values  # (1, 3, 32, 32)
    assert seen[0].shape == expect.shape
    assert (seen[0] - expect).abs().max() < 0.03


def test_sample_grids_use_the_same_noise_at_every_step(tiny, tmp_path):
    world = _sdxl_world(tiny)
    for seed in (0, 1):  # whatever the training RNG's state
        torch.manual_seed(seed)
        world.save_samples(tmp_path / f"{seed}.png")
    assert (tmp_path / "0.png").read_bytes() == (tmp_path / "1.png").read_bytes()


def test_clip_text_features_need_no_attention_mask(tiny):
    """ClipReward reads text features without the attention mask (as SDXL's encode_prompt does;
    the meta FLOP count needs it): CLIP's text attention is causal and the features are read at
    the end token, so the padding after it must change nothing."""
    _, reward = tiny
    clip = distar.ClipReward(reward, reward)
    prompts = ["a cat", "the skyline of new york city at dusk, with a long prompt"]
    tok = clip.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert (tok.attention_mask == 0).any()  # there is padding to ignore
    with torch.no_grad():
        masked = clip.model.get_text_features(input_ids=tok.input_ids,
                                              attention_mask=tok.attention_mask).pooler_output
    expect = torch.nn.functional.normalize(masked, dim=-1)
    assert torch.allclose(clip.text_features(prompts), expect, atol=1e-6)


def test_training_x0_equals_the_lcm_one_step_pipeline(tiny):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    world = _sdxl_world(tiny)
    prompts = ["a red fox", "a blue car"]
    z = torch.randn(2, *world.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x0 = world.generate(world.generator, world.encode(prompts), z)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny[0], unet=world.generator)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompts, num_inference_steps=1, timesteps=[399], guidance_scale=0, latents=z.clone(),
               height=64, width=64, output_type="latent").images
    assert torch.allclose(out, x0, atol=1e-4), (out - x0).abs().max()
    assert (x0 - z).abs().mean() > 0.1  # not trivially equal
    # and the images the reward sees are the pipeline's (the VAE's scaling factor undone)
    img = pipe(prompts, num_inference_steps=1, timesteps=[399], guidance_scale=0, latents=z.clone(),
               height=64, width=64, output_type="pt").images  # (2, 3, 64, 64) in [0, 1]
    with torch.no_grad():
        assert torch.allclose(world.decode(x0), img, atol=1e-4)


# -----------------------------------------------------------------------------
# Algorithm 1: each phase's loss and where its gradient flows, the guarded update, one alternating
# step (toy and tiny SDXL)


def _toy(args):
    cfg = distar.parse_args(["--toy", *args])
    world = distar.make_toy_world()
    world.cfg = cfg
    return world


def _state(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_diffuse_draws_t_from_both_ends_of_the_range_and_noises_by_the_schedule():
    """t ~ U{t_min..t_max} with both ends included (DMD2's [20, 980]), and x_t = a_t x_0 +
    sigma_t eps with a_t^2 = alphabar_t of SDXL's schedule."""
    world = _toy(["--t_min=5", "--t_max=7"])
    x0 = torch.randn(3000, 2, dtype=f64)
    t, x_t, eps, sigma_t = distar.diffuse(world, x0)
    assert set(t.tolist()) == {5, 6, 7}
    ab = world.alphas_cumprod.double()[t][:, None]  # (B, 1)
    assert torch.allclose(sigma_t, (1 - ab).sqrt())
    assert torch.allclose(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * eps)


def test_assistant_loss_is_the_eps_prediction_mse():
    """The DSM weight sigma_t^2 / D turns the score-space loss (eq. 2.2) into the eps MSE,
    mean over batch and elements of (eps_psi(x_t, t, c) - eps)^2."""
    world = _toy([])
    cond = world.sample_cond(256)
    torch.manual_seed(5)
    loss = distar.assistant_loss(world, world.assistant, cond)
    torch.manual_seed(5)  # the same z, t and eps
    with torch.no_grad():
        x0 = world.generate(world.generator, cond)
    t, x_t, eps, _ = distar.diffuse(world, x0)
    mse = (world.eps_psi(world.assistant, x_t, t, cond) - eps).square().mean()
    assert loss.item() == pytest.approx(mse.item(), rel=1e-5)


def test_assistant_loss_is_minimised_by_the_true_eps():
    """The assistant phase's DSM (eq. 2.2) on x_t = a_t x_0 + sigma_t eps: over the family
    eps_psi = k eps_true (eps_true = -sigma_t s_true, exact for Gaussian x_0), the loss is a
    parabola in k with its minimum at k = 1. A flipped DSM target would put it at k = -1."""
    world = distar.ToyWorld([[(0.5, -1.0)]], std=0.7, dtype=f64)
    world.cfg = distar.parse_args(["--toy"])
    world.generator = lambda z, c: world.means[0, 0] + world.std * z  # samples of q_0 exactly

    class Scaled(torch.nn.Module):  # eps_psi(x_t, t) = k eps_true(x_t, t)
        def __init__(self, k):
            super().__init__()
            self.k = k

        def forward(self, x_t, c, t):
            return self.k * world.eps_ref(x_t, t.long(), c)

    def loss(k):
        torch.manual_seed(3)  # the same t, z and eps for every k
        cond = torch.zeros(200_000, dtype=torch.long)
        return distar.assistant_loss(world, Scaled(k), cond).item()

    L0, L1, L2 = loss(0.0), loss(1.0), loss(2.0)
    A = (L0 - 2 * L1 + L2) / 2
    k_star = -(L1 - L0 - A) / (2 * A)
    assert abs(k_star - 1) < 0.02, k_star
    assert L1 < min(L0, L2)


def test_kl_gradient_is_the_same_for_cfg_in_and_out():
    """With alpha_cfg the guidance strength (omega = 1 + alpha_cfg), choice 1 and choice 2 give
    the same KL gradient: -(s_fake - s_u - omega (s_c - s_u)) = -(s_fake - s_c) + alpha (s_c - s_u)."""
    grads = []
    for mode in ("in", "out"):
        world = _toy(["--divergence=kl", f"--cfg={mode}", "--alpha_cfg=3", "--alpha_rew=0"])
        torch.manual_seed(0)
        world.generator.load_state_dict(distar.make_toy_world().generator.state_dict())
        world.assistant.load_state_dict(distar.make_toy_world().assistant.state_dict())
        torch.manual_seed(1)
        loss, _ = distar.generator_loss(world, world.generator, world.sample_cond(64))
        grads.append(torch.autograd.grad(loss, list(world.generator.parameters())))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_generator_backward_freezes_the_assistant_only_for_the_step():
    """The one generator step train, --bench and the FLOP count share: no gradient reaches psi's
    weights, theta gets one (with no reward and no CFG, only through the nets' inputs), and psi is
    trainable again afterwards (also after an error)."""
    world = _toy(["--alpha_rew=0", "--alpha_cfg=0"])
    seen = []  # psi's weights frozen inside the step: no activations kept for their gradients
    world.assistant.register_forward_pre_hook(
        lambda m, args: seen.append(any(p.requires_grad for p in m.parameters())))
    distar.generator_backward(world, world.generator, world.sample_cond(32))
    assert seen == [False]
    assert all(p.grad is None and p.requires_grad for p in world.assistant.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in world.generator.parameters())
    world.reward = None  # generator_loss fails inside the step
    with pytest.raises(TypeError):
        distar.generator_backward(world, world.generator, world.sample_cond(4))
    assert all(p.requires_grad for p in world.assistant.parameters())


def test_generator_backward_splits_the_x0_gradient_by_term_without_changing_it():
    """The per-term x_0-gradients (the logged balance) sum to the gradient of the whole loss, and
    theta's gradient is the one a single loss.backward() gives."""
    world = _toy(["--cfg=out", "--alpha_cfg=2", "--alpha_rew=100"])
    cond = world.sample_cond(64)
    torch.manual_seed(7)
    loss, terms = distar.generator_loss(world, world.generator, cond)
    x0 = terms["x0"]
    (whole,) = torch.autograd.grad(loss, x0, retain_graph=True)
    loss.backward()
    expect = [p.grad.clone() for p in world.generator.parameters()]
    world.generator.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    _, terms = distar.generator_backward(world, world.generator, cond)
    for a, b in zip(expect, world.generator.parameters()):
        assert torch.allclose(a, b.grad, rtol=1e-5, atol=1e-8)
    norms = [terms[f"x0grad_{k}"].item() for k in ("rew", "div", "cfg")]
    assert all(n > 0 for n in norms)
    # the reward's gradient is the constant -alpha_rew reward_scale e_0 / B on every sample
    assert norms[0] == pytest.approx(100 * world.reward_scale / 64 * math.sqrt(64), rel=1e-5)
    assert whole.norm().item() <= sum(norms) + 1e-9


def test_the_optimizer_is_fused_adamw_with_the_command_lines_hyperparameters():
    cfg = distar.parse_args(["--toy", "--beta1=0.8", "--beta2=0.95", "--weight_decay=0.05"])
    opt = distar.make_optimizer(cfg, torch.nn.Linear(2, 2).parameters(), 3e-4)
    group = opt.param_groups[0]
    assert type(opt) is torch.optim.AdamW and group["fused"]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (3e-4, (0.8, 0.95), 0.05)


def test_an_update_clips_the_gradient_norm_to_grad_clip():
    """All of a net's gradients, as one vector, are scaled down to norm --grad_clip; the norm
    before clipping is returned (and logged)."""
    net = torch.nn.Linear(3, 2)  # 8 parameters
    before = torch.cat([p.detach().flatten() for p in net.parameters()])
    for p in net.parameters():
        p.grad = torch.full_like(p, 2.0)  # norm 2 sqrt(8)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    grad_norm, skip = distar.clip_and_step(opt, net, torch.ones(()), 1.0, 1)
    after = torch.cat([p.detach().flatten() for p in net.parameters()])
    assert not skip and grad_norm.item() == pytest.approx(2 * math.sqrt(8))
    assert torch.allclose(before - after, torch.full((8,), 1 / math.sqrt(8)))


def test_a_non_finite_update_is_skipped_and_counted(tmp_path, monkeypatch):
    """A NaN in the generator loss at one step: that update is skipped (theta unchanged, finite),
    the skip is counted, and training goes on."""
    world = _toy(["--max_steps=3", "--assistant_steps=1", "--log_interval=1", "--ckpt_interval=100",
                  f"--out_dir={tmp_path}"])
    reward, calls, seen = world.reward, [], []

    def reward_nan_at_step_2(x0, c):
        calls.append(0)
        return reward(x0, c) * (float("nan") if len(calls) == 2 else 1.0)

    def spy(opt, net, *args):
        before = _state(net)
        grad_norm, skip = real(opt, net, *args)
        if net is world.generator:
            seen.append((skip, all(torch.equal(before[k], v) for k, v in _state(net).items())))
            norms.append(grad_norm.item())
        return grad_norm, skip

    world.reward, real, norms = reward_nan_at_step_2, distar.clip_and_step, []
    monkeypatch.setattr(distar, "clip_and_step", spy)
    history = distar.fit(world.cfg, world, (0, 1, torch.device("cpu")))
    assert [r["skipped"] for r in history] == [0, 1, 0]
    for r, norm in zip(history[::2], norms[::2]):  # grad_norm: theta's, before clipping
        assert r["grad_norm"] == pytest.approx(norm, rel=1e-6) and norm > 0
    assert seen == [(False, False), (True, True), (False, False)]  # (skipped, theta unchanged)
    assert all(torch.isfinite(p).all() for p in world.generator.parameters())


def test_skips_that_are_not_in_a_row_never_stop_the_run(tmp_path):
    """--max_skips counts a streak: a good update in between starts it again."""
    world = _toy(["--max_steps=6", "--assistant_steps=1", "--max_skips=2", "--log_interval=1",
                  "--ckpt_interval=100", f"--out_dir={tmp_path}"])
    reward, calls = world.reward, []

    def reward_nan_at_odd_steps(x0, c):
        calls.append(0)
        return reward(x0, c) * (float("nan") if len(calls) % 2 else 1.0)

    world.reward = reward_nan_at_odd_steps
    history = distar.fit(world.cfg, world, (0, 1, torch.device("cpu")))
    assert [r["skipped"] for r in history] == [1, 0, 1, 0, 1, 0]


def test_non_finite_updates_in_a_row_stop_the_run_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(distar.ToyWorld, "reward", lambda self, x0, c: x0[:, 0] * float("nan"))
    monkeypatch.setattr(distar, "gradient_check", lambda: [])
    code = distar.main(["--toy", "--max_steps=5", "--max_skips=2", "--ckpt_interval=1",
                        f"--out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "2 g updates in a row" in err, err
    from safetensors.torch import load_file
    ckpts = [d for d in os.listdir(tmp_path) if d.startswith("checkpoint")]
    assert ckpts == ["checkpoint-000001"]  # written after the first skip, not after the stop
    for net in ("generator", "assistant"):  # the skipped updates left the weights finite
        sd = load_file(tmp_path / ckpts[0] / net / "model.safetensors")
        assert all(torch.isfinite(v).all() for v in sd.values())


def test_one_alternating_step_changes_the_trained_nets_only(tiny, tmp_path):
    world = _sdxl_world(tiny, "--max_steps=1", "--assistant_steps=1", f"--out_dir={tmp_path}")
    frozen = {"s_ref": world.s_ref, "vae": world.vae, "text_encoder": world.pipe.text_encoder,
              "text_encoder_2": world.pipe.text_encoder_2, "reward": world.reward_fn.model}
    before = {k: _state(m) for k, m in {**frozen, "g": world.generator, "psi": world.assistant}.items()}
    distar.fit(world.cfg, world, (0, 1, torch.device("cpu")))
    for name, net in {**frozen, "g": world.generator, "psi": world.assistant}.items():
        after = _state(net)
        changed = any(not torch.equal(after[k], before[name][k]) for k in after)
        assert changed == (name in ("g", "psi")), name
    assert all(not p.requires_grad for m in frozen.values() for p in m.parameters())


@pytest.mark.parametrize("mode", ["in", "out"])
def test_generator_gradient_flows_through_reward_and_frozen_unet_inputs(tiny, mode):
    world = _sdxl_world(tiny, f"--cfg={mode}", "--alpha_cfg=2", "--alpha_rew=10")
    grads = {}

    def watch(name):
        def pre_hook(module, args, kwargs):
            x = kwargs.get("pixel_values", args[0] if args else None)
            if x.requires_grad:
                x.register_hook(lambda g: grads.setdefault(name, []).append(g.abs().sum().item()))
        return pre_hook

    hooks = [world.s_ref.register_forward_pre_hook(watch("s_ref"), with_kwargs=True),
             world.assistant.register_forward_pre_hook(watch("s_psi"), with_kwargs=True),
             world.reward_fn.model.vision_model.register_forward_pre_hook(watch("reward"), with_kwargs=True)]
    world.assistant.requires_grad_(False)
    loss, _ = distar.generator_loss(world, world.generator, world.sample_cond(2))
    loss.backward()
    for h in hooks:
        h.remove()
    # choice 2: s_ref runs once, on the batch [c; empty], inside d' on the gradient path;
    # choice 1: s_ref (c) inside d' carries gradient, the CFG term's empty-prompt call is at sg[x_t]
    assert len(grads["s_ref"]) == 1 and grads["s_ref"][0] > 0
    assert len(grads["s_psi"]) == 1 and grads["s_psi"][0] > 0
    assert len(grads["reward"]) == 1 and grads["reward"][0] > 0
    assert all(p.grad is None for p in world.assistant.parameters())
    assert all(p.grad is None for p in world.s_ref.parameters())


def _two_call_generator_loss(world, cond):
    """generator_loss (pseudo-Huber) with a reference call per score: choice 2's s_c and s_u each
    their own call, and choice 1's CFG term computing s_c again at sg[x_t]."""
    cfg = world.cfg
    x0 = world.generate(world.generator, cond)
    t, x_t, eps, sigma_t = distar.diffuse(world, x0)
    D, sig, score = x0[0].numel(), sigma_t.flatten(), lambda e: -e / sigma_t
    s_fake = lambda x: score(world.eps_psi(world.assistant, x, t, cond))
    s_c = lambda x: score(world.eps_ref(x, t, cond))
    s_u = lambda x: score(world.eps_ref(x, t, None))
    s_ref = s_c if cfg.cfg == "out" else lambda x: distar.cfg_score(s_c(x), s_u(x), 1 + cfg.alpha_cfg)
    loss_div = distar.score_divergence_loss(x_t, score(eps), s_fake, s_ref, "pseudo_huber",
                                            c=cfg.huber_c * math.sqrt(D) / sig, weight=sig / math.sqrt(D))
    loss_cfg = (cfg.alpha_cfg * distar.cfg_reward_loss(x_t, s_c, s_u, weight=sig / D)
                if cfg.cfg == "out" else torch.zeros_like(loss_div))
    loss_rew = -cfg.alpha_rew * world.reward(x0, cond)
    return (loss_rew + loss_div + loss_cfg).mean(), dict(loss_rew=loss_rew.mean(),
                                                         loss_div=loss_div.mean(), loss_cfg=loss_cfg.mean())


@pytest.mark.parametrize("mode", ["in", "out"])
def test_guidance_needs_one_reference_call_fewer_for_the_same_loss_and_gradient(tiny, mode):
    """Choice 2 gets s_ref(x_t | c) and s_ref(x_t | empty) from one reference call on the batch
    [x_t; x_t] with [c; empty]; choice 1's CFG term reuses the s_ref(x_t | c) the divergence
    computed (its value only: the term is at sg[x_t]). The terms and theta's gradient are those of
    a call per score, with one call fewer."""
    world = _sdxl_world(tiny, f"--cfg={mode}", "--alpha_cfg=2", "--alpha_rew=10")
    with torch.no_grad():  # an assistant off the reference, so that the divergence is not 0
        for p in world.assistant.parameters():
            p.add_(0.01 * torch.randn_like(p))
    world.assistant.requires_grad_(False)
    calls = []  # (batch, grad enabled) of each reference call
    world.s_ref.register_forward_pre_hook(
        lambda m, args: calls.append((len(args[0]), torch.is_grad_enabled())))
    cond = world.sample_cond(2)
    results = {}
    for version, loss_fn in (("one", lambda: distar.generator_loss(world, world.generator, cond)),
                             ("two", lambda: _two_call_generator_loss(world, cond))):
        calls.clear()
        torch.manual_seed(3)  # the same z, t and eps
        loss, terms = loss_fn()
        grads = torch.autograd.grad(loss, list(world.generator.parameters()))
        results[version] = (loss, terms, grads, list(calls))
    (loss, terms, grads, calls_one), (loss2, terms2, grads2, calls_two) = results["one"], results["two"]
    for k in ("loss_rew", "loss_div", "loss_cfg"):
        assert terms[k].item() == pytest.approx(terms2[k].item(), rel=1e-4, abs=1e-7), k
    assert loss.item() == pytest.approx(loss2.item(), rel=1e-5)
    assert (terms["loss_cfg"] != 0) == (mode == "out")
    flat = lambda gs: torch.cat([g.flatten() for g in gs])
    assert (flat(grads) - flat(grads2)).norm() <= 1e-4 * flat(grads2).norm()
    if mode == "in":  # one call of 2B for both, on the gradient path, instead of two of B
        assert (calls_one, calls_two) == ([(4, True)], [(2, True)] * 2)
    else:  # the divergence's with grad, the empty prompt's without; no second pass for c
        assert (calls_one, calls_two) == ([(2, True), (2, False)], [(2, True), (2, False), (2, False)])


def test_vae_decodes_under_bf16_autocast_within_bf16_rounding_and_the_reward_gradient_reaches_g(tiny):
    """--precision=bf16: the VAE's weights stay fp32 and its decode runs under bf16 autocast. Its
    output is within bf16 rounding of fp32's: bf16 rounds to 2^-8 relative; the decoder rounds the
    inputs, weights and outputs of each of its n convolutions and linears, and independent
    roundings add in quadrature, so relative L2 error <= sqrt(3 n) 2^-8 (0.038 here; measured
    0.016). The reward's gradient keeps its direction and reaches theta."""
    world = _sdxl_world(tiny, "--precision=bf16")
    n = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
            for m in [world.vae.post_quant_conv, *world.vae.decoder.modules()])
    raw = []  # the decoder's output, before the clamp to [0, 1], and its dtype
    world.vae.decoder.register_forward_hook(lambda m, args, out: raw.append(out))
    cond = world.sample_cond(2)
    x0 = world.generate(world.generator, cond)
    out = {}
    for bf16 in (True, False):
        world.autocast["enabled"] = bf16
        images = world.decode(x0)
        assert images.dtype == torch.float32  # the reward's resize and crop in fp32
        r = world.reward_fn(images, world.reward_fn.text_features(cond["prompts"]))
        out[bf16] = raw[-1].float(), raw[-1].dtype, torch.autograd.grad(r.sum(), x0, retain_graph=True)[0]
    (a, dtype_a, grad_a), (b, dtype_b, grad_b) = out[True], out[False]
    assert (dtype_a, dtype_b) == (torch.bfloat16, torch.float32)
    assert all(p.dtype == torch.float32 for p in world.vae.parameters())
    assert 0 < ((a - b).norm() / b.norm()).item() <= math.sqrt(3 * n) * 2**-8, n
    assert torch.nn.functional.cosine_similarity(grad_a.flatten(), grad_b.flatten(), dim=0) > 0.99
    world.autocast["enabled"] = True
    grads = torch.autograd.grad(world.reward(x0, cond).sum(), list(world.generator.parameters()))
    assert all(torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_every_divergence_scales_like_kl_with_the_resolution(tiny):
    """The x_0-gradient of each divergence relative to KL's, at 64 and 128 px (D = 256 and 1024
    latent elements): the balance the toy sets must carry to SDXL's 1024 px. With pseudo-Huber
    weighted 1/D instead of 1/sqrt(D), its ratio falls 2x here."""
    from dataclasses import replace
    ratios = {}
    for res in (64, 128):
        world = _sdxl_world(tiny, f"--resolution={res}", "--alpha_rew=0", "--alpha_cfg=0")
        with torch.no_grad():  # an assistant off the reference, so that the divergences are not 0
            for p in world.assistant.parameters():
                p.add_(0.01 * torch.randn_like(p))
        norm = {}
        for div in ("kl", "l2", "pseudo_huber"):
            world.cfg = replace(world.cfg, divergence=div)
            torch.manual_seed(0)
            step = lambda: distar.generator_backward(world, world.generator, world.sample_cond(2))[1]
            norm[div] = statistics.mean(step()["x0grad_div"].item() for _ in range(3))
            world.generator.zero_grad(set_to_none=True)
        ratios[res] = {div: norm[div] / norm["kl"] for div in ("l2", "pseudo_huber")}
    for div in ("l2", "pseudo_huber"):
        assert 1 / 1.5 < ratios[64][div] / ratios[128][div] < 1.5, ratios


@pytest.mark.parametrize("divergence", ["pseudo_huber", "l2", "kl"])
@pytest.mark.parametrize("cfg", ["in", "out"])
def test_generator_loss_terms_are_their_eps_scale_forms(divergence, cfg):
    """The weights in score space are the per-element eps-scale forms, with Delta = eps_psi -
    eps_ref, eps_ref = eps_u + omega (eps_c - eps_u) under --cfg=in, D elements per sample:
    pseudo-Huber -Delta . (eps_psi - eps) / sqrt(D (||Delta||^2 + huber_c^2 D)), l2 -2 Delta .
    (eps_psi - eps) / D, KL -Delta . x_t / D, and choice 1's term alpha_cfg (eps_c - eps_u) . x_t / D."""
    alpha, huber_c = 2.0, 0.3
    world = _toy([f"--divergence={divergence}", f"--cfg={cfg}", f"--alpha_cfg={alpha}",
                  f"--huber_c={huber_c}"])
    cond = world.sample_cond(512)
    torch.manual_seed(9)
    _, terms = distar.generator_loss(world, world.generator, cond)
    torch.manual_seed(9)  # the same z, t and eps
    with torch.no_grad():
        x0 = world.generate(world.generator, cond)
        t, x_t, eps, _ = distar.diffuse(world, x0)
        eps_psi = world.eps_psi(world.assistant, x_t, t, cond)
        eps_c, eps_u = world.eps_ref(x_t, t, cond), world.eps_ref(x_t, t, None)
    D, dot = 2, lambda u, v: (u * v).sum(1)
    delta = eps_psi - (eps_u + (1 + alpha) * (eps_c - eps_u) if cfg == "in" else eps_c)
    huber_norm = (D * (dot(delta, delta) + huber_c**2 * D)).sqrt()
    div = {"pseudo_huber": -dot(delta, eps_psi - eps) / huber_norm,
           "l2": -2 * dot(delta, eps_psi - eps) / D, "kl": -dot(delta, x_t) / D}[divergence]
    cfg_term = alpha * dot(eps_c - eps_u, x_t) / D if cfg == "out" else torch.zeros(1)
    assert terms["loss_div"].item() == pytest.approx(div.mean().item(), rel=1e-4)
    assert terms["loss_cfg"].item() == pytest.approx(cfg_term.mean().item(), rel=1e-4, abs=1e-9)


# -----------------------------------------------------------------------------
# DDP and checkpoints: collectives on the training device, resume exact (also after SIGKILL, also
# sharded), and what a run may do to an out_dir holding another run


def test_collectives_take_tensors_on_the_training_device(monkeypatch):
    """NCCL takes only CUDA tensors, so every tensor that reaches a collective must live on the
    training device. Meta stands in for CUDA here: a tensor moved to the CPU would show."""
    seen, meta = [], torch.device("meta")

    def spy(t, *a, **k):
        seen.append(t.device)
        raise StopIteration  # meta tensors hold no values: stop once the device is seen

    for name in ("all_reduce", "broadcast", "all_gather", "reduce"):
        monkeypatch.setattr(distar.dist, name, spy)
    with pytest.raises(StopIteration):
        distar.all_reduce_mean(dict(a=torch.ones((), device=meta), b=3.0, c=torch.ones(())), 2, meta)
    net = torch.nn.Linear(2, 2, device=meta)
    net(torch.ones(1, 2, device=meta)).sum().backward()
    with pytest.raises(StopIteration):
        distar.clip_and_step(torch.optim.SGD(net.parameters()), net, torch.ones((), device=meta), 1.0, 2)
    assert seen == [meta, meta]


def test_logged_metrics_are_the_mean_over_ranks(monkeypatch):
    other = torch.tensor([5.0, 7.0])  # rank 1's values, as all_reduce sums them in
    monkeypatch.setattr(distar.dist, "all_reduce", lambda t, *a, **k: t.add_(other))
    got = distar.all_reduce_mean(dict(a=1.0, b=torch.tensor(3.0)), 2, torch.device("cpu"))
    assert got == dict(a=3.0, b=5.0)


def test_ranks_out_of_sync_stop_the_run(monkeypatch):
    """train ends by comparing each rank's parameter fingerprints with rank 0's."""
    net = torch.nn.Linear(2, 2)
    monkeypatch.setattr(distar.dist, "all_reduce", lambda t, *a, **k: None)  # this rank's diff
    monkeypatch.setattr(distar.dist, "broadcast", lambda t, src: None)  # rank 0 holds the same
    distar.assert_ranks_in_sync(net, 2)
    monkeypatch.setattr(distar.dist, "broadcast", lambda t, src: t.add_(1e-6))  # rank 0's differ
    with pytest.raises(RuntimeError, match="ranks out of sync"):
        distar.assert_ranks_in_sync(net, 2)


def test_collectives_time_out_in_minutes_and_the_waits_for_rank_0s_writes_in_an_hour(
        tmp_path, monkeypatch):
    """A rank that stopped is found out within training's 10-minute timeout; the waits while rank 0
    writes a ~60 GB checkpoint (and loading) go through a gloo group of their own with an hour:
    barrier, all_ok, which each checkpoint waits in, and --fsdp's DCP save and load."""
    import datetime
    got, groups, waits = {}, [], []
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(distar.dist, "init_process_group",
                        lambda backend, **kw: got.update(kw, backend=backend))
    monkeypatch.setattr(distar.dist, "new_group", lambda **kw: groups.append(kw) or "slow")
    monkeypatch.setattr(distar, "SLOW_GROUP", None)  # as it was, after the test
    monkeypatch.setattr(distar.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(distar.dist, "get_world_size", lambda: 1)
    distar.setup_distributed()
    assert got["backend"] == ("nccl" if torch.cuda.is_available() else "gloo")
    assert got["timeout"] <= datetime.timedelta(minutes=10)
    assert groups == [dict(backend="gloo", timeout=datetime.timedelta(hours=1))]
    monkeypatch.setattr(distar.dist, "barrier", lambda group=None: waits.append(group))
    monkeypatch.setattr(distar.dist, "all_reduce", lambda t, op=None, group=None: waits.append(group))
    monkeypatch.setattr(distar.dist, "all_gather_object", lambda out, obj: None)
    distar.barrier(2)
    world = _toy([f"--out_dir={tmp_path}"])
    distar.save_checkpoint(world.cfg, 1, world, *_toy_optimizers(world.cfg, world),
                           (0, 2, torch.device("cpu")))  # rank 0 of 2
    assert waits == ["slow"] * 4 and (tmp_path / "checkpoint-000001" / "state.pt").is_file()
    import torch.distributed.checkpoint as dcp  # --fsdp's AdamW shards: DCP's plans and its waits
    import torch.distributed.checkpoint.state_dict as dcp_state
    for name in ("save", "load"):
        monkeypatch.setattr(dcp, name, lambda sd, checkpoint_id, process_group=None: waits.append(process_group))
    monkeypatch.setattr(dcp_state, "get_optimizer_state_dict", lambda net, opt: {})
    monkeypatch.setattr(dcp_state, "set_optimizer_state_dict", lambda net, opt, sd: None)
    waits.clear()
    distar.sharded_optimizers(dict(opt_g=(None, None)), str(tmp_path / "optimizer"))
    distar.sharded_optimizers(dict(opt_g=(None, None)), str(tmp_path / "optimizer"), load=True)
    assert waits == ["slow"] * 2


def test_the_toy_runs_on_the_cpu_and_torchrun_needs_a_gpu_per_process(monkeypatch, capsys):
    """The toy's nets are too small for a GPU: its ranks use gloo on the CPU, so the quick start's
    torchrun command runs on a one-GPU laptop. SDXL puts one rank on each GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert distar.setup_distributed(cuda=False) == (0, 1, torch.device("cpu"))
    for k, v in dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(distar.ConfigError, match="--nproc_per_node=2 but this node has 1 GPU"):
        distar.setup_distributed()
    monkeypatch.setattr(distar, "run_toy", lambda cfg, dist_info: None)  # past the set-up
    got = {}
    monkeypatch.setattr(distar.dist, "init_process_group", lambda backend, **kw: got.update(
        backend=backend, **kw))
    monkeypatch.setattr(distar.dist, "new_group", lambda **kw: None)
    monkeypatch.setattr(distar, "SLOW_GROUP", None)
    monkeypatch.setattr(distar.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distar.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distar.dist, "is_initialized", lambda: False)
    assert distar.main(["--toy"]) == 0 and got["backend"] == "gloo" and got["device_id"] is None
    assert distar.main(["--tiny"]) == 2  # rank 1 of 2 on a one-GPU node: one line, from rank 0
    assert capsys.readouterr().err == ""


def test_rank_r_of_n_seeds_with_seed_times_n_plus_r(monkeypatch):
    """Each rank draws its own z, t, eps and prompts (DiT's seed * world_size + rank): with one seed
    for all, N ranks would train on N copies of one batch."""
    seeds = {}
    monkeypatch.setattr(distar, "run_toy", lambda cfg, dist_info: seeds.update(
        {dist_info[:2]: torch.initial_seed()}))
    for rank, world_size in ((0, 1), (0, 2), (1, 2), (5, 8)):
        monkeypatch.setattr(distar, "setup_distributed", lambda cuda, r=rank, n=world_size: (
            r, n, torch.device("cpu")))
        assert distar.main(["--toy", "--seed=3"]) == 0
    assert seeds == {(0, 1): 3, (0, 2): 6, (1, 2): 7, (5, 8): 29}


def test_an_error_is_one_line_in_each_nodes_log(monkeypatch, capsys):
    """Each node's torchrun writes its own log: its first rank reports (a folder missing on that
    node alone included), the node's other ranks stay silent."""
    for rank, local_rank, lines in (("9", "1", 0), ("8", "0", 1)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert distar.main(["--toy", "--max_steps=ten"]) == 2
        assert capsys.readouterr().err.count("distar: error: --max_steps") == lines


def test_an_error_on_some_ranks_stops_every_rank_in_one_line_per_node(monkeypatch, capsys):
    """all_ok: where rank 3 of 8 alone fails (2 per node), it raises its own error, which it
    prints; every other rank raises RankFailed naming it, which the first rank of each other node
    prints, and each returns from main at once."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(distar.dist, "all_reduce", lambda t, op, group: t.clamp_(max=3))

    def run_toy(cfg, dist_info):
        with distar.all_ok(dist_info):
            if dist_info[0] == 3:
                raise distar.LoadError("--prompts=p.txt: cannot read it: Permission denied")

    monkeypatch.setattr(distar, "run_toy", run_toy)
    lines = []
    for rank in range(8):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank % 2))
        monkeypatch.setattr(distar, "setup_distributed", lambda cuda, r=rank: (r, 8, torch.device("cpu")))
        assert distar.main(["--toy"]) == (2 if rank == 3 else 1)
        lines.append(capsys.readouterr().err)
    failed = "distar: error: rank 3 failed: its error is in its node's log\n"
    assert lines == [failed, "", "", "distar: error: --prompts=p.txt: cannot read it: Permission "
                     "denied\n", failed, "", failed, ""]


def _deny_open_on_rank_1(path, rank):
    if rank == 1:
        real = builtins.open

        def denied(file, *args, **kwargs):
            if str(file) == path:
                raise PermissionError(13, "Permission denied", str(file))
            return real(file, *args, **kwargs)

        builtins.open = denied


@pytest.mark.xdist_group("stops")
def test_torchrun_rank_1_that_cannot_read_the_prompts_stops_both_ranks_in_one_line(tmp_path):
    """A real cause on one rank only (its node cannot read the prompts file: a shim denies rank 1
    the open): both ranks stop at once, rank 1 prints its error and rank 0 nothing more."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    p = torchrun_here("--tiny", f"--prompts={prompts}", f"--out_dir={tmp_path / 'o'}",
                      setup=functools.partial(_deny_open_on_rank_1, str(prompts)))
    # each rank leaves on its own (no launcher stops rank 0): it learnt of rank 1's error
    assert p.rank_codes == [1, 2], p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if "distar: error:" in line]
    assert p.returncode != 0 and errors == [
        f"distar: error: --prompts={prompts}: cannot read it: [Errno 13] Permission denied: "
        f"'{prompts}'"], p.stderr[-3000:]
    assert not (tmp_path / "o" / "tiny").exists()  # rank 0 stopped before it built anything


def test_torchrun_with_one_process_leaves_its_process_group(monkeypatch):
    calls = []  # NCCL warns at exit about a process group that was not destroyed
    monkeypatch.setattr(distar, "setup_distributed", lambda cuda: (0, 1, torch.device("cpu")))
    monkeypatch.setattr(distar, "run_toy", lambda cfg, dist_info: None)
    monkeypatch.setattr(distar.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distar.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distar.dist, "destroy_process_group", lambda: calls.append("destroy"))
    assert distar.main(["--toy"]) == 0 and calls == ["barrier", "destroy"]


def _toy_optimizers(cfg, world):
    return (distar.make_optimizer(cfg, world.generator.parameters(), cfg.lr_g),
            distar.make_optimizer(cfg, world.assistant.parameters(), cfg.lr_psi))


def _toy_checkpoint(out_dir, *args):
    """A toy checkpoint at step 1 with Adam states; returns its optimizers."""
    world = _toy([f"--out_dir={out_dir}", *args])
    opts = _toy_optimizers(world.cfg, world)
    for net, opt in zip((world.generator, world.assistant), opts):
        for p in net.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    distar.save_checkpoint(world.cfg, 1, world, *opts, (0, 1, torch.device("cpu")))
    return opts


def test_resume_reads_adam_states_on_the_cpu_and_hyperparameters_from_the_command_line(
        tmp_path, monkeypatch):
    """Every rank reads its state file onto the CPU (memory-mapped), and the optimizer copies what
    it keeps to its device; the saved Adam moments come back, the learning rates, betas and weight
    decay are the command line's."""
    saved_g, _ = _toy_checkpoint(tmp_path)
    loads, handed = [], []
    real_load, real_load_sd = torch.load, torch.optim.AdamW.load_state_dict

    def spy_load(*args, **kwargs):
        loads.append(kwargs)
        return real_load(*args, **kwargs)

    def spy_load_sd(opt, sd):
        handed.extend(v.device.type for st in sd["state"].values() for v in st.values())
        return real_load_sd(opt, sd)

    monkeypatch.setattr(torch, "load", spy_load)
    monkeypatch.setattr(torch.optim.AdamW, "load_state_dict", spy_load_sd)
    world = _toy([f"--out_dir={tmp_path}", "--resume", "--lr_g=2e-4", "--lr_psi=3e-4",
                  "--beta1=0.5", "--beta2=0.9", "--weight_decay=0.1"])
    opt_g, opt_psi = _toy_optimizers(world.cfg, world)
    cpu = (0, 1, torch.device("cpu"))
    assert distar.load_checkpoint(world.cfg, world, opt_g, opt_psi, cpu) == 1
    assert loads and all(k.get("map_location") == "cpu" and k.get("weights_only") is True
                         for k in loads)
    assert handed and set(handed) == {"cpu"}
    for opt, lr in ((opt_g, 2e-4), (opt_psi, 3e-4)):
        group = opt.param_groups[0]
        assert (group["lr"], group["betas"], group["weight_decay"]) == (lr, (0.5, 0.9), 0.1)
    for a, b in zip(saved_g.state.values(), opt_g.state.values()):  # the saved Adam moments
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq"))


def test_resume_of_a_checkpoint_without_state_pt_is_one_line_and_touches_nothing(tmp_path, capsys,
                                                                                   monkeypatch):
    ckpt = tmp_path / "checkpoint-000002"
    ckpt.mkdir()
    (ckpt / "state.json").write_text(json.dumps({"step": 2, "world_size": 1, "config": {"toy": True}}))
    monkeypatch.setattr(distar, "gradient_check", lambda: [])
    assert distar.main(["--toy", "--resume", "--max_steps=3", f"--out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no state.pt" in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoint-000002", "state.json"]


def test_resume_drops_the_metrics_logged_after_its_checkpoint(tmp_path):
    """Steps after the checkpoint run again, so their lines go: each step keeps one line. A line
    cut short by a kill goes too."""
    out = tmp_path / "o"
    _toy_checkpoint(out)  # step 1
    rows = [json.dumps(dict(step=s, loss_g=0.5)) + "\n" for s in (1, 2, 3)]
    (out / "metrics.jsonl").write_text("".join(rows) + '{"step": 4, "lo')
    world = _toy([f"--out_dir={out}", "--resume"])
    assert distar.load_checkpoint(world.cfg, world, *_toy_optimizers(world.cfg, world),
                                  (0, 1, torch.device("cpu"))) == 1
    assert (out / "metrics.jsonl").read_text() == rows[0]


def _toy_checkpoints(out_dir, steps, truncate=True):
    """Toy checkpoints at steps 1..steps (weights differing), with truncate the newest's generator
    weights cut in half as by a crash; returns the generator's weights at each step."""
    world = _toy([f"--out_dir={out_dir}"])
    opts, weights = _toy_optimizers(world.cfg, world), []
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in world.generator.parameters():
                p.add_(1.0)
        weights.append(_state(world.generator))
        distar.save_checkpoint(world.cfg, step, world, *opts, (0, 1, torch.device("cpu")))
    f = out_dir / f"checkpoint-{steps:06d}" / "generator" / "model.safetensors"
    if truncate:
        f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    return weights


def test_resume_skips_a_checkpoint_that_does_not_load_and_says_so(tmp_path, capsys):
    weights = _toy_checkpoints(tmp_path, 2)
    world = _toy([f"--out_dir={tmp_path}", "--resume"])
    assert distar.load_checkpoint(world.cfg, world, *_toy_optimizers(world.cfg, world),
                                  (0, 1, torch.device("cpu"))) == 1
    out = capsys.readouterr().out
    assert re.search(r"^resume: checkpoint-000002 does not load \(.+\); using checkpoint-000001\n"
                     r"resumed from .*checkpoint-000001 \(step 1\)\n$", out), out
    got = _state(world.generator)
    assert all(torch.equal(got[k], weights[0][k]) for k in got)  # all of step 1's, none of 2's


def test_resume_of_a_single_checkpoint_that_does_not_load_is_one_line_and_touches_nothing(
        tmp_path, capsys, monkeypatch):
    _toy_checkpoints(tmp_path, 1)
    before = _tree_digest(tmp_path)
    monkeypatch.setattr(distar, "gradient_check", lambda: [])
    assert distar.main(["--toy", "--resume", "--max_steps=3", f"--out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.match(
        r"distar: error: --resume: .*checkpoint-000001 does not load \(.+\)$", err), err
    assert _tree_digest(tmp_path) == before


def test_every_rank_goes_back_one_checkpoint_when_another_rank_cannot_load_it(tmp_path,
                                                                             monkeypatch, capsys):
    """Rank 0 of 2 loads checkpoint 2, rank 1 cannot (the all-reduce brings its failure): both
    continue checkpoint 1, read over what rank 0 had loaded. Rank 1, which knows why, says so."""
    weights = _toy_checkpoints(tmp_path, 2, truncate=False)
    # the lowest failing rank as the all-reduces bring it: checkpoint 2's reads (rank 1), then the
    # whole restore (rank 1); checkpoint 1's reads and restore: none (2)
    others = [1, 1, 2, 2]
    monkeypatch.setattr(distar.dist, "broadcast_object_list", lambda objects, src: None)
    monkeypatch.setattr(distar.dist, "all_reduce", lambda t, op, group: t.clamp_(max=others.pop(0)))
    world = _toy([f"--out_dir={tmp_path}", "--resume"])
    assert distar.load_checkpoint(world.cfg, world, *_toy_optimizers(world.cfg, world),
                                  (0, 2, torch.device("cpu"))) == 1
    got = _state(world.generator)
    assert all(torch.equal(got[k], weights[0][k]) for k in got) and others == []
    assert "does not load" not in capsys.readouterr().out


def test_a_checkpoint_is_on_disk_before_its_rename_and_the_rename_after(tmp_path, monkeypatch):
    """Atomic is not durable: after a power cut a renamed folder may hold truncated files, unless
    every file and folder was fsynced before the rename, and the out_dir after it."""
    events, fsync, rename = [], os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(
        ("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or fsync(fd))
    monkeypatch.setattr(os, "rename", lambda a, b: events.append(("rename", str(a), str(b)))
                        or rename(a, b))
    _toy_checkpoint(tmp_path)
    ckpt, tmp = tmp_path / "checkpoint-000001", str(tmp_path / ".tmp-checkpoint-000001")
    i = events.index(("rename", tmp, str(ckpt)))
    synced = {e[1] for e in events[:i] if e[0] == "fsync"}
    written = {str(p).replace(str(ckpt), tmp) for p in [ckpt, *ckpt.rglob("*")]}
    assert written <= synced and len(written) > 5, (written - synced)
    assert ("fsync", str(tmp_path)) in events[i + 1:]


def test_incomplete_checkpoints_are_ignored(tmp_path):
    for name in ("checkpoint-000002", "checkpoint-000004", ".tmp-checkpoint-000006", "checkpoint-000008"):
        (tmp_path / name).mkdir()
    for name in ("checkpoint-000002", "checkpoint-000004", ".tmp-checkpoint-000006"):
        (tmp_path / name / "state.json").write_text("{}")
    found = [os.path.basename(p) for p in distar.list_checkpoints(str(tmp_path))]
    assert found == ["checkpoint-000002", "checkpoint-000004"]


def test_only_the_newest_keep_checkpoints_checkpoints_stay(tmp_path):
    cfg = distar.parse_args(["--toy", f"--out_dir={tmp_path}", "--keep_checkpoints=2"])
    world = distar.make_toy_world()
    opts = [distar.make_optimizer(cfg, net.parameters(), 1e-3)
            for net in (world.generator, world.assistant)]
    for step in range(1, 5):
        distar.save_checkpoint(cfg, step, world, *opts, (0, 1, torch.device("cpu")))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-000003", "checkpoint-000004"]


def test_a_pruned_checkpoint_is_out_of_the_complete_ones_before_its_files_go(tmp_path, monkeypatch):
    """keep_checkpoints' delete, cut short (a kill), leaves no half checkpoint that looks complete;
    the next save clears what it left."""
    world = _toy([f"--out_dir={tmp_path}", "--keep_checkpoints=1"])
    opts = _toy_optimizers(world.cfg, world)
    save = lambda step: distar.save_checkpoint(world.cfg, step, world, *opts,
                                               (0, 1, torch.device("cpu")))
    save(1)
    rmtree = distar.shutil.rmtree

    def cut_short(path, *args, **kwargs):  # the pruned one: one file deleted, then the kill
        if path.endswith("checkpoint-000001"):
            os.remove(os.path.join(path, "state.pt"))
            raise KeyboardInterrupt
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(distar.shutil, "rmtree", cut_short)
    with pytest.raises(KeyboardInterrupt):
        save(2)
    assert distar.list_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-000002")]
    monkeypatch.setattr(distar.shutil, "rmtree", rmtree)
    save(3)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-000003"]


def test_resume_on_another_number_of_ranks_starts_new_random_streams(tmp_path, monkeypatch,
                                                                     capsys):
    """A checkpoint holds one RNG state per rank: on a different number of ranks no rank takes
    another's stream (nor fails for want of one); each keeps its own seed's."""
    cfg = distar.parse_args(["--toy", f"--out_dir={tmp_path}"])
    world = distar.make_toy_world()
    opts = [distar.make_optimizer(cfg, net.parameters(), 1e-3)
            for net in (world.generator, world.assistant)]
    distar.save_checkpoint(cfg, 1, world, *opts, (0, 1, torch.device("cpu")))
    monkeypatch.setattr(distar.dist, "broadcast_object_list", lambda objects, src: None)
    monkeypatch.setattr(distar.dist, "all_reduce", lambda t, op, group: None)  # every rank loaded
    for rank in (0, 1):
        torch.manual_seed(100 + rank)
        before = torch.get_rng_state()
        assert distar.load_checkpoint(cfg, world, *opts, (rank, 2, torch.device("cpu"))) == 1
        assert torch.equal(torch.get_rng_state(), before)
    assert "saved with 1 ranks, now 2: new RNG streams" in capsys.readouterr().out


def _generator_weights(ckpt, net="generator"):
    from safetensors.torch import load_file

    folder = ckpt / net
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _stop_and_resume(cmd, args, out, sig):
    """Run cmd until its first checkpoint (step --ckpt_interval) is complete, stop it with sig, then
    resume it to the end (--resume, as distar.main here or as torchrun_here's ranks). SIGKILL: the
    launcher and every rank (torchrun starts each in a session of its own); SIGINT (Ctrl-C): one
    line for the run, not a traceback per rank: the step reached, the newest complete checkpoint
    and --resume. Returns the first checkpoint's files."""
    import signal
    import time

    flag = lambda name: int(next(a for a in args if a.startswith(f"--{name}=")).split("=")[1])
    steps, first = flag("max_steps"), flag("ckpt_interval")
    ckpt = out / f"checkpoint-{first:06d}"
    # a child inherits an ignored SIGINT (pytest started by a shell's `&` or nohup has one): give it
    # the terminal's default, as a user's Ctrl-C finds it
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([*cmd, *args, f"--out_dir={out}"], cwd=HERE, env=ENV,
                                start_new_session=True,  # a Ctrl-C at the terminal stays with pytest
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, handler)
    while not (ckpt / "state.json").exists() and proc.poll() is None:
        time.sleep(0.02)
    if sig == "SIGKILL":
        ranks = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
        for pid in [proc.pid, *map(int, ranks)]:
            os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=600)  # the pipes close when the ranks have gone too
        assert proc.returncode == -9, "the run finished before it could be killed"
    else:  # to python, or to torchrun's launcher, which forwards it to the ranks
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=600)  # a hang guard, as torchrun_here's
        assert proc.returncode == (130 if cmd[1] != "-m" else 1), err  # torchrun: 1, its own
        lines = [line for line in err.splitlines() if line.startswith("distar")]
        newest = distar.list_checkpoints(str(out))[-1]
        said = len(lines) == 1 and re.fullmatch(
            rf"distar: stopped after step (\d+) of {steps} \(Ctrl-C\); newest complete checkpoint "
            rf"{re.escape(newest)}: the same command with --resume continues from it", lines[0])
        assert said and first <= int(said.group(1)) < steps, err
        assert "KeyboardInterrupt" not in err and 'distar.py", line' not in err, err  # no rank's trace
    assert not (out / f"checkpoint-{steps:06d}").exists()
    stopped = sorted(p.name for p in ckpt.rglob("*"))
    # the resumed run reads what the stopped one left: the same main, started without the imports
    p = (torchrun_here if cmd == TORCHRUN else run_here)(*args, f"--out_dir={out}", "--resume")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resumed from" in p.stdout
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))  # the lines logged after the checkpoint not kept twice
    return stopped


SIGKILL_ARGS = ["--tiny", "--max_steps=6", "--ckpt_interval=2", "--sample_interval=100",
                "--keep_checkpoints=5"]


@pytest.mark.xdist_group("stops")
def test_ctrl_c_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    """One process: Ctrl-C is one line, exit 130; optimizer and RNG states in state.pt come back
    (the 2-rank --fsdp case, SIGKILLed: fsdp_lora_runs). The uninterrupted run in this process:
    the same command, the same weights, one process start fewer."""
    cmd = [sys.executable, os.path.join(HERE, "distar.py")]
    a, b = tmp_path / "a", tmp_path / "b"
    p = run_here(*SIGKILL_ARGS, f"--out_dir={a}")
    assert p.returncode == 0, p.stderr[-2000:]
    _stop_and_resume(cmd, SIGKILL_ARGS, b, "SIGINT")
    wa, wb = _generator_weights(a / "checkpoint-000006"), _generator_weights(b / "checkpoint-000006")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    w2 = _generator_weights(a / "checkpoint-000002")
    assert any(not torch.equal(wa[k], w2[k]) for k in wa)  # training moved the weights


def _tree_digest(folder):
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """One tiny SDXL run of 2 steps, samples at each, read only: an out_dir holding another run's
    checkpoints here, and the outputs of the tiny command line in main's section."""
    d = tmp_path_factory.mktemp("trained")
    p = run_here("--tiny", "--max_steps=2", "--sample_interval=1", f"--out_dir={d}")
    assert p.returncode == 0, p.stderr[-2000:]
    return d


@pytest.mark.xdist_group("tiny_runs")
@pytest.mark.parametrize("args, words", [  # --overwrite: the folder is cleared only once all has loaded
    (["--allow_cpu", "--pretrained=/nonexistent/sdxl", "--overwrite"],
     "cannot load --pretrained=/nonexistent/sdxl"),
    (["--tiny", "--prompts=/nonexistent/prompts.txt", "--resume"],
     "--prompts=/nonexistent/prompts.txt: no such file"),
    (["--tiny", "--prompts={empty}", "--resume"], "has no prompts"),
    (["--tiny", "--resolution=30", "--resume"], "--resolution must be a multiple of 8"),
    (["--tiny", "--precision=fp8", "--resume"], "--precision: invalid choice: 'fp8'"),
])
def test_bad_sdxl_input_is_one_line_and_leaves_checkpoints_intact(trained_dir, tmp_path, args, words,
                                                                  capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    before = _tree_digest(trained_dir)
    argv = [a.replace("{empty}", str(empty)) for a in args]
    assert distar.main([*argv, f"--out_dir={trained_dir}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], err
    assert _tree_digest(trained_dir) == before


@pytest.mark.xdist_group("tiny_runs")
def test_resume_past_max_steps_trains_nothing_and_says_so(trained_dir, capsys):
    before = _tree_digest(trained_dir)
    assert distar.main(["--tiny", f"--out_dir={trained_dir}", "--resume", "--max_steps=1"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("resume: the checkpoint is at step 2, --max_steps=1: nothing to train (a "
                        "larger --max_steps continues the run)\n"), out
    assert "trained to step" not in out
    assert _tree_digest(trained_dir) == before


# -----------------------------------------------------------------------------
# --fsdp on 2 CPU ranks (gloo): DDP's result, checkpoints that diffusers reads, a SIGKILL/resume
# that is bit-identical, LoRA adapters sharded with their bases

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            os.path.join(HERE, "distar.py")]


def _unet_weights(folder):
    from diffusers import UNet2DConditionModel

    return {k: v.detach() for k, v in UNet2DConditionModel.from_pretrained(folder).state_dict().items()}


@pytest.fixture(scope="module")
def ddp_and_fsdp(tmp_path_factory):
    """The same 2-rank tiny run (2 steps of one assistant update and one generator update, a sample
    grid and a checkpoint at step 2), under DDP and under --fsdp."""
    d = tmp_path_factory.mktemp("ddp_fsdp")
    args = ["--tiny", "--max_steps=2", "--assistant_steps=1", "--ckpt_interval=2", "--sample_interval=2"]
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        p = torchrun_here(*args, *extra, f"--out_dir={d / name}")
        assert p.returncode == 0, p.stderr[-2000:]
        assert ("weights sharded over the ranks" in p.stdout) == bool(extra), p.stdout
    return d


@pytest.mark.xdist_group("ddp_fsdp")
def test_fsdp_trains_the_nets_ddp_trains(ddp_and_fsdp):
    """--fsdp changes where the weights live, not what is computed: after 2 steps (clipping active,
    grad norms ~50 > 10) each net's update equals DDP's to 1e-3 of its size. Not bit for bit:
    DDP all-reduces whole buckets, FSDP reduce-scatters per unit, so float32 sums round otherwise,
    and AdamW's first steps (~lr sign(g)) turn rounding on near-zero gradients into lr-sized
    differences (measured: 9e-5 of a tensor's update at most). A rank's shard lost on save, or a
    norm clipped on one shard, differs by O(1)."""
    d = ddp_and_fsdp
    init = _unet_weights(str(d / "ddp" / "tiny" / "sdxl" / "unet"))
    for net in ("generator", "assistant"):
        ddp, fsdp = (_unet_weights(str(d / run / "checkpoint-000002" / net)) for run in ("ddp", "fsdp"))
        assert ddp.keys() == fsdp.keys() == init.keys()
        update = torch.cat([(ddp[k] - init[k]).flatten() for k in ddp])
        diff = torch.cat([(fsdp[k] - ddp[k]).flatten() for k in ddp])
        assert update.norm() > 0 and diff.norm() <= 1e-3 * update.norm(), (net, diff.norm() / update.norm())
    logs = {run: [json.loads(line) for line in (d / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("ddp", "fsdp")}
    for a, b in zip(logs["ddp"], logs["fsdp"]):  # the whole net's grad norm, not one shard's
        for k in ("grad_norm", "loss_g", "loss_psi", "loss_div", "x0grad_div"):
            assert math.isclose(a[k], b[k], rel_tol=1e-4), (k, a[k], b[k])
    assert min(m["grad_norm"] for m in logs["ddp"]) > 10  # so --grad_clip=10 clipped every update
    ddp, fsdp = (np.asarray(Image.open(d / run / "samples-000002.png"), dtype=int) for run in ("ddp", "fsdp"))
    assert np.abs(ddp - fsdp).max() <= 1 and ddp.std() > 10  # rank 0's grid from the sharded generator


@pytest.mark.xdist_group("ddp_fsdp")
def test_an_fsdp_checkpoint_is_what_diffusers_and_sample_py_read(ddp_and_fsdp, tmp_path):
    """generator/ and assistant/ are UNet folders (gathered on rank 0, saved by save_pretrained);
    the AdamW states are each rank's DCP shards in optimizer/, state.pt holds only the RNG states;
    sample.py on generator/ gives diffusers' LCM one-step image."""
    ckpt = ddp_and_fsdp / "fsdp" / "checkpoint-000002"
    assert sorted(os.listdir(ckpt)) == ["assistant", "generator", "optimizer", "state.json", "state.pt"]
    assert sorted(os.listdir(ckpt / "optimizer")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert list(state) == ["rng"] and len(state["rng"]) == 2
    assert json.loads((ckpt / "state.json").read_text())["fsdp"] is True
    sdxl = str(ddp_and_fsdp / "fsdp" / "tiny" / "sdxl")
    assert sample.main([f"--pretrained={sdxl}", f"--generator={ckpt / 'generator'}", "--prompt=a cat",
                        "--seed=2", "--resolution=64", f"--out_dir={tmp_path}"]) == 0
    from diffusers import UNet2DConditionModel
    expect = lcm_one_step(sdxl, [["a cat"]], 2, unet=UNet2DConditionModel.from_pretrained(ckpt / "generator"))
    got = pngs(tmp_path, 1) / 255
    assert np.abs(got - expect).max() <= 1 / 255 + 1e-6
    plain = lcm_one_step(sdxl, [["a cat"]], 2)  # the base: training moved the generator
    assert np.abs(got - plain).mean() > 1e-3


@pytest.mark.xdist_group("ddp_fsdp")
def test_an_fsdp_checkpoint_of_2_ranks_resumes_on_1_with_the_adam_states_resharded(ddp_and_fsdp,
                                                                                  tmp_path, monkeypatch):
    """DCP reshards: one rank (in-process, gloo) resumes the 2-rank checkpoint with every AdamW
    moment whole, each equal to the two saved shards joined (read back by DCP's own converter),
    and the generator's weights those saved."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    run = ddp_and_fsdp / "fsdp"
    dcp_to_torch_save(run / "checkpoint-000002" / "optimizer", tmp_path / "whole.pt")
    saved = torch.load(tmp_path / "whole.pt", weights_only=True)
    monkeypatch.setenv("RANK", "0")  # --fsdp wants torchrun's ranks
    cfg = distar.parse_args(["--tiny", "--fsdp", "--resume", f"--out_dir={run}",
                             f"--pretrained={run / 'tiny' / 'sdxl'}", "--generator_init=",
                             f"--reward_model={run / 'tiny' / 'reward'}",
                             f"--reward_processor={run / 'tiny' / 'reward'}"])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        world = distar.shard_nets(distar.SDXLWorld(cfg, torch.device("cpu")), (0, 1, torch.device("cpu")))
        opts = [distar.make_optimizer(cfg, distar.trained(n), 1e-4) for n in (world.generator, world.assistant)]
        assert distar.load_checkpoint(cfg, world, *opts, (0, 1, torch.device("cpu"))) == 2
        weights = distar.gather_state_dict(world.generator)  # rank 0's read, broadcast into the shards
        saved_weights = _unet_weights(str(run / "checkpoint-000002" / "generator"))
        assert weights.keys() == saved_weights.keys()
        assert all(torch.equal(weights[k], saved_weights[k]) for k in weights)
        for name, net, opt in (("opt_g", world.generator, opts[0]), ("opt_psi", world.assistant, opts[1])):
            got = get_optimizer_state_dict(net, opt)["state"]
            assert got.keys() == saved[name]["state"].keys() and len(got) > 100
            for fqn, st in got.items():
                for k in ("exp_avg", "exp_avg_sq"):
                    whole = st[k].full_tensor()
                    assert torch.equal(whole, saved[name]["state"][fqn][k]) and whole.abs().sum() > 0
    finally:
        dist.destroy_process_group()


def _deny_checkpoint_weights_on_rank_1(rank):  # torchrun_here's setup
    import safetensors.torch

    real = safetensors.torch.load_file

    def load_file(path, *args, **kwargs):
        if rank == 1 and "checkpoint-" in str(path):
            raise PermissionError(f"rank 1 read {path}")
        return real(path, *args, **kwargs)
    safetensors.torch.load_file = load_file


@pytest.mark.xdist_group("ddp_fsdp")
def test_fsdp_resume_reads_the_weights_on_rank_0_alone_and_a_bad_read_falls_back_on_every_rank(
        ddp_and_fsdp, tmp_path):
    """--fsdp --resume on 2 ranks: rank 0 alone reads the nets' weights (rank 1 may not: a shim
    denies it) and broadcasts them; the newest checkpoint's generator is truncated, which rank 0's
    read finds before any collective: both ranks go back to the one before, said once, and resume
    it. Its AdamW shards load too (DCP), and the run has nothing left to train."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ddp_and_fsdp / "fsdp", run)  # its checkpoint-000002 and tiny models
    shutil.copytree(run / "checkpoint-000002", run / "checkpoint-000003")
    state = json.loads((run / "checkpoint-000003" / "state.json").read_text())
    (run / "checkpoint-000003" / "state.json").write_text(json.dumps(dict(state, step=3)))
    weights = run / "checkpoint-000003" / "generator" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    p = torchrun_here("--tiny", "--fsdp", "--max_steps=2", "--assistant_steps=1", "--resume",
                      f"--out_dir={run}", setup=_deny_checkpoint_weights_on_rank_1)
    assert p.returncode == 0, p.stderr[-3000:]
    fell_back = [line for line in p.stdout.splitlines() if "does not load" in line]
    assert len(fell_back) == 1 and fell_back[0].startswith("resume: checkpoint-000003 does not load (")
    assert fell_back[0].endswith("; using checkpoint-000002"), fell_back
    assert f"resumed from {run / 'checkpoint-000002'} (step 2)" in p.stdout
    assert "nothing to train" in p.stdout


def _fsdp_start_up(path, truncated, rank):  # torchrun_here's setup: run_sdxl's start-up, watched
    """run_sdxl on each rank without its checks and fit, three times: whole UNets, LoRA (bf16: the
    frozen dtype), and a --generator_init whose weights file is truncated. Shims record whether each
    UNet is built on meta, deny rank 1 every UNet read, count rank 0's earlier reads still alive at
    each read, and keep the adapters add_lora gave rank 0's reads; fit's stand-in keeps this rank's
    shards of every net (dim 0: rank 0's then rank 1's rows); each error is kept. All to path.{rank}."""
    import weakref
    from diffusers import UNet2DConditionModel

    got, reads = dict(built=[], alive=[], adapters=[], worlds=[], errors=[]), []
    init, from_pretrained, add_lora = (UNet2DConditionModel.__init__, UNet2DConditionModel.from_pretrained,
                                       distar.add_lora)

    @functools.wraps(init)
    def built(self, *args, **kwargs):
        init(self, *args, **kwargs)
        got["built"].append(all(p.is_meta for p in self.parameters()))

    def read(*args, **kwargs):
        if rank:
            raise PermissionError("rank 1 read a UNet")
        got["alive"].append(sum(r() is not None for r in reads))
        reads.append(weakref.ref(net := from_pretrained(*args, **kwargs)))
        return net

    def adapter(unet, cfg, role):
        out = add_lora(unet, cfg, role)
        if not next(unet.parameters()).is_meta:  # rank 0's read, not the world's net on meta
            got["adapters"].append({k: v.clone() for k, v in unet.state_dict().items() if ".lora_" in k})
        return out

    def fit(cfg, world, dist_info, save_samples):
        got["worlds"].append({role: {k: v.to_local() for k, v in getattr(world, role).state_dict().items()}
                              for role in ("generator", "assistant", "s_ref")})

    def start_ups(cfg, dist_info):
        for c in (cfg, replace(cfg, lora_rank=4, precision="bf16"), replace(cfg, generator_init=truncated)):
            try:
                run_sdxl(c, dist_info)
            except Exception as e:
                got["errors"].append((type(e).__name__, str(e), getattr(e, "first_to_fail", None)))
        torch.save(got, f"{path}.{rank}")
    UNet2DConditionModel.__init__, UNet2DConditionModel.from_pretrained = built, read
    run_sdxl, distar.run_sdxl, distar.prepare_sdxl_run = distar.run_sdxl, start_ups, lambda cfg, d: cfg
    distar.add_lora, distar.fit = adapter, fit


@pytest.mark.xdist_group("fsdp_lora")
def test_fsdp_start_up_builds_the_nets_on_meta_and_loads_rank_0s_read_into_the_shards(tiny, tmp_path):
    """--fsdp's start-up on 2 ranks: rank 1 builds every UNet on meta and reads none (its reads
    raise); rank 0 reads each net whole on the CPU only after its last read is freed; the sharded
    weights are the files' bit for bit (bf16 with --precision=bf16 where frozen), with --lora_rank
    the adapters rank 0's init (fp32, lora_B zero). A truncated weights file, which rank 0 alone
    reads, is one error on rank 0 and RankFailed on rank 1, not a hang in the broadcast."""
    import shutil

    sdxl, reward = tiny
    truncated = tmp_path / "unet"
    shutil.copytree(os.path.join(sdxl, "unet"), truncated)
    weights = truncated / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    out = tmp_path / "start_up"
    p = torchrun_here("--tiny", "--fsdp", f"--pretrained={sdxl}", "--generator_init=", f"--reward_model={reward}",
                      f"--reward_processor={reward}", "--lora_alpha=2", f"--out_dir={tmp_path}", timeout=120,
                      setup=functools.partial(_fsdp_start_up, str(out), str(truncated)))
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (torch.load(f"{out}.{r}", weights_only=False) for r in (0, 1))
    assert len(r1["built"]) >= 3 * 3 and all(r1["built"]) and not r1["alive"]  # 3 nets a world, all on meta
    assert r0["alive"] == [0] * 7  # 3 reads a world, the third world's first fails
    files = _unet_weights(os.path.join(sdxl, "unet"))  # the reference's, assistant's, generator's init
    whole, lora = ({role: {k: torch.cat([v, r1["worlds"][i][role][k]]) for k, v in sd.items()}
                    for role, sd in r0["worlds"][i].items()} for i in range(2))  # both ranks' shards
    for role, sd in whole.items():
        assert sd.keys() == files.keys() and all(torch.equal(sd[k], files[k]) for k in sd), role
    for role, sd in lora.items():
        base = {k.replace(".base_layer", ""): v for k, v in sd.items() if ".lora_" not in k}
        assert base.keys() == files.keys(), role
        assert all(v.dtype == torch.bfloat16 and torch.equal(v, files[k].bfloat16()) for k, v in base.items())
        adapter = {k: v for k, v in sd.items() if ".lora_" in k}
        assert bool(adapter) == (role != "s_ref")
        if adapter:
            init = r0["adapters"][role == "assistant"]
            assert adapter.keys() == init.keys() and all(torch.equal(v, init[k]) for k, v in adapter.items())
            assert all(v.dtype == torch.float32 for v in adapter.values())
            assert all((v.abs().sum() > 0) == (".lora_A." in k) for k, v in adapter.items())
    assert [e[0] for e in r0["errors"]] == ["LoadError"] and r0["errors"][0][2] is True
    assert r0["errors"][0][1].startswith(f"cannot load --generator_init={truncated}: ")
    assert r1["errors"] == [("RankFailed", "rank 0 failed: its error is in its node's log", None)]


def test_fsdp_start_up_keeps_the_buffers_the_state_dict_leaves_out(tmp_path, monkeypatch):
    """An SD3 transformer without pos_embed_max_size computes pos_embed as a non-persistent buffer:
    not in the state dict rank 0 broadcasts, so to_empty would leave it uninitialised. One gloo
    rank, in-process: the three nets built on meta, sharded and loaded keep the constructor's."""
    import torch.distributed as dist
    from types import SimpleNamespace
    from diffusers import SD3Transformer2DModel

    whole = SD3Transformer2DModel(**dict(distar.TINY_SD3["transformer"], pos_embed_max_size=None))
    assert "pos_embed.pos_embed" not in whole.state_dict() and whole.pos_embed.pos_embed.abs().sum() > 0
    whole.save_pretrained(tmp_path / "transformer")
    monkeypatch.setenv("RANK", "0")  # --fsdp wants torchrun's ranks
    cfg = distar.parse_args(["--tiny", "--fsdp", "--model=sd3", f"--pretrained={tmp_path}", "--generator_init="])
    nets = {role: distar.load_unet(cfg, role, torch.float32, "meta") for role in ("generator", "assistant", "s_ref")}
    assert all(p.is_meta for n in nets.values() for p in n.parameters())
    cpu = torch.device("cpu")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        distar.shard_nets(SimpleNamespace(cfg=cfg, device=cpu, **nets), (0, 1, cpu))
        for net in nets.values():
            assert torch.equal(net.pos_embed.pos_embed, whole.pos_embed.pos_embed)
            assert all(torch.equal(v.full_tensor(), whole.state_dict()[k]) for k, v in net.state_dict().items())
    finally:
        dist.destroy_process_group()


# FSDP on gloo costs ~1 s a step and ~2 s a checkpoint: 2 steps (one assistant update each), a
# checkpoint after each: the SIGKILL comes after the first, the resumed run does the second
FSDP_LORA_ARGS = ["--tiny", "--max_steps=2", "--ckpt_interval=1", "--sample_interval=100",
                  "--assistant_steps=1", "--fsdp", "--grad_checkpointing", *LORA_ARGS]


@pytest.fixture(scope="module")
def fsdp_lora_runs(tmp_path_factory):
    """torchrun --fsdp --grad_checkpointing --lora_rank=4 on 2 ranks, 2 steps with a checkpoint
    after each: once uninterrupted (a), once SIGKILLed after checkpoint 1 and resumed (b)."""
    d = tmp_path_factory.mktemp("fsdp_lora")
    args = FSDP_LORA_ARGS
    p = torchrun_here(*args, f"--out_dir={d / 'a'}")  # the real torchrun: b
    assert p.returncode == 0, p.stderr[-2000:]
    killed = _stop_and_resume(TORCHRUN, args, d / "b", "SIGKILL")
    return d / "a", d / "b", killed


@pytest.mark.xdist_group("fsdp_lora")
def test_fsdp_sigkill_then_resume_reproduces_the_uninterrupted_run(fsdp_lora_runs):
    """Each rank writes and reads its own AdamW shards (DCP), nothing gathered through rank 0; the
    adapters are gathered for generator/: the resumed run ends bit-identical, so no shard of either
    was lost (a lost shard resumes other weights or moments, and the runs part)."""
    a, b, killed = fsdp_lora_runs
    assert [n for n in killed if n.endswith((".distcp", ".pt"))] == [
        "__0_0.distcp", "__1_0.distcp", "state.pt"]  # one file per rank, none gathered
    for net in ("generator", "assistant"):
        wa, wb = (_generator_weights(run / "checkpoint-000002", net) for run in (a, b))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), net
        w1 = _generator_weights(a / "checkpoint-000001", net)
        assert any(not torch.equal(wa[k], w1[k]) for k in wa)  # step 2, the resumed one, trained


@pytest.mark.xdist_group("fsdp_lora")
def test_fsdp_lora_trains_only_the_adapters_and_diffusers_loads_the_generator(fsdp_lora_runs, tmp_path):
    """--fsdp --lora_rank: the bases are sharded and frozen, the adapters trained. generator/ holds
    the adapter alone, which on the recorded base gives rank 0's last sample grid, drawn by the
    sharded generator itself (so no base weight moved); diffusers' load_lora_weights gives the
    same generator."""
    from diffusers import StableDiffusionXLPipeline

    a = fsdp_lora_runs[0]
    folder = a / "checkpoint-000002" / "generator"
    weights = _generator_weights(a / "checkpoint-000002")
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    sdxl, reward = a / "tiny" / "sdxl", a / "tiny" / "reward"
    assert (folder / json.loads((folder / "lora_base.json").read_text())["pretrained"]).resolve() == sdxl
    cfg = distar.parse_args(["--tiny", f"--pretrained={sdxl}", "--generator_init=", f"--reward_model={reward}",
                             f"--reward_processor={reward}", *LORA_ARGS])
    world = distar.SDXLWorld(cfg, torch.device("cpu"))
    assert len(distar.trained(world.generator)) == len(weights)  # every adapted layer's A and B
    distar.load_net(world.generator, str(folder))
    world.save_samples(tmp_path / "grid.png")
    ours, theirs = (np.asarray(Image.open(f), dtype=int) for f in (tmp_path / "grid.png", a / "samples-000002.png"))
    assert np.abs(ours - theirs).max() <= 1
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    pipe.load_lora_weights(folder)
    x, t, cond = torch.randn(2, *world.latent_shape), torch.tensor([399, 399]), world.sample_cond(2)
    with torch.no_grad():
        ours, theirs = world.unet(world.generator, x, t, cond), world.unet(pipe.unet, x, t, cond)
        plain = world.unet(world.s_ref, x, t, cond)
    assert (ours - plain).abs().max() > 1e-4  # the adapter moved
    assert (theirs - ours).abs().max() < 1e-5



def _grad_coverage(path, cfg, dist_info):
    """run_sdxl's stand-in on each rank (test_fsdp_every_update_has_a_gradient_...): one process
    group, two sharded tiny worlds (whole UNets, LoRA) trained a step per divergence and CFG choice
    in turn, so that each step's generator phase comes before another's assistant update (a second
    step closes). Every update's count of trained tensors and of those with a gradient, and whether
    each net is back in its shards after the sample grid, go to path (rank 0). The updates
    themselves are skipped: DTensor's AdamW and norm on gloo cost seconds, and no gradient here
    depends on the weights' values."""
    from torch.distributed.tensor import DTensor

    rank, world_size, device = dist_info
    seen, case = [], {}

    def clip_and_step(opt, net, loss, *args):  # which trained tensors have a .grad, then none
        ps = distar.trained(net)
        seen.append(dict(case, net="psi" if net is world.assistant else "g", n=len(ps),
                         with_grad=sum(p.grad is not None for p in ps)))
        opt.zero_grad(set_to_none=True)
        return torch.zeros(()), False
    distar.clip_and_step = clip_and_step
    cases = [(d, c) for d in ("pseudo_huber", "l2", "kl") for c in ("in", "out")]
    parts, resharded = distar.load_parts(cfg, device, torch.float32), {}
    for lora in (0, 4):
        world = distar.shard_nets(distar.SDXLWorld(replace(cfg, lora_rank=lora), device, rank,
                                                   world_size, copy.deepcopy(parts)), dist_info)
        opts = [distar.make_optimizer(cfg, distar.trained(n), 1e-4)
                for n in (world.generator, world.assistant)]
        for i, (divergence, choice) in enumerate(cases):
            case.update(lora=lora, divergence=divergence, cfg=choice)
            world.cfg = replace(world.cfg, divergence=divergence, cfg=choice)
            distar.train(world, *opts, dist_info, range(1 + (i == len(cases) - 1)))
        world.save_samples(None)  # a forward under no_grad: no backward reshards it
        resharded[lora] = [all(isinstance(p, DTensor) for p in n.parameters())
                           for n in (world.generator, world.assistant, world.s_ref)]
    if rank == 0:
        with open(path, "w") as f:
            json.dump(dict(seen=seen, resharded=resharded), f)


def _run_grad_coverage(path, rank):  # torchrun_here's setup: main's run_sdxl is _grad_coverage
    distar.run_sdxl = functools.partial(_grad_coverage, path)


@pytest.mark.xdist_group("fsdp_lora")
def test_fsdp_every_update_has_a_gradient_for_every_trained_tensor(tiny, tmp_path):
    """FSDP2 leaves a root's weights gathered after a forward that no backward follows, with the
    requires_grad they had then: the assistant frozen for the generator phase and run under no_grad
    (--divergence=kl) would then train without its root (conv_in/out, embeddings, proj_in/out) at
    the next update (170 of its 212 tensors). Under --fsdp on 2 ranks, for each divergence and CFG
    choice, whole UNets and LoRA: every update of either net has a gradient for every trained
    tensor, and after the sample grid (no_grad) every net is back in its shards."""
    sdxl, reward = tiny
    out = tmp_path / "coverage.json"
    p = torchrun_here("--tiny", "--fsdp", "--assistant_steps=1", "--resolution=32",
                      f"--pretrained={sdxl}", "--generator_init=", f"--reward_model={reward}",
                      f"--reward_processor={reward}", "--lora_alpha=2", f"--out_dir={tmp_path}",
                      setup=functools.partial(_run_grad_coverage, str(out)))
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(out.read_text())
    assert len(got["seen"]) == 2 * (3 * 2 + 1) * 2  # (lora, divergence, cfg, the last's 2nd step), nets
    missing = [u for u in got["seen"] if u["with_grad"] != u["n"]]
    assert not missing, missing
    assert {u["n"] for u in got["seen"] if u["net"] == "psi"} == {212, 158}  # whole UNet, LoRA
    assert got["resharded"] == {"0": [True] * 3, "4": [True] * 3}



@pytest.mark.parametrize("lora", [0, 4])
def test_fsdp_bf16_gathers_bf16_weights_and_gives_autocasts_gradients_to_bf16_rounding(tiny, tmp_path,
                                                                                        monkeypatch, lora):
    """--fsdp --precision=bf16 (one gloo rank, in-process): the forward runs on bf16 copies of the
    fp32 masters (FSDP's MixedPrecisionPolicy, not autocast's cast), the gradients land in fp32 on
    the masters, and an assistant and a generator update's gradients equal the unsharded run's
    (autocast over fp32 weights) to bf16 rounding. Whole UNets, and LoRA (bf16 bases, fp32
    adapters)."""
    import torch.distributed as dist

    sdxl, reward = tiny
    monkeypatch.setenv("RANK", "0")  # --fsdp wants torchrun's ranks
    cfg = distar.parse_args(["--tiny", "--fsdp", "--precision=bf16", "--resolution=32", f"--pretrained={sdxl}",
                             "--generator_init=", f"--reward_model={reward}", f"--reward_processor={reward}",
                             *(LORA_ARGS if lora else [])])
    cpu = torch.device("cpu")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        parts = distar.load_parts(replace(cfg, fsdp=False), cpu, torch.bfloat16)  # whole, for both
        grads, seen = {}, {}
        for name in ("autocast", "fsdp"):
            torch.manual_seed(1)  # the same LoRA init in both worlds, whatever ran before
            world = distar.SDXLWorld(replace(cfg, fsdp=name == "fsdp"), cpu, parts=copy.deepcopy(parts))
            world = distar.shard_nets(world, (0, 1, cpu))
            first = next(k for k, p in world.generator.named_parameters() if p.requires_grad)
            layer, leaf = first.rsplit(".", 1)  # the first trained weight, as its forward sees it
            world.generator.get_submodule(layer).register_forward_pre_hook(
                lambda m, a: seen.__setitem__(name, getattr(m, leaf).dtype))
            torch.manual_seed(0)
            distar.assistant_loss(world, world.assistant, world.sample_cond(2)).backward()
            distar.generator_backward(world, world.generator, world.sample_cond(2))
            grads[name] = {f"{r}.{k}": p.grad for r, net in (("g", world.generator), ("psi", world.assistant))
                           for k, p in net.named_parameters() if p.requires_grad}
            assert all(p.dtype == torch.float32 for p in distar.trained(world.generator))  # masters
    finally:
        dist.destroy_process_group()
    assert seen == dict(autocast=torch.float32, fsdp=torch.bfloat16)
    a, f = grads["autocast"], grads["fsdp"]
    assert a.keys() == f.keys() and len(a) == (2 * 212 if not lora else 2 * 158)
    f = {k: g.full_tensor() for k, g in f.items()}
    assert all(g.dtype == torch.float32 for g in f.values())
    for role in ("g", "psi"):
        ga, gf = (torch.cat([g[k].flatten() for k in g if k.startswith(role + ".")]) for g in (a, f))
        rel = ((gf - ga).norm() / ga.norm()).item()  # measured: g 0.009, psi 0.008 (LoRA 0.003)
        assert ga.norm() > 0 and rel < 0.02, (role, rel)  # bf16 autocast vs fp32: 0.05 and 0.02



def _hsdp_step(path, cfg, dist_info):
    """run_sdxl's stand-in on each rank (test_fsdp_on_2_nodes_...): shard_nets on three small MLPs,
    one step of the first on this rank's slice of a batch; the mesh, the groups and the gradient,
    gathered whole, to path.{rank}."""
    import torch.distributed as dist
    from types import SimpleNamespace

    rank = dist_info[0]
    torch.manual_seed(0)  # the same nets and batch on every rank
    nets = [torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)) for _ in range(3)]
    whole, x = copy.deepcopy(nets[0]), torch.randn(4, 3, 4)  # rank r trains on x[r]
    world = distar.shard_nets(SimpleNamespace(cfg=cfg, generator=nets[0], assistant=nets[1], s_ref=nets[2]),
                              dist_info)
    world.generator(x[rank]).square().sum().backward()
    torch.stack([whole(x[r]).square().sum() for r in range(4)]).mean().backward()  # the ranks' mean
    p = world.generator[0].weight
    mesh = p.device_mesh
    with open(f"{path}.{rank}", "w") as f:
        json.dump(dict(shape=list(mesh.shape), names=list(mesh.mesh_dim_names), placements=[repr(q) for q in p.placements],
                       groups={k: dist.get_process_group_ranks(mesh.get_group(k)) for k in mesh.mesh_dim_names},
                       local=list(p.to_local().shape),
                       grad_diff=max((q.grad.full_tensor() - w.grad).abs().max().item()
                                     for q, w in zip(world.generator.parameters(), whole.parameters()))), f)


def _run_as_2_nodes(path, rank):  # torchrun_here's setup: nodes of 2 ranks, run_sdxl is _hsdp_step
    os.environ.update(LOCAL_WORLD_SIZE="2", LOCAL_RANK=str(rank % 2))
    distar.run_sdxl = functools.partial(_hsdp_step, path)


@pytest.mark.xdist_group("stops")
def test_fsdp_on_2_nodes_of_2_gpus_shards_within_a_node_and_replicates_across(tmp_path):
    """4 gloo ranks as torchrun numbers 2 nodes of 2 (LOCAL_WORLD_SIZE=2): a (2, 2) mesh,
    (replicate, shard); rank r's weights are sharded with its node's other rank (r // 2's pair)
    and replicated on the other node's rank of its column, each holding half a tensor; the
    gradient is the mean of the 4 ranks' as one process computes it."""
    p = torchrun_here("--tiny", "--fsdp", f"--out_dir={tmp_path}", nproc=4,
                      setup=functools.partial(_run_as_2_nodes, str(tmp_path / "mesh")))
    assert p.returncode == 0, p.stderr[-3000:]
    for r in range(4):
        got = json.loads((tmp_path / f"mesh.{r}").read_text())
        node = r // 2
        assert got["shape"] == [2, 2] and got["names"] == ["replicate", "shard"]
        assert got["placements"] == ["Replicate()", "Shard(dim=0)"] and got["local"] == [4, 4]  # of (8, 4)
        assert got["groups"] == dict(shard=[2 * node, 2 * node + 1], replicate=[r % 2, r % 2 + 2])
        assert got["grad_diff"] < 1e-6


# -----------------------------------------------------------------------------
# main: the real command lines end to end (the toy converges, tiny SDXL in fp32 and bf16, torchrun)


def _class_energy_ratios(path):
    from safetensors.torch import load_file

    samples = load_file(path)
    gen, ref = samples["generator"], samples["reference"]
    assert gen.dtype == ref.dtype == torch.float32 and gen.shape == ref.shape
    K, N, two = gen.shape
    assert K == 3 and N >= 2000 and two == 2
    torch.manual_seed(0)
    normal = torch.randn(N, 2)
    ratios = [distar.energy_distance(gen[k], ref[k]) / distar.energy_distance(normal, ref[k])
              for k in range(K)]
    return gen, ref, ratios


@pytest.mark.xdist_group("toy")
@pytest.mark.parametrize("model", ["sdxl", "sd3"])
def test_toy_without_reward_or_cfg_converges_to_the_reference(tmp_path, model):
    # 500 steps, the toy's: past ~400 the ratio sits at its noise floor (constant lr). The
    # largest of the 3 classes' ratios, train() seeded 0-11 alone: 0.005-0.019; this command line
    # (seed 0): 0.007. Under the flow process (sd3, exact flow references), seeds 0-5: 0.009-0.021,
    # this command line 0.009. Spikes (a 3-layer net's seed 6: 0.037 at 600 steps) come at any step
    p = run_here("--toy", f"--model={model}", "--alpha_rew=0", "--alpha_cfg=0", "--max_steps=500",
                 f"--out_dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("gradient check")  # printed first
    assert "FAILED" not in p.stdout
    _, _, ratios = _class_energy_ratios(tmp_path / "toy_samples.safetensors")
    assert max(ratios) < {"sdxl": 0.02, "sd3": 0.025}[model], ratios
    assert (tmp_path / "toy.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def toy_reward_run(tmp_path_factory):
    """python distar.py --toy with the reward, 50 steps, a log line every 10, stdout and stderr
    not terminals (as in a log file): the reward's effect, and the lines printed without a bar."""
    d = tmp_path_factory.mktemp("toy_reward")
    p = run_here("--toy", "--alpha_rew=300", "--alpha_cfg=0", "--max_steps=50", "--log_interval=10",
            f"--out_dir={d}")
    assert p.returncode == 0, p.stderr[-2000:]
    return d, p.stdout


@pytest.mark.xdist_group("toy")
def test_toy_with_reward_moves_toward_higher_reward(toy_reward_run):
    # 50 steps: a gain of 0.50-0.81 per class by then over seeds 0-4 (0.50-0.70 after 300 steps),
    # 10x the bound
    gen, ref, _ = _class_energy_ratios(toy_reward_run[0] / "toy_samples.safetensors")
    gain = gen[..., 0].mean(1) - ref[..., 0].mean(1)  # r = reward_scale * x[0]
    assert (gain > 0.05).all(), gain


@pytest.mark.xdist_group("toy")
def test_without_a_progress_bar_every_log_step_is_a_plain_line(toy_reward_run, tmp_path, monkeypatch,
                                                                capsys):
    """Under SLURM or nohup, or with stdout in a file (python distar.py --toy > log.txt), no bar
    shows there: a 20-hour run still says where it is, a line per --log_interval."""
    d, stdout = toy_reward_run  # stdout and stderr: not terminals, as in a log file
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    rows = [json.loads(r) for r in (d / "metrics.jsonl").read_text().splitlines()]
    assert [line.split()[1] for line in lines] == ["10/50", "20/50", "30/50", "40/50", "50/50"]
    for line, row in zip(lines, rows):  # the logged metrics, rounded
        got = dict(zip(line.split()[2::2], map(float, line.split()[3::2])))
        for key in ("loss_g", "loss_div", "loss_psi", "reward"):
            assert got[key] == pytest.approx(row[key], rel=1e-3, abs=1e-9), key
        assert got["sec/step"] == pytest.approx(row["sec_assistant"] + row["sec_generator"], rel=1e-2)
    # on a terminal the bar shows the metrics, and no line is printed under it
    world = _toy([f"--out_dir={tmp_path / 'tty'}", "--max_steps=4", "--log_interval=2"])
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    distar.fit(world.cfg, world, (0, 1, torch.device("cpu")))
    out, err = capsys.readouterr()
    assert "loss_g=" in err and not re.search(r"^step \d+/", out, re.M), (out, err)


@pytest.mark.xdist_group("toy")
def test_torchrun_toy_runs_two_ranks_in_sync_and_rank_0_alone_prints(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "distar.py"), "--toy", "--max_steps=30", f"--out_dir={tmp_path}"]
    p = subprocess.run(cmd, cwd=HERE, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "on 2 process(es), parameters identical on all ranks" in p.stdout
    assert p.stdout.count("gradient check:") == 1  # rank 0 prints
    assert p.stdout.count("step 30/30 ") == 1  # its log line too (no bar: stdout is a pipe)
    assert (tmp_path / "toy_samples.safetensors").exists()


@pytest.mark.xdist_group("tiny_runs")
def test_tiny_run_writes_a_diffusers_generator_samples_state_and_every_metric(trained_dir):
    from diffusers import UNet2DConditionModel

    d = trained_dir  # run_here("--tiny", "--max_steps=2", "--sample_interval=1"), exit 0 checked there
    unet = UNet2DConditionModel.from_pretrained(d / "checkpoint-000002" / "generator")  # it loads
    assert unet.config.addition_embed_type == "text_time"
    assert Image.open(d / "samples-000001.png").size == (4 * 64, 64)
    state = json.loads((d / "checkpoint-000002" / "state.json").read_text())
    assert state["step"] == 2 and state["config"]["tiny"] is True
    row = json.loads((d / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss_g", "loss_div", "reward", "grad_norm", "sec_generator", "sec_assistant",
                "mem_generator_gb", "x0grad_rew", "x0grad_div", "x0grad_cfg", "skipped"):
        assert key in row


def test_bf16_autocast_path_trains_on_tiny_models_with_finite_losses(tmp_path):
    p = run_here("--tiny", "--precision=bf16", "--max_steps=2", f"--out_dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert all(math.isfinite(r["loss_g"]) and math.isfinite(r["loss_psi"]) for r in rows)


###############################################################################
# EXTRAS. Tooling around the DI* path above: the command line, the out_dir's one-run rule,
# full-size models with random weights, the dry run and the cost table, the toy pictures, and the
# paper's Table 2 in the toy.
###############################################################################


# -----------------------------------------------------------------------------
# the command line: every field is a --flag with its mode's default; a bad command line (and
# running out of GPU memory) is one line and a non-zero exit


def test_flags_parse_to_their_types_and_each_mode_has_defaults_the_command_line_overrides():
    cfg = distar.parse_args(["--toy", "--alpha_rew=3", "--cfg=out", "--seed=7"])
    assert cfg.toy is True and cfg.alpha_rew == 3.0 and cfg.cfg == "out" and cfg.seed == 7
    assert cfg.max_steps == distar.TOY_DEFAULTS["max_steps"]  # toy defaults apply
    assert distar.parse_args(["--toy", "--max_steps=5"]).max_steps == 5  # and the user wins
    assert distar.parse_args([]).alpha_cfg == 7.5 and distar.parse_args([]).cfg == "in"
    # LoRA: DMD2's SDXL LoRA learning rates, unless a mode or the command line sets them
    assert (distar.parse_args(["--lora_rank=64"]).lr_g, distar.parse_args(["--lora_rank=64"]).lr_psi) == (
        5e-5, 5e-5)
    assert distar.parse_args(["--lora_rank=64", "--lr_g=1e-4"]).lr_g == 1e-4
    assert distar.parse_args(["--tiny", "--lora_rank=4"]).lr_g == distar.TINY_DEFAULTS["lr_g"]
    assert distar.parse_args([]).lr_g == 5e-7
    # at 1024 px no step fits even a 141 GB GPU without activation checkpointing; tiny ones do
    assert distar.parse_args([]).grad_checkpointing and not distar.parse_args(["--tiny"]).grad_checkpointing


@pytest.mark.parametrize("args, words", [
    (["--toy", "--nope=1"], "unrecognized arguments: --nope=1\n"),  # nothing close: no guess
    (["--toy", "--max_step=4"], "unrecognized arguments: --max_step=4; did you mean --max_steps?"),
    (["--toy", "--max_steps=ten"], "--max_steps: invalid int value: 'ten'"),
    (["--toy", "--alpha_rew"], "--alpha_rew: expected one argument"),
    (["--toy", "--cfg=sideways"], "--cfg: invalid choice: 'sideways'"),
    (["--toy", "--divergence=tv"], "--divergence: invalid choice"),
    (["--toy", "--toy=maybe"], "--toy: takes true or false"),
    (["--toy", "--max_steps=3", "stray"], "unrecognized arguments: stray"),
    (["--toy", "--t_min=990"], "--t_min <= --t_max"),
    (["--toy", "--lr_g=-1"], "--lr_g must be >= 0"),
    (["--toy", "--max_steps=-5"], "--max_steps must be >= 0"),
    (["--ablation"], "--ablation is a toy experiment"),
    (["--toy", "--ablation", "--alpha_rew=3"], "--ablation sets --divergence, --alpha_rew"),
    (["--toy", "--keep_checkpoints=0"], "--keep_checkpoints must be >= 1"),
    (["--tiny", "--resume", "--overwrite"], "--overwrite deletes it: choose"),
    (["--toy", "--ablation"], "--bench and --ablation run in one process: use python"),
    (["--toy", "--lora_rank=4"], "--lora_rank adapts SDXL UNets; the toy trains whole MLPs"),
    (["--tiny", "--lora_rank=-1"], "--lora_rank must be >= 0"),
    (["--tiny", "--lora_rank=4", "--lora_alpha=0"], "--lora_alpha must be > 0"),
    (["--tiny", "--lora_targets=mlp"], "--lora_targets: invalid choice: 'mlp'"),
    (["--tiny", "--fsdp"], "--fsdp shards the UNets over torchrun's processes: launch it with torchrun"),
    (["--tiny", "--bench", "--fsdp"], "--fsdp shards the UNets over torchrun's processes"),
    (["--toy", "--fsdp"], "--fsdp shards SDXL's UNets; the toy's MLPs run under DDP"),
])
def test_a_bad_command_line_is_one_line_naming_the_flag_and_exit_2(args, words, capsys,
                                                                   monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun, where every process reports it
    assert distar.main(args) == 2  # the script exits with main's code (next test)
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("distar: error: ") and err.count("\n") == 1, err
    assert words in err, err


def test_the_script_exits_with_mains_code_and_no_traceback():
    p = run("--toy", "--max_steps=ten")
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr == "distar: error: --max_steps: invalid int value: 'ten'\n"


def test_running_out_of_gpu_memory_is_one_line_from_the_rank_that_did(monkeypatch, capsys):
    def run_toy(cfg, dist_info):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(distar, "run_toy", run_toy)
    monkeypatch.setattr(distar, "setup_distributed", lambda cuda: (3, 8, torch.device("cpu")))
    assert distar.main(["--toy"]) == 1  # rank 3 of 8: it may be the only one that ran out
    out, err = capsys.readouterr()
    assert out == "" and err == ("distar: error: rank 3 ran out of GPU memory: try a smaller "
                                 "--batch_size, more GPUs with --fsdp, or --grad_checkpointing if it is off\n")


@pytest.fixture(scope="module")
def help_runs():
    """python distar.py --help and python sample.py --help, each run once: {script: its run}."""
    return {script: subprocess.run([sys.executable, os.path.join(HERE, script), "--help"], cwd=HERE,
                                   env=ENV, capture_output=True, text=True, timeout=120)
            for script in ("distar.py", "sample.py")}


@pytest.mark.xdist_group("help")
@pytest.mark.parametrize("script", ["distar.py", "sample.py"])
def test_help_lists_every_option_with_its_default_and_meaning(help_runs, script):
    r = help_runs[script]
    assert r.returncode == 0 and "Traceback" not in r.stderr
    text = r.stdout
    cls = distar.Config if script == "distar.py" else sample.SampleConfig
    helps = {a.dest: a.help for a in distar.make_parser(cls, script)._actions}
    squeeze = lambda x: "".join(x.split())  # argparse breaks long words at hyphens
    for f in fields(cls):
        meaning = helps[f.name].split(" (default")[0]
        assert meaning and f"--{f.name}" in text, f.name  # every field has its one line
        assert squeeze(helps[f.name]) in squeeze(text), f.name


@pytest.mark.xdist_group("help")
def test_help_gives_each_modes_defaults_and_the_multi_node_command_as_typed(help_runs):
    r = help_runs["distar.py"]
    assert r.returncode == 0
    text = r.stdout
    # the backslash and the line break a shell needs, not one joined line
    assert "GLOO_SOCKET_IFNAME=eth0 torchrun --nnodes=8 --nproc_per_node=8 --node_rank=$NODE_RANK \\\n" \
           "    --master_addr=$MASTER_ADDR --master_port=29500 distar.py" in text
    assert "python distar.py --help" not in text  # not an instruction to run what is running
    modes = text.split("each mode replaces these defaults")[1]
    listed = dict(re.findall(r"^  --(\w+) +(.*(?:\n {15}\S.*)*)", modes, re.M))
    for mode, defaults in (("toy", distar.TOY_DEFAULTS), ("tiny", distar.TINY_DEFAULTS),
                           ("dry_run", distar.DRY_RUN_DEFAULTS), ("ablation", distar.ABLATION_DEFAULTS)):
        assert listed[mode].split() == [f"--{k}={v}" for k, v in defaults.items()], mode


# -----------------------------------------------------------------------------
# the out_dir holds one run: a fresh SDXL run refuses another run's checkpoints; a demo run,
# or --overwrite, starts the out_dir over; under torchrun every rank sees the same out_dir; before
# anything loads, SDXL needs a GPU and a checkpoint resumes only in its own mode


def _sdxl_args(tiny):
    """SDXL mode (not --tiny) on the tiny models: the real run's rules for out_dir apply."""
    sdxl, reward = tiny
    return ["--allow_cpu", f"--pretrained={sdxl}", "--generator_init=", f"--reward_model={reward}",
            f"--reward_processor={reward}", "--resolution=64", "--precision=fp32", "--assistant_steps=1",
            "--log_interval=1"]


@pytest.mark.xdist_group("tiny_runs")
def test_fresh_sdxl_run_refuses_an_out_dir_with_another_runs_checkpoints(tiny, trained_dir, capsys):
    before = _tree_digest(trained_dir)
    assert distar.main([*_sdxl_args(tiny), "--max_steps=1", f"--out_dir={trained_dir}"]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    newest = trained_dir / "checkpoint-000002"
    assert lines[0] == (f"distar: error: {trained_dir} holds checkpoints of another run (newest "
                        f"{newest}): pass --resume to continue it, or --overwrite to start over")
    assert _tree_digest(trained_dir) == before


@pytest.mark.xdist_group("tiny_runs")
@pytest.mark.parametrize("mode", ["--tiny", "--overwrite"])
def test_a_fresh_run_starts_the_out_dir_over(tiny, trained_dir, tmp_path, mode):
    """A demo (--tiny) run twice, with fewer steps the second time, or SDXL with --overwrite:
    only the new run's checkpoints, metrics and samples remain; the tiny models' cache stays."""
    import shutil

    d = tmp_path / "out"
    shutil.copytree(trained_dir, d)  # checkpoint-000002, metrics.jsonl, samples-00000{1,2}.png, tiny/
    tiny_models = _tree_digest(d / "tiny")
    args = ["--tiny"] if mode == "--tiny" else [*_sdxl_args(tiny), "--overwrite"]
    p = run_here(*args, "--max_steps=1", "--sample_interval=1", f"--out_dir={d}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert (f"starting over in {d}: removed checkpoint-000002, metrics.jsonl, samples-000001.png, "
            "samples-000002.png of an earlier run (--resume continues a run)") in p.stdout
    assert [c.name for c in sorted(d.glob("checkpoint-*"))] == ["checkpoint-000001"]
    rows = (d / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in rows] == [1]
    assert [f.name for f in sorted(d.glob("samples-*.png"))] == ["samples-000001.png"]
    assert _tree_digest(d / "tiny") == tiny_models


@pytest.mark.xdist_group("tiny_runs")
def test_an_sd3_tiny_run_leaves_the_sdxl_numbers_alone(trained_dir, tmp_path):
    """The tiny models are the same whatever ran before: SD3's tiny parts (with T5 and without),
    built in an out_dir between two SDXL --tiny runs, leave the second run's numbers the first's."""
    import shutil

    d = tmp_path / "out"
    shutil.copytree(trained_dir, d)  # the first SDXL run
    sdxl = _tree_digest(d / "tiny")
    for t5 in (True, False):  # what an SD3 --tiny run does to the out_dir before it trains
        cfg = distar.parse_args(["--tiny", "--model=sd3", f"--t5={t5}", f"--out_dir={d}"])
        cfg = distar.tiny_config(cfg, (0, 1))
        assert os.path.isfile(os.path.join(cfg.reward_model, "config.json"))
    assert {k: v for k, v in _tree_digest(d / "tiny").items() if k in sdxl} == sdxl
    p = run_here("--tiny", "--max_steps=1", f"--out_dir={d}")
    assert p.returncode == 0, p.stderr[-2000:]
    first, second = (json.loads((r / "metrics.jsonl").read_text().splitlines()[0])
                     for r in (trained_dir, d))
    keys = ("loss_g", "loss_div", "loss_psi", "reward", "grad_norm")
    assert second["step"] == 1 and {k: second[k] for k in keys} == {k: first[k] for k in keys}


def test_every_rank_must_see_the_same_out_dir(tmp_path, monkeypatch):
    """On nodes without a shared filesystem each has its own out_dir, and --resume or --fsdp would
    fail at the first checkpoint: it is one line at the start instead, on every rank."""
    token = "0123456789abcdef"
    monkeypatch.setattr(distar.dist, "broadcast_object_list", lambda obj, src: obj.__setitem__(0, token))
    monkeypatch.setattr(distar.dist, "barrier", lambda group=None: None)
    others_missing = [0.0]  # what the all-reduce (MAX over ranks) brings from the other ranks
    monkeypatch.setattr(distar.dist, "all_reduce", lambda t, op: t.clamp_(min=others_missing[0]))
    shared, own = tmp_path / "shared", tmp_path / "own"
    shared.mkdir(), own.mkdir()
    cpu = torch.device("cpu")
    (shared / f".probe-{token}").touch()  # as rank 0 left it on a shared filesystem
    distar.shared_out_dir(str(shared), (1, 2, cpu))  # rank 1 sees it: no error
    words = "is not the same folder on every node: put it on a filesystem that all of them share"
    with pytest.raises(distar.ConfigError, match=words):
        distar.shared_out_dir(str(own), (1, 2, cpu))  # rank 1 on a node of its own
    (shared / f".probe-{token}").unlink()
    distar.shared_out_dir(str(shared), (0, 2, cpu))  # rank 0: writes, finds, removes its probe
    assert list(shared.iterdir()) == []
    others_missing[0] = 1.0
    with pytest.raises(distar.ConfigError, match=words):  # rank 0 learns that another rank missed
        distar.shared_out_dir(str(shared), (0, 2, cpu))
    assert list(shared.iterdir()) == []
    cfg = distar.parse_args(["--toy", f"--out_dir={own}"])
    with pytest.raises(distar.ConfigError, match=words):  # every run checks, as it starts
        distar.start_out_dir(cfg, (1, 2, cpu))


def test_sdxl_without_a_gpu_is_one_line_before_anything_loads(tmp_path):
    """python distar.py on a laptop would download tens of GB to train SDXL on its CPU."""
    env = {**ENV, "CUDA_VISIBLE_DEVICES": "", "HF_HOME": str(tmp_path / "hf")}
    p = subprocess.run([sys.executable, os.path.join(HERE, "distar.py")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr == ("distar: error: training SDXL needs a GPU and none is visible: try --toy "
                        "(2-D, seconds), --tiny (tiny random SDXL-shaped models) or --dry_run (the "
                        "memory plan); --allow_cpu runs it here anyway\n")
    assert os.listdir(tmp_path) == []  # no out/, no hub cache
    cfg = distar.parse_args([f"--out_dir={tmp_path / 'o'}"])
    distar.check_sdxl_run(cfg, torch.device("cuda"))  # with a GPU it goes on (--allow_cpu: the hub test)
    with pytest.raises(distar.ConfigError, match="needs a GPU"):
        distar.check_sdxl_run(cfg, torch.device("cpu"))
    sd3 = distar.parse_args(["--model=sd3", f"--out_dir={tmp_path / 'o'}"])  # names its family
    with pytest.raises(distar.ConfigError, match=r"^training SD3 needs a GPU .* random SD3-shaped"):
        distar.check_sdxl_run(sd3, torch.device("cpu"))
    typo = tmp_path / "prompts.txt"  # the user's own file first: free to fix, unlike a GPU
    with pytest.raises(distar.LoadError, match=f"^--prompts={typo}: no such file$"):
        distar.check_sdxl_run(replace(sd3, prompts=str(typo)), torch.device("cpu"))


@pytest.mark.xdist_group("tiny_runs")
@pytest.mark.parametrize("saved, asked, was, now", [
    ("--toy", ["--tiny"], "--toy=True --tiny=False", "--toy=False --tiny=True"),
    ("--tiny", ["--toy"], "--toy=False --tiny=True", "--toy=True --tiny=False"),
    ("--tiny", ["--allow_cpu"], "--tiny=True", "--tiny=False"),
    ("--tiny", ["--tiny", "--lora_rank=4"], "--lora_rank=0", "--lora_rank=4"),
    ("--tiny --lora_rank=4", ["--tiny"], "--lora_rank=4", "--lora_rank=0"),
    ("--tiny --lora_rank=4", ["--tiny", "--lora_rank=8", "--lora_alpha=2"], "--lora_rank=4", "--lora_rank=8"),
    ("--tiny --lora_rank=4", ["--tiny", "--lora_rank=4", "--lora_alpha=2", "--lora_targets=attn"],
     "--lora_targets=all", "--lora_targets=attn"),
    ("--tiny --lora_rank=4", ["--tiny", "--lora_rank=4"], "--lora_alpha=2.0", "--lora_alpha=8.0")])
def test_resume_in_another_mode_is_one_line_and_leaves_the_folder_as_it_was(
        trained_dir, lora_run, tmp_path, capsys, saved, asked, was, now):
    """A toy checkpoint's 2-D MLPs do not fit SDXL's UNets, nor the other way round, nor a LoRA a
    whole UNet or a LoRA of another shape; another --lora_alpha rescales the saved adapter, so it
    is another generator: say so before --tiny builds its models in there, or anything loads."""
    d = lora_run if "lora" in saved else trained_dir  # --tiny, checkpoint-000002
    if saved == "--toy":
        _toy_checkpoint(tmp_path)
        d = tmp_path
    before = _tree_digest(d)
    assert distar.main([*asked, "--resume", f"--out_dir={d}"]) == 2
    out, err = capsys.readouterr()
    newest = distar.list_checkpoints(str(d))[-1]
    assert out == "" and err == (f"distar: error: --resume: {newest} was saved by a run with {was}, "
                                 f"not {now}: resume it with those, or give this run another --out_dir\n")
    assert _tree_digest(d) == before and not (tmp_path / "tiny").exists()


@pytest.mark.parametrize("run_fsdp", [pytest.param(False, marks=pytest.mark.xdist_group("tiny_runs")),
                                      pytest.param(True, marks=pytest.mark.xdist_group("ddp_fsdp"))])
def test_resume_between_ddp_and_fsdp_is_one_line_before_anything_loads(request, monkeypatch, run_fsdp):
    """The weights are the same diffusers folders, but DDP's AdamW states are one state.pt and
    --fsdp's DCP shards: resuming one as the other is refused by check_resume, folder untouched."""
    d = request.getfixturevalue("ddp_and_fsdp") / "fsdp" if run_fsdp else request.getfixturevalue("trained_dir")
    monkeypatch.setenv("RANK", "0")  # as under torchrun, which --fsdp needs
    cfg = distar.parse_args(["--tiny", "--resume", f"--out_dir={d}", *([] if run_fsdp else ["--fsdp"])])
    before = _tree_digest(d)
    with pytest.raises(distar.LoadError, match=f"saved by a run with --fsdp={run_fsdp}, not "
                                               f"--fsdp={not run_fsdp}: resume it with those"):
        distar.check_resume(cfg, 0)
    assert _tree_digest(d) == before


def test_resume_with_another_objective_says_what_changed_and_continues(tmp_path, capsys):
    """Learning rates and betas may change on resume; a change to what is optimised is said."""
    _toy_checkpoint(tmp_path)  # step 1, the toy's defaults
    ckpt = tmp_path / "checkpoint-000001"
    assert distar.main(["--toy", "--resume", f"--out_dir={tmp_path}", "--max_steps=2", "--lr_g=1e-4",
                        "--divergence=kl", "--alpha_rew=3"]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "objective" in line] == [
        f"resume: the objective differs from {ckpt}'s: --divergence pseudo_huber -> kl, "
        "--alpha_rew 100.0 -> 3.0"]
    assert (tmp_path / "checkpoint-000002").is_dir()  # and the run went on
    assert {"divergence", "cfg", "alpha_rew", "alpha_cfg", "huber_c", "t_min", "t_max", "assistant_steps",
            "resolution", "batch_size", "conditioning_t"} <= set(distar.OBJECTIVE_KEYS)
    assert "lora_alpha" in distar.MODE_KEYS  # a LoRA's alpha: refused (the test above)
    cfg = distar.parse_args(["--toy", "--resume", f"--out_dir={tmp_path}", "--divergence=kl", "--alpha_rew=3",
                             "--lr_psi=1", "--beta1=0.5"])
    ckpt = tmp_path / "checkpoint-000002"
    distar.check_resume(cfg, 0)
    distar.check_resume(replace(cfg, lora_alpha=3.0, lora_targets="attn"), 0)  # no LoRA: no matter
    assert capsys.readouterr().out == ""  # only the optimiser changed
    for key in distar.OBJECTIVE_KEYS:  # each is compared
        value = getattr(cfg, key)
        other = replace(cfg, **{key: dict(divergence="l2", cfg="out")[key] if isinstance(value, str)
                                else value + 1})
        distar.check_resume(other, 1)  # rank 1 is silent
        distar.check_resume(other, 0)
        assert capsys.readouterr().out == (f"resume: the objective differs from {ckpt}'s: --{key} "
                                           f"{getattr(cfg, key)} -> {getattr(other, key)}\n"), key


def test_resume_without_a_checkpoint_stops_and_resume_if_any_starts_at_step_0(tmp_path, capsys,
                                                                               monkeypatch):
    """--resume into a mistyped out_dir, or one with no complete checkpoint, would start a fresh
    run (hours on a GPU): one line, nothing written. --resume_if_any, a scheduler's requeue, starts
    where there is none and continues where there is one."""
    monkeypatch.setattr(distar, "gradient_check", lambda: [])  # the toy's 2 s check: not tested here
    typo, empty = tmp_path / "typo", tmp_path / "empty"
    empty.mkdir()
    (empty / ".tmp-checkpoint-000002").mkdir()  # killed while saving its first checkpoint
    for d, what in ((typo, "does not exist"), (empty, "holds no complete checkpoint")):
        assert distar.main(["--toy", "--resume", "--max_steps=2", f"--out_dir={d}"]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err == (f"distar: error: --resume: --out_dir={d} {what}: check the folder, "
                                     "or pass --resume_if_any to start at step 0 where there is no "
                                     "checkpoint\n")
    assert not typo.exists() and [p.name for p in empty.iterdir()] == [".tmp-checkpoint-000002"]
    assert distar.main(["--toy", "--resume_if_any", "--max_steps=1", f"--out_dir={typo}"]) == 0
    assert f"resume: no complete checkpoint in {typo}; starting at step 0\n" in capsys.readouterr().out
    assert distar.main(["--toy", "--resume_if_any", "--max_steps=2", f"--out_dir={typo}"]) == 0
    assert f"resumed from {typo / 'checkpoint-000001'} (step 1)" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in (typo / "metrics.jsonl").read_text().splitlines()] == [
        1, 2]
    for args, words in ((["--toy", "--overwrite"], "--overwrite deletes it: choose"),
                        (["--dry_run"], "--dry_run writes no checkpoints: nothing to --resume")):
        assert distar.main([*args, "--resume_if_any"]) == 2
        assert words in capsys.readouterr().err


def test_ctrl_c_is_one_line_from_rank_0_with_what_to_run_next(tmp_path, capsys, monkeypatch):
    """In-process, without a checkpoint (the SIGINT test has one): rank 0 says it, the others are
    silent, exit 130; a second Ctrl-C (torchrun forwards the terminal's) is ignored from then on."""
    def run_toy(cfg, dist_info):
        raise KeyboardInterrupt

    handlers = []
    monkeypatch.setattr(distar, "run_toy", run_toy)
    monkeypatch.setattr(distar.signal, "signal", lambda *args: handlers.append(args))
    for rank in (0, 1):
        monkeypatch.setattr(distar, "setup_distributed", lambda cuda: (rank, 2, torch.device("cpu")))
        assert distar.main(["--toy", f"--out_dir={tmp_path}"]) == 130
        out, err = capsys.readouterr()
        assert out == "" and err == ("" if rank else f"distar: stopped (Ctrl-C); no complete checkpoint "
                                     f"in {tmp_path} yet, so nothing to resume: run the command again to "
                                     "start over\n")
    assert handlers == [(distar.signal.SIGINT, distar.signal.SIG_IGN)] * 2


def test_an_sdxl_run_says_when_it_trains_on_the_built_in_prompts(tiny, tmp_path, capsys, monkeypatch):
    def stop(*args, **kwargs):
        raise distar.LoadError("stopped here")

    monkeypatch.setitem(distar.WORLDS, "sdxl", stop)  # the start line is printed before the models load
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    for extra, said in (([], f"prompts: the {len(distar.BUILTIN_PROMPTS)} built-in ones (no --prompts)"),
                        ([f"--prompts={prompts}"], f"prompts: {prompts}")):
        assert distar.main([*_sdxl_args(tiny), *extra, f"--out_dir={tmp_path / 'o'}"]) == 2
        out = capsys.readouterr().out
        assert out.startswith("distar: SDXL on 1 x cpu: loading ") and out.endswith(f"; {said}\n"), out


# -----------------------------------------------------------------------------
# loading models: generator loading from files, folders and the hub; a failed load, an
# unreachable hub included, is one line naming its flag


@pytest.fixture(scope="module")
def state_dicts(tiny, tmp_path_factory):
    """The tiny UNet's weights rounded to fp16, as the releases publish them: a UNet folder (fp32
    values, each exactly an fp16), DMD2's layout (an fp16 .bin, no config beside it) and the DI*
    release's (unet/diffusion_pytorch_model.fp16.safetensors beside unet/config.json)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    sdxl, _ = tiny
    tmp = tmp_path_factory.mktemp("state_dicts")
    unet = UNet2DConditionModel.from_pretrained(sdxl, subfolder="unet")
    with torch.no_grad(), torch.random.fork_rng():  # a generator unlike the pretrained UNet
        torch.manual_seed(6)
        for p in unet.parameters():
            p.copy_((p + 0.05 * torch.randn_like(p)).half().float())
    unet.save_pretrained(tmp / "folder")
    half = {k: v.half() for k, v in unet.state_dict().items()}
    torch.save(half, tmp / "dmd2_sdxl_1step_unet_fp16.bin")
    (tmp / "release" / "unet").mkdir(parents=True)
    save_file(half, str(tmp / "release" / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    unet.save_config(tmp / "release" / "unet")  # config.json beside the weights
    return tmp, unet.state_dict()


@pytest.mark.xdist_group("state_dicts")
def test_load_generator_reads_state_dict_files_and_variant_folders(tiny, state_dicts):
    sdxl, _ = tiny
    tmp, expect = state_dicts
    for path, variant in (("folder", None), ("dmd2_sdxl_1step_unet_fp16.bin", None),
                          ("release/unet/diffusion_pytorch_model.fp16.safetensors", None),
                          ("release", "fp16")):  # a release folder holding unet/: the variant
        unet = distar.load_generator(str(tmp / path), sdxl, variant=variant)
        got = unet.state_dict()
        assert got.keys() == expect.keys(), path
        assert all(torch.equal(got[k], expect[k]) for k in expect), path
        tensors = [*got.values(), *unet.buffers()]
        assert all(t.dtype == torch.float32 and not t.is_meta for t in tensors)
    assert next(distar.load_generator(str(tmp / "dmd2_sdxl_1step_unet_fp16.bin"), sdxl,
                                      dtype=torch.float16).parameters()).dtype == torch.float16
    pretrained = distar.load_generator("", sdxl).state_dict()  # "" = the UNet of pretrained
    assert not torch.equal(pretrained["conv_in.weight"], expect["conv_in.weight"])


@pytest.mark.xdist_group("state_dicts")
def test_load_generator_hub_path_is_owner_repo_then_path_in_repo(tiny, state_dicts, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    sdxl, _ = tiny
    tmp, expect = state_dicts
    release, weights = "XDG-XHS/distar_short_1step", "unet/diffusion_pytorch_model.fp16.safetensors"
    dmd2 = "dmd2_sdxl_1step_unet_fp16.bin"
    calls, files = [], {(release, weights): tmp / "release" / weights,
                        (release, "unet/config.json"): tmp / "release" / "unet" / "config.json",
                        ("tianweiy/DMD2", dmd2): tmp / dmd2}

    def download(repo, filename, **kw):
        calls.append((repo, filename))
        if (repo, filename) not in files:
            raise EntryNotFoundError(f"no {filename} in {repo}")  # what the hub's 404 subclasses
        return str(files[repo, filename])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    for path in ("XDG-XHS/distar_short_1step/unet/diffusion_pytorch_model.fp16.safetensors",
                 "tianweiy/DMD2/dmd2_sdxl_1step_unet_fp16.bin"):  # DMD2: no config beside it
        got = distar.load_generator(path, sdxl).state_dict()
        assert all(torch.equal(got[k], expect[k]) for k in expect)
    assert calls == [*files] + [("tianweiy/DMD2", "config.json")]


def test_load_generator_errors_are_one_line_naming_the_flag(tiny, tmp_path):
    sdxl, _ = tiny
    torch.save({"conv_in.weight": torch.zeros(1)}, tmp_path / "bad.bin")
    for path, words in ((tmp_path / "missing.bin", "no such file"),
                        (tmp_path / "bad.bin", "Error(s) in loading state_dict"),
                        (tmp_path / "missing", "")):  # words: diffusers' own
        with pytest.raises(distar.LoadError) as e:
            distar.load_generator(str(path), sdxl, flag="generator")
        assert str(e.value).startswith(f"cannot load --generator={path}: ") and words in str(e.value)
        assert "\n" not in str(e.value)


def _closed_hub():
    """A local port as HF_ENDPOINT that takes each connection and closes it unanswered, as a hub
    that cannot be reached, and counts them: (server, endpoint, connections)."""
    import socket
    import threading

    server, conns = socket.create_server(("127.0.0.1", 0)), []

    def serve():
        while True:
            try:
                conn = server.accept()[0]
            except OSError:  # closed: the test is over
                return
            conns.append(1)
            conn.close()
    threading.Thread(target=serve, daemon=True).start()
    return server, f"http://127.0.0.1:{server.getsockname()[1]}", conns


def test_no_network_is_found_once_and_is_one_line(tmp_path, monkeypatch, capsys):
    """No network and no HF_HUB_OFFLINE: each script asks the hub once and stops in one line with
    the offline hint, naming the model asked for, and none of huggingface_hub's retries (5 a
    request, with 23 s of sleeps and a log line each): one connection, whatever the machine's
    load. distar in a process (what reaches the terminal), sample.py in this one."""
    from huggingface_hub import constants

    server, endpoint, conns = _closed_hub()
    env = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"))  # an empty cache
    (tmp_path / "p.txt").write_text("a cat\n")
    p = subprocess.run([sys.executable, os.path.join(HERE, "distar.py"), "--model=sd3",
                        "--allow_cpu", "--prompts=p.txt"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert (p.returncode, len(conns)) == (2, 1), p.stderr
    assert p.stdout == ("distar: SD3 on 1 x cpu: loading stabilityai/stable-diffusion-3.5-medium, "
                        "its transformer and yuvalkirstain/PickScore_v1; prompts: p.txt\n")
    assert p.stderr == ("distar: error: cannot load --pretrained=stabilityai/stable-diffusion-3.5-"
                        "medium: no such local path, the Hugging Face hub could not be reached and "
                        "the model is not in the local cache; pass a local folder (--pretrained="
                        "/path/to/stable-diffusion-3.5-medium)\n")
    conns.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # both restored after the test
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    assert sample.main(["--prompt=a cat", f"--out_dir={tmp_path / 's'}"]) == 2
    assert len(conns) == 1 and constants.HF_HUB_OFFLINE
    assert capsys.readouterr().err.endswith("(--pretrained=/path/to/stable-diffusion-xl-base-1.0)\n")
    server.close()


def test_an_unreachable_hub_is_one_line_naming_the_flag(tmp_path, capsys, monkeypatch):
    """HF_HUB_OFFLINE=1 (set above) stands for no network: the default --pretrained is not in
    this machine's cache, so both scripts must stop at once with one line that says so; distar
    says what it loads before it asks the hub."""
    probe, said = distar.offline_unless_reachable, []
    monkeypatch.setattr(distar, "offline_unless_reachable",
                        lambda *a: said.append(capsys.readouterr().out) or probe(*a))
    words = ("cannot load --pretrained=stabilityai/stable-diffusion-xl-base-1.0: "
             "no such local path, the Hugging Face hub could not be reached and the model is not "
             "in the local cache; pass a local folder (--pretrained=/path/to/stable-diffusion-xl-"
             "base-1.0)")
    for name, main in (("sample", sample.main), ("distar", distar.main)):
        flag = "--prompt=a cat" if name == "sample" else "--allow_cpu"  # distar: SDXL without a GPU
        assert main([flag, f"--out_dir={tmp_path / name}"]) == 2
        assert capsys.readouterr().err == f"{name}: error: {words}\n"
        assert not (tmp_path / name).exists()
    assert said[0] == "" and said[1].startswith("distar: SDXL on 1 x cpu: loading stabilityai/")


# -----------------------------------------------------------------------------
# full-size models from configs: the published architectures with random weights, on meta


# published parameter counts: SDXL-base (UNet, VAE, CLIP ViT-L/14 and OpenCLIP bigG text encoders)
UNET, VAE, TEXT_1, TEXT_2 = 2_567_463_684, 83_653_863, 123_060_480, 694_659_840

PICKSCORE = 986_109_441  # CLIP ViT-H/14 as transformers builds it, "986M" published

GIB = 2**30


@pytest.fixture(scope="module")
def dry_parts():
    distar.quiet_libraries()
    return distar.dry_run_parts("meta")


@pytest.fixture(scope="module")
def dry_lora_world():
    """The dry run's world with --lora_rank=64 (all targets), on parts of its own: add_lora puts
    adapters into the parts' UNets. Built once: peft adapts a full-size UNet in seconds."""
    distar.quiet_libraries()
    cfg = distar.parse_args(["--dry_run", "--lora_rank=64"])
    return distar.SDXLWorld(cfg, torch.device("meta"), parts=distar.dry_run_parts("meta"))


def _numel(net):
    return sum(p.numel() for p in net.parameters())


@pytest.mark.xdist_group("dry")
def test_dry_run_builds_the_published_architectures_on_meta(dry_parts):
    world = distar.SDXLWorld(distar.parse_args(["--dry_run"]), torch.device("meta"), parts=dry_parts)
    assert [_numel(n) for n in (world.s_ref, world.assistant, world.generator)] == [UNET] * 3
    text_encoders = (world.pipe.text_encoder, world.pipe.text_encoder_2)
    assert (_numel(world.vae), *map(_numel, text_encoders)) == (VAE, TEXT_1, TEXT_2)
    assert abs(_numel(world.reward_fn.model) - 986e6) < 0.5e6
    assert all(p.is_meta for p in world.generator.parameters())  # no memory spent
    assert world.latent_shape == (4, 128, 128)
    assert torch.equal(dry_parts["pipe"].scheduler.alphas_cumprod, distar.sdxl_alphas_cumprod())
    # CLIP-H's preprocessing (laion/CLIP-ViT-H-14-laion2B-s32B-b79K preprocessor_config.json)
    assert world.reward_fn.size == 224 and world.reward_fn.crop == (224, 224)
    from transformers import CLIPImageProcessor  # dry_run_parts relies on its defaults for mean and std
    assert list(CLIPImageProcessor().image_mean) == [0.48145466, 0.4578275, 0.40821073]
    assert list(CLIPImageProcessor().image_std) == [0.26862954, 0.26130258, 0.27577711]
    ids = world.pipe.tokenizer(["a shiba inu"], padding="max_length", max_length=77,
                               return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and ids.max() < 49408  # valid rows of the real embedding tables


# -----------------------------------------------------------------------------
# the dry run and the cost table: memory by hand from parameter counts, FLOPs on meta as on real
# tensors, the figures, and the cost table's variants


ROOT, BLOCK = 54_163_204, 49_164_800  # an SDXL UNet's weights outside its 87 FSDP units; the largest


@pytest.mark.xdist_group("dry")
@pytest.mark.parametrize("precision, n_gpus, fsdp", [("bf16", 1, False), ("bf16", 8, False),
                                                     ("fp32", 8, True), ("bf16", 64, True),
                                                     ("bf16", 1, True)])
def test_memory_plan_is_the_hand_computation_from_parameter_counts(dry_parts, precision, n_gpus, fsdp):
    cfg = distar.parse_args(["--dry_run", f"--precision={precision}"])
    world = distar.SDXLWorld(cfg, torch.device("meta"), parts=dry_parts)
    frozen = 2 if precision == "bf16" else 4  # bytes per frozen weight; trained nets and VAE fp32
    n = min(n_gpus, 8) if fsdp else 1  # --fsdp shards the three UNets over a node's 8 GPUs (HSDP)
    expect = [2 * UNET * 4 // n,  # generator + assistant fp32 masters
              2 * (2 * UNET * 4) // n,  # AdamW m and v of both
              (2 * UNET * 4) if n_gpus > 1 and not fsdp else UNET * 4 // n,  # DDP's buckets, or one net's
              UNET * frozen // n, (TEXT_1 + TEXT_2) * 4, PICKSCORE * frozen, VAE * 4]  # text encoders fp32
    if n > 1:  # FSDP's units as the forward sees them (bf16 under the policy): the 3 roots' own weights,
        # two blocks, a root's and a block's gradients (bf16 ones also as fp32 for the reduce-scatter)
        seen, grad = (2, 6) if precision == "bf16" else (4, 4)
        expect.append(3 * seen * ROOT + 2 * seen * BLOCK + grad * (ROOT + BLOCK))

    assert [b for _, b in distar.memory_plan(world, n_gpus, fsdp)] == expect
    assert distar.gpu_overhead(n_gpus) == int((0.5 + 0.7 * (n_gpus > 1)) * GIB)  # CUDA context, NCCL


@pytest.mark.xdist_group("dry")
def test_the_fsdp_plan_fits_16_gib_per_gpu_on_8_gpus_before_activations(dry_parts, dry_lora_world):
    """The 8-GPU goal: full fine-tuning and LoRA under --fsdp, bf16, before activations and the
    CUDA context; DDP on 8 GPUs, for comparison, needs more than an 80 GB card."""
    full = distar.SDXLWorld(distar.parse_args(["--dry_run"]), torch.device("meta"), parts=dry_parts)
    total = lambda world, n, fsdp: sum(b for _, b in distar.memory_plan(world, n, fsdp)) / GIB
    assert total(full, 8, True) <= 16 < 80 < total(full, 8, False)
    lora = total(dry_lora_world, 8, True)
    assert lora < total(full, 8, True) and lora < total(dry_lora_world, 1, False)


def test_memory_plan_rows_are_what_train_allocates(tiny, tmp_path):
    """On tiny models in bf16: frozen nets really are bf16, AdamW really keeps two fp32 states per
    trained weight, and train really frees each net's gradients after its update."""
    world = _sdxl_world(tiny, "--precision=bf16", "--max_steps=1", "--assistant_steps=1",
                        f"--out_dir={tmp_path}")
    real = lambda *nets: sum(p.untyped_storage().nbytes() for n in nets for p in n.parameters())
    plan = dict(distar.memory_plan(world, 1, False))
    rows = {k.split(" (")[0]: v for k, v in plan.items()}
    assert rows["reference UNet"] == real(world.s_ref) == 2 * _numel(world.s_ref)
    assert rows["text encoders"] == real(world.pipe.text_encoder, world.pipe.text_encoder_2)
    assert rows["reward CLIP"] == real(world.reward_fn.model) == 2 * _numel(world.reward_fn.model)
    assert rows["VAE"] == real(world.vae) == 4 * _numel(world.vae)
    assert rows["generator + assistant weights"] == real(world.generator, world.assistant)
    opt = distar.make_optimizer(world.cfg, world.assistant.parameters(), 1e-4)
    assert opt.defaults["fused"]  # no whole-net scratch in the step
    distar.assistant_loss(world, world.assistant, world.sample_cond(2)).backward()
    grads = sum(p.grad.untyped_storage().nbytes() for p in world.assistant.parameters())
    assert grads == plan["gradients of one net at a time"]
    opt.step()
    states = sum(v.untyped_storage().nbytes() for s in opt.state.values()
                 for k, v in s.items() if k != "step")
    assert 2 * states == rows["AdamW states of both, 2 per weight"]  # both nets are the same size
    world.assistant.zero_grad(set_to_none=True)
    distar.fit(world.cfg, world, (0, 1, torch.device("cpu")))
    assert all(p.grad is None for n in (world.generator, world.assistant) for p in n.parameters())


def test_step_flops_on_meta_equal_the_flops_of_real_tensors(tiny):
    """The dry run counts FLOPs on the meta device; on tiny models the count equals that of the
    real computation on CPU, attention included, and is linear in the batch."""
    world = _sdxl_world(tiny)
    cpu = distar.step_flops(world, 2)
    assert cpu["assistant"] > 0 and cpu["generator"] > cpu["assistant"]
    assert all(p.grad is None for n in (world.generator, world.assistant) for p in n.parameters())
    meta_world = distar.SDXLWorld(world.cfg, torch.device("meta"))  # the same tiny models, loaded onto meta
    assert {k: 2 * v for k, v in distar.step_flops(meta_world, 1).items()} == cpu  # batch 1 on meta, doubled
    # attention is counted (FlopCounterMode alone sees nothing of the CPU flash kernel)
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        distar.assistant_loss(world, world.assistant, world.sample_cond(2)).backward()
    assert fc.get_total_flops() < cpu["assistant"]


def test_dry_run_measurement_gives_throughput_and_mfu_and_writes_nothing(tiny, tmp_path, capsys,
                                                                          monkeypatch):
    """The dry run's GPU measurement on tiny models on CPU (the GPU itself cannot be tested here),
    then its figures from a given history of train's timings: step 1 is warm-up. Every step is
    timed, whatever --log_interval logs."""
    from dataclasses import replace
    world = _sdxl_world(tiny, "--max_steps=3", "--assistant_steps=1", f"--out_dir={tmp_path}")
    world.cfg = replace(world.cfg, tiny=False, dry_run=True, log_interval=10, peak_tflops=1000.0)
    cpu = (0, 1, torch.device("cpu"))
    histories, train = [], distar.train
    monkeypatch.setattr(distar, "train", lambda *a, **k: histories.append(train(*a, **k)) or histories[-1])
    assert distar.measure_steps(world, cpu, flops_per_step=1e9)["sec_per_step"] > 0
    assert [r["step"] for r in histories[0]] == [1, 2, 3] and world.cfg.log_interval == 10
    assert "measured on 1 x cpu" in capsys.readouterr().out
    assert os.listdir(tmp_path) == []  # no metrics file, samples or checkpoints
    monkeypatch.setattr(distar, "peak_memory_gb", lambda device, reserved=False: 60.0)
    rows = [dict(sec_assistant=a, sec_generator=g, mem_assistant_gb=m, mem_generator_gb=m + 1)
            for a, g, m in ((9.0, 1.0, 50.0), (0.5, 0.5, 40.0), (1.0, 1.0, 41.0), (2.0, 1.0, 40.0))]
    monkeypatch.setattr(distar, "train", lambda *args: rows)
    fig = distar.measure_steps(world, cpu, flops_per_step=400e12)  # batch 2, peak 1000 TFLOPS
    assert fig["sec_per_step"] == 2.0  # median of 1, 2 and 3 s; the 10 s warm-up left out
    assert fig["images_per_s"] == 1.0 and fig["tflops_per_s"] == 200.0 and fig["mfu"] == 0.2
    assert fig["peak_mem_gib"] == 51.0  # the peak of every step, warm-up included
    assert fig["peak_reserved_gib"] == 60.0  # what the caching allocator held
    world.cfg = replace(world.cfg, peak_tflops=0.0)  # and no known peak for "cpu"
    assert distar.measure_steps(world, cpu, 400e12)["mfu"] is None
    out = capsys.readouterr().out
    assert ("seconds per step 2, images per second per GPU 1, peak memory 51.0 GiB allocated, "
            "60.0 GiB reserved, 200 TFLOPS") in out
    assert "MFU 20.0%" in out and "MFU unknown peak: pass --peak_tflops" in out


def test_peak_memory_on_a_gpu_is_the_allocators_peak_allocated_or_reserved(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 40 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 48 * 2**30)
    gpu = torch.device("cuda", 0)
    assert (distar.peak_memory_gb(gpu), distar.peak_memory_gb(gpu, reserved=True)) == (40.0, 48.0)


@pytest.mark.parametrize("args, words", [
    (["--dry_run", "--tiny"], "different worlds"), (["--dry_run", "--resume"], "nothing to --resume"),
    (["--dry_run", "--max_steps=1"], "warm-up"), (["--dry_run", "--world_size_plan=-8"], ">= 0"),
    (["--toy", "--bench"], "--bench"), (["--tiny", "--bench", "--bench_reps=0"], "--bench"),
    (["--toy", "--compile"], "--compile is for the SDXL world"),
    (["--bench", "--bench_warmup=-1"], "--bench")])
def test_bad_dry_run_or_bench_config_is_one_line(args, words, capsys):
    assert distar.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err


@pytest.mark.xdist_group("dry")
def test_dry_run_command_line_without_a_gpu_prints_the_plan(tmp_path, monkeypatch):
    """The plan's rows and the step's FLOPs. The count itself (step_flops, ~20 s on meta at full
    size) is test_step_flops_on_meta_equal_the_flops_of_real_tensors': here it gets the
    full-size world, in fp32 without checkpointing, at batch 2, and its numbers are printed."""
    asked = []

    def step_flops(world, batch_size):
        asked.append((world.latent_shape, world.cfg.precision, world.cfg.grad_checkpointing,
                      world.s_ref.device.type, batch_size))
        return dict(assistant=54.2e12, generator=170.4e12)

    monkeypatch.setattr(distar, "step_flops", step_flops)
    p = run_here("--dry_run", "--world_size_plan=8", "--fsdp", f"--out_dir={tmp_path / 'o'}")
    assert asked == [((4, 128, 128), "fp32", False, "meta", 2)]
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert f"SDXL-base UNet {UNET:,} parameters" in p.stdout and f"reward CLIP-H {PICKSCORE:,}" in p.stdout
    total = (2 * UNET * 4 // 8 + 2 * UNET * 8 // 8 + UNET * 4 // 8 + UNET * 2 // 8 + PICKSCORE * 2
             + (TEXT_1 + TEXT_2 + VAE) * 4 + 2 * 3 * ROOT + 2 * 2 * BLOCK + 6 * (ROOT + BLOCK)) / GIB
    assert re.search(rf"^  total +{total:.2f}$", p.stdout, re.M), p.stdout
    assert re.search(rf"^  total on the card +{total + 1.2:.2f}$", p.stdout, re.M), p.stdout
    assert ("model FLOPs per GPU, batch 2, 1024x1024: assistant update 54.2 TFLOP, generator update "
            "170.4 TFLOP, step (5 + 1 updates) 441.4 TFLOP") in p.stdout, p.stdout
    assert "no GPU here" in p.stdout and not os.path.exists(tmp_path / "o")


BENCH_VARIANTS = {(div, ckpt) for div in ("pseudo_huber", "l2", "kl", None) for ckpt in (False, True)}


BENCH_ROWS = ({("generator", div, ckpt) for div, ckpt in BENCH_VARIANTS if div}
              | {(step, None, ckpt) for step in ("assistant", "unet_baseline") for ckpt in (False, True)})


def test_a_lora_dry_run_without_a_gpu_suggests_the_lora_run_on_one_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(distar, "SDXL", distar.TINY)  # the plan's arithmetic at tiny size: a second
    args = ["--dry_run", "--world_size_plan=1", "--resolution=64", f"--out_dir={tmp_path / 'o'}"]
    assert distar.main([*args, "--lora_rank=4"]) == 0
    assert capsys.readouterr().out.endswith(
        "on one GPU, e.g.:\n  python distar.py --prompts=prompts.txt --lora_rank=4 --batch_size=1\n")
    # full fine-tuning: on several GPUs. Its FLOP count on meta (seconds even at tiny size) is
    # test_step_flops_on_meta_equal_the_flops_of_real_tensors'
    monkeypatch.setattr(distar, "step_flops", lambda world, batch_size: dict(assistant=1, generator=1))
    assert distar.main(args) == 0
    assert "--lora_rank" not in capsys.readouterr().out.splitlines()[-1]


def test_bench_command_prints_and_writes_the_cost_table(tiny, tmp_path):
    """Every update per divergence and checkpointing, and the plain UNet update (unet_baseline),
    as ms and ratios to the KL generator update and to the baseline with the same checkpointing,
    each split into parts that add up to its time."""
    os.symlink(os.path.dirname(tiny[0]), tmp_path / "tiny")  # --tiny finds its models there, builds none
    r = run_here("--tiny", "--bench", "--bench_reps=2", "--bench_warmup=0", f"--out_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    lines = re.findall(r"^(generator|assistant|unet_baseline) +(\S+) +(on|off) +([\d.]+) +([\d.]+)x "
                       r"+([\d.]+)x +[\d.]+$", r.stdout, re.M)
    assert {(step, div if div != "-" else None, ck == "on") for step, div, ck, *_ in lines} == BENCH_ROWS
    parts = re.findall(r"^(generator|assistant|unet_baseline) +(\S+) +(on|off)((?: +[\d.]+){9})$",
                       r.stdout, re.M)
    assert {(step, div if div != "-" else None, ck == "on") for step, div, ck, _ in parts} == BENCH_ROWS
    bench = json.load(open(tmp_path / "bench.json"))
    rows, names = bench["rows"], bench["parts"]
    assert sorted(r["step"] for r in rows) == ["assistant"] * 2 + ["generator"] * 6 + ["unet_baseline"] * 2
    assert {(r["step"], r["divergence"], r["grad_checkpointing"]) for r in rows} == BENCH_ROWS
    kl = next(r for r in rows if r["divergence"] == "kl" and not r["grad_checkpointing"])
    assert kl["ratio"] == 1.0 and "over the KL generator update with checkpointing off" in r.stdout
    unet = {r["grad_checkpointing"]: r["ms"] for r in rows if r["step"] == "unet_baseline"}
    ran = {"generator": set(names), "assistant": {"text", "g fwd", "psi", "optim", "other"},
           "unet_baseline": {"text", "psi", "optim", "other"}}  # psi: the baseline's UNet is psi's
    for row in rows:  # medians of the timed repetitions, as ratios to the KL step and the baseline
        reps = 2 * 3 if row["step"] == "assistant" else 2  # the assistant's: from every divergence
        assert len(row["ms_reps"]) == reps and row["ms"] == pytest.approx(np.median(row["ms_reps"]))
        assert row["ratio"] == pytest.approx(row["ms"] / kl["ms"]) and row["ms"] > 0
        assert row["ratio_unet_baseline"] == pytest.approx(row["ms"] / unet[row["grad_checkpointing"]])
        for ms, split in zip(row["ms_reps"], row["parts_ms_reps"], strict=True):
            assert list(split) == names and sum(split.values()) == pytest.approx(ms)
            assert {p for p, v in split.items() if v > 0} == ran[row["step"]], (row, split)
        assert row["parts_ms"] == {p: pytest.approx(np.median([s[p] for s in row["parts_ms_reps"]]))
                                   for p in names}
    assert all(r["ratio_unet_baseline"] == 1.0 for r in rows if r["step"] == "unet_baseline")
    assert sorted(os.listdir(tmp_path)) == ["bench.json", "tiny"]  # no checkpoint, metrics or samples
    assert not re.search(r"^step \d+/", r.stdout, re.M)  # nor a log line per timed step


def test_unet_baseline_is_one_plain_eps_mse_update_of_a_unet(tiny):
    """The yardstick: prompts, one UNet call with grad on a B-batch of latents at the resolution,
    the eps-MSE, its backward into the UNet's weights only, clipping and an AdamW step."""
    world = _sdxl_world(tiny, "--resolution=128")
    opt = distar.make_optimizer(world.cfg, world.assistant.parameters(), 1e-3)
    calls, before = [], _state(world.assistant)
    for name, net in (("g", world.generator), ("psi", world.assistant), ("ref", world.s_ref)):
        net.register_forward_pre_hook(lambda m, args, name=name: calls.append(
            (name, tuple(args[0].shape), torch.is_grad_enabled())))
    world.vae.register_forward_pre_hook(lambda *_: calls.append("vae"))
    grad_norm, skipped = distar.unet_baseline_update(world, opt, 3)
    assert calls == [("psi", (3, 4, 16, 16), True)] and not skipped and grad_norm > 0
    assert all(p.grad is None for p in world.generator.parameters())
    after = _state(world.assistant)
    assert all(not torch.equal(after[k], before[k]) for k in ("conv_in.weight", "conv_out.weight"))


def test_bench_parts_put_each_forward_and_backward_where_it_runs(tiny, monkeypatch):
    """A nap in one net's forward or backward lands in that net's part, in the update where it
    runs (the generator's backward only in the generator update, the reference's and the
    reward's only there), and the parts add up to train's own time of each update. The clock is
    a fake one that only the naps move: exact, whatever else runs on the machine."""
    now, nap = [0.0], 1.0

    def sleep(seconds):
        now[0] += seconds

    monkeypatch.setattr(distar, "clock", lambda device: now[0])  # the PartTimer's and train's
    world = _sdxl_world(tiny, "--assistant_steps=1")  # --cfg=in, pseudo-Huber

    class NapBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            sleep(nap)
            return grad

    def napping(fn, forward, backward):
        def f(*args, **kwargs):
            sleep(nap if forward else 0)
            out = fn(*args, **kwargs)
            if backward and torch.is_grad_enabled():
                if isinstance(out, tuple):  # one nap for the call
                    return NapBackward.apply(out[0]), *out[1:]
                return NapBackward.apply(out)
            return out
        return f

    for name, forward, backward in [("sample_cond", True, False), ("generate", True, True),
                                    ("eps_psi", False, True), ("eps_ref_both", False, True),
                                    ("decode", False, True), ("reward", True, False)]:
        monkeypatch.setattr(world, name, napping(getattr(world, name), forward, backward))
    monkeypatch.setattr(distar, "clip_and_step", napping(distar.clip_and_step, True, False))
    # and three in "other": diffuse's forward, x_t's backward (after the nets' backward), and the
    # divergence's (before the nets' backward, after the reward term's)
    diffuse_napping = napping(distar.diffuse, True, False)

    def diffuse(world, x0):
        t, x_t, *rest = diffuse_napping(world, x0)
        return t, NapBackward.apply(x_t) if x_t.requires_grad else x_t, *rest

    monkeypatch.setattr(distar, "diffuse", diffuse)
    monkeypatch.setattr(distar, "score_divergence_loss", napping(distar.score_divergence_loss, False, True))
    opts = [distar.make_optimizer(world.cfg, n.parameters(), 0.0)
            for n in (world.generator, world.assistant)]
    timer = distar.PartTimer(torch.device("cpu"))
    with timer.install(world):
        (m,) = distar.train(world, *opts, (0, 1, torch.device("cpu")), range(1))
    naps = {"assistant": {"text": 1, "g fwd": 1, "psi": 1, "optim": 1, "other": 1},  # g: no backward
            "generator": {"text": 1, "g fwd": 1, "g bwd": 1, "psi": 1, "ref": 1, "vae": 1, "reward": 1,
                          "optim": 1, "other": 3}}
    for (step, expect), parts in zip(naps.items(), timer.phases):
        assert sum(parts.values()) == m[f"sec_{step}"] == sum(expect.values()) * nap
        for part in distar.PART_NAMES:
            assert parts.get(part, 0.0) == expect.get(part, 0) * nap, (step, part, parts)
    assert distar.clip_and_step.__name__ == "f" and "eps_ref" not in vars(world)  # unwrapped again


def test_bench_runs_every_variant_and_leaves_the_world_as_it_was(tiny, tmp_path, monkeypatch, capsys):
    """Each variant reaches the losses with its own divergence and checkpointing (a timed step is
    one assistant and one generator update); one that runs out of GPU memory (l2 and KL without
    checkpointing, here) is reported and the others go on, as ratios to KL with checkpointing on
    when KL without it has no time; lr 0 leaves the weights as they were."""
    world = _sdxl_world(tiny, "--bench", "--bench_reps=2", "--bench_warmup=0", f"--out_dir={tmp_path}")
    cfg, nets = world.cfg, (world.generator, world.assistant, world.s_ref, world.vae)
    before = {k: _state(m) for k, m in (("g", world.generator), ("psi", world.assistant))}
    seen = []  # (divergence, checkpointing on each net) as the loss functions see them

    def spy(fn, divergence):
        def wrapped(world, *args):
            seen.append((divergence(world), tuple(m.is_gradient_checkpointing for m in nets)))
            if seen[-1] in (("l2", (False,) * 4), ("kl", (False,) * 4)):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return fn(world, *args)
        return wrapped

    monkeypatch.setattr(distar, "generator_loss", spy(distar.generator_loss, lambda w: w.cfg.divergence))
    monkeypatch.setattr(distar, "assistant_loss", spy(distar.assistant_loss, lambda w: None))
    baseline = []  # checkpointing on each net as the baseline sees it; out of memory without it

    def baseline_spy(world, *args):
        baseline.append(tuple(m.is_gradient_checkpointing for m in nets))
        if baseline[-1] == (False,) * 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return unet_baseline_update(world, *args)

    unet_baseline_update = distar.unet_baseline_update
    monkeypatch.setattr(distar, "unet_baseline_update", baseline_spy)
    rows = distar.bench(world, (0, 1, torch.device("cpu")))
    assert len(seen) == 2 * 6 + 2 * 4 and len(rows) == 10  # out of memory once, then left out
    assert {(div, ckpt[0]) for div, ckpt in seen} == BENCH_VARIANTS
    assert all(len(set(ckpt)) == 1 for _, ckpt in seen)  # all four nets toggled together
    assert baseline == [(False,) * 4, (True,) * 4, (True,) * 4]
    out = capsys.readouterr().out
    assert re.search(r"^generator +l2 +off +out of memory +- +- +0.00$", out, re.M), out
    assert re.search(r"^generator +pseudo_huber +off +[\d.]+ +[\d.]+x +- +[\d.]+$", out, re.M), out
    assert re.search(r"^generator +pseudo_huber +on +[\d.]+ +[\d.]+x +[\d.]+x +[\d.]+$", out, re.M), out
    assert re.search(r"^unet_baseline +- +off +out of memory$", out, re.M), out
    assert "/ KL gen: over the KL generator update with checkpointing on" in out
    oom = [(r["step"], r["divergence"], r["grad_checkpointing"]) for r in rows if r["ms"] is None]
    assert oom == [("generator", "l2", False), ("generator", "kl", False), ("unet_baseline", None, False)]
    assert all(r["ratio_unet_baseline"] is None for r in rows if not r["grad_checkpointing"])
    kl_on = next(r for r in rows if r["divergence"] == "kl" and r["grad_checkpointing"])
    assert all(r["ratio"] is None if r["ms"] is None else r["ratio"] == pytest.approx(r["ms"] / kl_on["ms"])
               for r in rows) and kl_on["ratio"] == 1.0
    assert world.cfg is cfg and not any(m.is_gradient_checkpointing for m in nets)
    for name, net in (("g", world.generator), ("psi", world.assistant)):
        assert all(torch.equal(v, before[name][k]) for k, v in _state(net).items()), name
        assert all(p.requires_grad and p.grad is None for p in net.parameters()), name


def test_grad_checkpointing_toggle_recomputes_in_backward(tiny):
    """With checkpointing on, every net on the gradient path runs its blocks again in backward;
    nets run under no_grad (the generator in the assistant step) do not."""
    world = _sdxl_world(tiny)  # --cfg=in: one reference pass, of [c; empty]
    blocks = dict(g=world.generator.down_blocks[0].resnets[0], psi=world.assistant.down_blocks[0].resnets[0],
                  ref=world.s_ref.down_blocks[0].resnets[0], vae=world.vae.decoder.up_blocks[0].resnets[0])
    calls = dict.fromkeys(blocks, 0)
    for k, m in blocks.items():  # a pre-hook: torch's recompute stops early, before a block's end
        m.register_forward_pre_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))

    def count(step):  # forward calls of each block in one step of train, loss and backward
        calls.update(dict.fromkeys(calls, 0))
        cond = world.sample_cond(2)
        if step == "generator":  # pseudo-Huber: back-propagates through every UNet and the VAE
            world.assistant.requires_grad_(False)
            distar.generator_loss(world, world.generator, cond)[0].backward()
            world.assistant.requires_grad_(True)
        else:
            distar.assistant_loss(world, world.assistant, cond).backward()
        return dict(calls)

    for on, k in ((False, 1), (True, 2), (False, 1)):
        world.set_grad_checkpointing(on)
        assert count("generator") == dict(g=k, psi=k, ref=k, vae=k)
        assert count("assistant") == dict(g=1, psi=k, ref=0, vae=0)


def test_bench_refuses_torchrun_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun: refused before anything is built
    assert distar.main(["--tiny", "--bench", "--out_dir=/nonexistent/never"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distar: error: --bench") and err.count("\n") == 1


# -----------------------------------------------------------------------------
# speed options, opt-in: --compile (regional, in place; with checkpointing and DDP, eager's
# numbers) and --fast_backends (on only when asked, restored after)


def _compile_counter():
    """aot_eager (dynamo and AOTAutograd, the parts that meet checkpointing and DDP; no inductor
    C++ build, which takes ~30 s per graph on 2 CPU cores), counting the graphs it compiles."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    return CompileCounterWithBackend("aot_eager")


@pytest.mark.xdist_group("compile")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit, imported by dynamo
def test_compile_compiles_each_unets_transformer_blocks_in_place_and_only_when_asked(tiny):
    for on in (False, True):
        world = _sdxl_world(tiny, *(["--compile"] if on else []))
        keys = lambda: [list(net.state_dict()) for net in (world.generator, world.assistant, world.s_ref)]
        before = keys()
        assert distar.maybe_compile(world) is world
        nets = dict(g=world.generator, psi=world.assistant, ref=world.s_ref, vae=world.vae,
                    reward=world.reward_fn.model)
        compiled = {n: sorted({type(m).__name__ for m in net.modules() if m._compiled_call_impl})
                    for n, net in nets.items()}
        blocks = ["BasicTransformerBlock"] if on else []
        assert compiled == dict(g=blocks, psi=blocks, ref=blocks, vae=[], reward=[]), compiled
        assert keys() == before
    assert not distar.parse_args([]).compile and not distar.parse_args(["--dry_run"]).compile


@pytest.mark.xdist_group("compile")
@pytest.mark.parametrize("lora", [[], LORA_ARGS], ids=["full", "lora"])
def test_compiled_training_matches_eager_over_two_steps_with_checkpointing(tiny, lora):
    """Two steps of train (--cfg=in, pseudo-Huber, checkpointing on), compiled and eager, from the
    same weights and seeds: the same losses and weights (also with LoRA adapters in the blocks)."""
    results = {}
    for on in (False, True):
        torch.manual_seed(0)  # the same perturbed generator in both runs
        world = _sdxl_world(tiny, "--grad_checkpointing", "--assistant_steps=1", "--log_interval=1",
                            *lora, *(["--compile"] if on else []))
        start = _state(world.generator)
        counter = _compile_counter()
        distar.maybe_compile(world, backend=counter)
        opts = [distar.make_optimizer(world.cfg, distar.trained(n), 1e-3)
                for n in (world.generator, world.assistant)]
        torch.manual_seed(1)
        history = distar.train(world, *opts, (0, 1, torch.device("cpu")), range(2))
        results[on] = ([(m["loss_g"], m["loss_psi"], m["loss_div"]) for m in history],
                       _state(world.generator), counter.frame_count)
        assert any(not torch.equal(v, start[k]) for k, v in results[on][1].items())  # trained
    torch._dynamo.reset()
    (eager, w_eager, n_eager), (comp, w_comp, n_comp) = results[False], results[True]
    assert n_eager == 0 and n_comp > 0  # the compiled blocks ran
    assert np.allclose(eager, comp, rtol=1e-4, atol=1e-6), (eager, comp)
    assert all(torch.allclose(w_eager[k], w_comp[k], rtol=1e-4, atol=1e-6) for k in w_eager)


@pytest.mark.xdist_group("compile")
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_ddp_or_fsdp_over_compiled_checkpointed_blocks_gives_eagers_gradient(tiny, tmp_path, wrapper):
    """train's order: blocks compiled in place, then DDP around the UNet or fully_shard per block
    and root (one gloo rank here), activation checkpointing on: the generator's gradient is eager's."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    world = _sdxl_world(tiny, "--grad_checkpointing", "--compile")
    cond, z = world.sample_cond(2), torch.randn(2, *world.latent_shape)

    def grad(net):
        world.generate(net, cond, z).square().mean().backward()
        full = lambda g: g.full_tensor() if hasattr(g, "full_tensor") else g  # FSDP: DTensors
        out = torch.cat([full(p.grad).flatten() for p in world.generator.parameters()])
        world.generator.zero_grad(set_to_none=True)
        return out

    eager = grad(world.generator)
    counter = _compile_counter()
    distar.maybe_compile(world, backend=counter)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        if wrapper == "ddp":
            compiled = grad(DDP(world.generator, gradient_as_bucket_view=True))
        else:
            world.cfg = replace(world.cfg, fsdp=True)
            distar.shard_nets(world, (0, 1, torch.device("cpu")))
            nets = (world.generator, world.assistant, world.s_ref)
            assert all(distar.is_sharded(n) for n in nets)  # the root, and one unit per block:
            assert all(distar.is_sharded(m) for n in nets for m in n.modules()
                       if type(m).__name__ in ("BasicTransformerBlock", "ResnetBlock2D"))
            assert distar.data_parallel(world.generator, 2) is world.generator  # no DDP around it
            compiled = grad(world.generator)
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()
    assert counter.frame_count > 0
    assert (compiled - eager).norm() <= 1e-5 * eager.norm() and eager.norm() > 0


def test_fast_backends_is_opt_in_and_restores_every_setting(monkeypatch):
    """TF32 matmuls, cudnn.benchmark and cuDNN attention first while a run is inside it (main
    runs under it); nothing changes without the flag, and all is as before afterwards."""
    from torch.nn.attention import SDPBackend

    def state():  # TF32 as the legacy API reads it (inductor's autotuning, flex attention do)
        return (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision(),
                torch.backends.cudnn.benchmark, SDPBackend(torch._C._get_sdp_priority_order()[0]))

    before = state()
    assert before[:3] == (False, "highest", False)  # torch's defaults
    assert before[3] != SDPBackend.CUDNN_ATTENTION
    seen = []
    monkeypatch.setattr(distar, "run_toy", lambda cfg, dist_info: seen.append(
        (*state(), torch.backends.cuda.matmul.fp32_precision)))  # and as the new API reads it
    assert distar.main(["--toy"]) == 0 and distar.main(["--toy", "--fast_backends"]) == 0
    assert seen == [(*before, "none"), (True, "high", True, SDPBackend.CUDNN_ATTENTION, "tf32")]
    assert state() == before and not distar.parse_args([]).fast_backends


# -----------------------------------------------------------------------------
# the toy's evaluation and pictures: the energy distance's closed form; each sample at its pixel,
# in its class colour


def test_energy_distance_is_the_unbiased_u_statistic():
    """x = {(0,0), (3,4)}, y = {(0,0), (6,8)}: 2 mean|x - y| = 10, the within-sample means over
    distinct pairs are 5 and 10, so -5 (a V-statistic, dividing by n^2, gives 2.5). Unbiased:
    two samples of one distribution average 0, as the reference row of Table 2 shows."""
    x, y = torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0], [6.0, 8.0]])
    assert distar.energy_distance(x, y) == pytest.approx(-5.0)


def test_toy_scatter_png_puts_each_class_sample_at_its_pixel_in_its_colour(tmp_path):
    from safetensors.torch import save_file

    ckpt = tmp_path / "out_toy" / "checkpoint-000004"
    (ckpt / "generator").mkdir(parents=True)
    net = distar.ToyNet(3, use_t=False)
    with torch.no_grad():  # every sample at (1, -1): a known pixel in each panel takes the class colour
        net.net[-1].weight.zero_()
        net.net[-1].bias.copy_(torch.tensor([1.0, -1.0]))
    save_file(net.state_dict(), str(ckpt / "generator" / "model.safetensors"))
    (ckpt / "state.json").write_text(json.dumps({"step": 4, "config": {"toy": True, "max_steps": 4}}))
    assert sample.main([f"--generator={ckpt / 'generator'}", f"--out_dir={tmp_path / 'o'}"]) == 0
    with Image.open(tmp_path / "o" / "toy_samples.png") as im:
        assert im.format == "PNG"
        im.verify()
    # the run's folder or the checkpoint's: the same generator (not an SDXL pipeline from the hub)
    for gen in (tmp_path / "out_toy", ckpt):
        assert sample.main([f"--generator={gen}", f"--out_dir={tmp_path / 'again'}"]) == 0
        assert ((tmp_path / "again" / "toy_samples.png").read_bytes()
                == (tmp_path / "o" / "toy_samples.png").read_bytes())
    im = Image.open(tmp_path / "o" / "toy_samples.png").convert("RGB")
    assert im.size == (3 * 320, 320 + 32)
    colours = [(214, 39, 40), (31, 119, 180), (44, 160, 44)]
    x, y = (1 + 3.2) / 6.4 * 320, (3.2 + 1) / 6.4 * 320 + 32  # save_toy_png's mapping of (1, -1)
    assert [im.getpixel((round(k * 320 + x), round(y))) for k in range(3)] == colours


# -----------------------------------------------------------------------------
# Table 2 in the toy (--toy --ablation): the metrics against closed forms, each row's plumbing


def _f64_world(means, std=0.3):
    world = distar.ToyWorld(means, std=std, dtype=f64)
    world.cfg = distar.parse_args(["--toy"])
    return world


def test_tilt_temperature_minimises_the_toy_kl_objective():
    """For one Gaussian mode, the KL objective -alpha E[r] + E_t[(sigma_t / D) KL(p_t || q_t)] over
    shifts delta of q is minimised at alpha scale s^2 / beta. KL from torch.distributions, the
    minimum by Newton's method in float64: an independent route to beta."""
    from torch.distributions import MultivariateNormal, kl_divergence

    world = _f64_world([[(0.7, -0.2)]])
    cfg, s, alpha, scale = world.cfg, world.std, 100.0, world.reward_scale
    ab = world.alphas_cumprod[cfg.t_min:cfg.t_max + 1]
    a, sig = ab.sqrt(), (1 - ab).sqrt()
    m = world.means[0, 0]
    cov = ((a**2 * s**2 + sig**2)[:, None, None] * torch.eye(2, dtype=f64))  # (T, 2, 2)

    def J(delta):
        shifted = m + delta * torch.tensor([1.0, 0.0], dtype=f64)
        kl = kl_divergence(MultivariateNormal(a[:, None] * shifted, cov),
                           MultivariateNormal(a[:, None] * m, cov))
        return -alpha * scale * (shifted[0]) + (sig * kl).mean() / 2

    delta = torch.zeros((), dtype=f64, requires_grad=True)
    for _ in range(3):  # J is quadratic in delta: Newton is exact after one step
        g, = torch.autograd.grad(J(delta), delta, create_graph=True)
        h, = torch.autograd.grad(g, delta)
        delta = (delta - g / h).detach().requires_grad_()
    assert math.isclose(delta.item(), alpha * scale * s**2 / distar.tilt_temperature(world), rel_tol=1e-9)


def test_tilted_reference_is_q_times_exp_reward_over_beta():
    """Mean and second moment of x[0], and the mean of x[1], of the closed-form tilted mixture
    against numerical integration of q(x) exp(alpha r(x) / beta) on a fine grid, float64."""
    world = _f64_world([[(-0.6, 0.0), (0.6, 0.0)], [(-1.0, 1.0), (0.5, -0.5)]])
    alpha = 100.0
    lam = alpha * world.reward_scale / distar.tilt_temperature(world)
    means, w = distar.tilted_reference(world, alpha)
    assert torch.allclose(w.sum(-1), torch.ones(2, dtype=f64))
    g = torch.linspace(-5, 5, 2001, dtype=f64)
    X, Y = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([X.flatten(), Y.flatten()], 1)  # (N, 2)
    s2 = world.std**2
    for k in range(2):
        q = torch.exp(-((pts[:, None] - world.means[k]) ** 2).sum(-1) / (2 * s2)).mean(1)  # equal weights
        p = q * torch.exp(lam * pts[:, 0])
        p = p / p.sum()
        ex, ex2, ey = (p * pts[:, 0]).sum(), (p * pts[:, 0] ** 2).sum(), (p * pts[:, 1]).sum()
        cx, cy = means[k, :, 0], means[k, :, 1]
        assert math.isclose(ex.item(), (w[k] * cx).sum().item(), abs_tol=1e-8)
        assert math.isclose(ex2.item(), (w[k] * (cx**2 + s2)).sum().item(), abs_tol=1e-8)
        assert math.isclose(ey.item(), (w[k] * cy).sum().item(), abs_tol=1e-8)
    assert w[0, 1] > 0.95  # the reward does favour the right-hand mode strongly at alpha_rew 100


def test_toy_metrics_give_the_known_coverage_shares_and_distances_of_known_samples():
    torch.manual_seed(0)
    world = distar.make_toy_world()
    world.cfg = distar.parse_args(["--toy"])
    n = 2000
    ref = world.sample_ref(n)
    same = distar.toy_metrics(world, world.sample_ref(n), ref, 0.0)
    assert same["coverage"] == 1.0 and abs(same["right_share"] - 0.5) < 0.03
    assert abs(same["ed_ref"]) < 0.01 and abs(same["ed_tilted"]) < 0.01
    assert abs(same["reward"]) < 0.02e-3 * 100
    right = world.means[:, 1:]  # only each class's right-hand mode, weight 1
    one = distar.sample_mixture(right, torch.ones(3, 1), world.std, n)
    m = distar.toy_metrics(world, one, ref, 0.0)
    assert m["coverage"] == 0.5 and m["right_share"] > 0.97 and m["ed_ref"] > 0.1
    assert math.isclose(m["reward"], world.reward_scale * right[..., 0].mean().item(), abs_tol=2e-5)
    # both modes, but pushed 1.5 (5 std) off the reference's support: nearest-mode shares stay
    # 50/50, coverage drops to zero
    off = world.sample_ref(n) + torch.tensor([0.0, 1.5])
    m = distar.toy_metrics(world, off, ref, 0.0)
    assert m["coverage"] == 0.0 and abs(m["right_share"] - 0.5) < 0.03
    tilted = distar.sample_mixture(*distar.tilted_reference(world, 100.0), world.std, n)
    t = distar.toy_metrics(world, tilted, ref, 100.0)
    assert abs(t["ed_tilted"]) < 0.01 and t["ed_ref"] > 0.1 and t["right_share"] > 0.95


# the paper's rows, as the paper describes them (not read from TABLE2): divergence, alpha_rew,
# and where CFG enters: None (no CFG), "ref" (the reference is s_u + omega (s_c - s_u)) or
# "reward" (Theorem 3.2's implicit reward), with its strength alpha_cfg
PAPER_ROWS = {"KL, no reward, no CFG": ("kl", 0, None, 0),
              "KL, reward, no CFG [extra]": ("kl", 100, None, 0),
              "DI*, reward, no CFG [extra]": ("pseudo_huber", 100, None, 0),
              "Diff-Instruct (KL, CFG)": ("kl", 0, "ref", 7.5),
              "DI++ (KL, reward, CFG)": ("kl", 100, "ref", 7.5),
              "DI*-Out (choice 1)": ("pseudo_huber", 100, "reward", 7.5),
              "DI*, no reward, no CFG": ("pseudo_huber", 0, None, 0),
              "SIM (score div., CFG)": ("pseudo_huber", 0, "ref", 7.5),
              "DI*-In, alpha_rew 1": ("pseudo_huber", 1, "ref", 7.5),
              "DI*-In, alpha_rew 10": ("pseudo_huber", 10, "ref", 7.5),
              "DI*-In, alpha_cfg 4.5": ("pseudo_huber", 100, "ref", 4.5),
              "DI*-In (choice 2)": ("pseudo_huber", 100, "ref", 7.5)}


@pytest.mark.parametrize("name", list(PAPER_ROWS))
def test_each_ablation_row_selects_its_losses(name, monkeypatch):
    """Run generator_loss with each row's flags, spying on the loss functions it calls; the reward
    enters through a leaf u, so d loss / d u per sample is -alpha_rew / B."""
    div, alpha_rew, guidance, alpha_cfg = PAPER_ROWS[name]
    values = dict(distar.TABLE2)[name]
    calls = []
    for fn in ("kl_loss", "score_divergence_loss", "cfg_reward_loss", "cfg_score"):
        real = getattr(distar, fn)
        def spy(*a, _f=fn, _real=real, **k):
            out = _real(*a, **k)
            calls.append((_f, a, out))
            return out
        monkeypatch.setattr(distar, fn, spy)
    cfg = distar.row_config(distar.parse_args(["--toy"]), values)
    world = distar.make_toy_world()
    world.cfg = cfg
    B = 16
    u = torch.zeros(B, requires_grad=True)
    real_reward = world.reward
    world.reward = lambda x0, cond: real_reward(x0, cond) + u
    loss, terms = distar.generator_loss(world, world.generator, world.sample_cond(B))
    du, = torch.autograd.grad(loss, u, allow_unused=True, materialize_grads=True)
    assert torch.allclose(du, torch.full((B,), -alpha_rew / B))
    names = [c[0] for c in calls]
    if div == "kl":
        assert "kl_loss" in names and "score_divergence_loss" not in names
    else:
        assert "kl_loss" not in names and [c[1][4] for c in calls if c[0] == "score_divergence_loss"] == [div]
    scales = {c[1][2] for c in calls if c[0] == "cfg_score"}  # omega of the CFG-enhanced reference
    assert scales == ({1 + alpha_cfg} if guidance == "ref" else set())
    implicit = [c[2] for c in calls if c[0] == "cfg_reward_loss"]  # Theorem 3.2's term, per sample
    assert len(implicit) == (guidance == "reward")
    expected = alpha_cfg * implicit[0].mean() if implicit else torch.zeros(())
    assert torch.allclose(terms["loss_cfg"], expected)
    assert set(PAPER_ROWS) == {n for n, _ in distar.TABLE2}  # no row missing, none extra


def test_ablation_command_writes_every_row_to_the_table_json_picture_and_checkpoints(tmp_path):
    p = run_here("--toy", "--ablation", "--max_steps=3", f"--out_dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    table = p.stdout[p.stdout.index("Table 2 in the toy"):]
    for name in ["reference q", "tilted reference", *PAPER_ROWS]:
        assert name in table
    result = json.loads((tmp_path / "ablation.json").read_text())
    assert [r["name"] for r in result["rows"][2:]] == [name for name, _ in distar.TABLE2]
    flags = "--divergence=pseudo_huber --alpha_rew=100 --alpha_cfg=7.5 --cfg=out"  # the command line
    assert result["rows"][6]["name"] == "DI*-Out (choice 1)" and result["rows"][6]["flags"] == flags
    assert result["steps"] == 3
    for r in result["rows"]:
        assert 0 <= r["coverage"] <= 1 and 0 <= r["right_share"] <= 1 and math.isfinite(r["ed_tilted"])
    with Image.open(tmp_path / "ablation.png") as im:
        assert im.size == (5 * 260, 3 * (260 + 32))  # 14 panels, 5 per line
    for i in range(len(PAPER_ROWS)):  # each row's generator is a loadable checkpoint
        ckpt = tmp_path / "ablation" / f"row{i + 1:02d}" / "checkpoint-000003"
        assert (ckpt / "generator" / "model.safetensors").exists()


# -----------------------------------------------------------------------------
# LoRA (--lora_rank): frozen bases, fp32 adapters trained through the same loss and loop, saved so
# that diffusers' load_lora_weights reproduces the generator


def _adapters_and_bases(net):
    """Copies of a net's trainable (adapter) and frozen (base) weights, by name."""
    named = list(net.named_parameters())
    return ({k: p.detach().clone() for k, p in named if p.requires_grad},
            {k: p.detach().clone() for k, p in named if not p.requires_grad})


@pytest.mark.xdist_group("dry")
@pytest.mark.parametrize("targets, params", [("attn", 92_897_280), ("attn_ff", 170_229_760),
                                             ("all", 196_751_360)])
def test_lora_rank_64_adapts_the_sdxl_layers_dmd2_and_lcm_lora_adapt(targets, params, request):
    """On the full-size UNet (meta): rank 64 on the attention projections, plus the transformer
    blocks' proj_in/out and feed-forward, plus the resnets, samplers and time embedding (DMD2's
    and LCM-LoRA's 14-kind list), by hand: sum over adapted layers of 64 (fan_in + fan_out)."""
    from diffusers import UNet2DConditionModel

    if targets == "all":  # the default: the dry run's LoRA generator, adapted by add_lora as here
        unet = request.getfixturevalue("dry_lora_world").generator
    else:
        cfg = distar.parse_args(["--dry_run", "--lora_rank=64", f"--lora_targets={targets}"])
        with torch.device("meta"):
            unet = UNet2DConditionModel(**distar.SDXL["unet"])
        distar.add_lora(unet, cfg, "generator")
    assert sum(p.numel() for p in distar.trained(unet)) == params
    assert all(".lora_" in k for k, p in unet.named_parameters() if p.requires_grad)
    assert sum(p.numel() for p in unet.parameters() if not p.requires_grad) == UNET


@pytest.mark.xdist_group("dry")
def test_lora_memory_plan_on_one_gpu_is_the_hand_computation_within_26_gib(dry_lora_world):
    """python distar.py --dry_run --lora_rank=64 --world_size_plan=1: fp32 adapters, their AdamW
    states and one net's gradients; three frozen bf16 UNet bases (generator, assistant, reference);
    the rest as in full fine-tuning."""
    world = dry_lora_world
    A = 196_751_360  # one net's adapter
    expect = [2 * A * 4, 2 * (2 * A * 4), A * 4, 2 * UNET * 2, UNET * 2, (TEXT_1 + TEXT_2) * 4,
              PICKSCORE * 2, VAE * 4]
    plan = distar.memory_plan(world, 1, False)
    assert [b for _, b in plan] == expect
    assert plan[0][0] == "generator + assistant adapters (float32 masters)"
    assert sum(expect) / GIB < 26  # 24.67


def test_lora_nets_are_frozen_bf16_bases_with_fp32_adapters_equal_to_the_bases_at_first(tiny):
    sdxl, reward = tiny
    cfg = distar.parse_args(["--tiny", f"--pretrained={sdxl}", "--generator_init=",
                             f"--reward_model={reward}", f"--reward_processor={reward}",
                             "--precision=bf16", *LORA_ARGS])
    world = distar.SDXLWorld(cfg, torch.device("cpu"))
    for net in (world.generator, world.assistant):
        adapters, bases = _adapters_and_bases(net)
        assert adapters and all(v.dtype == torch.float32 for v in adapters.values())
        assert all(v.dtype == torch.bfloat16 for v in bases.values())
        assert len(bases) == len(list(world.s_ref.parameters()))  # a whole UNet each
        scales = {m.scaling["default"] for m in net.modules() if hasattr(m, "scaling")}
        assert scales == {2 / 4}  # LORA_ARGS: each adapter's output scaled by alpha / rank
    cond = world.sample_cond(2)
    x_t, t = torch.randn(2, *world.latent_shape), torch.tensor([100, 700])
    with torch.no_grad():  # lora_B starts at zero: the assistant is the reference, exactly
        assert torch.equal(world.eps_psi(world.assistant, x_t, t, cond), world.eps_ref(x_t, t, cond))


def _dmd2_like_world(tiny, state_dicts, *args):
    """A tiny world whose generator starts from a UNet unlike the reference (as DMD2's)."""
    sdxl, reward = tiny
    cfg = distar.parse_args(["--tiny", f"--pretrained={sdxl}",
                             f"--generator_init={state_dicts[0] / 'folder'}",
                             f"--reward_model={reward}", f"--reward_processor={reward}", *args])
    return distar.SDXLWorld(cfg, torch.device("cpu"))


@pytest.mark.xdist_group("state_dicts")
def test_lora_world_computes_full_fine_tunings_losses_until_the_adapters_move(tiny, state_dicts):
    """One generator_loss and one loop: a LoRA world whose adapters are still zero computes, from
    the same draws, the losses and x_0-gradients of full fine-tuning, to the last bit."""
    lora, full = _dmd2_like_world(tiny, state_dicts, *LORA_ARGS), _dmd2_like_world(tiny, state_dicts)
    out = {}
    for name, world in (("lora", lora), ("full", full)):
        torch.manual_seed(0)
        loss_psi = distar.assistant_loss(world, world.assistant, world.sample_cond(2))
        loss_g, terms = distar.generator_backward(world, world.generator, world.sample_cond(2))
        out[name] = (loss_psi, loss_g, terms)
    (a_psi, a_g, a_terms), (b_psi, b_g, b_terms) = out["lora"], out["full"]
    assert torch.equal(a_psi, b_psi) and torch.equal(a_g, b_g)
    assert all(torch.equal(a_terms[k], b_terms[k]) for k in b_terms)
    assert a_terms["x0grad_rew"] > 0 and a_terms["x0grad_div"] > 0


@pytest.mark.xdist_group("state_dicts")
def test_lora_training_moves_both_adapters_and_not_one_base_weight(tiny, state_dicts, tmp_path):
    """Each adapter gets its gradient (the generator's from the reward and the divergence, the
    assistant's from DSM); the generator phase freezes psi's adapter and nothing else comes
    unfrozen after it (requires_grad_(True) on a peft UNet would unfreeze its base)."""
    world = _dmd2_like_world(tiny, state_dicts, *LORA_ARGS, "--max_steps=2", "--assistant_steps=1",
                        "--lr_g=1e-3", "--lr_psi=1e-3", f"--out_dir={tmp_path}")
    before = {n: _adapters_and_bases(getattr(world, n)) for n in ("generator", "assistant")}
    lora_B = lambda net: [p for k, p in net.named_parameters() if ".lora_B." in k]  # A's: 0 at first
    distar.generator_backward(world, world.generator, world.sample_cond(2))
    assert all(p.grad.abs().sum() > 0 for p in lora_B(world.generator))
    assert all(p.grad is None for p in world.assistant.parameters())  # psi's weights frozen ...
    assert {k for k, p in world.assistant.named_parameters() if p.requires_grad} == set(
        before["assistant"][0])  # ... for the step only, and its base stays frozen
    world.generator.zero_grad(set_to_none=True)
    distar.assistant_loss(world, world.assistant, world.sample_cond(2)).backward()
    assert all(p.grad.abs().sum() > 0 for p in lora_B(world.assistant))
    world.assistant.zero_grad(set_to_none=True)
    history = distar.fit(world.cfg, world, (0, 1, torch.device("cpu")))
    assert history[-1]["x0grad_rew"] > 0 and history[-1]["x0grad_div"] > 0
    for name in ("generator", "assistant"):
        adapters, bases = _adapters_and_bases(getattr(world, name))
        assert bases.keys() == before[name][1].keys()
        assert all(torch.equal(bases[k], v) for k, v in before[name][1].items()), name
        assert all(not torch.equal(adapters[k], v) for k, v in before[name][0].items()), name


def test_a_lora_checkpoint_is_the_generator_for_diffusers_load_lora_weights(tiny, tmp_path):
    """checkpoint-N/generator/ holds the adapter in diffusers' LoRA format with its config (alpha),
    and the base it adapts; StableDiffusionXLPipeline.load_lora_weights on that base gives the very
    generator distar trained. The 14 layer kinds mix attention and other keys, which diffusers'
    attention-only key conversion would make the loader drop."""
    from diffusers import StableDiffusionXLPipeline

    sdxl, reward = tiny
    cfg = distar.parse_args(["--tiny", f"--pretrained={sdxl}", "--generator_init=",
                             f"--reward_model={reward}", f"--reward_processor={reward}", *LORA_ARGS,
                             "--max_steps=1", "--assistant_steps=1", f"--out_dir={tmp_path}"])
    world = distar.SDXLWorld(cfg, torch.device("cpu"))
    with torch.no_grad():  # adapters far from zero, so that a lost alpha or layer shows
        for p in distar.trained(world.generator):
            p.normal_(0, 0.1)
    distar.fit(cfg, world, (0, 1, torch.device("cpu")))
    folder = tmp_path / "checkpoint-000001" / "generator"
    assert sorted(os.listdir(folder)) == ["lora_base.json", "pytorch_lora_weights.safetensors"]
    assert json.loads((folder / "lora_base.json").read_text()) == dict(
        pretrained=os.path.abspath(sdxl), generator_init="", variant="")
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    pipe.load_lora_weights(folder)
    x, t = torch.randn(2, *world.latent_shape), torch.tensor([399, 399])
    cond = world.sample_cond(2)
    with torch.no_grad():
        ours = world.unet(world.generator, x, t, cond)
        theirs = world.unet(pipe.unet, x, t, cond)
        plain = world.unet(world.s_ref, x, t, cond)  # the base alone
    assert (ours - plain).abs().max() > 0.05
    assert (theirs - ours).abs().max() < 1e-5, (theirs - ours).abs().max()


# -----------------------------------------------------------------------------
# sample.py: the diffusers LCM one-step pipeline's pixels, scores with prompt-bootstrap intervals,
# side-by-side comparisons, every generator format, one-line errors


def run_sample(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), *args], cwd=HERE,
                          env=ENV, capture_output=True, text=True, timeout=timeout)


def pngs(out_dir, n):
    assert sorted(f for f in os.listdir(out_dir) if f.endswith(".png")) == [f"{i:03d}.png" for i in range(n)]
    return np.stack([np.asarray(Image.open(os.path.join(out_dir, f"{i:03d}.png")).convert("RGB"))
                     for i in range(n)])


def lcm_one_step(sdxl, batches, seed, unet=None, loras=()):
    """diffusers' own 1-step LCM sampling at t=399, with LoRAs by its load_lora_weights (all
    active); batch b seeded with seed + b -> (N, 64, 64, 3) in [0, 1]."""
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl, **({"unet": unet} if unet is not None else {}))
    for i, lora in enumerate(loras):
        pipe.load_lora_weights(lora, adapter_name=f"l{i}")
    if loras:  # a LoRA loaded after another is the only one active
        pipe.set_adapters([f"l{i}" for i in range(len(loras))])
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = [pipe(prompt=p, num_inference_steps=1, timesteps=[399], guidance_scale=0, height=64, width=64,
                generator=torch.Generator("cpu").manual_seed(seed + b), output_type="np").images
           for b, p in enumerate(batches)]
    return np.concatenate(out)


@pytest.mark.xdist_group("sample_cli")
def test_sample_equals_the_diffusers_lcm_one_step_pipeline(tiny, tmp_path):
    sdxl, _ = tiny
    out = tmp_path / "s3"
    r = run_sample(f"--pretrained={sdxl}", "--prompt=a cat", "--images_per_prompt=3", "--batch_size=2",
                   "--seed=3", "--resolution=64", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no warnings, no progress bars
    got = pngs(out, 3) / 255
    expect = lcm_one_step(sdxl, [["a cat", "a cat"], ["a cat"]], seed=3)  # batch 1 uses seed 4
    assert np.abs(got - expect).max() <= 1 / 255 + 1e-6
    assert got.std() > 0.05 and np.abs(got[0] - got[1]).mean() > 0.01  # not blank; one noise per image
    # another seed, other images
    assert sample.main([f"--pretrained={sdxl}", "--prompt=a cat", "--seed=4", "--resolution=64",
                        f"--out_dir={tmp_path / 's4'}"]) == 0
    assert np.abs(pngs(tmp_path / "s4", 1)[0] / 255 - got[0]).mean() > 0.01


def test_generator_flag_replaces_the_unet(tiny, tmp_path):
    from diffusers import UNet2DConditionModel

    sdxl, _ = tiny
    torch.manual_seed(123)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(sdxl, subfolder="unet"))
    unet.save_pretrained(tmp_path / "unet")
    args = ["--prompt=a dog", "--images_per_prompt=2", "--batch_size=2", "--seed=7", "--resolution=64"]
    runs = {}
    for name, extra in (("default", []), ("gen", [f"--generator={tmp_path / 'unet'}"]),
                        ("pipe", [f"--generator={sdxl}"])):  # a pipeline folder: its unet/
        assert sample.main([f"--pretrained={sdxl}", *args, *extra, f"--out_dir={tmp_path / name}"]) == 0
        runs[name] = pngs(tmp_path / name, 2) / 255
    assert np.abs(runs["gen"] - runs["default"]).mean() > 0.01
    expect = lcm_one_step(sdxl, [["a dog", "a dog"]], 7, unet=unet)
    assert np.abs(runs["gen"] - expect).max() <= 1 / 255 + 1e-6
    assert np.array_equal(runs["pipe"], runs["default"])


@pytest.mark.xdist_group("state_dicts")
def test_sample_from_state_dict_files_equals_sample_from_the_folder(tiny, state_dicts, tmp_path):
    sdxl, _ = tiny
    tmp, _ = state_dicts
    from diffusers import StableDiffusionXLPipeline

    # --variant names --pretrained's weight files too: the same fp32 tiny pipeline, files *.fp16.*
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    pipe.save_pretrained(tmp_path / "sdxl16", variant="fp16")
    args = ["--prompt=a dog", "--images_per_prompt=2", "--seed=2", "--resolution=64"]
    runs = {}
    st = tmp / "release" / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    for name, gen in (("folder", [f"--generator={tmp / 'folder'}"]),
                      ("bin", [f"--generator={tmp / 'dmd2_sdxl_1step_unet_fp16.bin'}"]),
                      ("st", [f"--generator={st}"]),
                      ("variant", [f"--generator={tmp / 'release'}", "--variant=fp16"])):
        pretrained = tmp_path / "sdxl16" if name == "variant" else sdxl
        assert sample.main([f"--pretrained={pretrained}", *args, *gen,
                            f"--out_dir={tmp_path / name}"]) == 0
        runs[name] = pngs(tmp_path / name, 2)
    # the same fp32 weights (fp16 values) in every form: the same computation, the same pixels
    for name in ("bin", "st", "variant"):
        assert np.array_equal(runs[name], runs["folder"]), name
    assert sample.main([f"--pretrained={sdxl}", *args, f"--out_dir={tmp_path / 'base'}"]) == 0
    assert np.abs(pngs(tmp_path / "base", 2) / 255 - runs["folder"] / 255).mean() > 0.01


def test_a_variant_only_pipeline_loads_only_with_variant(tiny, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    sdxl, _ = tiny
    StableDiffusionXLPipeline.from_pretrained(sdxl).save_pretrained(tmp_path / "fp16only", variant="fp16")
    args = [f"--pretrained={tmp_path / 'fp16only'}", "--prompt=a cat", "--resolution=64"]
    assert sample.main([*args, f"--out_dir={tmp_path / 'no'}"]) == 2  # no plain weight files
    assert capsys.readouterr().err.startswith("sample: error: cannot load --pretrained=")
    assert not (tmp_path / "no").exists()
    assert sample.main([*args, "--variant=fp16", f"--out_dir={tmp_path / 'yes'}"]) == 0
    assert Image.open(tmp_path / "yes" / "000.png").size == (64, 64)


def test_cluster_bootstrap_gives_the_normal_interval_for_one_image_per_prompt():
    x = np.random.default_rng(1).normal(0.22, 0.01, size=(400, 1))  # 400 prompts, one image each
    se = x.std() / math.sqrt(400)  # the bootstrap resamples the sample itself: population sd
    for ci, z in ((0.95, 1.959964), (0.90, 1.644854)):
        mean, lo, hi = sample.cluster_bootstrap(x, n_boot=20000, ci=ci, seed=0)
        assert abs(mean - x.mean()) < 1e-15
        assert abs((hi - lo) / 2 / (z * se) - 1) < 0.03  # Monte-Carlo error ~0.5%; 90% vs 95% is 16%
        assert abs((lo + hi) / 2 - mean) < 0.1 * se


def test_cluster_bootstrap_resamples_prompts_not_images():
    m = np.random.default_rng(2).normal(size=(300, 1))
    # four identical images per prompt carry no more information than one: the interval must not
    # shrink (resampling the 1200 images independently would halve it)
    got = sample.cluster_bootstrap(np.repeat(m, 4, axis=1), 2000, seed=5)
    assert np.allclose(got, sample.cluster_bootstrap(m, 2000, seed=5), rtol=0, atol=1e-12)
    assert abs((got[2] - got[1]) / 2 / (1.959964 * m.std() / math.sqrt(300)) - 1) < 0.08
    # per-prompt means are what is resampled: noise that averages out within prompts changes nothing
    noise = np.random.default_rng(3).normal(size=(300, 4))
    noise -= noise.mean(1, keepdims=True)
    assert np.allclose(sample.cluster_bootstrap(m + noise, 2000, seed=5), got, rtol=0, atol=1e-12)


def test_cluster_bootstrap_is_exact_for_constants_seeded_and_open_for_one_prompt():
    assert sample.cluster_bootstrap(np.full((50, 3), 0.25)) == (0.25, 0.25, 0.25)
    x = np.random.default_rng(4).normal(size=(50, 3))
    assert sample.cluster_bootstrap(x, seed=1) == sample.cluster_bootstrap(x, seed=1)
    assert sample.cluster_bootstrap(x, seed=1) != sample.cluster_bootstrap(x, seed=2)
    assert sample.cluster_bootstrap(x[:1]) == (x[0].mean(), None, None)  # one prompt: nothing to resample


def printed_table(stdout):
    """sample.py's table (a header of metrics, a row per generator, then its CI line) -> ({label:
    {metric: (mean, lo, hi)}}, the CI line)."""
    lines = stdout.splitlines()
    end = next(i for i, line in enumerate(lines) if re.match(r"[\d.]+% CI, ", line))
    top = max(i for i in range(end) if lines[i].startswith(" "))
    metrics = re.split(r"  +", lines[top].strip())
    cell = lambda c: tuple(float(v) for v in re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", c).groups())
    rows = [re.split(r"  +", line) for line in lines[top + 1:end]]
    return {r[0]: dict(zip(metrics, map(cell, r[1:]))) for r in rows}, lines[end]


def test_score_writes_pickscore_clip_score_and_prompt_bootstrap_intervals(tiny, tmp_path, capsys):
    sdxl, reward = tiny
    prompts = ["a cat", "a dog", "a red cab"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n\n")
    out = tmp_path / "out"
    # batch 0 holds prompt 0, prompt 1 and half of prompt 2: images are matched to prompts by order
    assert sample.main([f"--pretrained={sdxl}", f"--prompts={tmp_path / 'p.txt'}", "--images_per_prompt=2",
                        "--batch_size=4", "--score", f"--reward_model={reward}",
                        f"--reward_processor={reward}", f"--clip_model={reward}", "--resolution=64",
                        f"--out_dir={out}"]) == 0
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [(r["image"], r["prompt_index"], r["prompt"], r["seed"]) for r in rows] == \
        [(f"{i:03d}.png", i // 2, prompts[i // 2], i // 4) for i in range(6)]
    pick, clip = np.array([r["pickscore"] for r in rows]), np.array([r["clip_score"] for r in rows])
    # independently: distar.ClipReward on the PNGs as written
    r = distar.ClipReward(reward, reward)
    images = torch.from_numpy(pngs(out, 6)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        expect = r(images, r.text_features([p for p in prompts for _ in range(2)])).numpy()
    assert expect.std() > 1e-2 and (expect > 0).any() and (expect < 0).any()  # so the checks below have power
    assert np.allclose(pick, expect, atol=1e-5)
    assert np.allclose(clip, 100 * np.maximum(expect, 0), atol=1e-3)  # the same CLIP here: CLIP score's scale
    summary = json.loads((out / "scores.json").read_text())
    table, ci = printed_table(capsys.readouterr().out)
    (label,) = table  # one row: the generator, here --pretrained's UNet
    assert label.endswith("sdxl") and ci == "95% CI, 3 prompts, 6 images (2 per prompt)"
    for metric, s in (("pickscore", pick), ("clip_score", clip)):
        mean, lo, hi = sample.cluster_bootstrap(s.reshape(3, 2), 1000, 0.95, 0)  # prompts are the rows
        assert summary[metric] == dict(mean=mean, lo=lo, hi=hi)
        assert abs(mean - s.mean()) < 1e-12 and lo < mean < hi
        assert np.allclose(table[label][metric], [mean, lo, hi], rtol=1e-3, atol=1e-6)


@pytest.fixture(scope="module")
def compare_runs(tiny, tmp_path_factory):
    """3 prompts x 2 images, batches of 4 (one crosses prompts), grids of 2 rows: the tiny UNet
    against itself (a pipeline folder: its unet/), against a perturbed copy, and the copy alone."""
    import contextlib
    import io

    from diffusers import UNet2DConditionModel

    sdxl, reward = tiny
    tmp = tmp_path_factory.mktemp("compare")
    unet = UNet2DConditionModel.from_pretrained(sdxl, subfolder="unet")
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(5)
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unet.save_pretrained(tmp / "unet_b")
    (tmp / "p.txt").write_text("a cat\na dog\na red cab\n")
    args = [f"--pretrained={sdxl}", f"--prompts={tmp / 'p.txt'}", "--images_per_prompt=2", "--batch_size=4",
            "--resolution=64", "--grid_rows=2"]
    score = ["--score", f"--reward_model={reward}", f"--reward_processor={reward}", f"--clip_model={reward}"]
    for name, extra in (("self", [f"--compare={sdxl}", *score]),
                        ("ab", [f"--compare={tmp / 'unet_b'}", *score]),
                        ("b", [f"--generator={tmp / 'unet_b'}"])):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert sample.main([*args, *extra, f"--out_dir={tmp / name}"]) == 0
        (tmp / f"{name}.txt").write_text(out.getvalue())
    return tmp


def grid_cells(path, k=2, cell=64):
    """compare_*.png -> (A, B) cells, each (rows * k, cell, cell, 3), by sample.py's layout."""
    g = np.asarray(Image.open(path).convert("RGB"))
    rows = (g.shape[0] - sample.HEADER) // cell
    assert g.shape == (sample.HEADER + rows * cell, 2 * k * cell + sample.GAP, 3)
    ys = [sample.HEADER + r * cell for r in range(rows)]
    cut = lambda x0: np.stack([g[y:y + cell, x0 + j * cell:x0 + (j + 1) * cell]
                               for y in ys for j in range(k)])
    return cut(0), cut(k * cell + sample.GAP)


@pytest.mark.xdist_group("compare")
def test_compare_a_generator_with_itself_gives_identical_halves_and_zero_difference(compare_runs):
    out = compare_runs / "self"
    a, b = pngs(out / "a", 6), pngs(out / "b", 6)
    assert np.array_equal(a, b) and a.std() > 10  # not blank
    grids = sorted(f for f in os.listdir(out) if f.startswith("compare"))
    assert grids == ["compare_000.png", "compare_001.png"]
    (a0, b0), (a1, b1) = grid_cells(out / "compare_000.png"), grid_cells(out / "compare_001.png")
    assert len(a0) == 4 and len(a1) == 2  # 2 prompts, then the last one
    assert np.array_equal(np.concatenate([a0, a1]), a) and np.array_equal(np.concatenate([b0, b1]), b)
    summary = json.loads((out / "scores.json").read_text())
    for metric in ("pickscore", "clip_score"):
        assert summary[metric]["b_minus_a"] == dict(mean=0, lo=0, hi=0)
        a_stats, b_stats = summary[metric]["a"], summary[metric]["b"]
        assert a_stats == b_stats and a_stats["hi"] > a_stats["lo"]


@pytest.mark.xdist_group("compare")
def test_compare_two_generators_uses_the_same_prompts_and_seeds(compare_runs):
    out = compare_runs / "ab"
    a, b = pngs(out / "a", 6), pngs(out / "b", 6)
    assert np.array_equal(a, pngs(compare_runs / "self" / "a", 6))  # A untouched by the swap to B
    assert np.array_equal(b, pngs(compare_runs / "b", 6))  # B as if sampled alone, same seeds
    assert np.abs(a / 255 - b / 255).mean() > 0.01
    cells = [grid_cells(out / f"compare_00{g}.png") for g in (0, 1)]
    assert np.array_equal(np.concatenate([c[0] for c in cells]), a)
    assert np.array_equal(np.concatenate([c[1] for c in cells]), b)
    # the difference B - A is paired: per image pair, prompts resampled jointly
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    summary = json.loads((out / "scores.json").read_text())
    for metric in ("pickscore", "clip_score"):
        S = {g: np.array([r[metric] for r in rows if r["generator"] == g]).reshape(3, 2) for g in "ab"}
        mean, lo, hi = sample.cluster_bootstrap(S["b"] - S["a"], 1000, 0.95, 0)
        assert summary[metric]["b_minus_a"] == dict(mean=mean, lo=lo, hi=hi)
        assert mean != 0 and abs(mean - (S["b"].mean() - S["a"].mean())) < 1e-12
    assert [r["image"] for r in rows if r["generator"] == "b"] == [f"b/{i:03d}.png" for i in range(6)]
    printed = (compare_runs / "ab.txt").read_text()  # 6 images of each generator, not 6 in all
    assert "wrote 6 images per generator to" in printed
    table, ci = printed_table(printed)  # a row per generator and the difference, a column per metric
    assert list(table) == ["A", "B", "B-A"] and ci == "95% CI, 3 prompts, 6 images per generator (2 per prompt)"
    for metric in ("pickscore", "clip_score"):
        for label, sub in (("A", "a"), ("B", "b"), ("B-A", "b_minus_a")):
            assert np.allclose(table[label][metric], list(summary[metric][sub].values()), rtol=1e-3, atol=1e-6)


# the paper's metrics: FID as GigaGAN's evaluation and clean-fid score COCO (golden numbers from
# .ci/eval_golden/fid_official.py, run with the official code), the Parti/HPSv2 prompt sets, the table

def fid_folders(root):
    """fid_official.py's: noise PNGs of 10 sizes per folder, image 0 97 x 144 (a 23.5 px margin)."""
    rng, files = np.random.default_rng(31), {}
    for name, low in (("real", 0), ("fake", 60)):
        for i in range(10):
            h, w = (97, 144) if i == 0 else rng.integers(90, 200, 2)
            (root / name).mkdir(parents=True, exist_ok=True)
            files.setdefault(name, []).append(root / name / f"{i:02d}.png")
            Image.fromarray(rng.integers(low, 256, (h, w, 3), dtype=np.uint8)).save(files[name][-1])
    return files


class TinyInception(torch.nn.Module):
    """fid_official.py's extractor (numpy's weights) as NVIDIA's torchscript is called: .layers on
    (x - 128) / 128 -> (B, 8)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(13), torch.nn.Flatten(),
                                          torch.nn.Linear(3 * 13 * 13, 8))
        w = np.random.default_rng(32).normal(0, 0.05, (8, 3 * 13 * 13)).astype(np.float32)
        with torch.no_grad():
            self.layers[2].weight.copy_(torch.from_numpy(w))
            self.layers[2].bias.copy_(torch.linspace(-1, 1, 8))

    def forward(self, x):
        return self.layers((x - 128) / 128)


@pytest.fixture(scope="module")
def fid_files(tmp_path_factory):
    """(fid_folders' {real, fake: [PNG]}, a torchscript file of TinyInception)."""
    import warnings

    tmp = tmp_path_factory.mktemp("fid")
    with warnings.catch_warnings():  # torch.jit is deprecated, but NVIDIA's Inception is one
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(TinyInception(), torch.zeros(1, 3, 299, 299)).save(tmp / "inception.pt")
    return fid_folders(tmp), tmp / "inception.pt"


def fid_oracle(a, b):
    """FID of feature rows a, b: np.cov and the eigenvalues of the non-symmetric S_a S_b (as
    torchmetrics), not sample.py's sums and symmetric root."""
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.sqrt(np.linalg.eigvals(sa @ sb).astype(complex)).real.sum()
    return ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * root


# clean-fid's Inception input for image 0 (sum, sum of squares, pixel (150, 7)) and the FID
GOLDEN_FID = {256: (34305770.06304492, 5496652618.377134,
                    [61.028743743896484, 205.11521911621094, 84.62406158447266], 0.8204400967783237),
              64: (34311773.42375995, 4750824663.948706,
                   [124.44550323486328, 143.15821838378906, 171.51470947265625], 0.8355429705566303)}


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_fid_equals_clean_fid_with_gigagans_transform(fid_files, tmp_path):
    """clean-fid 0.1.35's compute_fid with GigaGAN's centre crop and Lanczos resize, at eval_res 256
    and 64: Inception's input pixels (torchvision's rounding of the crop: 24 px, not 23) and the FID
    of the two folders, through load_fid's reading of --fid_ref and --inception."""
    files, inception = fid_files
    for res, (total, squares, pixel, fid) in GOLDEN_FID.items():
        x = sample.fid_pixels(Image.open(files["real"][0]), res).astype(np.float64)
        assert x.shape == (3, 299, 299) and np.allclose(x[:, 150, 7], pixel, rtol=0, atol=1e-9)
        assert np.allclose([x.sum(), (x ** 2).sum()], [total, squares], rtol=1e-12, atol=0)
        cfg = sample.parse_args(["--metrics=fid", f"--fid_ref={files['real'][0].parent}",
                                 f"--inception={inception}", f"--eval_res={res}",
                                 f"--out_dir={tmp_path / str(res)}"])
        net, (mu, sigma, n) = sample.load_fid(cfg, "cpu", 10)
        fake = sample.FidStats(net, res, "cpu")
        fake.add([Image.open(f) for f in files["fake"]])
        assert n == 10 and abs(sample.frechet_distance(*fake.mean_cov(), mu, sigma) / fid - 1) < 1e-6


def test_frechet_distance_is_float64_exact_against_closed_forms_and_an_independent_computation():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 6)), rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6)) + 0.3
    got = sample.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert got > 1 and abs(got / fid_oracle(a, b) - 1) < 1e-12
    # a Gaussian and its shift by delta: the same covariance, FID = |delta|^2
    delta = np.array([0.5, -1, 0, 2, 0, 0.1])
    s = np.cov(a, rowvar=False)
    assert abs(sample.frechet_distance(a.mean(0), s, a.mean(0) + delta, s) - (delta ** 2).sum()) < 1e-12
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    va, vb = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expect = 1.0 + ((np.sqrt(va) - np.sqrt(vb)) ** 2).sum()
    assert abs(sample.frechet_distance(np.zeros(6), np.diag(va), np.eye(6)[0], np.diag(vb)) - expect) < 1e-12


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_sample_metrics_per_category_with_a_paper_metric_and_fid(tiny, fid_files, tmp_path, monkeypatch,
                                                                 capsys):
    """--metrics: a paper metric (a stand-in in PAPER_METRICS) loaded once with CLIP score's CLIP,
    scoring batches of PIL images with their prompts, per Parti category; FID of the PNGs against
    the real folder equals an independent float64 computation, its saved statistics give the same
    FID, and a reference folder of the very images gives 0."""
    from transformers import CLIPModel

    sdxl, reward = tiny
    files, inception = fid_files
    loads, batches = [], []

    def load_stand_in(cfg, device, clip=None):
        loads.append(clip)

        def scorer(images, prompts):
            batches.append(len(images))
            assert all(im.mode == "RGB" for im in images) and len(prompts) == len(images)
            return torch.tensor([np.asarray(im).mean() + len(p) for im, p in zip(images, prompts)])
        return scorer

    monkeypatch.setattr(sample, "PAPER_METRICS", {"aesthetic": load_stand_in})
    prompts = ['"cat" on a mat', "a dog", "a red cab", "a tree", "a cow"]
    (tmp_path / "p.tsv").write_text("Prompt\tCategory\tChallenge\tNote\n" + "".join(
        f"{p}\t{'AB'[i % 2]}\tBasic\t\n" for i, p in enumerate(prompts)))
    args = [f"--pretrained={sdxl}", f"--prompts={tmp_path / 'p.tsv'}", "--images_per_prompt=2",
            "--batch_size=4", "--resolution=64", f"--inception={inception}", f"--clip_model={reward}"]
    out, real = tmp_path / "o", files["real"][0].parent
    assert sample.main([*args, "--metrics=aesthetic,fid", f"--fid_ref={real}", f"--out_dir={out}"]) == 0
    assert len(loads) == 1 and isinstance(loads[0][0], CLIPModel) and batches == [4, 4, 2]
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    images = pngs(out, 10)
    assert [r["category"] for r in rows] == [c for c in "ABABA" for _ in range(2)]
    assert np.allclose([r["aesthetic"] for r in rows],
                       [im.mean() + len(p) for im, p in zip(images, [p for p in prompts for _ in "12"])])
    summary = json.loads((out / "scores.json").read_text())
    S = np.array([r["aesthetic"] for r in rows]).reshape(5, 2)
    for cat, idx in (("A", [0, 2, 4]), ("B", [1, 3])):
        assert summary["categories"][cat]["aesthetic"] == dict(zip(("mean", "lo", "hi"),
                                                               sample.cluster_bootstrap(S[idx])))
    printed = capsys.readouterr().out
    table, ci = printed_table(printed)  # a row for all prompts, then one per category
    assert list(table)[1:] == ["A", "B"] and ci == "95% CI, 5 prompts, 10 images (2 per prompt)"
    # FID: the same pixels, TinyInception, np.cov and a non-symmetric eigensolver
    feats = lambda ims: TinyInception()(torch.from_numpy(np.stack(
        [sample.fid_pixels(im, 256) for im in ims]))).detach().double().numpy()
    expect = fid_oracle(feats([Image.fromarray(im) for im in images]), feats(map(Image.open, files["real"])))
    assert summary["fid"]["n_images"] == 10 and abs(summary["fid"]["value"] / expect - 1) < 1e-9
    assert re.search(r"^FID  \S+ \S+  \(10 images at 256 px against 10 real ones; fewer than", printed, re.M)
    for name, ref in (("saved", out / "fid_ref_256.npz"), ("same", out)):  # out: the PNGs, a .npz, .json
        assert sample.main([*args, "--metrics=fid", f"--fid_ref={ref}", f"--out_dir={tmp_path / name}"]) == 0
        fid = json.loads((tmp_path / name / "scores.json").read_text())["fid"]["value"]
        assert fid == summary["fid"]["value"] if name == "saved" else abs(fid) < 1e-9


def test_prompt_sets_parti_tsv_hpsv2_json_folder_and_coco_lines(tmp_path):
    (tmp_path / "p.tsv").write_text('Prompt\tCategory\tChallenge\tNote\n"G" on a wall\tArts\tBasic\t\n'
                                    "a cat\tAnimals\tBasic\tnote\n")
    assert sample.read_prompt_set(str(tmp_path / "p.tsv")) == (['"G" on a wall', "a cat"], ["Arts", "Animals"])
    (tmp_path / "hps").mkdir()
    for style, ps in (("photo", ["a", "b"]), ("anime", ["c"])):
        (tmp_path / "hps" / f"{style}.json").write_text(json.dumps(ps))
    assert sample.read_prompt_set(str(tmp_path / "hps")) == (["c", "a", "b"], ["anime", "photo", "photo"])
    (tmp_path / "coco.txt").write_text("a man on a horse\n\nA bus.\n")
    assert sample.read_prompt_set(str(tmp_path / "coco.txt")) == (["a man on a horse", "A bus."], None)
    parti = os.path.join(HERE, os.pardir, "shared", "eval_data", "PartiPrompts.tsv")
    if not os.path.isfile(parti):
        pytest.skip(f"{parti} (the real PartiPrompts.tsv) is not here")
    prompts, cats = sample.read_prompt_set(parti)
    assert len(prompts) == 1632 and len(set(cats)) == 12 and sum(p.startswith('"G I G G L E"') for p in prompts) == 1


@pytest.mark.filterwarnings("ignore:`torch.jit")
@pytest.mark.parametrize("case", ["unknown_metric", "fid_without_ref", "missing_ref", "empty_ref", "few_ref",
                                  "few_images", "offline", "not_inception", "other_eval_res", "bad_json"])
def test_bad_metric_input_is_one_line_exit_2_and_writes_nothing(tiny, fid_files, tmp_path, capsys,
                                                                monkeypatch, case):
    import urllib.error

    sdxl, _ = tiny
    files, inception = fid_files
    real = files["real"][0].parent
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    (tmp_path / "eight").mkdir()  # as many images as TinyInception has features
    for f in files["real"][:8]:
        (tmp_path / "eight" / f.name).write_bytes(f.read_bytes())
    np.savez(tmp_path / "ref.npz", mu=np.zeros(8), sigma=np.eye(8), n=10, eval_res=256)
    (tmp_path / "p.json").write_text('{"a": 1}')
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no Inception there

    def offline(url, path, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    fid = ["--metrics=fid", "--images_per_prompt=9", f"--inception={inception}"]
    args, words = {"unknown_metric": (["--metrics=pickscore,imagereward"], "--metrics: no metric imagereward"),
                   "fid_without_ref": (["--metrics=fid"], "--metrics=fid needs --fid_ref"),
                   "missing_ref": ([*fid, f"--fid_ref={tmp_path / 'nope'}"], "--fid_ref=" + str(tmp_path / "nope")),
                   "empty_ref": ([*fid, f"--fid_ref={tmp_path / 'empty'}"], "no images in it"),
                   "few_ref": ([*fid, f"--fid_ref={tmp_path / 'eight'}"], "its 8 features, for a full-rank "
                               f"covariance: {tmp_path / 'eight'} has 8"),
                   "few_images": ([*fid, f"--fid_ref={real}", "--images_per_prompt=8"], "each generator has 8"),
                   "offline": ([*fid, f"--fid_ref={real}", "--inception="], "inception-2015-12-05.pt is not "
                               "there and cannot be fetched (<urlopen error [Errno -3]"),
                   "not_inception": ([*fid, f"--fid_ref={real}", f"--inception={tmp_path / 'p.json'}"],
                                     f"cannot load --inception={tmp_path / 'p.json'}"),
                   "other_eval_res": ([*fid, f"--fid_ref={tmp_path / 'ref.npz'}", "--eval_res=512"],
                                      "not the FID statistics that sample.py saves, at --eval_res=512"),
                   "bad_json": (["--prompt=", f"--prompts={tmp_path / 'p.json'}"], "not Parti's TSV")}[case]
    out = tmp_path / "o"
    assert sample.main([f"--pretrained={sdxl}", "--prompt=a cat", "--resolution=64", f"--out_dir={out}", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sample: error: ") and err.count("\n") == 1 and words in err, err
    assert not out.exists() and not (tmp_path / "hub" / "checkpoints" / "inception-2015-12-05.pt").exists()


@pytest.mark.parametrize("case", ["missing_pretrained", "missing_generator", "missing_prompts",
                                  "empty_prompts", "missing_reward", "missing_clip", "missing_compare",
                                  "unknown_flag", "bad_value", "bad_ci", "bad_type", "bad_bool", "bad_dtype",
                                  "prompt_and_prompts", "typo_generator", "typo_compare", "not_a_pipeline",
                                  "hub_clip", "hub_reward", "hub_generator", "typo_lora", "hub_lora",
                                  "misspelled_flag", "no_generator_in_folder"])
def test_bad_sample_input_is_one_line_exit_2_and_writes_nothing(tiny, tmp_path, capsys, case):
    sdxl, reward = tiny
    (tmp_path / "empty.txt").write_text("\n  \n")
    score = ["--score", f"--reward_model={reward}", f"--reward_processor={reward}", f"--clip_model={reward}"]
    args, word = {"missing_pretrained": ([f"--pretrained={tmp_path / 'nope'}"], "--pretrained"),
                  "missing_generator": ([f"--pretrained={sdxl}", f"--generator={tmp_path / 'nope'}"],
                                        "--generator"),
                  "missing_prompts": ([f"--pretrained={sdxl}", f"--prompts={tmp_path / 'nope.txt'}"],
                                      "--prompts"),
                  "empty_prompts": ([f"--pretrained={sdxl}", f"--prompts={tmp_path / 'empty.txt'}"],
                                    "--prompts"),
                  "missing_reward": ([f"--pretrained={sdxl}", *score, f"--reward_model={tmp_path / 'nope'}"],
                                     "--reward_model"),
                  "missing_clip": ([f"--pretrained={sdxl}", *score, f"--clip_model={tmp_path / 'nope'}"],
                                   "--clip_model"),
                  "missing_compare": ([f"--pretrained={sdxl}", *score, f"--compare={tmp_path / 'nope'}"],
                                      "--compare"),
                  "unknown_flag": (["--steps=4"], "--steps"),
                  "bad_value": (["--resolution=60"], "--resolution"),
                  "bad_ci": (["--ci=95"], "--ci"),
                  "bad_type": (["--batch_size=four"], "--batch_size"),
                  "bad_bool": (["--score=maybe"], "--score"),
                  "bad_dtype": (["--dtype=fp8"], "--dtype"),
                  "prompt_and_prompts": (["--prompt=a", f"--prompts={tmp_path / 'empty.txt'}"],
                                         "--prompt"),
                  # a mistyped local path is named as typed, before the default --pretrained fails on the hub
                  "typo_generator": (["--generator=/nonexistent"],
                                     "cannot load --generator=/nonexistent: no such file or folder"),
                  "typo_compare": (["--compare=nope/checkpoint-000002/generator"],
                                   "cannot load --compare=nope/checkpoint-000002/generator: no such file"),
                  "not_a_pipeline": ([f"--pretrained={sdxl}/unet"], f"cannot load --pretrained={sdxl}/unet: "
                                     "not a diffusers pipeline folder (no model_index.json)"),
                  # off the hub: each flag's hint is a folder of its kind
                  "hub_clip": ([f"--pretrained={sdxl}", "--score"], "(--clip_model=/path/to/clip-vit-large-patch14)"),
                  "hub_reward": ([f"--pretrained={sdxl}", "--score", f"--clip_model={reward}"],
                                 "(--reward_processor=/path/to/CLIP-ViT-H-14-laion2B-s32B-b79K)"),
                  "hub_generator": ([f"--pretrained={sdxl}", "--generator=owner/unet"],
                                    "(--generator=/path/to/unet)"),
                  "typo_lora": (["--lora=./lora"], "cannot load --lora=./lora: no such file or folder"),
                  "hub_lora": ([f"--pretrained={sdxl}", "--lora=owner/lora"], "cannot load --lora=owner/lora"),
                  "misspelled_flag": (["--pretrain=x"], "arguments: --pretrain=x; did you mean --pretrained?"),
                  # a folder with neither a generator nor a checkpoint in it: what to pass, not diffusers' words
                  "no_generator_in_folder": ([f"--pretrained={sdxl}", f"--generator={tmp_path}"],
                                             "and no complete distar checkpoint: pass a checkpoint's, "
                                             "checkpoint-NNNNNN/generator")}[case]
    assert sample.main(["--resolution=64", f"--out_dir={tmp_path / 'o'}", *args]) == 2  # later flags win
    err = capsys.readouterr().err
    assert err.startswith("sample: error: ") and err.count("\n") == 1 and word in err, err
    assert not os.path.exists(tmp_path / "o")  # nothing written, not even the folder


@pytest.mark.xdist_group("sample_cli")
def test_bad_sample_command_line_has_no_traceback(tiny, tmp_path):
    import shutil

    fp16 = tmp_path / "fp16vae"  # a VAE without plain weights: diffusers logs an error, then raises
    shutil.copytree(tiny[0], fp16)
    os.rename(fp16 / "vae" / "diffusion_pytorch_model.safetensors",
              fp16 / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    for args in (["--bogus"], [f"--pretrained={tmp_path / 'nope'}", "--prompt=a"],
                 [f"--pretrained={fp16}", "--prompt=a", "--resolution=64"],
                 [f"--pretrained={tiny[0]}", "--generator=owner/unet", "--prompt=a"]):  # off the hub
        r = run_sample(*args, f"--out_dir={tmp_path / 'o'}")
        assert r.returncode == 2 and r.stdout == "", r
        assert r.stderr.startswith("sample: error: ") and r.stderr.count("\n") == 1, r.stderr
        assert "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """python distar.py --tiny --lora_rank=4: a LoRA run's checkpoint, its adapter moved far
    enough from zero (lr 0.05) to change the pictures."""
    d = tmp_path_factory.mktemp("lora_run")
    p = run_here("--tiny", *LORA_ARGS, "--max_steps=2", "--lr_g=0.05", f"--out_dir={d}")
    assert p.returncode == 0, p.stderr[-2000:]
    return d


@pytest.mark.xdist_group("tiny_runs")
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # a second adapter: wanted
def test_sample_of_a_lora_checkpoint_is_diffusers_load_lora_weights_on_its_base(lora_run, tmp_path):
    """--generator=checkpoint-N/generator finds the LoRA and its recorded base (here --pretrained's
    UNet); --lora puts a LoRA on --generator, also on a LoRA checkpoint (both then active)."""
    sdxl, folder = str(lora_run / "tiny" / "sdxl"), str(lora_run / "checkpoint-000002" / "generator")
    args = [f"--pretrained={sdxl}", "--prompt=a cat", "--images_per_prompt=2", "--seed=5",
            "--resolution=64"]
    runs = {}
    for name, extra in (("base", []), ("ckpt", [f"--generator={folder}"]), ("lora", [f"--lora={folder}"]),
                        ("twice", [f"--generator={folder}", f"--lora={folder}"])):
        assert sample.main([*args, *extra, f"--out_dir={tmp_path / name}"]) == 0
        runs[name] = pngs(tmp_path / name, 2) / 255
    for name, loras in (("ckpt", [folder]), ("twice", [folder, folder])):
        expect = lcm_one_step(sdxl, [["a cat", "a cat"]], 5, loras=loras)
        assert np.abs(runs[name] - expect).max() <= 1 / 255 + 1e-6, name
    assert np.array_equal(runs["lora"], runs["ckpt"])  # the recorded base is --pretrained's UNet
    assert np.abs(runs["ckpt"] - runs["base"]).mean() > 0.01
    assert np.abs(runs["twice"] - runs["ckpt"]).mean() > 0.01


@pytest.mark.xdist_group("tiny_runs")
def test_compare_and_score_take_lora_generators(lora_run, tmp_path, capsys):
    """A: --pretrained's UNet with --lora, B: the LoRA checkpoint: the same generator, so identical
    halves and a paired difference of exactly 0."""
    sdxl, reward = str(lora_run / "tiny" / "sdxl"), str(lora_run / "tiny" / "reward")
    folder = str(lora_run / "checkpoint-000002" / "generator")
    out = tmp_path / "cmp"
    assert sample.main([f"--pretrained={sdxl}", f"--lora={folder}", f"--compare={folder}", "--score",
                        f"--reward_model={reward}", f"--reward_processor={reward}",
                        f"--clip_model={reward}", "--images_per_prompt=2", "--resolution=64",
                        f"--out_dir={out}"]) == 0
    assert np.array_equal(pngs(out / "a", 16), pngs(out / "b", 16))
    summary = json.loads((out / "scores.json").read_text())
    assert summary["lora"] == folder and summary["pickscore"]["b_minus_a"]["mean"] == 0


@pytest.mark.xdist_group("tiny_runs")
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_a_moved_lora_run_samples_on_its_own_base_with_no_pretrained(lora_run, tmp_path, capsys):
    """lora_base.json records --tiny's models, inside the run's folder, relative to generator/, so
    the run can move: sampled from its new place, the old one gone, with no --pretrained (the VAE
    and text encoders are the run's too). Where the recorded base is not there, one line names it
    and what to pass; --pretrained then wins, as the LoRA's base too."""
    import shutil

    moved = tmp_path / "elsewhere"
    shutil.copytree(lora_run, moved)
    folder = moved / "checkpoint-000002" / "generator"
    assert json.loads((folder / "lora_base.json").read_text()) == dict(
        pretrained=os.path.join("..", "..", "tiny", "sdxl"), generator_init="", variant="")
    args = ["--prompt=a cat", "--images_per_prompt=2", "--seed=5", "--resolution=64"]
    os.rename(lora_run / "tiny", lora_run / "tiny.gone")  # the run's old place
    try:
        assert sample.main([f"--generator={moved}", *args, f"--out_dir={tmp_path / 'a'}"]) == 0
        assert capsys.readouterr().out.startswith(
            f"--generator={moved}: its newest complete checkpoint's generator, {folder}\n")
        shutil.move(moved / "tiny", tmp_path / "base")  # the base is no longer where it was recorded
        assert sample.main([f"--generator={folder}", *args, f"--out_dir={tmp_path / 'b'}"]) == 2
        assert capsys.readouterr().err == (
            f"sample: error: cannot load --generator={folder}: the --pretrained its run recorded, "
            f"{moved / 'tiny' / 'sdxl'}, is not here (moved?): name it with --pretrained=PATH, or pass "
            f"the base as --generator=BASE and this LoRA as --lora={folder}\n")
        assert sample.main([f"--pretrained={tmp_path / 'base' / 'sdxl'}", f"--generator={folder}", *args,
                            f"--out_dir={tmp_path / 'c'}"]) == 0
    finally:
        os.rename(lora_run / "tiny.gone", lora_run / "tiny")
    assert not (tmp_path / "b").exists()
    expect = lcm_one_step(str(tmp_path / "base" / "sdxl"), [["a cat", "a cat"]], 5, loras=[str(folder)])
    for name in "ac":
        assert np.abs(pngs(tmp_path / name, 2) / 255 - expect).max() <= 1 / 255 + 1e-6, name


@pytest.mark.xdist_group("tiny_runs")
def test_a_whole_unet_run_folder_samples_its_newest_checkpoint_on_the_runs_pretrained(
        trained_dir, tmp_path, capsys):
    """A run folder as --generator is its newest complete checkpoint's generator/ (said in a line),
    a checkpoint folder its generator/; with no --pretrained, the run's (state.json), not SDXL-base
    from the hub."""
    from diffusers import UNet2DConditionModel

    ckpt = trained_dir / "checkpoint-000002"
    args = ["--prompt=a cat", "--seed=5", "--resolution=64"]
    for name, gen in (("run", trained_dir), ("ckpt", ckpt)):
        assert sample.main([f"--generator={gen}", *args, f"--out_dir={tmp_path / name}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"--generator={trained_dir}: its newest complete checkpoint's generator, "
                          f"{ckpt / 'generator'}\n") and out.count("newest") == 1, out
    unet = UNet2DConditionModel.from_pretrained(ckpt / "generator")
    expect = lcm_one_step(str(trained_dir / "tiny" / "sdxl"), [["a cat"]], 5, unet=unet)
    for name in ("run", "ckpt"):
        assert np.abs(pngs(tmp_path / name, 1) / 255 - expect).max() <= 1 / 255 + 1e-6, name


@pytest.mark.xdist_group("tiny_runs")
def test_a_lora_without_its_base_record_is_one_line_naming_what_to_pass(lora_run, tmp_path, capsys):
    import shutil

    shutil.copytree(lora_run / "checkpoint-000002" / "generator", tmp_path / "lora")
    os.remove(tmp_path / "lora" / "lora_base.json")
    assert sample.main([f"--pretrained={lora_run / 'tiny' / 'sdxl'}", f"--generator={tmp_path / 'lora'}",
                        "--resolution=64", f"--out_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no lora_base.json" in err and "--lora" in err, err
    assert not os.path.exists(tmp_path / "o")

# the paper's per-image metrics against golden outputs of the official code (.ci/eval_golden: tiny
# random models in the official key formats, made by its make_golden.py in a separate venv)
GOLDEN = os.path.join(HERE, ".ci", "eval_golden")


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """The fixtures as the real files are: ImageReward.pt (a plain state dict), HPS.pt
    ({'state_dict': ...}), the aesthetic head, a CLIP-H-like tokenizer folder (pad "!", as laion's
    processor), a BERT vocab folder, and the tiny OpenAI CLIP as a CLIPModel (--clip_model)."""
    import shutil
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    g = json.load(open(os.path.join(GOLDEN, "golden.json")))
    d = tmp_path_factory.mktemp("golden")
    w = np.load(os.path.join(GOLDEN, "weights.npz"))
    sds = {}
    for k in w.files:  # fp16 on disk, exact: the official run used these values in fp32
        model, key = k.split("/", 1)
        t = torch.from_numpy(w[k])
        sds.setdefault(model, {})[key] = t.float() if t.dtype == torch.float16 else t
    torch.save(sds["image_reward"], d / "ImageReward.pt")
    torch.save({"state_dict": sds["hps"]}, d / "HPS.pt")
    torch.save(sds["aesthetic_head"], d / "aesthetic.pth")
    shutil.copy(os.path.join(GOLDEN, "ir_med_config.json"), d / "med_config.json")
    (d / "bert").mkdir()
    shutil.copy(os.path.join(GOLDEN, "ir_vocab.txt"), d / "bert" / "vocab.txt")
    CLIPTokenizer(os.path.join(GOLDEN, "clip_vocab.json"), os.path.join(GOLDEN, "clip_merges.txt"),
                  pad_token="!").save_pretrained(d / "cliph")
    clip = CLIPModel(CLIPConfig(projection_dim=16, vision_config=dict(
        hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
        hidden_act="quick_gelu"), text_config=dict(hidden_size=16, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=2, hidden_act="quick_gelu")))
    assert clip.load_state_dict(distar.open_clip_to_hf(sds["aesthetic_clip"]), strict=False).missing_keys == []
    clip.save_pretrained(d / "clip")
    cfg = sample.SampleConfig(image_reward_model=str(d / "ImageReward.pt"),
                              image_reward_config=str(d / "med_config.json"),
                              image_reward_tokenizer=str(d / "bert"), hps_model=str(d / "HPS.pt"),
                              reward_processor=str(d / "cliph"), aesthetic_head=str(d / "aesthetic.pth"),
                              clip_model=str(d / "clip"))
    images = {f: Image.open(os.path.join(GOLDEN, f)) for f in set(g["images"] + g["aesthetic_images"])}
    return g, cfg, images, sds


def _tiny_scorer_configs(monkeypatch, g):
    """The official code's fixed sizes (BLIP's ViT-L/16, open_clip's ViT-H-14) as the golden run shrank them."""
    vit, hps = g["image_reward_vit"], g["hps_config"]
    monkeypatch.setattr(sample, "IR_VISION", dict(sample.IR_VISION, hidden_size=vit["hidden"],
                        intermediate_size=4 * vit["hidden"], num_hidden_layers=vit["layers"],
                        num_attention_heads=vit["heads"]))
    v, t = hps["vision_cfg"], hps["text_cfg"]
    monkeypatch.setattr(sample, "HPS_CLIP", dict(projection_dim=hps["embed_dim"], vision_config=dict(
        sample.HPS_CLIP["vision_config"], hidden_size=v["width"], intermediate_size=4 * v["width"],
        num_hidden_layers=v["layers"], num_attention_heads=v["width"] // v["head_width"]), text_config=dict(
        sample.HPS_CLIP["text_config"], hidden_size=t["width"], intermediate_size=4 * t["width"],
        num_hidden_layers=t["layers"], num_attention_heads=t["heads"])))


def _torch_resize_pixels(images, size, long_side=False):
    """A mutant of sample.pixels: the short side resized in torch (bicubic, antialiased, as
    ClipReward), not in PIL on uint8."""
    out = []
    for im in images:
        im = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)[None].float() / 255
        h, w = im.shape[-2:]
        s = size / min(h, w)
        im = torch.nn.functional.interpolate(im, size=(int(h * s), int(w * s)), mode="bicubic", antialias=True)
        top, left = int(round((im.shape[-2] - size) / 2)), int(round((im.shape[-1] - size) / 2))
        out.append(im[0, :, top:top + size, left:left + size])
    return (torch.stack(out) - sample.CLIP_MEAN) / sample.CLIP_STD


def _scores(name, g, cfg, images, **kw):
    scorer = sample.PAPER_METRICS[name](cfg, "cpu", **kw)
    names = g["aesthetic_images"] if name == "aesthetic" else g["images"]
    return scorer([images[f] for f in names], g["prompts"][:len(names)])


@pytest.mark.parametrize("name", ["image_reward", "hps", "aesthetic"])
def test_paper_metrics_reproduce_the_official_code_and_its_mutants_do_not(golden, monkeypatch, name):
    """Each scorer gives the official implementation's number (image-reward 1.5; hpsv2x 1.2.0's
    open_clip fork, x100 as Table 3; openai-clip 1.0.1 + LAION's head) on tiny random models, from
    the official files, uint8 PIL images and prompts with "!", capitals and 120 words. A converter
    with one rename wrong, and PIL's resize replaced by torch's, each miss them."""
    g, cfg, images, _ = golden
    _tiny_scorer_configs(monkeypatch, g)
    expect = torch.tensor(g[name]) * (100 if name == "hps" else 1)
    off = lambda: (_scores(name, *golden[:3]) - expect).abs().max().item()  # noqa: E731
    tol = 1e-5 * expect.abs().max().item()  # reached: 0.0 (HPS), 5e-7 (ImageReward), 1e-7 (aesthetic)
    got = _scores(name, *golden[:3])
    assert got.shape == expect.shape and got.dtype == torch.float32
    assert (got - expect).abs().max() <= tol, (got, expect)
    swap = {"image_reward": ("IR_TO_HF", r"\.norm1\.", r"\.norm2\."),
            "hps": ("OPEN_CLIP_TO_HF", r"\.ln_1\.", r"\.ln_2\.")}.get(name)
    if swap:  # the two layer norms of every block swapped: same shapes, so only the numbers tell
        table, a, b = swap
        old = getattr(distar, table)
        monkeypatch.setattr(distar, table, [(b if k == a else a if k == b else k, v) for k, v in old])
        assert off() > 10 * tol  # 0.14 (ImageReward), 13 (HPS)
        monkeypatch.setattr(distar, table, old)
    if name != "hps":  # HPSv2 itself resizes in torch
        monkeypatch.setattr(sample, "pixels", _torch_resize_pixels)
        assert off() > 10 * tol  # 2e-3 (ImageReward), 3e-4 (aesthetic)


def test_paper_metric_tokenizers_give_the_official_token_ids(golden, monkeypatch):
    """ImageReward: BERT's ids, 35 long, [CLS] first. HPS: open_clip's ids, a "!" included, which
    the CLIP-H processor's own tokenizer (pad "!") gets wrong."""
    from transformers import AutoTokenizer

    g, cfg, _, _ = golden
    _tiny_scorer_configs(monkeypatch, g)
    tok = sample.load_image_reward(cfg, "cpu").tokenizer
    assert tok(g["prompts"], padding="max_length", truncation=True, max_length=35).input_ids == g["image_reward_ids"]
    assert sample.load_hps(cfg, "cpu").tokens(g["prompts"]).tolist() == g["hps_ids"]
    own = AutoTokenizer.from_pretrained(cfg.reward_processor)
    assert own.pad_token == "!"
    ids = own(g["prompts"], padding="max_length", truncation=True, max_length=77).input_ids
    assert [a == b for a, b in zip(ids, g["hps_ids"])] == ["!" not in p for p in g["prompts"]]


@pytest.mark.skipif(not os.path.isfile(os.path.join(HERE, "..", "shared", "eval_data",
                                                    "sac+logos+ava1-l14-linearMSE.pth")),
                    reason="the real LAION aesthetic head is in ../shared/eval_data, absent here")
def test_the_real_aesthetic_head_loads_strictly_and_gives_the_official_formula():
    """LAION's sac+logos+ava1-l14-linearMSE.pth (768-1024-128-64-16-1, no activations) on a random
    CLIP with ViT-L/14's 768-d embedding: the head is one affine map, W normalize(f) + b, computed
    here from the file's layers in float64."""
    from transformers import CLIPConfig, CLIPModel

    path = os.path.join(HERE, "..", "shared", "eval_data", "sac+logos+ava1-l14-linearMSE.pth")
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(projection_dim=768, vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=14),
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)))
    scorer = sample.load_aesthetic(sample.SampleConfig(aesthetic_head=path), "cpu", clip=clip)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((300, 200), (224, 224))]
    got = scorer(images, ["", ""])
    sd = torch.load(path, map_location="cpu", weights_only=True)
    W, b = torch.eye(768, dtype=f64), torch.zeros(768, dtype=f64)
    for i in (0, 2, 4, 6, 7):
        w = sd[f"layers.{i}.weight"].double()
        W, b = w @ W, w @ b + sd[f"layers.{i}.bias"].double()
    with torch.no_grad():
        f = clip.get_image_features(pixel_values=sample.pixels(images, 224)).pooler_output.double()
    expect = torch.nn.functional.normalize(f, dim=-1) @ W.T + b
    assert W.shape == (1, 768) and torch.allclose(got.double(), expect[:, 0], rtol=0, atol=1e-5), (got, expect)


@pytest.mark.parametrize("case", ["ir_as_hps", "hps_as_ir", "ir_as_aesthetic", "aesthetic_as_hps",
                                  "missing_key", "extra_key", "wrong_shape", "not_a_state_dict", "no_file",
                                  "hub_offline"])
def test_a_scorer_checkpoint_of_the_wrong_kind_is_one_line_naming_a_key(golden, monkeypatch, tmp_path, case):
    g, cfg, _, sds = golden
    _tiny_scorer_configs(monkeypatch, g)
    ir = dict(sds["image_reward"])
    bad = {"missing_key": {k: v for k, v in ir.items() if k != "blip.visual_encoder.blocks.1.norm2.bias"},
           "extra_key": {**ir, "blip.text_decoder.cls.bias": torch.zeros(3)},
           "wrong_shape": {**ir, "mlp.layers.7.bias": torch.zeros(2)}, "not_a_state_dict": torch.zeros(3)}
    if case in bad:
        torch.save(bad[case], tmp_path / "bad.pt")
    flag, load, path, word = {
        "ir_as_hps": ("hps_model", "hps", cfg.image_reward_model, "unexpected key blip.visual_encoder."),
        "hps_as_ir": ("image_reward_model", "image_reward", cfg.hps_model, "unexpected key state_dict"),
        "ir_as_aesthetic": ("aesthetic_head", "aesthetic", cfg.image_reward_model, "unexpected key blip."),
        "aesthetic_as_hps": ("hps_model", "hps", cfg.aesthetic_head, "unexpected key layers.0.weight"),
        "missing_key": ("image_reward_model", "image_reward", tmp_path / "bad.pt",
                        "missing key blip.vision_model.encoder.layers.1.layer_norm2.bias"),
        "extra_key": ("image_reward_model", "image_reward", tmp_path / "bad.pt", "unexpected key blip.text_decoder"),
        "wrong_shape": ("image_reward_model", "image_reward", tmp_path / "bad.pt",
                        "wrong shape mlp.layers.7.bias (2,), not (1,)"),
        "not_a_state_dict": ("image_reward_model", "image_reward", tmp_path / "bad.pt", "not a state dict"),
        "no_file": ("hps_model", "hps", tmp_path / "nope.pt", "No such file"),
        "hub_offline": ("hps_model", "hps", "xswu/HPSv2/HPS_v2.1_compressed.pt",
                        "the Hugging Face hub could not be reached and the model is not in the local cache; "
                        "pass a local folder (--hps_model=/path/to/HPS_v2.1_compressed.pt)")}[case]
    with pytest.raises(distar.LoadError) as e:
        sample.PAPER_METRICS[load](replace(cfg, **{flag: str(path)}), "cpu")
    msg = str(e.value)
    assert msg.startswith(f"cannot load --{flag}={path}: ") and "\n" not in msg and word in msg, msg


def test_a_scorer_file_on_the_hub_is_owner_repo_then_its_path_in_the_repo(golden, monkeypatch):
    import huggingface_hub

    g, cfg, _, _ = golden
    _tiny_scorer_configs(monkeypatch, g)
    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, file: asked.append((repo, file)) or {
        "ImageReward.pt": cfg.image_reward_model, "med_config.json": cfg.image_reward_config}[file.split("/")[-1]])
    sample.load_image_reward(replace(cfg, image_reward_model="THUDM/ImageReward/ImageReward.pt",
                                     image_reward_config="THUDM/ImageReward/sub/med_config.json"), "cpu")
    assert asked == [("THUDM/ImageReward", "ImageReward.pt"), ("THUDM/ImageReward", "sub/med_config.json")]


def test_dry_run_lists_each_scorers_parameters_and_memory_without_a_download(capsys):
    """At full size on meta: the counts of the official nets (open_clip's ViT-H-14 986,109,441;
    ImageReward's state dict 446,666,465 less BLIP's two 256-d projections and its position_ids;
    openai's CLIP ViT-L/14 427,616,513 + LAION's head 927,969)."""
    assert sample.main(["--dry_run"]) == 0
    out = capsys.readouterr().out
    for name, n in (("image_reward", 446_666_465 - (1024 + 768 + 2) * 256 - 512),
                    ("aesthetic", 427_616_513 + 927_969), ("hps", 986_109_441)):
        assert re.search(rf"^{name} .* {n:,d} parameters +{4 * n / 2**30:.2f} GiB$", out, re.M), out


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_every_metric_runs_from_sample_and_scores_the_pngs_it_wrote(tiny, golden, fid_files, monkeypatch,
                                                                   tmp_path, capsys):
    """All six metrics in one sample.py run on the tiny pipeline, with the golden fixtures' scorers
    (a CLIP-H-like PickScore, CLIP score's CLIP shared with the aesthetic head) and the tiny
    Inception: each image's paper metric equals its scorer's on the PNG written, in batches of 5
    and 4; the table has a column per metric, in --metrics' order, and FID its row."""
    import shutil

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    sdxl, _ = tiny
    g, cfg, _, sds = golden
    files, inception = fid_files
    _tiny_scorer_configs(monkeypatch, g)
    processor = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 224}, crop_size=224),
                              CLIPTokenizer.from_pretrained(cfg.reward_processor))
    pick = CLIPModel(CLIPConfig(**sample.HPS_CLIP))  # PickScore is a CLIP-H too: here HPS's weights
    pick.load_state_dict(distar.open_clip_to_hf(sds["hps"]), strict=False)
    pick.save_pretrained(tmp_path / "pick")
    shutil.copytree(cfg.clip_model, tmp_path / "clip")
    for path in ("pick", "clip"):
        processor.save_pretrained(tmp_path / path)
    cfg = replace(cfg, reward_model=str(tmp_path / "pick"), reward_processor=str(tmp_path / "pick"),
                  clip_model=str(tmp_path / "clip"))
    names = ["image_reward", "aesthetic", "pickscore", "clip_score", "hps"]
    flags = [f"--{f.name}={getattr(cfg, f.name)}" for f in fields(cfg) if f.name.endswith(
        ("_model", "_processor", "_config", "_tokenizer", "_head"))]
    out, prompts = tmp_path / "o", ["a red cab!", "a cat", "two dogs"]
    (tmp_path / "p.txt").write_text("\n".join(prompts))
    assert sample.main([f"--pretrained={sdxl}", f"--prompts={tmp_path / 'p.txt'}", "--images_per_prompt=3",
                        "--batch_size=5", "--resolution=64", f"--metrics={','.join(names)},fid",
                        f"--fid_ref={files['real'][0].parent}", f"--inception={inception}",
                        *flags, f"--out_dir={out}"]) == 0
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    images = [Image.open(out / f"{i:03d}.png").convert("RGB") for i in range(9)]
    for name in ("image_reward", "aesthetic", "hps"):
        expect = sample.PAPER_METRICS[name](cfg, "cpu")(images, [p for p in prompts for _ in "abc"])
        got = torch.tensor([r[name] for r in rows])
        assert expect.std() > 0 and torch.allclose(got, expect.float(), rtol=1e-4, atol=1e-5), name
    printed = capsys.readouterr().out
    table, _ = printed_table(printed)
    assert [list(cells) for cells in table.values()] == [names]
    assert json.loads((out / "scores.json").read_text())["fid"]["n_images"] == 9
    assert re.search(r"^FID  \S+ \S+  \(9 images at 256 px", printed, re.M)


# -----------------------------------------------------------------------------
# SD3/SD3.5 (--model=sd3): the flow process x_s = (1 - s) x_0 + s eps through the same losses,
# the velocity read as eps, a tiny SD3 world against diffusers' pipeline, runs, plan and counts


def test_the_exact_velocity_of_a_gaussian_mixture_converts_to_its_exact_score():
    """eps_from_velocity turns E[eps - x_0 | x_s] (posterior means, mode by mode) into -s times the
    score (the gradient of the log density) exactly, at every s; x_s + s v, a plausible slip, not."""
    world = distar.make_toy_world()
    world.means = world.means.to(f64)
    torch.manual_seed(5)
    x = torch.randn(200, 2, dtype=f64) * 2
    a, s = distar.flow_coefficients(torch.rand(200, dtype=f64) * 980 + 20)  # s in [0.02, 1)
    assert torch.allclose(a + s, torch.ones_like(s))
    for c in (torch.randint(world.K, (200,)), None):
        v, score = world.velocity(x, a, s, c), world.score(x, a, s, c)
        assert torch.allclose(-distar.eps_from_velocity(x, v, s[:, None]) / s[:, None], score,
                              atol=1e-10)
        wrong = -(x + s[:, None] * v) / s[:, None]
        assert (wrong - score).abs().max() > 0.1


@pytest.fixture(scope="module")
def flow_check():
    return {r["name"].strip(): r for r in distar.gradient_check(process="flow")}


@pytest.mark.xdist_group("flow_check")
def test_the_gradient_check_holds_under_the_flow_process_and_catches_a_wrong_conversion(
        flow_check, monkeypatch):
    for name in ("eq 3.4 pseudo-Huber (Thm 3.1)", "eq 3.4 l2 (Thm 3.1)", "kl_loss vs closed-form KL",
                 "cfg_reward_loss (Thm 3.2, sign -)", "choice 2: cfg_score reference", *GB_ROWS):
        r = flow_check[name]
        assert r["should_match"] and r["ok"] and r["tol"] < 0.05, r
    for name in ("wrong: x_t detached inside d'", "printed sign + (eqs 3.5, 3.6)",
                 "wrong: v to eps as x_s + s v", *GB_WRONG):
        r = flow_check[name]
        assert not r["should_match"] and r["ok"] and r["rel"]["all"] > 5 * r["tol"], r
    # the mutant: the reference read through a wrong conversion fails every matching row
    monkeypatch.setattr(distar, "eps_from_velocity", lambda x_s, v, s: x_s + s * v)
    bad = {r["name"].strip(): r for r in distar.gradient_check(process="flow", n=2**14)}
    assert not any(bad[name]["ok"] for name in ("eq 3.4 pseudo-Huber (Thm 3.1)", "eq 3.4 l2 (Thm 3.1)",
                                                 "kl_loss vs closed-form KL", "choice 2: cfg_score reference",
                                                 *GB_ROWS))


def test_toy_with_model_sd3_prints_the_flow_gradient_check_too(monkeypatch, capsys, tmp_path):
    calls, worlds = [], []
    monkeypatch.setattr(distar, "gradient_check", lambda **kw: calls.append(kw) or [])
    monkeypatch.setattr(distar, "fit", lambda cfg, world, *a, **k: worlds.append(type(world)) or [])
    monkeypatch.setattr(distar, "evaluate_toy", lambda *a: None)
    for model in ("sdxl", "sd3"):
        cfg = distar.parse_args(["--toy", f"--model={model}", f"--out_dir={tmp_path}"])
        distar.run_toy(cfg, (0, 1, torch.device("cpu")))
    assert calls == [{}, {}, {"process": "flow"}]
    assert worlds == [distar.ToyWorld, distar.FlowToyWorld]  # and it trains under flow
    assert "the flow process (1 - s, s)" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    """Tiny random SD3 pipelines, with T5 and without (text_encoder_3 None), and a reward (the
    one built with the pipeline without T5, which the figures in these tests were measured with)."""
    distar.quiet_libraries()
    root = str(tmp_path_factory.mktemp("tiny_sd3"))
    sd3 = distar.build_tiny(root, "sd3")[0]
    no_t5, reward = distar.build_tiny(root, "sd3", t5=False)
    return dict(sd3=sd3, no_t5=no_t5, reward=reward)


def _sd3_world(tiny_sd3, *args, t5=True):
    cfg = distar.parse_args(["--tiny", "--model=sd3", f"--pretrained={tiny_sd3['sd3' if t5 else 'no_t5']}",
                             "--generator_init=", f"--reward_model={tiny_sd3['reward']}",
                             f"--reward_processor={tiny_sd3['reward']}", f"--t5={t5}", *args])
    world = distar.SD3World(cfg, torch.device("cpu"))
    with torch.no_grad():  # a generator that differs from the reference
        for p in distar.trained(world.generator):
            p.add_(0.01 * torch.randn_like(p))
    return world


@pytest.mark.xdist_group("sd3_tiny")
@pytest.mark.parametrize("t5", [True, False])
def test_the_sd3_one_step_generator_is_diffusers_sd3_pipeline_at_one_step(tiny_sd3, t5):
    """x_0 = z - v_theta(z, 1000, c) is StableDiffusion3Pipeline(num_inference_steps=1,
    guidance_scale=0) on the same noise, latents and images, with T5 and without (zeros)."""
    from diffusers import StableDiffusion3Pipeline

    world = _sd3_world(tiny_sd3, t5=t5)
    prompts = ["a red fox", "a blue car"]
    z = torch.randn(2, *world.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x0 = world.generate(world.generator, world.encode(prompts), z)
        img = world.decode(x0)
    no_t5 = {} if t5 else dict(text_encoder_3=None, tokenizer_3=None)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3["sd3" if t5 else "no_t5"],
                                                    transformer=world.generator, **no_t5)
    pipe.set_progress_bar_config(disable=True)
    run = lambda kind: pipe(prompts, num_inference_steps=1, guidance_scale=0, latents=z.clone(), height=64,
                            width=64, output_type=kind).images
    assert world.latent_shape == (16, 8, 8) and (pipe.text_encoder_3 is None) == (not t5)
    assert torch.allclose(run("latent"), x0, atol=1e-6) and (x0 - z).abs().mean() > 0.1
    assert torch.allclose(run("pt"), img, atol=1e-6)


@pytest.mark.xdist_group("sd3_tiny")
def test_the_sd3_world_draws_logit_normal_shifted_levels_and_hands_the_loop_eps(tiny_sd3):
    """diffuse under SD3World: t = 1000 s with s = shift u / (1 + 2 u), u = sigmoid(N(0, 1)),
    clamped to [t_min, t_max]; x_t = (1 - s) x_0 + s eps; eps_psi is x_t + (1 - s) v of the net."""
    world = _sd3_world(tiny_sd3)
    torch.manual_seed(0)
    x0 = torch.randn(4000, 1, 1, 1)
    t, x_t, eps, sigma_t = distar.diffuse(world, x0)
    assert t.min() >= 20 and t.max() <= 980 and (t == 980).float().mean() < 0.01
    s = t / 1000
    u = s / (3 - 2 * s)  # the shift undone
    logit = torch.log(u / (1 - u))[(t > 20) & (t < 980)]
    assert abs(logit.mean()) < 0.06 and abs(logit.std() - 1) < 0.06  # N(0, 1) under the clamp
    assert torch.allclose(sigma_t.flatten(), s) and torch.allclose(x_t, (1 - s.view(-1, 1, 1, 1)) * x0 + sigma_t * eps)
    cond = world.encode(["a cat", "a dog"])
    x, tt = torch.randn(2, *world.latent_shape), torch.tensor([300.0, 700.0])
    with torch.no_grad():
        v = world.assistant(hidden_states=x, encoder_hidden_states=cond["embeds"],
                            pooled_projections=cond["pooled"], timestep=tt).sample
        eps_hat = world.eps_psi(world.assistant, x, tt, cond)
    assert torch.allclose(eps_hat, x + torch.tensor([0.7, 0.3]).view(-1, 1, 1, 1) * v, atol=1e-6)


@pytest.mark.xdist_group("sd3_tiny")
@pytest.mark.parametrize("t5", [True, False])
def test_the_sd3_cfg_reference_reads_the_pipelines_encoded_empty_prompt_not_zeros(tiny_sd3, monkeypatch,
                                                                                  t5):
    """Both CFG choices read s_ref(x_t | empty) (choice 1: eps_ref(.., None); choice 2: the second
    half of eps_ref_both) with SD3's unconditional input: StableDiffusion3Pipeline's encoded negative
    prompt "" (without T5, T5's part zeros), not zeros as SDXL's. The mutant (zeros) fails here."""
    world = _sd3_world(tiny_sd3, t5=t5)
    _, neg, _, neg_pooled = world.pipe.encode_prompt("a cat", None, None, negative_prompt="",
                                                     do_classifier_free_guidance=True)
    torch.manual_seed(0)
    x, t = torch.randn(2, *world.latent_shape), torch.tensor([300.0, 700.0])
    s = (t / 1000).view(-1, 1, 1, 1)
    with torch.no_grad():
        v = world.s_ref(hidden_states=x, encoder_hidden_states=neg.expand(2, -1, -1),
                        pooled_projections=neg_pooled.expand(2, -1), timestep=t).sample
        want = distar.eps_from_velocity(x, v, s)  # the pipeline's unconditional eps

        def read():  # (choice 1's, choice 2's) s_ref(x_t | empty), as eps
            return world.eps_ref(x, t, None), world.eps_ref_both(x, t, world.encode(["a cat"] * 2))[1]
        assert all(torch.allclose(eps_u, want, atol=1e-5) for eps_u in read())
        zeros = lambda self, B: {k: torch.zeros_like(v).expand(B, *v.shape[1:])
                                 for k, v in self.empty.items() if k != "prompts"}
        monkeypatch.setattr(distar.SD3World, "uncond", zeros)  # the mutant
        assert not any(torch.allclose(eps_u, want, atol=1e-3) for eps_u in read())


def test_the_toys_and_sdxls_noise_levels_are_the_same_randint_draw_as_before(tiny):
    """The process moved into the world; the VP draw did not change (resumes and figures hold)."""
    for world in (_toy([]), _sdxl_world(tiny)):
        torch.manual_seed(3)
        t = distar.diffuse(world, torch.zeros(64, 2))[0]
        torch.manual_seed(3)
        assert torch.equal(t, torch.randint(20, 981, (64,)))


@pytest.mark.xdist_group("sd3_tiny")
@pytest.mark.parametrize("model", ["sdxl", "sd3"])
def test_a_large_alpha_rew_raises_the_reward_and_alpha_rew_0_does_not(tiny, tiny_sd3, model):
    """4 steps (generator lr 1e-2, no CFG): the reward of fixed noise and prompts rises with
    alpha_rew 1000 (measured: sdxl +0.039, sd3 +0.100), and by under a quarter of that with
    alpha_rew 0 (-0.012, +0.012)."""
    gain, (pipe, reward_model) = {}, tiny if model == "sdxl" else (tiny_sd3["sd3"], tiny_sd3["reward"])
    for alpha in (1000, 0):
        cfg = distar.parse_args(["--tiny", f"--model={model}", f"--pretrained={pipe}", "--generator_init=",
                                 f"--reward_model={reward_model}", f"--reward_processor={reward_model}",
                                 f"--alpha_rew={alpha}", "--alpha_cfg=0", "--lr_g=1e-2", "--lr_psi=1e-3",
                                 "--assistant_steps=1", "--log_interval=100"])
        torch.manual_seed(0)
        world = distar.WORLDS[model](cfg, torch.device("cpu"))
        cond = world.encode(distar.BUILTIN_PROMPTS[:4])
        z = torch.randn(4, *world.latent_shape, generator=torch.Generator().manual_seed(1))
        reward = lambda: world.reward(world.generate(world.generator, cond, z), cond).mean().item()
        with torch.no_grad():
            before = reward()
        opts = [distar.make_optimizer(cfg, distar.trained(n), lr) for n, lr in ((world.generator, 1e-2), (world.assistant, 1e-3))]
        distar.train(world, *opts, (0, 1, torch.device("cpu")), range(4))
        with torch.no_grad():
            gain[alpha] = reward() - before
    assert gain[1000] > 0.02 and gain[0] < gain[1000] / 4, gain


def test_sd3_mode_defaults_and_help(capsys):
    cfg = distar.parse_args(["--model=sd3"])
    assert (cfg.pretrained, cfg.generator_init, cfg.conditioning_t, cfg.alpha_cfg, cfg.t5) == (
        "stabilityai/stable-diffusion-3.5-medium", "", 1000, 3.5, True)
    assert distar.parse_args(["--toy", "--model=sd3"]).alpha_cfg == 7.5  # the toy keeps its own
    help_text = distar.modes_help()
    assert "--model=sd3" in help_text and "stabilityai/stable-diffusion-3.5-medium" in help_text
    assert distar.main(["--t5=false"]) == 2
    assert "--t5 is SD3's text encoder" in capsys.readouterr().err


@pytest.mark.xdist_group("sd3_tiny")
@pytest.mark.parametrize("case", ["sdxl_as_sd3", "sd3_as_sdxl", "t5_without_t5"])
def test_a_pipeline_of_another_family_or_without_t5_is_one_line(tiny, tiny_sd3, tmp_path, capsys, case):
    folder, args, words = dict(
        sdxl_as_sd3=(tiny[0], ["--model=sd3"], "is a StableDiffusionXLPipeline, not a StableDiffusion3Pipeline: pass --model=sdxl"),
        sd3_as_sdxl=(tiny_sd3["sd3"], [], "is a StableDiffusion3Pipeline, not a StableDiffusionXLPipeline: pass --model=sd3"),
        t5_without_t5=(tiny_sd3["no_t5"], ["--model=sd3"], "has no T5 text encoder (text_encoder_3): pass --t5=false (zeros in its place, as the pipeline does)"),
    )[case]
    code = distar.main([*args, "--allow_cpu", f"--pretrained={folder}", f"--out_dir={tmp_path / 'out'}"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err == f"distar: error: --pretrained={folder} {words}\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.xdist_group("sd3_tiny")
def test_an_sd3_lora_round_trips_through_diffusers_load_lora_weights(tiny_sd3, tmp_path):
    """save_lora writes what StableDiffusion3Pipeline.load_lora_weights reads (transformer_lora_layers,
    alpha kept), and load_net reads it back: the same one-step image, exactly."""
    from diffusers import StableDiffusion3Pipeline

    world = _sd3_world(tiny_sd3, *LORA_ARGS)
    assert all(".lora_" in n for n, p in world.generator.named_parameters() if p.requires_grad)
    adapted = {n.split(".lora_")[0].split(".", 2)[-1] for n, p in world.generator.named_parameters()
               if p.requires_grad}
    assert {"attn.to_q", "attn.add_k_proj", "attn.to_add_out", "attn2.to_v", "ff.net.2",
            "ff_context.net.0.proj"} <= adapted  # both streams, both attention modules, feed-forward
    prompts = ["a red fox"]
    z = torch.randn(1, *world.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = world.generate(world.generator, world.encode(prompts), z)  # lora_B = 0: the base
        for p in distar.trained(world.generator):
            p.add_(0.1 * torch.randn_like(p))
        x0 = world.generate(world.generator, world.encode(prompts), z)
    distar.save_net(world.generator, str(tmp_path / "g"))
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3["sd3"])
    pipe.load_lora_weights(str(tmp_path / "g"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompts, num_inference_steps=1, guidance_scale=0, latents=z.clone(), height=64, width=64,
               output_type="latent").images
    assert torch.allclose(out, x0, atol=1e-6) and (x0 - base).abs().max() > 1e-3
    other = _sd3_world(tiny_sd3, *LORA_ARGS)
    distar.load_net(other.generator, str(tmp_path / "g"))
    with torch.no_grad():
        assert torch.equal(other.generate(other.generator, other.encode(prompts), z), x0)


def test_sd35_medium_on_meta_has_its_published_parameter_counts():
    parts = distar.dry_run_parts("meta", distar.Config(model="sd3"))
    n = lambda net: sum(p.numel() for p in net.parameters())
    assert n(parts["s_ref"]) == 2_243_171_520 and n(parts["pipe"].text_encoder_3) == 4_762_310_656
    assert n(parts["reward_fn"].model) == PICKSCORE
    world = distar.SD3World(distar.parse_args(["--dry_run", "--model=sd3"]), torch.device("meta"), parts=parts)
    rows = dict(distar.memory_plan(world, 1, False))
    assert rows["T5-XXL text encoder (bfloat16)"] == 2 * 4_762_310_656  # frozen in bf16, not fp32
    assert rows["generator + assistant weights (float32 masters)"] == 2 * 4 * 2_243_171_520
    assert rows["reference transformer (bfloat16)"] == 2 * 2_243_171_520


@pytest.fixture(scope="module")
def sd3_runs(tmp_path_factory):
    """The same 2-rank tiny SD3 run (2 steps, a checkpoint at step 2) under DDP and --fsdp."""
    d = tmp_path_factory.mktemp("sd3_runs")
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        p = torchrun_here("--tiny", "--model=sd3", "--max_steps=2", "--assistant_steps=1",
                          "--sample_interval=100", *extra, f"--out_dir={d / name}")
        assert p.returncode == 0, p.stderr[-2000:]
        assert ("weights sharded over the ranks" in p.stdout) == bool(extra), p.stdout
    return d


@pytest.mark.xdist_group("sd3_runs")
def test_sd3_trains_on_2_ranks_under_ddp_and_fsdp_alike_and_diffusers_loads_it(sd3_runs):
    from diffusers import SD3Transformer2DModel

    weights = lambda f: {k: v.detach() for k, v in SD3Transformer2DModel.from_pretrained(f).state_dict().items()}
    init = weights(str(sd3_runs / "ddp" / "tiny" / "sd3" / "transformer"))
    for net in ("generator", "assistant"):
        ddp, fsdp = (weights(str(sd3_runs / run / "checkpoint-000002" / net)) for run in ("ddp", "fsdp"))
        update = torch.cat([(ddp[k] - init[k]).flatten() for k in init])
        diff = torch.cat([(fsdp[k] - ddp[k]).flatten() for k in init])
        assert update.norm() > 0 and diff.norm() <= 1e-3 * update.norm(), (net, diff.norm() / update.norm())


@pytest.mark.xdist_group("sd3_runs")
def test_resuming_an_sd3_run_as_sdxl_is_one_line_and_leaves_the_folder(sd3_runs, capsys):
    d = sd3_runs / "ddp"
    before = _tree_digest(d)
    assert distar.main(["--tiny", "--resume", f"--out_dir={d}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was saved by a run with --model=sd3, not --model=sdxl" in err
    assert _tree_digest(d) == before


@pytest.mark.xdist_group("sd3_runs")
def test_sample_py_knows_an_sd3_run_and_samples_diffusers_one_step_sd3_pipeline(sd3_runs, tmp_path):
    """sample.py on an SD3 run folder: the family from its pipeline's model_index.json, its own
    scheduler, one step, no guidance: the PNG is StableDiffusion3Pipeline's, pixel for pixel."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    run = sd3_runs / "fsdp"
    assert sample.main([f"--generator={run}", "--resolution=64", "--prompt=a red fox", "--seed=3",
                        f"--out_dir={tmp_path}"]) == 0
    pipe = StableDiffusion3Pipeline.from_pretrained(
        str(run / "tiny" / "sd3"), transformer=SD3Transformer2DModel.from_pretrained(
            str(run / "checkpoint-000002" / "generator")))
    pipe.set_progress_bar_config(disable=True)
    expect = pipe("a red fox", num_inference_steps=1, guidance_scale=0.0, height=64, width=64,
                  generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "000.png")), np.asarray(expect))


@pytest.mark.xdist_group("sd3_runs")
def test_sample_py_drops_t5_where_the_run_trained_without_it(sd3_runs, tmp_path, capsys, monkeypatch):
    """A --t5=false run's generator saw zeros for T5's tokens: sample.py gives it the same (its
    state.json says so) unless --t5 is on the command line. The PNG is StableDiffusion3Pipeline's
    without T5 (text_encoder_3=None), which differs from the pipeline's with T5."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    saved = sd3_runs / "fsdp" / "checkpoint-000002"
    ckpt = tmp_path / "run" / "checkpoint-000002"  # the same weights, from a run with --t5=false
    ckpt.mkdir(parents=True)
    os.symlink(saved / "generator", ckpt / "generator")
    state = json.loads((saved / "state.json").read_text())
    state["config"]["t5"] = False
    (ckpt / "state.json").write_text(json.dumps(state))
    args = [f"--generator={ckpt / 'generator'}", "--resolution=64", "--prompt=a red fox", "--seed=3"]
    assert sample.main([*args, f"--out_dir={tmp_path / 'o'}"]) == 0
    assert f"--t5=false: {ckpt / 'generator'}'s run trained without T5" in capsys.readouterr().out
    unet = SD3Transformer2DModel.from_pretrained(str(saved / "generator"))
    images = {}
    for t5, no_t5 in ((True, {}), (False, dict(text_encoder_3=None, tokenizer_3=None))):
        pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_runs / "fsdp" / "tiny" / "sd3"),
                                                        transformer=unet, **no_t5)
        pipe.set_progress_bar_config(disable=True)
        images[t5] = np.asarray(pipe("a red fox", num_inference_steps=1, guidance_scale=0.0,
                                     height=64, width=64,
                                     generator=torch.Generator("cpu").manual_seed(3)).images[0])
    got = np.asarray(Image.open(tmp_path / "o" / "000.png"))
    assert np.array_equal(got, images[False]) and not np.array_equal(got, images[True])
    seen = []  # the command line's --t5 wins
    monkeypatch.setattr(sample, "sample", lambda cfg: seen.append(cfg.t5))
    assert sample.main([*args, "--t5=true", f"--out_dir={tmp_path / 'p'}"]) == 0 and seen == [True]


# -----------------------------------------------------------------------------
# SD1.x/2.x (--model=sd): SD1.5-shaped (eps) and SD2.1-shaped (v-prediction) tiny worlds: x_0 and
# eps as diffusers' schedulers give them, the DSM on a v-net, the gradient check read through v,
# 2-rank runs that resume (eps under DDP, v under --fsdp), sample.py's image, plans, bad input


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """Tiny random SD pipelines, SD1.5-shaped (PNDM, epsilon) and SD2.1-shaped (DDIM, v)."""
    distar.quiet_libraries()
    root = str(tmp_path_factory.mktemp("tiny_sd"))
    sd, reward = distar.build_tiny(root, "sd")
    return dict(sd=sd, sd_v=distar.build_tiny(root, "sd", v=True)[0], reward=reward)


def _sd_args(tiny_sd, v=False):
    """The command line of a tiny SD run on a given pipeline folder (--tiny builds SD1.5's)."""
    return ["--model=sd", "--allow_cpu", f"--pretrained={tiny_sd['sd_v' if v else 'sd']}", "--generator_init=",
            f"--reward_model={tiny_sd['reward']}", f"--reward_processor={tiny_sd['reward']}"] + [
        f"--{k}={v}" for k, v in distar.TINY_DEFAULTS.items() if k != "out_dir"]


@pytest.mark.parametrize("v", [False, True], ids=["eps", "v"])
def test_the_sd_generators_x0_and_the_eps_it_hands_the_losses_are_diffusers_own(v):
    """float64, several t: SDWorld.generate's x_0 is DDPMScheduler.step's pred_original_sample for
    the net's eps or v (clip_sample off), and a v-net's eps_hat (what the losses get) is the eps
    that DDPMScheduler.add_noise and get_velocity made x_t and v from."""
    from diffusers import DDPMScheduler

    kind = "v_prediction" if v else "epsilon"
    sched = DDPMScheduler(**distar.SDXL_BETAS, prediction_type=kind, clip_sample=False)
    sched.alphas_cumprod = sched.alphas_cumprod.to(f64)
    world = object.__new__(distar.SDWorld)  # the formulas alone: the net's output is given
    world.v, world.alphas_cumprod, world.latent_shape = v, sched.alphas_cumprod, (4, 8, 8)
    torch.manual_seed(0)
    z, out, x0, eps = (torch.randn(3, 4, 8, 8, dtype=f64) for _ in range(4))
    world.output = lambda net, x, t, cond: out
    for t in (999, 980, 625, 399, 20):
        world.cfg = distar.Config(model="sd", conditioning_t=t)
        expect = sched.step(out, t, z).pred_original_sample
        assert torch.allclose(world.generate(None, None, z), expect, rtol=1e-12, atol=1e-12), t
        if v:
            x_t, vel = sched.add_noise(x0, eps, torch.tensor([t])), sched.get_velocity(x0, eps, torch.tensor([t]))
            world.output = lambda net, x, tt, cond: vel
            assert torch.allclose(world.unet(None, x_t, t, None), eps, atol=1e-12), t
            world.output = lambda net, x, tt, cond: out


def test_the_assistants_dsm_on_a_v_net_is_the_eps_mse_not_the_v_mse(tiny_sd, monkeypatch):
    """The choice (SDWorld's docstring): the DSM stays the eps MSE, a_t^2 |v_psi - v|^2 / D per
    sample, v = a_t eps - sigma_t x_0 (diffusers' get_velocity); SD2.1's own v MSE is not it. The
    text: StableDiffusionPipeline.encode_prompt's, its negative "" the unconditional input."""
    from diffusers import DDPMScheduler

    world = distar.SDWorld(distar.parse_args(_sd_args(tiny_sd, v=True)), torch.device("cpu"))
    drawn, diffuse = [], distar.diffuse
    monkeypatch.setattr(distar, "diffuse", lambda w, x0: drawn.append((x0, *diffuse(w, x0))) or drawn[-1][1:])
    torch.manual_seed(0)
    cond = world.sample_cond(4)
    with torch.no_grad():
        loss = distar.assistant_loss(world, world.assistant, cond)
        x0, t, x_t, eps, _ = drawn[0]
        v = DDPMScheduler.from_config(world.pipe.scheduler.config).get_velocity(x0, eps, t)
        v_mse = (world.output(world.assistant, x_t, t, cond) - v).square().mean((1, 2, 3))
    a2 = world.alphas_cumprod[t]
    assert world.v and torch.allclose(loss, (a2 * v_mse).mean(), rtol=1e-4), (loss, (a2 * v_mse).mean())
    # and the unconditional input is the pipeline's own for guidance: "" encoded, not zeros
    emb, neg = world.pipe.encode_prompt(["a cat", "a dog"], "cpu", 1, True)
    assert torch.equal(world.uncond(2)["embeds"], neg) and neg.abs().max() > 0.1
    assert torch.equal(world.encode(["a cat", "a dog"])["embeds"], emb)
    assert v_mse.mean() > 2 * loss  # the v MSE: a_t^2 <= 0.6 at these t (277 to 634)


@pytest.mark.xdist_group("flow_check")
def test_the_gradient_check_holds_with_the_reference_read_through_v_prediction(monkeypatch):
    """process "v": the VP reference read as from a v-net (SD2.1) through eps_from_v; the matching
    losses match; a wrong conversion (x_0's a x_t - s v; s x_t - a v as a mutant) fails them."""
    rows = {r["name"].strip(): r for r in distar.gradient_check(process="v", n=2**15)}
    for name in ("eq 3.4 pseudo-Huber (Thm 3.1)", "eq 3.4 l2 (Thm 3.1)", "kl_loss vs closed-form KL",
                 "cfg_reward_loss (Thm 3.2, sign -)", "choice 2: cfg_score reference"):
        assert rows[name]["should_match"] and rows[name]["ok"], rows[name]
    r = rows["wrong: v to eps as x_0, a x_t - s v"]
    assert not r["should_match"] and r["ok"] and r["rel"]["all"] > 5 * r["tol"], r
    monkeypatch.setattr(distar, "eps_from_v", lambda x_t, v, a, s: s * x_t - a * v)
    bad = {r["name"].strip(): r for r in distar.gradient_check(process="v", n=2**14)}
    assert not any(bad[name]["ok"] for name in ("eq 3.4 pseudo-Huber (Thm 3.1)", "eq 3.4 l2 (Thm 3.1)",
                                                 "choice 2: cfg_score reference"))


def test_sd_mode_defaults_per_model_and_the_toys_v_check(monkeypatch, capsys, tmp_path):
    cfg = distar.parse_args(["--model=sd"])
    assert (cfg.pretrained, cfg.generator_init, cfg.conditioning_t, cfg.resolution, cfg.batch_size) == (
        "stable-diffusion-v1-5/stable-diffusion-v1-5", "", 999, 512, 4)
    assert distar.parse_args(["--model=sd", "--conditioning_t=500"]).conditioning_t == 500  # the flag wins
    assert distar.parse_args([]).conditioning_t == 399  # SDXL keeps DMD2's
    assert (distar.parse_args(["--tiny", "--model=sd"]).resolution, distar.parse_args(["--tiny", "--model=sd"]).conditioning_t) == (64, 999)
    assert "--model=sd " in distar.modes_help() and "stable-diffusion-v1-5/stable-diffusion-v1-5" in distar.modes_help()
    calls = []
    monkeypatch.setattr(distar, "gradient_check", lambda **kw: calls.append(kw) or [])
    monkeypatch.setattr(distar, "fit", lambda *a, **k: [])
    monkeypatch.setattr(distar, "evaluate_toy", lambda *a: None)
    distar.run_toy(distar.parse_args(["--toy", "--model=sd", f"--out_dir={tmp_path}"]), (0, 1, torch.device("cpu")))
    assert calls == [{}, {"process": "v"}] and "read through v-prediction: SD2.1" in capsys.readouterr().out


@pytest.fixture(scope="module")
def sd_runs(tiny_sd, tmp_path_factory):
    """2-rank runs that stop at step 1 and resume to step 2: SD1.5-shaped (eps, --tiny) under DDP,
    SD2.1-shaped (v, t = 900) under --fsdp."""
    d = tmp_path_factory.mktemp("sd_runs")
    runs = dict(eps=["--tiny", "--model=sd"], v=[*_sd_args(tiny_sd, v=True), "--conditioning_t=900", "--fsdp"])
    for name, args in runs.items():
        for steps in (["--max_steps=1"], ["--max_steps=2", "--resume"]):
            p = torchrun_here(*args, *steps, "--assistant_steps=1", "--batch_size=2", "--ckpt_interval=1",
                              "--sample_interval=100", f"--out_dir={d / name}")
            assert p.returncode == 0, p.stderr[-2000:]
        assert "resumed from" in p.stdout and ("weights sharded" in p.stdout) == (name == "v"), p.stdout
    return d


@pytest.mark.xdist_group("sd_runs")
def test_sd_trains_eps_under_ddp_and_v_under_fsdp_and_resumes(sd_runs):
    from diffusers import UNet2DConditionModel

    for name in ("eps", "v"):
        state = json.loads((sd_runs / name / "checkpoint-000002" / "state.json").read_text())
        assert state["step"] == 2 and state["config"]["model"] == "sd"
        for net in ("generator", "assistant"):
            w1, w2 = (_unet_weights(str(sd_runs / name / f"checkpoint-00000{i}" / net)) for i in (1, 2))
            assert UNet2DConditionModel.from_pretrained(str(sd_runs / name / "checkpoint-000002" / net))
            assert all(torch.isfinite(w).all() for w in w2.values())
            assert sum((w2[k] - w1[k]).norm() for k in w1) > 0, (name, net)  # the resumed step trained


@pytest.mark.xdist_group("sd_runs")
@pytest.mark.parametrize("name, t", [("eps", 999), ("v", 900)])
def test_sample_py_samples_an_sd_run_at_its_conditioning_t_as_diffusers_and_distar_do(sd_runs, tmp_path, name, t):
    """sample.py on an SD run folder: StableDiffusionPipeline with LCMScheduler, timesteps=[t], t
    read from the run (v: 900, not a default), no guidance: the same PNG as that pipeline, and
    within 1/255 of distar's own generator (loaded from a state-dict file, as DMD2's SD1.5 one)
    and decoder on the pipeline's noise."""
    from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    run, ckpt = sd_runs / name, sd_runs / name / "checkpoint-000002"
    assert sample.main([f"--generator={run}", "--resolution=64", "--prompt=a red fox", "--seed=3",
                        f"--out_dir={tmp_path}"]) == 0
    got = np.asarray(Image.open(tmp_path / "000.png")).astype(np.int16)
    config = json.loads((ckpt / "state.json").read_text())["config"]
    unet = UNet2DConditionModel.from_pretrained(str(ckpt / "generator"))
    pipe = StableDiffusionPipeline.from_pretrained(config["pretrained"], unet=unet, **distar.NO_CHECKER)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    expect = pipe("a red fox", num_inference_steps=1, timesteps=[t], guidance_scale=0.0, height=64, width=64,
                  generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert np.array_equal(got, np.asarray(expect))
    torch.save(unet.state_dict(), tmp_path / "pytorch_model.bin")  # as DMD2's SD1.5 generator
    cfg = distar.parse_args(_sd_args(dict(sd=config["pretrained"], reward=config["reward_model"]))
                            + [f"--generator_init={tmp_path / 'pytorch_model.bin'}", f"--conditioning_t={t}"])
    world = distar.SDWorld(cfg, torch.device("cpu"))
    assert world.v == (name == "v")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))  # the pipeline's latents
    with torch.no_grad():
        img = world.decode(world.generate(world.generator, world.encode(["a red fox"]), z))[0]
    assert np.abs(img.permute(1, 2, 0).numpy() * 255 - got).max() <= 1.0


@pytest.mark.xdist_group("dry")
def test_sd15_and_sd21_on_meta_have_their_published_parameter_counts_and_plan():
    """The dry run's SD1.5 and SD2.1 (--pretrained names which); the one-GPU plan by hand: one
    text encoder in fp32, PickScore in bf16, the three UNets as SDXL's rows."""
    counts = {}
    for pretrained, v in (("stable-diffusion-v1-5/stable-diffusion-v1-5", False), ("stabilityai/stable-diffusion-2-1", True)):
        cfg = distar.parse_args(["--dry_run", "--model=sd", f"--pretrained={pretrained}"])
        world = distar.SDWorld(cfg, torch.device("meta"), parts=distar.dry_run_parts("meta", cfg))
        unet, text = _numel(world.s_ref), _numel(world.pipe.text_encoder)
        counts[pretrained] = unet, text
        assert world.v == v and world.latent_shape == (4, 64, 64) and _numel(world.vae) == VAE
        expect = [2 * unet * 4, 2 * 2 * unet * 4, unet * 4, unet * 2, text * 4, PICKSCORE * 2, VAE * 4]
        assert [b for _, b in distar.memory_plan(world, 1, False)] == expect
    assert list(counts.values()) == [(859_520_964, 123_060_480), (865_910_724, 340_387_840)]
    assert distar.main(["--dry_run", "--model=sd", "--pretrained=runwayml/stable-diffusion-v1-5"]) == 2


@pytest.mark.parametrize("case", ["sdxl_as_sd", "sd_as_sdxl", "v_said_epsilon"])
def test_a_pipeline_of_another_family_or_a_v_net_read_as_eps_is_one_line(tiny, tiny_sd, tmp_path, capsys, case):
    folder = tmp_path / "sd21"  # SD2.1's 768 px UNet config, its scheduler's prediction_type gone
    for sub, name in (("", "model_index.json"), ("unet", "config.json"), ("scheduler", "scheduler_config.json")):
        config = json.loads(open(os.path.join(tiny_sd["sd_v"], sub, name)).read())
        config = {**config, "sample_size": 96, "cross_attention_dim": 1024} if sub == "unet" else config
        config.pop("prediction_type", None)
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / name).write_text(json.dumps(config))
    folder, args, words = dict(
        sdxl_as_sd=(tiny[0], ["--model=sd"], "is a StableDiffusionXLPipeline, not a StableDiffusionPipeline: pass --model=sdxl"),
        sd_as_sdxl=(tiny_sd["sd"], [], "is a StableDiffusionPipeline, not a StableDiffusionXLPipeline: pass --model=sd"),
        v_said_epsilon=(folder, ["--model=sd"], "has SD2.x's 768 px UNet, a v-prediction net, but its scheduler says "
                        'prediction_type=epsilon: set "prediction_type": "v_prediction" in its scheduler/scheduler_config.json'),
    )[case]
    code = distar.main([*args, "--allow_cpu", f"--pretrained={folder}", f"--out_dir={tmp_path / 'out'}"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err == f"distar: error: --pretrained={folder} {words}\n"
    assert not (tmp_path / "out").exists()


def test_an_sd_v_lora_is_the_generator_for_stable_diffusion_pipelines_load_lora_weights(tiny_sd, tmp_path):
    """--lora_rank on an SD2.1-shaped world: the saved adapter on its base, in StableDiffusionPipeline
    with LCMScheduler at t = 999, gives the world's x_0."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    world = distar.SDWorld(distar.parse_args(_sd_args(tiny_sd, v=True) + LORA_ARGS), torch.device("cpu"))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = world.generate(world.generator, world.encode(["a red fox"]), z)  # lora_B = 0: the base
        for p in distar.trained(world.generator):
            p.add_(0.1 * torch.randn_like(p))
        x0 = world.generate(world.generator, world.encode(["a red fox"]), z)
    distar.save_net(world.generator, str(tmp_path / "g"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd["sd_v"], **distar.NO_CHECKER)
    pipe.load_lora_weights(str(tmp_path / "g"))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red fox", num_inference_steps=1, timesteps=[999], guidance_scale=0, latents=z.clone(),
               height=64, width=64, output_type="latent").images
    assert torch.allclose(out, x0, atol=1e-5) and (x0 - base).abs().max() > 1e-3


@pytest.mark.skipif(not os.environ.get("DISTAR_BENCH"), reason="a benchmark, not a test: "
                    "DISTAR_BENCH=1 python -m pytest -s test_distar.py -k bench_scorers")
def test_bench_scorers_images_per_second(tiny, golden, fid_files, monkeypatch):
    """Images per second of each metric's scorer on this machine's CPU: tiny random models (the
    golden ones; FID's tiny Inception stand-in), 1024 px PNG-decoded images, batches of 16, the
    median of 3 timed batches after one untimed. At these sizes the numbers are what each metric's
    preprocessing costs; the real models' cost is the dry run's parameters times images."""
    import statistics
    import time

    from transformers import CLIPModel

    g, cfg, images, _ = golden
    _tiny_scorer_configs(monkeypatch, g)
    reward = tiny[1]
    rng = np.random.default_rng(0)
    batch = [Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)) for _ in range(16)]
    prompts = ["a photo of a cat sitting on a windowsill"] * len(batch)
    clip = (CLIPModel.from_pretrained(cfg.clip_model), None)  # the aesthetic head's CLIP-L
    scorers = dict(pickscore=sample.clip_scorer("pickscore", reward, reward, "cpu"),
                   clip_score=sample.clip_scorer("clip_score", reward, reward, "cpu"),
                   **{m: sample.PAPER_METRICS[m](cfg, "cpu", clip=clip) for m in sample.PAPER_METRICS})
    stats = sample.FidStats(lambda x: TinyInception().layers((x - 128) / 128), 256, "cpu")
    scorers["fid"] = lambda ims, _: stats.add(ims)
    for name, scorer in scorers.items():
        times = []
        for rep in range(4):
            t0 = time.perf_counter()
            scorer(batch, prompts)
            times.append(time.perf_counter() - t0)
        print(f"{name:<13s} {len(batch) / statistics.median(times[1:]):7.1f} images/s")
