"""How fast this machine makes attacks: ``closedloop bench``.

Measured on one IT model (backbone cut at its layer + readout) with the same batch throughout,
after a warm-up, with the thread count left as it is, as medians over repeats:

- bare forward + backward: the model's forward and the gradient of the site objective with
  respect to the input images (parameters frozen, exactly the work one attack step needs);
- the attack engine (:func:`closedloop.attacks.engine.compute_pgd`) on the same batch and objective;
- ``attack_over_fwd_bwd``: attack time per image-step ÷ bare forward+backward time per image;
- the batched per-site attacks (:func:`closedloop.attacks.sites.make_site_attacks`, all jobs packed)
  against a naive loop over sites, images and directions that makes one attack at a time with the
  same engine, end to end (clean predictions, 8-bit output, final predictions);
- the estimated attack time of a paper-size day: 21 sites × 42 images × 5 budgets × 2 directions
  × 100 steps image-steps at the measured engine speed.

``closedloop bench --peers`` (:func:`compute_peer_bench`) times the day's site attacks end to end
against torchattacks' PGDL2 doing the same work on the same model, images, ε, steps and step size,
and the time each of torchattacks' PGDL2 and APGD needs for its objective against the time the
site attacks need to reach that same objective.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np
import torch

from closedloop.attacks.engine import (
    STEP_RULES,
    compute_pgd,
    compute_predictions,
    compute_realised_eps,
    make_attack_runner,
    make_run_settings,
    quantize_within_budget,
    resolve_precision,
)
from closedloop.attacks.sites import SITE_TARGET, make_site_attacks
from closedloop.core.logs import logger
from closedloop.core.validation import check_device, check_integer, check_number, check_option
from closedloop.images import from_tensor, to_tensor

__all__ = ["PAPER_DAY", "TORCHATTACKS_INSTALL", "compute_bench", "compute_peer_bench"]

PAPER_DAY = {"n_sites": 21, "n_images": 42, "n_budgets": 5, "n_directions": 2, "n_steps": 100}
_EPS = 1.0
TORCHATTACKS_INSTALL = "pip install --no-deps torchattacks==3.5.1"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(work: Callable[[], object], device: torch.device) -> float:
    start = time.perf_counter()
    work()
    _synchronize(device)
    return time.perf_counter() - start


def _interleaved_seconds(works: dict[str, Callable[[], object]], n_repeats: int, device) -> dict[str, np.ndarray]:
    """Wall times of several pieces of work, s, (n_repeats,) each: one warm-up run each, then timed
    runs in turn, the order rotating every repeat, so that all see the same load on a shared machine."""
    for work in works.values():
        work()
    _synchronize(device)
    names, times = list(works), {name: [] for name in works}
    for repeat in range(n_repeats):
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            times[name].append(_seconds(works[name], device))
    return {name: np.array(values) for name, values in times.items()}


def _site_objective(n_images: int, n_sites: int, device: torch.device):
    site = torch.arange(n_images, device=device) % n_sites
    rows = torch.arange(n_images, device=device)
    return lambda predicted: (predicted[rows, site] - SITE_TARGET) ** 2


def _fwd_bwd(model, images: torch.Tensor, objective, n_steps: int, autocast: bool) -> None:
    """``n_steps`` bare forward + input-gradient passes on the same batch."""
    for _ in range(n_steps):
        x = images.detach().requires_grad_(True)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast):
            predicted = model(x).float()
        torch.autograd.grad(objective(predicted).sum(), x)


def _per_site_loop(model, runner, pixels, image_index, site, n_steps: int, seed: int, device, settings) -> None:
    """The naive reference: site by site, image by image, direction by direction, one attack at a time.

    Same engine and same end-to-end work as :func:`make_site_attacks` (clean prediction, PGD with a
    random start on ``runner``, budget-safe 8-bit output, prediction on it with ``model``), each
    attack a batch of one image.
    """
    generator = torch.Generator().manual_seed(seed)
    for target_site in np.unique(site):
        for image in image_index[site == target_site]:
            clean = pixels[image : image + 1]
            compute_predictions(model, clean, device=device)
            for sign in (1.0, -1.0):
                result = compute_pgd(
                    runner, to_tensor(clean, device), eps=_EPS, step_size=_EPS / 3, n_steps=n_steps,
                    objective=lambda predicted, s=target_site, t=sign * SITE_TARGET: (predicted[:, s] - t) ** 2,
                    random_start=True, generator=generator, autocast=settings.autocast,
                    channels_last=settings.channels_last,
                )
                compute_predictions(model, quantize_within_budget(from_tensor(result.images), clean, _EPS), device=device)


def _prepare(model: torch.nn.Module, device: torch.device) -> None:
    model.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def compute_bench(
    model: torch.nn.Module,
    *,
    batch_size: int = 32,
    n_steps: int = 20,
    n_repeats: int = 5,
    n_loop_repeats: int = 3,
    n_loop_sites: int = 3,
    n_loop_images: int = 2,
    image_size: int = 224,
    device="cpu",
    precision: str = "auto",
    channels_last: bool = True,
    compile_model: bool = False,
    seed: int = 0,
) -> dict:
    """Benchmark the attack engine on ``model`` (float images (N, 3, H, W) in [0, 1] → (N, n_sites)).

    ``batch_size``: images per batch for every measurement; ``n_steps``: steps per timed run;
    ``n_repeats`` / ``n_loop_repeats``: timed runs of the engine / of the batched-vs-loop comparison
    (medians reported, runs alternating); ``n_loop_sites`` ×
    ``n_loop_images``: jobs of the batched-vs-loop comparison; ``image_size``: px. ``precision``
    (``"auto"``, ``"fp32"``, ``"bf16"``), ``channels_last`` and ``compile_model``
    set how the attack steps run (:func:`~closedloop.attacks.engine.make_run_settings`), for the
    bare forward+backward and the engine alike. Returns a JSON-ready dict of seconds and ratios
    (keys documented in docs/attacks.md).
    """
    for name, value, low in (("batch_size", batch_size, 1), ("n_steps", n_steps, 1), ("n_repeats", n_repeats, 1),
                             ("n_loop_repeats", n_loop_repeats, 1),
                             ("n_loop_sites", n_loop_sites, 1), ("n_loop_images", n_loop_images, 1),
                             ("image_size", image_size, 16), ("seed", seed, 0)):
        check_integer(name, value, minimum=low)
    device = check_device("device", device)
    settings = make_run_settings(precision, device, channels_last=channels_last)
    _prepare(model, device)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
    images = settings.prepare(to_tensor(pixels, device))
    runner = make_attack_runner(model, device, settings, example=images[:2], compile_model=compile_model)
    with torch.no_grad():
        n_sites = model(images[:1].contiguous()).shape[1]
    objective = _site_objective(batch_size, n_sites, device)
    engine = dict(eps=_EPS, step_size=_EPS / 3, n_steps=n_steps, objective=objective, random_start=True,
                  autocast=settings.autocast, channels_last=settings.channels_last)

    logger.info("bench: bare forward+backward and attack engine, batch %d, %d steps, %d repeats", batch_size, n_steps, n_repeats)
    engine_times = _interleaved_seconds({
        "fwd_bwd": lambda: _fwd_bwd(runner, images, objective, n_steps, settings.autocast),
        "attack": lambda: compute_pgd(runner, images, generator=seed, **engine),
    }, n_repeats, device)
    fwd_bwd_per_image, attack_per_image_step = (np.median(engine_times[k]) / (batch_size * n_steps) for k in ("fwd_bwd", "attack"))

    logger.info("bench: batched site attacks vs a per-site loop, %d jobs", n_loop_sites * n_loop_images)
    site = np.repeat(np.arange(n_loop_sites) % n_sites, n_loop_images)
    image_index = np.tile(np.arange(n_loop_images) % batch_size, n_loop_sites)
    attacks = dict(n_steps=n_steps, seed=seed, device=device, precision=precision, channels_last=settings.channels_last)
    loop_times = _interleaved_seconds({
        "batched": lambda: make_site_attacks(model, pixels, image_index, site, _EPS, batch_size=batch_size, **attacks),
        "loop": lambda: _per_site_loop(model, runner, pixels, image_index, site, n_steps, seed, device, settings),
    }, n_loop_repeats, device)
    batched_s, loop_s = (float(np.median(loop_times[k])) for k in ("batched", "loop"))
    day_image_steps = int(np.prod(list(PAPER_DAY.values())))
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "image_size": image_size,
        "n_sites": int(n_sites),
        "n_steps": n_steps,
        "n_repeats": n_repeats,
        "n_loop_repeats": n_loop_repeats,
        "precision": resolve_precision(precision, device),
        "channels_last": settings.channels_last,
        "batch_norm_folded": settings.fold_batch_norm,
        "compile": compile_model,
        "fwd_bwd_s_per_image": float(fwd_bwd_per_image),
        "fwd_bwd_images_per_s": float(1.0 / fwd_bwd_per_image),
        "attack_s_per_image_step": float(attack_per_image_step),
        "attack_image_steps_per_s": float(1.0 / attack_per_image_step),
        "attack_over_fwd_bwd": float(attack_per_image_step / fwd_bwd_per_image),
        "attack_over_fwd_bwd_of_minima": float(engine_times["attack"].min() / engine_times["fwd_bwd"].min()),
        "loop_jobs": int(len(site)),
        "batched_s": batched_s,
        "per_site_loop_s": loop_s,
        "batched_speedup_vs_per_site_loop": loop_s / batched_s,
        "batched_speedup_of_minima": float(loop_times["loop"].min() / loop_times["batched"].min()),
        "paper_day": dict(PAPER_DAY),
        "paper_day_image_steps": day_image_steps,
        "paper_day_estimated_s": float(day_image_steps * attack_per_image_step),
        "paper_day_estimated_h": float(day_image_steps * attack_per_image_step / 3600.0),
    }


# ---------------------------------------------------------------------------------------------
# Peers: the same site attacks with torchattacks


class _SiteLogits(torch.nn.Module):
    """What the peer attacks: two logits [C + d·s, 0] per image, s the prediction of that image's
    site, d = ±1 its direction, C = SITE_TARGET.

    Untargeted attacks raise the cross-entropy of label 1, softplus(C + d·s) = C + d·s to float
    precision, so the peer's ascent follows d ∇s as the site attack's descent of (s − d·1000)² does,
    with a gradient that never vanishes (a logit pair [s, −s] would saturate the cross-entropy of
    the decrease direction once s passes ~8). ``site``, ``direction``: (N,) of the next batch. Made
    in eval mode: torchattacks puts a model it found in train mode back into train mode after each
    attack, and a BatchNorm in train mode would change the model's running statistics.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.site = torch.zeros(0, dtype=torch.long)
        self.direction = torch.zeros(0)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        s = self.model(images)[torch.arange(len(images), device=images.device), self.site]
        return torch.stack([SITE_TARGET + self.direction * s, torch.zeros_like(s)], dim=1)


