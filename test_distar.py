"""Tests for distar.py. CPU only, no download. Run: python -m pytest -q test_distar.py

Exactness checks are in float64 against closed-form Gaussian answers; the smoke tests run
the real command lines in subprocesses (including torchrun)."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub, in-process either
import distar  # noqa: E402
import sample  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
f64 = torch.float64


def run(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(HERE, "distar.py"), *args], cwd=HERE,
                          env=ENV, capture_output=True, text=True, timeout=timeout)


# -----------------------------------------------------------------------------
# the pure loss functions, against exact answers


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
    assert torch.allclose(ph, distar.distance_grad(y, "pseudo_huber", torch.full((3,), 2.0, dtype=f64)))
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
        "div_ph": lambda i: distar.score_divergence_loss(x_t[i], cond[i], fake, ref, "pseudo_huber", c=c[i], weight=w[i]),
        "div_l2": lambda i: distar.score_divergence_loss(x_t[i], cond[i], fake, ref, "l2", weight=w[i]),
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


def test_toy_scores_are_the_gradients_of_the_toy_log_densities():
    world = distar.make_toy_world()
    world.means = world.means.to(f64)
    torch.manual_seed(4)
    x = (torch.randn(100, 2, dtype=f64) * 2).requires_grad_(True)
    ab = torch.rand(100, dtype=f64)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    for c in (torch.randint(world.K, (100,)), None):
        (g,) = torch.autograd.grad(world.log_prob(x, a, s, c).sum(), x)
        assert torch.allclose(world.score(x, a, s, c), g, atol=1e-10)


def test_dsm_loss_is_minimised_by_the_true_score():
    """E||s - grad log p_t(x_t|x_0)||^2 = E||s - s_true||^2 + const (eq. 2.2): a constant offset
    d raises the loss by exactly |d|^2 in expectation."""
    world = distar.make_toy_world()
    world.means = world.means.to(f64)
    gen = torch.Generator().manual_seed(5)
    n = 400_000
    k = torch.randint(2, (n,), generator=gen)
    x0 = world.means[0, k] + world.std * torch.randn(n, 2, dtype=f64, generator=gen)
    eps = torch.randn(n, 2, dtype=f64, generator=gen)
    a, s = torch.full((n,), 0.8, dtype=f64), torch.full((n,), 0.6, dtype=f64)
    x_t = a[:, None] * x0 + s[:, None] * eps
    s_true = world.score(x_t, a, s, torch.zeros(n, dtype=torch.long))
    base = distar.dsm_loss(s_true, -eps / 0.6)
    for d in ([0.3, 0.0], [0.0, -0.5], [0.4, 0.4]):
        d = torch.tensor(d, dtype=f64)
        extra = distar.dsm_loss(s_true + d, -eps / 0.6) - base
        se = extra.std() / math.sqrt(n)
        assert abs(extra.mean() - d @ d) < 5 * se + 1e-12
        assert extra.mean() > 0


# -----------------------------------------------------------------------------
# Theorems 3.1 and 3.2 by Monte Carlo against the exact gradients (the toy's gradient check)


@pytest.fixture(scope="module")
def grad_check():
    return {r["name"].strip(): r for r in distar.gradient_check()}


@pytest.mark.parametrize("name", ["eq 3.4 pseudo-Huber (Thm 3.1)", "eq 3.4 l2 (Thm 3.1)",
                                  "kl_loss vs closed-form KL", "cfg_reward_loss (Thm 3.2, sign -)",
                                  "choice 2: cfg_score reference"])
def test_tractable_losses_have_the_exact_gradient(grad_check, name):
    r = grad_check[name]
    assert r["should_match"] and r["ok"], r
    # mean AND scale parameters: a wrong stop-gradient can get mu right and A wrong
    assert r["rel"]["mu"] < max(r["tol"], 1e-9) * 3 and r["rel"]["A"] < max(r["tol"], 1e-9) * 3, r
    assert r["tol"] < 0.05  # the check has the power to see a 5% error


@pytest.mark.parametrize("name", ["wrong: x_t detached inside d'", "wrong: x_t detached in 2nd s_fake",
                                  "printed sign + (eqs 3.5, 3.6)", "printed choice 2: s_c + a s_u"])
def test_wrong_variants_are_caught(grad_check, name):
    r = grad_check[name]
    assert not r["should_match"] and r["ok"] and r["rel"]["all"] > 5 * r["tol"], r


def test_theorem_3_2_printed_sign_gives_the_opposite_gradient(grad_check):
    assert abs(grad_check["printed sign + (eqs 3.5, 3.6)"]["rel"]["all"] - 2.0) < 1e-6


# -----------------------------------------------------------------------------
# the loop's plumbing


def _toy(args):
    cfg = distar.parse_args(["--toy", *args])
    world = distar.make_toy_world()
    world.cfg = cfg
    return world


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


def test_generator_phase_backpropagates_through_the_assistant_input_but_not_its_weights():
    world = _toy(["--alpha_rew=0", "--alpha_cfg=0"])
    world.assistant.requires_grad_(False)
    loss, _ = distar.generator_loss(world, world.generator, world.sample_cond(32))
    loss.backward()
    assert all(p.grad is None for p in world.assistant.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in world.generator.parameters())


# -----------------------------------------------------------------------------
# the toy, end to end


def _class_energy_ratios(path):
    samples = torch.load(path, weights_only=True)
    gen, ref = samples["generator"], samples["reference"]
    assert gen.dtype == ref.dtype == torch.float32 and gen.shape == ref.shape
    K, N, two = gen.shape
    assert K == 3 and N >= 2000 and two == 2
    torch.manual_seed(0)
    normal = torch.randn(N, 2)
    return gen, ref, [distar.energy_distance(gen[k], ref[k]) / distar.energy_distance(normal, ref[k])
                      for k in range(K)]


def test_toy_without_reward_or_cfg_converges_to_the_reference(tmp_path):
    p = run("--toy", "--alpha_rew=0", "--alpha_cfg=0", f"--out_dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("gradient check")  # printed first
    assert "FAILED" not in p.stdout
    _, _, ratios = _class_energy_ratios(tmp_path / "toy_samples.pt")
    assert max(ratios) < 0.02, ratios
    assert (tmp_path / "toy.png").stat().st_size > 1000


def test_toy_with_reward_moves_toward_higher_reward(tmp_path):
    p = run("--toy", "--alpha_rew=300", "--alpha_cfg=0", f"--out_dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-2000:]
    gen, ref, _ = _class_energy_ratios(tmp_path / "toy_samples.pt")
    gain = gen[..., 0].mean(1) - ref[..., 0].mean(1)  # r = reward_scale * x[0]
    assert (gain > 0.05).all(), gain


def test_torchrun_two_processes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "distar.py"), "--toy", "--max_steps=30", f"--out_dir={tmp_path}"]
    p = subprocess.run(cmd, cwd=HERE, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "on 2 process(es), parameters identical on all ranks" in p.stdout
    assert p.stdout.count("gradient check:") == 1  # rank 0 prints
    assert (tmp_path / "toy_samples.pt").exists()


# -----------------------------------------------------------------------------
# configuration errors: one line, non-zero exit, no traceback


@pytest.mark.parametrize("args, words", [
    (["--toy", "--nope=1"], "unknown option --nope"),
    (["--toy", "--max_steps=ten"], "--max_steps expects int, got 'ten'"),
    (["--toy", "--alpha_rew"], "--alpha_rew needs a value"),
    (["--toy", "--cfg=sideways"], "--cfg must be one of in|out"),
    (["--toy", "--divergence=tv"], "--divergence must be one of"),
    (["--toy", "--toy=maybe"], "--toy takes true or false"),
    (["--toy", "stray"], "unexpected argument"),
    (["--toy", "--t_min=990"], "t_min <= t_max"),
])
def test_bad_config_is_one_clear_line(args, words):
    p = run(*args, timeout=60)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], p.stderr


def test_config_parsing():
    cfg = distar.parse_args(["--toy", "--alpha_rew=3", "--cfg=out", "--seed=7"])
    assert cfg.toy is True and cfg.alpha_rew == 3.0 and cfg.cfg == "out" and cfg.seed == 7
    assert cfg.max_steps == distar.TOY_DEFAULTS["max_steps"]  # toy defaults apply
    assert distar.parse_args(["--toy", "--max_steps=5"]).max_steps == 5  # and the user wins
    assert distar.parse_args([]).alpha_cfg == 7.5 and distar.parse_args([]).cfg == "in"


# -----------------------------------------------------------------------------
# SDXL mode on tiny random models (same loading code as the real ones)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    distar.quiet_libraries()
    sdxl, reward = distar.build_tiny(str(tmp_path_factory.mktemp("tiny")))
    return sdxl, reward


def _sdxl_world(tiny, *args):
    sdxl, reward = tiny
    cfg = distar.parse_args(["--tiny", f"--pretrained={sdxl}", "--generator_init=", f"--reward_model={reward}",
                             f"--reward_processor={reward}", *args])
    distar.quiet_libraries()
    world = distar.SDXLWorld(cfg, torch.device("cpu"))
    world.cfg = cfg
    # a generator that differs from the reference, as after DMD2 initialisation
    with torch.no_grad():
        for p in world.generator.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return world


def _state(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_one_alternating_step_changes_the_trained_nets_only(tiny, tmp_path):
    world = _sdxl_world(tiny, "--max_steps=1", "--assistant_steps=1", f"--out_dir={tmp_path}")
    frozen = {"s_ref": world.s_ref, "vae": world.vae, "text_encoder": world.pipe.text_encoder,
              "text_encoder_2": world.pipe.text_encoder_2, "reward": world.reward_fn.model}
    before = {k: _state(m) for k, m in {**frozen, "g": world.generator, "psi": world.assistant}.items()}
    distar.train(world, (0, 1, torch.device("cpu")))
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
    # choice 2: s_ref runs twice (c and empty) inside d', both on the gradient path;
    # choice 1: s_ref (c) inside d' carries gradient, the CFG term's two calls are at sg[x_t]
    assert len(grads["s_ref"]) == (2 if mode == "in" else 1) and all(v > 0 for v in grads["s_ref"])
    assert len(grads["s_psi"]) == 1 and grads["s_psi"][0] > 0
    assert len(grads["reward"]) == 1 and grads["reward"][0] > 0
    assert all(p.grad is None for p in world.assistant.parameters())
    assert all(p.grad is None for p in world.s_ref.parameters())


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


def test_bf16_path_runs(tmp_path):
    p = run("--tiny", "--precision=bf16", "--max_steps=2", f"--out_dir={tmp_path}", timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss_g"]) and math.isfinite(r["loss_psi"]) for r in rows)


def _generator_weights(ckpt):
    from safetensors.torch import load_file

    folder = ckpt / "generator"
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    import time

    args = ["--tiny", "--max_steps=6", "--ckpt_interval=2", "--sample_interval=100", "--keep_checkpoints=5"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(*args, f"--out_dir={a}").returncode == 0
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "distar.py"), *args, f"--out_dir={b}"],
                            cwd=HERE, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (b / "checkpoint-000002" / "state.json").exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.kill()  # SIGKILL
    assert proc.wait() == -9, "the run finished before it could be killed"
    assert not (b / "checkpoint-000006").exists()
    p = run(*args, f"--out_dir={b}", "--resume")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resumed from" in p.stdout
    wa, wb = _generator_weights(a / "checkpoint-000006"), _generator_weights(b / "checkpoint-000006")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    w2 = _generator_weights(a / "checkpoint-000002")
    assert any(not torch.equal(wa[k], w2[k]) for k in wa)  # training moved the weights


def test_incomplete_checkpoints_are_ignored(tmp_path):
    for name in ("checkpoint-000002", "checkpoint-000004", ".tmp-checkpoint-000006", "checkpoint-000008"):
        (tmp_path / name).mkdir()
    for name in ("checkpoint-000002", "checkpoint-000004", ".tmp-checkpoint-000006"):
        (tmp_path / name / "state.json").write_text("{}")
    found = [os.path.basename(p) for p in distar.list_checkpoints(str(tmp_path))]
    assert found == ["checkpoint-000002", "checkpoint-000004"]


def test_torchrun_two_processes_sdxl_keeps_ranks_identical(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "distar.py"), "--tiny", "--max_steps=2", "--zero", f"--out_dir={tmp_path}"]
    p = subprocess.run(cmd, cwd=HERE, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "on 2 process(es), parameters identical on all ranks" in p.stdout
    assert (tmp_path / "checkpoint-000002" / "state.json").exists()


def test_sdxl_outputs(tmp_path):
    p = run("--tiny", "--max_steps=2", "--sample_interval=1", f"--out_dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-2000:]
    from diffusers import UNet2DConditionModel
    from PIL import Image

    unet = UNet2DConditionModel.from_pretrained(tmp_path / "checkpoint-000002" / "generator")  # loads in diffusers
    assert unet.config.addition_embed_type == "text_time"
    assert Image.open(tmp_path / "samples-000001.png").size == (4 * 64, 64)
    state = json.loads((tmp_path / "checkpoint-000002" / "state.json").read_text())
    assert state["step"] == 2 and state["config"]["tiny"] is True
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss_g", "loss_div", "reward", "grad_norm", "sec_generator", "sec_assistant", "mem_generator_gb"):
        assert key in row


def _tree_digest(folder):
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("trained")
    assert run("--tiny", "--max_steps=2", f"--out_dir={d}").returncode == 0
    return d


@pytest.mark.parametrize("args, words", [
    (["--pretrained=/nonexistent/sdxl"], "cannot load --pretrained=/nonexistent/sdxl"),
    (["--tiny", "--prompts=/nonexistent/prompts.txt"], "--prompts=/nonexistent/prompts.txt: no such file"),
    (["--tiny", "--prompts={empty}"], "has no prompts"),
    (["--tiny", "--resolution=30"], "--resolution must be a multiple of 8"),
    (["--tiny", "--precision=fp8"], "--precision must be one of bf16|fp32"),
])
def test_bad_sdxl_input_is_one_line_and_leaves_checkpoints_intact(trained_dir, tmp_path, args, words):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    before = _tree_digest(trained_dir)
    p = run(*[a.replace("{empty}", str(empty)) for a in args], f"--out_dir={trained_dir}", "--resume", timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], p.stderr
    assert _tree_digest(trained_dir) == before


# -----------------------------------------------------------------------------
# sample.py


def run_sample(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), *args], cwd=HERE,
                          env=ENV, capture_output=True, text=True, timeout=timeout)


def pngs(out_dir, n):
    assert sorted(os.listdir(out_dir)) == [f"{i:03d}.png" for i in range(n)]
    return np.stack([np.asarray(Image.open(os.path.join(out_dir, f"{i:03d}.png")).convert("RGB")) for i in range(n)])


def lcm_one_step(sdxl, batches, seed, unet=None):
    """diffusers' own 1-step LCM sampling at t=399; batch b seeded with seed + b -> (N, 64, 64, 3) in [0, 1]."""
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl, **({"unet": unet} if unet is not None else {}))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = [pipe(prompt=p, num_inference_steps=1, timesteps=[399], guidance_scale=0, height=64, width=64,
                generator=torch.Generator("cpu").manual_seed(seed + b), output_type="np").images
           for b, p in enumerate(batches)]
    return np.concatenate(out)


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


