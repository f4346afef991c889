"""Tiny ModelNet40 folders written by the tests (imported by name: tests/ is on sys.path under pytest)."""

import numpy as np


def write_text_layout(root, rng):
    """Tiny modelnet40_normal_resampled: 2 classes (one with '_' in its name), 8 rows each."""
    folder = root / "modelnet40_normal_resampled"
    names = ["chair", "night_stand"]
    folder.mkdir(parents=True)
    (folder / "modelnet40_shape_names.txt").write_text("\n".join(names) + "\n")
    samples = {
        "train": [f"{c}_{i:04d}" for c in names for i in range(1, 11)],
        "test": ["night_stand_0100", "chair_0100"],
    }
    clouds = {}
    for split, items in samples.items():
        (folder / f"modelnet40_{split}.txt").write_text("\n".join(items) + "\n")
        for sample in items:
            class_name = sample.rsplit("_", 1)[0]
            (folder / class_name).mkdir(exist_ok=True)
            rows = rng.normal(size=(8, 6))
            np.savetxt(folder / class_name / f"{sample}.txt", rows, delimiter=",", fmt="%.6f")
            clouds[sample] = np.loadtxt(folder / class_name / f"{sample}.txt", delimiter=",")
    return folder, samples, clouds
