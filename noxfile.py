"""Developer tasks: ``nox -s tests``, ``nox -s demo``, ``nox -s bench``, ``nox -s docs``, ``nox -s lint``."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
# A pinned torch: on the project machines this resolves from a local wheel (no multi-GB download).
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]


def _install(session: nox.Session, extras: str | None = None) -> None:
    session.install(*TORCH)
    session.install("-e", f".[{extras}]" if extras else ".")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite and the docstring examples (fast tier; ``nox -s tests -- --runslow`` for everything)."""
    _install(session, "test")
    args = session.posargs or ["-q", "-n", "2", "--durations=15", "--doctest-modules", "src/histoexpr", "tests"]
    session.run("pytest", *args, env={"MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"})


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """Run the main job on the built-in real demo dataset; outputs go to ``demo_output/``."""
    _install(session)
    session.run("python", "-m", "histoexpr.demo", "--out", "demo_output", *session.posargs,
                env={"MPLBACKEND": "Agg"})


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Run the benchmarks; JSON results in ``benchmarks/results/`` (``-- --quick`` for a smoke run)."""
    _install(session, "test,bench")
    session.run("python", "benchmarks/run.py", *session.posargs, env={"MPLBACKEND": "Agg"})


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the HTML documentation into ``docs/_build/html``, executing every tutorial notebook."""
    _install(session, "docs")
    # no MPLBACKEND here: the notebook kernels draw inline; one thread per library (2-core machines)
    session.run("sphinx-build", "-b", "html", "-W", "--keep-going", "docs", "docs/_build/html",
                env={"OMP_NUM_THREADS": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1"})


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Static checks (ruff)."""
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")
