"""Which differences between a log's ``meta.h5`` and a resumed fit's configuration a log can absorb.

A resumed fit appends rows to an existing log, and every row is read with the log's one
``meta.h5``. A setting that changes what a row means (the projection, the tracked
parameters, the storage dtype, what is recorded and how often, the HVP scheme, the model's
parameter shapes, the dataset the ids index, the precision and gradient clipping the step ran
with, whether inputs are stored) would make the rows after the resume disagree
with ``meta.h5`` silently, or make the log unreadable: such a resume is refused before the
log is touched. Settings that only change how or how often things are stored
(``checkpoint_every_n_steps``, ``flush_every_n_steps``, ``flush_every_n_seconds``, ``compression``, the gradient
engine, package versions, ...) may differ; each resume is recorded in ``meta.h5`` under
``resumes`` (``docs/log-format.md``, version 2) when the resumed fit first writes to the log
(``LogWriter(resume_meta=...)``), so a fit refused before that leaves the log byte for byte as it was.

:func:`continue_log` decides, for a fit resumed at step ``start``, whether the log in ``log_dir``
is continued (with the record of the resume for the writer) or a new one is started (:func:`start_new_log`).
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

import h5py

from lightning_influence.log.format import META_FILE, LogFormatError, check_header, list_segments, read_meta, reading
from lightning_influence.log.integrity import check_rank
from lightning_influence.log.writer import rank_end, remove_log

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
        dims = old_p.get("dim"), new_p.get("dim")
        for key, name in (("dim", "projection_dim"), ("seed", "projection_seed")):
            diff(name, old_p.pop(key, None), new_p.pop(key, None))
        folds = [sorted(s["bias"] for s in p.get("specs", []) if s.get("bias")) for p in (old_p, new_p)]
        follows = "; with the default fold_bias=None it follows projection_dim" if dims[0] != dims[1] else ""
        diff(f"fold_bias (biases folded into their weight's projection{follows})", *folds)
        if old_p != new_p and folds[0] == folds[1]:
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


def with_settled(log_meta: Mapping[str, Any], values: Mapping[str, Any], resumed: bool) -> dict[str, Any]:
    """``log_meta`` with top-level ``values`` a fit settled after its start (its gradient engines after a demotion):
    a fit that started the log sets them; a resumed fit's (``resumed``) go into its record of the resume (the
    ``changed`` of the last ``resumes`` entry, ``[log's, this fit's]`` where they differ), as any other setting."""
    if not resumed:
        return {**log_meta, **values}
    *before, last = log_meta["resumes"]
    changed = {k: v for k, v in last["changed"].items() if k not in values}
    changed.update({k: [log_meta.get(k), v] for k, v in values.items() if log_meta.get(k) != v})
    return {**log_meta, "resumes": [*before, {**last, "changed": changed}]}


def with_fit_record(log_meta: Mapping[str, Any], values: Mapping[str, Any], resumed: bool) -> dict[str, Any]:
    """``log_meta`` with ``values`` that describe what one fit found (the first step's applied-gradient check), not
    settings: a fit that started the log sets them top level; a resumed fit's go into its own ``resumes`` entry (not
    its ``changed``: the log's values are another fit's findings, which this one does not change)."""
    if not resumed:
        return {**log_meta, **values}
    *before, last = log_meta["resumes"]
    return {**log_meta, "resumes": [*before, {**last, **values}]}


def log_exists(log_dir: str) -> bool:
    """``log_dir`` holds an influence log (its ``meta.h5``)."""
    return (Path(log_dir) / META_FILE).exists()


def logged_fold_bias(log_dir: str, start: int) -> bool:
    """``fold_bias``'s default: fold, unless a fit resumed at ``start > 0`` continues a log written unfolded
    (before folding existed, or with ``fold_bias=False``), whose layout its new rows must keep."""
    if start == 0 or not log_exists(log_dir):
        return True
    try:
        specs = (read_meta(log_dir).get("projection") or {}).get("specs")
    except LogFormatError:
        return True  # continue_log reports what is wrong with the log
    return not specs or any(s.get("bias") for s in specs)


def logged_splits(log_dir: str, start: int, projector: Any) -> dict[str, tuple[int, int]] | None:
    """The side sizes ``{block: (k_rows, k_cols)}`` of the log a fit resumed at ``start > 0`` continues, for the blocks
    of ``projector`` (the fit's, by the split rule) with the same matrix view: rebuilt with them
    (``KroneckerProjector(splits=...)``), its new rows use the log's own matrices whatever rule wrote the log.
    ``None`` for a new log, one projected to another ``dim``, or one whose sizes are the rule's already; a block that
    differs otherwise is left to :func:`check_resume`, which refuses it."""
    if start == 0 or not log_exists(log_dir):
        return None
    try:
        projection = read_meta(log_dir).get("projection") or {}
    except LogFormatError:
        return None  # continue_log reports what is wrong with the log
    if projection.get("dim") != projector.dim:
        return None
    ours = {spec.name: spec for spec in projector.specs}
    kept = {s["name"]: (int(s["k_rows"]), int(s["k_cols"])) for s in projection.get("specs") or []
            if s["name"] in ours and (ours[s["name"]].rows, ours[s["name"]].cols) == (s["rows"], s["cols"])}
    changed = any((ours[n].k_rows, ours[n].k_cols) != k for n, k in kept.items())
    return kept if changed else None


def logged_demotions(log_dir: str, start: int) -> dict[str, int]:
    """The tensors the log's fits handed from hooks to vmap before step ``start`` (``demoted``, ``{name: step}``): a fit
    resumed at ``start`` keeps them, so its record of the resume lists no change when it demotes them again."""
    if start == 0 or not log_exists(log_dir):
        return {}
    try:
        demoted = read_meta(log_dir).get("demoted") or {}
    except LogFormatError:
        return {}  # continue_log reports what is wrong with the log
    return {n: int(s) for n, s in demoted.items() if int(s) < start}


def logged_param_groups(log_dir: str) -> list[dict[str, Any]]:
    """The optimizer param groups of the log a fit continues (``meta.h5``): a resumed fit records each step's
    scheduled hyperparameters against these (``step/hyper.py``), not against its own at the resume."""
    return list(read_meta(log_dir)["optimizer"]["param_groups"])


def continue_log(log_dir: str, rank: int, world_size: int, is_zero: bool, start: int, state: Mapping[str, Any],
                 fit_meta: Mapping[str, Any], overwrite: bool) -> tuple[bool, int | None, dict[str, Any] | None]:
    """A fit resumed at step ``start``: ``(True, first_step, resume_meta)`` if it continues the log in ``log_dir``
    (``first_step`` is ``start`` if the log holds no step of this rank yet, else ``None``; ``resume_meta``, for rank 0,
    is ``meta.h5`` with this resume recorded, which the writer writes when it drops steps ``>= start`` before its
    first segment: nothing is written here), ``(False, None, None)`` if a new log is to be started instead.

    ``state``: the tracker's state from the checkpoint (``log_dir``, ``run_id``); ``fit_meta``: this fit's meta
    without the recipe. With ``overwrite``, a log that cannot be continued is replaced instead of refused.

    Raises:
        FileNotFoundError: the checkpoint's run was tracked into a log that is not in ``log_dir``.
        ValueError: the log belongs to another run, was written with another world size, or with a
            configuration that changes what its rows mean (:func:`check_resume`; nothing is touched).
        RuntimeError: the log misses steps before ``start`` (it cannot be continued without a gap).
    """
    if not log_exists(log_dir):
        if state.get("run_id") and not overwrite:
            raise FileNotFoundError(
                f"InfluenceTracker: resuming at step {start} from a checkpoint whose run was tracked into the log "
                f"{state.get('log_dir')!r} (run id {state['run_id']}), but {log_dir} holds no influence log. "
                f"Point log_dir at that log to continue it, or pass overwrite=True to start a new log at step {start}")
        return False, None, None
    meta = read_meta(log_dir)
    hint = f"or pass overwrite=True to replace it with a new log starting at step {start}"
    if not state.get("run_id"):  # a run not tracked up to the checkpoint: nothing says this log is its own
        if overwrite:
            return False, None, None
        raise ValueError(f"InfluenceTracker: resuming at step {start} from a checkpoint that holds no InfluenceTracker "
                         f"state (the run was not tracked up to it), so nothing says it continues the log of run "
                         f"{meta.get('run_id')} in {log_dir}; give this fit a new log_dir (a new log starting at step "
                         f"{start}), {hint}")
    if state.get("run_id") and meta.get("run_id") != state["run_id"]:
        if overwrite:
            return False, None, None
        raise ValueError(f"InfluenceTracker: {log_dir} holds the log of another run (run id {meta.get('run_id')}), "
                         f"not the one this checkpoint was tracked into (run id {state['run_id']}); point log_dir at "
                         f"that run's log, {hint}")
    if int(meta.get("world_size") or 1) != world_size:
        if overwrite:
            return False, None, None
        raise ValueError(f"InfluenceTracker: the log in {log_dir} was written by {meta.get('world_size')} "
                         f"process(es) but this fit runs {world_size}; resume with the same number of "
                         f"processes, {hint}")
    first = int(meta.get("first_step") or 0)
    end = rank_end(log_dir, rank)
    have = (end if end is not None else first - 1)
    if start < first or have < start - 1:
        if overwrite:
            return False, None, None
        held = f"steps {first}..{end}" if end is not None else f"no step (it starts at step {first})"
        raise RuntimeError(
            f"InfluenceTracker: training resumes at step {start} but the log of rank {rank} in {log_dir} holds "
            f"{held}, so it cannot continue without a gap (was the checkpoint saved without this callback, or were "
            f"segment files lost?). Resume from a checkpoint at a step in {first}..{have + 1}, {hint}")
    try:
        check_kept_steps(log_dir, rank, first, start)
    except LogFormatError as err:
        if overwrite:
            return False, None, None
        raise RuntimeError(f"InfluenceTracker: cannot continue the log of rank {rank} in {log_dir} at step {start}, "
                           f"it is damaged: {str(err).rstrip('.')}. Nothing was changed in the log. Resume from a Lightning checkpoint at "
                           f"a step before the damage (the log is cut there), {hint}") from None
    check_resume(log_dir, meta, fit_meta, start)  # a refusal loses nothing
    # steps >= start are recorded again: dropped by the writer before its first write, with the resume recorded in
    # meta.h5 just before, so a fit refused at its first step (ids, losses) leaves the log as it was
    resume_meta = with_resume_record(meta, fit_meta, start) if is_zero else None
    return True, (start if end is None else None), resume_meta  # θ_start if the log holds no step yet


def check_not_refit(log_dir: str, run_id: str | None, resume_state: Mapping[str, Any], start: int) -> None:
    """Refuse ``Trainer.fit`` called again (to train longer) on a trainer whose earlier fit this tracker recorded:
    Lightning builds a new optimizer for every fit (its state reset), which no log of one run can express, and
    ``overwrite=True`` would delete the earlier fit's steps in favour of the later ones.

    ``run_id``: the run this tracker recorded in this process (``None`` if none); ``resume_state``: the tracker state
    of the checkpoint this fit resumes from (empty without one)."""
    if run_id is None or resume_state or start == 0:
        return
    raise RuntimeError(
        f"InfluenceTracker: Trainer.fit was called again to continue at step {start}, but this tracker recorded the "
        f"earlier fit into {log_dir} (run {run_id}). A new fit starts a new optimizer (Lightning calls "
        "configure_optimizers again, resetting its state), which a log of one run cannot express, so the earlier "
        "fit's log is kept as it is and nothing was recorded (overwrite=True does not replace it here). To train "
        "longer, set max_epochs/max_steps before the first fit, or resume from a Lightning checkpoint with "
        "Trainer.fit(ckpt_path=...) (the optimizer state is restored and the log continues); or give this fit a "
        f"new InfluenceTracker with another log_dir (a new log starting at step {start})")


def check_kept_steps(log_dir: str, rank: int, first: int, start: int) -> None:
    """The steps a resume at ``start`` keeps (``first .. start - 1``) must be whole in ``rank``'s segments, as the
    reader checks them (:func:`~lightning_influence.log.integrity.check_rank`, from the segment headers): a resume
    past a lost or foreign segment would write on after a gap, into a log no reader opens.

    Raises:
        LogFormatError: naming the damaged or missing segment.
    """
    spans = []
    for path in list_segments(log_dir).get(rank, []):
        with reading(path, "the segment header"), h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
        check_header(path, attrs)
        span = SimpleNamespace(path=path, first=int(attrs["first_step"]), last=int(attrs["last_step"]),
                               table={"step": range(int(attrs["n_steps"]))})
        if span.table["step"] and span.first < start:  # later steps are dropped by the resume
            spans.append(span)
    check_rank(spans, first)
    if spans and spans[-1].last < start - 1:
        raise LogFormatError(spans[-1].path, f"ends at step {spans[-1].last}, and no segment holds steps "
                                             f"{spans[-1].last + 1}..{start - 1} (deleted?); restore them from a backup")


def start_new_log(log_dir: str, overwrite: bool, is_zero: bool) -> None:
    """Make room for a new log in ``log_dir``: rank 0 removes an existing one if ``overwrite``, else it is refused."""
    if list_segments(log_dir) or log_exists(log_dir):
        if not overwrite:
            raise FileExistsError(f"{log_dir} already holds an influence log{_held(log_dir)}; choose a new log_dir, "
                                  "pass overwrite=True, or resume with Trainer.fit(ckpt_path=...)")
        if is_zero:
            remove_log(log_dir)  # the log's own files only: anything else in log_dir stays


def _held(log_dir: str) -> str:
    """`` (run R, steps a..b)``: what a refused new fit would have replaced, for the user to decide."""
    try:
        meta = read_meta(log_dir)
        end = rank_end(log_dir, 0)
    except (OSError, LogFormatError):
        return ""
    first = int(meta.get("first_step") or 0)
    steps = f"steps {first}..{end}" if end is not None else "no step yet"
    return f" (run {meta.get('run_id')}, {steps})"
