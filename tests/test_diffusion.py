"""GaussianDiffusion: closed forms, the drop-in contract with the reference class, analytic checks."""

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import seed_reference
from ddpm_fast import GaussianDiffusion, backends, losses, schedules

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- closed forms


def test_linear_schedule_closed_forms():
    d = GaussianDiffusion(backend="torch")
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    expected = {
        "betas": betas, "alphas": 1 - betas, "alphas_cumprod": abar, "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": abar.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt(),
        "posterior_variance": betas * (1 - abar_prev) / (1 - abar),
        "posterior_mean_coef1": betas * abar_prev.sqrt() / (1 - abar),
        "posterior_mean_coef2": (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar),
    }
    for name, value in expected.items():
        stored = getattr(d, name)
        assert stored.dtype == torch.float32, name
        torch.testing.assert_close(stored.double(), value, rtol=1e-6, atol=1e-12, msg=name)
    assert d.num_timesteps == 1000 and d.device is None
    assert d.posterior_variance[0] == 0


def test_cosine_schedule_matches_its_formula():
    d = GaussianDiffusion(num_timesteps=1000, schedule="cosine", backend="torch")
    s = 0.008
    f = lambda t: math.cos((t / 1000 + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = torch.tensor([f(t + 1) / f(0) for t in range(1000)], dtype=torch.float64)
    # beta is clipped at 0.999 only at the very end, where alpha_bar is ~0 anyway.
    torch.testing.assert_close(d.alphas_cumprod.double()[:990], expected[:990], rtol=1e-5, atol=1e-9)
    assert float(d.betas.max()) == pytest.approx(0.999)  # float32 of the float64 clip


def test_posterior_is_the_bayes_posterior():
    """q(x_{t-1} | x_t, x_0) from the tables equals the product-of-Gaussians posterior."""
    d = GaussianDiffusion(num_timesteps=50, backend="torch")
    x0, xt = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    t = torch.tensor([1, 20, 49])
    mean, var, _ = d.q_posterior_mean_variance(x0, xt, t)
    q = schedules.diffusion_quantities(schedules.linear_betas(50))  # float64 truth
    b, a_prev = q["betas"][t][:, None], q["alphas_cumprod_prev"][t][:, None]
    # N(x_t; sqrt(1-b) x, b) * N(x; sqrt(a_prev) x0, 1 - a_prev), as a Gaussian in x.
    precision = (1 - b) / b + 1 / (1 - a_prev)
    ref_mean = ((1 - b).sqrt() * xt / b + a_prev.sqrt() * x0 / (1 - a_prev)) / precision
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double().flatten(), (1 / precision).flatten(), rtol=1e-5, atol=1e-9)


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(100, generator=g, dtype=torch.float64), torch.randn(100, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(100, generator=g, dtype=torch.float64), torch.randn(100, generator=g, dtype=torch.float64)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(losses.normal_kl(m1, lv1, m2, lv2), ref)


def test_discretized_gaussian_likelihood_is_a_distribution():
    """Over the 256 levels of [-1, 1] the decoder probabilities sum to 1."""
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in ((0.1, -2.0), (-0.7, -4.0), (0.0, 0.5)):
        logp = losses.discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean),
                                                          torch.full_like(levels, log_scale))
        assert abs(logp.exp().sum().item() - 1) < 1e-3


# ----------------------------------------------------------------------------- the drop-in contract


# The reference class builds its schedule in float32 (1 - abar loses digits at small t); ours
# builds it in float64. Against the reference class, allow its float32 error.
SEED_TOL = dict(rtol=1e-3, atol=1e-5)


def _seed_and_ours(**kwargs):
    return seed_reference.GaussianDiffusion(device="cpu", **kwargs), GaussianDiffusion(backend="torch", **kwargs)


