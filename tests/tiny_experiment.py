"""The tiny experiment against the simulated rig that the day tests share: 2 sites, budgets 2
and 6, 3 attack steps, a random-weight resnet_tiny; a day runs in seconds. ``TINY`` is a
``str.format`` template with one field, ``time_scale`` (0 for no waiting).
"""

TINY = """
[experiment]
seed = 3
[images]
n_clean_day0 = 6
n_clean_per_day = 2
embedded_per_photo = 2
[model]
backbone = "resnet_tiny"
[sites]
n_sites = 2
[attack]
budgets = [2.0, 6.0]
steps = 3
part_size = 2
[rig]
kind = "sim"
[sim]
time_scale = {time_scale}
fixation_break_rate = 0.2
truth_starts = 1
truth_steps = 6
[fit]
epochs = 2
batch_size = 8
"""
