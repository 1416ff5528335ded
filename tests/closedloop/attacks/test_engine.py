"""The L2 PGD engine, budget-safe 8-bit output, the step schedule and batched inference (small CPU models)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from closedloop.attacks.engine import (
    RowSelection,
    RunSettings,
    compute_apgd_checkpoints,
    compute_batch_size,
    compute_pgd,
    compute_predictions,
    compute_step_schedule,
    fold_batch_norm,
    has_native_bf16,
    make_attack_pixels,
    make_attack_runner,
    make_run_settings,
    quantize_within_budget,
    resolve_precision,
)
from closedloop.images import to_tensor
from tests.closedloop.attacks.conftest import TinyNet, check_budget, make_images


def _norms(adversarial: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm((adversarial - clean).flatten(1), dim=1)


# --------------------------------------------------------------------------------- engine


@pytest.mark.parametrize("step_rule", ["pgd", "apgd"])
def test_pgd_respects_each_budget_and_pixel_range(step_rule):
    model = TinyNet(4)
    clean = to_tensor(make_images(5))
    eps = torch.tensor([0.05, 0.3, 1.0, 3.0, 50.0])
    result = compute_pgd(model, clean, eps=eps, step_size=eps / 3, n_steps=15, step_rule=step_rule,
                         objective=lambda out: -out[:, 0], random_start=True, n_restarts=2, generator=3)
    assert (_norms(result.images, clean) <= eps * (1 + 1e-5)).all()
    assert result.images.min() >= 0 and result.images.max() <= 1
    assert (result.loss < result.start_loss).all()


def test_pgd_best_iterate_is_never_worse_than_start_and_matches_its_loss():
    model = TinyNet(4)
    clean = to_tensor(make_images(6, seed=1))
    # a huge step overshoots: later iterates are worse than the start, the best must still be kept
    objective = lambda out: (out[:, 1] - 0.0) ** 2  # noqa: E731
    for options in ({}, {"step_shrink": 0.9, "n_step_resets": 4}, {"step_rule": "apgd"}):
        result = compute_pgd(model, clean, eps=20.0, step_size=20.0, n_steps=8, objective=objective, **options)
        assert (result.loss <= result.start_loss).all()
        with torch.no_grad():
            model.eval()
            torch.testing.assert_close(objective(model(result.images)), result.loss, rtol=1e-4, atol=1e-4)


def test_pgd_images_are_independent_and_model_state_is_restored():
    model = TinyNet(3)
    model.train()
    clean = to_tensor(make_images(3, seed=2))
    eps = torch.tensor([0.2, 0.5, 1.0])
    together = compute_pgd(model, clean, eps=eps, step_size=eps / 4, n_steps=10, objective=lambda out: out[:, 2])
    assert model.training and all(p.requires_grad for p in model.parameters())
    for row in range(3):
        alone = compute_pgd(model, clean[row : row + 1], eps=eps[row], step_size=eps[row] / 4, n_steps=10,
                            objective=lambda out: out[:, 2])
        torch.testing.assert_close(alone.images[0], together.images[row], atol=1e-4, rtol=0)


def test_pgd_descends_and_ascends():
    model = TinyNet(2)
    clean = to_tensor(make_images(4, seed=3))
    with torch.no_grad():
        start = model.eval()(clean)[:, 0]
    down = compute_pgd(model, clean, eps=1.0, step_size=0.3, n_steps=10, objective=lambda out: out[:, 0])
    up = compute_pgd(model, clean, eps=1.0, step_size=0.3, n_steps=10, objective=lambda out: -out[:, 0])
    assert (down.loss < start - 0.1).all() and (-up.loss > start + 0.1).all()


def test_apgd_checkpoints_follow_croce_and_hein():
    assert compute_apgd_checkpoints(20) == [5, 9, 12, 14, 16, 18, 19, 20]
    assert compute_apgd_checkpoints(100)[:4] == [22, 41, 57, 70] and compute_apgd_checkpoints(100)[-1] == 99
    assert compute_apgd_checkpoints(1) == [1]


def test_apgd_reaches_further_than_pgd_in_the_same_steps():
    # A budget where the fixed eps/3 step has not converged after 10 steps (it reaches about 94% of
    # its 100-step objective): APGD's halving steps and momentum reach further (about 97%) from the
    # same random starts, inside the same budgets.
    model = TinyNet(3)
    clean = to_tensor(make_images(16, seed=4))
    runs = {rule: compute_pgd(model, clean, eps=3.0, step_size=1.0, n_steps=10, objective=lambda out: -out[:, 1],
                              step_rule=rule, random_start=True, generator=1) for rule in ("pgd", "apgd")}
    assert runs["apgd"].loss.mean() < runs["pgd"].loss.mean() < 0
    assert (_norms(runs["apgd"].images, clean) <= 3.0 * (1 + 1e-5)).all()


class _Column:
    """−out[:, column] per image, with take() so that a RowSelection can compact the batch."""

    def __init__(self, column: torch.Tensor) -> None:
        self.column = column

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        return -out[torch.arange(len(self.column)), self.column]

    def take(self, index: torch.Tensor) -> "_Column":
        return _Column(self.column[index])


@pytest.mark.parametrize("step_rule", ["pgd", "apgd"])
def test_a_row_selection_stops_rows_and_the_rest_go_on_as_if_alone(step_rule):
    model = TinyNet(3)
    clean = to_tensor(make_images(6, seed=2))
    column = torch.tensor([0, 1, 2, 0, 1, 2])
    asked = []

    def keep(best_loss, rows):
        asked.append(rows.clone())
        return rows % 2 == 0  # rows 1, 3, 5 stop

    common = dict(eps=2.0, step_size=0.7, objective=_Column(column), step_rule=step_rule, random_start=True)
    full = compute_pgd(model, clean, n_steps=8, generator=5, **common)
    selected = compute_pgd(model, clean, n_steps=8, generator=5, selection=RowSelection(at=4, keep=keep), **common)
    assert len(asked) == 1 and asked[0].tolist() == list(range(6))  # asked once, with the rows of the batch as given
    assert selected.steps.tolist() == [8, 4, 8, 4, 8, 4] and full.steps.tolist() == [8] * 6
    kept = torch.tensor([0, 2, 4])  # they go on exactly as in a batch without the others
    torch.testing.assert_close(selected.images[kept], full.images[kept], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(selected.loss[kept], full.loss[kept], rtol=1e-5, atol=1e-5)
    stopped = torch.tensor([1, 3, 5])
    assert (selected.loss[stopped] >= full.loss[stopped] - 1e-6).all()  # stopped early: never better than going on
    assert (_norms(selected.images, clean) <= 2.0 * (1 + 1e-5)).all()
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(_Column(column)(model(selected.images)), selected.loss, rtol=1e-4, atol=1e-4)
    if step_rule == "pgd":  # a stopped row holds the best of its first `at` iterates: a run of at − 1 steps
        short = compute_pgd(model, clean, n_steps=3, generator=5, **common)
        torch.testing.assert_close(selected.loss[stopped], short.loss[stopped], rtol=1e-5, atol=1e-5)


def test_a_row_selection_that_stops_every_row_ends_the_run():
    clean = to_tensor(make_images(3, seed=3))
    result = compute_pgd(TinyNet(3), clean, eps=1.0, step_size=0.3, n_steps=6, objective=_Column(torch.tensor([0, 1, 2])),
                         selection=RowSelection(at=2, keep=lambda loss, rows: torch.zeros_like(rows, dtype=torch.bool)))
    assert result.steps.tolist() == [2, 2, 2] and torch.isfinite(result.loss).all()


def test_a_row_selection_needs_an_objective_that_can_follow_the_rows_and_a_step_inside_the_run():
    arguments = dict(eps=1.0, step_size=0.3, n_steps=5)
    drop_first = RowSelection(at=2, keep=lambda loss, rows: rows > 0)
    with pytest.raises(TypeError, match=r"needs an objective with take\(index\)"):
        compute_pgd(TinyNet(2), to_tensor(make_images(3)), objective=lambda out: out[:, 0], selection=drop_first,
                    **arguments)
    for at in (1, 5):
        with pytest.raises(ValueError, match=r"'selection.at' must lie in \[2, 4\]"):
            compute_pgd(TinyNet(2), to_tensor(make_images(3)), objective=_Column(torch.zeros(3, dtype=torch.long)),
                        selection=RowSelection(at=at, keep=drop_first.keep), **arguments)
    with pytest.raises(TypeError, match=r"RowSelection.keep must return a torch tensor of flags, but returned ndarray"):
        compute_pgd(TinyNet(2), to_tensor(make_images(3)), objective=_Column(torch.zeros(3, dtype=torch.long)),
                    selection=RowSelection(at=2, keep=lambda loss, rows: np.ones(3, bool)), **arguments)
    with pytest.raises(ValueError, match="one flag per row"):
        compute_pgd(TinyNet(2), to_tensor(make_images(3)), objective=_Column(torch.zeros(3, dtype=torch.long)),
                    selection=RowSelection(at=2, keep=lambda loss, rows: torch.ones(2, dtype=torch.bool)), **arguments)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"step_rule": "adam"}, "Invalid value for 'step_rule': allowed values are 'pgd', 'apgd', but got 'adam'"),
        ({"eps": 0.0}, "'eps' must be finite and > 0"),
        ({"eps": -1.0}, "'eps' must be finite and > 0"),
        ({"eps": torch.tensor([1.0, 2.0])}, r"'eps' must be a number or have shape \(3,\)"),
        ({"step_size": float("nan")}, "'step_size' must be finite and > 0"),
        ({"n_steps": 0}, r"'n_steps' must lie in \[1, inf\]"),
        ({"n_restarts": 2}, "needs random_start=True"),
        ({"objective": lambda out: out}, r"one loss per image, shape \(3,\)"),
    ],
)
def test_pgd_bad_input_raises_clear_errors(change, message):
    arguments = dict(eps=1.0, step_size=0.3, n_steps=2, objective=lambda out: out[:, 0])
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        compute_pgd(TinyNet(2), to_tensor(make_images(3)), **arguments)


def test_pgd_refuses_nan_images_and_wrong_shapes():
    clean = to_tensor(make_images(2))
    clean[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="'clean' contains NaN"):
        compute_pgd(TinyNet(2), clean, eps=1.0, step_size=0.3, n_steps=2, objective=lambda out: out[:, 0])
    with pytest.raises(ValueError, match=r"'clean' must have shape \(n_images, 3, H, W\)"):
        compute_pgd(TinyNet(2), torch.rand(2, 32, 32, 3), eps=1.0, step_size=0.3, n_steps=2,
                    objective=lambda out: out[:, 0])


# --------------------------------------------------------------------------------- 8-bit budget


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    eps=st.one_of(st.floats(1e-4, 0.02), st.floats(0.02, 2.0), st.floats(2.0, 1e4)),
    spread=st.floats(0.0, 3.0),
    extreme=st.booleans(),
)
def test_quantize_within_budget_never_exceeds_eps(seed, eps, spread, extreme):
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, 256, (2, 6, 6, 3), dtype=np.uint8)
    if extreme:  # values pinned at 0 and 1
        clean = np.where(rng.random(clean.shape) < 0.5, 0, 255).astype(np.uint8)
    delta = rng.standard_normal(clean.shape)
    delta *= spread * eps / np.linalg.norm(delta.reshape(2, -1), axis=1).reshape(2, 1, 1, 1)
    adversarial = np.clip(clean / 255.0 + delta, 0, 1)
    check_budget(quantize_within_budget(adversarial, clean, eps), clean, eps)


def test_quantize_rounds_toward_clean_only_where_needed():
    clean = np.full((1, 8, 8, 3), 128, np.uint8)
    # every value sits just past a rounding tie, and the budget is exactly the float perturbation
    adversarial = (clean + 0.5001) / 255.0
    eps = float(np.linalg.norm(adversarial - clean / 255.0))
    pixels = quantize_within_budget(adversarial, clean, eps)
    realised = check_budget(pixels, clean, eps)
    assert realised > 0.7 * eps  # still spends most of the budget, not simply truncated to clean
    # a generous budget gives plain rounding
    np.testing.assert_array_equal(quantize_within_budget(adversarial, clean, 10 * eps), np.rint(adversarial * 255))


def test_quantize_switches_the_values_nearest_a_tie_first_as_a_full_stable_sort_would():
    """The partial selection of the round-toward-clean pass gives what sorting every candidate gives,
    ties (many here: few distinct fractions) broken by position."""
    rng = np.random.default_rng(7)
    clean = np.full((3, 16, 16, 3), 128, np.uint8)
    grey = rng.choice([0.5625, 0.625, 0.75, -0.5625, -0.625, 1.5625, -1.75, 0.25], size=clean.shape)
    adversarial = (clean + grey) / 255.0
    eps = 1.001 * np.linalg.norm(grey.reshape(3, -1), axis=1) / 255.0  # inside the ball; rounding leaves it
    expected = np.empty_like(clean)
    for row in range(3):
        delta = adversarial[row].ravel() * 255.0 - clean[row].ravel()
        rounded, truncated = np.rint(delta), np.trunc(delta)
        excess = rounded @ rounded - (eps[row] * 255.0) ** 2 * (1.0 - 1e-9)
        assert excess > 0
        candidates = np.flatnonzero(rounded != truncated)
        order = candidates[np.argsort(np.abs(delta[candidates] - truncated[candidates]) - 0.5, kind="stable")]
        n_switch = int(np.searchsorted(np.cumsum(rounded[order] ** 2 - truncated[order] ** 2), excess)) + 1
        rounded[order[:n_switch]] = truncated[order[:n_switch]]
        expected[row] = (clean[row].ravel() + rounded).reshape(clean.shape[1:])
    np.testing.assert_array_equal(quantize_within_budget(adversarial, clean, eps), expected)
    check_budget(expected, clean, eps)


def test_quantize_below_one_grey_level_returns_clean_and_pulls_far_images_in():
    clean = make_images(3, seed=4)
    far = np.clip(clean / 255.0 + 0.3, 0, 1)
    np.testing.assert_array_equal(quantize_within_budget(far, clean, 0.9 / 255), clean)
    check_budget(quantize_within_budget(far, clean, [0.5, 2.0, 7.0]), clean, np.array([0.5, 2.0, 7.0]))


def test_quantize_bad_input():
    clean = make_images(2)
    with pytest.raises(ValueError, match="finite float values"):
        quantize_within_budget(np.full(clean.shape, np.nan), clean, 1.0)
    with pytest.raises(ValueError, match="must have the shape of 'clean_uint8'"):
        quantize_within_budget(clean[:1] / 255.0, clean, 1.0)
    with pytest.raises(ValueError, match="'eps' must be finite and > 0"):
        quantize_within_budget(clean / 255.0, clean, 0.0)
    with pytest.raises(TypeError, match="'clean_uint8' must be a uint8"):
        quantize_within_budget(clean / 255.0, clean.astype(np.float32), 1.0)


# --------------------------------------------------------------------------------- step schedule


def test_step_schedule_matches_the_paper():
    steps, iterations = compute_step_schedule([0.1, 0.5, 1.0, 3.0, 5.0, 15.0, 20.0, 25.0, 30.0, 50.0, 100.0, 150.0])
    np.testing.assert_array_equal(steps, [0.02, 0.1, 0.3, 0.3, 0.5, 0.5, 0.5, 0.5, 2, 2, 2, 2])
    np.testing.assert_array_equal(iterations, [200, 200, 200, 200, 500, 500, 1000, 1000, 2000, 2000, 5000, 10000])
    with pytest.raises(ValueError, match="'eps' must be finite and > 0"):
        compute_step_schedule(-1.0)



# --------------------------------------------------------------------------------- batches on a device


def test_attack_pixels_are_the_quantized_pgd_result_within_budget():
    model = TinyNet(3)
    clean = make_images(3, seed=10)
    eps = np.array([0.5, 1.0, 2.0])
    objective = lambda out: -out[:, 1]  # noqa: E731
    settings = RunSettings()
    pixels = make_attack_pixels(model, clean, eps=eps, step_size=eps / 3, n_steps=5, objective=objective,
                                device=torch.device("cpu"), settings=settings)
    result = compute_pgd(model, to_tensor(clean), eps=eps, step_size=eps / 3, n_steps=5, objective=objective)
    expected = quantize_within_budget(result.images.numpy().transpose(0, 2, 3, 1), clean, eps)
    np.testing.assert_array_equal(pixels, expected)
    check_budget(pixels, clean, eps)


def test_predictions_are_the_same_in_channels_last():
    model = TinyNet(4)
    pixels = make_images(5, seed=11)
    plain = compute_predictions(model, pixels, batch_size=2)
    assert plain.dtype == np.float32 and plain.shape == (5, 4)
    make_attack_runner(model, torch.device("cpu"), RunSettings(channels_last=True))
    np.testing.assert_allclose(compute_predictions(model, pixels, channels_last=True), plain, rtol=1e-5, atol=1e-5)


def test_runner_and_batch_size_on_cpu():
    model, cpu = TinyNet(2), torch.device("cpu")
    assert make_attack_runner(model, cpu, RunSettings()) is model
    assert compute_batch_size(model, (3, 32, 32), cpu, RunSettings()) == 32
    with pytest.raises(TypeError, match="'model' must be a torch.nn.Module, but got function"):
        make_attack_runner(lambda images: images, cpu, RunSettings())


def test_predictions_bad_input():
    with pytest.raises(TypeError, match="'pixels' must be a uint8 numpy array"):
        compute_predictions(TinyNet(2), make_images(2) / 255.0)
    with pytest.raises(ValueError, match=r"'batch_size' must lie in \[1, inf\]"):
        compute_predictions(TinyNet(2), make_images(2), batch_size=0)


# --------------------------------------------------------------------------------- fast numerics


class _Guarded(nn.Module):
    """An input check on tensor values: torch.fx cannot trace it, so folding happens in ``body``."""

    def __init__(self):
        super().__init__()
        self.body = TinyNet(3)

    def forward(self, images):
        if images.min() < 0:
            raise ValueError("images must be in [0, 1]")
        return self.body(images)


class _TracesDifferently(nn.Module):
    """A forward that takes another path while torch.fx traces it: its graph is not its function."""

    def __init__(self):
        super().__init__()
        self.body = TinyNet(3)

    def forward(self, images):
        return self.body(images) * (0.0 if torch.fx._symbolic_trace.is_fx_tracing() else 1.0)


def _n_batch_norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("make", [lambda: TinyNet(4), _Guarded])
def test_fold_batch_norm_is_exact_and_leaves_the_model_alone(make):
    model = make()
    images = to_tensor(make_images(6, seed=12))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    folded = fold_batch_norm(model, images[:2])
    assert _n_batch_norms(model) == 1 and _n_batch_norms(folded) == 0
    assert not folded.training and not any(p.requires_grad for p in folded.parameters())
    assert all(p.requires_grad for p in model.parameters()) and model.training
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    with torch.no_grad():
        expected = model.eval()(images)
        np.testing.assert_allclose(folded(images).numpy(), expected.numpy(), rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_fold_batch_norm_keeps_a_model_whose_graph_is_not_its_forward(caplog):
    model = _TracesDifferently()
    images = to_tensor(make_images(3, seed=13))
    runner = fold_batch_norm(model, images)
    assert _n_batch_norms(runner) == 1 and "BatchNorm folding changed _TracesDifferently's output" in caplog.text
    with torch.no_grad():
        np.testing.assert_array_equal(runner(images).numpy(), model.eval()(images).numpy())


def test_run_settings_and_precision():
    cpu = torch.device("cpu")
    native = has_native_bf16(cpu)
    assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    assert make_run_settings("fp32", cpu) == RunSettings(autocast=False, channels_last=True, fold_batch_norm=True)
    assert make_run_settings("bf16", cpu, channels_last=False) == RunSettings(autocast=True, fold_batch_norm=True)
    with pytest.raises(ValueError, match="Invalid value for 'precision': allowed values are 'auto', 'fp32', 'bf16', but got 'fp16'"):
        make_run_settings("fp16", cpu)
    with pytest.raises(ValueError, match="'example' images are required to fold BatchNorm"):
        make_attack_runner(TinyNet(2), cpu, make_run_settings("fp32", cpu))


def test_attack_runner_is_a_folded_channels_last_copy():
    model, cpu = TinyNet(2), torch.device("cpu")
    images = to_tensor(make_images(2, seed=14))
    runner = make_attack_runner(model, cpu, make_run_settings("fp32", cpu), example=images)
    assert runner is not model and _n_batch_norms(runner) == 0 and _n_batch_norms(model) == 1
    convolutions = [m for m in runner.modules() if isinstance(m, nn.Conv2d)]
    assert len(convolutions) == 2 and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convolutions)
    assert model.body[0].weight.is_contiguous()