def test_score_prints_the_clip_reward_of_the_saved_images(tiny, tmp_path, capsys):
    sdxl, reward = tiny
    prompts = ["a cat", "a dog", "a red cab"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n\n")
    out = tmp_path / "out"
    assert sample.main([f"--pretrained={sdxl}", f"--prompts={tmp_path / 'p.txt'}", "--batch_size=2", "--score",
                        f"--reward_model={reward}", f"--reward_processor={reward}", "--resolution=64",
                        f"--out_dir={out}"]) == 0
    stdout = capsys.readouterr().out
    printed = [(m[1], float(m[2]), m[3]) for m in re.finditer(r"^(\d{3}\.png) (-?\d+\.\d+) (.*)$", stdout, re.M)]
    assert [(f, p) for f, _, p in printed] == [(f"{i:03d}.png", p) for i, p in enumerate(prompts)]
    mean = float(re.search(r"^mean score (-?\d+\.\d+) over 3 images", stdout, re.M)[1])
    # independently: distar.ClipReward on the PNGs as written
    r = distar.ClipReward(reward, reward)
    images = torch.from_numpy(pngs(out, 3)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        expect = r(images, r.text_features(prompts))
    assert expect.std() > 1e-2 and abs(expect.mean()) > 1e-2  # so that the checks below have power
    assert np.allclose([s for _, s, _ in printed], expect.numpy(), atol=1e-4)
    assert abs(mean - expect.mean().item()) < 2e-4  # printed to 4 decimals


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
    assert np.abs(runs["gen"] - lcm_one_step(sdxl, [["a dog", "a dog"]], 7, unet=unet)).max() <= 1 / 255 + 1e-6
    assert np.array_equal(runs["pipe"], runs["default"])


def test_toy_checkpoint_gives_a_scatter_png(tmp_path):
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
    im = Image.open(tmp_path / "o" / "toy_samples.png").convert("RGB")
    assert im.size == (3 * 320, 320 + 24)
    colours = [(214, 39, 40), (31, 119, 180), (44, 160, 44)]
    x, y = (1 + 3.2) / 6.4 * 320, (3.2 + 1) / 6.4 * 320 + 24  # save_toy_png's mapping of (1, -1)
    assert [im.getpixel((round(k * 320 + x), round(y))) for k in range(3)] == colours


@pytest.mark.parametrize("case", ["missing_pretrained", "missing_generator", "missing_prompts", "empty_prompts",
                                  "missing_reward", "unknown_flag", "bad_value", "prompt_and_prompts"])
def test_bad_input_is_one_line_and_exit_2(tiny, tmp_path, capsys, case):
    sdxl, reward = tiny
    (tmp_path / "empty.txt").write_text("\n  \n")
    args = {"missing_pretrained": [f"--pretrained={tmp_path / 'nope'}"],
            "missing_generator": [f"--pretrained={sdxl}", f"--generator={tmp_path / 'nope'}"],
            "missing_prompts": [f"--pretrained={sdxl}", f"--prompts={tmp_path / 'nope.txt'}"],
            "empty_prompts": [f"--pretrained={sdxl}", f"--prompts={tmp_path / 'empty.txt'}"],
            "missing_reward": [f"--pretrained={sdxl}", "--score", f"--reward_model={tmp_path / 'nope'}",
                               f"--reward_processor={reward}"],
            "unknown_flag": ["--steps=4"],
            "bad_value": ["--resolution=60"],
            "prompt_and_prompts": ["--prompt=a", f"--prompts={tmp_path / 'empty.txt'}"]}[case]
    assert sample.main(["--resolution=64", f"--out_dir={tmp_path / 'o'}", *args]) == 2  # later flags win
    err = capsys.readouterr().err
    assert err.startswith("sample: error: ") and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "o" / "000.png")


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    for args in (["--bogus"], [f"--pretrained={tmp_path / 'nope'}", "--prompt=a"]):
        r = run_sample(*args, f"--out_dir={tmp_path / 'o'}")
        assert r.returncode == 2 and r.stdout == "", r
        assert r.stderr.startswith("sample: error: ") and r.stderr.count("\n") == 1, r.stderr
        assert "Traceback" not in r.stderr


# -----------------------------------------------------------------------------
# cost table

BENCH_VARIANTS = {(div, ckpt) for div in ("pseudo_huber", "l2", "kl", None) for ckpt in (False, True)}


def test_bench_command_prints_and_writes_the_cost_table(tiny, tmp_path):
    os.symlink(os.path.dirname(tiny[0]), tmp_path / "tiny")  # --tiny finds its models there, builds none
    r = run("--tiny", "--bench", "--bench_reps=2", "--bench_warmup=0", f"--out_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    lines = re.findall(r"^(generator|assistant) +(\S+) +(on|off) +([\d.]+) +([\d.]+)x$", r.stdout, re.M)
    assert {(div if div != "-" else None, ck == "on") for _, div, ck, _, _ in lines} == BENCH_VARIANTS, r.stdout
    rows = json.load(open(tmp_path / "bench.json"))["rows"]
    assert sorted(r["step"] for r in rows) == ["assistant"] * 2 + ["generator"] * 6
    assert {(r["divergence"], r["grad_checkpointing"]) for r in rows} == BENCH_VARIANTS
    kl = next(r for r in rows if r["divergence"] == "kl" and not r["grad_checkpointing"])
    assert kl["ratio"] == 1.0
    for row in rows:  # medians of the timed repetitions, as ratios to the KL step
        assert len(row["ms_reps"]) == 2 and row["ms"] == pytest.approx(np.median(row["ms_reps"]))
        assert row["ratio"] == pytest.approx(row["ms"] / kl["ms"]) and row["ms"] > 0
    assert sorted(os.listdir(tmp_path)) == ["bench.json", "tiny"]  # no checkpoint, metrics or samples


def test_bench_runs_every_variant_and_leaves_the_world_as_it_was(tiny, tmp_path, monkeypatch, capsys):
    """Each variant reaches the losses with its own divergence and checkpointing; one that runs
    out of GPU memory (l2 without checkpointing, here) is reported and the others go on."""
    world = _sdxl_world(tiny, "--bench", "--bench_reps=1", "--bench_warmup=0", f"--out_dir={tmp_path}")
    cfg, nets = world.cfg, (world.generator, world.assistant, world.s_ref, world.vae)
    before = {k: _state(m) for k, m in (("g", world.generator), ("psi", world.assistant))}
    seen = []  # (divergence, checkpointing on each net) as the loss functions see them

    def spy(fn, divergence):
        def wrapped(world, *args):
            seen.append((divergence(world), tuple(m.is_gradient_checkpointing for m in nets)))
            if seen[-1] == ("l2", (False,) * 4):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return fn(world, *args)
        return wrapped

    monkeypatch.setattr(distar, "generator_loss", spy(distar.generator_loss, lambda w: w.cfg.divergence))
    monkeypatch.setattr(distar, "assistant_loss", spy(distar.assistant_loss, lambda w: None))
    rows = distar.bench(world, torch.device("cpu"))
    assert len(seen) == len(rows) == 8
    assert {(div, ckpt[0]) for div, ckpt in seen} == BENCH_VARIANTS
    assert all(len(set(ckpt)) == 1 for _, ckpt in seen)  # all four nets toggled together
    assert re.search(r"^generator +l2 +off +out of memory +-$", capsys.readouterr().out, re.M)
    assert [(r["divergence"], r["grad_checkpointing"]) for r in rows if r["ms"] is None] == [("l2", False)]
    assert all(r["ratio"] > 0 for r in rows if r["ms"] is not None)
    assert world.cfg is cfg and not any(m.is_gradient_checkpointing for m in nets)
    for name, net in (("g", world.generator), ("psi", world.assistant)):
        assert all(torch.equal(v, before[name][k]) for k, v in _state(net).items()), name
        assert all(p.requires_grad and p.grad is None for p in net.parameters()), name


def test_grad_checkpointing_toggle_recomputes_in_backward(tiny):
    """With checkpointing on, every net on the gradient path runs its blocks again in backward;
    nets run under no_grad (the generator in the assistant step) do not."""
    world = _sdxl_world(tiny)  # --cfg=in: two reference passes
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
        distar.set_grad_checkpointing(world, on)
        assert count("generator") == dict(g=k, psi=k, ref=2 * k, vae=k)
        assert count("assistant") == dict(g=1, psi=k, ref=0, vae=0)


def test_bench_bad_input(monkeypatch, capsys):
    for args in (["--toy", "--bench"], ["--tiny", "--bench", "--bench_reps=0"], ["--bench", "--bench_warmup=-1"]):
        with pytest.raises(distar.ConfigError, match="--bench"):
            distar.parse_args(args)
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun: refused before anything is built
    assert distar.main(["--tiny", "--bench", "--out_dir=/nonexistent/never"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distar: error: --bench") and err.count("\n") == 1

