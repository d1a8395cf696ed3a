"""Which differences between a log's ``meta.h5`` and a resumed fit's configuration a log can absorb.

A resumed fit appends rows to an existing log, and every row is read with the log's one
``meta.h5``. A setting that changes what a row means (the projection, the tracked
parameters, the storage dtype, what is recorded and how often, the HVP scheme, the model's
parameter shapes, the dataset the ids index, the precision and gradient clipping the step ran
with, whether inputs are stored) would make the rows after the resume disagree
with ``meta.h5`` silently, or make the log unreadable: such a resume is refused before the
log is touched. Settings that only change how or how often things are stored
(``checkpoint_every_n_steps``, ``flush_every_n_steps``, ``compression``, the gradient
engine, package versions, ...) may differ; each resume is recorded in ``meta.h5`` under
``resumes`` (``docs/log-format.md``, version 2).
"""

from __future__ import annotations

import time
from typing import Any, Mapping

# Meta keys that never differ meaningfully between a log and its own resumed fit (identity, time).
_IDENTITY = ("created", "run_id", "first_step", "resumes")


def meaning_differences(log_meta: Mapping[str, Any], fit_meta: Mapping[str, Any]) -> list[str]:
    """Settings (by the name the user passes) whose change would change what the log's rows mean.

    Each entry reads ``"projection_seed: the log has 0, this fit has 1"``.
    """
    out: list[str] = []

    def diff(name: str, old: Any, new: Any) -> None:
        if old != new:
            out.append(f"{name}: the log has {old!r}, this fit has {new!r}")

    old_rec, new_rec = dict(log_meta.get("recorded") or {}), dict(fit_meta.get("recorded") or {})
    for key, name in (("losses", "record_losses"), ("gradients", "record_gradients"), ("hvp", "record_hvp")):
        diff(name, bool(old_rec.get(key)), bool(new_rec.get(key)))
    diff("dataset size (len(train_dataloader.dataset)), which the sample ids index", log_meta.get("dataset_size"),
         fit_meta.get("dataset_size"))
    diff("model parameter shapes", log_meta.get("param_shapes"), fit_meta.get("param_shapes"))
    diff("loss_reduction", log_meta.get("loss_reduction"), fit_meta.get("loss_reduction"))
    diff("precision", log_meta.get("precision"), fit_meta.get("precision"))  # how the step ran: replay re-runs it
    diff("gradient clipping (Trainer gradient_clip_val / gradient_clip_algorithm)", log_meta.get("gradient_clipping"),
         fit_meta.get("gradient_clipping"))
    diff("store_inputs", bool(log_meta.get("inputs_stored")), bool(fit_meta.get("inputs_stored")))
    old_opt, new_opt = log_meta.get("optimizer") or {}, fit_meta.get("optimizer") or {}
    diff("optimizer class", old_opt.get("class"), new_opt.get("class"))
    diff("optimizer param groups (parameters of each group)", [g.get("params") for g in old_opt.get("param_groups", [])],
         [g.get("params") for g in new_opt.get("param_groups", [])])
    if old_rec.get("gradients") and new_rec.get("gradients"):
        diff("params / exclude_params (tracked parameters)", log_meta.get("tracked_params"), fit_meta.get("tracked_params"))
        diff("storage_dtype", log_meta.get("storage_dtype"), fit_meta.get("storage_dtype"))
        diff("every_n_steps", log_meta.get("every_n_steps"), fit_meta.get("every_n_steps"))
        old_p, new_p = dict(log_meta.get("projection") or {}), dict(fit_meta.get("projection") or {})
        for key, name in (("dim", "projection_dim"), ("seed", "projection_seed")):
            diff(name, old_p.pop(key, None), new_p.pop(key, None))
        if old_p != new_p:
            keys = sorted(k for k in set(old_p) | set(new_p) if old_p.get(k) != new_p.get(k))
            out.append(f"projection ({', '.join(keys)}): the log's and this fit's projections differ")
    if old_rec.get("hvp") and new_rec.get("hvp"):
        old_h, new_h = log_meta.get("hvp") or {}, fit_meta.get("hvp") or {}
        for key, name in (("eps0", "hvp_eps"), ("scheme", "hvp_scheme"), ("kink_guard", "HVP kink guard"),
                          ("direction", "HVP direction")):
            diff(name, old_h.get(key), new_h.get(key))
    return out


def harmless_differences(log_meta: Mapping[str, Any], fit_meta: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Every other top-level meta value that differs (``{key: [log's, this fit's]}``), to be recorded."""
    meaning = {"recorded", "dataset_size", "param_shapes", "loss_reduction", "optimizer", "tracked_params",
               "storage_dtype", "every_n_steps", "projection", "hvp", "world_size", "precision", "gradient_clipping",
               "inputs_stored", *_IDENTITY}
    keys = sorted(set(fit_meta) - meaning)  # what the fit describes (the recipe of the first fit is kept as it was)
    out = {k: [log_meta.get(k), fit_meta.get(k)] for k in keys if log_meta.get(k) != fit_meta.get(k)}
    for key in ("projection", "hvp"):  # a part not compared above (gradients or HVP not recorded)
        if log_meta.get(key) != fit_meta.get(key):
            out[key] = [log_meta.get(key), fit_meta.get(key)]
    return out


def check_resume(log_dir: str, log_meta: Mapping[str, Any], fit_meta: Mapping[str, Any], start: int) -> None:
    """Refuse a resumed fit whose configuration changes what the log's rows mean (nothing is touched).

    Raises:
        ValueError: naming each differing setting, the log's value and this fit's.
    """
    problems = meaning_differences(log_meta, fit_meta)
    if problems:
        raise ValueError(
            f"InfluenceTracker: cannot continue the log in {log_dir} at step {start}: this fit's configuration changes "
            "what the log's rows mean (" + "; ".join(problems) + "). Nothing was changed in the log. Resume with the "
            "log's settings, or give this fit a new log_dir (a new log starting at step "
            f"{start}), or pass overwrite=True to replace the log.")


def with_resume_record(log_meta: Mapping[str, Any], fit_meta: Mapping[str, Any], start: int) -> dict[str, Any]:
    """``log_meta`` with this resume appended to ``resumes``: its step, time and the settings that differ."""
    entry = {"step": start, "time": time.time(), "changed": harmless_differences(log_meta, fit_meta)}
    return {**log_meta, "resumes": [*log_meta.get("resumes", []), entry]}
