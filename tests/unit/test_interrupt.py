"""A Ctrl-C / SIGTERM that also kills the DataLoader's workers is still an interrupt (exit 130, resumable)."""

from __future__ import annotations

from hwkd.pipeline import _is_interrupt


def _raised_while_handling(first: BaseException, second: BaseException) -> BaseException:
    try:
        try:
            raise first
        except BaseException:
            raise second  # noqa: B904 - the implicit context is what is tested
    except BaseException as exc:  # noqa: BLE001 - the chained exception is what the pipeline sees
        return exc


def test_runtime_error_raised_while_handling_a_keyboard_interrupt_is_an_interrupt():
    exc = _raised_while_handling(KeyboardInterrupt(), RuntimeError("DataLoader worker (pid 1) exited unexpectedly"))
    assert isinstance(exc, RuntimeError) and isinstance(exc.__context__, KeyboardInterrupt)
    assert _is_interrupt(exc)


def test_dataloader_worker_killed_by_sigterm_is_an_interrupt():
    assert _is_interrupt(RuntimeError("DataLoader worker (pid 26324) is killed by signal: Terminated. "))


def test_ordinary_errors_are_not_interrupts():
    assert not _is_interrupt(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not _is_interrupt(ValueError("bad"))
    assert not _is_interrupt(RuntimeError("DataLoader worker (pid 3) is killed by signal: Segmentation fault."))