def test_same_attributes_as_reference_class():
    seed, ours = _seed_and_ours(num_timesteps=300, beta_start=2e-4, beta_end=0.03)
    for name in ("betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "posterior_variance", "posterior_mean_coef1",
                 "posterior_mean_coef2"):
        torch.testing.assert_close(getattr(ours, name), getattr(seed, name), **SEED_TOL, msg=name)
    assert ours.num_timesteps == seed.num_timesteps


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_same_results_as_reference_class(backend):
    seed = seed_reference.GaussianDiffusion(device="cpu")
    ours = GaussianDiffusion(backend=backend)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    model = lambda x, t: conv(x)  # noqa: E731

    torch.testing.assert_close(ours.q_sample(x0, t, noise), seed.q_sample(x0, t, noise), **SEED_TOL)
    for loss_type in ("mse", "l1"):
        torch.testing.assert_close(ours.p_losses(model, x0, t, noise, loss_type),
                                   seed.p_losses(model, x0, t, noise, loss_type), **SEED_TOL)
    mean, var = ours.p_mean_variance(model, x0, t)
    seed_mean, seed_var = seed.p_mean_variance(model, x0, t)
    torch.testing.assert_close(mean, seed_mean, **SEED_TOL)
    torch.testing.assert_close(var, seed_var, **SEED_TOL)
    # p_sample: the reference draws randn_like; give ours the same numbers.
    torch.manual_seed(3)
    seed_out = seed.p_sample(model, x0, t)
    torch.manual_seed(3)
    same_noise = torch.randn_like(x0)
    torch.testing.assert_close(ours.p_sample(model, x0, t, noise=same_noise), seed_out, **SEED_TOL)
    torch.testing.assert_close(ours._extract(ours.betas, t, x0.shape), seed._extract(seed.betas, t, x0.shape))


def test_torch_backend_draws_the_reference_class_noise():
    """With backend='torch' even the random streams match the reference class's."""
    seed, ours = _seed_and_ours(num_timesteps=20)
    model = lambda x, t: 0.1 * x  # noqa: E731
    torch.manual_seed(5)
    a = seed.p_sample_loop(model, (2, 3, 4, 4))
    torch.manual_seed(5)
    b = ours.p_sample_loop(model, (2, 3, 4, 4))
    torch.testing.assert_close(b, a, **SEED_TOL)


def test_reference_training_loop_runs_unchanged():
    """The reference train_diffusion_model, its SimpleUNet and a DataLoader, with our class."""
    torch.manual_seed(0)
    model = seed_reference.SimpleUNet(in_channels=3, model_channels=32)
    data = DataLoader(TensorDataset(torch.rand(8, 3, 32, 32) * 2 - 1, torch.zeros(8)), batch_size=4)
    diffusion = GaussianDiffusion(num_timesteps=20)  # the loop samples with p_sample_loop at epoch 10
    trained = seed_reference.train_diffusion_model(model, diffusion, data, num_epochs=10, lr=1e-3, device="cpu")
    assert trained is model
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------- analytic checks


class OptimalGaussianDenoiser(torch.nn.Module):
    """The exact E[eps | x_t] for data x0 ~ N(mu, s^2 I): x_t ~ N(sqrt(abar) mu, abar s^2 + 1 - abar)."""

    def __init__(self, diffusion, mu, s):
        super().__init__()
        self.abar = diffusion.alphas_cumprod.double()
        self.mu, self.s = mu, s

    def forward(self, x_t, t):
        abar = self.abar[t].reshape(-1, *([1] * (x_t.dim() - 1)))
        var = abar * self.s**2 + 1 - abar
        return ((1 - abar).sqrt() * (x_t.double() - abar.sqrt() * self.mu) / var).to(x_t.dtype)


MU, S = 0.3, 0.5


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_ddpm_and_ddim_reproduce_gaussian_data(backend):
    d = GaussianDiffusion(num_timesteps=1000, backend=backend)
    model = OptimalGaussianDenoiser(d, MU, S)
    g = torch.Generator().manual_seed(0)
    x = d.p_sample_loop(model, (8, 4096), generator=g)
    assert abs(x.mean().item() - MU) < 0.02 and abs(x.std().item() - S) < 0.02
    for eta in (0.0, 1.0):
        # Fewer steps under-disperse (50 steps: std 0.47 for 0.5); 250 are within 3%.
        x = d.ddim_sample_loop(model, (8, 4096), num_steps=250, eta=eta, generator=g)
        assert abs(x.mean().item() - MU) < 0.02 and abs(x.std().item() - S) < 0.02, eta