def _import_torchattacks():
    try:
        import torchattacks
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"closedloop bench --peers compares with torchattacks, which is not installed; install it with "
            f"`{TORCHATTACKS_INSTALL}` (--no-deps: its metadata pins requests 2.25, which only its unused "
            "download helpers need; torch, torchvision, scipy and tqdm are already here)"
        ) from None
    return torchattacks


PEERS = ("pgd", "apgd")


def _torchattacks_site_attacks(model, pixels, image_index, site, eps, n_steps, batch_size, seed, device, peer="pgd"):
    """The site attacks made with torchattacks (``peer``: ``"pgd"``, its PGDL2 with step ε/3 from a
    random start; ``"apgd"``, its APGD-L2 with the cross-entropy loss, one restart, the best-loss
    iterate kept), end to end as :func:`make_site_attacks` does: clean predictions, both directions
    per job, the project's exact 8-bit rounding, predictions on the 8-bit images, the direction
    with the larger predicted change kept. Returns that change per job, |Δ f_site| (n_jobs,),
    spikes per window, and the realised ε of the kept images (n_jobs,)."""
    torchattacks = _import_torchattacks()
    used = np.unique(image_index)
    predicted_used = compute_predictions(model, pixels[used], batch_size=batch_size, device=device)
    clean_predicted = np.zeros((len(pixels), predicted_used.shape[1]), np.float32)
    clean_predicted[used] = predicted_used
    view = _SiteLogits(model)
    if peer == "apgd":
        attack = torchattacks.APGD(view, norm="L2", eps=eps, steps=n_steps, n_restarts=1, loss="ce", seed=seed)
        run = lambda images, labels: attack.perturb(images, labels, best_loss=True)[1]  # noqa: E731
    else:
        run = torchattacks.PGDL2(view, eps=eps, alpha=eps / 3, steps=n_steps, random_start=True)
    n_jobs, jobs_per_batch = len(image_index), max(1, batch_size // 2)
    change, realised = np.empty(n_jobs), np.empty(n_jobs)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # both draw from the global generator
        torch.manual_seed(seed)
        for begin in range(0, n_jobs, jobs_per_batch):
            jobs = np.arange(begin, min(begin + jobs_per_batch, n_jobs))
            pairs, signs = np.repeat(jobs, 2), np.tile([1.0, -1.0], len(jobs))
            view.site = torch.as_tensor(site[pairs], device=device)
            view.direction = torch.as_tensor(signs, dtype=torch.float32, device=device)
            clean = pixels[image_index[pairs]]
            adversarial = run(to_tensor(clean, device), torch.ones(len(pairs), dtype=torch.long, device=device))
            attacked = quantize_within_budget(from_tensor(adversarial.detach()), clean, eps)
            outputs = compute_predictions(model, attacked, batch_size=len(attacked), device=device)
            pair_change = np.abs(outputs[np.arange(len(pairs)), site[pairs]] - clean_predicted[image_index[pairs], site[pairs]])
            keep = 2 * np.arange(len(jobs)) + (pair_change[1::2] > pair_change[0::2])
            change[jobs] = pair_change[keep]
            realised[jobs] = compute_realised_eps(attacked[keep], clean[keep])
    return change, realised


# Our step counts tried, in order, for the fewest that reach a peer's objective (time to objective).
_STEP_LADDER = (5, 10, 15, 20, 25, 30, 40, 50, 60, 80, 100, 120, 150, 200, 250, 300)


def _steps_to_reach(target: float, attack: Callable[[int], np.ndarray], most: int) -> tuple[int | None, float]:
    """The fewest steps of the ladder (up to ``most``) whose mean objective ``attack(steps)`` reaches
    ``target``, and that objective; (None, the objective at ``most``) when none does."""
    reached = 0.0
    for steps in [s for s in _STEP_LADDER if s < most] + [most]:
        reached = float(attack(steps).mean())
        if reached >= target:
            return steps, reached
    return None, reached


def _quartiles(ratios: np.ndarray) -> dict:
    return {"median": float(np.median(ratios)), "quartiles": np.quantile(ratios, [0.25, 0.75]).tolist(),
            "min": float(ratios.min()), "max": float(ratios.max())}


def compute_peer_bench(
    model: torch.nn.Module,
    *,
    n_jobs: int = 16,
    n_steps: int = 20,
    n_repeats: int = 5,
    batch_size: int = 32,
    eps: float = _EPS,
    image_size: int = 224,
    device="cpu",
    precision: str = "auto",
    step_rule: str = "apgd",
    seed: int = 0,
) -> dict:
    """The day's site attacks against torchattacks on the same work, end to end.

    ``model``: float images (N, 3, H, W) in [0, 1] → (N, n_sites). All contenders make ``n_jobs``
    (image, site) attacks on seeded random 8-bit images of ``image_size`` px, both directions each,
    within L2 budget ``eps`` ([0, 1] pixel units) from a random start, ``batch_size`` images per
    batch; every output gets the project's exact 8-bit rounding (so all keep ‖δ‖ ≤ ε on the shown
    image) and predictions on it. :func:`make_site_attacks` runs with ``precision`` (its default:
    "auto"); torchattacks runs the model as given, float32.

    Two comparisons, timed in one interleaved series of ``n_repeats`` runs (with a bare float32
    forward+backward of one batch):

    - at equal steps: :func:`make_site_attacks` (the paper's rule, ``n_steps`` steps of ε/3)
      against torchattacks' PGDL2 with the same steps and step size (``speedup_vs_torchattacks``);
    - time to objective: torchattacks' PGDL2 and APGD-L2 at ``n_steps`` (the day's step count)
      each reach a mean objective; :func:`make_site_attacks` with ``step_rule`` takes the fewest
      steps of a ladder (5, 10, 15, …, up to 3 × ``n_steps``) that reach the same, and the ratio
      of the peer's time to ours is ``time_to_objective_vs_torchattacks`` /
      ``time_to_objective_vs_apgd`` (medians of the paired ratios; quartiles, min and max under
      ``time_to_objective``).

    The objective is the mean over jobs of the predicted |Δ f_site| of the kept direction on the
    8-bit image (spikes per window). Returns a JSON-ready dict (keys in docs/attacks.md).
    """
    torchattacks = _import_torchattacks()
    for name, value, low in (("n_jobs", n_jobs, 1), ("n_steps", n_steps, 1), ("n_repeats", n_repeats, 1),
                             ("batch_size", batch_size, 2), ("image_size", image_size, 16), ("seed", seed, 0)):
        check_integer(name, value, minimum=low)
    eps = check_number("eps", eps, minimum=0.0, inclusive=False)
    step_rule = check_option("step_rule", step_rule, STEP_RULES)
    device = check_device("device", device)
    resolved = resolve_precision(precision, device)
    _prepare(model, device)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n_jobs, image_size, image_size, 3), dtype=np.uint8)
    with torch.no_grad():
        n_sites = model(to_tensor(pixels[:1], device)).shape[1]
    image_index, site = np.arange(n_jobs), np.arange(n_jobs) % n_sites
    images = to_tensor(pixels[np.arange(batch_size) % n_jobs], device)
    objective = _site_objective(batch_size, n_sites, device)
    outcome = {}

    def ours(steps: int, rule: str):
        return make_site_attacks(model, pixels, image_index, site, eps, n_steps=steps, step_rule=rule,
                                 batch_size=batch_size, seed=seed, device=device, precision=precision)

    def change(made) -> np.ndarray:
        """Predicted |Δ f_site| of each job's kept direction, (n_jobs,)."""
        return np.abs(made.predicted - made.predicted_clean)[np.arange(n_jobs), site]

    def peer(name: str) -> None:
        outcome[name] = _torchattacks_site_attacks(model, pixels, image_index, site, eps, n_steps, batch_size, seed,
                                                   device, peer=name)

    logger.info("bench --peers: %d jobs × 2 directions, %d steps: the peers' objectives, then ours to reach them",
                n_jobs, n_steps)
    to_objective = {}
    for name in PEERS:
        peer(name)
        target = float(outcome[name][0].mean())
        steps, reached = _steps_to_reach(target, lambda k: change(ours(k, step_rule)), 3 * n_steps)
        to_objective[name] = {"peer_objective": target, "steps": steps, "objective": reached}
    load_before = os.getloadavg()[0]
    logger.info("bench --peers: %d timed repeats", n_repeats)
    works = {
        "site_attacks": lambda: outcome.update(ours=ours(n_steps, "pgd")),
        "torchattacks": lambda: peer("pgd"),
        "torchattacks_apgd": lambda: peer("apgd"),
        "fwd_bwd": lambda: _fwd_bwd(model, images, objective, 1, autocast=False),
    }
    for name in PEERS:
        if to_objective[name]["steps"] is not None:
            works[f"to_objective_{name}"] = lambda k=to_objective[name]["steps"]: ours(k, step_rule)
    times = _interleaved_seconds(works, n_repeats, device)
    ratios = times["torchattacks"] / times["site_attacks"]
    for name, peer_key in zip(PEERS, ("torchattacks", "torchattacks_apgd")):
        entry = to_objective[name]
        entry["peer_s"] = float(np.median(times[peer_key]))
        if entry["steps"] is None:
            entry["ours_s"], entry["ratio"] = None, None
            continue
        entry["ours_s"] = float(np.median(times[f"to_objective_{name}"]))
        entry["ratio"] = _quartiles(times[peer_key] / times[f"to_objective_{name}"])
    made = outcome["ours"]
    ours_change = change(made)
    peer_change, peer_realised = outcome["pgd"]
    image_steps = 2 * n_jobs * n_steps
    fwd_bwd_per_image = float(np.median(times["fwd_bwd"])) / batch_size
    return {
        "peer": f"torchattacks {torchattacks.__version__} PGDL2 and APGD (L2, cross-entropy)",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "load_average": [load_before, os.getloadavg()[0]],
        "precision": resolved,
        "batch_size": batch_size,
        "image_size": image_size,
        "n_sites": int(n_sites),
        "n_jobs": n_jobs,
        "n_images": 2 * n_jobs,
        "n_steps": n_steps,
        "eps": eps,
        "step_size": eps / 3,
        "n_repeats": n_repeats,
        "rounding": "the project's exact 8-bit rounding on every output (all keep ||delta|| <= eps when shown)",
        "site_attacks_s": float(np.median(times["site_attacks"])),
        "torchattacks_s": float(np.median(times["torchattacks"])),
        "speedup_vs_torchattacks": float(np.median(ratios)),
        "speedup_min": float(ratios.min()),
        "speedup_max": float(ratios.max()),
        "speedup_quartiles": np.quantile(ratios, [0.25, 0.75]).tolist(),
        "fwd_bwd_fp32_s_per_image": fwd_bwd_per_image,
        "site_attack_s_per_image_step": float(np.median(times["site_attacks"])) / image_steps,
        "site_attack_over_fwd_bwd": float(np.median(times["site_attacks"])) / image_steps / fwd_bwd_per_image,
        "objective_site_attacks": float(ours_change.mean()),
        "objective_torchattacks": float(peer_change.mean()),
        "objective_ratio": float(ours_change.mean() / peer_change.mean()),
        "realised_eps_max_site_attacks": float(made.realised_eps.max()),
        "realised_eps_max_torchattacks": float(peer_realised.max()),
        "time_to_objective_step_rule": step_rule,
        "time_to_objective": to_objective,
        "time_to_objective_vs_torchattacks": _median_or_none(to_objective["pgd"]),
        "time_to_objective_vs_apgd": _median_or_none(to_objective["apgd"]),
    }


def _median_or_none(entry: dict) -> float | None:
    return None if entry["ratio"] is None else entry["ratio"]["median"]
