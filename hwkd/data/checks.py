"""The teacher check that runs before any training: a teacher near chance means wrong preprocessing.

A teacher trained with other inputs (``x / 255`` instead of ImageNet normalisation, BGR, another size)
still runs, and distilling from it produces a student at chance with every stage green. So each
user-supplied teacher is scored on (up to ``CHECK_IMAGES`` of) the validation split first.
"""

from __future__ import annotations

from hwkd.errors import DataError

WEAK_FACTOR = 1.5  # below 1.5x chance accuracy is "near chance"
CHECK_IMAGES = 2000


def flags_for(prep) -> str:
    """The CLI flags that state ``prep``, to show (and edit) in a message."""
    mean = ",".join(f"{v:g}" for v in prep.mean)
    std = ",".join(f"{v:g}" for v in prep.std)
    size = f"--resize {prep.resize[0]}" + (f" --crop {prep.crop[0]}" if prep.crop else "")
    return (
        f"--mean {mean} --std {std} {size} --interpolation {prep.interpolation} "
        f"--channel-order {prep.channel_order}"
    )


def check_teachers(teachers, names: list[str], dataset, allow_weak: bool = False, log=None) -> list[float]:
    """Validation accuracy of each teacher; a DataError (exit 2) for one below 1.5x chance unless
    ``allow_weak`` (then a warning). Returns the accuracies (they go into the manifest)."""
    from hwkd.train import accuracy

    n = min(CHECK_IMAGES, dataset.split_size("val"))
    chance = 1.0 / dataset.num_classes
    scores = [accuracy(t, dataset.eval_batches("val", limit=n)) for t in teachers]
    for name, score in zip(names, scores, strict=True):
        if score >= WEAK_FACTOR * chance:
            continue
        problem = (
            f"The teacher {name!r} scores {100 * score:.1f}% on {n} validation images, below "
            f"{WEAK_FACTOR:g}x chance ({100 * WEAK_FACTOR * chance:.1f}% for {dataset.num_classes} classes): "
            "distilling from it would train a student at chance. The usual cause is preprocessing that "
            "differs from the one the teacher was trained with; hwkd fed it: "
            f"{dataset.preprocessing.summary()}."
        )
        fix = (
            f"State the teacher's preprocessing, e.g. {flags_for(dataset.preprocessing)} (edit the values; "
            "or the [data] section of a recipe), check --teacher-arch and the labels' order, or pass "
            "--allow-weak-teacher to go on anyway."
        )
        if not allow_weak:
            raise DataError(problem, fix)
        if log is not None:
            log.warning("%s Going on (--allow-weak-teacher).", problem)
    return scores