def test_bpd_matches_closed_form_gaussian_kls():
    T = 100
    d = GaussianDiffusion(num_timesteps=T, backend="torch")
    model = OptimalGaussianDenoiser(d, MU, S)
    g = torch.Generator().manual_seed(0)
    x0 = MU + S * torch.randn(16, 4096, generator=g)
    out = d.calc_bpd_loop(model, x0, generator=g)
    assert out["vb"].shape == (16, T) and out["total_bpd"].shape == (16,) and out["prior_bpd"].shape == (16,)

    abar = d.alphas_cumprod.double()
    # E[L_{t-1}] = coef1^2 Var(x0 | x_t) / (2 posterior variance), per dim, in bits.
    var_x0_given_xt = S**2 * (1 - abar) / (abar * S**2 + 1 - abar)
    expected_vb = d.posterior_mean_coef1.double() ** 2 * var_x0_given_xt / (2 * d.posterior_variance.double()) / LN2
    measured_vb = out["vb"].double().mean(0)
    torch.testing.assert_close(measured_vb[1:], expected_vb[1:], rtol=0.03, atol=1e-6)
    # L_T = KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)) averaged over x0 ~ N(mu, s^2).
    aT = abar[-1]
    expected_prior = 0.5 * (-1 - torch.log(1 - aT) + (1 - aT) + aT * (MU**2 + S**2)) / LN2
    assert abs(out["prior_bpd"].double().mean() - expected_prior) < 0.01 * expected_prior
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])


