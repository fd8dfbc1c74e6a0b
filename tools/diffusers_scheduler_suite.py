"""Run diffusers' own scheduler tests (tests/schedulers of a diffusers source tree) against minidiff.

    python tools/diffusers_scheduler_suite.py /path/to/diffusers [pytest options] [test files or ids]

The diffusers tree is not part of this repository: pass a checkout, or extract one, e.g.

    git -C /path/to/diffusers.git archive HEAD tests | tar -x -C /tmp/diffusers-tests

This file is also the pytest plugin the run loads. Before diffusers' test modules are imported it
points `diffusers.<Name>Scheduler` (what their `from diffusers import ...` reads) at minidiff's class
of that name. A scheduler minidiff does not have is replaced by a stand-in that skips the test
which builds it, so such tests are reported as skipped, not failed. Tests that exercise only
diffusers' own machinery (dummy ConfigMixin classes) or need the Hub are skipped too, by name.
A test stopped by one of minidiff's deliberate differences (see DELIBERATE) is reported as xfailed.

MINIDIFF_SUITE_LIFT_STEP_CHECK=1 lets step() run before set_timesteps() (with all training steps, as
diffusers starts), to see that the tests this difference stops pass otherwise.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import diffusers  # noqa: E402

from minidiff.schedulers import SCHEDULERS, SchedulerMixin  # noqa: E402

# tests that check diffusers itself, not a scheduler class minidiff could stand in for
DUMMIES = "diffusers' ConfigMixin on dummy classes"
SKIPPED_TESTS = {
    "SchedulerBaseTests::test_save_load_from_different_config": DUMMIES,
    "SchedulerBaseTests::test_save_load_compatible_schedulers": DUMMIES,
    "SchedulerBaseTests::test_save_load_from_different_config_comp_schedulers": DUMMIES,
    "SchedulerBaseTests::test_default_arguments_not_in_config": "a diffusers pipeline from the Hub (network)",
    "SchedulerBaseTests::test_default_solver_type_after_switch": "a diffusers pipeline from the Hub (network)",
}


class _MissingMeta(type):
    """Building a scheduler minidiff does not have skips the test (through any of the usual doors)."""

    def __call__(cls, *args, **kwargs):
        pytest.skip(f"minidiff has no {cls.__name__}")

    def __getattr__(cls, name):  # from_config, from_pretrained, a static helper, ...
        if name.startswith("__"):
            raise AttributeError(name)
        pytest.skip(f"minidiff has no {cls.__name__}")


def _missing(name: str) -> type:
    return _MissingMeta(name, (), {"__module__": "diffusers (not in minidiff)"})


def _install() -> None:
    """Point diffusers' scheduler names at minidiff's classes, or at skipping stand-ins."""
    for name in dir(diffusers):
        if name.endswith("Scheduler") and name not in ("SchedulerMixin",):
            setattr(diffusers, name, SCHEDULERS.get(name) or _missing(name))
    for name, cls in SCHEDULERS.items():
        setattr(diffusers, name, cls)


_install()

if os.environ.get("MINIDIFF_SUITE_LIFT_STEP_CHECK"):
    # a check of the check: step() before set_timesteps() runs with all T training steps (diffusers' starting
    # state), so the tests this deliberate difference stops show whether they would pass otherwise
    _check_ready = SchedulerMixin._check_ready

    def _lifted(self) -> None:
        if self.num_inference_steps is None:
            self.set_timesteps(self.config.num_train_timesteps)
        _check_ready(self)

    SchedulerMixin._check_ready = _lifted


def _skip_reason(item: pytest.Item) -> str | None:
    for key, reason in SKIPPED_TESTS.items():
        if item.nodeid.endswith(key):
            return reason
    classes = getattr(getattr(item, "cls", None), "scheduler_classes", None)
    if classes is None:
        return None
    if not classes:  # the common base class, collected again in every module that imports it
        return "SchedulerCommonTest itself (no scheduler class to test)"
    if missing := [c.__name__ for c in classes if isinstance(c, _MissingMeta)]:
        return f"minidiff has no {', '.join(missing)}"
    return None


# minidiff's deliberate differences (README), recognised by the error they raise: a test stopped by one of
# them is reported as xfailed with the reason, not failed
DELIBERATE = {
    "call set_timesteps(num_inference_steps) before step()": "step() before set_timesteps() raises",
    "must be a non-empty list with every β in (0, 1)": "betas outside (0, 1) are refused (diffusers: ᾱ < 0, NaN)",
}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed and call.excinfo is not None:
        message = str(call.excinfo.value)
        for needle, reason in DELIBERATE.items():
            if needle in message:
                report.outcome = "skipped"
                report.wasxfail = f"deliberate difference: {reason}"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if reason := _skip_reason(item):
            item.add_marker(pytest.mark.skip(reason=f"minidiff shim: {reason}"))


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__)
        return 2
    root = Path(argv[0]).resolve()
    suite = root / "tests" / "schedulers"
    if not suite.is_dir():
        print(f"{suite} not found: pass the root of a diffusers source tree (it must contain tests/schedulers)")
        return 2
    args = argv[1:]
    # test files (or ids) name a file of tests/schedulers; anything else is a pytest option
    targets = [str(suite / a) for a in args if ".py" in a and not a.startswith("-")]
    options = [a for a in args if ".py" not in a or a.startswith("-")]
    os.chdir(root)  # diffusers' `tests` package, not minidiff's
    return pytest.main(
        ["-p", "no:cacheprovider", "--rootdir", str(root), *options, *(targets or [str(suite)])],
        plugins=[sys.modules[__name__]],
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
