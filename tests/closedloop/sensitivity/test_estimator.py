import numpy as np
import pytest

from closedloop.sensitivity.estimator import compute_mean_responses, compute_sensitivity, compute_signed_changes


def _simulated_day(rng, *, n_sites=3, n_clean=300, eps=(1.0, 4.0), wrong_fraction=0.0, n_reps=2):
    """Clean images, one attack per (clean image, site, eps), one gaussian per (clean, eps).

    True rates are known; the attack shifts its site's rate by d (|d| grows with eps), the
    model predicts the direction right except for ``wrong_fraction`` of the attacks.
    """
    rates = rng.uniform(5, 30, size=(n_clean, n_sites))
    parent, site, eps_col, kind, true = [], [], [], [], []
    predicted = []
    for j in range(n_clean):
        parent.append(-1); site.append(-1); eps_col.append(0.0); kind.append("clean")
        true.append(rates[j]); predicted.append(rates[j])
    truth = {}
    for e in eps:
        for i in range(n_sites):
            d = rng.choice([-1, 1], n_clean) * rng.uniform(0.5, 1.5, n_clean) * 2 * e
            d = np.maximum(d, -rates[:, i] + 0.1)
            truth[(i, e)] = np.abs(d).mean()
            flip = rng.uniform(size=n_clean) < wrong_fraction
            for j in range(n_clean):
                r = rates[j].copy(); r[i] += d[j]
                p = rates[j].copy(); p[i] += -d[j] if flip[j] else d[j]
                parent.append(j); site.append(i); eps_col.append(e); kind.append("attack")
                true.append(r); predicted.append(p)
        for j in range(n_clean):
            parent.append(j); site.append(-1); eps_col.append(e); kind.append("gaussian")
            true.append(rates[j]); predicted.append(rates[j] + rng.normal(0, 1, n_sites))
    true = np.array(true)
    n_stim = len(true)
    stimulus = np.repeat(np.arange(n_stim), n_reps)
    counts = rng.poisson(true[stimulus])
    valid = np.ones(stimulus.size, bool)
    columns = dict(parent=np.array(parent), site=np.array(site), eps=np.array(eps_col),
                   kind=np.array(kind), predicted=np.array(predicted))
    return columns, stimulus, valid, counts, truth, true


def test_mean_responses_use_valid_presentations_only():
    stimulus = np.array([0, 0, 1, 1, 2])
    valid = np.array([True, False, True, True, False])
    counts = np.array([[1], [100], [2], [4], [7]])
    means, n_valid = compute_mean_responses(stimulus, valid, counts, 4)
    assert n_valid.tolist() == [1, 2, 0, 0]
    assert means[:2, 0].tolist() == [1.0, 3.0] and np.isnan(means[2:, 0]).all()


def test_mean_responses_refuse_bad_shapes_and_indices():
    with pytest.raises(ValueError, match=r"'stimulus' must lie in \[0, 1\], but got \[2\]"):
        compute_mean_responses([0, 2], [True, True], [[1], [1]], 2)
    with pytest.raises(ValueError, match=r"'counts' must have shape \(n_presentations, n_sites\)"):
        compute_mean_responses([0, 1], [True, True], [1, 1], 2)


def test_estimate_is_unbiased_when_the_model_is_always_right(rng):
    columns, stimulus, valid, counts, truth, _ = _simulated_day(rng)
    means, _ = compute_mean_responses(stimulus, valid, counts, len(columns["parent"]))
    records = compute_sensitivity(**columns, means=means, truth=lambda s, e: truth[(s, e)])
    attacks = [r for r in records if r["kind"] == "attack"]
    assert len(attacks) == 3 * 2 and all(r["n_images"] == 300 for r in attacks)
    for record in attacks:
        # standard error of a mean of 300 differences of 2-repetition Poisson means (~0.3)
        assert record["estimate"] == pytest.approx(record["truth"], abs=1.2)
        assert record["normalized"] == pytest.approx(record["estimate"] / record["sigma"])


def test_estimate_is_a_lower_bound_when_the_model_is_often_wrong(rng):
    columns, stimulus, valid, counts, truth, _ = _simulated_day(rng, wrong_fraction=0.3)
    means, _ = compute_mean_responses(stimulus, valid, counts, len(columns["parent"]))
    records = compute_sensitivity(**columns, means=means, truth=lambda s, e: truth[(s, e)])
    for record in (r for r in records if r["kind"] == "attack"):
        # E[estimate] = (1 - 2 * 0.3) * truth
        assert record["estimate"] < record["truth"]
        assert record["estimate"] == pytest.approx(0.4 * record["truth"], abs=1.2)


def test_noise_free_value_and_direction_accuracy_come_from_the_expected_counts(rng):
    columns, stimulus, valid, counts, truth, true = _simulated_day(rng, wrong_fraction=0.3)
    means, _ = compute_mean_responses(stimulus, valid, counts, len(columns["parent"]))
    records = compute_sensitivity(**columns, means=means, expected=true)
    for record in (r for r in records if r["kind"] == "attack"):
        # the model is right on 70% of the pairs: noise-free value = (0.7 − 0.3) × truth
        assert record["direction_right"] == pytest.approx(0.7, abs=0.1)
        assert record["expected"] == pytest.approx(0.4 * truth[(record["site"], record["eps"])], rel=0.25)
        assert record["estimate"] == pytest.approx(record["expected"], abs=1.2)
    for record in (r for r in records if r["kind"] == "gaussian"):
        assert record["expected"] == 0.0  # baselines leave these rates unchanged
    assert all(r["expected"] is None and r["direction_right"] is None for r in compute_sensitivity(**columns, means=means))


def test_noise_alone_gives_zero_not_the_noise_floor(rng):
    # Gaussian stimuli leave the true rates unchanged: mean |Δr| is inflated by Poisson noise,
    # the signed estimator is not.
    columns, stimulus, valid, counts, _, _ = _simulated_day(rng, n_clean=400)
    means, _ = compute_mean_responses(stimulus, valid, counts, len(columns["parent"]))
    changes = compute_signed_changes(**columns, means=means)
    gaussian = changes.kind == "gaussian"
    naive = np.abs(means[changes.parent[gaussian], changes.site[gaussian]]
                   - means[changes.stimulus[gaussian], changes.site[gaussian]]).mean()
    assert naive > 2.0
    records = compute_sensitivity(**columns, means=means)
    for record in (r for r in records if r["kind"] == "gaussian"):
        assert abs(record["estimate"]) < 0.6 and record["n_images"] == 400 and record["truth"] is None


def test_pairs_without_valid_responses_are_left_out(rng):
    columns, stimulus, valid, counts, _, _ = _simulated_day(rng, n_sites=1, n_clean=5, eps=(1.0,))
    valid[stimulus == 5] = False  # the first attack stimulus was never validly shown
    means, _ = compute_mean_responses(stimulus, valid, counts, len(columns["parent"]))
    records = compute_sensitivity(**columns, means=means)
    assert [r["n_images"] for r in records if r["kind"] == "attack"] == [4]