def test_score_is_the_gaussian_score():
    d = GaussianDiffusion(num_timesteps=1000, backend="torch")
    model = OptimalGaussianDenoiser(d, MU, S)
    x_t, t = torch.randn(3, 10, dtype=torch.float64), torch.tensor([5, 400, 999])
    abar = d.alphas_cumprod.double()[t][:, None]
    expected = -(x_t - abar.sqrt() * MU) / (abar * S**2 + 1 - abar)
    torch.testing.assert_close(d.score(model, x_t, t), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction_type", schedules.PREDICTION_TYPES)
def test_oracle_model_recovers_the_posterior(prediction_type):
    """A model that returns the true target (eps, x0 or v) gives the true posterior mean."""
    d = GaussianDiffusion(prediction_type=prediction_type, backend="torch")
    x0, noise = torch.rand(4, 3, 5, 5) * 2 - 1, torch.randn(4, 3, 5, 5)
    t = torch.tensor([1, 10, 300, 999])
    x_t = d.q_sample(x0, t, noise)
    oracle = lambda x, tt: d.training_target(x0, tt, noise)  # noqa: E731
    mean, _ = d.p_mean_variance(oracle, x_t, t)
    true_mean, _, _ = d.q_posterior_mean_variance(x0, x_t, t)
    torch.testing.assert_close(mean, true_mean, rtol=1e-3, atol=1e-3)
    assert d.p_losses(oracle, x0, t, noise).item() < 1e-10
    # With clipping and a perfect x0 prediction, the last DDIM step lands on x0.
    out = d.ddim_sample(oracle, x_t, t, torch.full_like(t, -1), clip_denoised=True)
    torch.testing.assert_close(out, x0, rtol=1e-3, atol=2e-3)


def test_vlb_loss_is_the_weighted_eps_objective():
    """For t > 0 the VLB term is beta^2 / (2 sigma^2 alpha (1 - abar)) ||eps - eps_theta||^2 (seed 3.6)."""
    d = GaussianDiffusion(backend="torch")
    x0, noise = torch.rand(1, 3, 8, 8, dtype=torch.float64) * 2 - 1, torch.randn(1, 3, 8, 8, dtype=torch.float64)
    eps_theta = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    for step in (1, 50, 700):
        t = torch.tensor([step])
        vlb = d.p_losses(lambda x, tt: eps_theta, x0, t, noise, loss_type="vlb")
        b, a, abar = (getattr(d, n).double()[step] for n in ("betas", "alphas", "alphas_cumprod"))
        weight = b**2 / (2 * d.posterior_variance.double()[step] * a * (1 - abar))
        expected = weight * ((noise - eps_theta) ** 2).mean() / LN2
        assert abs(vlb.item() - expected.item()) < 1e-3 * expected.item()


def test_sampling_is_reproducible_with_a_generator():
    d = GaussianDiffusion(num_timesteps=10)
    model = lambda x, t: 0.5 * x  # noqa: E731
    run = lambda: d.p_sample_loop(model, (2, 3, 4, 4), generator=torch.Generator().manual_seed(1))  # noqa: E731
    assert torch.equal(run(), run())
    final, steps = d.p_sample_loop(model, (2, 3, 4, 4), return_intermediates=True, progress=True)
    assert len(steps) == 10 and steps[-1] is final


# ----------------------------------------------------------------------------- bad input


def test_bad_arguments_name_themselves():
    d = GaussianDiffusion(num_timesteps=10, backend="torch")
    x = torch.randn(2, 3, 4, 4)
    model = lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError, match=r"t must lie in \[0, 10\), got values from 3 to 10"):
        d.q_sample(x, torch.tensor([3, 10]))
    with pytest.raises(TypeError, match="t must be an integer tensor"):
        d.q_sample(x, torch.tensor([0.5, 1.0]))
    with pytest.raises(TypeError, match="t must be a torch.Tensor"):
        d.q_sample(x, 3)
    with pytest.raises(ValueError, match=r"t must have shape \[batch_size\] = \[2\], got \[3\]"):
        d.p_sample(model, x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="loss_type must be one of .* got 'huber'"):
        d.p_losses(model, x, torch.tensor([1, 2]), loss_type="huber")
    with pytest.raises(ValueError, match="schedule must be one of .* got 'quadratic'"):
        GaussianDiffusion(schedule="quadratic")
    with pytest.raises(ValueError, match="prediction_type must be one of .* got 'score'"):
        GaussianDiffusion(prediction_type="score")
    with pytest.raises(ValueError, match="variance_type must be one of .* got 'learned'"):
        GaussianDiffusion(variance_type="learned")
    with pytest.raises(ValueError, match="backend must be one of .* got 'cudnn'"):
        GaussianDiffusion(backend="cudnn")
    with pytest.raises(ValueError, match="num_timesteps must be a positive int, got 0"):
        GaussianDiffusion(num_timesteps=0)
    with pytest.raises(ValueError, match="betas must lie in"):
        GaussianDiffusion(betas=[0.1, 1.5])
    with pytest.raises(ValueError, match="num_steps must be an int in"):
        d.ddim_sample_loop(model, (1, 3, 4, 4), num_steps=11)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0, got -1"):
        d.ddim_sample(model, x, torch.tensor([5, 5]), torch.tensor([2, 2]), eta=-1)
    with pytest.raises(ValueError, match="t_prev"):
        d.ddim_sample(model, x, torch.tensor([5, 5]), torch.tensor([2, -2]))
    with pytest.raises(ValueError, match="must return a tensor of x_t's shape"):
        d.p_sample(lambda x, t: x[:, :1], x, torch.tensor([1, 2]))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' was asked for but CUDA is not available"):
            GaussianDiffusion(device="cuda")


def test_backend_choice(monkeypatch):
    x = torch.randn(2, 3)
    with pytest.raises(backends.BackendUnavailableError, match="backend='cuda' cannot run on cpu tensors"):
        GaussianDiffusion(backend="cuda").q_sample(x, torch.tensor([1, 2]))
    d = GaussianDiffusion()
    monkeypatch.setenv("DDPM_FAST_BACKEND", "torch")
    assert backends.resolve(d.backend, x.device) == "torch"
    d.backend = "cpu"  # an explicit argument wins over the environment
    assert d.backend == "cpu"
    monkeypatch.setenv("DDPM_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="environment variable DDPM_FAST_BACKEND must be one of"):
        GaussianDiffusion().q_sample(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="backend must be one of"):
        d.backend = "fastest"
