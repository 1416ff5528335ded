"""A tiny behavioural stimulus set written directly (no attacks): PNGs + manifest with chosen logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from closedloop.core.files import write_json

CATEGORIES = ["dog", "cat", "frog", "turtle", "bird", "primate", "fish", "crab", "insect"]


def write_stimulus_set(folder: Path, *, budgets=(5.0, 30.0), seed: int = 0, n_starts: int = 9) -> Path:
    """Control images of ``n_starts`` start images plus, per budget, a disrupt and a target image of each.

    Guide ``g`` and surrogate ``s`` logits: the start category gets logit 3 on control images;
    perturbed images move ``budget / 30 * 4`` logits onto the target (disrupt: onto the next category).
    """
    rng = np.random.default_rng(seed)
    records = []
    for k in range(n_starts):
        category = k % len(CATEGORIES)
        start = f"start{k}"
        pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        entries = [("control", 0.0, [], None)]
        for budget in budgets:
            entries.append(("disrupt", budget, [], (category + 1) % 9))
            entries.append(("target", budget, [CATEGORIES[(category + 2) % 9]], (category + 2) % 9))
        for mode, budget, targets, moved in entries:
            item = f"{mode}/eps{budget:g}/{start}" + "".join(f"_{t}" for t in targets)
            file = f"images/{item}.png"
            (folder / file).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(pixels.astype(int) + int(budget), 0, 255).astype(np.uint8)).save(folder / file)
            logits = np.zeros(9)
            logits[category] = 3.0
            if moved is not None:
                logits[moved] += budget / 30 * 4
            records.append({"item": item, "file": file, "start_image": start, "category": CATEGORIES[category],
                            "guide": "" if mode == "control" else "g", "mode": mode, "targets": targets, "target_image": "",
                            "budget": budget, "realised_eps": budget * 0.9,
                            "logits": {"g": logits.tolist(), "s": (logits * 0.5).tolist()}})
    write_json(folder / "manifest.json", {"category_names": CATEGORIES, "records": records,
                                          "models": {"g": {"role": "guide", "source": "test", "sha256": ""},
                                                     "s": {"role": "surrogate", "source": "test", "sha256": ""}}})
    return folder
