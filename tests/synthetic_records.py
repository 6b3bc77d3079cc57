"""Synthetic result records, shaped as the results cache stores them, for the reporting tests."""

from __future__ import annotations

BP_BYTES = 5 * 2**20


def finetune_record(method="bp", *, seed=0, acc=0.6, modes="channel", eps=0.7, n=20,
                    angles=(30.0, 30.0), layer_bytes=None, analytic_mb=None, layers=4,
                    model="resnet18", dataset="cifar10", batch=128, path=None,
                    options=None, epochs=3, curve=None):  # fmt: skip
    """A fine-tuning record as the results cache stores it (the fields the claims read).

    ``curve``: the per-epoch test accuracy (default: ``[acc]``).
    """
    lance = method == "lance"
    layer_bytes = (
        layer_bytes if layer_bytes is not None else (BP_BYTES // 30 if lance else BP_BYTES)
    )
    options = options if options is not None else ({} if modes == "channel" else {"modes": modes})
    settings = {
        "kind": "finetune", "format": 3, "model": model, "dataset": dataset, "classes": None,
        "weights": "reference", "resolution": 64, "layers": layers, "method": method,
        "method_options": options if lance else {},
        "method_settings": {"modes": modes, "eps": eps} if lance else {},
        "eps": eps, "num_batches": n, "epochs": epochs, "lr": 0.05, "momentum": 0.0,
        "batch_size": batch, "seed": seed, "max_samples": None, "max_steps_per_epoch": None,
    }  # fmt: skip
    record = {
        "settings": settings,
        "classes": [5, 6, 7, 8, 9],
        "final_accuracy": acc,
        "accuracy": list(curve) if curve is not None else [acc],
        "angle_deg": list(angles) if lance else [0.0] * len(angles),
        "measurements": {
            "measured_layer_bytes": layer_bytes,
            "analytic_mb": analytic_mb if analytic_mb is not None else layer_bytes / 2**20,
            "analytic_bp_mb": BP_BYTES / 2**20,
            "flops_measured": 1.0e10 if lance else 1.6e10,
            "step_s_median": 0.1,
        },
        "provenance": {"seeds": [seed], "weights": {model: "ab" * 32}},
    }
    if path is not None:
        record["path"] = str(path)
    return record
